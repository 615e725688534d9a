//! Hello IVR: greets the caller, offers a menu by digit, queues or hangs up.
//!
//! 1 → sales queue, 2 → support queue (skill `support`), 9 → goodbye.
//! A wrong key or silence repeats the menu; after three misses the caller is
//! queued for the general queue. The count of misses is the flow's state.

use plugboard_sdk::flow::{Action, Event, Guest, Interaction, Response};

const MENU: &str = "Welcome to Acme. For sales press 1. For support press 2. To end the call press 9.";

struct HelloIvr;

fn menu(prefix: Option<&str>) -> Vec<Action> {
    let mut prompt = String::new();
    if let Some(p) = prefix {
        prompt.push_str(p);
        prompt.push(' ');
    }
    prompt.push_str(MENU);
    vec![Action::gather(prompt, 1)]
}

impl Guest for HelloIvr {
    fn handle(_ix: Interaction, state: String, event: Event) -> Result<Response, String> {
        let misses: u32 = state.parse().unwrap_or(0);
        let retry = |why: &str| {
            if misses + 1 >= 3 {
                Response::with_state(
                    vec![
                        Action::say("Let me put you through to someone who can help."),
                        Action::enqueue("general", &[]),
                    ],
                    (misses + 1).to_string(),
                )
            } else {
                Response::with_state(menu(Some(why)), (misses + 1).to_string())
            }
        };
        Ok(match event {
            Event::Started => Response::with_state(menu(None), "0"),
            Event::Digits(d) => match d.digits.as_str() {
                "1" => Response::actions(vec![
                    Action::set("menu", "sales"),
                    Action::say("Connecting you to sales."),
                    Action::enqueue("sales", &[]),
                ]),
                "2" => Response::actions(vec![
                    Action::set("menu", "support"),
                    Action::say("Connecting you to support."),
                    Action::enqueue("support", &["support"]),
                ]),
                "9" => Response::actions(vec![Action::say("Goodbye."), Action::Hangup]),
                _ => retry("Sorry, that is not a valid choice."),
            },
            Event::Timeout => retry("Sorry, I did not hear a choice."),
            _ => Response::actions(vec![]),
        })
    }
}

plugboard_sdk::flow::export_flow!(HelloIvr);
