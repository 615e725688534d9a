//! What the agent desktop (the web console) needs beyond the ACD's own
//! operations: which events of a tenant's stream a signed-in agent or
//! supervisor may see, and a task's screen pop (the interaction, what the
//! flow gathered, the customer's history on every channel and their CRM
//! profile).

use crate::acd::AcdRole;
use crate::{Engine, EngineError, EngineResult};
use plugboard_acd::QueueConfig;
use plugboard_core::{Channel, Error as CoreError, PluginKind};
use serde_json::{Value, json};
use std::sync::Arc;

/// Interactions of the customer's history a screen pop shows at most.
const HISTORY: usize = 20;
/// The longest wrap-up notes, bytes.
const NOTES: usize = 4000;
/// Record kind of the wrap-ups (`{task}-{agent}`).
pub(crate) const WRAP_UP: &str = "wrap_up";

impl Engine {
    /// Whether `role` may see `payload`, an event of `tenant`'s stream.
    ///
    /// The tenant (its API key) sees everything. A supervisor sees the
    /// ACD's events and the events of interactions that are tasks. An
    /// agent sees the ACD's events about themselves and their tasks
    /// (neither queue numbers, routing candidates nor who monitors them),
    /// and the events of interactions that are their tasks, offered or
    /// connected. Anything else is denied.
    pub fn event_visible(&self, tenant: &str, role: &AcdRole, payload: &Value) -> bool {
        let me = match role {
            AcdRole::Tenant => return true,
            AcdRole::Supervisor(_) => None,
            AcdRole::Agent(a) => Some(a.as_str()),
        };
        let task_agent = |id: &Value| {
            id.as_str()
                .and_then(|id| self.task(tenant, id).ok())
                .map(|v| v.agent)
        };
        match (payload["kind"].as_str(), me) {
            (Some("acd"), None) => true,
            (Some("acd"), Some(me)) => {
                let d = &payload["data"];
                if matches!(
                    d["type"].as_str(),
                    Some("stats" | "route" | "monitor" | "router_failed")
                ) {
                    return false;
                }
                // Named in it (a task event names its agent inside:
                // offered, rejected, handed over from or to — an
                // overflow's from and to are queues), or it is about
                // their task.
                let e = &d["event"];
                d["agent"] == me
                    || e["agent"] == me
                    || (e["kind"] == "handed_over" && (e["from"] == me || e["to"] == me))
                    || d["target"] == format!("agent:{me}").as_str()
                    || task_agent(&d["task"]).flatten().as_deref() == Some(me)
            }
            // Who listens in is not the agent's to know.
            (Some("monitor"), Some(_)) => false,
            // An agent's softphone is theirs and their supervisors'.
            (Some("softphone"), None) => true,
            (Some("softphone"), Some(me)) => payload["data"]["agent"] == me,
            (_, None) => task_agent(&payload["interaction"]).is_some(),
            (_, Some(me)) => task_agent(&payload["interaction"]).flatten().as_deref() == Some(me),
        }
    }

    /// A task's screen pop: the task, its interaction (channel, addresses,
    /// the attributes the flow gathered), its messages (text channels),
    /// the customer and their other interactions on every channel (newest
    /// [`HISTORY`], with their last message), and the profile from the queue's
    /// `crm` plugin (`profile_error` says why there is none when the
    /// plugin failed). The caller checks the role may see the task.
    pub async fn screen(self: &Arc<Self>, tenant: &str, task: &str) -> EngineResult<Value> {
        let view = self.task(tenant, task)?;
        let ix = self.interaction(tenant, task).await?;
        let messages = if ix.channel.is_text() {
            self.messages(tenant, &ix.id).await?
        } else {
            Vec::new()
        };
        let customer = self
            .customer_by_address(tenant, ix.channel, &ix.from)
            .await?;
        // The customer's other interactions, each with its last message
        // (the whole conversation is a click away in the API).
        let history = match &customer {
            Some(c) => self
                .customer_history_view(tenant, &c.id, HISTORY + 1)
                .await?
                .1
                .into_iter()
                .filter(|v| v["id"] != ix.id.as_str())
                .map(|mut v| {
                    if let Some(m) = v["messages"].as_array_mut() {
                        let last = m.pop();
                        *m = last.into_iter().collect();
                    }
                    v
                })
                .collect(),
            None => Vec::new(),
        };
        let queue = self.queue(tenant, &view.queue).await?;
        let dispositions = queue.as_ref().map(|q| q.dispositions.clone());
        let (profile, profile_error) = match queue.and_then(|q| q.crm) {
            None => (None, None),
            Some(name) => match self.crm_lookup(tenant, &name, ix.channel, &ix.from).await {
                Ok(p) => (p, None),
                Err(e) => {
                    // What a plugin says in its error is its own (it may
                    // quote its config): the log has it, the agent a
                    // plain word.
                    tracing::warn!("crm {name} of {tenant} for task {task}: {e}");
                    (None, Some(format!("the CRM ({name}) did not answer")))
                }
            },
        };
        Ok(json!({
            "task": view,
            "interaction": {
                "id": ix.id,
                "channel": ix.channel,
                "from": ix.from,
                "to": ix.to,
                "state": ix.state,
                "attributes": ix.attributes,
                "created_ms": ix.created_ms,
            },
            "messages": messages,
            "customer": customer,
            "history": history,
            "profile": profile,
            "profile_error": profile_error,
            "dispositions": dispositions.unwrap_or_default(),
        }))
    }

    /// A queue's settings, if it exists.
    async fn queue(&self, tenant: &str, id: &str) -> EngineResult<Option<QueueConfig>> {
        Ok(self.queues(tenant).await?.into_iter().find(|q| q.id == id))
    }

    /// Whether `agent` may wrap `task` up: they have it, or had it last
    /// (completed, passed on or handed over).
    pub fn may_wrap_up(&self, tenant: &str, task: &str, agent: &str) -> bool {
        self.task(tenant, task)
            .is_ok_and(|v| v.agent.as_deref() == Some(agent) && v.state == "connected")
            || self.last_holder(tenant, task).as_deref() == Some(agent)
    }

    /// The wrap-up of a task by the agent who has it or had it last
    /// (`by`; for the tenant or a supervisor, `None`: that agent): a
    /// disposition code (one of the queue's, when it lists them) and
    /// notes, once per agent and task. It is stored, put on the queue
    /// event log (`wrap_up`) for the reports, and handed to the queue's
    /// `crm` plugin (`record-interaction`) in the background: a failing
    /// CRM is logged and counted, and the wrap-up stands.
    pub async fn wrap_up(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        by: Option<&str>,
        disposition: Option<String>,
        notes: Option<String>,
    ) -> EngineResult<()> {
        let view = self.task(tenant, task)?;
        let agent = match by {
            Some(a) if self.may_wrap_up(tenant, task, a) => a.to_string(),
            Some(_) => {
                return Err(EngineError::Forbidden(
                    "the task is not yours to wrap up (you neither have it nor had it last)",
                ));
            }
            None => self
                .last_holder(tenant, task)
                .or(view.agent.clone().filter(|_| view.state == "connected"))
                .ok_or_else(|| CoreError::Conflict(format!("no agent had task {task}")))?,
        };
        let queue = self.queue(tenant, &view.queue).await?;
        if let (Some(q), Some(d)) = (&queue, &disposition)
            && !q.dispositions.is_empty()
            && !q.dispositions.contains(d)
        {
            return Err(CoreError::Invalid(format!(
                "disposition {d:?} is not one of the queue's: {}",
                q.dispositions.join(", ")
            ))
            .into());
        }
        if disposition.as_ref().is_some_and(|d| d.len() > 100)
            || notes.as_ref().is_some_and(|n| n.len() > NOTES)
        {
            return Err(CoreError::Invalid(format!(
                "a disposition is at most 100 bytes and notes {NOTES}"
            ))
            .into());
        }
        let key = format!("{task}-{agent}");
        if self.store.record(tenant, WRAP_UP, &key).await?.is_some() {
            return Err(
                CoreError::Conflict(format!("{agent} wrapped task {task} up already")).into(),
            );
        }
        // Read before anything is written: a failure leaves nothing half
        // done for a retry to repeat.
        let crm = match queue.and_then(|q| q.crm) {
            Some(crm) => Some((crm, self.interaction(tenant, task).await?)),
            None => None,
        };
        let record = json!({"task": task, "agent": agent, "disposition": disposition,
                            "notes": notes, "at_ms": plugboard_core::now_ms()});
        self.store
            .set_record(tenant, WRAP_UP, &key, &record)
            .await?;
        self.acd_event(
            tenant,
            json!({"type": "wrap_up", "task": task, "agent": agent,
                   "disposition": disposition, "notes": notes}),
        );
        if let Some((crm, ix)) = crm {
            let summary = plugboard_host::CrmSummary {
                id: ix.id.clone(),
                channel: ix.channel,
                from: ix.from.clone(),
                to: ix.to.clone(),
                started_ms: ix.created_ms,
                ended_ms: ix.closed_ms.unwrap_or_else(plugboard_core::now_ms),
                agent: Some(agent),
                disposition,
                attributes: ix.attributes.into_iter().collect(),
            };
            let (engine, tenant) = (self.clone(), tenant.to_string());
            tokio::spawn(async move {
                if let Err(e) = engine.crm_record(&tenant, &crm, &summary).await {
                    tracing::warn!("crm {crm} of {tenant}, recording {}: {e}", summary.id);
                }
            });
        }
        Ok(())
    }

    /// A customer and their interactions on every channel, oldest first,
    /// each with its messages when it is a conversation.
    pub async fn customer_history_view(
        &self,
        tenant: &str,
        id: &str,
        limit: usize,
    ) -> EngineResult<(plugboard_core::Customer, Vec<Value>)> {
        let (customer, history) = self.customer_history(tenant, id, limit).await?;
        let mut out = Vec::with_capacity(history.len());
        for ix in history {
            let messages = if ix.channel.is_text() {
                self.messages(tenant, &ix.id).await?
            } else {
                Vec::new()
            };
            let mut v = serde_json::to_value(&ix).unwrap_or_default();
            v["messages"] = json!(messages);
            out.push(v);
        }
        Ok((customer, out))
    }

    /// Hands a finished interaction to the tenant's `crm` plugin `name`
    /// (within the tenant's share of the plugin pool).
    async fn crm_record(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        summary: &plugboard_host::CrmSummary,
    ) -> EngineResult<()> {
        let (plugin, env, t) = self.plugin_call(tenant, name, PluginKind::Crm).await?;
        let permit = self.fair.acquire(tenant, self.share_for(&t)).await;
        let report = self.host.invoke_crm_record(&plugin, env, summary).await;
        drop(permit);
        self.observe(tenant, name, "crm", &report);
        report
            .outcome
            .map_err(|e| EngineError::Internal(format!("crm {name}: {e}")))
    }

    /// Asks the tenant's `crm` plugin `name` for the customer at
    /// `address` (within the tenant's share of the plugin pool).
    async fn crm_lookup(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        channel: Channel,
        address: &str,
    ) -> EngineResult<Option<plugboard_host::CrmProfile>> {
        let (plugin, env, t) = self.plugin_call(tenant, name, PluginKind::Crm).await?;
        let permit = self.fair.acquire(tenant, self.share_for(&t)).await;
        let host = self.host.clone();
        let address = address.to_string();
        // A task of its own: the invocation runs to its end even if the
        // caller stops waiting.
        let report = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let _permit = permit;
            host.invoke_crm_lookup(&plugin, env, channel, &address)
                .await
        }))
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?;
        self.observe(tenant, name, "crm", &report);
        report
            .outcome
            .map_err(|e| EngineError::Internal(format!("crm {name}: {e}")))
    }
}
