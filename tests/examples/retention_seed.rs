//! Fills a stopped server's embedded store with old, closed calls for
//! the retention benchmark (`scripts/bench-voice.py`, `BENCH_ONLY=retention`):
//! `retention_seed STORE_DIR TENANT COUNT DAYS_AGO` writes COUNT calls of
//! the tenant (which must exist), each with six timeline entries, created
//! DAYS_AGO days ago, and prints how fast it wrote them.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_core::{Channel, EntryKind, InteractionState};
use plugboard_store::{InteractionStore, SledStore, conformance};
use std::sync::Arc;
use std::time::Instant;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, tenant, count, days] = &args[..] else {
        panic!("usage: retention_seed STORE_DIR TENANT COUNT DAYS_AGO");
    };
    let count: u64 = count.parse().unwrap();
    let days: u64 = days.parse().unwrap();
    let store = Arc::new(SledStore::open(std::path::Path::new(dir)).unwrap());
    let start = plugboard_core::now_ms() - days * 86_400_000;
    let t0 = Instant::now();
    let writers = 32u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, tenant) = (store.clone(), tenant.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = w;
            while n < count {
                let created = start + n;
                let id = plugboard_core::interaction_id(created, n as u32);
                let from = format!("4420{:07}", n % 10_000_000);
                let mut ix = conformance::interaction(&tenant, &id, &from, Channel::Voice);
                ix.created_ms = created;
                for (i, kind) in [
                    EntryKind::Call,
                    EntryKind::Answered,
                    EntryKind::Event,
                    EntryKind::Actions,
                    EntryKind::Media,
                    EntryKind::Hangup,
                ]
                .into_iter()
                .enumerate()
                {
                    ix.push(kind, serde_json::json!({"n": n, "i": i}));
                }
                ix.state = InteractionState::Closed;
                ix.closed_ms = Some(created + 30_000);
                store.save_interaction_soft(&ix, 0).await.unwrap();
                n += writers;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // One durable write makes everything before it durable too.
    let end = plugboard_core::interaction_id(start - 1, 0);
    let mut last = conformance::interaction(tenant, &end, "0", Channel::Voice);
    last.created_ms = start;
    last.state = InteractionState::Closed;
    last.closed_ms = Some(start);
    store.save_interaction(&last, 0).await.unwrap();
    let s = t0.elapsed().as_secs_f64();
    println!(
        "seeded {count} calls of {tenant}, {days} days old, in {s:.1} s ({:.0}/s)",
        count as f64 / s
    );
}
