//! Audio for a flow's actions, made ready before they run: speech (the
//! tenant's `tts` plugin, else espeak-ng) for `say` and gather prompts,
//! clips for `play` (built-in tones, or a WAV fetched through the flow's
//! `http` grant).

use std::sync::Arc;

use plugboard_core::EntryKind;
use plugboard_core::flow::Action;
use plugboard_engine::{Engine, FlowSession};
use plugboard_host::fetch::{FetchError, FetchRequest, Fetcher};
use plugboard_media::audio;
use plugboard_media::tts::{Espeak, voice_for};
use serde_json::json;

use crate::ivr::Prepared;

/// Speech for a text: the tenant's `tts` plugin first (finished audio, or
/// text rewritten for the built-in engine), else espeak-ng.
async fn speak(
    tts: &Arc<Espeak>,
    app: &Arc<Engine>,
    session: &mut FlowSession,
    text: String,
    voice: Option<String>,
    language: Option<String>,
) -> Result<Arc<Vec<i16>>, String> {
    let tenant = session.interaction.tenant.clone();
    let (mut text, mut voice, mut language) = (text, voice, language);
    match app
        .tenant_tts(&tenant, &text, voice.as_deref(), language.as_deref())
        .await
    {
        Some(Ok(plugboard_host::TtsOutput::Audio {
            sample_rate,
            samples,
        })) => {
            let f: Vec<f32> = samples.iter().map(|s| f32::from(*s) / 32768.0).collect();
            let pcm = audio::resample(&f, sample_rate.clamp(4000, 192_000), audio::RATE)
                .map_err(|e| e.to_string())?;
            session.note(EntryKind::TtsPlugin, json!({"audio_ms": pcm.len() / 8}));
            return Ok(Arc::new(
                pcm.iter()
                    .map(|s| (s * 32768.0).clamp(-32768.0, 32767.0) as i16)
                    .collect(),
            ));
        }
        Some(Ok(plugboard_host::TtsOutput::Text {
            text: t,
            voice: v,
            language: l,
        })) => {
            session.note(EntryKind::TtsPlugin, json!({"text": t}));
            text = t;
            voice = v.or(voice);
            language = l.or(language);
        }
        Some(Err(e)) => session.note(EntryKind::TtsPluginFailed, json!({"error": e})),
        None => {}
    }
    espeak(tts, text, voice_for(language.as_deref(), voice.as_deref())).await
}

/// Speech from the built-in engine (espeak-ng), off the async threads.
pub(super) async fn espeak(
    tts: &Arc<Espeak>,
    text: String,
    voice: String,
) -> Result<Arc<Vec<i16>>, String> {
    let tts = tts.clone();
    tokio::task::spawn_blocking(move || tts.speak(&text, &voice))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
}

/// Turns a flow's actions into playable audio: speech for say and gather
/// prompts, clips for play. A failure is noted and replaced by a short
/// tone so the caller is never left in unexplained silence.
pub(super) async fn prepare(
    tts: &Arc<Espeak>,
    app: &Arc<Engine>,
    actions: &[Action],
    session: &mut FlowSession,
) -> Vec<Prepared> {
    let mut out = Vec::with_capacity(actions.len());
    for action in actions {
        let speech = match action {
            Action::Say {
                text,
                voice,
                language,
            } => Some((text.clone(), voice.clone(), language.clone())),
            Action::Gather {
                prompt: Some(p), ..
            } => Some((p.text.clone(), p.voice.clone(), p.language.clone())),
            _ => None,
        };
        let audio = if let Some((text, voice, language)) = speech {
            match speak(tts, app, session, text, voice, language).await {
                Ok(a) => Some(a),
                Err(e) => {
                    session.note(EntryKind::TtsFailed, json!({"error": e}));
                    Some(Arc::new(audio::tone(440.0, 300, 0.2)))
                }
            }
        } else if let Action::Play { url } = action {
            let url = url.clone();
            let grant = session.http_grant();
            let fetcher = app.fetcher().clone();
            let tenant = session.interaction.tenant.clone();
            let clip = load_clip(&fetcher, &tenant, &url, grant.as_ref()).await;
            match clip {
                Ok(a) => Some(a),
                Err(e) => {
                    session.note(
                        EntryKind::PlayFailed,
                        json!({"code": e.code(), "error": e.to_string()}),
                    );
                    Some(Arc::new(audio::tone(440.0, 300, 0.2)))
                }
            }
        } else {
            None
        };
        out.push(Prepared {
            action: action.clone(),
            audio,
        });
    }
    out
}

/// Why a clip could not be played.
#[derive(Debug, thiserror::Error)]
enum ClipError {
    /// A name or URL we do not play.
    #[error("{0}")]
    Unknown(String),
    /// The URL was refused or failed by the flow's `http` grant.
    #[error("{0}")]
    Fetch(#[from] FetchError),
    /// The server answered, but not with audio.
    #[error("{0}")]
    Failed(String),
}

impl ClipError {
    fn code(&self) -> &'static str {
        match self {
            ClipError::Unknown(_) => "unknown_clip",
            ClipError::Fetch(e) => e.code(),
            ClipError::Failed(_) => "failed",
        }
    }
}

/// A clip for `play`: `beep`, `hold-music`, `silence:MS`, `tone:HZ:MS`, or
/// an http URL of a WAV file, fetched on the tenant's behalf only through
/// the flow's `http` grant (its allow-list, timeout and size cap; a
/// redirect is not followed): the server never fetches an address the
/// tenant was not granted.
async fn load_clip(
    fetcher: &Fetcher,
    tenant: &str,
    url: &str,
    grant: Option<&plugboard_core::HttpGrant>,
) -> Result<Arc<Vec<i16>>, ClipError> {
    let num = |s: Option<&str>| -> Result<u32, ClipError> {
        s.and_then(|v| v.parse().ok())
            .ok_or_else(|| ClipError::Unknown(format!("bad clip {url:?}")))
    };
    let mut parts = url.split(':');
    let clip = match parts.next().unwrap_or("") {
        "beep" => audio::beep(),
        "hold-music" | "moh" => return Ok(audio::music_on_hold()),
        "silence" => audio::silence(num(parts.next())?.min(600_000)),
        "tone" => {
            let hz = num(parts.next())?;
            let ms = num(parts.next())?;
            audio::tone(hz as f32, ms.min(600_000), 0.3)
        }
        "http" | "https" => {
            let resp = fetcher.fetch(tenant, grant, FetchRequest::get(url)).await?;
            if !(200..300).contains(&resp.status) {
                return Err(ClipError::Failed(format!(
                    "{url} answered status {}",
                    resp.status
                )));
            }
            // Decoding and resampling a long file is CPU work: off the
            // executor.
            tokio::task::spawn_blocking(move || audio::decode_wav(&resp.body))
                .await
                .map_err(|e| ClipError::Failed(e.to_string()))?
                .map_err(|e| ClipError::Failed(e.to_string()))?
        }
        _ => return Err(ClipError::Unknown(format!("unknown clip {url:?}"))),
    };
    Ok(Arc::new(clip))
}
