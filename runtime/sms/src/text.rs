//! Short-message text: GSM 03.38 (unpacked, one septet per octet, as
//! SMPP carries it with `data_coding` 0) and UCS-2/UTF-16BE
//! (`data_coding` 8), long texts split into concatenated parts with a
//! user data header (UDH, IEI 0x00), and inbound UDHs read back.
//!
//! Written here: rusmpp's `extra` encoders cut GSM parts at 140 octets
//! (134 characters instead of 153), refuse characters outside the BMP
//! (emoji) and cannot decode; the GSM crates on crates.io pack septets
//! (which SMPP does not use) or pull old dependencies.

use plugboard_core::DefaultAlphabet;

/// The GSM 03.38 basic character set, by septet (0x1B is the escape to
/// the extension table).
const BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\u{1b}ÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The extension table: (septet after ESC, character).
const EXTENSION: [(u8, char); 10] = [
    (0x0A, '\u{0c}'),
    (0x14, '^'),
    (0x28, '{'),
    (0x29, '}'),
    (0x2F, '\\'),
    (0x3C, '['),
    (0x3D, '~'),
    (0x3E, ']'),
    (0x40, '|'),
    (0x65, '€'),
];

const ESC: u8 = 0x1B;

/// `data_coding` of GSM 03.38 (the SMSC default alphabet).
pub const DC_DEFAULT: u8 = 0x00;
/// `data_coding` of UCS-2.
pub const DC_UCS2: u8 = 0x08;

/// A character's septets in GSM 03.38, if it has any.
fn gsm_septets(c: char) -> Option<([u8; 2], usize)> {
    if c != '\u{1b}'
        && let Some(i) = BASIC.chars().position(|b| b == c)
    {
        return Some(([i as u8, 0], 1));
    }
    EXTENSION
        .iter()
        .find(|(_, e)| *e == c)
        .map(|(s, _)| ([ESC, *s], 2))
}

/// One short message's payload: `data_coding`, and the bytes of
/// `short_message` (a UDH first when `udhi`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// `data_coding`.
    pub data_coding: u8,
    /// Whether the bytes start with a UDH (esm_class 0x40).
    pub udhi: bool,
    /// The `short_message` octets.
    pub bytes: Vec<u8>,
}

/// Why a text cannot go as SMS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Needs more than 255 parts.
    #[error("the text needs {0} short messages; at most 255 can be joined")]
    TooLong(usize),
}

/// Splits `text` into the short messages that carry it: GSM 03.38 when
/// every character has septets (160 in one message, 153 per part when
/// joined), UCS-2 otherwise (70 UTF-16 units, 67 per part). A part never
/// ends inside an escape pair or a surrogate pair. `reference` ties the
/// parts together (8-bit concatenation reference).
pub fn encode(text: &str, reference: u8) -> Result<Vec<Part>, TextError> {
    encode_for(text, reference, DefaultAlphabet::Gsm7)
}

/// [`encode`] for an SMSC whose default alphabet (`data_coding` 0) is
/// `default`: with Latin-1 or ASCII, only ASCII text goes in it.
pub fn encode_for(
    text: &str,
    reference: u8,
    default: DefaultAlphabet,
) -> Result<Vec<Part>, TextError> {
    // Each character as its units: septets (or ASCII octets) in the
    // default alphabet, if every character has them…
    let plain: Option<Vec<Vec<u8>>> = text
        .chars()
        .map(|c| match default {
            DefaultAlphabet::Gsm7 => gsm_septets(c).map(|(s, n)| s[..n].to_vec()),
            DefaultAlphabet::Latin1 | DefaultAlphabet::Ascii => c.is_ascii().then(|| vec![c as u8]),
        })
        .collect();
    // … or else UTF-16BE bytes.
    let (units, data_coding, single, per_part): (Vec<Vec<u8>>, u8, usize, usize) = match plain {
        Some(chars) => (chars, DC_DEFAULT, 160, 153),
        None => (
            text.chars()
                .map(|c| {
                    let mut buf = [0u16; 2];
                    c.encode_utf16(&mut buf)
                        .iter()
                        .flat_map(|u| u.to_be_bytes())
                        .collect()
                })
                .collect(),
            DC_UCS2,
            140,
            134,
        ),
    };
    let total: usize = units.iter().map(Vec::len).sum();
    if total <= single {
        return Ok(vec![Part {
            data_coding,
            udhi: false,
            bytes: units.concat(),
        }]);
    }
    let mut chunks: Vec<Vec<u8>> = vec![Vec::new()];
    for u in units {
        if chunks.last().is_some_and(|c| c.len() + u.len() > per_part) {
            chunks.push(Vec::new());
        }
        if let Some(c) = chunks.last_mut() {
            c.extend(u);
        }
    }
    let n = chunks.len();
    if n > 255 {
        return Err(TextError::TooLong(n));
    }
    Ok(chunks
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let mut bytes = vec![0x05, 0x00, 0x03, reference, n as u8, i as u8 + 1];
            bytes.extend(body);
            Part {
                data_coding,
                udhi: true,
                bytes,
            }
        })
        .collect())
}

/// A concatenation header: which long text a part belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concat {
    /// The reference shared by the parts (8 or 16 bits).
    pub reference: u16,
    /// How many parts.
    pub total: u8,
    /// This part's number, from 1.
    pub seq: u8,
}

/// Splits a `short_message` with a UDH into its concatenation header (if
/// it has one) and the text's octets. A malformed UDH leaves the bytes
/// whole.
pub fn split_udh(bytes: &[u8]) -> (Option<Concat>, &[u8]) {
    let Some((&len, rest)) = bytes.split_first() else {
        return (None, bytes);
    };
    let len = len as usize;
    if rest.len() < len {
        return (None, bytes);
    }
    let (mut ies, body) = rest.split_at(len);
    let mut concat = None;
    while let [iei, l, tail @ ..] = ies {
        let l = *l as usize;
        if tail.len() < l {
            return (None, bytes);
        }
        let data = &tail[..l];
        match (iei, data) {
            (0x00, [r, t, s]) => {
                concat = Some(Concat {
                    reference: *r as u16,
                    total: *t,
                    seq: *s,
                })
            }
            (0x08, [r1, r2, t, s]) => {
                concat = Some(Concat {
                    reference: u16::from_be_bytes([*r1, *r2]),
                    total: *t,
                    seq: *s,
                })
            }
            _ => {}
        }
        ies = &tail[l..];
    }
    (
        concat.filter(|c| c.total >= 1 && (1..=c.total).contains(&c.seq)),
        body,
    )
}

/// Decodes a short message's octets by its `data_coding`: GSM 03.38 (or
/// what the carrier's default alphabet is), IA5, Latin-1, UCS-2 (and
/// UTF-16 surrogates); other codings (binary) as hex.
pub fn decode(data_coding: u8, bytes: &[u8], default: DefaultAlphabet) -> String {
    // The coding group bits: 0x0X is the plain group; 0xFX keeps bit 2
    // (8-bit data) and bits 0-1 for the class.
    let coding = match data_coding {
        0xF0..=0xFF if data_coding & 0x04 == 0 => DC_DEFAULT,
        0xF0..=0xFF => 0x04,
        0x10..=0x3F if data_coding & 0x0C == 0x08 => DC_UCS2,
        0x10..=0x3F if data_coding & 0x0C == 0x00 => DC_DEFAULT,
        other => other,
    };
    match (coding, default) {
        (DC_DEFAULT, DefaultAlphabet::Gsm7) => decode_gsm(bytes),
        (DC_DEFAULT, DefaultAlphabet::Ascii) | (0x01, _) => {
            bytes.iter().map(|&b| (b & 0x7F) as char).collect()
        }
        (DC_DEFAULT, DefaultAlphabet::Latin1) | (0x03, _) => {
            bytes.iter().map(|&b| b as char).collect()
        }
        (DC_UCS2, _) => {
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        _ => hex::encode(bytes),
    }
}

/// Decodes unpacked GSM 03.38 septets.
fn decode_gsm(bytes: &[u8]) -> String {
    let basic: Vec<char> = BASIC.chars().collect();
    let mut out = String::with_capacity(bytes.len());
    let mut it = bytes.iter().map(|b| b & 0x7F);
    while let Some(b) = it.next() {
        if b == ESC {
            match it.next() {
                Some(e) => match EXTENSION.iter().find(|(s, _)| *s == e) {
                    Some((_, c)) => out.push(*c),
                    // An unknown extension shows as its basic character.
                    None => out.push(basic[e as usize]),
                },
                None => out.push(' '),
            }
        } else {
            out.push(basic[b as usize]);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn joined(parts: &[Part]) -> String {
        let mut bytes = Vec::new();
        for p in parts {
            let (concat, body) = if p.udhi {
                split_udh(&p.bytes)
            } else {
                (None, &p.bytes[..])
            };
            if p.udhi {
                assert!(concat.is_some());
            }
            bytes.extend_from_slice(body);
        }
        decode(parts[0].data_coding, &bytes, DefaultAlphabet::Gsm7)
    }

    #[test]
    fn the_basic_table_has_128_septets() {
        assert_eq!(BASIC.chars().count(), 128);
        assert_eq!(BASIC.chars().nth(0x24), Some('¤'));
        assert_eq!(BASIC.chars().nth(0x7F), Some('à'));
    }

    #[test]
    fn gsm_text_fits_160_and_splits_at_153() {
        let one = "a".repeat(160);
        let p = encode(&one, 7).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].data_coding, DC_DEFAULT);
        assert_eq!(p[0].bytes.len(), 160);
        let two = "b".repeat(161);
        let p = encode(&two, 7).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(&p[0].bytes[..6], &[5, 0, 3, 7, 2, 1]);
        assert_eq!(p[0].bytes.len(), 6 + 153);
        assert_eq!(p[1].bytes.len(), 6 + 8);
        assert_eq!(joined(&p), two);
    }

    #[test]
    fn escapes_count_twice_and_are_never_split() {
        let text = format!("{}€ and [x] ^_^ @£$", "x".repeat(152));
        let p = encode(&text, 1).unwrap();
        // 152 x then € (2 septets) does not fit 153: € opens part two.
        assert_eq!(p[0].bytes.len(), 6 + 152);
        assert_eq!(&p[1].bytes[6..8], &[ESC, 0x65]);
        assert_eq!(joined(&p), text);
    }

    #[test]
    fn other_text_goes_as_ucs2_with_surrogates_kept_whole() {
        let text = "Labas, kaip sekasi? Ąčęėįšųūž — привет 👋".repeat(8);
        let p = encode(&text, 200).unwrap();
        assert!(p.len() > 1);
        assert!(
            p.iter()
                .all(|p| p.data_coding == DC_UCS2 && p.bytes.len() <= 6 + 134)
        );
        assert!(p.iter().all(|p| (p.bytes.len() - 6) % 2 == 0));
        assert_eq!(joined(&p), text);
        let short = encode("Ačiū", 0).unwrap();
        assert_eq!(
            short[0].bytes,
            vec![0, 0x41, 0x01, 0x0D, 0, 0x69, 0x01, 0x6B]
        );
        assert!(!short[0].udhi);
    }

    #[test]
    fn three_hundred_ucs2_characters_make_five_parts() {
        let text: String = "ž".repeat(300);
        let p = encode(&text, 9).unwrap();
        assert_eq!(p.len(), 5);
        assert_eq!(joined(&p), text);
    }

    #[test]
    fn udhs_with_16_bit_references_and_other_elements_are_read() {
        let bytes = [
            0x09, 0x24, 0x01, 0x01, 0x08, 0x04, 0x12, 0x34, 0x03, 0x02, 0x00, 0x00, b'h',
        ];
        let (c, body) = split_udh(&bytes);
        assert_eq!(
            c,
            Some(Concat {
                reference: 0x1234,
                total: 3,
                seq: 2
            })
        );
        assert_eq!(body, &[0x00, 0x00, b'h']);
        // A UDH longer than the message is no UDH.
        let bad = [0x09, 0x00, 0x03, 1, 2, 1];
        assert_eq!(split_udh(&bad), (None, &bad[..]));
    }

    #[test]
    fn codings_decode() {
        assert_eq!(
            decode(0, &[0x48, 0x69, 0x1B, 0x65, 0x00], DefaultAlphabet::Gsm7),
            "Hi€@"
        );
        assert_eq!(decode(0, b"Hi@", DefaultAlphabet::Latin1), "Hi@");
        assert_eq!(decode(3, &[0x48, 0xE9], DefaultAlphabet::Gsm7), "Hé");
        assert_eq!(decode(0xF1, &[0x48], DefaultAlphabet::Gsm7), "H");
        assert_eq!(decode(4, &[0xDE, 0xAD], DefaultAlphabet::Gsm7), "dead");
    }

    #[test]
    fn a_latin1_smsc_gets_ascii_as_is_and_the_rest_as_ucs2() {
        let p = encode_for("Hi {x}", 0, DefaultAlphabet::Latin1).unwrap();
        assert_eq!(
            (p[0].data_coding, p[0].bytes.as_slice()),
            (0, &b"Hi {x}"[..])
        );
        let p = encode_for("Hé", 0, DefaultAlphabet::Latin1).unwrap();
        assert_eq!(p[0].data_coding, DC_UCS2);
    }

    #[test]
    fn too_long_texts_are_refused() {
        let text = "ž".repeat(67 * 255 + 1);
        assert_eq!(encode(&text, 0), Err(TextError::TooLong(256)));
    }
}
