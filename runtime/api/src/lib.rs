//! Plugboard's HTTP API v1 (axum on hyper): an adapter over the
//! application core ([`plugboard_engine::Engine`]) for tenants, plugins,
//! grants, configs, addresses, flow simulation, interaction records, the
//! WebSocket event stream, Prometheus metrics and the OpenAPI document.
//!
//! Auth is `Authorization: Bearer <token>`, checked by two extractors
//! before a handler runs: [`Admin`] (the operator's token) and
//! [`TenantScope`] (the admin token, or the API key of the tenant named by
//! the path's `{t}`; anything else is 403). A failing store during the
//! check denies. Errors are JSON: `{"error":{"code","message"}}`.

pub mod console;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, RawPathParams, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use plugboard_core::{
    Address, Channel, Error as CoreError, Event, Grants, Interaction, Tenant, TenantLimits, now_ms,
};
use plugboard_engine::acd::AcdRole;
use plugboard_engine::privacy::{Erasure, ErasureTarget, Retention};
use plugboard_engine::usage::{Granularity, UsageRow};
use plugboard_engine::{Engine, EngineError, SimulateRequest, StreamEvent};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::broadcast;

/// An API error: HTTP status, stable code, human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<Value>,
    /// Seconds for `Retry-After` (429, 503).
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with this status, stable code and message (for the routes
    /// other crates add to the API).
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
            retry_after: None,
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_json", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid", m),
            CoreError::NotFound(m) => ApiError::not_found(format!("{m} not found")),
            CoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            CoreError::Storage(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", m),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        let (status, code) = match e {
            EngineError::Core(c) => return c.into(),
            EngineError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            EngineError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            EngineError::InvalidPlugin(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_plugin"),
            EngineError::PluginLoad(_) => (StatusCode::INTERNAL_SERVER_ERROR, "plugin_load"),
            EngineError::NotAFlow { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "not_a_flow"),
            EngineError::InvalidFlow { node, reason, .. } => {
                let mut err =
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_flow", message);
                err.extra = Some(json!({"node": node, "reason": reason}));
                return err;
            }
            EngineError::FlowGraphMissing => {
                (StatusCode::SERVICE_UNAVAILABLE, "flow_graph_missing")
            }
            EngineError::NotADocument(_) => (StatusCode::CONFLICT, "not_a_document"),
            EngineError::Random(_) => (StatusCode::INTERNAL_SERVER_ERROR, "random"),
            EngineError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            EngineError::OverLimit(r) => {
                let mut err = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "over_limit", message);
                err.retry_after = Some(r.retry_after_s());
                err.extra = Some(json!({"limit": r.code()}));
                return err;
            }
        };
        ApiError::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let (Some(Value::Object(extra)), Some(obj)) = (self.extra, body.as_object_mut()) {
            obj.extend(extra);
        }
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(s));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Extractor: the request carries the operator's (admin) token.
pub struct Admin;

impl FromRequestParts<Arc<Engine>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, e: &Arc<Engine>) -> ApiResult<Self> {
        e.require_admin(bearer(&parts.headers)).await?;
        Ok(Admin)
    }
}

/// The tenant named by the path's `{t}`.
async fn path_tenant(parts: &mut Parts, e: &Arc<Engine>) -> ApiResult<String> {
    let params = RawPathParams::from_request_parts(parts, e)
        .await
        .map_err(|r| ApiError::bad_request(r.body_text()))?;
    params
        .iter()
        .find(|(k, _)| *k == "t")
        .map(|(_, v)| v.to_string())
        .ok_or_else(|| ApiError::not_found("no tenant in the path"))
}

/// Extractor: the request's token reaches the tenant named by the path's
/// `{t}` (the admin token, or that tenant's API key), and the tenant
/// exists. Holds the tenant's record.
pub struct TenantScope(pub Tenant);

impl FromRequestParts<Arc<Engine>> for TenantScope {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, e: &Arc<Engine>) -> ApiResult<Self> {
        let tenant = path_tenant(parts, e).await?;
        Ok(TenantScope(
            e.tenant_access(bearer(&parts.headers), &tenant).await?,
        ))
    }
}

/// Extractor: the request's token reaches the ACD of the tenant named by
/// the path's `{t}`, in a role: the tenant's API key (or the operator), a
/// supervisor's token or an agent's token (see [`AcdRole`]).
pub struct AcdScope(pub Tenant, pub AcdRole);

impl FromRequestParts<Arc<Engine>> for AcdScope {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, e: &Arc<Engine>) -> ApiResult<Self> {
        let tenant = path_tenant(parts, e).await?;
        let (t, role) = e.acd_access(bearer(&parts.headers), &tenant).await?;
        Ok(AcdScope(t, role))
    }
}

/// 403 unless `allowed`.
fn allow(allowed: bool, why: &'static str) -> ApiResult<()> {
    if allowed {
        Ok(())
    } else {
        Err(EngineError::Forbidden(why).into())
    }
}

const SUPERVISORS_ONLY: &str = "a supervisor's token or the tenant's API key is required";
const OWN_ONLY: &str = "an agent's token reaches only that agent's own presence and tasks";

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_json(format!("invalid JSON body: {e}")))
}

/// The API's routes.
pub fn router(state: Arc<Engine>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .route("/v1/tenants", post(create_tenant).get(list_tenants))
        .route("/v1/settings", get(get_settings))
        .route("/v1/tenants/{t}", get(get_tenant))
        .route("/v1/tenants/{t}/limits", put(set_limits).get(get_limits))
        .route("/v1/tenants/{t}/usage", get(tenant_usage))
        .route("/v1/usage", get(operator_usage))
        .route("/v1/backup", get(backup))
        .route("/v1/tenants/{t}/me", get(who_am_i))
        .route(
            "/v1/tenants/{t}/kv/{*key}",
            get(kv_get).put(kv_set).delete(kv_delete),
        )
        .route("/v1/tenants/{t}/plugins", get(list_plugins))
        .route(
            "/v1/tenants/{t}/plugins/{name}",
            put(deploy_plugin)
                .get(get_plugin)
                .layer(DefaultBodyLimit::max(64 << 20)),
        )
        .route("/v1/tenants/{t}/plugins/{name}/rollback", post(rollback))
        .route(
            "/v1/tenants/{t}/plugins/{name}/grants",
            put(set_grants).get(get_grants),
        )
        .route(
            "/v1/tenants/{t}/plugins/{name}/config",
            put(set_config).get(get_config),
        )
        .route("/v1/tenants/{t}/addresses", get(list_addresses))
        .route(
            "/v1/tenants/{t}/addresses/{address}",
            put(set_address).get(get_address),
        )
        .route(
            "/v1/tenants/{t}/flows/{name}",
            post(deploy_flow).put(deploy_flow).get(get_flow),
        )
        .route("/v1/tenants/{t}/flows/{name}/simulate", post(simulate))
        .route("/v1/tenants/{t}/interactions", get(list_interactions))
        .route("/v1/tenants/{t}/interactions/{id}", get(get_interaction))
        .route(
            "/v1/tenants/{t}/interactions/{id}/messages",
            get(list_messages).post(post_message),
        )
        .route(
            "/v1/tenants/{t}/interactions/{id}/close",
            post(close_conversation),
        )
        .route(
            "/v1/tenants/{t}/interactions/{id}/typing",
            post(post_typing),
        )
        .route(
            "/v1/tenants/{t}/faxes",
            post(post_fax).layer(DefaultBodyLimit::max(48 << 20)),
        )
        .route("/v1/tenants/{t}/messages/{id}", get(get_message))
        .route("/v1/tenants/{t}/messages/{id}/read", post(read_message))
        .route(
            "/v1/tenants/{t}/messages/{id}/attachments/{n}",
            get(get_attachment),
        )
        .route(
            "/v1/tenants/{t}/chat-widgets/{address}",
            put(set_chat_widget).get(get_chat_widget),
        )
        .route("/v1/tenants/{t}/sms-carriers", get(list_sms_carriers))
        .route(
            "/v1/tenants/{t}/sms-carriers/{name}",
            put(set_sms_carrier)
                .get(get_sms_carrier)
                .delete(delete_sms_carrier),
        )
        .route("/v1/tenants/{t}/blobs/{id}", get(get_blob))
        .route(
            "/v1/tenants/{t}/customers",
            get(find_customer).delete(erase_by_address),
        )
        .route(
            "/v1/tenants/{t}/customers/{id}",
            get(get_customer).delete(erase_customer),
        )
        .route("/v1/tenants/{t}/erasures", get(list_erasures))
        .route(
            "/v1/tenants/{t}/retention",
            put(set_retention).get(get_retention),
        )
        .route("/v1/retention/run", post(run_retention))
        .route("/v1/store/compact", post(compact_store))
        .route(
            "/v1/tenants/{t}/customers/{id}/addresses",
            post(add_customer_address),
        )
        .route("/v1/tenants/{t}/customers/{id}/merge", post(merge_customer))
        .route(
            "/v1/tenants/{t}/email-domains/{domain}",
            put(set_email_domain),
        )
        .route("/v1/tenants/{t}/webhooks", get(list_webhooks))
        .route(
            "/v1/tenants/{t}/webhooks/{name}",
            put(set_webhook).delete(delete_webhook),
        )
        .route("/v1/tenants/{t}/events", get(events))
        .route("/v1/events", get(operator_events))
        .route("/v1/tenants/{t}/recordings/{id}", get(get_recording))
        .route("/v1/tenants/{t}/sip-users", get(list_sip_users))
        .route("/v1/tenants/{t}/trunks", get(list_trunks))
        .route("/v1/tenants/{t}/queues", get(list_queues))
        .route("/v1/tenants/{t}/queues/{q}", put(set_queue))
        .route("/v1/tenants/{t}/queues/{q}/stats", get(queue_stats))
        .route("/v1/tenants/{t}/agents", get(list_agents))
        .route("/v1/tenants/{t}/agents/{a}", put(set_agent).get(get_agent))
        .route("/v1/tenants/{t}/agents/{a}/presence", put(set_presence))
        .route("/v1/tenants/{t}/agents/{a}/token", post(agent_token))
        .route("/v1/tenants/{t}/tasks", post(create_task).get(list_tasks))
        .route("/v1/tenants/{t}/callbacks", get(list_callbacks))
        .route("/v1/tenants/{t}/queue-events", get(list_queue_events))
        .route("/v1/tenants/{t}/reports/{of}", get(report))
        .route("/v1/tenants/{t}/tasks/{id}", get(get_task))
        .route(
            "/v1/tenants/{t}/tasks/{id}/{action}",
            post(task_action).get(task_detail),
        )
        .route("/v1/tenants/{t}/secrets", get(list_secrets))
        .route(
            "/v1/tenants/{t}/secrets/{name}",
            put(set_secret).delete(delete_secret),
        )
        .route("/v1/tenants/{t}/trunks/{name}", put(set_trunk))
        .route("/v1/tenants/{t}/sip-users/{user}", put(set_sip_user))
        .fallback(|| async { ApiError::not_found("no such path") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this path",
            )
        })
        .with_state(state)
}

async fn metrics_text(State(s): State<Arc<Engine>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics_text(),
    )
        .into_response()
}

/// 200 when the node can take traffic; 503 with the reason when it is
/// stopping or its store does not answer.
async fn readyz(State(s): State<Arc<Engine>>) -> Response {
    match s.readiness().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": why})),
        )
            .into_response(),
    }
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    time_zone: Option<String>,
}

async fn create_tenant(State(s): State<Arc<Engine>>, _: Admin, body: Bytes) -> ApiResult<Response> {
    let req: NewTenant = parse_json(&body)?;
    let (tenant, key) = s.create_tenant(req.id, req.name, req.time_zone).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": tenant.id, "name": tenant.name, "api_key": key})),
    )
        .into_response())
}

async fn list_tenants(State(s): State<Arc<Engine>>, _: Admin) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"tenants": s.tenants().await?})))
}

/// The server's effective settings (flags, config file and defaults
/// merged), for the operator; secrets are never part of them.
async fn get_settings(State(s): State<Arc<Engine>>, _: Admin) -> ApiResult<Json<Value>> {
    Ok(Json(s.settings().clone()))
}

async fn get_tenant(TenantScope(t): TenantScope) -> ApiResult<Json<Tenant>> {
    Ok(Json(t))
}

/// A JSON object body laid over defaults (fields left out keep them).
fn over_defaults<T: serde::Serialize + serde::de::DeserializeOwned>(
    defaults: T,
    body: &Bytes,
) -> ApiResult<T> {
    let mut base = serde_json::to_value(defaults).unwrap_or_default();
    let given: Value = parse_json(body)?;
    let Some(given) = given.as_object() else {
        return Err(ApiError::bad_json(
            "the body must be a JSON object".to_string(),
        ));
    };
    if let Some(b) = base.as_object_mut() {
        for (k, v) in given {
            b.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(base).map_err(|e| ApiError::bad_json(format!("invalid body: {e}")))
}

async fn set_queue(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, q)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<plugboard_acd::QueueConfig>> {
    let mut queue = over_defaults(plugboard_acd::QueueConfig::new(&q), &body)?;
    queue.id = q;
    Ok(Json(s.set_queue(&t.id, queue).await?))
}

async fn list_queues(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
) -> ApiResult<Json<Value>> {
    allow(role.sees_all(), SUPERVISORS_ONLY)?;
    Ok(Json(json!({"queues": s.queues(&t.id).await?})))
}

async fn queue_stats(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, q)): Path<(String, String)>,
) -> ApiResult<Json<plugboard_acd::QueueStats>> {
    allow(role.sees_all(), SUPERVISORS_ONLY)?;
    Ok(Json(s.queue_stats(&t.id, &q).await?))
}

async fn set_agent(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, a)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<plugboard_engine::acd::AgentRecord>> {
    let defaults = plugboard_engine::acd::AgentRecord {
        config: plugboard_acd::AgentConfig {
            id: a.clone(),
            skills: Default::default(),
            capacity: [(plugboard_core::Channel::Voice, 1)].into_iter().collect(),
            queues: None,
        },
        sip_user: None,
    };
    let mut agent = over_defaults(defaults, &body)?;
    agent.config.id = a;
    Ok(Json(s.set_agent(&t.id, agent).await?))
}

async fn list_agents(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
) -> ApiResult<Json<Value>> {
    allow(role.sees_all(), SUPERVISORS_ONLY)?;
    Ok(Json(json!({"agents": s.agents(&t.id).await?})))
}

async fn get_agent(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, a)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    allow(role.may_act_for(&a), OWN_ONLY)?;
    Ok(Json(s.agent(&t.id, &a).await?))
}

/// `POST /v1/tenants/{t}/agents/{a}/token` with `{"role": "agent" |
/// "supervisor"}` (tenant API key only): a new token for the agent, shown
/// once; their earlier one stops working.
async fn agent_token(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, a)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(default)]
        role: plugboard_engine::acd::Role,
    }
    let b: Body = if body.is_empty() {
        Body {
            role: Default::default(),
        }
    } else {
        parse_json(&body)?
    };
    let token = s.issue_agent_token(&t.id, &a, b.role).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"agent": a, "role": b.role, "token": token})),
    ))
}

async fn set_presence(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, a)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    allow(role.may_act_for(&a), OWN_ONLY)?;
    let presence: plugboard_acd::Presence = parse_json(&body)?;
    s.set_presence(&t.id, &a, presence).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/tenants/{t}/tasks`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTask {
    #[serde(default)]
    id: Option<String>,
    queue: String,
    #[serde(default)]
    channel: plugboard_core::Channel,
    #[serde(default)]
    priority: u32,
    #[serde(default)]
    skills: Vec<String>,
    #[serde(default)]
    agent: Option<String>,
}

async fn create_task(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<plugboard_engine::acd::TaskView>)> {
    let n: NewTask = parse_json(&body)?;
    let id = match n.id {
        Some(id) => id,
        None => plugboard_engine::random_token("task-")?,
    };
    let view = s
        .create_task(
            &t.id,
            plugboard_acd::TaskSpec {
                id,
                queue: n.queue,
                channel: n.channel,
                priority: n.priority,
                skills: n.skills,
                agent: n.agent,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /v1/tenants/{t}/callbacks`: customers to call back, with their
/// attempts (tenant API key or a supervisor).
async fn list_callbacks(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
) -> ApiResult<Json<Value>> {
    allow(role.sees_all(), SUPERVISORS_ONLY)?;
    Ok(Json(json!({"callbacks": s.callbacks(&t.id).await?})))
}

/// `GET /v1/tenants/{t}/queue-events[?after=ID&limit=N&queue=Q&agent=A&task=T]`:
/// the stored queue events (offers, answers, abandons, transfers,
/// presence …) for the reports, oldest first; `next` continues after the
/// last. An agent reads only their own timeline.
async fn list_queue_events(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let agent = match &role {
        AcdRole::Agent(me) => {
            allow(q.get("agent").is_none_or(|a| a == me), OWN_ONLY)?;
            Some(me.clone())
        }
        _ => q.get("agent").cloned(),
    };
    let filter = plugboard_engine::acd::EventFilter {
        queue: q.get("queue").cloned(),
        agent,
        task: q.get("task").cloned(),
    };
    let limit = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(100);
    let after = q.get("after").map(String::as_str).unwrap_or("");
    let events = s.queue_events(&t.id, after, limit, &filter).await?;
    let next = events
        .last()
        .and_then(|e| e["id"].as_str())
        .map(str::to_string);
    Ok(Json(json!({"events": events, "next": next})))
}

/// `GET /v1/tenants/{t}/reports/{queues|agents}?from=MS&to=MS&interval=15m|1h|1d[&format=csv]`:
/// the historical report (supervisors and the tenant), computed from the
/// stored queue events. `from` defaults to the start of today (UTC), `to`
/// to now, `interval` to an hour; intervals are aligned in UTC.
async fn report(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, of)): Path<(String, String)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Response> {
    allow(role.sees_all(), SUPERVISORS_ONLY)?;
    if of != "queues" && of != "agents" {
        return Err(ApiError::not_found("no such report (queues, agents)"));
    }
    let now = now_ms();
    let ms = |k: &str, default: u64| -> ApiResult<u64> {
        q.get(k).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("{k} is ms since the Unix epoch")))
        })
    };
    let from = ms("from", now - now % 86_400_000)?;
    let to = ms("to", now + 1)?;
    let interval = match q.get("interval").map(String::as_str) {
        None | Some("1h") => 3_600_000,
        Some("15m") => 900_000,
        Some("1d") => 86_400_000,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "interval {other:?}: 15m, 1h or 1d"
            )));
        }
    };
    let r = s.report(&t.id, from, to, interval).await?;
    let rows = match of.as_str() {
        "queues" => serde_json::to_value(&r.queues),
        "agents" => serde_json::to_value(&r.agents),
        _ => return Err(ApiError::not_found("no such report (queues, agents)")),
    }
    .unwrap_or_default();
    if q.get("format").map(String::as_str) == Some("csv") {
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    &format!("attachment; filename=\"{of}-report.csv\"") as &str,
                ),
            ],
            csv(&rows),
        )
            .into_response());
    }
    Ok(
        Json(json!({"from_ms": from, "to_ms": to, "interval_ms": interval, "rows": rows}))
            .into_response(),
    )
}

/// Rows of JSON objects (of the same fields) as CSV with a header line;
/// a field with a comma, quote or line break is quoted.
fn csv(rows: &Value) -> String {
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    let Some(first) = rows.first().and_then(Value::as_object) else {
        return String::new();
    };
    let columns: Vec<&String> = first.keys().collect();
    let field = |v: &Value| {
        let text = match v {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if text.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", text.replace('"', "\"\""))
        } else {
            text
        }
    };
    let mut out = columns
        .iter()
        .map(|c| field(&json!(c)))
        .collect::<Vec<_>>()
        .join(",");
    out.push_str("\r\n");
    for row in rows {
        let line: Vec<String> = columns.iter().map(|c| field(&row[c.as_str()])).collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    out
}

/// `GET /v1/tenants/{t}/kv/{key}`: a value of the tenant's kv (the
/// plugins' store; a key may have slashes), as bytes.
async fn kv_get(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    let v = s
        .kv_get(&t.id, &key)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no kv key {key}")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], v).into_response())
}

/// `PUT /v1/tenants/{t}/kv/{key}`: the body is the value (64 KiB at
/// most).
async fn kv_set(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    s.kv_set(&t.id, &key, &body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/tenants/{t}/kv/{key}`.
async fn kv_delete(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, key)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.kv_delete(&t.id, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/tenants/{t}/me`: who the token is on this tenant (the
/// console signs in with it): `tenant` (the API key or the operator),
/// `supervisor` or `agent`, with the agent's id.
async fn who_am_i(AcdScope(t, role): AcdScope) -> Json<Value> {
    let (role, agent) = match role {
        AcdRole::Tenant => ("tenant", None),
        AcdRole::Supervisor(a) => ("supervisor", Some(a)),
        AcdRole::Agent(a) => ("agent", Some(a)),
    };
    Json(json!({"tenant": t.id, "name": t.name, "role": role, "agent": agent}))
}

/// `GET /v1/tenants/{t}/tasks[?agent=ID]`: an agent sees only theirs.
async fn list_tasks(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let agent = match &role {
        AcdRole::Agent(me) => Some(me.as_str()),
        _ => q.get("agent").map(String::as_str),
    };
    Ok(Json(json!({"tasks": s.tasks(&t.id, agent)})))
}

async fn get_task(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Json<plugboard_engine::acd::TaskView>> {
    let view = s.task(&t.id, &id)?;
    allow(
        role.sees_all() || view.agent.as_deref().is_some_and(|a| role.may_act_for(a)),
        OWN_ONLY,
    )?;
    Ok(Json(view))
}

/// `POST /v1/tenants/{t}/tasks/{id}/{accept|reject}` with `{"agent"}`,
/// or `{complete|abandon}`; `wrap-up` with `{"disposition", "notes"}`.
async fn task_action(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, id, action)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<Json<plugboard_engine::acd::TaskView>> {
    // An agent acts as themselves (the body's agent may be left out) and
    // only on a task offered to or connected with them; abandoning is for
    // the tenant's systems and supervisors.
    // (A wrap-up is also for the agent who had it last: the engine checks.)
    if let AcdRole::Agent(me) = &role
        && action != "wrap-up"
    {
        let view = s.task(&t.id, &id)?;
        allow(
            !matches!(action.as_str(), "abandon" | "monitor")
                && view.agent.as_deref() == Some(me.as_str()),
            OWN_ONLY,
        )?;
    }
    let agent = || -> ApiResult<String> {
        if let AcdRole::Agent(me) = &role {
            let v: Value = if body.is_empty() {
                json!({})
            } else {
                parse_json(&body)?
            };
            allow(v["agent"].is_null() || v["agent"] == me.as_str(), OWN_ONLY)?;
            return Ok(me.clone());
        }
        let v: Value = parse_json(&body)?;
        v["agent"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ApiError::bad_json("{\"agent\"} is required".to_string()))
    };
    let view = match action.as_str() {
        "accept" => s.accept_task(&t.id, &id, &agent()?).await?,
        "reject" => s.reject_task(&t.id, &id, &agent()?).await?,
        "complete" => s.complete_task(&t.id, &id).await?,
        "wrap-up" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct WrapUp {
                #[serde(default)]
                disposition: Option<String>,
                #[serde(default)]
                notes: Option<String>,
            }
            let w: WrapUp = parse_json(&body)?;
            let by = match &role {
                AcdRole::Agent(me) => Some(me.as_str()),
                _ => None,
            };
            s.wrap_up(&t.id, &id, by, w.disposition, w.notes).await?;
            s.task(&t.id, &id)?
        }
        "transfer" => {
            let v: Value = parse_json(&body)?;
            let to = v["to"].as_str().ok_or_else(|| {
                ApiError::bad_json(
                    "{\"to\": \"queue:NAME\" | \"agent:ID\" | number | SIP URI} is required"
                        .to_string(),
                )
            })?;
            if v["warm"].as_bool() == Some(true) {
                s.consult_task(&t.id, &id, to).await?
            } else {
                s.transfer_task(&t.id, &id, to).await?
            }
        }
        "complete-transfer" => s.end_consult(&t.id, &id, true).await?,
        "pause-recording" => s.pause_recording(&t.id, &id, true).await?,
        "resume-recording" => s.pause_recording(&t.id, &id, false).await?,
        "cancel-transfer" => s.end_consult(&t.id, &id, false).await?,
        "monitor" => {
            let v: Value = parse_json(&body)?;
            let mode = match v["mode"].as_str() {
                Some("stop") => None,
                Some(m) => Some(
                    serde_json::from_value::<plugboard_core::MonitorMode>(json!(m)).map_err(
                        |_| {
                            ApiError::bad_json(format!(
                                "mode {m:?}: listen, whisper, barge or stop"
                            ))
                        },
                    )?,
                ),
                None => {
                    return Err(ApiError::bad_json(
                        "{\"mode\": \"listen\" | \"whisper\" | \"barge\" | \"stop\"} is required"
                            .to_string(),
                    ));
                }
            };
            // A supervisor joins from their own phone; the tenant's key
            // names the supervisor.
            let supervisor = match (&role, v["supervisor"].as_str()) {
                (AcdRole::Supervisor(me), None) => me.clone(),
                (AcdRole::Supervisor(me), Some(x)) => {
                    allow(x == me, OWN_ONLY)?;
                    me.clone()
                }
                (AcdRole::Agent(_), _) => {
                    return Err(EngineError::Forbidden(SUPERVISORS_ONLY).into());
                }
                (AcdRole::Tenant, Some(x)) => x.to_string(),
                (AcdRole::Tenant, None) => {
                    return Err(ApiError::bad_json(
                        "{\"supervisor\": agent id} is required with the tenant's key".to_string(),
                    ));
                }
            };
            s.monitor_task(&t.id, &id, &supervisor, mode).await?
        }
        "abandon" => s.abandon_task(&t.id, &id).await?,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no task action {other:?} (accept, reject, complete, transfer, \
                     complete-transfer, cancel-transfer, monitor, pause-recording, \
                     resume-recording, abandon)"
                ),
            ));
        }
    };
    Ok(Json(view))
}

/// `GET /v1/tenants/{t}/tasks/{id}/interaction`: the task's interaction
/// (the customer's attributes and timeline); `…/screen`: the screen pop
/// ([`Engine::screen`]: attributes, messages, the customer's history on
/// every channel, the CRM profile). For the agent the task is offered to
/// or connected with, a supervisor or the tenant.
async fn task_detail(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, id, what)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    if what != "interaction" && what != "screen" {
        return Err(ApiError::not_found(
            "no such task resource (interaction, screen)",
        ));
    }
    let view = s.task(&t.id, &id)?;
    allow(
        role.sees_all() || view.agent.as_deref().is_some_and(|a| role.may_act_for(a)),
        OWN_ONLY,
    )?;
    if what == "screen" {
        return Ok(Json(s.screen(&t.id, &id).await?));
    }
    let mut ix = s.interaction(&t.id, &id).await?;
    // Who listens in is not the agent's to know.
    if matches!(role, AcdRole::Agent(_)) {
        ix.timeline
            .retain(|e| e.kind != plugboard_core::EntryKind::Monitor);
    }
    Ok(Json(serde_json::to_value(ix).unwrap_or_default()))
}

/// `PUT /v1/tenants/{t}/secrets/{name}` with `{"value": "..."}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    value: String,
}

async fn set_secret(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let b: SecretBody = parse_json(&body)?;
    s.set_secret(&t.id, &name, &b.value).await?;
    // The value is never returned.
    Ok(Json(json!({"name": name})))
}

async fn list_secrets(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"secrets": s.secret_names(&t.id).await?})))
}

async fn delete_secret(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.delete_secret(&t.id, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_limits(
    State(s): State<Arc<Engine>>,
    _: Admin,
    TenantScope(t): TenantScope,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let limits: TenantLimits = parse_json(&body)?;
    Ok(Json(s.set_limits(&t.id, limits).await?))
}

async fn get_limits(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.limits_view(&t).await?))
}

/// The period and cut of a usage request: `from` and `to` as ms since
/// the epoch or RFC 3339 times (default: this UTC month so far),
/// `granularity` hour, day (default) or total, `format` json or csv.
fn usage_query(
    q: &std::collections::HashMap<String, String>,
) -> ApiResult<(u64, u64, Granularity, bool)> {
    let now = now_ms();
    let time = |k: &str, default: u64| -> ApiResult<u64> {
        let Some(v) = q.get(k) else {
            return Ok(default);
        };
        if let Ok(ms) = v.parse::<u64>() {
            return Ok(ms);
        }
        v.parse::<jiff::Timestamp>()
            .ok()
            .and_then(|t| u64::try_from(t.as_millisecond()).ok())
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{k} is ms since the Unix epoch or an RFC 3339 time"
                ))
            })
    };
    let month_start = jiff::Timestamp::from_millisecond(now as i64)
        .ok()
        .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC))
        .and_then(|z| z.first_of_month().ok()?.start_of_day().ok())
        .and_then(|z| u64::try_from(z.timestamp().as_millisecond()).ok())
        .unwrap_or(now - now % 86_400_000);
    let from = time("from", month_start)?;
    let to = time("to", now + 1)?;
    let granularity = q
        .get("granularity")
        .map_or(Ok(Granularity::Day), |g| g.parse())?;
    let csv = match q.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format {other:?}: json or csv"
            )));
        }
    };
    Ok((from, to, granularity, csv))
}

fn usage_answer(from: u64, to: u64, rows: Vec<UsageRow>, csv: bool) -> Response {
    if csv {
        let mut out = plugboard_engine::usage::CSV_HEADER.to_string();
        for r in &rows {
            r.csv(&mut out);
        }
        return ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response();
    }
    Json(json!({"from_ms": from, "to_ms": to, "rows": rows})).into_response()
}

async fn tenant_usage(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Response> {
    let (from, to, granularity, csv) = usage_query(&q)?;
    let rows = s.usage(&t.id, from, to, granularity).await?;
    Ok(usage_answer(from, to, rows, csv))
}

async fn operator_usage(
    State(s): State<Arc<Engine>>,
    _: Admin,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Response> {
    let (from, to, granularity, csv) = usage_query(&q)?;
    let rows = s.usage_all(from, to, granularity).await?;
    Ok(usage_answer(from, to, rows, csv))
}

/// A consistent copy of the embedded store, streamed as it is made
/// (`plugboard restore` brings it back). The admin only.
async fn backup(State(s): State<Arc<Engine>>, _: Admin) -> ApiResult<Response> {
    let mut rx = s.backup();
    // A store that cannot (PostgreSQL: 400), a backup already being made
    // (409), a copy that failed (500): said before any byte.
    let first = match rx.recv().await {
        Some(Ok(chunk)) => chunk,
        Some(Err(e)) => return Err(EngineError::Core(e).into()),
        None => {
            return Err(EngineError::Internal("the backup stopped".into()).into());
        }
    };
    let rest = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| {
            let item = item
                .map(Bytes::from)
                .map_err(|e| std::io::Error::other(e.to_string()));
            (item, rx)
        })
    });
    let body = futures_util::StreamExt::chain(
        futures_util::stream::once(async move { Ok(Bytes::from(first)) }),
        rest,
    );
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

async fn list_plugins(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"plugins": s.plugins(&t.id).await?})))
}

async fn get_plugin(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let p = s.plugin(&t.id, &name, "plugin").await?;
    Ok(Json(serde_json::to_value(p).unwrap_or_default()))
}

async fn deploy_plugin(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let v = s.deploy(&t.id, &name, body.as_ref().into(), None).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn deploy_flow(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let v = s.deploy_flow(&t.id, &name, &body).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VersionQuery {
    version: Option<u64>,
}

async fn get_flow(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    let (version, active, document) = s.flow_document(&t.id, &name, q.version).await?;
    Ok(Json(
        json!({"name": name, "version": version, "active_version": active, "document": document}),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackReq {
    version: Option<u64>,
}

async fn rollback(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let req: RollbackReq = if body.is_empty() {
        RollbackReq::default()
    } else {
        parse_json(&body)?
    };
    let v = s.rollback(&t.id, &name, req.version).await?;
    Ok(Json(json!({"name": name, "active_version": v})))
}

async fn set_grants(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Grants>> {
    let g: Grants = parse_json(&body)?;
    s.set_grants(&t.id, &name, &g).await?;
    Ok(Json(g))
}

async fn get_grants(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
) -> ApiResult<Json<Grants>> {
    Ok(Json(s.plugin(&t.id, &name, "plugin").await?.grants))
}

async fn set_config(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let v: Value = parse_json(&body)?;
    s.set_config(&t.id, &name, &v).await?;
    Ok(Json(v))
}

async fn get_config(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.config(&t.id, &name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddressReq {
    channel: Channel,
    flow: String,
}

async fn set_address(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, address)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Address>> {
    let req: AddressReq = parse_json(&body)?;
    Ok(Json(
        s.set_address(&t.id, &address, req.channel, req.flow)
            .await?,
    ))
}

async fn get_address(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, address)): Path<(String, String)>,
) -> ApiResult<Json<Address>> {
    Ok(Json(s.address(&t.id, &address).await?))
}

async fn list_addresses(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"addresses": s.addresses(&t.id).await?})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulateReq {
    #[serde(default)]
    channel: Channel,
    #[serde(default = "default_from")]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    events: Vec<Event>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    /// Pin the plugin's clock (ms since the epoch) for reproducible runs.
    #[serde(default)]
    now_ms: Option<u64>,
    /// Run this version instead of the active one.
    #[serde(default)]
    version: Option<u64>,
}

fn default_from() -> String {
    "simulator".into()
}

async fn simulate(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: SimulateReq = parse_json(&body)?;
    let out = s
        .simulate(
            &t.id,
            &name,
            SimulateRequest {
                channel: req.channel,
                from: req.from,
                to: req.to,
                events: req.events,
                attributes: req.attributes,
                now_ms: req.now_ms,
                version: req.version,
            },
        )
        .await?;
    let body = json!({"interaction": out.interaction, "flow": {"name": name, "version": out.version}, "steps": out.steps});
    match out.failure {
        None => Ok(Json(body).into_response()),
        Some(e) => {
            let mut err = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string());
            err.extra = Some(body);
            Err(err)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SipUserReq {
    password: String,
}

/// Creates or replaces a SIP user (an agent's phone) of the tenant; the
/// realm is the tenant id, and only digest hashes are stored.
async fn set_sip_user(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, user)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let req: SipUserReq = parse_json(&body)?;
    let valid_user = !user.is_empty()
        && user.len() <= 64
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c));
    if !valid_user {
        return Err(ApiError::bad_request(
            "user names are 1-64 of A-Z a-z 0-9 - _ . +",
        ));
    }
    if req.password.len() < 8 {
        return Err(ApiError::bad_request(
            "the password needs at least 8 characters",
        ));
    }
    use plugboard_sip::digest::{Algorithm, ha1};
    let t = t.id;
    let record = plugboard_core::SipUser {
        ha1_md5: ha1(Algorithm::Md5, &user, &t, &req.password),
        ha1_sha256: ha1(Algorithm::Sha256, &user, &t, &req.password),
        name: user.clone(),
        created_ms: now_ms(),
    };
    s.set_sip_user(&t, record).await?;
    Ok(Json(
        json!({"user": user, "realm": t, "aor": format!("sip:{user}@{t}")}),
    ))
}

/// Creates or replaces a carrier trunk of the tenant.
async fn set_trunk(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let mut trunk: plugboard_core::Trunk = parse_json(&body)?;
    trunk.name = name;
    s.set_trunk(&t.id, &trunk).await?;
    trunk.password = trunk.password.map(|_| "********".into());
    Ok(Json(serde_json::to_value(&trunk).unwrap_or_default()))
}

async fn list_trunks(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
) -> ApiResult<Json<Value>> {
    let trunks: Vec<Value> = s
        .trunks(&t.id)
        .await?
        .into_iter()
        .map(|mut tr| {
            let source = if s.configured_trunk(&t.id, &tr.name).is_some() {
                "config"
            } else {
                "api"
            };
            tr.password = tr.password.map(|_| "********".into());
            let mut v = serde_json::to_value(&tr).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("source".into(), source.into());
            }
            v
        })
        .collect();
    Ok(Json(json!({"trunks": trunks})))
}

async fn list_sip_users(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
) -> ApiResult<Json<Value>> {
    let t = t.id;
    let mut users = Vec::new();
    for u in s.sip_users(&t).await? {
        let registrations = s.bindings(&t, &u.name).await?;
        users.push(json!({"user": u.name, "aor": format!("sip:{}@{t}", u.name), "registrations": registrations}));
    }
    Ok(Json(json!({"sip_users": users})))
}

async fn get_recording(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let bytes = s.recording(&t.id, &id).await?;
    Ok(([(header::CONTENT_TYPE, "audio/wav")], bytes).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list_interactions(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    Ok(Json(
        json!({"interactions": s.interactions(&t.id, limit).await?}),
    ))
}

async fn get_interaction(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Json<Interaction>> {
    Ok(Json(s.interaction(&t.id, &id).await?))
}

/// An agent reaches a conversation's messages only while (or after) its
/// task is theirs; supervisors and the tenant's key reach every one.
fn may_see_conversation(s: &Engine, t: &str, role: &AcdRole, ix: &str) -> ApiResult<()> {
    match role {
        AcdRole::Agent(a) => allow(
            s.conversation_agent(t, ix).as_deref() == Some(a.as_str()),
            "an agent's token reaches only the conversations offered to that agent",
        ),
        _ => Ok(()),
    }
}

async fn list_messages(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    may_see_conversation(&s, &t.id, &role, &id)?;
    let messages = s.messages(&t.id, &id).await?;
    // An unknown id is 404, not an empty list. (A conversation's first
    // message is stored, and acknowledged, before its flow's worker writes
    // the interaction record: its messages are there already.)
    if messages.is_empty() {
        s.interaction(&t.id, &id).await?;
    }
    Ok(Json(json!({"messages": messages})))
}

/// `POST …/interactions/{id}/messages`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMessage {
    text: String,
    #[serde(default)]
    subject: Option<String>,
}

async fn post_message(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<plugboard_core::Message>)> {
    let m: NewMessage = parse_json(&body)?;
    let (author, must_hold) = match &role {
        AcdRole::Tenant => (plugboard_core::Author::Api, false),
        AcdRole::Supervisor(a) => (plugboard_core::Author::Agent { id: a.clone() }, false),
        AcdRole::Agent(a) => (plugboard_core::Author::Agent { id: a.clone() }, true),
    };
    let msg = s
        .reply(&t.id, &id, author, must_hold, m.text, m.subject)
        .await?;
    Ok((StatusCode::CREATED, Json(msg)))
}

/// `POST /v1/tenants/{t}/faxes` as JSON (a raw PDF or TIFF body — by
/// its type, or its first bytes — takes `from`, `to` and `name` from the
/// query).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewFax {
    /// The tenant's fax address it is sent from.
    #[serde(default)]
    from: String,
    /// The number called.
    #[serde(default)]
    to: String,
    /// The document, base64 (PDF or TIFF).
    #[serde(default)]
    document: Option<String>,
    /// The document's file name.
    #[serde(default)]
    name: Option<String>,
    /// Text set on a page, when there is no document; else kept with it.
    #[serde(default)]
    text: Option<String>,
}

/// Largest document faxed (bytes).
const MAX_FAX_DOCUMENT: usize = 32 << 20;

/// Sends a fax: the document is checked (rendered to fax pages: a PDF
/// or TIFF that cannot be read is refused here, with the reason), stored
/// with a new fax conversation, and queued in the outbox; the courier
/// calls the number through the tenant's trunk. `202` with the message
/// (its status follows on the event stream) and the page count.
async fn post_fax(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (fax, document) = if content_type.starts_with("application/pdf")
        || content_type.starts_with("image/tiff")
        || plugboard_fax::document::kind(&body).is_some()
    {
        let fax = NewFax {
            from: q.get("from").cloned().unwrap_or_default(),
            to: q.get("to").cloned().unwrap_or_default(),
            name: q.get("name").cloned(),
            ..NewFax::default()
        };
        (fax, Some(body.to_vec()))
    } else {
        use base64::Engine as _;
        let mut fax: NewFax = parse_json(&body)?;
        let document = match fax.document.take() {
            Some(b64) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| ApiError::bad_request(format!("document: not base64: {e}")))?,
            ),
            None => None,
        };
        (fax, document)
    };
    if !plugboard_core::is_phone_number(&fax.to) {
        return Err(ApiError::bad_request(
            "to: a fax goes to a phone number (digits, with an optional leading +)",
        ));
    }
    // Whose number it is is checked before any document is rendered.
    s.own_address(&t.id, plugboard_core::Channel::Fax, &fax.from)
        .await?;
    let mut files = Vec::new();
    let mut pages = None;
    if let Some(doc) = document {
        if doc.len() > MAX_FAX_DOCUMENT {
            return Err(ApiError::bad_request(format!(
                "the document is larger than {} MiB",
                MAX_FAX_DOCUMENT >> 20
            )));
        }
        let kind = plugboard_fax::document::kind(&doc).ok_or_else(|| {
            ApiError::bad_request("the document cannot be faxed: it is not a PDF or TIFF")
        })?;
        // A few renders at once per node: Ghostscript is the costly part.
        static RENDERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
        let _render = RENDERS
            .acquire()
            .await
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "fax", e.to_string()))?;
        let check = doc.clone();
        let n = tokio::task::spawn_blocking(move || {
            let out = std::env::temp_dir().join(format!(
                "plugboard-fax-check-{}.tif",
                plugboard_sip::random_token()
            ));
            let r = plugboard_fax::document::to_fax(
                &plugboard_fax::document::Tools::default(),
                &check,
                &out,
            );
            let _ = std::fs::remove_file(&out);
            r
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "fax", e.to_string()))?
        .map_err(|e| match e {
            plugboard_fax::FaxError::Document(why) => {
                ApiError::bad_request(format!("the document cannot be faxed: {why}"))
            }
            e => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "fax", e.to_string()),
        })?;
        let (ext, ct) = match kind {
            plugboard_fax::document::Kind::Pdf => ("pdf", "application/pdf"),
            plugboard_fax::document::Kind::Tiff => ("tif", "image/tiff"),
        };
        let name = fax
            .name
            .clone()
            .unwrap_or_else(|| format!("document.{ext}"));
        files.push((name, ct.to_string(), doc));
        pages = Some(n);
    }
    let text = match (fax.text, pages) {
        (Some(t), _) if !t.trim().is_empty() => t,
        (_, Some(n)) => format!("Fax of {n} page(s)"),
        _ => {
            return Err(ApiError::bad_request(
                "a fax needs a document (PDF or TIFF) or text",
            ));
        }
    };
    let m = s
        .start_conversation(
            &t.id,
            plugboard_engine::Outbound {
                channel: plugboard_core::Channel::Fax,
                from: fax.from,
                to: fax.to,
                text,
                files,
                ..plugboard_engine::Outbound::default()
            },
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"interaction": m.interaction, "message": m, "pages": pages})),
    ))
}

/// `POST …/interactions/{id}/typing`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Typing {
    #[serde(default = "yes")]
    on: bool,
}

fn yes() -> bool {
    true
}

fn role_author(role: &AcdRole) -> plugboard_core::Author {
    match role {
        AcdRole::Tenant => plugboard_core::Author::Api,
        AcdRole::Supervisor(a) | AcdRole::Agent(a) => {
            plugboard_core::Author::Agent { id: a.clone() }
        }
    }
}

/// An agent is typing in a conversation (the visitor's widget shows it).
async fn post_typing(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let typing: Typing = if body.is_empty() {
        Typing { on: true }
    } else {
        parse_json(&body)?
    };
    may_see_conversation(&s, &t.id, &role, &id)?;
    s.interaction(&t.id, &id).await?;
    s.typing(&t.id, &id, &role_author(&role), typing.on);
    Ok(StatusCode::NO_CONTENT)
}

/// An agent read a customer's message (the widget shows the receipt).
async fn read_message(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Json<plugboard_core::Message>> {
    let m = s.message(&t.id, &id).await?;
    may_see_conversation(&s, &t.id, &role, &m.interaction)?;
    if m.direction != plugboard_core::Direction::Inbound {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "only a customer's message is read by an agent",
        ));
    }
    Ok(Json(
        s.message_status(&t.id, &id, plugboard_core::MessageStatus::Read, None)
            .await?,
    ))
}

async fn set_chat_widget(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, address)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<plugboard_core::ChatWidget>> {
    let w: plugboard_core::ChatWidget = parse_json(&body)?;
    Ok(Json(s.set_chat_widget(&t.id, &address, w).await?))
}

async fn get_chat_widget(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, address)): Path<(String, String)>,
) -> ApiResult<Json<plugboard_core::ChatWidget>> {
    Ok(Json(s.chat_widget(&t.id, &address).await?))
}

/// A carrier as the API shows it: its settings and its link's state on
/// this server.
fn carrier_view(s: &Engine, tenant: &str, c: &plugboard_core::SmsCarrier) -> Value {
    let mut v = serde_json::to_value(c).unwrap_or_default();
    v["link"] = match c.http {
        Some(_) => json!({"state": "http"}),
        None => s.sms_link_state(tenant, &c.name),
    };
    v
}

async fn set_sms_carrier(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let mut c: plugboard_core::SmsCarrier = parse_json(&body)?;
    c.name = name;
    let c = s.set_sms_carrier(&t.id, c).await?;
    Ok(Json(carrier_view(&s, &t.id, &c)))
}

async fn get_sms_carrier(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let c = s.sms_carrier(&t.id, &name).await?;
    Ok(Json(carrier_view(&s, &t.id, &c)))
}

async fn list_sms_carriers(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
) -> ApiResult<Json<Value>> {
    let all = s.sms_carriers(&t.id).await?;
    Ok(Json(Value::Array(
        all.iter().map(|c| carrier_view(&s, &t.id, c)).collect(),
    )))
}

async fn delete_sms_carrier(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.delete_sms_carrier(&t.id, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_message(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Json<plugboard_core::Message>> {
    let m = s.message(&t.id, &id).await?;
    may_see_conversation(&s, &t.id, &role, &m.interaction)?;
    Ok(Json(m))
}

/// A message's file (the `n`th, from 0), to whoever may see the
/// conversation: an agent reaches the files of conversations offered to
/// them (a fax's PDF on the fax desk), as they reach its messages.
async fn get_attachment(
    State(s): State<Arc<Engine>>,
    AcdScope(t, role): AcdScope,
    Path((_, id, n)): Path<(String, String, usize)>,
) -> ApiResult<Response> {
    let m = s.message(&t.id, &id).await?;
    may_see_conversation(&s, &t.id, &role, &m.interaction)?;
    let a = m
        .attachments
        .get(n)
        .ok_or_else(|| ApiError::not_found(format!("message {id} has no file {n}")))?;
    let bytes = s.attachment(&t.id, &a.blob).await?;
    // Served as a download, never rendered (see `get_blob`); the name is
    // the sanitised one stored.
    let ascii: String = a
        .name
        .chars()
        .map(|c| {
            if (c.is_ascii_graphic() && c != '"' && c != '\\') || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let disposition = format!("attachment; filename=\"{ascii}\"");
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        bytes,
    )
        .into_response())
}

async fn get_blob(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let bytes = s.attachment(&t.id, &id).await?;
    // Served as a download, never rendered: a customer's file must not
    // run as a page of ours.
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CONTENT_DISPOSITION, "attachment"),
        ],
        bytes,
    )
        .into_response())
}

#[derive(Deserialize)]
struct CustomerQuery {
    channel: plugboard_core::Channel,
    address: String,
}

async fn find_customer(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Query(q): Query<CustomerQuery>,
) -> ApiResult<Json<plugboard_core::Customer>> {
    s.customer_by_address(&t.id, q.channel, &q.address)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no customer with {} address {}",
                q.channel, q.address
            ))
        })
}

async fn compact_store(State(s): State<Arc<Engine>>, _: Admin) -> ApiResult<Json<Value>> {
    let done = s.compact_store().await?;
    Ok(Json(json!({ "compacted": done })))
}

async fn close_conversation(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.close_conversation(&t.id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn erase_by_address(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Query(q): Query<CustomerQuery>,
) -> ApiResult<Json<Erasure>> {
    let target = ErasureTarget::Address(q.channel, q.address);
    Ok(Json(s.erase_customer(&t.id, target).await?))
}

async fn erase_customer(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Json<Erasure>> {
    let target = ErasureTarget::Customer(id);
    Ok(Json(s.erase_customer(&t.id, target).await?))
}

async fn list_erasures(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Vec<Erasure>>> {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    Ok(Json(s.erasures(&t.id, limit).await?))
}

async fn set_retention(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let r: Retention = parse_json(&body)?;
    Ok(Json(s.set_retention(&t.id, r).await?))
}

async fn get_retention(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.retention_view(&t)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetentionRun {
    /// Run as of this time, ms since the epoch (default: now).
    now_ms: Option<u64>,
}

async fn run_retention(
    State(s): State<Arc<Engine>>,
    _: Admin,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let run: RetentionRun = if body.is_empty() {
        RetentionRun::default()
    } else {
        parse_json(&body)?
    };
    // A task of its own: a client that stops waiting does not stop it.
    let now = run.now_ms.unwrap_or_else(now_ms);
    let job = s.clone();
    let removed = tokio::spawn(async move { job.run_retention(now).await })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))??;
    Ok(Json(json!({ "removed": removed })))
}

async fn get_customer(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, id)): Path<(String, String)>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let (customer, interactions) = s.customer_history_view(&t.id, &id, limit).await?;
    Ok(Json(
        json!({"customer": customer, "interactions": interactions}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCustomerAddress {
    channel: plugboard_core::Channel,
    address: String,
}

async fn add_customer_address(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<plugboard_core::Customer>> {
    let a: NewCustomerAddress = parse_json(&body)?;
    Ok(Json(
        s.add_customer_address(&t.id, &id, a.channel, &a.address)
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeCustomer {
    from: String,
}

async fn merge_customer(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<plugboard_core::Customer>> {
    let m: MergeCustomer = parse_json(&body)?;
    Ok(Json(s.merge_customers(&t.id, &id, &m.from).await?))
}

async fn set_email_domain(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, domain)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<plugboard_engine::EmailDomain>> {
    let setting: plugboard_engine::EmailDomain = parse_json(&body)?;
    Ok(Json(s.set_email_domain(&t.id, &domain, setting).await?))
}

async fn list_webhooks(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"webhooks": s.webhooks(&t.id).await?})))
}

async fn set_webhook(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<plugboard_engine::webhooks::Webhook>> {
    let mut hook: plugboard_engine::webhooks::Webhook = parse_json(&body)?;
    hook.name = name;
    Ok(Json(s.set_webhook(&t.id, hook).await?))
}

async fn delete_webhook(
    State(s): State<Arc<Engine>>,
    TenantScope(t): TenantScope,
    Path((_, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    if s.delete_webhook(&t.id, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("webhook {name}")))
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn events(
    State(s): State<Arc<Engine>>,
    headers: HeaderMap,
    Path(t): Path<String>,
    Query(q): Query<TokenQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    // Browsers cannot set headers on a WebSocket: accept `?token=` too.
    // An agent's or supervisor's token sees what its role may
    // ([`Engine::event_visible`]).
    let token = bearer(&headers).map(str::to_string).or(q.token);
    let (_, role) = s.acd_access(token.as_deref(), &t).await?;
    let ws = ws
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "websocket_required", e.to_string()))?;
    let rx = s.subscribe();
    // The token is checked again now and then: a stream ends soon after
    // its token is revoked (a new one issued) or its role changes.
    let (engine, tenant, held) = (s.clone(), t.clone(), role.clone());
    let still_valid = async move {
        loop {
            tokio::time::sleep(STREAM_RECHECK).await;
            match engine.acd_access(token.as_deref(), &tenant).await {
                Ok((_, r)) if r == held => {}
                _ => break,
            }
        }
    };
    let visible = move |ev: &StreamEvent| ev.tenant == t && s.event_visible(&t, &role, &ev.payload);
    Ok(ws.on_upgrade(move |socket| async move {
        tokio::select! {
            () = stream_events(socket, rx, visible) => {}
            () = still_valid => {}
        }
    }))
}

/// How often a tenant event stream checks its token again.
const STREAM_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// The operator's stream (admin): every tenant's events and the
/// operator's own (security events).
async fn operator_events(
    State(s): State<Arc<Engine>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let token = bearer(&headers).map(str::to_string).or(q.token);
    s.require_admin(token.as_deref()).await?;
    let ws = ws
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "websocket_required", e.to_string()))?;
    let rx = s.subscribe();
    Ok(ws.on_upgrade(move |socket| stream_events(socket, rx, |_: &StreamEvent| true)))
}

/// Sends the bus's events that are `visible` to a WebSocket. Events that
/// are already waiting go out together (one write, not one per event).
async fn stream_events(
    mut socket: WebSocket,
    mut rx: broadcast::Receiver<StreamEvent>,
    visible: impl Fn(&StreamEvent) -> bool,
) {
    use futures_util::SinkExt;
    /// Events taken from the bus for one write at most (other tenants'
    /// included: the loop yields after as many).
    const BATCH: usize = 256;
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let mut next = Some(ev);
                let (mut seen, mut fed) = (0, 0);
                while let Some(ev) = next.take() {
                    seen += 1;
                    let text = match ev {
                        Ok(ev) if visible(&ev) => {
                            ev.payload.to_string()
                        }
                        Ok(_) => String::new(),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            json!({"kind": "lagged", "dropped": n}).to_string()
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            let _ = socket.flush().await;
                            return;
                        }
                    };
                    if !text.is_empty() {
                        if socket.feed(Message::Text(text.into())).await.is_err() {
                            return;
                        }
                        fed += 1;
                    }
                    if seen < BATCH {
                        next = match rx.try_recv() {
                            Ok(ev) => Some(Ok(ev)),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                Some(Err(broadcast::error::RecvError::Lagged(n)))
                            }
                            Err(broadcast::error::TryRecvError::Closed) => {
                                Some(Err(broadcast::error::RecvError::Closed))
                            }
                            Err(broadcast::error::TryRecvError::Empty) => None,
                        };
                    }
                }
                if fed > 0 && socket.flush().await.is_err() {
                    return;
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            }
        }
    }
}
