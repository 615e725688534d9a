//! The server side of one SMTP session, sans-IO: bytes in, replies and
//! decisions out. Commands and DATA framing (dot-unstuffing, the end
//! marker) are `smtp-proto`'s; this is the state machine around them
//! (RFC 5321, with PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES and
//! STARTTLS).
//!
//! Two answers need the outside world: whether a recipient is one of
//! ours ([`Output::Recipient`]), and whether a message is stored
//! ([`Output::Message`]). The session stops taking input until the
//! driver answers ([`Session::recipient`], [`Session::delivered`]), so a
//! pipelined client's commands are answered in order.

use std::collections::VecDeque;

use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver, RequestReceiver};
use smtp_proto::{EhloResponse, Error as ProtoError, Request};

/// What a session is allowed.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The name the server gives in its greeting and EHLO.
    pub hostname: String,
    /// Largest message in bytes (SIZE).
    pub max_size: usize,
    /// Recipients per message.
    pub max_recipients: usize,
    /// Refused commands before the session is closed.
    pub max_errors: u32,
    /// Whether STARTTLS is offered (a certificate is configured).
    pub tls: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            hostname: "localhost".into(),
            max_size: 25 * 1024 * 1024,
            max_recipients: 50,
            max_errors: 10,
            tls: false,
        }
    }
}

/// A complete message as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The name the client gave in EHLO or HELO.
    pub helo: String,
    /// MAIL FROM (empty for a bounce).
    pub from: String,
    /// The accepted RCPT TO addresses.
    pub recipients: Vec<String>,
    /// The message, dot-unstuffed, without the end marker.
    pub data: Vec<u8>,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write these bytes to the client.
    Send(Vec<u8>),
    /// Is this recipient ours? Answer with [`Session::recipient`].
    Recipient(String),
    /// Store this message. Answer with [`Session::delivered`].
    Message(Envelope),
    /// Start TLS on the connection now (the `220` went out before), then
    /// call [`Session::tls_started`].
    StartTls,
    /// Close the connection (after writing what was sent).
    Close,
}

/// How a recipient or a message fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted (for a message: durable; the text goes in the reply, e.g.
    /// the id it was stored under).
    Accept(String),
    /// Refused for good: `550` unknown recipient, `554` refused message.
    Refuse(u16, String),
    /// Refused by policy (`550 5.7.1`): the sender's domain disowns it.
    Denied(String),
    /// Refused for now: the client should try again later (`451`, `452`).
    Later(u16, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before EHLO/HELO.
    Connected,
    /// Greeted, no transaction.
    Ready,
    /// MAIL FROM accepted.
    Mail,
    /// Reading DATA.
    Data,
    /// Waiting for the driver's answer on a recipient.
    AwaitRecipient,
    /// Waiting for the driver's answer on a message.
    AwaitMessage,
    /// Closed.
    Closed,
}

/// One SMTP session.
pub struct Session {
    limits: Limits,
    phase: Phase,
    input: Vec<u8>,
    requests: RequestReceiver,
    data: Option<DataReceiver>,
    /// Set when a message outgrew the limit: the rest is read and dropped.
    discard: Option<DummyDataReceiver>,
    body: Vec<u8>,
    helo: String,
    from: String,
    recipients: Vec<String>,
    tls_active: bool,
    /// Set by STARTTLS: what was pipelined after it is dropped.
    drop_rest: bool,
    errors: u32,
    out: VecDeque<Output>,
}

fn reply(code: u16, enhanced: &str, text: &str) -> Output {
    let text = text.replace(['\r', '\n'], " ");
    if enhanced.is_empty() {
        Output::Send(format!("{code} {text}\r\n").into_bytes())
    } else {
        Output::Send(format!("{code} {enhanced} {text}\r\n").into_bytes())
    }
}

impl Session {
    /// A new session; its first output is the greeting.
    pub fn new(limits: Limits) -> Session {
        let mut s = Session {
            phase: Phase::Connected,
            input: Vec::new(),
            requests: RequestReceiver::default(),
            data: None,
            discard: None,
            body: Vec::new(),
            helo: String::new(),
            from: String::new(),
            recipients: Vec::new(),
            tls_active: false,
            drop_rest: false,
            errors: 0,
            out: VecDeque::new(),
            limits,
        };
        let greeting = format!("{} ESMTP Plugboard", s.limits.hostname);
        s.out.push_back(reply(220, "", &greeting));
        s
    }

    /// A session refused at once (too many connections): `421` and close.
    pub fn refuse(limits: Limits, why: &str) -> Session {
        let mut s = Session::new(limits);
        s.out.clear();
        s.out.push_back(reply(421, "4.7.0", why));
        s.out.push_back(Output::Close);
        s.phase = Phase::Closed;
        s
    }

    /// Whether TLS is on.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Bytes from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.phase != Phase::Closed {
            self.input.extend_from_slice(bytes);
        }
    }

    /// The next thing to do, or `None` until more bytes come (or the
    /// driver answers a question).
    pub fn poll(&mut self) -> Option<Output> {
        loop {
            if let Some(o) = self.out.pop_front() {
                return Some(o);
            }
            if self.input.is_empty()
                || matches!(
                    self.phase,
                    Phase::AwaitRecipient | Phase::AwaitMessage | Phase::Closed
                )
            {
                return None;
            }
            if !self.step() {
                return self.out.pop_front();
            }
        }
    }

    /// The driver's answer on the recipient it was asked about.
    pub fn recipient(&mut self, address: String, verdict: Verdict) {
        if self.phase != Phase::AwaitRecipient {
            return;
        }
        self.phase = Phase::Mail;
        match verdict {
            Verdict::Accept(_) => {
                self.recipients.push(address);
                self.out.push_back(reply(250, "2.1.5", "recipient ok"));
            }
            Verdict::Refuse(code, why) => self.out.push_back(reply(code, "5.1.1", &why)),
            Verdict::Denied(why) => self.out.push_back(reply(550, "5.7.1", &why)),
            Verdict::Later(code, why) => self.out.push_back(reply(code, "4.3.0", &why)),
        }
    }

    /// The driver's answer on the message: `250` only once it is durable.
    pub fn delivered(&mut self, verdict: Verdict) {
        if self.phase != Phase::AwaitMessage {
            return;
        }
        self.reset_transaction();
        self.phase = Phase::Ready;
        match verdict {
            Verdict::Accept(id) => {
                self.out
                    .push_back(reply(250, "2.0.0", &format!("queued as {id}")))
            }
            Verdict::Refuse(code, why) => self.out.push_back(reply(code, "5.6.0", &why)),
            Verdict::Denied(why) => self.out.push_back(reply(550, "5.7.1", &why)),
            Verdict::Later(code, why) => self.out.push_back(reply(code, "4.3.0", &why)),
        }
    }

    /// TLS is up: the session starts over (RFC 3207: the client greets
    /// again, and nothing said before counts).
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.phase = Phase::Connected;
        self.reset_transaction();
        self.input.clear();
        self.requests = RequestReceiver::default();
    }

    /// The connection was idle too long: `421` and close.
    pub fn timed_out(&mut self) {
        self.out
            .push_back(reply(421, "4.4.2", "idle too long, closing"));
        self.out.push_back(Output::Close);
        self.phase = Phase::Closed;
    }

    /// `552`: the message is over the size limit.
    fn too_big(&mut self) {
        let why = format!(
            "message exceeds the fixed maximum size of {} bytes",
            self.limits.max_size
        );
        self.out.push_back(reply(552, "5.3.4", &why));
    }

    fn reset_transaction(&mut self) {
        self.from.clear();
        self.recipients.clear();
        self.body = Vec::new();
        self.data = None;
        self.discard = None;
    }

    /// Handles what the input holds up to the next decision; false when
    /// more input is needed.
    fn step(&mut self) -> bool {
        let input = std::mem::take(&mut self.input);
        let mut it = input.iter();
        let progressed = if self.phase == Phase::Data {
            self.step_data(&mut it)
        } else {
            self.step_command(&mut it)
        };
        if std::mem::take(&mut self.drop_rest) || self.phase == Phase::Closed {
            self.input.clear();
        } else {
            self.input = it.as_slice().to_vec();
        }
        progressed
    }

    fn step_data(&mut self, it: &mut std::slice::Iter<'_, u8>) -> bool {
        if let Some(d) = &mut self.discard {
            if d.ingest(it) {
                self.reset_transaction();
                self.phase = Phase::Ready;
                self.too_big();
                return true;
            }
            return false;
        }
        let Some(data) = &mut self.data else {
            self.phase = Phase::Ready;
            return true;
        };
        let done = data.ingest(it, &mut self.body);
        if done {
            self.data = None;
            if self.body.len() > self.limits.max_size {
                self.reset_transaction();
                self.phase = Phase::Ready;
                self.too_big();
                return true;
            }
            self.phase = Phase::AwaitMessage;
            self.out.push_back(Output::Message(Envelope {
                helo: self.helo.clone(),
                from: self.from.clone(),
                recipients: self.recipients.clone(),
                data: std::mem::take(&mut self.body),
            }));
            return true;
        }
        if self.body.len() > self.limits.max_size {
            // Too big: keep reading to the end marker, but drop it.
            if let Some(data) = self.data.take() {
                self.discard = Some(DummyDataReceiver::new_data(&data));
            }
            self.body = Vec::new();
        }
        false
    }

    fn step_command(&mut self, it: &mut std::slice::Iter<'_, u8>) -> bool {
        let request = match self.requests.ingest(it) {
            Ok(r) => r.into_owned(),
            Err(ProtoError::NeedsMoreData { .. }) => return false,
            Err(e) => {
                let (code, enh, text) = match e {
                    ProtoError::UnknownCommand => (500, "5.5.1", "command not recognised".into()),
                    ProtoError::ResponseTooLong => (500, "5.5.2", "line too long".into()),
                    ProtoError::InvalidSenderAddress => (501, "5.1.7", "bad sender address".into()),
                    ProtoError::InvalidRecipientAddress => {
                        (501, "5.1.3", "bad recipient address".into())
                    }
                    ProtoError::SyntaxError { syntax } => {
                        (501, "5.5.4", format!("syntax: {syntax}"))
                    }
                    ProtoError::InvalidParameter { param } => {
                        (501, "5.5.4", format!("invalid parameter {param}"))
                    }
                    ProtoError::UnsupportedParameter { param } => {
                        (504, "5.5.4", format!("unsupported parameter {param}"))
                    }
                    _ => (500, "5.5.2", "syntax error".into()),
                };
                self.error(code, enh, &text);
                return true;
            }
        };
        self.command(request);
        true
    }

    fn error(&mut self, code: u16, enhanced: &str, text: &str) {
        self.errors += 1;
        if self.errors >= self.limits.max_errors {
            self.out
                .push_back(reply(421, "4.7.0", "too many errors, closing"));
            self.out.push_back(Output::Close);
            self.phase = Phase::Closed;
            return;
        }
        self.out.push_back(reply(code, enhanced, text));
    }

    fn command(&mut self, request: Request<String>) {
        let greeted = self.phase != Phase::Connected;
        match request {
            Request::Ehlo { host } => {
                self.reset_transaction();
                self.helo = host;
                self.phase = Phase::Ready;
                let mut r = EhloResponse::new(self.limits.hostname.as_str());
                r.capabilities = smtp_proto::EXT_PIPELINING
                    | smtp_proto::EXT_SIZE
                    | smtp_proto::EXT_8BIT_MIME
                    | smtp_proto::EXT_ENHANCED_STATUS_CODES;
                if self.limits.tls && !self.tls_active {
                    r.capabilities |= smtp_proto::EXT_START_TLS;
                }
                r.size = self.limits.max_size;
                let mut bytes = Vec::new();
                if r.write(&mut bytes).is_ok() {
                    self.out.push_back(Output::Send(bytes));
                }
            }
            Request::Helo { host } | Request::Lhlo { host } => {
                self.reset_transaction();
                self.helo = host;
                self.phase = Phase::Ready;
                let hello = self.limits.hostname.clone();
                self.out.push_back(reply(250, "", &hello));
            }
            Request::Mail { from } => {
                if !greeted {
                    return self.error(503, "5.5.1", "say EHLO first");
                }
                if self.phase != Phase::Ready {
                    return self.error(503, "5.5.1", "a transaction is already open");
                }
                if from.size > self.limits.max_size {
                    return self.too_big();
                }
                self.from = from.address;
                self.phase = Phase::Mail;
                self.out.push_back(reply(250, "2.1.0", "sender ok"));
            }
            Request::Rcpt { to } => {
                if self.phase != Phase::Mail {
                    return self.error(503, "5.5.1", "MAIL first");
                }
                if self.recipients.len() >= self.limits.max_recipients {
                    return self
                        .out
                        .push_back(reply(452, "4.5.3", "too many recipients"));
                }
                self.phase = Phase::AwaitRecipient;
                self.out.push_back(Output::Recipient(to.address));
            }
            Request::Data => {
                if self.phase != Phase::Mail {
                    return self.error(503, "5.5.1", "MAIL first");
                }
                if self.recipients.is_empty() {
                    return self.error(554, "5.5.1", "no valid recipients");
                }
                self.phase = Phase::Data;
                self.data = Some(DataReceiver::new());
                self.body = Vec::new();
                self.out
                    .push_back(reply(354, "", "start mail input; end with <CRLF>.<CRLF>"));
            }
            Request::Bdat { .. } => self.error(502, "5.5.1", "BDAT is not offered"),
            Request::Rset => {
                self.reset_transaction();
                if greeted {
                    self.phase = Phase::Ready;
                }
                self.out.push_back(reply(250, "2.0.0", "reset"));
            }
            Request::Noop { .. } => self.out.push_back(reply(250, "2.0.0", "ok")),
            Request::Quit => {
                self.out.push_back(reply(221, "2.0.0", "bye"));
                self.out.push_back(Output::Close);
                self.phase = Phase::Closed;
            }
            Request::Vrfy { .. } => {
                self.out
                    .push_back(reply(252, "2.5.2", "cannot verify, but will try"));
            }
            Request::Help { .. } => self.out.push_back(reply(214, "2.0.0", "see RFC 5321")),
            Request::StartTls => {
                if !self.limits.tls || self.tls_active {
                    return self.error(502, "5.5.1", "STARTTLS is not offered");
                }
                if self.phase != Phase::Ready {
                    return self.error(503, "5.5.1", "EHLO first, no transaction open");
                }
                self.out
                    .push_back(reply(220, "2.0.0", "ready to start TLS"));
                self.out.push_back(Output::StartTls);
                // Nothing pipelined after STARTTLS is read (RFC 3207 §4.2,
                // and the plaintext injection attacks on it).
                self.drop_rest = true;
                self.phase = Phase::Connected;
            }
            Request::Auth { .. } => self.error(502, "5.5.1", "AUTH is not offered here"),
            _ => self.error(502, "5.5.1", "command not implemented"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(s: &mut Session) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(o) = s.poll() {
            v.push(match o {
                Output::Send(b) => String::from_utf8_lossy(&b).trim_end().to_string(),
                Output::Recipient(a) => format!("?rcpt {a}"),
                Output::Message(e) => format!("?msg {} bytes", e.data.len()),
                Output::StartTls => "!tls".into(),
                Output::Close => "!close".into(),
            });
        }
        v
    }

    fn limits() -> Limits {
        Limits {
            hostname: "mx.test".into(),
            max_size: 100,
            tls: true,
            ..Limits::default()
        }
    }

    #[test]
    fn a_pipelined_transaction_is_answered_in_order() {
        let mut s = Session::new(limits());
        assert_eq!(texts(&mut s), ["220 mx.test ESMTP Plugboard"]);
        s.feed(b"EHLO c\r\n");
        let ehlo = texts(&mut s).join("\n");
        for cap in [
            "PIPELINING",
            "SIZE 100",
            "8BITMIME",
            "STARTTLS",
            "ENHANCEDSTATUSCODES",
        ] {
            assert!(ehlo.contains(cap), "{ehlo}");
        }
        s.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<nobody@y>\r\nDATA\r\nSubject: hi\r\n\r\n..dot\r\n.\r\n");
        assert_eq!(texts(&mut s), ["250 2.1.0 sender ok", "?rcpt b@y"]);
        s.recipient("b@y".into(), Verdict::Accept(String::new()));
        assert_eq!(texts(&mut s), ["250 2.1.5 recipient ok", "?rcpt nobody@y"]);
        s.recipient(
            "nobody@y".into(),
            Verdict::Refuse(550, "no such mailbox".into()),
        );
        let t = texts(&mut s);
        assert_eq!(t[0], "550 5.1.1 no such mailbox");
        assert!(t[1].starts_with("354 "), "{t:?}");
        assert_eq!(t[2], "?msg 21 bytes");
        s.delivered(Verdict::Accept("m1".into()));
        assert_eq!(texts(&mut s), ["250 2.0.0 queued as m1"]);
        s.feed(b"QUIT\r\n");
        assert_eq!(texts(&mut s), ["221 2.0.0 bye", "!close"]);
    }

    #[test]
    fn the_message_is_unstuffed_and_only_recipients_accepted_count() {
        let mut s = Session::new(limits());
        texts(&mut s);
        s.feed(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@y>\r\n");
        texts(&mut s);
        s.recipient("b@y".into(), Verdict::Accept(String::new()));
        s.feed(b"DATA\r\n");
        texts(&mut s);
        // The end marker split across reads.
        s.feed(b"line\r\n..x\r\n.");
        assert!(texts(&mut s).is_empty());
        s.feed(b"\r\n");
        let mut got = None;
        while let Some(o) = s.poll() {
            if let Output::Message(e) = o {
                got = Some(e);
            }
        }
        let e = got.unwrap_or_else(|| panic!("no message"));
        assert_eq!(e.helo, "c");
        assert_eq!(e.from, "");
        assert_eq!(e.recipients, ["b@y"]);
        assert_eq!(e.data, b"line\r\n.x\r\n");
    }

    #[test]
    fn too_big_is_552_and_the_session_goes_on() {
        let mut s = Session::new(limits());
        texts(&mut s);
        s.feed(b"EHLO c\r\nMAIL FROM:<a@x> SIZE=1000\r\n");
        let t = texts(&mut s);
        assert!(
            t.last().is_some_and(|l| l.starts_with("552 5.3.4")),
            "{t:?}"
        );
        s.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n");
        texts(&mut s);
        s.recipient("b@y".into(), Verdict::Accept(String::new()));
        s.feed(b"DATA\r\n");
        texts(&mut s);
        for _ in 0..10 {
            s.feed(&[b'x'; 50]);
            s.feed(b"\r\n");
        }
        s.feed(b".\r\nNOOP\r\n");
        let t = texts(&mut s);
        assert!(t[0].starts_with("552 5.3.4"), "{t:?}");
        assert_eq!(t[1], "250 2.0.0 ok");
    }

    #[test]
    fn out_of_order_and_unknown_commands_are_refused_then_the_session_closes() {
        let mut s = Session::new(limits());
        texts(&mut s);
        s.feed(b"MAIL FROM:<a@x>\r\n");
        assert_eq!(texts(&mut s), ["503 5.5.1 say EHLO first"]);
        s.feed(b"EHLO c\r\nDATA\r\nRCPT TO:<b@y>\r\nFOO\r\n");
        let t = texts(&mut s);
        assert!(t[1..].iter().all(|l| l.starts_with('5')), "{t:?}");
        for _ in 0..10 {
            s.feed(b"BOGUS\r\n");
        }
        let t = texts(&mut s);
        assert_eq!(
            t[t.len() - 2..],
            ["421 4.7.0 too many errors, closing", "!close"]
        );
    }

    #[test]
    fn starttls_drops_what_was_pipelined_after_it_and_starts_over() {
        let mut s = Session::new(limits());
        texts(&mut s);
        s.feed(b"EHLO c\r\n");
        texts(&mut s);
        s.feed(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n");
        assert_eq!(texts(&mut s), ["220 2.0.0 ready to start TLS", "!tls"]);
        s.tls_started();
        s.feed(b"MAIL FROM:<a@x>\r\n");
        assert_eq!(texts(&mut s), ["503 5.5.1 say EHLO first"]);
        s.feed(b"EHLO c\r\n");
        assert!(!texts(&mut s).join("\n").contains("STARTTLS"));
    }
}
