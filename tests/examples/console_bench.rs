//! Console benchmark: the time from a task being offered to an agent to
//! the offer showing in the agent's console (headless Chromium, the page
//! built by scripts/build-web.sh), p50/p99 over `BENCH_OFFERS` offers
//! (default 200), one at a time; each is accepted and completed over the
//! API before the next.
//!
//! Baseline, in the same run and for the same offers: a plain WebSocket
//! client of the tenant's event stream (the agent's token) seeing the
//! offer event. The ratio is what the page adds (parsing, rendering).
//! Times are from just before the task is created over the API, read on
//! one machine clock: the page's by the User Timing mark the console sets
//! when it shows an offer.
//!
//! `cargo build --release --bin plugboard && PLUGBOARD_BIN=target/release/plugboard
//! cargo run --release -p plugboard-tests --example console_bench`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_tests::{Browser, LOOPBACK, Server, console_sign_in, env_u64};
use serde_json::{Value, json};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let n = env_u64("BENCH_OFFERS", 200) as usize;
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), LOOPBACK).unwrap();
    let key = s.tenant("bench");
    for (path, body) in [
        (
            "/v1/tenants/bench/queues/desk",
            json!({"offer_timeout": 60}),
        ),
        (
            "/v1/tenants/bench/agents/ann",
            json!({"capacity": {"chat": 1}}),
        ),
    ] {
        let r = s.json("PUT", path, &key, &body);
        assert_eq!(r.status, 200, "{r:?}");
    }
    let ann = s.json(
        "POST",
        "/v1/tenants/bench/agents/ann/token",
        &key,
        &json!({}),
    );
    let ann = ann.body["token"].as_str().unwrap().to_string();
    let p = s.json(
        "PUT",
        "/v1/tenants/bench/agents/ann/presence",
        &ann,
        &json!({"state": "available"}),
    );
    assert_eq!(p.status, 204, "{p:?}");
    let mut b = Browser::start();
    console_sign_in(&mut b, &s, "bench", &ann, "desk");
    let mut ws = s.tenant_stream("bench", &ann);

    let (mut page, mut stream) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let started = Instant::now();
    for i in 0..n {
        let id = format!("b{i:05}");
        let t0 = epoch_ms();
        let r = s.json(
            "POST",
            "/v1/tenants/bench/tasks",
            &key,
            &json!({"id": id, "queue": "desk", "channel": "chat"}),
        );
        assert_eq!(r.status, 201, "{r:?}");
        // The baseline: the offer event on a plain event-stream client.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no offer event for {id}");
            let msg = ws.read().unwrap();
            let v: Value = serde_json::from_str(msg.to_text().unwrap_or("{}")).unwrap_or_default();
            if v["data"]["type"] == "offer" && v["data"]["task"] == id.as_str() {
                stream.push(epoch_ms() - t0);
                break;
            }
        }
        let shown = b.must(json!({"op": "wait", "ms": 10000, "js": format!(
            "(e => e && performance.timeOrigin + e.startTime)(performance.getEntriesByName('offer:{id}')[0])"
        )}));
        page.push(shown.as_f64().unwrap() - t0);
        for action in ["accept", "complete"] {
            let r = s.json(
                "POST",
                &format!("/v1/tenants/bench/tasks/{id}/{action}"),
                &ann,
                &json!({}),
            );
            assert_eq!(r.status, 200, "{action} {id}: {r:?}");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let (p50, p99) = (percentile(&mut page, 0.5), percentile(&mut page, 0.99));
    let (b50, b99) = (percentile(&mut stream, 0.5), percentile(&mut stream, 0.99));
    println!("console_bench: {n} offers in {secs:.1} s, one at a time");
    println!("  event stream (baseline): p50 {b50:.1} ms  p99 {b99:.1} ms");
    println!("  console page:            p50 {p50:.1} ms  p99 {p99:.1} ms");
    println!(
        "  page / stream:           p50 {:.2}  p99 {:.2}",
        p50 / b50.max(0.001),
        p99 / b99.max(0.001)
    );
}
