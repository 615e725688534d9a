//! Softphone benchmark: what an agent's browser softphone leg costs the
//! server, per leg, against a plain RTP leg (a SIP phone's) in the same run.
//!
//! This process is the server side: `BENCH_LEGS` softphones (default 200)
//! of [`Softphones`] — the code the server runs — connected at once, each
//! rung, answered, and fed one 20 ms G.711 frame every 20 ms while the
//! browser's audio is read, as a call's media clock does. A child process
//! (this binary, `client`) plays the browsers: str0m peers (full ICE,
//! DTLS-SRTP, PCMU every 20 ms). The baseline is as many plain RTP legs
//! (G.711 over UDP both ways, packetized and jitter-buffered by the voice
//! core's own code) between the same two processes.
//!
//! Printed, for this process only: the time for all handshakes, CPU
//! seconds per second over `BENCH_SECS` (default 10) of steady state (from
//! /proc/self/stat), and resident memory added (VmRSS), per leg; and the
//! ratio of a softphone leg to an RTP leg, with G.711 to the browsers and
//! with Opus (each frame coded both ways).
//!
//! `cargo run --release -p plugboard-webrtc --no-default-features --example softphone_bench`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use plugboard_media::audio::FRAME;
use plugboard_media::g711::Law;
use plugboard_media::rtp::{self, JitterBuffer, RtpSender};
use plugboard_webrtc::{Control, PhoneEvent, Softphones};
use serde_json::{Value, json};
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds this process has used (user + system).
fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // Fields 14 and 15 of stat (utime, stime), in clock ticks (100/s).
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// Resident memory, bytes.
fn rss() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<f64>()
        .unwrap()
        * 1024.0
}

fn tone() -> Vec<i16> {
    (0..FRAME)
        .map(|i| ((i as f32 * 0.35).sin() * 6000.0) as i16)
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if args.get(1).map(String::as_str) == Some("client") {
        let n: usize = args[3].parse().unwrap();
        let secs: u64 = args[4].parse().unwrap();
        rt.block_on(match args[2].as_str() {
            "g711" => Box::pin(webrtc_client(n, secs, false))
                as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
            "opus" => Box::pin(webrtc_client(n, secs, true)),
            _ => Box::pin(rtp_client(n, secs)),
        });
        return;
    }
    let n = env("BENCH_LEGS", 200) as usize;
    let secs = env("BENCH_SECS", 10);
    let rtp = rt.block_on(rtp_server(n, secs));
    let webrtc = rt.block_on(webrtc_server(n, secs, false));
    let opus = rt.block_on(webrtc_server(n, secs, true));
    println!("softphone_bench: {n} legs each way, {secs} s steady state, 20 ms G.711 both ways");
    println!(
        "  rtp legs (baseline):  {:.3} ms CPU per leg per second, {:.1} KiB per leg",
        rtp.0 * 1000.0,
        rtp.1 / 1024.0
    );
    println!(
        "  softphone legs:       {:.3} ms CPU per leg per second, {:.1} KiB per leg; {} of {n} connected, handshakes {:.2} s",
        webrtc.0 * 1000.0,
        webrtc.1 / 1024.0,
        webrtc.2,
        webrtc.3
    );
    println!(
        "  softphone legs, Opus: {:.3} ms CPU per leg per second, {:.1} KiB per leg; {} of {n} connected, handshakes {:.2} s",
        opus.0 * 1000.0,
        opus.1 / 1024.0,
        opus.2,
        opus.3
    );
    println!(
        "  ratio softphone/rtp:  CPU {:.2}x, memory {:.2}x; with Opus CPU {:.2}x, memory {:.2}x",
        webrtc.0 / rtp.0,
        webrtc.1 / rtp.1,
        opus.0 / rtp.0,
        opus.1 / rtp.1
    );
    // At 80 % of every core, for the softphone legs alone.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    println!(
        "  softphone legs that fit in 80 % of {cores} cores: {:.0} with G.711, {:.0} with Opus",
        0.8 * cores / webrtc.0,
        0.8 * cores / opus.0
    );
}

/// Spawns this binary as the client side.
fn child(kind: &str, n: usize, secs: u64) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["client", kind, &n.to_string(), &secs.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn read_line(c: &mut std::process::Child) -> Value {
    let mut line = String::new();
    std::io::BufReader::new(c.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap()
}

/// The steady state: CPU per leg per second over `secs`.
async fn steady(n: usize, secs: u64) -> f64 {
    let c0 = cpu();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    (cpu() - c0) / t0.elapsed().as_secs_f64() / n as f64
}

// ----- the server side -----

/// Returns (CPU s per leg per s, bytes per leg, connected, handshake s).
async fn webrtc_server(n: usize, secs: u64, opus: bool) -> (f64, f64, usize, f64) {
    let mut c = child(if opus { "opus" } else { "g711" }, n, secs + 8);
    let offers = read_line(&mut c);
    let connected = Arc::new(AtomicUsize::new(0));
    let seen = connected.clone();
    let phones = Softphones::with_publisher(
        LOCAL,
        LOCAL,
        Arc::new(move |_, e: Value| {
            if e["state"] == "idle" && e["call"].is_null() {
                seen.fetch_add(1, Ordering::Relaxed);
            }
        }),
    );
    phones.prefer_opus(opus);
    let m0 = rss();
    let t0 = Instant::now();
    let mut answers = Vec::new();
    for (i, o) in offers["offers"].as_array().unwrap().iter().enumerate() {
        answers.push(
            phones
                .connect("bench", &format!("a{i}"), o.as_str().unwrap())
                .await
                .unwrap()
                .0,
        );
    }
    {
        let stdin = c.stdin.as_mut().unwrap();
        writeln!(stdin, "{}", json!({ "answers": answers })).unwrap();
    }
    while connected.load(Ordering::Relaxed) < n && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let handshakes = t0.elapsed().as_secs_f64();
    let up = connected.load(Ordering::Relaxed);
    // Each softphone is rung and answered; a task per leg plays the call's
    // media clock.
    let answered = Arc::new(AtomicUsize::new(0));
    let mut legs = Vec::new();
    for i in 0..n {
        let a = answered.clone();
        let leg = phones.ring(
            "bench",
            &format!("a{i}"),
            json!({"from": "bench"}),
            Box::new(move |e| {
                if e == PhoneEvent::Answered {
                    a.fetch_add(1, Ordering::Relaxed);
                }
            }),
        );
        if let Some(leg) = leg
            && phones
                .control("bench", &format!("a{i}"), Control::Answer)
                .await
                .is_ok()
        {
            legs.push(leg);
        }
    }
    let heard = Arc::new(AtomicU64::new(0));
    let frame = tone();
    for leg in legs {
        let (heard, frame) = (heard.clone(), frame.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                leg.send(&frame);
                if leg.audio().is_some() {
                    heard.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_leg = steady(n, secs).await;
    let mem = (rss() - m0) / n as f64;
    let frames = heard.load(Ordering::Relaxed);
    let done = read_line(&mut c);
    let _ = c.wait();
    eprintln!(
        "webrtc (opus {opus}): {} answered, server heard {frames} frames, clients heard {} bytes",
        answered.load(Ordering::Relaxed),
        done["heard"]
    );
    (per_leg, mem, up, handshakes)
}

async fn rtp_server(n: usize, secs: u64) -> (f64, f64) {
    let mut c = child("rtp", n, secs + 4);
    let theirs = read_line(&mut c);
    let m0 = rss();
    let mut mine = Vec::new();
    let mut tasks = Vec::new();
    let heard = Arc::new(AtomicU64::new(0));
    for addr in theirs["addrs"].as_array().unwrap() {
        let to: SocketAddr = addr.as_str().unwrap().parse().unwrap();
        let sock = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        mine.push(sock.local_addr().unwrap().to_string());
        let heard = heard.clone();
        tasks.push(tokio::spawn(async move { rtp_leg(sock, to, heard).await }));
    }
    {
        let stdin = c.stdin.as_mut().unwrap();
        writeln!(stdin, "{}", json!({ "addrs": mine })).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_leg = steady(n, secs).await;
    let mem = (rss() - m0) / n as f64;
    for t in tasks {
        t.abort();
    }
    let done = read_line(&mut c);
    let _ = c.wait();
    eprintln!(
        "rtp: server heard {} frames, clients heard {} bytes",
        heard.load(Ordering::Relaxed),
        done["heard"]
    );
    (per_leg, mem)
}

/// A voice-core leg: a G.711 frame out every 20 ms (RTP), what comes in
/// through the jitter buffer.
async fn rtp_leg(sock: UdpSocket, to: SocketAddr, heard: Arc<AtomicU64>) {
    let mut sender = RtpSender::new(1, Law::Mu, 0, 1);
    let mut jitter = JitterBuffer::new(3);
    let frame: [i16; FRAME] = tone().try_into().unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut buf = vec![0u8; 2048];
    let t0 = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let _ = sock.try_send_to(&sender.frame(&frame), to);
                if let Some(p) = jitter.pop() {
                    let mut pcm = Vec::with_capacity(FRAME);
                    Law::Mu.decode(&p, &mut pcm);
                    heard.fetch_add(1, Ordering::Relaxed);
                }
            }
            r = sock.recv_from(&mut buf) => {
                if let Ok((n, _)) = r
                    && let Some(p) = rtp::parse_rtp(&buf[..n])
                {
                    jitter.push(&p, (t0.elapsed().as_micros() / 125) as u32);
                }
            }
        }
    }
}

// ----- the client side (the browsers, the phones) -----

fn out(v: Value) {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{v}").unwrap();
    o.flush().unwrap();
}

fn read_stdin() -> Value {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

async fn rtp_client(n: usize, secs: u64) {
    let mut socks = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let s = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        addrs.push(s.local_addr().unwrap().to_string());
        socks.push(s);
    }
    out(json!({ "addrs": addrs }));
    let theirs = read_stdin();
    let heard = Arc::new(AtomicU64::new(0));
    for (s, to) in socks.into_iter().zip(theirs["addrs"].as_array().unwrap()) {
        let to: SocketAddr = to.as_str().unwrap().parse().unwrap();
        let heard = heard.clone();
        tokio::spawn(async move {
            let mut sender = RtpSender::new(2, Law::Mu, 0, 2);
            let frame: [i16; FRAME] = tone().try_into().unwrap();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut buf = vec![0u8; 2048];
            loop {
                tokio::select! {
                    _ = tick.tick() => { let _ = s.try_send_to(&sender.frame(&frame), to); }
                    r = s.recv_from(&mut buf) => {
                        if let Ok((k, _)) = r { heard.fetch_add(k as u64, Ordering::Relaxed); }
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    out(json!({"heard": heard.load(Ordering::Relaxed)}));
}

struct Browser {
    rtc: Rtc,
    sock: UdpSocket,
    local: SocketAddr,
    mid: Mid,
    pending: Option<SdpPendingOffer>,
}

async fn webrtc_client(n: usize, secs: u64, opus: bool) {
    let mut browsers = Vec::new();
    let mut offers = Vec::new();
    for _ in 0..n {
        let sock = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        let local = sock.local_addr().unwrap();
        let mut rtc = RtcConfig::new()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .clear_codecs()
            .enable_pcmu(!opus, false)
            .enable_opus(opus, false)
            .build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        offers.push(offer.to_sdp_string());
        browsers.push(Browser {
            rtc,
            sock,
            local,
            mid,
            pending: Some(pending),
        });
    }
    out(json!({ "offers": offers }));
    let answers = read_stdin();
    let heard = Arc::new(AtomicU64::new(0));
    for (mut b, a) in browsers
        .into_iter()
        .zip(answers["answers"].as_array().unwrap())
    {
        let answer = SdpAnswer::from_sdp_string(a.as_str().unwrap()).unwrap();
        b.rtc
            .sdp_api()
            .accept_answer(b.pending.take().unwrap(), answer)
            .unwrap();
        tokio::spawn(browser(b, heard.clone()));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    out(json!({"heard": heard.load(Ordering::Relaxed)}));
}

/// One browser: its peer's I/O, and a PCMU frame every 20 ms once up.
async fn browser(mut b: Browser, heard: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 2048];
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut payload = Vec::new();
    Law::Mu.encode(&tone(), &mut payload);
    // A browser's Opus: 48 kHz, 20 ms frames.
    let mut enc = opus::Encoder::new(48000, opus::Channels::Mono, opus::Application::Voip).unwrap();
    let tone48: Vec<i16> = (0..960)
        .map(|i| ((i as f32 * 0.06).sin() * 6000.0) as i16)
        .collect();
    let mut n = 0u64;
    let mut up = false;
    loop {
        let wait = loop {
            match b.rtc.poll_output() {
                Ok(Output::Timeout(t)) => break t,
                Ok(Output::Transmit(t)) => {
                    let _ = b.sock.try_send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(Event::Connected)) => up = true,
                Ok(Output::Event(Event::MediaData(d))) => {
                    heard.fetch_add(d.data.len() as u64, Ordering::Relaxed);
                }
                Ok(Output::Event(_)) => {}
                Err(_) => return,
            }
        };
        tokio::select! {
            r = b.sock.recv_from(&mut buf) => {
                if let Ok((k, src)) = r
                    && let Ok(r) = Receive::new(Protocol::Udp, src, b.local, &buf[..k])
                {
                    let _ = b.rtc.handle_input(Input::Receive(Instant::now(), r));
                }
            }
            _ = tokio::time::sleep_until(wait.into()) => {
                let _ = b.rtc.handle_input(Input::Timeout(Instant::now()));
            }
            _ = tick.tick() => {
                if up && let Some(w) = b.rtc.writer(b.mid) {
                    let p = w.payload_params().next().map(|p| (p.pt(), p.spec().codec));
                    match p {
                        Some((pt, Codec::Opus)) => {
                            let mut out = [0u8; 400];
                            if let Ok(k) = enc.encode(&tone48, &mut out) {
                                let _ = w.write(pt, Instant::now(), MediaTime::new(n * 960, Frequency::FORTY_EIGHT_KHZ), out[..k].to_vec());
                            }
                        }
                        Some((pt, _)) => {
                            let _ = w.write(pt, Instant::now(), MediaTime::new(n * 160, Frequency::EIGHT_KHZ), payload.clone());
                        }
                        None => {}
                    }
                    n += 1;
                }
            }
        }
    }
}
