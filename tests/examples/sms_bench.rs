//! SMS benchmark: `submit_sm` a second with a window of 10 against one
//! SMSC (node-smpp's server, tests/peers/smsc/smsc.js, quiet).
//!
//! 1. Baseline: node-smpp's own client (tests/peers/smsc/client.js) with
//!    10 in flight: what the SMSC and loopback allow.
//! 2. Our link (plugboard-sms's `Link`, the sans-IO ESME on tokio),
//!    in this process, 10 in flight.
//! 3. End to end through the release server: `BENCH_MESSAGES` replies
//!    posted over the HTTP API (16 clients) to 100 SMS conversations; each
//!    is stored, put in the outbox, handed to the link and marked sent.
//!    Time until the SMSC has taken them all.
//!
//! The ratios are what to read; the machine is shared and noisy.
//!
//! `cargo build --release --bin plugboard && PLUGBOARD_BIN=target/release/plugboard
//! cargo run --release -p plugboard-tests --example sms_bench`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_sms::esme::EsmeConfig;
use plugboard_sms::link::{DeliverSink, Endpoint, Link, SubmitOutcome, Timing};
use plugboard_tests::{LOOPBACK, Server, Smsc, env_u64, root, smpp_carrier};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct NoSink;

#[async_trait::async_trait]
impl DeliverSink for NoSink {
    async fn deliver(&self, _sm: rusmpp::pdus::DeliverSm) -> u32 {
        0
    }
    fn state(&self, _state: serde_json::Value) {}
}

fn accepted(smsc: &mut Smsc) -> u64 {
    let before = smsc.named("count").len();
    smsc.send(json!({"cmd": "count"}));
    let got = smsc.wait_count("count", before + 1, Duration::from_secs(10));
    got[before]["accepted"].as_u64().unwrap()
}

fn baseline(smsc: &Smsc, n: u64) -> f64 {
    let dir = root().join("target/sdk-tools/peers-smsc");
    let out = std::process::Command::new("node")
        .arg(dir.join("client.js"))
        .args([&smsc.port.to_string(), &n.to_string(), "10"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["per_sec"].as_f64().unwrap()
}

fn ours(smsc: &Smsc, n: u64) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port: smsc.port,
            esme: EsmeConfig {
                system_id: "test".into(),
                password: "secret".into(),
                window: 10,
                ..EsmeConfig::default()
            },
        };
        let net = plugboard_host::fetch::NetPolicy::allowing(&["127.0.0.1/32".into()]).unwrap();
        let link = Arc::new(Link::start(
            endpoint,
            net,
            Timing::default(),
            Arc::new(NoSink),
        ));
        // Wait for the bind: a first message goes once bound.
        loop {
            let sm = rusmpp::pdus::SubmitSm::builder()
                .destination_addr("37060000009".parse().unwrap())
                .build();
            if matches!(link.submit(sm).await, SubmitOutcome::Accepted(_)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t0 = Instant::now();
        let slots = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::with_capacity(n as usize);
        for i in 0..n {
            let permit = slots.clone().acquire_owned().await.unwrap();
            let link = link.clone();
            tasks.push(tokio::spawn(async move {
                let sm = rusmpp::pdus::SubmitSm::builder()
                    .source_addr("37060000001".parse().unwrap())
                    .destination_addr("37060000009".parse().unwrap())
                    .registered_delivery(rusmpp::values::RegisteredDelivery::from(1u8))
                    .short_message(
                        rusmpp::types::OctetString::from_vec(format!("update {i}").into_bytes())
                            .unwrap(),
                    )
                    .build();
                let r = link.submit(sm).await;
                drop(permit);
                assert!(matches!(r, SubmitOutcome::Accepted(_)), "{r:?}");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rate = n as f64 / t0.elapsed().as_secs_f64();
        if let Ok(link) = Arc::try_unwrap(link) {
            link.stop().await;
        }
        rate
    })
}

/// Conversations the end-to-end run spreads its replies over.
const CONVERSATIONS: u64 = 100;

fn end_to_end(smsc: &mut Smsc, n: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), LOOPBACK).unwrap();
    let key = s.tenant("bench");
    // A flow that listens and says nothing.
    let doc = json!({"name": "listen", "start": "wait", "nodes": {
        "wait": {"type": "gather", "prompt": "", "var": "x", "max_digits": 64, "timeout_ms": 3600000, "next": "wait", "no_input": "wait"}}});
    let d = s
        .call(
            "POST",
            "/v1/tenants/bench/flows/listen",
            Some(&key),
            Some(doc.to_string().into_bytes()),
        )
        .unwrap();
    assert!(d.status == 200 || d.status == 201, "{d:?}");
    let a = s.json(
        "PUT",
        "/v1/tenants/bench/addresses/37060000001",
        &key,
        &json!({"channel": "sms", "flow": "listen"}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    smpp_carrier(&s, "bench", &key, smsc.port, "secret", &[]);
    let binds = smsc.named("bind").len();
    smsc.wait_count("bind", binds + 1, Duration::from_secs(30));
    // Customers text first: one conversation each.
    for c in 0..CONVERSATIONS {
        smsc.send(json!({"cmd": "mo", "tag": format!("start{c}"),
                         "from": format!("3706100{c:04}"), "to": "37060000001", "text": "hi"}));
    }
    let ixs: Vec<String> = loop {
        let a = s.get("/v1/tenants/bench/interactions?limit=1000", &key);
        let ixs: Vec<String> = a.body["interactions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        if ixs.len() as u64 == CONVERSATIONS {
            break ixs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let start = accepted(smsc);
    let t0 = Instant::now();
    let clients = 16;
    let per = n / clients;
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (url, key, ixs) = (s.url(), key.clone(), ixs.clone());
            std::thread::spawn(move || {
                let agent = ureq::Agent::new_with_defaults();
                for i in 0..per {
                    let ix = &ixs[((c * per + i) % CONVERSATIONS) as usize];
                    let r = agent
                        .post(&format!(
                            "{url}/v1/tenants/bench/interactions/{ix}/messages"
                        ))
                        .header("Authorization", &format!("Bearer {key}"))
                        .send_json(json!({"text": format!("update {c}-{i}")}))
                        .unwrap();
                    assert_eq!(r.status(), 201);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let posted = t0.elapsed().as_secs_f64();
    let total = per * clients;
    let deadline = Instant::now() + Duration::from_secs(300);
    while accepted(smsc) < start + total {
        assert!(Instant::now() < deadline, "the outbox did not drain");
        std::thread::sleep(Duration::from_millis(20));
    }
    let all = t0.elapsed().as_secs_f64();
    (total as f64 / posted, total as f64 / all)
}

fn main() {
    let n = env_u64("BENCH_MESSAGES", 20_000);
    let mut smsc = Smsc::start("test", "secret");
    smsc.send(json!({"cmd": "quiet", "on": true}));
    println!("SMS benchmark: {n} submit_sm, window 10, one SMSC (node-smpp) on loopback");
    let base = baseline(&smsc, n);
    println!("  baseline  node-smpp client          {base:>9.0} submit_sm/s");
    let link = ours(&smsc, n);
    println!(
        "  plugboard link (sans-IO ESME)     {link:>9.0} submit_sm/s   ratio {:.2}",
        link / base
    );
    let e2e = env_u64("BENCH_E2E_MESSAGES", 4_000);
    let (api, sent) = end_to_end(&mut smsc, e2e);
    println!(
        "  end to end ({e2e} API replies): posted {api:.0}/s, sent {sent:.0}/s   ratio {:.2}",
        sent / base
    );
}
