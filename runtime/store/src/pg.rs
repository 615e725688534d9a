//! The PostgreSQL store: several Plugboard nodes on one database.
//!
//! `tokio-postgres` with a `deadpool-postgres` pool (lighter to build than
//! sqlx, no macros; both are kept by their authors). Records are JSON text;
//! the columns queries need (state, customer, versions) are columns of
//! their own with indexes. Writes that belong together are one
//! transaction; a commit is durable (PostgreSQL's `synchronous_commit`).
//! Migrations are numbered SQL scripts applied at start under an advisory
//! lock, so two nodes starting together apply each once.

use crate::{
    AddressStore, BlobStore, InteractionStore, KvStore, PluginStore, RecordStore, RecordWrite,
    RegistrarStore, Result, SecretStore, TenantStore, header, new_entries, plugin_info,
    rollback_target, storage,
};
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use plugboard_core::{
    Address, Binding, Error, Grants, Interaction, InteractionState, PluginInfo, PluginVersion,
    SipUser, Tenant, TimelineEntry, Trunk,
};
use std::sync::Arc;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};

/// The schema, one script per version; never edit a released one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tenants (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE api_keys (hash TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(id));
CREATE TABLE plugin_versions (
    tenant TEXT NOT NULL REFERENCES tenants(id), name TEXT NOT NULL, version BIGINT NOT NULL,
    record TEXT NOT NULL, PRIMARY KEY (tenant, name, version));
CREATE TABLE plugins (
    tenant TEXT NOT NULL REFERENCES tenants(id), name TEXT NOT NULL, active BIGINT NOT NULL,
    grants TEXT, config TEXT, PRIMARY KEY (tenant, name));
CREATE TABLE plugin_blobs (
    tenant TEXT NOT NULL REFERENCES tenants(id), sha256 TEXT NOT NULL, bytes BYTEA NOT NULL,
    PRIMARY KEY (tenant, sha256));
CREATE TABLE addresses (
    address TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(id), record TEXT NOT NULL);
CREATE INDEX addresses_by_tenant ON addresses (tenant, address);
CREATE TABLE sip_users (
    tenant TEXT NOT NULL REFERENCES tenants(id), name TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (tenant, name));
CREATE TABLE trunks (
    tenant TEXT NOT NULL REFERENCES tenants(id), name TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (tenant, name));
CREATE TABLE registrations (
    tenant TEXT NOT NULL REFERENCES tenants(id), user_name TEXT NOT NULL, bindings TEXT NOT NULL,
    PRIMARY KEY (tenant, user_name));
CREATE TABLE interactions (
    tenant TEXT NOT NULL REFERENCES tenants(id), id TEXT NOT NULL, state TEXT NOT NULL,
    customer TEXT NOT NULL, header TEXT NOT NULL, PRIMARY KEY (tenant, id));
CREATE INDEX interactions_by_state ON interactions (tenant, state, id);
CREATE INDEX interactions_by_customer ON interactions (tenant, customer, id);
CREATE TABLE timeline (
    tenant TEXT NOT NULL, interaction TEXT NOT NULL, seq INTEGER NOT NULL, entry TEXT NOT NULL,
    PRIMARY KEY (tenant, interaction, seq));
CREATE TABLE kv (
    tenant TEXT NOT NULL REFERENCES tenants(id), key TEXT NOT NULL, value BYTEA NOT NULL,
    PRIMARY KEY (tenant, key));
CREATE TABLE blobs (
    tenant TEXT NOT NULL REFERENCES tenants(id), id TEXT NOT NULL, bytes BYTEA NOT NULL,
    PRIMARY KEY (tenant, id));
"#,
    r#"
CREATE TABLE secrets (
    tenant TEXT NOT NULL REFERENCES tenants(id), name TEXT NOT NULL, sealed BYTEA NOT NULL,
    PRIMARY KEY (tenant, name));
"#,
    r#"
CREATE TABLE records (
    tenant TEXT NOT NULL REFERENCES tenants(id), kind TEXT NOT NULL, id TEXT NOT NULL,
    record TEXT NOT NULL, PRIMARY KEY (tenant, kind, id));
"#,
    // Logs read page by page in byte order (the usage ledger, queue
    // events): an index in that order, whatever the database's collation.
    r#"
CREATE INDEX records_in_byte_order ON records (tenant, kind, id COLLATE "C");
"#,
];

/// An arbitrary constant: the advisory lock migrations run under.
const MIGRATION_LOCK: i64 = 0x706c_7567_626f;

/// The PostgreSQL store.
pub struct PgStore {
    pool: Pool,
    /// Connections each tenant may hold at once for writing interactions
    /// (half the pool): a tenant flooding the store waits on its own
    /// share, so another tenant's writes still find a connection.
    shares: TenantShares,
}

/// Per-tenant caps on the pool's connections (see [`PgStore`]).
struct TenantShares {
    per_tenant: usize,
    tenants: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl TenantShares {
    fn new(pool_size: usize) -> Self {
        TenantShares {
            per_tenant: (pool_size / 2).max(1),
            tenants: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Waits for one of `tenant`'s connections.
    async fn acquire(&self, tenant: &str) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let sem = {
            let mut m = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() > 4096 {
                // Forget tenants with nothing held or waiting.
                m.retain(|_, s| Arc::strong_count(s) > 1);
            }
            m.entry(tenant.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.per_tenant)))
                .clone()
        };
        sem.acquire_owned()
            .await
            .map_err(|_| Error::Storage("tenant share closed".into()))
    }
}

fn pg(e: tokio_postgres::Error) -> Error {
    match e.code() {
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => Error::NotFound("tenant".into()),
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => Error::Conflict(e.to_string()),
        _ => storage(e),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(storage)
}

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(storage)
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`), with a pool of
    /// up to `pool_size` connections, and brings the schema up to date.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Invalid(format!("store URL: {e}")))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(storage)?;
        let store = PgStore {
            pool,
            shares: TenantShares::new(pool_size.max(1)),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<Object> {
        self.pool.get().await.map_err(storage)
    }

    async fn migrate(&self) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)",
        )
        .await
        .map_err(pg)?;
        let done: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        for (n, script) in MIGRATIONS.iter().enumerate() {
            let version = n as i32 + 1;
            if version <= done {
                continue;
            }
            tx.batch_execute(script).await.map_err(pg)?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }

    /// Writes a header and new timeline entries in one transaction;
    /// `durable: false` commits without waiting for the WAL flush
    /// (`synchronous_commit = off` for this transaction only).
    async fn write_interaction(
        &self,
        ix: &Interaction,
        stored: usize,
        durable: bool,
    ) -> Result<usize> {
        let _share = self.shares.acquire(&ix.tenant).await?;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        if !durable {
            tx.batch_execute("SET LOCAL synchronous_commit TO OFF")
                .await
                .map_err(pg)?;
        }
        tx.execute(
            "INSERT INTO interactions (tenant, id, state, customer, header) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, id) DO UPDATE
             SET state = EXCLUDED.state, customer = EXCLUDED.customer, header = EXCLUDED.header",
            &[&ix.tenant, &ix.id, &ix.state.name(), &ix.from, &json(&header(ix))?],
        )
        .await
        .map_err(pg)?;
        let mut seqs: Vec<i32> = Vec::new();
        let mut entries: Vec<String> = Vec::new();
        for (seq, entry) in new_entries(ix, stored) {
            seqs.push(seq as i32);
            entries.push(json(entry)?);
        }
        if !seqs.is_empty() {
            tx.execute(
                "INSERT INTO timeline (tenant, interaction, seq, entry)
                 SELECT $1, $2, s, e FROM UNNEST($3::INTEGER[], $4::TEXT[]) AS t(s, e)
                 ON CONFLICT DO NOTHING",
                &[&ix.tenant, &ix.id, &seqs, &entries],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        Ok(ix.timeline_len().max(stored))
    }

    /// The first column of the row a query finds, if any.
    async fn value<T: for<'a> FromSql<'a>>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>> {
        let c = self.client().await?;
        let row = c.query_opt(sql, params).await.map_err(pg)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The JSON record (first column) of the row a query finds, if any.
    async fn record<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>> {
        self.value::<String>(sql, params)
            .await?
            .map(|text| parse(&text))
            .transpose()
    }

    /// Runs one statement; the number of rows it touched.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let c = self.client().await?;
        c.execute(sql, params).await.map_err(pg)
    }

    /// `NotFound` unless the tenant exists.
    async fn ensure_tenant(&self, c: &Object, tenant: &str) -> Result<()> {
        let n = c
            .query_opt("SELECT 1 FROM tenants WHERE id = $1", &[&tenant])
            .await
            .map_err(pg)?;
        match n {
            Some(_) => Ok(()),
            None => Err(Error::NotFound(format!("tenant {tenant}"))),
        }
    }

    /// Fails with `NotFound` for a missing tenant, if `empty`.
    async fn tenant_if_empty(&self, c: &Object, tenant: &str, empty: bool) -> Result<()> {
        if empty {
            self.ensure_tenant(c, tenant).await
        } else {
            Ok(())
        }
    }

    async fn plugin_info_with(
        &self,
        c: &Object,
        tenant: &str,
        name: &str,
    ) -> Result<Option<PluginInfo>> {
        let rows = c
            .query(
                "SELECT record FROM plugin_versions WHERE tenant = $1 AND name = $2 ORDER BY version",
                &[&tenant, &name],
            )
            .await
            .map_err(pg)?;
        let versions = rows
            .iter()
            .map(|r| parse::<PluginVersion>(r.get(0)))
            .collect::<Result<Vec<_>>>()?;
        let row = c
            .query_opt(
                "SELECT active, grants FROM plugins WHERE tenant = $1 AND name = $2",
                &[&tenant, &name],
            )
            .await
            .map_err(pg)?;
        let (active, grants) = match row {
            Some(r) => {
                let active: i64 = r.get(0);
                let grants: Option<String> = r.get(1);
                let grants = grants.map(|g| parse(&g)).transpose()?.unwrap_or_default();
                (Some(active as u64), grants)
            }
            None => (None, Grants::default()),
        };
        Ok(plugin_info(name, versions, active, grants))
    }

    async fn set_plugin_column(
        &self,
        tenant: &str,
        name: &str,
        sql: &str,
        value: String,
    ) -> Result<()> {
        if self.execute(sql, &[&tenant, &name, &value]).await? == 0 {
            return Err(Error::NotFound(format!("plugin {name}")));
        }
        Ok(())
    }

    async fn records<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        tenant: &str,
    ) -> Result<Vec<T>> {
        let c = self.client().await?;
        let rows = c.query(sql, &[&tenant]).await.map_err(pg)?;
        self.tenant_if_empty(&c, tenant, rows.is_empty()).await?;
        rows.iter().map(|r| parse(r.get(0))).collect()
    }

    /// Headers from rows of `header`; timelines loaded if `full`.
    async fn load(
        &self,
        c: &Object,
        tenant: &str,
        rows: Vec<tokio_postgres::Row>,
        full: bool,
    ) -> Result<Vec<Interaction>> {
        let mut out = rows
            .iter()
            .map(|r| parse::<Interaction>(r.get(0)))
            .collect::<Result<Vec<_>>>()?;
        if full && !out.is_empty() {
            let ids: Vec<String> = out.iter().map(|i| i.id.clone()).collect();
            let entries = c
                .query(
                    "SELECT interaction, entry FROM timeline WHERE tenant = $1 AND interaction = ANY($2) ORDER BY interaction, seq",
                    &[&tenant, &ids],
                )
                .await
                .map_err(pg)?;
            for r in entries {
                let id: &str = r.get(0);
                let entry: TimelineEntry = parse(r.get(1))?;
                if let Some(ix) = out.iter_mut().find(|i| i.id == id) {
                    ix.timeline.push(entry);
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl TenantStore for PgStore {
    async fn create_tenant(&self, tenant: &Tenant, api_key_hash: &str) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let n = tx
            .execute(
                "INSERT INTO tenants (id, record) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&tenant.id, &json(tenant)?],
            )
            .await
            .map_err(pg)?;
        if n == 0 {
            return Err(Error::Conflict(format!("tenant {} exists", tenant.id)));
        }
        tx.execute(
            "INSERT INTO api_keys (hash, tenant) VALUES ($1, $2)",
            &[&api_key_hash, &tenant.id],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)
    }

    async fn update_tenant(&self, tenant: &Tenant) -> Result<()> {
        let n = self
            .execute(
                "UPDATE tenants SET record = $2 WHERE id = $1",
                &[&tenant.id, &json(tenant)?],
            )
            .await?;
        if n == 0 {
            return Err(Error::NotFound(format!("tenant {}", tenant.id)));
        }
        Ok(())
    }

    async fn tenant(&self, id: &str) -> Result<Option<Tenant>> {
        self.record("SELECT record FROM tenants WHERE id = $1", &[&id])
            .await
    }

    async fn tenants(&self) -> Result<Vec<Tenant>> {
        let c = self.client().await?;
        let rows = c
            .query("SELECT record FROM tenants ORDER BY id", &[])
            .await
            .map_err(pg)?;
        rows.iter().map(|r| parse(r.get(0))).collect()
    }

    async fn tenant_for_key(&self, api_key_hash: &str) -> Result<Option<String>> {
        self.value(
            "SELECT tenant FROM api_keys WHERE hash = $1",
            &[&api_key_hash],
        )
        .await
    }
}

#[async_trait]
impl PluginStore for PgStore {
    async fn add_plugin_version(
        &self,
        tenant: &str,
        mut version: PluginVersion,
        bytes: &[u8],
    ) -> Result<PluginVersion> {
        let mut c = self.client().await?;
        self.ensure_tenant(&c, tenant).await?;
        let tx = c.transaction().await.map_err(pg)?;
        // One deploy of a plugin at a time, across nodes.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("{tenant}/{}", version.name)],
        )
        .await
        .map_err(pg)?;
        let last: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM plugin_versions WHERE tenant = $1 AND name = $2",
                &[&tenant, &version.name],
            )
            .await
            .map_err(pg)?
            .get(0);
        version.version = last as u64 + 1;
        let v = version.version as i64;
        tx.execute(
            "INSERT INTO plugin_blobs (tenant, sha256, bytes) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&tenant, &version.sha256, &bytes],
        )
        .await
        .map_err(pg)?;
        tx.execute(
            "INSERT INTO plugin_versions (tenant, name, version, record) VALUES ($1, $2, $3, $4)",
            &[&tenant, &version.name, &v, &json(&version)?],
        )
        .await
        .map_err(pg)?;
        tx.execute(
            "INSERT INTO plugins (tenant, name, active) VALUES ($1, $2, $3)
             ON CONFLICT (tenant, name) DO UPDATE SET active = EXCLUDED.active",
            &[&tenant, &version.name, &v],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(version)
    }

    async fn plugin(&self, tenant: &str, name: &str) -> Result<Option<PluginInfo>> {
        let c = self.client().await?;
        let info = self.plugin_info_with(&c, tenant, name).await?;
        self.tenant_if_empty(&c, tenant, info.is_none()).await?;
        Ok(info)
    }

    async fn plugins(&self, tenant: &str) -> Result<Vec<PluginInfo>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT name FROM plugins WHERE tenant = $1 ORDER BY name",
                &[&tenant],
            )
            .await
            .map_err(pg)?;
        self.tenant_if_empty(&c, tenant, rows.is_empty()).await?;
        let mut out = Vec::new();
        for r in rows {
            let name: &str = r.get(0);
            if let Some(p) = self.plugin_info_with(&c, tenant, name).await? {
                out.push(p);
            }
        }
        Ok(out)
    }

    async fn plugin_bytes(&self, tenant: &str, sha256: &str) -> Result<Option<Vec<u8>>> {
        self.value(
            "SELECT bytes FROM plugin_blobs WHERE tenant = $1 AND sha256 = $2",
            &[&tenant, &sha256],
        )
        .await
    }

    async fn set_active_version(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u64>,
    ) -> Result<u64> {
        let info = self
            .plugin(tenant, name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("plugin {name}")))?;
        let target = rollback_target(&info, version)?;
        self.execute(
            "UPDATE plugins SET active = $3 WHERE tenant = $1 AND name = $2",
            &[&tenant, &name, &(target as i64)],
        )
        .await?;
        Ok(target)
    }

    async fn set_grants(&self, tenant: &str, name: &str, grants: &Grants) -> Result<()> {
        self.set_plugin_column(
            tenant,
            name,
            "UPDATE plugins SET grants = $3 WHERE tenant = $1 AND name = $2",
            json(grants)?,
        )
        .await
    }

    async fn set_config(&self, tenant: &str, name: &str, config: &serde_json::Value) -> Result<()> {
        self.set_plugin_column(
            tenant,
            name,
            "UPDATE plugins SET config = $3 WHERE tenant = $1 AND name = $2",
            json(config)?,
        )
        .await
    }

    async fn config(&self, tenant: &str, name: &str) -> Result<serde_json::Value> {
        let config: Option<Option<String>> = self
            .value(
                "SELECT config FROM plugins WHERE tenant = $1 AND name = $2",
                &[&tenant, &name],
            )
            .await?;
        match config.flatten() {
            Some(text) => parse(&text),
            None => Ok(serde_json::Value::Null),
        }
    }
}

#[async_trait]
impl AddressStore for PgStore {
    async fn set_address(&self, tenant: &str, address: &Address) -> Result<()> {
        let c = self.client().await?;
        self.ensure_tenant(&c, tenant).await?;
        // Claimed, or updated by its owner; another tenant's: no row.
        let n = c
            .execute(
                "INSERT INTO addresses (address, tenant, record) VALUES ($1, $2, $3)
                 ON CONFLICT (address) DO UPDATE SET record = EXCLUDED.record
                 WHERE addresses.tenant = EXCLUDED.tenant",
                &[&address.address, &tenant, &json(address)?],
            )
            .await
            .map_err(pg)?;
        if n == 0 {
            return Err(Error::Conflict(format!(
                "address {} belongs to another tenant",
                address.address
            )));
        }
        Ok(())
    }

    async fn address(&self, tenant: &str, address: &str) -> Result<Option<Address>> {
        self.record(
            "SELECT record FROM addresses WHERE tenant = $1 AND address = $2",
            &[&tenant, &address],
        )
        .await
    }

    async fn addresses(&self, tenant: &str) -> Result<Vec<Address>> {
        self.records(
            "SELECT record FROM addresses WHERE tenant = $1 ORDER BY address",
            tenant,
        )
        .await
    }

    async fn address_owner(&self, address: &str) -> Result<Option<(String, Address)>> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT tenant, record FROM addresses WHERE address = $1",
                &[&address],
            )
            .await
            .map_err(pg)?;
        row.map(|r| Ok((r.get::<_, String>(0), parse(r.get(1))?)))
            .transpose()
    }
}

#[async_trait]
impl RegistrarStore for PgStore {
    async fn set_sip_user(&self, tenant: &str, user: &SipUser) -> Result<()> {
        self.execute(
            "INSERT INTO sip_users (tenant, name, record) VALUES ($1, $2, $3)
             ON CONFLICT (tenant, name) DO UPDATE SET record = EXCLUDED.record",
            &[&tenant, &user.name, &json(user)?],
        )
        .await
        .map(|_| ())
    }

    async fn sip_user(&self, tenant: &str, name: &str) -> Result<Option<SipUser>> {
        self.record(
            "SELECT record FROM sip_users WHERE tenant = $1 AND name = $2",
            &[&tenant, &name],
        )
        .await
    }

    async fn sip_users(&self, tenant: &str) -> Result<Vec<SipUser>> {
        self.records(
            "SELECT record FROM sip_users WHERE tenant = $1 ORDER BY name",
            tenant,
        )
        .await
    }

    async fn set_trunk(&self, tenant: &str, trunk: &Trunk) -> Result<()> {
        self.execute(
            "INSERT INTO trunks (tenant, name, record) VALUES ($1, $2, $3)
             ON CONFLICT (tenant, name) DO UPDATE SET record = EXCLUDED.record",
            &[&tenant, &trunk.name, &json(trunk)?],
        )
        .await
        .map(|_| ())
    }

    async fn trunks(&self, tenant: &str) -> Result<Vec<Trunk>> {
        self.records(
            "SELECT record FROM trunks WHERE tenant = $1 ORDER BY name",
            tenant,
        )
        .await
    }

    async fn set_bindings(&self, tenant: &str, user: &str, bindings: &[Binding]) -> Result<()> {
        if bindings.is_empty() {
            self.execute(
                "DELETE FROM registrations WHERE tenant = $1 AND user_name = $2",
                &[&tenant, &user],
            )
            .await?;
        } else {
            self.execute(
                "INSERT INTO registrations (tenant, user_name, bindings) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant, user_name) DO UPDATE SET bindings = EXCLUDED.bindings",
                &[&tenant, &user, &json(&bindings)?],
            )
            .await?;
        }
        Ok(())
    }

    async fn user_bindings(&self, tenant: &str, user: &str) -> Result<Vec<Binding>> {
        Ok(self
            .record(
                "SELECT bindings FROM registrations WHERE tenant = $1 AND user_name = $2",
                &[&tenant, &user],
            )
            .await?
            .unwrap_or_default())
    }

    async fn bindings(&self, tenant: &str) -> Result<Vec<(String, Vec<Binding>)>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT user_name, bindings FROM registrations WHERE tenant = $1 ORDER BY user_name",
                &[&tenant],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| Ok((r.get::<_, String>(0), parse(r.get(1))?)))
            .collect()
    }
}

#[async_trait]
impl InteractionStore for PgStore {
    async fn save_interaction(&self, ix: &Interaction, stored: usize) -> Result<usize> {
        self.write_interaction(ix, stored, true).await
    }

    async fn save_interaction_soft(&self, ix: &Interaction, stored: usize) -> Result<usize> {
        self.write_interaction(ix, stored, false).await
    }

    async fn interaction(&self, tenant: &str, id: &str) -> Result<Option<Interaction>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT header FROM interactions WHERE tenant = $1 AND id = $2",
                &[&tenant, &id],
            )
            .await
            .map_err(pg)?;
        Ok(self.load(&c, tenant, rows, true).await?.pop())
    }

    async fn interaction_head(&self, tenant: &str, id: &str) -> Result<Option<Interaction>> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT i.header, (SELECT COALESCE(MAX(t.seq) + 1, 0) FROM timeline t
                    WHERE t.tenant = i.tenant AND t.interaction = i.id)
                 FROM interactions i WHERE i.tenant = $1 AND i.id = $2",
                &[&tenant, &id],
            )
            .await
            .map_err(pg)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut ix: Interaction = parse(row.get(0))?;
        let stored: i32 = row.get(1);
        ix.timeline_base = stored.max(0) as usize;
        Ok(Some(ix))
    }

    async fn interactions(&self, tenant: &str, limit: usize) -> Result<Vec<Interaction>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT header FROM interactions WHERE tenant = $1 ORDER BY id DESC LIMIT $2",
                &[&tenant, &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        self.tenant_if_empty(&c, tenant, rows.is_empty()).await?;
        self.load(&c, tenant, rows, true).await
    }

    async fn interactions_in_state(
        &self,
        tenant: &str,
        state: InteractionState,
        limit: usize,
    ) -> Result<Vec<Interaction>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT header FROM interactions WHERE tenant = $1 AND state = $2 ORDER BY id DESC LIMIT $3",
                &[&tenant, &state.name(), &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        self.load(&c, tenant, rows, false).await
    }

    async fn customer_history(
        &self,
        tenant: &str,
        customer: &str,
        limit: usize,
    ) -> Result<Vec<Interaction>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT header FROM interactions WHERE tenant = $1 AND customer = $2 ORDER BY id DESC LIMIT $3",
                &[&tenant, &customer, &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        self.load(&c, tenant, rows, false).await
    }

    async fn interactions_between(
        &self,
        tenant: &str,
        after: &str,
        before: &str,
        limit: usize,
    ) -> Result<Vec<Interaction>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT header FROM interactions WHERE tenant = $1 AND id > $2 AND id < $3
                 ORDER BY id LIMIT $4",
                &[&tenant, &after, &before, &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        self.tenant_if_empty(&c, tenant, rows.is_empty()).await?;
        self.load(&c, tenant, rows, false).await
    }

    async fn delete_interactions(&self, tenant: &str, ids: &[String]) -> Result<u64> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        tx.execute(
            "DELETE FROM timeline WHERE tenant = $1 AND interaction = ANY($2)",
            &[&tenant, &ids],
        )
        .await
        .map_err(pg)?;
        let n = tx
            .execute(
                "DELETE FROM interactions WHERE tenant = $1 AND id = ANY($2)",
                &[&tenant, &ids],
            )
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(n)
    }
}

#[async_trait]
impl RecordStore for PgStore {
    async fn set_record(
        &self,
        tenant: &str,
        kind: &str,
        id: &str,
        record: &serde_json::Value,
    ) -> Result<()> {
        let text = record.to_string();
        self.execute(
            "INSERT INTO records (tenant, kind, id, record) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant, kind, id) DO UPDATE SET record = EXCLUDED.record",
            &[&tenant, &kind, &id, &text],
        )
        .await
        .map(|_| ())
    }

    async fn record(
        &self,
        tenant: &str,
        kind: &str,
        id: &str,
    ) -> Result<Option<serde_json::Value>> {
        self.record(
            "SELECT record FROM records WHERE tenant = $1 AND kind = $2 AND id = $3",
            &[&tenant, &kind, &id],
        )
        .await
    }

    async fn records(&self, tenant: &str, kind: &str) -> Result<Vec<serde_json::Value>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT record FROM records WHERE tenant = $1 AND kind = $2 ORDER BY id",
                &[&tenant, &kind],
            )
            .await
            .map_err(pg)?;
        self.tenant_if_empty(&c, tenant, rows.is_empty()).await?;
        rows.iter().map(|r| parse(r.get(0))).collect()
    }

    async fn delete_record(&self, tenant: &str, kind: &str, id: &str) -> Result<bool> {
        self.execute(
            "DELETE FROM records WHERE tenant = $1 AND kind = $2 AND id = $3",
            &[&tenant, &kind, &id],
        )
        .await
        .map(|n| n > 0)
    }

    async fn delete_kind(&self, tenant: &str, kind: &str) -> Result<u64> {
        self.execute(
            "DELETE FROM records WHERE tenant = $1 AND kind = $2",
            &[&tenant, &kind],
        )
        .await
    }

    async fn set_records(
        &self,
        tenant: &str,
        kind: &str,
        records: &[(String, serde_json::Value)],
    ) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let stmt = tx
            .prepare(
                "INSERT INTO records (tenant, kind, id, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (tenant, kind, id) DO UPDATE SET record = EXCLUDED.record",
            )
            .await
            .map_err(pg)?;
        for (id, record) in records {
            let text = record.to_string();
            tx.execute(&stmt, &[&tenant, &kind, id, &text])
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }

    async fn apply_records(
        &self,
        tenant: &str,
        writes: &[RecordWrite],
        unless_exists: Option<(&str, &str)>,
    ) -> Result<Option<serde_json::Value>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        if let Some((kind, id)) = unless_exists {
            // Two writers racing on the same guard: the second waits for
            // the first to commit, then finds its record.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2 || '/' || $3, 0))",
                &[&tenant, &kind, &id],
            )
            .await
            .map_err(pg)?;
            if let Some(row) = tx
                .query_opt(
                    "SELECT record FROM records WHERE tenant = $1 AND kind = $2 AND id = $3",
                    &[&tenant, &kind, &id],
                )
                .await
                .map_err(pg)?
            {
                return Ok(Some(parse(row.get(0))?));
            }
        }
        for w in writes {
            match w {
                RecordWrite::Put { kind, id, record } => {
                    let text = record.to_string();
                    tx.execute(
                        "INSERT INTO records (tenant, kind, id, record) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (tenant, kind, id) DO UPDATE SET record = EXCLUDED.record",
                        &[&tenant, kind, id, &text],
                    )
                    .await
                    .map_err(pg)?;
                }
                RecordWrite::Delete { kind, id } => {
                    tx.execute(
                        "DELETE FROM records WHERE tenant = $1 AND kind = $2 AND id = $3",
                        &[&tenant, kind, id],
                    )
                    .await
                    .map_err(pg)?;
                }
            }
        }
        tx.commit().await.map_err(pg)?;
        Ok(None)
    }

    async fn records_after(
        &self,
        tenant: &str,
        kind: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, serde_json::Value)>> {
        let c = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = c
            .query(
                "SELECT id, record FROM records WHERE tenant = $1 AND kind = $2
                 AND id COLLATE \"C\" > $3 ORDER BY id COLLATE \"C\" LIMIT $4",
                &[&tenant, &kind, &after, &limit],
            )
            .await
            .map_err(pg)?;
        self.tenant_if_empty(&c, tenant, rows.is_empty()).await?;
        rows.iter()
            .map(|r| Ok((r.get::<_, String>(0), parse(r.get(1))?)))
            .collect()
    }
}

#[async_trait]
impl crate::StoreOps for PgStore {
    async fn check(&self) -> Result<()> {
        // Every connection busy means the server answers (the pool has
        // them open): ready. Otherwise one that takes writes.
        let c = match tokio::time::timeout(std::time::Duration::from_millis(500), self.client())
            .await
        {
            Ok(c) => c?,
            Err(_) if self.pool.status().size > 0 => return Ok(()),
            Err(_) => return Err(Error::Storage("no connection to PostgreSQL".into())),
        };
        let writable: bool = c
            .query_one("SELECT NOT pg_is_in_recovery()", &[])
            .await
            .map_err(pg)?
            .get(0);
        if writable {
            Ok(())
        } else {
            Err(Error::Storage("PostgreSQL is a read-only standby".into()))
        }
    }
}

#[async_trait]
impl SecretStore for PgStore {
    async fn set_secret(&self, tenant: &str, name: &str, sealed: &[u8]) -> Result<()> {
        self.execute(
            "INSERT INTO secrets (tenant, name, sealed) VALUES ($1, $2, $3)
             ON CONFLICT (tenant, name) DO UPDATE SET sealed = EXCLUDED.sealed",
            &[&tenant, &name, &sealed],
        )
        .await
        .map(|_| ())
    }

    async fn secret(&self, tenant: &str, name: &str) -> Result<Option<Vec<u8>>> {
        self.value(
            "SELECT sealed FROM secrets WHERE tenant = $1 AND name = $2",
            &[&tenant, &name],
        )
        .await
    }

    async fn secret_names(&self, tenant: &str) -> Result<Vec<String>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT name FROM secrets WHERE tenant = $1 ORDER BY name",
                &[&tenant],
            )
            .await
            .map_err(pg)?;
        self.tenant_if_empty(&c, tenant, rows.is_empty()).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn delete_secret(&self, tenant: &str, name: &str) -> Result<bool> {
        self.execute(
            "DELETE FROM secrets WHERE tenant = $1 AND name = $2",
            &[&tenant, &name],
        )
        .await
        .map(|n| n > 0)
    }
}

#[async_trait]
impl KvStore for PgStore {
    async fn kv_get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.value(
            "SELECT value FROM kv WHERE tenant = $1 AND key = $2",
            &[&tenant, &key],
        )
        .await
    }

    async fn kv_set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<()> {
        self.execute(
            "INSERT INTO kv (tenant, key, value) VALUES ($1, $2, $3)
             ON CONFLICT (tenant, key) DO UPDATE SET value = EXCLUDED.value",
            &[&tenant, &key, &value],
        )
        .await
        .map(|_| ())
    }

    async fn kv_delete(&self, tenant: &str, key: &str) -> Result<()> {
        self.execute(
            "DELETE FROM kv WHERE tenant = $1 AND key = $2",
            &[&tenant, &key],
        )
        .await
        .map(|_| ())
    }

    async fn kv_delete_prefix(&self, tenant: &str, prefix: &str) -> Result<u64> {
        if prefix.is_empty() {
            return Err(Error::Invalid("an empty kv prefix".into()));
        }
        self.execute(
            "DELETE FROM kv WHERE tenant = $1 AND starts_with(key, $2)",
            &[&tenant, &prefix],
        )
        .await
    }
}

#[async_trait]
impl BlobStore for PgStore {
    async fn put_blob(&self, tenant: &str, id: &str, bytes: &[u8]) -> Result<()> {
        let n = self
            .execute(
                "INSERT INTO blobs (tenant, id, bytes) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&tenant, &id, &bytes],
            )
            .await?;
        if n == 0 {
            return Err(Error::Conflict(format!("blob {id} exists")));
        }
        Ok(())
    }

    async fn blob(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>> {
        self.value(
            "SELECT bytes FROM blobs WHERE tenant = $1 AND id = $2",
            &[&tenant, &id],
        )
        .await
    }

    async fn delete_blob(&self, tenant: &str, id: &str) -> Result<bool> {
        self.execute(
            "DELETE FROM blobs WHERE tenant = $1 AND id = $2",
            &[&tenant, &id],
        )
        .await
        .map(|n| n > 0)
    }
}
