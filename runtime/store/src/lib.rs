//! Plugboard's storage: the [`Store`] trait the rest of the runtime uses,
//! and [`SledStore`], the embedded default (sled in the data directory).
//!
//! Layout: global trees `tenants` (id → tenant) and `api_keys` (SHA-256 of a
//! key → tenant id); one tree per tenant (`t/{id}`), its keyspace, holding
//! plugin versions and blobs, grants, configs, addresses, interactions and
//! the plugins' kv. Every mutating call flushes to disk before it returns, so
//! whatever the API acknowledged survives a crash.

use plugboard_core::{
    Address, Binding, Error, Grants, Interaction, PluginInfo, PluginVersion, SipUser, Tenant,
    TenantKv, Trunk,
};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Result with the shared error type.
pub type Result<T> = std::result::Result<T, Error>;

/// SHA-256 of an API key, hex: what is stored instead of the key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// What the runtime needs from storage. Implementations keep tenants apart:
/// every tenant-scoped call names its tenant and touches only its keyspace.
pub trait Store: TenantKv + Send + Sync {
    /// Creates a tenant with the hash of its API key; `Conflict` if it exists.
    fn create_tenant(&self, tenant: &Tenant, api_key_hash: &str) -> Result<()>;
    /// Replaces an existing tenant's record; `NotFound` if there is none.
    fn update_tenant(&self, tenant: &Tenant) -> Result<()>;
    /// A tenant by id.
    fn tenant(&self, id: &str) -> Result<Option<Tenant>>;
    /// All tenants.
    fn tenants(&self) -> Result<Vec<Tenant>>;
    /// The tenant an API key hash belongs to.
    fn tenant_for_key(&self, api_key_hash: &str) -> Result<Option<String>>;

    /// Stores a new plugin version (and its bytes) and makes it active.
    /// The version number is assigned here and returned in the record.
    fn add_plugin_version(
        &self,
        tenant: &str,
        version: PluginVersion,
        bytes: &[u8],
    ) -> Result<PluginVersion>;
    /// A plugin with its versions, grants and active version.
    fn plugin(&self, tenant: &str, name: &str) -> Result<Option<PluginInfo>>;
    /// All plugins of a tenant.
    fn plugins(&self, tenant: &str) -> Result<Vec<PluginInfo>>;
    /// The bytes of a component by hash.
    fn plugin_bytes(&self, tenant: &str, sha256: &str) -> Result<Option<Vec<u8>>>;
    /// Makes `version` active (`None`: the one before the active one).
    fn set_active_version(&self, tenant: &str, name: &str, version: Option<u64>) -> Result<u64>;
    /// Replaces a plugin's grants.
    fn set_grants(&self, tenant: &str, name: &str, grants: &Grants) -> Result<()>;
    /// Replaces a plugin's config.
    fn set_config(&self, tenant: &str, name: &str, config: &serde_json::Value) -> Result<()>;
    /// A plugin's config (`Null` if none).
    fn config(&self, tenant: &str, name: &str) -> Result<serde_json::Value>;

    /// Maps an address to a flow.
    fn set_address(&self, tenant: &str, address: &Address) -> Result<()>;
    /// An address.
    fn address(&self, tenant: &str, address: &str) -> Result<Option<Address>>;
    /// All addresses of a tenant.
    fn addresses(&self, tenant: &str) -> Result<Vec<Address>>;
    /// Creates or replaces a SIP user (registrar credentials).
    fn set_sip_user(&self, tenant: &str, user: &SipUser) -> Result<()>;
    /// A SIP user.
    fn sip_user(&self, tenant: &str, name: &str) -> Result<Option<SipUser>>;
    /// All SIP users of a tenant.
    fn sip_users(&self, tenant: &str) -> Result<Vec<SipUser>>;
    /// Creates or replaces a trunk.
    fn set_trunk(&self, tenant: &str, trunk: &Trunk) -> Result<()>;
    /// All trunks of a tenant.
    fn trunks(&self, tenant: &str) -> Result<Vec<Trunk>>;
    /// Replaces a SIP user's registrations (none: removes them). Soft
    /// state: written without waiting for the disk.
    fn set_bindings(&self, tenant: &str, user: &str, bindings: &[Binding]) -> Result<()>;
    /// The stored registrations of a tenant's SIP users, by user.
    fn bindings(&self, tenant: &str) -> Result<Vec<(String, Vec<Binding>)>>;
    /// Which tenant owns an address (numbers are unique across tenants:
    /// an inbound call or message must reach exactly one tenant).
    fn address_owner(&self, address: &str) -> Result<Option<(String, Address)>>;

    /// Writes (creates or replaces) an interaction record.
    fn put_interaction(&self, interaction: &Interaction) -> Result<()>;
    /// An interaction.
    fn interaction(&self, tenant: &str, id: &str) -> Result<Option<Interaction>>;
    /// The newest `limit` interactions of a tenant, newest first.
    fn interactions(&self, tenant: &str, limit: usize) -> Result<Vec<Interaction>>;
}

/// The embedded store: sled in a directory.
pub struct SledStore {
    db: sled::Db,
    tenants: sled::Tree,
    keys: sled::Tree,
    /// address → owning tenant id, across tenants.
    owners: sled::Tree,
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(e.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(storage)
}

fn parse<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(storage)
}

fn version_key(name: &str, v: u64) -> String {
    format!("plugin/{name}/v/{v:012}")
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(storage)?;
        let tenants = db.open_tree("tenants").map_err(storage)?;
        let keys = db.open_tree("api_keys").map_err(storage)?;
        let owners = db.open_tree("address_owners").map_err(storage)?;
        Ok(SledStore {
            db,
            tenants,
            keys,
            owners,
        })
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map_err(storage).map(|_| ())
    }

    /// The tenant's keyspace; `NotFound` if the tenant does not exist.
    fn space(&self, tenant: &str) -> Result<sled::Tree> {
        if !self.tenants.contains_key(tenant).map_err(storage)? {
            return Err(Error::NotFound(format!("tenant {tenant}")));
        }
        self.db.open_tree(format!("t/{tenant}")).map_err(storage)
    }

    fn get_json<T: serde::de::DeserializeOwned>(tree: &sled::Tree, key: &str) -> Result<Option<T>> {
        tree.get(key)
            .map_err(storage)?
            .map(|b| parse(&b))
            .transpose()
    }

    /// Writes `value` as JSON at `key` in the tenant's keyspace, durably.
    fn put<T: serde::Serialize>(&self, tenant: &str, key: &str, value: &T) -> Result<()> {
        self.space(tenant)?
            .insert(key, json(value)?)
            .map_err(storage)?;
        self.flush()
    }

    /// Every JSON value under `prefix` in the tenant's keyspace, in key order.
    fn list<T: serde::de::DeserializeOwned>(&self, tenant: &str, prefix: &str) -> Result<Vec<T>> {
        self.space(tenant)?
            .scan_prefix(prefix)
            .map(|kv| kv.map_err(storage).and_then(|(_, v)| parse(&v)))
            .collect()
    }

    /// Writes a per-plugin setting (`grants`, `config`); `NotFound` if the
    /// plugin was never deployed.
    fn put_plugin_setting<T: serde::Serialize>(
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
    }

    fn plugin_info(&self, space: &sled::Tree, name: &str) -> Result<Option<PluginInfo>> {
        let mut versions = Vec::new();
        for kv in space.scan_prefix(format!("plugin/{name}/v/")) {
            let (_, v) = kv.map_err(storage)?;
            versions.push(parse::<PluginVersion>(&v)?);
        }
        let Some(last) = versions.last() else {
            return Ok(None);
        };
        let active: u64 =
            Self::get_json(space, &format!("plugin/{name}/active"))?.unwrap_or(last.version);
        let kind = versions
            .iter()
            .find(|v| v.version == active)
            .map_or(last.kind, |v| v.kind);
        let grants = Self::get_json(space, &format!("plugin/{name}/grants"))?.unwrap_or_default();
        Ok(Some(PluginInfo {
            name: name.to_string(),
            kind,
            active_version: active,
            versions,
            grants,
        }))
    }
}

impl TenantKv for SledStore {
    fn kv_get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let space = self.space(tenant)?;
        Ok(space
            .get(format!("kv/{key}"))
            .map_err(storage)?
            .map(|v| v.to_vec()))
    }

    fn kv_set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<()> {
        let space = self.space(tenant)?;
        space.insert(format!("kv/{key}"), value).map_err(storage)?;
        self.flush()
    }

    fn kv_delete(&self, tenant: &str, key: &str) -> Result<()> {
        let space = self.space(tenant)?;
        space.remove(format!("kv/{key}")).map_err(storage)?;
        self.flush()
    }
}

impl Store for SledStore {
    fn create_tenant(&self, tenant: &Tenant, api_key_hash: &str) -> Result<()> {
        let r = self
            .tenants
            .compare_and_swap(&tenant.id, None as Option<&[u8]>, Some(json(tenant)?))
            .map_err(storage)?;
        if r.is_err() {
            return Err(Error::Conflict(format!("tenant {} exists", tenant.id)));
        }
        self.keys
            .insert(api_key_hash, tenant.id.as_bytes())
            .map_err(storage)?;
        self.flush()
    }

    fn update_tenant(&self, tenant: &Tenant) -> Result<()> {
        let new = json(tenant)?;
        let updated = self
            .tenants
            .fetch_and_update(&tenant.id, |old| old.map(|_| new.clone()))
            .map_err(storage)?;
        if updated.is_none() {
            return Err(Error::NotFound(format!("tenant {}", tenant.id)));
        }
        self.flush()
    }

    fn tenant(&self, id: &str) -> Result<Option<Tenant>> {
        Self::get_json(&self.tenants, id)
    }

    fn tenants(&self) -> Result<Vec<Tenant>> {
        self.tenants
            .iter()
            .map(|kv| kv.map_err(storage).and_then(|(_, v)| parse(&v)))
            .collect()
    }

    fn tenant_for_key(&self, api_key_hash: &str) -> Result<Option<String>> {
        Ok(self
            .keys
            .get(api_key_hash)
            .map_err(storage)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn add_plugin_version(
        &self,
        tenant: &str,
        mut version: PluginVersion,
        bytes: &[u8],
    ) -> Result<PluginVersion> {
        let space = self.space(tenant)?;
        let prefix = format!("plugin/{}/v/", version.name);
        let last = match space.scan_prefix(&prefix).next_back() {
            Some(kv) => parse::<PluginVersion>(&kv.map_err(storage)?.1)?.version,
            None => 0,
        };
        version.version = last + 1;
        space
            .insert(format!("blob/{}", version.sha256), bytes)
            .map_err(storage)?;
        space
            .insert(version_key(&version.name, version.version), json(&version)?)
            .map_err(storage)?;
        space
            .insert(
                format!("plugin/{}/active", version.name),
                json(&version.version)?,
            )
            .map_err(storage)?;
        self.flush()?;
        Ok(version)
    }

    fn plugin(&self, tenant: &str, name: &str) -> Result<Option<PluginInfo>> {
        let space = self.space(tenant)?;
        self.plugin_info(&space, name)
    }

    fn plugins(&self, tenant: &str) -> Result<Vec<PluginInfo>> {
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
            if let Some(p) = self.plugin_info(&space, &n)? {
                out.push(p);
            }
        }
        Ok(out)
    }

    fn plugin_bytes(&self, tenant: &str, sha256: &str) -> Result<Option<Vec<u8>>> {
        let space = self.space(tenant)?;
        Ok(space
            .get(format!("blob/{sha256}"))
            .map_err(storage)?
            .map(|v| v.to_vec()))
    }

    fn set_active_version(&self, tenant: &str, name: &str, version: Option<u64>) -> Result<u64> {
        let space = self.space(tenant)?;
        let info = self
            .plugin_info(&space, name)?
            .ok_or_else(|| Error::NotFound(format!("plugin {name}")))?;
        let target = match version {
            Some(v) => {
                if info.version(v).is_none() {
                    return Err(Error::NotFound(format!("plugin {name} version {v}")));
                }
                v
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
                })?,
        };
        space
            .insert(format!("plugin/{name}/active"), json(&target)?)
            .map_err(storage)?;
        self.flush()?;
        Ok(target)
    }

    fn set_grants(&self, tenant: &str, name: &str, grants: &Grants) -> Result<()> {
        self.put_plugin_setting(tenant, name, "grants", grants)
    }

    fn set_config(&self, tenant: &str, name: &str, config: &serde_json::Value) -> Result<()> {
        self.put_plugin_setting(tenant, name, "config", config)
    }

    fn config(&self, tenant: &str, name: &str) -> Result<serde_json::Value> {
        let space = self.space(tenant)?;
        Ok(Self::get_json(&space, &format!("plugin/{name}/config"))?.unwrap_or_default())
    }

    fn set_address(&self, tenant: &str, address: &Address) -> Result<()> {
        self.space(tenant)?;
        // Claim the address for this tenant unless another tenant has it.
        let claimed = self
            .owners
            .compare_and_swap(&address.address, None::<&[u8]>, Some(tenant.as_bytes()))
            .map_err(storage)?;
        if let Err(current) = claimed {
            let owner = current.current.map(|v| v.to_vec()).unwrap_or_default();
            if owner != tenant.as_bytes() {
                return Err(Error::Conflict(format!(
                    "address {} belongs to another tenant",
                    address.address
                )));
            }
        }
        self.put(tenant, &format!("address/{}", address.address), address)
    }

    fn set_sip_user(&self, tenant: &str, user: &SipUser) -> Result<()> {
        self.put(tenant, &format!("sipuser/{}", user.name), user)
    }

    fn sip_user(&self, tenant: &str, name: &str) -> Result<Option<SipUser>> {
        let space = self.space(tenant)?;
        Self::get_json(&space, &format!("sipuser/{name}"))
    }

    fn sip_users(&self, tenant: &str) -> Result<Vec<SipUser>> {
        self.list(tenant, "sipuser/")
    }

    fn set_trunk(&self, tenant: &str, trunk: &Trunk) -> Result<()> {
        self.put(tenant, &format!("trunk/{}", trunk.name), trunk)
    }

    fn trunks(&self, tenant: &str) -> Result<Vec<Trunk>> {
        self.list(tenant, "trunk/")
    }

    fn set_bindings(&self, tenant: &str, user: &str, bindings: &[Binding]) -> Result<()> {
        let space = self.space(tenant)?;
        let key = format!("reg/{user}");
        if bindings.is_empty() {
            space.remove(key).map_err(storage)?;
        } else {
            space.insert(key, json(&bindings)?).map_err(storage)?;
        }
        Ok(())
    }

    fn bindings(&self, tenant: &str) -> Result<Vec<(String, Vec<Binding>)>> {
        self.space(tenant)?
            .scan_prefix("reg/")
            .map(|kv| {
                let (k, v) = kv.map_err(storage)?;
                let user = String::from_utf8_lossy(&k["reg/".len()..]).into_owned();
                Ok((user, parse(&v)?))
            })
            .collect()
    }

    fn address_owner(&self, address: &str) -> Result<Option<(String, Address)>> {
        let Some(owner) = self.owners.get(address).map_err(storage)? else {
            return Ok(None);
        };
        let tenant = String::from_utf8_lossy(&owner).into_owned();
        Ok(self.address(&tenant, address)?.map(|a| (tenant, a)))
    }

    fn address(&self, tenant: &str, address: &str) -> Result<Option<Address>> {
        let space = self.space(tenant)?;
        Self::get_json(&space, &format!("address/{address}"))
    }

    fn addresses(&self, tenant: &str) -> Result<Vec<Address>> {
        self.list(tenant, "address/")
    }

    fn put_interaction(&self, ix: &Interaction) -> Result<()> {
        self.put(&ix.tenant, &format!("interaction/{}", ix.id), ix)
    }

    fn interaction(&self, tenant: &str, id: &str) -> Result<Option<Interaction>> {
        let space = self.space(tenant)?;
        Self::get_json(&space, &format!("interaction/{id}"))
    }

    fn interactions(&self, tenant: &str, limit: usize) -> Result<Vec<Interaction>> {
        let space = self.space(tenant)?;
        space
            .scan_prefix("interaction/")
            .rev()
            .take(limit)
            .map(|kv| kv.map_err(storage).and_then(|(_, v)| parse(&v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugboard_core::{Channel, PluginKind};

    fn tenant(id: &str) -> Tenant {
        Tenant {
            id: id.into(),
            name: id.into(),
            time_zone: "UTC".into(),
            created_ms: 1,
            limits: Default::default(),
        }
    }

    fn pv(name: &str) -> PluginVersion {
        PluginVersion {
            name: name.into(),
            version: 0,
            kind: PluginKind::Flow,
            sha256: "abc".into(),
            size: 3,
            created_ms: 1,
            document: None,
        }
    }

    #[test]
    fn versions_rollback_and_isolation() -> anyhow_free::R {
        let dir = tempfile::tempdir()?;
        {
            let s = SledStore::open(dir.path())?;
            s.create_tenant(&tenant("a"), &hash_key("ka"))?;
            s.create_tenant(&tenant("b"), &hash_key("kb"))?;
            assert!(matches!(
                s.create_tenant(&tenant("a"), "x"),
                Err(Error::Conflict(_))
            ));
            assert_eq!(s.add_plugin_version("a", pv("ivr"), b"one")?.version, 1);
            assert_eq!(s.add_plugin_version("a", pv("ivr"), b"two")?.version, 2);
            assert_eq!(s.plugin("a", "ivr")?.map(|p| p.active_version), Some(2));
            assert_eq!(s.set_active_version("a", "ivr", None)?, 1);
            assert!(s.set_active_version("a", "ivr", None).is_err());
            assert!(s.plugin("b", "ivr")?.is_none());
            s.kv_set("a", "k", b"1")?;
            assert_eq!(s.kv_get("b", "k")?, None);
            s.set_address(
                "a",
                &Address {
                    address: "100".into(),
                    channel: Channel::Voice,
                    flow: "ivr".into(),
                },
            )?;
            assert!(s.address("b", "100")?.is_none());
            // A number reaches one tenant only: b cannot claim a's number,
            // and a may update its own.
            let claim = Address {
                address: "100".into(),
                channel: Channel::Voice,
                flow: "other".into(),
            };
            assert!(matches!(
                s.set_address("b", &claim),
                Err(Error::Conflict(_))
            ));
            s.set_address("a", &claim)?;
            assert_eq!(
                s.address_owner("100")?.map(|(t, a)| (t, a.flow)),
                Some(("a".into(), "other".into()))
            );
            assert!(s.address_owner("200")?.is_none());
            assert!(matches!(s.plugins("nobody"), Err(Error::NotFound(_))));
        }
        // Reopen: everything is still there.
        let s = SledStore::open(dir.path())?;
        assert_eq!(s.tenant_for_key(&hash_key("kb"))?, Some("b".into()));
        assert_eq!(s.plugin("a", "ivr")?.map(|p| p.active_version), Some(1));
        assert_eq!(s.kv_get("a", "k")?, Some(b"1".to_vec()));
        assert_eq!(s.addresses("a")?.len(), 1);
        assert_eq!(s.address_owner("100")?.map(|(t, _)| t), Some("a".into()));
        Ok(())
    }

    mod anyhow_free {
        pub type R = Result<(), Box<dyn std::error::Error>>;
    }
}
