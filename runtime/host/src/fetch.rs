//! Outbound HTTP and HTTPS on a tenant's behalf, always through an `http`
//! grant: the plugins' `http` import and the media URLs a flow asks a
//! channel to play use this one path ([`Fetcher`]), so both get the same
//! allow-list of origins, timeout, size cap, refusal of redirects (a
//! redirect is answered to the caller, never followed, so it cannot lead
//! outside the allow-list) and private-network guard.
//!
//! - **HTTPS** with rustls: the public (webpki) roots, or the CA
//!   certificates the grant names (`ca_pem`) for a service with a private
//!   CA. A certificate the client cannot verify is a [`FetchError::Tls`].
//! - **Pooled connections**: one keep-alive pool per tenant and grant,
//!   reused across events; tenants never share a connection.
//! - **Private-network guard** ([`NetPolicy`]): every address a host name
//!   resolves to is checked after resolution, so an allowed name that
//!   points at loopback, a private, link-local, shared or metadata address
//!   is refused unless the operator allowed that network.
//! - **Methods and paths**: a grant may name the methods and path
//!   prefixes it allows (dot segments that could climb out are refused).
//! - **Fair shares**: a tenant has at most [`TENANT_IN_FLIGHT`] requests in
//!   flight (more fail at once with [`FetchError::Busy`]), and a circuit
//!   breaker per tenant and origin ([`Breaker`]) fails requests fast for a
//!   while after repeated failures, so one dead CRM does not tie up a
//!   tenant's events waiting on timeouts.

use plugboard_core::{HttpGrant, Origin, Scheme, path_within, url_path};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ureq::config::Config;
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// Timeout when the grant names none, ms.
pub const DEFAULT_TIMEOUT_MS: u32 = 2000;
/// Response cap when the grant names none, bytes.
pub const DEFAULT_MAX_RESPONSE: u32 = 1024 * 1024;
/// Connection pools kept (tenant × grant); the oldest are dropped beyond.
const MAX_POOLS: usize = 4096;
/// Idle connections kept per host in a pool.
const IDLE_PER_HOST: usize = 8;
/// Requests one tenant may have in flight at once, over all its plugins
/// and hosts.
pub const TENANT_IN_FLIGHT: usize = 32;
/// Failures in a row (no answer, or 5xx) after which an origin's circuit
/// opens for a tenant.
pub const BREAKER_FAILURES: u32 = 5;
/// How long an open circuit fails requests fast before one is tried.
pub const BREAKER_OPEN: Duration = Duration::from_secs(30);

/// Why a fetch was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// No `http` grant, or the URL's origin is not in its allow-list.
    #[error("not granted: {0}")]
    NotGranted(String),
    /// The host resolves to an address the operator does not let tenants
    /// reach (loopback, private, link-local, metadata, …).
    #[error("private address refused: {0}")]
    PrivateAddress(String),
    /// The URL or request is malformed.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The grant's timeout passed.
    #[error("timed out")]
    Timeout,
    /// The response is larger than the grant allows.
    #[error("response too large")]
    TooLarge,
    /// The TLS handshake failed (the certificate is not trusted, expired,
    /// for another name, …).
    #[error("tls: {0}")]
    Tls(String),
    /// Anything else (connection refused, protocol error, …).
    #[error("failed: {0}")]
    Failed(String),
    /// The tenant already has [`TENANT_IN_FLIGHT`] requests in flight.
    #[error("busy: {0} requests of this tenant are in flight")]
    Busy(usize),
    /// The origin failed [`BREAKER_FAILURES`] times in a row: requests to
    /// it fail fast until the circuit tries again.
    #[error("circuit open: {0} failed repeatedly; retried after a pause")]
    CircuitOpen(String),
}

impl FetchError {
    /// A stable code for records and metrics: `not_granted`,
    /// `private_address`, `invalid`, `timeout`, `too_large`, `tls`,
    /// `failed`.
    pub fn code(&self) -> &'static str {
        match self {
            FetchError::NotGranted(_) => "not_granted",
            FetchError::PrivateAddress(_) => "private_address",
            FetchError::Invalid(_) => "invalid",
            FetchError::Timeout => "timeout",
            FetchError::TooLarge => "too_large",
            FetchError::Tls(_) => "tls",
            FetchError::Failed(_) => "failed",
            FetchError::Busy(_) => "busy",
            FetchError::CircuitOpen(_) => "circuit_open",
        }
    }
}

/// An HTTP request to send.
#[derive(Debug, Clone, Default)]
pub struct FetchRequest {
    /// `GET`, `POST`, `PUT`, `PATCH`, `DELETE` or `HEAD`.
    pub method: &'static str,
    /// An `http://` or `https://` URL.
    pub url: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// A shorter timeout than the grant's, ms.
    pub timeout_ms: Option<u32>,
}

impl FetchRequest {
    /// A plain `GET` of `url`.
    pub fn get(url: &str) -> Self {
        FetchRequest {
            method: "GET",
            url: url.to_string(),
            ..FetchRequest::default()
        }
    }
}

/// An HTTP response (any status; redirects are returned, not followed).
#[derive(Debug, Clone)]
pub struct FetchResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body, at most the grant's cap.
    pub body: Vec<u8>,
}

/// Checks a request against a grant: the grant if the URL's origin is in
/// its allow-list and the method and path are within its limits, else
/// `NotGranted` (also when there is no grant).
pub fn check<'g>(
    grant: Option<&'g HttpGrant>,
    method: &str,
    url: &str,
) -> Result<&'g HttpGrant, FetchError> {
    let Some(grant) = grant else {
        return Err(FetchError::NotGranted("http".into()));
    };
    let origin = Origin::of_url(url).map_err(FetchError::Invalid)?;
    if !grant
        .allow
        .iter()
        .filter_map(|a| Origin::of_allow_entry(a).ok())
        .any(|a| a == origin)
    {
        return Err(FetchError::NotGranted(format!("http to {origin}")));
    }
    if !grant.methods.is_empty() && !grant.methods.iter().any(|m| m == method) {
        return Err(FetchError::NotGranted(format!("{method} to {origin}")));
    }
    let path = url_path(url).unwrap_or("/");
    if !grant.paths.is_empty() && !grant.paths.iter().any(|p| path_within(path, p)) {
        return Err(FetchError::NotGranted(format!("path {path} on {origin}")));
    }
    Ok(grant)
}

/// A circuit breaker for one tenant's requests to one origin, sans-IO
/// (time passed in): closed until [`BREAKER_FAILURES`] failures in a row,
/// then open for [`BREAKER_OPEN`] (requests fail fast), then half-open
/// (one request is let through; its success closes the circuit, its
/// failure opens it again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Breaker {
    /// Requests go through; failures in a row so far.
    #[default]
    Closed,
    /// Failures in a row, below the limit.
    Failing(u32),
    /// Requests fail fast until then.
    Open(Instant),
    /// One trial request is in flight.
    Trying,
}

impl Breaker {
    /// Whether a request may go now (taking the trial slot when the open
    /// time is over).
    pub fn allow(&mut self, now: Instant) -> bool {
        match *self {
            Breaker::Closed | Breaker::Failing(_) => true,
            Breaker::Open(until) if now >= until => {
                *self = Breaker::Trying;
                true
            }
            Breaker::Open(_) | Breaker::Trying => false,
        }
    }

    /// A request's outcome: `ok` unless it got no answer or a 5xx.
    pub fn record(&mut self, now: Instant, ok: bool) {
        *self = match (*self, ok) {
            (_, true) => Breaker::Closed,
            (Breaker::Closed, false) => Breaker::Failing(1),
            (Breaker::Failing(n), false) if n + 1 < BREAKER_FAILURES => Breaker::Failing(n + 1),
            (Breaker::Failing(_) | Breaker::Trying, false) => Breaker::Open(now + BREAKER_OPEN),
            // A late outcome while open changes nothing.
            (open @ Breaker::Open(_), false) => open,
        };
    }
}

/// A tenant's request in flight: counted until dropped.
struct InFlight<'a> {
    fetcher: &'a Fetcher,
    tenant: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.fetcher.in_flight.lock()
            && let Some(n) = m.get_mut(&self.tenant)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.tenant);
            }
        }
    }
}

/// The networks tenants may reach besides the public internet: nothing
/// by default; the operator adds networks (the demo adds 127.0.0.1 for its
/// MIS) in the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPolicy {
    allowed: Vec<ipnet::IpNet>,
}

impl NetPolicy {
    /// A policy allowing these networks (`127.0.0.1/32`, `10.1.0.0/16`,
    /// or a single address).
    pub fn allowing(networks: &[String]) -> Result<NetPolicy, FetchError> {
        let allowed = networks
            .iter()
            .map(|n| {
                n.parse::<ipnet::IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| FetchError::Invalid(format!("{n:?} is not a network")))
            })
            .collect::<Result<_, _>>()?;
        Ok(NetPolicy { allowed })
    }

    /// True if a tenant's request may go to `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.allowed.iter().any(|n| n.contains(&ip))
    }
}

/// Loopback, private, link-local (cloud metadata), shared, multicast,
/// unspecified, reserved and IPv4-in-IPv6 forms of them.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared (CGNAT)
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240 // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            // NAT64 (64:ff9b::/96) reaches the IPv4 address inside.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = seg[6].to_be_bytes();
                let [c, d] = seg[7].to_be_bytes();
                return is_internal(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
        }
    }
}

/// Resolves as usual, then keeps only the addresses the policy permits:
/// the check holds for every address a name resolves to, at connect time.
#[derive(Debug)]
struct GuardedResolver {
    policy: Arc<NetPolicy>,
    inner: DefaultResolver,
}

/// The message a refused resolution carries, to tell it from other I/O
/// errors.
const PRIVATE: &str = "plugboard: private address refused";

impl Resolver for GuardedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let all = self.inner.resolve(uri, config, timeout)?;
        let mut kept = self.inner.empty();
        let mut refused: Option<SocketAddr> = None;
        for a in all.iter().copied() {
            if self.policy.permits(a.ip()) {
                kept.push(a);
            } else {
                refused = Some(a);
            }
        }
        match refused {
            // One refused address refuses the name: a name that resolves
            // to a public and a private address is not let through on the
            // public one (the next resolution may differ).
            Some(a) => Err(ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{PRIVATE}: {} resolves to {}",
                    uri.host().unwrap_or(""),
                    a.ip()
                ),
            ))),
            None => Ok(kept),
        }
    }
}

/// Outbound HTTP(S) for every tenant: pooled connections per tenant and
/// grant, the operator's [`NetPolicy`] (see the module documentation).
#[derive(Debug)]
pub struct Fetcher {
    policy: Arc<NetPolicy>,
    pools: Mutex<HashMap<(String, String), ureq::Agent>>,
    /// Requests in flight per tenant.
    in_flight: Mutex<HashMap<String, usize>>,
    /// Circuit breakers per tenant and origin.
    breakers: Mutex<HashMap<(String, String), Breaker>>,
}

impl Fetcher {
    /// A fetcher enforcing `policy`.
    pub fn new(policy: NetPolicy) -> Fetcher {
        Fetcher {
            policy: Arc::new(policy),
            pools: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
        }
    }

    /// The operator's policy.
    pub fn policy(&self) -> &NetPolicy {
        &self.policy
    }

    /// [`check`], then [`Fetcher::send`].
    pub fn fetch(
        &self,
        tenant: &str,
        grant: Option<&HttpGrant>,
        req: FetchRequest,
    ) -> Result<FetchResponse, FetchError> {
        let grant = check(grant, req.method, &req.url)?;
        self.send(tenant, grant, req)
    }

    /// Counts a request in flight for the tenant, or refuses it.
    fn enter(&self, tenant: &str) -> Result<InFlight<'_>, FetchError> {
        let mut m = self
            .in_flight
            .lock()
            .map_err(|_| FetchError::Failed("in-flight counts poisoned".into()))?;
        let n = m.entry(tenant.to_string()).or_insert(0);
        if *n >= TENANT_IN_FLIGHT {
            return Err(FetchError::Busy(*n));
        }
        *n += 1;
        Ok(InFlight {
            fetcher: self,
            tenant: tenant.to_string(),
        })
    }

    /// Runs `f` under the tenant's breaker for `origin`.
    fn guarded(
        &self,
        tenant: &str,
        origin: &str,
        f: impl FnOnce() -> Result<FetchResponse, FetchError>,
    ) -> Result<FetchResponse, FetchError> {
        let key = (tenant.to_string(), origin.to_string());
        let allowed = self
            .breakers
            .lock()
            .map(|mut b| b.entry(key.clone()).or_default().allow(Instant::now()))
            .unwrap_or(true);
        if !allowed {
            return Err(FetchError::CircuitOpen(origin.to_string()));
        }
        let r = f();
        let ok = match &r {
            Ok(resp) => resp.status < 500,
            // The service answered, or never was asked.
            Err(
                FetchError::TooLarge
                | FetchError::Invalid(_)
                | FetchError::NotGranted(_)
                | FetchError::PrivateAddress(_),
            ) => true,
            Err(_) => false,
        };
        if let Ok(mut b) = self.breakers.lock() {
            let entry = b.entry(key).or_default();
            entry.record(Instant::now(), ok);
            if *entry == Breaker::Closed {
                b.retain(|_, v| *v != Breaker::Closed);
            }
        }
        r
    }

    /// Sends a request that [`check`] allowed, on the tenant's pooled
    /// connections, with the grant's timeout and response cap, without
    /// following redirects. Blocks: call it on a blocking thread.
    pub fn send(
        &self,
        tenant: &str,
        grant: &HttpGrant,
        req: FetchRequest,
    ) -> Result<FetchResponse, FetchError> {
        let grant_timeout = grant.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        let timeout = req
            .timeout_ms
            .map_or(grant_timeout, |t| t.min(grant_timeout))
            .max(1);
        let cap = u64::from(grant.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE));
        let origin = Origin::of_url(&req.url).map_err(FetchError::Invalid)?;
        let https = origin.scheme == Scheme::Https;
        let _slot = self.enter(tenant)?;
        self.guarded(tenant, &origin.to_string(), || {
            self.send_now(tenant, grant, req, timeout, cap, https)
        })
    }

    fn send_now(
        &self,
        tenant: &str,
        grant: &HttpGrant,
        req: FetchRequest,
        timeout: u32,
        cap: u64,
        https: bool,
    ) -> Result<FetchResponse, FetchError> {
        let agent = self.agent(tenant, grant)?;
        let mut builder = ureq::http::Request::builder()
            .method(req.method)
            .uri(req.url.as_str());
        for (k, v) in &req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let request = builder
            .body(req.body)
            .map_err(|e| FetchError::Invalid(e.to_string()))?;
        let request = agent
            .configure_request(request)
            .timeout_global(Some(Duration::from_millis(u64::from(timeout))))
            .build();
        let mut resp = agent.run(request).map_err(|e| map_ureq(e, https))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = resp
            .body_mut()
            .with_config()
            .limit(cap)
            .read_to_vec()
            .map_err(|e| map_ureq(e, https))?;
        Ok(FetchResponse {
            status,
            headers,
            body,
        })
    }

    /// The tenant's connection pool for this grant (its TLS roots).
    fn agent(&self, tenant: &str, grant: &HttpGrant) -> Result<ureq::Agent, FetchError> {
        let key = (tenant.to_string(), grant.ca_pem.clone().unwrap_or_default());
        let mut pools = self
            .pools
            .lock()
            .map_err(|_| FetchError::Failed("connection pools poisoned".into()))?;
        if let Some(a) = pools.get(&key) {
            return Ok(a.clone());
        }
        let roots = match &grant.ca_pem {
            Some(pem) => {
                let certs = ureq::tls::parse_pem(pem.as_bytes())
                    .filter_map(|item| match item {
                        Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                    .collect::<Result<Vec<Certificate<'static>>, _>>()
                    .map_err(|e| FetchError::Invalid(format!("http.ca_pem: {e}")))?;
                if certs.is_empty() {
                    return Err(FetchError::Invalid(
                        "http.ca_pem holds no certificate".into(),
                    ));
                }
                RootCerts::new_with_certs(&certs)
            }
            None => RootCerts::WebPki,
        };
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .max_idle_connections_per_host(IDLE_PER_HOST)
            .tls_config(TlsConfig::builder().root_certs(roots).build())
            .build();
        let agent = ureq::Agent::with_parts(
            config,
            DefaultConnector::default(),
            GuardedResolver {
                policy: self.policy.clone(),
                inner: DefaultResolver::default(),
            },
        );
        if pools.len() >= MAX_POOLS {
            pools.clear();
        }
        pools.insert(key, agent.clone());
        Ok(agent)
    }
}

fn map_ureq(e: ureq::Error, https: bool) -> FetchError {
    match e {
        ureq::Error::Timeout(_) => FetchError::Timeout,
        ureq::Error::BodyExceedsLimit(_) => FetchError::TooLarge,
        ureq::Error::Io(io)
            if io.kind() == std::io::ErrorKind::PermissionDenied
                && io.to_string().starts_with(PRIVATE) =>
        {
            let why = io.to_string();
            FetchError::PrivateAddress(why[PRIVATE.len()..].trim_start_matches(": ").to_string())
        }
        ureq::Error::Tls(m) => FetchError::Tls(m.to_string()),
        ureq::Error::Rustls(e) => FetchError::Tls(e.to_string()),
        // rustls reports a bad certificate as an I/O error of the stream.
        ureq::Error::Io(io) if https && io.kind() == std::io::ErrorKind::InvalidData => {
            FetchError::Tls(io.to_string())
        }
        other => FetchError::Failed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_origin() {
        let g = HttpGrant {
            allow: vec!["crm:80".into(), "https://api.example.com".into()],
            ..HttpGrant::default()
        };
        assert!(check(Some(&g), "GET", "http://crm/a").is_ok());
        assert!(check(Some(&g), "GET", "https://API.example.com/v1").is_ok());
        // Same host, another scheme or port: not granted.
        assert!(check(Some(&g), "GET", "http://api.example.com/v1").is_err());
        assert!(check(Some(&g), "GET", "https://crm/a").is_err());
        assert_eq!(
            check(Some(&g), "GET", "http://127.0.0.1:8080/").map(|_| ()),
            Err(FetchError::NotGranted(
                "http to http://127.0.0.1:8080".into()
            ))
        );
        assert_eq!(
            check(None, "GET", "http://crm/")
                .map(|_| ())
                .map_err(|e| e.code()),
            Err("not_granted")
        );
        assert_eq!(
            check(Some(&g), "GET", "ftp://crm/")
                .map(|_| ())
                .map_err(|e| e.code()),
            Err("invalid")
        );
    }

    #[test]
    fn a_grant_limits_methods_and_paths() {
        let g = HttpGrant {
            allow: vec!["https://crm.example.com".into()],
            methods: vec!["GET".into()],
            paths: vec!["/api/customers".into()],
            ..HttpGrant::default()
        };
        let url = "https://crm.example.com/api/customers/7?x=1";
        assert!(check(Some(&g), "GET", url).is_ok());
        assert_eq!(
            check(Some(&g), "DELETE", url).map(|_| ()),
            Err(FetchError::NotGranted(
                "DELETE to https://crm.example.com:443".into()
            ))
        );
        for bad in [
            "https://crm.example.com/api/orders",
            "https://crm.example.com/api/customers/../orders",
            "https://crm.example.com/",
        ] {
            assert_eq!(
                check(Some(&g), "GET", bad)
                    .map_err(|e| e.code())
                    .map(|_| ()),
                Err("not_granted"),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_tries_again_later() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        // Failures with a success between them do not add up.
        for _ in 0..BREAKER_FAILURES - 1 {
            assert!(b.allow(t0));
            b.record(t0, false);
        }
        b.record(t0, true);
        assert_eq!(b, Breaker::Closed);
        for _ in 0..BREAKER_FAILURES {
            assert!(b.allow(t0));
            b.record(t0, false);
        }
        assert_eq!(b, Breaker::Open(t0 + BREAKER_OPEN));
        assert!(!b.allow(t0 + BREAKER_OPEN / 2), "fails fast while open");
        // After the pause one trial goes; others wait for its outcome.
        let later = t0 + BREAKER_OPEN;
        assert!(b.allow(later));
        assert!(!b.allow(later));
        b.record(later, false);
        assert_eq!(b, Breaker::Open(later + BREAKER_OPEN), "failed: open again");
        let again = later + BREAKER_OPEN;
        assert!(b.allow(again));
        b.record(again, true);
        assert_eq!(b, Breaker::Closed);
        assert!(b.allow(again));
    }

    #[test]
    fn a_tenant_has_a_bounded_number_of_requests_in_flight() {
        let f = Fetcher::new(NetPolicy::default());
        let held: Vec<InFlight<'_>> = (0..TENANT_IN_FLIGHT)
            .map(|_| f.enter("a").unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert_eq!(
            f.enter("a").map(|_| ()),
            Err(FetchError::Busy(TENANT_IN_FLIGHT))
        );
        // Another tenant is not held back.
        assert!(f.enter("b").is_ok());
        drop(held);
        assert!(f.enter("a").is_ok());
    }

    #[test]
    fn internal_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(
                is_internal(a.parse().unwrap_or_else(|_| panic!("{a}"))),
                "{a}"
            );
        }
        for a in [
            "93.184.215.14",
            "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
            "64:ff9b::5db8:d70e",
        ] {
            assert!(
                !is_internal(a.parse().unwrap_or_else(|_| panic!("{a}"))),
                "{a}"
            );
        }
        let p =
            NetPolicy::allowing(&["127.0.0.1".into(), "10.1.0.0/16".into()]).unwrap_or_default();
        assert!(p.permits("127.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        assert!(p.permits("10.1.9.9".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        assert!(!p.permits("10.2.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        assert!(!p.permits("127.0.0.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        assert!(NetPolicy::allowing(&["nope".into()]).is_err());
    }
}
