//! Plugboard's shared model, used by every other crate: tenants, plugins,
//! addresses, interactions with their timelines, and the JSON form of the
//! flow contract's events and actions (the WIT types in `wit/flow@0.1.0`,
//! as the HTTP API and `simulate` speak them).
//!
//! This crate does no I/O.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

pub mod conns;
pub mod flow;
pub mod message;
pub mod origin;

pub use flow::{Action, Event};
pub use message::{
    Attachment, Author, ChatWidget, Customer, CustomerAddress, DefaultAlphabet, Direction,
    HttpSmsApi, HttpSmsDialect, Message, MessageStatus, SmppLink, SmsCarrier, twilio_credentials,
};
pub use origin::{Origin, Scheme, path_within, redact_url, url_path};

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
    /// How long this tenant's data is kept; the server's defaults where
    /// unset.
    #[serde(default, skip_serializing_if = "Retention::is_unset")]
    pub retention: Retention,
}

/// How long a tenant's data is kept, in days (`None`: for good). A
/// shorter period for a part (recordings) removes it before the rest of
/// its interaction.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Interactions with everything they hold (timeline, messages,
    /// recordings, attachments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interactions_days: Option<u32>,
    /// Call recordings and voicemail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recordings_days: Option<u32>,
    /// Conversation messages (with their attachments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_days: Option<u32>,
    /// Message attachments and raw email sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments_days: Option<u32>,
    /// Faxes (the documents of fax conversations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faxes_days: Option<u32>,
}

impl Retention {
    /// No period set.
    pub fn is_unset(&self) -> bool {
        *self == Retention::default()
    }

    /// Each period of `self`, or `defaults`' where `self` has none.
    pub fn or(self, defaults: Retention) -> Retention {
        Retention {
            interactions_days: self.interactions_days.or(defaults.interactions_days),
            recordings_days: self.recordings_days.or(defaults.recordings_days),
            messages_days: self.messages_days.or(defaults.messages_days),
            attachments_days: self.attachments_days.or(defaults.attachments_days),
            faxes_days: self.faxes_days.or(defaults.faxes_days),
        }
    }
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
    /// Plugin invocations the tenant may run at once (its share of the
    /// server's pool; default a quarter of it, at most all of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Call legs the tenant may have at once (each inbound call and each
    /// leg dialled out holds a pair of media ports); default: the
    /// server's per-tenant share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls: Option<u32>,
    /// New calls per second (inbound calls and calls the platform places
    /// for the tenant; legs to its agents are not counted), with a burst
    /// of one second's worth; default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls_per_second: Option<u32>,
    /// Chat conversations open at once; default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chats: Option<u32>,
    /// Inbound messages per second on each digital channel (chat, email,
    /// SMS), with a burst of one second's worth; default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_second: Option<u32>,
    /// Agents (seats); default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<u32>,
    /// Plugins (by name); default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<u32>,
    /// Stored recordings, attachments and raw mail, MiB; default: no
    /// limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_mib: Option<u64>,
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
        if self.max_concurrent == Some(0) {
            return Err(Error::Invalid("max_concurrent must be at least 1".into()));
        }
        if self.storage_mib.is_some_and(|m| m > 1 << 30) {
            return Err(Error::Invalid(
                "storage_mib must be at most 2^30 (1 PiB)".into(),
            ));
        }
        for (name, v) in [
            ("calls_per_second", self.calls_per_second),
            ("messages_per_second", self.messages_per_second),
        ] {
            if v.is_some_and(|v| v == 0 || v > 100_000) {
                return Err(Error::Invalid(format!("{name} must be 1..=100000")));
            }
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
    /// The tenant's secrets the plugin may read (through config entries
    /// `{"secret": "NAME"}`), by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
}

/// The outbound HTTP grant.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpGrant {
    /// Allowed origins: `https://crm.example.com`, `http://10.0.0.5:8081`,
    /// or `host:port` for plain HTTP (`127.0.0.1:8081`). See [`Origin`].
    pub allow: Vec<String>,
    /// CA certificates (PEM) trusted for this grant's `https` origins,
    /// instead of the public roots: for services with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Timeout per request in ms (default 2000, at most 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u32>,
    /// Response body cap in bytes (default 1 MiB, at most 16 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u32>,
    /// Methods allowed (`GET`, `POST`, `PUT`, `PATCH`, `DELETE`,
    /// `HEAD`); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Path prefixes allowed (`/api/customers`); empty: any path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// A client certificate chain (PEM) presented to `https` origins that
    /// ask for one (mutual TLS). Its key is `client_key_secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_pem: Option<String>,
    /// The name of a tenant secret, also listed in `secrets`, holding the
    /// client certificate's private key (PEM): the key is sealed at rest
    /// like every secret and never returned by the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_secret: Option<String>,
    /// The key itself, filled in from the secret when a plugin runs;
    /// never stored or serialised.
    #[serde(skip)]
    pub client_key_pem: Option<String>,
}

impl Grants {
    /// Checks the grant for obvious mistakes (malformed origins, limits).
    pub fn validate(&self) -> Result<(), Error> {
        for name in &self.secrets {
            validate_id("secret", name)?;
        }
        if let Some(http) = &self.http {
            for entry in &http.allow {
                Origin::of_allow_entry(entry).map_err(Error::Invalid)?;
            }
            if http
                .ca_pem
                .as_ref()
                .is_some_and(|p| !p.contains("-----BEGIN CERTIFICATE-----"))
            {
                return Err(Error::Invalid(
                    "http.ca_pem must hold PEM certificates".into(),
                ));
            }
            for m in &http.methods {
                if !matches!(
                    m.as_str(),
                    "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD"
                ) {
                    return Err(Error::Invalid(format!(
                        "http.methods: {m:?} is not GET, POST, PUT, PATCH, DELETE or HEAD"
                    )));
                }
            }
            for p in &http.paths {
                if !p.starts_with('/') || p.contains(['?', '#']) {
                    return Err(Error::Invalid(format!(
                        "http.paths: {p:?} must be a path starting with /"
                    )));
                }
            }
            if http
                .client_cert_pem
                .as_ref()
                .is_some_and(|p| !p.contains("-----BEGIN CERTIFICATE-----"))
            {
                return Err(Error::Invalid(
                    "http.client_cert_pem must hold a PEM certificate chain".into(),
                ));
            }
            match (&http.client_cert_pem, &http.client_key_secret) {
                (Some(_), None) | (None, Some(_)) => {
                    return Err(Error::Invalid(
                        "http.client_cert_pem and http.client_key_secret go together".into(),
                    ));
                }
                (_, Some(k)) if !self.secrets.contains(k) => {
                    return Err(Error::Invalid(format!(
                        "http.client_key_secret {k:?} must also be listed in secrets"
                    )));
                }
                _ => {}
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

/// How a supervisor joins an agent's call (Asterisk's ChanSpy modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MonitorMode {
    /// Hears both parties; nobody hears the supervisor.
    Listen,
    /// Hears both parties; only the agent hears the supervisor (coaching).
    Whisper,
    /// Three-way: everyone hears everyone.
    Barge,
}

/// Channels an interaction can arrive on.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash, Default,
)]
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

impl Channel {
    /// Whether its interactions are conversations of messages (chat,
    /// email, SMS).
    pub fn is_text(self) -> bool {
        matches!(self, Channel::Chat | Channel::Email | Channel::Sms)
    }
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
    /// Fax calls out through this trunk go over to T.38 once answered
    /// (we send the re-INVITE to `image/t38`, as FreeSWITCH's
    /// `fax_enable_t38_request` does); without it they stay on G.711
    /// unless the far end asks for T.38.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub t38: bool,
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

/// Whether `to` is a phone number a call or fax may be placed to (2 to
/// 20 digits, an optional leading `+`), never a SIP URI — a caller's From
/// can be anything, and a reply must not dial it.
pub fn is_phone_number(to: &str) -> bool {
    let digits = to.trim().trim_start_matches('+');
    (2..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
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

/// State of an interaction: a state machine,
/// `new → in_flow → queued → offered → connected → wrap_up → closed`, with
/// `abandoned` (the customer left while queued or offered) and `failed`
/// (it could not be handled) as the other ends. [`Interaction::set_state`]
/// refuses a transition the machine does not have.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum InteractionState {
    /// Just arrived.
    New,
    /// A flow is handling it.
    InFlow,
    /// Waiting in a queue.
    Queued,
    /// Offered to an agent (reserved, not yet accepted).
    Offered,
    /// Connected to an agent.
    Connected,
    /// The agent is wrapping up.
    WrapUp,
    /// Finished.
    Closed,
    /// The customer left while waiting (queued or offered).
    Abandoned,
    /// It could not be handled (a system failure before it was served).
    Failed,
}

impl InteractionState {
    /// True for the ends: closed, abandoned, failed.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            InteractionState::Closed | InteractionState::Abandoned | InteractionState::Failed
        )
    }

    /// Whether the machine goes from `self` to `next` (staying is not a
    /// transition).
    pub fn can_become(self, next: InteractionState) -> bool {
        use InteractionState::*;
        match (self, next) {
            (a, b) if a == b => false,
            (Closed | Abandoned | Failed, _) => false,
            // Anything open can fail, and be closed by the system.
            (_, Failed | Closed) => true,
            (New, InFlow | Queued | Abandoned) => true,
            // The flow enqueues, or connects the customer straight to an
            // agent (transfer to a known agent).
            (InFlow, Queued | Connected) => true,
            // Offered to an agent, left, or back to a flow (queue timeout,
            // callback offer).
            (Queued, Offered | Abandoned | InFlow) => true,
            // Accepted; rejected or timed out (back to the queue); left.
            (Offered, Connected | Queued | Abandoned) => true,
            // Wrap-up; transfer to a queue or a flow.
            (Connected, WrapUp | Queued | InFlow) => true,
            _ => false,
        }
    }

    /// The stable name (as serialised).
    pub fn name(self) -> &'static str {
        match self {
            InteractionState::New => "new",
            InteractionState::InFlow => "in_flow",
            InteractionState::Queued => "queued",
            InteractionState::Offered => "offered",
            InteractionState::Connected => "connected",
            InteractionState::WrapUp => "wrap_up",
            InteractionState::Closed => "closed",
            InteractionState::Abandoned => "abandoned",
            InteractionState::Failed => "failed",
        }
    }
}

impl fmt::Display for InteractionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a timeline entry records. Each kind has a stable name (its
/// serialised form, snake_case) that records, the event stream and
/// reports rely on; the entry's `data` carries the details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    // The flow: what it was told, what it answered, how it failed.
    /// `event`: an event given to the flow.
    Event,
    /// `actions`: the actions the flow answered.
    Actions,
    /// `error`: the flow failed (code and message).
    Error,
    /// `fallback`: the safe actions used instead.
    Fallback,
    /// `log`: a line the plugin logged.
    Log,
    /// `host_call`: a host import the plugin called (http, kv, …).
    HostCall,
    /// `state`: the interaction moved through its state machine.
    State,
    // A call's life.
    /// `call`: the call arrived (signalling, codec, media addresses).
    Call,
    /// `answered`: the caller's ACK arrived.
    Answered,
    /// `dtmf`: a digit and how it came.
    Dtmf,
    /// `sdp_answer`: the answer to an offer of ours.
    SdpAnswer,
    /// `hold`: the caller put the call on hold.
    Hold,
    /// `resume`: the caller took it off hold.
    Resume,
    /// `parked`: the caller waits with music where no queue takes them
    /// (the queue does not exist).
    Parked,
    // The ACD.
    /// `queued`: the interaction waits in an ACD queue.
    Queued,
    /// `offered`: an agent was offered it (on voice: their phone rings).
    Offered,
    /// `agent_missed`: the agent offered it did not take it (busy, no
    /// answer, rang out, no phone).
    AgentMissed,
    /// `agent_connected`: an agent took it.
    AgentConnected,
    /// `queue_left`: it left the queue for its flow (`max_wait`, `full`).
    QueueLeft,
    /// `whisper`: the queue's whisper was played to the agent before the
    /// customer was connected.
    Whisper,
    /// `position`: the waiting customer was told their place and
    /// expected wait.
    Position,
    /// `consult`: a warm transfer's consultation (started, answered,
    /// failed, completed, cancelled).
    Consult,
    /// `monitor`: a supervisor listened, whispered or barged in (or
    /// stopped, or their phone could not be reached).
    Monitor,
    /// `media`: media statistics at the end.
    Media,
    /// `media_timeout`: no RTP for too long.
    MediaTimeout,
    /// `hangup`: how it ended, and who ended it.
    Hangup,
    // Outbound legs.
    /// `dial`: a dial started.
    Dial,
    /// `transfer`: a transfer started.
    Transfer,
    /// `dial_ringing`: the far end rings.
    DialRinging,
    /// `dial_answered`: the far end answered.
    DialAnswered,
    /// `dial_failed`: the leg could not be made.
    DialFailed,
    /// `dial_ended`: the leg ended.
    DialEnded,
    /// `refer`: the far end passed the call on (REFER).
    Refer,
    // Audio.
    /// `play_failed`: a clip could not be played (with a code).
    PlayFailed,
    /// `recording`: a recording was stored.
    Recording,
    /// `recording_failed`: a recording could not be stored.
    RecordingFailed,
    /// `recording_paused`: the conversation's recording is paused (its
    /// audio is silence until resumed: card numbers, as PCI DSS asks).
    RecordingPaused,
    /// `recording_resumed`: the conversation's recording goes on.
    RecordingResumed,
    /// `tts_plugin`: the tenant's tts plugin spoke or rewrote the text.
    TtsPlugin,
    /// `tts_plugin_failed`: the tenant's tts plugin failed.
    TtsPluginFailed,
    /// `tts_failed`: no speech could be made.
    TtsFailed,
    /// `ignored_action`: an action the channel does not carry out.
    IgnoredAction,
    // Digital channels.
    /// `message`: a message came in or went out (its id, direction and
    /// author; the text is in the message record).
    Message,
    /// `message_status`: an outbound message was sent, delivered, read,
    /// or failed.
    MessageStatus,
    /// `sent`: the flow's `send` started a conversation on another
    /// channel (its interaction and message ids), or could not (why).
    Sent,
    /// `fax`: the call was taken over by a fax terminal (`receive_fax`, or
    /// the fax tone heard), and how the fax went.
    Fax,
}

impl EntryKind {
    /// The stable name.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// One entry on an interaction's append-only timeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TimelineEntry {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What kind of entry.
    pub kind: EntryKind,
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
    /// Append-only timeline: its entries from [`Interaction::timeline_base`]
    /// on (all of them unless the record was loaded without them).
    pub timeline: Vec<TimelineEntry>,
    /// How many stored entries come before `timeline` (not serialised): 0
    /// for a whole record; the stored count for a record loaded with
    /// `interaction_head`, which then only gathers new entries.
    #[serde(skip)]
    pub timeline_base: usize,
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
    /// Moves the interaction to `next`, with a `state` entry on the
    /// timeline; staying in the same state is a no-op. A transition the
    /// state machine does not have is an error and changes nothing.
    pub fn set_state(&mut self, next: InteractionState) -> Result<(), Error> {
        if self.state == next {
            return Ok(());
        }
        if !self.state.can_become(next) {
            return Err(Error::Invalid(format!(
                "interaction {} cannot go from {} to {next}",
                self.id, self.state
            )));
        }
        self.push(
            EntryKind::State,
            serde_json::json!({"from": self.state, "to": next}),
        );
        self.state = next;
        Ok(())
    }

    /// How many entries the timeline has, those not loaded included.
    pub fn timeline_len(&self) -> usize {
        self.timeline_base + self.timeline.len()
    }

    /// Appends a timeline entry stamped now.
    pub fn push(&mut self, kind: EntryKind, data: serde_json::Value) {
        self.timeline.push(TimelineEntry {
            at_ms: now_ms(),
            kind,
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
/// Async: a plugin waiting on the store is a parked future.
#[async_trait::async_trait]
pub trait TenantKv: Send + Sync {
    /// Reads `key` of `tenant`.
    async fn kv_get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Writes `key` of `tenant`; durable on return.
    async fn kv_set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<(), Error>;
    /// Deletes `key` of `tenant`; durable on return.
    async fn kv_delete(&self, tenant: &str, key: &str) -> Result<(), Error>;
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
    fn interaction_state_machine() {
        use InteractionState::*;
        let all = [
            New, InFlow, Queued, Offered, Connected, WrapUp, Closed, Abandoned, Failed,
        ];
        // The ends are final.
        for end in [Closed, Abandoned, Failed] {
            assert!(all.iter().all(|s| !end.can_become(*s)), "{end}");
        }
        // The happy path.
        let path = [New, InFlow, Queued, Offered, Connected, WrapUp, Closed];
        for w in path.windows(2) {
            assert!(w[0].can_become(w[1]), "{} -> {}", w[0], w[1]);
        }
        // Only waiting customers abandon; nothing goes back to new.
        for s in all {
            assert_eq!(
                s.can_become(Abandoned),
                matches!(s, New | Queued | Offered),
                "{s}"
            );
            assert!(!s.can_become(New), "{s}");
        }
        assert!(!InFlow.can_become(WrapUp));
        assert!(!Queued.can_become(Connected), "an agent is offered first");

        let mut ix = Interaction {
            id: "ix-1".into(),
            tenant: "t".into(),
            channel: Channel::Voice,
            from: "1".into(),
            to: "2".into(),
            flow: None,
            state: InFlow,
            attributes: BTreeMap::new(),
            simulated: false,
            created_ms: 0,
            closed_ms: None,
            timeline: Vec::new(),
            timeline_base: 0,
        };
        assert!(ix.set_state(Queued).is_ok());
        assert!(ix.set_state(Queued).is_ok(), "staying is a no-op");
        assert!(matches!(ix.set_state(WrapUp), Err(Error::Invalid(_))));
        assert_eq!(ix.state, Queued, "a refused transition changes nothing");
        assert!(ix.set_state(Abandoned).is_ok());
        assert!(ix.set_state(Closed).is_err());
        let states: Vec<_> = ix.timeline.iter().map(|e| e.data["to"].clone()).collect();
        assert_eq!(states, ["queued", "abandoned"]);
        assert_eq!(serde_json::to_value(InFlow).unwrap_or_default(), "in_flow");
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
