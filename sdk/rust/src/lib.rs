//! Write Plugboard plugins in Rust.
//!
//! A plugin is a WebAssembly component implementing one of the four worlds
//! in `wit/` (flow, router, tts, crm). Enable the one feature matching your
//! plugin's world, implement the `Guest` trait of that module and export it:
//!
//! ```ignore
//! use plugboard_sdk::flow::{Action, Event, Guest, Interaction, Response};
//!
//! struct Hello;
//!
//! impl Guest for Hello {
//!     fn handle(_ix: Interaction, _state: String, event: Event) -> Result<Response, String> {
//!         Ok(match event {
//!             Event::Started => Response::actions(vec![Action::say("Hello!"), Action::Hangup]),
//!             _ => Response::actions(vec![]),
//!         })
//!     }
//! }
//!
//! plugboard_sdk::flow::export_flow!(Hello);
//! ```
//!
//! Build with `cargo build --release --target wasm32-unknown-unknown` and
//! deploy the `.wasm` in `target/wasm32-unknown-unknown/release/` with
//! `plugboard plugin deploy TENANT NAME FILE`: it is a core module carrying
//! its WIT world, which the server wraps into a component. Such a plugin
//! imports nothing from WASI and allocates from the [`arena`], the cheapest
//! way to run per event. A plugin that needs WASI (files, sockets, the system
//! clock) builds for `wasm32-wasip2` instead, which gives a component.
//!
//! Host capabilities (`http`, `kv`) are denied unless the plugin is granted
//! them; see [`host`] for the helpers.

#![allow(missing_docs, clippy::too_many_arguments)]

pub mod arena;

/// One event per instance: a bump arena in static memory (see [`arena`]).
#[cfg(all(
    feature = "arena",
    target_arch = "wasm32",
    target_os = "unknown",
    not(target_feature = "atomics")
))]
#[global_allocator]
static ALLOCATOR: arena::EventArena = arena::EventArena::new();

/// The host imports every plugin may call (`plugboard:host@0.1.0`).
#[allow(missing_docs)]
pub mod host {
    wit_bindgen::generate!({
        world: "plugboard:host/imports",
        path: ["../../wit/host@0.1.0"],
    });

    pub use plugboard::host::types::Error;
    pub use plugboard::host::{clock, config, http, kv, log};

    /// A plain-language description of a host error, e.g. `not granted: http`.
    pub fn describe(e: &Error) -> String {
        match e {
            Error::NotGranted(s) => format!("not granted: {s}"),
            Error::QuotaExceeded => "quota exceeded".into(),
            Error::Timeout => "timeout".into(),
            Error::TooLarge => "too large".into(),
            Error::Invalid(s) => format!("invalid: {s}"),
            Error::Failed(s) => format!("failed: {s}"),
        }
    }

    /// Logs at info level.
    pub fn info(msg: &str) {
        log::log(log::Level::Info, msg);
    }

    /// Logs at warn level.
    pub fn warn(msg: &str) {
        log::log(log::Level::Warn, msg);
    }

    /// Logs at error level.
    pub fn error(msg: &str) {
        log::log(log::Level::Error, msg);
    }

    /// `GET url`, returning status and body.
    pub fn http_get(url: &str) -> Result<http::Response, Error> {
        http::fetch(&http::Request {
            method: http::Method::Get,
            url: url.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout_ms: None,
        })
    }

    /// `POST url` with a JSON body.
    pub fn http_post_json(url: &str, json: &str) -> Result<http::Response, Error> {
        http::fetch(&http::Request {
            method: http::Method::Post,
            url: url.to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: json.as_bytes().to_vec(),
            timeout_ms: None,
        })
    }
}

#[cfg(feature = "flow")]
pub mod flow;

#[cfg(feature = "router")]
pub mod router {
    //! The router world: rank agents for a task.
    wit_bindgen::generate!({
        world: "plugboard:router/router",
        path: ["../../wit/host@0.1.0", "../../wit/router@0.1.0"],
        with: {
            "plugboard:host/types@0.1.0": crate::host::plugboard::host::types,
            "plugboard:host/log@0.1.0": crate::host::plugboard::host::log,
            "plugboard:host/kv@0.1.0": crate::host::plugboard::host::kv,
            "plugboard:host/http@0.1.0": crate::host::plugboard::host::http,
            "plugboard:host/config@0.1.0": crate::host::plugboard::host::config,
            "plugboard:host/clock@0.1.0": crate::host::plugboard::host::clock,
        },
        export_macro_name: "export_router",
        pub_export_macro: true,
        default_bindings_module: "plugboard_sdk::router",
    });
    pub use exports::plugboard::router::routing::Guest;
    pub use plugboard::router::types::{Agent, Decision, Skill, Task};
}

#[cfg(feature = "tts")]
pub mod tts {
    //! The TTS world: text to audio.
    wit_bindgen::generate!({
        world: "plugboard:tts/tts",
        path: ["../../wit/host@0.1.0", "../../wit/tts@0.1.0"],
        with: {
            "plugboard:host/types@0.1.0": crate::host::plugboard::host::types,
            "plugboard:host/log@0.1.0": crate::host::plugboard::host::log,
            "plugboard:host/kv@0.1.0": crate::host::plugboard::host::kv,
            "plugboard:host/http@0.1.0": crate::host::plugboard::host::http,
            "plugboard:host/config@0.1.0": crate::host::plugboard::host::config,
            "plugboard:host/clock@0.1.0": crate::host::plugboard::host::clock,
        },
        export_macro_name: "export_tts",
        pub_export_macro: true,
        default_bindings_module: "plugboard_sdk::tts",
    });
    pub use exports::plugboard::tts::synthesizer::Guest;
    pub use plugboard::tts::types::{Audio, Output, Request};
}

#[cfg(feature = "crm")]
pub mod crm {
    //! The CRM world: customer lookup and history.
    wit_bindgen::generate!({
        world: "plugboard:crm/crm",
        path: ["../../wit/host@0.1.0", "../../wit/crm@0.1.0"],
        with: {
            "plugboard:host/types@0.1.0": crate::host::plugboard::host::types,
            "plugboard:host/log@0.1.0": crate::host::plugboard::host::log,
            "plugboard:host/kv@0.1.0": crate::host::plugboard::host::kv,
            "plugboard:host/http@0.1.0": crate::host::plugboard::host::http,
            "plugboard:host/config@0.1.0": crate::host::plugboard::host::config,
            "plugboard:host/clock@0.1.0": crate::host::plugboard::host::clock,
        },
        export_macro_name: "export_crm",
        pub_export_macro: true,
        default_bindings_module: "plugboard_sdk::crm",
    });
    pub use exports::plugboard::crm::connector::Guest;
    pub use plugboard::crm::types::{Profile, Summary};
}
