//! The media legs of a call: the caller's RTP (jitter buffer, RFC 4733
//! and in-band DTMF, RTCP reports, symmetric RTP, codec changes) and the
//! leg a dial or transfer bridges it to. What they carry is decided by the
//! IVR ([`crate::ivr`]); these only move and code the audio.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use plugboard_media::audio::FRAME;
use plugboard_media::dtmf::{EventDetector, ToneDetector};
use plugboard_media::g711::Law;
use plugboard_media::rtp::{self, JitterBuffer, RtpSender};
use plugboard_media::sdp::Negotiated;
use plugboard_webrtc::PhoneLeg;
use serde_json::{Value, json};

use crate::clock::{Frame, Packet};
use crate::ports::MediaSockets;
use crate::signal::DialogKey;

/// Where RTCP goes for an RTP address: the odd port above (RFC 3550).
fn rtcp_for(rtp: SocketAddr) -> SocketAddr {
    SocketAddr::new(rtp.ip(), rtp.port() | 1)
}

/// A random 32-bit value (SSRC, first sequence number and timestamp).
pub(super) fn seed() -> u32 {
    u32::from_str_radix(&plugboard_sip::random_token()[..8], 16).unwrap_or_default()
}

/// RTP timestamp units (8 kHz) since `since`: arrival times for jitter.
fn arrival(since: Instant) -> u32 {
    (since.elapsed().as_micros() / 125) as u32
}

/// Decodes a payload into one frame of samples.
fn decode(law: Law, payload: &[u8]) -> Vec<i16> {
    let mut pcm = Vec::with_capacity(FRAME);
    law.decode(payload, &mut pcm);
    pcm
}

/// The caller's side of the call.
pub(super) struct CallerMedia {
    /// What was agreed in SDP (codec, directions, telephone-event).
    pub negotiated: Negotiated,
    remote: SocketAddr,
    remote_rtcp: SocketAddr,
    sender: RtpSender,
    jitter: JitterBuffer,
    events: EventDetector,
    tones: ToneDetector,
    /// When media last came from the caller.
    pub last_rtp: Instant,
    received: u64,
    started: Instant,
}

impl CallerMedia {
    pub fn new(negotiated: Negotiated, now: Instant) -> CallerMedia {
        CallerMedia {
            remote: negotiated.remote,
            remote_rtcp: rtcp_for(negotiated.remote),
            sender: RtpSender::new(seed(), negotiated.law, negotiated.payload_type, seed()),
            jitter: JitterBuffer::new(3),
            negotiated,
            events: EventDetector::new(),
            tones: ToneDetector::new(),
            last_rtp: now,
            received: 0,
            started: now,
        }
    }

    /// Plays out only once `depth` frames are buffered (and again after an
    /// underrun): a fax's modems tolerate delay, not gaps.
    pub fn buffer_frames(&mut self, depth: usize) {
        self.jitter = JitterBuffer::new(depth);
    }

    /// A packet on the RTP port; returns a digit when it completes an
    /// RFC 4733 event.
    pub fn rtp(&mut self, bytes: &[u8], src: SocketAddr) -> Option<char> {
        if rtp::is_rtcp(bytes) {
            return None;
        }
        let p = rtp::parse_rtp(bytes)?;
        // Symmetric RTP: answer where the caller's media comes from.
        self.remote = src;
        self.last_rtp = Instant::now();
        self.received += 1;
        if Some(p.payload_type) == self.negotiated.dtmf_pt {
            return self.events.packet(p.timestamp, &p.payload);
        }
        if p.payload_type == self.negotiated.payload_type {
            self.jitter.push(&p, arrival(self.started));
        }
        None
    }

    /// A packet on the RTCP port.
    pub fn rtcp(&mut self, bytes: &[u8], src: SocketAddr) {
        if let Some(info) = rtp::parse_rtcp(bytes, self.sender.ssrc) {
            self.remote_rtcp = src;
            if let Some(sr) = info.sender_report {
                self.jitter.last_sr = Some((sr, plugboard_core::now_ms()));
            }
        }
    }

    /// Our RTCP report and where it goes.
    pub fn rtcp_report(&mut self, cname: &str) -> (Vec<u8>, SocketAddr) {
        let report = rtp::rtcp_report(
            &self.sender,
            &mut self.jitter,
            plugboard_core::now_ms(),
            cname,
        );
        (report, self.remote_rtcp)
    }

    /// A re-INVITE changed the media (hold, resume, a new address).
    pub fn changed(&mut self, n: Negotiated) {
        if n.remote != self.remote {
            self.remote = n.remote;
            self.remote_rtcp = rtcp_for(n.remote);
        }
        self.negotiated = n;
        self.last_rtp = Instant::now();
    }

    /// The caller's answer to an offer of ours: media goes on with what
    /// was agreed (another codec is a new stream, with a new SSRC).
    pub fn answered(&mut self, n: Negotiated) {
        if n.law != self.negotiated.law || n.payload_type != self.negotiated.payload_type {
            self.sender = RtpSender::new(seed(), n.law, n.payload_type, seed());
        }
        self.remote = n.remote;
        self.remote_rtcp = rtcp_for(n.remote);
        self.negotiated = n;
    }

    /// The next frame the caller sent, from the jitter buffer (silence if
    /// none).
    pub fn heard(&mut self) -> Vec<i16> {
        match self.jitter.pop() {
            Some(payload) => decode(self.negotiated.law, &payload),
            None => vec![0; FRAME],
        }
    }

    /// Digits heard in-band in a frame, when the caller does not send
    /// RFC 4733 events.
    pub fn inband(&mut self, heard: &[i16]) -> Vec<char> {
        if self.negotiated.dtmf_pt.is_some() {
            return Vec::new();
        }
        self.tones.push(heard)
    }

    /// The RTP packet for a frame, unless we must not send (hold, no
    /// address yet).
    pub fn frame(&mut self, pcm: &[i16; FRAME]) -> Frame {
        if self.negotiated.local_direction.sends() && !self.negotiated.remote.ip().is_unspecified()
        {
            Packet::new(&self.sender.frame(pcm), self.remote)
        } else {
            self.sender.skip(1);
            None
        }
    }

    /// Media statistics for the call's record.
    pub fn stats(&self) -> Value {
        json!({
            "codec": self.negotiated.law.name(),
            "packets_sent": self.sender.packets,
            "packets_received": self.received,
            "lost": self.jitter.cumulative_lost(),
            "jitter_ts": self.jitter.jitter(),
        })
    }
}

/// A new outbound leg: media ports from the pool, a fresh dialog key,
/// and our SDP offer; `None` if no ports are free.
pub(super) fn new_leg(
    pool: &crate::ports::PortPool,
    config: &crate::VoiceConfig,
) -> Option<(OutLeg, String)> {
    let sockets = pool.take().and_then(|p| p.register().ok())?;
    let local = plugboard_media::sdp::LocalMedia {
        ip: config.advertised_ip(),
        port: sockets.port,
        session_id: u64::from(seed()),
        version: 1,
    };
    let offer = plugboard_media::sdp::offer(&local, 101, plugboard_media::sdp::Direction::SendRecv);
    let key: DialogKey = (
        format!("{}@plugboard", plugboard_sip::random_token()),
        plugboard_sip::random_token(),
    );
    let mut leg = OutLeg::new(key, sockets);
    leg.local = Some(local);
    Some((leg, offer))
}

/// The other leg of a bridged call (dial, transfer): RTP to a phone or
/// trunk, or frames to an agent's browser softphone.
pub(super) struct OutLeg {
    /// Its dialog.
    pub key: DialogKey,
    /// Its RTP and RTCP sockets (none for a softphone).
    pub sockets: Option<Arc<MediaSockets>>,
    /// The softphone it rings, if it is one.
    pub phone: Option<PhoneLeg>,
    /// Our side of its media, as offered.
    pub local: Option<plugboard_media::sdp::LocalMedia>,
    /// It goes through a trunk whose fax calls ask for T.38.
    pub t38_trunk: bool,
    sender: Option<RtpSender>,
    jitter: JitterBuffer,
    remote: Option<SocketAddr>,
    payload_type: u8,
    law: Law,
}

impl OutLeg {
    pub fn new(key: DialogKey, sockets: MediaSockets) -> OutLeg {
        OutLeg {
            key,
            sockets: Some(Arc::new(sockets)),
            phone: None,
            local: None,
            t38_trunk: false,
            sender: None,
            jitter: JitterBuffer::new(3),
            remote: None,
            payload_type: 0,
            law: Law::Mu,
        }
    }

    /// A leg to an agent's softphone.
    pub fn softphone(key: DialogKey, phone: PhoneLeg) -> OutLeg {
        OutLeg {
            key,
            sockets: None,
            phone: Some(phone),
            local: None,
            t38_trunk: false,
            sender: None,
            jitter: JitterBuffer::new(3),
            remote: None,
            payload_type: 0,
            law: Law::Mu,
        }
    }

    /// Plays out only once `depth` frames are buffered (see
    /// [`CallerMedia::buffer_frames`]).
    pub fn buffer_frames(&mut self, depth: usize) {
        self.jitter = JitterBuffer::new(depth);
    }

    /// The leg answered with this SDP.
    pub fn answered(&mut self, n: &Negotiated) {
        if self.phone.is_some() {
            return;
        }
        self.sender = Some(RtpSender::new(seed(), n.law, n.payload_type, seed()));
        self.remote = Some(n.remote);
        self.payload_type = n.payload_type;
        self.law = n.law;
    }

    /// A packet on the leg's RTP port (ignored until it answered).
    pub fn rtp(&mut self, bytes: &[u8], src: SocketAddr, started: Instant) {
        let Some(p) = rtp::parse_rtp(bytes) else {
            return;
        };
        if p.payload_type != self.payload_type || self.sender.is_none() {
            return;
        }
        self.remote = Some(src);
        self.jitter.push(&p, arrival(started));
    }

    /// The next frame the leg sent.
    pub fn audio(&mut self) -> Option<Vec<i16>> {
        if let Some(p) = &self.phone {
            return p.audio();
        }
        self.jitter.pop().map(|p| decode(self.law, &p))
    }

    /// Sends a frame of the caller's audio to the leg.
    pub fn send(&mut self, heard: &[i16]) {
        if let Some(p) = &self.phone {
            p.send(heard);
            return;
        }
        if let (Some(sender), Some(remote), Some(sockets)) =
            (self.sender.as_mut(), self.remote, self.sockets.as_ref())
        {
            let mut out = [0i16; FRAME];
            let n = heard.len().min(FRAME);
            out[..n].copy_from_slice(&heard[..n]);
            let packet = sender.frame(&out);
            let _ = sockets.rtp.try_send_to(&packet, remote);
        }
    }
}
