//! Routing decisions through the engine with the tenant's router plugin,
//! against the built-in rule, on a large centre: 5,000 agents (each with 2
//! of 10 skills, all busy) and 10,000 waiting tasks (each needing 1 of 10
//! skills, priorities 0–2, 5 queues with aging), on one thread. One
//! decision: an agent finishes a task; the ACD asks the queue's router to
//! rank the candidates (none: the built-in rule); the offer reaches the
//! channel watching the task; the agent accepts. Prints decisions per
//! second and the p50/p99 latency from `complete` to the offer, for each
//! router in the same process, and the ratio to the built-in rule.
//! Then the same with `INFLIGHT` (64) agents finishing at once, as in a
//! busy centre: decisions per second of wall time and per second of the
//! process's CPU time (decisions per core), p50/p99 from each agent's
//! `complete` to its offer.
//!
//! Build the routers first (`scripts/build-plugins.sh`,
//! `scripts/build-polyglot.sh`), then
//! `cargo run --release -p plugboard-engine --example router_bench [AGENTS TASKS DECISIONS]`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use plugboard_acd::{AgentConfig, Presence, QueueConfig};
use plugboard_core::Channel;
use plugboard_engine::acd::AgentRecord;
use plugboard_engine::{Engine, TaskNews, TaskSpec};
use plugboard_host::{HostConfig, Limits, PluginHost};
use tokio::sync::mpsc;

/// The routers compared: name, plugin file (none: the built-in rule).
fn routers(root: &std::path::Path) -> Vec<(&'static str, Option<PathBuf>)> {
    let t = root.join("target");
    vec![
        ("built-in", None),
        (
            "rust-lean",
            Some(t.join("wasm32-unknown-unknown/release/skills_router.wasm")),
        ),
        (
            "rust-wasip2",
            Some(t.join("wasm32-wasip2/release/skills_router.wasm")),
        ),
        ("javascript", Some(t.join("polyglot/router_js.wasm"))),
    ]
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Percentile of sorted durations, µs.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

struct Row {
    name: &'static str,
    per_s: f64,
    p50: f64,
    p99: f64,
    /// Agents freed with no offer within 5 s.
    idle: usize,
    /// Many agents finishing at once.
    busy: Busy,
}

/// The phase with `INFLIGHT` agents finishing at once.
struct Busy {
    inflight: usize,
    per_s: f64,
    /// Decisions per second of CPU time of the whole process (sled's
    /// threads included): decisions per core.
    per_cpu_s: f64,
    p50: f64,
    p99: f64,
    idle: usize,
}

/// CPU time of this process so far (all threads), seconds.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15, in clock ticks (100 a second).
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

/// One centre with one router: returns decisions per second and latency.
async fn run(
    name: &'static str,
    plugin: Option<&PathBuf>,
    agents: usize,
    tasks: usize,
    decisions: usize,
) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(plugboard_store::SledStore::open(dir.path())?);
    let host = Arc::new(PluginHost::new(HostConfig::default())?);
    let engine = Arc::new(Engine::new(store, host, "admin", Limits::default()));
    let t = "bench";
    engine.create_tenant(t.into(), None, None).await?;
    let router = match plugin {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("{} (build the plugins first)", path.display()))?;
            engine.deploy(t, "router", bytes.into(), None).await?;
            Some("router".to_string())
        }
        None => None,
    };
    let queue = |router: Option<String>| {
        (0..5).map(move |q| {
            let mut c = QueueConfig::new(&format!("q{q}"));
            c.aging = Some(Duration::from_secs(30));
            c.offer_timeout = Duration::from_secs(3600);
            c.router = router.clone();
            c
        })
    };
    // Set up with the built-in rule; the router ranks the measured
    // decisions only.
    for c in queue(None) {
        engine.set_queue(t, c).await?;
    }
    let skills: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    // Every task's news comes to one channel, with its id.
    let (news_tx, mut news) = mpsc::unbounded_channel::<(String, TaskNews)>();
    let mut seq = 0usize;
    let mut spec = |rng: &mut Rng, skill: Option<&str>| {
        seq += 1;
        TaskSpec {
            id: format!("t{seq}"),
            queue: format!("q{}", rng.below(5)),
            channel: Channel::Voice,
            priority: rng.below(3) as u32,
            skills: vec![skill.map_or_else(|| skills[rng.below(10)].clone(), str::to_string)],
            agent: None,
        }
    };
    let enqueue = |s: TaskSpec| {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (fwd, id) = (news_tx.clone(), s.id.clone());
        tokio::spawn(async move {
            while let Some(n) = rx.recv().await {
                if fwd.send((id.clone(), n)).is_err() {
                    return;
                }
            }
        });
        let engine = engine.clone();
        async move { engine.enqueue_watched(t, s, tx).await }
    };
    // Each agent takes one task (the first of their skills), and is busy.
    let mut connected: Vec<(String, String)> = Vec::with_capacity(agents);
    for a in 0..agents {
        let id = format!("a{a}");
        let (s1, s2) = (rng.below(10), rng.below(10));
        let config = AgentConfig {
            id: id.clone(),
            skills: [(skills[s1].clone(), 5), (skills[s2].clone(), 7)]
                .into_iter()
                .collect(),
            capacity: [(Channel::Voice, 1)].into_iter().collect(),
            queues: None,
        };
        engine
            .set_agent(
                t,
                AgentRecord {
                    config,
                    sip_user: None,
                },
            )
            .await?;
        let task = spec(&mut rng, Some(&skills[s1]));
        let task_id = task.id.clone();
        enqueue(task).await?;
        engine.set_presence(t, &id, Presence::Available).await?;
        // The offer comes; the agent accepts.
        let (offered, n) = news.recv().await.context("offer")?;
        let TaskNews::Offer { agent, .. } = n else {
            anyhow::bail!("{n:?}")
        };
        anyhow::ensure!(offered == task_id && agent == id, "{offered} to {agent}");
        engine.accept_task(t, &offered, &agent).await?;
        connected.push((offered, agent));
    }
    for _ in 0..tasks {
        enqueue(spec(&mut rng, None)).await?;
    }
    for c in queue(router) {
        engine.set_queue(t, c).await?;
    }
    while news.try_recv().is_ok() {}
    let mut lat = Vec::with_capacity(decisions);
    let mut idle = 0;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // The first decisions load the router (untimed).
    let warm = 20.min(decisions);
    let mut start = Instant::now();
    for n in 0..decisions + warm {
        if n == warm {
            start = Instant::now();
            lat.clear();
            idle = 0;
        }
        let i = rng.below(connected.len());
        let (task, freed) = connected.swap_remove(i);
        let t0 = Instant::now();
        engine.complete_task(t, &task).await?;
        // The agent, free again, is offered the best waiting task (or
        // none has their skills: they stay free).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let offer = loop {
            match tokio::time::timeout_at(deadline, news.recv()).await {
                Ok(Some((offered, TaskNews::Offer { agent, .. }))) => {
                    if agent == freed {
                        break Some(offered);
                    }
                    // A late offer to an agent freed earlier.
                    engine.accept_task(t, &offered, &agent).await?;
                    connected.push((offered, agent));
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break None,
            }
        };
        let Some(offered) = offer else {
            idle += 1;
            continue;
        };
        lat.push(t0.elapsed());
        engine.accept_task(t, &offered, &freed).await?;
        connected.push((offered, freed));
        // The waiting line stays as long.
        enqueue(spec(&mut rng, None)).await?;
    }
    let elapsed = start.elapsed();
    lat.sort();

    // Then as in a busy centre: `inflight` agents finish at once, and
    // each freed agent's offer is timed from its own `complete`.
    let inflight = std::env::var("INFLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64usize)
        .max(1);
    let mut busy_lat = Vec::with_capacity(decisions);
    let mut busy_idle = 0;
    let mut done = 0;
    let (cpu0, wall0) = (cpu_s(), Instant::now());
    while done < decisions {
        let n = inflight.min(connected.len()).min(decisions - done);
        let mut freed: HashMap<String, Instant> = HashMap::with_capacity(n);
        for _ in 0..n {
            let i = rng.below(connected.len());
            let (task, agent) = connected.swap_remove(i);
            freed.insert(agent, Instant::now());
            engine.complete_task(t, &task).await?;
        }
        while !freed.is_empty() {
            match tokio::time::timeout(Duration::from_secs(2), news.recv()).await {
                Ok(Some((offered, TaskNews::Offer { agent, .. }))) => {
                    if let Some(t0) = freed.remove(&agent) {
                        busy_lat.push(t0.elapsed());
                    }
                    engine.accept_task(t, &offered, &agent).await?;
                    connected.push((offered, agent));
                    enqueue(spec(&mut rng, None)).await?;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        busy_idle += freed.len();
        done += n;
    }
    let (cpu, wall) = (cpu_s() - cpu0, wall0.elapsed());
    busy_lat.sort();
    Ok(Row {
        name,
        per_s: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        idle,
        busy: Busy {
            inflight,
            per_s: busy_lat.len() as f64 / wall.as_secs_f64(),
            per_cpu_s: busy_lat.len() as f64 / cpu.max(0.01),
            p50: pct(&busy_lat, 0.5),
            p99: pct(&busy_lat, 0.99),
            idle: busy_idle,
        },
    })
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let agents = args.first().copied().unwrap_or(5_000);
    let tasks = args.get(1).copied().unwrap_or(10_000);
    let decisions = args.get(2).copied().unwrap_or(2_000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    // One core: the decisions and the plugin calls share one thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!(
        "router_bench: {agents} agents, {tasks} waiting tasks, {decisions} decisions, one thread"
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut failed: HashMap<&str, String> = HashMap::new();
    // ROUTERS=built-in,rust-lean runs only those.
    let only = std::env::var("ROUTERS").ok();
    for (name, plugin) in routers(&root) {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|x| x == name))
        {
            continue;
        }
        match rt.block_on(run(name, plugin.as_ref(), agents, tasks, decisions)) {
            Ok(r) => rows.push(r),
            Err(e) => {
                failed.insert(name, format!("{e:#}"));
            }
        }
    }
    let base = rows.first().map_or(1.0, |r| r.per_s);
    println!(
        "{:<12} {:>12} {:>10} {:>10} {:>12} {:>10}",
        "router", "decisions/s", "p50 µs", "p99 µs", "vs built-in", "no offer"
    );
    for r in &rows {
        println!(
            "{:<12} {:>12.0} {:>10.1} {:>10.1} {:>12.2} {:>10}",
            r.name,
            r.per_s,
            r.p50,
            r.p99,
            r.per_s / base,
            r.idle
        );
    }
    if let Some(r) = rows.first() {
        println!(
            "{} agents finishing at once (decisions per CPU-second: the whole process, sled's threads included):",
            r.busy.inflight
        );
    }
    let base_cpu = rows.first().map_or(1.0, |r| r.busy.per_cpu_s);
    println!(
        "{:<12} {:>12} {:>14} {:>10} {:>10} {:>12} {:>10}",
        "router", "decisions/s", "per CPU-s", "p50 µs", "p99 µs", "vs built-in", "no offer"
    );
    for r in &rows {
        println!(
            "{:<12} {:>12.0} {:>14.0} {:>10.1} {:>10.1} {:>12.2} {:>10}",
            r.name,
            r.busy.per_s,
            r.busy.per_cpu_s,
            r.busy.p50,
            r.busy.p99,
            r.busy.per_cpu_s / base_cpu,
            r.busy.idle
        );
    }
    for (name, e) in failed {
        println!("{name}: not run: {e}");
    }
    Ok(())
}
