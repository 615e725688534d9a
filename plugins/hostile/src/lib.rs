//! A deliberately hostile flow, for the host's containment tests. Its
//! behaviour on every event is chosen by the config key `mode`:
//!
//! - `loop`: spins forever (stopped by the CPU deadline);
//! - `memory`: allocates until the memory cap stops it;
//! - `output`: returns megabytes of actions (stopped by the output cap);
//! - `actions`: returns 10,000 tiny actions;
//! - `trap`: panics;
//! - `stack`: recurses without end;
//! - `error`: returns an `err`;
//! - anything else: behaves (says "ok").

use plugboard_sdk::flow::{Action, Event, Guest, Interaction, Response};
use plugboard_sdk::host;

struct Hostile;

#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(n: u64, v: &mut Vec<u64>) -> u64 {
    v.push(n);
    let r = recurse(n + 1, v) + n;
    std::hint::black_box(r)
}

impl Guest for Hostile {
    fn handle(_ix: Interaction, _state: String, _event: Event) -> Result<Response, String> {
        let mode = host::config::get("mode").unwrap_or_default();
        match mode.as_str() {
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut chunk = vec![0u8; 1 << 20];
                    chunk[0] = 1;
                    hoard.push(std::hint::black_box(chunk));
                }
            }
            "output" => {
                let text = "x".repeat(1 << 20);
                Ok(Response::actions((0..8).map(|_| Action::say(text.clone())).collect()))
            }
            "actions" => Ok(Response::actions((0..10_000).map(|_| Action::Hangup).collect())),
            "trap" => panic!("hostile plugin panics on purpose"),
            "stack" => {
                let mut v = Vec::new();
                Ok(Response::actions(vec![Action::say(recurse(0, &mut v).to_string())]))
            }
            "error" => Err("hostile plugin refuses".to_string()),
            _ => Ok(Response::actions(vec![Action::say("ok")])),
        }
    }
}

plugboard_sdk::flow::export_flow!(Hostile);
