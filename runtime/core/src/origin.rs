//! Origins (scheme, host, port) of outbound HTTP: what an `http` grant's
//! allow-list names and what a URL reaches. One parser serves the grant's
//! validation and every fetch, so both read an entry the same way.

use serde::{Deserialize, Serialize};
use std::fmt;

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// The scheme's default port.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A scheme, a lower-cased host (IPv6 in brackets) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The scheme.
    pub scheme: Scheme,
    /// The host, lower-cased.
    pub host: String,
    /// The port (the scheme's default when none was written).
    pub port: u16,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
    }
}

impl Origin {
    /// The origin a URL reaches: `http://` or `https://`, a host, no user
    /// info.
    pub fn of_url(url: &str) -> Result<Origin, String> {
        let (scheme, rest) = split_scheme(url)
            .ok_or_else(|| format!("{url:?}: only http:// and https:// URLs are supported"))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        Origin::parse_authority(scheme, authority).map_err(|e| format!("{url:?}: {e}"))
    }

    /// An allow-list entry: `https://host[:port]`, `http://host[:port]`,
    /// or `host:port` (plain HTTP, the older form). A path is not part of
    /// an origin and is refused.
    pub fn of_allow_entry(entry: &str) -> Result<Origin, String> {
        let bad = |why: &str| format!("http.allow entry {entry:?}: {why}");
        match split_scheme(entry) {
            Some((scheme, rest)) => {
                let rest = rest.strip_suffix('/').unwrap_or(rest);
                if rest.contains(['/', '?', '#']) {
                    return Err(bad("an origin has no path"));
                }
                Origin::parse_authority(scheme, rest).map_err(|e| bad(&e))
            }
            None => {
                let has_port = entry.rsplit_once(':').is_some_and(|(h, p)| {
                    !h.is_empty() && !p.contains(']') && p.parse::<u16>().is_ok()
                });
                if !has_port || entry.contains(['/', '?', '#']) {
                    return Err(bad(
                        "must be https://host[:port], http://host[:port] or host:port",
                    ));
                }
                Origin::parse_authority(Scheme::Http, entry).map_err(|e| bad(&e))
            }
        }
    }

    fn parse_authority(scheme: Scheme, authority: &str) -> Result<Origin, String> {
        if authority.is_empty() || authority.contains('@') {
            return Err("must have a host and no user info".into());
        }
        let (host, port) = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => {
                let port = authority[i + 1..]
                    .parse::<u16>()
                    .map_err(|_| "bad port".to_string())?;
                (&authority[..i], port)
            }
            _ => (authority, scheme.default_port()),
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace()) {
            return Err("bad host".into());
        }
        Ok(Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// The path of an `http(s)://` URL (`/` when it has none), without its
/// query or fragment; `None` for another kind of URL.
pub fn url_path(url: &str) -> Option<&str> {
    let (_, rest) = split_scheme(url)?;
    let start = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let tail = &rest[start..];
    let path = &tail[..tail.find(['?', '#']).unwrap_or(tail.len())];
    Some(if path.is_empty() { "/" } else { path })
}

/// Whether `path` lies under `prefix` (on a segment boundary: `/api`
/// covers `/api` and `/api/x`, not `/apix`) with no dot segment, plain or
/// percent-encoded, that could climb out of it.
pub fn path_within(path: &str, prefix: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    let climbs = lower
        .split('/')
        .any(|seg| matches!(seg, "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e."))
        || lower.contains("%2f")
        || lower.contains('\\');
    if climbs {
        return false;
    }
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|r| r.starts_with('/'))
    }
}

fn split_scheme(s: &str) -> Option<(Scheme, &str)> {
    let (scheme, rest) = s.split_once("://")?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return None,
    };
    Some((scheme, rest))
}

/// A URL without its secret, for logs and settings shown: the password in
/// its user info masked (`postgres://app:********@db/x`), or all of the user
/// info when `keep_user` is false (where a user alone is a token, as in
/// NATS URLs). A URL without user info is returned as it is.
pub fn redact_url(url: &str, keep_user: bool) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            if keep_user {
                format!("{}{user}:********{}", &url[..scheme + 3], &url[at..])
            } else {
                format!("{}********{}", &url[..scheme + 3], &url[at..])
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_urls_and_prefixes() {
        assert_eq!(url_path("https://crm.example.com"), Some("/"));
        assert_eq!(url_path("https://crm.example.com?q=1"), Some("/"));
        assert_eq!(url_path("http://h:81/api/v1/x?q=/y#z"), Some("/api/v1/x"));
        assert_eq!(url_path("ftp://h/x"), None);
        assert!(path_within("/api", "/api"));
        assert!(path_within("/api/customers/7", "/api"));
        assert!(path_within("/api/customers/7", "/api/"));
        assert!(!path_within("/apix", "/api"));
        assert!(!path_within("/api/../admin", "/api"));
        assert!(!path_within("/api/%2E%2E/admin", "/api"));
        assert!(!path_within("/api/%2e./admin", "/api"));
        assert!(!path_within("/api/x%2F..%2Fadmin", "/api"));
        assert!(!path_within("/admin", "/api"));
    }

    fn o(scheme: Scheme, host: &str, port: u16) -> Origin {
        Origin {
            scheme,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            Origin::of_url("http://Example.com/x"),
            Ok(o(Scheme::Http, "example.com", 80))
        );
        assert_eq!(
            Origin::of_url("https://crm.example.com/api?q=1"),
            Ok(o(Scheme::Https, "crm.example.com", 443))
        );
        assert_eq!(
            Origin::of_url("http://10.0.0.1:8080?q"),
            Ok(o(Scheme::Http, "10.0.0.1", 8080))
        );
        assert_eq!(
            Origin::of_url("https://[::1]:9/"),
            Ok(o(Scheme::Https, "[::1]", 9))
        );
        assert_eq!(
            Origin::of_url("http://[::1]/"),
            Ok(o(Scheme::Http, "[::1]", 80))
        );
        for bad in [
            "http:///x",
            "ftp://a/",
            "a/b",
            "http://u@a/",
            "http://a:99999/",
        ] {
            assert!(Origin::of_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allow_entries() {
        assert_eq!(
            Origin::of_allow_entry("crm:80"),
            Ok(o(Scheme::Http, "crm", 80))
        );
        assert_eq!(
            Origin::of_allow_entry("https://CRM.example.com"),
            Ok(o(Scheme::Https, "crm.example.com", 443))
        );
        assert_eq!(
            Origin::of_allow_entry("https://crm.example.com:8443/"),
            Ok(o(Scheme::Https, "crm.example.com", 8443))
        );
        for bad in ["crm", "crm:x", "https://crm/api", ":80", "crm/a:80"] {
            assert!(Origin::of_allow_entry(bad).is_err(), "{bad}");
        }
    }
}
