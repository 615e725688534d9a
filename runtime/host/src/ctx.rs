//! Per-invocation store data: WASI context, limits, quotas and the
//! implementations of the `plugboard:host` imports.

use crate::bindings::host::plugboard::host::{clock, config, http, kv, log, types};
use crate::fetch::{self, FetchError, FetchRequest};
use crate::{Limits, PluginEnv};
use std::time::{Duration, Instant};
use tracing::Instrument;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Most bytes of a kv key.
pub const KV_MAX_KEY: usize = 256;
/// Most bytes of a kv value.
pub const KV_MAX_VALUE: usize = 64 * 1024;
/// Most bytes of an http request body.
const HTTP_MAX_REQUEST: usize = 1024 * 1024;
/// Longest log line kept.
const LOG_MAX_LINE: usize = 4096;

/// A log line written by a plugin.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct LogLine {
    /// `debug`, `info`, `warn` or `error`.
    pub level: &'static str,
    /// The message (truncated to 4 KiB).
    pub message: String,
}

/// A host call a plugin made, for the timeline.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct HostCall {
    /// `http`, `kv.get`, …
    pub call: String,
    /// What was asked (URL, key).
    pub target: String,
    /// `ok`, or the error.
    pub outcome: String,
    /// Time spent, µs.
    pub micros: u64,
}

/// Store data of one invocation.
pub struct Ctx {
    /// Built on the first WASI call: most events never make one.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    pub(crate) env: PluginEnv,
    pub(crate) memory_exceeded: bool,
    /// Linear memory of the instance, all memories together, bytes.
    pub(crate) memory_bytes: usize,
    pub(crate) timed_out: bool,
    /// Wall time the plugin spent blocked in host calls (excluded from its CPU deadline).
    pub(crate) blocked: Duration,
    /// Wall time the plugin spent yielded to other tasks at its epoch
    /// checks, ns (excluded from its CPU deadline too); shared with the
    /// yield futures, which cannot reach the store.
    pub(crate) yielded_ns: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub(crate) started: Instant,
    pub(crate) logs: Vec<LogLine>,
    pub(crate) calls: Vec<HostCall>,
    kv_calls: u32,
    http_calls: u32,
    fetcher: std::sync::Arc<fetch::Fetcher>,
}

impl Ctx {
    pub(crate) fn new(env: PluginEnv, fetcher: std::sync::Arc<fetch::Fetcher>) -> Self {
        Ctx {
            wasi: None,
            table: ResourceTable::new(),
            env,
            memory_exceeded: false,
            memory_bytes: 0,
            timed_out: false,
            blocked: Duration::ZERO,
            yielded_ns: Default::default(),
            started: Instant::now(),
            logs: Vec::new(),
            calls: Vec::new(),
            kv_calls: 0,
            http_calls: 0,
            fetcher,
        }
    }

    fn limits(&self) -> &Limits {
        &self.env.limits
    }

    /// Time the plugin has run, not counting host calls that wait on I/O
    /// nor time yielded to other tasks.
    pub(crate) fn cpu_time(&self) -> Duration {
        let yielded =
            Duration::from_nanos(self.yielded_ns.load(std::sync::atomic::Ordering::Relaxed));
        self.started
            .elapsed()
            .saturating_sub(self.blocked)
            .saturating_sub(yielded)
    }

    fn record(&mut self, call: &str, target: &str, outcome: &Result<(), String>, t0: Instant) {
        if self.calls.len() < 200 {
            self.calls.push(HostCall {
                call: call.to_string(),
                target: target.chars().take(200).collect(),
                outcome: match outcome {
                    Ok(()) => "ok".to_string(),
                    Err(e) => e.clone(),
                },
                micros: t0.elapsed().as_micros() as u64,
            });
        }
    }
}

impl WasiView for Ctx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            // A WASI context with nothing inherited: no environment, no
            // arguments, no files, no stdio, no network (sockets are denied
            // by the default address check). Clocks and random are allowed.
            ctx: self.wasi.get_or_insert_with(|| WasiCtx::builder().build()),
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for Ctx {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // The cap is on the instance's linear memories together: a component
        // made of several modules (Python, JS) cannot multiply it.
        let total = self.memory_bytes - current.min(self.memory_bytes) + desired;
        if total > self.limits().memory_bytes {
            self.memory_exceeded = true;
            return Ok(false);
        }
        self.memory_bytes = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.limits().table_elements)
    }
}

fn err_text(e: &types::Error) -> String {
    match e {
        types::Error::NotGranted(s) => format!("not granted: {s}"),
        types::Error::QuotaExceeded => "quota exceeded".into(),
        types::Error::Timeout => "timeout".into(),
        types::Error::TooLarge => "too large".into(),
        types::Error::Invalid(s) => format!("invalid: {s}"),
        types::Error::Failed(s) => format!("failed: {s}"),
    }
}

impl types::Host for Ctx {}

impl log::Host for Ctx {
    fn log(&mut self, level: log::Level, message: String) {
        if self.logs.len() >= self.limits().log_lines as usize {
            return;
        }
        let mut message = message;
        if message.len() > LOG_MAX_LINE {
            let mut cut = LOG_MAX_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let level = match level {
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        };
        tracing::debug!(tenant = %self.env.tenant, plugin = %self.env.plugin, level, "{message}");
        self.logs.push(LogLine { level, message });
    }
}

impl Ctx {
    fn kv_check(
        &mut self,
        key: &str,
    ) -> Result<std::sync::Arc<dyn plugboard_core::TenantKv>, types::Error> {
        if !self.env.grants.kv {
            return Err(types::Error::NotGranted("kv".into()));
        }
        let Some(kv) = self.env.kv.clone() else {
            return Err(types::Error::NotGranted("kv (no store)".into()));
        };
        self.kv_calls += 1;
        if self.kv_calls > self.limits().kv_calls {
            return Err(types::Error::QuotaExceeded);
        }
        if key.is_empty() || key.len() > KV_MAX_KEY {
            return Err(types::Error::Invalid(format!(
                "key must be 1-{KV_MAX_KEY} bytes"
            )));
        }
        Ok(kv)
    }

    fn kv_finish<T>(
        &mut self,
        call: &str,
        key: &str,
        t0: Instant,
        r: Result<T, types::Error>,
    ) -> Result<T, types::Error> {
        self.blocked += t0.elapsed();
        let outcome = r.as_ref().map(|_| ()).map_err(err_text);
        self.record(call, key, &outcome, t0);
        r
    }
}

fn kv_error(e: plugboard_core::Error) -> types::Error {
    types::Error::Failed(e.to_string())
}

impl kv::Host for Ctx {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, types::Error> {
        let t0 = Instant::now();
        let r = match self.kv_check(&key) {
            Ok(kv) => kv
                .kv_get(&self.env.tenant, &key)
                .instrument(tracing::debug_span!("host_call", call = "kv.get"))
                .await
                .map_err(kv_error),
            Err(e) => Err(e),
        };
        self.kv_finish("kv.get", &key, t0, r)
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), types::Error> {
        let t0 = Instant::now();
        let r = match self.kv_check(&key) {
            Ok(_) if value.len() > KV_MAX_VALUE => Err(types::Error::TooLarge),
            Ok(kv) => kv
                .kv_set(&self.env.tenant, &key, &value)
                .instrument(tracing::debug_span!("host_call", call = "kv.set"))
                .await
                .map_err(kv_error),
            Err(e) => Err(e),
        };
        self.kv_finish("kv.set", &key, t0, r)
    }

    async fn delete(&mut self, key: String) -> Result<(), types::Error> {
        let t0 = Instant::now();
        let r = match self.kv_check(&key) {
            Ok(kv) => kv
                .kv_delete(&self.env.tenant, &key)
                .instrument(tracing::debug_span!("host_call", call = "kv.delete"))
                .await
                .map_err(kv_error),
            Err(e) => Err(e),
        };
        self.kv_finish("kv.delete", &key, t0, r)
    }
}

impl Ctx {
    async fn http_fetch(&mut self, req: http::Request) -> Result<http::Response, types::Error> {
        let method = match req.method {
            http::Method::Get => "GET",
            http::Method::Post => "POST",
            http::Method::Put => "PUT",
            http::Method::Patch => "PATCH",
            http::Method::Delete => "DELETE",
            http::Method::Head => "HEAD",
        };
        let grant = fetch::check(self.env.grants.http.as_ref(), method, &req.url)
            .map_err(fetch_error)?
            .clone();
        self.http_calls += 1;
        if self.http_calls > self.limits().http_calls {
            return Err(types::Error::QuotaExceeded);
        }
        if req.body.len() > HTTP_MAX_REQUEST {
            return Err(types::Error::TooLarge);
        }
        let fetcher = self.fetcher.clone();
        let resp = fetcher
            .send_within(
                &self.env.tenant,
                &grant,
                FetchRequest {
                    method,
                    url: req.url,
                    headers: req.headers,
                    body: req.body,
                    timeout_ms: req.timeout_ms,
                },
                self.env.limits.http_in_flight as usize,
            )
            .await
            .map_err(fetch_error)?;
        Ok(http::Response {
            status: resp.status,
            headers: resp.headers,
            body: resp.body,
        })
    }
}

fn fetch_error(e: FetchError) -> types::Error {
    match e {
        FetchError::NotGranted(m) => types::Error::NotGranted(m),
        FetchError::Invalid(m) => types::Error::Invalid(m),
        FetchError::Timeout => types::Error::Timeout,
        FetchError::TooLarge => types::Error::TooLarge,
        FetchError::Failed(m) => types::Error::Failed(m),
        // host@0.1.0 has no variants for these: a stable prefix in
        // `failed` tells them apart.
        FetchError::Tls(m) => types::Error::Failed(format!("tls: {m}")),
        FetchError::PrivateAddress(m) => types::Error::Failed(format!("private_address: {m}")),
        FetchError::Busy(n) => types::Error::Failed(format!("busy: {n} requests in flight")),
        FetchError::CircuitOpen(o) => types::Error::Failed(format!("circuit_open: {o}")),
    }
}

impl http::Host for Ctx {
    async fn fetch(&mut self, req: http::Request) -> Result<http::Response, types::Error> {
        let t0 = Instant::now();
        let url = req.url.clone();
        let span = tracing::debug_span!(
            "host_call",
            call = "http",
            url = %plugboard_core::redact_url(&url, true)
        );
        let r = self.http_fetch(req).instrument(span).await;
        self.blocked += t0.elapsed();
        let outcome = match &r {
            Ok(resp) => Ok(()).and(if resp.status < 400 {
                Ok(())
            } else {
                Err(format!("status {}", resp.status))
            }),
            Err(e) => Err(err_text(e)),
        };
        self.record("http", &url, &outcome, t0);
        r
    }
}

impl config::Host for Ctx {
    fn get(&mut self, key: String) -> Option<String> {
        match self.env.config.get(&key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }

    fn document(&mut self) -> String {
        if self.env.config.is_null() {
            "{}".to_string()
        } else {
            self.env.config.to_string()
        }
    }
}

impl clock::Host for Ctx {
    fn now_ms(&mut self) -> u64 {
        self.env.now_ms.unwrap_or_else(plugboard_core::now_ms)
    }

    fn time_zone(&mut self) -> String {
        self.env.time_zone.clone()
    }

    fn utc_offset_minutes(&mut self) -> i32 {
        self.env.utc_offset_minutes
    }
}

impl crate::bindings::flow::plugboard::flow::types::Host for Ctx {}
impl crate::bindings::router::plugboard::router::types::Host for Ctx {}
impl crate::bindings::tts::plugboard::tts::types::Host for Ctx {}
impl crate::bindings::crm::plugboard::crm::types::Host for Ctx {}
