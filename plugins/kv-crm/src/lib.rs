//! A CRM connector backed by the tenant's kv store: a small built-in
//! customer directory for tenants without a CRM of their own.
//!
//! - `lookup-customer(channel, address)` reads the key
//!   `crm/customer/{address}`, a JSON object `{"id", "name", ...}`; every
//!   other string field becomes an attribute.
//! - `record-interaction` appends the interaction id to
//!   `crm/history/{from}` (the newest 20 are kept).
//!
//! Needs the `kv` grant.

use plugboard_sdk::crm::{Guest, Profile, Summary};
use plugboard_sdk::host;

struct KvCrm;

impl Guest for KvCrm {
    fn lookup_customer(_channel: String, address: String) -> Result<Option<Profile>, String> {
        let key = format!("crm/customer/{address}");
        let Some(bytes) = host::kv::get(&key).map_err(|e| host::describe(&e))? else {
            return Ok(None);
        };
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("{key}: {e}"))?;
        let obj = v.as_object().ok_or_else(|| format!("{key}: not a JSON object"))?;
        let id = obj
            .get("id")
            .and_then(|x| x.as_str())
            .ok_or_else(|| format!("{key}: no string id"))?
            .to_string();
        let name = obj.get("name").and_then(|x| x.as_str()).map(str::to_string);
        let attributes = obj
            .iter()
            .filter(|(k, _)| *k != "id" && *k != "name")
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
            .collect();
        Ok(Some(Profile { id, name, attributes }))
    }

    fn record_interaction(summary: Summary) -> Result<(), String> {
        let key = format!("crm/history/{}", summary.from);
        let mut ids: Vec<String> = match host::kv::get(&key).map_err(|e| host::describe(&e))? {
            Some(b) => serde_json::from_slice(&b).unwrap_or_default(),
            None => Vec::new(),
        };
        ids.push(summary.id);
        if ids.len() > 20 {
            ids.drain(..ids.len() - 20);
        }
        let bytes = serde_json::to_vec(&ids).map_err(|e| e.to_string())?;
        host::kv::set(&key, &bytes).map_err(|e| host::describe(&e))
    }
}

plugboard_sdk::crm::export_crm!(KvCrm);
