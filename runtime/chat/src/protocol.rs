//! The widget's protocol: JSON text frames over one WebSocket.
//!
//! The widget opens `GET /chat/{address}/ws` and sends `hello` first:
//!
//! | from the widget | meaning |
//! |---|---|
//! | `{"type":"hello","token":T?,"user":{"id","hash"}?,"name":N?}` | who it is: the token it was given, or a user the site signed |
//! | `{"type":"message","client_id":C,"text":X,"files":[{"name","type","data"}]?}` | a message (`data` base64); `C` makes a retry the same message |
//! | `{"type":"typing","on":true}` | the visitor is typing |
//! | `{"type":"seen","ids":[…],"status":"delivered"\|"read"}` | receipts for messages it got |
//! | `{"type":"ping"}` | keep-alive |
//!
//! | from the server | meaning |
//! |---|---|
//! | `welcome` | its visitor id, the token to keep (anonymous), its limits |
//! | `history` | the messages of its newest conversation |
//! | `ack` | a message is stored (durable); `duplicate` for a retry |
//! | `message` | a message to it (flow, agent) or one it sent from another tab |
//! | `status` | a message's status changed (an agent read it) |
//! | `typing` | an agent is typing |
//! | `closed` | the conversation ended (the next message starts a new one) |
//! | `error` | what went wrong (`code`), with `client_id` for a message and `retry_after_ms` when rate-limited |
//! | `pong` | the answer to `ping` |

use plugboard_core::{Author, Direction, Message, MessageStatus};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A frame from the widget.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Who the visitor is.
    Hello {
        /// The token the server gave this browser before.
        #[serde(default)]
        token: Option<String>,
        /// A user the tenant's site vouches for.
        #[serde(default)]
        user: Option<SignedUser>,
        /// A display name the visitor gave.
        #[serde(default)]
        name: Option<String>,
    },
    /// A message.
    Message {
        /// The widget's id for it (retries reuse it).
        client_id: String,
        /// Text.
        #[serde(default)]
        text: String,
        /// Files, inline.
        #[serde(default)]
        files: Vec<InlineFile>,
    },
    /// Typing started or stopped.
    Typing {
        /// Started (true) or stopped.
        #[serde(default)]
        on: bool,
    },
    /// Receipts.
    Seen {
        /// Message ids.
        ids: Vec<String>,
        /// `delivered` or `read`.
        status: MessageStatus,
    },
    /// Keep-alive.
    Ping,
}

/// A user id signed by the tenant's site.
#[derive(Debug, Deserialize)]
pub struct SignedUser {
    /// The site's id for the user.
    pub id: String,
    /// Hex HMAC-SHA256 of `id` under the widget's identity secret.
    pub hash: String,
}

/// A file sent inline.
#[derive(Debug, Deserialize)]
pub struct InlineFile {
    /// File name.
    pub name: String,
    /// MIME type.
    #[serde(default, rename = "type")]
    pub content_type: String,
    /// The bytes, base64.
    pub data: String,
}

/// Who wrote a message, as the visitor sees it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The visitor.
    Visitor,
    /// An agent.
    Agent,
    /// The tenant's flow (a bot).
    Bot,
    /// The platform.
    System,
}

/// A message as the visitor's widget sees it (no internal addresses,
/// agent ids or blob names).
pub fn visitor_view(m: &Message) -> Value {
    let side = match (&m.direction, &m.author) {
        (Direction::Inbound, Author::Customer) => Side::Visitor,
        (_, Author::Agent { .. }) => Side::Agent,
        (_, Author::Flow) | (_, Author::Api) => Side::Bot,
        _ => Side::System,
    };
    let files: Vec<Value> = m
        .attachments
        .iter()
        .map(|a| json!({"name": a.name, "type": a.content_type, "size": a.size}))
        .collect();
    json!({
        "id": m.id,
        "conversation": m.interaction,
        "client_id": m.client_id,
        "from": side,
        "text": m.text,
        "files": files,
        "status": m.status,
        "at_ms": m.created_ms,
    })
}

/// An `error` frame.
pub fn error(code: &str, message: &str, client_id: Option<&str>) -> Value {
    json!({"type": "error", "code": code, "message": message, "client_id": client_id})
}
