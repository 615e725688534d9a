//! Fax calls through the release server: `BENCH_FAXES` (64) faxes of one
//! page sent at once from one tenant, through its trunk (this server), to
//! another tenant's fax number: each is a sending and a receiving fax call
//! on the server, two T.30 terminals and two RTP legs.
//!
//! Prints the server's CPU per fax call-second (its CPU over the sum of
//! every fax call's duration, both sides), how many fax calls were up at
//! once on average, and how many this machine holds at 80 % of its
//! cores; against the same number of terminal-seconds of spandsp alone,
//! run in this process (the modem's share of a fax call's cost).
//!
//! `cargo build --release --bin plugboard && PLUGBOARD_BIN=target/release/plugboard
//! cargo run --release -p plugboard-tests --example fax_calls_bench`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_fax::{FRAME, Role, Terminal, document};
use plugboard_tests::{Server, cpu_ms, env_u64, eventually};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn main() {
    let n = env_u64("BENCH_FAXES", 64) as usize;
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).unwrap();
    let mut keys = Vec::new();
    for (t, number) in [("a", "15550170"), ("b", "15550190")] {
        let key = s.tenant(t);
        let flow = r#"{"name":"fax-in","start":"done","nodes":{"done":{"type":"hangup"}}}"#;
        let d = s
            .call(
                "POST",
                &format!("/v1/tenants/{t}/flows/fax-in"),
                Some(&key),
                Some(flow.into()),
            )
            .unwrap();
        assert_eq!(d.status, 201, "{d:?}");
        let a = s.json(
            "PUT",
            &format!("/v1/tenants/{t}/addresses/{number}"),
            &key,
            &json!({"channel": "fax", "flow": "fax-in"}),
        );
        assert_eq!(a.status, 200, "{a:?}");
        keys.push(key);
    }
    let t = s.json(
        "PUT",
        "/v1/tenants/a/trunks/default",
        &keys[0],
        &json!({"host": format!("127.0.0.1:{}", s.sip_port), "username": "u", "password": "p"}),
    );
    assert_eq!(t.status, 200);
    // One page of text, as the document.
    let tiff = dir.path().join("page.tif");
    let text: String = (0..40)
        .map(|l| format!("Waybill 4711-{l:02}: 12 pallets, 4,200 kg, Vilnius to Rotterdam\n"))
        .collect();
    document::text_to_fax(&document::Tools::default(), &text, &tiff).unwrap();
    let pdf = dir.path().join("page.pdf");
    document::to_pdf(&document::Tools::default(), &tiff, &pdf).unwrap();
    let pdf_bytes = std::fs::read(&pdf).unwrap();

    let (cpu0, t0) = (cpu_ms(s.pid()), Instant::now());
    let mut sent = Vec::new();
    for _ in 0..n {
        let a = s
            .call(
                "POST",
                "/v1/tenants/a/faxes?from=15550170&to=15550190",
                Some(&keys[0]),
                Some(pdf_bytes.clone()),
            )
            .unwrap();
        assert_eq!(a.status, 202, "{a:?}");
        sent.push(a.body["interaction"].as_str().unwrap().to_string());
    }
    let posted = t0.elapsed();
    let mut done: Vec<Value> = Vec::new();
    let finished = eventually(Duration::from_secs(600), || {
        done = sent
            .iter()
            .filter_map(|ix| {
                s.messages("a", &keys[0], ix)
                    .into_iter()
                    .find(|m| m["status"] == "sent" || m["status"] == "failed")
            })
            .collect();
        done.len() == n
    });
    let wall = t0.elapsed();
    let cpu = cpu_ms(s.pid()) - cpu0;
    assert!(finished, "{} of {n} faxes finished", done.len());
    let failed = done.iter().filter(|m| m["status"] != "sent").count();
    // Both sides' fax call durations.
    let received: Vec<Value> = s
        .interactions("b", &keys[1])
        .into_iter()
        .filter(|ix| ix["channel"] == "fax")
        .flat_map(|ix| s.messages("b", &keys[1], ix["id"].as_str().unwrap()))
        .collect();
    let ms = |m: &Value| -> f64 {
        m["meta"]["fax_duration_ms"]
            .as_str()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0.0)
    };
    let call_s: f64 = done.iter().chain(&received).map(ms).sum::<f64>() / 1000.0;
    let ok_received = received
        .iter()
        .filter(|m| m["meta"]["fax_ok"] == "true")
        .count();
    let per_call_ms = cpu as f64 / call_s;
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1) as f64;
    println!(
        "{n} faxes posted in {:.1} s, all ended in {:.1} s: {} sent, {failed} failed; {ok_received} received whole",
        posted.as_secs_f64(),
        wall.as_secs_f64(),
        n - failed
    );
    println!(
        "server: {:.1} s CPU over {call_s:.0} fax call-seconds: {per_call_ms:.2} ms CPU per fax call-second; {:.0} fax calls up at once on average",
        cpu as f64 / 1000.0,
        call_s / wall.as_secs_f64()
    );
    println!(
        "at 80 % of {cores} cores: {:.0} fax calls at once",
        0.8 * cores * 1000.0 / per_call_ms
    );

    // The same terminal-seconds of spandsp alone, in this process.
    let frames = (call_s / 0.02) as u64;
    let pid = std::process::id();
    let c0 = cpu_ms(pid);
    let mut run = 0u64;
    while run < frames {
        let rx = dir.path().join("rx.tif");
        let mut a = Terminal::new(Role::Send, true, &tiff, "1").unwrap();
        let mut b = Terminal::new(Role::Receive, false, &rx, "2").unwrap();
        let (mut fa, mut fb) = ([0i16; FRAME], [0i16; FRAME]);
        while (a.outcome().is_none() || b.outcome().is_none()) && run < frames + 50 * 600 {
            let na = a.frame(&fb);
            let nb = b.frame(&fa);
            (fa, fb) = (na, nb);
            run += 2;
        }
    }
    let terminal_ms = (cpu_ms(pid) - c0) as f64 / call_s;
    println!(
        "spandsp alone: {terminal_ms:.3} ms CPU per terminal-second; the modem is {:.1} % of a fax call's cost on the server (ratio {:.0}x)",
        100.0 * terminal_ms / per_call_ms,
        per_call_ms / terminal_ms.max(1e-6)
    );
}
