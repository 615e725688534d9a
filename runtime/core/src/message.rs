//! Messages of the digital channels (chat, email, SMS) and the customers
//! who send them.
//!
//! A conversation on a digital channel is an [`crate::Interaction`]; its
//! messages, inbound and outbound, are [`Message`]s kept beside the
//! interaction's timeline. A [`Customer`] ties the addresses one person
//! writes or calls from together, so their history across channels is one
//! query.

use crate::{Channel, Error};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which way a message went.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the customer to the tenant.
    Inbound,
    /// From the tenant (its flow, an agent, the API) to the customer.
    Outbound,
}

/// Who wrote a message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Author {
    /// The customer.
    Customer,
    /// The tenant's flow (`say`, `reply`, a `gather` prompt).
    Flow,
    /// An agent, by id.
    Agent {
        /// Agent id.
        id: String,
    },
    /// The tenant's API key (an integration).
    Api,
    /// The platform itself (a bounce, an automatic notice).
    System,
}

/// Where a message stands. Inbound messages are `received` (durable) and
/// then `read` when an agent or the flow has seen them; outbound ones go
/// `queued → sent → delivered` (or `failed`), and `read` where the channel
/// reports it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// Stored (inbound).
    Received,
    /// Waiting in the outbox (outbound).
    Queued,
    /// Handed to the channel's next hop (smart host, SMSC, the widget).
    Sent,
    /// The far end reported delivery (an SMS receipt, a widget's ack).
    Delivered,
    /// The reader saw it.
    Read,
    /// It could not be delivered (after the retries, or a permanent
    /// refusal); `error` says why.
    Failed,
}

impl MessageStatus {
    /// How far along a status is: a status update never moves a message
    /// back (a late "sent" after "delivered" is ignored). `failed` is final.
    pub fn rank(self) -> u8 {
        match self {
            MessageStatus::Received | MessageStatus::Queued => 0,
            MessageStatus::Sent => 1,
            MessageStatus::Delivered => 2,
            MessageStatus::Read => 3,
            MessageStatus::Failed => 4,
        }
    }
}

/// A file sent with a message, stored as a blob of the tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    /// File name as the sender gave it (sanitised).
    pub name: String,
    /// MIME type.
    pub content_type: String,
    /// Size in bytes.
    pub size: u64,
    /// The blob id (`GET /v1/tenants/{t}/blobs/{id}`).
    pub blob: String,
}

/// One message of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    /// Id, unique within the tenant, sortable by creation time.
    pub id: String,
    /// The interaction (conversation) it belongs to.
    pub interaction: String,
    /// Channel.
    pub channel: Channel,
    /// Inbound or outbound.
    pub direction: Direction,
    /// Who wrote it.
    pub author: Author,
    /// Sender address (the customer's, or the tenant's for outbound).
    pub from: String,
    /// Recipient address.
    pub to: String,
    /// Plain text.
    pub text: String,
    /// Subject (email).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Attached files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    /// Status.
    pub status: MessageStatus,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The sender's own id for it (a chat client's message id): a retry
    /// with the same id is the same message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The channel's id for it (an email's Message-ID, an SMSC's message
    /// id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// Channel details (email threading headers, authentication results,
    /// the raw message's blob).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Created, ms since the Unix epoch.
    pub created_ms: u64,
    /// Last status change, ms since the Unix epoch.
    pub updated_ms: u64,
}

/// A new message id: creation time in ms (zero-padded, so ids sort by
/// time) and 8 hex digits of randomness from the caller.
pub fn message_id(now_ms: u64, nonce: u32) -> String {
    format!("msg-{now_ms:013}-{nonce:08x}")
}

/// One address of a customer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct CustomerAddress {
    /// The channel the address is used on (`voice` and `sms` share phone
    /// numbers: the number is one address for both).
    pub channel: Channel,
    /// The address, normalised ([`crate::normalize_address`]).
    pub address: String,
}

/// A person who contacts the tenant, on any channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Customer {
    /// Id, unique within the tenant.
    pub id: String,
    /// Display name, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Every address known to be theirs.
    pub addresses: Vec<CustomerAddress>,
    /// Attributes (from a CRM, a flow, an agent).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// When this record was merged into another: the one it lives on as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    /// Created, ms since the Unix epoch.
    pub created_ms: u64,
}

/// The key under which an address is indexed to its customer: phone
/// numbers are one address whether they call or text.
pub fn customer_address_key(channel: Channel, address: &str) -> String {
    let address = crate::normalize_address(address);
    let class = match channel {
        Channel::Voice | Channel::Sms | Channel::Fax => "tel",
        Channel::Email => "email",
        Channel::Chat => "chat",
    };
    format!("{class}:{address}")
}

/// A chat widget's settings (one per chat address).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatWidget {
    /// Origins whose pages may open the widget (`https://shop.example`,
    /// `http://127.0.0.1:8000`); empty: any. A browser always names the
    /// page's origin; a client that names none (an agent's tool, a test)
    /// is let in.
    #[serde(default)]
    pub origins: Vec<String>,
    /// The tenant secret whose value signs verified visitors: the site
    /// sends `hash = hex(HMAC-SHA256(secret, user_id))` with its user's
    /// id, as Intercom and Chatwoot do. Unset: visitors are anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_secret: Option<String>,
    /// Largest file a visitor may send, bytes.
    #[serde(default = "default_chat_file")]
    pub max_file_bytes: u64,
    /// The widget's title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// The default largest chat file: 5 MiB.
pub const CHAT_FILE_DEFAULT: u64 = 5 * 1024 * 1024;
/// The largest a widget may allow: 20 MiB.
pub const CHAT_FILE_MAX: u64 = 20 * 1024 * 1024;

fn default_chat_file() -> u64 {
    CHAT_FILE_DEFAULT
}

impl Default for ChatWidget {
    fn default() -> Self {
        ChatWidget {
            origins: Vec::new(),
            identity_secret: None,
            max_file_bytes: CHAT_FILE_DEFAULT,
            title: None,
        }
    }
}

impl ChatWidget {
    /// Checks the settings: origins are `scheme://host[:port]`, the file
    /// cap is 1 byte..=[`CHAT_FILE_MAX`].
    pub fn validate(&self) -> Result<(), Error> {
        for o in &self.origins {
            crate::Origin::of_url(o).map_err(|e| Error::Invalid(format!("origin {o:?}: {e}")))?;
            if crate::url_path(o).is_some_and(|p| p != "/" && !p.is_empty()) {
                return Err(Error::Invalid(format!(
                    "origin {o:?}: an origin has no path"
                )));
            }
        }
        if self.max_file_bytes == 0 || self.max_file_bytes > CHAT_FILE_MAX {
            return Err(Error::Invalid(format!(
                "max_file_bytes is 1..={CHAT_FILE_MAX}"
            )));
        }
        if let Some(name) = &self.identity_secret {
            crate::validate_id("secret", name)?;
        }
        if self.title.as_ref().is_some_and(|t| t.len() > 200) {
            return Err(Error::Invalid("a title is at most 200 bytes".into()));
        }
        Ok(())
    }

    /// Whether a page of `origin` (the browser's `Origin` header) may
    /// open the widget.
    pub fn allows(&self, origin: &str) -> bool {
        if self.origins.is_empty() {
            return true;
        }
        let Ok(o) = crate::Origin::of_url(origin) else {
            return false;
        };
        self.origins
            .iter()
            .any(|a| crate::Origin::of_url(a).is_ok_and(|a| a == o))
    }
}

/// Limits on what a message may carry.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Checks text a sender wrote: not empty (unless there are attachments),
/// at most [`MAX_TEXT_BYTES`].
pub fn validate_text(text: &str, has_attachments: bool) -> Result<(), Error> {
    if text.trim().is_empty() && !has_attachments {
        return Err(Error::Invalid(
            "a message needs text or an attachment".into(),
        ));
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(Error::Invalid(format!(
            "a message's text is at most {MAX_TEXT_BYTES} bytes, this one has {}",
            text.len()
        )));
    }
    Ok(())
}

/// How the SMSC reads `data_coding` 0 ("the SMSC's default alphabet"):
/// almost always GSM 03.38, one septet per octet; some carriers use
/// Latin-1 or ASCII.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAlphabet {
    /// GSM 03.38, unpacked.
    #[default]
    Gsm7,
    /// ISO 8859-1.
    Latin1,
    /// US-ASCII (IA5).
    Ascii,
}

/// An SMPP connection to a carrier's SMSC.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SmppLink {
    /// The SMSC's host name or IP address.
    pub host: String,
    /// Its port (2775 is usual).
    #[serde(default = "default_smpp_port")]
    pub port: u16,
    /// The account (`system_id`, at most 15 characters).
    pub system_id: String,
    /// The tenant secret holding the password (at most 8 characters, as
    /// SMPP 3.4 says).
    pub password_secret: String,
    /// `system_type`, if the carrier wants one (at most 12 characters).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub system_type: String,
    /// Short messages in flight at once (the carrier's window).
    #[serde(default = "default_window")]
    pub window: u32,
    /// How the SMSC reads `data_coding` 0.
    #[serde(default)]
    pub default_alphabet: DefaultAlphabet,
    /// Seconds between `enquire_link`s.
    #[serde(default = "default_enquire_link")]
    pub enquire_link_secs: u32,
}

fn default_smpp_port() -> u16 {
    2775
}

fn default_window() -> u32 {
    10
}

fn default_enquire_link() -> u32 {
    30
}

/// A tenant's SMS carrier: how its numbers send and receive texts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SmsCarrier {
    /// Name, unique within the tenant (set from the URL).
    #[serde(default)]
    pub name: String,
    /// The tenant's SMS addresses (numbers, alphanumeric senders) it
    /// carries; empty: every SMS address of the tenant not named by
    /// another carrier.
    #[serde(default)]
    pub numbers: Vec<String>,
    /// An SMPP link to the carrier's SMSC…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smpp: Option<SmppLink>,
    /// … or the carrier's HTTP API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSmsApi>,
}

/// Twilio's credentials from a carrier secret `ACCOUNT_SID:AUTH_TOKEN`:
/// both parts, or `None` when either is missing (an empty token would
/// let anyone sign webhooks).
pub fn twilio_credentials(secret: &str) -> Option<(&str, &str)> {
    secret
        .split_once(':')
        .filter(|(sid, token)| !sid.is_empty() && !token.is_empty())
}

/// How a carrier's HTTP API speaks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HttpSmsDialect {
    /// Twilio's Messages API: sends are form POSTs with Basic auth
    /// (`ACCOUNT_SID:AUTH_TOKEN`); inbound and status webhooks are form
    /// POSTs signed `X-Twilio-Signature` (HMAC-SHA1 with the auth token).
    Twilio,
    /// Plugboard's JSON: `{"id","from","to","text"}` both ways and status
    /// `{"id","status","error"}`, each signed `X-Plugboard-Signature:
    /// t=UNIX,v1=HEX` (HMAC-SHA256 of `UNIX.BODY`) as our webhooks are.
    Json,
}

/// A carrier's HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpSmsApi {
    /// How it speaks.
    pub dialect: HttpSmsDialect,
    /// Where messages are sent (Twilio:
    /// `https://api.twilio.com/2010-04-01/Accounts/SID/Messages.json`).
    pub send_url: String,
    /// The tenant secret with the credentials: `ACCOUNT_SID:AUTH_TOKEN`
    /// (Twilio) or the signing key (JSON).
    pub secret: String,
    /// This server's base URL as the carrier reaches it
    /// (`https://sms.example.com`): Twilio signs the whole URL of its
    /// webhooks, and status callbacks are asked for at
    /// `{public_url}/sms/{tenant}/{carrier}/status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

/// SMPP limits on a bind's fields.
const SMPP_SYSTEM_ID_MAX: usize = 15;
const SMPP_PASSWORD_MAX: usize = 8;
const SMPP_SYSTEM_TYPE_MAX: usize = 12;

impl SmsCarrier {
    /// Checks the settings: a host, SMPP's field lengths, a window of
    /// 1..=100, `enquire_link` every 5..=300 s, numbers that are phone
    /// numbers or alphanumeric senders.
    pub fn validate(&self) -> Result<(), Error> {
        crate::validate_id("carrier", &self.name)?;
        for n in &self.numbers {
            let n = crate::normalize_address(n);
            if n.is_empty() || n.len() > 20 || !n.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(Error::Invalid(format!(
                    "{n:?} is not a phone number or an alphanumeric sender"
                )));
            }
        }
        let l = match (&self.smpp, &self.http) {
            (Some(l), None) => l,
            (None, Some(h)) => {
                crate::validate_id("secret", &h.secret)?;
                for url in std::iter::once(&h.send_url).chain(&h.public_url) {
                    crate::Origin::of_url(url)
                        .map_err(|e| Error::Invalid(format!("{url:?}: {e}")))?;
                }
                return Ok(());
            }
            _ => {
                return Err(Error::Invalid(
                    "a carrier has either `smpp` or `http`".into(),
                ));
            }
        };
        if l.host.is_empty()
            || l.host.len() > 253
            || l.host
                .chars()
                .any(|c| c.is_whitespace() || c == '/' || c == '@')
        {
            return Err(Error::Invalid(format!(
                "smpp.host {:?} is not a host",
                l.host
            )));
        }
        if l.port == 0 {
            return Err(Error::Invalid("smpp.port is 1..=65535".into()));
        }
        let printable = |s: &str| s.chars().all(|c| c.is_ascii_graphic());
        if l.system_id.is_empty()
            || l.system_id.len() > SMPP_SYSTEM_ID_MAX
            || !printable(&l.system_id)
        {
            return Err(Error::Invalid(format!(
                "smpp.system_id is 1..={SMPP_SYSTEM_ID_MAX} printable ASCII characters"
            )));
        }
        if l.system_type.len() > SMPP_SYSTEM_TYPE_MAX || !printable(&l.system_type) {
            return Err(Error::Invalid(format!(
                "smpp.system_type is at most {SMPP_SYSTEM_TYPE_MAX} printable ASCII characters"
            )));
        }
        crate::validate_id("secret", &l.password_secret)?;
        if !(1..=100).contains(&l.window) {
            return Err(Error::Invalid("smpp.window is 1..=100".into()));
        }
        if !(5..=300).contains(&l.enquire_link_secs) {
            return Err(Error::Invalid("smpp.enquire_link_secs is 5..=300".into()));
        }
        Ok(())
    }

    /// The tenant secret it needs.
    pub fn secret_name(&self) -> &str {
        match (&self.smpp, &self.http) {
            (Some(l), _) => &l.password_secret,
            (None, Some(h)) => &h.secret,
            (None, None) => "",
        }
    }

    /// Whether the password from its secret fits SMPP 3.4.
    pub fn check_password(password: &str) -> Result<(), Error> {
        if password.is_empty() || password.len() > SMPP_PASSWORD_MAX || !password.is_ascii() {
            return Err(Error::Invalid(format!(
                "an SMPP password is 1..={SMPP_PASSWORD_MAX} ASCII characters"
            )));
        }
        Ok(())
    }

    /// Whether it carries `number` (normalised), given every carrier of
    /// the tenant: named numbers go to the carrier naming them; the rest
    /// go to a carrier that names none.
    pub fn carries(&self, number: &str, all: &[SmsCarrier]) -> bool {
        let named = |c: &SmsCarrier| {
            c.numbers
                .iter()
                .any(|n| crate::normalize_address(n) == number)
        };
        if self.numbers.is_empty() {
            !all.iter().any(named)
        } else {
            named(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_are_one_address_across_voice_and_sms() {
        assert_eq!(
            customer_address_key(Channel::Voice, "+37060000001"),
            customer_address_key(Channel::Sms, "37060000001")
        );
        assert_ne!(
            customer_address_key(Channel::Chat, "37060000001"),
            customer_address_key(Channel::Sms, "37060000001")
        );
        assert_eq!(
            customer_address_key(Channel::Email, "Ann@Example.COM"),
            "email:ann@example.com"
        );
    }

    #[test]
    fn status_never_goes_back() {
        assert!(MessageStatus::Delivered.rank() > MessageStatus::Sent.rank());
        assert!(MessageStatus::Failed.rank() > MessageStatus::Read.rank());
    }

    #[test]
    fn text_limits() {
        assert!(validate_text("hi", false).is_ok());
        assert!(validate_text("  ", false).is_err());
        assert!(validate_text("", true).is_ok());
        assert!(validate_text(&"x".repeat(MAX_TEXT_BYTES + 1), false).is_err());
    }

    #[test]
    fn ids_sort_by_time() {
        assert!(message_id(2, 0) > message_id(1, u32::MAX));
    }
}
