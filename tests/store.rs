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
    {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path())?);
        conformance::tenants(&*store)
            .await
            .map_err(|e| anyhow!(e))?;
        conformance::plugins(&*store)
            .await
            .map_err(|e| anyhow!(e))?;
        conformance::interactions(&*store)
            .await
            .map_err(|e| anyhow!(e))?;
    }
    let store = SledStore::open(dir.path())?;
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
