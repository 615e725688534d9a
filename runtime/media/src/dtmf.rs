//! DTMF: RFC 4733 telephone-events, in-band tones (Goertzel), and the
//! merging of digits that arrive by several paths at once.

/// The digit for an RFC 4733 event code (0–15).
pub fn event_digit(event: u8) -> Option<char> {
    Some(match event {
        0..=9 => (b'0' + event) as char,
        10 => '*',
        11 => '#',
        12..=15 => (b'A' + event - 12) as char,
        _ => return None,
    })
}

/// The RFC 4733 event code of a digit.
pub fn digit_event(digit: char) -> Option<u8> {
    Some(match digit.to_ascii_uppercase() {
        d @ '0'..='9' => d as u8 - b'0',
        '*' => 10,
        '#' => 11,
        d @ 'A'..='D' => d as u8 - b'A' + 12,
        _ => return None,
    })
}

/// One telephone-event payload (RFC 4733 §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    /// Event code.
    pub event: u8,
    /// End bit.
    pub end: bool,
    /// Volume, −dBm0.
    pub volume: u8,
    /// Duration so far, in timestamp units.
    pub duration: u16,
}

impl TelephoneEvent {
    /// Parses the first 4 bytes of a payload.
    pub fn parse(payload: &[u8]) -> Option<TelephoneEvent> {
        let [event, flags, d1, d2, ..] = *payload else {
            return None;
        };
        Some(TelephoneEvent {
            event,
            end: flags & 0x80 != 0,
            volume: flags & 0x3f,
            duration: u16::from_be_bytes([d1, d2]),
        })
    }

    /// The 4-byte payload.
    pub fn to_bytes(self) -> [u8; 4] {
        let d = self.duration.to_be_bytes();
        [
            self.event,
            (if self.end { 0x80 } else { 0 }) | (self.volume & 0x3f),
            d[0],
            d[1],
        ]
    }
}

/// Turns a stream of telephone-event packets into digits: one digit per
/// event (packets of one event share an RTP timestamp; the end packet is
/// sent three times).
#[derive(Debug, Default)]
pub struct EventDetector {
    /// Timestamp, end seen, and duration of the last event's packets.
    last: Option<(u32, bool, u16)>,
}

impl EventDetector {
    /// A detector that has seen nothing.
    pub fn new() -> EventDetector {
        EventDetector::default()
    }

    /// Feeds one packet (its RTP timestamp and payload); returns the digit
    /// the first time an event is seen. A packet with the timestamp of an
    /// event that already ended, no end bit and a shorter duration starts
    /// a new event too: some senders (replayed captures among them) reuse
    /// the timestamp for the next press of a key.
    pub fn packet(&mut self, timestamp: u32, payload: &[u8]) -> Option<char> {
        let ev = TelephoneEvent::parse(payload)?;
        let new = match self.last {
            Some((ts, ended, duration)) if ts == timestamp => {
                ended && !ev.end && ev.duration < duration
            }
            _ => true,
        };
        let ended = match self.last {
            Some((ts, ended, _)) if ts == timestamp && !new => ended || ev.end,
            _ => ev.end,
        };
        self.last = Some((timestamp, ended, ev.duration));
        if new { event_digit(ev.event) } else { None }
    }
}

const ROWS: [f32; 4] = [697.0, 770.0, 852.0, 941.0];
const COLS: [f32; 4] = [1209.0, 1336.0, 1477.0, 1633.0];
const KEYS: [[char; 4]; 4] = [
    ['1', '2', '3', 'A'],
    ['4', '5', '6', 'B'],
    ['7', '8', '9', 'C'],
    ['*', '0', '#', 'D'],
];
/// Block length: 205 samples at 8 kHz gives bins that separate the DTMF
/// frequencies (the classic choice).
const BLOCK: usize = 205;

fn goertzel(samples: &[f32], freq: f32) -> f32 {
    let k = (0.5 + samples.len() as f32 * freq / 8000.0).floor();
    let w = 2.0 * std::f32::consts::PI * k / samples.len() as f32;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f32, 0.0f32);
    for &x in samples {
        let s0 = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

/// In-band DTMF detection on 8 kHz audio (Goertzel). A digit is reported
/// once when it has been present for two consecutive blocks (≈ 51 ms), and
/// again only after a block without it.
#[derive(Debug, Default)]
pub struct ToneDetector {
    buf: Vec<f32>,
    candidate: Option<char>,
    reported: Option<char>,
}

impl ToneDetector {
    /// A fresh detector.
    pub fn new() -> ToneDetector {
        ToneDetector::default()
    }

    fn block_digit(block: &[f32]) -> Option<char> {
        let energy: f32 = block.iter().map(|x| x * x).sum::<f32>() * block.len() as f32;
        // Below about -40 dBFS there is nothing to detect.
        if energy < 1e-4 * (block.len() * block.len()) as f32 {
            return None;
        }
        let rows: Vec<f32> = ROWS.iter().map(|f| goertzel(block, *f)).collect();
        let cols: Vec<f32> = COLS.iter().map(|f| goertzel(block, *f)).collect();
        let (ri, rmax) = rows
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        let (ci, cmax) = cols
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        // Twist: the two tones within 8 dB of each other.
        if rmax > 6.3 * cmax || cmax > 6.3 * rmax {
            return None;
        }
        // The strongest of each group stands out from the rest.
        let second = |v: &[f32], i: usize| {
            v.iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, e)| *e)
                .fold(0.0f32, f32::max)
        };
        if second(&rows, ri) * 6.3 > rmax || second(&cols, ci) * 6.3 > cmax {
            return None;
        }
        // Most of the block's energy is in the two tones (speech is not).
        // Goertzel power is about (N·A/2)² per tone; total N·Σx² ≈ N²·A²/2.
        if (rmax + cmax) * 2.0 < 0.6 * energy {
            return None;
        }
        Some(KEYS[ri][ci])
    }

    /// Feeds samples; returns digits detected.
    pub fn push(&mut self, samples: &[i16]) -> Vec<char> {
        let mut out = Vec::new();
        self.buf.extend(samples.iter().map(|&s| s as f32 / 32768.0));
        while self.buf.len() >= BLOCK {
            let digit = Self::block_digit(&self.buf[..BLOCK]);
            self.buf.drain(..BLOCK);
            match digit {
                Some(d) if self.candidate == Some(d) && self.reported != Some(d) => {
                    self.reported = Some(d);
                    out.push(d);
                }
                Some(d) => self.candidate = Some(d),
                None => {
                    self.candidate = None;
                    self.reported = None;
                }
            }
        }
        out
    }
}

/// Synthesises a DTMF tone pair (8 kHz), for tests and for sending digits
/// in-band.
pub fn tone_samples(digit: char, ms: u32, amplitude: f32) -> Vec<i16> {
    let Some((r, c)) = KEYS.iter().enumerate().find_map(|(r, row)| {
        row.iter()
            .position(|k| *k == digit.to_ascii_uppercase())
            .map(|c| (r, c))
    }) else {
        return Vec::new();
    };
    let n = (ms * 8) as usize;
    (0..n)
        .map(|i| {
            let t = i as f32 / 8000.0;
            let v = (2.0 * std::f32::consts::PI * ROWS[r] * t).sin()
                + (2.0 * std::f32::consts::PI * COLS[c] * t).sin();
            (v * amplitude * 0.5 * 32767.0) as i16
        })
        .collect()
}

/// Where a digit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtmfSource {
    /// RFC 4733 telephone-event.
    Rfc4733,
    /// SIP INFO (application/dtmf-relay or application/dtmf).
    SipInfo,
    /// In-band tones.
    InBand,
}

/// Suppresses the same key press reported by two paths (phones that send
/// both RFC 4733 and SIP INFO): a digit equal to the previous one from a
/// different source within `window_ms` is dropped.
#[derive(Debug)]
pub struct DtmfMerger {
    window_ms: u64,
    last: Option<(char, DtmfSource, u64)>,
}

impl DtmfMerger {
    /// A merger with a suppression window.
    pub fn new(window_ms: u64) -> DtmfMerger {
        DtmfMerger {
            window_ms,
            last: None,
        }
    }

    /// True if the digit is new and should be acted on.
    pub fn accept(&mut self, digit: char, source: DtmfSource, now_ms: u64) -> bool {
        if let Some((d, s, at)) = self.last
            && d == digit
            && s != source
            && now_ms.saturating_sub(at) < self.window_ms
        {
            return false;
        }
        self.last = Some((digit, source, now_ms));
        true
    }
}

/// Parses a SIP INFO DTMF body: `application/dtmf-relay` (`Signal=5`) or
/// `application/dtmf` (`5`).
pub fn parse_info_body(content_type: &str, body: &str) -> Option<char> {
    let ct = content_type.to_ascii_lowercase();
    let signal = if ct.starts_with("application/dtmf-relay") {
        body.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("signal")
                .then(|| v.trim().to_string())
        })?
    } else if ct.starts_with("application/dtmf") {
        body.trim().to_string()
    } else {
        return None;
    };
    let mut chars = signal.chars();
    let d = chars.next()?;
    if chars.next().is_some() {
        // Numeric event codes ("10" for '*').
        return signal.parse::<u8>().ok().and_then(event_digit);
    }
    digit_event(d).and_then(event_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4733_one_digit_per_event() {
        let mut det = EventDetector::new();
        let start = TelephoneEvent {
            event: 5,
            end: false,
            volume: 10,
            duration: 160,
        };
        assert_eq!(det.packet(1000, &start.to_bytes()), Some('5'));
        let more = TelephoneEvent {
            duration: 320,
            ..start
        };
        assert_eq!(det.packet(1000, &more.to_bytes()), None);
        let end = TelephoneEvent { end: true, ..more };
        for _ in 0..3 {
            assert_eq!(det.packet(1000, &end.to_bytes()), None);
        }
        // The same key again is a new event (new timestamp).
        assert_eq!(det.packet(2600, &start.to_bytes()), Some('5'));
        // A replayed capture: the same timestamp after the end, restarting.
        let end2 = TelephoneEvent {
            end: true,
            duration: 800,
            ..start
        };
        assert_eq!(det.packet(2600, &end2.to_bytes()), None);
        assert_eq!(det.packet(2600, &start.to_bytes()), Some('5'));
        assert_eq!(det.packet(2600, &more.to_bytes()), None);
        assert_eq!(det.packet(4200, &[11, 0, 0, 160]), Some('#'));
        assert_eq!(det.packet(5000, &[1, 2]), None);
    }

    #[test]
    fn goertzel_finds_every_key_and_ignores_speechlike_noise() {
        for key in "0123456789*#ABCD".chars() {
            let mut det = ToneDetector::new();
            let mut audio = vec![0i16; 400];
            audio.extend(tone_samples(key, 80, 0.5));
            audio.extend(vec![0i16; 400]);
            audio.extend(tone_samples(key, 80, 0.2));
            audio.extend(vec![0i16; 400]);
            let got: String = audio.chunks(160).flat_map(|c| det.push(c)).collect();
            assert_eq!(got, format!("{key}{key}"), "key {key}");
        }
        // A single 1 kHz tone and white-ish noise are not digits.
        let mut det = ToneDetector::new();
        let tone: Vec<i16> = (0..8000)
            .map(|i| {
                ((i as f32 * 2.0 * std::f32::consts::PI * 1000.0 / 8000.0).sin() * 12000.0) as i16
            })
            .collect();
        assert!(det.push(&tone).is_empty());
        let mut x: u32 = 12345;
        let noise: Vec<i16> = (0..8000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                ((x >> 16) as i16) / 3
            })
            .collect();
        assert!(det.push(&noise).is_empty());
    }

    #[test]
    fn info_bodies_and_merging() {
        assert_eq!(
            parse_info_body("application/dtmf-relay", "Signal=5\r\nDuration=160\r\n"),
            Some('5')
        );
        assert_eq!(
            parse_info_body("application/dtmf-relay", "Signal= *\r\n"),
            Some('*')
        );
        assert_eq!(parse_info_body("application/dtmf", "11"), Some('#'));
        assert_eq!(parse_info_body("text/plain", "5"), None);
        let mut m = DtmfMerger::new(200);
        assert!(m.accept('5', DtmfSource::Rfc4733, 1000));
        assert!(!m.accept('5', DtmfSource::SipInfo, 1050));
        assert!(m.accept('5', DtmfSource::Rfc4733, 1300));
        assert!(m.accept('6', DtmfSource::SipInfo, 1310));
    }
}
