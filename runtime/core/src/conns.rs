//! Open connections, bounded in all and per peer address: one guard for
//! every server that accepts connections from the network (SIP over TCP,
//! web chat, SMTP), so that one host cannot take every place.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its address has as many connections open as one may.
    #[error("too many connections from this address (at most {0})")]
    FromAddress(usize),
    /// The server has as many connections open as it may.
    #[error("too many connections (at most {0})")]
    InAll(usize),
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Counts of open connections with their bounds; cheap to clone (the
/// clones share the counts).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    counts: Arc<Mutex<Counts>>,
    max_total: usize,
    max_per_ip: usize,
}

impl ConnectionLimits {
    /// At most `max_total` connections open at once, `max_per_ip` of them
    /// from one address.
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        ConnectionLimits {
            counts: Arc::default(),
            max_total,
            max_per_ip,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `ip`: its place is held until the slot is
    /// dropped.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnectionSlot, Refused> {
        let mut c = self.lock();
        if c.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            return Err(Refused::FromAddress(self.max_per_ip));
        }
        if c.total >= self.max_total {
            return Err(Refused::InAll(self.max_total));
        }
        c.total += 1;
        *c.per_ip.entry(ip).or_default() += 1;
        Ok(ConnectionSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    /// Addresses with a connection open now.
    pub fn addresses(&self) -> usize {
        self.lock().per_ip.len()
    }

    /// The bound on connections open at once.
    pub fn max_total(&self) -> usize {
        self.max_total
    }
}

/// An admitted connection's place, given back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: ConnectionLimits,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.limits.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_per_address_and_in_all_and_given_back() {
        let limits = ConnectionLimits::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        let a1 = limits.admit(a).unwrap();
        let a2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refused::FromAddress(2));
        let b1 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Refused::InAll(3));
        assert_eq!((limits.open(), limits.addresses()), (3, 2));
        drop(a1);
        let b2 = limits.admit(b).unwrap();
        drop((a2, b1, b2));
        assert_eq!(
            (limits.open(), limits.addresses()),
            (0, 0),
            "nothing left behind"
        );
        assert!(limits.admit(a).is_ok());
    }
}
