//! Replies out through a smart host: lettre's async SMTP client builds
//! and sends them; the engine's outbox retries what the host defers.
//!
//! Each reply carries `In-Reply-To` (the customer's last message) and
//! `References` (the thread's ids), so the customer's mail program
//! threads it, and a Message-ID made from the message's own id, so a
//! resend after a crash is recognisably the same message.

use std::time::Duration;

use std::sync::{Arc, Weak};

use lettre::message::dkim::{
    DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm,
    DkimSigningKey,
};
use lettre::message::header::HeaderName;
use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use plugboard_core::{Direction, Message};
use plugboard_engine::{Courier, Delivered, DeliveryError, Engine};

/// The email channel's courier: a smart host reached with lettre. Mail
/// from a domain the tenant gave a DKIM key is signed with it.
pub struct SmartHost {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    engine: Weak<Engine>,
}

/// Why a smart host could not be configured.
#[derive(Debug, thiserror::Error)]
#[error("smart host {url}: {why}")]
pub struct RelayError {
    url: String,
    why: String,
}

impl SmartHost {
    /// Checks a smart host URL without connecting (and without a
    /// runtime: for settings checked at start).
    pub fn check(url: &str) -> Result<(), RelayError> {
        AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map(|_| ())
            .map_err(|e| RelayError {
                url: plugboard_core::redact_url(url, true),
                why: e.to_string(),
            })
    }

    /// A smart host (inside a tokio runtime: its connection pool runs
    /// there) from a URL: `smtp://host:port` (plain),
    /// `smtp://host:port?tls=required` (STARTTLS), `smtps://host:port`,
    /// with `user:password@` for authentication.
    pub fn new(url: &str, engine: &Arc<Engine>) -> Result<SmartHost, RelayError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| RelayError {
                url: plugboard_core::redact_url(url, true),
                why: e.to_string(),
            })?
            .timeout(Some(Duration::from_secs(30)))
            .build();
        Ok(SmartHost {
            transport,
            engine: Arc::downgrade(engine),
        })
    }

    /// Signs `email` with the DKIM key of the sender's domain, if the
    /// tenant set one. A key that cannot be used fails the message for
    /// good (sending it unsigned would break the domain's DMARC policy).
    async fn sign(
        &self,
        tenant: &str,
        message: &Message,
        email: &mut lettre::Message,
    ) -> Result<(), DeliveryError> {
        let Some(engine) = self.engine.upgrade() else {
            return Err(DeliveryError::Retry("the server is stopping".into()));
        };
        let Some((_, domain)) = message.from.rsplit_once('@') else {
            return Ok(());
        };
        let setting = engine
            .email_domain_key(tenant, domain)
            .await
            .map_err(|e| DeliveryError::Retry(format!("DKIM settings: {e}")))?;
        let Some((setting, pem)) = setting else {
            return Ok(());
        };
        let key = DkimSigningKey::new(&pem, DkimSigningAlgorithm::Rsa)
            .map_err(|e| DeliveryError::Permanent(format!("DKIM key of {domain}: {e:?}")))?;
        // relaxed/relaxed: the signature survives relays that refold
        // headers (lettre's simple header canonicalisation did not verify
        // against its own folded DKIM-Signature header).
        let headers = [
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "In-Reply-To",
            "References",
        ]
        .into_iter()
        .map(HeaderName::new_from_ascii_str)
        .collect();
        let canon = DkimCanonicalization {
            header: DkimCanonicalizationType::Relaxed,
            body: DkimCanonicalizationType::Relaxed,
        };
        let config = DkimConfig::new(
            setting.dkim_selector,
            domain.to_string(),
            key,
            headers,
            canon,
        );
        email.sign(&config);
        Ok(())
    }
}

/// The Message-ID of one of our messages: its id at the sender's domain.
pub fn our_message_id(message: &Message) -> String {
    let domain = message
        .from
        .rsplit_once('@')
        .map(|(_, d)| d)
        .filter(|d| !d.is_empty())
        .unwrap_or("plugboard.invalid");
    format!("{}@{domain}", message.id)
}

/// The subject of a reply: the conversation's, with one `Re: `.
fn reply_subject(message: &Message, history: &[Message]) -> String {
    if let Some(s) = &message.subject {
        return s.clone();
    }
    let base = history
        .iter()
        .rev()
        .find_map(|m| m.subject.clone())
        .unwrap_or_default();
    let lower = base.to_ascii_lowercase();
    if lower.starts_with("re:") || base.is_empty() {
        if base.is_empty() {
            "Re: your message".into()
        } else {
            base
        }
    } else {
        format!("Re: {base}")
    }
}

/// Builds the email for an outbound message of a conversation.
pub fn build(message: &Message, history: &[Message]) -> Result<lettre::Message, DeliveryError> {
    let from: Mailbox = message
        .from
        .parse()
        .map_err(|e| DeliveryError::Permanent(format!("bad sender {}: {e}", message.from)))?;
    let to: Mailbox = message
        .to
        .parse()
        .map_err(|e| DeliveryError::Permanent(format!("bad recipient {}: {e}", message.to)))?;
    let mut b = lettre::Message::builder()
        .from(from)
        .to(to)
        .subject(reply_subject(message, history))
        .message_id(Some(format!("<{}>", our_message_id(message))))
        .date_now();
    // The thread's ids, oldest first: the customer's messages' own ids,
    // ours as we sent them. The last inbound one is what this answers.
    let ids: Vec<String> = history
        .iter()
        .filter(|m| m.id != message.id && m.created_ms <= message.created_ms)
        .filter_map(|m| m.external_id.clone())
        .collect();
    if let Some(last) = history
        .iter()
        .rev()
        .filter(|m| m.direction == Direction::Inbound && m.created_ms <= message.created_ms)
        .find_map(|m| m.external_id.clone())
    {
        b = b.in_reply_to(format!("<{last}>"));
    }
    if !ids.is_empty() {
        // At most the last 20 (RFC 5322 lets us trim the middle).
        let keep = &ids[ids.len().saturating_sub(20)..];
        let refs = keep
            .iter()
            .map(|i| format!("<{i}>"))
            .collect::<Vec<_>>()
            .join(" ");
        b = b.references(refs);
    }
    b.header(ContentType::TEXT_PLAIN)
        .body(message.text.clone())
        .map_err(|e| DeliveryError::Permanent(format!("cannot build the email: {e}")))
}

#[async_trait::async_trait]
impl Courier for SmartHost {
    async fn deliver(
        &self,
        tenant: &str,
        message: &Message,
        history: &[Message],
    ) -> Result<Delivered, DeliveryError> {
        let mut email = build(message, history)?;
        self.sign(tenant, message, &mut email).await?;
        match self.transport.send(email).await {
            Ok(_) => Ok(Delivered {
                external_id: Some(our_message_id(message)),
                ..Delivered::default()
            }),
            Err(e) if e.is_permanent() => Err(DeliveryError::Permanent(e.to_string())),
            Err(e) => Err(DeliveryError::Retry(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugboard_core::{Author, Channel, MessageStatus};

    fn msg(id: &str, dir: Direction, ext: Option<&str>, at: u64) -> Message {
        Message {
            id: id.into(),
            interaction: "ix-1".into(),
            channel: Channel::Email,
            direction: dir,
            author: Author::Customer,
            from: if dir == Direction::Inbound {
                "ann@example.com"
            } else {
                "help@acme.test"
            }
            .into(),
            to: if dir == Direction::Inbound {
                "help@acme.test"
            } else {
                "ann@example.com"
            }
            .into(),
            text: "hello".into(),
            subject: (dir == Direction::Inbound).then(|| "Order".to_string()),
            attachments: vec![],
            status: MessageStatus::Queued,
            error: None,
            client_id: None,
            external_id: ext.map(str::to_string),
            meta: Default::default(),
            created_ms: at,
            updated_ms: at,
        }
    }

    #[test]
    fn a_reply_threads_on_the_customers_message() {
        let history = vec![
            msg("m1", Direction::Inbound, Some("c1@example.com"), 1),
            msg("m2", Direction::Outbound, Some("m2@acme.test"), 2),
            msg("m3", Direction::Inbound, Some("c2@example.com"), 3),
        ];
        let reply = msg("m4", Direction::Outbound, None, 4);
        let email = build(&reply, &history).unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8_lossy(&email.formatted()).into_owned();
        assert!(text.contains("In-Reply-To: <c2@example.com>"), "{text}");
        assert!(
            text.contains("References: <c1@example.com> <m2@acme.test> <c2@example.com>"),
            "{text}"
        );
        assert!(text.contains("Message-ID: <m4@acme.test>"), "{text}");
        assert!(text.contains("Subject: Re: Order"), "{text}");
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            plugboard_core::redact_url("smtp://u:secret@relay:25", true),
            "smtp://u:********@relay:25"
        );
        assert_eq!(
            plugboard_core::redact_url("smtp://relay:25", true),
            "smtp://relay:25"
        );
    }
}
