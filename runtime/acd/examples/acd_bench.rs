//! Routing decisions with the built-in rule on a large centre: 5,000
//! agents (each with 2 of 10 skills, all busy) and 10,000 waiting tasks
//! (each needing 1 of 10 skills, priorities 0–2, 5 queues with aging).
//! One decision: an agent finishes a task, the ACD picks the waiting task
//! for them and offers it, the agent accepts. Prints decisions per second
//! and the p50/p99 latency of one decision (the `complete` call and the
//! offer it yields). Compare two builds in one script run (the closing
//! note of the change that indexed the waiting tasks did, against the
//! scan-everything version before it).
//!
//! `cargo run --release -p plugboard-acd --example acd_bench [AGENTS TASKS DECISIONS]`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use plugboard_acd::{Acd, AgentConfig, Output, Presence, QueueConfig, TaskSpec};
use plugboard_core::Channel;

/// A waiting task in one of 5 queues, priority 0–2, needing one of the
/// skills.
fn random_task(id: String, next: &mut impl FnMut(usize) -> usize, skills: &[String]) -> TaskSpec {
    TaskSpec {
        id,
        queue: format!("q{}", next(5)),
        channel: Channel::Voice,
        priority: next(3) as u32,
        skills: vec![skills[next(10)].clone()],
        agent: None,
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let agents = args.first().copied().unwrap_or(5_000);
    let tasks = args.get(1).copied().unwrap_or(10_000);
    let decisions = args.get(2).copied().unwrap_or(5_000);
    let skills: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    let t0 = Instant::now();
    let mut acd = Acd::new();
    for q in 0..5 {
        let mut c = QueueConfig::new(&format!("q{q}"));
        c.aging = Some(Duration::from_secs(30));
        c.offer_timeout = Duration::from_secs(3600);
        acd.set_queue(c);
    }
    // Every agent busy with one task (so the waiting ones stay waiting).
    let mut seq = 0u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let mut connected: Vec<(String, String)> = Vec::new();
    for a in 0..agents {
        let id = format!("a{a}");
        let (s1, s2) = (next(10), next(10));
        acd.set_agent(
            t0,
            AgentConfig {
                id: id.clone(),
                skills: [(skills[s1].clone(), 5), (skills[s2].clone(), 5)]
                    .into_iter()
                    .collect(),
                capacity: [(Channel::Voice, 1)].into_iter().collect(),
                queues: None,
            },
        );
        acd.set_presence(t0, &id, Presence::Available).unwrap();
        seq += 1;
        let task = format!("busy{seq}");
        acd.enqueue(
            t0,
            TaskSpec {
                id: task.clone(),
                queue: "q0".into(),
                channel: Channel::Voice,
                priority: 0,
                skills: vec![skills[s1].clone()],
                agent: None,
            },
        )
        .unwrap();
        let outs: Vec<Output> = std::iter::from_fn(|| acd.poll_output()).collect();
        for o in outs {
            if let Output::Offer { task, agent, .. } = o {
                acd.accept(t0, &task, &agent).unwrap();
                connected.push((task, agent));
            }
        }
    }
    for i in 0..tasks {
        acd.enqueue(t0, random_task(format!("w{i}"), &mut next, &skills))
            .unwrap();
    }
    while acd.poll_output().is_some() {}
    println!(
        "set-up: {agents} agents busy, {} tasks waiting, in {:.1} s",
        acd.queue_stats(t0, "q0").waiting
            + (1..5)
                .map(|q| acd.queue_stats(t0, &format!("q{q}")).waiting)
                .sum::<usize>(),
        t0.elapsed().as_secs_f64()
    );
    // Decisions: complete the oldest conversation, accept the offer that
    // follows, and keep the number of waiting tasks level.
    let mut lat = Vec::with_capacity(decisions);
    let mut now = t0 + Duration::from_secs(1);
    let mut offered = 0usize;
    let start = Instant::now();
    for d in 0..decisions {
        now += Duration::from_millis(10);
        let (task, _) = connected.remove(0);
        let t = Instant::now();
        acd.complete(now, &task).unwrap();
        let mut offers = Vec::new();
        for o in std::iter::from_fn(|| acd.poll_output()) {
            if let Output::Offer { task, agent, .. } = o {
                offers.push((task, agent));
            }
        }
        lat.push(t.elapsed());
        for (task, agent) in offers {
            acd.accept(now, &task, &agent).unwrap();
            connected.push((task, agent));
            offered += 1;
        }
        acd.enqueue(now, random_task(format!("n{d}"), &mut next, &skills))
            .unwrap();
        while acd.poll_output().is_some() {}
    }
    let total = start.elapsed();
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    println!(
        "built-in rule: {decisions} decisions ({offered} offers) in {:.2} s: {:.0} decisions/s, p50 {:?}, p99 {:?}",
        total.as_secs_f64(),
        decisions as f64 / total.as_secs_f64(),
        p(0.5),
        p(0.99)
    );
}
