//! The RTP port pool: even ports for RTP, the odd one above for RTCP.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// Returns its port to the pool when dropped.
struct PortGuard {
    port: u16,
    pool: Arc<Mutex<VecDeque<u16>>>,
}

impl Drop for PortGuard {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pool.lock() {
            p.push_back(self.port);
        }
    }
}

/// A bound RTP/RTCP pair, not yet registered with a runtime: it is handed
/// to the media runtime, which registers it there.
pub struct PortPair {
    rtp: std::net::UdpSocket,
    rtcp: std::net::UdpSocket,
    /// The RTP port.
    pub port: u16,
    guard: PortGuard,
}

impl PortPair {
    /// A second handle on the RTP socket (for the media clock's sends).
    pub fn try_clone_rtp(&self) -> std::io::Result<std::net::UdpSocket> {
        self.rtp.try_clone()
    }

    /// Registers the sockets with the current tokio runtime.
    pub fn register(self) -> std::io::Result<MediaSockets> {
        Ok(MediaSockets {
            rtp: UdpSocket::from_std(self.rtp)?,
            rtcp: UdpSocket::from_std(self.rtcp)?,
            port: self.port,
            _guard: self.guard,
        })
    }
}

/// A pair of sockets in use by a call; the ports go back to the pool on drop.
pub struct MediaSockets {
    /// RTP.
    pub rtp: UdpSocket,
    /// RTCP.
    pub rtcp: UdpSocket,
    /// The RTP port.
    pub port: u16,
    _guard: PortGuard,
}

/// Free even ports of the configured range.
#[derive(Clone)]
pub struct PortPool {
    ip: IpAddr,
    free: Arc<Mutex<VecDeque<u16>>>,
}

impl PortPool {
    /// All even ports in `lo..=hi` whose odd neighbour is also in range.
    pub fn new(ip: IpAddr, lo: u16, hi: u16) -> PortPool {
        let start = lo + lo % 2;
        let free = (start..hi).step_by(2).collect();
        PortPool {
            ip,
            free: Arc::new(Mutex::new(free)),
        }
    }

    /// Number of free ports.
    pub fn available(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Binds the next free pair (ports taken by other programs are skipped
    /// and returned to the end of the queue).
    pub fn take(&self) -> Option<PortPair> {
        let n = self.available();
        for _ in 0..n {
            let port = self.free.lock().ok()?.pop_front()?;
            let bind = |p: u16| {
                std::net::UdpSocket::bind(SocketAddr::new(self.ip, p))
                    .and_then(|s| s.set_nonblocking(true).map(|_| s))
            };
            match (bind(port), bind(port + 1)) {
                (Ok(rtp), Ok(rtcp)) => {
                    return Some(PortPair {
                        rtp,
                        rtcp,
                        port,
                        guard: PortGuard {
                            port,
                            pool: self.free.clone(),
                        },
                    });
                }
                _ => {
                    if let Ok(mut f) = self.free.lock() {
                        f.push_back(port);
                    }
                }
            }
        }
        None
    }
}
