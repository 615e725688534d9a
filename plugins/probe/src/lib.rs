//! A capability probe for tests and for integrators checking their grants.
//! On `digits`, the first digit picks the probe and the flow says what
//! happened:
//!
//! - `1`: `GET` the config key `url` over the `http` import;
//! - `2`: increment the tenant kv counter `probe-count`;
//! - `3`: open a raw TCP socket to the config key `addr` through WASI
//!   (must always be refused: raw sockets are never granted);
//! - `4`: read the config key `greeting`;
//! - `5`: read the clock: `clock NOW_MS ZONE OFFSET_MINUTES`.
//!
//! On `started` it says `probe ready`.

use plugboard_sdk::flow::{Action, Event, Guest, Interaction, Response};
use plugboard_sdk::host;

struct Probe;

fn http_probe() -> String {
    let Some(url) = host::config::get("url") else {
        return "no url configured".into();
    };
    match host::http_get(&url) {
        Ok(r) => format!("http {} {}", r.status, String::from_utf8_lossy(&r.body)),
        Err(e) => format!("http error: {}", host::describe(&e)),
    }
}

fn kv_probe() -> String {
    let current = match host::kv::get("probe-count") {
        Ok(v) => v
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0),
        Err(e) => return format!("kv error: {}", host::describe(&e)),
    };
    let next = current + 1;
    match host::kv::set("probe-count", next.to_string().as_bytes()) {
        Ok(()) => format!("kv count {next}"),
        Err(e) => format!("kv error: {}", host::describe(&e)),
    }
}

fn socket_probe() -> String {
    let addr = host::config::get("addr").unwrap_or_else(|| "127.0.0.1:80".into());
    match std::net::TcpStream::connect(addr.as_str()) {
        Ok(_) => "socket connected".into(),
        Err(e) => format!("socket refused: {e}"),
    }
}

impl Guest for Probe {
    fn handle(_ix: Interaction, _state: String, event: Event) -> Result<Response, String> {
        let text = match event {
            Event::Started => "probe ready".to_string(),
            Event::Digits(d) => match d.digits.chars().next() {
                Some('1') => http_probe(),
                Some('2') => kv_probe(),
                Some('3') => socket_probe(),
                Some('4') => host::config::get("greeting").unwrap_or_else(|| "no greeting".into()),
                Some('5') => format!(
                    "clock {} {} {}",
                    host::clock::now_ms(),
                    host::clock::time_zone(),
                    host::clock::utc_offset_minutes()
                ),
                _ => "unknown probe".to_string(),
            },
            _ => return Ok(Response::actions(vec![])),
        };
        host::info(&text);
        Ok(Response::actions(vec![Action::say(text)]))
    }
}

plugboard_sdk::flow::export_flow!(Probe);
