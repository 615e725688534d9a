//! A live flow session: one interaction driven event by event through a
//! tenant's flow plugin. `simulate` uses it with scripted events; channels
//! (voice calls) use it with real ones.

use std::collections::BTreeMap;
use std::sync::Arc;

use plugboard_core::flow::{Action, Event, fallback_actions};
use plugboard_core::{
    Channel, Error as CoreError, FlowRef, Grants, Interaction, InteractionState, PluginKind,
    Tenant, normalize_address, now_ms,
};
use plugboard_host::{FlowInput, InvokeError, Limits, LoadedPlugin, PluginEnv};
use serde_json::{Value, json};

use crate::{ApiError, ApiResult, AppState, KvAdapter, not_a_flow, utc_offset_minutes};

/// Where a session starts: the tenant's flow and who contacted whom.
#[derive(Debug, Clone)]
pub struct SessionStart {
    /// Tenant id.
    pub tenant: String,
    /// Flow plugin name.
    pub flow: String,
    /// A pinned version (default: the active one).
    pub version: Option<u64>,
    /// Channel.
    pub channel: Channel,
    /// Customer address.
    pub from: String,
    /// Tenant address contacted.
    pub to: String,
    /// Initial attributes.
    pub attributes: BTreeMap<String, String>,
    /// True for `simulate`.
    pub simulated: bool,
    /// A pinned clock for the plugin (ms since the epoch), for simulations.
    pub now_ms: Option<u64>,
}

/// What one event produced.
#[derive(Debug, Clone)]
pub struct Step {
    /// The actions to carry out: the flow's, or the safe fallback.
    pub actions: Vec<Action>,
    /// The flow's new state string, if it returned one.
    pub state: Option<String>,
    /// Set when the flow failed and `actions` are the fallback.
    pub error: Option<InvokeError>,
    /// Time in the plugin.
    pub elapsed_us: u64,
    /// The instance's memory at the end.
    pub memory_bytes: u64,
}

/// One interaction in progress.
pub struct FlowSession {
    app: Arc<AppState>,
    tenant: Tenant,
    plugin: Arc<LoadedPlugin>,
    grants: Grants,
    config: Value,
    limits: Limits,
    now_ms: Option<u64>,
    flow_state: String,
    failed: bool,
    /// The interaction record, timeline included.
    pub interaction: Interaction,
}

impl AppState {
    /// The tenant and address an inbound address belongs to, if any.
    pub fn route_address(
        &self,
        address: &str,
    ) -> Result<Option<(String, plugboard_core::Address)>, CoreError> {
        self.store.address_owner(&normalize_address(address))
    }

    /// Starts a session on a tenant's flow; the plugin is loaded (from the
    /// compile cache where possible) if it is not yet.
    pub fn open_session(self: &Arc<Self>, start: SessionStart) -> ApiResult<FlowSession> {
        let tenant = self
            .store
            .tenant(&start.tenant)?
            .ok_or_else(|| ApiError::not_found(format!("tenant {} not found", start.tenant)))?;
        let info = self.plugin_or_404(&start.tenant, &start.flow, "flow")?;
        let version = start.version.unwrap_or(info.active_version);
        let plugin = self.loaded_version(&start.tenant, &start.flow, version)?;
        if plugin.kind != PluginKind::Flow {
            return Err(not_a_flow(&start.flow, plugin.kind));
        }
        let mut config = self.store.config(&start.tenant, &start.flow)?;
        if let Some(doc) = info.version(version).and_then(|v| v.document.as_ref()) {
            // A declarative flow: the flow-graph component reads its document
            // from the reserved config key `flow`, as JSON text (serialised
            // once here rather than on every event).
            if !config.is_object() {
                config = json!({});
            }
            config["flow"] = Value::String(doc.to_string());
        }
        let created = now_ms();
        let interaction = Interaction {
            id: plugboard_core::interaction_id(created, crate::interaction_nonce()),
            tenant: start.tenant.clone(),
            channel: start.channel,
            from: start.from,
            to: normalize_address(&start.to),
            flow: Some(FlowRef {
                name: start.flow.clone(),
                version,
            }),
            state: InteractionState::InFlow,
            attributes: start.attributes,
            simulated: start.simulated,
            created_ms: created,
            closed_ms: None,
            timeline: Vec::new(),
        };
        Ok(FlowSession {
            limits: self.limits_for(&tenant),
            app: self.clone(),
            tenant,
            plugin,
            grants: info.grants,
            config,
            now_ms: start.now_ms,
            flow_state: String::new(),
            failed: false,
            interaction,
        })
    }
}

/// The name of the tenant plugin that speaks for the tenant's calls when
/// it exists and is a `tts` plugin.
pub const TTS_PLUGIN: &str = "tts";

impl AppState {
    /// Runs the tenant's `tts` plugin (if it has one) on a text to speak:
    /// `None` without such a plugin, else its audio, its rewritten text, or
    /// the failure (the caller then uses the built-in engine).
    pub async fn tenant_tts(
        self: &Arc<Self>,
        tenant: &str,
        text: &str,
        voice: Option<&str>,
        language: Option<&str>,
    ) -> Option<Result<plugboard_host::TtsOutput, String>> {
        let info = self.store.plugin(tenant, TTS_PLUGIN).ok().flatten()?;
        if info.kind != PluginKind::Tts {
            return None;
        }
        let t = self.store.tenant(tenant).ok().flatten()?;
        let plugin = match self.loaded_version(tenant, TTS_PLUGIN, info.active_version) {
            Ok(p) => p,
            Err(e) => return Some(Err(e.message)),
        };
        let env = PluginEnv {
            tenant: tenant.to_string(),
            plugin: TTS_PLUGIN.to_string(),
            grants: info.grants.clone(),
            config: self.store.config(tenant, TTS_PLUGIN).unwrap_or_default(),
            limits: self.limits_for(&t),
            kv: Some(Arc::new(KvAdapter(self.store.clone()))),
            time_zone: t.time_zone.clone(),
            utc_offset_minutes: utc_offset_minutes(&t.time_zone, now_ms()),
            now_ms: None,
        };
        let host = self.host.clone();
        let (text, voice, language) = (
            text.to_string(),
            voice.map(str::to_string),
            language.map(str::to_string),
        );
        let permit = self.permits.clone().acquire_owned().await;
        let report = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            host.invoke_tts(&plugin, env, &text, voice.as_deref(), language.as_deref())
        })
        .await
        .ok()?;
        self.metrics.observe(tenant, TTS_PLUGIN, "tts", &report);
        Some(report.outcome.map_err(|e| e.to_string()))
    }
}

impl FlowSession {
    /// Adds a timeline entry and publishes it on the event stream.
    pub fn note(&mut self, kind: &str, data: Value) {
        self.app.publish(
            &self.interaction.tenant,
            json!({"interaction": self.interaction.id, "kind": kind, "data": data}),
        );
        self.interaction.push(kind, data);
    }

    /// True once the flow has failed; later events are not sent to it.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Runs one event through the flow. On failure (trap, timeout, bad
    /// output) the step carries the fallback actions and the error, and
    /// the session stops calling the flow.
    pub async fn handle(&mut self, event: Event) -> Step {
        let ev_json = serde_json::to_value(&event).unwrap_or_default();
        self.note("event", ev_json);
        if self.failed {
            return Step {
                actions: Vec::new(),
                state: None,
                error: None,
                elapsed_us: 0,
                memory_bytes: 0,
            };
        }
        let ix = &self.interaction;
        let env = PluginEnv {
            tenant: ix.tenant.clone(),
            plugin: self.plugin_name(),
            grants: self.grants.clone(),
            config: self.config.clone(),
            limits: self.limits.clone(),
            kv: Some(Arc::new(KvAdapter(self.app.store.clone()))),
            time_zone: self.tenant.time_zone.clone(),
            utc_offset_minutes: utc_offset_minutes(
                &self.tenant.time_zone,
                self.now_ms.unwrap_or_else(now_ms),
            ),
            now_ms: self.now_ms,
        };
        let input = FlowInput {
            id: ix.id.clone(),
            tenant: ix.tenant.clone(),
            channel: ix.channel,
            from: ix.from.clone(),
            to: ix.to.clone(),
            attributes: ix
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let report = self
            .app
            .run_flow(
                self.plugin.clone(),
                env,
                input,
                self.flow_state.clone(),
                event,
            )
            .await;
        for l in &report.logs {
            self.interaction.push("log", json!(l));
        }
        for c in &report.calls {
            self.interaction.push("host_call", json!(c));
        }
        match report.outcome {
            Ok(out) => {
                for a in &out.actions {
                    match a {
                        Action::SetAttribute { name, value } => {
                            self.interaction
                                .attributes
                                .insert(name.clone(), value.clone());
                        }
                        Action::Enqueue { .. } => {
                            self.interaction.state = InteractionState::Queued;
                        }
                        _ => {}
                    }
                }
                if let Some(st) = &out.state {
                    self.flow_state = st.clone();
                }
                let actions = serde_json::to_value(&out.actions).unwrap_or_default();
                self.interaction.push(
                    "actions",
                    json!({"actions": actions, "elapsed_us": report.elapsed_us}),
                );
                self.app.publish(
                    &self.interaction.tenant,
                    json!({"interaction": self.interaction.id, "kind": "actions", "data": actions}),
                );
                Step {
                    actions: out.actions,
                    state: out.state,
                    error: None,
                    elapsed_us: report.elapsed_us,
                    memory_bytes: report.memory_bytes as u64,
                }
            }
            Err(e) => {
                let err = json!({"code": e.code(), "message": e.to_string()});
                self.note("error", err);
                let fallback = fallback_actions();
                self.interaction.push(
                    "fallback",
                    json!({"actions": serde_json::to_value(&fallback).unwrap_or_default()}),
                );
                self.interaction.state = InteractionState::Queued;
                self.failed = true;
                Step {
                    actions: fallback,
                    state: None,
                    error: Some(e),
                    elapsed_us: report.elapsed_us,
                    memory_bytes: report.memory_bytes as u64,
                }
            }
        }
    }

    fn plugin_name(&self) -> String {
        self.interaction
            .flow
            .as_ref()
            .map(|f| f.name.clone())
            .unwrap_or_default()
    }

    /// Writes the record as it stands, durably (for a long call: the
    /// record exists from the start, not only at the end).
    pub fn checkpoint(&self) -> Result<(), CoreError> {
        tokio::task::block_in_place(|| self.app.store.put_interaction(&self.interaction))
    }

    /// Closes the interaction (queued ones stay queued) and writes it
    /// durably.
    pub fn finish(&mut self) -> Result<(), CoreError> {
        if self.interaction.state != InteractionState::Queued {
            self.interaction.state = InteractionState::Closed;
        }
        self.interaction.closed_ms = Some(now_ms());
        self.checkpoint()
    }
}
