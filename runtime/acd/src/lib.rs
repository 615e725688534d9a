//! Plugboard's automatic call distributor, sans-IO.
//!
//! A deterministic state machine of queues, agents and tasks. It decides;
//! the channels carry out. Feed it what happened — a task enqueued
//! ([`Acd::enqueue`]), an agent's presence ([`Acd::set_presence`]), an
//! offer accepted or rejected ([`Acd::accept`], [`Acd::reject`]), a
//! conversation over ([`Acd::complete`]), a customer gone
//! ([`Acd::abandon`]), a router's ranking ([`Acd::decided`]) — and the
//! time ([`Acd::handle_timeout`] at [`Acd::poll_timeout`]); take what to do
//! from [`Acd::poll_output`]: offer a task to an agent (ring their phone,
//! show the chat), withdraw an offer, ask the queue's router to rank the
//! candidates, tell the flow a task timed out, and the events to record.
//!
//! Routing: the waiting task that comes first — highest priority, aged by
//! its wait (one step per the queue's `aging`), then first in — is offered
//! to an eligible agent: available, with free capacity on the task's
//! channel (offers, conversations and wrap-up count), holding every
//! required skill, serving the queue. Among several, the queue's router
//! plugin ranks them ([`Output::Route`]); without one, the longest idle
//! wins. An offer not accepted in time goes to the next agent and the
//! task keeps its place; an agent who lets `missed_after` offers in a row
//! go unanswered is set `missed` (not offered until they are available
//! again). A task waits at most the queue's `max_wait`, then overflows
//! to another queue or goes back to its flow.
//!
//! Cost: waiting tasks are indexed in groups that share a queue,
//! priority, channel and skills (within a group the first in always ranks
//! first), and the agents free to take something are kept in a set, so a
//! decision looks at the head of each group and at the free agents only —
//! not at every task and every agent (`examples/acd_bench.rs`).
//!
//! Written here: no crate models contact-centre routing.

pub mod report;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::ops::Bound;
use std::time::{Duration, Instant};

use plugboard_core::Channel;
use serde::{Deserialize, Serialize};

/// What happens to a task that waited too long, or found its queue full.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "to", content = "queue")]
pub enum Overflow {
    /// Back to its flow (a `queue-timeout` event: voicemail, callback, …).
    #[default]
    Flow,
    /// Into another queue (its wait there starts again).
    Queue(String),
}

/// A queue's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// Queue id.
    pub id: String,
    /// Skills every task of the queue needs.
    #[serde(default)]
    pub skills: Vec<String>,
    /// Added to every task's own priority.
    #[serde(default)]
    pub priority: u32,
    /// Longest wait before the task overflows.
    #[serde(default, with = "opt_secs")]
    pub max_wait: Option<Duration>,
    /// Most tasks waiting; a task beyond overflows at once.
    #[serde(default)]
    pub max_size: Option<usize>,
    /// Where a task goes after `max_wait`.
    #[serde(default)]
    pub on_timeout: Overflow,
    /// Where a task goes when the queue is full.
    #[serde(default)]
    pub on_full: Overflow,
    /// One priority step per this much waiting (none: no aging).
    #[serde(default, with = "opt_secs")]
    pub aging: Option<Duration>,
    /// How long an offer rings before it goes to the next agent.
    #[serde(with = "secs")]
    pub offer_timeout: Duration,
    /// Wrap-up after each task, during which the slot stays taken.
    #[serde(default, with = "secs")]
    pub wrap_up: Duration,
    /// The tenant's router plugin that ranks the candidates (none: the
    /// built-in rule, longest idle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<String>,
    /// Unanswered offers in a row after which an agent is set `missed`.
    pub missed_after: u32,
    /// After an agent rejects or misses a task, how long before the task
    /// may be offered to them again (Asterisk's `retry`): one agent whose
    /// phone is busy is not rung in a loop.
    #[serde(default = "default_retry", with = "secs")]
    pub retry: Duration,
    /// A caller who hangs up after waiting this long is called back: the
    /// task stays in its place as a callback (none: no callbacks).
    #[serde(default, with = "opt_secs")]
    pub callback_after: Option<Duration>,
    /// A digit a waiting caller may press to leave and be called back,
    /// keeping their place (none: no such option).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_digit: Option<char>,
    /// The service-level target: a task answered within this wait counts
    /// as answered in service level (e.g. 80 % in 20 s).
    #[serde(default = "default_service_level", with = "secs")]
    pub service_level: Duration,
    /// Whisper to the agent before the customer is connected: the flow's
    /// `whisper` attribute, or else the queue's id, spoken to the agent
    /// alone.
    #[serde(default)]
    pub whisper: bool,
    /// Record the conversation with the agent (what the customer says
    /// and hears while bridged); it can be paused and resumed.
    #[serde(default)]
    pub record: bool,
    /// Tell a waiting customer their position and expected wait this
    /// often (none: never).
    #[serde(default, with = "opt_secs")]
    pub announce_every: Option<Duration>,
    /// The tenant's `crm` plugin the agent desktop asks for the customer's
    /// profile (the screen pop) when a task of this queue is offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crm: Option<String>,
    /// The disposition codes an agent picks from at wrap-up (none: any
    /// code, or none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dispositions: Vec<String>,
}

fn default_service_level() -> Duration {
    Duration::from_secs(20)
}

fn default_retry() -> Duration {
    Duration::from_secs(5)
}

impl QueueConfig {
    /// A queue with the defaults: 20 s offers, no wrap-up, no limits, an
    /// agent missed after 3 unanswered offers.
    pub fn new(id: &str) -> QueueConfig {
        QueueConfig {
            id: id.to_string(),
            skills: Vec::new(),
            priority: 0,
            max_wait: None,
            max_size: None,
            on_timeout: Overflow::Flow,
            on_full: Overflow::Flow,
            aging: None,
            offer_timeout: Duration::from_secs(20),
            wrap_up: Duration::ZERO,
            router: None,
            missed_after: 3,
            retry: default_retry(),
            callback_after: None,
            callback_digit: None,
            service_level: default_service_level(),
            whisper: false,
            record: false,
            announce_every: None,
            crm: None,
            dispositions: Vec::new(),
        }
    }
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

mod opt_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|v| Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// An agent's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Agent id.
    pub id: String,
    /// Skills with levels 1–10.
    #[serde(default)]
    pub skills: BTreeMap<String, u8>,
    /// Tasks at once per channel (a channel not listed: none).
    pub capacity: HashMap<Channel, u32>,
    /// The queues the agent serves (`None`: every queue whose skills they
    /// have).
    #[serde(default)]
    pub queues: Option<BTreeSet<String>>,
}

/// What an agent said about themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum Presence {
    /// Not working.
    Offline,
    /// Ready for tasks.
    Available,
    /// On a break, in a meeting, …: the reason code.
    Away(String),
    /// Set by the ACD after unanswered offers; offered nothing until the
    /// agent is available again.
    Missed,
}

/// A task to route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    /// Task id (the interaction's).
    pub id: String,
    /// Queue id.
    pub queue: String,
    /// Channel (capacity is per channel).
    pub channel: Channel,
    /// Priority (higher first).
    pub priority: u32,
    /// Skills needed beyond the queue's.
    pub skills: Vec<String>,
    /// Only this agent may take it (a transfer to an agent).
    pub agent: Option<String>,
}

/// What happened to a task, for its timeline and the reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TaskEvent {
    /// Waiting in a queue.
    Enqueued {
        /// The queue.
        queue: String,
    },
    /// Offered to an agent.
    Offered {
        /// The agent.
        agent: String,
    },
    /// Accepted: the conversation starts.
    Accepted {
        /// The agent.
        agent: String,
    },
    /// Refused by the agent; the task waits again, in its place.
    Rejected {
        /// The agent.
        agent: String,
    },
    /// Not answered in time; the task waits again, in its place.
    NoAnswer {
        /// The agent.
        agent: String,
    },
    /// Moved to another queue (waited too long, or the queue was full).
    Overflowed {
        /// The queue it left.
        from: String,
        /// The queue it joined.
        to: String,
    },
    /// Handed back to its flow (waited too long, or the queue was full).
    TimedOut {
        /// The queue.
        queue: String,
        /// `max_wait` or `full`.
        why: &'static str,
    },
    /// The customer left before the conversation.
    Abandoned {
        /// The queue.
        queue: String,
    },
    /// The conversation is over.
    Completed {
        /// The agent.
        agent: String,
    },
    /// Handed from one agent to another after a warm transfer: the first
    /// wraps up, the second goes on with the customer.
    HandedOver {
        /// The agent who passed it on.
        from: String,
        /// The agent who has it now.
        to: String,
    },
}

/// What the ACD asks of the channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Offer the task to the agent (ring their phone, show the chat).
    Offer {
        /// Task id.
        task: String,
        /// Agent id.
        agent: String,
        /// The task's channel.
        channel: Channel,
    },
    /// Withdraw an offer (it timed out, or the customer left).
    Rescind {
        /// Task id.
        task: String,
        /// Agent id.
        agent: String,
    },
    /// Ask the queue's router to rank these agents for the task; answer
    /// with [`Acd::decided`]. The candidates are in the built-in order
    /// (longest idle first).
    Route {
        /// Task id.
        task: String,
        /// Queue id.
        queue: String,
        /// Eligible agents.
        candidates: Vec<String>,
    },
    /// The task leaves the ACD back to its flow (`queue-timeout`).
    BackToFlow {
        /// Task id.
        task: String,
        /// `max_wait` or `full`.
        why: &'static str,
    },
    /// A task event to record.
    Event {
        /// Task id.
        task: String,
        /// What happened.
        event: TaskEvent,
    },
    /// Tell the waiting customer where they are (the queue's
    /// `announce_every`).
    Position {
        /// Task id.
        task: String,
        /// 1-based position among the queue's waiting tasks.
        position: u32,
        /// Expected wait: the position over the agents staffing the queue,
        /// times the queue's average handling time (none before the first
        /// task is handled, or with nobody staffing).
        expected_wait: Option<Duration>,
    },
    /// An agent's presence changed by the ACD's own decision (`missed`).
    Presence {
        /// Agent id.
        agent: String,
        /// The new presence.
        presence: Presence,
    },
}

/// Why an input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcdError {
    /// No such queue, agent or task.
    #[error("unknown {0}")]
    Unknown(String),
    /// A task id already routed.
    #[error("task {0} exists")]
    Exists(String),
    /// The task is not in the state the input needs (accepting a task not
    /// offered to this agent, …).
    #[error("task {task} is not {expected}")]
    State {
        /// Task id.
        task: String,
        /// What it should have been.
        expected: &'static str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TaskState {
    Waiting,
    /// The router is ranking the candidates.
    Routing,
    Offered {
        agent: String,
        until: Instant,
    },
    Connected {
        agent: String,
    },
}

#[derive(Debug)]
struct Task {
    spec: TaskSpec,
    /// Order of arrival (ties broken by this, FIFO).
    seq: u64,
    /// When it started waiting (its place is kept across offers).
    since: Instant,
    /// When it overflows.
    deadline: Option<Instant>,
    state: TaskState,
    /// Agents who rejected or missed it: tried last.
    passed: BTreeSet<String>,
    /// Agents who passed on it lately, and when they may be offered it
    /// again.
    resting: BTreeMap<String, Instant>,
    /// Where it is in the waiting index, while it waits.
    indexed: Option<(Group, Place)>,
    /// When the customer is next told their position.
    announce: Option<Instant>,
    /// When the conversation started.
    connected_at: Option<Instant>,
    /// The agents held for this task while its router ranks them.
    routing: Vec<String>,
}

/// Waiting tasks that route alike: same queue, priority, channel and
/// skills. Within a group, the task that has waited longest (then the
/// first in) ranks first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Group {
    queue: String,
    priority: u32,
    channel: Channel,
    skills: Vec<String>,
    agent: Option<String>,
}

/// A task's place in its group: since when it waits, then arrival.
type Place = (Instant, u64);

/// A timer the ACD set: which task's (or agent's) and what for. Entries in
/// the timer heap are checked against the state when they come up, so one
/// made stale by a later change is dropped then.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// The task's offer rings out.
    Offer(String),
    /// The task waited `max_wait`.
    Deadline(String),
    /// The agent (second) may be offered the task (first) again.
    Rest(String, String),
    /// The waiting customer is told their position.
    Announce(String),
    /// The agent's wrap-up ends.
    Wrap(String),
}

#[derive(Debug)]
struct Agent {
    config: AgentConfig,
    presence: Presence,
    /// Offered and connected tasks.
    tasks: BTreeMap<String, Channel>,
    /// Wrap-ups in progress: channel and end.
    wrap: Vec<(Channel, Instant)>,
    /// Since when the agent has had nothing to do (longest idle first).
    idle_since: Instant,
    missed: u32,
    /// Since when the agent is in their present state (presence, or
    /// working).
    state_since: Instant,
    /// Tasks completed since the day began ([`Acd::new_day`]).
    done_today: u32,
}

impl Agent {
    fn load(&self, channel: Channel) -> u32 {
        let tasks = self.tasks.values().filter(|c| **c == channel).count();
        let wrap = self.wrap.iter().filter(|(c, _)| *c == channel).count();
        (tasks + wrap) as u32
    }

    fn free_for(&self, channel: Channel) -> bool {
        self.presence == Presence::Available
            && self.load(channel) < self.config.capacity.get(&channel).copied().unwrap_or(0)
    }

    fn can_do(&self, queue: &QueueConfig, skills: &[String]) -> bool {
        let serves = self
            .config
            .queues
            .as_ref()
            .is_none_or(|q| q.contains(&queue.id));
        serves
            && queue
                .skills
                .iter()
                .chain(skills)
                .all(|s| self.config.skills.get(s).is_some_and(|l| *l >= 1))
    }
}

/// A task as a router sees it ([`Acd::task_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// Its queue's settings.
    pub queue: QueueConfig,
    /// Its channel.
    pub channel: Channel,
    /// Its priority.
    pub priority: u32,
    /// Every skill it needs (the queue's and its own).
    pub skills: Vec<String>,
    /// How long it has waited.
    pub waited: Duration,
}

/// An agent as a router sees it ([`Acd::agent_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Skills with levels.
    pub skills: BTreeMap<String, u8>,
    /// How long the agent has had nothing to do.
    pub idle: Duration,
    /// Tasks in hand (offers, conversations, wrap-ups).
    pub active: u32,
}

/// An agent's numbers ([`Acd::agent_stats`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentStats {
    /// `available`, `busy` (offers or conversations), `wrap_up`, `away`,
    /// `missed` or `offline`.
    pub state: &'static str,
    /// Time in that state, ms.
    pub in_state_ms: u64,
    /// Tasks offered or in conversation.
    pub tasks: Vec<String>,
    /// Tasks completed today.
    pub tasks_today: u32,
}

/// A queue's numbers now (tasks, agents) and today (answered, abandoned,
/// timed out, service level: since the ACD started or the day began,
/// [`Acd::new_day`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueueStats {
    /// Tasks waiting (not yet offered or connected).
    pub waiting: usize,
    /// Tasks being offered.
    pub offered: usize,
    /// Tasks in conversation.
    pub connected: usize,
    /// Longest current wait, ms.
    pub longest_wait_ms: u64,
    /// Agents who serve the queue and are available with room.
    pub agents_available: usize,
    /// Agents who serve the queue, available but full (offers,
    /// conversations, wrap-up).
    pub agents_busy: usize,
    /// Agents who serve the queue and are away or missed.
    pub agents_away: usize,
    /// Tasks answered by an agent.
    pub answered: u64,
    /// Of those, answered within the queue's service-level wait.
    pub answered_in_service_level: u64,
    /// Customers who left while waiting.
    pub abandoned: u64,
    /// Tasks that left for their flow (`max_wait`, `full`).
    pub timed_out: u64,
    /// Answered in service level, in percent of answered and abandoned
    /// (none before the first).
    pub service_level_percent: Option<f64>,
    /// Moving average of handling times, ms (none before the first task
    /// is completed).
    pub average_handle_ms: Option<u64>,
}

/// A queue's counts since the ACD started.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    answered: u64,
    answered_in_sl: u64,
    abandoned: u64,
    timed_out: u64,
    /// Moving average of handling times (connected to completed), ms.
    handle_ms: Option<f64>,
}

/// The weight of the newest handling time in the moving average
/// (Asterisk's queue hold time uses 1/4 too).
const HANDLE_WEIGHT: f64 = 0.25;

/// The ACD (see the crate documentation).
#[derive(Debug, Default)]
pub struct Acd {
    queues: HashMap<String, QueueConfig>,
    agents: HashMap<String, Agent>,
    tasks: HashMap<String, Task>,
    seq: u64,
    out: VecDeque<Output>,
    /// Waiting tasks by group, in order.
    waiting: BTreeMap<Group, BTreeMap<Place, String>>,
    /// Agents available with room on some channel.
    free: BTreeSet<String>,
    /// Counts per queue.
    counts: HashMap<String, Counts>,
    /// Every timer set, soonest first (some stale; see [`Timer`]).
    timers: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, Timer)>>,
    /// Agents held by routers ranking them for a task, and by how many
    /// (they are offered nothing else meanwhile, so a free agent is not
    /// ranked for every waiting task at once).
    held: HashMap<String, u32>,
}

/// How many overflows in a row one task may take (a loop of queues
/// pointing at each other ends back at the flow).
const MAX_OVERFLOWS: usize = 8;

impl Acd {
    /// An empty ACD.
    pub fn new() -> Acd {
        Acd::default()
    }

    /// Adds or replaces a queue's settings.
    pub fn set_queue(&mut self, config: QueueConfig) {
        self.queues.insert(config.id.clone(), config);
    }

    /// Adds or replaces an agent's settings (their presence and tasks are
    /// kept). A new agent starts offline.
    pub fn set_agent(&mut self, now: Instant, config: AgentConfig) {
        let id = config.id.clone();
        match self.agents.get_mut(&config.id) {
            Some(a) => a.config = config,
            None => {
                self.agents.insert(
                    config.id.clone(),
                    Agent {
                        config,
                        presence: Presence::Offline,
                        tasks: BTreeMap::new(),
                        wrap: Vec::new(),
                        idle_since: now,
                        missed: 0,
                        state_since: now,
                        done_today: 0,
                    },
                );
            }
        }
        self.refresh(&id);
        self.dispatch(now);
    }

    /// An agent's presence. Available (again) clears `missed`.
    pub fn set_presence(
        &mut self,
        now: Instant,
        agent: &str,
        presence: Presence,
    ) -> Result<(), AcdError> {
        let a = self
            .agents
            .get_mut(agent)
            .ok_or_else(|| AcdError::Unknown(format!("agent {agent}")))?;
        if presence != a.presence {
            a.state_since = now;
        }
        if presence == Presence::Available && a.presence != Presence::Available {
            a.missed = 0;
            if a.tasks.is_empty() {
                a.idle_since = now;
            }
        }
        a.presence = presence;
        self.refresh(agent);
        self.dispatch(now);
        Ok(())
    }

    /// An agent's presence.
    pub fn presence(&self, agent: &str) -> Option<&Presence> {
        self.agents.get(agent).map(|a| &a.presence)
    }

    /// Routes a new task: it waits in its queue (or overflows at once if
    /// the queue is full).
    pub fn enqueue(&mut self, now: Instant, spec: TaskSpec) -> Result<(), AcdError> {
        self.enqueue_waited(now, spec, Duration::ZERO)
    }

    /// Routes a task that has already waited `waited` (a callback reloaded
    /// after a restart): it takes the place that wait gives it.
    pub fn enqueue_waited(
        &mut self,
        now: Instant,
        spec: TaskSpec,
        waited: Duration,
    ) -> Result<(), AcdError> {
        if self.tasks.contains_key(&spec.id) {
            return Err(AcdError::Exists(spec.id));
        }
        if !self.queues.contains_key(&spec.queue) {
            return Err(AcdError::Unknown(format!("queue {}", spec.queue)));
        }
        self.seq += 1;
        let task = Task {
            seq: self.seq,
            since: now.checked_sub(waited).unwrap_or(now),
            deadline: None,
            state: TaskState::Waiting,
            passed: BTreeSet::new(),
            resting: BTreeMap::new(),
            indexed: None,
            announce: None,
            connected_at: None,
            routing: Vec::new(),
            spec,
        };
        let id = task.spec.id.clone();
        let queue = task.spec.queue.clone();
        self.tasks.insert(id.clone(), task);
        self.join(now, &id, &queue, 0);
        self.dispatch(now);
        Ok(())
    }

    /// Puts a task (already in the map) into `queue`, or overflows it.
    fn join(&mut self, now: Instant, id: &str, queue: &str, hops: usize) {
        self.release(id);
        self.unindex(id);
        let Some(q) = self.queues.get(queue).cloned() else {
            self.back_to_flow(id, queue, "max_wait");
            return;
        };
        let waiting: usize = self
            .waiting
            .iter()
            .filter(|(g, _)| g.queue == q.id)
            .map(|(_, tasks)| tasks.len())
            .sum();
        if q.max_size.is_some_and(|m| waiting >= m) {
            self.overflow(now, id, &q, q.on_full.clone(), "full", hops);
            return;
        }
        if let Some(t) = self.tasks.get_mut(id) {
            t.spec.queue = q.id.clone();
            t.deadline = q.max_wait.map(|w| now + w);
            t.announce = q.announce_every.filter(|e| !e.is_zero()).map(|e| now + e);
            t.state = TaskState::Waiting;
        }
        self.arm(id);
        self.reindex(id);
        self.event(id, TaskEvent::Enqueued { queue: q.id });
    }

    fn overflow(
        &mut self,
        now: Instant,
        id: &str,
        from: &QueueConfig,
        to: Overflow,
        why: &'static str,
        hops: usize,
    ) {
        match to {
            Overflow::Queue(next) if hops < MAX_OVERFLOWS && next != from.id => {
                self.event(
                    id,
                    TaskEvent::Overflowed {
                        from: from.id.clone(),
                        to: next.clone(),
                    },
                );
                self.join(now, id, &next, hops + 1);
            }
            _ => self.back_to_flow(id, &from.id, why),
        }
    }

    fn back_to_flow(&mut self, id: &str, queue: &str, why: &'static str) {
        self.counts.entry(queue.to_string()).or_default().timed_out += 1;
        self.release(id);
        self.unindex(id);
        self.tasks.remove(id);
        self.event(
            id,
            TaskEvent::TimedOut {
                queue: queue.to_string(),
                why,
            },
        );
        self.out.push_back(Output::BackToFlow {
            task: id.to_string(),
            why,
        });
    }

    /// The router's answer for a task in [`Output::Route`]: agents best
    /// first (`None`, or none of them still eligible: the built-in rule),
    /// and a new priority if it raised it.
    pub fn decided(
        &mut self,
        now: Instant,
        task: &str,
        ranking: Option<Vec<String>>,
        priority: Option<u32>,
    ) -> Result<(), AcdError> {
        let t = self
            .tasks
            .get_mut(task)
            .ok_or_else(|| AcdError::Unknown(format!("task {task}")))?;
        if t.state != TaskState::Routing {
            return Err(AcdError::State {
                task: task.to_string(),
                expected: "being routed",
            });
        }
        if let Some(p) = priority {
            t.spec.priority = p;
        }
        t.state = TaskState::Waiting;
        self.release(task);
        self.reindex(task);
        let eligible = self.eligible(task);
        let pick = ranking
            .unwrap_or_default()
            .into_iter()
            .find(|a| eligible.contains(a))
            .or_else(|| eligible.first().cloned());
        match pick {
            Some(agent) => self.offer(now, task, &agent),
            None => self.dispatch(now),
        }
        Ok(())
    }

    /// The agent takes the offered task: the conversation starts.
    pub fn accept(&mut self, now: Instant, task: &str, agent: &str) -> Result<(), AcdError> {
        self.offered_to(task, agent)?;
        if let Some(t) = self.tasks.get(task) {
            let sl = self
                .queues
                .get(&t.spec.queue)
                .map_or_else(default_service_level, |q| q.service_level);
            let c = self.counts.entry(t.spec.queue.clone()).or_default();
            c.answered += 1;
            if now.saturating_duration_since(t.since) <= sl {
                c.answered_in_sl += 1;
            }
        }
        if let Some(t) = self.tasks.get_mut(task) {
            t.state = TaskState::Connected {
                agent: agent.to_string(),
            };
            t.connected_at = Some(now);
            t.announce = None;
        }
        if let Some(a) = self.agents.get_mut(agent) {
            a.missed = 0;
            a.state_since = now;
        }
        self.event(
            task,
            TaskEvent::Accepted {
                agent: agent.to_string(),
            },
        );
        self.dispatch(now);
        Ok(())
    }

    /// The agent refuses the offered task (or their phone was busy): the
    /// task waits again in its place, for another agent first.
    pub fn reject(&mut self, now: Instant, task: &str, agent: &str) -> Result<(), AcdError> {
        self.offered_to(task, agent)?;
        self.pass(now, task, agent);
        self.event(
            task,
            TaskEvent::Rejected {
                agent: agent.to_string(),
            },
        );
        self.dispatch(now);
        Ok(())
    }

    fn offered_to(&self, task: &str, agent: &str) -> Result<(), AcdError> {
        match self.tasks.get(task).map(|t| &t.state) {
            Some(TaskState::Offered { agent: a, .. }) if a == agent => Ok(()),
            Some(_) => Err(AcdError::State {
                task: task.to_string(),
                expected: "offered to this agent",
            }),
            None => Err(AcdError::Unknown(format!("task {task}"))),
        }
    }

    /// Takes an offer back from the agent; the task waits again, and is
    /// not offered to them again for the queue's `retry`.
    fn pass(&mut self, now: Instant, task: &str, agent: &str) {
        let retry = self
            .tasks
            .get(task)
            .and_then(|t| self.queues.get(&t.spec.queue))
            .map_or_else(default_retry, |q| q.retry);
        if let Some(t) = self.tasks.get_mut(task) {
            t.state = TaskState::Waiting;
            t.passed.insert(agent.to_string());
            if !retry.is_zero() {
                t.resting.insert(agent.to_string(), now + retry);
            }
        }
        self.arm(task);
        self.reindex(task);
        self.free(agent, task);
    }

    /// The channel could not reach the agent for an offered task (their
    /// phone was busy, unreachable or rang out before the offer timeout):
    /// counted as an unanswered offer, as if the offer had rung out.
    pub fn missed(&mut self, now: Instant, task: &str, agent: &str) -> Result<(), AcdError> {
        self.offered_to(task, agent)?;
        self.no_answer(now, task, agent);
        self.dispatch(now);
        Ok(())
    }

    /// An offer went unanswered: the task waits again, the agent's missed
    /// count grows, and at the queue's limit the agent is set `missed`.
    fn no_answer(&mut self, now: Instant, task: &str, agent: &str) {
        self.pass(now, task, agent);
        self.event(
            task,
            TaskEvent::NoAnswer {
                agent: agent.to_string(),
            },
        );
        let limit = self
            .tasks
            .get(task)
            .and_then(|t| self.queues.get(&t.spec.queue))
            .map(|q| q.missed_after)
            .unwrap_or(u32::MAX);
        if let Some(a) = self.agents.get_mut(agent) {
            a.missed += 1;
            if limit > 0 && a.missed >= limit && a.presence == Presence::Available {
                a.presence = Presence::Missed;
                self.refresh(agent);
                self.out.push_back(Output::Presence {
                    agent: agent.to_string(),
                    presence: Presence::Missed,
                });
            }
        }
    }

    /// The agent's slot for the task is free (no wrap-up).
    fn free(&mut self, agent: &str, task: &str) {
        if let Some(a) = self.agents.get_mut(agent) {
            a.tasks.remove(task);
        }
        self.refresh(agent);
    }

    /// The conversation is over: the agent wraps up (the queue's time),
    /// then takes the next task.
    pub fn complete(&mut self, now: Instant, task: &str) -> Result<(), AcdError> {
        let agent = match self.tasks.get(task).map(|t| &t.state) {
            Some(TaskState::Connected { agent }) => agent.clone(),
            Some(_) => {
                return Err(AcdError::State {
                    task: task.to_string(),
                    expected: "connected",
                });
            }
            None => return Err(AcdError::Unknown(format!("task {task}"))),
        };
        let Some(t) = self.tasks.remove(task) else {
            return Err(AcdError::Unknown(format!("task {task}")));
        };
        if let Some(at) = t.connected_at {
            let ms = now.saturating_duration_since(at).as_millis() as f64;
            let c = self.counts.entry(t.spec.queue.clone()).or_default();
            c.handle_ms = Some(c.handle_ms.map_or(ms, |h| h + HANDLE_WEIGHT * (ms - h)));
        }
        self.leave(now, &agent, task, &t.spec);
        self.event(task, TaskEvent::Completed { agent });
        self.dispatch(now);
        Ok(())
    }

    /// A connected task passes to another agent, who is already talking
    /// to the customer (a warm transfer completed): the first agent wraps
    /// up, the second takes the slot. Refused if the second agent has no
    /// room on the task's channel (capacity is never exceeded); their
    /// presence does not matter, since they took the consultation.
    pub fn hand_over(&mut self, now: Instant, task: &str, to: &str) -> Result<(), AcdError> {
        let (from, spec) = match self.tasks.get(task) {
            Some(Task {
                state: TaskState::Connected { agent },
                spec,
                ..
            }) => (agent.clone(), spec.clone()),
            Some(_) => {
                return Err(AcdError::State {
                    task: task.to_string(),
                    expected: "connected",
                });
            }
            None => return Err(AcdError::Unknown(format!("task {task}"))),
        };
        if from == to {
            return Ok(());
        }
        let target = self
            .agents
            .get(to)
            .ok_or_else(|| AcdError::Unknown(format!("agent {to}")))?;
        let channel = spec.channel;
        if target.load(channel) >= target.config.capacity.get(&channel).copied().unwrap_or(0) {
            return Err(AcdError::State {
                task: task.to_string(),
                expected: "handed to an agent with room",
            });
        }
        self.leave(now, &from, task, &spec);
        if let Some(a) = self.agents.get_mut(to) {
            a.tasks.insert(task.to_string(), channel);
            a.state_since = now;
        }
        if let Some(t) = self.tasks.get_mut(task) {
            t.state = TaskState::Connected {
                agent: to.to_string(),
            };
        }
        self.refresh(to);
        self.event(
            task,
            TaskEvent::HandedOver {
                from,
                to: to.to_string(),
            },
        );
        self.dispatch(now);
        Ok(())
    }

    /// The agent's conversation on a task is over: one more task done
    /// today, and the queue's wrap-up (the slot stays taken until it ends)
    /// or they are idle from now.
    fn leave(&mut self, now: Instant, agent: &str, task: &str, spec: &TaskSpec) {
        let wrap = self
            .queues
            .get(&spec.queue)
            .map(|q| q.wrap_up)
            .unwrap_or_default();
        if let Some(a) = self.agents.get_mut(agent) {
            a.tasks.remove(task);
            a.done_today += 1;
            a.state_since = now;
            if wrap > Duration::ZERO {
                a.wrap.push((spec.channel, now + wrap));
                self.timers.push(std::cmp::Reverse((
                    now + wrap,
                    Timer::Wrap(agent.to_string()),
                )));
            } else if a.tasks.is_empty() && a.wrap.is_empty() {
                a.idle_since = now;
            }
        }
        self.refresh(agent);
    }

    /// The customer left before the conversation (or during it, which
    /// completes it).
    pub fn abandon(&mut self, now: Instant, task: &str) -> Result<(), AcdError> {
        let state = self
            .tasks
            .get(task)
            .map(|t| t.state.clone())
            .ok_or_else(|| AcdError::Unknown(format!("task {task}")))?;
        match state {
            TaskState::Connected { .. } => return self.complete(now, task),
            TaskState::Offered { agent, .. } => {
                self.free(&agent, task);
                self.out.push_back(Output::Rescind {
                    task: task.to_string(),
                    agent,
                });
            }
            TaskState::Waiting | TaskState::Routing => self.release(task),
        }
        self.unindex(task);
        if let Some(t) = self.tasks.remove(task) {
            self.counts
                .entry(t.spec.queue.clone())
                .or_default()
                .abandoned += 1;
            self.event(
                task,
                TaskEvent::Abandoned {
                    queue: t.spec.queue,
                },
            );
        }
        self.dispatch(now);
        Ok(())
    }

    /// When [`Acd::handle_timeout`] should next run.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(std::cmp::Reverse((at, timer))) = self.timers.peek() {
            if self.current(*at, timer) {
                return Some(*at);
            }
            self.timers.pop();
        }
        None
    }

    /// Whether a timer from the heap is still set as it was.
    fn current(&self, at: Instant, timer: &Timer) -> bool {
        let waiting = |t: &Task| matches!(t.state, TaskState::Waiting | TaskState::Routing);
        match timer {
            Timer::Offer(task) => self.tasks.get(task).is_some_and(
                |t| matches!(&t.state, TaskState::Offered { until, .. } if *until == at),
            ),
            Timer::Deadline(task) => self
                .tasks
                .get(task)
                .is_some_and(|t| waiting(t) && t.deadline == Some(at)),
            Timer::Announce(task) => self
                .tasks
                .get(task)
                .is_some_and(|t| waiting(t) && t.announce == Some(at)),
            Timer::Rest(task, agent) => self
                .tasks
                .get(task)
                .is_some_and(|t| waiting(t) && t.resting.get(agent) == Some(&at)),
            Timer::Wrap(agent) => self
                .agents
                .get(agent)
                .is_some_and(|a| a.wrap.iter().any(|(_, u)| *u == at)),
        }
    }

    /// Puts a waiting task's timers (overflow, announcement, agents
    /// resting) on the heap again: those of a task that was being offered
    /// were dropped as stale meanwhile.
    fn arm(&mut self, task: &str) {
        let Some(t) = self.tasks.get(task) else {
            return;
        };
        let id = || task.to_string();
        let mut add: Vec<(Instant, Timer)> = Vec::new();
        if let Some(d) = t.deadline {
            add.push((d, Timer::Deadline(id())));
        }
        if let Some(a) = t.announce {
            add.push((a, Timer::Announce(id())));
        }
        for (agent, until) in &t.resting {
            add.push((*until, Timer::Rest(id(), agent.clone())));
        }
        self.timers.extend(add.into_iter().map(std::cmp::Reverse));
    }

    /// Offers that rang out, wrap-ups that ended, tasks that waited too
    /// long.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Wrap-ups.
        let mut unwrapped = Vec::new();
        for a in self.agents.values_mut() {
            let before = a.wrap.len();
            a.wrap.retain(|(_, until)| *until > now);
            if a.wrap.len() < before {
                unwrapped.push(a.config.id.clone());
                if a.wrap.is_empty() && a.tasks.is_empty() {
                    a.idle_since = now;
                }
            }
        }
        for a in unwrapped {
            self.refresh(&a);
        }
        // Offers not answered.
        let rang_out: Vec<(String, String)> = self
            .tasks
            .values()
            .filter_map(|t| match &t.state {
                TaskState::Offered { agent, until } if *until <= now => {
                    Some((t.spec.id.clone(), agent.clone()))
                }
                _ => None,
            })
            .collect();
        for (task, agent) in rang_out {
            self.out.push_back(Output::Rescind {
                task: task.clone(),
                agent: agent.clone(),
            });
            self.no_answer(now, &task, &agent);
        }
        // Agents who passed on a task may be offered it again.
        for t in self.tasks.values_mut() {
            t.resting.retain(|_, until| *until > now);
        }
        // Waited too long (an offer in progress finishes first).
        let mut expired: Vec<(u64, String)> = self
            .tasks
            .values()
            .filter(|t| {
                matches!(t.state, TaskState::Waiting | TaskState::Routing)
                    && t.deadline.is_some_and(|d| d <= now)
            })
            .map(|t| (t.seq, t.spec.id.clone()))
            .collect();
        expired.sort();
        for (_, id) in expired {
            let Some(q) = self
                .tasks
                .get(&id)
                .and_then(|t| self.queues.get(&t.spec.queue))
                .cloned()
            else {
                continue;
            };
            self.overflow(now, &id, &q, q.on_timeout.clone(), "max_wait", 0);
        }
        self.dispatch(now);
        self.announce(now);
    }

    /// Tells waiting customers whose announcement is due their position
    /// and expected wait.
    fn announce(&mut self, now: Instant) {
        let mut due: BTreeSet<String> = BTreeSet::new();
        for t in self.tasks.values() {
            if matches!(t.state, TaskState::Waiting | TaskState::Routing)
                && t.announce.is_some_and(|a| a <= now)
            {
                due.insert(t.spec.queue.clone());
            }
        }
        for queue in due {
            let Some(q) = self.queues.get(&queue) else {
                continue;
            };
            let every = q.announce_every.unwrap_or(Duration::from_secs(60));
            // The queue's waiting tasks in the order they will be served.
            let mut line: Vec<(std::cmp::Reverse<u64>, Place, String)> = self
                .tasks
                .values()
                .filter(|t| t.spec.queue == queue)
                .filter(|t| matches!(t.state, TaskState::Waiting | TaskState::Routing))
                .filter_map(|t| {
                    let (g, place) = t.indexed.clone()?;
                    Some((
                        std::cmp::Reverse(self.rank(&g, t.since, now)),
                        place,
                        t.spec.id.clone(),
                    ))
                })
                .collect();
            line.sort();
            let staffed = self
                .agents
                .values()
                .filter(|a| a.presence == Presence::Available && a.can_do(q, &[]))
                .count() as u32;
            let handle = self.counts.get(&queue).and_then(|c| c.handle_ms);
            for (i, (_, _, id)) in line.into_iter().enumerate() {
                let Some(t) = self.tasks.get_mut(&id) else {
                    continue;
                };
                if t.announce.is_none_or(|a| a > now) {
                    continue;
                }
                t.announce = Some(now + every);
                self.timers.push(std::cmp::Reverse((
                    now + every,
                    Timer::Announce(id.clone()),
                )));
                let position = i as u32 + 1;
                let expected_wait = handle.filter(|_| staffed > 0).map(|h| {
                    Duration::from_millis((f64::from(position.div_ceil(staffed)) * h) as u64)
                });
                self.out.push_back(Output::Position {
                    task: id,
                    position,
                    expected_wait,
                });
            }
            // A task being routed is not in the line: it is told next time.
            let late: Vec<String> = self
                .tasks
                .values()
                .filter(|t| t.spec.queue == queue && t.announce.is_some_and(|a| a <= now))
                .map(|t| t.spec.id.clone())
                .collect();
            for id in late {
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.announce = Some(now + every);
                }
                self.timers
                    .push(std::cmp::Reverse((now + every, Timer::Announce(id))));
            }
        }
    }

    /// A new day begins (the caller decides when, in the tenant's time):
    /// the queues' counts and the agents' tasks done start again from
    /// zero. The handling-time average is kept.
    pub fn new_day(&mut self) {
        for c in self.counts.values_mut() {
            *c = Counts {
                handle_ms: c.handle_ms,
                ..Counts::default()
            };
        }
        for a in self.agents.values_mut() {
            a.done_today = 0;
        }
    }

    /// An agent's numbers now: their state, since when, and tasks done
    /// today.
    pub fn agent_stats(&self, now: Instant, agent: &str) -> Option<AgentStats> {
        let a = self.agents.get(agent)?;
        let state = match &a.presence {
            Presence::Available if !a.tasks.is_empty() => "busy",
            Presence::Available if !a.wrap.is_empty() => "wrap_up",
            Presence::Available => "available",
            Presence::Away(_) => "away",
            Presence::Missed => "missed",
            Presence::Offline => "offline",
        };
        Some(AgentStats {
            state,
            in_state_ms: now.saturating_duration_since(a.state_since).as_millis() as u64,
            tasks: a.tasks.keys().cloned().collect(),
            tasks_today: a.done_today,
        })
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// What a router needs to know of a task: its queue's settings, all
    /// the skills it needs, its priority and how long it has waited.
    pub fn task_info(&self, now: Instant, task: &str) -> Option<TaskInfo> {
        let t = self.tasks.get(task)?;
        let q = self.queues.get(&t.spec.queue)?;
        Some(TaskInfo {
            queue: q.clone(),
            channel: t.spec.channel,
            priority: t.spec.priority,
            skills: q.skills.iter().chain(&t.spec.skills).cloned().collect(),
            waited: now.saturating_duration_since(t.since),
        })
    }

    /// What a router needs to know of an agent: skills, idle time and
    /// tasks in hand.
    pub fn agent_info(&self, now: Instant, agent: &str) -> Option<AgentInfo> {
        let a = self.agents.get(agent)?;
        Some(AgentInfo {
            skills: a.config.skills.clone(),
            idle: if a.tasks.is_empty() && a.wrap.is_empty() {
                now.saturating_duration_since(a.idle_since)
            } else {
                Duration::ZERO
            },
            active: (a.tasks.len() + a.wrap.len()) as u32,
        })
    }

    /// A queue's current numbers.
    /// The queues' ids.
    pub fn queue_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.queues.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// A queue's numbers.
    pub fn queue_stats(&self, now: Instant, queue: &str) -> QueueStats {
        let mut s = QueueStats::default();
        if let Some(q) = self.queues.get(queue) {
            for a in self.agents.values().filter(|a| a.can_do(q, &[])) {
                match a.presence {
                    Presence::Available if self.free.contains(&a.config.id) => {
                        s.agents_available += 1
                    }
                    Presence::Available => s.agents_busy += 1,
                    Presence::Away(_) | Presence::Missed => s.agents_away += 1,
                    Presence::Offline => {}
                }
            }
        }
        let c = self.counts.get(queue).copied().unwrap_or_default();
        s.answered = c.answered;
        s.answered_in_service_level = c.answered_in_sl;
        s.abandoned = c.abandoned;
        s.timed_out = c.timed_out;
        let base = c.answered + c.abandoned;
        s.service_level_percent = (base > 0).then(|| 100.0 * c.answered_in_sl as f64 / base as f64);
        s.average_handle_ms = c.handle_ms.map(|h| h as u64);
        for t in self.tasks.values().filter(|t| t.spec.queue == queue) {
            match t.state {
                TaskState::Waiting | TaskState::Routing => {
                    s.waiting += 1;
                    s.longest_wait_ms = s
                        .longest_wait_ms
                        .max(now.saturating_duration_since(t.since).as_millis() as u64);
                }
                TaskState::Offered { .. } => s.offered += 1,
                TaskState::Connected { .. } => s.connected += 1,
            }
        }
        s
    }

    fn event(&mut self, task: &str, event: TaskEvent) {
        self.out.push_back(Output::Event {
            task: task.to_string(),
            event,
        });
    }

    /// The effective priority at `now` of a task of group `g` waiting
    /// since `since`: its own, its queue's, and one step per `aging`
    /// waited.
    fn rank(&self, g: &Group, since: Instant, now: Instant) -> u64 {
        let q = self.queues.get(&g.queue);
        let base = u64::from(g.priority) + u64::from(q.map_or(0, |q| q.priority));
        let aged = q
            .and_then(|q| q.aging)
            .filter(|a| !a.is_zero())
            .map_or(0, |a| {
                (now.saturating_duration_since(since).as_millis() / a.as_millis().max(1)) as u64
            });
        base + aged
    }

    /// The agents a task may be offered to now, longest idle first; those
    /// who passed on it only when nobody else can take it.
    fn eligible(&self, task: &str) -> Vec<String> {
        let Some(t) = self.tasks.get(task) else {
            return Vec::new();
        };
        let Some(q) = self.queues.get(&t.spec.queue) else {
            return Vec::new();
        };
        let mut all: Vec<&Agent> = self
            .free
            .iter()
            .filter_map(|id| self.agents.get(id))
            .filter(|a| {
                a.free_for(t.spec.channel)
                    && a.can_do(q, &t.spec.skills)
                    && t.spec.agent.as_ref().is_none_or(|x| *x == a.config.id)
                    && !t.resting.contains_key(&a.config.id)
            })
            .collect();
        all.sort_by(|a, b| {
            a.idle_since
                .cmp(&b.idle_since)
                .then(a.config.id.cmp(&b.config.id))
        });
        let fresh: Vec<String> = all
            .iter()
            .filter(|a| !t.passed.contains(&a.config.id))
            .map(|a| a.config.id.clone())
            .collect();
        if fresh.is_empty() {
            all.iter().map(|a| a.config.id.clone()).collect()
        } else {
            fresh
        }
    }

    /// Whether some free agent could take a task of this group (whoever
    /// the task's own rests exclude).
    fn group_servable(&self, g: &Group) -> bool {
        let Some(q) = self.queues.get(&g.queue) else {
            return false;
        };
        self.free
            .iter()
            .filter_map(|id| self.agents.get(id))
            .any(|a| {
                a.free_for(g.channel)
                    && a.can_do(q, &g.skills)
                    && g.agent.as_ref().is_none_or(|x| *x == a.config.id)
            })
    }

    /// Keeps the agent's place in the free set right.
    fn refresh(&mut self, agent: &str) {
        let free = !self.held.contains_key(agent)
            && self.agents.get(agent).is_some_and(|a| {
                a.presence == Presence::Available
                    && a.config.capacity.keys().any(|c| a.free_for(*c))
            });
        if free {
            self.free.insert(agent.to_string());
        } else {
            self.free.remove(agent);
        }
    }

    /// Lets go of the agents held for a task's router.
    fn release(&mut self, task: &str) {
        let held = self
            .tasks
            .get_mut(task)
            .map(|t| std::mem::take(&mut t.routing))
            .unwrap_or_default();
        for a in held {
            if let Some(n) = self.held.get_mut(&a) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.held.remove(&a);
                }
            }
            self.refresh(&a);
        }
    }

    /// Takes the task out of the waiting index.
    fn unindex(&mut self, id: &str) {
        let Some((g, place)) = self.tasks.get_mut(id).and_then(|t| t.indexed.take()) else {
            return;
        };
        if let Some(tasks) = self.waiting.get_mut(&g) {
            tasks.remove(&place);
            if tasks.is_empty() {
                self.waiting.remove(&g);
            }
        }
    }

    /// Puts the task in the waiting index where it belongs (if it waits).
    fn reindex(&mut self, id: &str) {
        self.unindex(id);
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        if t.state != TaskState::Waiting {
            return;
        }
        let g = Group {
            queue: t.spec.queue.clone(),
            priority: t.spec.priority,
            channel: t.spec.channel,
            skills: t.spec.skills.clone(),
            agent: t.spec.agent.clone(),
        };
        let place = (t.since, t.seq);
        t.indexed = Some((g.clone(), place));
        self.waiting
            .entry(g)
            .or_default()
            .insert(place, id.to_string());
    }

    fn offer(&mut self, now: Instant, task: &str, agent: &str) {
        let Some(t) = self.tasks.get_mut(task) else {
            return;
        };
        let timeout = self
            .queues
            .get(&t.spec.queue)
            .map_or(Duration::from_secs(20), |q| q.offer_timeout);
        t.state = TaskState::Offered {
            agent: agent.to_string(),
            until: now + timeout,
        };
        self.timers.push(std::cmp::Reverse((
            now + timeout,
            Timer::Offer(task.to_string()),
        )));
        let channel = t.spec.channel;
        if let Some(a) = self.agents.get_mut(agent) {
            a.tasks.insert(task.to_string(), channel);
        }
        self.unindex(task);
        self.refresh(agent);
        self.event(
            task,
            TaskEvent::Offered {
                agent: agent.to_string(),
            },
        );
        self.out.push_back(Output::Offer {
            task: task.to_string(),
            agent: agent.to_string(),
            channel,
        });
    }

    /// Offers waiting tasks, first come first (by rank, then arrival), to
    /// the agents free for them. Only the head of each group of alike
    /// tasks is a candidate at a time (the next one comes up when the
    /// head is offered, or is held back only by its own rests); a group
    /// no free agent can serve is skipped whole.
    fn dispatch(&mut self, now: Instant) {
        if self.free.is_empty() {
            return;
        }
        type Entry = (u64, Reverse<u64>, Group, Place);
        let mut heap: BinaryHeap<Entry> = BinaryHeap::new();
        for (g, tasks) in &self.waiting {
            if !self.group_servable(g) {
                continue;
            }
            if let Some((place, _)) = tasks.iter().next() {
                heap.push((
                    self.rank(g, place.0, now),
                    Reverse(place.1),
                    g.clone(),
                    *place,
                ));
            }
        }
        while let Some((_, _, g, place)) = heap.pop() {
            if self.free.is_empty() {
                break;
            }
            let Some(id) = self.waiting.get(&g).and_then(|t| t.get(&place)).cloned() else {
                continue;
            };
            let candidates = self.eligible(&id);
            if candidates.is_empty() && !self.group_servable(&g) {
                continue;
            }
            if !candidates.is_empty() {
                let router = self
                    .queues
                    .get(&g.queue)
                    .is_some_and(|q| q.router.is_some());
                if router {
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.state = TaskState::Routing;
                        t.routing = candidates.clone();
                    }
                    for a in &candidates {
                        *self.held.entry(a.clone()).or_default() += 1;
                        self.refresh(a);
                    }
                    self.unindex(&id);
                    self.out.push_back(Output::Route {
                        task: id,
                        queue: g.queue.clone(),
                        candidates,
                    });
                } else {
                    let agent = candidates[0].clone();
                    self.offer(now, &id, &agent);
                }
            }
            let next = self.waiting.get(&g).and_then(|t| {
                t.range((Bound::Excluded(place), Bound::Unbounded))
                    .next()
                    .map(|(p, _)| *p)
            });
            if let Some(p) = next {
                heap.push((self.rank(&g, p.0, now), Reverse(p.1), g, p));
            }
        }
    }
}

#[cfg(test)]
mod tests;
