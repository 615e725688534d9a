//! Web chat benchmark: the release server on the embedded store, widget
//! connections over loopback WebSockets (the widget's protocol), and an
//! agent desktop following the tenant's event stream.
//!
//! 1. Memory: `BENCH_IDLE` (10,000) widget connections say hello and stay
//!    open; the server's resident memory before and after, per connection.
//! 2. Throughput and latency, with those connections still open:
//!    `BENCH_VISITORS` (200) visitors each keep `BENCH_WINDOW` (4) messages
//!    in flight for `BENCH_SECONDS` (5): acknowledged (durable) messages a
//!    second, and the time from the widget's send to the ack and to the
//!    message's event on the agent's WebSocket (p50, p99). The address's
//!    flow reads each message and says nothing (a bot that listens).
//! 3. Baseline, same process, same sockets and load: a bare WebSocket echo
//!    server (tokio-tungstenite, no storage): the ratio is what to read,
//!    the machine is shared and noisy.
//!
//! `cargo build --release --bin plugboard && PLUGBOARD_BIN=target/release/plugboard
//! cargo run --release -p plugboard-tests --example chat_bench`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use futures_util::{SinkExt, StreamExt};
use plugboard_tests::{LOOPBACK, Server, cpu_ms, env_u64};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message as Ws;

fn now_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

type Sock = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(url: &str) -> Sock {
    let host = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let tcp = tokio::net::TcpStream::connect(host).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tokio_tungstenite::client_async(url, tcp).await.unwrap().0
}

/// Opens a widget connection and waits for welcome and history.
async fn widget(url: &str) -> Sock {
    let mut ws = connect(url).await;
    ws.send(Ws::Text(json!({"type": "hello"}).to_string().into()))
        .await
        .unwrap();
    let mut n = 0;
    while n < 2 {
        if let Some(Ok(Ws::Text(_))) = ws.next().await {
            n += 1;
        }
    }
    ws
}

struct Load {
    acked: u64,
    secs: f64,
    ack_us: Vec<u64>,
}

/// `visitors` sockets, each keeping `window` messages in flight for
/// `secs`; returns what was acknowledged (an `ack` frame, or the echo).
async fn load(url: &str, visitors: usize, window: usize, secs: u64, echo: bool) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for v in 0..visitors {
        let url = url.to_string();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = if echo {
                connect(&url).await
            } else {
                widget(&url).await
            };
            let mut lat = Vec::new();
            let mut seq = 0u64;
            let mut in_flight = std::collections::VecDeque::new();
            loop {
                while in_flight.len() < window && !stop.load(Ordering::Relaxed) {
                    let sent = now_us();
                    let frame = json!({"type": "message", "client_id": format!("{v}-{seq}"),
                                       "text": format!("t={sent} v={v} n={seq}")});
                    ws.send(Ws::Text(frame.to_string().into())).await.unwrap();
                    in_flight.push_back(sent);
                    seq += 1;
                }
                if in_flight.is_empty() {
                    break;
                }
                match ws.next().await {
                    Some(Ok(Ws::Text(t))) => {
                        let f: Value = serde_json::from_str(&t).unwrap_or_default();
                        if echo || f["type"] == "ack" {
                            let sent = in_flight.pop_front().unwrap();
                            lat.push(now_us() - sent);
                        } else if f["type"] == "error" {
                            panic!("refused: {f}");
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => panic!("a visitor's socket closed"),
                }
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    Load {
        acked: all.len() as u64,
        secs: t0.elapsed().as_secs_f64(),
        ack_us: all,
    }
}

/// A bare WebSocket echo server (the baseline).
async fn echo_server() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("ws://{addr}/echo")
}

fn main() {
    let idle = env_u64("BENCH_IDLE", 10_000) as usize;
    let visitors = env_u64("BENCH_VISITORS", 200) as usize;
    let window = env_u64("BENCH_WINDOW", 4) as usize;
    let secs = env_u64("BENCH_SECONDS", 5);
    let dir = tempfile::tempdir().unwrap();
    let mut flags: Vec<&str> = LOOPBACK.to_vec();
    let cap = (idle + visitors + 10).to_string();
    flags.extend([
        "--chat-max-per-ip",
        &cap,
        "--chat-rate",
        "1000000",
        "--chat-ip-rate",
        "1000000",
    ]);
    let s = Server::start(dir.path(), &flags).unwrap();
    let key = s.tenant("bench");
    let flow = json!({"name": "listen", "start": "wait", "nodes": {
        "wait": {"type": "gather", "prompt": "", "var": "said", "max_digits": 64, "timeout_ms": 3600000,
                 "next": "wait", "no_input": "wait"}}});
    let d = s
        .call(
            "POST",
            "/v1/tenants/bench/flows/listen",
            Some(&key),
            Some(flow.to_string().into_bytes()),
        )
        .unwrap();
    assert!(d.status == 200 || d.status == 201, "{d:?}");
    let a = s.json(
        "PUT",
        "/v1/tenants/bench/addresses/bench-chat",
        &key,
        &json!({"channel": "chat", "flow": "listen"}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let url = format!("ws://127.0.0.1:{}/chat/bench-chat/ws", s.port);
    let events = format!(
        "ws://127.0.0.1:{}/v1/tenants/bench/events?token={key}",
        s.port
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // 1. Idle connections.
        let before = rss_kib(s.pid());
        let mut open = Vec::with_capacity(idle);
        let t0 = Instant::now();
        for chunk in 0..idle.div_ceil(500) {
            let n = 500.min(idle - chunk * 500);
            let batch = futures_util::future::join_all((0..n).map(|_| widget(&url))).await;
            open.extend(batch);
        }
        let opened = t0.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kib(s.pid());
        let per_conn = (after.saturating_sub(before)) as f64 / idle as f64;

        // 2. Load, with the agent's event stream.
        let mut agent = connect(&events).await;
        let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
        let sink = seen.clone();
        let follower = tokio::spawn(async move {
            while let Some(Ok(m)) = agent.next().await {
                let Ws::Text(t) = m else { continue };
                let at = now_us();
                let v: Value = serde_json::from_str(&t).unwrap_or_default();
                if v["kind"] == "message"
                    && let Some(sent) = v["data"]["text"]
                        .as_str()
                        .and_then(|x| x.strip_prefix("t="))
                        .and_then(|x| x.split(' ').next())
                        .and_then(|x| x.parse::<u64>().ok())
                {
                    sink.lock().unwrap().push(at - sent);
                }
            }
        });
        let cpu_before = cpu_ms(s.pid());
        let mut chat = load(&url, visitors, window, secs, false).await;
        let server_cpu_ms = cpu_ms(s.pid()) - cpu_before;
        tokio::time::sleep(Duration::from_millis(500)).await;
        follower.abort();
        let mut agent_us = std::mem::take(&mut *seen.lock().unwrap());
        let rss_loaded = rss_kib(s.pid());

        // 3. Baseline: an echo server, the same load.
        let echo_url = echo_server().await;
        let mut echo = load(&echo_url, visitors, window, secs, true).await;

        let chat_rate = chat.acked as f64 / chat.secs;
        let echo_rate = echo.acked as f64 / echo.secs;
        println!(
            "idle widget connections: {idle} opened in {:.1} s; server RSS {before} KiB -> {after} KiB: {per_conn:.1} KiB per connection",
            opened.as_secs_f64()
        );
        println!(
            "load: {visitors} visitors x {window} in flight for {secs} s, beside the idle ones (server RSS then {rss_loaded} KiB)"
        );
        println!(
            "  Plugboard chat: {chat_rate:.0} messages/s acknowledged (durable, each run through a flow); ack p50 {:.2} ms p99 {:.2} ms; widget -> agent's WebSocket p50 {:.2} ms p99 {:.2} ms ({} events seen)",
            pct(&mut chat.ack_us, 0.50),
            pct(&mut chat.ack_us, 0.99),
            pct(&mut agent_us, 0.50),
            pct(&mut agent_us, 0.99),
            agent_us.len()
        );
        println!(
            "  bare WebSocket echo: {echo_rate:.0} messages/s; p50 {:.2} ms p99 {:.2} ms",
            pct(&mut echo.ack_us, 0.50),
            pct(&mut echo.ack_us, 0.99)
        );
        println!(
            "  server CPU: {:.2} cores during the load, {:.0} us per message",
            server_cpu_ms as f64 / 1000.0 / chat.secs,
            server_cpu_ms as f64 * 1000.0 / chat.acked.max(1) as f64
        );
        println!("  ratio chat/echo: {:.2}", chat_rate / echo_rate);
        drop(open);
    });
}
