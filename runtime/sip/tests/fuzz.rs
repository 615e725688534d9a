//! Mutation fuzzing of the parser and the UAS checks, on stable Rust
//! (cargo-fuzz needs nightly): every RFC 4475 message, mutated many times
//! by byte flips, insertions, deletions, splices and truncation, must parse
//! or fail cleanly, screen to a verdict, and print a reply that parses
//! again. The stream framer gets the same inputs in random pieces.

use std::path::PathBuf;

use plugboard_sip::{Framed, Inbound, StreamFramer, UasPolicy, parse_datagram, screen};

/// xorshift64*: deterministic, so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b":",
    b";",
    b",",
    b"\"",
    b"<",
    b">",
    b"%",
    b"%0",
    b"\\",
    b" ",
    b"\t",
    b"\0",
    b"\xff",
    b"SIP/2.0",
    b"Content-Length: 99999999999999999999\r\n",
    b"l: -1\r\n",
    b"v: SIP/2.0/UDP [::1\r\n",
    b"CSeq: 4294967296 INVITE\r\n",
    b";branch=",
    b"sip:",
    b"@",
];

fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(at..at, piece.iter().copied());
            }
            2 if !v.is_empty() => {
                let end = (at + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            3 => v.truncate(at),
            4 if !other.is_empty() => {
                let from = rng.below(other.len());
                let to = (from + rng.below(64)).min(other.len());
                v.splice(at..at, other[from..to].iter().copied());
            }
            _ => {
                let b = rng.next() as u8;
                v.insert(at.min(v.len()), b);
            }
        }
    }
    v
}

fn corpus() -> Vec<Vec<u8>> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/sip-rfc4475");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "dat"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

#[test]
fn mutated_torture_messages_never_panic_and_replies_reparse() {
    let corpus = corpus();
    let policy = UasPolicy::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut verdicts = [0usize; 4];
    for round in 0..60_000 {
        let a = &corpus[round % corpus.len()];
        let b = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, a, b);
        match screen(parse_datagram(&input), &policy) {
            Inbound::Request(..) => verdicts[0] += 1,
            Inbound::Response(_) => verdicts[1] += 1,
            Inbound::Reply(r) => {
                verdicts[2] += 1;
                let bytes = r.to_bytes();
                assert!(
                    parse_datagram(&bytes).is_ok(),
                    "round {round}: our reply does not parse:\n{}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            Inbound::Drop(_) => verdicts[3] += 1,
        }
        // The same bytes as a stream, in random pieces.
        let mut framer = StreamFramer::new();
        let mut rest = &input[..];
        let mut frames = 0;
        while !rest.is_empty() {
            let n = 1 + rng.below(rest.len().min(300));
            framer.push(&rest[..n]);
            rest = &rest[n..];
            loop {
                match framer.next_message() {
                    Ok(Some(Framed::Message(m))) => {
                        frames += 1;
                        let _ = screen(Ok(m), &policy);
                    }
                    Ok(Some(Framed::KeepAlive)) => frames += 1,
                    Ok(None) | Err(_) => break,
                }
                assert!(frames < 10_000, "framer loops");
            }
        }
    }
    // The mutations reach every verdict, so all paths were exercised.
    assert!(verdicts.iter().all(|n| *n > 100), "{verdicts:?}");
}
