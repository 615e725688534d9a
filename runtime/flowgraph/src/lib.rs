//! Declarative flows for business users.
//!
//! A flow document is JSON (schema: `plugins/flow-graph/flow.schema.json`):
//! a start node and named nodes — say, play, menu, gather, http, set,
//! condition, language, enqueue, transfer, record, send, hangup — joined by
//! edges named for their outcome (`next`, `match`, `no_input`, `no_match`,
//! `error`, `timeout`, `then`/`else`). Text fields are templates: `{{caller}}`,
//! `{{order.status}}`, `{{config.mis_url}}`, `{{attr.NAME}}`.
//!
//! [`parse`] validates a document at deploy (the server refuses a bad one,
//! naming the node); [`handle`] runs one event of it and is what the
//! `flow-graph` plugin executes inside the sandbox. No existing crate runs
//! this kind of IVR graph, so the interpreter is our own.

mod doc;
mod run;
pub mod time;

pub use doc::{
    Cond, Flow, FlowError, MAX_DOCUMENT_BYTES, MAX_NODES, Node, Parsed, SCHEMA_ID, check_template,
    parse,
};
pub use run::{
    FlowHost, HttpFailure, HttpRequest, HttpResponse, Input, MAX_STEPS, RunError, Step, handle,
};
