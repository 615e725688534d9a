//! Who really sent an inbound message: SPF, DKIM and DMARC.
//!
//! The checks are `mail-auth`'s (Stalwart's, on hickory's resolver and
//! ring's signatures); this module picks the DNS servers, bounds the time
//! the lookups may take, and turns the outcome into what the message
//! keeps: one word per check in its meta (`spf`, `dkim`, `dmarc`), the
//! DMARC policy of the sender's domain, and an `Authentication-Results`
//! header (RFC 8601) written at the top of the stored raw message, as a
//! receiving mail server does.
//!
//! A domain whose DMARC policy is `reject` and whose mail fails DMARC is
//! refused with `550 5.7.1` when the operator asks for it (the default):
//! that is the sender domain's own instruction, and what large mailbox
//! providers do. A lookup that fails or runs out of time is a
//! `temperror`, never a refusal.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mail_auth::dmarc::Policy;
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::system_conf::read_system_conf;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    SpfOutput, SpfResult, dmarc::verify::DmarcParameters, spf::verify::SpfParameters,
};

/// Where the DNS answers for the checks come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDns {
    /// No checks: nothing is looked up and nothing recorded.
    Off,
    /// The machine's resolvers (`/etc/resolv.conf`).
    System,
    /// One DNS server, over UDP and TCP.
    Server(SocketAddr),
}

impl std::str::FromStr for AuthDns {
    type Err = AuthError;

    /// `off`, `system`, or a DNS server's `ip:port`.
    fn from_str(s: &str) -> Result<Self, AuthError> {
        match s.trim() {
            "off" | "none" => Ok(AuthDns::Off),
            "system" => Ok(AuthDns::System),
            other => other.parse().map(AuthDns::Server).map_err(|_| {
                AuthError(format!(
                    "mail auth DNS `{other}`: expected off, system or IP:PORT"
                ))
            }),
        }
    }
}

/// The resolver could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(String);

/// What the checks found for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// SPF of the MAIL FROM domain (or of the HELO name for a bounce):
    /// `pass`, `fail`, `softfail`, `neutral`, `none`, `temperror`,
    /// `permerror`.
    pub spf: &'static str,
    /// DKIM: `pass` when a signature verified, else the first one's result,
    /// `none` with no signature.
    pub dkim: &'static str,
    /// The domains whose DKIM signatures verified.
    pub dkim_domains: Vec<String>,
    /// DMARC of the From domain: `pass`, `fail`, `none`, `temperror`,
    /// `permerror`.
    pub dmarc: &'static str,
    /// The From domain's DMARC policy (`none`, `quarantine`, `reject`).
    pub policy: &'static str,
    /// The domain DMARC was checked for (the From header's).
    pub domain: String,
    /// The `Authentication-Results` header's value, on one line.
    pub header: String,
    /// DMARC failed and the domain asks for rejection.
    pub reject: bool,
}

impl Verdict {
    /// The results as message meta entries.
    pub fn meta(&self) -> impl Iterator<Item = (String, String)> + '_ {
        [
            ("spf", self.spf.to_string()),
            ("dkim", self.dkim.to_string()),
            ("dkim_domains", self.dkim_domains.join(",")),
            ("dmarc", self.dmarc.to_string()),
            ("dmarc_policy", self.policy.to_string()),
            ("authentication_results", self.header.clone()),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v))
    }
}

/// The checks, with their resolver and time bound.
pub struct MailAuth {
    authenticator: MessageAuthenticator,
    dns: AuthDns,
    hostname: String,
    timeout: Duration,
    enforce_reject: bool,
}

impl MailAuth {
    /// Sets up the checks; `None` when `dns` is [`AuthDns::Off`].
    /// `hostname` names this server in the results; `timeout` bounds all
    /// of one message's lookups together.
    pub fn new(
        dns: &AuthDns,
        hostname: &str,
        timeout: Duration,
        enforce_reject: bool,
    ) -> Result<Option<Self>, AuthError> {
        // One try per lookup, well inside the checks' own time limits.
        let mut opts = ResolverOpts::default();
        opts.timeout = (timeout / 3).clamp(Duration::from_millis(300), Duration::from_secs(2));
        opts.attempts = 1;
        let authenticator = match dns {
            AuthDns::Off => return Ok(None),
            AuthDns::System => {
                let (config, _) =
                    read_system_conf().map_err(|e| AuthError(format!("mail auth DNS: {e}")))?;
                MessageAuthenticator::new(config, opts)
                    .map_err(|e| AuthError(format!("mail auth DNS: {e}")))?
            }
            AuthDns::Server(addr) => {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut server.connections {
                    c.port = addr.port();
                }
                MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![server]), opts)
                    .map_err(|e| AuthError(format!("mail auth DNS: {e}")))?
            }
        };
        Ok(Some(MailAuth {
            authenticator,
            dns: dns.clone(),
            hostname: hostname.to_string(),
            timeout,
            enforce_reject,
        }))
    }

    /// The settings in effect, for `GET /v1/settings`.
    pub fn settings(&self) -> serde_json::Value {
        serde_json::json!({
            "dns": match &self.dns {
                AuthDns::Off => "off".to_string(),
                AuthDns::System => "system".to_string(),
                AuthDns::Server(a) => a.to_string(),
            },
            "timeout_s": self.timeout.as_secs(),
            "dmarc_reject": self.enforce_reject,
        })
    }

    /// Checks one message from `ip`, which said `helo` and `MAIL
    /// FROM:<mail_from>`.
    ///
    /// SPF and DKIM run side by side, each within the time limit, and
    /// DMARC after them within it again: a sender cannot make the DMARC
    /// verdict time out by pointing SPF or DKIM at a name server that never
    /// answers (what did not finish is a `temperror`, which does not align,
    /// so a spoofed From still fails DMARC).
    pub async fn check(&self, ip: IpAddr, helo: &str, mail_from: &str, raw: &[u8]) -> Verdict {
        let limit = self.timeout;
        let spf = async {
            tokio::time::timeout(
                limit,
                self.authenticator
                    .verify_spf(SpfParameters::verify_mail_from(
                        ip,
                        helo,
                        &self.hostname,
                        mail_from,
                    )),
            )
            .await
            .unwrap_or_else(|_| SpfOutput::default().with_result(SpfResult::TempError))
        };
        let Some(message) = AuthenticatedMessage::parse(raw) else {
            // Not a message mail-auth can read: SPF alone.
            let spf = spf.await;
            let header = AuthenticationResults::new(&self.hostname)
                .with_spf_mailfrom_result(&spf, ip, mail_from, helo)
                .to_string()
                .replace("\r\n\t", " ");
            return Verdict {
                spf: spf_word(spf.result()),
                dkim: "none",
                dkim_domains: Vec::new(),
                dmarc: "none",
                policy: "none",
                domain: String::new(),
                header,
                reject: false,
            };
        };
        let dkim =
            async { tokio::time::timeout(limit, self.authenticator.verify_dkim(&message)).await };
        let (spf, dkim) = tokio::join!(spf, dkim);
        let (dkim, dkim_late) = match dkim {
            Ok(d) => (d, false),
            Err(_) => (Vec::new(), true),
        };
        let header_from = message.from();
        // Several From domains: DMARC has no one domain to check, and the
        // reader would see only the first (RFC 7489 6.6.1 allows refusing).
        let mut domains: Vec<&str> = message
            .froms()
            .iter()
            .filter_map(|f| f.rsplit_once('@').map(|(_, d)| d))
            .collect();
        domains.sort_unstable_by_key(|d| d.to_ascii_lowercase());
        domains.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
        let dkim_domains: Vec<String> = dkim
            .iter()
            .filter(|d| d.result() == &DkimResult::Pass)
            .filter_map(|d| d.signature().map(|s| s.d.clone()))
            .collect();
        let dkim_word = if !dkim_domains.is_empty() {
            "pass"
        } else if dkim_late {
            "temperror"
        } else {
            dkim.first().map_or("none", |d| dkim_word(d.result()))
        };
        let results = AuthenticationResults::new(&self.hostname)
            .with_dkim_results(&dkim, header_from)
            .with_spf_mailfrom_result(&spf, ip, mail_from, helo);
        if domains.len() > 1 {
            return Verdict {
                spf: spf_word(spf.result()),
                dkim: dkim_word,
                dkim_domains,
                dmarc: "permerror",
                policy: "none",
                domain: domains.join(","),
                header: format!("{results}; dmarc=permerror (several From domains)")
                    .replace("\r\n\t", " "),
                reject: self.enforce_reject,
            };
        }
        let from_domain = match mail_from.rsplit_once('@') {
            Some((_, d)) => d,
            None => helo,
        };
        let dmarc = tokio::time::timeout(
            limit,
            self.authenticator.verify_dmarc(DmarcParameters::new(
                &message,
                &dkim,
                from_domain,
                &spf,
            )),
        )
        .await;
        let Ok(dmarc) = dmarc else {
            return Verdict {
                spf: spf_word(spf.result()),
                dkim: dkim_word,
                dkim_domains,
                dmarc: "temperror",
                policy: "none",
                domain: String::new(),
                header: format!("{results}; dmarc=temperror (lookup took too long)")
                    .replace("\r\n\t", " "),
                reject: false,
            };
        };
        let header = results
            .with_dmarc_result(&dmarc)
            .to_string()
            .replace("\r\n\t", " ");
        let dmarc_result = dmarc.result();
        let policy = match dmarc.policy() {
            Policy::Reject => "reject",
            Policy::Quarantine => "quarantine",
            Policy::None | Policy::Unspecified => "none",
        };
        let failed = matches!(dmarc_result, DmarcResult::Fail(_));
        Verdict {
            spf: spf_word(spf.result()),
            dkim: dkim_word,
            dkim_domains,
            dmarc: dmarc_word(&dmarc_result),
            policy,
            domain: dmarc.domain().to_string(),
            header,
            reject: failed && policy == "reject" && self.enforce_reject,
        }
    }
}

fn spf_word(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_word(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

fn dmarc_word(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dns_settings_parse() {
        assert_eq!("off".parse::<AuthDns>().unwrap(), AuthDns::Off);
        assert_eq!("system".parse::<AuthDns>().unwrap(), AuthDns::System);
        assert_eq!(
            "127.0.0.1:5353".parse::<AuthDns>().unwrap(),
            AuthDns::Server("127.0.0.1:5353".parse().unwrap())
        );
        assert!("dns.example".parse::<AuthDns>().is_err());
    }
}
