//! The embedded store: sled in a directory.
//!
//! Layout: global trees `tenants` (id → tenant), `api_keys` (SHA-256 of a
//! key → tenant id) and `address_owners` (address → tenant id); one tree
//! per tenant (`t/{id}`), its keyspace:
//!
//! | key | value |
//! |---|---|
//! | `plugin/{name}/v/{version:012}` | a plugin version |
//! | `plugin/{name}/active`, `…/grants`, `…/config` | plugin settings |
//! | `blob/{sha256}` | component bytes |
//! | `address/{address}`, `sipuser/{name}`, `trunk/{name}`, `reg/{user}` | records |
//! | `kv/{key}` | the plugins' kv |
//! | `rec/{id}` | recordings (blobs) |
//! | `ix/{id}` | an interaction's header; once it has ended, the whole interaction |
//! | `ixt/{id}/{seq:08}` | a live interaction's timeline, one key per entry |
//! | `ixs/{state}/{id}` | index: live interactions by state |
//! | `ixc/{customer}\0{id}` | index: interactions by customer address |
//!
//! Writes that belong together are one sled transaction or batch (a
//! checkpoint that only appends one timeline entry is one insert: sled
//! serialises batches behind one lock, which capped checkpoints at a
//! quarter of the rate). A write
//! is acknowledged after a flush that covers it; concurrent writers share
//! flushes (group commit): a writer thread takes every waiter queued
//! since its last flush, flushes once, and wakes them all.
//!
//! Record writes ([`RecordStore::apply_records`]) and interaction
//! checkpoints are group-committed further: the writer thread applies
//! every write set queued since its last round in one sled transaction
//! per tenant, then flushes once. A sled transaction or batch writes the
//! log's IO buffer out twice whatever its size (it rolls the buffer before
//! and after), so one transaction per write set capped a message's
//! several writes at a few hundred messages a second; one per round
//! shares that cost among every conversation writing at the time.

use crate::{
    AddressStore, BackupSummary, BlobStore, CompactSummary, InteractionStore, KvStore, PluginStore,
    RecordStore, RecordWrite, RegistrarStore, Result, SecretStore, StoreOps, TenantStore, header,
    new_entries, plugin_info, rollback_target, storage,
};
use async_trait::async_trait;
use plugboard_core::{
    Address, Binding, Error, Grants, Interaction, InteractionState, PluginInfo, PluginVersion,
    SipUser, Tenant, TimelineEntry, Trunk,
};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::path::Path;
use std::sync::{Arc, mpsc};
use tokio::sync::oneshot;

type Waiter = oneshot::Sender<std::result::Result<(), String>>;

/// A key to write (`Some` value) or remove (`None`).
type Op = (Vec<u8>, Option<Vec<u8>>);

/// What the writer thread is asked to do.
enum Job {
    /// Reply once everything written before is on disk.
    Flush(Waiter),
    /// Apply a write set atomically (unless its guard key exists).
    Commit(Commit),
    /// Apply no write set from the answer on until the sender is dropped
    /// (a backup reads meanwhile).
    Hold(Hold),
}

/// A hold on the writer thread: it answers `held` once every write set
/// before it is applied, then waits for `release` to close.
struct Hold {
    held: mpsc::SyncSender<()>,
    release: mpsc::Receiver<()>,
}

/// One write set for the writer thread.
struct Commit {
    /// The tree's name: the writer applies it to the store's current
    /// generation (a compaction may swap it while the set waits).
    tree: sled::IVec,
    ops: Vec<Op>,
    /// Nothing is written when this key exists; its value is the answer.
    guard: Option<Vec<u8>>,
    /// Reply only after a flush covers it.
    durable: bool,
    reply: oneshot::Sender<std::result::Result<Option<sled::IVec>, String>>,
}

/// One generation of the store: a sled database in a directory of its
/// own. A compaction copies what is live into the next generation and
/// swaps it in.
struct Gen {
    db: sled::Db,
    tenants: sled::Tree,
    keys: sled::Tree,
    owners: sled::Tree,
    /// Open tenant keyspaces (a tenant is never deleted while open).
    spaces: std::sync::RwLock<std::collections::HashMap<String, sled::Tree>>,
    /// Its directory.
    dir: std::path::PathBuf,
}

impl Gen {
    fn open(dir: &Path, cache_bytes: u64) -> Result<Gen> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(storage)?;
        Ok(Gen {
            tenants: db.open_tree("tenants").map_err(storage)?,
            keys: db.open_tree("api_keys").map_err(storage)?,
            owners: db.open_tree("address_owners").map_err(storage)?,
            db,
            spaces: Default::default(),
            dir: dir.to_path_buf(),
        })
    }
}

/// An interaction checkpoint's writes.
enum Checkpoint {
    /// A write set for the writer thread.
    Set(Vec<Op>),
    /// One timeline entry, appended already (its key).
    Appended(Vec<u8>),
}

/// Keys written while a compaction copies: (tree, key).
type Dirty = std::collections::HashSet<(sled::IVec, Vec<u8>)>;

/// What the store's threads share: the current generation, and the keys
/// written while a compaction copies.
struct Shared {
    current: std::sync::RwLock<Arc<Gen>>,
    /// While a compaction copies: every (tree, key) written since it
    /// began, copied again before the swap.
    dirty: std::sync::Mutex<Option<Dirty>>,
    /// Whether `dirty` is on (read without the lock on every write).
    copying: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn current_gen(&self) -> Arc<Gen> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Notes a key written (after the write), while a compaction copies.
    fn touched(&self, tree: &sled::IVec, key: &[u8]) {
        if self.copying.load(std::sync::atomic::Ordering::SeqCst)
            && let Ok(mut d) = self.dirty.lock()
            && let Some(set) = d.as_mut()
        {
            set.insert((tree.clone(), key.to_vec()));
        }
    }
}

/// The embedded store: sled in a directory, with group commit.
pub struct SledStore {
    shared: Arc<Shared>,
    /// The store's directory (its generations are below it).
    root: std::path::PathBuf,
    /// The directory's lock, held while open.
    _lock: std::fs::File,
    /// Jobs for the writer thread (`None` once closing).
    flusher: Option<mpsc::Sender<Job>>,
    /// The writer thread, joined on drop so the database is closed when
    /// the store is.
    flush_thread: Option<std::thread::JoinHandle<()>>,
    /// Serialises version numbering of plugin deploys.
    deploys: tokio::sync::Mutex<()>,
    /// The bound of sled's page cache, bytes.
    cache_bytes: u64,
    /// Writes of several keys made here rather than by the writer thread
    /// (a tenant with its key, an address with its owner, a plugin
    /// version with its bytes) hold it shared while they apply; a backup
    /// holds it alone while it reads, so they are whole in the copy or
    /// absent.
    gate: std::sync::RwLock<()>,
    /// Every write made here (not by the writer thread) holds it shared
    /// from choosing its tree to noting its keys; a compaction holds it
    /// alone while it swaps generations, so no write lands in the old one.
    swap: std::sync::RwLock<()>,
    /// A backup or a compaction is running (one at a time).
    backing_up: std::sync::atomic::AtomicBool,
}

/// The page cache's bound when none is given: 16 MiB. (sled's own default
/// is 1 GiB, which a long run fills: a server taking 150 calls a second
/// grew by about 2.4 KiB a call until a restart. sled counts cached pages
/// by their size on disk; in memory they take about three times that: at
/// 75 calls a second a 64 MiB bound filled in 7 minutes at about 200 MiB
/// resident, 16 MiB in 3 minutes at about 110 MiB, with no failed call.)
pub const DEFAULT_CACHE_BYTES: u64 = 16 << 20;

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(storage)
}

fn parse<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(storage)
}

/// Adds write operations to a batch.
fn add_ops(batch: &mut sled::Batch, ops: Vec<Op>) {
    for (k, v) in ops {
        match v {
            Some(v) => batch.insert(k, v),
            None => batch.remove(k),
        }
    }
}

/// An interaction's stored record (`ix/{id}`): its header's JSON, then,
/// once the interaction has ended, a newline and its timeline's JSON (an
/// array). Compact JSON holds no raw newline, so the first one splits
/// them, and a header is read without parsing the timeline.
fn split_record(v: &[u8]) -> (&[u8], Option<&[u8]>) {
    match v.iter().position(|&b| b == b'\n') {
        Some(i) => (&v[..i], Some(&v[i + 1..])),
        None => (v, None),
    }
}

/// The number of a timeline entry from the end of its key.
fn entry_seq(tail: &[u8], id: &str) -> Result<usize> {
    std::str::from_utf8(tail)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .ok_or_else(|| Error::Storage(format!("bad timeline key of {id}")))
}

/// Puts `entry` at its number `seq` of `timeline`: it replaces the entry
/// of that number, or comes last (entries are numbered from 0 with no
/// gaps, so a number past the end is the next one).
fn place(timeline: &mut Vec<TimelineEntry>, seq: usize, entry: TimelineEntry) {
    match timeline.get_mut(seq) {
        Some(e) => *e = entry,
        None => timeline.push(entry),
    }
}

fn version_key(name: &str, v: u64) -> String {
    format!("plugin/{name}/v/{v:012}")
}

fn state_key(state: InteractionState, id: &str) -> String {
    format!("ixs/{}/{id}", state.name())
}

fn customer_key(customer: &str, id: &str) -> Vec<u8> {
    let mut k = format!("ixc/{customer}").into_bytes();
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn customer_prefix(customer: &str) -> Vec<u8> {
    let mut k = format!("ixc/{customer}").into_bytes();
    k.push(0);
    k
}

fn tx_error(e: TransactionError<Error>) -> Error {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => storage(e),
    }
}

/// The writer thread. Each round takes every job queued since the last
/// one, applies the write sets (one transaction per tenant), flushes once
/// if any job asks for durability, and answers them all.
fn writer(shared: Arc<Shared>, rx: mpsc::Receiver<Job>) {
    /// Jobs taken in one round at most (a bound on one transaction).
    const ROUND: usize = 1024;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < ROUND
            && let Ok(j) = rx.try_recv()
        {
            jobs.push(j);
        }
        let mut waiters = Vec::new();
        let mut commits: Vec<Vec<Commit>> = Vec::new();
        let mut holds = Vec::new();
        for job in jobs {
            match job {
                Job::Flush(w) => waiters.push(w),
                Job::Hold(h) => holds.push(h),
                Job::Commit(c) => match commits.iter_mut().find(|g| g[0].tree == c.tree) {
                    Some(group) => group.push(c),
                    None => commits.push(vec![c]),
                },
            }
        }
        let mut done = Vec::new();
        let g = shared.current_gen();
        for group in commits {
            let applied =
                g.db.open_tree(&group[0].tree)
                    .map_err(|e| e.to_string())
                    .and_then(|tree| commit_group(&tree, &group));
            match applied {
                Ok(answers) => {
                    for (c, a) in group.iter().zip(&answers) {
                        if a.is_none() {
                            for (k, _) in &c.ops {
                                shared.touched(&c.tree, k);
                            }
                        }
                    }
                    done.extend(group.into_iter().zip(answers.into_iter().map(Ok)))
                }
                Err(e) => done.extend(group.into_iter().map(|c| (c, Err(e.clone())))),
            }
        }
        let flushed = if waiters.is_empty() && !done.iter().any(|(c, r)| c.durable && r.is_ok()) {
            Ok(())
        } else {
            g.db.flush().map(|_| ()).map_err(|e| e.to_string())
        };
        for w in waiters {
            let _ = w.send(flushed.clone());
        }
        for (c, r) in done {
            let r = match (r, &flushed) {
                (Ok(_), Err(e)) if c.durable => Err(e.clone()),
                (r, _) => r,
            };
            let _ = c.reply.send(r);
        }
        // Write sets queued meanwhile wait for the hold's end.
        for h in holds {
            if h.held.send(()).is_ok() {
                let _ = h.release.recv();
            }
        }
    }
}

/// The format of the data this version writes: 3 (interactions as a
/// header, a timeline and index keys; an ended one's timeline packed into
/// its record). Recorded in the `meta` tree.
pub const FORMAT: u32 = 3;

/// Migrations, by the format they bring the data to.
type Migration = fn(&SledStore) -> Result<()>;
const MIGRATIONS: &[(u32, Migration)] = &[(2, SledStore::migrate_v1), (3, SledStore::migrate_v2)];

/// How long the old generation stays after a switch, for reads that
/// began before it.
const OLD_GENERATION_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Copies keys (tree, key) from `old` to `new` as they are in `old` now
/// (a key gone there is removed).
fn copy_keys(old: &Gen, new: &Gen, keys: Dirty) -> Result<()> {
    for (tree, key) in keys {
        let value = old
            .db
            .open_tree(&tree)
            .and_then(|t| t.get(&key))
            .map_err(storage)?;
        let dst = new.db.open_tree(&tree).map_err(storage)?;
        match value {
            Some(v) => dst.insert(key, v),
            None => dst.remove(key),
        }
        .map_err(storage)?;
    }
    Ok(())
}

/// The bytes of the files below `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// The store's generations: sled databases in `gen-{n}` directories below
/// the store's directory, the current one named in its `CURRENT` file (a
/// store from before compaction has its database in the directory itself
/// and no `CURRENT`). A compaction writes the next generation, flushes it,
/// then replaces `CURRENT` (written aside, synced, renamed): a crash
/// before the rename leaves the old generation current, after it the new
/// one; what the other left is removed at the next open.
mod generations {
    use super::{Result, storage};
    use std::path::{Path, PathBuf};

    const CURRENT: &str = "CURRENT";
    /// Held (an advisory lock) by the process that has the store open,
    /// before anything below is cleaned up.
    pub(super) const LOCK: &str = "LOCK";

    /// Locks the store's directory for this process; `Conflict` if
    /// another has it.
    pub(super) fn lock(root: &Path) -> Result<std::fs::File> {
        std::fs::create_dir_all(root).map_err(storage)?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(LOCK))
            .map_err(storage)?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => Err(plugboard_core::Error::Conflict(
                format!("{} is open in another process", root.display()),
            )),
            Err(std::fs::TryLockError::Error(e)) => Err(storage(e)),
        }
    }

    /// The current generation's directory, after removing what an
    /// interrupted compaction left.
    pub(super) fn open(root: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(root).map_err(storage)?;
        match std::fs::read_to_string(root.join(CURRENT)) {
            Ok(name) => {
                let name = name.trim();
                if !is_generation(name) {
                    return Err(storage(format!(
                        "{}: {CURRENT} names {name:?}, not a generation",
                        root.display()
                    )));
                }
                let current = root.join(name);
                // A generation that is not there is a damaged store: stop
                // rather than clean up (and lose) what is there.
                if !current.join("conf").exists() {
                    return Err(storage(format!(
                        "{}: {CURRENT} names {name}, which holds no database; \
                         refusing to open (restore a backup)",
                        root.display()
                    )));
                }
                remove_old(root, &current);
                Ok(current)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The database is the directory's own; a next generation
                // never switched to is removed. With no database here but
                // generations, `CURRENT` was lost: stop.
                let generations = std::fs::read_dir(root)
                    .map_err(storage)?
                    .flatten()
                    .any(|e| is_generation(&e.file_name().to_string_lossy()));
                if generations && !root.join("conf").exists() {
                    return Err(storage(format!(
                        "{}: generations but no {CURRENT} naming one; refusing to open",
                        root.display()
                    )));
                }
                for e in std::fs::read_dir(root).map_err(storage)?.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if is_generation(&name) {
                        std::fs::remove_dir_all(e.path()).map_err(storage)?;
                    }
                }
                let _ = std::fs::remove_file(root.join(format!("{CURRENT}.tmp")));
                Ok(root.to_path_buf())
            }
            Err(e) => Err(storage(e)),
        }
    }

    fn is_generation(name: &str) -> bool {
        name.strip_prefix("gen-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    /// The directory of the generation after `current`.
    pub(super) fn next(root: &Path, current: &Path) -> PathBuf {
        let n = current
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("gen-"))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|_| current != root)
            .unwrap_or(0);
        root.join(format!("gen-{}", n + 1))
    }

    /// Makes `to` the current generation, durably.
    pub(super) fn switch(root: &Path, to: &Path) -> Result<()> {
        use std::io::Write;
        let name = to
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| storage("a generation without a name"))?;
        let tmp = root.join(format!("{CURRENT}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(storage)?;
        f.write_all(name.as_bytes()).map_err(storage)?;
        f.sync_all().map_err(storage)?;
        std::fs::rename(&tmp, root.join(CURRENT)).map_err(storage)?;
        // Renamed: the new generation is current from here on, whatever
        // happens (it must not be removed as a failed one).
        if let Err(e) = std::fs::File::open(root).and_then(|d| d.sync_all()) {
            tracing::warn!("syncing {} after the switch: {e}", root.display());
        }
        Ok(())
    }

    /// Removes everything below `root` but `CURRENT` and the current
    /// generation `keep` (earlier generations, and the files of a
    /// database that was the directory's own).
    pub(super) fn remove_old(root: &Path, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(root) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path == keep || e.file_name() == CURRENT || e.file_name() == LOCK {
                continue;
            }
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(err) = removed {
                tracing::warn!(
                    "removing the old store generation {}: {err}",
                    path.display()
                );
            }
        }
    }
}

/// The first line of a backup of the embedded store; then, per tree,
/// `T` name, and per key `K` key value (each a 4-byte big-endian length
/// and the bytes); then `E` and the SHA-256 of everything before it.
const BACKUP_MAGIC: &[u8] = b"plugboard-sled-backup 1\n";

/// The largest key or value a backup holds (a damaged length is not
/// allocated).
const MAX_FIELD: usize = 1 << 30;

/// A writer that hashes and counts what goes through it.
struct Hashing<'a> {
    out: &'a mut dyn std::io::Write,
    hash: sha2::Sha256,
    bytes: u64,
}

impl Hashing<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        use sha2::Digest;
        self.out.write_all(b).map_err(storage)?;
        self.hash.update(b);
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn field(&mut self, b: &[u8]) -> Result<()> {
        if b.len() > MAX_FIELD {
            return Err(storage("a key or value over 1 GiB cannot be backed up"));
        }
        let n = u32::try_from(b.len()).map_err(storage)?;
        self.put(&n.to_be_bytes())?;
        self.put(b)
    }
}

/// A reader of a backup that hashes what it reads.
struct Unhashing<'a> {
    input: &'a mut dyn std::io::Read,
    hash: sha2::Sha256,
    bytes: u64,
}

impl Unhashing<'_> {
    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        use sha2::Digest;
        let mut b = vec![0u8; n];
        self.input
            .read_exact(&mut b)
            .map_err(|e| Error::Invalid(format!("the backup is damaged or cut short: {e}")))?;
        self.hash.update(&b);
        self.bytes += n as u64;
        Ok(b)
    }

    fn field(&mut self) -> Result<Vec<u8>> {
        let n = self.take(4)?;
        let n = u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize;
        if n > MAX_FIELD {
            return Err(Error::Invalid(
                "the backup is damaged (a field over 1 GiB)".into(),
            ));
        }
        self.take(n)
    }
}

/// Applies a tenant's write sets, in order, in one transaction; the
/// answer for each is its guard's value if the guard stopped it.
fn commit_group(
    tree: &sled::Tree,
    group: &[Commit],
) -> std::result::Result<Vec<Option<sled::IVec>>, String> {
    tree.transaction(|t| {
        let mut answers = Vec::with_capacity(group.len());
        for c in group {
            if let Some(g) = &c.guard
                && let Some(v) = t.get(g)?
            {
                answers.push(Some(v));
                continue;
            }
            for (key, value) in &c.ops {
                match value {
                    Some(v) => t.insert(key.as_slice(), v.as_slice())?,
                    None => t.remove(key.as_slice())?,
                };
            }
            answers.push(None);
        }
        Ok::<_, ConflictableTransactionError<()>>(answers)
    })
    .map_err(|e| match e {
        TransactionError::Abort(()) => "aborted".to_string(),
        TransactionError::Storage(e) => e.to_string(),
    })
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, its page cache bounded by
    /// [`DEFAULT_CACHE_BYTES`].
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in `dir`, its page cache bounded by
    /// `cache_bytes` (what sled keeps of the data in memory; the rest is
    /// read from disk when needed).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self> {
        let lock = generations::lock(dir)?;
        let current = generations::open(dir)?;
        let g = Gen::open(&current, cache_bytes)?;
        let shared = Arc::new(Shared {
            current: std::sync::RwLock::new(Arc::new(g)),
            dirty: std::sync::Mutex::new(None),
            copying: std::sync::atomic::AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let w = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sled-flush".into())
            .spawn(move || writer(w, rx))
            .map_err(storage)?;
        let store = SledStore {
            shared,
            _lock: lock,
            root: dir.to_path_buf(),
            flusher: Some(tx),
            flush_thread: Some(thread),
            deploys: tokio::sync::Mutex::new(()),
            cache_bytes,
            gate: std::sync::RwLock::new(()),
            swap: std::sync::RwLock::new(()),
            backing_up: std::sync::atomic::AtomicBool::new(false),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Brings the store's data to [`FORMAT`]: each migration after the
    /// format it was written in, in order (each is idempotent: a crash
    /// midway runs it again), then records the format. A store written by
    /// a newer version is refused rather than misread.
    fn migrate(&self) -> Result<()> {
        let g = self.shared.current_gen();
        let meta = g.db.open_tree("meta").map_err(storage)?;
        let found = match meta.get("format").map_err(storage)? {
            Some(v) => {
                let b: [u8; 4] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| Error::Storage("a damaged format record".into()))?;
                u32::from_be_bytes(b)
            }
            // Before formats were recorded: the first store (1) or the
            // second; the first's migration tells them apart.
            None => 1,
        };
        if found > FORMAT {
            return Err(Error::Storage(format!(
                "the store was written by a newer Plugboard (format {found}); this one reads formats up to {FORMAT}"
            )));
        }
        for (to, migration) in MIGRATIONS {
            if *to > found {
                migration(self)?;
            }
        }
        if found != FORMAT {
            meta.insert("format", &FORMAT.to_be_bytes())
                .map_err(storage)?;
            g.db.flush().map_err(storage)?;
        }
        Ok(())
    }

    /// The format of the store's data (1: interactions stored whole; 2:
    /// a header, a timeline and indexes; 3: as 2, an ended interaction's
    /// timeline packed into its record).
    pub fn format(&self) -> Result<u32> {
        let meta = self
            .shared
            .current_gen()
            .db
            .open_tree("meta")
            .map_err(storage)?;
        Ok(meta
            .get("format")
            .map_err(storage)?
            .and_then(|v| v.as_ref().try_into().ok())
            .map_or(1, u32::from_be_bytes))
    }

    /// Writes a copy of the whole store to `out` ([`StoreOps::backup`]). Write sets (messages, interaction checkpoints,
    /// record sets) wait while it reads, so each is in the copy whole or
    /// not at all, and everything acknowledged before the call is in it;
    /// single writes made meanwhile (a kv entry, a blob) are in it if they
    /// came before the copy reached their key.
    fn backup_now(&self, out: &mut dyn std::io::Write) -> Result<BackupSummary> {
        use sha2::Digest;
        use std::sync::atomic::Ordering;
        if self.backing_up.swap(true, Ordering::SeqCst) {
            return Err(Error::Conflict(
                "a backup or a compaction is running".into(),
            ));
        }
        struct Done<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _done = Done(&self.backing_up);
        let started = std::time::Instant::now();
        // Several-key writes made here first, then the writer thread's
        // write sets (never the other way round: a write set is never
        // waited for under the gate).
        let gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let release = self.hold_writer()?;
        let mut w = Hashing {
            out,
            hash: sha2::Sha256::new(),
            bytes: 0,
        };
        let mut summary = BackupSummary::default();
        w.put(BACKUP_MAGIC)?;
        let g = self.shared.current_gen();
        for name in g.db.tree_names() {
            let tree = g.db.open_tree(&name).map_err(storage)?;
            w.put(b"T")?;
            w.field(&name)?;
            summary.trees += 1;
            for kv in tree.iter() {
                let (k, v) = kv.map_err(storage)?;
                w.put(b"K")?;
                w.field(&k)?;
                w.field(&v)?;
                summary.keys += 1;
            }
        }
        drop(release);
        drop(gate);
        summary.held_ms = started.elapsed().as_millis() as u64;
        w.put(b"E")?;
        let digest = w.hash.clone().finalize();
        w.out.write_all(&digest).map_err(storage)?;
        w.out.flush().map_err(storage)?;
        summary.bytes = w.bytes + digest.len() as u64;
        Ok(summary)
    }

    /// Holds the writer thread: it answers once every write set queued
    /// before is applied, and applies none after until the returned
    /// sender is dropped.
    fn hold_writer(&self) -> Result<mpsc::SyncSender<()>> {
        let stopped = || Error::Storage("the store's writer has stopped".into());
        let (held, is_held) = mpsc::sync_channel(1);
        let (release, released) = mpsc::sync_channel::<()>(0);
        self.flusher
            .as_ref()
            .ok_or_else(|| Error::Storage("the store is closing".into()))?
            .send(Job::Hold(Hold {
                held,
                release: released,
            }))
            .map_err(|_| stopped())?;
        is_held.recv().map_err(|_| stopped())?;
        Ok(release)
    }

    /// Copies what is live into the next generation and swaps it in
    /// ([`StoreOps::compact`]). Writes go on while it copies (the keys
    /// they touch are noted and copied again); they wait only while those
    /// are copied and the generations are switched.
    fn compact_now(&self) -> Result<CompactSummary> {
        use std::sync::atomic::Ordering;
        if self.backing_up.swap(true, Ordering::SeqCst) {
            return Err(Error::Conflict(
                "a backup or a compaction is running".into(),
            ));
        }
        struct Done<'a>(&'a SledStore);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                let shared = &self.0.shared;
                shared.copying.store(false, Ordering::SeqCst);
                if let Ok(mut d) = shared.dirty.lock() {
                    *d = None;
                }
                self.0.backing_up.store(false, Ordering::SeqCst);
            }
        }
        let _done = Done(self);
        let old = self.shared.current_gen();
        let before = dir_bytes(&self.root);
        let next_dir = generations::next(&self.root, &old.dir);
        if next_dir.exists() {
            std::fs::remove_dir_all(&next_dir).map_err(storage)?;
        }
        let result = (|| {
            let new = Gen::open(&next_dir, self.cache_bytes)?;
            // Writes from now on are noted, then everything is copied.
            if let Ok(mut d) = self.shared.dirty.lock() {
                *d = Some(Default::default());
            }
            self.shared.copying.store(true, Ordering::SeqCst);
            let mut keys = 0u64;
            for name in old.db.tree_names() {
                let (src, dst) = (
                    old.db.open_tree(&name).map_err(storage)?,
                    new.db.open_tree(&name).map_err(storage)?,
                );
                // Batches of at most 8 MiB (recordings are large values).
                let mut batch = sled::Batch::default();
                let mut bytes = 0;
                for kv in src.iter() {
                    let (k, v) = kv.map_err(storage)?;
                    bytes += k.len() + v.len();
                    batch.insert(k, v);
                    keys += 1;
                    if bytes >= 8 << 20 {
                        dst.apply_batch(std::mem::take(&mut batch))
                            .map_err(storage)?;
                        bytes = 0;
                    }
                }
                dst.apply_batch(batch).map_err(storage)?;
            }
            // The keys written meanwhile are copied again while writes go
            // on, a few rounds, so that few are left to copy while they
            // wait.
            let mut again = 0u64;
            for _ in 0..4 {
                let round = self
                    .shared
                    .dirty
                    .lock()
                    .map_err(|_| Error::Storage("a compaction's notes are lost".into()))?
                    .replace(Default::default())
                    .unwrap_or_default();
                let small = round.len() < 1000;
                again += round.len() as u64;
                copy_keys(&old, &new, round)?;
                if small {
                    break;
                }
            }
            // Writes wait: those made here at the swap gate, the writer
            // thread's at a hold. Then the keys written meanwhile are
            // copied again and the new generation takes over.
            let started = std::time::Instant::now();
            let swap = self.swap.write().unwrap_or_else(|p| p.into_inner());
            let release = self.hold_writer()?;
            self.shared.copying.store(false, Ordering::SeqCst);
            let dirty = self
                .shared
                .dirty
                .lock()
                .map_err(|_| Error::Storage("a compaction's notes are lost".into()))?
                .take()
                .unwrap_or_default();
            let held_keys = dirty.len() as u64;
            again += held_keys;
            copy_keys(&old, &new, dirty)?;
            new.db.flush().map_err(storage)?;
            generations::switch(&self.root, &next_dir)?;
            *self
                .shared
                .current
                .write()
                .unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
            drop(release);
            drop(swap);
            Ok((keys, again, held_keys, started.elapsed().as_millis() as u64))
        })();
        let (keys, again, held_keys, held_ms) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&next_dir);
                return Err(e);
            }
        };
        // The old generation goes once nobody reads it any more: a read
        // that took its tree before the switch (reads take milliseconds;
        // large values are files of their own, read by path).
        let deadline = std::time::Instant::now() + OLD_GENERATION_GRACE;
        while Arc::strong_count(&old) > 1 || std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            if std::time::Instant::now() > deadline + std::time::Duration::from_secs(10) {
                break;
            }
        }
        drop(old);
        generations::remove_old(&self.root, &next_dir);
        Ok(CompactSummary {
            keys,
            rewritten: again,
            held_keys,
            before_bytes: before,
            after_bytes: dir_bytes(&self.root),
            held_ms,
        })
    }

    /// Restores a backup made by [`StoreOps::backup`] into `dir`, which
    /// must not exist yet. The copy is checked (its SHA-256) before it is
    /// moved into place: a damaged or cut backup leaves nothing behind.
    pub fn restore(dir: &Path, input: &mut dyn std::io::Read) -> Result<BackupSummary> {
        use sha2::Digest;
        if dir.exists() {
            return Err(Error::Conflict(format!(
                "{} exists: restore into a new data directory",
                dir.display()
            )));
        }
        let name = dir
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: not a directory name", dir.display())))?;
        // Its own name: another restore into the same place meanwhile
        // cannot move this one's half into place.
        let tmp = dir.with_file_name(format!(
            "{}.restoring-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        let result = (|| {
            let db = sled::Config::new().path(&tmp).open().map_err(storage)?;
            let mut r = Unhashing {
                input,
                hash: sha2::Sha256::new(),
                bytes: 0,
            };
            if r.take(BACKUP_MAGIC.len())? != BACKUP_MAGIC {
                return Err(Error::Invalid(
                    "not a Plugboard backup of the embedded store".into(),
                ));
            }
            let mut summary = BackupSummary::default();
            let mut tree: Option<sled::Tree> = None;
            loop {
                match r.take(1)?[0] {
                    b'T' => {
                        tree = Some(db.open_tree(r.field()?).map_err(storage)?);
                        summary.trees += 1;
                    }
                    b'K' => {
                        let t = tree
                            .as_ref()
                            .ok_or_else(|| Error::Invalid("the backup is damaged".into()))?;
                        let (k, v) = (r.field()?, r.field()?);
                        t.insert(k, v).map_err(storage)?;
                        summary.keys += 1;
                    }
                    b'E' => break,
                    _ => return Err(Error::Invalid("the backup is damaged".into())),
                }
            }
            let expected = r.hash.clone().finalize();
            let mut digest = [0u8; 32];
            r.input
                .read_exact(&mut digest)
                .map_err(|e| Error::Invalid(format!("the backup is damaged or cut short: {e}")))?;
            if digest[..] != expected[..] {
                return Err(Error::Invalid(
                    "the backup is damaged (its checksum differs)".into(),
                ));
            }
            db.flush().map_err(storage)?;
            summary.bytes = r.bytes + 32;
            Ok(summary)
        })();
        match result {
            Ok(summary) => match std::fs::rename(&tmp, dir) {
                Ok(()) => Ok(summary),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    Err(storage(e))
                }
            },
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Waits until everything written before the call is on disk.
    async fn durable(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.flusher
            .as_ref()
            .ok_or_else(|| Error::Storage("the store is closing".into()))?
            .send(Job::Flush(tx))
            .map_err(|_| Error::Storage("the flusher has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Storage("the flusher has stopped".into()))?
            .map_err(Error::Storage)
    }

    /// Writes an interaction: one insert here, or a write set for the
    /// writer thread's next round; with `durable`, after the flush.
    async fn save_interaction_as(
        &self,
        ix: &Interaction,
        stored: usize,
        durable: bool,
    ) -> Result<usize> {
        let (space, ops) = {
            let _w = self.write_guard().await;
            let space = self.space(&ix.tenant)?;
            let ops = Self::interaction_ops(&space, ix, stored)?;
            if let Checkpoint::Appended(key) = &ops {
                self.touched(&space, [key]);
            }
            (space, ops)
        };
        match ops {
            Checkpoint::Set(ops) => {
                self.commit(space, ops, None, durable).await?;
            }
            Checkpoint::Appended(_) if durable => self.durable().await?,
            Checkpoint::Appended(_) => {}
        }
        Ok(ix.timeline_len().max(stored))
    }

    /// Applies a write set on the writer thread, in its next round's
    /// transaction; with `durable`, answers after the flush that covers it.
    /// Returns the guard's value if the guard key exists (nothing written).
    async fn commit(
        &self,
        tree: sled::Tree,
        ops: Vec<Op>,
        guard: Option<Vec<u8>>,
        durable: bool,
    ) -> Result<Option<sled::IVec>> {
        let (reply, rx) = oneshot::channel();
        let stopped = || Error::Storage("the store's writer has stopped".into());
        self.flusher
            .as_ref()
            .ok_or_else(|| Error::Storage("the store is closing".into()))?
            .send(Job::Commit(Commit {
                tree: tree.name(),
                ops,
                guard,
                durable,
                reply,
            }))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?.map_err(Error::Storage)
    }

    /// Removes every key of the tenant's keyspace under `prefix` through
    /// the writer thread, durably, in write sets of a bounded size.
    /// Returns how many there were.
    async fn remove_prefix(&self, tenant: &str, prefix: &[u8]) -> Result<u64> {
        /// Keys in one write set at most.
        const CHUNK: usize = 4096;
        let mut removed = 0u64;
        loop {
            // The current generation's tree each time: a compaction may
            // switch generations between two rounds.
            let space = self.space(tenant)?;
            let keys = space
                .scan_prefix(prefix)
                .keys()
                .take(CHUNK)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(storage)?;
            if keys.is_empty() {
                return Ok(removed);
            }
            removed += keys.len() as u64;
            let ops = keys.into_iter().map(|k| (k.to_vec(), None)).collect();
            self.commit(space, ops, None, true).await?;
        }
    }

    /// The tenant's keyspace; `NotFound` if the tenant does not exist.
    fn space(&self, tenant: &str) -> Result<sled::Tree> {
        let g = self.shared.current_gen();
        if let Some(t) = g.spaces.read().ok().and_then(|m| m.get(tenant).cloned()) {
            return Ok(t);
        }
        if !g.tenants.contains_key(tenant).map_err(storage)? {
            return Err(Error::NotFound(format!("tenant {tenant}")));
        }
        let tree = g.db.open_tree(format!("t/{tenant}")).map_err(storage)?;
        if let Ok(mut m) = g.spaces.write() {
            m.insert(tenant.to_string(), tree.clone());
        }
        Ok(tree)
    }

    /// Held from choosing a tree to noting the keys written in it, by a
    /// write made here (see `swap`); waited for without blocking the
    /// thread. The caller holds it across no `.await`.
    async fn write_guard(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        loop {
            match self.swap.try_read() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Writes (`Some`) or removes (`None`) one key of the tenant's
    /// keyspace, not waiting for the disk; returns the value before.
    async fn write_one(
        &self,
        tenant: &str,
        key: impl AsRef<[u8]>,
        value: Option<Vec<u8>>,
    ) -> Result<Option<sled::IVec>> {
        let _w = self.write_guard().await;
        let space = self.space(tenant)?;
        let old = match value {
            Some(v) => space.insert(key.as_ref(), v),
            None => space.remove(key.as_ref()),
        }
        .map_err(storage)?;
        self.touched(&space, [key.as_ref()]);
        Ok(old)
    }

    /// [`SledStore::write_guard`] and the gate of several-key writes
    /// (see `gate`), both or neither, waited for without blocking.
    async fn several_keys_guard(
        &self,
    ) -> (
        std::sync::RwLockReadGuard<'_, ()>,
        std::sync::RwLockReadGuard<'_, ()>,
    ) {
        fn take<'a>(lock: &'a std::sync::RwLock<()>) -> Option<std::sync::RwLockReadGuard<'a, ()>> {
            match lock.try_read() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }
        loop {
            if let Some(both) = take(&self.swap).and_then(|s| take(&self.gate).map(|g| (s, g))) {
                return both;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Notes keys written in `tree` (for a compaction copying meanwhile).
    fn touched<K: AsRef<[u8]>>(&self, tree: &sled::Tree, keys: impl IntoIterator<Item = K>) {
        if self
            .shared
            .copying
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            let name = tree.name();
            for k in keys {
                self.shared.touched(&name, k.as_ref());
            }
        }
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        tree: &sled::Tree,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<T>> {
        tree.get(key)
            .map_err(storage)?
            .map(|b| parse(&b))
            .transpose()
    }

    /// Writes `value` as JSON at `key` in the tenant's keyspace, durably.
    async fn put<T: serde::Serialize + Sync>(
        &self,
        tenant: &str,
        key: &str,
        value: &T,
    ) -> Result<()> {
        self.write_one(tenant, key, Some(json(value)?)).await?;
        self.durable().await
    }

    /// The raw bytes at `key` in the tenant's keyspace.
    fn bytes(&self, tenant: &str, key: String) -> Result<Option<Vec<u8>>> {
        Ok(self
            .space(tenant)?
            .get(key)
            .map_err(storage)?
            .map(|v| v.to_vec()))
    }

    /// Every JSON value under `prefix` in the tenant's keyspace, in key order.
    fn list<T: serde::de::DeserializeOwned>(&self, tenant: &str, prefix: &str) -> Result<Vec<T>> {
        self.space(tenant)?
            .scan_prefix(prefix)
            .map(|kv| kv.map_err(storage).and_then(|(_, v)| parse(&v)))
            .collect()
    }

    /// Writes a per-plugin setting; `NotFound` if the plugin was never
    /// deployed.
    async fn put_plugin_setting<T: serde::Serialize + Sync>(
        &self,
        tenant: &str,
        name: &str,
        setting: &str,
        value: &T,
    ) -> Result<()> {
        let exists = self
            .space(tenant)?
            .contains_key(format!("plugin/{name}/active"))
            .map_err(storage)?;
        if !exists {
            return Err(Error::NotFound(format!("plugin {name}")));
        }
        self.put(tenant, &format!("plugin/{name}/{setting}"), value)
            .await
    }

    fn plugin_info(space: &sled::Tree, name: &str) -> Result<Option<PluginInfo>> {
        let versions = space
            .scan_prefix(format!("plugin/{name}/v/"))
            .map(|kv| kv.map_err(storage).and_then(|(_, v)| parse(&v)))
            .collect::<Result<Vec<PluginVersion>>>()?;
        let active = Self::get_json(space, format!("plugin/{name}/active"))?;
        let grants = Self::get_json(space, format!("plugin/{name}/grants"))?.unwrap_or_default();
        Ok(plugin_info(name, versions, active, grants))
    }

    /// An interaction's whole timeline: the entries packed into its
    /// record (`packed`, JSON), then those stored a key each, each at its
    /// number (a key left beside a packed timeline replaces the entry of
    /// its number rather than adding one); and the keys of those.
    fn timeline(
        space: &sled::Tree,
        id: &str,
        packed: Option<&[u8]>,
    ) -> Result<(Vec<TimelineEntry>, Vec<sled::IVec>)> {
        let mut packed: Vec<TimelineEntry> = packed.map(parse).transpose()?.unwrap_or_default();
        let prefix = format!("ixt/{id}/");
        let mut keys = Vec::new();
        for kv in space.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(storage)?;
            place(&mut packed, entry_seq(&k[prefix.len()..], id)?, parse(&v)?);
            keys.push(k);
        }
        Ok((packed, keys))
    }

    /// An interaction's stored record with its whole timeline.
    fn whole(space: &sled::Tree, v: &[u8]) -> Result<Interaction> {
        let (head, packed) = split_record(v);
        let mut ix: Interaction = parse(head)?;
        ix.timeline = Self::timeline(space, &ix.id, packed)?.0;
        Ok(ix)
    }

    /// An interaction's header from its stored record (the packed
    /// timeline of an ended one is not read).
    fn head(v: &[u8]) -> Result<Interaction> {
        parse(split_record(v).0)
    }

    /// Headers of the interactions whose ids an index scan yields, newest
    /// first.
    fn headers_by_index(
        space: &sled::Tree,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Interaction>> {
        let mut out = Vec::new();
        for kv in space.scan_prefix(prefix).rev() {
            if out.len() >= limit {
                break;
            }
            let (k, _) = kv.map_err(storage)?;
            let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if let Some(v) = space.get(format!("ix/{id}")).map_err(storage)? {
                out.push(Self::head(&v)?);
            }
        }
        Ok(out)
    }

    /// Converts interactions stored whole by the first store (one JSON
    /// record at `interaction/{id}`) to a header, a timeline and indexes.
    fn migrate_v1(&self) -> Result<()> {
        let g = self.shared.current_gen();
        for name in g.db.tree_names() {
            if !name.starts_with(b"t/") {
                continue;
            }
            let space = g.db.open_tree(&name).map_err(storage)?;
            for kv in space.scan_prefix("interaction/") {
                let (k, v) = kv.map_err(storage)?;
                let ix: Interaction = parse(&v)?;
                // Idempotent: a crash in between migrates it again.
                Self::write_interaction(&space, &ix, 0)?;
                space.remove(k).map_err(storage)?;
            }
        }
        Ok(())
    }

    /// Packs the timeline of every ended interaction into its record,
    /// removes its key in the index by state, and removes the meta keys
    /// (`ixm/{id}`: the indexes' place and a hash of the header) that
    /// format 2 kept beside each record.
    fn migrate_v2(&self) -> Result<()> {
        /// Interactions in one batch at most.
        const CHUNK: usize = 512;
        let g = self.shared.current_gen();
        for name in g.db.tree_names() {
            if !name.starts_with(b"t/") {
                continue;
            }
            let space = g.db.open_tree(&name).map_err(storage)?;
            let mut batch = sled::Batch::default();
            let mut n = 0usize;
            for kv in space.scan_prefix("ix/") {
                let (k, v) = kv.map_err(storage)?;
                let id = String::from_utf8_lossy(&k[b"ix/".len()..]).into_owned();
                let head = Self::head(&v).map_err(|e| {
                    Error::Storage(format!(
                        "store format 3: interaction {id} of {}: {e}",
                        String::from_utf8_lossy(&name[2..])
                    ))
                })?;
                batch.remove(format!("ixm/{id}").as_bytes());
                if head.state.is_final() {
                    batch.remove(state_key(head.state, &id).as_bytes());
                }
                // Idempotent: a record packed already is packed again as
                // it is.
                if head.state.is_final()
                    && let Checkpoint::Set(ops) = Self::interaction_ops(&space, &head, 0)?
                {
                    add_ops(&mut batch, ops);
                }
                n += 1;
                if n.is_multiple_of(CHUNK) {
                    space
                        .apply_batch(std::mem::take(&mut batch))
                        .map_err(storage)?;
                    if n.is_multiple_of(CHUNK * 200) {
                        tracing::info!(
                            "store format 3: {n} interactions of {} migrated",
                            String::from_utf8_lossy(&name[2..])
                        );
                    }
                }
            }
            space.apply_batch(batch).map_err(storage)?;
        }
        Ok(())
    }

    /// Writes an interaction's header, its new timeline entries and its
    /// index keys, atomically (see [`SledStore::interaction_ops`]).
    fn write_interaction(space: &sled::Tree, ix: &Interaction, stored: usize) -> Result<()> {
        if let Checkpoint::Set(ops) = Self::interaction_ops(space, ix, stored)? {
            let mut batch = sled::Batch::default();
            add_ops(&mut batch, ops);
            space.apply_batch(batch).map_err(storage)?;
        }
        Ok(())
    }

    /// A checkpoint's writes, or, when they are one insert, that insert
    /// made here.
    ///
    /// While the interaction is live its timeline is a key per entry, so
    /// that a checkpoint that only appends one entry to an unchanged
    /// header is one plain insert. Once it has ended, its timeline is
    /// packed into its record (see [`split_record`]) and the entry keys
    /// go, with its key in the index by state (which serves live
    /// interactions; ended ones are found by scanning the records): an
    /// ended call keeps two keys (its record and its customer's index
    /// key) instead of four and one more per entry, and sled keeps memory
    /// for every page of keys it holds, cached or not. An entry written
    /// after the end (rare) rewrites the packed timeline.
    ///
    /// The writes are built from what is stored now, so checkpoints of one
    /// interaction must come one after another (each caller has the
    /// interaction to itself while it saves it).
    fn interaction_ops(space: &sled::Tree, ix: &Interaction, stored: usize) -> Result<Checkpoint> {
        let id = &ix.id;
        let key = format!("ix/{id}");
        let head = json(&header(ix))?;
        let old = space.get(&key).map_err(storage)?;
        let mut entries = new_entries(ix, stored).peekable();
        if !ix.state.is_final()
            && old.as_deref() == Some(head.as_slice())
            && let Some((seq, entry)) = entries.next()
            && entries.peek().is_none()
        {
            let key = format!("ixt/{id}/{seq:08}").into_bytes();
            space.insert(&key, json(entry)?).map_err(storage)?;
            return Ok(Checkpoint::Appended(key));
        }
        let (old_head, packed) = match &old {
            Some(v) => {
                let (h, t) = split_record(v);
                (Some(parse::<Interaction>(h)?), t)
            }
            None => (None, None),
        };
        let mut ops: Vec<Op> = Vec::new();
        let moved = old_head
            .as_ref()
            .is_none_or(|o| o.state != ix.state || o.from != ix.from);
        if moved {
            if let Some(o) = &old_head {
                ops.push((state_key(o.state, id).into_bytes(), None));
                ops.push((customer_key(&o.from, id), None));
            }
            if !ix.state.is_final() {
                ops.push((state_key(ix.state, id).into_bytes(), Some(Vec::new())));
            }
            ops.push((customer_key(&ix.from, id), Some(Vec::new())));
        }
        if ix.state.is_final() || packed.is_some() {
            let (mut timeline, keys) = Self::timeline(space, id, packed)?;
            ops.extend(keys.into_iter().map(|k| (k.to_vec(), None)));
            for (seq, entry) in new_entries(ix, stored) {
                place(&mut timeline, seq, entry.clone());
            }
            let mut record = head;
            record.push(b'\n');
            record.extend(json(&timeline)?);
            ops.push((key.into_bytes(), Some(record)));
        } else {
            ops.push((key.into_bytes(), Some(head)));
            for (seq, entry) in new_entries(ix, stored) {
                ops.push((
                    format!("ixt/{id}/{seq:08}").into_bytes(),
                    Some(json(entry)?),
                ));
            }
        }
        Ok(Checkpoint::Set(ops))
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.flusher = None;
        if let Some(t) = self.flush_thread.take() {
            let _ = t.join();
        }
    }
}

#[async_trait]
impl TenantStore for SledStore {
    async fn create_tenant(&self, tenant: &Tenant, api_key_hash: &str) -> Result<()> {
        let record = json(tenant)?;
        let guards = self.several_keys_guard().await;
        let g = self.shared.current_gen();
        (&g.tenants, &g.keys)
            .transaction(|(t, k)| {
                if t.get(tenant.id.as_bytes())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(Error::Conflict(
                        format!("tenant {} exists", tenant.id),
                    )));
                }
                t.insert(tenant.id.as_bytes(), record.as_slice())?;
                k.insert(api_key_hash.as_bytes(), tenant.id.as_bytes())?;
                Ok(())
            })
            .map_err(tx_error)?;
        self.touched(&g.tenants, [tenant.id.as_bytes()]);
        self.touched(&g.keys, [api_key_hash.as_bytes()]);
        drop(guards);
        self.durable().await
    }

    async fn update_tenant(&self, tenant: &Tenant) -> Result<()> {
        let new = json(tenant)?;
        let updated = {
            let _w = self.write_guard().await;
            let g = self.shared.current_gen();
            let updated = g
                .tenants
                .fetch_and_update(&tenant.id, |old| old.map(|_| new.clone()))
                .map_err(storage)?;
            self.touched(&g.tenants, [tenant.id.as_bytes()]);
            updated
        };
        if updated.is_none() {
            return Err(Error::NotFound(format!("tenant {}", tenant.id)));
        }
        self.durable().await
    }

    async fn tenant(&self, id: &str) -> Result<Option<Tenant>> {
        Self::get_json(&self.shared.current_gen().tenants, id)
    }

    async fn tenants(&self) -> Result<Vec<Tenant>> {
        self.shared
            .current_gen()
            .tenants
            .iter()
            .map(|kv| kv.map_err(storage).and_then(|(_, v)| parse(&v)))
            .collect()
    }

    async fn tenant_for_key(&self, api_key_hash: &str) -> Result<Option<String>> {
        Ok(self
            .shared
            .current_gen()
            .keys
            .get(api_key_hash)
            .map_err(storage)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

#[async_trait]
impl PluginStore for SledStore {
    async fn add_plugin_version(
        &self,
        tenant: &str,
        mut version: PluginVersion,
        bytes: &[u8],
    ) -> Result<PluginVersion> {
        let space = self.space(tenant)?;
        {
            let _one_at_a_time = self.deploys.lock().await;
            let prefix = format!("plugin/{}/v/", version.name);
            let last = match space.scan_prefix(&prefix).next_back() {
                Some(kv) => parse::<PluginVersion>(&kv.map_err(storage)?.1)?.version,
                None => 0,
            };
            version.version = last + 1;
            // The blob, the version and the active pointer: all or nothing.
            let mut batch = sled::Batch::default();
            batch.insert(format!("blob/{}", version.sha256).as_bytes(), bytes);
            batch.insert(
                version_key(&version.name, version.version).as_bytes(),
                json(&version)?,
            );
            batch.insert(
                format!("plugin/{}/active", version.name).as_bytes(),
                json(&version.version)?,
            );
            let keys = [
                format!("blob/{}", version.sha256),
                version_key(&version.name, version.version),
                format!("plugin/{}/active", version.name),
            ];
            let _guards = self.several_keys_guard().await;
            let space = self.space(tenant)?;
            space.apply_batch(batch).map_err(storage)?;
            self.touched(&space, &keys);
        }
        self.durable().await?;
        Ok(version)
    }

    async fn plugin(&self, tenant: &str, name: &str) -> Result<Option<PluginInfo>> {
        Self::plugin_info(&self.space(tenant)?, name)
    }

    async fn plugins(&self, tenant: &str) -> Result<Vec<PluginInfo>> {
        let space = self.space(tenant)?;
        let mut names: Vec<String> = Vec::new();
        for kv in space.scan_prefix("plugin/") {
            let (k, _) = kv.map_err(storage)?;
            let k = String::from_utf8_lossy(&k);
            if let Some(name) = k.strip_prefix("plugin/").and_then(|r| r.split('/').next())
                && names.last().is_none_or(|n| n != name)
            {
                names.push(name.to_string());
            }
        }
        let mut out = Vec::new();
        for n in names {
            if let Some(p) = Self::plugin_info(&space, &n)? {
                out.push(p);
            }
        }
        Ok(out)
    }

    async fn plugin_bytes(&self, tenant: &str, sha256: &str) -> Result<Option<Vec<u8>>> {
        self.bytes(tenant, format!("blob/{sha256}"))
    }

    async fn set_active_version(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u64>,
    ) -> Result<u64> {
        let space = self.space(tenant)?;
        let info = Self::plugin_info(&space, name)?
            .ok_or_else(|| Error::NotFound(format!("plugin {name}")))?;
        let target = rollback_target(&info, version)?;
        self.write_one(
            tenant,
            format!("plugin/{name}/active"),
            Some(json(&target)?),
        )
        .await?;
        self.durable().await?;
        Ok(target)
    }

    async fn set_grants(&self, tenant: &str, name: &str, grants: &Grants) -> Result<()> {
        self.put_plugin_setting(tenant, name, "grants", grants)
            .await
    }

    async fn set_config(&self, tenant: &str, name: &str, config: &serde_json::Value) -> Result<()> {
        self.put_plugin_setting(tenant, name, "config", config)
            .await
    }

    async fn config(&self, tenant: &str, name: &str) -> Result<serde_json::Value> {
        let space = self.space(tenant)?;
        Ok(Self::get_json(&space, format!("plugin/{name}/config"))?.unwrap_or_default())
    }
}

#[async_trait]
impl AddressStore for SledStore {
    async fn set_address(&self, tenant: &str, address: &Address) -> Result<()> {
        let record = json(address)?;
        let key = format!("address/{}", address.address);
        let guards = self.several_keys_guard().await;
        let space = self.space(tenant)?;
        let g = self.shared.current_gen();
        (&g.owners, &space)
            .transaction(|(o, s)| {
                if let Some(owner) = o.get(address.address.as_bytes())?
                    && owner != tenant.as_bytes()
                {
                    return Err(ConflictableTransactionError::Abort(Error::Conflict(
                        format!("address {} belongs to another tenant", address.address),
                    )));
                }
                o.insert(address.address.as_bytes(), tenant.as_bytes())?;
                s.insert(key.as_bytes(), record.as_slice())?;
                Ok(())
            })
            .map_err(tx_error)?;
        self.touched(&g.owners, [address.address.as_bytes()]);
        self.touched(&space, [key.as_bytes()]);
        drop(guards);
        self.durable().await
    }

    async fn address(&self, tenant: &str, address: &str) -> Result<Option<Address>> {
        Self::get_json(&self.space(tenant)?, format!("address/{address}"))
    }

    async fn addresses(&self, tenant: &str) -> Result<Vec<Address>> {
        self.list(tenant, "address/")
    }

    async fn address_owner(&self, address: &str) -> Result<Option<(String, Address)>> {
        let owner = self.shared.current_gen().owners.get(address);
        let Some(owner) = owner.map_err(storage)? else {
            return Ok(None);
        };
        let tenant = String::from_utf8_lossy(&owner).into_owned();
        Ok(self.address(&tenant, address).await?.map(|a| (tenant, a)))
    }
}

#[async_trait]
impl RegistrarStore for SledStore {
    async fn set_sip_user(&self, tenant: &str, user: &SipUser) -> Result<()> {
        self.put(tenant, &format!("sipuser/{}", user.name), user)
            .await
    }

    async fn sip_user(&self, tenant: &str, name: &str) -> Result<Option<SipUser>> {
        Self::get_json(&self.space(tenant)?, format!("sipuser/{name}"))
    }

    async fn sip_users(&self, tenant: &str) -> Result<Vec<SipUser>> {
        self.list(tenant, "sipuser/")
    }

    async fn set_trunk(&self, tenant: &str, trunk: &Trunk) -> Result<()> {
        self.put(tenant, &format!("trunk/{}", trunk.name), trunk)
            .await
    }

    async fn trunks(&self, tenant: &str) -> Result<Vec<Trunk>> {
        self.list(tenant, "trunk/")
    }

    async fn set_bindings(&self, tenant: &str, user: &str, bindings: &[Binding]) -> Result<()> {
        let value = if bindings.is_empty() {
            None
        } else {
            Some(json(&bindings)?)
        };
        self.write_one(tenant, format!("reg/{user}"), value).await?;
        Ok(())
    }

    async fn user_bindings(&self, tenant: &str, user: &str) -> Result<Vec<Binding>> {
        Ok(Self::get_json(&self.space(tenant)?, format!("reg/{user}"))?.unwrap_or_default())
    }

    async fn bindings(&self, tenant: &str) -> Result<Vec<(String, Vec<Binding>)>> {
        self.space(tenant)?
            .scan_prefix("reg/")
            .map(|kv| {
                let (k, v) = kv.map_err(storage)?;
                let user = String::from_utf8_lossy(&k["reg/".len()..]).into_owned();
                Ok((user, parse(&v)?))
            })
            .collect()
    }
}

#[async_trait]
impl InteractionStore for SledStore {
    async fn save_interaction(&self, ix: &Interaction, stored: usize) -> Result<usize> {
        self.save_interaction_as(ix, stored, true).await
    }

    async fn save_interaction_soft(&self, ix: &Interaction, stored: usize) -> Result<usize> {
        self.save_interaction_as(ix, stored, false).await
    }

    async fn interaction(&self, tenant: &str, id: &str) -> Result<Option<Interaction>> {
        let space = self.space(tenant)?;
        let Some(v) = space.get(format!("ix/{id}")).map_err(storage)? else {
            return Ok(None);
        };
        Self::whole(&space, &v).map(Some)
    }

    async fn interaction_head(&self, tenant: &str, id: &str) -> Result<Option<Interaction>> {
        let space = self.space(tenant)?;
        let Some(v) = space.get(format!("ix/{id}")).map_err(storage)? else {
            return Ok(None);
        };
        let (head, packed) = split_record(&v);
        let mut ix: Interaction = parse(head)?;
        // Entries are numbered from 0 with no gaps: those packed into the
        // record come first, and the last key's number tells how many
        // there are in all.
        let packed = match packed {
            Some(t) => parse::<Vec<serde::de::IgnoredAny>>(t)?.len(),
            None => 0,
        };
        let prefix = format!("ixt/{id}/");
        ix.timeline_base = match space.scan_prefix(&prefix).next_back() {
            Some(kv) => {
                let (k, _) = kv.map_err(storage)?;
                (entry_seq(&k[prefix.len()..], id)? + 1).max(packed)
            }
            None => packed,
        };
        Ok(Some(ix))
    }

    async fn interactions(&self, tenant: &str, limit: usize) -> Result<Vec<Interaction>> {
        let space = self.space(tenant)?;
        let mut out = Vec::new();
        for kv in space.scan_prefix("ix/").rev().take(limit) {
            let (_, v) = kv.map_err(storage)?;
            out.push(Self::whole(&space, &v)?);
        }
        Ok(out)
    }

    async fn interactions_in_state(
        &self,
        tenant: &str,
        state: InteractionState,
        limit: usize,
    ) -> Result<Vec<Interaction>> {
        let space = self.space(tenant)?;
        if state.is_final() {
            // Ended interactions are not indexed by state (see
            // `interaction_ops`): the newest records, filtered.
            let mut out = Vec::new();
            for kv in space.scan_prefix("ix/").rev() {
                if out.len() >= limit {
                    break;
                }
                let head = Self::head(&kv.map_err(storage)?.1)?;
                if head.state == state {
                    out.push(head);
                }
            }
            return Ok(out);
        }
        let prefix = format!("ixs/{}/", state.name());
        Self::headers_by_index(&space, prefix.as_bytes(), limit)
    }

    async fn customer_history(
        &self,
        tenant: &str,
        customer: &str,
        limit: usize,
    ) -> Result<Vec<Interaction>> {
        let space = self.space(tenant)?;
        Self::headers_by_index(&space, &customer_prefix(customer), limit)
    }

    async fn interactions_between(
        &self,
        tenant: &str,
        after: &str,
        before: &str,
        limit: usize,
    ) -> Result<Vec<Interaction>> {
        use std::ops::Bound;
        let start = if after.is_empty() {
            Bound::Included(b"ix/".to_vec())
        } else {
            Bound::Excluded(format!("ix/{after}").into_bytes())
        };
        let end = Bound::Excluded(format!("ix/{before}").into_bytes());
        self.space(tenant)?
            .range::<Vec<u8>, _>((start, end))
            .take(limit)
            .map(|kv| Self::head(&kv.map_err(storage)?.1))
            .collect()
    }

    async fn delete_interactions(&self, tenant: &str, ids: &[String]) -> Result<u64> {
        let space = self.space(tenant)?;
        let mut ops: Vec<Op> = Vec::new();
        let mut found = 0;
        for id in ids {
            let Some(v) = space.get(format!("ix/{id}")).map_err(storage)? else {
                continue;
            };
            let head = Self::head(&v)?;
            found += 1;
            // The index keys are the record's: they are written together.
            ops.extend([
                (format!("ix/{id}").into_bytes(), None),
                (state_key(head.state, id).into_bytes(), None),
                (customer_key(&head.from, id), None),
            ]);
            for k in space.scan_prefix(format!("ixt/{id}/")).keys() {
                ops.push((k.map_err(storage)?.to_vec(), None));
            }
        }
        if !ops.is_empty() {
            self.commit(space, ops, None, true).await?;
        }
        Ok(found)
    }
}

#[async_trait]
impl RecordStore for SledStore {
    async fn set_record(
        &self,
        tenant: &str,
        kind: &str,
        id: &str,
        record: &serde_json::Value,
    ) -> Result<()> {
        self.put(tenant, &format!("rec/{kind}/{id}"), record).await
    }

    async fn record(
        &self,
        tenant: &str,
        kind: &str,
        id: &str,
    ) -> Result<Option<serde_json::Value>> {
        Self::get_json(&self.space(tenant)?, format!("rec/{kind}/{id}"))
    }

    async fn records(&self, tenant: &str, kind: &str) -> Result<Vec<serde_json::Value>> {
        self.list(tenant, &format!("rec/{kind}/"))
    }

    async fn delete_record(&self, tenant: &str, kind: &str, id: &str) -> Result<bool> {
        let old = self
            .write_one(tenant, format!("rec/{kind}/{id}"), None)
            .await?;
        self.durable().await?;
        Ok(old.is_some())
    }

    async fn delete_kind(&self, tenant: &str, kind: &str) -> Result<u64> {
        self.remove_prefix(tenant, format!("rec/{kind}/").as_bytes())
            .await
    }

    async fn set_records(
        &self,
        tenant: &str,
        kind: &str,
        records: &[(String, serde_json::Value)],
    ) -> Result<()> {
        // Through the writer thread, with the other write sets (a backup
        // then finds a batch whole or absent).
        let ops = records
            .iter()
            .map(|(id, record)| Ok((format!("rec/{kind}/{id}").into_bytes(), Some(json(record)?))))
            .collect::<Result<Vec<Op>>>()?;
        self.commit(self.space(tenant)?, ops, None, true).await?;
        Ok(())
    }

    async fn records_after(
        &self,
        tenant: &str,
        kind: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, serde_json::Value)>> {
        use std::ops::Bound;
        let prefix = format!("rec/{kind}/");
        let start = if after.is_empty() {
            Bound::Included(prefix.clone().into_bytes())
        } else {
            Bound::Excluded(format!("{prefix}{after}").into_bytes())
        };
        self.space(tenant)?
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take_while(|kv| {
                kv.as_ref()
                    .map_or(true, |(k, _)| k.starts_with(prefix.as_bytes()))
            })
            .take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(storage)?;
                let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                Ok((id, parse(&v)?))
            })
            .collect()
    }
    async fn apply_records(
        &self,
        tenant: &str,
        writes: &[RecordWrite],
        unless_exists: Option<(&str, &str)>,
    ) -> Result<Option<serde_json::Value>> {
        let guard = unless_exists.map(|(kind, id)| format!("rec/{kind}/{id}").into_bytes());
        let ops = record_ops(writes)?;
        let existing = self.commit(self.space(tenant)?, ops, guard, true).await?;
        existing.map(|v| parse(&v)).transpose()
    }

    async fn apply_records_soft(&self, tenant: &str, writes: &[RecordWrite]) -> Result<()> {
        let ops = record_ops(writes)?;
        self.commit(self.space(tenant)?, ops, None, false).await?;
        Ok(())
    }
}

/// The keys and values of record writes.
fn record_ops(writes: &[RecordWrite]) -> Result<Vec<Op>> {
    writes
        .iter()
        .map(|w| {
            Ok(match w {
                RecordWrite::Put { kind, id, record } => {
                    (format!("rec/{kind}/{id}").into_bytes(), Some(json(record)?))
                }
                RecordWrite::Delete { kind, id } => (format!("rec/{kind}/{id}").into_bytes(), None),
            })
        })
        .collect()
}

#[async_trait]
impl StoreOps for SledStore {
    async fn check(&self) -> Result<()> {
        self.shared.current_gen().tenants.first().map_err(storage)?;
        // The writer thread runs (not waiting on it: a backup holds its
        // write sets for a while, and the node still serves meanwhile).
        match &self.flush_thread {
            Some(t) if !t.is_finished() => Ok(()),
            _ => Err(Error::Storage("the store's writer has stopped".into())),
        }
    }

    fn compact(&self) -> Result<Option<CompactSummary>> {
        self.compact_now().map(Some)
    }

    fn backup(&self, out: &mut dyn std::io::Write) -> Result<BackupSummary> {
        self.backup_now(out)
    }

    fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "cache_limit_bytes",
                "The bound of the embedded store's page cache.",
                self.cache_bytes,
            ),
            (
                "disk_bytes",
                "The embedded store's files.",
                self.shared.current_gen().db.size_on_disk().unwrap_or(0),
            ),
        ]
    }
}

#[async_trait]
impl SecretStore for SledStore {
    async fn set_secret(&self, tenant: &str, name: &str, sealed: &[u8]) -> Result<()> {
        self.write_one(tenant, format!("sec/{name}"), Some(sealed.to_vec()))
            .await?;
        self.durable().await
    }

    async fn secret(&self, tenant: &str, name: &str) -> Result<Option<Vec<u8>>> {
        self.bytes(tenant, format!("sec/{name}"))
    }

    async fn secret_names(&self, tenant: &str) -> Result<Vec<String>> {
        self.space(tenant)?
            .scan_prefix("sec/")
            .keys()
            .map(|k| {
                let k = k.map_err(storage)?;
                Ok(String::from_utf8_lossy(&k["sec/".len()..]).into_owned())
            })
            .collect()
    }

    async fn delete_secret(&self, tenant: &str, name: &str) -> Result<bool> {
        let old = self.write_one(tenant, format!("sec/{name}"), None).await?;
        self.durable().await?;
        Ok(old.is_some())
    }
}

#[async_trait]
impl KvStore for SledStore {
    async fn kv_get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.bytes(tenant, format!("kv/{key}"))
    }

    async fn kv_set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<()> {
        self.write_one(tenant, format!("kv/{key}"), Some(value.to_vec()))
            .await?;
        self.durable().await
    }

    async fn kv_delete(&self, tenant: &str, key: &str) -> Result<()> {
        self.write_one(tenant, format!("kv/{key}"), None).await?;
        self.durable().await
    }

    async fn kv_delete_prefix(&self, tenant: &str, prefix: &str) -> Result<u64> {
        if prefix.is_empty() {
            return Err(Error::Invalid("an empty kv prefix".into()));
        }
        self.remove_prefix(tenant, format!("kv/{prefix}").as_bytes())
            .await
    }
}

#[async_trait]
impl BlobStore for SledStore {
    async fn put_blob(&self, tenant: &str, id: &str, bytes: &[u8]) -> Result<()> {
        self.put_blob_soft(tenant, id, bytes).await?;
        self.durable().await
    }

    async fn put_blob_soft(&self, tenant: &str, id: &str, bytes: &[u8]) -> Result<()> {
        let key = format!("rec/{id}");
        let r = {
            let _w = self.write_guard().await;
            let space = self.space(tenant)?;
            let r = space
                .compare_and_swap(&key, None::<&[u8]>, Some(bytes))
                .map_err(storage)?;
            self.touched(&space, [&key]);
            r
        };
        if r.is_err() {
            return Err(Error::Conflict(format!("blob {id} exists")));
        }
        Ok(())
    }

    async fn blob(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>> {
        self.bytes(tenant, format!("rec/{id}"))
    }

    async fn delete_blob(&self, tenant: &str, id: &str) -> Result<bool> {
        let old = self.write_one(tenant, format!("rec/{id}"), None).await?;
        self.durable().await?;
        Ok(old.is_some())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use plugboard_core::{Channel, EntryKind};

    /// A database at `dir` holding tenant `acme`, as every format wrote it.
    fn old_store(dir: &Path) -> sled::Db {
        let db = sled::open(dir).unwrap();
        let tenant = serde_json::json!({"id": "acme", "name": "Acme", "created_ms": 1});
        db.open_tree("tenants")
            .unwrap()
            .insert("acme", serde_json::to_vec(&tenant).unwrap())
            .unwrap();
        db
    }

    /// A store as the first format wrote it: a tenant, its key and an
    /// interaction stored whole at `interaction/{id}`, no format record.
    fn first_format(dir: &Path) {
        let db = old_store(dir);
        db.open_tree("api_keys")
            .unwrap()
            .insert("k", "acme")
            .unwrap();
        let ix = serde_json::json!({
            "id": "ix-0000000000001-00000001", "tenant": "acme", "channel": "voice",
            "from": "+4411", "to": "100", "state": "closed", "created_ms": 1, "closed_ms": 2,
            "attributes": {}, "flow": null, "simulated": false,
            "timeline": [
                {"at_ms": 1, "kind": "call", "data": {}},
                {"at_ms": 2, "kind": "hangup", "data": {"by": "caller"}}
            ]
        });
        db.open_tree("t/acme")
            .unwrap()
            .insert(
                "interaction/ix-0000000000001-00000001",
                serde_json::to_vec(&ix).unwrap(),
            )
            .unwrap();
        db.flush().unwrap();
    }

    /// A store as format 2 wrote it: a tenant with an ended call (two
    /// entries) and a live one (one entry), each a header, a key per
    /// timeline entry, index keys and a meta key.
    fn second_format(dir: &Path) {
        let db = old_store(dir);
        db.open_tree("meta")
            .unwrap()
            .insert("format", &2u32.to_be_bytes())
            .unwrap();
        let space = db.open_tree("t/acme").unwrap();
        for (id, state, entries) in [("ix-1-a", "closed", 2), ("ix-2-b", "in_flow", 1)] {
            let head = serde_json::json!({
                "id": id, "tenant": "acme", "channel": "voice", "from": "+4411",
                "to": "100", "state": state, "created_ms": 1, "closed_ms": null,
                "attributes": {}, "flow": null, "simulated": false, "timeline": []
            });
            space
                .insert(format!("ix/{id}"), serde_json::to_vec(&head).unwrap())
                .unwrap();
            space
                .insert(
                    format!("ixm/{id}"),
                    format!("{state}\0+4411\0{:016x}", 7).as_bytes(),
                )
                .unwrap();
            space.insert(format!("ixs/{state}/{id}"), "").unwrap();
            space.insert(customer_key("+4411", id), "").unwrap();
            for n in 0..entries {
                let e = serde_json::json!({"at_ms": n, "kind": "event", "data": {"n": n}});
                space
                    .insert(format!("ixt/{id}/{n:08}"), serde_json::to_vec(&e).unwrap())
                    .unwrap();
            }
        }
        db.flush().unwrap();
    }

    /// The keys of a tenant's keyspace under `prefix`.
    fn keys(store: &SledStore, prefix: &str) -> Vec<String> {
        store
            .space("acme")
            .unwrap()
            .scan_prefix(prefix)
            .keys()
            .map(|k| String::from_utf8_lossy(&k.unwrap()).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_second_format_store_is_migrated_to_packed_timelines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        second_format(&path);
        let store = SledStore::open(&path).unwrap();
        assert_eq!(store.format().unwrap(), FORMAT);
        assert!(keys(&store, "ixm/").is_empty(), "the meta keys are gone");
        assert_eq!(
            keys(&store, "ixs/"),
            ["ixs/in_flow/ix-2-b"],
            "only the live call is indexed by state"
        );
        assert_eq!(
            keys(&store, "ixt/"),
            ["ixt/ix-2-b/00000000"],
            "only the live call keeps a key per entry"
        );
        let ended = store.interaction("acme", "ix-1-a").await.unwrap().unwrap();
        assert_eq!(ended.timeline.len(), 2);
        assert_eq!(ended.timeline[1].data["n"], 1);
        let head = store
            .interaction_head("acme", "ix-1-a")
            .await
            .unwrap()
            .unwrap();
        assert!(head.timeline.is_empty());
        assert_eq!(head.timeline_base, 2);
        let history = store.customer_history("acme", "+4411", 10).await.unwrap();
        assert_eq!(history.len(), 2);
        assert!(
            history.iter().all(|h| h.timeline.is_empty()),
            "headers only"
        );
        // The live call goes on where format 2 left it, and ends packed.
        let mut live = store
            .interaction_head("acme", "ix-2-b")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(live.timeline_base, 1);
        let stored = live.timeline_base;
        live.timeline
            .push(crate::conformance::entry(EntryKind::Event, 1));
        live.state = InteractionState::Closed;
        store.save_interaction(&live, stored).await.unwrap();
        assert!(keys(&store, "ixt/").is_empty());
        let whole = store.interaction("acme", "ix-2-b").await.unwrap().unwrap();
        assert_eq!(whole.timeline.len(), 2);
        assert_eq!(
            store
                .interactions_in_state("acme", InteractionState::Closed, 10)
                .await
                .unwrap()
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn an_ended_interaction_keeps_its_record_and_its_customer_index_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let tenant: Tenant = serde_json::from_value(
            serde_json::json!({"id": "acme", "name": "Acme", "created_ms": 1}),
        )
        .unwrap();
        store.create_tenant(&tenant, "k").await.unwrap();
        let mut ix = crate::conformance::interaction("acme", "ix-5-c", "+4411", Channel::Voice);
        let mut stored = store.save_interaction(&ix, 0).await.unwrap();
        for n in 0..6 {
            ix.timeline
                .push(crate::conformance::entry(EntryKind::Event, n));
            stored = store.save_interaction(&ix, stored).await.unwrap();
        }
        assert_eq!(keys(&store, "ixt/").len(), 6, "a key per entry while live");
        ix.state = InteractionState::Closed;
        ix.timeline
            .push(crate::conformance::entry(EntryKind::Hangup, 6));
        store.save_interaction(&ix, stored).await.unwrap();
        assert_eq!(
            keys(&store, "ix"),
            [
                "ix/ix-5-c".to_string(),
                String::from_utf8(customer_key("+4411", "ix-5-c")).unwrap(),
            ]
        );
        let whole = store.interaction("acme", "ix-5-c").await.unwrap().unwrap();
        assert_eq!(whole.timeline, ix.timeline);
        // Written again after its end (a late entry): still packed.
        ix.timeline
            .push(crate::conformance::entry(EntryKind::Log, 7));
        store.save_interaction(&ix, 7).await.unwrap();
        let whole = store.interaction("acme", "ix-5-c").await.unwrap().unwrap();
        assert_eq!(whole.timeline, ix.timeline);
        assert!(keys(&store, "ixt/").is_empty());
    }

    #[tokio::test]
    async fn a_first_format_store_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        first_format(&path);
        let store = SledStore::open(&path).unwrap();
        assert_eq!(store.format().unwrap(), FORMAT);
        let ix = store
            .interaction("acme", "ix-0000000000001-00000001")
            .await
            .unwrap()
            .expect("migrated");
        assert_eq!(ix.timeline.len(), 2);
        let by_customer = store.customer_history("acme", "+4411", 10).await.unwrap();
        assert_eq!(by_customer.len(), 1, "indexed by its customer");
        assert!(
            store
                .space("acme")
                .unwrap()
                .scan_prefix("interaction/")
                .next()
                .is_none(),
            "the whole record is gone"
        );
        drop(store);
        // A format this version does not know: refused, left as it is.
        std::thread::sleep(std::time::Duration::from_millis(200));
        {
            let db = sled::open(&path).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert("format", &(FORMAT + 1).to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let err = SledStore::open(&path).err().expect("refused");
        assert!(err.to_string().contains("newer Plugboard"), "{err}");
    }
}
