//! The ACD in virtual time: scenarios, then thousands of random operations
//! checked against invariants observed from the outputs alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn agent(id: &str, skills: &[&str], voice: u32, chat: u32) -> AgentConfig {
    AgentConfig {
        id: id.into(),
        skills: skills.iter().map(|s| (s.to_string(), 5)).collect(),
        capacity: [(Channel::Voice, voice), (Channel::Chat, chat)]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect(),
        queues: None,
    }
}

fn task(id: &str, queue: &str, priority: u32, skills: &[&str]) -> TaskSpec {
    TaskSpec {
        id: id.into(),
        queue: queue.into(),
        channel: Channel::Voice,
        priority,
        skills: skills.iter().map(|s| s.to_string()).collect(),
        agent: None,
    }
}

fn drain(acd: &mut Acd) -> Vec<Output> {
    std::iter::from_fn(|| acd.poll_output()).collect()
}

fn offers(out: &[Output]) -> Vec<(String, String)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Offer { task, agent, .. } => Some((task.clone(), agent.clone())),
            _ => None,
        })
        .collect()
}

fn pair(t: &str, a: &str) -> (String, String) {
    (t.to_string(), a.to_string())
}

#[test]
fn a_task_goes_to_the_longest_idle_agent_with_the_skill() {
    let t0 = Instant::now();
    let mut acd = Acd::new();
    acd.set_queue(QueueConfig::new("sales"));
    for (i, a) in ["ann", "bob", "cat"].iter().enumerate() {
        let skills: &[&str] = if *a == "bob" {
            &["french"]
        } else {
            &["english"]
        };
        acd.set_agent(t0, agent(a, skills, 1, 0));
        acd.set_presence(t0 + Duration::from_secs(i as u64), a, Presence::Available)
            .unwrap();
    }
    drain(&mut acd);
    let now = t0 + Duration::from_secs(10);
    acd.enqueue(now, task("t1", "sales", 0, &["english"]))
        .unwrap();
    assert_eq!(offers(&drain(&mut acd)), vec![pair("t1", "ann")]);
    acd.enqueue(now, task("t2", "sales", 0, &["english"]))
        .unwrap();
    assert_eq!(offers(&drain(&mut acd)), vec![pair("t2", "cat")]);
    // Nobody with English is free: t3 waits although Bob is.
    acd.enqueue(now, task("t3", "sales", 0, &["english"]))
        .unwrap();
    assert!(offers(&drain(&mut acd)).is_empty());
    assert_eq!(acd.queue_stats(now, "sales").waiting, 1);
    // Ann finishes: t3 is hers.
    acd.accept(now, "t1", "ann").unwrap();
    acd.complete(now + Duration::from_secs(60), "t1").unwrap();
    assert_eq!(offers(&drain(&mut acd)), vec![pair("t3", "ann")]);
}

#[test]
fn priority_overtakes_equal_priority_is_first_in_first_out_and_aging_prevents_starvation() {
    let t0 = Instant::now();
    let mut acd = Acd::new();
    let mut q = QueueConfig::new("q");
    q.aging = Some(Duration::from_secs(10));
    acd.set_queue(q);
    acd.set_agent(t0, agent("ann", &[], 1, 0));
    for (i, (id, p)) in [("old", 0), ("low", 0), ("vip", 5)].iter().enumerate() {
        acd.enqueue(t0 + Duration::from_secs(i as u64), task(id, "q", *p, &[]))
            .unwrap();
    }
    // At 2 s the VIP overtakes.
    let mut now = t0 + Duration::from_secs(2);
    acd.set_presence(now, "ann", Presence::Available).unwrap();
    assert_eq!(offers(&drain(&mut acd)), vec![pair("vip", "ann")]);
    acd.accept(now, "vip", "ann").unwrap();
    // A new VIP arrives at 60 s, but "old" has aged 6 steps: it goes first;
    // then "low" (aged 5, ties with the VIP's 5 + 0 and came first).
    now = t0 + Duration::from_secs(60);
    acd.enqueue(now, task("vip2", "q", 5, &[])).unwrap();
    acd.complete(now, "vip").unwrap();
    assert_eq!(offers(&drain(&mut acd)), vec![pair("old", "ann")]);
    acd.accept(now, "old", "ann").unwrap();
    acd.complete(now, "old").unwrap();
    assert_eq!(offers(&drain(&mut acd)), vec![pair("low", "ann")]);
}

#[test]
fn a_busy_phone_counts_as_missed_and_the_agent_is_not_rung_again_until_the_retry() {
    let t0 = Instant::now();
    let mut acd = Acd::new();
    let mut q = QueueConfig::new("q");
    q.missed_after = 2;
    q.retry = Duration::from_secs(5);
    acd.set_queue(q);
    acd.set_agent(t0, agent("ann", &[], 1, 0));
    acd.set_presence(t0, "ann", Presence::Available).unwrap();
    acd.enqueue(t0, task("t", "q", 0, &[])).unwrap();
    assert_eq!(offers(&drain(&mut acd)), vec![pair("t", "ann")]);
    // Her phone is busy: no rescind (the channel knows), the task waits.
    acd.missed(t0 + Duration::from_secs(1), "t", "ann").unwrap();
    let out = drain(&mut acd);
    assert!(!out.iter().any(|o| matches!(o, Output::Rescind { .. })));
    assert!(out.contains(&Output::Event {
        task: "t".into(),
        event: TaskEvent::NoAnswer {
            agent: "ann".into()
        }
    }));
    assert!(offers(&out).is_empty(), "not rung again at once: {out:?}");
    // A second report for an offer no longer hers is refused.
    assert!(acd.missed(t0 + Duration::from_secs(1), "t", "ann").is_err());
    assert_eq!(acd.poll_timeout(), Some(t0 + Duration::from_secs(6)));
    acd.handle_timeout(t0 + Duration::from_secs(6));
    assert_eq!(offers(&drain(&mut acd)), vec![pair("t", "ann")]);
    // Missed twice in a row: she is set missed, and rung no more.
    acd.missed(t0 + Duration::from_secs(7), "t", "ann").unwrap();
    let out = drain(&mut acd);
    assert!(out.contains(&Output::Presence {
        agent: "ann".into(),
        presence: Presence::Missed
    }));
    acd.handle_timeout(t0 + Duration::from_secs(13));
    assert!(offers(&drain(&mut acd)).is_empty());
    assert_eq!(acd.queue_stats(t0, "q").waiting, 1);
}

#[test]
fn an_unanswered_offer_goes_to_the_next_agent_and_the_task_keeps_its_place() {
    let t0 = Instant::now();
    let mut acd = Acd::new();
    let mut q = QueueConfig::new("q");
    q.offer_timeout = Duration::from_secs(15);
    q.missed_after = 1;
    acd.set_queue(q);
    acd.set_agent(t0, agent("ann", &[], 1, 0));
    acd.set_presence(t0, "ann", Presence::Available).unwrap();
    acd.enqueue(t0, task("first", "q", 0, &[])).unwrap();
    acd.enqueue(t0 + Duration::from_secs(1), task("second", "q", 0, &[]))
        .unwrap();
    assert_eq!(offers(&drain(&mut acd)), vec![pair("first", "ann")]);
    assert_eq!(acd.poll_timeout(), Some(t0 + Duration::from_secs(15)));
    acd.set_agent(t0, agent("bob", &[], 1, 0));
    acd.set_presence(t0 + Duration::from_secs(2), "bob", Presence::Available)
        .unwrap();
    // Bob is free, but "first" is still ringing Ann: "second" goes to Bob.
    assert_eq!(offers(&drain(&mut acd)), vec![pair("second", "bob")]);
    acd.accept(t0 + Duration::from_secs(3), "second", "bob")
        .unwrap();
    acd.complete(t0 + Duration::from_secs(10), "second")
        .unwrap();
    drain(&mut acd);
    // Ann does not answer: rescinded, she is missed, Bob gets "first".
    acd.handle_timeout(t0 + Duration::from_secs(15));
    let out = drain(&mut acd);
    assert!(out.contains(&Output::Rescind {
        task: "first".into(),
        agent: "ann".into()
    }));
    assert!(out.contains(&Output::Presence {
        agent: "ann".into(),
        presence: Presence::Missed
    }));
    assert_eq!(offers(&out), vec![pair("first", "bob")]);
    assert_eq!(acd.presence("ann"), Some(&Presence::Missed));
}

#[test]
fn wrap_up_holds_the_slot_and_capacity_counts_per_channel() {
    let t0 = Instant::now();
    let mut acd = Acd::new();
    let mut q = QueueConfig::new("q");
    q.wrap_up = Duration::from_secs(30);
    acd.set_queue(q);
    acd.set_agent(t0, agent("ann", &[], 1, 2));
    acd.set_presence(t0, "ann", Presence::Available).unwrap();
    acd.enqueue(t0, task("call", "q", 0, &[])).unwrap();
    for c in ["chat1", "chat2", "chat3"] {
        let mut t = task(c, "q", 0, &[]);
        t.channel = Channel::Chat;
        acd.enqueue(t0, t).unwrap();
    }
    // One call and two chats at once; the third chat waits.
    let out = drain(&mut acd);
    assert_eq!(
        offers(&out),
        vec![
            pair("call", "ann"),
            pair("chat1", "ann"),
            pair("chat2", "ann")
        ]
    );
    acd.accept(t0, "call", "ann").unwrap();
    acd.enqueue(t0, task("call2", "q", 0, &[])).unwrap();
    acd.complete(t0 + Duration::from_secs(5), "call").unwrap();
    // Wrap-up: the next call waits 30 s.
    assert!(offers(&drain(&mut acd)).is_empty());
    assert_eq!(acd.poll_timeout(), Some(t0 + Duration::from_secs(20)));
    acd.handle_timeout(t0 + Duration::from_secs(20));
    // That was the chat offers ringing out; the call still waits.
    let out = drain(&mut acd);
    assert!(!offers(&out).iter().any(|(t, _)| t == "call2"));
    acd.handle_timeout(t0 + Duration::from_secs(35));
    assert!(offers(&drain(&mut acd)).contains(&pair("call2", "ann")));
}

#[test]
fn a_task_that_waits_too_long_overflows_then_returns_to_its_flow() {
    let t0 = Instant::now();
    let mut acd = Acd::new();
    let mut first = QueueConfig::new("first");
    first.max_wait = Some(Duration::from_secs(30));
    first.on_timeout = Overflow::Queue("second".into());
    let mut second = QueueConfig::new("second");
    second.max_wait = Some(Duration::from_secs(60));
    second.max_size = Some(1);
    acd.set_queue(first);
    acd.set_queue(second);
    acd.enqueue(t0, task("a", "first", 0, &[])).unwrap();
    drain(&mut acd);
    acd.handle_timeout(t0 + Duration::from_secs(30));
    let out = drain(&mut acd);
    assert!(out.contains(&Output::Event {
        task: "a".into(),
        event: TaskEvent::Overflowed {
            from: "first".into(),
            to: "second".into()
        }
    }));
    // The second queue holds one: "b" is handed back to its flow at once.
    acd.enqueue(t0 + Duration::from_secs(31), task("b", "second", 0, &[]))
        .unwrap();
    assert!(drain(&mut acd).contains(&Output::BackToFlow {
        task: "b".into(),
        why: "full"
    }));
    assert_eq!(acd.poll_timeout(), Some(t0 + Duration::from_secs(90)));
    acd.handle_timeout(t0 + Duration::from_secs(90));
    assert!(drain(&mut acd).contains(&Output::BackToFlow {
        task: "a".into(),
        why: "max_wait"
    }));
    assert_eq!(acd.poll_timeout(), None);
}

#[test]
fn the_router_ranks_and_a_bad_answer_falls_back_to_the_built_in_rule() {
    let t0 = Instant::now();
    let mut acd = Acd::new();
    let mut q = QueueConfig::new("q");
    q.router = Some("ranker".into());
    acd.set_queue(q);
    for a in ["ann", "bob"] {
        acd.set_agent(t0, agent(a, &[], 1, 0));
        acd.set_presence(t0, a, Presence::Available).unwrap();
    }
    acd.enqueue(t0, task("t1", "q", 0, &[])).unwrap();
    let out = drain(&mut acd);
    let Some(Output::Route { candidates, .. }) =
        out.iter().find(|o| matches!(o, Output::Route { .. }))
    else {
        panic!("no route request: {out:?}");
    };
    assert_eq!(candidates, &vec!["ann".to_string(), "bob".to_string()]);
    acd.decided(t0, "t1", Some(vec!["bob".into()]), None)
        .unwrap();
    assert_eq!(offers(&drain(&mut acd)), vec![pair("t1", "bob")]);
    // Garbage ids: the built-in rule decides.
    acd.enqueue(t0, task("t2", "q", 0, &[])).unwrap();
    drain(&mut acd);
    acd.decided(t0, "t2", Some(vec!["nobody".into(), "bob".into()]), None)
        .unwrap();
    assert_eq!(offers(&drain(&mut acd)), vec![pair("t2", "ann")]);
    assert!(acd.decided(t0, "t2", None, None).is_err());
}

#[test]
fn abandoning_while_offered_rescinds_and_frees_the_agent() {
    let t0 = Instant::now();
    let mut acd = Acd::new();
    acd.set_queue(QueueConfig::new("q"));
    acd.set_agent(t0, agent("ann", &[], 1, 0));
    acd.set_presence(t0, "ann", Presence::Available).unwrap();
    acd.enqueue(t0, task("t1", "q", 0, &[])).unwrap();
    acd.enqueue(t0, task("t2", "q", 0, &[])).unwrap();
    drain(&mut acd);
    acd.abandon(t0, "t1").unwrap();
    let out = drain(&mut acd);
    assert!(out.contains(&Output::Rescind {
        task: "t1".into(),
        agent: "ann".into()
    }));
    assert!(out.contains(&Output::Event {
        task: "t1".into(),
        event: TaskEvent::Abandoned { queue: "q".into() }
    }));
    assert_eq!(offers(&out), vec![pair("t2", "ann")]);
    assert!(acd.accept(t0, "t1", "ann").is_err());
    assert!(acd.accept(t0, "t2", "bob").is_err());
}

/// A small deterministic generator (xorshift64*), so that a failing seed
/// can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        (!v.is_empty()).then(|| &v[self.below(v.len())])
    }
}

/// What the test knows, from its own inputs and the ACD's outputs only.
#[derive(Default)]
struct Model {
    agents: HashMap<String, AgentConfig>,
    /// Tasks not yet ended: spec and queue skills.
    open: HashMap<String, (TaskSpec, Vec<String>)>,
    offered: HashMap<String, String>,
    connected: HashMap<String, String>,
    /// Wrap-ups per agent (channel, until).
    wrapping: HashMap<String, Vec<(Channel, Instant)>>,
    ended: HashMap<String, &'static str>,
    /// First offer of each task, in order.
    first_offers: Vec<String>,
    arrival: HashMap<String, (u64, u32, String, Vec<String>)>,
}

impl Model {
    /// An agent's slots taken on a channel: offers, conversations and
    /// wrap-ups.
    fn load(&self, agent: &str, channel: Channel, now: Instant) -> u32 {
        let tasks = self
            .offered
            .iter()
            .chain(self.connected.iter())
            .filter(|(t, a)| *a == agent && self.open[*t].0.channel == channel)
            .count();
        let wraps = self.wrapping.get(agent).map_or(0, |w| {
            w.iter()
                .filter(|(c, until)| *c == channel && *until > now)
                .count()
        });
        (tasks + wraps) as u32
    }

    /// The outstanding offers, as (task, agent) pairs.
    fn offers(&self) -> Vec<(String, String)> {
        self.offered
            .iter()
            .map(|(t, a)| (t.clone(), a.clone()))
            .collect()
    }
}

const SKILLS: [&str; 3] = ["english", "french", "billing"];

fn check(acd: &mut Acd, m: &mut Model, now: Instant, wrap: Duration) {
    for o in drain(acd) {
        match o {
            Output::Offer {
                task,
                agent,
                channel,
            } => {
                let (spec, queue_skills) =
                    m.open.get(&task).expect("offer of an ended task").clone();
                assert_eq!(channel, spec.channel);
                assert!(
                    !m.offered.contains_key(&task) && !m.connected.contains_key(&task),
                    "task {task} offered twice at once"
                );
                let a = &m.agents[&agent];
                for s in queue_skills.iter().chain(&spec.skills) {
                    assert!(a.skills.contains_key(s), "{agent} lacks {s} for {task}");
                }
                m.offered.insert(task.clone(), agent.clone());
                assert!(
                    m.load(&agent, channel, now) <= a.capacity.get(&channel).copied().unwrap_or(0),
                    "{agent} over capacity on {channel:?}"
                );
                if !m.first_offers.contains(&task) {
                    m.first_offers.push(task);
                }
            }
            Output::Rescind { task, agent } => {
                assert_eq!(m.offered.remove(&task).as_deref(), Some(agent.as_str()));
            }
            Output::Event { task, event } => match event {
                TaskEvent::Accepted { agent } => {
                    assert_eq!(m.offered.remove(&task).as_deref(), Some(agent.as_str()));
                    m.connected.insert(task, agent);
                }
                TaskEvent::Rejected { agent } => {
                    assert_eq!(m.offered.remove(&task).as_deref(), Some(agent.as_str()));
                }
                // A channel's report (no rescind before it); after a
                // rescind the offer is already gone.
                TaskEvent::NoAnswer { agent } => {
                    if let Some(a) = m.offered.remove(&task) {
                        assert_eq!(a, agent);
                    }
                }
                TaskEvent::Completed { agent } => {
                    assert_eq!(m.connected.remove(&task).as_deref(), Some(agent.as_str()));
                    if !wrap.is_zero() {
                        let c = m.open[&task].0.channel;
                        m.wrapping.entry(agent).or_default().push((c, now + wrap));
                    }
                    m.open.remove(&task);
                    m.ended.insert(task, "completed");
                }
                TaskEvent::HandedOver { from, to } => {
                    assert_eq!(m.connected.remove(&task).as_deref(), Some(from.as_str()));
                    let c = m.open[&task].0.channel;
                    if !wrap.is_zero() {
                        m.wrapping.entry(from).or_default().push((c, now + wrap));
                    }
                    m.connected.insert(task, to.clone());
                    assert!(
                        m.load(&to, c, now) <= m.agents[&to].capacity.get(&c).copied().unwrap_or(0),
                        "{to} over capacity on {c:?} after a hand-over"
                    );
                }
                TaskEvent::Abandoned { .. } => {
                    assert!(!m.connected.contains_key(&task));
                    m.open.remove(&task);
                    m.ended.insert(task, "abandoned");
                }
                TaskEvent::TimedOut { .. } => {
                    assert!(!m.offered.contains_key(&task) && !m.connected.contains_key(&task));
                    m.open.remove(&task);
                    m.ended.insert(task, "timed_out");
                }
                _ => {}
            },
            Output::Position { task, position, .. } => {
                assert!(position >= 1);
                assert!(
                    m.open.contains_key(&task)
                        && !m.offered.contains_key(&task)
                        && !m.connected.contains_key(&task),
                    "position told to {task}, which is not waiting"
                );
            }
            Output::Route { .. } | Output::BackToFlow { .. } | Output::Presence { .. } => {}
        }
    }
}

/// Equal-priority tasks of one queue with the same skills and channel are
/// first offered in the order they arrived (no aging, no overflow in this
/// run).
fn check_fifo(m: &Model) {
    let pos: HashMap<&String, usize> = m
        .first_offers
        .iter()
        .enumerate()
        .map(|(i, t)| (t, i))
        .collect();
    type Group = (u32, String, Vec<String>);
    let mut groups: HashMap<Group, Vec<(u64, &String)>> = HashMap::new();
    for (task, (seq, p, q, skills)) in &m.arrival {
        if pos.contains_key(task) {
            groups
                .entry((*p, q.clone(), skills.clone()))
                .or_default()
                .push((*seq, task));
        }
    }
    for (_, mut tasks) in groups {
        tasks.sort();
        for w in tasks.windows(2) {
            assert!(
                pos[w[0].1] < pos[w[1].1],
                "{} arrived before {} but was offered after",
                w[0].1,
                w[1].1
            );
        }
    }
}

fn random_run(seed: u64, ops: usize) {
    let mut rng = Rng(seed.max(1));
    let t0 = Instant::now();
    let mut now = t0;
    let wrap = Duration::from_secs(5);
    let mut acd = Acd::new();
    let mut m = Model::default();
    let queue_skills: HashMap<&str, Vec<String>> =
        [("sales", vec![]), ("support", vec!["english".to_string()])]
            .into_iter()
            .collect();
    for q in ["sales", "support"] {
        let mut c = QueueConfig::new(q);
        c.skills = queue_skills[q].clone();
        c.wrap_up = wrap;
        c.offer_timeout = Duration::from_secs(10);
        c.announce_every = Some(Duration::from_secs(15));
        if q == "support" {
            // Back to the flow after a minute (never to another queue, so
            // first-in-first-out still holds for the offers).
            c.max_wait = Some(Duration::from_secs(60));
        }
        acd.set_queue(c);
    }
    let mut next_task = 0u64;
    for _ in 0..ops {
        match rng.below(10) {
            0 => {
                let id = format!("a{}", rng.below(12));
                let skills: Vec<&str> = SKILLS
                    .iter()
                    .copied()
                    .filter(|_| rng.below(2) == 0)
                    .collect();
                let cfg = agent(&id, &skills, 1, rng.below(3) as u32);
                m.agents.insert(id.clone(), cfg.clone());
                acd.set_agent(now, cfg);
            }
            1 => {
                let ids: Vec<String> = m.agents.keys().cloned().collect();
                if let Some(id) = rng.pick(&ids) {
                    let p = match rng.below(4) {
                        0 => Presence::Offline,
                        1 => Presence::Away("lunch".into()),
                        _ => Presence::Available,
                    };
                    acd.set_presence(now, id, p).unwrap();
                }
            }
            2 | 3 => {
                next_task += 1;
                let id = format!("t{next_task}");
                let q = if rng.below(2) == 0 {
                    "sales"
                } else {
                    "support"
                };
                let mut spec = task(&id, q, rng.below(3) as u32, &[]);
                if rng.below(3) == 0 {
                    spec.skills = vec![SKILLS[rng.below(SKILLS.len())].to_string()];
                }
                if rng.below(3) == 0 {
                    spec.channel = Channel::Chat;
                }
                m.arrival.insert(
                    id.clone(),
                    (next_task, spec.priority, q.to_string(), {
                        let mut s = spec.skills.clone();
                        s.push(format!("{:?}", spec.channel));
                        s
                    }),
                );
                m.open.insert(id, (spec.clone(), queue_skills[q].clone()));
                acd.enqueue(now, spec).unwrap();
            }
            4 => {
                let offered = m.offers();
                if let Some((t, a)) = rng.pick(&offered) {
                    acd.accept(now, t, a).unwrap();
                }
            }
            5 => {
                let offered = m.offers();
                if let Some((t, a)) = rng.pick(&offered) {
                    if rng.below(2) == 0 {
                        acd.reject(now, t, a).unwrap();
                    } else {
                        acd.missed(now, t, a).unwrap();
                    }
                }
            }
            6 => {
                let connected: Vec<String> = m.connected.keys().cloned().collect();
                let agents: Vec<String> = m.agents.keys().cloned().collect();
                if let Some(t) = rng.pick(&connected) {
                    if rng.below(4) == 0
                        && let Some(to) = rng.pick(&agents)
                    {
                        // Refused when the agent has no room: that is checked
                        // by the capacity invariant, not here.
                        let _ = acd.hand_over(now, t, to);
                    } else {
                        acd.complete(now, t).unwrap();
                    }
                }
            }
            7 => {
                let open: Vec<String> = m
                    .open
                    .keys()
                    .filter(|t| !m.connected.contains_key(*t))
                    .cloned()
                    .collect();
                if rng.below(4) == 0
                    && let Some(t) = rng.pick(&open)
                {
                    acd.abandon(now, t).unwrap();
                }
            }
            _ => {
                now += Duration::from_millis(rng.below(8000) as u64);
                if let Some(t) = acd.poll_timeout()
                    && t <= now
                {
                    acd.handle_timeout(now);
                }
            }
        }
        check(&mut acd, &mut m, now, wrap);
        // Timers that are due always fire before the next input.
        while let Some(t) = acd.poll_timeout().filter(|t| *t <= now) {
            acd.handle_timeout(t.max(now));
            check(&mut acd, &mut m, now, wrap);
        }
        // No timer was lost: nobody waits in support beyond its max_wait
        // (an offer in progress finishes first, and is not waiting).
        let longest = acd.queue_stats(now, "support").longest_wait_ms;
        assert!(longest <= 60_000, "seed {seed}: waited {longest} ms");
    }
    check_fifo(&m);
    // Drain: a capable agent for everything, everyone available, every
    // offer accepted and every conversation completed: every task ends.
    let all = AgentConfig {
        id: "closer".into(),
        skills: SKILLS.iter().map(|s| (s.to_string(), 10)).collect(),
        capacity: [(Channel::Voice, 1), (Channel::Chat, 1)]
            .into_iter()
            .collect(),
        queues: None,
    };
    m.agents.insert("closer".into(), all.clone());
    acd.set_agent(now, all);
    let ids: Vec<String> = m.agents.keys().cloned().collect();
    for id in &ids {
        acd.set_presence(now, id, Presence::Available).unwrap();
    }
    check(&mut acd, &mut m, now, wrap);
    for _ in 0..100_000 {
        if m.open.is_empty() {
            break;
        }
        let offered = m.offers();
        for (t, a) in offered {
            acd.accept(now, &t, &a).unwrap();
        }
        let connected: Vec<String> = m.connected.keys().cloned().collect();
        for t in connected {
            acd.complete(now, &t).unwrap();
        }
        check(&mut acd, &mut m, now, wrap);
        now += Duration::from_secs(1);
        acd.handle_timeout(now);
        for id in &ids {
            if acd.presence(id) == Some(&Presence::Missed) {
                acd.set_presence(now, id, Presence::Available).unwrap();
            }
        }
        check(&mut acd, &mut m, now, wrap);
    }
    assert!(
        m.open.is_empty(),
        "seed {seed}: tasks never ended: {:?}",
        m.open.keys()
    );
    assert_eq!(m.ended.len() as u64, next_task, "seed {seed}");
}

#[test]
fn thousands_of_random_operations_keep_every_invariant() {
    for seed in 1..=12u64 {
        random_run(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 2_000);
    }
}

#[test]
fn a_warm_transfer_hands_the_task_over_and_the_first_agent_wraps_up() {
    let t0 = Instant::now();
    let mut acd = Acd::new();
    let mut q = QueueConfig::new("q");
    q.wrap_up = Duration::from_secs(30);
    acd.set_queue(q);
    for a in ["ann", "bob"] {
        acd.set_agent(t0, agent(a, &[], 1, 0));
    }
    acd.set_presence(t0, "ann", Presence::Available).unwrap();
    acd.enqueue(t0, task("t1", "q", 0, &[])).unwrap();
    acd.accept(t0, "t1", "ann").unwrap();
    drain(&mut acd);
    // Bob is away but took the consultation: he may have it.
    acd.set_presence(t0, "bob", Presence::Away("meeting".into()))
        .unwrap();
    let now = t0 + Duration::from_secs(40);
    acd.hand_over(now, "t1", "bob").unwrap();
    let out = drain(&mut acd);
    assert!(out.contains(&Output::Event {
        task: "t1".into(),
        event: TaskEvent::HandedOver {
            from: "ann".into(),
            to: "bob".into()
        }
    }));
    let ann = acd.agent_stats(now, "ann").unwrap();
    assert_eq!((ann.state, ann.tasks_today), ("wrap_up", 1));
    assert_eq!(acd.agent_stats(now, "bob").unwrap().tasks, vec!["t1"]);
    // Bob is full: nobody else can hand him a second call.
    acd.set_presence(now, "ann", Presence::Available).unwrap();
    acd.enqueue(now, task("t2", "q", 0, &[])).unwrap();
    acd.handle_timeout(now + Duration::from_secs(31));
    let t2_agent = offers(&drain(&mut acd));
    assert_eq!(t2_agent, vec![pair("t2", "ann")]);
    acd.accept(now, "t2", "ann").unwrap();
    assert!(acd.hand_over(now, "t2", "bob").is_err(), "over capacity");
    assert!(acd.hand_over(now, "t9", "bob").is_err());
    acd.complete(now + Duration::from_secs(100), "t1").unwrap();
    let bob = acd
        .agent_stats(now + Duration::from_secs(100), "bob")
        .unwrap();
    assert_eq!(bob.tasks_today, 1);
    acd.new_day();
    assert_eq!(acd.agent_stats(now, "bob").unwrap().tasks_today, 0);
}

#[test]
fn waiting_customers_hear_their_position_and_the_expected_wait() {
    let t0 = Instant::now();
    let mut acd = Acd::new();
    let mut q = QueueConfig::new("q");
    q.announce_every = Some(Duration::from_secs(30));
    q.offer_timeout = Duration::from_secs(1000);
    acd.set_queue(q);
    acd.set_agent(t0, agent("ann", &[], 1, 0));
    acd.set_presence(t0, "ann", Presence::Available).unwrap();
    // One handled call of 120 s gives the average.
    acd.enqueue(t0, task("t0", "q", 0, &[])).unwrap();
    acd.accept(t0, "t0", "ann").unwrap();
    for (i, id) in ["t1", "t2", "t3"].iter().enumerate() {
        acd.enqueue(t0 + Duration::from_secs(i as u64), task(id, "q", 0, &[]))
            .unwrap();
    }
    // A VIP comes later but is served first.
    acd.enqueue(t0 + Duration::from_secs(5), task("vip", "q", 5, &[]))
        .unwrap();
    acd.complete(t0 + Duration::from_secs(120), "t0").unwrap();
    drain(&mut acd);
    let at = t0 + Duration::from_secs(200);
    acd.handle_timeout(at);
    let positions: Vec<(String, u32, Option<Duration>)> = drain(&mut acd)
        .into_iter()
        .filter_map(|o| match o {
            Output::Position {
                task,
                position,
                expected_wait,
            } => Some((task, position, expected_wait)),
            _ => None,
        })
        .collect();
    let m = |n: u64| Some(Duration::from_secs(120 * n));
    assert_eq!(
        positions,
        vec![
            ("t1".to_string(), 1, m(1)),
            ("t2".to_string(), 2, m(2)),
            ("t3".to_string(), 3, m(3))
        ],
        "the VIP is being offered, so not told; the rest in order"
    );
    assert_eq!(acd.queue_stats(at, "q").average_handle_ms, Some(120_000));
    // Not again before 30 s.
    acd.handle_timeout(at + Duration::from_secs(10));
    assert!(
        !drain(&mut acd)
            .iter()
            .any(|o| matches!(o, Output::Position { .. }))
    );
}

#[test]
fn a_free_agent_is_ranked_for_one_task_at_a_time() {
    let t0 = Instant::now();
    let mut acd = Acd::new();
    let mut q = QueueConfig::new("q");
    q.router = Some("r".into());
    acd.set_queue(q);
    for i in 0..5 {
        acd.enqueue(t0, task(&format!("t{i}"), "q", 0, &[]))
            .unwrap();
    }
    acd.set_agent(t0, agent("ann", &[], 1, 0));
    acd.set_presence(t0, "ann", Presence::Available).unwrap();
    let routes = |out: &[Output]| -> Vec<(String, Vec<String>)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Route {
                    task, candidates, ..
                } => Some((task.clone(), candidates.clone())),
                _ => None,
            })
            .collect()
    };
    // Ann is held for t0's router: the other four wait, unranked.
    let out = drain(&mut acd);
    assert_eq!(
        routes(&out),
        vec![("t0".to_string(), vec!["ann".to_string()])]
    );
    // Bob comes: he is ranked for the next task, not for t0 again.
    acd.set_agent(t0, agent("bob", &[], 1, 0));
    acd.set_presence(t0, "bob", Presence::Available).unwrap();
    let out = drain(&mut acd);
    assert_eq!(
        routes(&out),
        vec![("t1".to_string(), vec!["bob".to_string()])]
    );
    // The routers answer: each gets their offer, nobody else is ranked.
    acd.decided(t0, "t0", Some(vec!["ann".into()]), None)
        .unwrap();
    acd.decided(t0, "t1", None, None).unwrap();
    let out = drain(&mut acd);
    assert!(routes(&out).is_empty(), "{out:?}");
    assert_eq!(offers(&out), vec![pair("t0", "ann"), pair("t1", "bob")]);
    // A task abandoned while its router ranks lets the agent go.
    acd.accept(t0, "t0", "ann").unwrap();
    acd.complete(t0, "t0").unwrap();
    let out = drain(&mut acd);
    assert_eq!(
        routes(&out),
        vec![("t2".to_string(), vec!["ann".to_string()])]
    );
    acd.abandon(t0, "t2").unwrap();
    let out = drain(&mut acd);
    assert_eq!(
        routes(&out),
        vec![("t3".to_string(), vec!["ann".to_string()])]
    );
}
