//! Throttling of failed digest authentication (online password guessing),
//! sans-IO: the caller passes `now` and acts on the verdicts.
//!
//! Two counters, as Kamailio's pike + htable recipes or fail2ban on
//! Asterisk's security events do:
//! - per source address: after [`ThrottleConfig::ip_failures`] failures
//!   within [`ThrottleConfig::window`], that address is refused outright
//!   for a cooling-off period (doubling on each repeat, up to
//!   [`ThrottleConfig::max_cool_off`]);
//! - per user: after [`ThrottleConfig::user_failures`] failures from any
//!   addresses within the window, the user is refused for the cooling-off
//!   period, but only from addresses where the user has not authenticated
//!   recently: an attacker spreading guesses over many addresses cannot
//!   lock a real phone out of its own address.
//!
//! While refused, a request is not checked at all, so a right guess is
//! worth nothing. Memory is bounded: at most [`ThrottleConfig::max_entries`]
//! entries per table, the oldest idle ones forgotten first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Limits of the throttle.
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    /// Failures from one address within the window before it is refused.
    pub ip_failures: u32,
    /// Failures for one user within the window before it is refused from
    /// addresses it has not authenticated from.
    pub user_failures: u32,
    /// The window failures are counted in.
    pub window: Duration,
    /// The first cooling-off period.
    pub cool_off: Duration,
    /// The longest cooling-off period.
    pub max_cool_off: Duration,
    /// How long a successful authentication keeps its address trusted for
    /// the user.
    pub trusted_for: Duration,
    /// Most entries kept per table.
    pub max_entries: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            ip_failures: 10,
            user_failures: 20,
            window: Duration::from_secs(60),
            cool_off: Duration::from_secs(60),
            max_cool_off: Duration::from_secs(3600),
            trusted_for: Duration::from_secs(24 * 3600),
            max_entries: 100_000,
        }
    }
}

/// Whether a request may try to authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Check its credentials.
    Allow,
    /// Refuse it unchecked until `until`.
    Refuse {
        /// End of the cooling-off period.
        until: Instant,
        /// What is cooling off.
        scope: Scope,
    },
}

/// What a cooling-off period applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The source address.
    Address,
    /// The user (from untrusted addresses).
    User,
}

/// A cooling-off period that has just started: a security event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockout {
    /// What is cooling off.
    pub scope: Scope,
    /// The address whose failure started it.
    pub ip: IpAddr,
    /// The user (`user@realm`).
    pub user: String,
    /// Failures counted.
    pub failures: u32,
    /// How long.
    pub cool_off: Duration,
}

#[derive(Debug, Clone)]
struct Counter {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
    strikes: u32,
    last: Instant,
}

impl Counter {
    fn new(now: Instant) -> Self {
        Counter {
            window_start: now,
            failures: 0,
            blocked_until: None,
            strikes: 0,
            last: now,
        }
    }

    fn blocked(&self, now: Instant) -> Option<Instant> {
        self.blocked_until.filter(|u| *u > now)
    }

    /// Counts a failure; returns the cooling-off period if one starts.
    fn fail(&mut self, now: Instant, limit: u32, cfg: &ThrottleConfig) -> Option<Duration> {
        self.last = now;
        if now.duration_since(self.window_start) > cfg.window {
            self.window_start = now;
            self.failures = 0;
        }
        self.failures += 1;
        if self.failures < limit || self.blocked(now).is_some() {
            return None;
        }
        let period = cfg
            .cool_off
            .saturating_mul(1 << self.strikes.min(16))
            .min(cfg.max_cool_off);
        self.strikes += 1;
        self.blocked_until = Some(now + period);
        self.failures = 0;
        self.window_start = now;
        Some(period)
    }
}

/// The throttle's state.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    cfg: ThrottleConfig,
    by_ip: HashMap<IpAddr, Counter>,
    by_user: HashMap<String, Counter>,
    trusted: HashMap<(String, IpAddr), Instant>,
}

fn bound<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    max: usize,
    idle_since: impl Fn(&V) -> Instant,
) {
    if map.len() < max {
        return;
    }
    // Forget the oldest idle tenth in one pass.
    let mut ages: Vec<(Instant, K)> = map
        .iter()
        .map(|(k, v)| (idle_since(v), k.clone()))
        .collect();
    ages.sort_by_key(|(t, _)| *t);
    for (_, k) in ages.into_iter().take(max / 10 + 1) {
        map.remove(&k);
    }
}

impl AuthThrottle {
    /// A throttle with these limits.
    pub fn new(cfg: ThrottleConfig) -> Self {
        AuthThrottle {
            cfg,
            ..AuthThrottle::default()
        }
    }

    /// May a request from `ip` for `user` try to authenticate now?
    pub fn check(&self, ip: IpAddr, user: &str, now: Instant) -> Verdict {
        if let Some(until) = self.by_ip.get(&ip).and_then(|c| c.blocked(now)) {
            return Verdict::Refuse {
                until,
                scope: Scope::Address,
            };
        }
        if let Some(until) = self.by_user.get(user).and_then(|c| c.blocked(now))
            && !self.is_trusted(ip, user, now)
        {
            return Verdict::Refuse {
                until,
                scope: Scope::User,
            };
        }
        Verdict::Allow
    }

    fn is_trusted(&self, ip: IpAddr, user: &str, now: Instant) -> bool {
        self.trusted
            .get(&(user.to_string(), ip))
            .is_some_and(|t| now.duration_since(*t) <= self.cfg.trusted_for)
    }

    /// Counts a failed authentication; returns the lockouts it started.
    pub fn failure(&mut self, ip: IpAddr, user: &str, now: Instant) -> Vec<Lockout> {
        let cfg = self.cfg.clone();
        let mut out = Vec::new();
        bound(&mut self.by_ip, cfg.max_entries, |c| c.last);
        let c = self.by_ip.entry(ip).or_insert_with(|| Counter::new(now));
        if let Some(cool_off) = c.fail(now, cfg.ip_failures, &cfg) {
            out.push(Lockout {
                scope: Scope::Address,
                ip,
                user: user.to_string(),
                failures: cfg.ip_failures,
                cool_off,
            });
        }
        // A user's own trusted address does not count against the user.
        if !self.is_trusted(ip, user, now) {
            bound(&mut self.by_user, cfg.max_entries, |c| c.last);
            let c = self
                .by_user
                .entry(user.to_string())
                .or_insert_with(|| Counter::new(now));
            if let Some(cool_off) = c.fail(now, cfg.user_failures, &cfg) {
                out.push(Lockout {
                    scope: Scope::User,
                    ip,
                    user: user.to_string(),
                    failures: cfg.user_failures,
                    cool_off,
                });
            }
        }
        out
    }

    /// Records a successful authentication: the address becomes trusted
    /// for the user, and its failure count starts again.
    pub fn success(&mut self, ip: IpAddr, user: &str, now: Instant) {
        bound(&mut self.trusted, self.cfg.max_entries, |t| *t);
        self.trusted.insert((user.to_string(), ip), now);
        if let Some(c) = self.by_ip.get_mut(&ip)
            && c.blocked(now).is_none()
        {
            c.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn an_address_cools_off_after_its_failures_and_doubles() {
        let mut t = AuthThrottle::new(ThrottleConfig::default());
        let t0 = Instant::now();
        for i in 0..9 {
            assert!(t.failure(ip(2), "u@a", t0).is_empty(), "failure {i}");
            assert_eq!(t.check(ip(2), "u@a", t0), Verdict::Allow);
        }
        let l = t.failure(ip(2), "u@a", t0);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].scope, Scope::Address);
        assert_eq!(l[0].cool_off, Duration::from_secs(60));
        assert!(matches!(
            t.check(ip(2), "u@a", t0 + Duration::from_secs(59)),
            Verdict::Refuse {
                scope: Scope::Address,
                ..
            }
        ));
        // Another address of the same user is not affected.
        assert_eq!(t.check(ip(1), "u@a", t0), Verdict::Allow);
        // After the period: allowed; ten more failures: 120 s.
        let t1 = t0 + Duration::from_secs(61);
        assert_eq!(t.check(ip(2), "u@a", t1), Verdict::Allow);
        let mut last = Vec::new();
        for _ in 0..10 {
            last = t.failure(ip(2), "u@a", t1);
        }
        assert_eq!(last[0].cool_off, Duration::from_secs(120));
    }

    #[test]
    fn a_user_guessed_from_many_addresses_still_works_from_its_own() {
        let mut t = AuthThrottle::new(ThrottleConfig::default());
        let t0 = Instant::now();
        t.success(ip(1), "u@a", t0);
        let mut lockouts = Vec::new();
        for i in 0..20u8 {
            lockouts.extend(t.failure(ip(10 + i), "u@a", t0));
        }
        assert!(lockouts.iter().any(|l| l.scope == Scope::User));
        assert!(matches!(
            t.check(ip(99), "u@a", t0),
            Verdict::Refuse {
                scope: Scope::User,
                ..
            }
        ));
        assert_eq!(t.check(ip(1), "u@a", t0), Verdict::Allow);
        // Other users are not affected.
        assert_eq!(t.check(ip(99), "v@a", t0), Verdict::Allow);
    }

    #[test]
    fn memory_is_bounded() {
        let mut t = AuthThrottle::new(ThrottleConfig {
            max_entries: 100,
            ..ThrottleConfig::default()
        });
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let a = IpAddr::from(i.to_be_bytes());
            t.failure(
                a,
                &format!("u{i}@a"),
                t0 + Duration::from_millis(u64::from(i)),
            );
        }
        assert!(t.by_ip.len() <= 100 && t.by_user.len() <= 100);
    }
}
