//! Per-tenant capacity on this node: call legs at once (within a fair
//! share of the node's media ports), new calls per second, chats at once
//! and inbound messages per second per channel. Channels ask before they
//! take a contact ([`Capacity::lease_call`], [`Capacity::admit_new_call`],
//! [`Capacity::lease_chat`], [`Capacity::admit_message`]) and refuse it
//! in their own protocol's words when the answer is a [`Refusal`]; a
//! lease gives its place back when dropped.
//!
//! The limits are the operator's ([`plugboard_core::TenantLimits`]),
//! remembered from the last read of the tenant's record, so the SIP loop
//! can ask without a store read. Counts are per node: a cluster of N nodes
//! behind a balancer admits up to N times a tenant's limit (documented in
//! the README).
//!
//! The node's media ports are shared fairly: a tenant within its own limit
//! is refused only when the node is full, and the last tenth of the ports
//! is kept for tenants below their fair share (the node's legs over the
//! tenants holding legs), so one busy tenant cannot take the ports another
//! tenant's next call needs.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use plugboard_core::TenantLimits;

/// Why a contact was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The tenant has as many call legs as its limit allows.
    #[error("the tenant is at its limit of {0} calls at once")]
    Calls(u32),
    /// The tenant starts calls faster than its limit allows.
    #[error("the tenant is over its limit of {0} new calls per second")]
    CallRate(u32),
    /// The node has no media capacity left at all.
    #[error("no media capacity left on this node")]
    NodeFull,
    /// The node's last places are kept for tenants below their fair
    /// share, and this tenant is above its own.
    #[error("the tenant is above its fair share of this node's calls")]
    FairShare,
    /// The tenant has as many chats open as its limit allows.
    #[error("the tenant is at its limit of {0} chats at once")]
    Chats(u32),
    /// The tenant receives messages faster than its limit allows.
    #[error("the tenant is over its limit of {0} messages per second")]
    MessageRate(u32),
    /// What the tenant stores would pass its limit.
    #[error("the tenant's storage is full (its limit is {0} MiB)")]
    Storage(u64),
}

impl Refusal {
    /// A short stable code (metrics label, API error code).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Calls(_) => "calls",
            Refusal::CallRate(_) => "calls_per_second",
            Refusal::NodeFull => "node_full",
            Refusal::FairShare => "fair_share",
            Refusal::Chats(_) => "chats",
            Refusal::MessageRate(_) => "messages_per_second",
            Refusal::Storage(_) => "storage_mib",
        }
    }

    /// Seconds after which trying again makes sense.
    pub fn retry_after_s(&self) -> u64 {
        match self {
            Refusal::CallRate(_) | Refusal::MessageRate(_) => 1,
            Refusal::Storage(_) => 3600,
            _ => 5,
        }
    }
}

/// How long a tenant's stored bytes, summed from its ledger, are trusted
/// (plus what this node adds): other nodes' writes show after that.
const STORED_FRESH: std::time::Duration = std::time::Duration::from_secs(600);

/// A token bucket: `rate` per second, holding at most one second's worth.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, rate: u32, now: Instant) -> bool {
        let rate = f64::from(rate);
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
struct State {
    limits: HashMap<String, TenantLimits>,
    calls: HashMap<String, usize>,
    chats: HashMap<String, usize>,
    buckets: HashMap<(String, &'static str), Bucket>,
    refused: HashMap<(String, &'static str), u64>,
    /// Bytes each tenant stores, as last summed from its ledger (and
    /// when), plus what this node stored since.
    stored: HashMap<String, (u64, Instant)>,
}

/// The node's capacity bookkeeping (one per engine).
#[derive(Default)]
pub struct Capacity {
    /// Call legs the node can hold (its media port pairs); 0: not known
    /// (no voice channel), no node-wide check.
    node_calls: AtomicUsize,
    state: Mutex<State>,
}

/// One call leg's place; given back when dropped.
#[derive(Debug)]
pub struct CallLease {
    cap: Arc<Capacity>,
    tenant: String,
}

impl CallLease {
    /// The tenant holding it.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl Drop for CallLease {
    fn drop(&mut self) {
        self.cap.release(&self.tenant, Kind::Call);
    }
}

/// One open chat's place; given back when dropped.
#[derive(Debug)]
pub struct ChatLease {
    cap: Arc<Capacity>,
    tenant: String,
}

impl Drop for ChatLease {
    fn drop(&mut self) {
        self.cap.release(&self.tenant, Kind::Chat);
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Call,
    Chat,
}

impl std::fmt::Debug for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capacity")
            .field("node_calls", &self.node_calls())
            .finish_non_exhaustive()
    }
}

impl Capacity {
    /// Sets how many call legs the node holds (its media port pairs).
    pub fn set_node_calls(&self, n: usize) {
        self.node_calls.store(n, Ordering::Relaxed);
    }

    /// How many call legs the node holds (0: not known).
    pub fn node_calls(&self) -> usize {
        self.node_calls.load(Ordering::Relaxed)
    }

    /// A tenant's call-leg limit when the operator set none: half the
    /// node, so that one tenant alone never takes every port.
    pub fn default_calls(&self) -> Option<u32> {
        match self.node_calls() {
            0 => None,
            n => Some((n / 2).max(1) as u32),
        }
    }

    /// Remembers a tenant's limits (from the record just read).
    pub fn remember(&self, tenant: &str, limits: &TenantLimits) {
        if let Ok(mut s) = self.state.lock()
            && s.limits.get(tenant) != Some(limits)
        {
            s.limits.insert(tenant.to_string(), *limits);
        }
    }

    /// The limits last read for a tenant.
    pub fn limits(&self, tenant: &str) -> TenantLimits {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.limits.get(tenant).copied())
            .unwrap_or_default()
    }

    /// The calls limit in effect for a tenant.
    pub fn calls_limit(&self, tenant: &str) -> Option<u32> {
        self.limits(tenant).calls.or_else(|| self.default_calls())
    }

    fn refuse(s: &mut State, tenant: &str, r: Refusal) -> Refusal {
        *s.refused.entry((tenant.to_string(), r.code())).or_default() += 1;
        r
    }

    /// A place for one more call leg of `tenant`, or why not.
    pub fn lease_call(self: &Arc<Self>, tenant: &str) -> Result<CallLease, Refusal> {
        let node = self.node_calls();
        let limit = self.calls_limit(tenant);
        let mut s = self.state.lock().map_err(|_| Refusal::NodeFull)?;
        let mine = s.calls.get(tenant).copied().unwrap_or(0);
        if let Some(l) = limit
            && mine >= l as usize
        {
            return Err(Self::refuse(&mut s, tenant, Refusal::Calls(l)));
        }
        if node > 0 {
            let total: usize = s.calls.values().sum();
            // The fair share counts one tenant more than hold legs now:
            // the next one to call.
            let holders = s.calls.len() + usize::from(mine == 0) + 1;
            let fair = node / holders;
            let reserve = (node / 10).max(1);
            let free = node.saturating_sub(total);
            if free == 0 {
                return Err(Self::refuse(&mut s, tenant, Refusal::NodeFull));
            }
            if free <= reserve && mine >= fair {
                return Err(Self::refuse(&mut s, tenant, Refusal::FairShare));
            }
        }
        *s.calls.entry(tenant.to_string()).or_default() += 1;
        Ok(CallLease {
            cap: self.clone(),
            tenant: tenant.to_string(),
        })
    }

    /// Whether `tenant` may start one more call now (its calls per
    /// second); a refusal is counted.
    pub fn admit_new_call(&self, tenant: &str) -> Result<(), Refusal> {
        let rate = self.limits(tenant).calls_per_second;
        self.admit_rate(tenant, "call", rate, Refusal::CallRate)
    }

    /// Whether `tenant` may receive one more message on `channel` now.
    pub fn admit_message(&self, tenant: &str, channel: &'static str) -> Result<(), Refusal> {
        let rate = self.limits(tenant).messages_per_second;
        self.admit_rate(tenant, channel, rate, Refusal::MessageRate)
    }

    fn admit_rate(
        &self,
        tenant: &str,
        what: &'static str,
        rate: Option<u32>,
        refusal: fn(u32) -> Refusal,
    ) -> Result<(), Refusal> {
        let Some(rate) = rate else { return Ok(()) };
        let now = Instant::now();
        let mut s = self.state.lock().map_err(|_| refusal(rate))?;
        let b = s
            .buckets
            .entry((tenant.to_string(), what))
            .or_insert(Bucket {
                tokens: f64::from(rate),
                at: now,
            });
        if b.take(rate, now) {
            Ok(())
        } else {
            Err(Self::refuse(&mut s, tenant, refusal(rate)))
        }
    }

    /// A place for one more open chat of `tenant`, or why not.
    pub fn lease_chat(self: &Arc<Self>, tenant: &str) -> Result<ChatLease, Refusal> {
        let limit = self.limits(tenant).chats;
        let mut s = self.state.lock().map_err(|_| Refusal::Chats(0))?;
        let mine = s.chats.get(tenant).copied().unwrap_or(0);
        if let Some(l) = limit
            && mine >= l as usize
        {
            return Err(Self::refuse(&mut s, tenant, Refusal::Chats(l)));
        }
        *s.chats.entry(tenant.to_string()).or_default() += 1;
        Ok(ChatLease {
            cap: self.clone(),
            tenant: tenant.to_string(),
        })
    }

    fn release(&self, tenant: &str, kind: Kind) {
        if let Ok(mut s) = self.state.lock() {
            let map = match kind {
                Kind::Call => &mut s.calls,
                Kind::Chat => &mut s.chats,
            };
            if let Some(n) = map.get_mut(tenant) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(tenant);
                }
            }
        }
    }

    /// The bytes a tenant stores, if summed less than [`STORED_FRESH`] ago.
    pub(crate) fn stored(&self, tenant: &str) -> Option<u64> {
        let s = self.state.lock().ok()?;
        s.stored
            .get(tenant)
            .filter(|(_, at)| at.elapsed() < STORED_FRESH)
            .map(|(b, _)| *b)
    }

    /// Sets a tenant's stored bytes, summed now.
    pub(crate) fn set_stored(&self, tenant: &str, bytes: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.stored.insert(tenant.to_string(), (bytes, Instant::now()));
        }
    }

    /// Adds bytes this node stored for a tenant.
    pub(crate) fn add_stored(&self, tenant: &str, bytes: u64) {
        if let Ok(mut s) = self.state.lock()
            && let Some((b, _)) = s.stored.get_mut(tenant)
        {
            *b += bytes;
        }
    }

    /// Takes bytes a deletion freed off the tenant's stored count.
    pub(crate) fn sub_stored(&self, tenant: &str, bytes: u64) {
        if let Ok(mut s) = self.state.lock()
            && let Some((b, _)) = s.stored.get_mut(tenant)
        {
            *b = b.saturating_sub(bytes);
        }
    }

    /// Counts a refusal made elsewhere (the storage check).
    pub(crate) fn count_refusal(&self, tenant: &str, r: &Refusal) {
        if let Ok(mut s) = self.state.lock() {
            Self::refuse(&mut s, tenant, r.clone());
        }
    }

    /// What a tenant holds now on this node: `(calls, chats)`.
    pub fn in_use(&self, tenant: &str) -> (usize, usize) {
        self.state
            .lock()
            .map(|s| {
                (
                    s.calls.get(tenant).copied().unwrap_or(0),
                    s.chats.get(tenant).copied().unwrap_or(0),
                )
            })
            .unwrap_or((0, 0))
    }

    /// Refusals so far for a tenant, by code.
    pub fn refusals(&self, tenant: &str) -> HashMap<&'static str, u64> {
        self.state
            .lock()
            .map(|s| {
                s.refused
                    .iter()
                    .filter(|((t, _), _)| t == tenant)
                    .map(|((_, c), n)| (*c, *n))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Prometheus lines: legs and chats in use, and refusals, per tenant.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let Ok(s) = self.state.lock() else {
            return out;
        };
        let _ = writeln!(
            out,
            "# HELP plugboard_node_calls_capacity Call legs this node holds (media port pairs).\n# TYPE plugboard_node_calls_capacity gauge\nplugboard_node_calls_capacity {}",
            self.node_calls()
        );
        for (metric, help, map) in [
            (
                "plugboard_tenant_calls",
                "Call legs the tenant holds on this node.",
                &s.calls,
            ),
            (
                "plugboard_tenant_chats",
                "Chats the tenant has open on this node.",
                &s.chats,
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
            for (tenant, n) in map {
                let _ = writeln!(out, "{metric}{{tenant=\"{tenant}\"}} {n}");
            }
        }
        let metric = "plugboard_tenant_refusals";
        let _ = writeln!(
            out,
            "# HELP {metric} Contacts refused because the tenant was at a limit, by limit.\n# TYPE {metric} counter"
        );
        for ((tenant, code), n) in &s.refused {
            let _ = writeln!(
                out,
                "{metric}_total{{tenant=\"{tenant}\",limit=\"{code}\"}} {n}"
            );
        }
        out
    }
}

impl crate::Engine {
    /// Puts a refused contact on the tenant's event stream (`kind:
    /// capacity`); it is already counted in the metrics.
    pub fn capacity_refused(
        &self,
        tenant: &str,
        channel: &str,
        refusal: &Refusal,
        detail: serde_json::Value,
    ) {
        tracing::debug!("{channel} contact of {tenant} refused: {refusal}");
        self.publish(
            tenant,
            serde_json::json!({
                "kind": "capacity",
                "channel": channel,
                "limit": refusal.code(),
                "reason": refusal.to_string(),
                "at_ms": plugboard_core::now_ms(),
                "data": detail,
            }),
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn cap(node: usize) -> Arc<Capacity> {
        let c = Arc::new(Capacity::default());
        c.set_node_calls(node);
        c
    }

    #[test]
    fn a_tenant_is_held_to_its_limit_and_gets_its_places_back() {
        let c = cap(100);
        c.remember(
            "a",
            &TenantLimits {
                calls: Some(2),
                ..Default::default()
            },
        );
        let one = c.lease_call("a").unwrap();
        let _two = c.lease_call("a").unwrap();
        assert_eq!(c.lease_call("a").unwrap_err(), Refusal::Calls(2));
        assert_eq!(c.in_use("a").0, 2);
        drop(one);
        assert!(c.lease_call("a").is_ok());
        assert_eq!(c.refusals("a")["calls"], 1);
        assert!(
            c.encode()
                .contains("plugboard_tenant_refusals_total{tenant=\"a\",limit=\"calls\"} 1")
        );
    }

    #[test]
    fn the_default_share_is_half_the_node_and_the_last_tenth_is_kept_for_others() {
        let c = cap(20);
        let mut a = Vec::new();
        while let Ok(l) = c.lease_call("a") {
            a.push(l);
        }
        // Half the node by default.
        assert_eq!(a.len(), 10);
        c.remember(
            "a",
            &TenantLimits {
                calls: Some(20),
                ..Default::default()
            },
        );
        while let Ok(l) = c.lease_call("a") {
            a.push(l);
        }
        // With a limit of the whole node, A stops where the reserve starts.
        assert_eq!(a.len(), 18);
        assert_eq!(c.lease_call("a").unwrap_err(), Refusal::FairShare);
        // B, below its fair share, still gets the reserve.
        let b: Vec<_> = (0..2).map(|_| c.lease_call("b").unwrap()).collect();
        assert_eq!(c.lease_call("b").unwrap_err(), Refusal::NodeFull);
        assert_eq!(c.in_use("b").0, b.len());
    }

    #[test]
    fn rates_allow_a_second_worth_then_refill() {
        let c = cap(0);
        c.remember(
            "a",
            &TenantLimits {
                calls_per_second: Some(3),
                ..Default::default()
            },
        );
        for _ in 0..3 {
            c.admit_new_call("a").unwrap();
        }
        assert_eq!(c.admit_new_call("a").unwrap_err(), Refusal::CallRate(3));
        // Another tenant, and another channel, are not touched.
        c.admit_new_call("b").unwrap();
        c.admit_message("a", "chat").unwrap();
        let mut s = c.state.lock().unwrap();
        let b = s.buckets.get_mut(&("a".to_string(), "call")).unwrap();
        b.at -= std::time::Duration::from_millis(400);
        drop(s);
        // 0.4 s at 3/s is one more token.
        c.admit_new_call("a").unwrap();
        assert!(c.admit_new_call("a").is_err());
    }
}
