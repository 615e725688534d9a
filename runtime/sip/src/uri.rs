//! SIP and SIPS URIs (RFC 3261 §19.1), checked character by character.

use std::fmt;

/// Why a URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// The scheme is missing or is not `sip`/`sips` (answer 416 for a Request-URI).
    #[error("unsupported URI scheme {0:?}")]
    Scheme(String),
    /// The URI breaks the grammar.
    #[error("malformed URI: {0}")]
    Syntax(String),
}

/// A parsed `sip:` or `sips:` URI. User, password and parameter values are
/// kept escaped as received; [`unescape`] decodes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    /// True for `sips:`.
    pub secure: bool,
    /// The user part, escaped.
    pub user: Option<String>,
    /// The password, escaped.
    pub password: Option<String>,
    /// Host name, IPv4 address, or IPv6 reference with brackets.
    pub host: String,
    /// The port, if given.
    pub port: Option<u16>,
    /// URI parameters (`;name[=value]`), names as received.
    pub params: Vec<(String, Option<String>)>,
    /// The headers part after `?`, escaped, without the `?`.
    pub headers: Option<String>,
}

/// The scheme of a URI (`sip`, `tel`, …), lowercased, if it has a valid one.
pub fn scheme_of(uri: &str) -> Option<String> {
    let (scheme, _) = uri.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
        .then(|| scheme.to_ascii_lowercase())
}

fn is_unreserved(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.!~*'()".contains(c)
}

/// Checks that every character is unreserved, in `extra`, or a valid `%XX` escape.
fn check_chars(what: &str, s: &str, extra: &str) -> Result<(), UriError> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c == '%' {
            let ok = bytes.len() > i + 2
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit();
            if !ok {
                return Err(UriError::Syntax(format!("bad escape in {what}")));
            }
            i += 3;
            continue;
        }
        if !(is_unreserved(c) || extra.contains(c)) {
            return Err(UriError::Syntax(format!(
                "character {c:?} not allowed in {what}"
            )));
        }
        i += 1;
    }
    Ok(())
}

/// Decodes `%XX` escapes. Invalid escapes are kept literally; bytes that do
/// not form UTF-8 are replaced.
pub fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(b) = hex {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn check_host(host: &str) -> Result<(), UriError> {
    if let Some(v6) = host.strip_prefix('[') {
        let inner = v6
            .strip_suffix(']')
            .ok_or_else(|| UriError::Syntax("unclosed IPv6 reference".into()))?;
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| UriError::Syntax("bad IPv6 address".into()));
    }
    let ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !host.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(UriError::Syntax(format!("bad host {host:?}")))
    }
}

/// Splits `host[:port]`, handling IPv6 references.
pub(crate) fn split_host_port(s: &str) -> Result<(String, Option<u16>), UriError> {
    let (host, port) = if s.starts_with('[') {
        match s.find(']') {
            Some(end) => {
                let rest = &s[end + 1..];
                let port = match rest.strip_prefix(':') {
                    Some(p) => Some(p),
                    None if rest.is_empty() => None,
                    None => return Err(UriError::Syntax("junk after IPv6 reference".into())),
                };
                (&s[..=end], port)
            }
            None => return Err(UriError::Syntax("unclosed IPv6 reference".into())),
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    check_host(host)?;
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| UriError::Syntax(format!("bad port {p:?}")))?,
        ),
        None => None,
    };
    Ok((host.to_string(), port))
}

impl Uri {
    /// Parses a `sip:`/`sips:` URI. Other schemes give [`UriError::Scheme`].
    pub fn parse(s: &str) -> Result<Uri, UriError> {
        let scheme = scheme_of(s).ok_or_else(|| UriError::Scheme(s.to_string()))?;
        let secure = match scheme.as_str() {
            "sip" => false,
            "sips" => true,
            _ => return Err(UriError::Scheme(scheme)),
        };
        let rest = &s[scheme.len() + 1..];
        let (userinfo, hostpart) = match rest.find('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (user, password) = match userinfo {
            Some(ui) => {
                let (u, p) = match ui.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (ui, None),
                };
                if u.is_empty() {
                    return Err(UriError::Syntax("empty user part".into()));
                }
                check_chars("user part", u, "&=+$,;?/")?;
                if let Some(p) = p {
                    check_chars("password", p, "&=+$,")?;
                }
                (Some(u.to_string()), p.map(str::to_string))
            }
            None => (None, None),
        };
        let (hostpart, headers) = match hostpart.split_once('?') {
            Some((h, q)) => {
                check_chars("URI headers", q, "[]/?:+$&=")?;
                (h, Some(q.to_string()))
            }
            None => (hostpart, None),
        };
        let mut pieces = hostpart.split(';');
        let (host, port) = split_host_port(pieces.next().unwrap_or(""))?;
        let mut params = Vec::new();
        for p in pieces {
            let (name, value) = match p.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (p, None),
            };
            if name.is_empty() {
                return Err(UriError::Syntax("empty URI parameter".into()));
            }
            check_chars("URI parameter", name, "[]/:&+$")?;
            if let Some(v) = value {
                check_chars("URI parameter", v, "[]/:&+$")?;
            }
            params.push((name.to_string(), value.map(str::to_string)));
        }
        Ok(Uri {
            secure,
            user,
            password,
            host,
            port,
            params,
            headers,
        })
    }

    /// A URI parameter's value (`Some(None)` for a flag such as `lr`).
    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    /// The user part with escapes decoded.
    pub fn user_unescaped(&self) -> Option<String> {
        self.user.as_deref().map(unescape)
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.secure { "sips:" } else { "sip:" })?;
        if let Some(u) = &self.user {
            f.write_str(u)?;
            if let Some(p) = &self.password {
                write!(f, ":{p}")?;
            }
            f.write_str("@")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        for (n, v) in &self.params {
            match v {
                Some(v) => write!(f, ";{n}={v}")?,
                None => write!(f, ";{n}")?,
            }
        }
        if let Some(h) = &self.headers {
            write!(f, "?{h}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torture_uris() {
        let u = Uri::parse("sip:sips%3Auser%40example.com@example.net")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.user_unescaped().as_deref(), Some("sips:user@example.com"));
        assert_eq!(u.host, "example.net");
        let u = Uri::parse("sip:user;par=u%40example.net@example.com")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.user.as_deref(), Some("user;par=u%40example.net"));
        let u = Uri::parse("sip:[2001:db8::10]:5070;transport=tcp;lr")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((u.host.as_str(), u.port), ("[2001:db8::10]", Some(5070)));
        assert_eq!(u.param("lr"), Some(None));
        assert_eq!(u.to_string(), "sip:[2001:db8::10]:5070;transport=tcp;lr");
        assert!(matches!(Uri::parse("<sip:a@b>"), Err(UriError::Scheme(_))));
        assert!(matches!(Uri::parse("nobody:x"), Err(UriError::Scheme(_))));
        assert!(Uri::parse("sip:a b@c").is_err());
        assert!(Uri::parse("sip:a@c:99999").is_err());
        assert_eq!(unescape("%2B1%20x%zz"), "+1 x%zz");
    }
}
