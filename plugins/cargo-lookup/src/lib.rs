//! Cargo lookup: asks for a waybill number, looks it up in the tenant's
//! MIS/GPS service over HTTP and speaks where the cargo is.
//!
//! Config: `mis_url`, e.g. `http://127.0.0.1:8090` (the plugin calls
//! `GET {mis_url}/waybills/{number}` and expects
//! `{"status": "...", "location": "..."}`). Needs the `http` grant for that
//! host. Any failure is spoken plainly and the caller is queued.

use plugboard_sdk::flow::{Action, Event, Guest, Interaction, Response};
use plugboard_sdk::host;

struct CargoLookup;

fn lookup(number: &str) -> Result<(String, String), String> {
    let base = host::config::get("mis_url").ok_or("mis_url is not configured")?;
    let url = format!("{}/waybills/{number}", base.trim_end_matches('/'));
    let resp = host::http_get(&url).map_err(|e| host::describe(&e))?;
    if resp.status == 404 {
        return Err("unknown".into());
    }
    if resp.status != 200 {
        return Err(format!("MIS answered {}", resp.status));
    }
    let v: serde_json::Value = serde_json::from_slice(&resp.body).map_err(|e| e.to_string())?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("unknown").to_string();
    Ok((field("status"), field("location")))
}

fn spaced(digits: &str) -> String {
    digits.chars().map(|c| c.to_string()).collect::<Vec<_>>().join(" ")
}

impl Guest for CargoLookup {
    fn handle(_ix: Interaction, _state: String, event: Event) -> Result<Response, String> {
        Ok(match event {
            Event::Started => Response::actions(vec![Action::gather(
                "Please enter your waybill number, then press the hash key.",
                12,
            )]),
            Event::Digits(d) if d.digits.is_empty() => Response::actions(vec![Action::gather(
                "I did not get a number. Please enter your waybill number, then press the hash key.",
                12,
            )]),
            Event::Digits(d) => match lookup(&d.digits) {
                Ok((status, location)) => Response::actions(vec![
                    Action::set("waybill", d.digits.clone()),
                    Action::set("cargo_status", status.clone()),
                    Action::say(format!(
                        "Waybill {}: your cargo is {status}, now in {location}.",
                        spaced(&d.digits)
                    )),
                    Action::Hangup,
                ]),
                Err(e) if e == "unknown" => Response::actions(vec![
                    Action::say(format!("Sorry, waybill {} was not found.", spaced(&d.digits))),
                    Action::gather("Please enter your waybill number, then press the hash key.", 12),
                ]),
                Err(e) => {
                    host::warn(&format!("MIS lookup failed: {e}"));
                    Response::actions(vec![
                        Action::say("Sorry, I cannot look up your cargo right now. Connecting you to an agent."),
                        Action::enqueue("cargo", &[]),
                    ])
                }
            },
            Event::Timeout => Response::actions(vec![Action::enqueue("cargo", &[])]),
            _ => Response::actions(vec![]),
        })
    }
}

plugboard_sdk::flow::export_flow!(CargoLookup);
