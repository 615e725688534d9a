//! The JSON form of the flow contract (`wit/flow@0.1.0`): events a flow
//! receives and actions it returns. Field names are the WIT names in
//! `snake_case`; the variant is in `"type"`.

use crate::Channel;
use serde::{Deserialize, Serialize};

/// Text to speak or send (WIT `say`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Say {
    /// Text or SSML.
    pub text: String,
    /// Voice name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voice: Option<String>,
    /// Language tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

/// An event on an interaction (WIT `event`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The interaction began.
    Started,
    /// Digits entered.
    Digits {
        /// The digits, without terminator.
        digits: String,
        /// Whether the terminator ended input.
        #[serde(default)]
        terminated: bool,
    },
    /// Recognised speech.
    Speech {
        /// The transcript.
        text: String,
    },
    /// A text message from the customer.
    Message {
        /// Text.
        text: String,
        /// Email subject.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        /// Attachment names.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        attachments: Vec<String>,
    },
    /// No input before the deadline.
    Timeout,
    /// Queue position changed.
    QueueUpdate {
        /// Queue name.
        queue: String,
        /// 1-based position.
        position: u32,
        /// Estimated wait, seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        estimated_wait_secs: Option<u32>,
        /// Waited so far, seconds.
        #[serde(default)]
        waited_secs: u32,
    },
    /// An agent was connected.
    AgentConnected {
        /// Agent id.
        agent: String,
    },
    /// A recording finished.
    Recorded {
        /// Recording id.
        id: String,
        /// Duration, ms.
        duration_ms: u32,
    },
    /// A dial or transfer ended.
    DialResult {
        /// `answered`, `busy`, `no-answer` or `failed`.
        outcome: String,
    },
    /// The customer left.
    Hangup,
}

/// An action a flow asks for (WIT `action`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Speak or send text.
    Say {
        /// Text or SSML.
        text: String,
        /// Voice name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voice: Option<String>,
        /// Language tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        language: Option<String>,
    },
    /// Play audio.
    Play {
        /// URL or stored prompt name.
        url: String,
    },
    /// Collect input.
    Gather {
        /// Prompt.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompt: Option<Say>,
        /// Maximum digits.
        max_digits: u32,
        /// Terminator key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        terminator: Option<String>,
        /// First-digit timeout, ms.
        timeout_ms: u32,
        /// Inter-digit timeout, ms.
        inter_digit_timeout_ms: u32,
        /// Accept speech.
        #[serde(default)]
        speech: bool,
    },
    /// Record the customer.
    Record {
        /// Maximum length, s.
        max_secs: u32,
        /// Beep first.
        #[serde(default)]
        beep: bool,
        /// Terminator key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        terminator: Option<String>,
    },
    /// Queue for an agent.
    Enqueue {
        /// Queue name.
        queue: String,
        /// Priority.
        #[serde(default)]
        priority: u32,
        /// Required skills.
        #[serde(default)]
        skills: Vec<String>,
    },
    /// Blind transfer.
    Transfer {
        /// Number, SIP URI or `queue:NAME`.
        target: String,
    },
    /// Call out and bridge.
    Dial {
        /// Number or SIP URI.
        target: String,
        /// Caller id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caller_id: Option<String>,
        /// Ring timeout, s.
        timeout_secs: u32,
    },
    /// End the interaction.
    Hangup,
    /// Reply on the interaction's channel.
    Reply {
        /// Text.
        text: String,
    },
    /// Send a message anywhere.
    Send {
        /// Channel.
        channel: Channel,
        /// Recipient.
        to: String,
        /// Text.
        text: String,
        /// Subject (email).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
    },
    /// Set an attribute.
    SetAttribute {
        /// Name.
        name: String,
        /// Value.
        value: String,
    },
    /// Wait.
    Wait {
        /// Milliseconds.
        ms: u32,
    },
    /// Take the call as a fax (voice): at once, or — with `detect_ms` —
    /// only if a fax machine's calling tone (CNG) is heard within that
    /// time while the flow goes on. The fax is filed under the tenant's
    /// fax address `address` (default: its first), whose flow runs on it.
    /// A Wasm flow (`wit/flow@0.1.0`) asks for it with a `transfer` to a
    /// `fax:` target ([`Action::fax_target`]).
    ReceiveFax {
        /// Listen for CNG this long (ms) while the flow goes on; `None`:
        /// receive at once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detect_ms: Option<u32>,
        /// The tenant's fax address the fax is filed under.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<String>,
    },
    /// Offer a callback.
    OfferCallback {
        /// Queue.
        queue: String,
        /// Number to call back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        number: Option<String>,
    },
}

impl Action {
    /// The `transfer` target that stands for [`Action::ReceiveFax`] in
    /// `wit/flow@0.1.0` (as `queue:NAME` stands for a queue): `fax:`, then
    /// the fax address to file under if any, then `?detect_ms=N` to take
    /// the call only if a fax machine is heard within N ms.
    pub fn fax_target(detect_ms: Option<u32>, address: Option<&str>) -> String {
        let mut t = format!("fax:{}", address.unwrap_or(""));
        if let Some(ms) = detect_ms {
            t.push_str(&format!("?detect_ms={ms}"));
        }
        t
    }

    /// A `transfer` target read as an action: [`Action::ReceiveFax`] for
    /// a `fax:` target, else the transfer itself.
    pub fn transfer(target: String) -> Action {
        let Some(rest) = target.strip_prefix("fax:") else {
            return Action::Transfer { target };
        };
        let (address, query) = rest.split_once('?').unwrap_or((rest, ""));
        let detect_ms = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("detect_ms="))
            .and_then(|v| v.parse().ok());
        Action::ReceiveFax {
            detect_ms,
            address: (!address.is_empty()).then(|| address.to_string()),
        }
    }
}

/// The safe default when a flow fails: apologise, then queue for the
/// tenant's default queue. `reason` goes on the timeline, not to the customer.
pub fn fallback_actions() -> Vec<Action> {
    vec![
        Action::Say {
            text:
                "We are sorry, something went wrong. Please hold while we connect you to an agent."
                    .to_string(),
            voice: None,
            language: None,
        },
        Action::Enqueue {
            queue: "default".to_string(),
            priority: 0,
            skills: Vec::new(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fax_transfer_target_stands_for_receive_fax() {
        for (detect_ms, address) in [(None, None), (Some(8000), Some("15550175"))] {
            let target = Action::fax_target(detect_ms, address);
            assert_eq!(
                Action::transfer(target),
                Action::ReceiveFax {
                    detect_ms,
                    address: address.map(str::to_string)
                }
            );
        }
        assert_eq!(Action::fax_target(Some(5), None), "fax:?detect_ms=5");
        assert_eq!(
            Action::transfer("queue:sales".into()),
            Action::Transfer {
                target: "queue:sales".into()
            }
        );
    }

    #[test]
    fn json_roundtrip() {
        let e: Event =
            serde_json::from_str(r#"{"type":"digits","digits":"12"}"#).unwrap_or(Event::Timeout);
        assert_eq!(
            e,
            Event::Digits {
                digits: "12".into(),
                terminated: false
            }
        );
        assert!(serde_json::from_str::<Event>(r#"{"type":"bogus"}"#).is_err());
        let a = Action::Enqueue {
            queue: "sales".into(),
            priority: 1,
            skills: vec!["en".into()],
        };
        let text = serde_json::to_string(&a).unwrap_or_default();
        assert_eq!(
            text,
            r#"{"type":"enqueue","queue":"sales","priority":1,"skills":["en"]}"#
        );
    }
}
