//! Per-event flow invocation cost and resident memory per loaded tenant.
//!
//! Run with: `scripts/build-plugins.sh && cargo run --release -p plugboard-host --example bench`
//!
//! Prints, in one run:
//! - instantiate + handle + drop of the hello-ivr flow (pooling allocator),
//!   p50/p99 over many events, for its lean build (a `wasm32-unknown-unknown`
//!   core module with the SDK's event arena, as `plugboard plugin new --lang
//!   rust` builds) and its `wasm32-wasip2` build, next to the same menu logic
//!   compiled natively, with the ratios;
//! - resident memory for 10,000 tenants each with their own loaded plugin
//!   version (`InstancePre` + environment) of the lean build.

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

/// Sorted per-event times of one variant, ns.
struct Times(Vec<u64>);

impl Times {
    fn p(&self, q: f64) -> f64 {
        percentile(&self.0, q) as f64 / 1e3
    }
}

fn main() {
    // The host is async (plugins' host calls park, not block): events are
    // driven from a single-threaded runtime, as one executor thread would.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let release = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target");
    let read = |target: &str| {
        let path = release.join(target).join("release/hello_ivr.wasm");
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build the plugins first: scripts/build-plugins.sh",
                path.display()
            )
        })
    };
    // The same flow two ways: a lean core module (wasm32-unknown-unknown, the
    // SDK's event arena; the host wraps it into a component) as
    // `plugboard plugin new --lang rust` builds, and a wasm32-wasip2 component.
    let lean_bytes = read("wasm32-unknown-unknown");
    let p2_bytes = read("wasm32-wasip2");
    let host = PluginHost::new(HostConfig::default()).unwrap();
    let lean = host.load(&lean_bytes).unwrap();
    let p2 = host.load(&p2_bytes).unwrap();
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
    let native = native_handle("0", &event).0;
    for (name, p) in [("lean", &lean), ("wasip2", &p2)] {
        let probe = rt.block_on(host.invoke_flow(p, env.clone(), &ix, "0", &event));
        let actions = probe.outcome.unwrap().actions;
        assert_eq!(actions, native, "{name} build and native logic agree");
        println!(
            "{name:>6}: component instance linear memory {} KiB",
            probe.memory_bytes / 1024
        );
    }

    // Rounds of 1,000 events, the variants taking turns, so that a noisy
    // neighbour on this shared machine hits them alike.
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    const ROUND: usize = 1000;
    let mut wasm: [Vec<u64>; 2] = [Vec::with_capacity(n), Vec::with_capacity(n)];
    let mut native_ns = Vec::with_capacity(n);
    for round in 0..=n.div_ceil(ROUND) {
        for (i, p) in [&lean, &p2].into_iter().enumerate() {
            // Awaited inside one task, as the engine's callers do (they
            // are async already): the runtime is entered once per round.
            rt.block_on(async {
                for _ in 0..ROUND {
                    let t0 = Instant::now();
                    let out = host.invoke_flow(p, env.clone(), &ix, "0", &event).await;
                    black_box(out.outcome.unwrap());
                    // Round 0 warms up.
                    if round > 0 {
                        wasm[i].push(t0.elapsed().as_nanos() as u64);
                    }
                }
            });
        }
        for _ in 0..ROUND {
            let t0 = Instant::now();
            black_box(native_handle(black_box("0"), black_box(&event)));
            if round > 0 {
                native_ns.push(t0.elapsed().as_nanos() as u64);
            }
        }
    }
    let [mut lean_ns, mut p2_ns] = wasm;
    for v in [&mut lean_ns, &mut p2_ns, &mut native_ns] {
        v.sort_unstable();
    }
    let (lean_t, p2_t, native_t) = (Times(lean_ns), Times(p2_ns), Times(native_ns));
    println!(
        "flow invocation (instantiate + handle + drop), {} events each, pooling allocator:",
        lean_t.0.len()
    );
    for (name, t) in [("lean", &lean_t), ("wasip2", &p2_t), ("native", &native_t)] {
        println!(
            "  {name:>6} p50 {:>8.2} µs  p99 {:>8.2} µs",
            t.p(0.5),
            t.p(0.99)
        );
    }
    for (name, t) in [("lean", &lean_t), ("wasip2", &p2_t)] {
        println!(
            "  ratio {name}/native: p50 {:.0}x  p99 {:.0}x",
            t.p(0.5) / native_t.p(0.5).max(0.001),
            t.p(0.99) / native_t.p(0.99).max(0.001)
        );
    }
    println!(
        "  ratio lean/wasip2: p50 {:.2}  p99 {:.2}",
        lean_t.p(0.5) / p2_t.p(0.5),
        lean_t.p(0.99) / p2_t.p(0.99)
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
        let p = host
            .load_with_hash(lean.sha256.clone(), &lean_bytes)
            .unwrap();
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
        rt.block_on(host.invoke_flow(p, env.clone(), &ix, "0", &event))
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
