//! The store conformance suite on both implementations: sled in a
//! temporary directory, and a real PostgreSQL server started for this test
//! binary.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use anyhow::{Result, anyhow};
use plugboard_store::{PgStore, SledStore, Store, conformance};
use plugboard_tests::postgres;
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
    kept(&SledStore::open(dir.path())?).await
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
    assert_eq!(restored, summary);
    kept(&SledStore::open(&dir.path().join("b"))?).await?;
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
