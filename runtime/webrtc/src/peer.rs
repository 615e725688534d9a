//! One browser's peer connection, sans-IO: SDP, datagrams and `now` in;
//! datagrams, a timer and audio out. ICE-lite (the browser checks, we
//! answer), DTLS-SRTP and RTP are str0m's; this maps its media to the
//! 20 ms G.711 frames of the voice core.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use plugboard_media::audio::FRAME;
use plugboard_media::g711::Law;
use str0m::change::SdpOffer;
use str0m::format::Codec;
use str0m::media::{Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

use crate::WebrtcError;

/// What the peer asks of its driver.
#[derive(Debug)]
pub enum PeerOut {
    /// Send these bytes to this address.
    Transmit(SocketAddr, Vec<u8>),
    /// Call [`Peer::timeout`] at this instant (or when a datagram comes).
    Wait(Instant),
    /// Media flows: ICE and DTLS are done.
    Connected,
    /// Samples the browser sent (8 kHz; usually one 20 ms frame).
    Audio(Vec<i16>),
    /// The browser is gone (ICE disconnected, DTLS closed).
    Closed,
}

/// A browser's peer connection.
pub struct Peer {
    rtc: Rtc,
    local: SocketAddr,
    mid: Option<Mid>,
    pt: Option<(Pt, Law)>,
    /// RTP time of the next frame we send.
    sent: u64,
    connected: bool,
    closed: bool,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("local", &self.local)
            .field("mid", &self.mid)
            .field("connected", &self.connected)
            .finish()
    }
}

impl Peer {
    /// Answers a browser's offer for a peer whose datagrams arrive at
    /// `local`: the answer's SDP (G.711 only, our host candidate).
    pub fn answer(
        offer: &str,
        local: SocketAddr,
        now: Instant,
    ) -> Result<(Peer, String), WebrtcError> {
        let offer =
            SdpOffer::from_sdp_string(offer).map_err(|e| WebrtcError::Sdp(e.to_string()))?;
        let mut rtc = RtcConfig::new()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .set_ice_lite(true)
            .clear_codecs()
            .enable_pcmu(true, false)
            .enable_pcma(true, false)
            .build(now);
        let candidate =
            Candidate::host(local, "udp").map_err(|e| WebrtcError::Sdp(e.to_string()))?;
        rtc.add_local_candidate(candidate);
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| WebrtcError::Sdp(e.to_string()))?;
        let peer = Peer {
            rtc,
            local,
            mid: None,
            pt: None,
            sent: 0,
            connected: false,
            closed: false,
        };
        // The answer keeps the codecs both sides have: without G.711
        // there is nothing the voice core could carry. (The audio media
        // itself is picked when str0m reports it, on the first polls.)
        let answer = answer.to_sdp_string();
        if !answer.contains("PCMU/8000") && !answer.contains("PCMA/8000") {
            return Err(WebrtcError::Sdp(
                "the offer has no audio with PCMU or PCMA".into(),
            ));
        }
        Ok((peer, answer))
    }

    /// Takes this audio media, if it has a G.711 payload type both sides
    /// agreed (PCMU before PCMA).
    fn pick_audio(&mut self, mid: Mid) {
        let Some(w) = self.rtc.writer(mid) else {
            return;
        };
        let mut found = None;
        for p in w.payload_params() {
            let law = match p.spec().codec {
                Codec::PCMU => Law::Mu,
                Codec::PCMA => Law::A,
                _ => continue,
            };
            if found.is_none() || law == Law::Mu {
                found = Some((p.pt(), law));
            }
        }
        if found.is_some() {
            self.mid = Some(mid);
            self.pt = found;
        }
    }

    /// Whether media flows.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// The codec agreed.
    pub fn law(&self) -> Law {
        self.pt.map(|(_, l)| l).unwrap_or(Law::Mu)
    }

    /// A datagram arrived from `source`.
    pub fn receive(&mut self, now: Instant, source: SocketAddr, bytes: &[u8]) {
        let Ok(contents) = bytes.try_into() else {
            return;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local,
                contents,
            },
        );
        if self.rtc.accepts(&input) && self.rtc.handle_input(input).is_err() {
            self.closed = true;
        }
    }

    /// Time passed.
    pub fn timeout(&mut self, now: Instant) {
        if self.rtc.handle_input(Input::Timeout(now)).is_err() {
            self.closed = true;
        }
    }

    /// Sends one 20 ms frame to the browser (dropped before media flows).
    pub fn send(&mut self, now: Instant, pcm: &[i16]) {
        let (Some(mid), Some((pt, law))) = (self.mid, self.pt) else {
            return;
        };
        if !self.connected {
            return;
        }
        let mut payload = Vec::with_capacity(FRAME);
        law.encode(pcm, &mut payload);
        let time = MediaTime::new(self.sent, Frequency::EIGHT_KHZ);
        self.sent += pcm.len() as u64;
        if let Some(w) = self.rtc.writer(mid)
            && let Err(e) = w.write(pt, now, time, payload)
        {
            tracing::debug!("softphone audio not written: {e}");
        }
    }

    /// Ends the connection: the DTLS close_notify (and RTCP BYE) come out
    /// of the next polls, then [`PeerOut::Closed`].
    pub fn close(&mut self) {
        if self.rtc.close().is_err() {
            self.rtc.disconnect();
        }
    }

    /// What the peer asks next; call until it returns [`PeerOut::Wait`] or
    /// [`PeerOut::Closed`].
    pub fn poll(&mut self) -> PeerOut {
        loop {
            if self.closed || !self.rtc.is_alive() {
                self.closed = true;
                return PeerOut::Closed;
            }
            let out = match self.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!("softphone peer failed: {e}");
                    self.closed = true;
                    return PeerOut::Closed;
                }
            };
            match out {
                Output::Timeout(at) => return PeerOut::Wait(at),
                Output::Transmit(t) => {
                    return PeerOut::Transmit(t.destination, t.contents.to_vec());
                }
                Output::Event(Event::Connected) => {
                    self.connected = true;
                    return PeerOut::Connected;
                }
                Output::Event(
                    Event::Closed
                    | Event::IceConnectionStateChange(IceConnectionState::Disconnected),
                ) => {
                    self.closed = true;
                    return PeerOut::Closed;
                }
                Output::Event(Event::MediaAdded(m)) => {
                    if self.pt.is_none() && m.kind == MediaKind::Audio {
                        self.pick_audio(m.mid);
                    }
                }
                Output::Event(Event::MediaData(d)) => {
                    let law = match d.params.spec().codec {
                        Codec::PCMU => Law::Mu,
                        Codec::PCMA => Law::A,
                        _ => continue,
                    };
                    let mut pcm = Vec::with_capacity(d.data.len());
                    law.decode(&d.data, &mut pcm);
                    return PeerOut::Audio(pcm);
                }
                Output::Event(_) => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;
    use str0m::media::Direction;

    /// A browser stand-in: a full-ICE str0m peer offering audio.
    fn client(
        now: Instant,
        addr: SocketAddr,
    ) -> (Rtc, String, str0m::change::SdpPendingOffer, Mid) {
        let mut rtc = RtcConfig::new()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .clear_codecs()
            .enable_opus(true, false)
            .enable_pcmu(true, false)
            .build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        (rtc, offer.to_sdp_string(), pending, mid)
    }

    #[test]
    fn a_browser_offer_is_answered_and_g711_flows_both_ways() {
        let t0 = Instant::now();
        let (caddr, saddr): (SocketAddr, SocketAddr) = (
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:40002".parse().unwrap(),
        );
        let (mut c, offer, pending, mid) = client(t0, caddr);
        let (mut s, answer) = Peer::answer(&offer, saddr, t0).unwrap();
        assert!(answer.contains("a=ice-lite"), "{answer}");
        assert!(answer.contains("PCMU/8000"), "{answer}");
        c.sdp_api()
            .accept_answer(
                pending,
                str0m::change::SdpAnswer::from_sdp_string(&answer).unwrap(),
            )
            .unwrap();
        let mut now = t0;
        let mut heard = Vec::new();
        let mut client_heard = 0usize;
        let mut n = 0u64;
        for _ in 0..2000 {
            now += Duration::from_millis(5);
            // Client out → server in.
            loop {
                match c.poll_output().unwrap() {
                    Output::Transmit(t) => s.receive(now, t.source, &t.contents),
                    Output::Event(Event::MediaData(d)) => client_heard += d.data.len(),
                    Output::Event(_) => {}
                    Output::Timeout(_) => break,
                }
            }
            // Server out → client in.
            loop {
                match s.poll() {
                    PeerOut::Transmit(to, bytes) => {
                        assert_eq!(to, caddr);
                        let r = Receive::new(Protocol::Udp, saddr, caddr, &bytes).unwrap();
                        c.handle_input(Input::Receive(now, r)).unwrap();
                    }
                    PeerOut::Audio(pcm) => heard.extend(pcm),
                    PeerOut::Wait(_) => break,
                    PeerOut::Connected | PeerOut::Closed => {}
                }
            }
            c.handle_input(Input::Timeout(now)).unwrap();
            s.timeout(now);
            if s.connected() && n < 100 {
                // 20 ms frames both ways.
                s.send(now, &[1000; FRAME]);
                let w = c.writer(mid).unwrap();
                let pt = w
                    .payload_params()
                    .find(|p| p.spec().codec == Codec::PCMU)
                    .unwrap()
                    .pt();
                let mut payload = Vec::new();
                Law::Mu.encode(&[-2000; FRAME], &mut payload);
                w.write(
                    pt,
                    now,
                    MediaTime::new(n * 160, Frequency::EIGHT_KHZ),
                    payload,
                )
                .unwrap();
                n += 1;
            }
        }
        assert!(s.connected());
        assert_eq!(s.law(), Law::Mu);
        assert!(heard.len() >= 50 * FRAME, "server heard {}", heard.len());
        assert!(heard.iter().all(|x| (*x + 2000).abs() < 100));
        assert!(client_heard >= 50 * FRAME, "client heard {client_heard}");
    }

    #[test]
    fn an_offer_without_g711_or_not_sdp_is_refused() {
        let now = Instant::now();
        let addr: SocketAddr = "127.0.0.1:40004".parse().unwrap();
        assert!(matches!(
            Peer::answer("not sdp", addr, now),
            Err(WebrtcError::Sdp(_))
        ));
        let mut rtc = RtcConfig::new()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .clear_codecs()
            .enable_opus(true, false)
            .build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, _) = api.apply().unwrap();
        let e = Peer::answer(&offer.to_sdp_string(), addr, now).unwrap_err();
        assert!(e.to_string().contains("PCMU"), "{e}");
    }
}
