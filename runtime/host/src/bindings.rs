//! Host-side bindings generated from `wit/` by `wasmtime::component::bindgen!`.
//!
//! The host imports (`plugboard:host`) are generated once and shared by the
//! four plugin worlds, so one set of trait implementations serves them all.

#![allow(missing_docs)]

/// `plugboard:host@0.1.0`: the imports every plugin gets.
pub mod host {
    wasmtime::component::bindgen!({
        world: "plugboard:host/imports",
        path: ["../../wit/host@0.1.0"],
        // Host calls that wait on I/O are async: a plugin waiting on them
        // is a parked future, not a blocked thread.
        imports: {
            "plugboard:host/http": async,
            "plugboard:host/kv": async,
        },
    });
}

/// `plugboard:flow@0.1.0`.
pub mod flow {
    wasmtime::component::bindgen!({
        world: "plugboard:flow/flow",
        path: ["../../wit/host@0.1.0", "../../wit/flow@0.1.0"],
        with: {
            "plugboard:host": crate::bindings::host::plugboard::host,
        },
        // The host imports are async (see `host`), so the store's data
        // must be `Send`.
        require_store_data_send: true,
    });
}

/// `plugboard:router@0.1.0`.
pub mod router {
    wasmtime::component::bindgen!({
        world: "plugboard:router/router",
        path: ["../../wit/host@0.1.0", "../../wit/router@0.1.0"],
        with: {
            "plugboard:host": crate::bindings::host::plugboard::host,
        },
        // The host imports are async (see `host`), so the store's data
        // must be `Send`.
        require_store_data_send: true,
    });
}

/// `plugboard:tts@0.1.0`.
pub mod tts {
    wasmtime::component::bindgen!({
        world: "plugboard:tts/tts",
        path: ["../../wit/host@0.1.0", "../../wit/tts@0.1.0"],
        with: {
            "plugboard:host": crate::bindings::host::plugboard::host,
        },
        // The host imports are async (see `host`), so the store's data
        // must be `Send`.
        require_store_data_send: true,
    });
}

/// `plugboard:crm@0.1.0`.
pub mod crm {
    wasmtime::component::bindgen!({
        world: "plugboard:crm/crm",
        path: ["../../wit/host@0.1.0", "../../wit/crm@0.1.0"],
        with: {
            "plugboard:host": crate::bindings::host::plugboard::host,
        },
        // The host imports are async (see `host`), so the store's data
        // must be `Send`.
        require_store_data_send: true,
    });
}

/// The export names that identify each world's component.
pub const FLOW_EXPORT: &str = "plugboard:flow/handler@0.1.0";
/// See [`FLOW_EXPORT`].
pub const ROUTER_EXPORT: &str = "plugboard:router/routing@0.1.0";
/// See [`FLOW_EXPORT`].
pub const TTS_EXPORT: &str = "plugboard:tts/synthesizer@0.1.0";
/// See [`FLOW_EXPORT`].
pub const CRM_EXPORT: &str = "plugboard:crm/connector@0.1.0";
