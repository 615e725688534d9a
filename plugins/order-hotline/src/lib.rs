//! The order-hotline scenario in Rust (see `examples/order-hotline/README.md`):
//! business hours? menu: 1 sales, 2 track an order (HTTP lookup, speak the
//! status), else voicemail. The same behaviour as `flow.json`, the JS and
//! the Python versions; the tests compare them step by step.

use plugboard_sdk::flow::{
    Action, Event, Gather, Guest, Interaction, RecordOptions, Response, Say,
};
use plugboard_sdk::host::{self, clock, config};

struct OrderHotline;

const VOICEMAIL: &str = "Please leave a message after the tone.";

/// Monday–Friday 09:00–18:00 local time, except 1 January and 25 December.
fn open_now() -> bool {
    let local_ms = clock::now_ms() as i64 + i64::from(clock::utc_offset_minutes()) * 60_000;
    let days = local_ms.div_euclid(86_400_000);
    let minute = local_ms.rem_euclid(86_400_000) / 60_000;
    let weekday = (days + 3).rem_euclid(7); // 0 = Monday; 1970-01-01 was a Thursday
    let (_, month, day) = civil_from_days(days);
    let holiday = (month, day) == (1, 1) || (month, day) == (12, 25);
    weekday < 5 && (9 * 60..18 * 60).contains(&minute) && !holiday
}

/// Howard Hinnant's civil-from-days.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn gather(prompt: &str, max_digits: u32, terminator: Option<&str>, timeout_ms: u32) -> Action {
    Action::Gather(Gather {
        prompt: Some(Say::text(prompt)),
        max_digits,
        terminator: terminator.map(str::to_string),
        timeout_ms,
        inter_digit_timeout_ms: 3000,
        speech: false,
    })
}

fn voicemail(prompt: &str) -> Response {
    Response::with_state(
        vec![
            Action::say(prompt),
            Action::Record(RecordOptions {
                max_secs: 60,
                beep: true,
                terminator: None,
            }),
        ],
        "voicemail",
    )
}

fn lookup(order: &str) -> Option<String> {
    let base = config::get("mis_url")?;
    let resp = host::http_get(&format!("{base}/orders/{order}")).ok()?;
    if resp.status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&resp.body).ok()?;
    v.get("status")?.as_str().map(str::to_string)
}

impl Guest for OrderHotline {
    fn handle(_ix: Interaction, state: String, event: Event) -> Result<Response, String> {
        let done = |actions| Response::with_state(actions, "done");
        Ok(match (state.as_str(), event) {
            (_, Event::Started) => {
                if open_now() {
                    Response::with_state(
                        vec![gather(
                            "Welcome. Press 1 for sales, 2 to track an order.",
                            1,
                            None,
                            5000,
                        )],
                        "menu",
                    )
                } else {
                    voicemail("We are closed. Please leave a message after the tone.")
                }
            }
            ("menu", Event::Digits(d)) if d.digits == "1" => done(vec![
                Action::say("Connecting you to sales."),
                Action::enqueue("sales", &[]),
            ]),
            ("menu", Event::Digits(d)) if d.digits == "2" => Response::with_state(
                vec![gather(
                    "Please enter your order number, then press hash.",
                    10,
                    Some("#"),
                    8000,
                )],
                "order",
            ),
            ("menu", Event::Digits(_) | Event::Timeout) => voicemail(VOICEMAIL),
            ("order", Event::Digits(d)) if !d.digits.is_empty() => {
                let text = match lookup(&d.digits) {
                    Some(status) => format!("Order {} is {status}.", d.digits),
                    None => format!("Sorry, we could not find order {}.", d.digits),
                };
                done(vec![Action::say(text), Action::Hangup])
            }
            ("order", Event::Digits(_) | Event::Timeout) => voicemail(VOICEMAIL),
            ("voicemail", Event::Recorded(_)) => done(vec![
                Action::say("Thank you for your message. Goodbye."),
                Action::Hangup,
            ]),
            _ => Response::actions(vec![]),
        })
    }
}

plugboard_sdk::flow::export_flow!(OrderHotline);
