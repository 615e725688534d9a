//! SIP signalling for Plugboard's voice channel.
//!
//! Sans-IO throughout: the parser takes bytes, the transaction layer takes
//! messages and `now` and gives back messages to send, timers and events;
//! the server's tokio driver owns the sockets.
//!
//! * [`parse_datagram`] and [`StreamFramer`] turn UDP datagrams and TCP
//!   streams into [`Message`]s; [`Request::to_bytes`] prints them.
//! * [`check_request`] is what a user agent server checks before acting on
//!   a request (RFC 3261 §8.2), giving the right 4xx/5xx otherwise.
//! * [`Transactions`] is the RFC 3261 §17 transaction layer (timers A–M,
//!   retransmission over UDP, CANCEL matching).
//! * Typed values for the headers the stack relies on live in [`headers`]
//!   and [`Uri`].
//!
//! Why not `rsip` for parsing: run over the 49 RFC 4475 torture messages,
//! rsip 0.4 rejects valid ones (wsinv, intmeth, esc01, esc02, longreq,
//! semiuri), refuses any extension method (so a 501 cannot even be sent),
//! and accepts invalid ones (negative Content-Length, unbalanced quotes,
//! CSeq/method mismatch). ezk-sip-types 0.6 does better but still passes
//! unbalanced quotes and whitespace in the Request-URI, matches methods by
//! prefix and case-insensitively (`INVITEX` is INVITE), and cannot represent
//! a non-SIP Request-URI, so it could not answer 416. The parser here is small, liberal where RFC 4475
//! asks for it, and keeps header values as text, parsing only the headers a
//! layer needs, when it needs them.

pub mod digest;
pub mod headers;
mod message;
mod parse;
pub mod throttle;
pub mod transaction;
mod uas;
mod uri;

pub use headers::{CSeq, HeaderError, NameAddr, Via};
pub use message::{
    Header, Headers, Message, Method, Request, Response, canonical_name, reason_phrase, split_list,
};
pub use parse::{Framed, MAX_MESSAGE_BYTES, ParseError, StreamFramer, is_token, parse_datagram};
pub use transaction::{
    ClientTxId, Peer, ServerTxId, TimerConfig, Transactions, Transmit, Transport, TxEvent,
};
pub use uas::{
    Inbound, RandomError, Rejection, RequestInfo, UasPolicy, check_request, new_branch,
    random_token, reply, screen, seed_random,
};
pub use uri::{Uri, UriError, scheme_of, unescape};
