//! Plugboard's shared model, used by every other crate: tenants, plugins,
//! addresses, interactions with their timelines, and the JSON form of the
//! flow contract's events and actions (the WIT types in `wit/flow@0.1.0`,
//! as the HTTP API and `simulate` speak them).
//!
//! This crate does no I/O.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

pub mod flow;

pub use flow::{Action, Event};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Checks that an id (tenant, plugin, flow name) is 1–64 characters of
/// `[a-z0-9_-]`, starting with a letter or digit.
pub fn validate_id(kind: &str, id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && id
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{kind} id {id:?} must be 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
        )))
    }
}

/// Errors shared across crates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something the caller sent is invalid.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A named thing does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The thing already exists.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(String),
}

/// A tenant: one customer of the platform, isolated from all others.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tenant {
    /// Tenant id (`[a-z0-9_-]`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// IANA time zone used by flows (business hours).
    #[serde(default = "default_tz")]
    pub time_zone: String,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Plugin limits for this tenant; the server's defaults where unset.
    #[serde(default)]
    pub limits: TenantLimits,
}

/// Per-tenant overrides of the plugin execution limits (set by the operator).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    /// CPU deadline per invocation, ms (1–10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Linear memory cap per instance, MiB (at most the server's pool maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Output cap per invocation, KiB (1–16384).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_kib: Option<u32>,
}

impl TenantLimits {
    /// Checks the ranges; `max_memory_mib` is the server's ceiling.
    pub fn validate(&self, max_memory_mib: u32) -> Result<(), Error> {
        if self.deadline_ms.is_some_and(|d| d == 0 || d > 10_000) {
            return Err(Error::Invalid("deadline_ms must be 1..=10000".into()));
        }
        if self
            .memory_mib
            .is_some_and(|m| m == 0 || m > max_memory_mib)
        {
            return Err(Error::Invalid(format!(
                "memory_mib must be 1..={max_memory_mib} (the server's pool maximum)"
            )));
        }
        if self.output_kib.is_some_and(|o| o == 0 || o > 16_384) {
            return Err(Error::Invalid("output_kib must be 1..=16384".into()));
        }
        Ok(())
    }
}

fn default_tz() -> String {
    "UTC".to_string()
}

/// Which of the four plugin worlds a component implements.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    /// `plugboard:flow/flow`: event → actions.
    Flow,
    /// `plugboard:router/router`: task × agents → ranking.
    Router,
    /// `plugboard:tts/tts`: text → audio.
    Tts,
    /// `plugboard:crm/crm`: address → profile.
    Crm,
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PluginKind::Flow => "flow",
            PluginKind::Router => "router",
            PluginKind::Tts => "tts",
            PluginKind::Crm => "crm",
        })
    }
}

/// One immutable deployed version of a plugin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PluginVersion {
    /// Plugin name within the tenant.
    pub name: String,
    /// Version number, 1, 2, 3… in deploy order.
    pub version: u64,
    /// Detected kind.
    pub kind: PluginKind,
    /// SHA-256 of the component bytes (hex).
    pub sha256: String,
    /// Component size in bytes.
    pub size: u64,
    /// Deploy time, ms since the Unix epoch.
    pub created_ms: u64,
    /// The flow document, for a declarative flow (run by the `flow-graph`
    /// component); part of the version, so rollback restores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<serde_json::Value>,
}

/// A plugin as listed: its active version and its history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PluginInfo {
    /// Plugin name.
    pub name: String,
    /// Kind of the active version.
    pub kind: PluginKind,
    /// The version new interactions get.
    pub active_version: u64,
    /// Every deployed version, oldest first.
    pub versions: Vec<PluginVersion>,
    /// Capability grants.
    pub grants: Grants,
}

impl PluginInfo {
    /// The deployed version numbered `n`, if there is one.
    pub fn version(&self, n: u64) -> Option<&PluginVersion> {
        self.versions.iter().find(|v| v.version == n)
    }
}

/// Capabilities granted to a plugin. Everything is denied by default.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Outbound HTTP, if granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpGrant>,
    /// Access to the tenant's key-value store.
    #[serde(default)]
    pub kv: bool,
}

/// The outbound HTTP grant.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpGrant {
    /// Allowed `host:port` pairs, e.g. `127.0.0.1:8081` or `crm.example.com:80`.
    pub allow: Vec<String>,
    /// Timeout per request in ms (default 2000, at most 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u32>,
    /// Response body cap in bytes (default 1 MiB, at most 16 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u32>,
}

impl Grants {
    /// Checks the grant for obvious mistakes (malformed `host:port`).
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(http) = &self.http {
            for hp in &http.allow {
                let valid = hp
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if !valid {
                    return Err(Error::Invalid(format!(
                        "http.allow entry {hp:?} must be host:port"
                    )));
                }
            }
            if http.timeout_ms.is_some_and(|t| t == 0 || t > 30_000) {
                return Err(Error::Invalid("http.timeout_ms must be 1..=30000".into()));
            }
            if http
                .max_response_bytes
                .is_some_and(|b| b > 16 * 1024 * 1024)
            {
                return Err(Error::Invalid(
                    "http.max_response_bytes must be at most 16 MiB".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Channels an interaction can arrive on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Phone call.
    #[default]
    Voice,
    /// Web chat.
    Chat,
    /// Email.
    Email,
    /// SMS.
    Sms,
    /// Fax.
    Fax,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Channel::Voice => "voice",
            Channel::Chat => "chat",
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Fax => "fax",
        })
    }
}

/// A registered contact of a SIP user (an agent's phone). Registrations
/// are soft state: kept by the registrar until they expire, and stored so
/// that a restart does not make agents unreachable until their phones
/// register again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Binding {
    /// The Contact URI.
    pub contact: String,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
    /// Where the REGISTER came from (transport and address).
    pub source: String,
}

/// A SIP user of a tenant (an agent's phone): what the registrar checks.
/// The realm is the tenant id; only digest hashes are kept, never the
/// password.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SipUser {
    /// User name (the user part of the address of record).
    pub name: String,
    /// H(name:realm:password) with MD5.
    pub ha1_md5: String,
    /// H(name:realm:password) with SHA-256.
    pub ha1_sha256: String,
    /// Created, ms since the Unix epoch.
    pub created_ms: u64,
}

/// A carrier trunk of a tenant: where outbound calls to numbers go (with
/// digest credentials if the carrier asks), and which source addresses may
/// send inbound calls to the tenant's numbers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Trunk {
    /// Name (the trunk `default` is used for numbers).
    #[serde(default)]
    pub name: String,
    /// The carrier's SIP address, `host:port`.
    pub host: String,
    /// `udp` (default) or `tcp`.
    #[serde(default = "default_transport")]
    pub transport: String,
    /// Digest user name for outbound calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Digest password for outbound calls (never returned by the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Source IPs allowed to call the tenant's numbers. When any trunk of
    /// a tenant lists some (or asks for `inbound_digest`), calls from
    /// elsewhere must authenticate, or are refused with 403.
    #[serde(default)]
    pub inbound_ips: Vec<String>,
    /// Calls from addresses not in any `inbound_ips` may authenticate with
    /// digest (challenged with 401, realm: the tenant id) as this trunk's
    /// `username` and `password`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inbound_digest: bool,
}

fn default_transport() -> String {
    "udp".into()
}

impl Trunk {
    /// Checks the fields a carrier needs: `host:port`, `udp` or `tcp`, and
    /// IP addresses in `inbound_ips`. The error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let valid_host = self
            .host
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !valid_host {
            return Err(format!("host must be host:port, got {:?}", self.host));
        }
        if !matches!(self.transport.as_str(), "udp" | "tcp") {
            return Err(format!(
                "transport must be udp or tcp, got {:?}",
                self.transport
            ));
        }
        if let Some(bad) = self
            .inbound_ips
            .iter()
            .find(|ip| ip.parse::<std::net::IpAddr>().is_err())
        {
            return Err(format!("{bad:?} is not an IP address"));
        }
        if self.inbound_digest && (self.username.is_none() || self.password.is_none()) {
            return Err("inbound_digest needs a username and a password".into());
        }
        Ok(())
    }
}

/// An address of a tenant (number, mailbox, chat widget) and the flow that answers it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Address {
    /// The address itself, normalised (a leading `+` on numbers is dropped).
    pub address: String,
    /// Channel.
    pub channel: Channel,
    /// Name of the flow plugin that answers it.
    pub flow: String,
}

/// Normalises an address for lookup: trims, lower-cases emails, drops a leading `+`.
pub fn normalize_address(a: &str) -> String {
    let a = a.trim();
    let a = a.strip_prefix('+').unwrap_or(a);
    if a.contains('@') {
        a.to_ascii_lowercase()
    } else {
        a.to_string()
    }
}

/// State of an interaction.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InteractionState {
    /// Just arrived.
    New,
    /// A flow is handling it.
    InFlow,
    /// Waiting in a queue.
    Queued,
    /// Offered to an agent.
    Offered,
    /// Connected to an agent.
    Connected,
    /// The agent is wrapping up.
    WrapUp,
    /// Finished.
    Closed,
}

/// One entry on an interaction's append-only timeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TimelineEntry {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What kind of entry: `event`, `actions`, `error`, `fallback`, `log`, `state`.
    pub kind: String,
    /// Details.
    pub data: serde_json::Value,
}

/// An interaction: one customer contact on one channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Interaction {
    /// Id, unique within the tenant, sortable by creation time.
    pub id: String,
    /// Tenant id.
    pub tenant: String,
    /// Channel.
    pub channel: Channel,
    /// Customer address.
    pub from: String,
    /// Tenant address contacted.
    pub to: String,
    /// Flow plugin handling it, and the version pinned at start.
    pub flow: Option<FlowRef>,
    /// Current state.
    pub state: InteractionState,
    /// Attributes.
    pub attributes: BTreeMap<String, String>,
    /// Whether this interaction was created by `simulate`.
    #[serde(default)]
    pub simulated: bool,
    /// Created, ms since the Unix epoch.
    pub created_ms: u64,
    /// Closed, ms since the Unix epoch.
    pub closed_ms: Option<u64>,
    /// Append-only timeline.
    pub timeline: Vec<TimelineEntry>,
}

/// A pinned flow version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowRef {
    /// Plugin name.
    pub name: String,
    /// Version.
    pub version: u64,
}

impl Interaction {
    /// Appends a timeline entry stamped now.
    pub fn push(&mut self, kind: &str, data: serde_json::Value) {
        self.timeline.push(TimelineEntry {
            at_ms: now_ms(),
            kind: kind.to_string(),
            data,
        });
    }
}

/// A new interaction id: creation time in ms (zero-padded, so ids sort by
/// time) and 8 random-ish hex digits from the caller.
pub fn interaction_id(now_ms: u64, nonce: u32) -> String {
    format!("ix-{now_ms:013}-{nonce:08x}")
}

/// A tenant-scoped key-value store, the backing of the plugins' `kv` import.
/// Implementations keep each tenant's keys apart whatever the key names.
pub trait TenantKv: Send + Sync {
    /// Reads `key` of `tenant`.
    fn kv_get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Writes `key` of `tenant`; durable on return.
    fn kv_set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<(), Error>;
    /// Deletes `key` of `tenant`; durable on return.
    fn kv_delete(&self, tenant: &str, key: &str) -> Result<(), Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("tenant", "acme-1").is_ok());
        assert!(validate_id("tenant", "").is_err());
        assert!(validate_id("tenant", "-x").is_err());
        assert!(validate_id("tenant", "Acme").is_err());
        assert!(validate_id("tenant", "a/b").is_err());
        assert!(validate_id("tenant", &"a".repeat(65)).is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(normalize_address(" +37060000000 "), "37060000000");
        assert_eq!(normalize_address("Help@Acme.com"), "help@acme.com");
    }

    #[test]
    fn grants_validate() {
        let g: Grants = serde_json::from_str(r#"{"http":{"allow":["127.0.0.1:80"]},"kv":true}"#)
            .unwrap_or_default();
        assert!(g.validate().is_ok());
        assert!(g.kv);
        let bad: Grants =
            serde_json::from_str(r#"{"http":{"allow":["nohost"]}}"#).unwrap_or_default();
        assert!(bad.validate().is_err());
        assert!(serde_json::from_str::<Grants>(r#"{"net":true}"#).is_err());
    }
}
