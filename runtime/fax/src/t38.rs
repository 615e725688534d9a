//! T.38 transport: the session parameters both sides agreed in SDP, and
//! UDPTL (T.38 §9.1) framing of the IFP packets spandsp makes and takes.
//!
//! The packet codec and the in-order, duplicate-free delivery of
//! redundant IFPs are the `udptl` crate's (MIT). What is added here is the
//! sender's side of redundancy — each datagram carries, after its own IFP,
//! the last few it sent, newest first, as FreeSWITCH's `udptl.c` and
//! Asterisk's `udptl.c` do — and the sequence numbering.

use std::collections::VecDeque;

use udptl::{RedundancyReceiver, UdptlPacket};

/// Redundant IFPs carried in each datagram (`T38FaxUdpEC:
/// t38UDPRedundancy`): FreeSWITCH's and Asterisk's default depth.
pub const REDUNDANCY: usize = 3;

/// What an `m=image … udptl t38` offer and answer agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// `T38FaxVersion` (the lower of both sides').
    pub version: u8,
    /// `T38MaxBitRate` (bits/s).
    pub max_bit_rate: u32,
    /// `T38FaxRateManagement:transferredTCF` (else `localTCF`).
    pub transferred_tcf: bool,
    /// `T38FaxMaxDatagram`: the largest datagram the far end takes.
    pub max_datagram: u32,
    /// Redundant IFPs to send in each datagram (0: none, as for
    /// `T38FaxUdpEC:t38UDPFEC` or no error correction, whose FEC we
    /// receive but do not send).
    pub redundancy: usize,
}

impl Default for Params {
    /// What Plugboard offers: version 0, 14,400 bit/s, transferred TCF,
    /// 400-byte datagrams, redundancy.
    fn default() -> Params {
        Params {
            version: 0,
            max_bit_rate: 14_400,
            transferred_tcf: true,
            max_datagram: 400,
            redundancy: REDUNDANCY,
        }
    }
}

/// UDPTL framing for one T.38 session.
#[derive(Debug, Default)]
pub struct Udptl {
    /// The next sequence number to send.
    seq: u16,
    /// The IFPs last sent, newest first.
    recent: VecDeque<Vec<u8>>,
    /// How many of them each datagram carries.
    redundancy: usize,
    rx: RedundancyReceiver,
    /// Datagrams received that were not UDPTL.
    malformed: u64,
}

impl Udptl {
    /// Framing that carries `redundancy` earlier IFPs in each datagram.
    pub fn new(redundancy: usize) -> Udptl {
        Udptl {
            redundancy,
            ..Udptl::default()
        }
    }

    /// The datagram that sends `ifp`.
    pub fn send(&mut self, ifp: Vec<u8>) -> Vec<u8> {
        let redundant: Vec<Vec<u8>> = self.recent.iter().cloned().collect();
        let datagram = UdptlPacket::with_redundancy(self.seq, ifp.clone(), redundant).encode();
        self.seq = self.seq.wrapping_add(1);
        if self.redundancy > 0 {
            self.recent.push_front(ifp);
            self.recent.truncate(self.redundancy);
        }
        datagram
    }

    /// The IFPs a datagram brings that were not seen yet, oldest first,
    /// with their sequence numbers (those lost before and carried again
    /// as redundancy come first). A datagram that is not UDPTL brings
    /// nothing and is counted.
    pub fn receive(&mut self, datagram: &[u8]) -> Vec<(u16, Vec<u8>)> {
        match UdptlPacket::decode(datagram) {
            Ok(packet) => self
                .rx
                .receive(&packet)
                .into_iter()
                .map(|r| (r.sequence, r.payload))
                .collect(),
            Err(_) => {
                self.malformed += 1;
                Vec::new()
            }
        }
    }

    /// Datagrams received that were not UDPTL.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_datagram_is_recovered_from_the_next_ones_redundancy() {
        let (mut tx, mut rx) = (Udptl::new(REDUNDANCY), Udptl::new(REDUNDANCY));
        let sent: Vec<Vec<u8>> = (0..6u8).map(|i| vec![0x40 | i, i]).collect();
        let datagrams: Vec<Vec<u8>> = sent.iter().map(|ifp| tx.send(ifp.clone())).collect();
        // The wire form of the first: seq 0, the IFP as an open type,
        // redundancy chosen (0x00) with no earlier IFP.
        assert_eq!(datagrams[0], vec![0, 0, 2, 0x40, 0, 0x00, 0]);
        let mut got = Vec::new();
        for (i, d) in datagrams.iter().enumerate() {
            // Datagrams 1 and 2 are lost; 4 arrives twice.
            if i == 1 || i == 2 {
                continue;
            }
            got.extend(rx.receive(d));
            if i == 4 {
                got.extend(rx.receive(d));
            }
        }
        let seqs: Vec<u16> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(
            got.into_iter().map(|(_, ifp)| ifp).collect::<Vec<_>>(),
            sent
        );
        assert!(rx.receive(b"\x00").is_empty());
        assert_eq!(rx.malformed(), 1);
    }
}
