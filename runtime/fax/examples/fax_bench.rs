//! What a fax costs in CPU: pairs of T.30 terminals (a sender and a
//! receiver, back to back, in virtual time) exchange a 3-page fax, and the
//! CPU per second of fax audio is compared with a plain call's media work
//! on the same frames (G.711 decode and encode and the RTP packet, what
//! every RTP leg does), run in the same process.
//!
//! `cargo run --release -p plugboard-fax --example fax_bench [PAIRS]`
//!
//! Prints ms of CPU per terminal-second (each fax call is one terminal on
//! the server), the ratio to a plain leg's codec work, and how many fax
//! calls at once this machine's cores hold at 80 % CPU; then the same
//! faxes over T.38 (IFP packets in UDPTL datagrams, no modems) and their
//! cost against the audio terminals'.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Instant;

use plugboard_fax::{FRAME, Role, Terminal, document, t38};
use plugboard_media::g711::Law;
use plugboard_media::rtp::RtpSender;

/// CPU seconds this process used so far (user + system, from /proc).
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn main() {
    let pairs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let tiff = dir.path().join("doc.tif");
    let text: String = (1..=3)
        .map(|p| {
            let lines: String = (0..50)
                .map(|l| {
                    format!("Waybill {p}-{l:02}: pallet, 420 kg, Vilnius to Rotterdam, dock {l}\n")
                })
                .collect();
            format!("{lines}\x0c")
        })
        .collect();
    let pages = document::text_to_fax(&document::Tools::default(), &text, &tiff).unwrap();

    // Fax: `pairs` faxes, one after another, two terminals each.
    let (cpu0, wall0) = (cpu_s(), Instant::now());
    let mut frames_total = 0u64;
    for i in 0..pairs {
        let rx = dir.path().join(format!("rx{i}.tif"));
        let mut a = Terminal::new(Role::Send, true, &tiff, "+1 555 0100").unwrap();
        let mut b = Terminal::new(Role::Receive, false, &rx, "+1 555 0200").unwrap();
        let (mut from_a, mut from_b) = ([0i16; FRAME], [0i16; FRAME]);
        let mut n = 0u64;
        while (a.outcome().is_none() || b.outcome().is_none()) && n < 50 * 600 {
            let next_a = a.frame(&from_b);
            let next_b = b.frame(&from_a);
            (from_a, from_b) = (next_a, next_b);
            n += 1;
        }
        let got = b.outcome().unwrap();
        assert!(got.ok && got.stats.pages == pages, "{got:?}");
        frames_total += n;
    }
    let fax_cpu = cpu_s() - cpu0;
    let fax_wall = wall0.elapsed().as_secs_f64();
    // Terminal-seconds of audio: two terminals per fax, 20 ms a frame.
    let terminal_s = frames_total as f64 * 2.0 * 0.02;

    // Baseline: the same frames through a plain leg's media work.
    let mut sender = RtpSender::new(1, Law::Mu, 0, 2);
    let pcm: Vec<i16> = (0..FRAME)
        .map(|i| ((i as f64 * 0.3).sin() * 8000.0) as i16)
        .collect();
    let mut payload = Vec::with_capacity(FRAME);
    Law::Mu.encode(&pcm, &mut payload);
    let (cpu1, wall1) = (cpu_s(), Instant::now());
    let mut sink = 0usize;
    // Repeated so the baseline runs long enough to measure.
    for _ in 0..20 {
        for _ in 0..frames_total * 2 {
            let mut heard = Vec::with_capacity(FRAME);
            Law::Mu.decode(std::hint::black_box(&payload), &mut heard);
            let packet = sender.frame(std::hint::black_box(&heard));
            sink = sink.wrapping_add(packet.len());
        }
    }
    std::hint::black_box(sink);
    let base_cpu = (cpu_s() - cpu1).max(0.01) / 20.0;
    let base_wall = wall1.elapsed().as_secs_f64() / 20.0;

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let fax_ms = fax_cpu * 1000.0 / terminal_s;
    let base_ms = base_cpu * 1000.0 / terminal_s;
    println!(
        "{pairs} faxes of {pages} pages, {:.1} s of audio each, {terminal_s:.0} terminal-seconds",
        frames_total as f64 * 0.02 / pairs as f64
    );
    println!(
        "fax terminal (spandsp T.30 + modems): {fax_ms:.3} ms CPU per second of fax ({fax_cpu:.2} s CPU, {fax_wall:.2} s wall)"
    );
    println!(
        "plain leg codec + RTP (same frames):  {base_ms:.4} ms CPU per second ({:.3} s wall)",
        base_wall
    );
    println!(
        "ratio fax / plain leg codec: {:.0}x",
        fax_ms / base_ms.max(1e-6)
    );
    let per_core = 1000.0 / fax_ms;
    println!(
        "one core runs {per_core:.0} fax terminals in real time; at 80 % of {cores} cores: {:.0} fax calls at once (terminals only)",
        per_core * 0.8 * cores as f64
    );

    // The same faxes over T.38: datagrams instead of audio.
    let (cpu2, wall2) = (cpu_s(), Instant::now());
    let mut ticks_total = 0u64;
    for i in 0..pairs {
        let rx = dir.path().join(format!("t38-rx{i}.tif"));
        let mut a = Terminal::new(Role::Send, true, &tiff, "+1 555 0100").unwrap();
        let mut b = Terminal::new(Role::Receive, false, &rx, "+1 555 0200").unwrap();
        a.use_t38(&t38::Params::default()).unwrap();
        b.use_t38(&t38::Params::default()).unwrap();
        let mut n = 0u64;
        while (a.outcome().is_none() || b.outcome().is_none()) && n < 50 * 600 {
            for d in a.tick() {
                b.udptl_in(&d);
            }
            for d in b.tick() {
                a.udptl_in(&d);
            }
            n += 1;
        }
        let got = b.outcome().unwrap();
        assert!(got.ok && got.stats.pages == pages, "{got:?}");
        ticks_total += n;
    }
    let t38_cpu = cpu_s() - cpu2;
    let t38_s = ticks_total as f64 * 2.0 * 0.02;
    let t38_ms = t38_cpu.max(0.01) * 1000.0 / t38_s;
    println!(
        "over T.38: {:.1} s a fax, {t38_ms:.4} ms CPU per terminal-second ({t38_cpu:.2} s CPU, {:.2} s wall); audio fax / T.38: {:.0}x",
        ticks_total as f64 * 0.02 / pairs as f64,
        wall2.elapsed().as_secs_f64(),
        fax_ms / t38_ms
    );
}
