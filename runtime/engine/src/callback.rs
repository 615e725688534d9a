//! Callbacks: a caller who hangs up after waiting in a queue longer than
//! the queue's `callback_after` is not lost. Their task keeps its place in
//! the queue as a callback, stored durably (it survives a restart and is
//! loaded again at start with the wait it had). When the ACD offers it,
//! the voice channel's callback runner ([`CallbackJob`]) rings the agent's
//! phone, and once the agent answers calls the customer and bridges the
//! two. Each attempt and its outcome is kept on the callback's record; a
//! customer who does not answer is tried again (at the back of the
//! queue) up to [`MAX_ATTEMPTS`] times.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plugboard_acd::TaskSpec;
use plugboard_core::{Channel, Error as CoreError, now_ms};
use serde::{Deserialize, Serialize};

use crate::acd::{TaskNews, lock};
use crate::{Engine, EngineResult};

/// Record kind of callbacks in the store.
pub(crate) const CALLBACK: &str = "callback";

/// Attempts at reaching a customer before a callback fails.
pub const MAX_ATTEMPTS: usize = 3;

/// One try at calling a customer back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// The agent who made it.
    pub agent: String,
    /// `answered`, `busy`, `no-answer` or `failed`.
    pub outcome: String,
}

/// A customer to call back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Callback {
    /// Its task id (the abandoned call's interaction id).
    pub id: String,
    /// The queue it waits in.
    pub queue: String,
    /// Whom to call (the caller's number).
    pub number: String,
    /// Priority.
    pub priority: u32,
    /// Skills an agent needs beyond the queue's.
    pub skills: Vec<String>,
    /// When the customer started waiting, ms since the Unix epoch.
    pub since_ms: u64,
    /// `waiting`, `done` or `failed`.
    pub state: String,
    /// Tries so far.
    pub attempts: Vec<Attempt>,
}

/// What the voice channel's callback runner must do for a callback task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackJob {
    /// Tenant.
    pub tenant: String,
    /// Task id.
    pub task: String,
    /// Whom to call.
    pub number: String,
    /// Offer (ring the agent, then call the number) or rescind.
    pub news: TaskNews,
}

/// Where callback jobs go (the voice channel's runner).
pub type CallbackRunner = tokio::sync::mpsc::UnboundedSender<CallbackJob>;

impl Engine {
    /// The voice channel carries out callbacks through `runner`.
    pub fn set_callback_runner(&self, runner: CallbackRunner) {
        *lock(&self.acd.runner) = Some(runner);
    }

    /// The customer left a queued task: if they waited at least the
    /// queue's `callback_after`, the task stays in its place as a callback
    /// to `number` (stored durably before this returns); otherwise it is
    /// abandoned. True if a callback was made.
    pub async fn abandon_or_call_back(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        number: &str,
    ) -> EngineResult<bool> {
        self.to_callback(tenant, task, number, false).await
    }

    /// The waiting caller asked to be called back (the queue's
    /// `callback_digit`): their task keeps its place as a callback to
    /// `number`. If that cannot be (no number), the task is abandoned and
    /// this says so.
    pub async fn call_back_now(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        number: &str,
    ) -> EngineResult<()> {
        if self.to_callback(tenant, task, number, true).await? {
            Ok(())
        } else {
            Err(CoreError::Invalid("no number to call back".into()).into())
        }
    }

    async fn to_callback(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        number: &str,
        asked: bool,
    ) -> EngineResult<bool> {
        let acd = self.tenant_acd(tenant).await?;
        let info = lock(&acd).task_info(Instant::now(), task);
        let wants = info.as_ref().is_some_and(|i| {
            asked
                || i.queue
                    .callback_after
                    .is_some_and(|after| i.waited >= after)
        }) && !number.is_empty();
        let Some(info) = info.filter(|_| wants) else {
            self.abandon_task(tenant, task).await?;
            return Ok(false);
        };
        let own_skills: Vec<String> = info
            .skills
            .iter()
            .filter(|s| !info.queue.skills.contains(s))
            .cloned()
            .collect();
        let cb = Callback {
            id: task.to_string(),
            queue: info.queue.id.clone(),
            number: number.to_string(),
            priority: info.priority,
            skills: own_skills,
            since_ms: now_ms().saturating_sub(info.waited.as_millis() as u64),
            state: "waiting".into(),
            attempts: Vec::new(),
        };
        self.store_callback(tenant, &cb).await?;
        let key = (tenant.to_string(), task.to_string());
        lock(&self.acd.watchers).remove(&key);
        lock(&self.acd.callbacks).insert(key, cb.number.clone());
        // An offer in progress (the agent's phone was ringing for the
        // caller who left) goes again, now to the callback runner.
        let offered = self
            .task(tenant, task)
            .ok()
            .and_then(|v| (v.state == "offered").then_some(v.agent).flatten());
        if let Some(agent) = offered {
            let _ = self.reject_task(tenant, task, &agent).await;
        }
        self.acd_event(
            tenant,
            serde_json::json!({"type": "callback", "task": task, "queue": cb.queue}),
        );
        Ok(true)
    }

    async fn store_callback(&self, tenant: &str, cb: &Callback) -> EngineResult<()> {
        let record = serde_json::to_value(cb).map_err(|e| CoreError::Invalid(e.to_string()))?;
        self.store
            .set_record(tenant, CALLBACK, &cb.id, &record)
            .await?;
        Ok(())
    }

    /// One stored callback.
    async fn callback(&self, tenant: &str, task: &str) -> EngineResult<Option<Callback>> {
        Ok(self
            .store
            .record(tenant, CALLBACK, task)
            .await?
            .and_then(|r| serde_json::from_value(r).ok()))
    }

    /// A tenant's callbacks (waiting, done and failed).
    pub async fn callbacks(&self, tenant: &str) -> EngineResult<Vec<Callback>> {
        let mut v: Vec<Callback> = self
            .store
            .records(tenant, CALLBACK)
            .await?
            .into_iter()
            .filter_map(|r| serde_json::from_value(r).ok())
            .collect();
        v.sort_by_key(|c| c.since_ms);
        Ok(v)
    }

    /// Callbacks still to make, put back in the tenant's ACD when it is
    /// loaded, each with the wait it had.
    pub(crate) async fn waiting_callbacks(&self, tenant: &str) -> EngineResult<Vec<Callback>> {
        Ok(self
            .callbacks(tenant)
            .await?
            .into_iter()
            .filter(|c| c.state == "waiting")
            .collect())
    }

    /// Loads the ACD of every tenant with callbacks waiting, so that they
    /// are carried out after a restart without anyone touching the tenant.
    pub async fn preload_callbacks(self: &Arc<Self>) -> EngineResult<usize> {
        let mut n = 0;
        for t in self.store.tenants().await? {
            let waiting = self.waiting_callbacks(&t.id).await?.len();
            if waiting > 0 {
                self.tenant_acd(&t.id).await?;
                n += waiting;
            }
        }
        Ok(n)
    }

    /// How a callback attempt went. The agent's task ends either way (they
    /// wrap up); a customer who was not reached is tried again at the back
    /// of the queue until [`MAX_ATTEMPTS`].
    pub async fn callback_attempt(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        agent: &str,
        outcome: &str,
    ) -> EngineResult<Callback> {
        let mut cb = self
            .callback(tenant, task)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("callback {task}")))?;
        cb.attempts.push(Attempt {
            at_ms: now_ms(),
            agent: agent.to_string(),
            outcome: outcome.to_string(),
        });
        let again = outcome != "answered" && cb.attempts.len() < MAX_ATTEMPTS;
        cb.state = match outcome {
            "answered" => "done",
            _ if again => "waiting",
            _ => "failed",
        }
        .into();
        self.store_callback(tenant, &cb).await?;
        let _ = self.complete_task(tenant, task).await;
        let key = (tenant.to_string(), task.to_string());
        if again {
            let spec = TaskSpec {
                id: task.to_string(),
                queue: cb.queue.clone(),
                channel: Channel::Voice,
                priority: cb.priority,
                skills: cb.skills.clone(),
                agent: None,
            };
            lock(&self.acd.callbacks).insert(key, cb.number.clone());
            self.create_task(tenant, spec).await?;
        } else {
            lock(&self.acd.callbacks).remove(&key);
        }
        Ok(cb)
    }

    /// A callback that left its queue without an agent (`max_wait`,
    /// `full`) has failed.
    pub(crate) async fn fail_callback(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        why: &str,
    ) -> EngineResult<()> {
        lock(&self.acd.callbacks).remove(&(tenant.to_string(), task.to_string()));
        let Some(mut cb) = self.callback(tenant, task).await? else {
            return Ok(());
        };
        cb.state = "failed".into();
        cb.attempts.push(Attempt {
            at_ms: now_ms(),
            agent: String::new(),
            outcome: why.to_string(),
        });
        self.store_callback(tenant, &cb).await
    }

    /// The callbacks of a freshly loaded ACD: task specs with their waits,
    /// oldest first.
    pub(crate) fn callback_specs(
        &self,
        tenant: &str,
        callbacks: Vec<Callback>,
    ) -> Vec<(TaskSpec, Duration)> {
        let now = now_ms();
        let mut map = lock(&self.acd.callbacks);
        callbacks
            .into_iter()
            .map(|cb| {
                map.insert((tenant.to_string(), cb.id.clone()), cb.number.clone());
                let waited = Duration::from_millis(now.saturating_sub(cb.since_ms));
                (
                    TaskSpec {
                        id: cb.id,
                        queue: cb.queue,
                        channel: Channel::Voice,
                        priority: cb.priority,
                        skills: cb.skills,
                        agent: None,
                    },
                    waited,
                )
            })
            .collect()
    }
}
