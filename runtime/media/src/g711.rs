//! G.711 (ITU-T) µ-law and A-law: 16-bit linear PCM to 8-bit codes and back.
//!
//! The companding is a few lines of table-free bit arithmetic, so it is
//! written here rather than taken from a crate.

/// The two G.711 laws, with their static RTP payload types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Law {
    /// µ-law, PCMU, payload type 0.
    Mu,
    /// A-law, PCMA, payload type 8.
    A,
}

impl Law {
    /// The static RTP payload type.
    pub fn payload_type(self) -> u8 {
        match self {
            Law::Mu => 0,
            Law::A => 8,
        }
    }

    /// The SDP encoding name.
    pub fn name(self) -> &'static str {
        match self {
            Law::Mu => "PCMU",
            Law::A => "PCMA",
        }
    }

    /// Encodes samples, one byte per sample.
    pub fn encode(self, pcm: &[i16], out: &mut Vec<u8>) {
        out.extend(pcm.iter().map(|&s| match self {
            Law::Mu => linear_to_ulaw(s),
            Law::A => linear_to_alaw(s),
        }));
    }

    /// Decodes bytes to samples.
    pub fn decode(self, bytes: &[u8], out: &mut Vec<i16>) {
        out.extend(bytes.iter().map(|&b| match self {
            Law::Mu => ulaw_to_linear(b),
            Law::A => alaw_to_linear(b),
        }));
    }
}

const BIAS: i32 = 0x84;
const CLIP: i32 = 32635;

/// One sample to µ-law.
pub fn linear_to_ulaw(sample: i16) -> u8 {
    let mut s = sample as i32;
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(CLIP) + BIAS;
    let exponent = (7 - ((s as u32) << 17).leading_zeros().min(7)) as i32;
    let mantissa = (s >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) | mantissa) as u8
}

/// One µ-law byte to a sample.
pub fn ulaw_to_linear(byte: u8) -> i16 {
    let b = !byte as i32;
    let sign = b & 0x80;
    let exponent = (b >> 4) & 0x07;
    let mantissa = b & 0x0f;
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    (if sign != 0 { -magnitude } else { magnitude }) as i16
}

/// One sample to A-law.
pub fn linear_to_alaw(sample: i16) -> u8 {
    let mut s = sample as i32;
    let sign = if s >= 0 { 0x80 } else { 0 };
    if s < 0 {
        s = -s - 1;
    }
    s = s.min(32767) >> 3;
    let byte = if s < 32 {
        (s >> 1) | sign
    } else {
        let exponent = 31 - (s as u32).leading_zeros() as i32 - 4;
        let mantissa = (s >> exponent) & 0x0f;
        (((exponent) << 4) | mantissa) | sign
    };
    (byte ^ 0x55) as u8
}

/// One A-law byte to a sample.
pub fn alaw_to_linear(byte: u8) -> i16 {
    let b = (byte ^ 0x55) as i32;
    let sign = b & 0x80;
    let exponent = (b >> 4) & 0x07;
    let mantissa = b & 0x0f;
    let magnitude = if exponent == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (exponent - 1)
    };
    (if sign != 0 { magnitude } else { -magnitude }) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes() {
        // Silence and full scale per G.711 tables.
        assert_eq!(linear_to_ulaw(0), 0xff);
        assert_eq!(ulaw_to_linear(0xff), 0);
        assert_eq!(ulaw_to_linear(0x7f), 0);
        assert_eq!(ulaw_to_linear(0x00), -32124);
        assert_eq!(ulaw_to_linear(0x80), 32124);
        assert_eq!(linear_to_alaw(0), 0xd5);
        assert_eq!(alaw_to_linear(0xd5), 8);
        assert_eq!(alaw_to_linear(0x55), -8);
        assert_eq!(alaw_to_linear(0xaa), 32256);
    }

    #[test]
    fn round_trip_error_is_within_the_step_size() {
        for law in [Law::Mu, Law::A] {
            for s in (-32000i32..32000).step_by(7) {
                let s = s as i16;
                let mut enc = Vec::new();
                law.encode(&[s], &mut enc);
                let mut dec = Vec::new();
                law.decode(&enc, &mut dec);
                let err = (dec[0] as i32 - s as i32).abs();
                // Logarithmic steps: at most ~1/16 of the magnitude, plus the
                // smallest step near zero.
                let bound = (s as i32).abs() / 16 + 16;
                assert!(err <= bound, "{law:?} {s} -> {} (err {err})", dec[0]);
            }
            // Every code decodes and re-encodes to itself (bar µ-law's two zeros).
            for b in 0..=255u8 {
                let mut dec = Vec::new();
                law.decode(&[b], &mut dec);
                let mut enc = Vec::new();
                law.encode(&dec, &mut enc);
                if !(law == Law::Mu && b == 0x7f) {
                    assert_eq!(enc[0], b, "{law:?} code {b:#x}");
                }
            }
        }
    }
}
