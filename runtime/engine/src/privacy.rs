//! Erasure and retention: what the platform keeps about a customer, and
//! for how long.
//!
//! - [`Engine::erase_customer`] removes one customer — found by id or by
//!   any of their addresses — with everything stored about them: their
//!   interactions (header, timeline, indexes), conversation messages with
//!   their attachments and raw sources, call recordings and voicemail,
//!   faxes, the thread and id keys that pointed at those conversations,
//!   pending webhook deliveries carrying them, callbacks, wrap-up notes,
//!   the customer records (and those merged into them), and the kv keys
//!   the tenant's plugins keep under `customers/{id}/` or
//!   `customers/{address}/`. Queue events of their tasks stay (the
//!   reports need them) with their free text (`notes`, `disposition`)
//!   removed. It leaves an audit record of what was erased and when, not
//!   of what it contained.
//! - Retention ([`Engine::run_retention`], run by
//!   [`Engine::start_retention`] in the background) deletes, per tenant,
//!   what is older than its periods ([`Retention`]): whole interactions,
//!   or only their recordings, messages, attachments or faxes. It works
//!   in small pages with pauses between, so live traffic goes first.
//!
//! Only closed interactions are touched: a live call or an open
//! conversation is refused by erasure (close it first) and skipped by
//! retention until it closes. On PostgreSQL the rows are deleted and the
//! space comes back with `VACUUM`; the embedded store gives disk space
//! back when it compacts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

pub use plugboard_core::Retention;
use plugboard_core::message::customer_address_key;
use plugboard_core::{
    Channel, EntryKind, Error as CoreError, Interaction, Message, normalize_address, now_ms,
};
use plugboard_store::RecordWrite;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Engine, EngineError, EngineResult};
use plugboard_store::CompactSummary;

/// Record kind of the erasure audit log.
const ERASURE: &str = "erasure";
/// Record kind of the retention job's progress, per category.
const RETENTION_CURSOR: &str = "retention_cursor";
/// Interactions one erasure removes at most (a customer with more is
/// erased in several requests: the answer says `more`).
const ERASE_MAX: usize = 10_000;
/// Interactions the retention job reads per page.
const PAGE: usize = 100;
/// The pause between two pages, so that live traffic goes first.
const PAGE_PAUSE: Duration = Duration::from_millis(20);
/// Interactions a retention cursor remembers to look at again (created
/// before the cutoff, but open then) at most.
const LATER_MAX: usize = 10_000;
/// A call older than this cannot be live (a call lasts at most the
/// server's `max_call_s`, which is at most a day): one still open in the
/// store was left so by a node that died, and counts as ended.
pub const STALE_CALL: Duration = Duration::from_secs(24 * 3600);
const DAY_MS: u64 = 86_400_000;

/// The categories of `r` with a period, with the parts each removes.
fn categories(r: &Retention) -> Vec<(&'static str, u32, Parts)> {
    let mut out = Vec::new();
    let mut add = |name, days: Option<u32>, parts| {
        if let Some(d) = days {
            out.push((name, d, parts));
        }
    };
    add("interactions", r.interactions_days, Parts::WHOLE);
    add(
        "recordings",
        r.recordings_days,
        Parts {
            recordings: true,
            ..Parts::NONE
        },
    );
    add(
        "messages",
        r.messages_days,
        Parts {
            messages: true,
            attachments: true,
            ..Parts::NONE
        },
    );
    add(
        "attachments",
        r.attachments_days,
        Parts {
            attachments: true,
            ..Parts::NONE
        },
    );
    add(
        "faxes",
        r.faxes_days,
        Parts {
            faxes: true,
            ..Parts::NONE
        },
    );
    out
}

/// Interactions whose deletes one write set carries at most.
const BATCH: usize = 100;

/// Deletes gathered for one write set.
#[derive(Default)]
struct Batch {
    writes: Vec<RecordWrite>,
    interactions: Vec<String>,
}

/// What of an interaction to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parts {
    /// The interaction itself and everything it holds.
    whole: bool,
    /// Recordings and voicemail.
    recordings: bool,
    /// Conversation messages.
    messages: bool,
    /// Attachments and raw sources of messages (not on fax interactions).
    attachments: bool,
    /// The documents of a fax interaction.
    faxes: bool,
}

impl Parts {
    const NONE: Parts = Parts {
        whole: false,
        recordings: false,
        messages: false,
        attachments: false,
        faxes: false,
    };
    const WHOLE: Parts = Parts {
        whole: true,
        recordings: true,
        messages: true,
        attachments: true,
        faxes: true,
    };
}

/// What an erasure or a retention run removed, by kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Removed {
    /// Interactions (with their timelines).
    pub interactions: u64,
    /// Conversation messages.
    pub messages: u64,
    /// Recordings and voicemail.
    pub recordings: u64,
    /// Attachments, raw email sources and fax documents.
    pub files: u64,
    /// Other records (thread and id keys, outbox entries, callbacks,
    /// wrap-up notes, pending webhook deliveries, customer records).
    pub records: u64,
    /// kv keys of the tenant's plugins.
    pub kv_keys: u64,
    /// Bytes of the recordings and files removed.
    pub bytes: u64,
}

/// Whom to erase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErasureTarget {
    /// A customer by id (with every address they have).
    Customer(String),
    /// An address (a phone number, an email address, a chat visitor id)
    /// on a channel: its customer if it has one, else what that address
    /// left.
    Address(Channel, String),
}

/// The audit record of one erasure: what was erased and when, not what
/// it contained (no addresses, no names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Erasure {
    /// Id (sorts by time).
    pub id: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// The customer records erased (ids), if the target had one.
    pub customers: Vec<String>,
    /// How many addresses were erased.
    pub addresses: usize,
    /// The interactions erased (ids).
    pub interactions: Vec<String>,
    /// What was removed, by kind.
    pub removed: Removed,
    /// More interactions are left (erase again).
    pub more: bool,
}

/// Store compactions after deletions (one at a time, one for the
/// deletions of a while), and retention runs (one at a time).
pub(crate) struct Compaction {
    one: tokio::sync::Mutex<()>,
    retention: tokio::sync::Mutex<()>,
    due: std::sync::atomic::AtomicBool,
    pub(crate) delay: Duration,
}

impl Default for Compaction {
    fn default() -> Self {
        Compaction {
            one: Default::default(),
            retention: Default::default(),
            due: Default::default(),
            delay: Duration::from_secs(60),
        }
    }
}

/// Prefixes under which plugins keep per-customer kv data, for a
/// customer id or an address (`customers/{key}/…`).
pub fn customer_kv_prefix(key: &str) -> String {
    format!("customers/{key}/")
}

impl Engine {
    /// Erases a customer and everything stored about them (see the
    /// module doc). `Conflict` if one of their interactions is still open
    /// (a live call, an open conversation) or a callback still waits for
    /// them; `NotFound` for an unknown customer id.
    pub async fn erase_customer(
        self: &Arc<Self>,
        tenant: &str,
        target: ErasureTarget,
    ) -> EngineResult<Erasure> {
        // The customer records: the one named, those merged into it.
        let mut customers = Vec::new();
        let mut addresses: BTreeSet<(Channel, String)> = BTreeSet::new();
        let root = match &target {
            ErasureTarget::Customer(id) => Some(self.customer(tenant, id).await?),
            ErasureTarget::Address(channel, address) => {
                let address = normalize_address(address);
                if address.is_empty() {
                    return Err(CoreError::Invalid("an empty address".into()).into());
                }
                addresses.insert((*channel, address.clone()));
                self.customer_by_address(tenant, *channel, &address).await?
            }
        };
        if let Some(root) = root {
            let merged: Vec<plugboard_core::Customer> = self
                .store
                .records(tenant, crate::messaging::CUSTOMER)
                .await?
                .into_iter()
                .filter_map(|v| serde_json::from_value(v).ok())
                .collect();
            let mut ids = vec![root.id.clone()];
            // Those merged into it, and into those, …
            let mut i = 0;
            while i < ids.len() && ids.len() < 1000 {
                for c in &merged {
                    if c.merged_into.as_deref() == Some(&ids[i]) && !ids.contains(&c.id) {
                        ids.push(c.id.clone());
                    }
                }
                i += 1;
            }
            for c in merged.iter().filter(|c| ids.contains(&c.id)) {
                for a in &c.addresses {
                    addresses.insert((a.channel, a.address.clone()));
                }
            }
            customers = ids;
        }
        // Their interactions, by every form of each address (a phone
        // number with and without its `+`).
        let mut found: BTreeMap<String, Interaction> = BTreeMap::new();
        for (channel, address) in &addresses {
            for form in address_forms(*channel, address) {
                for ix in self
                    .store
                    .customer_history(tenant, &form, ERASE_MAX + 1)
                    .await?
                {
                    if customer_address_key(ix.channel, &ix.from)
                        == customer_address_key(*channel, address)
                    {
                        found.insert(ix.id.clone(), ix);
                    }
                }
            }
        }
        let open: Vec<&str> = found
            .values()
            .filter(|ix| !ended(ix, now_ms()))
            .map(|ix| ix.id.as_str())
            .collect();
        if !open.is_empty() {
            return Err(CoreError::Conflict(format!(
                "the customer has open interactions ({}): erase once they are closed \
                 (a conversation closes with POST …/interactions/{{id}}/close)",
                open.join(", ")
            ))
            .into());
        }
        let tel: BTreeSet<String> = addresses
            .iter()
            .filter(|(c, _)| customer_address_key(*c, "") == "tel:")
            .map(|(_, a)| a.clone())
            .collect();
        let callbacks: Vec<crate::callback::Callback> = self
            .store
            .records(tenant, crate::callback::CALLBACK)
            .await?
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .filter(|c: &crate::callback::Callback| {
                tel.contains(&normalize_address(&c.number)) || found.contains_key(&c.id)
            })
            .collect();
        if let Some(c) = callbacks.iter().find(|c| c.state == "waiting") {
            return Err(CoreError::Conflict(format!(
                "callback {} still waits for the customer: abandon its task \
                 (POST …/tasks/{{id}}/abandon) or let it finish first",
                c.id
            ))
            .into());
        }

        let more = found.len() > ERASE_MAX;
        let ids: Vec<String> = found.keys().take(ERASE_MAX).cloned().collect();
        let mut removed = Removed::default();
        let mut batch = Batch::default();
        for id in &ids {
            self.purge_interaction(tenant, id, Parts::WHOLE, &mut batch, &mut removed)
                .await?;
        }
        self.flush_batch(tenant, &mut batch, &mut removed).await?;
        for c in &callbacks {
            if self
                .store
                .delete_record(tenant, crate::callback::CALLBACK, &c.id)
                .await?
            {
                removed.records += 1;
            }
        }
        let erased_ix: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        removed.records += self.forget_deliveries(tenant, &erased_ix).await?;
        self.redact_queue_events(tenant, &erased_ix).await?;
        // kv data plugins keep under the customer.
        let mut kv_keys: BTreeSet<String> = customers.iter().cloned().collect();
        for (channel, address) in &addresses {
            kv_keys.extend(address_forms(*channel, address));
        }
        for k in &kv_keys {
            removed.kv_keys += self
                .store
                .kv_delete_prefix(tenant, &customer_kv_prefix(k))
                .await?;
        }
        // The customer records last: a failure before leaves them, and
        // the erasure can be asked again.
        if !more {
            let mut writes = Vec::new();
            for (channel, address) in &addresses {
                writes.push(RecordWrite::delete(
                    crate::messaging::CUSTOMER_ADDR,
                    customer_address_key(*channel, address),
                ));
            }
            for c in &customers {
                writes.push(RecordWrite::delete(crate::messaging::CUSTOMER, c));
            }
            removed.records += writes.len() as u64;
            self.store.apply_records(tenant, &writes, None).await?;
        }
        let at_ms = now_ms();
        let audit = Erasure {
            id: format!("{at_ms:013}-{:08x}", crate::interaction_nonce()?),
            at_ms,
            customers,
            addresses: addresses.len(),
            interactions: ids,
            removed,
            more,
        };
        self.store
            .set_record(
                tenant,
                ERASURE,
                &audit.id,
                &serde_json::to_value(&audit).unwrap_or_default(),
            )
            .await?;
        tracing::info!(
            tenant,
            erasure = %audit.id,
            interactions = audit.interactions.len(),
            "customer erased"
        );
        self.publish(
            tenant,
            json!({"kind": "erasure", "data": {"id": audit.id, "interactions": audit.interactions}}),
        );
        // Deleted keys stay in the embedded store's files until it is
        // compacted.
        self.compact_soon();
        Ok(audit)
    }

    /// Compacts the store now, so that deleted data leaves the disk and
    /// its space comes back (waits for a compaction already running).
    /// `None` for a store that does it itself (PostgreSQL).
    pub async fn compact_store(&self) -> EngineResult<Option<CompactSummary>> {
        let _one = self.compaction.one.lock().await;
        self.compaction
            .due
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let store = self.store.clone();
        let done = tokio::task::spawn_blocking(move || store.compact())
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))??;
        if let Some(c) = &done {
            tracing::info!(
                keys = c.keys,
                rewritten = c.rewritten,
                before_bytes = c.before_bytes,
                after_bytes = c.after_bytes,
                held_ms = c.held_ms,
                "store compacted"
            );
        }
        Ok(done)
    }

    /// Compacts the store after the compaction delay; calls meanwhile
    /// share that compaction.
    pub fn compact_soon(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.compaction.due.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(self);
        let delay = self.compaction.delay;
        tokio::spawn(async move {
            // A backup running refuses it: try again a few times.
            for _ in 0..10 {
                tokio::time::sleep(delay).await;
                let Some(app) = weak.upgrade() else { return };
                if !app.compaction.due.load(Ordering::SeqCst) {
                    return;
                }
                match app.compact_store().await {
                    Ok(_) => return,
                    Err(e) => {
                        app.compaction.due.store(true, Ordering::SeqCst);
                        tracing::warn!("compacting the store (trying again): {e}");
                    }
                }
            }
            // Given up: the next deletion asks again.
            if let Some(app) = weak.upgrade() {
                app.compaction.due.store(false, Ordering::SeqCst);
                tracing::error!(
                    "the store could not be compacted: deleted data stays on disk until it is"
                );
            }
        });
    }

    /// The erasure audit log, newest first.
    pub async fn erasures(&self, tenant: &str, limit: usize) -> EngineResult<Vec<Erasure>> {
        let mut all: Vec<Erasure> = self
            .store
            .records(tenant, ERASURE)
            .await?
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        all.reverse();
        all.truncate(limit);
        Ok(all)
    }

    /// Removes `parts` of one closed interaction.
    async fn purge_interaction(
        &self,
        tenant: &str,
        id: &str,
        parts: Parts,
        batch: &mut Batch,
        removed: &mut Removed,
    ) -> EngineResult<()> {
        let ix = self.store.interaction(tenant, id).await?;
        let fax = ix.as_ref().is_some_and(|ix| ix.channel == Channel::Fax);
        if parts.recordings
            && let Some(ix) = &ix
        {
            for e in ix
                .timeline
                .iter()
                .filter(|e| e.kind == EntryKind::Recording)
            {
                if let Some(rec) = e.data["id"].as_str()
                    && let Some(n) = self.drop_blob(tenant, rec).await?
                {
                    removed.recordings += 1;
                    removed.bytes += n;
                }
            }
        }
        let conv = crate::messaging::conv_kind(id);
        let messages: Vec<Message> = self
            .store
            .records(tenant, &conv)
            .await?
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        // A fax's document and its message go with the fax period only.
        let drop_messages = parts.messages && (!fax || parts.faxes);
        let files = (parts.attachments || parts.messages) && !fax || parts.faxes && fax;
        if files {
            for m in &messages {
                let blobs = m
                    .attachments
                    .iter()
                    .map(|a| a.blob.as_str())
                    .chain(m.meta.get("raw").map(String::as_str));
                for b in blobs {
                    if let Some(n) = self.drop_blob(tenant, b).await? {
                        removed.files += 1;
                        removed.bytes += n;
                    }
                }
            }
        }
        // What goes is gathered into the batch: one write set for a page
        // of interactions, not several durable writes for each.
        let writes = &mut batch.writes;
        if drop_messages && !messages.is_empty() {
            for m in &messages {
                writes.push(RecordWrite::delete(crate::messaging::MSG_INDEX, &m.id));
                writes.push(RecordWrite::delete(crate::messaging::OUTBOX, &m.id));
                writes.push(RecordWrite::delete(&conv, &m.id));
            }
            removed.records += 2 * messages.len() as u64;
            removed.messages += messages.len() as u64;
            let pending = crate::messaging::pending_kind(id);
            for (key, _) in self
                .store
                .records_after(tenant, &pending, "", 100_000)
                .await?
            {
                writes.push(RecordWrite::delete(&pending, key));
                removed.records += 1;
            }
        }
        if parts.whole {
            // The keys that led to the conversation (threads, channel
            // ids, client ids), as it listed them.
            let keys = crate::messaging::keys_kind(id);
            let listed = self.store.records_after(tenant, &keys, "", 100_000).await?;
            let before = writes.len();
            for (key, _) in &listed {
                writes.push(RecordWrite::delete(&keys, key));
                // Unless it leads to a later conversation by now (a
                // number pair's next SMS conversation).
                if let Some((kind, rid)) = key.split_once('/')
                    && let Some(v) = self.store.record(tenant, kind, rid).await?
                    && v["interaction"].as_str() == Some(id)
                {
                    writes.push(RecordWrite::delete(kind, rid));
                }
            }
            for kind in [
                crate::messaging::CONVERSATION,
                crate::messaging::PENDING_IX,
                crate::callback::CALLBACK,
            ] {
                writes.push(RecordWrite::delete(kind, id));
            }
            let wrap_ups = self
                .store
                .records_after(tenant, crate::desk::WRAP_UP, &format!("{id}-"), 1000)
                .await?;
            for (key, _) in wrap_ups
                .iter()
                .take_while(|(k, _)| k.starts_with(&format!("{id}-")))
            {
                writes.push(RecordWrite::delete(crate::desk::WRAP_UP, key));
            }
            removed.records += (writes.len() - before - listed.len()) as u64;
            batch.interactions.push(id.to_string());
        }
        if batch.interactions.len() >= BATCH || batch.writes.len() >= 10 * BATCH {
            self.flush_batch(tenant, batch, removed).await?;
        }
        Ok(())
    }

    /// Applies what a batch of purges gathered: the record deletes in one
    /// write set, then the interactions.
    async fn flush_batch(
        &self,
        tenant: &str,
        batch: &mut Batch,
        removed: &mut Removed,
    ) -> EngineResult<()> {
        if !batch.writes.is_empty() {
            self.store
                .apply_records(tenant, &batch.writes, None)
                .await?;
            batch.writes.clear();
        }
        if !batch.interactions.is_empty() {
            removed.interactions += self
                .store
                .delete_interactions(tenant, &batch.interactions)
                .await?;
            batch.interactions.clear();
        }
        Ok(())
    }

    /// Deletes a blob and tells the usage ledger, so the tenant's stored
    /// bytes go down. Returns its size, or `None` if there was none.
    async fn drop_blob(&self, tenant: &str, id: &str) -> EngineResult<Option<u64>> {
        // A recording from before recordings moved into the store is a
        // file of the recordings directory.
        if let Some(file) = self.legacy_recording(tenant, id)
            && let Ok(meta) = tokio::fs::metadata(&file).await
        {
            tokio::fs::remove_file(&file)
                .await
                .map_err(|e| CoreError::Storage(format!("{}: {e}", file.display())))?;
            return Ok(Some(meta.len()));
        }
        let Some(bytes) = self.store.blob(tenant, id).await? else {
            return Ok(None);
        };
        let n = bytes.len() as u64;
        drop(bytes);
        if !self.store.delete_blob(tenant, id).await? {
            return Ok(None);
        }
        self.write_unit(tenant, crate::usage::freed_unit(id, now_ms(), n))
            .await;
        self.capacity().sub_stored(tenant, n);
        Ok(Some(n))
    }

    /// Deletes pending webhook deliveries about the given interactions.
    async fn forget_deliveries(
        &self,
        tenant: &str,
        interactions: &BTreeSet<&str>,
    ) -> EngineResult<u64> {
        let mut writes = Vec::new();
        let mut after = String::new();
        loop {
            let page = self
                .store
                .records_after(tenant, crate::webhooks::HOOK_OUT, &after, 500)
                .await?;
            let last = page.len() < 500;
            for (id, d) in &page {
                let ix = d["body"]["interaction"].as_str().unwrap_or_default();
                if interactions.contains(ix) {
                    writes.push(RecordWrite::delete(crate::webhooks::HOOK_OUT, id));
                }
            }
            match page.last() {
                Some((id, _)) if !last => after = id.clone(),
                _ => break,
            }
        }
        let n = writes.len() as u64;
        if n > 0 {
            self.store.apply_records(tenant, &writes, None).await?;
        }
        Ok(n)
    }

    /// Removes the free text (`notes`, `disposition`) of the queue events
    /// of the given tasks; the events stay for the reports.
    async fn redact_queue_events(&self, tenant: &str, tasks: &BTreeSet<&str>) -> EngineResult<()> {
        let kind = crate::acd::QUEUE_EVENT;
        let mut after = String::new();
        loop {
            let page = self.store.records_after(tenant, kind, &after, 200).await?;
            let last = page.len() < 200;
            let mut changed = Vec::new();
            for (id, batch) in &page {
                let mut batch = batch.clone();
                let mut touched = false;
                let events = match batch.as_array_mut() {
                    Some(list) => list.iter_mut().collect::<Vec<_>>(),
                    None => vec![&mut batch],
                };
                for e in events {
                    let task = e["task"].as_str().unwrap_or_default();
                    if tasks.contains(task)
                        && let Some(o) = e.as_object_mut()
                    {
                        for field in ["notes", "disposition"] {
                            touched |= o.remove(field).is_some();
                        }
                        if let Some(inner) = o.get_mut("event").and_then(Value::as_object_mut) {
                            for field in ["notes", "disposition"] {
                                touched |= inner.remove(field).is_some();
                            }
                        }
                    }
                }
                if touched {
                    changed.push(RecordWrite::put(kind, id, batch));
                }
            }
            if !changed.is_empty() {
                self.store.apply_records(tenant, &changed, None).await?;
            }
            match page.last() {
                Some((id, _)) if !last => after = id.clone(),
                _ => return Ok(()),
            }
        }
    }

    // ----- retention -----

    /// Sets a tenant's own retention periods (days, 1–36500 each; unset:
    /// the server's default) and returns [`Engine::retention_view`].
    pub async fn set_retention(&self, tenant: &str, retention: Retention) -> EngineResult<Value> {
        let periods = [
            retention.interactions_days,
            retention.recordings_days,
            retention.messages_days,
            retention.attachments_days,
            retention.faxes_days,
        ];
        if periods.iter().flatten().any(|d| !(1..=36_500).contains(d)) {
            return Err(CoreError::Invalid("a retention period is 1 to 36500 days".into()).into());
        }
        let mut t = self.tenant(tenant).await?;
        t.retention = retention;
        self.store.update_tenant(&t).await?;
        Ok(self.retention_view(&t))
    }

    /// A tenant's retention: its own periods, the server's defaults and
    /// the periods in effect (`null`: kept for good).
    pub fn retention_view(&self, t: &plugboard_core::Tenant) -> Value {
        json!({
            "own": t.retention,
            "defaults": self.retention_defaults(),
            "in_effect": self.retention_of(t),
        })
    }

    /// A tenant's retention periods: its own, or the server's defaults
    /// where it has none.
    pub fn retention_of(&self, tenant: &plugboard_core::Tenant) -> Retention {
        tenant.retention.or(self.retention_defaults())
    }

    /// Runs retention once for every tenant as of `now_ms` (a pinned
    /// clock in tests; the wall clock in the background job). Returns
    /// what it removed, by tenant.
    pub async fn run_retention(
        self: &Arc<Self>,
        now_ms: u64,
    ) -> EngineResult<BTreeMap<String, Removed>> {
        let _one = self.compaction.retention.lock().await;
        let mut out = BTreeMap::new();
        for tenant in self.store.tenants().await? {
            let r = self.retention_of(&tenant);
            let mut removed = Removed::default();
            for (category, days, parts) in categories(&r) {
                let cutoff = now_ms.saturating_sub(u64::from(days) * DAY_MS);
                // One tenant's failure does not stop the others'.
                if let Err(e) = self
                    .expire(&tenant.id, category, cutoff, parts, &mut removed)
                    .await
                {
                    tracing::warn!(tenant = %tenant.id, category, "retention: {e}");
                }
            }
            if removed != Removed::default() {
                tracing::info!(tenant = %tenant.id, ?removed, "retention removed expired data");
                out.insert(tenant.id.clone(), removed);
            }
        }
        if !out.is_empty() {
            self.compact_soon();
        }
        Ok(out)
    }

    /// Removes `parts` of the tenant's interactions closed before
    /// `cutoff`, from where the category's last run stopped. Those created
    /// before it but still open (or closed since) are kept in the
    /// cursor's `later` list and looked at again each run, so the cursor
    /// itself moves on.
    async fn expire(
        &self,
        tenant: &str,
        category: &str,
        cutoff: u64,
        parts: Parts,
        removed: &mut Removed,
    ) -> EngineResult<()> {
        let before = plugboard_core::interaction_id(cutoff, 0);
        let cursor = self
            .store
            .record(tenant, RETENTION_CURSOR, category)
            .await?
            .unwrap_or_default();
        let mut after = cursor["after"].as_str().unwrap_or_default().to_string();
        let expired =
            |ix: &Interaction| ended(ix, cutoff) && ix.closed_ms.unwrap_or(ix.created_ms) < cutoff;
        let mut later = Vec::new();
        let mut batch = Batch::default();
        for id in cursor["later"].as_array().into_iter().flatten() {
            let Some(id) = id.as_str() else { continue };
            match self.store.interaction_head(tenant, id).await? {
                Some(ix) if expired(&ix) => {
                    self.purge_interaction(tenant, id, parts, &mut batch, removed)
                        .await?
                }
                Some(_) => later.push(id.to_string()),
                None => {}
            }
        }
        loop {
            let page = self
                .store
                .interactions_between(tenant, &after, &before, PAGE)
                .await?;
            for ix in &page {
                if expired(ix) {
                    self.purge_interaction(tenant, &ix.id, parts, &mut batch, removed)
                        .await?;
                } else if later.len() < LATER_MAX {
                    later.push(ix.id.clone());
                } else {
                    // Too many to remember: stop here, go on next time.
                    break;
                }
                after = ix.id.clone();
            }
            // Done before the cursor moves past it.
            self.flush_batch(tenant, &mut batch, removed).await?;
            self.store
                .set_record(
                    tenant,
                    RETENTION_CURSOR,
                    category,
                    &json!({"after": after, "later": later}),
                )
                .await?;
            if page.len() < PAGE || later.len() >= LATER_MAX {
                break;
            }
            tokio::time::sleep(PAGE_PAUSE).await;
        }
        // The queue event log follows the interactions.
        if parts.whole {
            self.expire_kind(tenant, crate::acd::QUEUE_EVENT, cutoff, removed)
                .await?;
        }
        Ok(())
    }

    /// Deletes a log's records whose ids (13-digit ms first) are before
    /// `cutoff`.
    async fn expire_kind(
        &self,
        tenant: &str,
        kind: &str,
        cutoff: u64,
        removed: &mut Removed,
    ) -> EngineResult<()> {
        let end = format!("{cutoff:013}");
        loop {
            let page = self.store.records_after(tenant, kind, "", 500).await?;
            let old: Vec<RecordWrite> = page
                .iter()
                .take_while(|(id, _)| id.as_str() < end.as_str())
                .map(|(id, _)| RecordWrite::delete(kind, id))
                .collect();
            if old.is_empty() {
                return Ok(());
            }
            removed.records += old.len() as u64;
            let full = old.len() == page.len();
            self.store.apply_records(tenant, &old, None).await?;
            if !full {
                return Ok(());
            }
            tokio::time::sleep(PAGE_PAUSE).await;
        }
    }

    /// Runs retention every `every` until the engine is gone.
    pub fn start_retention(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(app) = weak.upgrade() else { return };
                if let Err(e) = app.run_retention(now_ms()).await {
                    tracing::warn!("retention: {e}");
                }
            }
        });
    }
}

/// Whether an interaction has ended as of `now_ms`: closed, or a call
/// older than [`STALE_CALL`] that a node died with.
fn ended(ix: &Interaction, now_ms: u64) -> bool {
    ix.state.is_final()
        || (ix.channel == Channel::Voice && ix.created_ms + STALE_CALL.as_millis() as u64 <= now_ms)
}

/// The forms an address is stored under: a phone number with and
/// without its `+` (a SIP caller keeps what its phone sent).
fn address_forms(channel: Channel, address: &str) -> Vec<String> {
    let a = normalize_address(address);
    if customer_address_key(channel, "") == "tel:" {
        vec![a.clone(), format!("+{a}")]
    } else {
        vec![a]
    }
}
