//! One browser's peer connection, sans-IO: SDP, datagrams and `now` in;
//! datagrams, a timer and audio out. ICE-lite (the browser checks, we
//! answer), DTLS-SRTP and RTP are str0m's; this maps its media to the
//! 20 ms 8 kHz frames of the voice core: G.711 as it is, or Opus
//! (libopus coding at 8 kHz, so nothing is resampled) when it is
//! preferred or the browser has nothing else.

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

/// The codec a softphone's audio travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Voice {
    /// G.711, as the voice core has it.
    G711(Law),
    /// Opus (48 kHz RTP clock), coded to and from 8 kHz.
    Opus,
}

impl Voice {
    fn of(codec: Codec) -> Option<Voice> {
        match codec {
            Codec::PCMU => Some(Voice::G711(Law::Mu)),
            Codec::PCMA => Some(Voice::G711(Law::A)),
            Codec::Opus => Some(Voice::Opus),
            _ => None,
        }
    }

    /// Its name, as SDP has it.
    pub fn name(self) -> &'static str {
        match self {
            Voice::G711(l) => l.name(),
            Voice::Opus => "opus",
        }
    }
}

/// Opus coding state of a peer.
struct OpusCodec {
    enc: opus::Encoder,
    dec: opus::Decoder,
}

impl OpusCodec {
    fn new() -> Result<OpusCodec, opus::Error> {
        let mut enc = opus::Encoder::new(8000, opus::Channels::Mono, opus::Application::Voip)?;
        // Lost packets are recovered from the next one's redundancy.
        enc.set_inband_fec(true)?;
        enc.set_packet_loss_perc(5)?;
        Ok(OpusCodec {
            enc,
            dec: opus::Decoder::new(8000, opus::Channels::Mono)?,
        })
    }
}

/// A browser's peer connection.
pub struct Peer {
    rtc: Rtc,
    local: SocketAddr,
    mid: Option<Mid>,
    pt: Option<(Pt, Voice)>,
    /// Codecs in the order we prefer them.
    prefer: [Voice; 3],
    opus: Option<OpusCodec>,
    /// Frames sent (their RTP time follows).
    sent: u64,
    /// Whether the browser's audio is wanted (a call is up): else it is
    /// not decoded.
    listening: bool,
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
    /// `local`: the answer's SDP (our host candidate; G.711 first, or Opus
    /// first when `opus` is preferred — the browser sends the answer's
    /// first codec).
    pub fn answer(
        offer: &str,
        local: SocketAddr,
        now: Instant,
        opus: bool,
    ) -> Result<(Peer, String), WebrtcError> {
        let offer =
            SdpOffer::from_sdp_string(offer).map_err(|e| WebrtcError::Sdp(e.to_string()))?;
        let g711 = [Voice::G711(Law::Mu), Voice::G711(Law::A)];
        let prefer = if opus {
            [Voice::Opus, g711[0], g711[1]]
        } else {
            [g711[0], g711[1], Voice::Opus]
        };
        let mut config = RtcConfig::new()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .set_ice_lite(true)
            .clear_codecs();
        for v in prefer {
            config = match v {
                Voice::G711(Law::Mu) => config.enable_pcmu(true, false),
                Voice::G711(Law::A) => config.enable_pcma(true, false),
                Voice::Opus => config.enable_opus(true, false),
            };
        }
        let mut rtc = config.build(now);
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
            prefer,
            opus: None,
            sent: 0,
            listening: true,
            connected: false,
            closed: false,
        };
        // The answer keeps the codecs both sides have: without one of
        // ours there is no audio. (The audio media itself is picked when
        // str0m reports it, on the first polls.)
        let answer = answer.to_sdp_string();
        if !["PCMU/8000", "PCMA/8000", "opus/48000"]
            .iter()
            .any(|c| answer.contains(c))
        {
            return Err(WebrtcError::Sdp(
                "the offer has no audio with Opus, PCMU or PCMA".into(),
            ));
        }
        Ok((peer, answer))
    }

    /// Takes this audio media, in the codec we prefer of those both sides
    /// agreed.
    fn pick_audio(&mut self, mid: Mid) {
        let Some(w) = self.rtc.writer(mid) else {
            return;
        };
        let agreed: Vec<(Pt, Voice)> = w
            .payload_params()
            .filter_map(|p| Voice::of(p.spec().codec).map(|v| (p.pt(), v)))
            .collect();
        let Some(found) = self
            .prefer
            .iter()
            .find_map(|v| agreed.iter().find(|(_, a)| a == v).copied())
        else {
            return;
        };
        if found.1 == Voice::Opus && self.opus.is_none() {
            match OpusCodec::new() {
                Ok(c) => self.opus = Some(c),
                Err(e) => {
                    tracing::warn!("no Opus coder: {e}");
                    return;
                }
            }
        }
        self.mid = Some(mid);
        self.pt = Some(found);
    }

    /// Whether media flows.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Whether the browser's audio is decoded and handed out (while a call
    /// is up; an idle softphone's microphone costs nothing).
    pub fn listen(&mut self, on: bool) {
        self.listening = on;
    }

    /// The codec we send in (once the audio is known).
    pub fn voice(&self) -> Option<Voice> {
        self.pt.map(|(_, v)| v)
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
        let (Some(mid), Some((pt, voice))) = (self.mid, self.pt) else {
            return;
        };
        if !self.connected {
            return;
        }
        let n = self.sent;
        self.sent += 1;
        let (payload, time) = match (voice, self.opus.as_mut()) {
            (Voice::G711(law), _) => {
                let mut payload = Vec::with_capacity(FRAME);
                law.encode(pcm, &mut payload);
                (
                    payload,
                    MediaTime::new(n * FRAME as u64, Frequency::EIGHT_KHZ),
                )
            }
            (Voice::Opus, Some(c)) => {
                let mut frame = [0i16; FRAME];
                let k = pcm.len().min(FRAME);
                frame[..k].copy_from_slice(&pcm[..k]);
                let mut out = [0u8; 400];
                match c.enc.encode(&frame, &mut out) {
                    Ok(len) => (
                        out[..len].to_vec(),
                        MediaTime::new(n * 960, Frequency::FORTY_EIGHT_KHZ),
                    ),
                    Err(e) => {
                        tracing::debug!("opus encode: {e}");
                        return;
                    }
                }
            }
            (Voice::Opus, None) => return,
        };
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
                Output::Event(Event::MediaData(_)) if !self.listening => {}
                Output::Event(Event::MediaData(d)) => {
                    match (Voice::of(d.params.spec().codec), self.opus.as_mut()) {
                        (Some(Voice::G711(law)), _) => {
                            let mut pcm = Vec::with_capacity(d.data.len());
                            law.decode(&d.data, &mut pcm);
                            return PeerOut::Audio(pcm);
                        }
                        (Some(Voice::Opus), Some(c)) => {
                            // Up to 120 ms in one packet, at 8 kHz.
                            let mut pcm = vec![0i16; FRAME * 6];
                            match c.dec.decode(&d.data, &mut pcm, false) {
                                Ok(n) => {
                                    pcm.truncate(n);
                                    return PeerOut::Audio(pcm);
                                }
                                Err(e) => tracing::debug!("opus decode: {e}"),
                            }
                        }
                        _ => {}
                    }
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

    /// A browser stand-in: a full-ICE str0m peer offering audio in these
    /// codecs.
    fn client(
        now: Instant,
        addr: SocketAddr,
        opus: bool,
        g711: bool,
    ) -> (Rtc, String, str0m::change::SdpPendingOffer, Mid) {
        let mut rtc = RtcConfig::new()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .clear_codecs()
            .enable_opus(opus, false)
            .enable_pcmu(g711, false)
            .build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        (rtc, offer.to_sdp_string(), pending, mid)
    }

    /// A browser (offering `opus`/`g711`) and a peer (preferring Opus or
    /// not) connect in memory and send 100 frames of a tone each way;
    /// returns the codec and what each side heard (8 kHz samples at the
    /// peer; the browser's decoded at its codec's rate).
    fn call(opus: bool, g711: bool, prefer_opus: bool) -> (Voice, Vec<i16>, Vec<i16>) {
        let t0 = Instant::now();
        let (caddr, saddr): (SocketAddr, SocketAddr) = (
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:40002".parse().unwrap(),
        );
        let (mut c, offer, pending, mid) = client(t0, caddr, opus, g711);
        let (mut s, answer) = Peer::answer(&offer, saddr, t0, prefer_opus).unwrap();
        assert!(answer.contains("a=ice-lite"), "{answer}");
        c.sdp_api()
            .accept_answer(
                pending,
                str0m::change::SdpAnswer::from_sdp_string(&answer).unwrap(),
            )
            .unwrap();
        let tone = |n: usize, rate: f32| -> Vec<i16> {
            (0..n)
                .map(|i| ((i as f32 * 440.0 * std::f32::consts::TAU / rate).sin() * 8000.0) as i16)
                .collect()
        };
        let mut client_enc =
            opus::Encoder::new(48000, opus::Channels::Mono, opus::Application::Voip).unwrap();
        let mut client_dec = opus::Decoder::new(48000, opus::Channels::Mono).unwrap();
        let mut now = t0;
        let mut heard = Vec::new();
        let mut client_heard = Vec::new();
        let mut n = 0u64;
        for _ in 0..2000 {
            now += Duration::from_millis(5);
            // Browser out → peer in.
            loop {
                match c.poll_output().unwrap() {
                    Output::Transmit(t) => s.receive(now, t.source, &t.contents),
                    Output::Event(Event::MediaData(d)) => match d.params.spec().codec {
                        Codec::Opus => {
                            let mut pcm = vec![0i16; 5760];
                            let k = client_dec.decode(&d.data, &mut pcm, false).unwrap();
                            client_heard.extend_from_slice(&pcm[..k]);
                        }
                        _ => Law::Mu.decode(&d.data, &mut client_heard),
                    },
                    Output::Event(_) => {}
                    Output::Timeout(_) => break,
                }
            }
            // Peer out → browser in.
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
            if s.connected() && n < 100 && n * 20 < (now - t0).as_millis() as u64 {
                // 20 ms frames both ways, in the codec the peer chose.
                s.send(now, &tone(FRAME, 8000.0));
                let voice = s.voice().unwrap();
                let w = c.writer(mid).unwrap();
                let pt = w
                    .payload_params()
                    .find(|p| Voice::of(p.spec().codec) == Some(voice))
                    .unwrap()
                    .pt();
                let (payload, time) = match voice {
                    Voice::Opus => {
                        let mut out = [0u8; 400];
                        let k = client_enc.encode(&tone(960, 48000.0), &mut out).unwrap();
                        (
                            out[..k].to_vec(),
                            MediaTime::new(n * 960, Frequency::FORTY_EIGHT_KHZ),
                        )
                    }
                    Voice::G711(law) => {
                        let mut p = Vec::new();
                        law.encode(&tone(FRAME, 8000.0), &mut p);
                        (p, MediaTime::new(n * 160, Frequency::EIGHT_KHZ))
                    }
                };
                w.write(pt, now, time, payload).unwrap();
                n += 1;
            }
        }
        assert!(s.connected());
        (s.voice().unwrap(), heard, client_heard)
    }

    fn rms(x: &[i16]) -> f64 {
        (x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len().max(1) as f64).sqrt()
    }

    #[test]
    fn a_browser_offer_is_answered_and_g711_flows_both_ways() {
        let (voice, heard, client_heard) = call(true, true, false);
        assert_eq!(
            voice,
            Voice::G711(Law::Mu),
            "G.711 first unless Opus is preferred"
        );
        assert!(heard.len() >= 90 * FRAME, "peer heard {}", heard.len());
        assert!(
            client_heard.len() >= 90 * FRAME,
            "browser heard {}",
            client_heard.len()
        );
        // G.711 is exact up to its quantization: a tone of 8,000 (RMS
        // ~5,657) comes through as itself.
        assert!((rms(&heard) - 5657.0).abs() < 200.0, "{}", rms(&heard));
    }

    #[test]
    fn opus_is_coded_both_ways_when_preferred_or_the_only_codec() {
        for (g711, prefer) in [(true, true), (false, false)] {
            let (voice, heard, client_heard) = call(true, g711, prefer);
            assert_eq!(voice, Voice::Opus);
            assert!(heard.len() >= 90 * FRAME, "peer heard {}", heard.len());
            // The browser decodes at 48 kHz: six times the samples.
            assert!(
                client_heard.len() >= 90 * FRAME * 6,
                "browser heard {}",
                client_heard.len()
            );
            // Lossy, but the tone's energy comes through both ways (past
            // the codec's first frames).
            let level = rms(&heard[heard.len() / 2..]);
            assert!(level > 3000.0, "peer heard a level of {level}");
            let level = rms(&client_heard[client_heard.len() / 2..]);
            assert!(level > 3000.0, "browser heard a level of {level}");
        }
    }

    #[test]
    fn an_offer_without_opus_or_g711_or_not_sdp_is_refused() {
        let now = Instant::now();
        let addr: SocketAddr = "127.0.0.1:40004".parse().unwrap();
        assert!(matches!(
            Peer::answer("not sdp", addr, now, false),
            Err(WebrtcError::Sdp(_))
        ));
        let mut rtc = RtcConfig::new()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .clear_codecs()
            .enable_pcma(false, false)
            .enable_g722(true, false)
            .build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, _) = api.apply().unwrap();
        let e = Peer::answer(&offer.to_sdp_string(), addr, now, false).unwrap_err();
        assert!(e.to_string().contains("PCMU"), "{e}");
    }
}
