//! Typed header values: Via, name-addr (From, To, Contact, Route), CSeq,
//! Call-ID, and the generic `;name=value` parameters they carry.

use std::fmt;

use crate::message::Method;
use crate::parse::{is_token, is_token_char};
use crate::uri::split_host_port;

/// Why a header value was refused (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad {header}: {reason}")]
pub struct HeaderError {
    /// The header's name.
    pub header: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn err(header: &'static str, reason: impl Into<String>) -> HeaderError {
    HeaderError {
        header,
        reason: reason.into(),
    }
}

/// Header parameters in order: name and optional value (quotes kept).
pub type Params = Vec<(String, Option<String>)>;

/// Finds a parameter by name, case-insensitively.
pub fn param<'a>(params: &'a Params, name: &str) -> Option<Option<&'a str>> {
    params
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_deref())
}

/// Splits at `sep` outside quoted strings.
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    out
}

/// Parses `;a=b;c` (the leading `;` already removed from each piece).
fn parse_params(header: &'static str, pieces: &[&str]) -> Result<Params, HeaderError> {
    let mut out = Vec::new();
    for piece in pieces {
        let (name, value) = match piece.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (piece.trim(), None),
        };
        if !is_token(name) {
            return Err(err(header, format!("bad parameter name {name:?}")));
        }
        if let Some(v) = value {
            let ok = if v.starts_with('"') {
                v.len() >= 2 && v.ends_with('"')
            } else {
                !v.is_empty() && v.chars().all(|c| is_token_char(c) || "[]:".contains(c))
            };
            if !ok {
                return Err(err(header, format!("bad value for parameter {name}")));
            }
        }
        out.push((name.to_string(), value.map(str::to_string)));
    }
    Ok(out)
}

fn write_params(f: &mut fmt::Formatter<'_>, params: &Params) -> fmt::Result {
    for (n, v) in params {
        match v {
            Some(v) => write!(f, ";{n}={v}")?,
            None => write!(f, ";{n}")?,
        }
    }
    Ok(())
}

/// One Via value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// Transport, uppercased: UDP, TCP, TLS, SCTP, WS, WSS, or another token.
    pub transport: String,
    /// The sent-by host.
    pub host: String,
    /// The sent-by port.
    pub port: Option<u16>,
    /// Parameters (branch, received, rport, …).
    pub params: Params,
}

/// The RFC 3261 branch prefix that marks a globally unique branch.
pub const MAGIC_COOKIE: &str = "z9hG4bK";

impl Via {
    /// Parses one Via value (`SIP/2.0/UDP host:port;branch=…`), allowing
    /// whitespace around the slashes as RFC 3261 does.
    pub fn parse(s: &str) -> Result<Via, HeaderError> {
        let pieces = split_outside_quotes(s, ';');
        let head = pieces[0];
        let parts: Vec<&str> = head.splitn(3, '/').collect();
        let [proto, version, rest] = parts.as_slice() else {
            return Err(err("Via", "expected SIP/2.0/TRANSPORT"));
        };
        if !proto.trim().eq_ignore_ascii_case("SIP") || !is_token(version.trim()) {
            return Err(err("Via", "expected SIP/2.0/TRANSPORT"));
        }
        let mut words = rest.split_ascii_whitespace();
        let transport = words.next().unwrap_or("");
        if !is_token(transport) {
            return Err(err("Via", "bad transport"));
        }
        let sent_by: String = words.collect();
        let (host, port) = split_host_port(&sent_by).map_err(|e| err("Via", e.to_string()))?;
        let params = parse_params("Via", &pieces[1..])?;
        Ok(Via {
            transport: transport.to_ascii_uppercase(),
            host,
            port,
            params,
        })
    }

    /// The branch parameter.
    pub fn branch(&self) -> Option<&str> {
        param(&self.params, "branch").flatten()
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write_params(f, &self.params)
    }
}

/// A name-addr or addr-spec with header parameters: the value of From, To,
/// Contact, Route, Record-Route, Refer-To.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    /// The display name, unquoted and unescaped.
    pub display: Option<String>,
    /// The URI as written (any scheme; see [`crate::Uri::parse`]).
    pub uri: String,
    /// Header parameters after the URI (tag, expires, q, …).
    pub params: Params,
}

fn parse_quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?.1),
            '"' => return Some((out, &s[i + 1..])),
            _ => out.push(c),
        }
    }
    None
}

impl NameAddr {
    /// Parses one value. `header` names the header for error messages.
    pub fn parse(header: &'static str, s: &str) -> Result<NameAddr, HeaderError> {
        let s = s.trim();
        let (display, after_display) = if s.starts_with('"') {
            let (d, rest) =
                parse_quoted(s).ok_or_else(|| err(header, "unterminated quoted display name"))?;
            (Some(d), rest.trim_start())
        } else if let Some(lt) = s.find('<') {
            let words = s[..lt].trim();
            if !words.split_ascii_whitespace().all(is_token) {
                return Err(err(
                    header,
                    "display name with special characters must be quoted",
                ));
            }
            ((!words.is_empty()).then(|| words.to_string()), &s[lt..])
        } else {
            (None, s)
        };
        let (uri, params) = if let Some(inner) = after_display.strip_prefix('<') {
            let gt = inner.find('>').ok_or_else(|| err(header, "missing '>'"))?;
            let rest = inner[gt + 1..].trim();
            let params = if rest.is_empty() {
                Vec::new()
            } else {
                let rest = rest
                    .strip_prefix(';')
                    .ok_or_else(|| err(header, "junk after '>'"))?;
                parse_params(header, &split_outside_quotes(rest, ';'))?
            };
            (inner[..gt].trim().to_string(), params)
        } else {
            if display.is_some() {
                return Err(err(header, "display name without <URI>"));
            }
            let pieces = split_outside_quotes(after_display, ';');
            (
                pieces[0].trim().to_string(),
                parse_params(header, &pieces[1..])?,
            )
        };
        if crate::uri::scheme_of(&uri).is_none() || uri.contains(char::is_whitespace) {
            return Err(err(header, format!("bad URI {uri:?}")));
        }
        if matches!(crate::uri::scheme_of(&uri).as_deref(), Some("sip" | "sips")) {
            crate::Uri::parse(&uri).map_err(|e| err(header, e.to_string()))?;
        }
        Ok(NameAddr {
            display,
            uri,
            params,
        })
    }

    /// The `tag` parameter.
    pub fn tag(&self) -> Option<&str> {
        param(&self.params, "tag").flatten()
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            let escaped = d.replace('\\', "\\\\").replace('"', "\\\"");
            write!(f, "\"{escaped}\" ")?;
        }
        write!(f, "<{}>", self.uri)?;
        write_params(f, &self.params)
    }
}

/// A CSeq value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    /// The sequence number, below 2³¹.
    pub seq: u32,
    /// The method.
    pub method: Method,
}

impl CSeq {
    /// Parses `number METHOD`.
    pub fn parse(s: &str) -> Result<CSeq, HeaderError> {
        let mut words = s.split_ascii_whitespace();
        let (Some(n), Some(m), None) = (words.next(), words.next(), words.next()) else {
            return Err(err("CSeq", "expected: number method"));
        };
        if !n.bytes().all(|b| b.is_ascii_digit()) || !is_token(m) {
            return Err(err("CSeq", "expected: number method"));
        }
        let seq = n
            .parse::<u32>()
            .ok()
            .filter(|n| *n < 1 << 31)
            .ok_or_else(|| err("CSeq", "sequence number must be below 2^31"))?;
        Ok(CSeq {
            seq,
            method: Method::from_token(m),
        })
    }
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.method)
    }
}

/// Checks a Call-ID (`word ["@" word]`).
pub fn check_call_id(s: &str) -> Result<(), HeaderError> {
    let word_ok = |w: &str| {
        !w.is_empty()
            && w.chars()
                .all(|c| is_token_char(c) || "()<>:\\\"/[]?{}".contains(c))
    };
    let ok = match s.split_once('@') {
        Some((a, b)) => word_ok(a) && word_ok(b),
        None => word_ok(s),
    };
    if ok {
        Ok(())
    } else {
        Err(err("Call-ID", "not a word[@word]"))
    }
}

/// Parses a small decimal scalar (Max-Forwards, Expires) with an upper bound.
pub fn parse_scalar(header: &'static str, s: &str, max: u64) -> Result<u64, HeaderError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(header, "not a number"));
    }
    s.parse::<u64>()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| err(header, format!("larger than {max}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_with_whitespace_and_params() {
        let v = Via::parse("SIP  /   2.0 /UDP 192.0.2.2;branch=390skdjuw")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (v.transport.as_str(), v.host.as_str()),
            ("UDP", "192.0.2.2")
        );
        assert_eq!(v.branch(), Some("390skdjuw"));
        let v = Via::parse("SIP/2.0/TCP spindle.example.com   ; branch  =   z9hG4bK9ikj8 ;rport")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.branch(), Some("z9hG4bK9ikj8"));
        assert_eq!(param(&v.params, "rport"), Some(None));
        assert!(Via::parse("SIP/2.0/UDP 192.0.2.15;;").is_err());
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse(
            "To",
            r#""J Rosenberg \\\""       <sip:jdrosen@example.com> ; tag = 98asjd8"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n.display.as_deref(), Some("J Rosenberg \\\""));
        assert_eq!(n.tag(), Some("98asjd8"));
        let n = NameAddr::parse("To", "sip:a@b;tag=1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((n.uri.as_str(), n.tag()), ("sip:a@b", Some("1")));
        assert!(NameAddr::parse("To", "\"Mr. J. User <sip:j.user@example.com>").is_err());
        assert!(
            NameAddr::parse("From", "Bell, Alexander <sip:a.g.bell@example.com>;tag=43").is_err()
        );
        assert!(NameAddr::parse("Contact", "\"Joe\" <sip:joe@example.org>;;;;").is_err());
    }

    #[test]
    fn cseq_bounds() {
        assert!(CSeq::parse("0009 INVITE").is_ok());
        assert!(CSeq::parse("36893488147419103232 REGISTER").is_err());
        assert!(CSeq::parse("2147483648 INVITE").is_err());
    }
}
