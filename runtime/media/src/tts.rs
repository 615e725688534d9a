//! The built-in text-to-speech engine: espeak-ng, run as a separate process
//! (it is GPL, so it is never linked), its WAV output resampled to 8 kHz and
//! cached per voice and text.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use crate::audio::decode_wav;

/// Why speech could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TtsError {
    /// espeak-ng could not be started (not installed?).
    #[error("cannot run {program}: {message}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        message: String,
    },
    /// espeak-ng ran but failed.
    #[error("espeak-ng failed: {0}")]
    Failed(String),
    /// Its output was not readable audio.
    #[error("espeak-ng output: {0}")]
    Audio(String),
}

/// Longest text spoken at once (characters).
pub const MAX_TEXT: usize = 4000;

/// espeak-ng with a cache.
pub struct Espeak {
    program: PathBuf,
    budget_samples: usize,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    map: HashMap<(String, String), Arc<Vec<i16>>>,
    order: VecDeque<(String, String)>,
    samples: usize,
    hits: u64,
    misses: u64,
}

/// The espeak-ng voice for a BCP 47 language tag (`en-US` → `en-us`).
pub fn voice_for(language: Option<&str>, voice: Option<&str>) -> String {
    if let Some(v) = voice.filter(|v| !v.is_empty()) {
        return v.to_ascii_lowercase();
    }
    match language.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") => "en-us".into(),
        Some(l) => l.to_string(),
    }
}

/// espeak-ng writes WAV to a pipe before it knows the length, so the RIFF
/// and data sizes are placeholders; set them from the bytes received.
pub fn fix_streamed_wav(mut wav: Vec<u8>) -> Vec<u8> {
    if wav.len() < 44 || &wav[..4] != b"RIFF" || &wav[8..12] != b"WAVE" {
        return wav;
    }
    let len = wav.len();
    wav[4..8].copy_from_slice(&((len - 8) as u32).to_le_bytes());
    let mut pos = 12;
    while pos + 8 <= len {
        let size =
            u32::from_le_bytes([wav[pos + 4], wav[pos + 5], wav[pos + 6], wav[pos + 7]]) as usize;
        if &wav[pos..pos + 4] == b"data" {
            let real = (len - pos - 8) as u32;
            wav[pos + 4..pos + 8].copy_from_slice(&real.to_le_bytes());
            break;
        }
        pos += 8 + size + (size & 1);
    }
    wav
}

impl Espeak {
    /// Uses `program` (normally `espeak-ng`), caching up to
    /// `budget_samples` samples of audio (8 kHz; 16 MiB ≈ 17 min).
    pub fn new(program: impl Into<PathBuf>, budget_samples: usize) -> Espeak {
        Espeak {
            program: program.into(),
            budget_samples,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Samples cached now, and the budget.
    pub fn cached_samples(&self) -> (usize, usize) {
        let cached = self.cache.lock().map(|c| c.samples).unwrap_or(0);
        (cached, self.budget_samples)
    }

    /// Cache hits and misses so far.
    pub fn stats(&self) -> (u64, u64) {
        self.cache
            .lock()
            .map(|c| (c.hits, c.misses))
            .unwrap_or((0, 0))
    }

    /// Speaks `text` (plain or SSML starting with `<speak`) with an
    /// espeak-ng voice; blocking (run it off the async workers).
    pub fn speak(&self, text: &str, voice: &str) -> Result<Arc<Vec<i16>>, TtsError> {
        let text: String = text.chars().take(MAX_TEXT).collect();
        let key = (voice.to_string(), text.clone());
        if let Ok(mut c) = self.cache.lock()
            && let Some(hit) = c.map.get(&key).cloned()
        {
            c.hits += 1;
            return Ok(hit);
        }
        let mut cmd = Command::new(&self.program);
        cmd.arg("-v")
            .arg(voice)
            .arg("-s")
            .arg("165")
            .arg("--stdout");
        if text.trim_start().starts_with("<speak") {
            cmd.arg("-m");
        }
        // `--` keeps text starting with '-' from being read as an option.
        cmd.arg("--").arg(&text);
        let out = cmd.output().map_err(|e| TtsError::Spawn {
            program: self.program.display().to_string(),
            message: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(TtsError::Failed(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        let wav = fix_streamed_wav(out.stdout);
        let pcm = Arc::new(decode_wav(&wav).map_err(|e| TtsError::Audio(e.to_string()))?);
        if let Ok(mut c) = self.cache.lock() {
            c.misses += 1;
            c.samples += pcm.len();
            c.map.insert(key.clone(), pcm.clone());
            c.order.push_back(key);
            while c.samples > self.budget_samples {
                let Some(old) = c.order.pop_front() else {
                    break;
                };
                if let Some(v) = c.map.remove(&old) {
                    c.samples -= v.len();
                }
            }
        }
        Ok(pcm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs espeak-ng (scripts/setup.sh installs it).
    #[test]
    fn espeak_speaks_and_caches() {
        let tts = Espeak::new("espeak-ng", 1 << 20);
        let first = tts
            .speak("Your parcel is in Vilnius.", "en-us")
            .unwrap_or_else(|e| panic!("{e} (scripts/setup.sh installs espeak-ng)"));
        // About 1.5 s of speech at 8 kHz, clearly not silence.
        assert!(
            first.len() > 8000 && first.len() < 8000 * 5,
            "{}",
            first.len()
        );
        assert!(crate::audio::rms(&first) > 0.02);
        let again = tts
            .speak("Your parcel is in Vilnius.", "en-us")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(tts.stats(), (1, 1));
    }
}
