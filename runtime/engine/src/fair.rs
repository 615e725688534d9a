//! Fair shares of the plugin host across tenants.
//!
//! The host runs at most `total` plugin instances at once (its pool). A
//! tenant may hold at most its share of them (by default a quarter, at
//! least one; a tenant's `max_concurrent` limit overrides it), so a tenant
//! whose events wait on a slow service cannot take the capacity another
//! tenant's events need. When an instance frees, it goes to the waiting
//! tenant that runs the fewest (max-min fairness), first come first served
//! within a tenant. A waiter that gives up (its call ended) is skipped.
//!
//! Written here rather than taken from a crate: tokio's `Semaphore` is
//! one FIFO queue, and no kept crate does weighted per-key admission with
//! caps over one pool.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// A tenant's running and waiting invocations.
#[derive(Default)]
struct Tenant {
    running: usize,
    cap: usize,
    waiting: VecDeque<oneshot::Sender<FairPermit>>,
}

#[derive(Default)]
struct State {
    running: usize,
    tenants: HashMap<String, Tenant>,
}

/// Admission of plugin invocations, fair across tenants (see the module
/// documentation).
pub struct FairPermits {
    total: usize,
    state: Mutex<State>,
}

/// The right to run one invocation; given back when dropped.
pub struct FairPermit {
    fair: Arc<FairPermits>,
    tenant: String,
    armed: bool,
}

impl Drop for FairPermit {
    fn drop(&mut self) {
        if self.armed {
            self.fair.release(&self.tenant);
        }
    }
}

/// Forgets waiters that gave up (their call ended) and tenants with
/// nothing running or waiting.
fn prune(s: &mut State) {
    for t in s.tenants.values_mut() {
        t.waiting.retain(|w| !w.is_closed());
    }
    s.tenants
        .retain(|_, t| t.running > 0 || !t.waiting.is_empty());
}

impl FairPermits {
    /// Admission for a pool of `total` instances.
    pub fn new(total: usize) -> Arc<FairPermits> {
        Arc::new(FairPermits {
            total: total.max(1),
            state: Mutex::new(State::default()),
        })
    }

    /// The pool size.
    pub fn total(&self) -> usize {
        self.total
    }

    /// A tenant's share when it names none: a quarter of the pool, at
    /// least one.
    pub fn default_share(&self) -> usize {
        (self.total / 4).max(1)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still
        // consistent (every change is one statement): carry on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for an instance for `tenant`, which may hold at most `share`
    /// at once.
    pub async fn acquire(self: &Arc<Self>, tenant: &str, share: usize) -> FairPermit {
        let share = share.clamp(1, self.total);
        let rx = {
            let mut s = self.lock();
            let free = s.running < self.total;
            let t = s.tenants.entry(tenant.to_string()).or_default();
            t.cap = share;
            if free && t.running < share && t.waiting.is_empty() {
                t.running += 1;
                s.running += 1;
                return self.permit(tenant);
            }
            let (tx, rx) = oneshot::channel();
            t.waiting.push_back(tx);
            rx
        };
        match rx.await {
            Ok(p) => p,
            // Only if the admission itself were dropped, which the permit's
            // own reference prevents; run rather than hang.
            Err(_) => FairPermit {
                fair: self.clone(),
                tenant: tenant.to_string(),
                armed: false,
            },
        }
    }

    fn permit(self: &Arc<Self>, tenant: &str) -> FairPermit {
        FairPermit {
            fair: self.clone(),
            tenant: tenant.to_string(),
            armed: true,
        }
    }

    fn release(self: &Arc<Self>, tenant: &str) {
        let mut s = self.lock();
        s.running = s.running.saturating_sub(1);
        if let Some(t) = s.tenants.get_mut(tenant) {
            t.running = t.running.saturating_sub(1);
        }
        prune(&mut s);
        // Hand freed instances to the waiting tenants that run the fewest.
        while s.running < self.total {
            let next = s
                .tenants
                .iter()
                .filter(|(_, t)| !t.waiting.is_empty() && t.running < t.cap)
                .min_by_key(|(_, t)| t.running)
                .map(|(name, _)| name.clone());
            let Some(name) = next else { break };
            let Some(t) = s.tenants.get_mut(&name) else {
                break;
            };
            let Some(tx) = t.waiting.pop_front() else {
                continue;
            };
            t.running += 1;
            s.running += 1;
            if let Err(mut p) = tx.send(self.permit(&name)) {
                // The waiter gave up: undo, without re-entering release.
                p.armed = false;
                s.running -= 1;
                if let Some(t) = s.tenants.get_mut(&name) {
                    t.running -= 1;
                }
            }
        }
        prune(&mut s);
    }

    /// Running and waiting invocations per tenant, busiest first.
    pub fn load(&self) -> Vec<(String, usize, usize)> {
        self.snapshot()
            .into_iter()
            .map(|(name, running, waiting, _)| (name, running, waiting))
            .collect()
    }

    /// Running, waiting and share per tenant, busiest first, from one look
    /// at the state.
    fn snapshot(&self) -> Vec<(String, usize, usize, usize)> {
        let mut s = self.lock();
        prune(&mut s);
        let mut v: Vec<_> = s
            .tenants
            .iter()
            .map(|(name, t)| (name.clone(), t.running, t.waiting.len(), t.cap))
            .collect();
        v.sort_by(|a, b| (b.1 + b.2).cmp(&(a.1 + a.2)).then(a.0.cmp(&b.0)));
        v
    }

    /// The per-tenant gauges in the Prometheus text format.
    pub fn encode(&self) -> String {
        let load = self.snapshot();
        let mut out = String::new();
        for (metric, help, pick) in [
            (
                "plugboard_tenant_plugins_running",
                "Plugin invocations running, per tenant.",
                1,
            ),
            (
                "plugboard_tenant_plugins_waiting",
                "Plugin invocations waiting for the tenant's share, per tenant.",
                2,
            ),
            (
                "plugboard_tenant_plugins_share",
                "Plugin invocations the tenant may run at once (its share of the pool).",
                3,
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
            for (tenant, running, waiting, share) in &load {
                let n = match pick {
                    1 => running,
                    2 => waiting,
                    _ => share,
                };
                let _ = writeln!(out, "{metric}{{tenant=\"{tenant}\"}} {n}");
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn pending(
        f: &Arc<FairPermits>,
        t: &str,
        share: usize,
    ) -> tokio::task::JoinHandle<FairPermit> {
        let (f, t) = (f.clone(), t.to_string());
        let h = tokio::spawn(async move { f.acquire(&t, share).await });
        tokio::task::yield_now().await;
        h
    }

    fn counts(f: &FairPermits, t: &str) -> (usize, usize) {
        f.load()
            .into_iter()
            .find(|(n, ..)| n == t)
            .map(|(_, r, w)| (r, w))
            .unwrap_or((0, 0))
    }

    #[tokio::test]
    async fn a_flooding_tenant_keeps_to_its_share() {
        let f = FairPermits::new(8);
        let mut a = Vec::new();
        for _ in 0..2 {
            a.push(f.acquire("a", 2).await);
        }
        // A's third waits though the pool has room.
        let a3 = pending(&f, "a", 2).await;
        assert_eq!(counts(&f, "a"), (2, 1));
        // B gets in at once.
        let b = tokio::time::timeout(Duration::from_secs(5), f.acquire("b", 2))
            .await
            .expect("b was admitted");
        assert_eq!(counts(&f, "b"), (1, 0));
        // One of A's ends: its waiter runs.
        drop(a.pop());
        let a3 = tokio::time::timeout(Duration::from_secs(5), a3)
            .await
            .expect("a3 admitted")
            .unwrap();
        assert_eq!(counts(&f, "a"), (2, 0));
        drop((a, a3, b));
        assert!(f.load().is_empty());
    }

    #[tokio::test]
    async fn a_freed_instance_goes_to_the_tenant_running_fewest() {
        let f = FairPermits::new(2);
        let a1 = f.acquire("a", 2).await;
        let a2 = f.acquire("a", 2).await;
        let a3 = pending(&f, "a", 2).await;
        let b1 = pending(&f, "b", 2).await;
        // A queued first, but B runs nothing: B gets the freed instance.
        drop(a1);
        let b1 = tokio::time::timeout(Duration::from_secs(5), b1)
            .await
            .expect("b admitted")
            .unwrap();
        assert!(!a3.is_finished());
        drop(a2);
        let a3 = tokio::time::timeout(Duration::from_secs(5), a3)
            .await
            .expect("a3 admitted")
            .unwrap();
        drop((a3, b1));
        assert!(f.load().is_empty());
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_is_skipped() {
        let f = FairPermits::new(1);
        let a = f.acquire("a", 1).await;
        let gone = pending(&f, "b", 1).await;
        let next = pending(&f, "c", 1).await;
        gone.abort();
        let _ = gone.await;
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("c admitted")
            .unwrap();
        assert_eq!(counts(&f, "c"), (1, 0));
        assert_eq!(counts(&f, "b"), (0, 0));
        drop(c);
        assert!(f.load().is_empty());
        assert!(
            f.encode()
                .contains("# TYPE plugboard_tenant_plugins_waiting gauge")
        );
    }
}
