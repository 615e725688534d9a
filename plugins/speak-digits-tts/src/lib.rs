//! A TTS hook showing both answers a `tts` plugin can give:
//!
//! - for the voice `beep`, finished audio: a 440 Hz tone, 8 kHz, one 100 ms
//!   beep per word of the text;
//! - otherwise, text rewritten for the built-in engine: runs of digits are
//!   spelled out one by one ("waybill 123" → "waybill 1 2 3"), so numbers are
//!   read as digits, not as "one hundred twenty-three".

use plugboard_sdk::tts::{Audio, Guest, Output, Request};

struct SpeakDigits;

fn spell_digits(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    let mut prev_digit = false;
    for c in text.chars() {
        let digit = c.is_ascii_digit();
        if digit && prev_digit {
            out.push(' ');
        }
        out.push(c);
        prev_digit = digit;
    }
    out
}

fn beeps(words: usize) -> Vec<i16> {
    let rate = 8000.0_f32;
    let mut samples = Vec::new();
    for _ in 0..words {
        for n in 0..800 {
            let t = n as f32 / rate;
            samples.push(((t * 440.0 * std::f32::consts::TAU).sin() * 8000.0) as i16);
        }
        samples.extend(std::iter::repeat_n(0i16, 400));
    }
    samples
}

impl Guest for SpeakDigits {
    fn synthesize(req: Request) -> Result<Output, String> {
        if req.text.len() > 10_000 {
            return Err("text longer than 10,000 bytes".into());
        }
        if req.voice.as_deref() == Some("beep") {
            return Ok(Output::Audio(Audio {
                sample_rate: 8000,
                samples: beeps(req.text.split_whitespace().count()),
            }));
        }
        Ok(Output::Text(Request {
            text: spell_digits(&req.text),
            voice: req.voice,
            language: req.language,
        }))
    }
}

plugboard_sdk::tts::export_tts!(SpeakDigits);
