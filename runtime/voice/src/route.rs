//! Where a call goes: dial targets (a SIP URI, a tenant's SIP user, a
//! number through the tenant's trunk) resolved to a request URI, a peer
//! and credentials. Store reads and DNS happen here, in the call's task,
//! never on the SIP loop.

use plugboard_engine::Engine;
use plugboard_sip::{Peer, Transport};

/// Digest user name and password for a trunk.
pub(crate) type Credentials = (String, String);

/// The trunk a dial goes through.
pub(crate) struct TrunkUsed {
    /// Its name (for usage).
    pub name: String,
    /// Fax calls through it ask for T.38.
    pub t38: bool,
}

/// Where a dial goes: the request URI, the peer, the trunk's
/// credentials, and the trunk.
pub(crate) type Resolved = (String, Peer, Option<Credentials>, Option<TrunkUsed>);

/// Where a dial target goes: a SIP URI directly, a number through the
/// tenant's `default` trunk (or its only one), with the trunk's
/// credentials.
///
/// A SIP URI whose host is the tenant's id is one of the tenant's SIP
/// users (its address of record, `sip:alice@acme`): the call goes to the
/// contact the user's phone registered last, on whichever node it
/// registered (registrations are in the shared store).
pub(crate) async fn resolve(
    app: &Engine,
    tenant: &str,
    target: &str,
) -> Result<Resolved, (u16, String)> {
    let mut target = target.to_string();
    if target.starts_with("sip:")
        && let Ok(aor) = plugboard_sip::Uri::parse(&target)
        && aor.host.eq_ignore_ascii_case(tenant)
        && let Some(user) = aor.user_unescaped()
    {
        let bindings = app
            .bindings(tenant, &user)
            .await
            .map_err(|e| (500, format!("registration lookup failed: {e}")))?;
        let newest = bindings
            .iter()
            .max_by_key(|b| b.expires_ms)
            .ok_or((480, format!("{user} is not registered")))?;
        target = newest.contact.clone();
    }
    let target = target.as_str();
    let (uri, hostport, creds, transport, trunk) = if target.starts_with("sip:") {
        let u = plugboard_sip::Uri::parse(target).map_err(|e| (400, e.to_string()))?;
        let transport = match u.param("transport").flatten() {
            Some(t) if t.eq_ignore_ascii_case("tcp") => "tcp",
            _ => "udp",
        };
        let hp = format!("{}:{}", u.host, u.port.unwrap_or(5060));
        (target.to_string(), hp, None, transport.to_string(), None)
    } else {
        let number: String = target
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == '+' || *c == '*' || *c == '#')
            .collect();
        if number.is_empty() {
            return Err((400, format!("{target:?} is neither a number nor a SIP URI")));
        }
        let trunks = app
            .trunks(tenant)
            .await
            .map_err(|e| (500, format!("trunk lookup failed: {e}")))?;
        let trunk = trunks
            .iter()
            .find(|t| t.name == "default")
            .or(trunks.first())
            .ok_or((
                503,
                "the tenant has no trunk for outbound calls".to_string(),
            ))?;
        let creds = match (&trunk.username, &trunk.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            _ => None,
        };
        (
            format!("sip:{number}@{}", trunk.host),
            trunk.host.clone(),
            creds,
            trunk.transport.clone(),
            Some(TrunkUsed {
                name: trunk.name.clone(),
                t38: trunk.t38,
            }),
        )
    };
    let transport = if transport.eq_ignore_ascii_case("tcp") {
        Transport::Tcp
    } else {
        Transport::Udp
    };
    // DNS off the SIP loop (the caller is a call task).
    let addr = tokio::net::lookup_host(hostport.as_str())
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or((404, format!("cannot resolve {hostport}")))?;
    Ok((uri, Peer { addr, transport }, creds, trunk))
}
