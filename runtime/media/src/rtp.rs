//! RTP and RTCP for one G.711 stream: packetising 20 ms frames, a jitter
//! buffer with receive statistics (RFC 3550 appendix A), and RTCP sender
//! and receiver reports. Packet layouts come from `rtp-types` and
//! `rtcp-types`.

use std::collections::BTreeMap;

use rtcp_types::prelude::*;
use rtcp_types::{
    Compound, Packet, ReceiverReport, ReportBlock, Sdes, SdesChunk, SdesItem, SenderReport,
};
use rtp_types::{RtpPacket, RtpPacketBuilder};

use crate::audio::FRAME;
use crate::g711::Law;

/// A received RTP packet's fields, payload copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Payload type.
    pub payload_type: u8,
    /// Sequence number.
    pub seq: u16,
    /// Timestamp.
    pub timestamp: u32,
    /// SSRC.
    pub ssrc: u32,
    /// Marker bit.
    pub marker: bool,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Parses an RTP packet; `None` for anything that is not RTP version 2.
pub fn parse_rtp(bytes: &[u8]) -> Option<Received> {
    let p = RtpPacket::parse(bytes).ok()?;
    Some(Received {
        payload_type: p.payload_type(),
        seq: p.sequence_number(),
        timestamp: p.timestamp(),
        ssrc: p.ssrc(),
        marker: p.marker_bit(),
        payload: p.payload().to_vec(),
    })
}

/// True if a datagram on the RTP port is RTCP (RFC 5761 §4: packet types
/// 192–223 in the second byte).
pub fn is_rtcp(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && (192..=223).contains(&bytes[1])
}

/// Our outgoing stream.
#[derive(Debug)]
pub struct RtpSender {
    /// Our SSRC.
    pub ssrc: u32,
    law: Law,
    payload_type: u8,
    seq: u16,
    timestamp: u32,
    marker: bool,
    /// Packets sent.
    pub packets: u32,
    /// Payload octets sent.
    pub octets: u32,
    buf: Vec<u8>,
}

impl RtpSender {
    /// A stream with random-ish initial sequence number and timestamp
    /// (taken from `seed`, as RFC 3550 asks for unpredictable ones).
    pub fn new(ssrc: u32, law: Law, payload_type: u8, seed: u32) -> RtpSender {
        RtpSender {
            ssrc,
            law,
            payload_type,
            seq: (seed & 0xffff) as u16,
            timestamp: seed.rotate_left(16),
            marker: true,
            packets: 0,
            octets: 0,
            buf: Vec::with_capacity(FRAME),
        }
    }

    /// The RTP timestamp of the next frame.
    pub fn timestamp(&self) -> u32 {
        self.timestamp
    }

    /// Encodes one 20 ms frame (160 samples) into a packet.
    pub fn frame(&mut self, pcm: &[i16]) -> Vec<u8> {
        self.buf.clear();
        self.law.encode(pcm, &mut self.buf);
        let packet = RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(self.payload_type)
            .sequence_number(self.seq)
            .timestamp(self.timestamp)
            .ssrc(self.ssrc)
            .marker_bit(self.marker)
            .payload(self.buf.as_slice())
            .write_vec()
            .unwrap_or_default();
        self.marker = false;
        self.seq = self.seq.wrapping_add(1);
        self.timestamp = self.timestamp.wrapping_add(pcm.len() as u32);
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(self.buf.len() as u32);
        packet
    }

    /// Skips `frames` frames without sending (the timestamp advances, as
    /// during silence suppression), marking the next packet.
    pub fn skip(&mut self, frames: u32) {
        self.timestamp = self.timestamp.wrapping_add(frames * FRAME as u32);
        self.marker = true;
    }

    /// A telephone-event packet (RFC 4733) at the current timestamp.
    pub fn event(&mut self, dtmf_pt: u8, payload: [u8; 4], start: bool) -> Vec<u8> {
        let packet = RtpPacketBuilder::<&[u8], &[u8]>::new()
            .payload_type(dtmf_pt)
            .sequence_number(self.seq)
            .timestamp(self.timestamp)
            .ssrc(self.ssrc)
            .marker_bit(start)
            .payload(payload.as_slice())
            .write_vec()
            .unwrap_or_default();
        self.seq = self.seq.wrapping_add(1);
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(4);
        packet
    }
}

/// Receive statistics and a jitter buffer for the incoming stream.
#[derive(Debug)]
pub struct JitterBuffer {
    depth: usize,
    queue: BTreeMap<u64, Vec<u8>>,
    next: Option<u64>,
    started: bool,
    // RFC 3550 A.1 / A.8 state.
    base_seq: Option<u64>,
    max_seq: u64,
    received: u64,
    expected_prior: u64,
    received_prior: u64,
    jitter: f64,
    last_transit: Option<i64>,
    /// The sender's SSRC.
    pub remote_ssrc: Option<u32>,
    /// Packets dropped as too late or duplicate.
    pub late: u64,
    /// Frames played out as silence because their packet never came.
    pub concealed: u64,
    /// Middle 32 bits of the NTP time of the last SR, and when it came (ms).
    pub last_sr: Option<(u32, u64)>,
}

impl JitterBuffer {
    /// A buffer that starts playing out once `depth` packets are queued.
    pub fn new(depth: usize) -> JitterBuffer {
        JitterBuffer {
            depth: depth.max(1),
            queue: BTreeMap::new(),
            next: None,
            started: false,
            base_seq: None,
            max_seq: 0,
            received: 0,
            expected_prior: 0,
            received_prior: 0,
            jitter: 0.0,
            last_transit: None,
            remote_ssrc: None,
            late: 0,
            concealed: 0,
            last_sr: None,
        }
    }

    /// Extends a 16-bit sequence number to 64 bits near the highest seen.
    fn extend(&self, seq: u16) -> u64 {
        let Some(_) = self.base_seq else {
            return u64::from(seq) + (1 << 16);
        };
        let cycle = self.max_seq & !0xffff;
        let candidates = [cycle.wrapping_sub(1 << 16), cycle, cycle + (1 << 16)];
        candidates
            .iter()
            .map(|c| c + u64::from(seq))
            .min_by_key(|c| c.abs_diff(self.max_seq))
            .unwrap_or(u64::from(seq))
    }

    /// Adds a media packet; `arrival_ts` is the arrival time in timestamp
    /// units (8 kHz), for the jitter estimate.
    pub fn push(&mut self, p: &Received, arrival_ts: u32) {
        if self.remote_ssrc != Some(p.ssrc) {
            // A new source (e.g. after a transfer): start over.
            *self = JitterBuffer {
                remote_ssrc: Some(p.ssrc),
                ..JitterBuffer::new(self.depth)
            };
        }
        let ext = self.extend(p.seq);
        if self.base_seq.is_none() {
            self.base_seq = Some(ext);
            self.max_seq = ext;
        }
        self.max_seq = self.max_seq.max(ext);
        self.received += 1;
        let transit = i64::from(arrival_ts) - i64::from(p.timestamp);
        if let Some(last) = self.last_transit {
            let d = (transit - last).unsigned_abs() as f64;
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.last_transit = Some(transit);
        if self.next.is_some_and(|n| ext < n) || self.queue.contains_key(&ext) {
            self.late += 1;
            return;
        }
        self.queue.insert(ext, p.payload.clone());
        // Never hold more than a second.
        while self.queue.len() > 50 {
            self.queue.pop_first();
        }
    }

    /// The payload for the next 20 ms of playout: `Some` with the packet,
    /// `None` for silence (buffering, or a lost packet).
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        if !self.started {
            if self.queue.len() < self.depth {
                return None;
            }
            self.started = true;
            self.next = self.queue.keys().next().copied();
        }
        let next = self.next?;
        if let Some(payload) = self.queue.remove(&next) {
            self.next = Some(next + 1);
            return Some(payload);
        }
        if self.queue.is_empty() {
            // Underrun: rebuffer.
            self.started = false;
            return None;
        }
        self.concealed += 1;
        self.next = Some(next + 1);
        None
    }

    /// Packets lost so far (expected minus received; may be negative with
    /// duplicates).
    pub fn cumulative_lost(&self) -> i64 {
        let Some(base) = self.base_seq else {
            return 0;
        };
        (self.max_seq - base + 1) as i64 - self.received as i64
    }

    /// Interarrival jitter in timestamp units.
    pub fn jitter(&self) -> u32 {
        self.jitter as u32
    }

    /// A report block for RTCP (updates the interval counters).
    pub fn report_block(&mut self, now_ms: u64) -> Option<(u32, u8, u32, u32, u32, u32, u32)> {
        let ssrc = self.remote_ssrc?;
        let base = self.base_seq?;
        let expected = self.max_seq - base + 1;
        let expected_interval = expected - self.expected_prior;
        let received_interval = self.received - self.received_prior;
        self.expected_prior = expected;
        self.received_prior = self.received;
        let lost_interval = expected_interval.saturating_sub(received_interval);
        let fraction = (lost_interval << 8)
            .checked_div(expected_interval)
            .unwrap_or(0)
            .min(255) as u8;
        let (lsr, dlsr) = match self.last_sr {
            Some((lsr, at)) => (lsr, ((now_ms.saturating_sub(at)) * 65536 / 1000) as u32),
            None => (0, 0),
        };
        Some((
            ssrc,
            fraction,
            self.cumulative_lost().clamp(0, 0x7f_ffff) as u32,
            (self.max_seq & 0xffff_ffff) as u32,
            self.jitter(),
            lsr,
            dlsr,
        ))
    }
}

/// Converts a Unix time in ms to a 64-bit NTP timestamp.
pub fn ntp_timestamp(unix_ms: u64) -> u64 {
    let secs = unix_ms / 1000 + 2_208_988_800;
    let frac = ((unix_ms % 1000) << 32) / 1000;
    (secs << 32) | frac
}

/// Builds a compound RTCP packet: a sender report (if we sent anything)
/// or receiver report, with a report block on the remote stream, and an
/// SDES CNAME.
pub fn rtcp_report(
    sender: &RtpSender,
    receiver: &mut JitterBuffer,
    unix_ms: u64,
    cname: &str,
) -> Vec<u8> {
    let block =
        receiver
            .report_block(unix_ms)
            .map(|(ssrc, fraction, lost, ext, jitter, lsr, dlsr)| {
                ReportBlock::builder(ssrc)
                    .fraction_lost(fraction)
                    .cumulative_lost(lost)
                    .extended_sequence_number(ext)
                    .interarrival_jitter(jitter)
                    .last_sender_report_timestamp(lsr)
                    .delay_since_last_sender_report_timestamp(dlsr)
            });
    let sdes = Sdes::builder().add_chunk(
        SdesChunk::builder(sender.ssrc).add_item(SdesItem::builder(SdesItem::CNAME, cname)),
    );
    let compound = if sender.packets > 0 {
        let mut sr = SenderReport::builder(sender.ssrc)
            .ntp_timestamp(ntp_timestamp(unix_ms))
            .rtp_timestamp(sender.timestamp())
            .packet_count(sender.packets)
            .octet_count(sender.octets);
        if let Some(b) = block {
            sr = sr.add_report_block(b);
        }
        Compound::builder().add_packet(sr).add_packet(sdes)
    } else {
        let mut rr = ReceiverReport::builder(sender.ssrc);
        if let Some(b) = block {
            rr = rr.add_report_block(b);
        }
        Compound::builder().add_packet(rr).add_packet(sdes)
    };
    let Ok(size) = compound.calculate_size() else {
        return Vec::new();
    };
    let mut buf = vec![0u8; size];
    match compound.write_into(&mut buf) {
        Ok(_) => buf,
        Err(_) => Vec::new(),
    }
}

/// What an incoming RTCP packet told us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RtcpInfo {
    /// The remote's sender report: middle 32 bits of its NTP time.
    pub sender_report: Option<u32>,
    /// Loss the remote reports on our stream (fraction/256, cumulative).
    pub remote_loss: Option<(u8, u32)>,
    /// Jitter the remote reports on our stream.
    pub remote_jitter: Option<u32>,
    /// The remote said BYE.
    pub bye: bool,
}

/// Reads an incoming compound RTCP packet.
pub fn parse_rtcp(bytes: &[u8], our_ssrc: u32) -> Option<RtcpInfo> {
    let compound = Compound::parse(bytes).ok()?;
    let mut info = RtcpInfo::default();
    for packet in compound {
        let Ok(packet) = packet else { break };
        let blocks: Vec<(u32, u8, u32, u32)> = match &packet {
            Packet::Sr(sr) => {
                info.sender_report = Some((sr.ntp_timestamp() >> 16) as u32);
                sr.report_blocks()
                    .map(|b| {
                        (
                            b.ssrc(),
                            b.fraction_lost(),
                            b.cumulative_lost(),
                            b.interarrival_jitter(),
                        )
                    })
                    .collect()
            }
            Packet::Rr(rr) => rr
                .report_blocks()
                .map(|b| {
                    (
                        b.ssrc(),
                        b.fraction_lost(),
                        b.cumulative_lost(),
                        b.interarrival_jitter(),
                    )
                })
                .collect(),
            Packet::Bye(_) => {
                info.bye = true;
                Vec::new()
            }
            _ => Vec::new(),
        };
        for (ssrc, fraction, lost, jitter) in blocks {
            if ssrc == our_ssrc {
                info.remote_loss = Some((fraction, lost));
                info.remote_jitter = Some(jitter);
            }
        }
    }
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip_and_jitter_buffer_reorders() {
        let mut tx = RtpSender::new(0x1234, Law::Mu, 0, 0xfffe_0000);
        let frames: Vec<Vec<u8>> = (0..6)
            .map(|i| tx.frame(&vec![i as i16 * 1000; FRAME]))
            .collect();
        let first = parse_rtp(&frames[0]).unwrap_or_else(|| panic!("not RTP"));
        assert!(first.marker && first.payload.len() == FRAME && first.seq == 0);
        assert!(!parse_rtp(&frames[1]).is_some_and(|p| p.marker));
        let mut jb = JitterBuffer::new(2);
        // Arrive out of order, one lost (#3), one duplicate.
        for i in [0usize, 2, 1, 2, 4, 5] {
            let p = parse_rtp(&frames[i]).unwrap_or_else(|| panic!("not RTP"));
            jb.push(&p, 160 * i as u32);
        }
        let mut out = Vec::new();
        for _ in 0..6 {
            out.push(jb.pop().map(|p| p[0]));
        }
        let code = |v: i16| {
            let mut b = Vec::new();
            Law::Mu.encode(&[v], &mut b);
            b[0]
        };
        let want = vec![
            Some(code(0)),
            Some(code(1000)),
            Some(code(2000)),
            None,
            Some(code(4000)),
            Some(code(5000)),
        ];
        assert!(out == want, "{out:?}");
        assert_eq!(
            jb.cumulative_lost(),
            0,
            "a duplicate offsets the loss in RFC 3550 counting"
        );
        assert_eq!((jb.late, jb.concealed), (1, 1));
    }

    #[test]
    fn sequence_wraps() {
        let mut tx = RtpSender::new(1, Law::A, 8, 0x0000_fffd);
        let mut jb = JitterBuffer::new(1);
        for i in 0..6u32 {
            let p = parse_rtp(&tx.frame(&[0; FRAME])).unwrap_or_else(|| panic!("not RTP"));
            jb.push(&p, i * 160);
            assert!(jb.pop().is_some(), "frame {i}");
        }
        assert_eq!(jb.cumulative_lost(), 0);
    }

    #[test]
    fn rtcp_reports_parse_back() {
        let mut tx = RtpSender::new(0xabc, Law::Mu, 0, 7);
        let mut jb = JitterBuffer::new(1);
        let mut remote = RtpSender::new(0xdef, Law::Mu, 0, 99);
        for i in 0..10u32 {
            tx.frame(&[0; FRAME]);
            let p = parse_rtp(&remote.frame(&[0; FRAME])).unwrap_or_else(|| panic!("not RTP"));
            if i != 4 {
                jb.push(&p, i * 160);
            }
        }
        let bytes = rtcp_report(&tx, &mut jb, 1_700_000_000_000, "plugboard@127.0.0.1");
        assert!(is_rtcp(&bytes));
        let info = parse_rtcp(&bytes, 0xdef).unwrap_or_else(|| panic!("not RTCP"));
        assert!(info.sender_report.is_some());
        assert_eq!(info.remote_loss, Some((25, 1)), "1 of 10 lost = 25/256");
        assert!(parse_rtcp(b"garbage!", 1).is_none());
        assert!(!is_rtcp(&tx.frame(&[0; FRAME])));
    }
}
