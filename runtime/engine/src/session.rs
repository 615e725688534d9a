//! A live flow session: one interaction driven event by event through a
//! tenant's flow plugin. `simulate` uses it with scripted events; channels
//! (voice calls) use it with real ones.

use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::Instrument;

use plugboard_core::flow::{Action, Event, fallback_actions};
use plugboard_core::{
    Channel, EntryKind, Error as CoreError, FlowRef, Grants, Interaction, InteractionState,
    PluginKind, Tenant, normalize_address, now_ms,
};
use plugboard_host::{FlowInput, InvokeError, Limits, LoadedPlugin, PluginEnv};
use serde_json::{Value, json};

use crate::{Engine, EngineError, EngineResult, KvAdapter, utc_offset_minutes};

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

/// Who ended a live interaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The customer (hung up, left the chat).
    Customer,
    /// The flow (hang-up action, nothing left to do).
    Flow,
    /// The system (shutdown, media timeout, failure).
    System {
        /// Whether the contact had been answered.
        answered: bool,
    },
}

/// One interaction in progress.
pub struct FlowSession {
    app: Arc<Engine>,
    tenant: Tenant,
    plugin: Arc<LoadedPlugin>,
    grants: Grants,
    config: Value,
    limits: Limits,
    now_ms: Option<u64>,
    flow_state: String,
    failed: bool,
    /// Masks the values of the secrets the flow was given.
    redactor: crate::secrets::Redactor,
    /// How many timeline entries are in the store.
    stored: usize,
    /// The interaction record: its whole timeline, or (resumed from
    /// `interaction_head`) the entries after `timeline_base`.
    pub interaction: Interaction,
}

impl Engine {
    /// Starts a session on a tenant's flow; the plugin is loaded (from the
    /// compile cache where possible) if it is not yet.
    pub async fn open_session(self: &Arc<Self>, start: SessionStart) -> EngineResult<FlowSession> {
        let created = now_ms();
        let interaction = Interaction {
            id: plugboard_core::interaction_id(created, crate::interaction_nonce()?),
            tenant: start.tenant.clone(),
            channel: start.channel,
            from: start.from,
            to: normalize_address(&start.to),
            flow: Some(FlowRef {
                name: start.flow.clone(),
                version: start.version.unwrap_or(0),
            }),
            state: InteractionState::InFlow,
            attributes: start.attributes,
            simulated: start.simulated,
            created_ms: created,
            closed_ms: None,
            timeline: Vec::new(),
            timeline_base: 0,
        };
        let mut session = self.session_for(interaction, String::new(), 0).await?;
        session.now_ms = start.now_ms;
        Ok(session)
    }

    /// Takes up an interaction again where it was left (a conversation
    /// on a digital channel, whose next message may come days later):
    /// the flow version it was pinned to, the flow's state, and the
    /// record as stored (`stored` timeline entries are in the store). A
    /// pinned version of 0 means the active one, pinned now.
    pub async fn resume_session(
        self: &Arc<Self>,
        interaction: Interaction,
        flow_state: String,
    ) -> EngineResult<FlowSession> {
        let stored = interaction.timeline_len();
        self.session_for(interaction, flow_state, stored).await
    }

    async fn session_for(
        self: &Arc<Self>,
        mut interaction: Interaction,
        flow_state: String,
        stored: usize,
    ) -> EngineResult<FlowSession> {
        let tenant_id = interaction.tenant.clone();
        let flow = interaction.flow.clone().ok_or_else(|| {
            CoreError::Invalid(format!("interaction {} has no flow", interaction.id))
        })?;
        let tenant = self.tenant(&tenant_id).await?;
        let mut info = self.plugin(&tenant_id, &flow.name, "flow").await?;
        let version = match flow.version {
            0 => info.active_version,
            v => v,
        };
        let plugin = self.loaded_version(&tenant_id, &info, version).await?;
        if plugin.kind != PluginKind::Flow {
            return Err(EngineError::NotAFlow {
                name: flow.name,
                kind: plugin.kind,
            });
        }
        let mut config = self.store.config(&tenant_id, &flow.name).await?;
        if let Some(doc) = info.version(version).and_then(|v| v.document.as_ref()) {
            // A declarative flow: the flow-graph component reads its document
            // from the reserved config key `flow`, as JSON text (serialised
            // once here rather than on every event).
            if !config.is_object() {
                config = json!({});
            }
            config["flow"] = Value::String(doc.to_string());
        }
        let (config, redactor) = self
            .resolve_config(&tenant_id, &mut info.grants, config)
            .await?;
        interaction.flow = Some(FlowRef {
            name: flow.name,
            version,
        });
        Ok(FlowSession {
            limits: self.limits_for(&tenant),
            app: self.clone(),
            tenant,
            plugin,
            grants: info.grants,
            config,
            now_ms: None,
            flow_state,
            failed: false,
            redactor,
            stored,
            interaction,
        })
    }
}

/// The name of the tenant plugin that speaks for the tenant's calls when
/// it exists and is a `tts` plugin.
pub const TTS_PLUGIN: &str = "tts";

impl Engine {
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
        let info = self.store.plugin(tenant, TTS_PLUGIN).await.ok().flatten()?;
        if info.kind != PluginKind::Tts {
            return None;
        }
        let (plugin, env, t) = match self.plugin_call(tenant, TTS_PLUGIN, PluginKind::Tts).await {
            Ok(call) => call,
            Err(e) => return Some(Err(e.to_string())),
        };
        let host = self.host.clone();
        let (text, voice, language) = (
            text.to_string(),
            voice.map(str::to_string),
            language.map(str::to_string),
        );
        let permit = self.fair.acquire(tenant, self.share_for(&t)).await;
        let report = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let _permit = permit;
            host.invoke_tts(&plugin, env, &text, voice.as_deref(), language.as_deref())
                .await
        }))
        .await
        .ok()?;
        self.observe(tenant, TTS_PLUGIN, "tts", &report);
        Some(report.outcome.map_err(|e| e.to_string()))
    }
}

impl FlowSession {
    /// Adds a timeline entry and publishes it on the event stream.
    pub fn note(&mut self, kind: EntryKind, data: Value) {
        let data = self.redactor.value(data);
        self.app.publish(
            &self.interaction.tenant,
            json!({"interaction": self.interaction.id, "kind": kind, "data": data}),
        );
        self.interaction.push(kind, data);
    }

    /// Adds a timeline entry (secrets masked) without publishing it.
    fn push(&mut self, kind: EntryKind, data: Value) {
        let data = self.redactor.value(data);
        self.interaction.push(kind, data);
    }

    /// A value with the secrets the flow was given masked: for whatever
    /// leaves the server (simulation output).
    pub fn redact(&self, v: Value) -> Value {
        self.redactor.value(v)
    }

    /// The flow plugin's `http` grant: what the channel may fetch on the
    /// flow's behalf (media URLs to play).
    pub fn http_grant(&self) -> Option<plugboard_core::HttpGrant> {
        self.grants.http.clone()
    }

    /// The flow's state as it last returned it (handed back with the next
    /// event; a resumed session starts from it).
    pub fn flow_state(&self) -> &str {
        &self.flow_state
    }

    /// True once the flow has failed; later events are not sent to it.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Runs one event through the flow. On failure (trap, timeout, bad
    /// output) the step carries the fallback actions and the error, and
    /// the session stops calling the flow.
    pub async fn handle(&mut self, event: Event) -> Step {
        let span = tracing::debug_span!(
            "flow_event",
            event = event_name(&event),
            flow = %self.plugin_name()
        );
        self.handle_event(event).instrument(span).await
    }

    async fn handle_event(&mut self, event: Event) -> Step {
        let hangup = event == Event::Hangup;
        let ev_json = serde_json::to_value(&event).unwrap_or_default();
        self.note(EntryKind::Event, ev_json);
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
            kv: Some(Arc::new(KvAdapter::new(self.app.store.clone()))),
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
                self.app.share_for(&self.tenant),
                self.plugin.clone(),
                env,
                input,
                self.flow_state.clone(),
                event,
            )
            .await;
        for l in &report.logs {
            self.push(EntryKind::Log, json!(l));
        }
        for c in &report.calls {
            self.push(EntryKind::HostCall, json!(c));
        }
        match report.outcome {
            Ok(out) => {
                for a in &out.actions {
                    match a {
                        Action::SetAttribute { name, value } => {
                            // Masked whole, then cut to size (a cut
                            // secret would no longer be recognised).
                            let value = cut(self.redactor.text(value), ATTRIBUTE_BYTES);
                            self.interaction.attributes.insert(name.clone(), value);
                        }
                        // What the flow answers to the customer's hang-up
                        // changes nothing: they are gone.
                        Action::Enqueue { .. } if !hangup => {
                            self.transition(InteractionState::Queued);
                        }
                        _ => {}
                    }
                }
                if let Some(st) = &out.state {
                    self.flow_state = st.clone();
                }
                let actions = self.redact(serde_json::to_value(&out.actions).unwrap_or_default());
                self.push(
                    EntryKind::Actions,
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
                self.note(EntryKind::Error, err);
                let fallback = fallback_actions();
                self.push(
                    EntryKind::Fallback,
                    json!({"actions": serde_json::to_value(&fallback).unwrap_or_default()}),
                );
                if !hangup {
                    self.transition(InteractionState::Queued);
                }
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

    /// Moves the interaction through its state machine (a channel's
    /// doing: offered, connected to an agent, back in the queue); a
    /// transition it does not have is logged and changes nothing.
    pub fn set_state(&mut self, next: InteractionState) {
        self.transition(next);
    }

    /// Moves the interaction through its state machine; a transition it
    /// does not have is logged and changes nothing.
    fn transition(&mut self, next: InteractionState) {
        if let Err(e) = self.interaction.set_state(next) {
            tracing::warn!("{e}");
        }
    }

    fn plugin_name(&self) -> String {
        self.interaction
            .flow
            .as_ref()
            .map(|f| f.name.clone())
            .unwrap_or_default()
    }

    /// Writes the record as it stands without waiting for the disk (for
    /// a first record nobody was promised; the next durable write covers
    /// it).
    pub async fn checkpoint_soft(&mut self) -> Result<(), CoreError> {
        self.stored = self
            .app
            .store
            .save_interaction_soft(&self.interaction, self.stored)
            .instrument(tracing::debug_span!(
                "store_write",
                what = "interaction",
                durable = false
            ))
            .await?;
        Ok(())
    }

    /// Writes the record as it stands, durably (for a long call: the
    /// record exists from the start, not only at the end).
    pub async fn checkpoint(&mut self) -> Result<(), CoreError> {
        // Only the timeline entries not yet stored are written.
        self.stored = self
            .app
            .store
            .save_interaction(&self.interaction, self.stored)
            .instrument(tracing::debug_span!(
                "store_write",
                what = "interaction",
                durable = true
            ))
            .await?;
        Ok(())
    }

    /// Ends a simulation and writes its record durably: closed, except
    /// where the flow left it queued (there is no customer to leave).
    pub async fn finish(&mut self) -> Result<(), CoreError> {
        if self.interaction.state != InteractionState::Queued {
            self.transition(InteractionState::Closed);
        }
        self.interaction.closed_ms = Some(now_ms());
        self.checkpoint().await
    }

    /// Ends a live interaction and writes its record durably: a customer
    /// who leaves while waiting (queued or offered) has abandoned; the
    /// system ending one that was never answered has failed it; anything
    /// else is closed.
    pub async fn close(&mut self, ending: Ending) -> Result<(), CoreError> {
        let waiting = matches!(
            self.interaction.state,
            InteractionState::Queued | InteractionState::Offered
        );
        let end = match ending {
            Ending::Customer if waiting => InteractionState::Abandoned,
            Ending::System { answered: false } => InteractionState::Failed,
            _ => InteractionState::Closed,
        };
        self.transition(end);
        self.interaction.closed_ms = Some(now_ms());
        self.checkpoint().await
    }
}

/// The longest attribute value a flow sets, bytes.
const ATTRIBUTE_BYTES: usize = 1024;

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// An event's name on a trace (`start`, `digits`, `hangup`, …).
fn event_name(event: &Event) -> String {
    serde_json::to_value(event)
        .ok()
        .and_then(|v| v["type"].as_str().map(String::from))
        .unwrap_or_else(|| "event".into())
}
