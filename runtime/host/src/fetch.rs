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
//! - **Pooled connections**: one keep-alive pool per tenant and grant
//!   (HTTP/1.1, or HTTP/2 where the server offers it), reused across
//!   events; tenants never share a connection.
//! - **Client certificates** (mTLS): a grant may name a certificate and a
//!   granted secret holding its key.
//! - **Async**: a request in flight is a parked future, so thousands of
//!   events waiting on slow services hold no thread.
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

/// Timeout when the grant names none, ms.
pub const DEFAULT_TIMEOUT_MS: u32 = 2000;
/// Response cap when the grant names none, bytes.
pub const DEFAULT_MAX_RESPONSE: u32 = 1024 * 1024;
/// Connection pools kept (tenant × grant); the oldest are dropped beyond.
const MAX_POOLS: usize = 4096;
/// Breakers kept for origins that failed lately, at most (beyond it,
/// the expired ones are forgotten, then those not open).
const MAX_BREAKERS: usize = 4096;
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

/// The breaker's trial request: if it ends without an outcome, the
/// trial failed (`done` once its outcome is recorded, or from the start
/// for a request that is not the trial).
struct Pending<'a> {
    fetcher: &'a Fetcher,
    tenant: &'a str,
    origin: &'a str,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Ok(mut b) = self.fetcher.breakers.lock()
            && let Some(entry) = b.get_mut(&(self.tenant.to_string(), self.origin.to_string()))
            && *entry == Breaker::Trying
        {
            entry.record(Instant::now(), false);
        }
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

/// Resolves as usual, then refuses the name if any address it resolves to
/// is one the policy does not permit: the check holds for every address a
/// name resolves to, at connect time.
#[derive(Debug)]
struct GuardedResolver {
    policy: Arc<NetPolicy>,
}

/// A refusal by the private-network guard, told apart from other errors
/// when the client reports it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PrivateRefused(String);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            // One refused address refuses the name: a name that resolves
            // to a public and a private address is not let through on the
            // public one (the next resolution may differ).
            if let Some(a) = all.iter().find(|a| !policy.permits(a.ip())) {
                return Err(
                    Box::new(PrivateRefused(format!("{host} resolves to {}", a.ip())))
                        as Box<dyn std::error::Error + Send + Sync>,
                );
            }
            Ok(Box::new(all.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// What the fetcher is doing, per tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchLoad {
    /// Requests in flight, per tenant that has any.
    pub in_flight: Vec<(String, usize)>,
    /// Origins whose circuit is open or trying, counted per tenant that
    /// has any (the origins themselves are a tenant's own business).
    pub open: Vec<(String, usize)>,
}

/// Outbound HTTP(S) for every tenant: pooled connections per tenant and
/// grant, the operator's [`NetPolicy`] (see the module documentation).
/// Async: a request in flight is a parked future, not a blocked thread.
#[derive(Debug)]
pub struct Fetcher {
    policy: Arc<NetPolicy>,
    pools: Mutex<HashMap<(String, String), reqwest::Client>>,
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

    /// Requests in flight and open circuits per tenant (tenants with none
    /// are left out).
    pub fn load(&self) -> FetchLoad {
        let mut in_flight: Vec<(String, usize)> = self
            .in_flight
            .lock()
            .map(|m| m.iter().map(|(t, n)| (t.clone(), *n)).collect())
            .unwrap_or_default();
        in_flight.sort();
        let mut per_tenant: HashMap<String, usize> = HashMap::new();
        if let Ok(m) = self.breakers.lock() {
            for ((tenant, _), b) in m.iter() {
                if matches!(b, Breaker::Open(_) | Breaker::Trying) {
                    *per_tenant.entry(tenant.clone()).or_default() += 1;
                }
            }
        }
        let mut open: Vec<(String, usize)> = per_tenant.into_iter().collect();
        open.sort();
        FetchLoad { in_flight, open }
    }

    /// [`Fetcher::load`] in the Prometheus text format.
    pub fn encode(&self) -> String {
        use std::fmt::Write as _;
        let FetchLoad { in_flight, open } = self.load();
        let mut out = String::from(
            "# HELP plugboard_tenant_http_in_flight Outbound HTTP requests in flight, per tenant.\n\
             # TYPE plugboard_tenant_http_in_flight gauge\n",
        );
        for (tenant, n) in in_flight {
            let _ = writeln!(
                out,
                "plugboard_tenant_http_in_flight{{tenant=\"{tenant}\"}} {n}"
            );
        }
        // A count, not the origins: the metrics are read without a tenant's
        // credentials, and which services a tenant calls is its own.
        out.push_str(
            "# HELP plugboard_tenant_http_circuits_open Origins whose circuit breaker is open, per tenant.\n\
             # TYPE plugboard_tenant_http_circuits_open gauge\n",
        );
        for (tenant, n) in open {
            let _ = writeln!(
                out,
                "plugboard_tenant_http_circuits_open{{tenant=\"{tenant}\"}} {n}"
            );
        }
        out
    }

    /// [`check`], then [`Fetcher::send`].
    pub async fn fetch(
        &self,
        tenant: &str,
        grant: Option<&HttpGrant>,
        req: FetchRequest,
    ) -> Result<FetchResponse, FetchError> {
        let grant = check(grant, req.method, &req.url)?;
        self.send(tenant, grant, req).await
    }

    /// Counts a request in flight for the tenant, or refuses it beyond
    /// `limit`.
    fn enter(&self, tenant: &str, limit: usize) -> Result<InFlight<'_>, FetchError> {
        let mut m = self
            .in_flight
            .lock()
            .map_err(|_| FetchError::Failed("in-flight counts poisoned".into()))?;
        let n = m.entry(tenant.to_string()).or_insert(0);
        if *n >= limit.max(1) {
            return Err(FetchError::Busy(*n));
        }
        *n += 1;
        Ok(InFlight {
            fetcher: self,
            tenant: tenant.to_string(),
        })
    }

    /// Whether the tenant's breaker for `origin` lets a request go now.
    /// Whether the tenant's breaker for `origin` lets a request go now,
    /// and whether that request is the trial.
    fn breaker_allows(&self, tenant: &str, origin: &str) -> (bool, bool) {
        self.breakers
            .lock()
            .map(|mut b| {
                let entry = b
                    .entry((tenant.to_string(), origin.to_string()))
                    .or_default();
                let before = *entry;
                let allowed = entry.allow(Instant::now());
                (
                    allowed,
                    allowed && before != Breaker::Trying && *entry == Breaker::Trying,
                )
            })
            .unwrap_or((true, false))
    }

    /// Records a request's outcome in the tenant's breaker for `origin`.
    fn breaker_record(&self, tenant: &str, origin: &str, r: &Result<FetchResponse, FetchError>) {
        let ok = match r {
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
        self.breaker_outcome(tenant, origin, ok);
    }

    /// Records an outcome in the tenant's breaker for `origin`. The table
    /// keeps origins that failed lately: closed breakers are dropped, and
    /// past [`MAX_BREAKERS`] so are those whose open time is over.
    fn breaker_outcome(&self, tenant: &str, origin: &str, ok: bool) {
        if let Ok(mut b) = self.breakers.lock() {
            let now = Instant::now();
            let entry = b
                .entry((tenant.to_string(), origin.to_string()))
                .or_default();
            entry.record(now, ok);
            if *entry == Breaker::Closed {
                b.retain(|_, v| *v != Breaker::Closed);
            }
            if b.len() > MAX_BREAKERS {
                // Open ones whose time is over go first, then those only
                // failing (their count starts again).
                b.retain(|_, v| !matches!(v, Breaker::Open(until) if *until <= now));
                if b.len() > MAX_BREAKERS {
                    b.retain(|_, v| !matches!(v, Breaker::Failing(_)));
                }
            }
        }
    }

    /// Sends a request that [`check`] allowed, on the tenant's pooled
    /// connections, with the grant's timeout and response cap, without
    /// following redirects; at most [`TENANT_IN_FLIGHT`] of the tenant's
    /// requests at once.
    pub async fn send(
        &self,
        tenant: &str,
        grant: &HttpGrant,
        req: FetchRequest,
    ) -> Result<FetchResponse, FetchError> {
        self.send_within(tenant, grant, req, TENANT_IN_FLIGHT).await
    }

    /// [`Fetcher::send`] with the tenant's own cap on requests in flight
    /// (a tenant allowed many plugin instances at once may need more).
    pub async fn send_within(
        &self,
        tenant: &str,
        grant: &HttpGrant,
        req: FetchRequest,
        in_flight: usize,
    ) -> Result<FetchResponse, FetchError> {
        let grant_timeout = grant.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        let timeout = req
            .timeout_ms
            .map_or(grant_timeout, |t| t.min(grant_timeout))
            .max(1);
        let cap = grant.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE) as usize;
        let origin = Origin::of_url(&req.url).map_err(FetchError::Invalid)?;
        let https = origin.scheme == Scheme::Https;
        // The client resolves names through the guard; an address written
        // in the URL is never resolved, so it is checked here.
        if let Ok(ip) = origin
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            && !self.policy.permits(ip)
        {
            return Err(FetchError::PrivateAddress(format!("{ip}")));
        }
        let _slot = self.enter(tenant, in_flight)?;
        let origin = origin.to_string();
        // (A grant whose TLS settings are wrong is its error, not the
        // service's: it never reaches the breaker.)
        let client = self.client(tenant, grant)?;
        let (allowed, trial) = self.breaker_allows(tenant, &origin);
        if !allowed {
            return Err(FetchError::CircuitOpen(origin));
        }
        // A trial that ends without an outcome (its caller stopped
        // waiting) counts as failed, so the trial slot is never left
        // taken.
        let mut pending = Pending {
            fetcher: self,
            tenant,
            origin: &origin,
            done: !trial,
        };
        let r = tokio::time::timeout(
            Duration::from_millis(u64::from(timeout)),
            send_now(&client, req, cap, https),
        )
        .await
        .unwrap_or(Err(FetchError::Timeout));
        pending.done = true;
        self.breaker_record(tenant, &origin, &r);
        r
    }

    /// The tenant's connection pool for this grant (its TLS roots and
    /// client certificate).
    fn client(&self, tenant: &str, grant: &HttpGrant) -> Result<reqwest::Client, FetchError> {
        // The pool is per tenant and TLS identity: the roots, the client
        // certificate and (hashed, so the key is not kept twice) its key.
        let key = (
            tenant.to_string(),
            format!(
                "{}\u{0}{}\u{0}{}",
                grant.ca_pem.as_deref().unwrap_or_default(),
                grant.client_cert_pem.as_deref().unwrap_or_default(),
                grant
                    .client_key_pem
                    .as_deref()
                    .map(|k| crate::sha256_hex(k.as_bytes()))
                    .unwrap_or_default()
            ),
        );
        let mut pools = self
            .pools
            .lock()
            .map_err(|_| FetchError::Failed("connection pools poisoned".into()))?;
        if let Some(c) = pools.get(&key) {
            return Ok(c.clone());
        }
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(grant)?)
            .dns_resolver(Arc::new(GuardedResolver {
                policy: self.policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(IDLE_PER_HOST)
            .pool_idle_timeout(Duration::from_secs(90))
            .no_proxy()
            .build()
            .map_err(|e| FetchError::Failed(format!("http client: {e}")))?;
        if pools.len() >= MAX_POOLS {
            pools.clear();
        }
        pools.insert(key, client.clone());
        Ok(client)
    }
}

/// The grant's TLS client configuration: rustls with the ring provider,
/// the grant's CA certificates or the public (webpki) roots, the grant's
/// client certificate if it names one (mTLS), HTTP/2 or HTTP/1.1 by ALPN.
fn tls_config(grant: &HttpGrant) -> Result<rustls::ClientConfig, FetchError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &grant.ca_pem {
        Some(pem) => {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| FetchError::Invalid(format!("http.ca_pem: {e}")))?;
            if certs.is_empty() {
                return Err(FetchError::Invalid(
                    "http.ca_pem holds no certificate".into(),
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| FetchError::Invalid(format!("http.ca_pem: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| FetchError::Tls(e.to_string()))?
    .with_root_certificates(roots);
    let mut config = match (&grant.client_cert_pem, &grant.client_key_pem) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| FetchError::Invalid(format!("http.client_cert_pem: {e}")))?;
            // The key comes from a secret: its text never goes in an error.
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|_| {
                FetchError::Invalid("http.client_key_secret holds no PEM private key".into())
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| FetchError::Invalid(format!("client certificate: {e}")))?
        }
        (Some(_), None) => {
            return Err(FetchError::Invalid(
                "http.client_cert_pem needs client_key_secret (a granted secret)".into(),
            ));
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Sends one request and reads at most `cap` bytes of its body.
async fn send_now(
    client: &reqwest::Client,
    req: FetchRequest,
    cap: usize,
    https: bool,
) -> Result<FetchResponse, FetchError> {
    let method = reqwest::Method::from_bytes(req.method.as_bytes())
        .map_err(|e| FetchError::Invalid(e.to_string()))?;
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in &req.headers {
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| FetchError::Invalid(format!("header {k:?}: {e}")))?;
        let value = reqwest::header::HeaderValue::from_str(v)
            .map_err(|e| FetchError::Invalid(format!("header {k:?}: {e}")))?;
        headers.append(name, value);
    }
    let mut resp = client
        .request(method, req.url.as_str())
        .headers(headers)
        .body(req.body)
        .send()
        .await
        .map_err(|e| map_error(&e, https))?;
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
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(FetchError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| map_error(&e, https))? {
        if body.len() + chunk.len() > cap {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(FetchResponse {
        status,
        headers,
        body,
    })
}

/// Classifies a client error by what is in its chain of causes.
fn map_error(e: &reqwest::Error, https: bool) -> FetchError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut io_invalid_data = None;
    while let Some(c) = cause {
        if let Some(p) = c.downcast_ref::<PrivateRefused>() {
            return FetchError::PrivateAddress(p.0.clone());
        }
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            return FetchError::Tls(t.to_string());
        }
        // An I/O error hides the error it wraps from `source()`, and the
        // client nests them (a TLS failure is an I/O error in an I/O error).
        let mut io = c.downcast_ref::<std::io::Error>();
        while let Some(e) = io {
            if e.kind() == std::io::ErrorKind::InvalidData {
                io_invalid_data = Some(e.to_string());
            }
            let Some(inner) = e.get_ref() else { break };
            if let Some(t) = inner.downcast_ref::<rustls::Error>() {
                return FetchError::Tls(t.to_string());
            }
            if let Some(p) = inner.downcast_ref::<PrivateRefused>() {
                return FetchError::PrivateAddress(p.0.clone());
            }
            io = inner.downcast_ref::<std::io::Error>();
        }
        cause = c.source();
    }
    match io_invalid_data {
        Some(m) if https => FetchError::Tls(m),
        _ if e.is_timeout() => FetchError::Timeout,
        _ => FetchError::Failed(chain_text(e)),
    }
}

/// An error and its causes, `: `-joined (the client's own text is terse).
fn chain_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = c.source();
    }
    text
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

    /// A trial request whose caller stops waiting (a plugin's deadline, a
    /// call that ended) counts as a failed trial: the breaker opens again
    /// instead of failing fast for good.
    #[test]
    fn an_abandoned_trial_does_not_leave_the_breaker_stuck() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async {
            // A service that takes connections and never answers.
            let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let port = silent.local_addr().map(|a| a.port()).unwrap_or_default();
            let f = Fetcher::new(
                NetPolicy::allowing(&["127.0.0.1/32".into()]).unwrap_or_else(|e| panic!("{e}")),
            );
            let origin = format!("http://127.0.0.1:{port}");
            let key = ("t".to_string(), origin.clone());
            // Its open time is over: the next request is the trial.
            let past = Instant::now();
            f.breakers
                .lock()
                .unwrap_or_else(|e| panic!("{e}"))
                .insert(key.clone(), Breaker::Open(past));
            let grant = HttpGrant {
                allow: vec![origin.clone()],
                ..HttpGrant::default()
            };
            let trial = f.send("t", &grant, FetchRequest::get(&format!("{origin}/x")));
            let gave_up = tokio::time::timeout(Duration::from_millis(200), trial).await;
            assert!(gave_up.is_err(), "the silent service answered");
            let state = f.breakers.lock().unwrap_or_else(|e| panic!("{e}"))[&key];
            assert!(
                matches!(state, Breaker::Open(until) if until > past),
                "{state:?}"
            );
            // A caller giving up on a healthy origin is no failure of it.
            let other = format!("http://localhost:{port}");
            let grant = HttpGrant {
                allow: vec![other.clone()],
                ..HttpGrant::default()
            };
            let req = f.send("t", &grant, FetchRequest::get(&format!("{other}/x")));
            assert!(
                tokio::time::timeout(Duration::from_millis(200), req)
                    .await
                    .is_err()
            );
            let kept = f.breakers.lock().unwrap_or_else(|e| panic!("{e}"));
            assert!(
                kept.get(&("t".to_string(), other))
                    .is_none_or(|b| *b == Breaker::Closed),
                "{kept:?}"
            );
            drop(kept);
            drop(silent);
        });
    }

    #[test]
    fn a_tenant_has_a_bounded_number_of_requests_in_flight() {
        let f = Fetcher::new(NetPolicy::default());
        let held: Vec<InFlight<'_>> = (0..TENANT_IN_FLIGHT)
            .map(|_| {
                f.enter("a", TENANT_IN_FLIGHT)
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        assert_eq!(
            f.enter("a", TENANT_IN_FLIGHT).map(|_| ()),
            Err(FetchError::Busy(TENANT_IN_FLIGHT))
        );
        // Another tenant is not held back.
        assert!(f.enter("b", TENANT_IN_FLIGHT).is_ok());
        drop(held);
        assert!(f.enter("a", TENANT_IN_FLIGHT).is_ok());
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
