//! Framing and tokenising: bytes to [`Message`], for datagrams (UDP) and
//! streams (TCP).
//!
//! The parser is liberal where RFC 3261 and RFC 4475 ask for it (folded
//! lines, whitespace around colons, compact names, extension methods, runs
//! of spaces in the start line, CRLF keep-alives) and strict where a message
//! would be ambiguous (bad or repeated Content-Length, a body shorter than
//! announced, a start line with the wrong number of parts).

use crate::message::{Headers, Message, Method, Request, Response};

/// The largest message we accept, on any transport.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Why bytes could not be read as a SIP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ParseError {
    /// What is wrong, fit for the reason phrase of a 400.
    pub reason: String,
    /// The message as far as it could be read (start line and headers,
    /// without a trustworthy body), so that a request can still be answered
    /// with 400. `None` when even that failed.
    pub partial: Option<Box<Message>>,
}

impl ParseError {
    fn new(reason: impl Into<String>) -> ParseError {
        ParseError {
            reason: reason.into(),
            partial: None,
        }
    }

    fn with(reason: impl Into<String>, partial: Message) -> ParseError {
        ParseError {
            reason: reason.into(),
            partial: Some(Box::new(partial)),
        }
    }
}

/// True for characters of the RFC 3261 `token` rule.
pub fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-.!%*_+`'~".contains(c)
}

/// True if `s` is a non-empty RFC 3261 `token`.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_token_char)
}

fn skip_crlf(buf: &[u8]) -> &[u8] {
    let n = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buf.len());
    &buf[n..]
}

/// Where the head ends: (end of the head text, start of the body).
fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) if b < a => Some((b, b + 2)),
        (Some(a), _) => Some((a, a + 4)),
        (None, Some(b)) => Some((b, b + 2)),
        (None, None) => None,
    }
}

fn parse_start_line(line: &str) -> Result<Message, ParseError> {
    if line.starts_with("SIP/") {
        let mut parts = line.splitn(3, ' ');
        let _version = parts.next();
        let code = parts.next().unwrap_or("");
        let reason = parts.next().unwrap_or("").trim();
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError::new("status code is not three digits"));
        }
        let status: u16 = code
            .parse()
            .map_err(|_| ParseError::new("bad status code"))?;
        if !(100..=699).contains(&status) {
            return Err(ParseError::new("status code out of range"));
        }
        return Ok(Message::Response(Response::new(status, reason)));
    }
    let parts: Vec<&str> = line.split_ascii_whitespace().collect();
    let [method, uri, version] = parts.as_slice() else {
        return Err(ParseError::new(
            "request line must be: method, Request-URI, version (no whitespace in the URI)",
        ));
    };
    if !is_token(method) {
        return Err(ParseError::new("method is not a token"));
    }
    if !version.starts_with("SIP/") {
        return Err(ParseError::new(
            "request line does not end with a SIP version",
        ));
    }
    let mut req = Request::new(Method::from_token(method), *uri);
    req.version = (*version).to_string();
    Ok(Message::Request(req))
}

/// Parses a head (start line and header lines, no blank line) into a
/// message without body.
fn parse_head(head: &str) -> Result<Message, ParseError> {
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let start = lines.next().unwrap_or("");
    let mut bad: Option<String> = None;
    let mut msg = match parse_start_line(start) {
        Ok(msg) => msg,
        Err(e) => {
            // A request line that is only wrong in the middle (whitespace
            // in the Request-URI, or no Request-URI) still names a method:
            // read the headers so the request can be answered with 400.
            let words: Vec<&str> = start.split_ascii_whitespace().collect();
            match words.as_slice() {
                [method, uri @ .., version] if is_token(method) && version.starts_with("SIP/") => {
                    bad = Some(e.reason);
                    Message::Request(Request::new(Method::from_token(method), uri.join(" ")))
                }
                _ => return Err(e),
            }
        }
    };
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            match fields.last_mut() {
                Some((_, value)) => {
                    let more = line.trim();
                    if !more.is_empty() {
                        if !value.is_empty() {
                            value.push(' ');
                        }
                        value.push_str(more);
                    }
                }
                None => bad = bad.or(Some("continuation line before any header".into())),
            }
            continue;
        }
        match line.split_once(':') {
            Some((name, value)) => {
                let name = name.trim_end_matches([' ', '\t']);
                if !is_token(name) {
                    bad = bad.or(Some(format!("header name {name:?} is not a token")));
                    continue;
                }
                fields.push((name.to_string(), value.trim().to_string()));
            }
            None if line.is_empty() => {}
            None => bad = bad.or(Some("header line without a colon".into())),
        }
    }
    let headers = match &mut msg {
        Message::Request(r) => &mut r.headers,
        Message::Response(r) => &mut r.headers,
    };
    for (name, value) in fields {
        headers.push(&name, value);
    }
    match bad {
        Some(reason) => Err(ParseError::with(reason, msg)),
        None => Ok(msg),
    }
}

/// The Content-Length, if there is exactly one well-formed one.
fn content_length(headers: &Headers) -> Result<Option<usize>, String> {
    let mut values = headers.all("Content-Length");
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("more than one Content-Length".into());
    }
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("Content-Length {first:?} is not a number"));
    }
    match first.parse::<usize>() {
        Ok(n) if n <= MAX_MESSAGE_BYTES => Ok(Some(n)),
        _ => Err("Content-Length too large".into()),
    }
}

fn set_body(msg: &mut Message, body: &[u8]) {
    match msg {
        Message::Request(r) => r.body = body.to_vec(),
        Message::Response(r) => r.body = body.to_vec(),
    }
}

fn read_head(buf: &[u8]) -> Result<Message, ParseError> {
    let head = std::str::from_utf8(buf).map_err(|_| ParseError::new("headers are not UTF-8"))?;
    parse_head(head)
}

/// Parses one datagram (UDP). Leading CRLFs are skipped; without a
/// Content-Length the body is the rest of the datagram; bytes after
/// Content-Length are ignored (RFC 3261 §18.3).
pub fn parse_datagram(buf: &[u8]) -> Result<Message, ParseError> {
    if buf.len() > MAX_MESSAGE_BYTES {
        return Err(ParseError::new("message too large"));
    }
    let buf = skip_crlf(buf);
    if buf.is_empty() {
        return Err(ParseError::new("empty message"));
    }
    let (head_end, body_start) = find_head_end(buf).unwrap_or((buf.len(), buf.len()));
    let mut msg = read_head(&buf[..head_end])?;
    let rest = &buf[body_start..];
    match content_length(msg.headers()) {
        Err(reason) => Err(ParseError::with(reason, msg)),
        Ok(Some(n)) if n > rest.len() => Err(ParseError::with(
            format!(
                "Content-Length {n} but only {} body bytes arrived",
                rest.len()
            ),
            msg,
        )),
        Ok(Some(n)) => {
            set_body(&mut msg, &rest[..n]);
            Ok(msg)
        }
        Ok(None) => {
            set_body(&mut msg, rest);
            Ok(msg)
        }
    }
}

/// What a stream framer produced.
#[derive(Debug)]
pub enum Framed {
    /// A whole message.
    Message(Message),
    /// A CRLF keep-alive ping (RFC 5626 §4.4.1); answer with a single CRLF.
    KeepAlive,
}

/// Cuts a byte stream (TCP) into messages by Content-Length, which a stream
/// needs (absent counts as 0). After an error the stream cannot be trusted
/// any more: answer if possible and close the connection.
#[derive(Debug, Default)]
pub struct StreamFramer {
    buf: Vec<u8>,
}

impl StreamFramer {
    /// An empty framer.
    pub fn new() -> StreamFramer {
        StreamFramer::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Framed>, ParseError> {
        if self.buf.starts_with(b"\r\n\r\n") {
            self.buf.drain(..4);
            return Ok(Some(Framed::KeepAlive));
        }
        let skipped = self.buf.len() - skip_crlf(&self.buf).len();
        if skipped > 0 && skipped == self.buf.len() {
            // Only line ends so far: wait for a message or a double CRLF.
            if skipped >= 4 {
                self.buf.clear();
                return Ok(Some(Framed::KeepAlive));
            }
            return Ok(None);
        }
        let data = &self.buf[skipped..];
        let Some((head_end, body_start)) = find_head_end(data) else {
            if data.len() > MAX_MESSAGE_BYTES {
                return Err(ParseError::new("message too large"));
            }
            return Ok(None);
        };
        let mut msg = read_head(&data[..head_end])?;
        let len = match content_length(msg.headers()) {
            Err(reason) => return Err(ParseError::with(reason, msg)),
            Ok(n) => n.unwrap_or(0),
        };
        if data.len() < body_start + len {
            if body_start + len > MAX_MESSAGE_BYTES {
                return Err(ParseError::with("message too large", msg));
            }
            return Ok(None);
        }
        set_body(&mut msg, &data[body_start..body_start + len]);
        self.buf.drain(..skipped + body_start + len);
        Ok(Some(Framed::Message(msg)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_framing_splits_and_waits() {
        let one = b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 3\r\n\r\nabc";
        let mut f = StreamFramer::new();
        let mut all = b"\r\n\r\n".to_vec();
        all.extend_from_slice(one);
        all.extend_from_slice(one);
        f.push(&all[..30]);
        assert!(matches!(f.next_message(), Ok(Some(Framed::KeepAlive))));
        assert!(matches!(f.next_message(), Ok(None)));
        f.push(&all[30..]);
        for _ in 0..2 {
            match f.next_message() {
                Ok(Some(Framed::Message(Message::Request(r)))) => assert_eq!(r.body, b"abc"),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(f.next_message(), Ok(None)));
    }

    #[test]
    fn datagram_extension_method_and_folding() {
        let m = parse_datagram(b"FOO sip:x@y SIP/2.0\r\nSubject: a\r\n  b\r\nl: 0\r\n\r\n");
        let Ok(Message::Request(r)) = m else {
            panic!("{m:?}")
        };
        assert_eq!(r.method, Method::Extension("FOO".into()));
        assert_eq!(r.headers.get("subject"), Some("a b"));
        assert_eq!(r.headers.get("Content-Length"), Some("0"));
    }
}
