//! What the SMS channel needs from the core: tenants' carriers (and a
//! signal when they change, for the links to follow), their passwords,
//! the links' state for the API, and the parts of long inbound texts
//! kept durably until the last one arrives.

use std::collections::HashMap;

use plugboard_core::{
    Channel, Error as CoreError, HttpSmsDialect, SmsCarrier, normalize_address, now_ms,
    twilio_credentials,
};
use plugboard_store::{RecordWrite, hash_key};
use serde_json::{Value, json};

use crate::acd::lock;
use crate::{Engine, EngineResult};

/// Record kind of carriers, by name.
const SMS_CARRIER: &str = "sms_carrier";

/// The record kind of one long text's parts.
fn parts_kind(key: &str) -> String {
    format!("sms_part/{}", hash_key(key))
}

/// The SMS state of the engine.
pub(crate) struct SmsState {
    changes: tokio::sync::watch::Sender<u64>,
    links: std::sync::Mutex<HashMap<(String, String), Value>>,
}

impl Default for SmsState {
    fn default() -> Self {
        SmsState {
            changes: tokio::sync::watch::channel(0).0,
            links: Default::default(),
        }
    }
}

/// A long text, once all its parts are in.
#[derive(Debug, Clone)]
pub struct LongText {
    /// An id for it, the same when its parts come again (a client id).
    pub id: String,
    /// Its parts in order: `data_coding` and octets.
    pub parts: Vec<(u8, Vec<u8>)>,
}

impl Engine {
    /// Creates or replaces a tenant's SMS carrier. Its numbers must be
    /// the tenant's SMS addresses and its password secret must exist.
    pub async fn set_sms_carrier(
        &self,
        tenant: &str,
        carrier: SmsCarrier,
    ) -> EngineResult<SmsCarrier> {
        carrier.validate()?;
        let addresses = self.addresses(tenant).await?;
        for n in &carrier.numbers {
            let n = normalize_address(n);
            if !addresses
                .iter()
                .any(|a| a.channel == Channel::Sms && a.address == n)
            {
                return Err(
                    CoreError::Invalid(format!("{n} is not an SMS address of the tenant")).into(),
                );
            }
        }
        let Some(secret) = self.tenant_secret(tenant, carrier.secret_name()).await? else {
            return Err(CoreError::Invalid(format!(
                "secret {} does not exist",
                carrier.secret_name()
            ))
            .into());
        };
        match carrier.http.as_ref().map(|h| h.dialect) {
            None => SmsCarrier::check_password(&secret)?,
            Some(HttpSmsDialect::Twilio) if twilio_credentials(&secret).is_none() => {
                return Err(CoreError::Invalid(format!(
                    "secret {} must be ACCOUNT_SID:AUTH_TOKEN",
                    carrier.secret_name()
                ))
                .into());
            }
            Some(_) => {}
        }
        self.store
            .set_record(
                tenant,
                SMS_CARRIER,
                &carrier.name,
                &serde_json::to_value(&carrier).unwrap_or_default(),
            )
            .await?;
        self.sms.changes.send_modify(|v| *v += 1);
        Ok(carrier)
    }

    /// A tenant's SMS carrier.
    pub async fn sms_carrier(&self, tenant: &str, name: &str) -> EngineResult<SmsCarrier> {
        let v = self
            .store
            .record(tenant, SMS_CARRIER, name)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("SMS carrier {name}")))?;
        serde_json::from_value(v)
            .map_err(|e| CoreError::Storage(format!("bad SMS carrier record: {e}")).into())
    }

    /// A tenant's SMS carriers, by name.
    pub async fn sms_carriers(&self, tenant: &str) -> EngineResult<Vec<SmsCarrier>> {
        let mut all: Vec<SmsCarrier> = self
            .store
            .records(tenant, SMS_CARRIER)
            .await?
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Every tenant's SMS carriers (for the links).
    pub async fn all_sms_carriers(&self) -> EngineResult<Vec<(String, SmsCarrier)>> {
        let mut out = Vec::new();
        for t in self.tenants().await? {
            for c in self.sms_carriers(&t.id).await? {
                out.push((t.id.clone(), c));
            }
        }
        Ok(out)
    }

    /// Deletes a tenant's SMS carrier (its link unbinds).
    pub async fn delete_sms_carrier(&self, tenant: &str, name: &str) -> EngineResult<()> {
        if !self.store.delete_record(tenant, SMS_CARRIER, name).await? {
            return Err(CoreError::NotFound(format!("SMS carrier {name}")).into());
        }
        self.sms.changes.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Changes whenever a carrier is set or deleted on this server.
    pub fn sms_carrier_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sms.changes.subscribe()
    }

    /// The value of a carrier's secret: the SMPP password, Twilio's
    /// `ACCOUNT_SID:AUTH_TOKEN`, or the JSON dialect's signing key.
    pub async fn sms_carrier_secret(
        &self,
        tenant: &str,
        carrier: &SmsCarrier,
    ) -> EngineResult<String> {
        self.tenant_secret(tenant, carrier.secret_name())
            .await?
            .ok_or_else(|| {
                CoreError::Invalid(format!("secret {} does not exist", carrier.secret_name()))
                    .into()
            })
    }

    /// Records a carrier link's state (shown with the carrier).
    pub fn set_sms_link_state(&self, tenant: &str, name: &str, state: Option<Value>) {
        let key = (tenant.to_string(), name.to_string());
        let mut links = lock(&self.sms.links);
        match state {
            Some(s) => links.insert(key, s),
            None => links.remove(&key),
        };
    }

    /// A carrier link's state on this server.
    pub fn sms_link_state(&self, tenant: &str, name: &str) -> Value {
        lock(&self.sms.links)
            .get(&(tenant.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_else(|| json!({"state": "down"}))
    }

    /// Stores one part of a long inbound text, durably. `key` names the
    /// text (sender, recipient, reference, part count). When every part is
    /// in, returns them all; the caller stores the message (with
    /// [`LongText::id`] as its client id) and then drops the parts with
    /// [`Engine::drop_sms_parts`]. A part that comes again keeps its first
    /// copy, so the text keeps its id.
    pub async fn sms_part(
        &self,
        tenant: &str,
        key: &str,
        total: u8,
        seq: u8,
        data_coding: u8,
        bytes: &[u8],
    ) -> EngineResult<Option<LongText>> {
        let kind = parts_kind(key);
        let id = format!("{seq:03}");
        // Written unless it exists: a part that comes again keeps its first copy.
        let part =
            json!({"seq": seq, "dc": data_coding, "hex": hex::encode(bytes), "ms": now_ms()});
        self.store
            .apply_records(
                tenant,
                &[RecordWrite::put(&kind, &id, part)],
                Some((&kind, &id)),
            )
            .await?;
        let mut parts: Vec<(u8, u8, Vec<u8>, u64)> = self
            .store
            .records(tenant, &kind)
            .await?
            .into_iter()
            .filter_map(|v| {
                Some((
                    v["seq"].as_u64()? as u8,
                    v["dc"].as_u64()? as u8,
                    hex::decode(v["hex"].as_str()?).ok()?,
                    v["ms"].as_u64()?,
                ))
            })
            .collect();
        if parts.len() < total as usize {
            return Ok(None);
        }
        parts.sort_by_key(|p| p.0);
        let first = parts.iter().map(|p| p.3).min().unwrap_or(0);
        Ok(Some(LongText {
            id: hash_key(&format!("{key}\n{first}")),
            parts: parts.into_iter().map(|(_, dc, b, _)| (dc, b)).collect(),
        }))
    }

    /// Drops a long text's parts once the text is stored.
    pub async fn drop_sms_parts(&self, tenant: &str, key: &str, total: u8) -> EngineResult<()> {
        let kind = parts_kind(key);
        let writes: Vec<RecordWrite> = (1..=total)
            .map(|seq| RecordWrite::delete(&kind, format!("{seq:03}")))
            .collect();
        self.store.apply_records(tenant, &writes, None).await?;
        Ok(())
    }
}
