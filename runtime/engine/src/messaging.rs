//! Conversations on the digital channels (chat, email, SMS): the part of
//! the application core the channel drivers share.
//!
//! A channel hands every inbound message to [`Engine::receive`], which
//! makes it durable before it returns (the channel then acknowledges:
//! SMTP `250`, the widget's ack, SMPP `deliver_sm_resp`). Nothing else
//! happens before that write, and everything after it can be redone:
//!
//! - The message, its thread keys and a `pending` marker are one atomic
//!   write ([`plugboard_store::RecordStore::apply_records`]); a client
//!   message id makes a retry find the first write instead of adding a
//!   second message.
//! - A worker per conversation (one at a time, in arrival order) runs the
//!   flow on each pending message. The flow's replies (`say`, `reply`,
//!   a `gather` prompt) become outbound messages; they, the outbox
//!   entries, the flow's new state and the removal of the marker are
//!   again one atomic write. A crash before it leaves the marker, and the
//!   message is taken up again at start ([`Engine::resume_conversations`]).
//! - The outbox hands each outbound message to its channel's
//!   [`Courier`], with retries and backoff, and records what became of
//!   it. A conversation's messages are handed over one at a time, in the
//!   order they were made (a later one waits while an earlier one is
//!   retried), so customers read replies in order; conversations go out
//!   side by side. A message the courier took is not sent again, except when the
//!   server died between the hand-over and that record: then it is sent
//!   again with the same id (an email's Message-ID), which receivers use
//!   to drop the duplicate.
//!
//! While an agent has the conversation (the flow enqueued it and the ACD
//! offered it), customer messages go to the agent — on the event stream —
//! not to the flow; agents reply with [`Engine::reply`].
//!
//! A [`Customer`] ties addresses together: every conversation's sender is
//! linked to one (created on first contact), customers are merged when
//! someone says two are the same person, and [`Engine::customer_history`]
//! lists their conversations on every channel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plugboard_core::flow::Action;
use plugboard_core::message::{customer_address_key, message_id, validate_text};
use plugboard_core::{
    Address, Attachment, Author, Channel, Customer, CustomerAddress, Direction, EntryKind,
    Error as CoreError, Event, Interaction, InteractionState, Message, MessageStatus, now_ms,
};
use plugboard_store::{RecordWrite, hash_key};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::acd::lock;
use crate::{Engine, EngineError, EngineResult, FlowSession, TaskNews, TaskSpec};

/// Record kinds.
pub(crate) const MSG_INDEX: &str = "msg";
const THREAD: &str = "thread";
const CLIENT_ID: &str = "client_id";
const EXTERNAL_ID: &str = "external_id";
pub(crate) const PENDING_IX: &str = "pending_ix";
pub(crate) const CONVERSATION: &str = "conversation";
pub(crate) const OUTBOX: &str = "outbox";
pub(crate) const CUSTOMER: &str = "customer";
pub(crate) const CUSTOMER_ADDR: &str = "customer_addr";
const EMAIL_DOMAIN: &str = "email_domain";

/// How a tenant's email domain signs what it sends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmailDomain {
    /// The DKIM selector (`s1` publishes its key at `s1._domainkey.DOMAIN`).
    pub dkim_selector: String,
    /// The tenant secret holding the DKIM private key (PKCS#1 PEM for
    /// RSA).
    pub dkim_key_secret: String,
}

/// The record kind of a conversation's messages.
pub(crate) fn conv_kind(ix: &str) -> String {
    format!("conv/{ix}")
}

/// The record kind of a conversation's messages not yet run through its
/// flow.
pub(crate) fn pending_kind(ix: &str) -> String {
    format!("pending/{ix}")
}

/// The record kind listing the keys that lead to a conversation (thread
/// keys, channel ids, client ids) as `{kind}/{id}`, so that erasure and
/// retention find them without a scan.
pub(crate) fn keys_kind(ix: &str) -> String {
    format!("ixkeys/{ix}")
}

/// A write of a key that leads to conversation `ix`, with its listing.
fn key_writes(writes: &mut Vec<RecordWrite>, ix: &str, kind: &str, id: String, value: Value) {
    writes.push(RecordWrite::put(
        keys_kind(ix),
        format!("{kind}/{id}"),
        json!({}),
    ));
    writes.push(RecordWrite::put(kind, id, value));
}

/// Attempts before an outbound message is given up as failed.
const MAX_ATTEMPTS: u32 = 8;

/// An inbound message as a channel hands it over.
#[derive(Debug, Clone, Default)]
pub struct Inbound {
    /// Channel (the address must be one of this channel).
    pub channel: Channel,
    /// The tenant the channel serves, when it serves one (an SMS
    /// carrier's link): the address must be that tenant's.
    pub tenant: Option<String>,
    /// The customer's address.
    pub from: String,
    /// The customer's display name, if the channel gives one.
    pub name: Option<String>,
    /// The tenant's address written to.
    pub to: String,
    /// Plain text.
    pub text: String,
    /// Subject (email).
    pub subject: Option<String>,
    /// Files: name, MIME type, bytes (stored as blobs).
    pub files: Vec<(String, String, Vec<u8>)>,
    /// The sender's id for the message: a retry with the same id is the
    /// same message.
    pub client_id: Option<String>,
    /// The channel's id for it (email Message-ID, SMSC message id).
    pub external_id: Option<String>,
    /// Keys naming the conversation this message continues, if one has
    /// them (email: the In-Reply-To and References ids; chat: the
    /// visitor's session; SMS: the number pair).
    pub thread: Vec<String>,
    /// Keys this message adds to its conversation (email: its own
    /// Message-ID, so replies to it find it).
    pub own_keys: Vec<String>,
    /// Channel details kept on the message.
    pub meta: BTreeMap<String, String>,
    /// The message exactly as it came (an email's source), kept as a
    /// blob beside the parsed message (`meta.raw`).
    pub raw: Option<Vec<u8>>,
    /// Written by a machine (a bounce, an auto-reply): stored, but never
    /// run through the flow, so no answer goes back (no mail loops).
    pub automatic: bool,
    /// A delivery failure report for one of our messages: its id on the
    /// channel (the Message-ID we sent) and why. The report joins that
    /// message's conversation and marks the message failed.
    pub bounce_of: Option<(String, String)>,
}

/// What [`Engine::receive`] stored.
#[derive(Debug, Clone)]
pub struct Received {
    /// The tenant the address belongs to.
    pub tenant: String,
    /// The stored message (the first one, for a retry).
    pub message: Message,
    /// True when this was a retry of a message already stored.
    pub duplicate: bool,
}

/// Why a courier could not hand a message over.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    /// Worth trying again later (the next hop is down or busy).
    #[error("{0}")]
    Retry(String),
    /// It will never go (refused recipient, bad address).
    #[error("{0}")]
    Permanent(String),
    /// Not tried: this server cannot take it on now (the tenant's call
    /// limits, no line free). Tried again later without counting as an
    /// attempt.
    #[error("{0}")]
    Deferred(String),
}

/// What a courier reports for a message it handed over.
#[derive(Debug, Clone, Default)]
pub struct Delivered {
    /// The next hop's id for it (SMSC message id), if it gave one.
    pub external_id: Option<String>,
    /// Further ids the next hop gave it (the SMSC's ids of a long text's
    /// other parts): receipts naming them find the message too.
    pub aliases: Vec<String>,
    /// Details to keep on the message.
    pub meta: BTreeMap<String, String>,
}

/// Carries outbound messages of one channel to the next hop: a channel
/// driver registers one with [`Engine::set_courier`].
#[async_trait::async_trait]
pub trait Courier: Send + Sync {
    /// Hands `message` over; `history` is its conversation so far, oldest
    /// first (email threads replies on it).
    async fn deliver(
        &self,
        tenant: &str,
        message: &Message,
        history: &[Message],
    ) -> Result<Delivered, DeliveryError>;

    /// Whether [`Courier::deliver`] reads the conversation's history
    /// (when not, it gets none and the outbox need not load it).
    fn needs_history(&self) -> bool {
        true
    }

    /// The first wait before a message is tried again (doubling after
    /// each try, to at least five minutes): a fax line that was busy is
    /// called again minutes later, not seconds.
    fn first_backoff(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// A conversation's own record: the flow's state and what holds it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ConversationRecord {
    /// The flow's state string.
    #[serde(default)]
    flow_state: String,
    /// The ACD task, while it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<String>,
    /// The customer linked to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    customer: Option<String>,
    /// Set once closed: later messages start a new conversation.
    #[serde(default)]
    closed: bool,
}

/// An outbox entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutboxEntry {
    interaction: String,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    next_ms: u64,
}

/// A conversation's turn: held while its messages are worked on.
type Turn = Arc<tokio::sync::Mutex<()>>;

/// A conversation's turn, held; on drop, the lock leaves the map unless
/// someone else holds or waits for it.
struct TurnGuard<'a> {
    workers: &'a Mutex<HashMap<(String, String), Turn>>,
    key: (String, String),
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for TurnGuard<'_> {
    fn drop(&mut self) {
        self.held = None;
        let mut workers = lock(self.workers);
        if workers
            .get(&self.key)
            .is_some_and(|w| Arc::strong_count(w) == 1)
        {
            workers.remove(&self.key);
        }
    }
}

/// The messaging state of the engine: the conversation workers' locks,
/// the couriers and the outbox's lanes.
#[derive(Default)]
pub(crate) struct Hub {
    /// One lock per conversation being worked on.
    workers: Mutex<HashMap<(String, String), Turn>>,
    couriers: Mutex<HashMap<Channel, Arc<dyn Courier>>>,
    /// The outbox: per (tenant, conversation) with messages to hand over,
    /// their ids (which sort in the order the messages were made). A
    /// lane's task hands over its first message and removes the lane when
    /// it is empty.
    lanes: Mutex<HashMap<(String, String), BTreeSet<String>>>,
    /// At most [`SLOTS`] hand-overs at once per channel (each courier may
    /// limit further): a channel whose hand-overs take minutes (a fax)
    /// never holds up another's.
    slots: Mutex<HashMap<Channel, Arc<tokio::sync::Semaphore>>>,
    /// Wakes lanes waiting for a channel's courier.
    courier_added: Arc<tokio::sync::Notify>,
}

impl Hub {
    /// Sizes for `/metrics`: conversations being worked on, and outbox
    /// lanes with their messages (bounded by the durable outbox).
    pub(crate) fn table_sizes(&self) -> Vec<(&'static str, usize, Option<usize>)> {
        let lanes = lock(&self.lanes);
        vec![
            ("conversation_workers", lock(&self.workers).len(), None),
            ("outbox_lanes", lanes.len(), None),
            (
                "outbox_lane_messages",
                lanes.values().map(BTreeSet::len).sum(),
                None,
            ),
        ]
    }
}

/// The rate bucket of messages the tenant sends on a channel.
fn out_bucket(channel: Channel) -> &'static str {
    match channel {
        Channel::Chat => "chat-out",
        Channel::Email => "email-out",
        Channel::Fax => "fax-out",
        _ => "sms-out",
    }
}

/// A conversation's interaction record as it is first made: in its flow
/// (pinned to the active version when the flow first runs), nothing on
/// its timeline.
fn conversation_interaction(
    id: &str,
    tenant: &str,
    channel: Channel,
    (from, to): (&str, &str),
    flow: &str,
    created_ms: u64,
) -> Interaction {
    Interaction {
        id: id.to_string(),
        tenant: tenant.to_string(),
        channel,
        from: from.to_string(),
        to: to.to_string(),
        flow: Some(plugboard_core::FlowRef {
            name: flow.to_string(),
            version: 0,
        }),
        state: InteractionState::InFlow,
        attributes: BTreeMap::new(),
        simulated: false,
        created_ms,
        closed_ms: None,
        timeline: Vec::new(),
        timeline_base: 0,
    }
}

/// What a flow's `send` did, for its interaction's timeline.
pub fn sent_note(channel: Channel, to: &str, sent: &EngineResult<Message>) -> Value {
    match sent {
        Ok(m) => {
            json!({"channel": channel, "to": to, "interaction": m.interaction, "message": m.id})
        }
        Err(e) => json!({"channel": channel, "to": to, "error": e.to_string()}),
    }
}

/// Hand-overs at once per channel.
const SLOTS: usize = 64;

/// A message that starts a conversation from the tenant's side (a fax
/// sent over the API, a flow's `send`), for
/// [`Engine::start_conversation`].
#[derive(Debug, Clone, Default)]
pub struct Outbound {
    /// Channel (the `from` address must be one of this channel).
    pub channel: Channel,
    /// The tenant's address it is sent from.
    pub from: String,
    /// The customer's address.
    pub to: String,
    /// Plain text (a fax with no document is this text, set on a page).
    pub text: String,
    /// Files: name, MIME type, bytes (stored as blobs).
    pub files: Vec<(String, String, Vec<u8>)>,
    /// Details kept on the message.
    pub meta: BTreeMap<String, String>,
    /// Subject (email).
    pub subject: Option<String>,
    /// Who sends it (`None`: the tenant's API key).
    pub author: Option<Author>,
}

/// A new message id for a message created at `now_ms`: ids this process
/// makes sort in the order it made them, also within one millisecond (a
/// flow step's replies; a visitor's history is shown in id order), and
/// stay unique across nodes (16 bits of randomness).
fn next_message_id(now_ms: u64) -> EngineResult<String> {
    static LAST: Mutex<(u64, u32)> = Mutex::new((0, 0));
    let (ms, seq) = {
        let mut last = lock(&LAST);
        *last = if now_ms > last.0 {
            (now_ms, 0)
        } else {
            (last.0, last.1.wrapping_add(1) & 0xffff)
        };
        *last
    };
    let nonce = (seq << 16) | (crate::interaction_nonce()? & 0xffff);
    Ok(message_id(ms, nonce))
}

/// A message's status change as webhooks report it.
fn status_change(m: &Message) -> Value {
    json!({"id": m.id, "interaction": m.interaction, "status": m.status, "error": m.error})
}

fn storage_json<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> EngineResult<T> {
    serde_json::from_value(v)
        .map_err(|e| CoreError::Storage(format!("bad {what} record: {e}")).into())
}

fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The record id of a thread key (hashed: keys are arbitrary text).
fn thread_id(channel: Channel, key: &str) -> String {
    hash_key(&format!("{channel}\n{key}"))
}

impl Engine {
    /// Registers the courier of a channel's outbound messages; messages
    /// that waited for it go out.
    pub fn set_courier(self: &Arc<Self>, channel: Channel, courier: Arc<dyn Courier>) {
        lock(&self.messaging.couriers).insert(channel, courier);
        self.messaging.courier_added.notify_waiters();
    }

    /// Stores an inbound message durably and starts its conversation's
    /// flow step in the background. `NotFound` when the address is no
    /// tenant's address on this channel.
    pub async fn receive(self: &Arc<Self>, inbound: Inbound) -> EngineResult<Received> {
        let (tenant, address) = self
            .route_address(&inbound.to)
            .await?
            .filter(|(t, a)| {
                a.channel == inbound.channel && inbound.tenant.as_ref().is_none_or(|it| it == t)
            })
            .ok_or_else(|| {
                CoreError::NotFound(format!(
                    "{} is not a {} address here",
                    inbound.to, inbound.channel
                ))
            })?;
        validate_text(&inbound.text, !inbound.files.is_empty())?;
        let received = self.store_inbound(&tenant, &address, inbound).await?;
        if !received.duplicate {
            self.kick_conversation(&tenant, &received.message.interaction);
        }
        Ok(received)
    }

    async fn store_inbound(
        self: &Arc<Self>,
        tenant: &str,
        address: &Address,
        inbound: Inbound,
    ) -> EngineResult<Received> {
        let channel = inbound.channel;
        // The conversation it continues, if an open one has its key.
        let mut ix = None;
        for key in &inbound.thread {
            // A key of an inbound message, or the id a channel gave one
            // of ours (a reply to our email names our Message-ID).
            let id = thread_id(channel, key);
            let found = match self.store.record(tenant, THREAD, &id).await? {
                Some(t) => Some(t),
                None => self.store.record(tenant, EXTERNAL_ID, &id).await?,
            };
            if let Some(t) = found
                && let Some(id) = t["interaction"].as_str()
                && !self.conversation(tenant, id).await?.closed
            {
                ix = Some(id.to_string());
                break;
            }
        }
        // A bounce joins the conversation of the message that bounced.
        let mut bounced = None;
        if let Some((ext, _)) = &inbound.bounce_of
            && let Some(m) = self.message_by_external_id(tenant, channel, ext).await?
        {
            ix = Some(m.interaction.clone());
            bounced = Some(m);
        }
        let created = now_ms();
        let fresh = ix.is_none();
        let ix = match ix {
            Some(ix) => ix,
            None => plugboard_core::interaction_id(created, crate::interaction_nonce()?),
        };
        // The same sender's id, to the same address: one email to two of
        // the tenant's mailboxes is two messages, a retry of it is not.
        let guard = inbound.client_id.as_ref().map(|c| {
            let from = plugboard_core::normalize_address(&inbound.from);
            hash_key(&format!("{channel}\n{from}\n{}\n{c}", address.address))
        });
        // A retry of a message already stored is answered with it before
        // anything is stored again (or refused for a full storage).
        if let Some(g) = &guard
            && let Some(first) = self.store.record(tenant, CLIENT_ID, g).await?
        {
            return self.duplicate(tenant, &first).await;
        }
        // What it stores counts against the tenant's storage.
        let stored_bytes = inbound
            .files
            .iter()
            .map(|(_, _, b)| b.len() as u64)
            .chain(inbound.raw.as_ref().map(|r| r.len() as u64))
            .sum::<u64>();
        if stored_bytes > 0 {
            self.check_storage(tenant, stored_bytes).await?;
        }
        let mut attachments = Vec::new();
        for (name, content_type, bytes) in &inbound.files {
            let blob = format!("att-{created:013}-{:08x}", crate::interaction_nonce()?);
            self.store.put_blob_soft(tenant, &blob, bytes).await?;
            attachments.push(Attachment {
                name: sanitise_name(name),
                content_type: content_type.clone(),
                size: bytes.len() as u64,
                blob,
            });
        }
        let mut meta = inbound.meta;
        if let Some(raw) = &inbound.raw {
            let blob = format!("raw-{created:013}-{:08x}", crate::interaction_nonce()?);
            self.store.put_blob_soft(tenant, &blob, raw).await?;
            meta.insert("raw".into(), blob);
        }
        if let Some(n) = &inbound.name {
            meta.insert("name".into(), n.clone());
        }
        let message = Message {
            id: next_message_id(created)?,
            interaction: ix.clone(),
            channel,
            direction: Direction::Inbound,
            author: if inbound.automatic || bounced.is_some() {
                Author::System
            } else {
                Author::Customer
            },
            from: plugboard_core::normalize_address(&inbound.from),
            to: address.address.clone(),
            text: inbound.text,
            subject: inbound.subject,
            attachments,
            status: MessageStatus::Received,
            error: None,
            client_id: inbound.client_id.clone(),
            external_id: inbound.external_id.clone(),
            meta,
            created_ms: created,
            updated_ms: created,
        };
        let mut writes = Vec::new();
        if let Some(g) = &guard {
            key_writes(
                &mut writes,
                &ix,
                CLIENT_ID,
                g.clone(),
                json!({"interaction": ix, "message": message.id}),
            );
        }
        writes.push(RecordWrite::put(
            conv_kind(&ix),
            &message.id,
            to_json(&message),
        ));
        writes.push(RecordWrite::put(
            MSG_INDEX,
            &message.id,
            json!({"interaction": ix}),
        ));
        writes.push(crate::usage::message_write(&message, stored_bytes));
        for key in inbound.thread.iter().chain(&inbound.own_keys) {
            key_writes(
                &mut writes,
                &ix,
                THREAD,
                thread_id(channel, key),
                json!({"interaction": ix}),
            );
        }
        if let Some(ext) = &message.external_id {
            key_writes(
                &mut writes,
                &ix,
                EXTERNAL_ID,
                thread_id(channel, ext),
                json!({"interaction": ix, "message": message.id}),
            );
        }
        // A conversation that starts with a machine's message (a fax call
        // that brought no page) runs no flow: it is closed as it is made,
        // so nobody replies into it and later messages start their own.
        let machine_started = fresh && inbound.automatic;
        if machine_started {
            let closed = ConversationRecord {
                closed: true,
                ..ConversationRecord::default()
            };
            writes.push(RecordWrite::put(CONVERSATION, &ix, to_json(&closed)));
        }
        if !inbound.automatic && bounced.is_none() {
            writes.push(RecordWrite::put(
                pending_kind(&ix),
                &message.id,
                json!({"flow": address.flow}),
            ));
            writes.push(RecordWrite::put(PENDING_IX, &ix, json!({})));
        }
        let mut failed = None;
        if let (Some(original), Some((_, why))) = (&bounced, &inbound.bounce_of)
            && original.status != MessageStatus::Failed
        {
            let mut f = original.clone();
            f.status = MessageStatus::Failed;
            f.error = Some(format!("bounced: {why}"));
            f.updated_ms = created;
            writes.push(RecordWrite::put(
                conv_kind(&f.interaction),
                &f.id,
                to_json(&f),
            ));
            failed = Some(f);
        }
        let mut hooks = self
            .hook_writes(tenant, "message", &to_json(&message), &mut writes)
            .await?;
        if let Some(f) = &failed {
            hooks.extend(
                self.hook_writes(tenant, "message_status", &status_change(f), &mut writes)
                    .await?,
            );
        }
        let first = self
            .store
            .apply_records(tenant, &writes, guard.as_deref().map(|g| (CLIENT_ID, g)))
            .await?;
        if let Some(first) = first {
            return self.duplicate(tenant, &first).await;
        }
        self.capacity().add_stored(tenant, stored_bytes);
        self.start_hooks(tenant, hooks);
        if machine_started {
            // No flow will run it, so no worker writes its record.
            let mut record = conversation_interaction(
                &ix,
                tenant,
                channel,
                (&message.from, &message.to),
                &address.flow,
                created,
            );
            record.state = InteractionState::Closed;
            record.closed_ms = Some(created);
            record.push(
                EntryKind::Message,
                json!({"id": message.id, "direction": "inbound", "author": message.author}),
            );
            if let Err(e) = self.store.save_interaction(&record, 0).await {
                tracing::warn!("record of conversation {ix}: {e}");
            }
        }
        self.publish(
            tenant,
            json!({"interaction": ix, "kind": "message", "data": message}),
        );
        if let Some(f) = &failed {
            self.publish_status(tenant, f);
        }
        Ok(Received {
            tenant: tenant.to_string(),
            message,
            duplicate: false,
        })
    }

    async fn conversation(&self, tenant: &str, ix: &str) -> EngineResult<ConversationRecord> {
        match self.store.record(tenant, CONVERSATION, ix).await? {
            Some(v) => storage_json(v, "conversation"),
            None => Ok(ConversationRecord::default()),
        }
    }

    async fn message_in(&self, tenant: &str, ix: &str, id: &str) -> EngineResult<Message> {
        let v = self
            .store
            .record(tenant, &conv_kind(ix), id)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("message {id}")))?;
        storage_json(v, "message")
    }

    /// The messages of a conversation, oldest first.
    pub async fn messages(&self, tenant: &str, ix: &str) -> EngineResult<Vec<Message>> {
        self.store
            .records(tenant, &conv_kind(ix))
            .await?
            .into_iter()
            .map(|v| storage_json(v, "message"))
            .collect()
    }

    /// The newest conversation a thread key (a chat visitor, an email
    /// Message-ID) belongs to, open or closed.
    pub async fn thread_conversation(
        &self,
        tenant: &str,
        channel: Channel,
        key: &str,
    ) -> EngineResult<Option<String>> {
        Ok(self
            .store
            .record(tenant, THREAD, &thread_id(channel, key))
            .await?
            .and_then(|t| t["interaction"].as_str().map(str::to_string)))
    }

    /// The agent who holds (or last held) a conversation's task, if any.
    pub fn conversation_agent(&self, tenant: &str, ix: &str) -> Option<String> {
        self.task(tenant, ix).ok().and_then(|v| v.agent)
    }

    /// An attachment or a raw message of the tenant (a blob named by a
    /// message).
    pub async fn attachment(&self, tenant: &str, blob: &str) -> EngineResult<Vec<u8>> {
        let not_found = || EngineError::from(CoreError::NotFound(format!("blob {blob}")));
        if !(blob.starts_with("att-") || blob.starts_with("raw-")) {
            return Err(not_found());
        }
        self.store.blob(tenant, blob).await?.ok_or_else(not_found)
    }

    /// One message of the tenant by id.
    pub async fn message(&self, tenant: &str, id: &str) -> EngineResult<Message> {
        let ix = self
            .store
            .record(tenant, MSG_INDEX, id)
            .await?
            .and_then(|v| v["interaction"].as_str().map(str::to_string))
            .ok_or_else(|| CoreError::NotFound(format!("message {id}")))?;
        self.message_in(tenant, &ix, id).await
    }

    /// The message a channel knows by its own id (an SMSC's message id
    /// in a delivery receipt), if there is one.
    pub async fn message_by_external_id(
        &self,
        tenant: &str,
        channel: Channel,
        external_id: &str,
    ) -> EngineResult<Option<Message>> {
        let Some(v) = self
            .store
            .record(tenant, EXTERNAL_ID, &thread_id(channel, external_id))
            .await?
        else {
            return Ok(None);
        };
        let (Some(ix), Some(id)) = (v["interaction"].as_str(), v["message"].as_str()) else {
            return Ok(None);
        };
        Ok(Some(self.message_in(tenant, ix, id).await?))
    }

    /// Runs the conversation's pending messages through its flow in the
    /// background (one worker per conversation at a time).
    fn kick_conversation(self: &Arc<Self>, tenant: &str, ix: &str) {
        let (engine, tenant, ix) = (self.clone(), tenant.to_string(), ix.to_string());
        // Its log lines carry the tenant and interaction.
        let span = tracing::info_span!("conversation", tenant = %tenant, interaction = %ix);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(e) = engine.work_conversation(&tenant, &ix).await {
                    tracing::warn!("conversation {ix} of {tenant}: {e}");
                }
            },
            span,
        ));
    }

    /// Takes up every conversation with messages not yet run through its
    /// flow (after a restart), and starts the outbox with what it holds.
    /// Returns how many conversations were taken up.
    pub async fn resume_conversations(self: &Arc<Self>) -> EngineResult<usize> {
        let mut n = 0;
        for t in self.tenants().await? {
            // The outbox first: a conversation's older replies are queued
            // before a step taken up below can add newer ones.
            for (id, entry) in self
                .store
                .records_after(&t.id, OUTBOX, "", usize::MAX)
                .await?
            {
                match storage_json::<OutboxEntry>(entry, "outbox") {
                    Ok(entry) => self.to_outbox(&t.id, &entry.interaction, &id),
                    Err(e) => tracing::warn!("outbox {id} of {}: {e}", t.id),
                }
            }
            for (ix, _) in self
                .store
                .records_after(&t.id, PENDING_IX, "", usize::MAX)
                .await?
            {
                self.kick_conversation(&t.id, &ix);
                n += 1;
            }
            self.resume_hooks(&t.id).await?;
        }
        Ok(n)
    }

    async fn work_conversation(self: &Arc<Self>, tenant: &str, ix: &str) -> EngineResult<()> {
        let _turn = self.turn(tenant, ix).await;
        loop {
            let pending = self
                .store
                .records_after(tenant, &pending_kind(ix), "", 64)
                .await?;
            if pending.is_empty() {
                // Removing the index races with a new message's write of
                // it: look again after removing, and put it back if one came.
                // (Losing the removal in a crash is harmless: the restart
                // finds nothing pending.)
                self.store
                    .apply_records_soft(tenant, &[RecordWrite::delete(PENDING_IX, ix)])
                    .await?;
                if self
                    .store
                    .records_after(tenant, &pending_kind(ix), "", 1)
                    .await?
                    .is_empty()
                {
                    break;
                }
                self.store
                    .apply_records(tenant, &[RecordWrite::put(PENDING_IX, ix, json!({}))], None)
                    .await?;
                continue;
            }
            for (id, p) in pending {
                let flow = p["flow"].as_str().unwrap_or_default().to_string();
                self.step_conversation(tenant, ix, &id, &flow).await?;
            }
        }
        Ok(())
    }

    /// Runs one pending inbound message: through the flow, or to the
    /// agent who has the conversation.
    async fn step_conversation(
        self: &Arc<Self>,
        tenant: &str,
        ix: &str,
        msg_id: &str,
        flow: &str,
    ) -> EngineResult<()> {
        let message = self.message_in(tenant, ix, msg_id).await?;
        let mut conv = self.conversation(tenant, ix).await?;
        let existing = self.store.interaction_head(tenant, ix).await?;
        let fresh = existing.is_none();
        let interaction = existing.unwrap_or_else(|| {
            conversation_interaction(
                ix,
                tenant,
                message.channel,
                (&message.from, &message.to),
                flow,
                message.created_ms,
            )
        });
        let mut session = self
            .resume_session(interaction, conv.flow_state.clone())
            .await?;
        let mut writes = Vec::new();
        if fresh {
            let customer = self
                .link_customer(
                    tenant,
                    message.channel,
                    &message.from,
                    message.meta.get("name"),
                )
                .await?;
            session
                .interaction
                .attributes
                .insert("customer".into(), customer.clone());
            conv.customer = Some(customer);
        } else if let (Some(id), Some(name)) = (&conv.customer, message.meta.get("name")) {
            // A name learnt later (the first message had none).
            let c = self.customer(tenant, id).await?;
            if c.name.is_none() {
                let c = Customer {
                    name: Some(name.clone()),
                    ..c
                };
                writes.push(RecordWrite::put(CUSTOMER, &c.id, to_json(&c)));
            }
        }
        session.note(
            EntryKind::Message,
            json!({"id": message.id, "direction": "inbound", "author": message.author}),
        );
        let mut outbound = Vec::new();
        let task = match &conv.task {
            Some(t) => self
                .task(tenant, t)
                .ok()
                .filter(|v| matches!(v.state.as_str(), "waiting" | "offered" | "connected")),
            None => None,
        };
        if task.is_some() {
            // An agent has it, or will: the message is theirs (on the
            // event stream), not the flow's.
        } else if !conv.closed {
            conv.task = None;
            if fresh {
                let step = session.handle(Event::Started).await;
                self.carry_out(&mut session, &mut conv, step.actions, &mut outbound)
                    .await;
            }
            if !conv.closed && session.interaction.state == InteractionState::InFlow {
                let step = session
                    .handle(Event::Message {
                        text: message.text.clone(),
                        subject: message.subject.clone(),
                        attachments: message.attachments.iter().map(|a| a.name.clone()).collect(),
                    })
                    .await;
                self.carry_out(&mut session, &mut conv, step.actions, &mut outbound)
                    .await;
            }
        }
        writes.push(RecordWrite::delete(pending_kind(ix), msg_id));
        self.finish_step(session, conv, outbound, writes).await
    }

    /// Carries out a flow's actions on a conversation: text becomes
    /// outbound messages, `enqueue` hands it to the ACD, `hangup` closes
    /// it; what a text channel cannot do is noted and skipped.
    async fn carry_out(
        self: &Arc<Self>,
        session: &mut FlowSession,
        conv: &mut ConversationRecord,
        actions: Vec<Action>,
        outbound: &mut Vec<Message>,
    ) {
        for action in actions {
            let text = match &action {
                Action::Say { text, .. } | Action::Reply { text } => Some(text.clone()),
                Action::Gather { prompt, .. } => prompt.as_ref().map(|p| p.text.clone()),
                _ => None,
            };
            if let Some(text) = text {
                // An empty prompt sends nothing (a flow that only listens).
                if !text.trim().is_empty() {
                    match self.new_outbound(&session.interaction, Author::Flow, text, None) {
                        Ok(m) => outbound.push(m),
                        Err(e) => tracing::warn!("no outbound message: {e}"),
                    }
                }
                if matches!(action, Action::Gather { .. }) {
                    // The answer is the customer's next message.
                    break;
                }
                continue;
            }
            match action {
                Action::SetAttribute { .. } => {}
                Action::Enqueue {
                    queue,
                    priority,
                    skills,
                } => {
                    self.enqueue_conversation(session, conv, queue, priority, skills)
                        .await;
                    break;
                }
                Action::Hangup => {
                    session.set_state(InteractionState::Closed);
                    session.interaction.closed_ms = Some(now_ms());
                    conv.closed = true;
                    break;
                }
                Action::Wait { .. } => break,
                Action::Send {
                    channel,
                    to,
                    text,
                    subject,
                } => {
                    let ix = &session.interaction;
                    let origin = (ix.id.as_str(), ix.channel, ix.to.as_str());
                    let sent = self
                        .flow_send(&ix.tenant, origin, (channel, &to), text, subject)
                        .await;
                    session.note(EntryKind::Sent, sent_note(channel, &to, &sent));
                }
                other => {
                    let data = json!({"action": to_json(&other), "why": "not on a text channel"});
                    session.note(EntryKind::IgnoredAction, data);
                }
            }
        }
    }

    async fn enqueue_conversation(
        self: &Arc<Self>,
        session: &mut FlowSession,
        conv: &mut ConversationRecord,
        queue: String,
        priority: u32,
        skills: Vec<String>,
    ) {
        let ix = session.interaction.id.clone();
        let tenant = session.interaction.tenant.clone();
        let spec = TaskSpec {
            id: ix.clone(),
            queue: queue.clone(),
            channel: session.interaction.channel,
            priority,
            skills,
            agent: None,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        match self.enqueue_watched(&tenant, spec, tx).await {
            Ok(_) => {
                conv.task = Some(ix.clone());
                session.note(EntryKind::Queued, json!({"queue": queue}));
                self.watch_conversation_task(tenant, ix, rx);
            }
            Err(e) => {
                session.note(
                    EntryKind::Parked,
                    json!({"queue": queue, "error": e.to_string()}),
                );
            }
        }
    }

    /// Follows a conversation's ACD task: the interaction's state tracks
    /// offers and acceptance; when the task ends the conversation closes,
    /// and when it leaves the queue for the flow the flow hears `timeout`.
    fn watch_conversation_task(
        self: &Arc<Self>,
        tenant: String,
        ix: String,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<TaskNews>,
    ) {
        let engine = self.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let mut passed_on = false;
            while let Some(news) = rx.recv().await {
                let r = match news {
                    TaskNews::Transfer { target } => {
                        let r = engine.conversation_transfer(&tenant, &ix, &target).await;
                        passed_on = r.is_ok();
                        r
                    }
                    TaskNews::Offer { agent, .. } => {
                        engine
                            .conversation_state(
                                &tenant,
                                &ix,
                                InteractionState::Offered,
                                json!({"agent": agent}),
                            )
                            .await
                    }
                    TaskNews::Rescind { agent } => {
                        engine
                            .conversation_state(
                                &tenant,
                                &ix,
                                InteractionState::Queued,
                                json!({"agent": agent}),
                            )
                            .await
                    }
                    TaskNews::BackToFlow { why } => {
                        engine.conversation_back_to_flow(&tenant, &ix, why).await
                    }
                    _ => Ok(()),
                };
                if let Err(e) = r {
                    tracing::warn!("conversation {ix} of {tenant}: {e}");
                }
            }
            // The task ended (completed, abandoned, timed out), unless it
            // was passed on: the new task's watcher has the conversation.
            if !passed_on && let Err(e) = engine.conversation_task_ended(&tenant, &ix).await {
                tracing::warn!("conversation {ix} of {tenant}: {e}");
            }
        }));
    }

    /// An agent passed the conversation on (blind): to `queue:Q`, or to
    /// `agent:A` in the queue it was in. It waits again as a new task of
    /// the same id, with its timeline and attributes; the first agent
    /// wraps up.
    async fn conversation_transfer(
        self: &Arc<Self>,
        tenant: &str,
        ix: &str,
        target: &str,
    ) -> EngineResult<()> {
        let _turn = self.turn(tenant, ix).await;
        let Some(mut interaction) = self.store.interaction_head(tenant, ix).await? else {
            return Ok(());
        };
        let queue = self.task(tenant, ix)?.queue;
        let (queue, agent) = match (target.strip_prefix("queue:"), target.strip_prefix("agent:")) {
            (Some(q), _) => (q.to_string(), None),
            (_, Some(a)) => (queue, Some(a.to_string())),
            _ => {
                return Err(CoreError::Invalid(format!(
                    "a conversation is passed to queue:NAME or agent:ID, not {target}"
                ))
                .into());
            }
        };
        let stored = interaction.timeline_len();
        interaction.push(EntryKind::Transfer, json!({"target": target}));
        if let Err(e) = interaction.set_state(InteractionState::Queued) {
            tracing::debug!("{e}");
        }
        self.store.save_interaction(&interaction, stored).await?;
        let spec = TaskSpec {
            id: ix.to_string(),
            queue,
            channel: interaction.channel,
            priority: 0,
            skills: Vec::new(),
            agent,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.enqueue_watched(tenant, spec, tx).await?;
        self.watch_conversation_task(tenant.to_string(), ix.to_string(), rx);
        self.publish(
            tenant,
            json!({"interaction": ix, "kind": "state", "data": {"state": interaction.state}}),
        );
        Ok(())
    }

    async fn conversation_state(
        self: &Arc<Self>,
        tenant: &str,
        ix: &str,
        state: InteractionState,
        data: Value,
    ) -> EngineResult<()> {
        let _turn = self.turn(tenant, ix).await;
        let Some(mut interaction) = self.store.interaction_head(tenant, ix).await? else {
            return Ok(());
        };
        let stored = interaction.timeline_len();
        let kind = match state {
            InteractionState::Offered => EntryKind::Offered,
            _ => EntryKind::AgentMissed,
        };
        interaction.push(kind, data);
        if let Err(e) = interaction.set_state(state) {
            tracing::debug!("{e}");
        }
        self.store.save_interaction(&interaction, stored).await?;
        self.publish(
            tenant,
            json!({"interaction": ix, "kind": "state", "data": {"state": interaction.state}}),
        );
        Ok(())
    }

    async fn conversation_back_to_flow(
        self: &Arc<Self>,
        tenant: &str,
        ix: &str,
        why: &str,
    ) -> EngineResult<()> {
        let _turn = self.turn(tenant, ix).await;
        let Some(interaction) = self.store.interaction_head(tenant, ix).await? else {
            return Ok(());
        };
        let mut conv = self.conversation(tenant, ix).await?;
        conv.task = None;
        let mut session = self
            .resume_session(interaction, conv.flow_state.clone())
            .await?;
        session.note(EntryKind::QueueLeft, json!({"why": why}));
        session.set_state(InteractionState::InFlow);
        let step = session.handle(Event::Timeout).await;
        let mut outbound = Vec::new();
        self.carry_out(&mut session, &mut conv, step.actions, &mut outbound)
            .await;
        self.finish_step(session, conv, outbound, Vec::new()).await
    }

    async fn conversation_task_ended(self: &Arc<Self>, tenant: &str, ix: &str) -> EngineResult<()> {
        let _turn = self.turn(tenant, ix).await;
        let conv = self.conversation(tenant, ix).await?;
        let Some(task) = conv.task.clone() else {
            return Ok(());
        };
        let Some(interaction) = self.store.interaction_head(tenant, ix).await? else {
            return Ok(());
        };
        let view = self.task(tenant, &task).ok();
        let end = match view.as_ref().map(|v| v.state.as_str()) {
            Some("abandoned") | Some("timed_out") => InteractionState::Abandoned,
            _ => InteractionState::Closed,
        };
        self.end_conversation(interaction, conv, end, None).await
    }

    /// Closes a conversation in `end` (its turn held), with a timeline
    /// entry saying why when `why` is given: later messages start a new
    /// one.
    async fn end_conversation(
        &self,
        mut interaction: Interaction,
        mut conv: ConversationRecord,
        end: InteractionState,
        why: Option<Value>,
    ) -> EngineResult<()> {
        let (tenant, ix) = (interaction.tenant.clone(), interaction.id.clone());
        let stored = interaction.timeline_len();
        if interaction.state == InteractionState::Connected {
            let _ = interaction.set_state(InteractionState::WrapUp);
        }
        if let Err(e) = interaction.set_state(end) {
            tracing::debug!("{e}");
        }
        if let Some(why) = why {
            interaction.push(EntryKind::Log, why);
        }
        interaction.closed_ms = Some(now_ms());
        conv.closed = true;
        conv.task = None;
        self.store.save_interaction(&interaction, stored).await?;
        self.store
            .apply_records(
                &tenant,
                &[RecordWrite::put(CONVERSATION, &ix, to_json(&conv))],
                None,
            )
            .await?;
        self.publish(
            &tenant,
            json!({"interaction": ix, "kind": "state", "data": {"state": interaction.state}}),
        );
        Ok(())
    }

    /// Closes an open conversation (chat, email, SMS, fax) from the API:
    /// later messages from the customer start a new one. `Conflict` while
    /// an agent has it (their task ends it), `NotFound` for a call or an
    /// unknown id; closing a closed one changes nothing.
    pub async fn close_conversation(self: &Arc<Self>, tenant: &str, ix: &str) -> EngineResult<()> {
        let _turn = self.turn(tenant, ix).await;
        let Some(interaction) = self.store.interaction_head(tenant, ix).await? else {
            return Err(CoreError::NotFound(format!("conversation {ix}")).into());
        };
        if interaction.channel == Channel::Voice {
            return Err(CoreError::NotFound(format!(
                "conversation {ix} (a call ends by hanging up)"
            ))
            .into());
        }
        let conv = self.conversation(tenant, ix).await?;
        if conv.closed || interaction.state.is_final() {
            return Ok(());
        }
        if let Some(task) = &conv.task {
            return Err(CoreError::Conflict(format!(
                "an agent has conversation {ix} (task {task}): its task ends it"
            ))
            .into());
        }
        let why = json!({"message": "closed over the API"});
        self.end_conversation(interaction, conv, InteractionState::Closed, Some(why))
            .await
    }

    /// The answer to a retried message: the one stored first (its client
    /// id record names it).
    async fn duplicate(&self, tenant: &str, first: &Value) -> EngineResult<Received> {
        let ix = first["interaction"].as_str().unwrap_or_default();
        let id = first["message"].as_str().unwrap_or_default();
        let message = self.message_in(tenant, ix, id).await?;
        Ok(Received {
            tenant: tenant.to_string(),
            message,
            duplicate: true,
        })
    }

    /// Ends a flow step on a conversation: the flow's state, its replies
    /// (with their outbox entries and webhook deliveries) and `writes` go
    /// in one atomic write after the timeline's checkpoint; then the
    /// replies leave.
    async fn finish_step(
        self: &Arc<Self>,
        mut session: FlowSession,
        mut conv: ConversationRecord,
        outbound: Vec<Message>,
        mut writes: Vec<RecordWrite>,
    ) -> EngineResult<()> {
        let tenant = session.interaction.tenant.clone();
        let ix = session.interaction.id.clone();
        conv.flow_state = session.flow_state().to_string();
        let outbound = settle_outbound(&mut session, outbound);
        // On disk with the write below.
        session.checkpoint_soft().await?;
        let mut hooks = Vec::new();
        for m in &outbound {
            self.outbound_writes(m, 0, &mut writes);
            hooks.extend(
                self.hook_writes(&tenant, "message", &to_json(m), &mut writes)
                    .await?,
            );
        }
        writes.push(RecordWrite::put(CONVERSATION, &ix, to_json(&conv)));
        self.store.apply_records(&tenant, &writes, None).await?;
        self.start_hooks(&tenant, hooks);
        self.sent_outbound(&tenant, &outbound);
        Ok(())
    }

    /// Waits for the conversation's turn (its messages, replies and task
    /// news are worked on one at a time); the turn ends when the guard is
    /// dropped, and the conversation's lock goes once nobody waits for it.
    async fn turn(&self, tenant: &str, ix: &str) -> TurnGuard<'_> {
        let key = (tenant.to_string(), ix.to_string());
        let lock_of = lock(&self.messaging.workers)
            .entry(key.clone())
            .or_default()
            .clone();
        TurnGuard {
            workers: &self.messaging.workers,
            key,
            held: Some(lock_of.lock_owned().await),
        }
    }

    /// A new outbound message on a conversation, to its customer.
    fn new_outbound(
        &self,
        ix: &Interaction,
        author: Author,
        text: String,
        subject: Option<String>,
    ) -> EngineResult<Message> {
        let now = now_ms();
        Ok(Message {
            id: next_message_id(now)?,
            interaction: ix.id.clone(),
            channel: ix.channel,
            direction: Direction::Outbound,
            author,
            from: ix.to.clone(),
            to: ix.from.clone(),
            text,
            subject,
            attachments: Vec::new(),
            status: MessageStatus::Queued,
            error: None,
            client_id: None,
            external_id: None,
            meta: BTreeMap::new(),
            created_ms: now,
            updated_ms: now,
        })
    }

    /// The writes of a new outbound message: usage (with the bytes its
    /// files stored), the message, its index entry and its outbox entry.
    fn outbound_writes(&self, m: &Message, stored_bytes: u64, writes: &mut Vec<RecordWrite>) {
        writes.push(crate::usage::message_write(m, stored_bytes));
        writes.push(RecordWrite::put(
            conv_kind(&m.interaction),
            &m.id,
            to_json(m),
        ));
        writes.push(RecordWrite::put(
            MSG_INDEX,
            &m.id,
            json!({"interaction": m.interaction}),
        ));
        writes.push(RecordWrite::put(
            OUTBOX,
            &m.id,
            to_json(&OutboxEntry {
                interaction: m.interaction.clone(),
                attempts: 0,
                next_ms: 0,
            }),
        ));
    }

    /// Publishes stored outbound messages and hands them to the outbox.
    fn sent_outbound(self: &Arc<Self>, tenant: &str, outbound: &[Message]) {
        for m in outbound {
            self.publish(
                tenant,
                json!({"interaction": m.interaction, "kind": "message", "data": m}),
            );
            self.to_outbox(tenant, &m.interaction, &m.id);
        }
    }

    /// An agent (or the tenant's API) writes into a conversation; the
    /// message leaves on the conversation's channel. An agent must hold
    /// the conversation's task (or be a supervisor).
    pub async fn reply(
        self: &Arc<Self>,
        tenant: &str,
        ix: &str,
        author: Author,
        must_hold: bool,
        text: String,
        subject: Option<String>,
    ) -> EngineResult<Message> {
        validate_text(&text, false)?;
        let _turn = self.turn(tenant, ix).await;
        let mut interaction = self
            .store
            .interaction_head(tenant, ix)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("interaction {ix}")))?;
        if interaction.channel == Channel::Voice {
            return Err(CoreError::Invalid(format!(
                "interaction {ix} is a {} interaction: it has no messages",
                interaction.channel
            ))
            .into());
        }
        let conv = self.conversation(tenant, ix).await?;
        if conv.closed {
            return Err(CoreError::Conflict(format!("conversation {ix} is closed")).into());
        }
        if let Author::Agent { id } = &author
            && must_hold
        {
            let holds = conv
                .task
                .as_ref()
                .and_then(|t| self.task(tenant, t).ok())
                .is_some_and(|v| v.state == "connected" && v.agent.as_deref() == Some(id.as_str()));
            if !holds {
                return Err(EngineError::Forbidden(
                    "the agent does not hold this conversation (accept its task first)",
                ));
            }
            if interaction.state != InteractionState::Connected {
                let stored = interaction.timeline_len();
                let _ = interaction.set_state(InteractionState::Connected);
                interaction.push(EntryKind::AgentConnected, json!({"agent": id}));
                self.store.save_interaction(&interaction, stored).await?;
            }
        }
        // Replies from agents and the API keep to the tenant's messages
        // per second, per channel, as inbound messages do (the caller's
        // scope read the tenant's record: its limits are current).
        let bucket = out_bucket(interaction.channel);
        if let Err(r) = self.capacity().admit_message(tenant, bucket) {
            self.capacity_refused(tenant, bucket, &r, json!({"interaction": ix}));
            return Err(r.into());
        }
        let stored = interaction.timeline_len();
        let m = self.new_outbound(&interaction, author, text, subject)?;
        interaction.push(
            EntryKind::Message,
            json!({"id": m.id, "direction": "outbound", "author": m.author}),
        );
        self.store.save_interaction(&interaction, stored).await?;
        let mut writes = Vec::new();
        self.outbound_writes(&m, 0, &mut writes);
        let hooks = self
            .hook_writes(tenant, "message", &to_json(&m), &mut writes)
            .await?;
        self.store.apply_records(tenant, &writes, None).await?;
        self.start_hooks(tenant, hooks);
        self.sent_outbound(tenant, std::slice::from_ref(&m));
        Ok(m)
    }

    /// The tenant's address `address` on `channel`; `NotFound` when it is
    /// no address of the tenant's on that channel (another tenant's, or
    /// none).
    pub async fn own_address(
        &self,
        tenant: &str,
        channel: Channel,
        address: &str,
    ) -> EngineResult<Address> {
        self.route_address(address.trim())
            .await?
            .filter(|(t, a)| t == tenant && a.channel == channel)
            .map(|(_, a)| a)
            .ok_or_else(|| {
                CoreError::NotFound(format!(
                    "{address} is not one of this tenant's {channel} addresses"
                ))
                .into()
            })
    }

    /// Starts a conversation from the tenant's side: a new interaction on
    /// `out.channel` between the tenant's address `out.from` and the
    /// customer `out.to`, whose first message is `out` — stored, with its
    /// files, and in the outbox in one atomic write, then handed to the
    /// channel's courier (retried with backoff like every outbound
    /// message). `NotFound` when `out.from` is not the tenant's address
    /// on that channel.
    pub async fn start_conversation(
        self: &Arc<Self>,
        tenant: &str,
        out: Outbound,
    ) -> EngineResult<Message> {
        validate_text(&out.text, !out.files.is_empty())?;
        let address = self.own_address(tenant, out.channel, &out.from).await?;
        let to = plugboard_core::normalize_address(&out.to);
        if to.is_empty() {
            return Err(CoreError::Invalid("a message needs a recipient".into()).into());
        }
        let bucket = out_bucket(out.channel);
        if let Err(r) = self.capacity().admit_message(tenant, bucket) {
            self.capacity_refused(tenant, bucket, &r, json!({"to": to}));
            return Err(r.into());
        }
        let stored_bytes: u64 = out.files.iter().map(|(_, _, b)| b.len() as u64).sum();
        if stored_bytes > 0 {
            self.check_storage(tenant, stored_bytes).await?;
        }
        let created = now_ms();
        let customer = self.link_customer(tenant, out.channel, &to, None).await?;
        let id = plugboard_core::interaction_id(created, crate::interaction_nonce()?);
        let mut interaction = conversation_interaction(
            &id,
            tenant,
            out.channel,
            (&to, &address.address),
            &address.flow,
            created,
        );
        interaction
            .attributes
            .insert("customer".to_string(), customer.clone());
        let author = out.author.unwrap_or(Author::Api);
        let mut m = self.new_outbound(&interaction, author, out.text, out.subject)?;
        for (name, content_type, bytes) in &out.files {
            let blob = format!("att-{created:013}-{:08x}", crate::interaction_nonce()?);
            self.store.put_blob_soft(tenant, &blob, bytes).await?;
            m.attachments.push(Attachment {
                name: sanitise_name(name),
                content_type: content_type.clone(),
                size: bytes.len() as u64,
                blob,
            });
        }
        m.meta = out.meta;
        interaction.push(
            EntryKind::Message,
            json!({"id": m.id, "direction": "outbound", "author": m.author}),
        );
        self.store.save_interaction(&interaction, 0).await?;
        let conv = ConversationRecord {
            customer: Some(customer),
            ..ConversationRecord::default()
        };
        let mut writes = vec![RecordWrite::put(
            CONVERSATION,
            &interaction.id,
            to_json(&conv),
        )];
        self.outbound_writes(&m, stored_bytes, &mut writes);
        let hooks = self
            .hook_writes(tenant, "message", &to_json(&m), &mut writes)
            .await?;
        self.store.apply_records(tenant, &writes, None).await?;
        self.capacity().add_stored(tenant, stored_bytes);
        self.start_hooks(tenant, hooks);
        self.sent_outbound(tenant, std::slice::from_ref(&m));
        Ok(m)
    }

    /// The tenant's address of `channel` to send from or file under:
    /// `wanted` when it is one of them, else the first of them.
    pub async fn channel_address(
        &self,
        tenant: &str,
        channel: Channel,
        wanted: Option<&str>,
    ) -> EngineResult<String> {
        if let Some(w) = wanted {
            return Ok(self.own_address(tenant, channel, w).await?.address);
        }
        self.addresses(tenant)
            .await?
            .into_iter()
            .filter(|a| a.channel == channel)
            .map(|a| a.address)
            .min()
            .ok_or_else(|| {
                CoreError::NotFound(format!("the tenant has no {channel} address")).into()
            })
    }

    /// Carries out a flow's `send` action: a new conversation on
    /// `channel` to `to`, sent from the tenant's address of that channel —
    /// the origin interaction's own address when it came in on that
    /// channel, else the tenant's first — through that channel's outbox
    /// (a fax's text is set on a page). `origin` is the interaction whose
    /// flow sends it (id, channel, the tenant's address it reached), kept
    /// in the message's meta.
    pub async fn flow_send(
        self: &Arc<Self>,
        tenant: &str,
        origin: (&str, Channel, &str),
        (channel, to): (Channel, &str),
        text: String,
        subject: Option<String>,
    ) -> EngineResult<Message> {
        let (ix, ix_channel, own) = origin;
        let from = if ix_channel == channel {
            own.to_string()
        } else {
            self.channel_address(tenant, channel, None).await?
        };
        if channel == Channel::Fax && !plugboard_core::is_phone_number(to) {
            return Err(CoreError::Invalid(format!(
                "{to} is not a phone number: a fax goes only to a number"
            ))
            .into());
        }
        let meta = BTreeMap::from([("sent_by_interaction".to_string(), ix.to_string())]);
        self.start_conversation(
            tenant,
            Outbound {
                channel,
                from,
                to: to.to_string(),
                text,
                meta,
                subject,
                author: Some(Author::Flow),
                ..Outbound::default()
            },
        )
        .await
    }

    /// Records a status a channel learnt for an outbound message (an SMS
    /// delivery receipt, a widget's read receipt). A status never moves a
    /// message back.
    pub async fn message_status(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        status: MessageStatus,
        error: Option<String>,
    ) -> EngineResult<Message> {
        let mut m = self.message(tenant, id).await?;
        if status.rank() <= m.status.rank() || m.status == MessageStatus::Failed {
            return Ok(m);
        }
        m.status = status;
        m.error = error;
        m.updated_ms = now_ms();
        let mut writes = vec![RecordWrite::put(
            conv_kind(&m.interaction),
            &m.id,
            to_json(&m),
        )];
        let hooks = self
            .hook_writes(tenant, "message_status", &status_change(&m), &mut writes)
            .await?;
        self.store.apply_records(tenant, &writes, None).await?;
        self.start_hooks(tenant, hooks);
        self.publish_status(tenant, &m);
        Ok(m)
    }

    /// A message's new status on the tenant's event stream.
    fn publish_status(&self, tenant: &str, m: &Message) {
        self.publish(
            tenant,
            json!({"interaction": m.interaction, "kind": "message_status",
                   "data": {"id": m.id, "status": m.status, "error": m.error}}),
        );
    }

    // ----- the outbox -----

    /// Queues a stored outbox message behind its conversation's earlier
    /// ones, starting the conversation's lane if it has none.
    fn to_outbox(self: &Arc<Self>, tenant: &str, ix: &str, id: &str) {
        let key = (tenant.to_string(), ix.to_string());
        {
            let mut lanes = lock(&self.messaging.lanes);
            if let Some(lane) = lanes.get_mut(&key) {
                lane.insert(id.to_string());
                return;
            }
            lanes.insert(key.clone(), BTreeSet::from([id.to_string()]));
        }
        tokio::spawn(tracing::Instrument::in_current_span(run_lane(
            Arc::downgrade(self),
            key,
        )));
    }

    /// Tries to hand one outbox message to its courier; `Some(delay)`
    /// when it should be tried again then.
    async fn deliver_one(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
    ) -> EngineResult<Option<Duration>> {
        let Some(entry) = self.store.record(tenant, OUTBOX, id).await? else {
            return Ok(None);
        };
        let mut entry: OutboxEntry = storage_json(entry, "outbox")?;
        let wait = entry.next_ms.saturating_sub(now_ms());
        if wait > 0 {
            return Ok(Some(Duration::from_millis(wait)));
        }
        let mut m = self.message_in(tenant, &entry.interaction, id).await?;
        let courier = lock(&self.messaging.couriers).get(&m.channel).cloned();
        let Some(courier) = courier else {
            // No driver for the channel on this server: it waits (a
            // server started with the channel will send it).
            return Ok(Some(Duration::from_secs(60)));
        };
        let slots = lock(&self.messaging.slots)
            .entry(m.channel)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(SLOTS)))
            .clone();
        let Ok(_slot) = slots.acquire().await else {
            return Ok(Some(Duration::from_secs(1)));
        };
        let history = if courier.needs_history() {
            self.messages(tenant, &entry.interaction).await?
        } else {
            Vec::new()
        };
        let outcome = courier.deliver(tenant, &m, &history).await;
        if let Err(DeliveryError::Deferred(why)) = &outcome {
            // Not an attempt: the entry stays as it is.
            tracing::debug!("{} of {tenant} deferred: {why}", m.id);
            return Ok(Some(courier.first_backoff().max(Duration::from_secs(5))));
        }
        entry.attempts += 1;
        let mut writes = Vec::new();
        let retry = match outcome {
            Ok(d) => {
                m.status = MessageStatus::Sent;
                m.external_id = d.external_id.or(m.external_id);
                m.meta.extend(d.meta);
                for ext in m.external_id.iter().chain(&d.aliases) {
                    key_writes(
                        &mut writes,
                        &m.interaction,
                        EXTERNAL_ID,
                        thread_id(m.channel, ext),
                        json!({"interaction": m.interaction, "message": m.id}),
                    );
                }
                None
            }
            Err(DeliveryError::Retry(e)) if entry.attempts < MAX_ATTEMPTS => {
                m.error = Some(e);
                // 1 s, 2 s, 4 s … at most 5 minutes (from the courier's
                // first wait, doubling, at most four times that).
                let first = courier.first_backoff();
                let backoff = (first * (1u32 << (entry.attempts - 1).min(8)))
                    .min(Duration::from_secs(300).max(first * 4));
                entry.next_ms = now_ms() + backoff.as_millis() as u64;
                Some(backoff)
            }
            Err(e) => {
                m.status = MessageStatus::Failed;
                m.error = Some(e.to_string());
                None
            }
        };
        m.updated_ms = now_ms();
        writes.push(RecordWrite::put(
            conv_kind(&m.interaction),
            &m.id,
            to_json(&m),
        ));
        let mut hooks = Vec::new();
        match retry {
            Some(_) => writes.push(RecordWrite::put(OUTBOX, id, to_json(&entry))),
            None => {
                writes.push(RecordWrite::delete(OUTBOX, id));
                hooks = self
                    .hook_writes(tenant, "message_status", &status_change(&m), &mut writes)
                    .await?;
            }
        }
        self.store.apply_records(tenant, &writes, None).await?;
        self.start_hooks(tenant, hooks);
        if retry.is_none() {
            self.publish_status(tenant, &m);
        }
        Ok(retry)
    }

    // ----- sending domains -----

    /// Sets how a tenant's email domain signs its mail: a DKIM selector
    /// and the name of the tenant secret holding the private key (PEM).
    /// The domain must be the domain of one of the tenant's email
    /// addresses; the secret must exist.
    pub async fn set_email_domain(
        &self,
        tenant: &str,
        domain: &str,
        setting: EmailDomain,
    ) -> EngineResult<EmailDomain> {
        let domain = domain.to_ascii_lowercase();
        let owned = self.addresses(tenant).await?.iter().any(|a| {
            a.channel == Channel::Email
                && a.address.rsplit_once('@').is_some_and(|(_, d)| d == domain)
        });
        if !owned {
            return Err(CoreError::Invalid(format!(
                "{domain} is the domain of none of the tenant's email addresses"
            ))
            .into());
        }
        if setting.dkim_selector.is_empty()
            || !setting
                .dkim_selector
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(CoreError::Invalid(
                "dkim_selector must be letters, digits, '-' or '.'".into(),
            )
            .into());
        }
        if !self
            .secret_names(tenant)
            .await?
            .contains(&setting.dkim_key_secret)
        {
            return Err(CoreError::Invalid(format!(
                "dkim_key_secret {:?} is not a secret of the tenant",
                setting.dkim_key_secret
            ))
            .into());
        }
        self.store
            .set_record(tenant, EMAIL_DOMAIN, &domain, &to_json(&setting))
            .await?;
        Ok(setting)
    }

    /// A tenant's email domain settings with the DKIM key opened: for the
    /// email channel when it signs a message from that domain.
    pub async fn email_domain_key(
        &self,
        tenant: &str,
        domain: &str,
    ) -> EngineResult<Option<(EmailDomain, String)>> {
        let Some(v) = self
            .store
            .record(tenant, EMAIL_DOMAIN, &domain.to_ascii_lowercase())
            .await?
        else {
            return Ok(None);
        };
        let setting: EmailDomain = storage_json(v, "email domain")?;
        match self.tenant_secret(tenant, &setting.dkim_key_secret).await? {
            Some(key) => Ok(Some((setting, key))),
            None => Ok(None),
        }
    }

    // ----- customers -----

    /// The customer an address belongs to, created on first contact.
    async fn link_customer(
        &self,
        tenant: &str,
        channel: Channel,
        address: &str,
        name: Option<&String>,
    ) -> EngineResult<String> {
        let key = customer_address_key(channel, address);
        if let Some(c) = self.store.record(tenant, CUSTOMER_ADDR, &key).await?
            && let Some(id) = c["customer"].as_str()
        {
            return Ok(id.to_string());
        }
        let now = now_ms();
        let customer = Customer {
            id: format!("cu-{now:013}-{:08x}", crate::interaction_nonce()?),
            name: name.cloned(),
            addresses: vec![CustomerAddress {
                channel,
                address: plugboard_core::normalize_address(address),
            }],
            attributes: BTreeMap::new(),
            merged_into: None,
            created_ms: now,
        };
        let writes = [
            RecordWrite::put(CUSTOMER_ADDR, &key, json!({"customer": customer.id})),
            RecordWrite::put(CUSTOMER, &customer.id, to_json(&customer)),
        ];
        // Two first contacts at once: the second finds the first's.
        match self
            .store
            .apply_records(tenant, &writes, Some((CUSTOMER_ADDR, &key)))
            .await?
        {
            Some(first) => Ok(first["customer"].as_str().unwrap_or_default().to_string()),
            None => Ok(customer.id),
        }
    }

    /// A customer by id (following merges to the one it lives on as).
    pub async fn customer(&self, tenant: &str, id: &str) -> EngineResult<Customer> {
        let mut id = id.to_string();
        for _ in 0..16 {
            let v = self
                .store
                .record(tenant, CUSTOMER, &id)
                .await?
                .ok_or_else(|| CoreError::NotFound(format!("customer {id}")))?;
            let c: Customer = storage_json(v, "customer")?;
            match &c.merged_into {
                Some(next) => id = next.clone(),
                None => return Ok(c),
            }
        }
        Err(CoreError::Storage(format!("customer {id}: merges go round in a circle")).into())
    }

    /// The customer an address belongs to, if any.
    pub async fn customer_by_address(
        &self,
        tenant: &str,
        channel: Channel,
        address: &str,
    ) -> EngineResult<Option<Customer>> {
        let key = customer_address_key(channel, address);
        match self.store.record(tenant, CUSTOMER_ADDR, &key).await? {
            Some(v) => match v["customer"].as_str() {
                Some(id) => Ok(Some(self.customer(tenant, id).await?)),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Adds an address to a customer. An address that belongs to another
    /// customer merges that customer into this one (they are the same
    /// person): their addresses, attributes and history become this
    /// customer's.
    pub async fn add_customer_address(
        &self,
        tenant: &str,
        id: &str,
        channel: Channel,
        address: &str,
    ) -> EngineResult<Customer> {
        let address = plugboard_core::normalize_address(address);
        if address.is_empty() {
            return Err(CoreError::Invalid("an empty address".into()).into());
        }
        let keep = self.customer(tenant, id).await?;
        if let Some(other) = self.customer_by_address(tenant, channel, &address).await? {
            if other.id == keep.id {
                return Ok(keep);
            }
            return self.merge_customers(tenant, &keep.id, &other.id).await;
        }
        let mut keep = keep;
        keep.addresses.push(CustomerAddress {
            channel,
            address: address.clone(),
        });
        keep.addresses.sort();
        keep.addresses.dedup();
        let writes = [
            RecordWrite::put(
                CUSTOMER_ADDR,
                customer_address_key(channel, &address),
                json!({"customer": keep.id}),
            ),
            RecordWrite::put(CUSTOMER, &keep.id, to_json(&keep)),
        ];
        self.store.apply_records(tenant, &writes, None).await?;
        Ok(keep)
    }

    /// Merges customer `other` into `keep`: one atomic write moves every
    /// address over and marks `other` as merged.
    pub async fn merge_customers(
        &self,
        tenant: &str,
        keep: &str,
        other: &str,
    ) -> EngineResult<Customer> {
        let mut keep = self.customer(tenant, keep).await?;
        let mut other = self.customer(tenant, other).await?;
        if keep.id == other.id {
            return Ok(keep);
        }
        let mut writes = Vec::new();
        for a in &other.addresses {
            writes.push(RecordWrite::put(
                CUSTOMER_ADDR,
                customer_address_key(a.channel, &a.address),
                json!({"customer": keep.id}),
            ));
        }
        keep.addresses.append(&mut other.addresses.clone());
        keep.addresses.sort();
        keep.addresses.dedup();
        for (k, v) in std::mem::take(&mut other.attributes) {
            keep.attributes.entry(k).or_insert(v);
        }
        if keep.name.is_none() {
            keep.name = other.name.take();
        }
        other.merged_into = Some(keep.id.clone());
        writes.push(RecordWrite::put(CUSTOMER, &keep.id, to_json(&keep)));
        writes.push(RecordWrite::put(CUSTOMER, &other.id, to_json(&other)));
        self.store.apply_records(tenant, &writes, None).await?;
        Ok(keep)
    }

    /// A customer's interactions on every channel, oldest first (headers:
    /// the timelines are on each interaction).
    pub async fn customer_history(
        &self,
        tenant: &str,
        id: &str,
        limit: usize,
    ) -> EngineResult<(Customer, Vec<Interaction>)> {
        let customer = self.customer(tenant, id).await?;
        let mut all: Vec<Interaction> = Vec::new();
        for a in &customer.addresses {
            for ix in self
                .store
                .customer_history(tenant, &a.address, limit)
                .await?
            {
                let same_class = customer_address_key(ix.channel, &ix.from)
                    == customer_address_key(a.channel, &a.address);
                if same_class && !ix.simulated && !all.iter().any(|x| x.id == ix.id) {
                    all.push(ix);
                }
            }
        }
        all.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        let skip = all.len().saturating_sub(limit);
        Ok((customer, all.split_off(skip)))
    }
}

/// The flow's replies to one inbound message as they leave: on email one
/// message (several emails for one question would be noise), elsewhere
/// one each; each noted on the timeline.
fn settle_outbound(session: &mut FlowSession, mut outbound: Vec<Message>) -> Vec<Message> {
    if session.interaction.channel == Channel::Email && outbound.len() > 1 {
        let text = outbound
            .iter()
            .map(|m| m.text.as_str())
            .collect::<Vec<_>>()
            .join("\n\n");
        outbound.truncate(1);
        outbound[0].text = text;
    }
    for m in &outbound {
        session.note(
            EntryKind::Message,
            json!({"id": m.id, "direction": "outbound", "author": m.author}),
        );
    }
    outbound
}

/// Hands a conversation's outbox messages to their courier one at a
/// time, in order, until its lane is empty.
async fn run_lane(engine: std::sync::Weak<Engine>, key: (String, String)) {
    /// Failures in a row (not a courier's answer: the store's) after which
    /// a message is left for the next start, so it does not hold up the
    /// conversation's later ones for ever.
    const MAX_ERRORS: u32 = 12;
    // Removes the lane if the task ends early (a panic), so the
    // conversation's later messages start a new one.
    let mut guard = LaneGuard {
        engine: engine.clone(),
        key: Some(key.clone()),
    };
    let (tenant, ix) = &key;
    let mut errors = 0;
    loop {
        let Some(e) = engine.upgrade() else {
            return;
        };
        let id = {
            let mut lanes = lock(&e.messaging.lanes);
            match lanes.get(&key).and_then(|lane| lane.first()) {
                Some(id) => id.clone(),
                None => {
                    lanes.remove(&key);
                    guard.key = None;
                    return;
                }
            }
        };
        // Listening before looking for the courier: one registered in
        // between wakes the wait below.
        let courier_added = e.messaging.courier_added.clone();
        let woken = courier_added.notified();
        let outcome = e.deliver_one(tenant, &id).await;
        let delay = match outcome {
            Ok(None) => {
                errors = 0;
                if let Some(lane) = lock(&e.messaging.lanes).get_mut(&key) {
                    lane.remove(&id);
                }
                continue;
            }
            Ok(Some(delay)) => {
                errors = 0;
                delay
            }
            Err(err) => {
                errors += 1;
                tracing::warn!("outbox {id} of {tenant} ({ix}): {err}");
                if errors >= MAX_ERRORS {
                    tracing::warn!("outbox {id} of {tenant} ({ix}): left for the next start");
                    errors = 0;
                    if let Some(lane) = lock(&e.messaging.lanes).get_mut(&key) {
                        lane.remove(&id);
                    }
                    continue;
                }
                Duration::from_secs(5)
            }
        };
        // Wait without keeping the engine alive; a new courier ends the
        // wait early (the message may have waited for it).
        drop(e);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = woken => {}
        }
    }
}

/// Removes a lane whose task ended without emptying it.
struct LaneGuard {
    engine: std::sync::Weak<Engine>,
    key: Option<(String, String)>,
}

impl Drop for LaneGuard {
    fn drop(&mut self) {
        if let (Some(key), Some(e)) = (self.key.take(), self.engine.upgrade()) {
            lock(&e.messaging.lanes).remove(&key);
        }
    }
}

/// A file name safe to show and store: no path, no control characters,
/// at most 200 characters.
pub fn sanitise_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let clean: String = base.chars().filter(|c| !c.is_control()).take(200).collect();
    if clean.trim().is_empty() || clean == "." || clean == ".." {
        "attachment".to_string()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_lose_their_paths() {
        assert_eq!(sanitise_name("../../etc/passwd"), "passwd");
        assert_eq!(sanitise_name("C:\\x\\report.pdf"), "report.pdf");
        assert_eq!(sanitise_name("a\u{0}b.txt"), "ab.txt");
        assert_eq!(sanitise_name(".."), "attachment");
        assert_eq!(sanitise_name(""), "attachment");
    }
}
