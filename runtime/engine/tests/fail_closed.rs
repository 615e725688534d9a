//! Authorisation fails closed: with a store that fails every call, no
//! token authenticates, no tenant is reachable, and a channel asking for a
//! tenant's trunks (who may call in) gets the error, not "no trunks".

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use async_trait::async_trait;
use plugboard_core::{
    Address, Binding, Error, Grants, Interaction, InteractionState, PluginInfo, PluginVersion,
    SipUser, Tenant, Trunk,
};
use plugboard_engine::{Engine, EngineError};
use plugboard_host::{HostConfig, Limits, PluginHost};
use plugboard_store::{
    AddressStore, BlobStore, InteractionStore, KvStore, PluginStore, RecordStore, RegistrarStore,
    SecretStore, StoreOps, TenantStore,
};
use std::sync::Arc;

struct Broken;

type R<T> = Result<T, Error>;

fn gone<T>() -> R<T> {
    Err(Error::Storage("disk gone".into()))
}

#[async_trait]
impl TenantStore for Broken {
    async fn create_tenant(&self, _: &Tenant, _: &str) -> R<()> {
        gone()
    }
    async fn update_tenant(&self, _: &Tenant) -> R<()> {
        gone()
    }
    async fn tenant(&self, _: &str) -> R<Option<Tenant>> {
        gone()
    }
    async fn tenants(&self) -> R<Vec<Tenant>> {
        gone()
    }
    async fn tenant_for_key(&self, _: &str) -> R<Option<String>> {
        gone()
    }
}

#[async_trait]
impl PluginStore for Broken {
    async fn add_plugin_version(&self, _: &str, _: PluginVersion, _: &[u8]) -> R<PluginVersion> {
        gone()
    }
    async fn plugin(&self, _: &str, _: &str) -> R<Option<PluginInfo>> {
        gone()
    }
    async fn plugins(&self, _: &str) -> R<Vec<PluginInfo>> {
        gone()
    }
    async fn plugin_bytes(&self, _: &str, _: &str) -> R<Option<Vec<u8>>> {
        gone()
    }
    async fn set_active_version(&self, _: &str, _: &str, _: Option<u64>) -> R<u64> {
        gone()
    }
    async fn set_grants(&self, _: &str, _: &str, _: &Grants) -> R<()> {
        gone()
    }
    async fn set_config(&self, _: &str, _: &str, _: &serde_json::Value) -> R<()> {
        gone()
    }
    async fn config(&self, _: &str, _: &str) -> R<serde_json::Value> {
        gone()
    }
}

#[async_trait]
impl AddressStore for Broken {
    async fn set_address(&self, _: &str, _: &Address) -> R<()> {
        gone()
    }
    async fn address(&self, _: &str, _: &str) -> R<Option<Address>> {
        gone()
    }
    async fn addresses(&self, _: &str) -> R<Vec<Address>> {
        gone()
    }
    async fn address_owner(&self, _: &str) -> R<Option<(String, Address)>> {
        gone()
    }
}

#[async_trait]
impl RegistrarStore for Broken {
    async fn set_sip_user(&self, _: &str, _: &SipUser) -> R<()> {
        gone()
    }
    async fn sip_user(&self, _: &str, _: &str) -> R<Option<SipUser>> {
        gone()
    }
    async fn sip_users(&self, _: &str) -> R<Vec<SipUser>> {
        gone()
    }
    async fn set_trunk(&self, _: &str, _: &Trunk) -> R<()> {
        gone()
    }
    async fn trunks(&self, _: &str) -> R<Vec<Trunk>> {
        gone()
    }
    async fn set_bindings(&self, _: &str, _: &str, _: &[Binding]) -> R<()> {
        gone()
    }
    async fn user_bindings(&self, _: &str, _: &str) -> R<Vec<Binding>> {
        gone()
    }
    async fn bindings(&self, _: &str) -> R<Vec<(String, Vec<Binding>)>> {
        gone()
    }
}

#[async_trait]
impl InteractionStore for Broken {
    async fn save_interaction(&self, _: &Interaction, _: usize) -> R<usize> {
        gone()
    }
    async fn interaction(&self, _: &str, _: &str) -> R<Option<Interaction>> {
        gone()
    }
    async fn interactions(&self, _: &str, _: usize) -> R<Vec<Interaction>> {
        gone()
    }
    async fn interactions_in_state(
        &self,
        _: &str,
        _: InteractionState,
        _: usize,
    ) -> R<Vec<Interaction>> {
        gone()
    }
    async fn customer_history(&self, _: &str, _: &str, _: usize) -> R<Vec<Interaction>> {
        gone()
    }
    async fn interactions_between(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: usize,
    ) -> R<Vec<Interaction>> {
        gone()
    }
    async fn delete_interactions(&self, _: &str, _: &[String]) -> R<u64> {
        gone()
    }
}

#[async_trait]
impl KvStore for Broken {
    async fn kv_get(&self, _: &str, _: &str) -> R<Option<Vec<u8>>> {
        gone()
    }
    async fn kv_set(&self, _: &str, _: &str, _: &[u8]) -> R<()> {
        gone()
    }
    async fn kv_delete(&self, _: &str, _: &str) -> R<()> {
        gone()
    }
    async fn kv_delete_prefix(&self, _: &str, _: &str) -> R<u64> {
        gone()
    }
}

#[async_trait]
impl RecordStore for Broken {
    async fn set_record(&self, _: &str, _: &str, _: &str, _: &serde_json::Value) -> R<()> {
        gone()
    }
    async fn record(&self, _: &str, _: &str, _: &str) -> R<Option<serde_json::Value>> {
        gone()
    }
    async fn records(&self, _: &str, _: &str) -> R<Vec<serde_json::Value>> {
        gone()
    }
    async fn delete_record(&self, _: &str, _: &str, _: &str) -> R<bool> {
        gone()
    }
    async fn delete_kind(&self, _: &str, _: &str) -> R<u64> {
        gone()
    }
    async fn set_records(&self, _: &str, _: &str, _: &[(String, serde_json::Value)]) -> R<()> {
        gone()
    }
    async fn records_after(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: usize,
    ) -> R<Vec<(String, serde_json::Value)>> {
        gone()
    }
    async fn apply_records(
        &self,
        _: &str,
        _: &[plugboard_store::RecordWrite],
        _: Option<(&str, &str)>,
    ) -> R<Option<serde_json::Value>> {
        gone()
    }
}

#[async_trait]
impl StoreOps for Broken {
    async fn check(&self) -> R<()> {
        gone()
    }
}

#[async_trait]
impl SecretStore for Broken {
    async fn set_secret(&self, _: &str, _: &str, _: &[u8]) -> R<()> {
        gone()
    }
    async fn secret(&self, _: &str, _: &str) -> R<Option<Vec<u8>>> {
        gone()
    }
    async fn secret_names(&self, _: &str) -> R<Vec<String>> {
        gone()
    }
    async fn delete_secret(&self, _: &str, _: &str) -> R<bool> {
        gone()
    }
}

#[async_trait]
impl BlobStore for Broken {
    async fn put_blob(&self, _: &str, _: &str, _: &[u8]) -> R<()> {
        gone()
    }
    async fn blob(&self, _: &str, _: &str) -> R<Option<Vec<u8>>> {
        gone()
    }
    async fn delete_blob(&self, _: &str, _: &str) -> R<bool> {
        gone()
    }
}

fn storage_error<T: std::fmt::Debug>(r: Result<T, EngineError>) -> bool {
    matches!(r, Err(EngineError::Core(Error::Storage(_))))
}

#[tokio::test]
async fn a_failing_store_denies_every_authorisation() {
    let host = Arc::new(PluginHost::new(HostConfig::default()).unwrap());
    let engine = Engine::new(Arc::new(Broken), host, "admin-token", Limits::default());
    // A tenant key cannot be checked: denied, not let through.
    assert!(storage_error(
        engine.authenticate(Some("pbk_anything")).await
    ));
    assert!(storage_error(
        engine.tenant_access(Some("pbk_anything"), "acme").await
    ));
    // Even the admin reaches no tenant it cannot read.
    assert!(storage_error(
        engine.tenant_access(Some("admin-token"), "acme").await
    ));
    // The admin token itself is checked without the store.
    assert!(engine.require_admin(Some("admin-token")).await.is_ok());
    assert!(matches!(
        engine.require_admin(None).await,
        Err(EngineError::Unauthenticated(_))
    ));
    // Inbound call admission: the trunks are an error, not an empty list.
    assert!(storage_error(engine.trunks("acme").await));
    assert!(storage_error(engine.tenant_exists("acme").await));
    assert!(storage_error(engine.sip_user("acme", "alice").await));
    assert!(storage_error(engine.route_address("15550100").await));
    // Not ready to take traffic.
    let why = engine.readiness().await.unwrap_err();
    assert!(why.contains("disk gone"), "{why}");
}

#[tokio::test]
async fn a_stopping_node_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(plugboard_store::SledStore::open(dir.path()).unwrap());
    let host = Arc::new(PluginHost::new(HostConfig::default()).unwrap());
    let engine = Engine::new(store, host, "admin-token", Limits::default());
    assert_eq!(engine.readiness().await, Ok(()));
    engine.set_draining();
    assert_eq!(engine.readiness().await, Err("draining".to_string()));
}
