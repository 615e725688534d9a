//! Plugboard's storage, version 2: async traits split by domain, and two
//! implementations behind one conformance suite ([`conformance`]):
//!
//! - [`SledStore`], the embedded default (sled in the data directory): one
//!   keyspace per tenant, writes that belong together in one atomic batch
//!   or transaction, and group commit (many writers wait on one flush) so
//!   that everything acknowledged is on disk;
//! - [`PgStore`], PostgreSQL through `tokio-postgres` and a
//!   `deadpool-postgres` pool, for several Plugboard nodes on one
//!   database; migrations run at start.
//!
//! Interactions are stored as a small header (state, attributes, times)
//! and an append-only timeline: a checkpoint writes the header and only the
//! entries that are new, never the whole record again. Indexes by state
//! and by customer address make "open interactions" and "this customer's
//! history across channels" queries, not scans.
//!
//! Every tenant-scoped call names its tenant and touches only its data.

use async_trait::async_trait;
use plugboard_core::{
    Address, Binding, Error, Grants, Interaction, InteractionState, PluginInfo, PluginVersion,
    SipUser, Tenant, TimelineEntry, Trunk,
};
use sha2::{Digest, Sha256};

pub mod conformance;
mod pg;
mod sled_store;

pub use pg::PgStore;
pub use sled_store::{DEFAULT_CACHE_BYTES, SledStore};

/// Result with the shared error type.
pub type Result<T> = std::result::Result<T, Error>;

/// SHA-256 of an API key, hex: what is stored instead of the key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Tenants and their API keys.
#[async_trait]
pub trait TenantStore: Send + Sync {
    /// Creates a tenant with the hash of its API key, atomically (both or
    /// neither, also across a crash); `Conflict` if the tenant exists.
    async fn create_tenant(&self, tenant: &Tenant, api_key_hash: &str) -> Result<()>;
    /// Replaces an existing tenant's record; `NotFound` if there is none.
    async fn update_tenant(&self, tenant: &Tenant) -> Result<()>;
    /// A tenant by id.
    async fn tenant(&self, id: &str) -> Result<Option<Tenant>>;
    /// All tenants.
    async fn tenants(&self) -> Result<Vec<Tenant>>;
    /// The tenant an API key hash belongs to.
    async fn tenant_for_key(&self, api_key_hash: &str) -> Result<Option<String>>;
}

/// Plugins: immutable versions with their component bytes, the active
/// version, grants and configs.
#[async_trait]
pub trait PluginStore: Send + Sync {
    /// Stores a new plugin version with its bytes and makes it active, in
    /// one atomic write (no version without its blob). The version number
    /// is assigned here and returned in the record.
    async fn add_plugin_version(
        &self,
        tenant: &str,
        version: PluginVersion,
        bytes: &[u8],
    ) -> Result<PluginVersion>;
    /// A plugin with its versions, grants and active version.
    async fn plugin(&self, tenant: &str, name: &str) -> Result<Option<PluginInfo>>;
    /// All plugins of a tenant.
    async fn plugins(&self, tenant: &str) -> Result<Vec<PluginInfo>>;
    /// The bytes of a component by hash.
    async fn plugin_bytes(&self, tenant: &str, sha256: &str) -> Result<Option<Vec<u8>>>;
    /// Makes `version` active (`None`: the one before the active one).
    async fn set_active_version(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u64>,
    ) -> Result<u64>;
    /// Replaces a plugin's grants; `NotFound` if it was never deployed.
    async fn set_grants(&self, tenant: &str, name: &str, grants: &Grants) -> Result<()>;
    /// Replaces a plugin's config; `NotFound` if it was never deployed.
    async fn set_config(&self, tenant: &str, name: &str, config: &serde_json::Value) -> Result<()>;
    /// A plugin's config (`Null` if none).
    async fn config(&self, tenant: &str, name: &str) -> Result<serde_json::Value>;
}

/// Addresses (numbers, mailboxes, widgets): each belongs to one tenant.
#[async_trait]
pub trait AddressStore: Send + Sync {
    /// Maps an address to a flow, claiming it for the tenant atomically;
    /// `Conflict` if another tenant owns it.
    async fn set_address(&self, tenant: &str, address: &Address) -> Result<()>;
    /// An address of a tenant.
    async fn address(&self, tenant: &str, address: &str) -> Result<Option<Address>>;
    /// All addresses of a tenant.
    async fn addresses(&self, tenant: &str) -> Result<Vec<Address>>;
    /// Which tenant owns an address (an inbound call or message must reach
    /// exactly one tenant).
    async fn address_owner(&self, address: &str) -> Result<Option<(String, Address)>>;
}

/// The voice channel's records: SIP users, trunks, registrations.
#[async_trait]
pub trait RegistrarStore: Send + Sync {
    /// Creates or replaces a SIP user (registrar credentials).
    async fn set_sip_user(&self, tenant: &str, user: &SipUser) -> Result<()>;
    /// A SIP user.
    async fn sip_user(&self, tenant: &str, name: &str) -> Result<Option<SipUser>>;
    /// All SIP users of a tenant.
    async fn sip_users(&self, tenant: &str) -> Result<Vec<SipUser>>;
    /// Creates or replaces a trunk.
    async fn set_trunk(&self, tenant: &str, trunk: &Trunk) -> Result<()>;
    /// All trunks of a tenant.
    async fn trunks(&self, tenant: &str) -> Result<Vec<Trunk>>;
    /// Replaces a SIP user's registrations (none: removes them). Soft
    /// state: it may be written without waiting for the disk.
    async fn set_bindings(&self, tenant: &str, user: &str, bindings: &[Binding]) -> Result<()>;
    /// The stored registrations of one SIP user.
    async fn user_bindings(&self, tenant: &str, user: &str) -> Result<Vec<Binding>>;
    /// The stored registrations of a tenant's SIP users, by user.
    async fn bindings(&self, tenant: &str) -> Result<Vec<(String, Vec<Binding>)>>;
}

/// Interactions: a header and an append-only timeline, indexed by state
/// and by customer address.
#[async_trait]
pub trait InteractionStore: Send + Sync {
    /// Writes an interaction's header (everything but the timeline) and
    /// appends its timeline entries from index `stored` on (those before
    /// were written by earlier calls), in one atomic write. Returns the
    /// number of entries now stored.
    async fn save_interaction(&self, ix: &Interaction, stored: usize) -> Result<usize>;
    /// [`InteractionStore::save_interaction`] without waiting for the disk
    /// (still atomic; on disk with the next flush or commit): for
    /// checkpoints nobody was promised, such as a call's first record.
    async fn save_interaction_soft(&self, ix: &Interaction, stored: usize) -> Result<usize> {
        self.save_interaction(ix, stored).await
    }
    /// An interaction with its whole timeline.
    async fn interaction(&self, tenant: &str, id: &str) -> Result<Option<Interaction>>;
    /// An interaction's header without its timeline: `timeline` is empty
    /// and `timeline_base` is the number of stored entries, so a caller
    /// that only appends (a conversation's next step) does not read the
    /// whole history. Saving it writes the header and the new entries.
    async fn interaction_head(&self, tenant: &str, id: &str) -> Result<Option<Interaction>> {
        Ok(self.interaction(tenant, id).await?.map(|mut ix| {
            ix.timeline_base = ix.timeline.len();
            ix.timeline.clear();
            ix
        }))
    }
    /// The newest `limit` interactions of a tenant, newest first, with
    /// their timelines.
    async fn interactions(&self, tenant: &str, limit: usize) -> Result<Vec<Interaction>>;
    /// The newest `limit` interactions of a tenant in `state`, newest first
    /// (headers only: empty timelines). On the embedded store a final
    /// state (closed, abandoned, failed) is not indexed: it reads the
    /// records newest first until it has `limit`.
    async fn interactions_in_state(
        &self,
        tenant: &str,
        state: InteractionState,
        limit: usize,
    ) -> Result<Vec<Interaction>>;
    /// The newest `limit` interactions of one customer address, on every
    /// channel, newest first (headers only).
    async fn customer_history(
        &self,
        tenant: &str,
        customer: &str,
        limit: usize,
    ) -> Result<Vec<Interaction>>;
    /// Up to `limit` interaction headers whose ids sort after `after`
    /// (from the first when it is empty) and before `before`, oldest
    /// first: ids begin with their creation time, so this pages through
    /// the interactions created in a period (retention).
    async fn interactions_between(
        &self,
        tenant: &str,
        after: &str,
        before: &str,
        limit: usize,
    ) -> Result<Vec<Interaction>>;
    /// Deletes an interaction: its header, its timeline and its index
    /// keys, atomically and durably. False if there was none.
    async fn delete_interaction(&self, tenant: &str, id: &str) -> Result<bool> {
        Ok(self.delete_interactions(tenant, &[id.to_string()]).await? == 1)
    }
    /// Deletes interactions as [`InteractionStore::delete_interaction`]
    /// does, in one atomic, durable write. Returns how many there were.
    async fn delete_interactions(&self, tenant: &str, ids: &[String]) -> Result<u64>;
}

/// The plugins' tenant-scoped key-value store.
#[async_trait]
pub trait KvStore: Send + Sync {
    /// Reads `key` of `tenant`.
    async fn kv_get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>>;
    /// Writes `key` of `tenant`; durable on return.
    async fn kv_set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<()>;
    /// Deletes `key` of `tenant`; durable on return.
    async fn kv_delete(&self, tenant: &str, key: &str) -> Result<()>;
    /// Deletes every key of `tenant` that starts with `prefix` (not
    /// empty); durable on return. Returns how many there were.
    async fn kv_delete_prefix(&self, tenant: &str, prefix: &str) -> Result<u64>;
}

/// Blobs of a tenant (call recordings), by id.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores a blob durably; `Conflict` if the id is taken.
    async fn put_blob(&self, tenant: &str, id: &str, bytes: &[u8]) -> Result<()>;
    /// [`BlobStore::put_blob`] without waiting for the disk: on disk with
    /// the next durable write, which must name the blob (a message
    /// stored after its attachments).
    async fn put_blob_soft(&self, tenant: &str, id: &str, bytes: &[u8]) -> Result<()> {
        self.put_blob(tenant, id, bytes).await
    }
    /// A blob.
    async fn blob(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>>;
    /// Deletes a blob; false if there was none. Durable on return.
    async fn delete_blob(&self, tenant: &str, id: &str) -> Result<bool>;
}

/// A tenant's secrets (API tokens for its CRM, …), sealed by the engine
/// before they reach the store: the store only ever holds ciphertext.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// Stores (or replaces) a sealed secret; durable on return.
    async fn set_secret(&self, tenant: &str, name: &str, sealed: &[u8]) -> Result<()>;
    /// A sealed secret.
    async fn secret(&self, tenant: &str, name: &str) -> Result<Option<Vec<u8>>>;
    /// The names of a tenant's secrets, sorted.
    async fn secret_names(&self, tenant: &str) -> Result<Vec<String>>;
    /// Deletes a secret; false if there was none. Durable on return.
    async fn delete_secret(&self, tenant: &str, name: &str) -> Result<bool>;
}

/// A tenant's configuration records by kind and id (the ACD's queues and
/// agents), as JSON the engine validates.
#[async_trait]
pub trait RecordStore: Send + Sync {
    /// Stores (or replaces) a record; durable on return.
    async fn set_record(
        &self,
        tenant: &str,
        kind: &str,
        id: &str,
        record: &serde_json::Value,
    ) -> Result<()>;
    /// A record.
    async fn record(&self, tenant: &str, kind: &str, id: &str)
    -> Result<Option<serde_json::Value>>;
    /// Every record of a kind, by id.
    async fn records(&self, tenant: &str, kind: &str) -> Result<Vec<serde_json::Value>>;
    /// Deletes a record; false if there was none. Durable on return.
    async fn delete_record(&self, tenant: &str, kind: &str, id: &str) -> Result<bool>;
    /// Deletes every record of a kind (a conversation's messages);
    /// durable on return. Returns how many there were.
    async fn delete_kind(&self, tenant: &str, kind: &str) -> Result<u64>;
    /// Stores several records of a kind at once (a log's batch); durable
    /// on return, with one flush for all.
    async fn set_records(
        &self,
        tenant: &str,
        kind: &str,
        records: &[(String, serde_json::Value)],
    ) -> Result<()>;
    /// Up to `limit` records of a kind whose ids come after `after` (from
    /// the first when it is empty), in id order, with their ids: a log
    /// read page by page when its ids are fixed-width digits that sort by
    /// time.
    async fn records_after(
        &self,
        tenant: &str,
        kind: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, serde_json::Value)>>;
    /// Applies several writes, of any kinds, atomically (all or none,
    /// also across a crash) and durably. With `unless_exists` naming a
    /// record, nothing is written when that record exists, and its value
    /// is returned instead: an idempotent insert (a retried message finds
    /// the first one).
    async fn apply_records(
        &self,
        tenant: &str,
        writes: &[RecordWrite],
        unless_exists: Option<(&str, &str)>,
    ) -> Result<Option<serde_json::Value>>;
    /// [`RecordStore::apply_records`] (without a guard) that does not wait
    /// for the disk: atomic, and on disk with the next durable write or
    /// flush. For writes whose loss in a crash is harmless (a marker the
    /// restart recomputes).
    async fn apply_records_soft(&self, tenant: &str, writes: &[RecordWrite]) -> Result<()> {
        self.apply_records(tenant, writes, None).await.map(|_| ())
    }
}

/// One write of [`RecordStore::apply_records`].
#[derive(Debug, Clone, PartialEq)]
pub enum RecordWrite {
    /// Stores (or replaces) a record.
    Put {
        /// Kind.
        kind: String,
        /// Id.
        id: String,
        /// The record.
        record: serde_json::Value,
    },
    /// Deletes a record (if it exists).
    Delete {
        /// Kind.
        kind: String,
        /// Id.
        id: String,
    },
}

impl RecordWrite {
    /// A put.
    pub fn put(kind: impl Into<String>, id: impl Into<String>, record: serde_json::Value) -> Self {
        RecordWrite::Put {
            kind: kind.into(),
            id: id.into(),
            record,
        }
    }

    /// A delete.
    pub fn delete(kind: impl Into<String>, id: impl Into<String>) -> Self {
        RecordWrite::Delete {
            kind: kind.into(),
            id: id.into(),
        }
    }
}

/// What a backup or a restore copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BackupSummary {
    /// Trees (the global ones and one per tenant).
    pub trees: u64,
    /// Keys, over all trees.
    pub keys: u64,
    /// Bytes of the backup.
    pub bytes: u64,
    /// How long the store's several-key writes waited while it was read,
    /// ms (a backup only).
    pub held_ms: u64,
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompactSummary {
    /// Keys copied.
    pub keys: u64,
    /// Keys written while it copied, copied again before the switch.
    pub rewritten: u64,
    /// Of those, the keys copied while writes waited.
    pub held_keys: u64,
    /// Bytes of the store's directory before.
    pub before_bytes: u64,
    /// Bytes of the store's directory after.
    pub after_bytes: u64,
    /// How long writes waited (while the keys written meanwhile were
    /// copied again and the generations switched), ms.
    pub held_ms: u64,
}

/// What an operator does with the store: checks that it answers, watches
/// its bounds, backs it up, compacts it.
#[async_trait]
pub trait StoreOps: Send + Sync {
    /// Ok when the store answers now: a read, and (the embedded store)
    /// its writer thread running.
    async fn check(&self) -> Result<()>;
    /// The store's gauges for `/metrics`: name (after `plugboard_store_`),
    /// help, value.
    fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }
    /// Rewrites the store while it serves, so that deleted data leaves
    /// the disk and its space comes back (blocking: run it off the async
    /// threads). `None` for a store that does it itself (PostgreSQL's
    /// autovacuum).
    fn compact(&self) -> Result<Option<CompactSummary>> {
        Ok(None)
    }

    /// Writes a consistent copy of the store to `out` while it serves
    /// (blocking: run it off the async threads). A store with its own
    /// backup tools (PostgreSQL: `pg_dump`) refuses.
    fn backup(&self, _out: &mut dyn std::io::Write) -> Result<BackupSummary> {
        Err(Error::Invalid(
            "this store is backed up with its own tools (PostgreSQL: pg_dump)".into(),
        ))
    }
}

/// Everything the runtime stores. The digital channels' messages,
/// customers and outbox are records written together with
/// [`RecordStore::apply_records`].
pub trait Store:
    TenantStore
    + PluginStore
    + AddressStore
    + RegistrarStore
    + InteractionStore
    + KvStore
    + BlobStore
    + SecretStore
    + RecordStore
    + StoreOps
{
}

impl<T> Store for T where
    T: TenantStore
        + PluginStore
        + AddressStore
        + RegistrarStore
        + InteractionStore
        + KvStore
        + BlobStore
        + SecretStore
        + RecordStore
        + StoreOps
{
}

/// The header of an interaction: the record without its timeline.
pub(crate) fn header(ix: &Interaction) -> Interaction {
    // Field by field: cloning the whole record would copy its timeline.
    Interaction {
        id: ix.id.clone(),
        tenant: ix.tenant.clone(),
        channel: ix.channel,
        from: ix.from.clone(),
        to: ix.to.clone(),
        flow: ix.flow.clone(),
        state: ix.state,
        attributes: ix.attributes.clone(),
        simulated: ix.simulated,
        created_ms: ix.created_ms,
        closed_ms: ix.closed_ms,
        timeline: Vec::new(),
        timeline_base: 0,
    }
}

/// The timeline entries of `ix` from `stored` on, numbered (entries
/// before `ix.timeline_base` are not in memory and not written).
pub(crate) fn new_entries(
    ix: &Interaction,
    stored: usize,
) -> impl Iterator<Item = (usize, &TimelineEntry)> {
    let base = ix.timeline_base;
    ix.timeline
        .iter()
        .enumerate()
        .map(move |(i, e)| (base + i, e))
        .skip(stored.saturating_sub(base))
}

/// The active version of a plugin and its kind, from its versions.
pub(crate) fn plugin_info(
    name: &str,
    versions: Vec<PluginVersion>,
    active: Option<u64>,
    grants: Grants,
) -> Option<PluginInfo> {
    let last = versions.last()?;
    let active = active.unwrap_or(last.version);
    let kind = versions
        .iter()
        .find(|v| v.version == active)
        .map_or(last.kind, |v| v.kind);
    Some(PluginInfo {
        name: name.to_string(),
        kind,
        active_version: active,
        versions,
        grants,
    })
}

/// The version `set_active_version` makes active.
pub(crate) fn rollback_target(info: &PluginInfo, version: Option<u64>) -> Result<u64> {
    let name = &info.name;
    match version {
        Some(v) => {
            if info.version(v).is_none() {
                return Err(Error::NotFound(format!("plugin {name} version {v}")));
            }
            Ok(v)
        }
        None => info
            .versions
            .iter()
            .rev()
            .map(|x| x.version)
            .find(|v| *v < info.active_version)
            .ok_or_else(|| {
                Error::Conflict(format!(
                    "plugin {name} has no version before {} to roll back to",
                    info.active_version
                ))
            }),
    }
}

pub(crate) fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(e.to_string())
}
