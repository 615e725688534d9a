//! The ACD in the engine: each tenant's queues and agents (stored as
//! records, so they survive a restart), one sans-IO
//! [`plugboard_acd::Acd`] per tenant driven here, its timers run by one
//! background task, its decisions published on the tenant's event stream
//! (`{"kind": "acd", …}`) and kept as task records.
//!
//! Tasks are created by the API (`POST /v1/tenants/{t}/tasks`) and by
//! the flows' `enqueue` on a channel ([`Engine::enqueue_watched`]). A
//! channel that enqueues watches its task: it is told of offers,
//! rescinded offers and the task leaving for its flow ([`TaskNews`]), and
//! carries them out (the voice channel rings the agent's registered
//! phone and bridges on answer). Offers of tasks nobody watches are
//! answered over the API (accept, reject), as an agent desktop does.
//!
//! One node runs a tenant's ACD: several nodes on one store share the
//! queue and agent settings, not the live routing (a lease per queue is
//! the next step).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use plugboard_acd::{Acd, AgentConfig, Output, Presence, QueueConfig, QueueStats, TaskSpec};
use plugboard_core::{Channel, Error as CoreError, validate_id};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::{Caller, Engine, EngineError, EngineResult};

/// Record kind of queues in the store.
const QUEUE: &str = "queue";
/// Record kind of agents in the store.
pub(crate) const AGENT: &str = "agent";
/// Record kind of agents' tokens (by the token's hash).
const TOKEN: &str = "agent_token";
/// Agents' tokens start with this, then the tenant and a `.`: the tenant
/// tells the store where to look the token up.
const TOKEN_PREFIX: &str = "pbt.";

/// What an agent's token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Their own presence and their own tasks.
    #[default]
    Agent,
    /// The tenant's queues, agents and tasks (no plugins, settings or
    /// tokens).
    Supervisor,
}

/// Who acts on a tenant's ACD, and so what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcdRole {
    /// The tenant's API key (or the operator): everything.
    Tenant,
    /// A supervisor (agent id): every queue, agent and task.
    Supervisor(String),
    /// An agent (id): their own presence and tasks only.
    Agent(String),
}

impl AcdRole {
    /// Whether this caller may act as or on `agent` (presence, offers).
    pub fn may_act_for(&self, agent: &str) -> bool {
        match self {
            AcdRole::Tenant | AcdRole::Supervisor(_) => true,
            AcdRole::Agent(me) => me == agent,
        }
    }

    /// Whether this caller sees the whole tenant's ACD (queues, every
    /// agent and task).
    pub fn sees_all(&self) -> bool {
        !matches!(self, AcdRole::Agent(_))
    }
}

/// The tenant an agent's token names, if it is one.
pub(crate) fn token_tenant(token: &str) -> Option<&str> {
    let (tenant, _) = token.strip_prefix(TOKEN_PREFIX)?.split_once('.')?;
    validate_id("tenant", tenant).ok()?;
    Some(tenant)
}

/// An agent as the API shows it: the routing settings, the SIP user whose
/// phone rings for voice tasks, and the current presence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentRecord {
    /// Routing settings (id, skills, capacity per channel, queues).
    #[serde(flatten)]
    pub config: AgentConfig,
    /// The SIP user (of the tenant) whose registered phone rings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_user: Option<String>,
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskView {
    /// Task id.
    pub id: String,
    /// Queue id.
    pub queue: String,
    /// `waiting`, `offered`, `connected`, or how it ended.
    pub state: String,
    /// The agent offered or connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// How long the view of an ended task is kept (for `GET`), and how many
/// ended tasks at most: the history is in the store, not in memory.
const ENDED_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);
/// See [`ENDED_KEPT`].
const ENDED_MAX: usize = 100_000;

/// A metric of queue numbers: name, help, and how to read it.
type Column<T> = (&'static str, &'static str, fn(&QueueStats) -> T);

/// What the channel that enqueued a task is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskNews {
    /// Record the conversation with the agent (the queue's `record`).
    Record,
    /// Pause (`true`) or resume the conversation's recording.
    RecordingPaused(bool),
    /// Offer the task to this agent (on voice: ring their phone).
    Offer {
        /// Agent id.
        agent: String,
        /// The tenant's SIP user whose registered phone rings, if the
        /// agent has one.
        sip_user: Option<String>,
    },
    /// The offer to this agent rang out: stop ringing them.
    Rescind {
        /// Agent id.
        agent: String,
    },
    /// The task left the ACD for its flow (`max_wait` or `full`).
    BackToFlow {
        /// Why.
        why: &'static str,
    },
    /// The queue lets a waiting caller press this digit to be called
    /// back instead of waiting ([`Engine::call_back_now`]).
    CallbackDigit {
        /// The digit.
        digit: char,
    },
    /// The agent (or a supervisor) passed the customer on, blind: to
    /// `queue:Q` or `agent:A` (the channel enqueues the task again, with
    /// everything on its interaction), or to a number or SIP URI.
    Transfer {
        /// Where to.
        target: String,
    },
    /// A warm transfer starts: call this target (a number, SIP URI, or
    /// an agent's phone) for the agent to consult while the customer
    /// holds.
    Consult {
        /// Where to call.
        target: String,
        /// The agent consulted, when the target is one: completing hands
        /// the task to them.
        agent: Option<String>,
    },
    /// The warm transfer ends: completed (the customer goes on with the
    /// consulted party, the agent leaves) or cancelled (the consulted
    /// party is hung up, the agent and customer talk again).
    ConsultEnd {
        /// Completed rather than cancelled.
        complete: bool,
    },
    /// A supervisor joins the conversation, or changes how (`None`: they
    /// leave).
    Monitor {
        /// The supervisor (an agent id).
        supervisor: String,
        /// Their phone's address of record.
        sip_user: String,
        /// How; `None` ends it.
        mode: Option<plugboard_core::MonitorMode>,
    },
    /// The queue whispers to the agent before the customer is connected:
    /// the interaction's `whisper` attribute if the flow set one, else
    /// the queue's name.
    Whisper {
        /// The queue.
        queue: String,
    },
    /// The waiting customer's place (the queue's `announce_every`).
    Position {
        /// 1-based position.
        position: u32,
        /// Expected wait, if known.
        expected_wait: Option<std::time::Duration>,
    },
}

/// Where a task's news goes.
pub type TaskWatcher = tokio::sync::mpsc::UnboundedSender<TaskNews>;

/// A tenant's queue: tenant and queue ids.
type QueueKey = (String, String);

/// Record kind of the queue event log.
pub(crate) const QUEUE_EVENT: &str = "queue_event";
/// Queue events a report reads at most.
pub const REPORT_EVENTS: usize = 1_000_000;

/// An event for the log: tenant, id, the event.
type Logged = (String, String, Value);

/// Which queue events to read ([`Engine::queue_events`]).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this queue's.
    pub queue: Option<String>,
    /// Only those naming this agent.
    pub agent: Option<String>,
    /// Only this task's.
    pub task: Option<String>,
}

impl EventFilter {
    fn matches(&self, e: &Value) -> bool {
        let is = |field: &str, want: &Option<String>| {
            want.as_deref().is_none_or(|w| e[field].as_str() == Some(w))
        };
        let agent = self.agent.as_deref().is_none_or(|a| {
            ["agent", "supervisor", "to", "from"]
                .iter()
                .any(|f| e[*f].as_str() == Some(a))
                || e["event"]["agent"].as_str() == Some(a)
                || e["event"]["to"].as_str() == Some(a)
                || e["event"]["from"].as_str() == Some(a)
        });
        is("queue", &self.queue) && is("task", &self.task) && agent
    }
}

/// Events in one stored record of the queue event log at most.
const LOG_RECORD_EVENTS: usize = 100;
/// Records of the queue event log read at a time (at most 20,000 events).
const LOG_PAGE: usize = 200;
/// Events a filtered read of the queue event log looks at, at most.
const LOG_SCAN: usize = 10_000;

/// Writes the queue event log in the background, in batches (one flush
/// for all the events that came meanwhile), until the engine is gone.
///
/// A batch of a tenant's events is stored as one record (a JSON array,
/// at most [`LOG_RECORD_EVENTS`]) under the id of its last event: one key
/// per batch instead of one per event took the engine's routing decisions
/// per CPU-second in `router_bench` (64 agents finishing at once) from
/// about 5,700 to about 10,300 with the built-in rule, and from about
/// 4,400 to about 6,400 with the lean Rust router: storing the log had
/// been most of the work. [`logged_events`] reads both this and the
/// earlier one-event records.
fn spawn_event_writer(engine: Weak<Engine>) -> tokio::sync::mpsc::UnboundedSender<Logged> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Logged>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            // What came meanwhile joins the batch: one durable write (one
            // flush) for all of it. (Waiting for more was tried: the larger
            // writes stalled the runtime thread and tripled the p99 of
            // routing decisions in router_bench.)
            let mut batch: HashMap<String, Vec<(String, Value)>> = HashMap::new();
            let mut add = |(tenant, id, e): Logged| batch.entry(tenant).or_default().push((id, e));
            add(first);
            for _ in 0..10_000 {
                match rx.try_recv() {
                    Ok(e) => add(e),
                    Err(_) => break,
                }
            }
            let Some(engine) = engine.upgrade() else {
                return;
            };
            for (tenant, events) in batch {
                let n = events.len();
                let mut records: Vec<(String, Value)> = Vec::new();
                let mut events = events.into_iter().peekable();
                while events.peek().is_some() {
                    let chunk: Vec<(String, Value)> =
                        events.by_ref().take(LOG_RECORD_EVENTS).collect();
                    // Keyed by the greatest id, so that a reader after any
                    // id finds every record holding a later event.
                    let key = chunk.iter().map(|(id, _)| id).max().cloned();
                    let list = chunk.into_iter().map(|(_, e)| e).collect();
                    records.extend(key.map(|k| (k, Value::Array(list))));
                }
                if let Err(e) = engine
                    .store
                    .set_records(&tenant, QUEUE_EVENT, &records)
                    .await
                {
                    tracing::warn!("queue events of {tenant} not stored ({n} lost): {e}");
                }
            }
        }
    });
    tx
}

/// The events of a page of queue event log records, in order, those
/// whose id sorts after `after` only. A record holds a batch of events
/// (a JSON array, keyed by its last id), or one event (as written before
/// batches). Events of one node come in id order. Records written by two
/// nodes sharing a store may overlap in time, and a page that ends inside
/// one of them can then skip or repeat the other's events in that
/// stretch (as a node's late write could skip before batches).
fn logged_events(page: Vec<(String, Value)>, after: &str) -> impl Iterator<Item = Value> + '_ {
    page.into_iter()
        .flat_map(|(_, record)| match record {
            Value::Array(list) => list,
            one => vec![one],
        })
        .filter(move |e| e["id"].as_str().is_none_or(|id| id > after))
}

/// The per-tenant ACDs and their timer task.
#[derive(Default)]
pub struct AcdHub {
    started: std::sync::atomic::AtomicBool,
    /// The UTC day the counts are for (days since the epoch).
    day: std::sync::atomic::AtomicU64,
    /// The queue event log's writer.
    log: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Logged>>>,
    /// Queues whose numbers changed since they were last published, and
    /// when that was.
    stats_due: Mutex<(std::collections::HashSet<QueueKey>, Option<Instant>)>,
    /// Events logged by this process (part of their ids).
    logged: std::sync::atomic::AtomicU64,
    tenants: Mutex<HashMap<String, Arc<Mutex<Acd>>>>,
    /// Last known state of every task (for `GET` and for agents' views);
    /// ended ones are kept for [`ENDED_KEPT`], at most [`ENDED_MAX`].
    tasks: Mutex<HashMap<(String, String), TaskView>>,
    /// Ended tasks, oldest first, with when they ended.
    ended: Mutex<std::collections::VecDeque<(Instant, (String, String))>>,
    /// The agent who last had each task (it completed, passed it on or
    /// handed it over), for their wrap-up: kept [`ENDED_KEPT`].
    holders: Mutex<HashMap<(String, String), (String, Instant)>>,
    /// Channels watching their tasks, by tenant and task.
    pub(crate) watchers: Mutex<HashMap<(String, String), TaskWatcher>>,
    /// Each agent's SIP user, by tenant and agent.
    sip_users: Mutex<HashMap<(String, String), String>>,
    /// Callback tasks and the numbers to call, by tenant and task.
    pub(crate) callbacks: Mutex<HashMap<(String, String), String>>,
    /// The voice channel's callback runner.
    pub(crate) runner: Mutex<Option<crate::callback::CallbackRunner>>,
    wake: Arc<Notify>,
}

impl AcdHub {
    /// A queue event's id: fixed-width digits that sort by time (ms),
    /// then by node (a random number per process), then by order here.
    fn event_id(&self, at_ms: u64) -> String {
        static NODE: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
        let node = NODE.get_or_init(|| {
            let mut b = [0u8; 2];
            let _ = getrandom::fill(&mut b);
            u16::from_le_bytes(b) % 10_000
        });
        let n = self
            .logged
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 1_000_000;
        format!("{at_ms:013}{node:04}{n:06}")
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AcdHub {
    /// Runs the ACDs' timers until the engine is dropped (once).
    fn start(engine: &Arc<Engine>) {
        if engine
            .acd
            .started
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        engine.acd.day.store(
            plugboard_core::now_ms() / 86_400_000,
            std::sync::atomic::Ordering::SeqCst,
        );
        let weak: Weak<Engine> = Arc::downgrade(engine);
        let notify = engine.acd.wake.clone();
        tokio::spawn(async move {
            loop {
                let Some(engine) = weak.upgrade() else { return };
                let next = engine.acd.next_timeout();
                drop(engine);
                let wake = notify.notified();
                match next {
                    Some(at) => {
                        let at = tokio::time::Instant::from_std(at);
                        tokio::select! {
                            _ = tokio::time::sleep_until(at) => {}
                            _ = wake => {}
                        }
                    }
                    // Checked again now and then so that the task ends
                    // soon after the engine.
                    None => {
                        tokio::select! {
                            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                            _ = wake => {}
                        }
                    }
                }
                let Some(engine) = weak.upgrade() else { return };
                let now = Instant::now();
                // "Today" is the UTC day: the counts start again at
                // midnight.
                let day = plugboard_core::now_ms() / 86_400_000;
                if engine
                    .acd
                    .day
                    .swap(day, std::sync::atomic::Ordering::SeqCst)
                    != day
                {
                    for acd in lock(&engine.acd.tenants).values() {
                        lock(acd).new_day();
                    }
                }
                let due: Vec<(String, Arc<Mutex<Acd>>)> = lock(&engine.acd.tenants)
                    .iter()
                    .filter(|(_, a)| lock(a).poll_timeout().is_some_and(|t| t <= now))
                    .map(|(t, a)| (t.clone(), a.clone()))
                    .collect();
                for (tenant, acd) in due {
                    let outputs = {
                        let mut a = lock(&acd);
                        a.handle_timeout(now);
                        settle(&mut a)
                    };
                    engine.acd_outputs(&tenant, outputs);
                }
                engine.publish_stats(now);
            }
        });
    }

    /// Sizes of the hub's tables for `/metrics`: name, entries, bound.
    pub(crate) fn table_sizes(&self) -> Vec<(&'static str, usize, Option<usize>)> {
        vec![
            ("acd_tasks", lock(&self.tasks).len(), None),
            ("acd_ended_tasks", lock(&self.ended).len(), Some(ENDED_MAX)),
            (
                "acd_task_holders",
                lock(&self.holders).len(),
                Some(ENDED_MAX),
            ),
            ("acd_watchers", lock(&self.watchers).len(), None),
            ("acd_callbacks", lock(&self.callbacks).len(), None),
        ]
    }

    /// Every loaded queue's numbers as Prometheus text, labelled by
    /// tenant and queue.
    pub(crate) fn encode(&self) -> String {
        use std::fmt::Write;
        let now = Instant::now();
        let mut rows: Vec<(String, String, QueueStats)> = Vec::new();
        for (tenant, acd) in lock(&self.tenants).iter() {
            let a = lock(acd);
            for q in a.queue_ids() {
                let stats = a.queue_stats(now, &q);
                rows.push((tenant.clone(), q, stats));
            }
        }
        rows.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
        let mut out = String::new();
        let gauges: [Column<f64>; 4] = [
            (
                "plugboard_queue_waiting",
                "Tasks waiting in the queue.",
                |s| s.waiting as f64,
            ),
            (
                "plugboard_queue_offered",
                "Tasks being offered to an agent.",
                |s| s.offered as f64,
            ),
            (
                "plugboard_queue_connected",
                "Tasks in conversation with an agent.",
                |s| s.connected as f64,
            ),
            (
                "plugboard_queue_longest_wait_seconds",
                "The longest current wait.",
                |s| s.longest_wait_ms as f64 / 1000.0,
            ),
        ];
        for (metric, help, pick) in gauges {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
            for (t, q, s) in &rows {
                let _ = writeln!(out, "{metric}{{tenant=\"{t}\",queue=\"{q}\"}} {}", pick(s));
            }
        }
        let metric = "plugboard_queue_agents";
        let _ = writeln!(
            out,
            "# HELP {metric} Agents who serve the queue, by state (available, busy, away).\n# TYPE {metric} gauge"
        );
        for (t, q, s) in &rows {
            for (state, n) in [
                ("available", s.agents_available),
                ("busy", s.agents_busy),
                ("away", s.agents_away),
            ] {
                let _ = writeln!(
                    out,
                    "{metric}{{tenant=\"{t}\",queue=\"{q}\",state=\"{state}\"}} {n}"
                );
            }
        }
        let counters: [Column<u64>; 4] = [
            (
                "plugboard_queue_answered",
                "Tasks answered by an agent.",
                |s| s.answered,
            ),
            (
                "plugboard_queue_answered_in_service_level",
                "Tasks answered within the queue's service-level wait.",
                |s| s.answered_in_service_level,
            ),
            (
                "plugboard_queue_abandoned",
                "Customers who left while waiting.",
                |s| s.abandoned,
            ),
            (
                "plugboard_queue_timed_out",
                "Tasks that left for their flow (max_wait, full).",
                |s| s.timed_out,
            ),
        ];
        for (metric, help, pick) in counters {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for (t, q, s) in &rows {
                let _ = writeln!(
                    out,
                    "{metric}_total{{tenant=\"{t}\",queue=\"{q}\"}} {}",
                    pick(s)
                );
            }
        }
        out
    }

    fn next_timeout(&self) -> Option<Instant> {
        let stats = {
            let due = lock(&self.stats_due);
            (!due.0.is_empty()).then(|| due.1.map_or_else(Instant::now, |t| t + STATS_EVERY))
        };
        lock(&self.tenants)
            .values()
            .filter_map(|a| lock(a).poll_timeout())
            .chain(stats)
            .min()
    }
}

/// Queue numbers go on the event stream at most this often per queue
/// that changed.
const STATS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What the ACD decided.
fn settle(acd: &mut Acd) -> Vec<Output> {
    std::iter::from_fn(|| acd.poll_output()).collect()
}

fn acd_error(e: plugboard_acd::AcdError) -> CoreError {
    match e {
        plugboard_acd::AcdError::Unknown(m) => CoreError::NotFound(m),
        plugboard_acd::AcdError::Exists(m) => CoreError::Conflict(format!("task {m} exists")),
        e @ plugboard_acd::AcdError::State { .. } => CoreError::Conflict(e.to_string()),
    }
}

impl Engine {
    /// The tenant's ACD, loaded from the store on first use.
    pub(crate) async fn tenant_acd(
        self: &Arc<Self>,
        tenant: &str,
    ) -> EngineResult<Arc<Mutex<Acd>>> {
        AcdHub::start(self);
        if let Some(a) = lock(&self.acd.tenants).get(tenant) {
            return Ok(a.clone());
        }
        let now = Instant::now();
        let mut acd = Acd::new();
        for q in self.store.records(tenant, QUEUE).await? {
            acd.set_queue(parse(q)?);
        }
        for a in self.store.records(tenant, AGENT).await? {
            let r: AgentRecord = parse(a)?;
            self.remember_sip_user(tenant, &r);
            acd.set_agent(now, r.config);
        }
        // Callbacks still to make take their places again.
        let callbacks = self.waiting_callbacks(tenant).await?;
        for (spec, waited) in self.callback_specs(tenant, callbacks) {
            let view = TaskView {
                id: spec.id.clone(),
                queue: spec.queue.clone(),
                state: "waiting".into(),
                agent: None,
            };
            let id = spec.id.clone();
            if acd.enqueue_waited(now, spec, waited).is_ok() {
                lock(&self.acd.tasks).insert((tenant.to_string(), id), view);
            }
        }
        let acd = Arc::new(Mutex::new(acd));
        Ok(lock(&self.acd.tenants)
            .entry(tenant.to_string())
            .or_insert(acd)
            .clone())
    }

    /// Runs an input on the tenant's ACD and carries out what it decided.
    async fn with_acd<T>(
        self: &Arc<Self>,
        tenant: &str,
        f: impl FnOnce(&mut Acd, Instant) -> Result<T, plugboard_acd::AcdError>,
    ) -> EngineResult<T> {
        let acd = self.tenant_acd(tenant).await?;
        let (r, outputs) = {
            let mut a = lock(&acd);
            let now = Instant::now();
            let r = f(&mut a, now);
            (r, settle(&mut a))
        };
        self.acd_outputs(tenant, outputs);
        self.acd.wake.notify_one();
        r.map_err(|e| acd_error(e).into())
    }

    fn remember_sip_user(&self, tenant: &str, agent: &AgentRecord) {
        let key = (tenant.to_string(), agent.config.id.clone());
        let mut users = lock(&self.acd.sip_users);
        match &agent.sip_user {
            Some(u) => users.insert(key, u.clone()),
            None => users.remove(&key),
        };
    }

    /// Tells the channel watching the task (if any) what it must do; a
    /// task that has left the ACD is no longer watched.
    fn tell_watcher(self: &Arc<Self>, tenant: &str, o: &Output) {
        use plugboard_acd::TaskEvent as E;
        let (task, news, ends) = match o {
            Output::Offer { task, agent, .. } => {
                let sip_user = lock(&self.acd.sip_users)
                    .get(&(tenant.to_string(), agent.clone()))
                    .cloned();
                let news = TaskNews::Offer {
                    agent: agent.clone(),
                    sip_user,
                };
                (task, Some(news), false)
            }
            Output::Rescind { task, agent } => (
                task,
                Some(TaskNews::Rescind {
                    agent: agent.clone(),
                }),
                false,
            ),
            Output::BackToFlow { task, why } => (task, Some(TaskNews::BackToFlow { why }), true),
            Output::Position {
                task,
                position,
                expected_wait,
            } => {
                if !lock(&self.acd.watchers).contains_key(&(tenant.to_string(), task.clone())) {
                    // A callback is not on the line: nobody to tell.
                    return;
                }
                (
                    task,
                    Some(TaskNews::Position {
                        position: *position,
                        expected_wait: *expected_wait,
                    }),
                    false,
                )
            }
            Output::Event {
                task,
                event: E::Completed { .. } | E::Abandoned { .. } | E::TimedOut { .. },
            } => (task, None, true),
            _ => return,
        };
        let key = (tenant.to_string(), task.clone());
        if !lock(&self.acd.watchers).contains_key(&key) {
            let number = lock(&self.acd.callbacks).get(&key).cloned();
            if let (Some(number), Some(news)) = (number, news) {
                self.tell_runner(tenant, task, number, news);
            }
            return;
        }
        let mut watchers = lock(&self.acd.watchers);
        if let Some(news) = news
            && let Some(w) = watchers.get(&key)
            && w.send(news).is_err()
        {
            // The channel is gone (the customer left while the task was
            // being created): nobody is waiting any more.
            watchers.remove(&key);
            let (engine, tenant, task) = (self.clone(), tenant.to_string(), task.clone());
            tokio::spawn(async move {
                let _ = engine.abandon_task(&tenant, &task).await;
            });
        }
        if ends {
            watchers.remove(&key);
        }
    }

    /// Hands a callback task's news to the voice channel's runner; a
    /// callback that left its queue (`max_wait`, `full`) has failed.
    fn tell_runner(self: &Arc<Self>, tenant: &str, task: &str, number: String, news: TaskNews) {
        if let TaskNews::BackToFlow { why } = news {
            let (engine, tenant, task) = (self.clone(), tenant.to_string(), task.to_string());
            tokio::spawn(async move {
                if let Err(e) = engine.fail_callback(&tenant, &task, why).await {
                    tracing::warn!("callback {task} of {tenant}: {e}");
                }
            });
            return;
        }
        let job = crate::callback::CallbackJob {
            tenant: tenant.to_string(),
            task: task.to_string(),
            number,
            news,
        };
        let sent = lock(&self.acd.runner)
            .as_ref()
            .is_some_and(|r| r.send(job).is_ok());
        if !sent {
            tracing::warn!(
                "callback {task} of {tenant} offered, but no voice channel runs callbacks here"
            );
        }
    }

    /// These queues' numbers changed: they go on the event stream soon.
    fn stats_changed(&self, tenant: &str, queues: Vec<String>) {
        if queues.is_empty() {
            return;
        }
        let mut due = lock(&self.acd.stats_due);
        for q in queues {
            due.0.insert((tenant.to_string(), q));
        }
        drop(due);
        self.acd.wake.notify_one();
    }

    /// Every queue of the tenant may have changed (an agent's presence).
    fn all_stats_changed(&self, tenant: &str) {
        let acd = lock(&self.acd.tenants).get(tenant).cloned();
        if let Some(acd) = acd {
            let ids = lock(&acd).queue_ids();
            self.stats_changed(tenant, ids);
        }
    }

    /// The numbers of the queues that changed, on their tenants' event
    /// streams (`kind: acd`, `type: stats`), at most every
    /// [`STATS_EVERY`].
    fn publish_stats(self: &Arc<Self>, now: Instant) {
        let due: Vec<(String, String)> = {
            let mut d = lock(&self.acd.stats_due);
            if d.0.is_empty() || d.1.is_some_and(|t| now < t + STATS_EVERY) {
                return;
            }
            d.1 = Some(now);
            d.0.drain().collect()
        };
        for (tenant, queue) in due {
            let Some(acd) = lock(&self.acd.tenants).get(&tenant).cloned() else {
                continue;
            };
            let stats = lock(&acd).queue_stats(now, &queue);
            self.publish(
                &tenant,
                json!({"kind": "acd", "data": {"type": "stats", "queue": queue, "stats": stats}}),
            );
        }
    }

    /// Publishes the ACD's decisions, keeps each task's last state, tells
    /// the channels watching their tasks, and asks the queue's router
    /// plugin to rank the candidates.
    fn acd_outputs(self: &Arc<Self>, tenant: &str, outputs: Vec<Output>) {
        let mut changed = Vec::new();
        for o in &outputs {
            let task = match o {
                Output::Event {
                    event: plugboard_acd::TaskEvent::Enqueued { queue },
                    ..
                } => {
                    changed.push(queue.clone());
                    continue;
                }
                Output::Offer { task, .. }
                | Output::Rescind { task, .. }
                | Output::BackToFlow { task, .. }
                | Output::Event { task, .. } => task,
                Output::Presence { .. } => {
                    self.all_stats_changed(tenant);
                    continue;
                }
                Output::Route { .. } | Output::Position { .. } => continue,
            };
            let queue = lock(&self.acd.tasks)
                .get(&(tenant.to_string(), task.clone()))
                .map(|v| v.queue.clone());
            changed.extend(queue);
        }
        self.stats_changed(tenant, changed);
        for o in outputs {
            self.tell_watcher(tenant, &o);
            if let Output::Route {
                task, candidates, ..
            } = &o
            {
                let (engine, tenant, task, candidates) = (
                    self.clone(),
                    tenant.to_string(),
                    task.clone(),
                    candidates.clone(),
                );
                tokio::spawn(async move { engine.route(&tenant, &task, candidates).await });
            }
            if let Output::Event {
                task,
                event:
                    plugboard_acd::TaskEvent::Completed { agent }
                    | plugboard_acd::TaskEvent::HandedOver { from: agent, .. },
            } = &o
            {
                let now = Instant::now();
                let mut holders = lock(&self.acd.holders);
                if holders.len() >= ENDED_MAX {
                    holders.retain(|_, (_, at)| now.saturating_duration_since(*at) < ENDED_KEPT);
                }
                // Still full within the hour: the oldest tenth goes.
                if holders.len() >= ENDED_MAX {
                    let mut ages: Vec<Instant> = holders.values().map(|(_, at)| *at).collect();
                    let cut = ages.len() / 10;
                    let (_, nth, _) = ages.select_nth_unstable(cut);
                    let cut = *nth;
                    holders.retain(|_, (_, at)| *at > cut);
                }
                holders.insert((tenant.to_string(), task.clone()), (agent.clone(), now));
            }
            if let Some((task, state, agent, queue)) = view_change(&o) {
                let key = (tenant.to_string(), task.to_string());
                let mut tasks = lock(&self.acd.tasks);
                if let Some(v) = tasks.get_mut(&key) {
                    v.state = state.to_string();
                    v.agent = agent.map(str::to_string);
                    if let Some(q) = queue {
                        v.queue = q.to_string();
                    }
                }
                if matches!(state, "completed" | "abandoned" | "timed_out") {
                    let now = Instant::now();
                    let mut ended = lock(&self.acd.ended);
                    ended.push_back((now, key));
                    // Forget the oldest ended views (a task enqueued again
                    // since, such as a callback tried again, is kept).
                    while let Some((at, _)) = ended.front() {
                        if now.saturating_duration_since(*at) < ENDED_KEPT
                            && ended.len() <= ENDED_MAX
                        {
                            break;
                        }
                        if let Some((_, old)) = ended.pop_front()
                            && tasks.get(&old).is_some_and(|v| {
                                matches!(v.state.as_str(), "completed" | "abandoned" | "timed_out")
                            })
                        {
                            tasks.remove(&old);
                        }
                    }
                }
            }
            let mut event = output_json(&o);
            if let Output::Offer { task, .. } = &o {
                // The desktop shows the queue and counts the offer down.
                let acd = lock(&self.acd.tenants).get(tenant).cloned();
                if let Some(info) = acd.and_then(|a| lock(&a).task_info(Instant::now(), task)) {
                    event["queue"] = json!(info.queue.id);
                    event["timeout_ms"] = json!(info.queue.offer_timeout.as_millis() as u64);
                }
            }
            self.acd_event(tenant, event);
        }
    }

    /// Runs the queue's router plugin on a task and its candidates and
    /// hands its ranking to the ACD. A router that is missing, traps,
    /// overruns its deadline or answers garbage is recorded, and the
    /// built-in rule decides.
    async fn route(self: &Arc<Self>, tenant: &str, task: &str, candidates: Vec<String>) {
        let ranking = match self.run_router(tenant, task, &candidates).await {
            Ok(decision) => Some(decision),
            Err(e) => {
                tracing::warn!(
                    "router for task {task} of {tenant}: {e}; the built-in rule decides"
                );
                self.acd_event(
                    tenant,
                    json!({"type": "router_failed", "task": task, "error": e.to_string()}),
                );
                None
            }
        };
        let (ranked, priority) = match ranking {
            Some(d) => (Some(d.ranked), d.priority),
            None => (None, None),
        };
        // The task may have gone meanwhile (abandoned): nothing to decide.
        let _ = self
            .with_acd(tenant, |a, now| a.decided(now, task, ranked, priority))
            .await;
    }

    async fn run_router(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        candidates: &[String],
    ) -> EngineResult<plugboard_host::RouteDecision> {
        let acd = self.tenant_acd(tenant).await?;
        let (info, agents) = {
            let a = lock(&acd);
            let now = Instant::now();
            let info = a
                .task_info(now, task)
                .ok_or_else(|| CoreError::NotFound(format!("task {task}")))?;
            let agents: Vec<plugboard_host::RouteAgent> = candidates
                .iter()
                .filter_map(|id| {
                    a.agent_info(now, id).map(|i| plugboard_host::RouteAgent {
                        id: id.clone(),
                        skills: i.skills.into_iter().collect(),
                        idle_ms: i.idle.as_millis() as u64,
                        active_tasks: i.active,
                    })
                })
                .collect();
            (info, agents)
        };
        let name = info
            .queue
            .router
            .clone()
            .ok_or_else(|| CoreError::Invalid("the queue has no router".into()))?;
        let (plugin, env, t) = self
            .plugin_call(tenant, &name, plugboard_core::PluginKind::Router)
            .await?;
        let route_task = plugboard_host::RouteTask {
            id: task.to_string(),
            channel: info.channel.to_string(),
            queue: info.queue.id.clone(),
            priority: info.priority,
            skills: info.skills,
            attributes: Vec::new(),
            waited_ms: info.waited.as_millis() as u64,
        };
        let permit = self.fair.acquire(tenant, self.share_for(&t)).await;
        let host = self.host.clone();
        // A task of its own: the invocation runs to its end even if the
        // caller stops waiting.
        let report = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let _permit = permit;
            host.invoke_router(&plugin, env, &route_task, &agents).await
        }))
        .await
        .map_err(|e| crate::EngineError::Internal(e.to_string()))?;
        self.observe(tenant, &name, "router", &report);
        report
            .outcome
            .map_err(|e| crate::EngineError::Internal(format!("router {name}: {e}")))
    }

    /// Adds or replaces a queue.
    pub async fn set_queue(
        self: &Arc<Self>,
        tenant: &str,
        queue: QueueConfig,
    ) -> EngineResult<QueueConfig> {
        validate_id("queue", &queue.id)?;
        if queue.offer_timeout.is_zero() {
            return Err(CoreError::Invalid("offer_timeout must be more than 0".into()).into());
        }
        let record = serde_json::to_value(&queue).map_err(|e| CoreError::Invalid(e.to_string()))?;
        self.store
            .set_record(tenant, QUEUE, &queue.id, &record)
            .await?;
        let q = queue.clone();
        self.with_acd(tenant, move |a, _| {
            a.set_queue(q);
            Ok(())
        })
        .await?;
        Ok(queue)
    }

    /// A tenant's queues.
    pub async fn queues(&self, tenant: &str) -> EngineResult<Vec<QueueConfig>> {
        self.store
            .records(tenant, QUEUE)
            .await?
            .into_iter()
            .map(parse)
            .collect()
    }

    /// A queue's current numbers.
    pub async fn queue_stats(
        self: &Arc<Self>,
        tenant: &str,
        queue: &str,
    ) -> EngineResult<QueueStats> {
        if self.store.record(tenant, QUEUE, queue).await?.is_none() {
            return Err(CoreError::NotFound(format!("queue {queue}")).into());
        }
        let acd = self.tenant_acd(tenant).await?;
        let stats = lock(&acd).queue_stats(Instant::now(), queue);
        Ok(stats)
    }

    /// Adds or replaces an agent (their presence is kept; a new agent is
    /// offline).
    pub async fn set_agent(
        self: &Arc<Self>,
        tenant: &str,
        agent: AgentRecord,
    ) -> EngineResult<AgentRecord> {
        validate_id("agent", &agent.config.id)?;
        if agent.config.skills.values().any(|l| !(1..=10).contains(l)) {
            return Err(CoreError::Invalid("skill levels are 1..=10".into()).into());
        }
        let record = serde_json::to_value(&agent).map_err(|e| CoreError::Invalid(e.to_string()))?;
        if let Some(seats) = self.capacity().limits(tenant).agents
            && self
                .store
                .record(tenant, AGENT, &agent.config.id)
                .await?
                .is_none()
        {
            let n = self.store.records(tenant, AGENT).await?.len();
            if n >= seats as usize {
                return Err(CoreError::Conflict(format!(
                    "the tenant has {n} agents, its limit is {seats} seats: ask the operator for more"
                ))
                .into());
            }
        }
        self.store
            .set_record(tenant, AGENT, &agent.config.id, &record)
            .await?;
        self.remember_sip_user(tenant, &agent);
        let config = agent.config.clone();
        self.with_acd(tenant, move |a, now| {
            a.set_agent(now, config);
            Ok(())
        })
        .await?;
        Ok(agent)
    }

    /// A tenant's agents, each with their presence.
    pub async fn agents(self: &Arc<Self>, tenant: &str) -> EngineResult<Vec<Value>> {
        let acd = self.tenant_acd(tenant).await?;
        let records = self.store.records(tenant, AGENT).await?;
        let a = lock(&acd);
        let now = Instant::now();
        Ok(records
            .into_iter()
            .map(|mut r| {
                let id = r["id"].as_str().unwrap_or_default().to_string();
                r["presence"] = json!(a.presence(&id).unwrap_or(&Presence::Offline));
                r["stats"] = json!(a.agent_stats(now, &id));
                r
            })
            .collect())
    }

    /// An agent's presence.
    pub async fn set_presence(
        self: &Arc<Self>,
        tenant: &str,
        agent: &str,
        presence: Presence,
    ) -> EngineResult<()> {
        let logged =
            json!({"type": "presence", "agent": agent, "presence": presence, "by": "agent"});
        self.with_acd(tenant, |a, now| a.set_presence(now, agent, presence))
            .await?;
        self.acd_event(tenant, logged);
        self.all_stats_changed(tenant);
        Ok(())
    }

    /// Publishes an ACD event on the tenant's stream and, unless it is
    /// routing chatter (route, position) or said again by a task event,
    /// appends it to the tenant's
    /// queue event log for the reports, with its time and the task's
    /// queue.
    pub(crate) fn acd_event(self: &Arc<Self>, tenant: &str, mut data: Value) {
        self.publish(tenant, json!({"kind": "acd", "data": data.clone()}));
        if data["type"] == "presence"
            && let Some(agent) = data["agent"].as_str()
        {
            self.meter_seat(tenant, agent, data["presence"]["state"] != "offline");
        }
        // Offers and rescinds are logged as the task events `offered` and
        // `no_answer`.
        if matches!(
            data["type"].as_str(),
            Some("route" | "position" | "offer" | "rescind")
        ) {
            return;
        }
        if data["queue"].is_null()
            && let Some(task) = data["task"].as_str()
            && let Some(v) = lock(&self.acd.tasks).get(&(tenant.to_string(), task.to_string()))
        {
            data["queue"] = json!(v.queue);
        }
        // The id is taken under the writer's lock, so that ids reach the
        // writer in order and its records' keys only grow.
        let mut log = lock(&self.acd.log);
        let at = plugboard_core::now_ms();
        let id = self.acd.event_id(at);
        data["id"] = json!(id);
        data["at_ms"] = json!(at);
        let tx = log.get_or_insert_with(|| spawn_event_writer(Arc::downgrade(self)));
        let _ = tx.send((tenant.to_string(), id, data));
    }

    /// The tenant's queue event log after `after` (an event id; from the
    /// start when empty): at most `limit` events, only those matching
    /// every filter given (queue, agent — as the agent, the supervisor or
    /// the one handed to — task).
    pub async fn queue_events(
        &self,
        tenant: &str,
        after: &str,
        limit: usize,
        filter: &EventFilter,
    ) -> EngineResult<Vec<Value>> {
        let limit = limit.clamp(1, 1000);
        let mut out = Vec::new();
        let mut cursor = after.to_string();
        // Filtered pages are read until enough match, looking at no more
        // than LOG_SCAN events (whole records).
        let mut scanned = 0usize;
        while scanned < LOG_SCAN {
            let page = self
                .store
                .records_after(tenant, QUEUE_EVENT, &cursor, LOG_PAGE)
                .await?;
            let Some((last, _)) = page.last() else { break };
            let next = last.clone();
            let last_page = page.len() < LOG_PAGE;
            for e in logged_events(page, after) {
                scanned += 1;
                if filter.matches(&e) {
                    out.push(e);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
            cursor = next;
            if last_page {
                break;
            }
        }
        Ok(out)
    }

    /// The historical report of the tenant's queues and agents for the
    /// intervals of `interval_ms` in `[from_ms, to_ms)`, from the stored
    /// queue events ([`plugboard_acd::report`]). Events from a day before
    /// `from_ms` are read too, so that a wait that began earlier counts
    /// whole. At most [`REPORT_EVENTS`] events are read: a longer span is
    /// refused (ask for a shorter one).
    pub async fn report(
        &self,
        tenant: &str,
        from_ms: u64,
        to_ms: u64,
        interval_ms: u64,
    ) -> EngineResult<plugboard_acd::report::Report> {
        use plugboard_acd::report::{Happened, ReportEvent};
        if to_ms <= from_ms || interval_ms == 0 || (to_ms - from_ms) / interval_ms > 10_000 {
            return Err(CoreError::Invalid(
                "from must be before to, with at most 10,000 intervals between".into(),
            )
            .into());
        }
        let service: HashMap<String, u64> = self
            .queues(tenant)
            .await?
            .into_iter()
            .map(|q| (q.id, q.service_level.as_millis() as u64))
            .collect();
        let start = format!("{:013}", from_ms.saturating_sub(86_400_000));
        let mut cursor = start.clone();
        let mut events = Vec::new();
        let mut read = 0usize;
        loop {
            let page = self
                .store
                .records_after(tenant, QUEUE_EVENT, &cursor, LOG_PAGE)
                .await?;
            let Some((last, _)) = page.last() else { break };
            cursor = last.clone();
            let last_page = page.len() < LOG_PAGE;
            // A record's key starts with its last event's time: once keys
            // are a minute past the span, no later record holds an event
            // in it (records of two nodes may overlap by that much).
            let past = cursor
                .get(..13)
                .and_then(|ms| ms.parse::<u64>().ok())
                .is_some_and(|ms| ms >= to_ms.saturating_add(60_000));
            for e in logged_events(page, &start) {
                let at_ms = e["at_ms"].as_u64().unwrap_or(0);
                if at_ms >= to_ms {
                    continue;
                }
                read += 1;
                if read > REPORT_EVENTS {
                    return Err(CoreError::Invalid(format!(
                        "more than {REPORT_EVENTS} queue events in the span: ask for a shorter one"
                    ))
                    .into());
                }
                let (Some(task), Some(ev)) = (e["task"].as_str(), e["event"].as_object()) else {
                    continue;
                };
                let s = |k: &str| ev.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                let what = match ev.get("kind").and_then(Value::as_str) {
                    Some("enqueued") => Happened::Enqueued { queue: s("queue") },
                    Some("overflowed") => Happened::Enqueued { queue: s("to") },
                    Some("offered") => Happened::Offered { agent: s("agent") },
                    Some("accepted") => Happened::Accepted { agent: s("agent") },
                    Some("rejected") => Happened::Rejected { agent: s("agent") },
                    Some("no_answer") => Happened::NoAnswer { agent: s("agent") },
                    Some("abandoned") => Happened::Abandoned,
                    Some("timed_out") => Happened::TimedOut,
                    Some("completed") => Happened::Completed { agent: s("agent") },
                    Some("handed_over") => Happened::HandedOver {
                        from: s("from"),
                        to: s("to"),
                    },
                    _ => continue,
                };
                events.push(ReportEvent {
                    at_ms,
                    task: task.to_string(),
                    queue: e["queue"].as_str().map(str::to_string),
                    what,
                });
            }
            if last_page || past {
                break;
            }
        }
        Ok(plugboard_acd::report::build(
            &events,
            from_ms,
            to_ms,
            interval_ms,
            |q| service.get(q).copied().unwrap_or(20_000),
        ))
    }

    /// Routes a new task in a queue.
    pub async fn create_task(
        self: &Arc<Self>,
        tenant: &str,
        spec: TaskSpec,
    ) -> EngineResult<TaskView> {
        validate_id("task", &spec.id)?;
        let key = (tenant.to_string(), spec.id.clone());
        let view = TaskView {
            id: spec.id.clone(),
            queue: spec.queue.clone(),
            state: "waiting".into(),
            agent: None,
        };
        {
            let mut tasks = lock(&self.acd.tasks);
            if tasks
                .get(&key)
                .is_some_and(|t| matches!(t.state.as_str(), "waiting" | "offered" | "connected"))
            {
                return Err(CoreError::Conflict(format!("task {} exists", spec.id)).into());
            }
            tasks.insert(key.clone(), view);
        }
        let r = self.with_acd(tenant, |a, now| a.enqueue(now, spec)).await;
        if r.is_err() {
            lock(&self.acd.tasks).remove(&key);
        }
        r?;
        self.task(tenant, &key.1)
    }

    /// The agent and role of an agent's token (by its hash), if the token
    /// is current and its agent still exists.
    pub(crate) async fn agent_token(
        &self,
        tenant: &str,
        hash: &str,
    ) -> EngineResult<Option<(String, Role)>> {
        let record = match self.store.record(tenant, TOKEN, hash).await {
            Ok(r) => r,
            // No such tenant: no such token.
            Err(CoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(record) = record else {
            return Ok(None);
        };
        let agent = record["agent"].as_str().unwrap_or_default().to_string();
        let role: Role = serde_json::from_value(record["role"].clone()).unwrap_or_default();
        if self.store.record(tenant, AGENT, &agent).await?.is_none() {
            return Ok(None);
        }
        Ok(Some((agent, role)))
    }

    /// Issues a token for an agent with this role (shown once, only its
    /// hash is kept); the agent's earlier token stops working.
    pub async fn issue_agent_token(
        self: &Arc<Self>,
        tenant: &str,
        agent: &str,
        role: Role,
    ) -> EngineResult<String> {
        if self.store.record(tenant, AGENT, agent).await?.is_none() {
            return Err(CoreError::NotFound(format!("agent {agent}")).into());
        }
        for old in self.store.records(tenant, TOKEN).await? {
            if old["agent"] == agent
                && let Some(h) = old["hash"].as_str()
            {
                self.store.delete_record(tenant, TOKEN, h).await?;
            }
        }
        let token = crate::random_token(&format!("{TOKEN_PREFIX}{tenant}."))?;
        let hash = plugboard_store::hash_key(&token);
        let record = json!({"agent": agent, "role": role, "hash": hash});
        self.store.set_record(tenant, TOKEN, &hash, &record).await?;
        Ok(token)
    }

    /// Checks the token may act on `tenant`'s ACD and says in which role.
    pub async fn acd_access(
        &self,
        token: Option<&str>,
        tenant: &str,
    ) -> EngineResult<(plugboard_core::Tenant, AcdRole)> {
        let role = match self.authenticate(token).await? {
            Caller::Admin => AcdRole::Tenant,
            Caller::Tenant(t) if t == tenant => AcdRole::Tenant,
            Caller::Agent {
                tenant: t,
                agent,
                role,
            } if t == tenant => match role {
                Role::Agent => AcdRole::Agent(agent),
                Role::Supervisor => AcdRole::Supervisor(agent),
            },
            _ => {
                return Err(EngineError::Forbidden(
                    "this token belongs to another tenant",
                ));
            }
        };
        Ok((self.tenant(tenant).await?, role))
    }

    /// One agent with their presence.
    pub async fn agent(self: &Arc<Self>, tenant: &str, agent: &str) -> EngineResult<Value> {
        let acd = self.tenant_acd(tenant).await?;
        let mut r = self
            .store
            .record(tenant, AGENT, agent)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("agent {agent}")))?;
        let a = lock(&acd);
        r["presence"] = json!(a.presence(agent).unwrap_or(&Presence::Offline));
        r["stats"] = json!(a.agent_stats(Instant::now(), agent));
        Ok(r)
    }

    /// The tenant's tasks as last known, newest state; only `agent`'s if
    /// given.
    pub fn tasks(&self, tenant: &str, agent: Option<&str>) -> Vec<TaskView> {
        let mut v: Vec<TaskView> = lock(&self.acd.tasks)
            .iter()
            .filter(|((t, _), v)| {
                t == tenant && agent.is_none_or(|a| v.agent.as_deref() == Some(a))
            })
            .map(|(_, v)| v.clone())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Routes a new task for a channel that carries out its offers: what
    /// the channel must do comes to `watcher` ([`TaskNews`]) until the task
    /// ends.
    pub async fn enqueue_watched(
        self: &Arc<Self>,
        tenant: &str,
        spec: TaskSpec,
        watcher: TaskWatcher,
    ) -> EngineResult<TaskView> {
        let key = (tenant.to_string(), spec.id.clone());
        lock(&self.acd.watchers).insert(key.clone(), watcher.clone());
        let r = self.create_task(tenant, spec).await;
        if r.is_err() {
            lock(&self.acd.watchers).remove(&key);
        }
        let view = r?;
        // The queue's settings are in the ACD already (no store read).
        let acd = self.tenant_acd(tenant).await?;
        let queue = lock(&acd)
            .task_info(Instant::now(), &view.id)
            .map(|i| i.queue);
        if let Some(digit) = queue.as_ref().and_then(|q| q.callback_digit) {
            let _ = watcher.send(TaskNews::CallbackDigit { digit });
        }
        if queue.as_ref().is_some_and(|q| q.record) {
            let _ = watcher.send(TaskNews::Record);
        }
        if let Some(q) = queue.filter(|q| q.whisper) {
            let _ = watcher.send(TaskNews::Whisper { queue: q.id });
        }
        Ok(view)
    }

    /// The agent who last had `task` (completed it, passed it on or
    /// handed it over) within [`ENDED_KEPT`].
    pub fn last_holder(&self, tenant: &str, task: &str) -> Option<String> {
        lock(&self.acd.holders)
            .get(&(tenant.to_string(), task.to_string()))
            .filter(|(_, at)| at.elapsed() < ENDED_KEPT)
            .map(|(a, _)| a.clone())
    }

    /// The channel of a task the ACD holds.
    async fn task_channel(self: &Arc<Self>, tenant: &str, task: &str) -> Option<Channel> {
        let acd = self.tenant_acd(tenant).await.ok()?;
        lock(&acd)
            .task_info(Instant::now(), task)
            .map(|i| i.channel)
    }

    /// Passes a connected task on, blind: to `queue:Q`, `agent:A` (the
    /// same queue, only that agent), or a number or SIP URI. The agent's
    /// part ends (they wrap up); the channel carries the customer on, and
    /// the interaction — attributes and timeline — goes with them.
    pub async fn transfer_task(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        target: &str,
    ) -> EngineResult<TaskView> {
        let view = self.task(tenant, task)?;
        if view.state != "connected" {
            return Err(CoreError::Conflict(format!("task {task} is not connected")).into());
        }
        if let Some(q) = target.strip_prefix("queue:") {
            if self.store.record(tenant, QUEUE, q).await?.is_none() {
                return Err(CoreError::NotFound(format!("queue {q}")).into());
            }
        } else if let Some(a) = target.strip_prefix("agent:") {
            if self.store.record(tenant, AGENT, a).await?.is_none() {
                return Err(CoreError::NotFound(format!("agent {a}")).into());
            }
        } else if target.trim().is_empty() {
            return Err(CoreError::Invalid(
                "transfer to queue:NAME, agent:ID, a number or a SIP URI".into(),
            )
            .into());
        } else if self
            .task_channel(tenant, task)
            .await
            .is_some_and(Channel::is_text)
        {
            return Err(CoreError::Invalid(
                "a conversation is passed to queue:NAME or agent:ID".into(),
            )
            .into());
        }
        let key = (tenant.to_string(), task.to_string());
        // Kept aside while the task completes, so that the channel hears
        // where to take the customer.
        let watcher = lock(&self.acd.watchers).remove(&key).ok_or_else(|| {
            CoreError::Conflict(format!(
                "task {task} has no live channel to transfer (a task made over the API)"
            ))
        })?;
        if let Err(e) = self.complete_task(tenant, task).await {
            lock(&self.acd.watchers).insert(key, watcher);
            return Err(e);
        }
        let _ = watcher.send(TaskNews::Transfer {
            target: target.to_string(),
        });
        self.acd_event(
            tenant,
            json!({"type": "transfer", "task": task, "agent": view.agent, "target": target}),
        );
        self.task(tenant, task)
    }

    /// The live channel of a connected task, or why there is none.
    fn live_watcher(&self, tenant: &str, task: &str) -> EngineResult<TaskWatcher> {
        let view = self.task(tenant, task)?;
        if view.state != "connected" {
            return Err(CoreError::Conflict(format!("task {task} is not connected")).into());
        }
        lock(&self.acd.watchers)
            .get(&(tenant.to_string(), task.to_string()))
            .cloned()
            .ok_or_else(|| {
                CoreError::Conflict(format!(
                    "task {task} has no live call (a task made over the API)"
                ))
                .into()
            })
    }

    /// An agent's phone, as the address of record a call rings (their SIP
    /// user, else `agent:ID`, their softphone): the agent must exist (else
    /// `NotFound`).
    async fn agent_phone(&self, tenant: &str, agent: &str) -> EngineResult<String> {
        if self.store.record(tenant, AGENT, agent).await?.is_none() {
            return Err(CoreError::NotFound(format!("agent {agent}")).into());
        }
        // An agent without a SIP phone is reached on their softphone (the
        // voice channel knows whether it is connected).
        Ok(lock(&self.acd.sip_users)
            .get(&(tenant.to_string(), agent.to_string()))
            .map(|u| format!("sip:{u}@{tenant}"))
            .unwrap_or_else(|| format!("agent:{agent}")))
    }

    /// Starts a warm transfer of a connected call: the customer holds
    /// (music) while the agent consults `target` — `agent:A` (their
    /// phone), a number or a SIP URI — and then completes or cancels it
    /// ([`Engine::end_consult`]).
    pub async fn consult_task(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        target: &str,
    ) -> EngineResult<TaskView> {
        let watcher = self.live_watcher(tenant, task)?;
        let news = if let Some(a) = target.strip_prefix("agent:") {
            TaskNews::Consult {
                target: self.agent_phone(tenant, a).await?,
                agent: Some(a.to_string()),
            }
        } else if target.starts_with("queue:") || target.trim().is_empty() {
            return Err(CoreError::Invalid(
                "a warm transfer goes to agent:ID, a number or a SIP URI (to a queue: blind)"
                    .into(),
            )
            .into());
        } else {
            TaskNews::Consult {
                target: target.to_string(),
                agent: None,
            }
        };
        let _ = watcher.send(news);
        let agent = self.task(tenant, task).ok().and_then(|v| v.agent);
        self.acd_event(
            tenant,
            json!({"type": "consult", "task": task, "agent": agent, "target": target}),
        );
        self.task(tenant, task)
    }

    /// Ends a warm transfer: `complete` passes the customer to the
    /// consulted party (the agent leaves and wraps up; a consulted agent
    /// gets the task), else the consulted party is hung up and the agent
    /// has the customer back.
    pub async fn end_consult(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        complete: bool,
    ) -> EngineResult<TaskView> {
        let watcher = self.live_watcher(tenant, task)?;
        let _ = watcher.send(TaskNews::ConsultEnd { complete });
        self.acd_event(
            tenant,
            json!({"type": if complete { "consult_completed" } else { "consult_cancelled" }, "task": task}),
        );
        self.task(tenant, task)
    }

    /// Hands a connected task to the agent a warm transfer consulted.
    pub async fn hand_over_task(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        to: &str,
    ) -> EngineResult<TaskView> {
        self.with_acd(tenant, |a, now| a.hand_over(now, task, to))
            .await?;
        self.task(tenant, task)
    }

    /// Pauses (or resumes) the recording of a task's conversation: what
    /// is recorded meanwhile is silence (a card number read out).
    pub async fn pause_recording(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        paused: bool,
    ) -> EngineResult<TaskView> {
        let watcher = self.live_watcher(tenant, task)?;
        // Only a call of a queue that records has a recording to pause.
        let acd = self.tenant_acd(tenant).await?;
        let records = lock(&acd)
            .task_info(Instant::now(), task)
            .is_some_and(|i| i.queue.record && i.channel == Channel::Voice);
        if !records {
            return Err(CoreError::Conflict(format!(
                "task {task} is not a call of a queue that records its conversations"
            ))
            .into());
        }
        if watcher.send(TaskNews::RecordingPaused(paused)).is_err() {
            return Err(CoreError::Conflict(format!("task {task} has no live call")).into());
        }
        let kind = if paused {
            "recording_paused"
        } else {
            "recording_resumed"
        };
        self.acd_event(tenant, json!({"type": kind, "task": task}));
        self.task(tenant, task)
    }

    /// A supervisor joins a connected call from their own phone — to
    /// listen, whisper to the agent, or barge in — or changes mode, or
    /// leaves (`None`).
    pub async fn monitor_task(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        supervisor: &str,
        mode: Option<plugboard_core::MonitorMode>,
    ) -> EngineResult<TaskView> {
        let watcher = self.live_watcher(tenant, task)?;
        let phone = self.agent_phone(tenant, supervisor).await?;
        let _ = watcher.send(TaskNews::Monitor {
            supervisor: supervisor.to_string(),
            sip_user: phone,
            mode,
        });
        self.acd_event(
            tenant,
            json!({"type": "monitor", "task": task, "supervisor": supervisor, "mode": mode}),
        );
        self.task(tenant, task)
    }

    /// The channel could not reach the agent offered the task (busy,
    /// unreachable, not answered): the next agent is tried.
    pub async fn missed_task(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        agent: &str,
    ) -> EngineResult<TaskView> {
        self.with_acd(tenant, |a, now| a.missed(now, task, agent))
            .await?;
        self.task(tenant, task)
    }

    /// A task's last known state.
    pub fn task(&self, tenant: &str, id: &str) -> EngineResult<TaskView> {
        lock(&self.acd.tasks)
            .get(&(tenant.to_string(), id.to_string()))
            .cloned()
            .ok_or_else(|| CoreError::NotFound(format!("task {id}")).into())
    }

    /// The agent takes the task offered to them.
    pub async fn accept_task(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        agent: &str,
    ) -> EngineResult<TaskView> {
        self.with_acd(tenant, |a, now| a.accept(now, task, agent))
            .await?;
        self.task(tenant, task)
    }

    /// The agent refuses the task offered to them.
    pub async fn reject_task(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
        agent: &str,
    ) -> EngineResult<TaskView> {
        self.with_acd(tenant, |a, now| a.reject(now, task, agent))
            .await?;
        self.task(tenant, task)
    }

    /// The conversation is over (the agent wraps up).
    pub async fn complete_task(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
    ) -> EngineResult<TaskView> {
        self.with_acd(tenant, |a, now| a.complete(now, task))
            .await?;
        self.task(tenant, task)
    }

    /// The customer left.
    pub async fn abandon_task(
        self: &Arc<Self>,
        tenant: &str,
        task: &str,
    ) -> EngineResult<TaskView> {
        self.with_acd(tenant, |a, now| a.abandon(now, task)).await?;
        self.task(tenant, task)
    }
}

/// How an output changes a task's view: the task, its new state, its
/// agent, and the queue it now waits in (an overflow is followed by
/// `enqueued` in the new queue).
fn view_change(o: &Output) -> Option<(&str, &'static str, Option<&str>, Option<&str>)> {
    use plugboard_acd::TaskEvent as E;
    match o {
        Output::Offer { task, agent, .. } => Some((task, "offered", Some(agent), None)),
        Output::Event { task, event } => {
            let (state, agent, queue) = match event {
                E::Enqueued { queue } => ("waiting", None, Some(queue.as_str())),
                E::Rejected { .. } | E::NoAnswer { .. } | E::Overflowed { .. } => {
                    ("waiting", None, None)
                }
                E::Accepted { agent } | E::HandedOver { to: agent, .. } => {
                    ("connected", Some(agent.as_str()), None)
                }
                E::Completed { agent } => ("completed", Some(agent.as_str()), None),
                E::Abandoned { .. } => ("abandoned", None, None),
                E::TimedOut { .. } => ("timed_out", None, None),
                E::Offered { .. } => return None,
            };
            Some((task, state, agent, queue))
        }
        _ => None,
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> EngineResult<T> {
    serde_json::from_value(v).map_err(|e| CoreError::Storage(format!("bad ACD record: {e}")).into())
}

/// An output as JSON for the event stream.
fn output_json(o: &Output) -> Value {
    match o {
        Output::Offer {
            task,
            agent,
            channel,
        } => json!({"type": "offer", "task": task, "agent": agent, "channel": channel}),
        Output::Rescind { task, agent } => json!({"type": "rescind", "task": task, "agent": agent}),
        Output::Route {
            task,
            queue,
            candidates,
        } => json!({"type": "route", "task": task, "queue": queue, "candidates": candidates}),
        Output::BackToFlow { task, why } => {
            json!({"type": "back_to_flow", "task": task, "why": why})
        }
        Output::Event { task, event } => json!({"type": "task", "task": task, "event": event}),
        Output::Presence { agent, presence } => {
            json!({"type": "presence", "agent": agent, "presence": presence})
        }
        Output::Position {
            task,
            position,
            expected_wait,
        } => json!({
            "type": "position",
            "task": task,
            "position": position,
            "expected_wait_s": expected_wait.map(|w| w.as_secs()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_reads_batches_and_single_events_after_a_cursor() {
        let page = vec![
            // As written before batches: one event per record.
            ("001".to_string(), json!({"id": "001", "type": "task"})),
            // A batch, keyed by its last event.
            (
                "004".to_string(),
                json!([{"id": "002"}, {"id": "003"}, {"id": "004"}]),
            ),
        ];
        let ids = |after: &str| -> Vec<String> {
            logged_events(page.clone(), after)
                .map(|e| e["id"].as_str().unwrap_or("").to_string())
                .collect()
        };
        assert_eq!(ids(""), ["001", "002", "003", "004"]);
        // A cursor in the middle of a batch: the rest of it only.
        assert_eq!(ids("002"), ["003", "004"]);
        assert_eq!(ids("004"), Vec::<String>::new());
    }
}
