//! What a user agent server checks before it acts on a request (RFC 3261
//! §8.2), and how it builds a response to a request.

use crate::headers::{CSeq, NameAddr, Via, check_call_id, parse_scalar};
use crate::message::{Method, Request, Response, reason_phrase};
use crate::uri::{Uri, UriError};
use sha2::{Digest, Sha256};

/// What this UAS supports; decides 405/501, 420, 415 and 406.
#[derive(Debug, Clone)]
pub struct UasPolicy {
    /// Methods we implement (sent in `Allow`).
    pub allow: Vec<Method>,
    /// Option tags we support (`Require` beyond these gets 420).
    pub supported: Vec<String>,
    /// Body types we read (other bodies get 415 with `Accept`).
    pub accept: Vec<String>,
}

impl Default for UasPolicy {
    fn default() -> UasPolicy {
        UasPolicy {
            allow: vec![
                Method::Invite,
                Method::Ack,
                Method::Bye,
                Method::Cancel,
                Method::Options,
                Method::Register,
                Method::Info,
                Method::Refer,
            ],
            supported: Vec::new(),
            accept: vec!["application/sdp".into(), "multipart/mixed".into()],
        }
    }
}

impl UasPolicy {
    /// The `Allow` header value.
    pub fn allow_header(&self) -> String {
        self.allow
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The parts of a request every later layer needs, parsed once.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// The Request-URI.
    pub uri: Uri,
    /// Via values, top first.
    pub vias: Vec<Via>,
    /// From.
    pub from: NameAddr,
    /// To.
    pub to: NameAddr,
    /// Call-ID.
    pub call_id: String,
    /// CSeq.
    pub cseq: CSeq,
    /// Max-Forwards, if present.
    pub max_forwards: Option<u8>,
    /// Contact values (empty for none; `*` is kept as a URI of `*`).
    pub contacts: Vec<NameAddr>,
}

/// A request the UAS refuses: status, reason and extra headers for the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// Headers to add (Allow, Unsupported, Accept, …).
    pub headers: Vec<(String, String)>,
}

impl Rejection {
    fn new(status: u16, reason: impl Into<String>) -> Rejection {
        Rejection {
            status,
            reason: reason.into(),
            headers: Vec::new(),
        }
    }

    fn with(mut self, name: &str, value: String) -> Rejection {
        self.headers.push((name.to_string(), value));
        self
    }

    /// The response to `req` carrying this rejection.
    pub fn response(&self, req: &Request, to_tag: Option<&str>) -> Response {
        let mut resp = reply(req, self.status, &self.reason, to_tag);
        for (n, v) in &self.headers {
            resp.headers.push(n, v.clone());
        }
        resp
    }
}

fn bad(reason: impl Into<String>) -> Rejection {
    Rejection::new(400, reason)
}

/// Headers that may appear only once.
const SINGLE: &[&str] = &[
    "To",
    "From",
    "Call-ID",
    "CSeq",
    "Max-Forwards",
    "Content-Type",
    "Content-Length",
];

fn media_type(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Checks a request as a UAS does before acting on it, in the order of
/// RFC 3261 §8.2: version (505), syntax of the headers every layer relies
/// on (400), Request-URI scheme (416), method (405/501), Require (420), body type and encoding (415), Accept (406).
pub fn check_request(req: &Request, policy: &UasPolicy) -> Result<RequestInfo, Rejection> {
    if !req.version.eq_ignore_ascii_case("SIP/2.0") {
        return Err(Rejection::new(505, reason_phrase(505)));
    }
    let h = &req.headers;
    for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
        if h.count(name) == 0 {
            return Err(bad(format!("Missing {name}")));
        }
    }
    for name in SINGLE {
        if h.count(name) > 1 {
            return Err(bad(format!("More than one {name}")));
        }
    }
    let vias = h
        .values("Via")
        .into_iter()
        .map(Via::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let one = |name: &'static str| h.get(name).unwrap_or("");
    let from = NameAddr::parse("From", one("From")).map_err(|e| bad(e.to_string()))?;
    let to = NameAddr::parse("To", one("To")).map_err(|e| bad(e.to_string()))?;
    let call_id = one("Call-ID").to_string();
    check_call_id(&call_id).map_err(|e| bad(e.to_string()))?;
    let cseq = CSeq::parse(one("CSeq")).map_err(|e| bad(e.to_string()))?;
    if cseq.method != req.method {
        return Err(bad("CSeq method does not match the request method"));
    }
    let max_forwards = match h.get("Max-Forwards") {
        Some(v) => {
            Some(parse_scalar("Max-Forwards", v, 255).map_err(|e| bad(e.to_string()))? as u8)
        }
        None => None,
    };
    let mut contacts = Vec::new();
    for value in h.values("Contact") {
        if value == "*" {
            contacts.push(NameAddr {
                display: None,
                uri: "*".into(),
                params: Vec::new(),
            });
            continue;
        }
        contacts.push(NameAddr::parse("Contact", value).map_err(|e| bad(e.to_string()))?);
    }
    for value in h
        .values("Record-Route")
        .into_iter()
        .chain(h.values("Route"))
    {
        NameAddr::parse("Route", value).map_err(|e| bad(e.to_string()))?;
    }
    let uri = match Uri::parse(&req.uri) {
        Ok(uri) => uri,
        Err(UriError::Scheme(_)) if crate::uri::scheme_of(&req.uri).is_some() => {
            return Err(Rejection::new(416, reason_phrase(416)));
        }
        Err(e) => return Err(bad(format!("Request-URI: {e}"))),
    };
    // Max-Forwards 0 is a proxy's business (483); an endpoint processes
    // the request as if it were still positive (RFC 4475 §3.3.11).
    if !policy.allow.contains(&req.method) {
        let status = if matches!(req.method, Method::Extension(_)) {
            501
        } else {
            405
        };
        return Err(
            Rejection::new(status, reason_phrase(status)).with("Allow", policy.allow_header())
        );
    }
    if !matches!(req.method, Method::Ack | Method::Cancel) {
        let unsupported: Vec<&str> = h
            .values("Require")
            .into_iter()
            .filter(|tag| !tag.is_empty())
            .filter(|tag| !policy.supported.iter().any(|s| s.eq_ignore_ascii_case(tag)))
            .collect();
        if !unsupported.is_empty() {
            return Err(
                Rejection::new(420, reason_phrase(420)).with("Unsupported", unsupported.join(", "))
            );
        }
        if !req.body.is_empty() {
            let ct = media_type(h.get("Content-Type").unwrap_or(""));
            if !policy.accept.iter().any(|a| a.eq_ignore_ascii_case(&ct)) {
                return Err(Rejection::new(415, reason_phrase(415))
                    .with("Accept", policy.accept.join(", ")));
            }
            let encodings = h.values("Content-Encoding");
            if encodings
                .iter()
                .any(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"))
            {
                return Err(Rejection::new(415, reason_phrase(415))
                    .with("Accept-Encoding", "identity".into()));
            }
        }
        if req.method == Method::Invite && h.count("Accept") > 0 {
            let takes_sdp = h.values("Accept").iter().any(|a| {
                matches!(
                    media_type(a).as_str(),
                    "application/sdp" | "application/*" | "*/*"
                )
            });
            if !takes_sdp {
                return Err(Rejection::new(406, reason_phrase(406))
                    .with("Accept", "application/sdp".into())
                    .with(
                        "Warning",
                        "399 plugboard \"the answer can only be application/sdp\"".into(),
                    ));
            }
        }
    }
    Ok(RequestInfo {
        uri,
        vias,
        from,
        to,
        call_id,
        cseq,
        max_forwards,
        contacts,
    })
}

/// A response to `req`: Via, From, To, Call-ID and CSeq copied (RFC 3261
/// §8.2.6.2), and `to_tag` added to To when it has none and the status is
/// above 100.
pub fn reply(req: &Request, status: u16, reason: &str, to_tag: Option<&str>) -> Response {
    let mut resp = Response::new(status, reason);
    for via in req.headers.all("Via") {
        resp.headers.push("Via", via);
    }
    if let Some(from) = req.headers.get("From") {
        resp.headers.push("From", from);
    }
    if let Some(to) = req.headers.get("To") {
        let has_tag = NameAddr::parse("To", to)
            .map(|n| n.tag().is_some())
            .unwrap_or(true);
        match to_tag {
            Some(tag) if status > 100 && !has_tag => {
                resp.headers.push("To", format!("{to};tag={tag}"));
            }
            _ => resp.headers.push("To", to),
        }
    }
    for name in ["Call-ID", "CSeq"] {
        if let Some(v) = req.headers.get(name) {
            resp.headers.push(name, v);
        }
    }
    if status == 100
        && let Some(ts) = req.headers.get("Timestamp")
    {
        resp.headers.push("Timestamp", ts);
    }
    resp
}

/// The operating system gave no randomness.
#[derive(Debug, thiserror::Error)]
#[error("no randomness from the operating system: {0}")]
pub struct RandomError(String);

static TOKEN_SEED: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
static TOKEN_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn os_seed() -> Result<[u8; 32], RandomError> {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).map_err(|e| RandomError(e.to_string()))?;
    Ok(s)
}

/// Seeds [`random_token`] from the operating system's generator. A SIP
/// endpoint calls it once at start and refuses to start on an error:
/// tags, branches and nonces are never derived from the clock.
pub fn seed_random() -> Result<(), RandomError> {
    if TOKEN_SEED.get().is_none() {
        let _ = TOKEN_SEED.set(os_seed()?);
    }
    Ok(())
}

/// A random token for tags and branches (hex, 64 bits): SHA-256 of a
/// 256-bit secret seed from the operating system and a counter, so each
/// token costs no system call.
///
/// # Panics
/// If [`seed_random`] was not called and the operating system has no
/// randomness to seed it now (there is no weaker fallback).
pub fn random_token() -> String {
    let seed = TOKEN_SEED.get_or_init(|| match os_seed() {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    });
    let n = TOKEN_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let h = Sha256::new()
        .chain_update(seed)
        .chain_update(n.to_le_bytes())
        .finalize();
    hex::encode(&h[..8])
}

/// A fresh RFC 3261 branch (`z9hG4bK` + random).
pub fn new_branch() -> String {
    format!("{}{}", crate::headers::MAGIC_COOKIE, random_token())
}

/// What to do with something that arrived from the network.
#[derive(Debug)]
pub enum Inbound {
    /// A request that passed [`check_request`]: act on it.
    Request(Box<Request>, Box<RequestInfo>),
    /// A well-formed response: hand it to the transaction layer.
    Response(Box<Response>),
    /// A request refused: send this response back to where it came from.
    Reply(Box<Response>),
    /// Nothing can be done (a broken response, or a request too broken to
    /// answer): drop it, for the reason given.
    Drop(String),
}

/// Sorts a parse result into what to do with it. Broken requests get 400
/// (or the status [`check_request`] gives) when they have a Via to route
/// the reply by; broken responses are
/// dropped (RFC 3261 §18.1.2).
pub fn screen(parsed: Result<crate::Message, crate::ParseError>, policy: &UasPolicy) -> Inbound {
    // A reply is routed by the top Via; whatever else of From, To, Call-ID
    // and CSeq is there is copied so the sender can match it.
    let answerable = |req: &Request| req.headers.count("Via") > 0;
    match parsed {
        Ok(crate::Message::Request(req)) => match check_request(&req, policy) {
            Ok(info) => Inbound::Request(Box::new(req), Box::new(info)),
            Err(_) if req.method == Method::Ack => Inbound::Drop("malformed ACK".into()),
            Err(rej) if answerable(&req) || rej.status != 400 => {
                Inbound::Reply(Box::new(rej.response(&req, Some(&random_token()))))
            }
            Err(rej) => Inbound::Drop(rej.reason),
        },
        Ok(crate::Message::Response(resp)) => {
            let h = &resp.headers;
            let ok = h.count("Via") > 0
                && h.values("Via").into_iter().all(|v| Via::parse(v).is_ok())
                && h.get("CSeq").is_some_and(|c| CSeq::parse(c).is_ok())
                && h.count("Call-ID") == 1
                && h.count("From") == 1
                && h.count("To") == 1;
            if ok {
                Inbound::Response(Box::new(resp))
            } else {
                Inbound::Drop("malformed response".into())
            }
        }
        Err(e) => match e.partial.map(|m| *m) {
            Some(crate::Message::Request(req)) if req.method != Method::Ack && answerable(&req) => {
                let rej = Rejection::new(400, e.reason);
                Inbound::Reply(Box::new(rej.response(&req, Some(&random_token()))))
            }
            _ => Inbound::Drop(e.reason),
        },
    }
}
