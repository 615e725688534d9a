//! Plugboard's application core: what the HTTP API and every channel share.
//!
//! [`Engine`] owns tenants and their API keys, the plugin registry (deploy,
//! compile cache, loaded versions, rollback, grants, configs), address
//! routing, flow sessions ([`FlowSession`]: one interaction driven event by
//! event through a tenant's flow), interaction records, the event bus,
//! the registrar's bindings, carrier trunks, call recordings (blobs) and
//! the metrics. Nodes sharing a store share their events and plugin
//! deploys through NATS ([`Engine::join_cluster`], [`cluster`]). It knows nothing of HTTP or SIP: `plugboard-api` is an
//! adapter over it, and channel crates (`plugboard-voice`, and the digital
//! channels to come) are thin drivers that call it. Channel crates depend
//! on this crate, never on the API nor on each other.
//!
//! Authorisation fails closed: [`Engine::authenticate`] and
//! [`Engine::tenant_access`] deny on any store error, and so does every
//! lookup a channel makes to admit a caller ([`Engine::trunks`] returns the
//! error rather than "no trunks").

use plugboard_core::{
    Address, Binding, Channel, Error as CoreError, Event, Grants, Interaction, PluginInfo,
    PluginKind, PluginVersion, Retention, SipUser, Tenant, TenantLimits, Trunk, flow::Action,
    normalize_address, now_ms, validate_id,
};
use plugboard_host::{FlowInput, InvokeError, Limits, LoadedPlugin, PluginHost, Report};
use plugboard_store::{Store, hash_key};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::broadcast;
use tracing::Instrument;

pub mod acd;
pub mod callback;
pub mod capacity;
pub mod chat;
pub mod cluster;
pub mod desk;
pub mod fair;
pub mod loaded;
pub mod messaging;
mod metrics;
pub mod privacy;
pub mod secrets;
mod session;
pub mod sms;
pub mod tables;
pub mod usage;
pub mod webhooks;

pub use acd::{TaskNews, TaskWatcher};
pub use callback::{Callback, CallbackJob, CallbackRunner};
pub use cluster::{ClusterConfig, ClusterError, random_node_id};
pub use messaging::{
    Courier, Delivered, DeliveryError, EmailDomain, Inbound, Outbound, Received, sent_note,
};
pub use metrics::Metrics;
pub use plugboard_acd::TaskSpec;
pub use session::{Ending, FlowSession, SessionStart, Step, TTS_PLUGIN};

/// Why an engine operation failed. The HTTP API maps each to a status and
/// a stable code; channels log it and refuse the contact.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Invalid input, a missing thing, a conflict, or a store failure.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// No credentials, or unknown ones.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// Credentials that do not reach this tenant or path.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The uploaded bytes are not a plugin this server can run.
    #[error("{0}")]
    InvalidPlugin(String),
    /// A stored plugin version could not be loaded.
    #[error("{0}")]
    PluginLoad(String),
    /// A flow was asked of a plugin of another kind.
    #[error("plugin {name} is a {kind} plugin, not a flow")]
    NotAFlow {
        /// Plugin name.
        name: String,
        /// Its kind.
        kind: PluginKind,
    },
    /// A declarative flow document was refused.
    #[error("{message}")]
    InvalidFlow {
        /// The whole message.
        message: String,
        /// The node at fault, if one is.
        node: Option<String>,
        /// Why.
        reason: String,
    },
    /// The server was started without the `flow-graph` component.
    #[error(
        "this server has no flow-graph component: build it (scripts/build-plugins.sh) or start the server with --flow-graph FILE"
    )]
    FlowGraphMissing,
    /// A flow version is a compiled plugin, not a document.
    #[error("{0}")]
    NotADocument(String),
    /// The operating system's random number generator failed.
    #[error("no randomness from the operating system: {0}")]
    Random(String),
    /// An internal task failed.
    #[error("{0}")]
    Internal(String),
    /// The tenant is at one of its limits (try again later).
    #[error(transparent)]
    OverLimit(#[from] capacity::Refusal),
}

/// Result of engine operations.
pub type EngineResult<T> = Result<T, EngineError>;

/// The pseudo-tenant of events for the operator only (security events):
/// no tenant id can be empty, so no tenant's stream carries them.
pub const OPERATOR: &str = "";

/// An interaction event as published on the event bus.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// Tenant it belongs to.
    pub tenant: String,
    /// JSON payload.
    pub payload: Value,
    /// The node it happened on, when not this one (received through the
    /// cluster link).
    pub node: Option<Arc<str>>,
}

/// Who presented a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator (admin token).
    Admin,
    /// A tenant's API key.
    Tenant(String),
    /// An agent's (or supervisor's) own token: it reaches only the ACD
    /// endpoints its role allows ([`acd::AcdRole`]).
    Agent {
        /// The tenant.
        tenant: String,
        /// The agent.
        agent: String,
        /// `agent` or `supervisor`.
        role: acd::Role,
    },
}

/// A deployed plugin version, as the deploy endpoints answer it.
#[derive(Debug, Clone, Serialize)]
pub struct Deployed {
    /// Plugin name.
    pub name: String,
    /// The new version number.
    pub version: u64,
    /// Detected kind.
    pub kind: PluginKind,
    /// SHA-256 of the bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Where the compiled code came from (`compiled`, `cache`) and how long it took.
    pub compile: Value,
    /// Warnings about a flow document (unreachable nodes, …); only for
    /// flow documents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
}

/// A scripted run of a flow (`simulate`).
#[derive(Debug, Clone)]
pub struct SimulateRequest {
    /// Channel.
    pub channel: Channel,
    /// Customer address.
    pub from: String,
    /// Tenant address contacted.
    pub to: String,
    /// The events, in order (`started` is put first if missing).
    pub events: Vec<Event>,
    /// Initial attributes.
    pub attributes: BTreeMap<String, String>,
    /// The plugin's clock, pinned.
    pub now_ms: Option<u64>,
    /// A version other than the active one.
    pub version: Option<u64>,
}

/// What a simulation produced.
#[derive(Debug)]
pub struct SimulateOutcome {
    /// The interaction recorded for it.
    pub interaction: String,
    /// The flow version run.
    pub version: u64,
    /// One entry per event handled.
    pub steps: Vec<Value>,
    /// Set when the flow failed (the last step carries the fallback).
    pub failure: Option<InvokeError>,
}

/// The application core: one per process, shared by the API and channels.
pub struct Engine {
    store: Arc<dyn Store>,
    host: Arc<PluginHost>,
    admin_hash: String,
    loaded: loaded::LoadedCache,
    fair: Arc<fair::FairPermits>,
    acd: acd::AcdHub,
    secret_key: Option<secrets::SecretKey>,
    metrics: Metrics,
    events: broadcast::Sender<StreamEvent>,
    limits: Limits,
    flow_graph: Option<Arc<[u8]>>,
    recordings: Option<std::path::PathBuf>,
    config_trunks: HashMap<String, Vec<Trunk>>,
    settings: Value,
    cluster: std::sync::OnceLock<cluster::Link>,
    messaging: messaging::Hub,
    sms: sms::SmsState,
    capacity: Arc<capacity::Capacity>,
    usage_meter: usage::UsageMeter,
    /// Set when the node stops taking new work (SIGTERM): `/readyz` then
    /// says so, for a balancer to send traffic elsewhere.
    draining: std::sync::atomic::AtomicBool,
    /// Retention periods where a tenant sets none.
    retention_defaults: Retention,
    /// Store compactions: one at a time, and whether one is due.
    compaction: privacy::Compaction,
    /// Sizes of the node's in-memory tables, for `/metrics`.
    tables: tables::Tables,
    /// Webhook deliveries with a task.
    hooks: webhooks::Deliveries,
}

impl Engine {
    /// Wires the engine to a store and a plugin host. `admin_token` is the
    /// bearer token of the operator; only its hash is kept.
    pub fn new(
        store: Arc<dyn Store>,
        host: Arc<PluginHost>,
        admin_token: &str,
        limits: Limits,
    ) -> Self {
        let fair = fair::FairPermits::new(host.max_concurrent() as usize);
        Engine {
            store,
            host,
            admin_hash: hash_key(admin_token),
            loaded: Default::default(),
            fair,
            acd: acd::AcdHub::default(),
            secret_key: None,
            metrics: Metrics::new(),
            events: broadcast::channel(1024).0,
            limits,
            flow_graph: None,
            recordings: None,
            config_trunks: HashMap::new(),
            settings: json!({}),
            cluster: std::sync::OnceLock::new(),
            messaging: Default::default(),
            sms: Default::default(),
            capacity: Default::default(),
            // This process's name in the ledger: random, else its start.
            usage_meter: usage::UsageMeter::new(
                random_token("")
                    .unwrap_or_else(|_| format!("{:x}", now_ms()))
                    .chars()
                    .take(12)
                    .collect(),
            ),
            draining: std::sync::atomic::AtomicBool::new(false),
            retention_defaults: Retention::default(),
            compaction: Default::default(),
            tables: Default::default(),
            hooks: Default::default(),
        }
    }

    /// Marks the node as stopping: [`Engine::readiness`] answers
    /// `draining` from now on.
    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A consistent copy of the store, made while it serves, in chunks
    /// ([`plugboard_store::StoreOps::backup`]). The copy is first written
    /// to a temporary file, so the store's write sets wait only as long
    /// as the local disk takes, however slowly the receiver reads. The
    /// last item is an error if the copy failed; a receiver dropped early
    /// stops it. Only the embedded store can (PostgreSQL: `pg_dump`).
    pub fn backup(&self) -> tokio::sync::mpsc::Receiver<Result<Vec<u8>, CoreError>> {
        /// Bytes sent at a time.
        const CHUNK: usize = 256 << 10;
        /// The copy, written while someone still waits for it.
        struct Watched {
            out: std::io::BufWriter<std::fs::File>,
            tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, CoreError>>,
        }
        impl std::io::Write for Watched {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if self.tx.is_closed() {
                    return Err(std::io::Error::other("nobody waits for the backup"));
                }
                self.out.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.out.flush()
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek, Write};
            let failed = |e: std::io::Error| CoreError::Storage(e.to_string());
            let copied = (|| -> Result<std::fs::File, CoreError> {
                let file = tempfile::tempfile().map_err(failed)?;
                let mut out = Watched {
                    out: std::io::BufWriter::with_capacity(CHUNK, file),
                    tx: tx.clone(),
                };
                let s = store.backup(&mut out)?;
                tracing::info!(
                    "backup: {} trees, {} keys, {} bytes; writes waited {} ms",
                    s.trees,
                    s.keys,
                    s.bytes,
                    s.held_ms
                );
                out.flush().map_err(failed)?;
                let mut file = out.out.into_inner().map_err(|e| failed(e.into_error()))?;
                file.rewind().map_err(failed)?;
                Ok(file)
            })();
            let mut file = match copied {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("backup failed: {e}");
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            loop {
                let mut chunk = vec![0u8; CHUNK];
                match file.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(n) => {
                        chunk.truncate(n);
                        if tx.blocking_send(Ok(chunk)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(failed(e)));
                        return;
                    }
                }
            }
        });
        rx
    }

    /// Whether the node can take traffic: not stopping, and its store
    /// answering (within 2 s). The error says why not.
    pub async fn readiness(&self) -> Result<(), String> {
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("draining".into());
        }
        match tokio::time::timeout(std::time::Duration::from_secs(2), self.store.check()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("store: {e}")),
            Err(_) => Err("store: no answer within 2 s".into()),
        }
    }

    /// The node's per-tenant capacity bookkeeping.
    pub fn capacity(&self) -> &Arc<capacity::Capacity> {
        &self.capacity
    }

    /// Records a plugin invocation in the metrics and the tenant's usage.
    pub(crate) fn observe<T>(&self, tenant: &str, plugin: &str, kind: &str, report: &Report<T>) {
        self.metrics.observe(tenant, plugin, kind, report);
        self.meter_plugin(tenant, report);
    }

    /// The effective settings shown at `GET /v1/settings` (admin).
    pub fn with_settings(mut self, settings: Value) -> Self {
        self.settings = settings;
        self
    }

    /// The effective settings (no secrets).
    pub fn settings(&self) -> &Value {
        &self.settings
    }

    /// Trunks from the server's config file, by tenant. They are not
    /// stored: their passwords stay in the file, and the API cannot
    /// replace them.
    pub fn with_config_trunks(mut self, trunks: HashMap<String, Vec<Trunk>>) -> Self {
        self.config_trunks = trunks;
        self
    }

    /// Plugin versions kept compiled in memory at most (default
    /// [`loaded::DEFAULT_MAX_LOADED`]); the host keeps twice as many
    /// compiled components by their hash.
    pub fn with_max_loaded(self, max: usize) -> Self {
        self.loaded.set_limit(max);
        self.host.set_max_components(max.saturating_mul(2));
        self
    }

    /// The retention periods of tenants that set none of their own.
    pub fn with_retention_defaults(mut self, defaults: Retention) -> Self {
        self.retention_defaults = defaults;
        self
    }

    /// How long after an erasure or a retention run the store is
    /// compacted (requests meanwhile share it); default a minute.
    pub fn with_compact_delay(mut self, delay: std::time::Duration) -> Self {
        self.compaction.delay = delay;
        self
    }

    /// The retention periods of tenants that set none of their own.
    pub fn retention_defaults(&self) -> Retention {
        self.retention_defaults
    }

    /// Where earlier versions kept call recordings (one directory per
    /// tenant): read when a recording is not in the store.
    pub fn with_recordings_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.recordings = Some(dir);
        self
    }

    /// Gives the server the `flow-graph` component that runs declarative
    /// flow documents.
    pub fn with_flow_graph(mut self, component: Vec<u8>) -> Self {
        self.flow_graph = Some(component.into());
        self
    }

    // ----- authentication and tenants -----

    /// Who a bearer token belongs to. No token, an unknown token or a
    /// failing store: denied.
    pub async fn authenticate(&self, token: Option<&str>) -> EngineResult<Caller> {
        let Some(token) = token else {
            return Err(EngineError::Unauthenticated(
                "missing Authorization: Bearer <token>",
            ));
        };
        let h = hash_key(token);
        if h == self.admin_hash {
            return Ok(Caller::Admin);
        }
        if let Some(tenant) = acd::token_tenant(token) {
            return match self.agent_token(tenant, &h).await? {
                Some((agent, role)) => Ok(Caller::Agent {
                    tenant: tenant.to_string(),
                    agent,
                    role,
                }),
                None => Err(EngineError::Unauthenticated("unknown token")),
            };
        }
        match self.store.tenant_for_key(&h).await? {
            Some(t) => Ok(Caller::Tenant(t)),
            None => Err(EngineError::Unauthenticated("unknown token")),
        }
    }

    /// Checks that a token is the admin token.
    pub async fn require_admin(&self, token: Option<&str>) -> EngineResult<()> {
        match self.authenticate(token).await? {
            Caller::Admin => Ok(()),
            Caller::Tenant(_) | Caller::Agent { .. } => {
                Err(EngineError::Forbidden("admin token required"))
            }
        }
    }

    /// Checks the token may act on `tenant`, and that the tenant exists.
    pub async fn tenant_access(&self, token: Option<&str>, tenant: &str) -> EngineResult<Tenant> {
        match self.authenticate(token).await? {
            Caller::Admin => {}
            Caller::Tenant(t) if t == tenant => {}
            Caller::Tenant(_) => {
                return Err(EngineError::Forbidden(
                    "this API key belongs to another tenant",
                ));
            }
            Caller::Agent { .. } => {
                return Err(EngineError::Forbidden(
                    "an agent's or supervisor's token reaches only the ACD endpoints of its role",
                ));
            }
        }
        self.tenant(tenant).await
    }

    /// Creates a tenant and its API key (returned once; only its hash is
    /// stored).
    pub async fn create_tenant(
        &self,
        id: String,
        name: Option<String>,
        time_zone: Option<String>,
    ) -> EngineResult<(Tenant, String)> {
        validate_id("tenant", &id)?;
        let time_zone = time_zone.unwrap_or_else(|| "UTC".into());
        if jiff::tz::TimeZone::get(&time_zone).is_err() {
            return Err(CoreError::Invalid(format!(
                "unknown time zone {time_zone:?}: use an IANA name such as Europe/Vilnius"
            ))
            .into());
        }
        let tenant = Tenant {
            name: name.unwrap_or_else(|| id.clone()),
            id,
            time_zone,
            created_ms: now_ms(),
            limits: TenantLimits::default(),
            retention: Retention::default(),
        };
        let key = random_token("pbk_")?;
        self.store.create_tenant(&tenant, &hash_key(&key)).await?;
        Ok((tenant, key))
    }

    /// All tenants.
    pub async fn tenants(&self) -> EngineResult<Vec<Tenant>> {
        Ok(self.store.tenants().await?)
    }

    /// A tenant, or `NotFound`.
    pub async fn tenant(&self, tenant: &str) -> EngineResult<Tenant> {
        let t =
            self.store.tenant(tenant).await?.ok_or_else(|| {
                EngineError::from(CoreError::NotFound(format!("tenant {tenant}")))
            })?;
        self.capacity.remember(&t.id, &t.limits);
        Ok(t)
    }

    /// True if the tenant exists; a failing store answers an error.
    pub async fn tenant_exists(&self, tenant: &str) -> EngineResult<bool> {
        Ok(self.store.tenant(tenant).await?.is_some())
    }

    /// Sets a tenant's limits; returns the limits now in effect
    /// ([`Engine::limits_view`]).
    pub async fn set_limits(&self, tenant: &str, limits: TenantLimits) -> EngineResult<Value> {
        let mut t = self.tenant(tenant).await?;
        limits.validate((self.host.max_memory_bytes() >> 20) as u32)?;
        t.limits = limits;
        self.store.update_tenant(&t).await?;
        self.capacity.remember(&t.id, &t.limits);
        self.limits_view(&t).await
    }

    /// A tenant's limits: plugin execution in effect (the operator's or
    /// the server's defaults), and `capacity` as the operator set it
    /// (calls at once per node, calls and messages per second, chats at
    /// once, agents, plugins; `null` for none set), with `calls_in_effect`
    /// (the node's default share when none is set), what it uses now
    /// (`in_use`; calls and chats on this node) and its refusals.
    pub async fn limits_view(&self, t: &Tenant) -> EngineResult<Value> {
        let mut v = serde_json::to_value(self.limits_for(t))
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let l = &t.limits;
        let (calls, chats) = self.capacity.in_use(&t.id);
        let agents = self.store.records(&t.id, acd::AGENT).await?.len();
        let plugins = self.store.plugins(&t.id).await?.len();
        v["capacity"] = json!({
            "calls": l.calls,
            "calls_in_effect": l.calls.or_else(|| self.capacity.default_calls()),
            "calls_per_second": l.calls_per_second,
            "chats": l.chats,
            "messages_per_second": l.messages_per_second,
            "agents": l.agents,
            "plugins": l.plugins,
            "storage_mib": l.storage_mib,
        });
        v["in_use"] = json!({
            "calls": calls,
            "chats": chats,
            "agents": agents,
            "plugins": plugins,
            "storage_bytes": self.stored_bytes(&t.id).await?,
        });
        v["refused"] = json!(self.capacity.refusals(&t.id));
        v["node"] = json!({"calls": self.capacity.node_calls()});
        Ok(v)
    }

    /// Refuses a new plugin name beyond the tenant's plugin limit (a new
    /// version of one it has is always room).
    async fn check_plugin_room(&self, tenant: &str, name: &str) -> EngineResult<()> {
        let Some(max) = self.capacity.limits(tenant).plugins else {
            return Ok(());
        };
        let plugins = self.store.plugins(tenant).await?;
        if plugins.iter().any(|p| p.name == name) || plugins.len() < max as usize {
            return Ok(());
        }
        Err(CoreError::Conflict(format!(
            "the tenant has {} plugins, its limit is {max}: ask the operator for more",
            plugins.len()
        ))
        .into())
    }

    /// Seals tenants' secrets with this key (the server's; every node on
    /// one store needs the same).
    pub fn with_secret_key(mut self, key: secrets::SecretKey) -> Self {
        self.secret_key = Some(key);
        self
    }

    fn secret_key(&self) -> EngineResult<&secrets::SecretKey> {
        self.secret_key
            .as_ref()
            .ok_or_else(|| EngineError::Internal("no secret key is configured".into()))
    }

    /// Stores a tenant's secret, sealed; its value is never returned.
    pub async fn set_secret(&self, tenant: &str, name: &str, value: &str) -> EngineResult<()> {
        plugboard_core::validate_id("secret", name)?;
        if value.is_empty() || value.len() > secrets::MAX_SECRET {
            return Err(CoreError::Invalid(format!(
                "a secret's value is 1..={} bytes",
                secrets::MAX_SECRET
            ))
            .into());
        }
        let sealed = self.secret_key()?.seal(tenant, name, value)?;
        self.store.set_secret(tenant, name, &sealed).await?;
        Ok(())
    }

    /// The names of a tenant's secrets.
    pub async fn secret_names(&self, tenant: &str) -> EngineResult<Vec<String>> {
        Ok(self.store.secret_names(tenant).await?)
    }

    /// Deletes a tenant's secret.
    pub async fn delete_secret(&self, tenant: &str, name: &str) -> EngineResult<()> {
        if self.store.delete_secret(tenant, name).await? {
            Ok(())
        } else {
            Err(CoreError::NotFound(format!("secret {name}")).into())
        }
    }

    /// A plugin's configuration with the secrets it is granted filled in
    /// (entries naming a secret it is not granted, or that does not
    /// exist, are left out), and a redactor for their values. The http
    /// grant's client certificate key is filled in from its secret too.
    pub async fn resolve_config(
        &self,
        tenant: &str,
        grants: &mut Grants,
        mut config: Value,
    ) -> EngineResult<(Value, secrets::Redactor)> {
        let refs = secrets::references(&config);
        let mut values = Vec::new();
        let key_secret = grants
            .http
            .as_ref()
            .and_then(|h| h.client_key_secret.clone());
        if let Some(name) = key_secret
            && let Some(key) = self.granted_secret(tenant, grants, &name).await?
            && let Some(http) = grants.http.as_mut()
        {
            http.client_key_pem = Some(key.clone());
            values.push(key);
        }
        for (key, name) in refs {
            let value = self.granted_secret(tenant, grants, &name).await?;
            if let Some(o) = config.as_object_mut() {
                match value {
                    Some(v) => {
                        o.insert(key, Value::String(v.clone()));
                        values.push(v);
                    }
                    None => {
                        o.remove(&key);
                    }
                }
            }
        }
        Ok((config, secrets::Redactor::new(values)))
    }

    /// The value of a tenant's secret, if it exists (for the platform's
    /// own use on the tenant's behalf: webhook signatures, DKIM keys; and
    /// behind `granted_secret` for plugins).
    pub(crate) async fn tenant_secret(
        &self,
        tenant: &str,
        name: &str,
    ) -> EngineResult<Option<String>> {
        match self.store.secret(tenant, name).await? {
            Some(sealed) => Ok(Some(self.secret_key()?.open(tenant, name, &sealed)?)),
            None => Ok(None),
        }
    }

    /// The value of secret `name` if `grants` lists it and it exists.
    async fn granted_secret(
        &self,
        tenant: &str,
        grants: &Grants,
        name: &str,
    ) -> EngineResult<Option<String>> {
        if !grants.secrets.iter().any(|s| s == name) {
            return Ok(None);
        }
        self.tenant_secret(tenant, name).await
    }

    /// How many plugin invocations a tenant may run at once: its
    /// `max_concurrent` limit, else a quarter of the pool.
    pub fn share_for(&self, tenant: &Tenant) -> usize {
        tenant
            .limits
            .max_concurrent
            .map_or_else(|| self.fair.default_share(), |m| m as usize)
    }

    /// The limits a tenant's plugins run with: the server's defaults, with
    /// the tenant's overrides applied.
    pub fn limits_for(&self, tenant: &Tenant) -> Limits {
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
        // Each instance the tenant may run can have a request in flight.
        l.http_in_flight = l.http_in_flight.max(self.share_for(tenant) as u32);
        l
    }

    // ----- plugins -----

    /// All plugins of a tenant.
    pub async fn plugins(&self, tenant: &str) -> EngineResult<Vec<PluginInfo>> {
        Ok(self.store.plugins(tenant).await?)
    }

    /// A tenant's plugin, or `NotFound` naming it (`what`: "plugin" or "flow").
    pub async fn plugin(&self, tenant: &str, name: &str, what: &str) -> EngineResult<PluginInfo> {
        self.store
            .plugin(tenant, name)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("{what} {name}")).into())
    }

    /// Compiles (or finds in the cache) a component and stores it as the
    /// next version of a plugin, active at once.
    pub async fn deploy(
        &self,
        tenant: &str,
        name: &str,
        bytes: Arc<[u8]>,
        document: Option<Value>,
    ) -> EngineResult<Deployed> {
        validate_id("plugin", name)?;
        self.check_plugin_room(tenant, name).await?;
        if bytes.is_empty() {
            return Err(CoreError::Invalid(
                "body must be a WebAssembly component (application/wasm)".into(),
            )
            .into());
        }
        let host = self.host.clone();
        let b = bytes.clone();
        let loaded = tokio::task::spawn_blocking(move || host.load(&b))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::InvalidPlugin(e.to_string()))?;
        let record = PluginVersion {
            name: name.to_string(),
            version: 0,
            kind: loaded.kind,
            sha256: loaded.sha256.clone(),
            size: bytes.len() as u64,
            created_ms: now_ms(),
            document,
        };
        let version = self
            .store
            .add_plugin_version(tenant, record, &bytes)
            .await?;
        let compile = json!({"source": loaded.source, "ms": loaded.load_ms});
        self.loaded.insert(
            (tenant.to_string(), name.to_string(), version.version),
            Arc::new(loaded),
        );
        self.announce_plugin(tenant, name, version.version);
        Ok(Deployed {
            name: name.to_string(),
            version: version.version,
            kind: version.kind,
            sha256: version.sha256,
            size: version.size,
            compile,
            warnings: None,
        })
    }

    /// Validates a declarative flow document and deploys it as the next
    /// version of `name`, run by the `flow-graph` component.
    pub async fn deploy_flow(
        &self,
        tenant: &str,
        name: &str,
        document: &[u8],
    ) -> EngineResult<Deployed> {
        validate_id("flow", name)?;
        let parsed =
            plugboard_flowgraph::parse(document).map_err(|e| EngineError::InvalidFlow {
                message: e.to_string(),
                node: e.node.clone(),
                reason: e.reason.clone(),
            })?;
        let component = self
            .flow_graph
            .clone()
            .ok_or(EngineError::FlowGraphMissing)?;
        let doc: Value = serde_json::from_slice(document)
            .map_err(|e| CoreError::Invalid(format!("invalid JSON body: {e}")))?;
        let mut d = self.deploy(tenant, name, component, Some(doc)).await?;
        d.warnings = Some(parsed.warnings);
        Ok(d)
    }

    /// A flow's document at a version (default: the active one), with the
    /// active version number.
    pub async fn flow_document(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u64>,
    ) -> EngineResult<(u64, u64, Value)> {
        let info = self.plugin(tenant, name, "flow").await?;
        let version = version.unwrap_or(info.active_version);
        let v = info
            .version(version)
            .ok_or_else(|| CoreError::NotFound(format!("flow {name} version {version}")))?;
        let document = v.document.clone().ok_or_else(|| {
            EngineError::NotADocument(format!(
                "{name} version {version} is a compiled plugin, not a flow document"
            ))
        })?;
        Ok((version, info.active_version, document))
    }

    /// Makes `version` active (`None`: the one before the active one).
    pub async fn rollback(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u64>,
    ) -> EngineResult<u64> {
        let active = self.store.set_active_version(tenant, name, version).await?;
        self.announce_plugin(tenant, name, active);
        Ok(active)
    }

    /// Replaces a plugin's grants.
    pub async fn set_grants(&self, tenant: &str, name: &str, grants: &Grants) -> EngineResult<()> {
        grants.validate()?;
        Ok(self.store.set_grants(tenant, name, grants).await?)
    }

    /// Replaces a plugin's config (a JSON object of at most 64 KiB).
    pub async fn set_config(&self, tenant: &str, name: &str, config: &Value) -> EngineResult<()> {
        if !config.is_object() {
            return Err(CoreError::Invalid("config must be a JSON object".into()).into());
        }
        if config.to_string().len() > 64 << 10 {
            return Err(CoreError::Invalid("config must be at most 64 KiB".into()).into());
        }
        Ok(self.store.set_config(tenant, name, config).await?)
    }

    /// A plugin's config (`{}` if none).
    pub async fn config(&self, tenant: &str, name: &str) -> EngineResult<Value> {
        self.plugin(tenant, name, "plugin").await?;
        let v = self.store.config(tenant, name).await?;
        Ok(if v.is_null() { json!({}) } else { v })
    }

    /// Loads every tenant's active plugin versions (from the compile cache
    /// where possible), so that the first event after a restart is fast.
    /// Returns how many plugin versions were loaded; failures are logged
    /// and skipped.
    pub async fn preload(&self) -> EngineResult<usize> {
        let mut n = 0;
        for t in self.store.tenants().await? {
            self.capacity.remember(&t.id, &t.limits);
            for p in self.store.plugins(&t.id).await? {
                match self.loaded_version(&t.id, &p, p.active_version).await {
                    Ok(_) => n += 1,
                    Err(e) => tracing::warn!(
                        "could not load plugin {}/{} v{}: {e}",
                        t.id,
                        p.name,
                        p.active_version,
                    ),
                }
            }
        }
        Ok(n)
    }

    /// A value of the tenant's kv (what its plugins read and write, such
    /// as the kv-crm plugin's customer directory).
    pub async fn kv_get(&self, tenant: &str, key: &str) -> EngineResult<Option<Vec<u8>>> {
        kv_key(key)?;
        self.tenant(tenant).await?;
        Ok(self.store.kv_get(tenant, key).await?)
    }

    /// Writes a value of the tenant's kv, durably.
    pub async fn kv_set(&self, tenant: &str, key: &str, value: &[u8]) -> EngineResult<()> {
        kv_key(key)?;
        if value.len() > plugboard_host::KV_MAX_VALUE {
            return Err(CoreError::Invalid(format!(
                "a kv value is at most {} bytes",
                plugboard_host::KV_MAX_VALUE
            ))
            .into());
        }
        self.tenant(tenant).await?;
        Ok(self.store.kv_set(tenant, key, value).await?)
    }

    /// Deletes a key of the tenant's kv, durably.
    pub async fn kv_delete(&self, tenant: &str, key: &str) -> EngineResult<()> {
        kv_key(key)?;
        self.tenant(tenant).await?;
        Ok(self.store.kv_delete(tenant, key).await?)
    }

    /// A tenant's plugin `name` (its active version), which must be a
    /// `kind` plugin, ready to call: compiled, with its environment (its
    /// grants, its config with the secrets it is granted, the tenant's
    /// limits, kv, time zone), and the tenant.
    pub(crate) async fn plugin_call(
        &self,
        tenant: &str,
        name: &str,
        kind: PluginKind,
    ) -> EngineResult<(Arc<LoadedPlugin>, plugboard_host::PluginEnv, Tenant)> {
        let t = self.tenant(tenant).await?;
        let info = self.plugin(tenant, name, "plugin").await?;
        let plugin = self
            .loaded_version(tenant, &info, info.active_version)
            .await?;
        if plugin.kind != kind {
            return Err(CoreError::Invalid(format!(
                "plugin {name} is a {} plugin, not a {kind} plugin",
                plugin.kind
            ))
            .into());
        }
        let mut grants = info.grants.clone();
        let (config, _) = self
            .resolve_config(tenant, &mut grants, self.store.config(tenant, name).await?)
            .await?;
        let env = plugboard_host::PluginEnv {
            tenant: tenant.to_string(),
            plugin: name.to_string(),
            grants,
            config,
            limits: self.limits_for(&t),
            kv: Some(Arc::new(KvAdapter::new(self.store.clone()))),
            time_zone: t.time_zone.clone(),
            utc_offset_minutes: utc_offset_minutes(&t.time_zone, now_ms()),
            now_ms: None,
        };
        Ok((plugin, env, t))
    }

    /// A version of a plugin (whose record the caller has just read),
    /// compiled and ready: from memory, else loaded from the store.
    async fn loaded_version(
        &self,
        tenant: &str,
        info: &PluginInfo,
        version: u64,
    ) -> EngineResult<Arc<LoadedPlugin>> {
        let name = &info.name;
        let key = (tenant.to_string(), name.clone(), version);
        if let Some(p) = self.loaded.get(&key) {
            return Ok(p);
        }
        let v = info
            .version(version)
            .ok_or_else(|| CoreError::NotFound(format!("plugin {name} version {version}")))?;
        let bytes = self
            .store
            .plugin_bytes(tenant, &v.sha256)
            .await?
            .ok_or_else(|| CoreError::Storage("component bytes missing".into()))?;
        // Compiling (or reading the compile cache) is slow: off the
        // async threads.
        let host = self.host.clone();
        let sha = v.sha256.clone();
        let p = Arc::new(
            tokio::task::spawn_blocking(move || host.load_with_hash(sha, &bytes))
                .await
                .map_err(|e| EngineError::Internal(e.to_string()))?
                .map_err(|e| EngineError::PluginLoad(e.to_string()))?,
        );
        self.loaded.insert(key, p.clone());
        Ok(p)
    }

    /// Number of plugin versions loaded and ready.
    pub fn loaded_count(&self) -> usize {
        self.loaded.len()
    }

    // ----- addresses -----

    /// Maps an address of the tenant to one of its flows.
    pub async fn set_address(
        &self,
        tenant: &str,
        address: &str,
        channel: Channel,
        flow: String,
    ) -> EngineResult<Address> {
        let address = normalize_address(address);
        if address.is_empty() || address.len() > 256 {
            return Err(CoreError::Invalid("address must be 1-256 characters".into()).into());
        }
        let p = self.plugin(tenant, &flow, "flow").await?;
        if p.kind != PluginKind::Flow {
            return Err(EngineError::NotAFlow {
                name: flow,
                kind: p.kind,
            });
        }
        let a = Address {
            address,
            channel,
            flow,
        };
        self.store.set_address(tenant, &a).await?;
        Ok(a)
    }

    /// One address of a tenant.
    pub async fn address(&self, tenant: &str, address: &str) -> EngineResult<Address> {
        let a = normalize_address(address);
        self.store
            .address(tenant, &a)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("address {a}")).into())
    }

    /// All addresses of a tenant.
    pub async fn addresses(&self, tenant: &str) -> EngineResult<Vec<Address>> {
        Ok(self.store.addresses(tenant).await?)
    }

    /// The tenant and address an inbound address belongs to, if any.
    pub async fn route_address(&self, address: &str) -> EngineResult<Option<(String, Address)>> {
        Ok(self
            .store
            .address_owner(&normalize_address(address))
            .await?)
    }

    // ----- SIP users, registrations, trunks -----

    /// Creates or replaces a SIP user (an agent's phone) of the tenant.
    /// Only the digest hashes are stored.
    pub async fn set_sip_user(&self, tenant: &str, user: SipUser) -> EngineResult<()> {
        self.tenant(tenant).await?;
        Ok(self.store.set_sip_user(tenant, &user).await?)
    }

    /// A tenant's SIP user, for the registrar (`None`: no such tenant or user).
    pub async fn sip_user(&self, tenant: &str, name: &str) -> EngineResult<Option<SipUser>> {
        match self.store.tenant(tenant).await? {
            Some(_) => Ok(self.store.sip_user(tenant, name).await?),
            None => Ok(None),
        }
    }

    /// All SIP users of a tenant.
    pub async fn sip_users(&self, tenant: &str) -> EngineResult<Vec<SipUser>> {
        Ok(self.store.sip_users(tenant).await?)
    }

    /// A tenant's trunks (with credentials: for channels only): those of
    /// the config file, then those created over the API. A store error is
    /// returned, never read as "no trunks": trunks decide who may call in.
    pub async fn trunks(&self, tenant: &str) -> EngineResult<Vec<Trunk>> {
        let mut all = self.config_trunks.get(tenant).cloned().unwrap_or_default();
        for t in self.store.trunks(tenant).await? {
            if !all.iter().any(|c| c.name == t.name) {
                all.push(t);
            }
        }
        Ok(all)
    }

    /// A trunk from the server's config file.
    pub fn configured_trunk(&self, tenant: &str, name: &str) -> Option<&Trunk> {
        self.config_trunks
            .get(tenant)?
            .iter()
            .find(|t| t.name == name)
    }

    /// Creates or replaces a trunk over the API (`Conflict` for one from
    /// the config file).
    pub async fn set_trunk(&self, tenant: &str, trunk: &Trunk) -> EngineResult<()> {
        validate_id("trunk", &trunk.name)?;
        trunk.validate().map_err(CoreError::Invalid)?;
        if self.configured_trunk(tenant, &trunk.name).is_some() {
            return Err(CoreError::Conflict(format!(
                "trunk {} is defined in the server's config file; change it there",
                trunk.name
            ))
            .into());
        }
        Ok(self.store.set_trunk(tenant, trunk).await?)
    }

    /// Replaces a SIP user's bindings (expired ones are dropped); returns
    /// the live ones. Registrations are in the store (soft state), so
    /// every node sharing it reaches the phone, and a restart keeps them.
    pub async fn set_bindings(
        &self,
        tenant: &str,
        user: &str,
        bindings: Vec<Binding>,
    ) -> EngineResult<Vec<Binding>> {
        let now = now_ms();
        let live: Vec<Binding> = bindings
            .into_iter()
            .filter(|b| b.expires_ms > now)
            .collect();
        self.store.set_bindings(tenant, user, &live).await?;
        Ok(live)
    }

    /// A SIP user's live bindings.
    pub async fn bindings(&self, tenant: &str, user: &str) -> EngineResult<Vec<Binding>> {
        let now = now_ms();
        Ok(self
            .store
            .user_bindings(tenant, user)
            .await?
            .into_iter()
            .filter(|b| b.expires_ms > now)
            .collect())
    }

    // ----- recordings -----

    /// Stores a recording (WAV) of a tenant durably as a blob and returns
    /// its id (`rec-<interaction>-<n>`).
    pub async fn save_recording(
        &self,
        tenant: &str,
        interaction: &str,
        wav: &[u8],
    ) -> EngineResult<String> {
        self.check_storage(tenant, wav.len() as u64).await?;
        for n in 1..1000 {
            let id = format!("rec-{interaction}-{n}");
            match self.store.put_blob(tenant, &id, wav).await {
                Ok(()) => {
                    self.capacity.add_stored(tenant, wav.len() as u64);
                    // Billed once: a retry writes the same record again.
                    let unit = usage::recording_unit(&id, now_ms(), wav.len(), wav_length_ms(wav));
                    self.write_unit(tenant, unit).await;
                    return Ok(id);
                }
                Err(CoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CoreError::Storage("too many recordings for one interaction".into()).into())
    }

    /// A tenant's recording (WAV bytes), or `NotFound`. Recordings made
    /// before they moved into the store are read from the recordings
    /// directory, if one is configured.
    pub async fn recording(&self, tenant: &str, id: &str) -> EngineResult<Vec<u8>> {
        let not_found = || EngineError::from(CoreError::NotFound(format!("recording {id}")));
        if !is_recording_id(id) {
            return Err(not_found());
        }
        if let Some(b) = self.store.blob(tenant, id).await? {
            return Ok(b);
        }
        let file = self.legacy_recording(tenant, id).ok_or_else(not_found)?;
        tokio::fs::read(file).await.map_err(|_| not_found())
    }

    /// Where an earlier version kept a recording, if a recordings
    /// directory is configured and `id` is a recording's.
    pub(crate) fn legacy_recording(&self, tenant: &str, id: &str) -> Option<std::path::PathBuf> {
        let dir = self.recordings.as_ref().filter(|_| is_recording_id(id))?;
        Some(dir.join(tenant).join(format!("{id}.wav")))
    }

    // ----- interactions and events -----

    /// The newest `limit` interactions of a tenant, newest first.
    pub async fn interactions(&self, tenant: &str, limit: usize) -> EngineResult<Vec<Interaction>> {
        Ok(self.store.interactions(tenant, limit).await?)
    }

    /// One interaction of a tenant.
    pub async fn interaction(&self, tenant: &str, id: &str) -> EngineResult<Interaction> {
        self.store
            .interaction(tenant, id)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("interaction {id}")).into())
    }

    /// Subscribes to the event bus (every tenant's events: filter by
    /// [`StreamEvent::tenant`]).
    pub fn subscribe(&self) -> broadcast::Receiver<StreamEvent> {
        self.events.subscribe()
    }

    /// Tells a tenant's stream what an agent's softphone does (`data`
    /// names the `agent`): shown to that agent and to supervisors.
    pub fn softphone_event(&self, tenant: &str, data: Value) {
        self.publish(tenant, json!({"kind": "softphone", "data": data}));
    }

    /// Tells a tenant's stream how a fax call goes (`data`: its
    /// `direction`, `state` — `receiving`, `calling`, `sending`, `page`,
    /// `ended` — pages so far, numbers, and the `interaction` of a fax
    /// being sent).
    pub fn fax_event(&self, tenant: &str, data: Value) {
        let mut payload = json!({"kind": "fax", "data": data});
        if let Some(ix) = payload["data"].get("interaction").cloned() {
            payload["interaction"] = ix;
        }
        self.publish(tenant, payload);
    }

    fn publish(&self, tenant: &str, payload: Value) {
        let _ = self.events.send(StreamEvent {
            tenant: tenant.to_string(),
            payload,
            node: None,
        });
    }

    /// Outbound HTTP(S) on tenants' behalf (media URLs, webhooks): the
    /// plugins' own path, with the same grants, pools and network policy.
    pub fn fetcher(&self) -> &Arc<plugboard_host::fetch::Fetcher> {
        self.host.fetcher()
    }

    /// The metrics registry (channels count what they see in it).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Counts a security event (a lockout, …) and puts it on the
    /// operator's event stream (`GET /v1/events`, admin), not on any
    /// tenant's.
    pub fn security_event(&self, kind: &str, data: Value) {
        tracing::warn!("security event {kind}: {data}");
        self.metrics.security_event(kind);
        self.publish(
            OPERATOR,
            json!({"kind": "security", "event": kind, "at_ms": now_ms(), "data": data}),
        );
    }

    /// The Prometheus text exposition of the metrics.
    pub fn metrics_text(&self) -> String {
        let text = self.metrics.encode(self.loaded_count());
        // The fair-share gauges go before the OpenMetrics end marker.
        let body = text.strip_suffix("# EOF\n").unwrap_or(&text);
        let mut store = String::new();
        for (name, help, value) in self.store.gauges() {
            store.push_str(&format!(
                "# HELP plugboard_store_{name} {help}\n# TYPE plugboard_store_{name} gauge\nplugboard_store_{name} {value}\n"
            ));
        }
        format!(
            "{body}{}{}{}{}{}{store}{}# EOF\n",
            self.loaded.encode(),
            self.fair.encode(),
            self.host.fetcher().encode(),
            self.acd.encode(),
            self.capacity.encode(),
            self.tables.encode(&self.own_tables())
        )
    }

    /// The engine's own in-memory tables: name, entries, bound.
    fn own_tables(&self) -> Vec<(&'static str, usize, Option<usize>)> {
        let mut rows = self.acd.table_sizes();
        rows.extend(self.messaging.table_sizes());
        rows.extend(self.usage_meter.table_sizes());
        rows.push((
            "webhook_deliveries",
            self.hooks.running(),
            Some(webhooks::MAX_RUNNING),
        ));
        rows.push((
            "plugin_components",
            self.host.resident_components(),
            Some(self.host.max_components()),
        ));
        rows
    }

    /// The registry of in-memory tables `/metrics` shows: channels
    /// register theirs when they start.
    pub fn tables(&self) -> &tables::Tables {
        &self.tables
    }

    /// Runs a flow against scripted events, as `simulate` does, and
    /// records the interaction (marked simulated).
    pub async fn simulate(
        self: &Arc<Self>,
        tenant: &str,
        flow: &str,
        req: SimulateRequest,
    ) -> EngineResult<SimulateOutcome> {
        if req.events.len() > 100 {
            return Err(CoreError::Invalid("at most 100 events per simulation".into()).into());
        }
        let mut session = self
            .open_session(SessionStart {
                tenant: tenant.to_string(),
                flow: flow.to_string(),
                version: req.version,
                channel: req.channel,
                from: req.from,
                to: req.to,
                attributes: req.attributes,
                simulated: true,
                now_ms: req.now_ms,
            })
            .await?;
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
            let actions = session.redact(actions);
            let state = session.redact(json!(step.state));
            match step.error {
                None => {
                    steps.push(json!({"event": event, "actions": actions, "state": state, "elapsed_us": step.elapsed_us, "memory_bytes": step.memory_bytes}));
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
        session.finish().await?;
        Ok(SimulateOutcome {
            interaction: session.interaction.id.clone(),
            version,
            steps,
            failure,
        })
    }

    /// Runs one flow event in a fresh instance, bounded by the tenant's
    /// fair share of the host, and records metrics. A flow waiting on a
    /// host call (HTTP, the store) is a parked task, not a held thread.
    async fn run_flow(
        &self,
        share: usize,
        plugin: Arc<LoadedPlugin>,
        env: plugboard_host::PluginEnv,
        input: FlowInput,
        state: String,
        event: Event,
    ) -> Report<plugboard_host::FlowOutput> {
        let tenant = env.tenant.clone();
        let name = env.plugin.clone();
        let permit = self.fair.acquire(&tenant, share).await;
        let host = self.host.clone();
        // A task of its own: the invocation runs to its end even if the
        // caller stops waiting.
        let report = tokio::spawn(
            async move {
                let _permit = permit;
                host.invoke_flow(&plugin, env, &input, &state, &event).await
            }
            .in_current_span(),
        )
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
        self.observe(&tenant, &name, "flow", &report);
        report
    }
}

/// The length of a WAV file, ms, from its header's byte rate (0 when
/// the header is not one).
fn wav_length_ms(wav: &[u8]) -> u64 {
    let rate = wav
        .get(28..32)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0);
    if rate == 0 || wav.len() < 44 {
        return 0;
    }
    (wav.len() as u64 - 44) * 1000 / u64::from(rate)
}

/// A recording's id: `rec-` and letters, digits, `-`, `_` (nothing that
/// names another path).
fn is_recording_id(id: &str) -> bool {
    id.starts_with("rec-")
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A random token (`prefix` + 48 hex digits) from the operating system's
/// generator; an error if it has none (never a weaker fallback).
pub fn random_token(prefix: &str) -> EngineResult<String> {
    let mut b = [0u8; 24];
    getrandom::fill(&mut b).map_err(|e| EngineError::Random(e.to_string()))?;
    Ok(format!("{prefix}{}", hex::encode(b)))
}

/// The offset from UTC, in minutes, of time zone `tz` at `at_ms` (0 if the
/// zone is unknown, which creation refuses).
/// Checks a kv key as the plugins' kv does (1 to
/// [`plugboard_host::KV_MAX_KEY`] bytes).
fn kv_key(key: &str) -> EngineResult<()> {
    if key.is_empty() || key.len() > plugboard_host::KV_MAX_KEY {
        return Err(CoreError::Invalid(format!(
            "a kv key is 1-{} bytes",
            plugboard_host::KV_MAX_KEY
        ))
        .into());
    }
    Ok(())
}

fn utc_offset_minutes(tz: &str, at_ms: u64) -> i32 {
    let Ok(zone) = jiff::tz::TimeZone::get(tz) else {
        return 0;
    };
    let Ok(ts) = jiff::Timestamp::from_millisecond(at_ms as i64) else {
        return 0;
    };
    zone.to_offset(ts).seconds() / 60
}

fn interaction_nonce() -> EngineResult<u32> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|e| EngineError::Random(e.to_string()))?;
    Ok(u32::from_le_bytes(b))
}

/// The host's `kv` import on the tenant's store.
struct KvAdapter {
    store: Arc<dyn Store>,
}

impl KvAdapter {
    fn new(store: Arc<dyn Store>) -> Self {
        KvAdapter { store }
    }
}

#[async_trait::async_trait]
impl plugboard_core::TenantKv for KvAdapter {
    async fn kv_get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>, CoreError> {
        self.store.kv_get(tenant, key).await
    }
    async fn kv_set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<(), CoreError> {
        self.store.kv_set(tenant, key, value).await
    }
    async fn kv_delete(&self, tenant: &str, key: &str) -> Result<(), CoreError> {
        self.store.kv_delete(tenant, key).await
    }
}
