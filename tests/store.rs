//! The store conformance suite on both implementations: sled in a
//! temporary directory, and a real PostgreSQL server started for this test
//! binary.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use anyhow::{Result, anyhow};
use plugboard_store::{PgStore, SledStore, Store, conformance};
use plugboard_tests::{files_containing, postgres};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_passes_the_conformance_suite() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path())?);
    conformance::run(store).await.map_err(|e| anyhow!(e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_conformance_suite() -> Result<()> {
    let url = postgres().database();
    let store: Arc<dyn Store> = Arc::new(PgStore::connect(&url, 8).await?);
    conformance::run(store).await.map_err(|e| anyhow!(e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_keeps_everything_across_a_reopen() -> Result<()> {
    let dir = tempfile::tempdir()?;
    seed(&SledStore::open(dir.path())?).await?;
    kept(&reopen(dir.path())?).await
}

/// Opens a store just closed: sled's IO threads can hold its lock for a
/// moment after the last handle is dropped (up to 5 s here).
fn reopen(path: &std::path::Path) -> Result<SledStore> {
    let t0 = std::time::Instant::now();
    loop {
        match SledStore::open(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && t0.elapsed().as_secs() < 5 =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Tenants, plugins and interactions, as the conformance suite writes them.
async fn seed(store: &SledStore) -> Result<()> {
    conformance::tenants(store).await.map_err(|e| anyhow!(e))?;
    conformance::plugins(store).await.map_err(|e| anyhow!(e))?;
    conformance::interactions(store)
        .await
        .map_err(|e| anyhow!(e))
}

/// What [`seed`] wrote is there.
async fn kept(store: &SledStore) -> Result<()> {
    use plugboard_store::{InteractionStore, PluginStore, TenantStore};
    assert_eq!(
        store
            .tenant_for_key(&plugboard_store::hash_key("kb"))
            .await?,
        Some("b".into())
    );
    assert_eq!(
        store.plugin("a", "ivr").await?.map(|p| p.active_version),
        Some(2)
    );
    let ix = store
        .interaction("a", "ix-0000000000001-00000001")
        .await?
        .unwrap();
    assert_eq!(ix.timeline.len(), 15);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_run_once_for_two_nodes() -> Result<()> {
    let url = postgres().database();
    // Two nodes starting at once on an empty database: one applies the
    // schema, the other finds it applied; both work.
    let (a, b) = tokio::join!(PgStore::connect(&url, 2), PgStore::connect(&url, 2));
    let (a, b): (Arc<dyn Store>, Arc<dyn Store>) = (Arc::new(a?), Arc::new(b?));
    conformance::tenants(&*a).await.map_err(|e| anyhow!(e))?;
    // What node a wrote, node b reads.
    assert_eq!(b.tenants().await?.len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_backup_restores_into_a_new_directory_and_a_damaged_one_restores_nothing() -> Result<()>
{
    use plugboard_store::StoreOps;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(&dir.path().join("a"))?);
    seed(&store).await?;
    let s = store.clone();
    let (copy, summary) = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let summary = s.backup(&mut out);
        (out, summary)
    })
    .await?;
    let summary = summary?;
    assert_eq!(summary.bytes, copy.len() as u64);
    let restored = SledStore::restore(&dir.path().join("b"), &mut copy.as_slice())?;
    assert_eq!(
        (restored.trees, restored.keys, restored.bytes),
        (summary.trees, summary.keys, summary.bytes)
    );
    kept(&reopen(&dir.path().join("b"))?).await?;
    // Over an existing store: refused.
    assert!(SledStore::restore(&dir.path().join("b"), &mut copy.as_slice()).is_err());
    // Cut short, or one byte changed anywhere: nothing restored.
    for damage in [copy.len() / 3, copy.len() / 2, copy.len() - 1] {
        let mut bad = copy.clone();
        bad[damage] ^= 0x55;
        let into = dir.path().join(format!("bad{damage}"));
        let e = SledStore::restore(&into, &mut bad.as_slice()).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert!(!into.exists());
        let cut = &copy[..copy.len() - 10];
        assert!(SledStore::restore(&into, &mut &cut[..]).is_err());
        assert!(!into.exists());
    }
    Ok(())
}

/// One backup at a time: a second one while the first reads is refused,
/// and the store's write sets wait for the first (then go through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_backup_meanwhile_is_refused_and_write_sets_wait_for_the_first() -> Result<()> {
    use plugboard_store::{RecordStore, StoreOps};
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path())?);
    seed(&store).await?;
    // A reader that takes its first bytes, says so, then waits to be let
    // go.
    struct Slow {
        started: Option<std::sync::mpsc::Sender<()>>,
        go: std::sync::mpsc::Receiver<()>,
    }
    impl std::io::Write for Slow {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if let Some(s) = self.started.take() {
                let _ = s.send(());
                let _ = self.go.recv();
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (go, wait) = std::sync::mpsc::channel();
    let (started, is_started) = std::sync::mpsc::channel();
    let s = store.clone();
    let first = tokio::task::spawn_blocking(move || {
        s.backup(&mut Slow {
            started: Some(started),
            go: wait,
        })
    });
    tokio::task::spawn_blocking(move || is_started.recv()).await??;
    let s = store.clone();
    let second = tokio::task::spawn_blocking(move || s.backup(&mut Vec::new())).await?;
    assert!(
        matches!(second, Err(plugboard_core::Error::Conflict(_))),
        "{second:?}"
    );
    // A write set queued now waits for the first backup's end.
    let writes = [plugboard_store::RecordWrite::put(
        "k",
        "1",
        serde_json::json!({}),
    )];
    let s = store.clone();
    let write = tokio::spawn(async move { s.apply_records("a", &writes, None).await });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !write.is_finished(),
        "a write set went through during the backup"
    );
    go.send(()).ok();
    let summary = first.await??;
    assert!(summary.keys > 0);
    write.await??;
    assert!(store.record("a", "k", "1").await?.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_compaction_keeps_every_write_made_meanwhile_and_gives_deleted_data_back() -> Result<()>
{
    use plugboard_core::{Channel, EntryKind};
    use plugboard_store::{
        BlobStore, InteractionStore, KvStore, RecordStore, RecordWrite, StoreOps,
    };
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = Arc::new(SledStore::open(&path)?);
    seed(&store).await?;
    // Data that is deleted: 100 blobs of 50 kB carrying a marker.
    let marker = b"GONE-AFTER-COMPACTION-";
    let put_and_delete = |store: Arc<SledStore>| async move {
        for i in 0..100 {
            store
                .put_blob("a", &format!("big-{i}"), &marker.repeat(2300))
                .await?;
        }
        for i in 0..100 {
            assert!(store.delete_blob("a", &format!("big-{i}")).await?);
        }
        Ok::<u64, anyhow::Error>(marker.repeat(2300).len() as u64 * 100)
    };
    put_and_delete(store.clone()).await?;
    assert!(
        !files_containing(&path, marker).is_empty(),
        "sled keeps deleted bytes"
    );
    // Four writers keep writing while it compacts: kv keys, record sets
    // (the writer thread), blobs, and an interaction's checkpoints.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..5u32 {
        let (s, stop) = (store.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut ix =
                conformance::interaction("b", "ix-9000000000000-00000001", "+1", Channel::Voice);
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                match w {
                    0 => s.kv_set("a", &format!("w/{n:06}"), b"v").await?,
                    1 => {
                        let put =
                            RecordWrite::put("wr", format!("{n:06}"), serde_json::json!({"n": n}));
                        s.apply_records("a", &[put], None).await.map(|_| ())?
                    }
                    2 => s.put_blob("b", &format!("w-{n:06}"), b"blob").await?,
                    // A delete by prefix across the switch ends (and
                    // deletes in the generation that is current).
                    4 => {
                        let prefix = format!("p/{n:06}/");
                        s.kv_set("a", &format!("{prefix}x"), b"v").await?;
                        let deleted = tokio::time::timeout(
                            std::time::Duration::from_secs(20),
                            s.kv_delete_prefix("a", &prefix),
                        )
                        .await??;
                        anyhow::ensure!(deleted == 1, "{prefix}: {deleted}");
                    }
                    _ => {
                        let stored = ix.timeline_len();
                        ix.push(EntryKind::Log, serde_json::json!({"n": n}));
                        s.save_interaction(&ix, stored).await.map(|_| ())?
                    }
                }
                n += 1;
            }
            Ok::<usize, anyhow::Error>(n)
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let s = store.clone();
    let summary = tokio::task::spawn_blocking(move || s.compact())
        .await??
        .expect("sled compacts");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut counts = Vec::new();
    for w in writers {
        counts.push(w.await??);
    }
    assert!(counts.iter().all(|n| *n > 10), "{counts:?}");
    // Everything acknowledged is there, before and after a reopen.
    let check = |store: Arc<SledStore>, counts: Vec<usize>| async move {
        kept(&store).await?;
        for n in 0..counts[0] {
            assert!(
                store.kv_get("a", &format!("w/{n:06}")).await?.is_some(),
                "kv {n}"
            );
        }
        assert_eq!(store.records("a", "wr").await?.len(), counts[1]);
        for n in 0..counts[2] {
            assert!(
                store.blob("b", &format!("w-{n:06}")).await?.is_some(),
                "blob {n}"
            );
        }
        let ix = store
            .interaction("b", "ix-9000000000000-00000001")
            .await?
            .unwrap();
        assert_eq!(ix.timeline.len(), counts[3]);
        assert!(store.blob("a", "big-0").await?.is_none());
        for n in 0..counts[4] {
            assert!(
                store.kv_get("a", &format!("p/{n:06}/x")).await?.is_none(),
                "p {n}"
            );
        }
        Ok::<(), anyhow::Error>(())
    };
    check(store.clone(), counts.clone()).await?;
    assert!(summary.rewritten > 0, "writes came meanwhile: {summary:?}");
    let found = files_containing(&path, marker);
    assert!(found.is_empty(), "deleted bytes still in {found:?}");
    assert_eq!(std::fs::read_to_string(path.join("CURRENT"))?, "gen-1");
    assert!(
        !path.join("db").exists(),
        "the first generation's files are gone"
    );
    drop(store);
    let store = Arc::new(reopen(&path)?);
    check(store.clone(), counts).await?;
    // A second compaction, with nothing written meanwhile, makes the next
    // generation and gives the deleted bytes back (the first one's sizes
    // count what the writers added during it).
    let deleted = put_and_delete(store.clone()).await?;
    let s = store.clone();
    let summary = tokio::task::spawn_blocking(move || s.compact())
        .await??
        .expect("sled compacts");
    assert!(
        summary.after_bytes + deleted / 4 < summary.before_bytes,
        "the space came back ({deleted} bytes deleted): {summary:?}"
    );
    assert!(files_containing(&path, marker).is_empty());
    assert_eq!(std::fs::read_to_string(path.join("CURRENT"))?, "gen-2");
    assert!(!path.join("gen-1").exists());
    kept(&store).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_open_removes_what_an_interrupted_compaction_left() -> Result<()> {
    use plugboard_store::StoreOps;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    {
        let store = SledStore::open(&path)?;
        seed(&store).await?;
    }
    // Stopped before the switch: a half-written next generation.
    std::fs::create_dir_all(path.join("gen-1"))?;
    std::fs::write(path.join("gen-1/db"), b"half")?;
    let store = reopen(&path)?;
    kept(&store).await?;
    assert!(!path.join("gen-1").exists());
    drop(store);
    // Stopped after the switch: the old generation's files are left.
    let store = Arc::new(reopen(&path)?);
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.compact()).await??;
    drop(store);
    std::fs::write(path.join("db"), b"left by the old generation")?;
    std::fs::create_dir_all(path.join("gen-0"))?;
    let store = reopen(&path)?;
    kept(&store).await?;
    assert!(!path.join("db").exists() && !path.join("gen-0").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_refuses_a_lost_generation_and_a_store_open_elsewhere() -> Result<()> {
    use plugboard_store::StoreOps;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = Arc::new(SledStore::open(&path)?);
    seed(&store).await?;
    // Open in this process: a second open (another server on the same
    // data directory) is refused before it touches anything.
    let second = SledStore::open(&path);
    assert!(
        matches!(second, Err(plugboard_core::Error::Conflict(_))),
        "{:?}",
        second.err()
    );
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.compact()).await??;
    drop(store);
    // CURRENT naming a generation that is not there: refused, and the
    // generation that is there stays.
    std::fs::write(path.join("CURRENT"), "gen-7")?;
    let err = reopen(&path).err().expect("refused");
    assert!(err.to_string().contains("holds no database"), "{err}");
    assert!(path.join("gen-1/conf").exists());
    // CURRENT lost: refused too (nothing is removed).
    std::fs::remove_file(path.join("CURRENT"))?;
    let err = reopen(&path).err().expect("refused");
    assert!(err.to_string().contains("refusing to open"), "{err}");
    assert!(path.join("gen-1/conf").exists());
    std::fs::write(path.join("CURRENT"), "gen-1")?;
    kept(&reopen(&path)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pg_dump_while_writes_go_on_restores_every_acknowledged_write_whole() -> Result<()>
{
    use plugboard_store::RecordWrite;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let pg = postgres();
    let url = pg.database();
    let store: Arc<dyn Store> = Arc::new(PgStore::connect(&url, 4).await?);
    conformance::tenants(&*store)
        .await
        .map_err(|e| anyhow!(e))?;
    conformance::plugins(&*store)
        .await
        .map_err(|e| anyhow!(e))?;
    conformance::interactions(&*store)
        .await
        .map_err(|e| anyhow!(e))?;
    // A writer keeps writing pairs of records (one write set each) while
    // pg_dump runs; `acked` counts those acknowledged.
    let (stop, acked) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let writer = {
        let (s, stop, acked) = (store.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let pair = [
                    RecordWrite::put("pair", format!("{n:06}-a"), serde_json::json!({"n": n})),
                    RecordWrite::put("pair", format!("{n:06}-b"), serde_json::json!({"n": n})),
                ];
                s.apply_records("a", &pair, None).await?;
                n += 1;
                acked.store(n, Ordering::SeqCst);
            }
            Ok::<(), anyhow::Error>(())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let before = acked.load(Ordering::SeqCst);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("plugboard.dump");
    let dump = {
        let (url, file) = (url.clone(), file.clone());
        tokio::task::spawn_blocking(move || postgres().dump_to(&url, &file)).await?
    };
    dump?;
    stop.store(true, Ordering::SeqCst);
    writer.await??;
    assert!(before > 0);
    // Restored into a new database, a store opens it (its migrations find
    // the schema applied) and has everything.
    let restored_url = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || postgres().restore(&file)).await??
    };
    let restored: Arc<dyn Store> = Arc::new(PgStore::connect(&restored_url, 2).await?);
    assert_eq!(restored.tenants().await?.len(), 2);
    assert_eq!(
        restored
            .tenant_for_key(&plugboard_store::hash_key("kb"))
            .await?,
        Some("b".into())
    );
    let ix = restored
        .interaction("a", "ix-0000000000001-00000001")
        .await?
        .unwrap();
    assert_eq!(ix.timeline.len(), 15);
    let pairs = restored.records("a", "pair").await?;
    assert!(pairs.len() >= 2 * before, "{} < 2 × {before}", pairs.len());
    assert_eq!(pairs.len() % 2, 0, "a write set split: {}", pairs.len());
    // The restored database takes writes.
    conformance::kv_and_blobs(&*restored)
        .await
        .map_err(|e| anyhow!(e))
}
