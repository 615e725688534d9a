//! Audio clips at the telephone rate: WAV in (any common rate and width,
//! resampled with `rubato`), WAV out, tones and music on hold.

use std::io::Cursor;

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Async, FixedAsync, Resampler, SincInterpolationParameters, WindowFunction};

/// The sample rate of every clip here (G.711).
pub const RATE: u32 = 8000;
/// Samples in one 20 ms frame.
pub const FRAME: usize = 160;

/// Why audio could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// Not a WAV file we can read.
    #[error("cannot read WAV: {0}")]
    Wav(String),
    /// Resampling failed.
    #[error("cannot resample: {0}")]
    Resample(String),
}

/// Resamples mono audio to another rate (windowed-sinc, anti-aliased).
pub fn resample(input: &[f32], from_hz: u32, to_hz: u32) -> Result<Vec<f32>, AudioError> {
    if from_hz == to_hz || input.is_empty() {
        return Ok(input.to_vec());
    }
    let params = SincInterpolationParameters::new(256, WindowFunction::BlackmanHarris2);
    let mut rs = Async::<f32>::new_sinc(
        f64::from(to_hz) / f64::from(from_hz),
        1.0,
        &params,
        1024,
        1,
        FixedAsync::Input,
    )
    .map_err(|e| AudioError::Resample(e.to_string()))?;
    let inp = InterleavedSlice::new(input, 1, input.len())
        .map_err(|e| AudioError::Resample(e.to_string()))?;
    Ok(rs
        .process_all(&inp, input.len(), None)
        .map_err(|e| AudioError::Resample(e.to_string()))?
        .take_data())
}

fn to_i16(samples: &[f32]) -> Vec<i16> {
    samples
        .iter()
        .map(|s| (s * 32768.0).clamp(-32768.0, 32767.0) as i16)
        .collect()
}

/// Reads a WAV file (8/16/24/32-bit integer or 32-bit float, any rate, any
/// channel count: channels are mixed down) as 8 kHz mono samples.
pub fn decode_wav(bytes: &[u8]) -> Result<Vec<i16>, AudioError> {
    let mut reader =
        hound::WavReader::new(Cursor::new(bytes)).map_err(|e| AudioError::Wav(e.to_string()))?;
    let spec = reader.spec();
    let channels = usize::from(spec.channels.max(1));
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(|e| AudioError::Wav(e.to_string()))?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(|e| AudioError::Wav(e.to_string()))?
        }
    };
    let mono: Vec<f32> = interleaved
        .chunks(channels)
        .map(|c| c.iter().sum::<f32>() / channels as f32)
        .collect();
    Ok(to_i16(&resample(&mono, spec.sample_rate, RATE)?))
}

/// Writes 8 kHz mono 16-bit samples as a WAV file.
pub fn encode_wav(samples: &[i16]) -> Vec<u8> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = Cursor::new(Vec::with_capacity(44 + samples.len() * 2));
    // Writing to memory cannot fail except on absurd sizes; an error
    // leaves a truncated buffer that readers reject.
    if let Ok(mut w) = hound::WavWriter::new(&mut out, spec) {
        for s in samples {
            if w.write_sample(*s).is_err() {
                break;
            }
        }
        let _ = w.finalize();
    }
    out.into_inner()
}

/// A sine tone.
pub fn tone(freq: f32, ms: u32, amplitude: f32) -> Vec<i16> {
    let n = (ms * RATE / 1000) as usize;
    (0..n)
        .map(|i| {
            let v = (2.0 * std::f32::consts::PI * freq * i as f32 / RATE as f32).sin();
            (v * amplitude * 32767.0) as i16
        })
        .collect()
}

/// Silence.
pub fn silence(ms: u32) -> Vec<i16> {
    vec![0; (ms * RATE / 1000) as usize]
}

/// The beep before a recording (1 kHz, 250 ms).
pub fn beep() -> Vec<i16> {
    tone(1000.0, 250, 0.3)
}

/// Built-in music on hold: a slow, soft arpeggio (C major, A minor, F, G)
/// with a gentle fade on each note, about 8 s long, meant to loop.
/// Synthesised once per process and shared.
pub fn music_on_hold() -> std::sync::Arc<Vec<i16>> {
    static MUSIC: std::sync::OnceLock<std::sync::Arc<Vec<i16>>> = std::sync::OnceLock::new();
    MUSIC
        .get_or_init(|| std::sync::Arc::new(synthesise_hold_music()))
        .clone()
}

fn synthesise_hold_music() -> Vec<i16> {
    const CHORDS: [[f32; 3]; 4] = [
        [261.63, 329.63, 392.00],
        [220.00, 261.63, 329.63],
        [174.61, 220.00, 261.63],
        [196.00, 246.94, 293.66],
    ];
    let mut out = Vec::new();
    for chord in CHORDS {
        for _ in 0..2 {
            for f in chord {
                let note = tone(f, 333, 0.15);
                let n = note.len() as f32;
                out.extend(note.iter().enumerate().map(|(i, s)| {
                    let env = (1.0 - i as f32 / n).powf(1.5);
                    (*s as f32 * env) as i16
                }));
            }
        }
    }
    out
}

/// Root-mean-square level of samples, 0.0–1.0.
pub fn rms(samples: &[i16]) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    let sum: f64 = samples
        .iter()
        .map(|s| {
            let v = f64::from(*s) / 32768.0;
            v * v
        })
        .sum();
    (sum / samples.len() as f64).sqrt() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero_crossings(s: &[i16]) -> usize {
        s.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count()
    }

    #[test]
    fn wav_round_trip_and_resampling() {
        // A 440 Hz tone at 22050 Hz stereo, 1 s.
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 22050,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut buf = Cursor::new(Vec::new());
        {
            let mut w = hound::WavWriter::new(&mut buf, spec).unwrap_or_else(|e| panic!("{e}"));
            for i in 0..22050 {
                let v = ((2.0 * std::f32::consts::PI * 440.0 * i as f32 / 22050.0).sin() * 16000.0)
                    as i16;
                w.write_sample(v).unwrap_or_else(|e| panic!("{e}"));
                w.write_sample(v).unwrap_or_else(|e| panic!("{e}"));
            }
            w.finalize().unwrap_or_else(|e| panic!("{e}"));
        }
        let pcm = decode_wav(buf.get_ref()).unwrap_or_else(|e| panic!("{e}"));
        assert!((pcm.len() as i64 - 8000).abs() <= 2, "{}", pcm.len());
        let zc = zero_crossings(&pcm);
        assert!(
            (870..=890).contains(&zc),
            "440 Hz has ~880 crossings/s, got {zc}"
        );
        let back = decode_wav(&encode_wav(&pcm)).unwrap_or_else(|e| panic!("{e}"));
        assert!(back == pcm, "8 kHz 16-bit WAV reads back exactly");
        assert!(decode_wav(b"RIFF....WAVEjunk").is_err());
    }

    #[test]
    fn hold_music_is_audible_and_loops_cleanly() {
        let m = music_on_hold();
        assert!(m.len() > 7 * 8000);
        assert!(rms(&m) > 0.02);
        assert_eq!(rms(&silence(20)), 0.0);
        assert_eq!(silence(20).len(), FRAME);
    }
}
