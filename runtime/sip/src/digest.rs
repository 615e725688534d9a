//! HTTP Digest authentication for SIP (RFC 3261 §22, RFC 8760): MD5 and
//! SHA-256, `qop=auth`, with stateless nonces (a timestamp and its keyed
//! hash) so that a restart or many registering phones need no nonce table.

use md5::Md5;
use sha2::{Digest as _, Sha256};

/// A digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// MD5 (RFC 2617), what most phones speak.
    Md5,
    /// SHA-256 (RFC 8760), preferred.
    Sha256,
}

impl Algorithm {
    /// The name in the `algorithm` parameter.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// Hex digest of `data`.
    pub fn hash(self, data: &str) -> String {
        match self {
            Algorithm::Md5 => hex::encode(Md5::digest(data.as_bytes())),
            Algorithm::Sha256 => hex::encode(Sha256::digest(data.as_bytes())),
        }
    }

    fn from_name(s: &str) -> Option<Algorithm> {
        match s.to_ascii_uppercase().as_str() {
            "" | "MD5" => Some(Algorithm::Md5),
            "SHA-256" => Some(Algorithm::Sha256),
            _ => None,
        }
    }
}

/// `H(user:realm:password)`, what a server stores instead of the password.
pub fn ha1(alg: Algorithm, user: &str, realm: &str, password: &str) -> String {
    alg.hash(&format!("{user}:{realm}:{password}"))
}

/// Parsed `Authorization: Digest …` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// username
    pub username: String,
    /// realm
    pub realm: String,
    /// nonce
    pub nonce: String,
    /// uri
    pub uri: String,
    /// response
    pub response: String,
    /// algorithm (empty means MD5)
    pub algorithm: String,
    /// qop
    pub qop: Option<String>,
    /// nc
    pub nc: Option<String>,
    /// cnonce
    pub cnonce: Option<String>,
}

/// The `name=value` parameters of a `Digest …` header value (names
/// lowercased, quotes removed); `None` for other schemes.
fn digest_params(value: &str) -> Option<Vec<(String, String)>> {
    let (scheme, params) = value.trim().split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("Digest") {
        return None;
    }
    Some(
        crate::split_list(params)
            .into_iter()
            .filter_map(|part| {
                let (k, v) = part.split_once('=')?;
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                Some((k.trim().to_ascii_lowercase(), v.to_string()))
            })
            .collect(),
    )
}

/// Parses a `Digest` credentials header value; `None` for other schemes
/// or missing fields.
pub fn parse_credentials(value: &str) -> Option<Credentials> {
    let mut c = Credentials::default();
    for (k, v) in digest_params(value)? {
        match k.as_str() {
            "username" => c.username = v,
            "realm" => c.realm = v,
            "nonce" => c.nonce = v,
            "uri" => c.uri = v,
            "response" => c.response = v.to_ascii_lowercase(),
            "algorithm" => c.algorithm = v,
            "qop" => c.qop = Some(v),
            "nc" => c.nc = Some(v),
            "cnonce" => c.cnonce = Some(v),
            _ => {}
        }
    }
    (!c.username.is_empty() && !c.nonce.is_empty() && !c.response.is_empty()).then_some(c)
}

/// Why credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The nonce is old or not ours: challenge again with `stale=true`.
    #[error("stale nonce")]
    Stale,
    /// Wrong password, user, realm or algorithm.
    #[error("bad credentials")]
    Bad,
}

/// Issues and checks nonces; holds the server's secret.
#[derive(Debug, Clone)]
pub struct Authenticator {
    secret: String,
    /// How long a nonce stays valid, seconds.
    pub lifetime_s: u64,
    /// Challenge order, most preferred first (clients take the first
    /// algorithm they support).
    pub order: Vec<Algorithm>,
}

impl Authenticator {
    /// A new authenticator with a random secret.
    pub fn new() -> Authenticator {
        Authenticator {
            secret: format!("{}{}", crate::random_token(), crate::random_token()),
            lifetime_s: 300,
            order: vec![Algorithm::Sha256, Algorithm::Md5],
        }
    }

    /// A nonce for `now_s`: the time and a keyed hash of it.
    pub fn nonce(&self, now_s: u64) -> String {
        let mac = Algorithm::Sha256.hash(&format!("{}:{now_s}", self.secret));
        format!("{now_s:x}.{}", &mac[..24])
    }

    fn nonce_ok(&self, nonce: &str, now_s: u64) -> bool {
        let Some((t, _)) = nonce.split_once('.') else {
            return false;
        };
        let Ok(t) = u64::from_str_radix(t, 16) else {
            return false;
        };
        self.nonce(t) == nonce && now_s.saturating_sub(t) <= self.lifetime_s && t <= now_s + 5
    }

    /// `WWW-Authenticate` values, one per algorithm in [`Authenticator::order`]
    /// (RFC 8760 §2.4: SHA-256 first by default; some clients, SIPp among
    /// them, only read the first challenge and need MD5 first).
    pub fn challenges(&self, realm: &str, now_s: u64, stale: bool) -> Vec<String> {
        let nonce = self.nonce(now_s);
        let stale = if stale { ", stale=true" } else { "" };
        self.order
            .iter()
            .map(|a| {
                format!(
                    "Digest realm=\"{realm}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"{stale}",
                    a.name()
                )
            })
            .collect()
    }

    /// Checks credentials for `method` against the stored `H(A1)` of the
    /// algorithm the client chose (`ha1_for` gives it, or `None` if the
    /// user does not exist).
    pub fn verify(
        &self,
        c: &Credentials,
        method: &str,
        realm: &str,
        now_s: u64,
        ha1_for: impl Fn(Algorithm) -> Option<String>,
    ) -> Result<(), AuthError> {
        let alg = Algorithm::from_name(&c.algorithm).ok_or(AuthError::Bad)?;
        if c.realm != realm {
            return Err(AuthError::Bad);
        }
        let ha1 = ha1_for(alg).ok_or(AuthError::Bad)?;
        let ha2 = alg.hash(&format!("{method}:{}", c.uri));
        let expected = match (&c.qop, &c.nc, &c.cnonce) {
            (Some(q), Some(nc), Some(cn)) if q.eq_ignore_ascii_case("auth") => {
                alg.hash(&format!("{ha1}:{}:{nc}:{cn}:{q}:{ha2}", c.nonce))
            }
            (None, _, _) => alg.hash(&format!("{ha1}:{}:{ha2}", c.nonce)),
            _ => return Err(AuthError::Bad),
        };
        if expected != c.response {
            return Err(AuthError::Bad);
        }
        if !self.nonce_ok(&c.nonce, now_s) {
            return Err(AuthError::Stale);
        }
        Ok(())
    }
}

impl Default for Authenticator {
    fn default() -> Authenticator {
        Authenticator::new()
    }
}

/// The client side: answers a `WWW-Authenticate`/`Proxy-Authenticate`
/// challenge (MD5 or SHA-256, with `qop=auth` when offered) with the value
/// for `Authorization`/`Proxy-Authorization`. `None` if the challenge is not
/// a digest we can answer.
pub fn answer_challenge(
    challenge: &str,
    method: &str,
    uri: &str,
    user: &str,
    password: &str,
    cnonce: &str,
) -> Option<String> {
    let mut realm = String::new();
    let mut nonce = String::new();
    let mut algorithm = String::new();
    let mut opaque = None;
    let mut qop_auth = false;
    for (k, v) in digest_params(challenge)? {
        match k.as_str() {
            "realm" => realm = v,
            "nonce" => nonce = v,
            "algorithm" => algorithm = v,
            "opaque" => opaque = Some(v),
            "qop" => qop_auth = v.split(',').any(|q| q.trim().eq_ignore_ascii_case("auth")),
            _ => {}
        }
    }
    let alg = Algorithm::from_name(&algorithm)?;
    let ha1 = ha1(alg, user, &realm, password);
    let ha2 = alg.hash(&format!("{method}:{uri}"));
    let mut out = format!(
        "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", algorithm={}",
        alg.name()
    );
    let response = if qop_auth {
        let nc = "00000001";
        out.push_str(&format!(", qop=auth, nc={nc}, cnonce=\"{cnonce}\""));
        alg.hash(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"))
    } else {
        alg.hash(&format!("{ha1}:{nonce}:{ha2}"))
    };
    out.push_str(&format!(", response=\"{response}\""));
    if let Some(o) = opaque {
        out.push_str(&format!(", opaque=\"{o}\""));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_2617_md5_example_and_sha256() {
        // RFC 2617 §3.5 (an HTTP example; the arithmetic is the same).
        let ha1 = ha1(
            Algorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        let ha2 = Algorithm::Md5.hash("GET:/dir/index.html");
        let resp = Algorithm::Md5.hash(&format!(
            "{ha1}:dcd98b7102dd2f0e8b11d0f600bfb0c093:00000001:0a4f113b:auth:{ha2}"
        ));
        assert_eq!(resp, "6629fae49393a05397450978507c4ef1");
        // RFC 7616 §3.9.1 SHA-256 example.
        let ha1 = super::ha1(
            Algorithm::Sha256,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
        );
        let ha2 = Algorithm::Sha256.hash("GET:/dir/index.html");
        let resp = Algorithm::Sha256.hash(&format!(
            "{ha1}:7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v:00000001:f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ:auth:{ha2}"
        ));
        assert_eq!(
            resp,
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn challenge_answer_verify() {
        let auth = Authenticator::new();
        let now = 1_800_000_000;
        let ch = auth.challenges("acme", now, false);
        assert!(ch[0].contains("SHA-256") && ch[1].contains("MD5"));
        let nonce = auth.nonce(now);
        for alg in [Algorithm::Sha256, Algorithm::Md5] {
            let stored = ha1(alg, "alice", "acme", "s3cret");
            let ha2 = alg.hash("REGISTER:sip:acme");
            let response = alg.hash(&format!("{stored}:{nonce}:00000001:abc:auth:{ha2}"));
            let header = format!(
                "Digest username=\"alice\", realm=\"acme\", nonce=\"{nonce}\", uri=\"sip:acme\", \
                 response=\"{response}\", algorithm={}, qop=auth, nc=00000001, cnonce=\"abc\"",
                alg.name()
            );
            let c = parse_credentials(&header).unwrap_or_else(|| panic!("parse"));
            let lookup = |a: Algorithm| Some(ha1(a, "alice", "acme", "s3cret"));
            assert_eq!(
                auth.verify(&c, "REGISTER", "acme", now + 10, lookup),
                Ok(())
            );
            let wrong = |a: Algorithm| Some(ha1(a, "alice", "acme", "guess"));
            assert_eq!(
                auth.verify(&c, "REGISTER", "acme", now, wrong),
                Err(AuthError::Bad)
            );
            assert_eq!(
                auth.verify(&c, "REGISTER", "acme", now + 301, lookup),
                Err(AuthError::Stale)
            );
            assert_eq!(
                auth.verify(&c, "INVITE", "acme", now, lookup),
                Err(AuthError::Bad)
            );
        }
        // Our own client answers our own challenges, for both algorithms.
        for ch in auth.challenges("acme", now, false) {
            let value = answer_challenge(&ch, "INVITE", "sip:7@acme", "alice", "s3cret", "xyz")
                .unwrap_or_else(|| panic!("cannot answer {ch}"));
            let c = parse_credentials(&value).unwrap_or_else(|| panic!("{value}"));
            let lookup = |a: Algorithm| Some(ha1(a, "alice", "acme", "s3cret"));
            assert_eq!(
                auth.verify(&c, "INVITE", "acme", now, lookup),
                Ok(()),
                "{value}"
            );
        }
        let other = Authenticator::new();
        assert!(!other.nonce_ok(&auth.nonce(now), now));
        assert!(parse_credentials("Basic abc").is_none());
        assert!(parse_credentials("NoOneKnowsThisScheme opaque-data=here").is_none());
    }
}
