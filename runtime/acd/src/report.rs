//! Historical reports from the stored queue events: per queue and per
//! agent, over intervals (15 minutes, an hour, a day). A pure function of
//! the events, so a report is the same before and after a restart.
//!
//! Each measure falls in the interval of its own event: a task is
//! offered to the queue when it is enqueued, answered when an agent
//! accepts it (its wait counts toward the average speed of answer and the
//! service level), abandoned when the customer leaves, and handled when
//! it is completed (accept to completion is its handling time).

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// What happened, as the report reads it from the queue event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happened {
    /// The task joined `queue` (enqueued or overflowed into it).
    Enqueued {
        /// The queue.
        queue: String,
    },
    /// Offered to an agent.
    Offered {
        /// The agent.
        agent: String,
    },
    /// The agent accepted it.
    Accepted {
        /// The agent.
        agent: String,
    },
    /// The agent refused it.
    Rejected {
        /// The agent.
        agent: String,
    },
    /// The agent did not answer in time.
    NoAnswer {
        /// The agent.
        agent: String,
    },
    /// The customer left while waiting.
    Abandoned,
    /// Handed back to its flow (waited too long, or the queue was full).
    TimedOut,
    /// The conversation is over.
    Completed {
        /// The agent who had it.
        agent: String,
    },
    /// Passed from one agent to another after a warm transfer: the first
    /// one's handling ends, the second's begins.
    HandedOver {
        /// The agent who passed it on.
        from: String,
        /// The agent who has it now.
        to: String,
    },
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportEvent {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// The task.
    pub task: String,
    /// The queue the event names, if it does (for a task whose enqueue
    /// is older than what was read).
    pub queue: Option<String>,
    /// What happened.
    pub what: Happened,
}

/// A queue's numbers over one interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueueRow {
    /// The interval's start, ms since the Unix epoch.
    pub start_ms: u64,
    /// The queue.
    pub queue: String,
    /// Tasks that joined the queue.
    pub offered: u64,
    /// Tasks an agent accepted.
    pub answered: u64,
    /// … within the queue's service-level target.
    pub answered_in_sl: u64,
    /// Customers who left while waiting.
    pub abandoned: u64,
    /// Tasks handed back to their flow.
    pub timed_out: u64,
    /// Answered within the target over answered, abandoned and timed
    /// out, percent.
    pub service_level_percent: Option<f64>,
    /// Average wait of the answered tasks (average speed of answer), ms.
    pub asa_ms: Option<u64>,
    /// Average handling time of the completed tasks, ms.
    pub aht_ms: Option<u64>,
    /// The longest wait of an answered or abandoned task, ms.
    pub longest_wait_ms: u64,
    #[serde(skip)]
    waited_ms: u64,
    #[serde(skip)]
    handled: u64,
    #[serde(skip)]
    handled_ms: u64,
}

/// An agent's numbers over one interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AgentRow {
    /// The interval's start, ms since the Unix epoch.
    pub start_ms: u64,
    /// The agent.
    pub agent: String,
    /// Offers made to them.
    pub offered: u64,
    /// Offers they accepted.
    pub accepted: u64,
    /// Offers they refused.
    pub rejected: u64,
    /// Offers they let time out.
    pub no_answer: u64,
    /// Tasks they completed.
    pub completed: u64,
    /// Average handling time of their completed tasks, ms.
    pub aht_ms: Option<u64>,
    /// Total handling time of their completed tasks, ms.
    pub handle_ms: u64,
}

/// A report: one row per queue (or agent) and interval with something
/// in it, by interval then name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Per queue.
    pub queues: Vec<QueueRow>,
    /// Per agent.
    pub agents: Vec<AgentRow>,
}

/// Where a task stands while the events are read.
#[derive(Default)]
struct Open {
    queue: Option<String>,
    enqueued_ms: Option<u64>,
    /// When the agent who has it now took it (accepted, or had it
    /// handed over).
    accepted_ms: Option<u64>,
    /// When the first agent accepted it (the queue's handling time).
    first_accepted_ms: Option<u64>,
}

/// The row of `queue` for the interval starting at `start`.
fn queue_row<'a>(
    rows: &'a mut BTreeMap<(u64, String), QueueRow>,
    start: u64,
    queue: &str,
) -> &'a mut QueueRow {
    rows.entry((start, queue.to_string()))
        .or_insert_with(|| QueueRow {
            start_ms: start,
            queue: queue.to_string(),
            ..Default::default()
        })
}

/// The row of `agent` for the interval starting at `start`.
fn agent_row<'a>(
    rows: &'a mut BTreeMap<(u64, String), AgentRow>,
    start: u64,
    agent: &str,
) -> &'a mut AgentRow {
    rows.entry((start, agent.to_string()))
        .or_insert_with(|| AgentRow {
            start_ms: start,
            agent: agent.to_string(),
            ..Default::default()
        })
}

/// Reads `events` (in time order; they may start before `from_ms`, so
/// that a task enqueued earlier and answered within counts its whole
/// wait) into rows for the intervals of `interval_ms` (aligned to
/// multiples of it since the epoch) of the events in
/// `[from_ms, to_ms)`. A queue's service-level target is
/// `service_level_ms(queue)`.
pub fn build(
    events: &[ReportEvent],
    from_ms: u64,
    to_ms: u64,
    interval_ms: u64,
    service_level_ms: impl Fn(&str) -> u64,
) -> Report {
    let interval_ms = interval_ms.max(1);
    let mut open: HashMap<&str, Open> = HashMap::new();
    let mut queues: BTreeMap<(u64, String), QueueRow> = BTreeMap::new();
    let mut agents: BTreeMap<(u64, String), AgentRow> = BTreeMap::new();
    for e in events {
        let start = e.at_ms - e.at_ms % interval_ms;
        let counted = e.at_ms >= from_ms && e.at_ms < to_ms;
        let t = open.entry(e.task.as_str()).or_default();
        if t.queue.is_none() {
            t.queue.clone_from(&e.queue);
        }
        match &e.what {
            Happened::Enqueued { queue } => {
                t.queue = Some(queue.clone());
                t.enqueued_ms = Some(e.at_ms);
                t.accepted_ms = None;
                t.first_accepted_ms = None;
                if counted {
                    queue_row(&mut queues, start, queue).offered += 1;
                }
            }
            Happened::Offered { agent } if counted => {
                agent_row(&mut agents, start, agent).offered += 1;
            }
            Happened::Rejected { agent } if counted => {
                agent_row(&mut agents, start, agent).rejected += 1;
            }
            Happened::NoAnswer { agent } if counted => {
                agent_row(&mut agents, start, agent).no_answer += 1;
            }
            Happened::Accepted { agent } => {
                t.accepted_ms = Some(e.at_ms);
                t.first_accepted_ms = Some(e.at_ms);
                if counted {
                    agent_row(&mut agents, start, agent).accepted += 1;
                    if let Some(q) = &t.queue {
                        let waited = t.enqueued_ms.map_or(0, |at| e.at_ms.saturating_sub(at));
                        let row = queue_row(&mut queues, start, q);
                        row.answered += 1;
                        row.waited_ms += waited;
                        row.longest_wait_ms = row.longest_wait_ms.max(waited);
                        if waited <= service_level_ms(q) {
                            row.answered_in_sl += 1;
                        }
                    }
                }
            }
            Happened::Abandoned => {
                if counted && let Some(q) = &t.queue {
                    let waited = t.enqueued_ms.map_or(0, |at| e.at_ms.saturating_sub(at));
                    let row = queue_row(&mut queues, start, q);
                    row.abandoned += 1;
                    row.longest_wait_ms = row.longest_wait_ms.max(waited);
                }
                open.remove(e.task.as_str());
            }
            Happened::TimedOut => {
                if counted && let Some(q) = &t.queue {
                    queue_row(&mut queues, start, q).timed_out += 1;
                }
                open.remove(e.task.as_str());
            }
            Happened::HandedOver { from, .. } => {
                // The first agent's part ends here; the next one's
                // begins (the queue's handling goes on).
                if counted {
                    let a = agent_row(&mut agents, start, from);
                    a.completed += 1;
                    a.handle_ms += t.accepted_ms.map_or(0, |at| e.at_ms.saturating_sub(at));
                }
                t.accepted_ms = Some(e.at_ms);
            }
            Happened::Completed { agent } => {
                // A completion whose accept was not read still counts,
                // without a handling time.
                if counted {
                    let a = agent_row(&mut agents, start, agent);
                    a.completed += 1;
                    a.handle_ms += t.accepted_ms.map_or(0, |at| e.at_ms.saturating_sub(at));
                    if let (Some(q), Some(first)) = (&t.queue, t.first_accepted_ms) {
                        let row = queue_row(&mut queues, start, q);
                        row.handled += 1;
                        row.handled_ms += e.at_ms.saturating_sub(first);
                    }
                }
                open.remove(e.task.as_str());
            }
            _ => {}
        }
    }
    let avg = |sum: u64, n: u64| (n > 0).then(|| sum / n);
    let queues = queues
        .into_values()
        .map(|mut r| {
            r.asa_ms = avg(r.waited_ms, r.answered);
            r.aht_ms = avg(r.handled_ms, r.handled);
            let base = r.answered + r.abandoned + r.timed_out;
            r.service_level_percent =
                (base > 0).then(|| r.answered_in_sl as f64 * 100.0 / base as f64);
            r
        })
        .collect();
    let agents = agents
        .into_values()
        .map(|mut r| {
            r.aht_ms = avg(r.handle_ms, r.completed);
            r
        })
        .collect();
    // (An agent's completions include the parts they handed over.)
    Report { queues, agents }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ev(at_ms: u64, task: &str, what: Happened) -> ReportEvent {
        ReportEvent {
            at_ms,
            task: task.into(),
            queue: None,
            what,
        }
    }

    fn q(name: &str) -> Happened {
        Happened::Enqueued { queue: name.into() }
    }

    fn by(agent: &str) -> String {
        agent.into()
    }

    #[test]
    fn queues_and_agents_per_interval() {
        const H: u64 = 3_600_000;
        let events = vec![
            // Enqueued before the report's start, answered within it.
            ev(H - 30_000, "t0", q("sales")),
            ev(H + 10_000, "t0", Happened::Offered { agent: by("ann") }),
            ev(H + 15_000, "t0", Happened::Accepted { agent: by("ann") }),
            ev(H + 75_000, "t0", Happened::Completed { agent: by("ann") }),
            // Rejected once, then answered by Bob after 10 s.
            ev(H + 100_000, "t1", q("sales")),
            ev(H + 101_000, "t1", Happened::Offered { agent: by("ann") }),
            ev(H + 102_000, "t1", Happened::Rejected { agent: by("ann") }),
            ev(H + 103_000, "t1", Happened::Offered { agent: by("bob") }),
            ev(H + 110_000, "t1", Happened::Accepted { agent: by("bob") }),
            // Completed in the next hour.
            ev(
                2 * H + 50_000,
                "t1",
                Happened::Completed { agent: by("bob") },
            ),
            // Abandoned after 40 s.
            ev(H + 200_000, "t2", q("sales")),
            ev(H + 240_000, "t2", Happened::Abandoned),
            // Another queue, timed out.
            ev(H + 300_000, "t3", q("support")),
            ev(H + 900_000, "t3", Happened::TimedOut),
            // After the report's end: not counted.
            ev(3 * H, "t4", q("sales")),
        ];
        let r = build(&events, H, 3 * H, H, |_| 20_000);
        let sales: Vec<_> = r.queues.iter().filter(|r| r.queue == "sales").collect();
        assert_eq!(sales.len(), 2, "{:?}", r.queues);
        let first = sales[0];
        assert_eq!(first.start_ms, H);
        assert_eq!(
            (
                first.offered,
                first.answered,
                first.answered_in_sl,
                first.abandoned
            ),
            (2, 2, 1, 1),
            "t0 waited 45 s (over the target), t1 10 s"
        );
        assert_eq!(first.asa_ms, Some((45_000 + 10_000) / 2));
        assert_eq!(first.longest_wait_ms, 45_000);
        assert_eq!(first.service_level_percent, Some(100.0 / 3.0));
        assert_eq!(first.aht_ms, Some(60_000), "t0: accepted to completed");
        let second = sales[1];
        assert_eq!(second.start_ms, 2 * H);
        assert_eq!((second.offered, second.answered), (0, 0));
        assert_eq!(second.aht_ms, Some(2 * H + 50_000 - (H + 110_000)));
        let support: Vec<_> = r.queues.iter().filter(|r| r.queue == "support").collect();
        assert_eq!((support[0].offered, support[0].timed_out), (1, 1));
        assert_eq!(
            support[0].service_level_percent,
            Some(0.0),
            "a task handed back to its flow missed the target"
        );

        let ann: Vec<_> = r.agents.iter().filter(|a| a.agent == "ann").collect();
        assert_eq!(
            (
                ann[0].offered,
                ann[0].accepted,
                ann[0].rejected,
                ann[0].completed
            ),
            (2, 1, 1, 1)
        );
        assert_eq!(ann[0].aht_ms, Some(60_000));
        let bob: Vec<_> = r.agents.iter().filter(|a| a.agent == "bob").collect();
        assert_eq!(bob.len(), 2, "accepted in one hour, completed in the next");
        assert_eq!((bob[0].accepted, bob[1].completed), (1, 1));
    }

    #[test]
    fn a_hand_over_splits_the_handling_and_old_tasks_still_count() {
        let events = vec![
            ev(1_000, "t", q("sales")),
            ev(2_000, "t", Happened::Accepted { agent: by("ann") }),
            ev(
                5_000,
                "t",
                Happened::HandedOver {
                    from: by("ann"),
                    to: by("bob"),
                },
            ),
            ev(9_000, "t", Happened::Completed { agent: by("bob") }),
            // Enqueued before anything read: its own queue names it.
            ReportEvent {
                queue: Some("support".into()),
                ..ev(3_000, "old", Happened::Abandoned)
            },
            ReportEvent {
                queue: Some("support".into()),
                ..ev(4_000, "older", Happened::Completed { agent: by("cat") })
            },
            ReportEvent {
                queue: Some("support".into()),
                ..ev(6_000, "late", Happened::TimedOut)
            },
        ];
        let r = build(&events, 0, 100_000, 100_000, |_| 20_000);
        let agent = |name: &str| r.agents.iter().find(|a| a.agent == name).unwrap();
        assert_eq!((agent("ann").completed, agent("ann").handle_ms), (1, 3_000));
        assert_eq!((agent("bob").completed, agent("bob").handle_ms), (1, 4_000));
        assert_eq!((agent("cat").completed, agent("cat").aht_ms), (1, Some(0)));
        let sales = r.queues.iter().find(|q| q.queue == "sales").unwrap();
        assert_eq!(
            sales.aht_ms,
            Some(7_000),
            "the queue's handling: first accept to the end"
        );
        let support = r.queues.iter().find(|q| q.queue == "support").unwrap();
        assert_eq!((support.abandoned, support.timed_out), (1, 1));
        assert_eq!(
            support.service_level_percent,
            Some(0.0),
            "timed out counts against"
        );
    }
}
