//! A starting point for a Plugboard router: ranks the candidate agents for
//! a task. This one keeps the agents that have every skill the task needs
//! and puts the longest idle first.
//!
//! Build: `cargo build --release` (the target is set in .cargo/config.toml)
//! Deploy: `plugboard plugin deploy TENANT {{NAME}} target/wasm32-unknown-unknown/release/{{CRATE}}.wasm`

use plugboard_sdk::router::{Agent, Decision, Guest, Task};

struct Router;

fn has_skills(agent: &Agent, needed: &[String]) -> bool {
    needed
        .iter()
        .all(|s| agent.skills.iter().any(|k| &k.name == s))
}

impl Guest for Router {
    fn route(task: Task, candidates: Vec<Agent>) -> Result<Decision, String> {
        let mut able: Vec<&Agent> = candidates
            .iter()
            .filter(|a| has_skills(a, &task.skills))
            .collect();
        able.sort_by(|a, b| b.idle_ms.cmp(&a.idle_ms));
        Ok(Decision {
            ranked: able.iter().map(|a| a.id.clone()).collect(),
            priority: None,
        })
    }
}

plugboard_sdk::router::export_router!(Router);
