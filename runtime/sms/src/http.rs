//! Carriers reached over HTTP instead of SMPP: sends through the
//! carrier's API (through the tenant's network policy and fetcher, as
//! webhooks go), and the carrier's webhooks for inbound messages and
//! status reports, each checked against the carrier's signature before
//! anything is stored.
//!
//! Two dialects ([`HttpSmsDialect`]): Twilio's Messages API (form POSTs,
//! Basic auth, `X-Twilio-Signature`), and our JSON (signed as our
//! outbound webhooks are).
//!
//! Webhooks: `POST /sms/{tenant}/{carrier}/inbound` and
//! `POST /sms/{tenant}/{carrier}/status`. A message is answered `200`
//! only once it is stored; a provider's message id makes a retried
//! webhook find the first copy.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use plugboard_core::{
    Channel, Error as CoreError, HttpGrant, HttpSmsApi, HttpSmsDialect, Message, MessageStatus,
    Origin, SmsCarrier, normalize_address, now_ms, twilio_credentials,
};
use plugboard_engine::{Delivered, DeliveryError, Engine, EngineError, Inbound};
use plugboard_host::fetch::FetchRequest;
use serde_json::{Value, json};
use sha1::Sha1;
use sha2::Sha256;

/// How far a JSON webhook's signed time may be from ours, seconds.
const SIGNATURE_SKEW: u64 = 300;

/// The webhook endpoints of HTTP carriers.
pub fn router(engine: Arc<Engine>) -> axum::Router {
    axum::Router::new()
        .route("/sms/{tenant}/{carrier}/inbound", post(inbound))
        .route("/sms/{tenant}/{carrier}/status", post(status))
        .with_state(engine)
}

/// A number as the carrier's API writes it: `+` and digits (E.164), or
/// an alphanumeric sender as is.
fn e164(number: &str) -> String {
    if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
        format!("+{number}")
    } else {
        number.to_string()
    }
}

/// Sends a message through a carrier's HTTP API; the carrier's id for it.
pub async fn send(
    engine: &Engine,
    tenant: &str,
    carrier: &SmsCarrier,
    api: &HttpSmsApi,
    message: &Message,
) -> Result<Delivered, DeliveryError> {
    let secret = engine
        .sms_carrier_secret(tenant, carrier)
        .await
        .map_err(|e| DeliveryError::Retry(e.to_string()))?;
    let from = normalize_address(&message.from);
    let to = normalize_address(&message.to);
    let (headers, body) = match api.dialect {
        HttpSmsDialect::Twilio => {
            let (sid, token) = twilio_credentials(&secret).ok_or_else(|| {
                DeliveryError::Permanent(format!(
                    "secret {} is not ACCOUNT_SID:AUTH_TOKEN",
                    carrier.secret_name()
                ))
            })?;
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("From", &e164(&from))
                .append_pair("To", &e164(&to))
                .append_pair("Body", &message.text);
            if let Some(base) = &api.public_url {
                form.append_pair(
                    "StatusCallback",
                    &format!(
                        "{}/sms/{tenant}/{}/status",
                        base.trim_end_matches('/'),
                        carrier.name
                    ),
                );
            }
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{sid}:{token}"));
            (
                vec![
                    (
                        "content-type".to_string(),
                        "application/x-www-form-urlencoded".to_string(),
                    ),
                    ("authorization".to_string(), format!("Basic {auth}")),
                ],
                form.finish().into_bytes(),
            )
        }
        HttpSmsDialect::Json => {
            let body = json!({"id": message.id, "from": from, "to": to, "text": message.text})
                .to_string()
                .into_bytes();
            let t = now_ms() / 1000;
            let sig = plugboard_engine::webhooks::signature(&secret, t, &body);
            (
                vec![
                    ("content-type".to_string(), "application/json".to_string()),
                    (
                        "x-plugboard-signature".to_string(),
                        format!("t={t},v1={sig}"),
                    ),
                ],
                body,
            )
        }
    };
    let origin =
        Origin::of_url(&api.send_url).map_err(|e| DeliveryError::Permanent(e.to_string()))?;
    let grant = HttpGrant {
        allow: vec![origin.to_string()],
        timeout_ms: Some(15_000),
        max_response_bytes: Some(64 * 1024),
        ..HttpGrant::default()
    };
    let req = FetchRequest {
        method: "POST",
        url: api.send_url.clone(),
        headers,
        body,
        timeout_ms: Some(15_000),
    };
    let r = engine
        .fetcher()
        .send(tenant, &grant, req)
        .await
        .map_err(|e| DeliveryError::Retry(format!("{}: {e}", carrier.name)))?;
    let answer: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    let why = || {
        let m = answer["message"]
            .as_str()
            .or(answer["error"].as_str())
            .unwrap_or("");
        format!("the carrier answered {}: {m}", r.status)
    };
    match r.status {
        200..=299 => {
            let id = answer["sid"]
                .as_str()
                .or(answer["id"].as_str())
                .map(str::to_string);
            let mut d = Delivered {
                external_id: id,
                ..Delivered::default()
            };
            d.meta.insert("carrier".into(), carrier.name.clone());
            Ok(d)
        }
        408 | 425 | 429 | 500..=599 => Err(DeliveryError::Retry(why())),
        _ => Err(DeliveryError::Permanent(why())),
    }
}

/// A webhook's outcome as the carrier should see it.
struct Answer(StatusCode, Option<HttpSmsDialect>, String);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match (self.0.is_success(), self.1) {
            // Twilio wants TwiML: an empty response sends nothing back
            // (replies go through the Messages API).
            (true, Some(HttpSmsDialect::Twilio)) => (
                self.0,
                [(header::CONTENT_TYPE, "text/xml")],
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>",
            )
                .into_response(),
            (true, _) => {
                (self.0, [(header::CONTENT_TYPE, "application/json")], self.2).into_response()
            }
            (false, _) => {
                let mut r = (
                    self.0,
                    [(header::CONTENT_TYPE, "application/json")],
                    json!({"error": self.2}).to_string(),
                )
                    .into_response();
                if self.0 == StatusCode::TOO_MANY_REQUESTS {
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                }
                r
            }
        }
    }
}

fn fail(code: StatusCode, why: impl Into<String>) -> Answer {
    Answer(code, None, why.into())
}

/// A failure of ours (the store): the carrier tries again later.
fn unavailable(tenant: &str, e: EngineError) -> Answer {
    tracing::warn!("SMS webhook of {tenant}: {e}");
    fail(StatusCode::SERVICE_UNAVAILABLE, "try again later")
}

/// The webhook's fields, once its signature is checked.
async fn verified(
    engine: &Engine,
    tenant: &str,
    name: &str,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    body: &[u8],
) -> Result<(HttpSmsDialect, Vec<(String, String)>), Answer> {
    // Twilio signs the path with its query.
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
    // Unknown tenants and carriers look alike: nothing to learn here.
    let unknown = || fail(StatusCode::NOT_FOUND, "no such carrier");
    let carrier = engine
        .sms_carrier(tenant, name)
        .await
        .map_err(|_| unknown())?;
    let api = carrier.http.clone().ok_or_else(unknown)?;
    let secret = engine
        .sms_carrier_secret(tenant, &carrier)
        .await
        .map_err(|_| {
            fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "the carrier's secret is missing",
            )
        })?;
    let bad = || fail(StatusCode::FORBIDDEN, "bad signature");
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    match api.dialect {
        HttpSmsDialect::Twilio => {
            // No usable token: nothing can be verified, so nothing is taken.
            let (_, token) = twilio_credentials(&secret).ok_or_else(bad)?;
            let fields: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
            let base = match &api.public_url {
                Some(b) => b.trim_end_matches('/').to_string(),
                None => format!("http://{}", header("host").unwrap_or("")),
            };
            let mut sorted = fields.clone();
            sorted.sort();
            let mut mac = Hmac::<Sha1>::new_from_slice(token.as_bytes()).map_err(|_| bad())?;
            mac.update(base.as_bytes());
            mac.update(path.as_bytes());
            for (k, v) in &sorted {
                mac.update(k.as_bytes());
                mac.update(v.as_bytes());
            }
            let given = header("x-twilio-signature")
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .ok_or_else(bad)?;
            mac.verify_slice(&given).map_err(|_| bad())?;
            Ok((HttpSmsDialect::Twilio, fields))
        }
        HttpSmsDialect::Json => {
            let sig = header("x-plugboard-signature").ok_or_else(bad)?;
            let mut t = None;
            let mut v1 = None;
            for part in sig.split(',') {
                match part.trim().split_once('=') {
                    Some(("t", x)) => t = x.parse::<u64>().ok(),
                    Some(("v1", x)) => v1 = hex::decode(x).ok(),
                    _ => {}
                }
            }
            let (t, v1) = t.zip(v1).ok_or_else(bad)?;
            if (now_ms() / 1000).abs_diff(t) > SIGNATURE_SKEW {
                return Err(bad());
            }
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| bad())?;
            mac.update(t.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            mac.verify_slice(&v1).map_err(|_| bad())?;
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| fail(StatusCode::BAD_REQUEST, format!("not JSON: {e}")))?;
            let fields = v
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            Ok((HttpSmsDialect::Json, fields))
        }
    }
}

fn field<'a>(fields: &'a [(String, String)], names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| fields.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str()))
}

async fn inbound(
    State(engine): State<Arc<Engine>>,
    Path((tenant, name)): Path<(String, String)>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> Answer {
    let (dialect, fields) = match verified(&engine, &tenant, &name, &headers, &uri, &body).await {
        Ok(v) => v,
        Err(a) => return a,
    };
    let (Some(from), Some(to)) = (
        field(&fields, &["From", "from"]),
        field(&fields, &["To", "to"]),
    ) else {
        return fail(StatusCode::BAD_REQUEST, "from and to are required");
    };
    let (from, to) = (normalize_address(from), normalize_address(to));
    let mut inbound = Inbound {
        channel: Channel::Sms,
        tenant: Some(tenant.clone()),
        from: from.clone(),
        to: to.clone(),
        text: field(&fields, &["Body", "text"]).unwrap_or("").to_string(),
        client_id: field(&fields, &["MessageSid", "id"]).map(str::to_string),
        thread: vec![format!("{from}\n{to}")],
        ..Inbound::default()
    };
    inbound.external_id = inbound.client_id.clone();
    inbound.meta.insert("carrier".into(), name.clone());
    // The tenant's record brings its current limits. Twilio does not
    // send an inbound message again after a 4xx: its messages are taken
    // whatever the rate (and still counted in the usage).
    if let Err(e) = engine.tenant(&tenant).await {
        return unavailable(&tenant, e);
    }
    if dialect != HttpSmsDialect::Twilio
        && let Err(r) = engine.capacity().admit_message(&tenant, "sms")
    {
        engine.capacity_refused(&tenant, "sms", &r, json!({"from": from, "to": to}));
        return fail(StatusCode::TOO_MANY_REQUESTS, r.to_string());
    }
    match engine.receive(inbound).await {
        Ok(r) => Answer(
            StatusCode::OK,
            Some(dialect),
            json!({"id": r.message.id, "duplicate": r.duplicate}).to_string(),
        ),
        Err(EngineError::Core(CoreError::NotFound(_))) => fail(
            StatusCode::NOT_FOUND,
            format!("{to} is not the tenant's SMS number"),
        ),
        Err(EngineError::Core(CoreError::Invalid(why))) => fail(StatusCode::BAD_REQUEST, why),
        Err(e) => unavailable(&tenant, e),
    }
}

async fn status(
    State(engine): State<Arc<Engine>>,
    Path((tenant, name)): Path<(String, String)>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> Answer {
    let (dialect, fields) = match verified(&engine, &tenant, &name, &headers, &uri, &body).await {
        Ok(v) => v,
        Err(a) => return a,
    };
    let Some(id) = field(&fields, &["MessageSid", "id"]) else {
        return fail(StatusCode::BAD_REQUEST, "the message id is required");
    };
    let st = field(&fields, &["MessageStatus", "status"]).unwrap_or("");
    let error = field(&fields, &["ErrorCode", "error"])
        .filter(|e| !e.is_empty())
        .map(|e| format!("{st} (error {e})"));
    let status = match st {
        "delivered" => MessageStatus::Delivered,
        "read" => MessageStatus::Read,
        "failed" | "undelivered" => MessageStatus::Failed,
        // queued, sending, sent, accepted…: nothing new.
        _ => return Answer(StatusCode::OK, Some(dialect), "{}".into()),
    };
    let error = error.or_else(|| (status == MessageStatus::Failed).then(|| st.to_string()));
    match engine
        .message_by_external_id(&tenant, Channel::Sms, id)
        .await
    {
        Ok(Some(m)) => match engine.message_status(&tenant, &m.id, status, error).await {
            Ok(m) => Answer(
                StatusCode::OK,
                Some(dialect),
                json!({"id": m.id, "status": m.status}).to_string(),
            ),
            Err(e) => unavailable(&tenant, e),
        },
        // Not recorded yet (the send's answer is being written): the
        // carrier tries again.
        Ok(None) => fail(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("message {id} is not known yet"),
        ),
        Err(e) => unavailable(&tenant, e),
    }
}
