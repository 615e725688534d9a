//! The softphone's routes, beside the API's own (same tokens, same
//! errors):
//!
//! - `POST /v1/tenants/{t}/agents/{a}/softphone` `{"sdp": OFFER}` →
//!   `{"type": "answer", "sdp": ANSWER}`: connects (or reconnects) the
//!   agent's softphone;
//! - `GET …/softphone`: whether it is connected; `DELETE`: turns it off;
//! - `POST …/softphone/{answer|hangup|hold|resume}`, and `…/softphone/dtmf`
//!   with `{"digits": "12#"}`.
//!
//! A softphone is the agent's own: only their token (agent or supervisor)
//! connects it; the tenant's key may also look, hang up and turn it off.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use plugboard_api::{AcdScope, ApiError};
use plugboard_engine::acd::AcdRole;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Control, Softphones, WebrtcError};

/// Browsers' offers are a few KiB.
const SDP_LIMIT: usize = 64 * 1024;

type Res<T> = Result<T, ApiError>;

impl From<WebrtcError> for ApiError {
    fn from(e: WebrtcError) -> ApiError {
        let (status, code) = match &e {
            WebrtcError::Sdp(_) => (StatusCode::BAD_REQUEST, "bad_sdp"),
            WebrtcError::Socket(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_media_socket"),
            WebrtcError::NotConnected => (StatusCode::NOT_FOUND, "no_softphone"),
            WebrtcError::NoCall(_) => (StatusCode::CONFLICT, "no_call"),
            WebrtcError::Digit(_) | WebrtcError::Digits(_) => {
                (StatusCode::BAD_REQUEST, "bad_digit")
            }
            WebrtcError::Busy => (StatusCode::CONFLICT, "busy"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// The routes, over this node's softphones.
pub fn router(engine: Arc<plugboard_engine::Engine>, phones: Arc<Softphones>) -> Router {
    Router::new()
        .route(
            "/v1/tenants/{t}/agents/{a}/softphone",
            post(connect).get(status).delete(disconnect),
        )
        .route(
            "/v1/tenants/{t}/agents/{a}/softphone/{action}",
            post(control),
        )
        .layer(DefaultBodyLimit::max(SDP_LIMIT))
        .layer(Extension(phones))
        .with_state(engine)
}

type St = State<Arc<plugboard_engine::Engine>>;
type Phones = Extension<Arc<Softphones>>;

/// The softphone is the agent's own: their token, or the tenant's key.
async fn own(
    engine: &Arc<plugboard_engine::Engine>,
    tenant: &str,
    agent: &str,
    role: &AcdRole,
) -> Res<()> {
    let mine = match role {
        AcdRole::Tenant => true,
        AcdRole::Agent(me) | AcdRole::Supervisor(me) => me == agent,
    };
    if !mine {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a softphone is reached only with its agent's own token",
        ));
    }
    // The agent must exist.
    engine.agent(tenant, agent).await?;
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Offer {
    sdp: String,
    #[serde(default, rename = "type")]
    _kind: Option<String>,
}

async fn connect(
    State(engine): St,
    Extension(phones): Phones,
    AcdScope(t, role): AcdScope,
    Path((_, agent)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Res<(StatusCode, Json<Value>)> {
    // Connecting is speaking as the agent: their own token only (the
    // tenant's key may look, hang up and turn it off).
    if matches!(role, AcdRole::Tenant) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a softphone is connected with its agent's own token",
        ));
    }
    own(&engine, &t.id, &agent, &role).await?;
    let offer: Offer = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("expected {{\"sdp\": OFFER}}: {e}"),
        )
    })?;
    let (answer, session) = phones.connect(&t.id, &agent, &offer.sdp).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"type": "answer", "sdp": answer, "session": session})),
    ))
}

async fn status(
    State(engine): St,
    Extension(phones): Phones,
    AcdScope(t, role): AcdScope,
    Path((_, agent)): Path<(String, String)>,
) -> Res<Json<Value>> {
    own(&engine, &t.id, &agent, &role).await?;
    Ok(Json(
        json!({"agent": agent, "connected": phones.connected(&t.id, &agent)}),
    ))
}

async fn disconnect(
    State(engine): St,
    Extension(phones): Phones,
    AcdScope(t, role): AcdScope,
    Path((_, agent)): Path<(String, String)>,
) -> Res<StatusCode> {
    own(&engine, &t.id, &agent, &role).await?;
    if phones.disconnect(&t.id, &agent) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(WebrtcError::NotConnected.into())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Digits {
    digits: String,
}

async fn control(
    State(engine): St,
    Extension(phones): Phones,
    AcdScope(t, role): AcdScope,
    Path((_, agent, action)): Path<(String, String, String)>,
    body: axum::body::Bytes,
) -> Res<StatusCode> {
    own(&engine, &t.id, &agent, &role).await?;
    let c = match action.as_str() {
        "answer" => Control::Answer,
        "hangup" => Control::Hangup,
        "hold" => Control::Hold(true),
        "resume" => Control::Hold(false),
        "dtmf" => {
            let d: Digits = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    format!("expected {{\"digits\": \"…\"}}: {e}"),
                )
            })?;
            Control::Dtmf(d.digits)
        }
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no softphone action {other:?}"),
            ));
        }
    };
    phones.control(&t.id, &agent, c).await?;
    Ok(StatusCode::NO_CONTENT)
}
