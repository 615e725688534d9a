//! Per-event flow invocation cost and resident memory per loaded tenant.
//!
//! Run with: `scripts/build-plugins.sh && cargo run --release -p plugboard-host --example bench`
//!
//! Prints, in one run:
//! - instantiate + handle + drop of the hello-ivr flow (pooling allocator),
//!   p50/p99 over many events, next to the same menu logic compiled natively;
//! - resident memory for 10,000 tenants each with their own loaded plugin
//!   version (`InstancePre` + environment) of the same component.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_core::{Event, flow::Action};
use plugboard_host::{FlowInput, HostConfig, PluginEnv, PluginHost};
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The hello-ivr menu, natively: the baseline.
fn native_handle(state: &str, event: &Event) -> (Vec<Action>, Option<String>) {
    let misses: u32 = state.parse().unwrap_or(0);
    match event {
        Event::Digits { digits, .. } if digits == "1" => (
            vec![
                Action::SetAttribute {
                    name: "menu".into(),
                    value: "sales".into(),
                },
                Action::Say {
                    text: "Connecting you to sales.".into(),
                    voice: None,
                    language: None,
                },
                Action::Enqueue {
                    queue: "sales".into(),
                    priority: 0,
                    skills: vec![],
                },
            ],
            None,
        ),
        _ => (vec![Action::Hangup], Some((misses + 1).to_string())),
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

fn main() {
    let wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/wasm32-wasip2/release/hello_ivr.wasm");
    let bytes = std::fs::read(&wasm).expect("build the plugins first: scripts/build-plugins.sh");
    let host = PluginHost::new(HostConfig::default()).unwrap();
    let plugin = host.load(&bytes).unwrap();
    let ix = FlowInput {
        id: "ix".into(),
        tenant: "t".into(),
        from: "1".into(),
        to: "2".into(),
        ..Default::default()
    };
    let event = Event::Digits {
        digits: "1".into(),
        terminated: false,
    };
    let env = PluginEnv {
        tenant: "t".into(),
        plugin: "ivr".into(),
        ..Default::default()
    };

    // A guest that grows its memory on every event pays for it each time.
    let probe = host.invoke_flow(&plugin, env.clone(), &ix, "0", &event);
    println!("instance linear memory: {} KiB", probe.memory_bytes / 1024);
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    for _ in 0..1000 {
        host.invoke_flow(&plugin, env.clone(), &ix, "0", &event)
            .outcome
            .unwrap();
    }
    let mut wasm_ns = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let out = host.invoke_flow(&plugin, env.clone(), &ix, "0", &event);
        black_box(out.outcome.unwrap());
        wasm_ns.push(t0.elapsed().as_nanos() as u64);
    }
    wasm_ns.sort_unstable();
    let mut native_ns = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        black_box(native_handle(black_box("0"), black_box(&event)));
        native_ns.push(t0.elapsed().as_nanos() as u64);
    }
    native_ns.sort_unstable();
    let (wp50, wp99) = (percentile(&wasm_ns, 0.5), percentile(&wasm_ns, 0.99));
    let (np50, np99) = (percentile(&native_ns, 0.5), percentile(&native_ns, 0.99));
    println!("flow invocation (instantiate + handle + drop), {n} events, pooling allocator:");
    println!(
        "  wasm   p50 {:>8.2} µs  p99 {:>8.2} µs",
        wp50 as f64 / 1e3,
        wp99 as f64 / 1e3
    );
    println!(
        "  native p50 {:>8.2} µs  p99 {:>8.2} µs",
        np50 as f64 / 1e3,
        np99 as f64 / 1e3
    );
    println!(
        "  ratio wasm/native: p50 {:.0}x  p99 {:.0}x",
        wp50 as f64 / np50.max(1) as f64,
        wp99 as f64 / np99.max(1) as f64
    );

    // 10,000 tenants, each with its own loaded version of the component.
    let tenants: usize = std::env::var("BENCH_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    if tenants == 0 {
        return;
    }
    let before = rss_kib();
    let mut loaded = Vec::with_capacity(tenants);
    for i in 0..tenants {
        let p = host.load_with_hash(plugin.sha256.clone(), &bytes).unwrap();
        let env = PluginEnv {
            tenant: format!("tenant-{i:05}"),
            plugin: "ivr".into(),
            config: serde_json::json!({"greeting": format!("Hello from tenant {i}")}),
            ..Default::default()
        };
        loaded.push((p, env));
    }
    let after = rss_kib();
    // Every one of them answers.
    for i in [0, tenants / 2, tenants - 1] {
        let (p, env) = &loaded[i];
        host.invoke_flow(p, env.clone(), &ix, "0", &event)
            .outcome
            .unwrap();
    }
    println!(
        "{tenants} tenants resident: RSS {} KiB -> {} KiB, {:.1} KiB per idle tenant ({} compiled component(s) shared)",
        before,
        after,
        (after.saturating_sub(before)) as f64 / tenants as f64,
        host.resident_components()
    );
}
