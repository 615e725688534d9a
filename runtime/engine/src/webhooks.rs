//! Signed outbound webhooks: a tenant's integrations get its messages
//! pushed to their own systems.
//!
//! A webhook names a URL, a tenant secret (the signing key) and the
//! events it wants (`message`, `message_status`). Each event is a durable
//! delivery record written with the change it reports (one atomic write:
//! no event is lost to a crash), then POSTed as JSON with
//!
//! - `X-Plugboard-Event`: the event kind;
//! - `X-Plugboard-Delivery`: the delivery id (the same on every retry, so
//!   a receiver drops duplicates);
//! - `X-Plugboard-Signature: t=UNIX,v1=HEX`, the HMAC-SHA256 of
//!   `UNIX.BODY` with the secret (as Stripe signs: a receiver checks it
//!   and the time, and replays are refused).
//!
//! Anything but a 2xx is tried again with backoff (1 s doubling to 10
//! minutes, 12 attempts), through the same fetcher and network policy as
//! the tenant's plugins: a webhook cannot reach a private address the
//! operator has not allowed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use plugboard_core::{Error as CoreError, HttpGrant, Origin, now_ms, validate_id};
use plugboard_host::fetch::FetchRequest;
use plugboard_store::RecordWrite;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::{Engine, EngineResult};

const WEBHOOK: &str = "webhook";
pub(crate) const HOOK_OUT: &str = "hook_out";
const MAX_ATTEMPTS: u32 = 12;
/// Deliveries waiting in memory (a task each) at most; past it they wait
/// in the store only and are taken up as room comes.
pub(crate) const MAX_RUNNING: usize = 10_000;
/// Store errors in a row before a delivery's task gives way (the
/// delivery stays stored and is taken up again later).
const MAX_STORE_ERRORS: u32 = 12;

/// The deliveries with a task, and the tenants with stored deliveries
/// that may have none (past [`MAX_RUNNING`], or after store errors), with
/// the id after which to look for them.
#[derive(Default)]
pub(crate) struct Deliveries {
    running: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    parked: std::sync::Mutex<HashMap<String, String>>,
}

impl Deliveries {
    /// Deliveries with a task now.
    pub(crate) fn running(&self) -> usize {
        crate::acd::lock(&self.running).len()
    }

    /// Notes that `tenant` has stored deliveries without a task after
    /// the id `after` (the earliest such note wins).
    fn park(&self, tenant: &str, after: &str) {
        crate::acd::lock(&self.parked)
            .entry(tenant.to_string())
            .and_modify(|a| {
                if after < a.as_str() {
                    *a = after.to_string();
                }
            })
            .or_insert_with(|| after.to_string());
    }
}

/// The events a webhook may ask for.
pub const EVENTS: &[&str] = &["message", "message_status"];

/// A tenant's webhook.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// Its name (set from the path).
    #[serde(default)]
    pub name: String,
    /// Where events are POSTed (`https://…`, or `http://…`).
    pub url: String,
    /// The name of the tenant secret that signs the deliveries.
    pub secret: String,
    /// The events it wants (default: all).
    #[serde(default)]
    pub events: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delivery {
    webhook: String,
    event: String,
    body: Value,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    next_ms: u64,
}

/// HMAC-SHA256 of `t.body` with `secret`, hex.
pub fn signature(secret: &str, t: u64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

impl Engine {
    /// Creates or replaces a webhook; its secret must exist.
    pub async fn set_webhook(&self, tenant: &str, mut hook: Webhook) -> EngineResult<Webhook> {
        validate_id("webhook", &hook.name)?;
        Origin::of_url(&hook.url).map_err(CoreError::Invalid)?;
        if hook.events.is_empty() {
            hook.events = EVENTS.iter().map(|e| e.to_string()).collect();
        }
        if let Some(bad) = hook.events.iter().find(|e| !EVENTS.contains(&e.as_str())) {
            return Err(CoreError::Invalid(format!(
                "webhook event {bad:?} is not one of {}",
                EVENTS.join(", ")
            ))
            .into());
        }
        if !self.secret_names(tenant).await?.contains(&hook.secret) {
            return Err(CoreError::Invalid(format!(
                "webhook secret {:?} is not a secret of the tenant (PUT …/secrets/{} first)",
                hook.secret, hook.secret
            ))
            .into());
        }
        let v = serde_json::to_value(&hook).unwrap_or_default();
        self.store
            .set_record(tenant, WEBHOOK, &hook.name, &v)
            .await?;
        Ok(hook)
    }

    /// The tenant's webhooks.
    pub async fn webhooks(&self, tenant: &str) -> EngineResult<Vec<Webhook>> {
        Ok(self
            .store
            .records(tenant, WEBHOOK)
            .await?
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect())
    }

    /// Deletes a webhook (deliveries already queued are dropped as they
    /// come up).
    pub async fn delete_webhook(&self, tenant: &str, name: &str) -> EngineResult<bool> {
        Ok(self.store.delete_record(tenant, WEBHOOK, name).await?)
    }

    /// Adds a delivery per webhook that wants `event` to `writes` (written
    /// with the change it reports); returns their ids, to start once the
    /// write is done ([`Engine::start_hooks`]).
    pub(crate) async fn hook_writes(
        &self,
        tenant: &str,
        event: &str,
        body: &Value,
        writes: &mut Vec<RecordWrite>,
    ) -> EngineResult<Vec<String>> {
        let mut ids = Vec::new();
        for hook in self.webhooks(tenant).await? {
            if !hook.events.iter().any(|e| e == event) {
                continue;
            }
            let id = format!("{:013}-{:08x}", now_ms(), crate::interaction_nonce()?);
            let d = Delivery {
                webhook: hook.name,
                event: event.to_string(),
                body: body.clone(),
                attempts: 0,
                next_ms: 0,
            };
            writes.push(RecordWrite::put(
                HOOK_OUT,
                &id,
                serde_json::to_value(&d).unwrap_or_default(),
            ));
            ids.push(id);
        }
        Ok(ids)
    }

    /// Starts deliveries written by [`Engine::hook_writes`] (ids in
    /// order): a task each, unless one runs already or [`MAX_RUNNING`] do
    /// (the tenant's stored deliveries are then taken up as room comes).
    pub(crate) fn start_hooks(self: &Arc<Self>, tenant: &str, ids: Vec<String>) {
        let mut before = String::new();
        for id in ids {
            {
                let mut running = crate::acd::lock(&self.hooks.running);
                if running.len() >= MAX_RUNNING {
                    drop(running);
                    self.hooks.park(tenant, &before);
                    return;
                }
                if !running.insert((tenant.to_string(), id.clone())) {
                    before = id;
                    continue;
                }
            }
            before.clone_from(&id);
            let (engine, tenant) = (self.clone(), tenant.to_string());
            tokio::spawn(async move { engine.deliver_hook_until_done(tenant, id).await });
        }
    }

    /// Takes up the stored deliveries of parked tenants, a page at a
    /// time, once there is room for half of [`MAX_RUNNING`]: when a
    /// delivery ends, and every few seconds (the usage flusher's tick).
    pub(crate) fn unpark_hooks(self: &Arc<Self>) {
        let room = MAX_RUNNING.saturating_sub(self.hooks.running());
        if room < MAX_RUNNING / 2 {
            return;
        }
        let parked: Vec<(String, String)> = crate::acd::lock(&self.hooks.parked).drain().collect();
        for (tenant, after) in parked {
            let engine = self.clone();
            tokio::spawn(async move {
                if let Err(e) = engine.take_up_hooks(&tenant, &after, room).await {
                    tracing::warn!("webhook deliveries of {tenant}: {e}");
                    engine.hooks.park(&tenant, &after);
                }
            });
        }
    }

    /// Starts up to `room` stored deliveries of a tenant after the id
    /// `after`; parks the tenant at the last one if there may be more.
    async fn take_up_hooks(
        self: &Arc<Self>,
        tenant: &str,
        after: &str,
        room: usize,
    ) -> EngineResult<usize> {
        let page = self
            .store
            .records_after(tenant, HOOK_OUT, after, room)
            .await?;
        let n = page.len();
        let last = page.last().map(|(id, _)| id.clone());
        self.start_hooks(tenant, page.into_iter().map(|(id, _)| id).collect());
        if n >= room
            && let Some(last) = last
        {
            self.hooks.park(tenant, &last);
        }
        Ok(n)
    }

    /// Takes up the deliveries left at a restart (a page now, the rest
    /// as room comes).
    pub(crate) async fn resume_hooks(self: &Arc<Self>, tenant: &str) -> EngineResult<usize> {
        self.take_up_hooks(tenant, "", MAX_RUNNING).await
    }

    async fn deliver_hook_until_done(self: Arc<Self>, tenant: String, id: String) {
        let mut errors = 0;
        loop {
            match self.deliver_hook(&tenant, &id).await {
                Ok(Some(wait)) => {
                    errors = 0;
                    tokio::time::sleep(wait).await
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("webhook delivery {id} of {tenant}: {e}");
                    errors += 1;
                    if errors >= MAX_STORE_ERRORS {
                        // Stored still: taken up again later (the
                        // flusher's tick), not at once.
                        crate::acd::lock(&self.hooks.running).remove(&(tenant.clone(), id));
                        self.hooks.park(&tenant, "");
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
        crate::acd::lock(&self.hooks.running).remove(&(tenant, id));
        self.unpark_hooks();
    }

    /// One attempt; `Some(wait)` to try again after it.
    async fn deliver_hook(&self, tenant: &str, id: &str) -> EngineResult<Option<Duration>> {
        let Some(v) = self.store.record(tenant, HOOK_OUT, id).await? else {
            return Ok(None);
        };
        let Ok(mut d) = serde_json::from_value::<Delivery>(v) else {
            self.store.delete_record(tenant, HOOK_OUT, id).await?;
            return Ok(None);
        };
        let wait = d.next_ms.saturating_sub(now_ms());
        if wait > 0 {
            return Ok(Some(Duration::from_millis(wait)));
        }
        let hook = self
            .store
            .record(tenant, WEBHOOK, &d.webhook)
            .await?
            .and_then(|v| serde_json::from_value::<Webhook>(v).ok());
        let secret = match &hook {
            Some(h) => self.tenant_secret(tenant, &h.secret).await.ok().flatten(),
            None => None,
        };
        let (Some(hook), Some(secret)) = (hook, secret) else {
            // The webhook or its secret is gone: nobody to tell.
            self.store.delete_record(tenant, HOOK_OUT, id).await?;
            return Ok(None);
        };
        let body = serde_json::to_vec(&json!({
            "id": id,
            "event": d.event,
            "tenant": tenant,
            "data": d.body,
        }))
        .unwrap_or_default();
        let t = now_ms() / 1000;
        let req = FetchRequest {
            method: "POST",
            url: hook.url.clone(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("x-plugboard-event".into(), d.event.clone()),
                ("x-plugboard-delivery".into(), id.to_string()),
                (
                    "x-plugboard-signature".into(),
                    format!("t={t},v1={}", signature(&secret, t, &body)),
                ),
            ],
            body,
            timeout_ms: Some(10_000),
        };
        // The webhook's own origin is its grant: the network policy and
        // the tenant's limits of the plugins' fetcher apply.
        let origin = Origin::of_url(&hook.url).map_err(CoreError::Invalid)?;
        let grant = HttpGrant {
            allow: vec![origin.to_string()],
            timeout_ms: Some(10_000),
            max_response_bytes: Some(64 * 1024),
            ..HttpGrant::default()
        };
        let ok = match self.fetcher().send(tenant, &grant, req).await {
            Ok(r) => (200..300).contains(&r.status),
            Err(e) => {
                tracing::debug!("webhook {} of {tenant}: {e}", hook.name);
                false
            }
        };
        d.attempts += 1;
        if ok || d.attempts >= MAX_ATTEMPTS {
            if !ok {
                tracing::warn!(
                    "webhook {} of {tenant}: delivery {id} given up after {} attempts",
                    hook.name,
                    d.attempts
                );
            }
            self.store.delete_record(tenant, HOOK_OUT, id).await?;
            return Ok(None);
        }
        let backoff = Duration::from_secs((1u64 << (d.attempts - 1).min(10)).min(600));
        d.next_ms = now_ms() + backoff.as_millis() as u64;
        self.store
            .set_record(
                tenant,
                HOOK_OUT,
                id,
                &serde_json::to_value(&d).unwrap_or_default(),
            )
            .await?;
        Ok(Some(backoff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_time_and_body() {
        // Python: hmac.new(b"k", b"1.{}", hashlib.sha256).hexdigest()
        assert_eq!(
            signature("k", 1, b"{}"),
            "3dd49b2593d0f9a349e9e71c4bde3e2b862c2be4003fe9b4ba81332029310158"
        );
        assert_ne!(signature("k", 1, b"{}"), signature("k", 2, b"{}"));
    }
}
