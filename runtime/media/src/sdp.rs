//! SDP (RFC 8866) for audio calls, and the RFC 3264 offer/answer rules for
//! G.711 and telephone-event — and for T.38 fax (`m=image … udptl t38`,
//! ITU-T T.38 Annex D), which a fax call switches to by re-INVITE.
//!
//! Written here rather than taken from the `sdp` crate: that crate pulls in
//! `url` and the ICU stack for a handful of line types, and it refuses
//! offers real phones send (a `b=` line before `c=`). This parser is small,
//! lenient about line order and endings, strict about the values it uses,
//! and is a fuzz target.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::g711::Law;

/// Why an SDP could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    /// The text is not SDP.
    #[error("malformed SDP: {0}")]
    Syntax(String),
    /// Valid SDP we cannot serve (no G.711 audio): answer 488.
    #[error("not acceptable: {0}")]
    NotAcceptable(String),
}

/// A media direction attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Both ways (the default).
    SendRecv,
    /// The sender of this SDP only sends (e.g. puts the other side on hold).
    SendOnly,
    /// The sender of this SDP only receives.
    RecvOnly,
    /// No media either way.
    Inactive,
}

impl Direction {
    fn attr(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    /// The direction an answer gives to an offer of this direction.
    pub fn answer(self) -> Direction {
        match self {
            Direction::SendRecv => Direction::SendRecv,
            Direction::SendOnly => Direction::RecvOnly,
            Direction::RecvOnly => Direction::SendOnly,
            Direction::Inactive => Direction::Inactive,
        }
    }

    /// True if the side that wrote this direction will send media.
    pub fn sends(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::SendOnly)
    }

    /// True if the side that wrote this direction will receive media.
    pub fn receives(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::RecvOnly)
    }
}

/// One `m=` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    /// `audio`, `video`, …
    pub kind: String,
    /// The port (0: disabled).
    pub port: u16,
    /// Transport protocol, e.g. `RTP/AVP`.
    pub proto: String,
    /// Formats (payload types for RTP) in preference order.
    pub formats: Vec<String>,
    /// Media-level `c=` address.
    pub connection: Option<IpAddr>,
    /// `a=rtpmap`: payload type, encoding name, clock rate.
    pub rtpmap: Vec<(u8, String, u32)>,
    /// `a=fmtp`: payload type, parameters.
    pub fmtp: Vec<(u8, String)>,
    /// Direction attribute, if any at media level.
    pub direction: Option<Direction>,
    /// `a=ptime`.
    pub ptime: Option<u32>,
    /// Every other media-level attribute, name and value as written
    /// (e.g. `T38FaxVersion`, `0`).
    pub attributes: Vec<(String, Option<String>)>,
}

/// A session description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sdp {
    /// `o=` session id.
    pub session_id: String,
    /// `o=` session version.
    pub session_version: u64,
    /// Session-level `c=` address.
    pub connection: Option<IpAddr>,
    /// Session-level direction.
    pub direction: Option<Direction>,
    /// Media sections in order.
    pub media: Vec<Media>,
}

fn syntax(msg: impl Into<String>) -> SdpError {
    SdpError::Syntax(msg.into())
}

fn parse_connection(v: &str) -> Result<IpAddr, SdpError> {
    let parts: Vec<&str> = v.split_ascii_whitespace().collect();
    let [net, kind, addr] = parts.as_slice() else {
        return Err(syntax("c= needs: IN IP4|IP6 address"));
    };
    if *net != "IN" || !matches!(*kind, "IP4" | "IP6") {
        return Err(syntax("c= needs: IN IP4|IP6 address"));
    }
    // Multicast forms carry /ttl; we only take the address.
    let addr = addr.split('/').next().unwrap_or("");
    addr.parse()
        .map_err(|_| syntax(format!("c= address {addr:?} is not an IP address")))
}

fn direction(attr: &str) -> Option<Direction> {
    Some(match attr {
        "sendrecv" => Direction::SendRecv,
        "sendonly" => Direction::SendOnly,
        "recvonly" => Direction::RecvOnly,
        "inactive" => Direction::Inactive,
        _ => return None,
    })
}

/// Parses SDP text (CRLF or LF line ends; unknown lines and attributes are
/// skipped).
pub fn parse(text: &str) -> Result<Sdp, SdpError> {
    let mut sdp = Sdp {
        session_id: String::new(),
        session_version: 0,
        connection: None,
        direction: None,
        media: Vec::new(),
    };
    let mut saw_version = false;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let bytes = line.as_bytes();
        if bytes.len() < 2 || bytes[1] != b'=' || !bytes[0].is_ascii_lowercase() {
            return Err(syntax(format!("line {} is not type=value", n + 1)));
        }
        let value = &line[2..];
        match bytes[0] {
            b'v' => {
                if value.trim() != "0" {
                    return Err(syntax("v= must be 0"));
                }
                saw_version = true;
            }
            b'o' => {
                let parts: Vec<&str> = value.split_ascii_whitespace().collect();
                if parts.len() != 6 {
                    return Err(syntax("o= needs 6 fields"));
                }
                sdp.session_id = parts[1].to_string();
                sdp.session_version = parts[2]
                    .parse()
                    .map_err(|_| syntax("o= session version is not a number"))?;
            }
            b'c' => {
                let addr = parse_connection(value)?;
                match sdp.media.last_mut() {
                    Some(m) => m.connection = Some(addr),
                    None => sdp.connection = Some(addr),
                }
            }
            b'm' => {
                let parts: Vec<&str> = value.split_ascii_whitespace().collect();
                if parts.len() < 4 {
                    return Err(syntax("m= needs: media port proto formats"));
                }
                let port = parts[1].split('/').next().unwrap_or("");
                let port: u16 = port
                    .parse()
                    .map_err(|_| syntax(format!("m= port {port:?} is not a port")))?;
                sdp.media.push(Media {
                    kind: parts[0].to_string(),
                    port,
                    proto: parts[2].to_string(),
                    formats: parts[3..].iter().map(|s| s.to_string()).collect(),
                    connection: None,
                    rtpmap: Vec::new(),
                    fmtp: Vec::new(),
                    direction: None,
                    ptime: None,
                    attributes: Vec::new(),
                });
            }
            b'a' => {
                let (name, val) = match value.split_once(':') {
                    Some((a, v)) => (a, Some(v)),
                    None => (value, None),
                };
                if let Some(dir) = direction(name) {
                    match sdp.media.last_mut() {
                        Some(m) => m.direction = Some(dir),
                        None => sdp.direction = Some(dir),
                    }
                    continue;
                }
                let Some(m) = sdp.media.last_mut() else {
                    continue;
                };
                match (name, val) {
                    ("rtpmap", Some(v)) => {
                        let (pt, enc) = v
                            .split_once(' ')
                            .ok_or_else(|| syntax("a=rtpmap needs: pt encoding/rate"))?;
                        let pt: u8 = pt
                            .trim()
                            .parse()
                            .ok()
                            .filter(|p| *p < 128)
                            .ok_or_else(|| syntax("a=rtpmap payload type"))?;
                        let mut enc = enc.trim().split('/');
                        let name = enc.next().unwrap_or("").to_string();
                        let rate: u32 = enc
                            .next()
                            .and_then(|r| r.parse().ok())
                            .ok_or_else(|| syntax("a=rtpmap clock rate"))?;
                        m.rtpmap.push((pt, name, rate));
                    }
                    ("fmtp", Some(v)) => {
                        if let Some((pt, params)) = v.split_once(' ')
                            && let Ok(pt) = pt.trim().parse::<u8>()
                        {
                            m.fmtp.push((pt, params.trim().to_string()));
                        }
                    }
                    ("ptime", Some(v)) => m.ptime = v.trim().parse().ok(),
                    _ => m
                        .attributes
                        .push((name.to_string(), val.map(|v| v.trim().to_string()))),
                }
            }
            _ => {}
        }
    }
    if !saw_version {
        return Err(syntax("no v= line"));
    }
    Ok(sdp)
}

impl Media {
    /// The encoding of a payload type: its rtpmap, or the static table
    /// (0 PCMU, 8 PCMA) when there is none.
    pub fn encoding(&self, pt: u8) -> Option<(String, u32)> {
        if let Some((_, name, rate)) = self.rtpmap.iter().find(|(p, _, _)| *p == pt) {
            return Some((name.clone(), *rate));
        }
        match pt {
            0 => Some(("PCMU".into(), 8000)),
            8 => Some(("PCMA".into(), 8000)),
            _ => None,
        }
    }

    /// A media-level attribute's value, by name in any case (`Some("")`
    /// for a flag).
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref().unwrap_or(""))
    }

    /// True for a T.38 stream that is not disabled.
    pub fn is_t38(&self) -> bool {
        self.kind == "image"
            && self.port != 0
            && self.proto.eq_ignore_ascii_case("udptl")
            && self.formats.iter().any(|f| f.eq_ignore_ascii_case("t38"))
    }

    /// The payload types of the offer in order, as numbers.
    pub fn payload_types(&self) -> impl Iterator<Item = u8> + '_ {
        self.formats.iter().filter_map(|f| f.parse().ok())
    }
}

/// What an offer/answer exchange settled for the audio stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The codec both sides use.
    pub law: Law,
    /// The payload type for that codec (0 or 8).
    pub payload_type: u8,
    /// The telephone-event payload type, if both sides do RFC 4733.
    pub dtmf_pt: Option<u8>,
    /// Where to send RTP (unspecified address or port 0: nowhere).
    pub remote: SocketAddr,
    /// The direction the remote side declared.
    pub remote_direction: Direction,
    /// Our direction.
    pub local_direction: Direction,
}

impl Negotiated {
    /// True if the remote side holds the call (RFC 3264 §8.4: sendonly,
    /// inactive, or the RFC 2543 address 0.0.0.0).
    pub fn on_hold(&self) -> bool {
        !self.remote_direction.receives() || self.remote.ip().is_unspecified()
    }
}

/// Our side of a session, to write SDP from.
#[derive(Debug, Clone)]
pub struct LocalMedia {
    /// Our address for RTP.
    pub ip: IpAddr,
    /// Our RTP port.
    pub port: u16,
    /// `o=` session id.
    pub session_id: u64,
    /// `o=` version (increment on every new offer or answer that changes).
    pub version: u64,
}

fn ip_kind(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "IP4" } else { "IP6" }
}

fn write_head(out: &mut String, local: &LocalMedia) {
    let kind = ip_kind(&local.ip);
    let _ = write!(
        out,
        "v=0\r\no=plugboard {} {} IN {kind} {ip}\r\ns=plugboard\r\nc=IN {kind} {ip}\r\nt=0 0\r\n",
        local.session_id,
        local.version,
        ip = local.ip
    );
}

fn write_audio(out: &mut String, port: u16, law: Law, dtmf_pt: Option<u8>, dir: Direction) {
    let mut formats = law.payload_type().to_string();
    if let Some(pt) = dtmf_pt {
        let _ = write!(formats, " {pt}");
    }
    let _ = write!(
        out,
        "m=audio {port} RTP/AVP {formats}\r\na=rtpmap:{} {}/8000\r\n",
        law.payload_type(),
        law.name()
    );
    if let Some(pt) = dtmf_pt {
        let _ = write!(
            out,
            "a=rtpmap:{pt} telephone-event/8000\r\na=fmtp:{pt} 0-15\r\n"
        );
    }
    let _ = write!(out, "a=ptime:20\r\na={}\r\n", dir.attr());
}

/// An answer to `offer`: the stream `chosen` written by `accept`, every
/// other one refused with port 0 (RFC 3264 §6).
fn write_answer(
    offer: &Sdp,
    local: &LocalMedia,
    chosen: usize,
    accept: impl FnOnce(&mut String),
) -> String {
    let mut out = String::new();
    write_head(&mut out, local);
    let mut accept = Some(accept);
    for (i, media) in offer.media.iter().enumerate() {
        match accept.take_if(|_| i == chosen) {
            Some(write) => write(&mut out),
            None => {
                let _ = write!(
                    out,
                    "m={} 0 {} {}\r\n",
                    media.kind,
                    media.proto,
                    media.formats.join(" ")
                );
            }
        }
    }
    out
}

/// An offer of G.711 (both laws, µ-law first) and telephone-event.
pub fn offer(local: &LocalMedia, dtmf_pt: u8, dir: Direction) -> String {
    let mut out = String::new();
    write_head(&mut out, local);
    let _ = write!(
        out,
        "m=audio {} RTP/AVP 0 8 {dtmf_pt}\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
         a=rtpmap:{dtmf_pt} telephone-event/8000\r\na=fmtp:{dtmf_pt} 0-15\r\na=ptime:20\r\na={}\r\n",
        local.port,
        dir.attr()
    );
    out
}

fn pick(offer: &Sdp, m: &Media) -> Option<(Law, u8, Option<u8>)> {
    if m.kind != "audio" || m.port == 0 || !m.proto.starts_with("RTP/AVP") {
        return None;
    }
    let law = m.payload_types().find_map(|pt| {
        let (name, rate) = m.encoding(pt)?;
        let law = match name.to_ascii_uppercase().as_str() {
            "PCMU" => Law::Mu,
            "PCMA" => Law::A,
            _ => return None,
        };
        (rate == 8000).then_some((law, pt))
    })?;
    let dtmf = m.payload_types().find(|pt| {
        m.encoding(*pt)
            .is_some_and(|(n, r)| n.eq_ignore_ascii_case("telephone-event") && r == 8000)
    });
    let _ = offer;
    Some((law.0, law.1, dtmf))
}

fn remote_of(offer: &Sdp, m: &Media) -> Result<SocketAddr, SdpError> {
    let ip = m
        .connection
        .or(offer.connection)
        .ok_or_else(|| syntax("no c= line for the audio stream"))?;
    Ok(SocketAddr::new(ip, m.port))
}

/// Answers an offer (RFC 3264 §6): the first audio stream with a G.711
/// codec is accepted with the offerer's preferred law and telephone-event;
/// every other stream is refused with port 0. `hold` makes us the holding
/// side. No usable stream: [`SdpError::NotAcceptable`] (answer 488).
pub fn answer(offer: &Sdp, local: &LocalMedia) -> Result<(String, Negotiated), SdpError> {
    let chosen = offer
        .media
        .iter()
        .position(|m| pick(offer, m).is_some())
        .ok_or_else(|| SdpError::NotAcceptable("no G.711 audio stream offered".into()))?;
    let m = &offer.media[chosen];
    let (law, pt, dtmf) = pick(offer, m)
        .ok_or_else(|| SdpError::NotAcceptable("no G.711 audio stream offered".into()))?;
    let remote_direction = m
        .direction
        .or(offer.direction)
        .unwrap_or(Direction::SendRecv);
    let local_direction = remote_direction.answer();
    let remote = remote_of(offer, m)?;
    let out = write_answer(offer, local, chosen, |out| {
        write_audio(out, local.port, law, dtmf, local_direction);
    });
    Ok((
        out,
        Negotiated {
            law,
            payload_type: pt,
            dtmf_pt: dtmf,
            remote,
            remote_direction,
            local_direction,
        },
    ))
}

/// Reads the answer to our [`offer`].
pub fn accept_answer(answer: &Sdp) -> Result<Negotiated, SdpError> {
    let m = answer
        .media
        .iter()
        .find(|m| pick(answer, m).is_some())
        .ok_or_else(|| SdpError::NotAcceptable("the answer has no G.711 audio".into()))?;
    let (law, pt, dtmf) =
        pick(answer, m).ok_or_else(|| SdpError::NotAcceptable("no audio".into()))?;
    let remote_direction = m
        .direction
        .or(answer.direction)
        .unwrap_or(Direction::SendRecv);
    Ok(Negotiated {
        law,
        payload_type: pt,
        dtmf_pt: dtmf,
        remote: remote_of(answer, m)?,
        remote_direction,
        local_direction: remote_direction.answer(),
    })
}

/// T.38's error correction over UDPTL (`T38FaxUdpEC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpEc {
    /// `t38UDPRedundancy`: each datagram repeats the last IFPs.
    Redundancy,
    /// `t38UDPFEC`: parity over the last IFPs.
    Fec,
    /// None named.
    None,
}

/// What an exchange of T.38 streams settled (ITU-T T.38 Annex D).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct T38Stream {
    /// Where to send UDPTL.
    pub remote: SocketAddr,
    /// `T38FaxVersion`.
    pub version: u8,
    /// `T38MaxBitRate` (bits/s).
    pub max_bit_rate: u32,
    /// `T38FaxRateManagement:transferredTCF` (else `localTCF`).
    pub transferred_tcf: bool,
    /// The far end's `T38FaxMaxDatagram` (bytes; 400 when not said).
    pub max_datagram: u32,
    /// The error correction both use.
    pub ec: UdpEc,
}

/// The T.38 version (0 only: spandsp's terminal runs any, but version 0
/// is the one every endpoint speaks), bit rate and datagram size
/// Plugboard takes.
const T38_VERSION: u8 = 0;
const T38_MAX_BIT_RATE: u32 = 14_400;
const T38_MAX_DATAGRAM: u32 = 400;
const T38_MAX_BUFFER: u32 = 2_000;

impl T38Stream {
    /// Reads the T.38 stream `m` of `sdp`, held to what we take: version
    /// 0 (the lowest, which every T.38 endpoint speaks; an answer's
    /// version is at most the offer's) and at most 14,400 bit/s.
    fn of(sdp: &Sdp, m: &Media) -> Result<T38Stream, SdpError> {
        let number = |name: &str| m.attribute(name).and_then(|v| v.trim().parse::<u32>().ok());
        let ec = match m.attribute("T38FaxUdpEC") {
            Some(v) if v.eq_ignore_ascii_case("t38UDPRedundancy") => UdpEc::Redundancy,
            Some(v) if v.eq_ignore_ascii_case("t38UDPFEC") => UdpEc::Fec,
            _ => UdpEc::None,
        };
        Ok(T38Stream {
            remote: remote_of(sdp, m)?,
            version: T38_VERSION,
            max_bit_rate: number("T38MaxBitRate")
                .unwrap_or(T38_MAX_BIT_RATE)
                .min(T38_MAX_BIT_RATE),
            transferred_tcf: m
                .attribute("T38FaxRateManagement")
                .is_none_or(|v| !v.eq_ignore_ascii_case("localTCF")),
            max_datagram: number("T38FaxMaxDatagram").unwrap_or(T38_MAX_DATAGRAM),
            ec,
        })
    }
}

fn write_image(out: &mut String, port: u16, version: u8, rate: u32, transferred: bool, ec: UdpEc) {
    let tcf = if transferred {
        "transferredTCF"
    } else {
        "localTCF"
    };
    let _ = write!(
        out,
        "m=image {port} udptl t38\r\na=T38FaxVersion:{version}\r\na=T38MaxBitRate:{rate}\r\n\
         a=T38FaxRateManagement:{tcf}\r\na=T38FaxMaxBuffer:{T38_MAX_BUFFER}\r\n\
         a=T38FaxMaxDatagram:{T38_MAX_DATAGRAM}\r\n"
    );
    match ec {
        UdpEc::Redundancy => out.push_str("a=T38FaxUdpEC:t38UDPRedundancy\r\n"),
        UdpEc::Fec => out.push_str("a=T38FaxUdpEC:t38UDPFEC\r\n"),
        UdpEc::None => {}
    }
}

/// True when the SDP offers T.38.
pub fn offers_t38(sdp: &Sdp) -> bool {
    sdp.media.iter().any(Media::is_t38)
}

/// An offer to go over to T.38 (a fax call's re-INVITE): version 0,
/// 14,400 bit/s, transferred TCF, redundancy.
pub fn offer_t38(local: &LocalMedia) -> String {
    let mut out = String::new();
    write_head(&mut out, local);
    write_image(
        &mut out,
        local.port,
        T38_VERSION,
        T38_MAX_BIT_RATE,
        true,
        UdpEc::Redundancy,
    );
    out
}

/// Answers an offer of T.38: its first T.38 stream is accepted at the
/// lower version and bit rate of both sides, with the offerer's rate
/// management; redundancy is answered for redundancy or FEC (we send no
/// FEC, and take both), as FreeSWITCH does. Every other stream is refused
/// with port 0. No T.38 stream: [`SdpError::NotAcceptable`].
pub fn answer_t38(offer: &Sdp, local: &LocalMedia) -> Result<(String, T38Stream), SdpError> {
    let chosen = offer
        .media
        .iter()
        .position(Media::is_t38)
        .ok_or_else(|| SdpError::NotAcceptable("no T.38 stream offered".into()))?;
    let mut stream = T38Stream::of(offer, &offer.media[chosen])?;
    if stream.ec == UdpEc::Fec {
        stream.ec = UdpEc::Redundancy;
    }
    let out = write_answer(offer, local, chosen, |out| {
        write_image(
            out,
            local.port,
            stream.version,
            stream.max_bit_rate,
            stream.transferred_tcf,
            stream.ec,
        );
    });
    Ok((out, stream))
}

/// Reads the answer to our [`offer_t38`].
pub fn accept_t38_answer(answer: &Sdp) -> Result<T38Stream, SdpError> {
    let m = answer
        .media
        .iter()
        .find(|m| m.is_t38())
        .ok_or_else(|| SdpError::NotAcceptable("the answer has no T.38 stream".into()))?;
    T38Stream::of(answer, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIPP: &str = "v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\n\
        c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 8 0 101\r\n\
        a=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-11,16\r\n";

    fn local() -> LocalMedia {
        LocalMedia {
            ip: "127.0.0.1".parse().unwrap_or(IpAddr::from([127, 0, 0, 1])),
            port: 20000,
            session_id: 7,
            version: 1,
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn t38_offers_and_answers() {
        let offer = "v=0\r\no=gw 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n\
            m=audio 0 RTP/AVP 0\r\nm=image 4002 udptl t38\r\na=T38FaxVersion:1\r\n\
            a=T38MaxBitRate:33600\r\na=T38FaxRateManagement:transferredTCF\r\n\
            a=T38FaxMaxDatagram:300\r\na=T38FaxUdpEC:t38UDPFEC\r\n";
        let sdp = parse(offer).unwrap();
        assert!(offers_t38(&sdp));
        let (answer, stream) = answer_t38(&sdp, &local()).unwrap();
        assert_eq!(stream.remote, "127.0.0.2:4002".parse().unwrap());
        assert_eq!((stream.version, stream.max_bit_rate), (0, 14_400));
        assert_eq!((stream.max_datagram, stream.ec), (300, UdpEc::Redundancy));
        assert!(stream.transferred_tcf);
        assert!(answer.contains("m=audio 0 RTP/AVP 0\r\nm=image 20000 udptl t38\r\n"));
        assert!(answer.contains("a=T38FaxUdpEC:t38UDPRedundancy\r\n"));
        // Our own offer, answered by us, comes back the same.
        let ours = parse(&offer_t38(&local())).unwrap();
        let (back, _) = answer_t38(&ours, &local()).unwrap();
        let agreed = accept_t38_answer(&parse(&back).unwrap()).unwrap();
        assert_eq!(agreed.ec, UdpEc::Redundancy);
        assert_eq!(agreed.remote.port(), 20000);
        // Audio only: no T.38, and an audio answer is no T.38 answer.
        assert!(!offers_t38(&parse(SIPP).unwrap()));
        assert!(matches!(
            answer_t38(&parse(SIPP).unwrap(), &local()),
            Err(SdpError::NotAcceptable(_))
        ));
        assert!(accept_t38_answer(&parse(SIPP).unwrap()).is_err());
    }

    #[test]
    fn answers_the_offerers_first_g711_and_dtmf() {
        let offer = parse(SIPP).unwrap_or_else(|e| panic!("{e}"));
        let (text, n) = answer(&offer, &local()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((n.law, n.payload_type, n.dtmf_pt), (Law::A, 8, Some(101)));
        assert_eq!(n.remote.to_string(), "127.0.0.1:6000");
        assert!(!n.on_hold());
        assert!(text.contains("m=audio 20000 RTP/AVP 8 101\r\n"), "{text}");
        assert!(text.contains("a=sendrecv"));
        let back = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(accept_answer(&back).map(|n| n.law), Ok(Law::A));
    }

    #[test]
    fn hold_video_and_refusals() {
        let hold = SIPP.replace(
            "a=fmtp:101 0-11,16\r\n",
            "a=fmtp:101 0-11,16\r\na=sendonly\r\n",
        );
        let (text, n) = answer(&parse(&hold).unwrap_or_else(|e| panic!("{e}")), &local())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(n.on_hold() && text.contains("a=recvonly"));
        let old_hold = SIPP.replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0");
        let (_, n) = answer(
            &parse(&old_hold).unwrap_or_else(|e| panic!("{e}")),
            &local(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(n.on_hold());
        let video_first =
            "v=0\nc=IN IP4 10.0.0.1\nm=video 5000 RTP/AVP 31\nm=audio 5002 RTP/AVP 0\n";
        let (text, n) = answer(
            &parse(video_first).unwrap_or_else(|e| panic!("{e}")),
            &local(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(text.contains("m=video 0 RTP/AVP 31\r\n") && n.remote.port() == 5002);
        let g729 = "v=0\nc=IN IP4 10.0.0.1\nm=audio 5000 RTP/AVP 18\na=rtpmap:18 G729/8000\n";
        assert!(matches!(
            answer(&parse(g729).unwrap_or_else(|e| panic!("{e}")), &local()),
            Err(SdpError::NotAcceptable(_))
        ));
        for bad in [
            "",
            "garbage",
            "v=0\nm=audio x RTP/AVP 0",
            "v=0\nc=IN IP4 nope",
            "v=1",
        ] {
            assert!(matches!(parse(bad), Err(SdpError::Syntax(_))), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    /// Random SDP-alphabet text and mutated real offers: parse never
    /// panics, and whatever parses either answers or is refused cleanly.
    #[test]
    fn random_and_mutated_sdp_never_panics() {
        let seeds = [
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\n",
            "v=0\nc=IN IP6 ::1\nm=audio 5000 RTP/AVP 8\na=inactive\nm=video 0 RTP/AVP 31\n",
        ];
        let alphabet = b"vocmat=: /\r\n0123456789INP46RTAVPCMUsendrecvrtpmaptelephone-event.";
        let local = LocalMedia {
            ip: IpAddr::from([127, 0, 0, 1]),
            port: 4000,
            session_id: 1,
            version: 1,
        };
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut rnd = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n.max(1) as u64) as usize
        };
        let mut answered = 0;
        for round in 0..40_000 {
            let mut text: Vec<u8> = if round % 2 == 0 {
                (0..rnd(200))
                    .map(|_| alphabet[rnd(alphabet.len())])
                    .collect()
            } else {
                seeds[round % seeds.len()].as_bytes().to_vec()
            };
            for _ in 0..rnd(5) {
                let at = rnd(text.len() + 1);
                match rnd(3) {
                    0 if at < text.len() => text[at] = alphabet[rnd(alphabet.len())],
                    1 => text.insert(at, alphabet[rnd(alphabet.len())]),
                    _ => text.truncate(at),
                }
            }
            let s = String::from_utf8_lossy(&text);
            if let Ok(offer) = parse(&s)
                && let Ok((answer_text, _)) = answer(&offer, &local)
            {
                answered += 1;
                assert!(
                    parse(&answer_text).is_ok(),
                    "our answer must parse: {answer_text}"
                );
            }
        }
        assert!(answered > 1000, "{answered}");
    }
}
