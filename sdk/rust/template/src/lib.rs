//! A starting point for a Plugboard flow: greets, asks for one digit,
//! queues for sales on 1 and says goodbye otherwise.
//!
//! Build: `cargo build --release` (the target is set in .cargo/config.toml)
//! Deploy: `plugboard plugin deploy TENANT my-flow target/wasm32-unknown-unknown/release/my_flow.wasm`
//! Try it: `plugboard flow simulate TENANT my-flow --events '[{"type":"digits","digits":"1"}]'`

use plugboard_sdk::flow::{Action, Event, Guest, Interaction, Response};

struct MyFlow;

impl Guest for MyFlow {
    fn handle(_ix: Interaction, _state: String, event: Event) -> Result<Response, String> {
        Ok(match event {
            Event::Started => Response::actions(vec![Action::gather(
                "Hello! Press 1 to talk to sales.",
                1,
            )]),
            Event::Digits(d) if d.digits == "1" => Response::actions(vec![
                Action::say("Connecting you to sales."),
                Action::enqueue("sales", &[]),
            ]),
            Event::Digits(_) | Event::Timeout => {
                Response::actions(vec![Action::say("Goodbye."), Action::Hangup])
            }
            _ => Response::actions(vec![]),
        })
    }
}

plugboard_sdk::flow::export_flow!(MyFlow);
