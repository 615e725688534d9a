//! Plugboard's HTTP API v1 (axum on hyper): tenants, plugins, grants,
//! configs, addresses, flow simulation, interaction records, the WebSocket
//! event stream, Prometheus metrics and the OpenAPI document.
//!
//! Auth is `Authorization: Bearer <token>`: the admin token reaches every
//! path; a tenant API key reaches only its own tenant's paths (anything else
//! is 403). Errors are JSON: `{"error":{"code","message"}}`.

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use plugboard_core::{
    Address, Channel, Error as CoreError, Event, Grants, Interaction, PluginInfo, PluginKind,
    PluginVersion, Tenant, TenantLimits, flow::Action, normalize_address, now_ms, validate_id,
};
use plugboard_host::{FlowInput, InvokeError, Limits, LoadedPlugin, PluginEnv, PluginHost, Report};
use plugboard_store::{Store, hash_key};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use tokio::sync::{Semaphore, broadcast};

mod metrics;
mod session;

pub use metrics::Metrics;
pub use session::{FlowSession, SessionStart, Step, TTS_PLUGIN};

/// An API error: HTTP status, stable code, human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<Value>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let (Some(Value::Object(extra)), Some(obj)) = (self.extra, body.as_object_mut()) {
            obj.extend(extra);
        }
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// An interaction event as published on the event stream.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// Tenant it belongs to.
    pub tenant: String,
    /// JSON payload.
    pub payload: Value,
}

/// Shared state of the API.
pub struct AppState {
    store: Arc<dyn Store>,
    host: Arc<PluginHost>,
    admin_hash: String,
    loaded: RwLock<HashMap<(String, String, u64), Arc<LoadedPlugin>>>,
    permits: Arc<Semaphore>,
    metrics: Metrics,
    events: broadcast::Sender<StreamEvent>,
    limits: Limits,
    flow_graph: Option<Bytes>,
    recordings: Option<std::path::PathBuf>,
    registrations: RwLock<HashMap<(String, String), Vec<Binding>>>,
    config_trunks: HashMap<String, Vec<plugboard_core::Trunk>>,
    settings: Value,
}

pub use plugboard_core::Binding;

impl AppState {
    /// Wires the API to a store and a plugin host. `admin_token` is the
    /// bearer token of the operator; only its hash is kept.
    pub fn new(
        store: Arc<dyn Store>,
        host: Arc<PluginHost>,
        admin_token: &str,
        limits: Limits,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(host.max_concurrent() as usize));
        AppState {
            store,
            host,
            admin_hash: hash_key(admin_token),
            loaded: RwLock::new(HashMap::new()),
            permits,
            metrics: Metrics::new(),
            events: broadcast::channel(1024).0,
            limits,
            flow_graph: None,
            recordings: None,
            registrations: RwLock::new(HashMap::new()),
            config_trunks: HashMap::new(),
            settings: json!({}),
        }
    }

    /// A tenant's SIP user, for the registrar.
    pub fn sip_user(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<plugboard_core::SipUser>, CoreError> {
        match self.store.tenant(tenant)? {
            Some(_) => self.store.sip_user(tenant, name),
            None => Ok(None),
        }
    }

    /// A tenant's trunks (with credentials: for the voice channel only):
    /// those of the config file, then those created over the API.
    pub fn trunks(&self, tenant: &str) -> Vec<plugboard_core::Trunk> {
        let mut all = self.config_trunks.get(tenant).cloned().unwrap_or_default();
        for t in self.store.trunks(tenant).unwrap_or_default() {
            if !all.iter().any(|c| c.name == t.name) {
                all.push(t);
            }
        }
        all
    }

    /// The effective settings shown at `GET /v1/settings` (admin).
    pub fn with_settings(mut self, settings: Value) -> Self {
        self.settings = settings;
        self
    }

    /// A trunk from the server's config file.
    pub fn configured_trunk(&self, tenant: &str, name: &str) -> Option<&plugboard_core::Trunk> {
        self.config_trunks
            .get(tenant)?
            .iter()
            .find(|t| t.name == name)
    }

    /// Trunks from the server's config file, by tenant. They are not
    /// stored: their passwords stay in the file, and the API cannot
    /// replace them.
    pub fn with_config_trunks(
        mut self,
        trunks: HashMap<String, Vec<plugboard_core::Trunk>>,
    ) -> Self {
        self.config_trunks = trunks;
        self
    }

    /// True if the tenant exists.
    pub fn tenant_exists(&self, tenant: &str) -> bool {
        matches!(self.store.tenant(tenant), Ok(Some(_)))
    }

    /// Replaces a SIP user's bindings (expired ones are dropped); returns
    /// the live ones.
    pub fn set_bindings(&self, tenant: &str, user: &str, bindings: Vec<Binding>) -> Vec<Binding> {
        let now = now_ms();
        let live: Vec<Binding> = bindings
            .into_iter()
            .filter(|b| b.expires_ms > now)
            .collect();
        if let Ok(mut r) = self.registrations.write() {
            let key = (tenant.to_string(), user.to_string());
            if live.is_empty() {
                r.remove(&key);
            } else {
                r.insert(key, live.clone());
            }
        }
        if let Err(e) = self.store.set_bindings(tenant, user, &live) {
            tracing::warn!("cannot store the registrations of {user}@{tenant}: {e}");
        }
        live
    }

    /// Loads the stored registrations that have not expired (at start).
    fn load_bindings(&self) {
        let now = now_ms();
        let tenants = self.store.tenants().unwrap_or_default();
        let Ok(mut r) = self.registrations.write() else {
            return;
        };
        for t in tenants {
            for (user, bindings) in self.store.bindings(&t.id).unwrap_or_default() {
                let live: Vec<Binding> = bindings
                    .into_iter()
                    .filter(|b| b.expires_ms > now)
                    .collect();
                if !live.is_empty() {
                    r.insert((t.id.clone(), user), live);
                }
            }
        }
    }

    /// A SIP user's live bindings.
    pub fn bindings(&self, tenant: &str, user: &str) -> Vec<Binding> {
        let now = now_ms();
        self.registrations
            .read()
            .ok()
            .and_then(|r| r.get(&(tenant.to_string(), user.to_string())).cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|b| b.expires_ms > now)
            .collect()
    }

    /// Where call recordings are kept (one directory per tenant).
    pub fn with_recordings_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.recordings = Some(dir);
        self
    }

    /// Stores a recording (WAV) of a tenant durably and returns its id
    /// (`rec-<interaction>-<n>`), served at
    /// `GET /v1/tenants/{t}/recordings/{id}`.
    pub fn save_recording(
        &self,
        tenant: &str,
        interaction: &str,
        wav: &[u8],
    ) -> Result<String, CoreError> {
        use std::io::Write as _;
        let dir = self
            .recordings
            .as_ref()
            .ok_or_else(|| CoreError::Storage("no recordings directory configured".into()))?
            .join(tenant);
        std::fs::create_dir_all(&dir).map_err(|e| CoreError::Storage(e.to_string()))?;
        for n in 1..1000 {
            let id = format!("rec-{interaction}-{n}");
            let path = dir.join(format!("{id}.wav"));
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path);
            let mut file = match file {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(CoreError::Storage(e.to_string())),
            };
            file.write_all(wav)
                .and_then(|_| file.sync_all())
                .map_err(|e| CoreError::Storage(e.to_string()))?;
            return Ok(id);
        }
        Err(CoreError::Storage(
            "too many recordings for one interaction".into(),
        ))
    }

    /// Loads every tenant's active plugin versions (from the compile cache
    /// where possible), so that the first event after a restart is fast,
    /// and the SIP registrations that have not expired. Returns how many
    /// plugin versions were loaded; failures are logged and skipped.
    pub fn preload(&self) -> Result<usize, CoreError> {
        self.load_bindings();
        let mut n = 0;
        for t in self.store.tenants()? {
            for p in self.store.plugins(&t.id)? {
                match self.loaded_version(&t.id, &p.name, p.active_version) {
                    Ok(_) => n += 1,
                    Err(e) => tracing::warn!(
                        "could not load plugin {}/{} v{}: {}",
                        t.id,
                        p.name,
                        p.active_version,
                        e.message
                    ),
                }
            }
        }
        Ok(n)
    }

    /// Gives the server the `flow-graph` component that runs declarative
    /// flow documents (`POST /v1/tenants/{t}/flows/{name}`).
    pub fn with_flow_graph(mut self, component: Vec<u8>) -> Self {
        self.flow_graph = Some(Bytes::from(component));
        self
    }

    /// Compiles (or finds in the cache) a component and stores it as the
    /// next version of a plugin; answers what the deploy endpoints return.
    async fn deploy_version(
        &self,
        t: &str,
        name: &str,
        body: Bytes,
        document: Option<Value>,
    ) -> ApiResult<Value> {
        let host = self.host.clone();
        let bytes = body.clone();
        let loaded = tokio::task::spawn_blocking(move || host.load(&bytes))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?
            .map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_plugin",
                    e.to_string(),
                )
            })?;
        let version = tokio::task::block_in_place(|| {
            self.store.add_plugin_version(
                t,
                PluginVersion {
                    name: name.to_string(),
                    version: 0,
                    kind: loaded.kind,
                    sha256: loaded.sha256.clone(),
                    size: body.len() as u64,
                    created_ms: now_ms(),
                    document,
                },
                &body,
            )
        })?;
        let (source, load_ms) = (loaded.source, loaded.load_ms);
        if let Ok(mut m) = self.loaded.write() {
            m.insert(
                (t.to_string(), name.to_string(), version.version),
                Arc::new(loaded),
            );
        }
        Ok(json!({
            "name": name,
            "version": version.version,
            "kind": version.kind,
            "sha256": version.sha256,
            "size": version.size,
            "compile": {"source": source, "ms": load_ms},
        }))
    }

    fn loaded_version(
        &self,
        tenant: &str,
        name: &str,
        version: u64,
    ) -> ApiResult<Arc<LoadedPlugin>> {
        let key = (tenant.to_string(), name.to_string(), version);
        if let Some(p) = self.loaded.read().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(p);
        }
        let info = self.plugin_or_404(tenant, name, "plugin")?;
        let v = info.version(version).ok_or_else(|| {
            ApiError::not_found(format!("plugin {name} version {version} not found"))
        })?;
        let bytes = self.store.plugin_bytes(tenant, &v.sha256)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage",
                "component bytes missing",
            )
        })?;
        let p = Arc::new(
            self.host
                .load_with_hash(v.sha256.clone(), &bytes)
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "plugin_load",
                        e.to_string(),
                    )
                })?,
        );
        if let Ok(mut m) = self.loaded.write() {
            m.insert(key, p.clone());
        }
        Ok(p)
    }

    /// A tenant's plugin, or a 404 naming it (`what`: "plugin" or "flow").
    fn plugin_or_404(&self, tenant: &str, name: &str, what: &str) -> ApiResult<PluginInfo> {
        self.store
            .plugin(tenant, name)?
            .ok_or_else(|| ApiError::not_found(format!("{what} {name} not found")))
    }

    /// Number of plugin versions loaded and ready.
    pub fn loaded_count(&self) -> usize {
        self.loaded.read().map(|m| m.len()).unwrap_or(0)
    }
}

enum Caller {
    Admin,
    Tenant(String),
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn caller(state: &AppState, token: Option<&str>) -> ApiResult<Caller> {
    let Some(token) = token else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing Authorization: Bearer <token>",
        ));
    };
    let h = hash_key(token);
    if h == state.admin_hash {
        return Ok(Caller::Admin);
    }
    match state.store.tenant_for_key(&h)? {
        Some(t) => Ok(Caller::Tenant(t)),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown token",
        )),
    }
}

fn admin(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    match caller(state, bearer(headers))? {
        Caller::Admin => Ok(()),
        Caller::Tenant(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "admin token required",
        )),
    }
}

/// Checks the caller may act on `tenant`, and that the tenant exists.
fn tenant_access_token(state: &AppState, token: Option<&str>, tenant: &str) -> ApiResult<Tenant> {
    match caller(state, token)? {
        Caller::Admin => {}
        Caller::Tenant(t) if t == tenant => {}
        Caller::Tenant(_) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this API key belongs to another tenant",
            ));
        }
    }
    state
        .store
        .tenant(tenant)?
        .ok_or_else(|| ApiError::not_found(format!("tenant {tenant} not found")))
}

fn tenant_access(state: &AppState, headers: &HeaderMap, tenant: &str) -> ApiResult<Tenant> {
    tenant_access_token(state, bearer(headers), tenant)
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("invalid JSON body: {e}"),
        )
    })
}

/// The offset from UTC, in minutes, of time zone `tz` at `at_ms` (0 if the
/// zone is unknown, which creation refuses).
fn utc_offset_minutes(tz: &str, at_ms: u64) -> i32 {
    let Ok(zone) = jiff::tz::TimeZone::get(tz) else {
        return 0;
    };
    let Ok(ts) = jiff::Timestamp::from_millisecond(at_ms as i64) else {
        return 0;
    };
    zone.to_offset(ts).seconds() / 60
}

fn not_a_flow(name: &str, kind: PluginKind) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "not_a_flow",
        format!("plugin {name} is a {kind} plugin, not a flow"),
    )
}

fn random_token(prefix: &str) -> ApiResult<String> {
    let mut b = [0u8; 24];
    getrandom::fill(&mut b)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "random", e.to_string()))?;
    Ok(format!("{prefix}{}", hex::encode(b)))
}

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .route("/v1/tenants", post(create_tenant).get(list_tenants))
        .route("/v1/settings", get(get_settings))
        .route("/v1/tenants/{t}", get(get_tenant))
        .route("/v1/tenants/{t}/limits", put(set_limits).get(get_limits))
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
        .route("/v1/tenants/{t}/events", get(events))
        .route("/v1/tenants/{t}/recordings/{id}", get(get_recording))
        .route("/v1/tenants/{t}/sip-users", get(list_sip_users))
        .route("/v1/tenants/{t}/trunks", get(list_trunks))
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

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(s.loaded_count()),
    )
        .into_response()
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

async fn create_tenant(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    admin(&s, &headers)?;
    let req: NewTenant = parse_json(&body)?;
    validate_id("tenant", &req.id)?;
    let time_zone = req.time_zone.unwrap_or_else(|| "UTC".into());
    if jiff::tz::TimeZone::get(&time_zone).is_err() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("unknown time zone {time_zone:?}: use an IANA name such as Europe/Vilnius"),
        ));
    }
    let tenant = Tenant {
        name: req.name.unwrap_or_else(|| req.id.clone()),
        id: req.id,
        time_zone,
        created_ms: now_ms(),
        limits: TenantLimits::default(),
    };
    let key = random_token("pbk_")?;
    s.store.create_tenant(&tenant, &hash_key(&key))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": tenant.id, "name": tenant.name, "api_key": key})),
    )
        .into_response())
}

async fn list_tenants(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    admin(&s, &headers)?;
    Ok(Json(json!({"tenants": s.store.tenants()?})))
}

/// The server's effective settings (flags, config file and defaults
/// merged), for the operator; secrets are never part of them.
async fn get_settings(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    admin(&s, &headers)?;
    Ok(Json(s.settings.clone()))
}

async fn get_tenant(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(t): Path<String>,
) -> ApiResult<Json<Tenant>> {
    Ok(Json(tenant_access(&s, &headers, &t)?))
}

impl AppState {
    /// The limits a tenant's plugins run with: the server's defaults, with
    /// the tenant's overrides applied.
    fn limits_for(&self, tenant: &Tenant) -> Limits {
        let mut l = self.limits.clone();
        if let Some(d) = tenant.limits.deadline_ms {
            l.deadline_ms = d;
        }
        if let Some(m) = tenant.limits.memory_mib {
            l.memory_bytes = (m as usize) << 20;
        }
        if let Some(o) = tenant.limits.output_kib {
            l.output_bytes = (o as usize) << 10;
        }
        l
    }
}

async fn set_limits(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(t): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Limits>> {
    admin(&s, &headers)?;
    let mut tenant = tenant_access(&s, &headers, &t)?;
    let limits: TenantLimits = parse_json(&body)?;
    limits.validate((s.host.max_memory_bytes() >> 20) as u32)?;
    tenant.limits = limits;
    s.store.update_tenant(&tenant)?;
    Ok(Json(s.limits_for(&tenant)))
}

async fn get_limits(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(t): Path<String>,
) -> ApiResult<Json<Limits>> {
    let tenant = tenant_access(&s, &headers, &t)?;
    Ok(Json(s.limits_for(&tenant)))
}

async fn list_plugins(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(t): Path<String>,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
    Ok(Json(json!({"plugins": s.store.plugins(&t)?})))
}

async fn get_plugin(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
    let p = s.plugin_or_404(&t, &name, "plugin")?;
    Ok(Json(serde_json::to_value(p).unwrap_or_default()))
}

async fn deploy_plugin(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    tenant_access(&s, &headers, &t)?;
    validate_id("plugin", &name)?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "body must be a WebAssembly component (application/wasm)",
        ));
    }
    let v = s.deploy_version(&t, &name, body, None).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn deploy_flow(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    tenant_access(&s, &headers, &t)?;
    validate_id("flow", &name)?;
    let parsed = plugboard_flowgraph::parse(&body).map_err(|e| {
        let mut err = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_flow",
            e.to_string(),
        );
        err.extra = Some(json!({"node": e.node, "reason": e.reason}));
        err
    })?;
    let component = s.flow_graph.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "flow_graph_missing",
            "this server has no flow-graph component: build it (scripts/build-plugins.sh) or start the server with --flow-graph FILE",
        )
    })?;
    let document: Value = parse_json(&body)?;
    let mut v = s
        .deploy_version(&t, &name, component, Some(document))
        .await?;
    v["warnings"] = json!(parsed.warnings);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VersionQuery {
    version: Option<u64>,
}

async fn get_flow(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, name)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
    let info = s.plugin_or_404(&t, &name, "flow")?;
    let version = q.version.unwrap_or(info.active_version);
    let v = info
        .version(version)
        .ok_or_else(|| ApiError::not_found(format!("flow {name} version {version} not found")))?;
    let document = v.document.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_a_document",
            format!("{name} version {version} is a compiled plugin, not a flow document"),
        )
    })?;
    Ok(Json(
        json!({"name": name, "version": version, "active_version": info.active_version, "document": document}),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackReq {
    version: Option<u64>,
}

async fn rollback(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
    let req: RollbackReq = if body.is_empty() {
        RollbackReq::default()
    } else {
        parse_json(&body)?
    };
    let v = s.store.set_active_version(&t, &name, req.version)?;
    Ok(Json(json!({"name": name, "active_version": v})))
}

async fn set_grants(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Grants>> {
    tenant_access(&s, &headers, &t)?;
    let g: Grants = parse_json(&body)?;
    g.validate()?;
    s.store.set_grants(&t, &name, &g)?;
    Ok(Json(g))
}

async fn get_grants(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, name)): Path<(String, String)>,
) -> ApiResult<Json<Grants>> {
    tenant_access(&s, &headers, &t)?;
    Ok(Json(s.plugin_or_404(&t, &name, "plugin")?.grants))
}

async fn set_config(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
    let v: Value = parse_json(&body)?;
    if !v.is_object() {
        return Err(ApiError::bad_request("config must be a JSON object"));
    }
    if body.len() > 64 << 10 {
        return Err(ApiError::bad_request("config must be at most 64 KiB"));
    }
    s.store.set_config(&t, &name, &v)?;
    Ok(Json(v))
}

async fn get_config(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
    s.plugin_or_404(&t, &name, "plugin")?;
    let v = s.store.config(&t, &name)?;
    Ok(Json(if v.is_null() { json!({}) } else { v }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddressReq {
    channel: Channel,
    flow: String,
}

async fn set_address(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, address)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Address>> {
    tenant_access(&s, &headers, &t)?;
    let req: AddressReq = parse_json(&body)?;
    let address = normalize_address(&address);
    if address.is_empty() || address.len() > 256 {
        return Err(ApiError::bad_request("address must be 1-256 characters"));
    }
    let p = s.plugin_or_404(&t, &req.flow, "flow")?;
    if p.kind != PluginKind::Flow {
        return Err(not_a_flow(&req.flow, p.kind));
    }
    let a = Address {
        address,
        channel: req.channel,
        flow: req.flow,
    };
    s.store.set_address(&t, &a)?;
    Ok(Json(a))
}

async fn get_address(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, address)): Path<(String, String)>,
) -> ApiResult<Json<Address>> {
    tenant_access(&s, &headers, &t)?;
    let a = normalize_address(&address);
    s.store
        .address(&t, &a)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("address {a} not found")))
}

async fn list_addresses(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(t): Path<String>,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
    Ok(Json(json!({"addresses": s.store.addresses(&t)?})))
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

impl AppState {
    /// Runs one flow event in a fresh instance on the blocking pool,
    /// bounded by the host's concurrency, and records metrics.
    async fn run_flow(
        &self,
        plugin: Arc<LoadedPlugin>,
        env: PluginEnv,
        input: FlowInput,
        state: String,
        event: Event,
    ) -> Report<plugboard_host::FlowOutput> {
        let tenant = env.tenant.clone();
        let name = env.plugin.clone();
        let permit = self.permits.clone().acquire_owned().await;
        let host = self.host.clone();
        let report = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            host.invoke_flow(&plugin, env, &input, &state, &event)
        })
        .await
        .unwrap_or_else(|e| Report {
            outcome: Err(InvokeError::Instantiate(format!(
                "invocation task failed: {e}"
            ))),
            logs: Vec::new(),
            calls: Vec::new(),
            elapsed_us: 0,
            memory_bytes: 0,
        });
        self.metrics.observe(&tenant, &name, "flow", &report);
        report
    }

    fn publish(&self, tenant: &str, payload: Value) {
        let _ = self.events.send(StreamEvent {
            tenant: tenant.to_string(),
            payload,
        });
    }
}

fn interaction_nonce() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b)
}

async fn simulate(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    tenant_access(&s, &headers, &t)?;
    let req: SimulateReq = parse_json(&body)?;
    if req.events.len() > 100 {
        return Err(ApiError::bad_request("at most 100 events per simulation"));
    }
    let mut session = s.open_session(SessionStart {
        tenant: t.clone(),
        flow: name.clone(),
        version: req.version,
        channel: req.channel,
        from: req.from,
        to: req.to,
        attributes: req.attributes,
        simulated: true,
        now_ms: req.now_ms,
    })?;
    let version = session
        .interaction
        .flow
        .as_ref()
        .map(|f| f.version)
        .unwrap_or_default();
    let mut events = req.events;
    if events.first() != Some(&Event::Started) {
        events.insert(0, Event::Started);
    }
    let mut steps = Vec::new();
    let mut failure: Option<InvokeError> = None;
    for event in events {
        let step = session.handle(event.clone()).await;
        let actions = serde_json::to_value(&step.actions).unwrap_or_default();
        match step.error {
            None => {
                steps.push(json!({"event": event, "actions": actions, "state": step.state, "elapsed_us": step.elapsed_us, "memory_bytes": step.memory_bytes}));
                if step.actions.contains(&Action::Hangup) || event == Event::Hangup {
                    break;
                }
            }
            Some(e) => {
                let err = json!({"code": e.code(), "message": e.to_string()});
                steps.push(json!({"event": event, "actions": actions, "fallback": true, "error": err, "elapsed_us": step.elapsed_us}));
                failure = Some(e);
                break;
            }
        }
    }
    session.finish()?;
    let id = session.interaction.id.clone();
    match failure {
        None => Ok(Json(
            json!({"interaction": id, "flow": {"name": name, "version": version}, "steps": steps}),
        )
        .into_response()),
        Some(e) => {
            let mut err = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string());
            err.extra = Some(
                json!({"interaction": id, "flow": {"name": name, "version": version}, "steps": steps}),
            );
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
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, user)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
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
    let record = plugboard_core::SipUser {
        ha1_md5: ha1(Algorithm::Md5, &user, &t, &req.password),
        ha1_sha256: ha1(Algorithm::Sha256, &user, &t, &req.password),
        name: user.clone(),
        created_ms: now_ms(),
    };
    tokio::task::block_in_place(|| s.store.set_sip_user(&t, &record))?;
    Ok(Json(
        json!({"user": user, "realm": t, "aor": format!("sip:{user}@{t}")}),
    ))
}

/// Creates or replaces a carrier trunk of the tenant.
async fn set_trunk(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
    validate_id("trunk", &name)?;
    let mut trunk: plugboard_core::Trunk = parse_json(&body)?;
    trunk.name = name;
    trunk.validate().map_err(ApiError::bad_request)?;
    if s.configured_trunk(&t, &trunk.name).is_some() {
        return Err(CoreError::Conflict(format!(
            "trunk {} is defined in the server's config file; change it there",
            trunk.name
        ))
        .into());
    }
    tokio::task::block_in_place(|| s.store.set_trunk(&t, &trunk))?;
    trunk.password = trunk.password.map(|_| "********".into());
    Ok(Json(serde_json::to_value(&trunk).unwrap_or_default()))
}

async fn list_trunks(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(t): Path<String>,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
    let trunks: Vec<Value> = s
        .trunks(&t)
        .into_iter()
        .map(|mut tr| {
            let source = if s.configured_trunk(&t, &tr.name).is_some() {
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
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(t): Path<String>,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
    let users: Vec<Value> = s
        .store
        .sip_users(&t)?
        .into_iter()
        .map(|u| json!({"user": u.name, "aor": format!("sip:{}@{t}", u.name), "registrations": s.bindings(&t, &u.name)}))
        .collect();
    Ok(Json(json!({"sip_users": users})))
}

async fn get_recording(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    tenant_access(&s, &headers, &t)?;
    let valid = id.starts_with("rec-")
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let not_found = || ApiError::not_found(format!("recording {id} not found"));
    let dir = s.recordings.as_ref().ok_or_else(not_found)?;
    if !valid {
        return Err(not_found());
    }
    let bytes = tokio::fs::read(dir.join(&t).join(format!("{id}.wav")))
        .await
        .map_err(|_| not_found())?;
    Ok(([(header::CONTENT_TYPE, "audio/wav")], bytes).into_response())
}

/// Lets the host's `kv` import use the store.
struct KvAdapter(Arc<dyn Store>);

impl plugboard_core::TenantKv for KvAdapter {
    fn kv_get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>, CoreError> {
        self.0.kv_get(tenant, key)
    }
    fn kv_set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<(), CoreError> {
        self.0.kv_set(tenant, key, value)
    }
    fn kv_delete(&self, tenant: &str, key: &str) -> Result<(), CoreError> {
        self.0.kv_delete(tenant, key)
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list_interactions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(t): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    tenant_access(&s, &headers, &t)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    Ok(Json(
        json!({"interactions": s.store.interactions(&t, limit)?}),
    ))
}

async fn get_interaction(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((t, id)): Path<(String, String)>,
) -> ApiResult<Json<Interaction>> {
    tenant_access(&s, &headers, &t)?;
    s.store
        .interaction(&t, &id)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("interaction {id} not found")))
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn events(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(t): Path<String>,
    Query(q): Query<TokenQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    // Browsers cannot set headers on a WebSocket: accept `?token=` too.
    let token = bearer(&headers).map(str::to_string).or(q.token);
    tenant_access_token(&s, token.as_deref(), &t)?;
    let ws = ws
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "websocket_required", e.to_string()))?;
    let rx = s.events.subscribe();
    Ok(ws.on_upgrade(move |socket| stream_events(socket, rx, t)))
}

async fn stream_events(
    mut socket: WebSocket,
    mut rx: broadcast::Receiver<StreamEvent>,
    tenant: String,
) {
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(ev) if ev.tenant == tenant => {
                    if socket.send(Message::Text(ev.payload.to_string().into())).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let msg = json!({"kind": "lagged", "dropped": n}).to_string();
                    if socket.send(Message::Text(msg.into())).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            }
        }
    }
}
