//! What the web chat channel needs from the core: each chat address's
//! widget settings, visitor tokens (an anonymous visitor keeps its
//! identity across page reloads), verified identities signed by the
//! tenant's site, typing indicators on the event stream, and the
//! conversation a visitor is in.

use crate::{Engine, EngineResult};
use hmac::{Hmac, Mac};
use plugboard_core::{Address, Author, Channel, ChatWidget, Error as CoreError, Message};
use serde_json::json;
use sha2::Sha256;
use std::sync::Arc;

/// Record kind of widget settings, by address.
const CHAT_WIDGET: &str = "chat_widget";

/// How a visitor's id starts: an anonymous visitor (`v-…`, given by the
/// server) or a user the tenant's site vouched for (`u-…`).
const ANON: &str = "v-";
const VERIFIED: &str = "u-";

/// A chat address, its tenant and its widget's settings.
#[derive(Debug, Clone)]
pub struct ChatAddress {
    /// The tenant that owns it.
    pub tenant: String,
    /// The address (its flow).
    pub address: Address,
    /// The widget's settings (defaults when none were set).
    pub widget: ChatWidget,
}

impl Engine {
    /// Sets a chat address's widget settings.
    pub async fn set_chat_widget(
        &self,
        tenant: &str,
        address: &str,
        widget: ChatWidget,
    ) -> EngineResult<ChatWidget> {
        widget.validate()?;
        let a = self.chat_address_of(tenant, address).await?;
        self.store
            .set_record(
                tenant,
                CHAT_WIDGET,
                &a.address,
                &serde_json::to_value(&widget).unwrap_or_default(),
            )
            .await?;
        Ok(widget)
    }

    /// A chat address of the tenant (`NotFound` if it is not one).
    async fn chat_address_of(&self, tenant: &str, address: &str) -> EngineResult<Address> {
        self.store
            .address(tenant, &plugboard_core::normalize_address(address))
            .await?
            .filter(|a| a.channel == Channel::Chat)
            .ok_or_else(|| CoreError::NotFound(format!("chat address {address}")).into())
    }

    /// A chat address with its widget settings, whatever tenant owns it
    /// (the widget's endpoint is public); `NotFound` if it is none.
    pub async fn chat_address(&self, address: &str) -> EngineResult<ChatAddress> {
        let (tenant, address) = self
            .route_address(address)
            .await?
            .filter(|(_, a)| a.channel == Channel::Chat)
            .ok_or_else(|| CoreError::NotFound(format!("chat address {address}")))?;
        let widget = self.widget_record(&tenant, &address.address).await?;
        Ok(ChatAddress {
            tenant,
            address,
            widget,
        })
    }

    /// A tenant's widget settings for a chat address.
    pub async fn chat_widget(&self, tenant: &str, address: &str) -> EngineResult<ChatWidget> {
        let a = self.chat_address_of(tenant, address).await?;
        self.widget_record(tenant, &a.address).await
    }

    /// The stored settings of a chat address (defaults when none were set).
    async fn widget_record(&self, tenant: &str, address: &str) -> EngineResult<ChatWidget> {
        match self.store.record(tenant, CHAT_WIDGET, address).await? {
            Some(v) => serde_json::from_value(v)
                .map_err(|e| CoreError::Storage(format!("bad chat widget record: {e}")).into()),
            None => Ok(ChatWidget::default()),
        }
    }

    fn visitor_mac(&self, address: &str, visitor: &str) -> EngineResult<String> {
        let mac = self
            .secret_key()?
            .mac("chat-visitor", format!("{address}\0{visitor}").as_bytes());
        Ok(hex::encode(&mac[..16]))
    }

    /// A new anonymous visitor of a chat address: its id and the token
    /// the widget keeps (the id and a MAC by the server's key, bound to
    /// the address).
    pub fn new_visitor(&self, address: &str) -> EngineResult<(String, String)> {
        let visitor = format!(
            "{ANON}{:016x}{:08x}",
            crate::interaction_nonce()?,
            crate::interaction_nonce()?
        );
        let token = format!("{visitor}.{}", self.visitor_mac(address, &visitor)?);
        Ok((visitor, token))
    }

    /// The visitor a token names, if the server gave it for this address.
    pub fn visitor_of_token(&self, address: &str, token: &str) -> Option<String> {
        let (visitor, mac) = token.split_once('.')?;
        if !visitor.starts_with(ANON) || visitor.len() > 64 {
            return None;
        }
        let want = self.visitor_mac(address, visitor).ok()?;
        constant_time_eq(want.as_bytes(), mac.as_bytes()).then(|| visitor.to_string())
    }

    /// The visitor id of a user the tenant's site vouches for: `hash` is
    /// hex HMAC-SHA256 of `user_id` under the widget's identity secret.
    /// `None` when the widget has no identity secret or the hash is wrong.
    pub async fn verified_visitor(
        &self,
        chat: &ChatAddress,
        user_id: &str,
        hash: &str,
    ) -> EngineResult<Option<String>> {
        let Some(name) = &chat.widget.identity_secret else {
            return Ok(None);
        };
        if user_id.is_empty() || user_id.len() > 128 || user_id.chars().any(char::is_control) {
            return Ok(None);
        }
        let Some(secret) = self.tenant_secret(&chat.tenant, name).await? else {
            return Ok(None);
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
            return Ok(None);
        };
        mac.update(user_id.as_bytes());
        let want = hex::encode(mac.finalize().into_bytes());
        Ok(
            constant_time_eq(want.as_bytes(), hash.to_ascii_lowercase().as_bytes())
                .then(|| format!("{VERIFIED}{user_id}")),
        )
    }

    /// Someone started or stopped typing in a conversation: an event on
    /// the tenant's stream (not stored).
    pub fn typing(&self, tenant: &str, ix: &str, author: &Author, on: bool) {
        self.publish(
            tenant,
            json!({"interaction": ix, "kind": "typing", "data": {"author": author, "on": on}}),
        );
    }

    /// A message sent to `visitor` marked delivered or read by the
    /// visitor's widget; `NotFound` for a message that is not theirs.
    pub async fn visitor_saw(
        self: &Arc<Self>,
        tenant: &str,
        visitor: &str,
        id: &str,
        status: plugboard_core::MessageStatus,
    ) -> EngineResult<Message> {
        let m = self.message(tenant, id).await?;
        if m.channel != Channel::Chat
            || m.to != visitor
            || m.direction != plugboard_core::Direction::Outbound
        {
            return Err(CoreError::NotFound(format!("message {id}")).into());
        }
        self.message_status(tenant, id, status, None).await
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}
