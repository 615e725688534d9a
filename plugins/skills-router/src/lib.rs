//! Skills router: offers a task only to agents who have every required
//! skill, best first by total proficiency in those skills, then by the
//! fewest tasks in hand, then by the longest idle time. Tasks that waited
//! over two minutes get their priority raised by one.

use plugboard_sdk::router::{Agent, Decision, Guest, Task};

struct SkillsRouter;

fn level(agent: &Agent, skill: &str) -> Option<u32> {
    agent
        .skills
        .iter()
        .find(|s| s.name == skill)
        .map(|s| u32::from(s.level))
}

impl Guest for SkillsRouter {
    fn route(task: Task, candidates: Vec<Agent>) -> Result<Decision, String> {
        let mut scored: Vec<(u32, &Agent)> = candidates
            .iter()
            .filter_map(|a| {
                let mut total = 0;
                for s in &task.skills {
                    total += level(a, s)?;
                }
                Some((total, a))
            })
            .collect();
        scored.sort_by(|(sa, a), (sb, b)| {
            sb.cmp(sa)
                .then(a.active_tasks.cmp(&b.active_tasks))
                .then(b.idle_ms.cmp(&a.idle_ms))
                .then(a.id.cmp(&b.id))
        });
        Ok(Decision {
            ranked: scored.into_iter().map(|(_, a)| a.id.clone()).collect(),
            priority: (task.waited_ms > 120_000).then_some(task.priority + 1),
        })
    }
}

plugboard_sdk::router::export_router!(SkillsRouter);
