//! Plugboard's WebAssembly plugin host.
//!
//! Runs tenants' plugins — components of the four worlds in `wit/` (flow,
//! router, tts, crm) — in-process under wasmtime, each event in a fresh
//! instance from the pooling allocator:
//!
//! - **compile once**: a component is compiled on first deploy and the
//!   artifact cached on disk under its SHA-256, so restarts deserialize
//!   instead of compiling; identical components share one compiled copy in
//!   memory, whichever tenants deployed them;
//! - **core modules accepted** ([`componentize`]): a plugin built for
//!   `wasm32-unknown-unknown` (WIT world embedded by `wit-bindgen`) is wrapped
//!   into a component before compiling; with no WASI it instantiates one core
//!   module instead of three;
//! - **`InstancePre` per version** ([`LoadedPlugin`]): imports are resolved
//!   and exports found and type-checked once, leaving instantiate + call per
//!   event;
//! - **limits per tenant** ([`Limits`]): linear memory cap (a resource
//!   limiter), CPU deadline (epoch interruption; time blocked in host I/O is
//!   not counted), output size, action count and host-call quotas;
//! - **capabilities** ([`plugboard_core::Grants`]): `http` only to
//!   allow-listed `host:port`, `kv` scoped to the tenant, deny by default.
//!   WASI is linked with nothing inherited: no files, no environment, no
//!   sockets.
//!
//! A trap, timeout, memory overrun or oversized output is returned as an
//! [`InvokeError`]; nothing a plugin does can take the host down.

use plugboard_core::{Channel, Event, Grants, PluginKind, TenantKv, flow::Action};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;
use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

pub mod bindings;
mod convert;
mod ctx;
mod export;
pub mod fetch;

use ctx::Ctx;
pub use ctx::{HostCall, KV_MAX_KEY, KV_MAX_VALUE, LogLine};
use export::{Export, Exports};

/// Errors loading a plugin.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The bytes are not a valid component, or failed to compile.
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    /// The component exports none of the four plugin worlds.
    #[error("component is not a Plugboard plugin: {0}")]
    NotAPlugin(String),
    /// The component imports something the host does not provide.
    #[error("component imports something Plugboard does not provide: {0}")]
    Link(String),
    /// The engine could not be set up.
    #[error("engine: {0}")]
    Engine(String),
    /// The compile cache failed.
    #[error("cache: {0}")]
    Cache(String),
}

/// Why an invocation failed. Every variant is contained: the host goes on.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum InvokeError {
    /// The plugin ran past its CPU deadline and was stopped.
    #[error("plugin exceeded its {budget_ms} ms CPU deadline and was stopped")]
    Timeout {
        /// The budget.
        budget_ms: u64,
    },
    /// The plugin tried to grow its memory past the cap.
    #[error("plugin exceeded its memory limit of {limit_bytes} bytes")]
    MemoryLimit {
        /// The cap.
        limit_bytes: usize,
    },
    /// The plugin returned more output than allowed.
    #[error("plugin output of {bytes} bytes exceeds the limit of {limit} bytes")]
    OutputTooLarge {
        /// Output size.
        bytes: usize,
        /// The cap.
        limit: usize,
    },
    /// The plugin returned more actions than allowed.
    #[error("plugin returned {count} actions; the limit is {limit}")]
    TooManyActions {
        /// Number returned.
        count: usize,
        /// The cap.
        limit: usize,
    },
    /// The plugin trapped (panic, unreachable, out-of-bounds…).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The plugin returned an `err`.
    #[error("plugin returned an error: {0}")]
    Plugin(String),
    /// The plugin is not of the kind asked for.
    #[error("plugin is a {actual} plugin, not a {expected} plugin")]
    WrongKind {
        /// Kind asked for.
        expected: PluginKind,
        /// Kind it is.
        actual: PluginKind,
    },
    /// Instantiation failed (e.g. every pool slot busy).
    #[error("plugin could not be instantiated: {0}")]
    Instantiate(String),
}

impl InvokeError {
    /// A stable machine-readable code, as used in API errors and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            InvokeError::Timeout { .. } => "plugin_timeout",
            InvokeError::MemoryLimit { .. } => "plugin_memory_limit",
            InvokeError::OutputTooLarge { .. } => "plugin_output_too_large",
            InvokeError::TooManyActions { .. } => "plugin_too_many_actions",
            InvokeError::Trap(_) => "plugin_trap",
            InvokeError::Plugin(_) => "plugin_error",
            InvokeError::WrongKind { .. } => "plugin_wrong_kind",
            InvokeError::Instantiate(_) => "plugin_instantiate",
        }
    }
}

/// Per-tenant execution limits.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Linear memory cap per instance, bytes.
    pub memory_bytes: usize,
    /// Table elements cap per instance.
    pub table_elements: usize,
    /// CPU deadline per invocation, ms (host I/O waits excluded).
    pub deadline_ms: u64,
    /// Output cap (actions + state), bytes.
    pub output_bytes: usize,
    /// Most actions per flow response.
    pub max_actions: usize,
    /// `http.fetch` calls per invocation.
    pub http_calls: u32,
    /// `kv` calls per invocation.
    pub kv_calls: u32,
    /// `log` lines kept per invocation.
    pub log_lines: u32,
    /// The tenant's HTTP requests in flight at once, over all its
    /// invocations (at least its share of plugin instances).
    pub http_in_flight: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            table_elements: 100_000,
            deadline_ms: 50,
            output_bytes: 256 << 10,
            max_actions: 100,
            http_calls: 10,
            kv_calls: 100,
            log_lines: 100,
            http_in_flight: fetch::TENANT_IN_FLIGHT as u32,
        }
    }
}

/// Everything about the tenant and plugin an invocation runs for.
#[derive(Clone, Default)]
pub struct PluginEnv {
    /// Tenant id.
    pub tenant: String,
    /// Plugin name.
    pub plugin: String,
    /// Grants.
    pub grants: Grants,
    /// Plugin configuration (a JSON object or null).
    pub config: serde_json::Value,
    /// Limits.
    pub limits: Limits,
    /// Tenant-scoped key-value store, if the server has one.
    pub kv: Option<Arc<dyn TenantKv>>,
    /// Tenant time zone name.
    pub time_zone: String,
    /// Tenant UTC offset in minutes.
    pub utc_offset_minutes: i32,
    /// Pinned clock (for reproducible simulation); the real clock if `None`.
    pub now_ms: Option<u64>,
}

/// Host-wide settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Directory for compiled artifacts; no disk cache if `None`.
    pub cache_dir: Option<PathBuf>,
    /// Instances that may run at once (pool size).
    pub max_concurrent: u32,
    /// Largest linear memory any tenant may be given, bytes.
    pub max_memory_bytes: usize,
    /// Epoch tick (deadline granularity).
    pub epoch_tick: Duration,
    /// Networks besides the public internet that tenants' HTTP may reach.
    pub net: fetch::NetPolicy,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: None,
            max_concurrent: 64,
            max_memory_bytes: 256 << 20,
            epoch_tick: Duration::from_millis(2),
            net: fetch::NetPolicy::default(),
        }
    }
}

/// Where a loaded component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadSource {
    /// Already in memory (same bytes loaded before).
    Memory,
    /// Deserialized from the on-disk cache.
    DiskCache,
    /// Compiled now.
    Compiled,
}

/// A plugin version ready to run: compiled, kind known, imports resolved.
pub struct LoadedPlugin {
    /// SHA-256 of the component (hex).
    pub sha256: String,
    /// Detected kind.
    pub kind: PluginKind,
    /// Where the compiled code came from.
    pub source: LoadSource,
    /// Time taken to load (compile or deserialize), ms.
    pub load_ms: u64,
    pre: InstancePre<Ctx>,
    exports: Exports,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("sha256", &self.sha256)
            .field("kind", &self.kind)
            .finish()
    }
}

/// The outcome of one invocation, with what the plugin logged and called.
#[derive(Debug)]
pub struct Report<T> {
    /// Result.
    pub outcome: Result<T, InvokeError>,
    /// Log lines.
    pub logs: Vec<LogLine>,
    /// Host calls made.
    pub calls: Vec<HostCall>,
    /// Wall time including instantiation, µs.
    pub elapsed_us: u64,
    /// Linear memory the instance held (all its memories), bytes.
    pub memory_bytes: usize,
}

/// The interaction as a flow sees it.
#[derive(Debug, Clone, Default)]
pub struct FlowInput {
    /// Interaction id.
    pub id: String,
    /// Tenant id.
    pub tenant: String,
    /// Channel.
    pub channel: Channel,
    /// Customer address.
    pub from: String,
    /// Tenant address.
    pub to: String,
    /// Attributes.
    pub attributes: Vec<(String, String)>,
}

/// A flow's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowOutput {
    /// Actions, in order.
    pub actions: Vec<Action>,
    /// New state, if changed.
    pub state: Option<String>,
}

/// A task to route (JSON mirror of the router WIT `task`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RouteTask {
    /// Interaction id.
    pub id: String,
    /// Channel name.
    pub channel: String,
    /// Queue.
    pub queue: String,
    /// Priority.
    #[serde(default)]
    pub priority: u32,
    /// Required skills.
    #[serde(default)]
    pub skills: Vec<String>,
    /// Attributes.
    #[serde(default)]
    pub attributes: Vec<(String, String)>,
    /// Time waited, ms.
    #[serde(default)]
    pub waited_ms: u64,
}

/// A candidate agent (JSON mirror of the router WIT `agent`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RouteAgent {
    /// Agent id.
    pub id: String,
    /// Skills with levels 1–10.
    #[serde(default)]
    pub skills: Vec<(String, u8)>,
    /// Idle time, ms.
    #[serde(default)]
    pub idle_ms: u64,
    /// Tasks in hand.
    #[serde(default)]
    pub active_tasks: u32,
}

/// A router's decision.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RouteDecision {
    /// Agent ids, best first.
    pub ranked: Vec<String>,
    /// New priority.
    pub priority: Option<u32>,
}

/// A CRM profile.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CrmProfile {
    /// CRM id.
    pub id: String,
    /// Name.
    pub name: Option<String>,
    /// Other fields.
    pub attributes: Vec<(String, String)>,
}

/// A finished interaction, for a CRM's history (JSON mirror of the crm WIT `summary`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CrmSummary {
    /// Interaction id.
    pub id: String,
    /// Channel.
    pub channel: Channel,
    /// Customer address.
    pub from: String,
    /// Tenant address.
    pub to: String,
    /// Start, ms since the Unix epoch.
    pub started_ms: u64,
    /// End, ms since the Unix epoch.
    pub ended_ms: u64,
    /// Agent, if any.
    pub agent: Option<String>,
    /// Disposition, if any.
    pub disposition: Option<String>,
    /// Attributes.
    pub attributes: Vec<(String, String)>,
}

/// What a TTS plugin produced.
#[derive(Debug, Clone, PartialEq)]
pub enum TtsOutput {
    /// PCM audio.
    Audio {
        /// Sample rate, Hz.
        sample_rate: u32,
        /// Mono s16 samples.
        samples: Vec<i16>,
    },
    /// Rewritten text for the built-in engine.
    Text {
        /// Text or SSML.
        text: String,
        /// Voice.
        voice: Option<String>,
        /// Language.
        language: Option<String>,
    },
}

/// Compiled components kept by their hash unless the host is told
/// otherwise ([`PluginHost::set_max_components`]).
pub const DEFAULT_MAX_COMPONENTS: usize = 512;

/// Compiled components by SHA-256, each with when it was last used.
type Components = HashMap<String, (Component, u64)>;

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The plugin host: one wasmtime engine, one linker, a compile cache and an
/// epoch ticker. Cheap to share (`Arc`); all methods take `&self`.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<Ctx>,
    cache_dir: Option<PathBuf>,
    /// Compiled components by SHA-256, with when each was last used: at
    /// most `max_components` (the one used longest ago goes first; a
    /// loaded plugin keeps its own copy).
    components: Mutex<(Components, u64)>,
    max_components: std::sync::atomic::AtomicUsize,
    tick: Duration,
    max_concurrent: u32,
    max_memory_bytes: usize,
    fetcher: Arc<fetch::Fetcher>,
    stop: Arc<AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

/// The span of one plugin invocation (exported as a trace span when
/// traces are on): its world, tenant and plugin.
fn plugin_span(world: &'static str, env: &PluginEnv) -> tracing::Span {
    tracing::debug_span!(
        "plugin_call",
        world,
        tenant = %env.tenant,
        plugin = %env.plugin
    )
}

impl PluginHost {
    /// Outbound HTTP(S) on tenants' behalf (plugins, media URLs), with
    /// the operator's network policy and pooled connections.
    pub fn fetcher(&self) -> &Arc<fetch::Fetcher> {
        &self.fetcher
    }

    /// Creates the engine (pooling allocator, epoch interruption), links
    /// WASI and the `plugboard:host` imports, and starts the epoch ticker.
    pub fn new(config: HostConfig) -> Result<Self, HostError> {
        let n = config.max_concurrent.max(1);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(n)
            .total_core_instances(n * 16)
            .total_memories(n * 4)
            .total_tables(n * 8)
            .total_stacks(n)
            .max_core_instances_per_component(64)
            .max_memories_per_component(16)
            .max_tables_per_component(32)
            .max_memory_size(config.max_memory_bytes)
            .table_elements(200_000)
            .max_component_instance_size(4 << 20)
            .max_core_instance_size(4 << 20)
            // Reset a returned slot in user space instead of unmapping it:
            // with PAGEMAP_SCAN (Linux ≥ 6.7) only the pages the instance
            // dirtied are restored, up to 2 MiB; the rest is decommitted.
            // Avoiding madvise, TLB shootdowns and page faults on the next
            // instantiation took per-event p50 from ~38 µs to ~15 µs here.
            // Where the ioctl is missing, wasmtime falls back to memset +
            // madvise.
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut cfg = Config::new();
        cfg.wasm_component_model(true)
            .epoch_interruption(true)
            .parallel_compilation(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg).map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let mut linker: Linker<Ctx> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        bindings::host::Imports::add_to_linker::<Ctx, HasSelf<Ctx>>(&mut linker, |c| c)
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        // The worlds' own type-only interfaces (e.g. `plugboard:flow/types`).
        linker.allow_shadowing(true);
        bindings::flow::plugboard::flow::types::add_to_linker::<Ctx, HasSelf<Ctx>>(
            &mut linker,
            |c| c,
        )
        .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        bindings::router::plugboard::router::types::add_to_linker::<Ctx, HasSelf<Ctx>>(
            &mut linker,
            |c| c,
        )
        .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        bindings::tts::plugboard::tts::types::add_to_linker::<Ctx, HasSelf<Ctx>>(
            &mut linker,
            |c| c,
        )
        .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        bindings::crm::plugboard::crm::types::add_to_linker::<Ctx, HasSelf<Ctx>>(
            &mut linker,
            |c| c,
        )
        .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| HostError::Cache(e.to_string()))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = stop.clone();
            let tick = config.epoch_tick;
            std::thread::Builder::new()
                .name("plugboard-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| HostError::Engine(e.to_string()))?
        };
        Ok(PluginHost {
            engine,
            linker,
            cache_dir: config.cache_dir,
            components: Mutex::new((HashMap::new(), 0)),
            max_components: std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_COMPONENTS),
            tick: config.epoch_tick,
            max_concurrent: n,
            max_memory_bytes: config.max_memory_bytes,
            fetcher: Arc::new(fetch::Fetcher::new(config.net.clone())),
            stop,
            ticker: Some(ticker),
        })
    }

    /// How many invocations may run at once; callers should queue beyond this.
    pub fn max_concurrent(&self) -> u32 {
        self.max_concurrent
    }

    /// The largest linear memory any tenant may be given, bytes.
    pub fn max_memory_bytes(&self) -> usize {
        self.max_memory_bytes
    }

    /// Number of distinct compiled components held in memory.
    pub fn resident_components(&self) -> usize {
        self.components.lock().map(|m| m.0.len()).unwrap_or(0)
    }

    /// The bound on compiled components kept by their hash
    /// ([`DEFAULT_MAX_COMPONENTS`] unless set).
    pub fn max_components(&self) -> usize {
        self.max_components.load(Ordering::Relaxed)
    }

    /// Sets the bound on compiled components kept by their hash (at
    /// least 1); those used longest ago go first.
    pub fn set_max_components(&self, max: usize) {
        self.max_components.store(max.max(1), Ordering::Relaxed);
    }

    fn cache_path(&self, sha: &str) -> Option<PathBuf> {
        self.cache_dir
            .as_ref()
            .map(|d| d.join(format!("{sha}.cwasm")))
    }

    fn component(&self, sha: &str, bytes: &[u8]) -> Result<(Component, LoadSource), HostError> {
        if let Ok(mut guard) = self.components.lock() {
            let (map, clock) = &mut *guard;
            *clock += 1;
            if let Some((c, used)) = map.get_mut(sha) {
                *used = *clock;
                return Ok((c.clone(), LoadSource::Memory));
            }
        }
        let mut source = LoadSource::Compiled;
        let mut component = None;
        if let Some(path) = self.cache_path(sha)
            && path.exists()
        {
            match deserialize_cached(&self.engine, &path) {
                Ok(c) => {
                    component = Some(c);
                    source = LoadSource::DiskCache;
                }
                Err(e) => tracing::warn!("ignoring stale compile cache {}: {e:#}", path.display()),
            }
        }
        let component = match component {
            Some(c) => c,
            None => {
                let c = Component::new(&self.engine, &componentize(bytes)?)
                    .map_err(|e| HostError::Compile(format!("{e:#}")))?;
                if let Some(path) = self.cache_path(sha) {
                    let compiled = c
                        .serialize()
                        .map_err(|e| HostError::Cache(format!("{e:#}")))?;
                    // A name of our own: several processes may share the cache.
                    let tmp = path.with_extension(format!(
                        "{}.{}.tmp",
                        std::process::id(),
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.subsec_nanos())
                            .unwrap_or(0)
                    ));
                    std::fs::write(&tmp, &compiled)
                        .and_then(|()| std::fs::rename(&tmp, &path))
                        .map_err(|e| HostError::Cache(e.to_string()))?;
                }
                c
            }
        };
        if let Ok(mut guard) = self.components.lock() {
            let (map, clock) = &mut *guard;
            *clock += 1;
            map.insert(sha.to_string(), (component.clone(), *clock));
            while map.len() > self.max_components() {
                let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                map.remove(&oldest);
            }
        }
        Ok((component, source))
    }

    /// Tells which world a component implements from its exports.
    pub fn detect_kind(&self, component: &Component) -> Result<PluginKind, HostError> {
        let ty = component.component_type();
        let names: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        for (export, kind) in [
            (bindings::FLOW_EXPORT, PluginKind::Flow),
            (bindings::ROUTER_EXPORT, PluginKind::Router),
            (bindings::TTS_EXPORT, PluginKind::Tts),
            (bindings::CRM_EXPORT, PluginKind::Crm),
        ] {
            if names.iter().any(|n| n == export) {
                return Ok(kind);
            }
        }
        Err(HostError::NotAPlugin(format!(
            "it must export one of {}, {}, {} or {}; it exports [{}]",
            bindings::FLOW_EXPORT,
            bindings::ROUTER_EXPORT,
            bindings::TTS_EXPORT,
            bindings::CRM_EXPORT,
            names.join(", ")
        )))
    }

    /// Loads a component: compiles it (or takes it from the memory or disk
    /// cache), detects its kind and resolves its imports.
    pub fn load(&self, bytes: &[u8]) -> Result<LoadedPlugin, HostError> {
        let sha = sha256_hex(bytes);
        self.load_with_hash(sha, bytes)
    }

    /// As [`PluginHost::load`], with the hash already known.
    pub fn load_with_hash(&self, sha256: String, bytes: &[u8]) -> Result<LoadedPlugin, HostError> {
        let t0 = Instant::now();
        let (component, source) = self.component(&sha256, bytes)?;
        let kind = self.detect_kind(&component)?;
        let ipre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| HostError::Link(format!("{e:#}")))?;
        let exports = match kind {
            PluginKind::Flow => Export::find(&ipre).map(Exports::Flow),
            PluginKind::Router => Export::find(&ipre).map(Exports::Router),
            PluginKind::Tts => Export::find(&ipre).map(Exports::Tts),
            PluginKind::Crm => {
                Export::find(&ipre).and_then(|l| Ok(Exports::Crm(l, Export::find(&ipre)?)))
            }
        }
        .map_err(|e| HostError::Link(format!("{e:#}")))?;
        Ok(LoadedPlugin {
            sha256,
            kind,
            source,
            load_ms: t0.elapsed().as_millis() as u64,
            pre: ipre,
            exports,
        })
    }

    /// A fresh store with the tenant's limits. The CPU deadline is checked
    /// at every epoch tick, where a plugin that has not used it up yields
    /// to other tasks, so a busy plugin cannot hold an executor thread for
    /// its whole budget; time yielded or waiting in host calls is not
    /// counted against it.
    fn store(&self, env: PluginEnv) -> (Store<Ctx>, Instant) {
        let t0 = Instant::now();
        let budget = Duration::from_millis(env.limits.deadline_ms);
        let mut store = Store::new(&self.engine, Ctx::new(env, self.fetcher.clone()));
        store.limiter(|c| c);
        store.set_epoch_deadline(ticks(budget, self.tick).min(YIELD_TICKS));
        let tick = self.tick;
        store.epoch_deadline_callback(move |mut ctx| {
            let used = ctx.data().cpu_time();
            if used >= budget {
                ctx.data_mut().timed_out = true;
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            let left = ticks(budget - used, tick).min(YIELD_TICKS);
            let yielded = ctx.data().yielded_ns.clone();
            Ok(wasmtime::UpdateDeadline::YieldCustom(
                left,
                Box::pin(async move {
                    let t = Instant::now();
                    tokio::task::yield_now().await;
                    yielded.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }),
            ))
        });
        (store, t0)
    }

    /// The report of an invocation run in `store`: failures classified.
    fn finish<T>(
        store: Store<Ctx>,
        t0: Instant,
        r: wasmtime::Result<Result<T, InvokeError>>,
    ) -> Report<T> {
        let ctx = store.into_data();
        let limits = &ctx.env.limits;
        let outcome = match r {
            // A guest that catches its own out-of-memory (JavaScript and
            // Python engines do) and returns an error hit the cap all the same.
            Ok(Err(InvokeError::Plugin(_))) if ctx.memory_exceeded => {
                Err(InvokeError::MemoryLimit {
                    limit_bytes: limits.memory_bytes,
                })
            }
            Ok(v) => v,
            Err(e) => Err(if ctx.timed_out {
                InvokeError::Timeout {
                    budget_ms: limits.deadline_ms,
                }
            } else if ctx.memory_exceeded {
                InvokeError::MemoryLimit {
                    limit_bytes: limits.memory_bytes,
                }
            } else if e.downcast_ref::<Trap>().is_some() {
                InvokeError::Trap(truncate(format!("{e:#}"), 2000))
            } else {
                InvokeError::Instantiate(truncate(format!("{e:#}"), 2000))
            }),
        };
        Report {
            outcome,
            logs: ctx.logs,
            calls: ctx.calls,
            elapsed_us: t0.elapsed().as_micros() as u64,
            memory_bytes: ctx.memory_bytes,
        }
    }

    fn wrong_kind<T>(expected: PluginKind, p: &LoadedPlugin) -> Report<T> {
        Report {
            outcome: Err(InvokeError::WrongKind {
                expected,
                actual: p.kind,
            }),
            logs: Vec::new(),
            calls: Vec::new(),
            elapsed_us: 0,
            memory_bytes: 0,
        }
    }

    /// Calls a flow's `handle` for one event in a fresh instance.
    pub async fn invoke_flow(
        &self,
        plugin: &LoadedPlugin,
        env: PluginEnv,
        interaction: &FlowInput,
        state: &str,
        event: &Event,
    ) -> Report<FlowOutput> {
        let Exports::Flow(handle) = &plugin.exports else {
            return Self::wrong_kind(PluginKind::Flow, plugin);
        };
        let limits = env.limits.clone();
        let ix = bindings::flow::plugboard::flow::types::Interaction {
            id: interaction.id.clone(),
            tenant: interaction.tenant.clone(),
            channel: convert::channel_to_wit(interaction.channel),
            from: interaction.from.clone(),
            to: interaction.to.clone(),
            attributes: interaction.attributes.clone(),
        };
        let ev = convert::event_to_wit(event);
        let span = plugin_span("flow", &env);
        let (mut store, t0) = self.store(env);
        let r = async {
            let inst = plugin.pre.instantiate_async(&mut store).await?;
            let (r,) = handle.call(&mut store, &inst, (&ix, state, &ev)).await?;
            Ok(match r {
                Err(msg) => Err(InvokeError::Plugin(truncate(msg, 2000))),
                Ok(resp) => {
                    let size = resp.actions.iter().map(convert::action_size).sum::<usize>()
                        + resp.state.as_ref().map_or(0, String::len);
                    if size > limits.output_bytes {
                        Err(InvokeError::OutputTooLarge {
                            bytes: size,
                            limit: limits.output_bytes,
                        })
                    } else if resp.actions.len() > limits.max_actions {
                        Err(InvokeError::TooManyActions {
                            count: resp.actions.len(),
                            limit: limits.max_actions,
                        })
                    } else {
                        Ok(FlowOutput {
                            actions: resp
                                .actions
                                .into_iter()
                                .map(convert::action_from_wit)
                                .collect(),
                            state: resp.state,
                        })
                    }
                }
            })
        }
        .instrument(span)
        .await;
        Self::finish(store, t0, r)
    }

    /// Calls a router's `route` in a fresh instance.
    pub async fn invoke_router(
        &self,
        plugin: &LoadedPlugin,
        env: PluginEnv,
        task: &RouteTask,
        candidates: &[RouteAgent],
    ) -> Report<RouteDecision> {
        use bindings::router::plugboard::router::types as rt;
        let Exports::Router(route) = &plugin.exports else {
            return Self::wrong_kind(PluginKind::Router, plugin);
        };
        let limits = env.limits.clone();
        let t = rt::Task {
            id: task.id.clone(),
            channel: task.channel.clone(),
            queue: task.queue.clone(),
            priority: task.priority,
            skills: task.skills.clone(),
            attributes: task.attributes.clone(),
            waited_ms: task.waited_ms,
        };
        let agents: Vec<rt::Agent> = candidates
            .iter()
            .map(|a| rt::Agent {
                id: a.id.clone(),
                skills: a
                    .skills
                    .iter()
                    .map(|(name, level)| rt::Skill {
                        name: name.clone(),
                        level: *level,
                    })
                    .collect(),
                idle_ms: a.idle_ms,
                active_tasks: a.active_tasks,
            })
            .collect();
        let span = plugin_span("router", &env);
        let (mut store, t0) = self.store(env);
        let r = async {
            let inst = plugin.pre.instantiate_async(&mut store).await?;
            let (r,) = route.call(&mut store, &inst, (&t, &agents)).await?;
            Ok(match r {
                Err(msg) => Err(InvokeError::Plugin(truncate(msg, 2000))),
                Ok(d) => {
                    let size: usize = d.ranked.iter().map(|s| s.len() + 8).sum();
                    if size > limits.output_bytes {
                        Err(InvokeError::OutputTooLarge {
                            bytes: size,
                            limit: limits.output_bytes,
                        })
                    } else {
                        Ok(RouteDecision {
                            ranked: d.ranked,
                            priority: d.priority,
                        })
                    }
                }
            })
        }
        .instrument(span)
        .await;
        Self::finish(store, t0, r)
    }

    /// Calls a CRM's `lookup` in a fresh instance.
    pub async fn invoke_crm_lookup(
        &self,
        plugin: &LoadedPlugin,
        env: PluginEnv,
        channel: Channel,
        address: &str,
    ) -> Report<Option<CrmProfile>> {
        let Exports::Crm(lookup, _) = &plugin.exports else {
            return Self::wrong_kind(PluginKind::Crm, plugin);
        };
        let limits = env.limits.clone();
        let channel = channel.to_string();
        let span = plugin_span("crm.lookup", &env);
        let (mut store, t0) = self.store(env);
        let r = async {
            let inst = plugin.pre.instantiate_async(&mut store).await?;
            let (r,) = lookup.call(&mut store, &inst, (&channel, address)).await?;
            Ok(match r {
                Err(msg) => Err(InvokeError::Plugin(truncate(msg, 2000))),
                Ok(p) => {
                    let p = p.map(|p| CrmProfile {
                        id: p.id,
                        name: p.name,
                        attributes: p.attributes,
                    });
                    let size = p.as_ref().map_or(0, |p| {
                        p.id.len()
                            + p.name.as_ref().map_or(0, String::len)
                            + p.attributes
                                .iter()
                                .map(|(k, v)| k.len() + v.len())
                                .sum::<usize>()
                    });
                    if size > limits.output_bytes {
                        Err(InvokeError::OutputTooLarge {
                            bytes: size,
                            limit: limits.output_bytes,
                        })
                    } else {
                        Ok(p)
                    }
                }
            })
        }
        .instrument(span)
        .await;
        Self::finish(store, t0, r)
    }

    /// Calls a CRM's `record-interaction` in a fresh instance.
    pub async fn invoke_crm_record(
        &self,
        plugin: &LoadedPlugin,
        env: PluginEnv,
        summary: &CrmSummary,
    ) -> Report<()> {
        use bindings::crm::plugboard::crm::types as ct;
        let Exports::Crm(_, record) = &plugin.exports else {
            return Self::wrong_kind(PluginKind::Crm, plugin);
        };
        let s = ct::Summary {
            id: summary.id.clone(),
            channel: summary.channel.to_string(),
            from: summary.from.clone(),
            to: summary.to.clone(),
            started_ms: summary.started_ms,
            ended_ms: summary.ended_ms,
            agent: summary.agent.clone(),
            disposition: summary.disposition.clone(),
            attributes: summary.attributes.clone(),
        };
        let span = plugin_span("crm.record", &env);
        let (mut store, t0) = self.store(env);
        let r = async {
            let inst = plugin.pre.instantiate_async(&mut store).await?;
            let (r,) = record.call(&mut store, &inst, (&s,)).await?;
            Ok(r.map_err(|msg| InvokeError::Plugin(truncate(msg, 2000))))
        }
        .instrument(span)
        .await;
        Self::finish(store, t0, r)
    }

    /// Calls a TTS plugin's `synthesize` in a fresh instance. Audio may be
    /// up to 16× the output cap (it is binary and bulky by nature).
    pub async fn invoke_tts(
        &self,
        plugin: &LoadedPlugin,
        env: PluginEnv,
        text: &str,
        voice: Option<&str>,
        language: Option<&str>,
    ) -> Report<TtsOutput> {
        use bindings::tts::plugboard::tts::types as tt;
        let Exports::Tts(synthesize) = &plugin.exports else {
            return Self::wrong_kind(PluginKind::Tts, plugin);
        };
        let limits = env.limits.clone();
        let req = tt::Request {
            text: text.to_string(),
            voice: voice.map(str::to_string),
            language: language.map(str::to_string),
        };
        let span = plugin_span("tts", &env);
        let (mut store, t0) = self.store(env);
        let r = async {
            let inst = plugin.pre.instantiate_async(&mut store).await?;
            let (r,) = synthesize.call(&mut store, &inst, (&req,)).await?;
            Ok(match r {
                Err(msg) => Err(InvokeError::Plugin(truncate(msg, 2000))),
                Ok(tt::Output::Audio(a)) => {
                    let bytes = a.samples.len() * 2;
                    if bytes > limits.output_bytes * 16 {
                        Err(InvokeError::OutputTooLarge {
                            bytes,
                            limit: limits.output_bytes * 16,
                        })
                    } else {
                        Ok(TtsOutput::Audio {
                            sample_rate: a.sample_rate,
                            samples: a.samples,
                        })
                    }
                }
                Ok(tt::Output::Text(t)) => Ok(TtsOutput::Text {
                    text: t.text,
                    voice: t.voice,
                    language: t.language,
                }),
            })
        }
        .instrument(span)
        .await;
        Self::finish(store, t0, r)
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

/// Epoch ticks between two checks of a running plugin's deadline, where
/// it yields to other tasks.
const YIELD_TICKS: u64 = 1;

/// Epoch ticks that cover `d` (rounded up, at least one).
fn ticks(d: Duration, tick: Duration) -> u64 {
    (d.as_nanos() / tick.as_nanos().max(1)) as u64 + 1
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The component for `bytes`: a component as it is, or a core module (a
/// plugin built for `wasm32-unknown-unknown`, whose WIT world `wit-bindgen`
/// embedded in a custom section) wrapped into one.
///
/// A core module imports exactly the plugin functions it calls and nothing
/// from WASI, so its component has one core instance instead of the three
/// (module, shim, fixup) and 19 WASI imports a `wasm32-wasip2` build of the
/// same plugin carries; each event instantiates less.
pub fn componentize(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, HostError> {
    const CORE_VERSION: [u8; 4] = [1, 0, 0, 0];
    if bytes.get(..4) != Some(b"\0asm") || bytes.get(4..8) != Some(&CORE_VERSION) {
        return Ok(std::borrow::Cow::Borrowed(bytes));
    }
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(bytes)
        .and_then(|mut e| e.encode())
        .map(std::borrow::Cow::Owned)
        .map_err(|e| {
            HostError::Compile(format!(
                "a core module must carry its WIT world (built with plugboard-sdk or \
                 wit-bindgen for wasm32-unknown-unknown) and import nothing from WASI; \
                 use wasm32-wasip2 for a plugin that needs WASI: {e:#}"
            ))
        })
}

/// Loads a compiled artifact this host wrote itself.
#[allow(unsafe_code)]
fn deserialize_cached(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: the file is one this host wrote with `Engine::precompile_component`
    // into its own cache directory (named by the source's SHA-256); wasmtime
    // checks the engine version and configuration in its header and refuses a
    // mismatch, in which case the caller recompiles.
    unsafe { Component::deserialize_file(engine, path) }
}
