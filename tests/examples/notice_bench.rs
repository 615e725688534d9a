//! Cross-node notice benchmark: NATS (async-nats against Debian's
//! `nats-server`) and PostgreSQL LISTEN/NOTIFY (`pg_notify` in its own
//! transaction, as a node would send one), both on loopback, in one run;
//! the servers are started for it as the tests start theirs.
//!
//! For each: notices per second when publishers send as fast as they can
//! (a node's tasks sharing its one NATS connection; one PostgreSQL session
//! per publisher, as from a pool), with the publish→receive latency at that
//! load; the latency at a steady rate; and the same bursts while other
//! sessions commit writes to PostgreSQL (the store's own traffic), with
//! those sessions' commits per second beside.
//!
//! `cargo run --release -p plugboard-tests --example notice_bench`
//! (`BENCH_SECONDS` per burst, default 5; `BENCH_PUBLISHERS`, default 16;
//! `BENCH_WRITERS`, default 16; `BENCH_RATE` notices/s for the latency
//! run, default 500; `BENCH_PACED`, notices in it, default 2500).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use futures_util::StreamExt;
use plugboard_tests::env_u64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Nanoseconds since the start of the run (publisher and receiver share
/// the process, so one monotonic clock).
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A notice as a node sends one: the send time, then an event.
fn notice(seq: u64) -> String {
    format!(
        r#"{} {{"interaction":"ix-0001764547200000-{seq:08x}","kind":"event","data":{{"type":"digits","digits":"1"}}}}"#,
        now_ns()
    )
}

/// (latency, received at), ns.
type Seen = (u64, u64);

fn seen(payload: &[u8]) -> Option<Seen> {
    let at = now_ns();
    let text = std::str::from_utf8(payload).ok()?;
    let sent: u64 = text.split(' ').next()?.parse().ok()?;
    Some((at.saturating_sub(sent), at))
}

const SUBJECT: &str = "plugboard.events.bench";
const CHANNEL: &str = "plugboard_events";

enum Publisher {
    Nats(async_nats::Client),
    Pg(tokio_postgres::Client, tokio_postgres::Statement),
}

impl Publisher {
    async fn publish(&self, body: String) {
        match self {
            Publisher::Nats(c) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Plugboard-Node", "bench");
                c.publish_with_headers(SUBJECT, headers, body.into())
                    .await
                    .unwrap();
            }
            // Autocommit: each notice is a transaction of its own.
            Publisher::Pg(c, st) => {
                c.execute(st, &[&body]).await.unwrap();
            }
        }
    }

    async fn settle(&self) {
        if let Publisher::Nats(c) = self {
            c.flush().await.unwrap();
        }
    }
}

async fn pg_session(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

async fn pg_publisher(url: &str) -> Publisher {
    let c = pg_session(url).await;
    let st = c
        .prepare(&format!("SELECT pg_notify('{CHANNEL}', $1)"))
        .await
        .unwrap();
    Publisher::Pg(c, st)
}

/// What a listener received: each notice's times, and a running count
/// (publishers keep at most [`WINDOW`] notices unreceived).
struct Listener {
    rx: mpsc::UnboundedReceiver<Seen>,
    received: Arc<AtomicU64>,
}

/// Notices sent but not yet received, at most: without a bound, NATS
/// publishers outrun any subscriber and the server drops the slow one.
const WINDOW: u64 = 4096;

/// A NATS connection (another node's) that receives the notices.
async fn nats_listener(url: &str) -> (async_nats::Client, Listener) {
    let client = async_nats::ConnectOptions::new()
        .no_echo()
        .connect(url)
        .await
        .unwrap();
    let mut sub = client.subscribe("plugboard.events.*").await.unwrap();
    client.flush().await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            count.fetch_add(1, Ordering::Relaxed);
            if let Some(s) = seen(&m.payload)
                && tx.send(s).is_err()
            {
                return;
            }
        }
    });
    (client, Listener { rx, received })
}

/// A PostgreSQL session LISTENing for the notices.
async fn pg_listener(url: &str) -> (tokio_postgres::Client, Listener) {
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                count.fetch_add(1, Ordering::Relaxed);
                if let Some(s) = seen(n.payload().as_bytes())
                    && tx.send(s).is_err()
                {
                    return;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .unwrap();
    (client, Listener { rx, received })
}

struct Run {
    per_s: f64,
    p50: Duration,
    p99: Duration,
    lost: u64,
}

impl Run {
    fn print(&self, what: &str) {
        let lost = if self.lost > 0 {
            format!("  LOST {}", self.lost)
        } else {
            String::new()
        };
        println!(
            "{what:<46} {:>8.0} notices/s  p50 {:>7.3} ms  p99 {:>7.3} ms{lost}",
            self.per_s,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
        );
    }
}

/// Receives `sent` notices (fewer if they stop coming for 10 s).
async fn collect(rx: &mut mpsc::UnboundedReceiver<Seen>, sent: u64, t0_ns: u64) -> Run {
    let mut lat = Vec::with_capacity(sent as usize);
    let mut last = t0_ns;
    while (lat.len() as u64) < sent {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some((l, at))) => {
                lat.push(l);
                last = last.max(at);
            }
            _ => break,
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1));
        Duration::from_nanos(lat.get(i).copied().unwrap_or(0))
    };
    Run {
        per_s: lat.len() as f64 / ((last - t0_ns) as f64 / 1e9),
        p50: pct(0.50),
        p99: pct(0.99),
        lost: sent - lat.len() as u64,
    }
}

/// Every publisher sends as fast as it can for `secs`, with at most
/// [`WINDOW`] notices unreceived.
async fn burst(publishers: &[Arc<Publisher>], to: &mut Listener, secs: u64) -> Run {
    while to.rx.try_recv().is_ok() {}
    let r0 = to.received.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let t0 = now_ns();
    let mut tasks = Vec::new();
    for p in publishers {
        let (p, stop, sent) = (p.clone(), stop.clone(), sent.clone());
        let received = to.received.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let got = received.load(Ordering::Relaxed) - r0;
                if sent.load(Ordering::Relaxed).saturating_sub(got) >= WINDOW {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                let n = sent.fetch_add(1, Ordering::Relaxed);
                p.publish(notice(n)).await;
            }
            p.settle().await;
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    collect(&mut to.rx, sent.load(Ordering::Relaxed), t0).await
}

/// One publisher at a steady `rate` for `count` notices.
async fn paced(p: &Publisher, to: &mut Listener, rate: u64, count: u64) -> Run {
    while to.rx.try_recv().is_ok() {}
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    let t0 = now_ns();
    for n in 0..count {
        tick.tick().await;
        p.publish(notice(n)).await;
    }
    p.settle().await;
    collect(&mut to.rx, count, t0).await
}

/// Sessions committing one-row inserts (synchronous commit, as the
/// store's writes are) until stopped, each also notifying in the same
/// transaction if `notify`; returns the stop flag and their commit count.
async fn writers(url: &str, n: u64, notify: bool) -> (Arc<AtomicBool>, Arc<AtomicU64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let sql = if notify {
        format!(
            "WITH w AS (INSERT INTO bench_writes (body) VALUES ($1) RETURNING id) \
             SELECT pg_notify('{CHANNEL}_w', $1) FROM w"
        )
    } else {
        "INSERT INTO bench_writes (body) VALUES ($1)".to_string()
    };
    for _ in 0..n {
        let c = pg_session(url).await;
        let st = c.prepare(&sql).await.unwrap();
        let (stop, commits) = (stop.clone(), commits.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                c.execute(&st, &[&notice(0)]).await.unwrap();
                commits.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    (stop, commits)
}

/// Commits per second since (`c0`, `t0`), printed.
fn commits_since(what: &str, commits: &AtomicU64, c0: u64, t0: Instant) -> f64 {
    let per_s = (commits.load(Ordering::Relaxed) - c0) as f64 / t0.elapsed().as_secs_f64();
    println!("  {what:<44} {per_s:>8.0} commits/s");
    per_s
}

#[tokio::main]
async fn main() {
    let secs = env_u64("BENCH_SECONDS", 5);
    let n_pub = env_u64("BENCH_PUBLISHERS", 16);
    let n_writers = env_u64("BENCH_WRITERS", 16);
    let rate = env_u64("BENCH_RATE", 500);
    let count = env_u64("BENCH_PACED", 2500);
    let nats = plugboard_tests::Nats::start().unwrap();
    let db = plugboard_tests::postgres().database();
    pg_session(&db)
        .await
        .batch_execute("CREATE TABLE bench_writes (id bigserial PRIMARY KEY, body text NOT NULL)")
        .await
        .unwrap();
    println!(
        "notices of ~140 bytes; {n_pub} publishers for {secs} s (NATS: tasks sharing one connection; \
         PostgreSQL: a session each, pg_notify in its own transaction), at most {WINDOW} unreceived; \
         latency at a steady rate from one publisher"
    );

    let (_nats_sub, mut nats_rx) = nats_listener(&nats.url()).await;
    let nats_client = async_nats::ConnectOptions::new()
        .no_echo()
        .connect(nats.url())
        .await
        .unwrap();
    let nats_pubs: Vec<Arc<Publisher>> = (0..n_pub)
        .map(|_| Arc::new(Publisher::Nats(nats_client.clone())))
        .collect();
    let (_pg_sub, mut pg_rx) = pg_listener(&db).await;
    let mut pg_pubs = Vec::new();
    for _ in 0..n_pub {
        pg_pubs.push(Arc::new(pg_publisher(&db).await));
    }

    let nats_burst = burst(&nats_pubs, &mut nats_rx, secs).await;
    nats_burst.print("NATS, as fast as publishers can:");
    let pg_burst = burst(&pg_pubs, &mut pg_rx, secs).await;
    pg_burst.print("PostgreSQL NOTIFY, as fast as publishers can:");
    let nats_paced = paced(&nats_pubs[0], &mut nats_rx, rate, count).await;
    nats_paced.print(&format!("NATS at {rate}/s:"));
    let pg_paced = paced(&pg_pubs[0], &mut pg_rx, rate, count).await;
    pg_paced.print(&format!("PostgreSQL NOTIFY at {rate}/s:"));

    // The store busy: sessions committing writes, as the nodes' calls do.
    let busy_rate = rate * 4;
    let busy_count = count * 4;
    println!("{n_writers} sessions committing one-row inserts:");
    let (stop, commits) = writers(&db, n_writers, false).await;
    let (c0, t0) = (commits.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let alone = commits_since("alone:", &commits, c0, t0);
    let (c0, t0) = (commits.load(Ordering::Relaxed), Instant::now());
    let nats_busy = paced(&nats_pubs[0], &mut nats_rx, busy_rate, busy_count).await;
    commits_since(
        &format!("while NATS carries {busy_rate}/s:"),
        &commits,
        c0,
        t0,
    );
    let (c0, t0) = (commits.load(Ordering::Relaxed), Instant::now());
    let pg_busy = paced(&pg_pubs[0], &mut pg_rx, busy_rate, busy_count).await;
    commits_since(
        &format!("while NOTIFY carries {busy_rate}/s:"),
        &commits,
        c0,
        t0,
    );
    stop.store(true, Ordering::Relaxed);
    let (stop, commits) = writers(&db, n_writers, true).await;
    let (c0, t0) = (commits.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let notifying = commits_since("each also NOTIFYing in its transaction:", &commits, c0, t0);
    stop.store(true, Ordering::Relaxed);
    nats_busy.print(&format!("NATS at {busy_rate}/s, store busy:"));
    pg_busy.print(&format!("PostgreSQL NOTIFY at {busy_rate}/s, store busy:"));

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "NATS/PostgreSQL throughput: {:.1}x. PostgreSQL/NATS latency at {rate}/s: p50 {:.2}x, p99 {:.2}x; \
         at {busy_rate}/s, store busy: p50 {:.2}x, p99 {:.2}x. Writes that also NOTIFY: {:.1}x fewer commits/s",
        nats_burst.per_s / pg_burst.per_s,
        ratio(pg_paced.p50, nats_paced.p50),
        ratio(pg_paced.p99, nats_paced.p99),
        ratio(pg_busy.p50, nats_busy.p50),
        ratio(pg_busy.p99, nats_busy.p99),
        alone / notifying,
    );
}
