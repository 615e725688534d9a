//! Plugboard's email channel: a thin driver between SMTP and the
//! application core's conversations ([`plugboard_engine::messaging`]).
//!
//! - **In**: an SMTP server ([`server::serve`], the binary's `--smtp`):
//!   EHLO with PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES and, with a
//!   certificate, STARTTLS. `550` for a recipient that is no tenant's
//!   email address, `552` over the size limit, and `250` only once the
//!   message is durable. The SMTP commands and DATA framing are
//!   `smtp-proto`'s (Stalwart's parser); the session around them is
//!   sans-IO ([`smtp::Session`]). MIME is parsed by `mail-parser`
//!   ([`mime`]); replies join their conversation by In-Reply-To and
//!   References. SPF, DKIM and DMARC are checked with `mail-auth`
//!   ([`auth`]); the results go in the message's meta and an
//!   `Authentication-Results` header, and a domain whose DMARC policy
//!   is `reject` has its failing mail refused.
//! - **Out**: replies (the flow's text, agents' and the API's messages)
//!   go through a smart host with lettre ([`outbound::SmartHost`]), from
//!   the engine's durable outbox with retries, threaded on the customer's
//!   messages.

pub mod auth;
pub mod mime;
pub mod outbound;
pub mod server;
pub mod smtp;

pub use auth::{AuthDns, MailAuth};
pub use outbound::SmartHost;
pub use server::{SmtpConfig, SmtpError, serve, tls_config};
