//! The flow world: one event in, actions out. See `wit/flow@0.1.0/flow.wit`.

wit_bindgen::generate!({
    world: "plugboard:flow/flow",
    path: ["../../wit/host@0.1.0", "../../wit/flow@0.1.0"],
    with: {
        "plugboard:host/types@0.1.0": crate::host::plugboard::host::types,
        "plugboard:host/log@0.1.0": crate::host::plugboard::host::log,
        "plugboard:host/kv@0.1.0": crate::host::plugboard::host::kv,
        "plugboard:host/http@0.1.0": crate::host::plugboard::host::http,
        "plugboard:host/config@0.1.0": crate::host::plugboard::host::config,
        "plugboard:host/clock@0.1.0": crate::host::plugboard::host::clock,
    },
    export_macro_name: "export_flow",
    pub_export_macro: true,
    default_bindings_module: "plugboard_sdk::flow",
});

pub use exports::plugboard::flow::handler::Guest;
pub use plugboard::flow::types::{
    Action, Callback, Channel, Dial, DigitsInput, Enqueue, Event, Gather, Interaction, Message,
    Outbound, QueueStatus, RecordOptions, Recording, Response, Say,
};

impl Say {
    /// Plain text in the default voice.
    pub fn text(text: impl Into<String>) -> Say {
        Say {
            text: text.into(),
            voice: None,
            language: None,
        }
    }
}

impl Action {
    /// `say` in the default voice.
    pub fn say(text: impl Into<String>) -> Action {
        Action::Say(Say::text(text))
    }

    /// `gather` up to `max_digits` digits after `prompt`, 5 s to start,
    /// 3 s between digits, `#` ends input.
    pub fn gather(prompt: impl Into<String>, max_digits: u32) -> Action {
        Action::Gather(Gather {
            prompt: Some(Say::text(prompt)),
            max_digits,
            terminator: Some("#".into()),
            timeout_ms: 5000,
            inter_digit_timeout_ms: 3000,
            speech: false,
        })
    }

    /// `enqueue` into `queue` at normal priority with `skills`.
    pub fn enqueue(queue: impl Into<String>, skills: &[&str]) -> Action {
        Action::Enqueue(Enqueue {
            queue: queue.into(),
            priority: 0,
            skills: skills.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// `set-attribute`.
    pub fn set(name: impl Into<String>, value: impl Into<String>) -> Action {
        Action::SetAttribute((name.into(), value.into()))
    }
}

impl Response {
    /// These actions, state unchanged.
    pub fn actions(actions: Vec<Action>) -> Response {
        Response {
            actions,
            state: None,
        }
    }

    /// These actions and a new state.
    pub fn with_state(actions: Vec<Action>, state: impl Into<String>) -> Response {
        Response {
            actions,
            state: Some(state.into()),
        }
    }
}

impl Interaction {
    /// The attribute `name`, if set.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}
