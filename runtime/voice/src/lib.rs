//! Plugboard's voice channel.
//!
//! A customer dials a tenant's number; the SIP endpoint ([`endpoint`])
//! answers over UDP or TCP, matches the Request-URI user part (with or
//! without a leading `+`) to a tenant's voice address, negotiates G.711
//! and telephone-event, and hands the call to a call task ([`call`]) that
//! runs the tenant's flow on real RTP media: it speaks (espeak-ng), plays
//! tones and WAV, collects DTMF (RFC 4733, SIP INFO, in-band), records to
//! WAV, parks callers with music on hold, and hangs up. An agent is rung on
//! their SIP phone or on their browser softphone ([`plugboard_webrtc`]). Every call leaves
//! an interaction record with its timeline. Every call's RTP leaves on
//! time from the media clock threads ([`clock`]).
//!
//! A call to a tenant's fax number is answered by a T.30 fax terminal
//! instead of a flow ([`call`]'s `fax` module), and faxes the tenant sends
//! leave as calls through its trunk (the fax channel's courier).
//!
//! The protocol engines are sans-IO ([`plugboard_sip`],
//! [`plugboard_media`]); this crate is the thin tokio layer around them.

pub mod call;
pub mod clock;
pub mod endpoint;
pub mod ivr;
mod meter;
mod ports;
mod route;
mod signal;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use plugboard_engine::Engine;

pub use endpoint::VoiceHandle;

/// Settings of the voice channel.
#[derive(Debug, Clone)]
pub struct VoiceConfig {
    /// Where SIP listens (UDP and TCP on the same port).
    pub sip: SocketAddr,
    /// RTP ports (inclusive; even ports carry RTP, the next odd one RTCP).
    pub rtp_ports: (u16, u16),
    /// The address put in SDP and Contact (default: the SIP address, or
    /// 127.0.0.1 when SIP listens on all interfaces).
    pub public_ip: Option<IpAddr>,
    /// Ring for this long (180 Ringing) before answering.
    pub answer_delay: Duration,
    /// The espeak-ng program.
    pub espeak: PathBuf,
    /// Hang up a call that has sent no RTP for this long (not on hold).
    pub rtp_timeout: Duration,
    /// Longest call.
    pub max_call: Duration,
    /// Offer MD5 before SHA-256 in digest challenges (for phones that
    /// only read the first challenge).
    pub digest_md5_first: bool,
    /// Offer MD5 alone (for phones that refuse a request when any
    /// challenge names an algorithm they lack).
    pub digest_md5_only: bool,
    /// Call legs this node takes at once, across tenants (default: one
    /// per pair of RTP ports); more than the RTP range holds is refused
    /// at start.
    pub max_calls: Option<usize>,
    /// The programs fax documents go through (Ghostscript, tiff2pdf).
    pub fax_tools: plugboard_fax::document::Tools,
}

impl Default for VoiceConfig {
    fn default() -> VoiceConfig {
        VoiceConfig {
            sip: SocketAddr::from(([127, 0, 0, 1], 5060)),
            rtp_ports: (20000, 23999),
            public_ip: None,
            answer_delay: Duration::ZERO,
            espeak: PathBuf::from("espeak-ng"),
            rtp_timeout: Duration::from_secs(60),
            max_call: Duration::from_secs(4 * 3600),
            digest_md5_first: false,
            digest_md5_only: false,
            max_calls: None,
            fax_tools: plugboard_fax::document::Tools::default(),
        }
    }
}

impl VoiceConfig {
    /// The address we advertise.
    pub fn advertised_ip(&self) -> IpAddr {
        match self.public_ip {
            Some(ip) => ip,
            None if self.sip.ip().is_unspecified() => IpAddr::from([127, 0, 0, 1]),
            None => self.sip.ip(),
        }
    }
}

/// Why the voice channel could not start.
#[derive(Debug, thiserror::Error)]
pub enum VoiceError {
    /// A socket could not be bound.
    #[error("cannot bind {addr}: {message}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        message: String,
    },
    /// The RTP port range is empty or odd.
    #[error("bad RTP port range {0}-{1}: need LO <= HI with at least one even port")]
    Ports(u16, u16),
    /// The configured calls at once need more RTP ports than the range has.
    #[error(
        "max_calls {calls} needs {needed} RTP ports, the range {lo}-{hi} has {pairs} pairs: widen rtp_ports or lower max_calls"
    )]
    Capacity {
        /// Calls asked for.
        calls: usize,
        /// Ports they need.
        needed: usize,
        /// Range start.
        lo: u16,
        /// Range end.
        hi: u16,
        /// Pairs in the range.
        pairs: usize,
    },
    /// The media clock thread could not be started.
    #[error("cannot start the media clock thread: {0}")]
    Clock(String),
    /// The operating system has no randomness for tags, branches and nonces.
    #[error(transparent)]
    Random(#[from] plugboard_sip::RandomError),
}

/// Starts the voice channel on the current tokio runtime; calls ring
/// agents' browser softphones through `phones`.
pub async fn start(
    config: VoiceConfig,
    app: Arc<Engine>,
    phones: Option<Arc<plugboard_webrtc::Softphones>>,
) -> Result<VoiceHandle, VoiceError> {
    plugboard_sip::seed_random()?;
    endpoint::start(config, app, phones).await
}

/// Parses `LO-HI`.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("expected LO-HI, got {s:?}"))?;
    let lo: u16 = lo.trim().parse().map_err(|_| format!("bad port {lo:?}"))?;
    let hi: u16 = hi.trim().parse().map_err(|_| format!("bad port {hi:?}"))?;
    if lo > hi || (lo == hi && lo % 2 == 1) {
        return Err(format!("empty range {s}"));
    }
    Ok((lo, hi))
}
