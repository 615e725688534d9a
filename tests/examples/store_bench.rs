//! Store benchmark: interactions written per second (create, 10 timeline
//! appends, close: 12 durable writes each) by many concurrent writers, and
//! the p50/p99 time of one interaction, on sled and on PostgreSQL in the
//! same run (a PostgreSQL server is started for it, as the tests do).
//!
//! `cargo run --release -p plugboard-tests --example store_bench`
//! (`BENCH_WRITERS`, default 256; `BENCH_INTERACTIONS`, default 20000).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_core::{Channel, EntryKind, InteractionState, TimelineEntry};
use plugboard_store::{PgStore, SledStore, Store, conformance};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Run {
    per_s: f64,
    p50: Duration,
    p99: Duration,
}

impl Run {
    fn print(&self, store: &str) {
        println!(
            "{store:<11} {:>8.0} interactions/s  p50 {:>7.1} ms  p99 {:>7.1} ms",
            self.per_s,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3
        );
    }
}

async fn run(store: Arc<dyn Store>, writers: usize, total: usize) -> Run {
    store
        .create_tenant(&conformance::tenant("bench"), "hash")
        .await
        .unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, next) = (store.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return times;
                }
                let start = Instant::now();
                let mut ix = conformance::interaction(
                    "bench",
                    &format!("ix-{:013}-{w:04x}{n:04x}", 1_000_000 + n),
                    &format!("+3706{:05}", n % 1000),
                    Channel::Voice,
                );
                let mut stored = 0;
                for step in 0..11u64 {
                    ix.timeline.push(TimelineEntry {
                        at_ms: step,
                        kind: EntryKind::Event,
                        data: serde_json::json!({"digits": "1", "step": step}),
                    });
                    stored = store.save_interaction(&ix, stored).await.unwrap();
                }
                ix.state = InteractionState::Closed;
                ix.closed_ms = Some(1);
                store.save_interaction(&ix, stored).await.unwrap();
                times.push(start.elapsed());
            }
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await.unwrap());
    }
    let elapsed = t0.elapsed();
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    Run {
        per_s: total as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

#[tokio::main]
async fn main() {
    let writers = env("BENCH_WRITERS", 256);
    let total = env("BENCH_INTERACTIONS", 20_000);
    println!(
        "{total} interactions (create + 10 appends + close = 12 durable writes each), {writers} writers"
    );
    let dir = tempfile::tempdir().unwrap();
    let sled: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let s = run(sled, writers, total).await;
    s.print("sled:");
    if std::env::var("BENCH_STORES").as_deref() == Ok("sled") {
        return;
    }
    let url = plugboard_tests::postgres().database();
    let pg: Arc<dyn Store> = Arc::new(PgStore::connect(&url, 32).await.unwrap());
    let p = run(pg, writers, total).await;
    p.print("PostgreSQL:");
    println!(
        "PostgreSQL/sled: throughput {:.2}, p99 {:.2}",
        p.per_s / s.per_s,
        p.p99.as_secs_f64() / s.p99.as_secs_f64()
    );
}
