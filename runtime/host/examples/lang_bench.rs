//! The order-hotline scenario in each plugin language, side by side: the
//! JSON flow document (run by the flow-graph component), Rust (built for
//! wasm32-wasip2, and lean: a core module for wasm32-unknown-unknown),
//! JavaScript and Python. Every interaction is `started` then `digits 1` (menu, then
//! sales), each event in a fresh instance as the server runs it.
//!
//! Run with: `scripts/build-plugins.sh && scripts/build-polyglot.sh &&
//! cargo run --release -p plugboard-host --example lang_bench`
//!
//! Prints per language: component size, load (compile) time, per-event
//! latency p50/p99 (instantiate + handle + drop), events per second on one
//! thread, and the linear memory one instance holds; and the ratios
//! against the Rust plugin measured in the same run.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_core::Event;
use plugboard_host::{FlowInput, HostConfig, PluginEnv, PluginHost};
use std::path::PathBuf;
use std::time::Instant;

/// 2026-11-23, a Monday, 10:00 UTC: the hotline is open.
const MONDAY_10: u64 = 1_795_428_000_000;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Row {
    name: &'static str,
    size: usize,
    load_ms: u64,
    p50: u64,
    p99: u64,
    per_sec: f64,
    memory: usize,
}

fn main() {
    // The host is async (plugins' host calls park, not block): events are
    // driven from a single-threaded runtime, as one executor thread would.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let release = root.join("target/wasm32-wasip2/release");
    let lean = root.join("target/wasm32-unknown-unknown/release");
    let polyglot = root.join("target/polyglot");
    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("examples/order-hotline/flow.json")).unwrap(),
    )
    .unwrap();
    let candidates = [
        ("json", release.join("flow_graph.wasm"), true),
        ("rust", release.join("order_hotline.wasm"), false),
        // The default Rust build: a core module for wasm32-unknown-unknown.
        ("rust-lean", lean.join("order_hotline.wasm"), false),
        ("js", polyglot.join("order_hotline_js.wasm"), false),
        ("python", polyglot.join("order_hotline_py.wasm"), false),
    ];
    let interactions: usize = std::env::var("BENCH_INTERACTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let host = PluginHost::new(HostConfig::default()).unwrap();
    let ix = FlowInput {
        id: "ix".into(),
        tenant: "t".into(),
        from: "+37060000001".into(),
        to: "+37052000000".into(),
        ..Default::default()
    };
    let events = [
        Event::Started,
        Event::Digits {
            digits: "1".into(),
            terminated: false,
        },
    ];
    let mut rows = Vec::new();
    for (name, path, with_doc) in candidates {
        let Ok(bytes) = std::fs::read(&path) else {
            println!("{name:>9}: {} not built, skipped", path.display());
            continue;
        };
        let t0 = Instant::now();
        let plugin = host.load(&bytes).unwrap();
        let load_ms = t0.elapsed().as_millis() as u64;
        let mut config = serde_json::json!({"mis_url": "http://127.0.0.1:9"});
        if with_doc {
            // As the server passes it: the document as JSON text.
            config["flow"] = serde_json::Value::String(doc.to_string());
        }
        let env = PluginEnv {
            tenant: "t".into(),
            plugin: name.into(),
            config,
            now_ms: Some(MONDAY_10),
            time_zone: "UTC".into(),
            ..Default::default()
        };
        let mut lat = Vec::with_capacity(interactions * events.len());
        let mut memory = 0;
        let mut last = Vec::new();
        let started = Instant::now();
        for i in 0..interactions + 5 {
            let mut state = String::new();
            for e in &events {
                let t = Instant::now();
                let r = rt.block_on(host.invoke_flow(&plugin, env.clone(), &ix, &state, e));
                let ns = t.elapsed().as_nanos() as u64;
                let out = r.outcome.unwrap_or_else(|err| panic!("{name}: {err}"));
                state = out.state.unwrap_or(state);
                memory = memory.max(r.memory_bytes);
                if i >= 5 {
                    lat.push(ns);
                }
                last = out.actions;
            }
        }
        let total = started.elapsed().as_secs_f64();
        assert!(
            last.iter()
                .any(|a| matches!(a, plugboard_core::flow::Action::Enqueue { queue, .. } if queue == "sales")),
            "{name}: digits 1 must queue for sales, got {last:?}"
        );
        lat.sort_unstable();
        rows.push(Row {
            name,
            size: bytes.len(),
            load_ms,
            p50: percentile(&lat, 0.5),
            p99: percentile(&lat, 0.99),
            per_sec: ((interactions + 5) * events.len()) as f64 / total,
            memory,
        });
    }
    println!(
        "order-hotline, {interactions} interactions x {} events, fresh instance per event:",
        events.len()
    );
    println!(
        "{:>9} {:>9} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "lang", "size KiB", "load ms", "p50 µs", "p99 µs", "events/s", "mem KiB", "p50 x", "mem x"
    );
    let base = rows
        .iter()
        .find(|r| r.name == "rust")
        .map(|r| (r.p50, r.memory));
    for r in &rows {
        let (bp, bm) = base.unwrap_or((r.p50, r.memory));
        println!(
            "{:>9} {:>9} {:>8} {:>10.1} {:>10.1} {:>10.0} {:>10} {:>8.1} {:>8.1}",
            r.name,
            r.size / 1024,
            r.load_ms,
            r.p50 as f64 / 1e3,
            r.p99 as f64 / 1e3,
            r.per_sec,
            r.memory / 1024,
            r.p50 as f64 / bp.max(1) as f64,
            r.memory as f64 / bm.max(1) as f64,
        );
    }
    println!("(ratios: against the Rust plugin built for wasm32-wasip2 in this run)");
}
