//! Softphone benchmark, webrtc-rs edition: what a browser audio leg costs
//! the server, per leg, when the server side is the `webrtc` crate
//! (webrtc-rs, the classic async API) rather than our str0m `Softphones`;
//! against a plain RTP leg (a SIP phone's) in the same run.
//!
//! The counterpart of `runtime/webrtc/examples/softphone_bench.rs`, with
//! the same client side (copied): a child process (this binary, `client`)
//! plays the browsers, str0m peers (full ICE, DTLS-SRTP, PCMU every 20 ms);
//! the baseline is as many plain RTP legs (G.711 over UDP both ways,
//! packetized and jitter-buffered by the voice core's own code).
//!
//! This process is the server side: `BENCH_LEGS` (default 200)
//! `RTCPeerConnection`s (ICE-lite, one host candidate on 127.0.0.1, PCMU
//! only, no mDNS), each answering a browser's offer, with a local PCMU
//! track written one 20 ms sample every 20 ms by a task per leg, and the
//! browser's track read and μ-law decoded in `on_track`.
//!
//! Printed, for this process only: the time for all handshakes, CPU
//! seconds per second over `BENCH_SECS` (default 10) of steady state (from
//! /proc/self/stat), and resident memory added (VmRSS), per leg; and the
//! ratio of a webrtc-rs leg to an RTP leg.
//!
//! `BENCH_INTERCEPTORS`: `default` (webrtc-rs's
//! `register_default_interceptors`: NACK, RTCP reports, TWCC, stats — what
//! an application normally registers; the default), `reports` (RTCP
//! sender/receiver reports only, the nearest to str0m's defaults for
//! PCMU), or `none`.
//!
//! `CARGO_TARGET_DIR=/tmp/webrtc-rs-target cargo run --release`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use plugboard_media::audio::FRAME;
use plugboard_media::g711::Law;
use plugboard_media::rtp::{self, JitterBuffer, RtpSender};
use serde_json::{Value, json};
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;
use webrtc::api::interceptor_registry::{configure_rtcp_reports, register_default_interceptors};
use webrtc::api::media_engine::{MIME_TYPE_PCMU, MediaEngine};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::{API, APIBuilder};
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::interceptor::registry::Registry;
use webrtc::media::Sample;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::rtp_transceiver::rtp_codec::{
    RTCRtpCodecCapability, RTCRtpCodecParameters, RTPCodecType,
};
use webrtc::track::track_local::TrackLocal;
use webrtc::track::track_local::track_local_static_sample::TrackLocalStaticSample;

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
        rt.block_on(match args[2].as_str() {
            "webrtc" => Box::pin(webrtc_client(n))
                as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
            _ => Box::pin(rtp_client(n)),
        });
        return;
    }
    let n = env("BENCH_LEGS", 200) as usize;
    let secs = env("BENCH_SECS", 10);
    let interceptors = std::env::var("BENCH_INTERCEPTORS").unwrap_or_else(|_| "default".into());
    let rtp = rt.block_on(rtp_server(n, secs));
    let webrtc = rt.block_on(webrtc_server(n, secs, &interceptors));
    println!(
        "softphone_bench (webrtc-rs {}): {n} legs each way, {secs} s steady state, 20 ms G.711 both ways",
        webrtc_version()
    );
    println!(
        "  rtp legs (baseline):  {:.3} ms CPU per leg per second, {:.1} KiB per leg",
        rtp.0 * 1000.0,
        rtp.1 / 1024.0
    );
    println!(
        "  webrtc-rs legs:       {:.3} ms CPU per leg per second, {:.1} KiB per leg; {} of {n} connected, handshakes {:.2} s (interceptors: {interceptors})",
        webrtc.0 * 1000.0,
        webrtc.1 / 1024.0,
        webrtc.2,
        webrtc.3
    );
    println!(
        "  ratio webrtc-rs/rtp:  CPU {:.2}x, memory {:.2}x",
        webrtc.0 / rtp.0,
        webrtc.1 / rtp.1
    );
    // At 80 % of every core, for the webrtc-rs legs alone.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    println!(
        "  webrtc-rs legs that fit in 80 % of {cores} cores: {:.0}",
        0.8 * cores / webrtc.0
    );
}

fn webrtc_version() -> &'static str {
    "0.17.1"
}

/// Spawns this binary as the client side; it runs until told to stop.
fn child(kind: &str, n: usize) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["client", kind, &n.to_string()])
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

/// Tells the child to stop; returns its last line (what it heard).
fn stop(c: &mut std::process::Child) -> Value {
    {
        let stdin = c.stdin.as_mut().unwrap();
        writeln!(stdin, "{}", json!({ "stop": true })).unwrap();
    }
    let done = read_line(c);
    let _ = c.wait();
    done
}

/// The steady state: CPU per leg per second over `secs`.
async fn steady(n: usize, secs: u64) -> f64 {
    let c0 = cpu();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    (cpu() - c0) / t0.elapsed().as_secs_f64() / n as f64
}

// ----- the server side -----

fn pcmu() -> RTCRtpCodecCapability {
    RTCRtpCodecCapability {
        mime_type: MIME_TYPE_PCMU.to_owned(),
        clock_rate: 8000,
        channels: 1,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![],
    }
}

/// One webrtc-rs API for all legs, as close as it allows to our
/// `Softphones`: ICE-lite, UDP over IPv4 on the loopback interface only
/// (one host candidate, 127.0.0.1), no mDNS, PCMU only.
fn api(interceptors: &str) -> API {
    let mut media = MediaEngine::default();
    media
        .register_codec(
            RTCRtpCodecParameters {
                capability: pcmu(),
                payload_type: 0,
                ..Default::default()
            },
            RTPCodecType::Audio,
        )
        .unwrap();
    let registry = match interceptors {
        "none" => Registry::new(),
        "reports" => configure_rtcp_reports(Registry::new()),
        _ => register_default_interceptors(Registry::new(), &mut media).unwrap(),
    };
    let mut s = SettingEngine::default();
    s.set_lite(true);
    s.set_network_types(vec![NetworkType::Udp4]);
    s.set_include_loopback_candidate(true);
    s.set_interface_filter(Box::new(|name: &str| name == "lo"));
    s.set_ip_filter(Box::new(|ip: IpAddr| ip == LOCAL));
    s.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
    APIBuilder::new()
        .with_media_engine(media)
        .with_interceptor_registry(registry)
        .with_setting_engine(s)
        .build()
}

struct Leg {
    pc: Arc<RTCPeerConnection>,
    track: Arc<TrackLocalStaticSample>,
}

/// Answers one browser's offer: the answer's SDP (after ICE gathering).
async fn answer(
    api: &API,
    offer: &str,
    connected: Arc<AtomicUsize>,
    heard: Arc<AtomicU64>,
) -> (String, Leg) {
    let pc = Arc::new(
        api.new_peer_connection(RTCConfiguration::default())
            .await
            .unwrap(),
    );
    pc.on_peer_connection_state_change(Box::new(move |s| {
        if s == RTCPeerConnectionState::Connected {
            connected.fetch_add(1, Ordering::Relaxed);
        }
        Box::pin(async {})
    }));
    // The browser's audio: every RTP packet read and decoded.
    pc.on_track(Box::new(move |track, _, _| {
        let heard = heard.clone();
        tokio::spawn(async move {
            let mut pcm = Vec::with_capacity(FRAME);
            while let Ok((p, _)) = track.read_rtp().await {
                pcm.clear();
                Law::Mu.decode(&p.payload, &mut pcm);
                heard.fetch_add(1, Ordering::Relaxed);
            }
        });
        Box::pin(async {})
    }));
    let track = Arc::new(TrackLocalStaticSample::new(
        pcmu(),
        "audio".to_owned(),
        "bench".to_owned(),
    ));
    let sender = pc
        .add_track(track.clone() as Arc<dyn TrackLocal + Send + Sync>)
        .await
        .unwrap();
    // RTCP from the browser passes the interceptors when read.
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1500];
        while sender.read(&mut buf).await.is_ok() {}
    });
    pc.set_remote_description(RTCSessionDescription::offer(offer.to_owned()).unwrap())
        .await
        .unwrap();
    let answer = pc.create_answer(None).await.unwrap();
    let mut gathered = pc.gathering_complete_promise().await;
    pc.set_local_description(answer).await.unwrap();
    let _ = gathered.recv().await;
    let sdp = pc.local_description().await.unwrap().sdp;
    (sdp, Leg { pc, track })
}

/// Returns (CPU s per leg per s, bytes per leg, connected, handshake s).
async fn webrtc_server(n: usize, secs: u64, interceptors: &str) -> (f64, f64, usize, f64) {
    let mut c = child("webrtc", n);
    let offers = read_line(&mut c);
    let connected = Arc::new(AtomicUsize::new(0));
    let heard = Arc::new(AtomicU64::new(0));
    let api = api(interceptors);
    let m0 = rss();
    let t0 = Instant::now();
    let mut answers = Vec::new();
    let mut legs = Vec::new();
    for o in offers["offers"].as_array().unwrap() {
        let (sdp, leg) = answer(&api, o.as_str().unwrap(), connected.clone(), heard.clone()).await;
        answers.push(sdp);
        legs.push(leg);
    }
    let answered = t0.elapsed().as_secs_f64();
    if std::env::var_os("BENCH_SHOW_ANSWER").is_some() {
        eprintln!("first answer:\n{}", answers[0]);
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
    // A task per leg plays the call's media clock: one 20 ms PCMU sample
    // every 20 ms.
    let mut payload = Vec::new();
    Law::Mu.encode(&tone(), &mut payload);
    let payload = Bytes::from(payload);
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for leg in &legs {
        let (track, payload, sent) = (leg.track.clone(), payload.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                let sample = Sample {
                    data: payload.clone(),
                    duration: Duration::from_millis(20),
                    ..Default::default()
                };
                if track.write_sample(&sample).await.is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_leg = steady(n, secs).await;
    let mem = (rss() - m0) / n as f64;
    let frames = heard.load(Ordering::Relaxed);
    let done = stop(&mut c);
    eprintln!(
        "webrtc-rs: answers {answered:.2} s, {} samples written, server heard {frames} frames, clients heard {} bytes",
        sent.load(Ordering::Relaxed),
        done["heard"]
    );
    for t in tasks {
        t.abort();
    }
    for leg in legs {
        let _ = leg.pc.close().await;
    }
    (per_leg, mem, up, handshakes)
}

async fn rtp_server(n: usize, secs: u64) -> (f64, f64) {
    let mut c = child("rtp", n);
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
    let done = stop(&mut c);
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
// Copied from softphone_bench.rs; the only change: a client runs until the
// server writes a stop line (instead of a fixed time), so slow handshakes
// cannot end it before the server's steady state is over.

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

/// Until the server's stop line.
async fn until_stopped() {
    let _ = tokio::task::spawn_blocking(read_stdin).await;
}

async fn rtp_client(n: usize) {
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
    until_stopped().await;
    out(json!({"heard": heard.load(Ordering::Relaxed)}));
}

struct Browser {
    rtc: Rtc,
    sock: UdpSocket,
    local: SocketAddr,
    mid: Mid,
    pending: Option<SdpPendingOffer>,
}

async fn webrtc_client(n: usize) {
    let mut browsers = Vec::new();
    let mut offers = Vec::new();
    for _ in 0..n {
        let sock = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        let local = sock.local_addr().unwrap();
        let mut rtc = RtcConfig::new()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .clear_codecs()
            .enable_pcmu(true, false)
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
    until_stopped().await;
    out(json!({"heard": heard.load(Ordering::Relaxed)}));
}

/// One browser: its peer's I/O, and a PCMU frame every 20 ms once up.
async fn browser(mut b: Browser, heard: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 2048];
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut payload = Vec::new();
    Law::Mu.encode(&tone(), &mut payload);
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
                    let pt = w.payload_params().find(|p| p.spec().codec == Codec::PCMU).map(|p| p.pt());
                    if let Some(pt) = pt {
                        let _ = w.write(pt, Instant::now(), MediaTime::new(n * 160, Frequency::EIGHT_KHZ), payload.clone());
                        n += 1;
                    }
                }
            }
        }
    }
}
