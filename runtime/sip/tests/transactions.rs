//! The transaction layer in virtual time: retransmissions, timeouts,
//! ACK and CANCEL matching, over UDP and TCP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use plugboard_sip::transaction::{ack_for, to_tag};
use plugboard_sip::{
    Message, Method, Peer, Request, ServerTxId, TimerConfig, Transactions, Transport, TxEvent,
    UasPolicy, new_branch, parse_datagram, reply, screen,
};

fn peer(transport: Transport) -> Peer {
    let addr: SocketAddr = "127.0.0.1:5070".parse().unwrap_or_else(|e| panic!("{e}"));
    Peer { addr, transport }
}

fn invite(branch: &str) -> Vec<u8> {
    format!(
        "INVITE sip:100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch={branch}\r\n\
         From: <sip:alice@127.0.0.1>;tag=a1\r\nTo: <sip:100@127.0.0.1>\r\nCall-ID: c1@x\r\n\
         CSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn with_method(bytes: &[u8], method: &str, to_tag: Option<&str>) -> Vec<u8> {
    let s = String::from_utf8_lossy(bytes)
        .replacen("INVITE sip", &format!("{method} sip"), 1)
        .replace("CSeq: 1 INVITE", &format!("CSeq: 1 {method}"));
    match to_tag {
        Some(t) => s.replace(
            "To: <sip:100@127.0.0.1>",
            &format!("To: <sip:100@127.0.0.1>;tag={t}"),
        ),
        None => s,
    }
    .into_bytes()
}

struct Harness {
    tx: Transactions,
    now: Instant,
    policy: UasPolicy,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            tx: Transactions::new(TimerConfig::default()),
            now: Instant::now(),
            policy: UasPolicy::default(),
        }
    }

    fn receive(&mut self, p: Peer, bytes: &[u8]) {
        self.tx
            .handle(self.now, p, screen(parse_datagram(bytes), &self.policy));
    }

    fn sent(&mut self) -> Vec<Message> {
        std::iter::from_fn(|| self.tx.poll_transmit())
            .map(|t| parse_datagram(&t.bytes).unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    fn events(&mut self) -> Vec<TxEvent> {
        std::iter::from_fn(|| self.tx.poll_event()).collect()
    }

    /// A new INVITE arrives over UDP (its 100 is dropped): its bytes,
    /// transaction and request.
    fn new_invite(&mut self) -> (Vec<u8>, ServerTxId, Box<Request>) {
        let inv = invite(&new_branch());
        self.receive(peer(Transport::Udp), &inv);
        self.sent();
        let Some(TxEvent::Request { id, request, .. }) = self.events().pop() else {
            panic!("no request")
        };
        (inv, id, request)
    }

    /// Advances virtual time to `until`, firing timers; returns the offsets
    /// (ms from start) at which something was sent.
    fn run_until(&mut self, start: Instant, until: Duration) -> Vec<u128> {
        let mut at = Vec::new();
        while let Some(t) = self.tx.poll_timeout() {
            if t > start + until {
                break;
            }
            self.now = t;
            self.tx.handle_timeout(t);
            for _ in self.sent() {
                at.push((t - start).as_millis());
            }
        }
        at
    }
}

fn status(m: &Message) -> u16 {
    match m {
        Message::Response(r) => r.status,
        Message::Request(_) => 0,
    }
}

#[test]
fn invite_server_retransmits_final_until_ack_over_udp() {
    let mut h = Harness::new();
    let udp = peer(Transport::Udp);
    let inv = invite(&new_branch());
    h.receive(udp, &inv);
    assert_eq!(h.sent().iter().map(status).collect::<Vec<_>>(), vec![100]);
    let events = h.events();
    let [TxEvent::Request { id, request, .. }] = events.as_slice() else {
        panic!("{events:?}")
    };
    // A retransmitted INVITE is absorbed and answered with the last response.
    h.receive(udp, &inv);
    assert_eq!(h.sent().iter().map(status).collect::<Vec<_>>(), vec![100]);
    assert!(h.events().is_empty());
    let start = h.now;
    h.tx.respond(h.now, *id, reply(request, 486, "Busy Here", Some("t1")));
    assert_eq!(h.sent().iter().map(status).collect::<Vec<_>>(), vec![486]);
    // Timer G: 0.5 s, then doubling up to T2 = 4 s.
    assert_eq!(
        h.run_until(start, Duration::from_millis(8000)),
        vec![500, 1500, 3500, 7500]
    );
    h.receive(udp, &with_method(&inv, "ACK", Some("t1")));
    assert!(h.sent().is_empty());
    assert!(
        h.events().is_empty(),
        "the ACK of a non-2xx stays in the transaction"
    );
    // Confirmed: no more retransmissions; forgotten after T4.
    assert!(h.run_until(start, Duration::from_secs(40)).is_empty());
    assert_eq!(h.tx.len(), (0, 0));
}

#[test]
fn invite_server_without_ack_times_out_after_64_t1() {
    let mut h = Harness::new();
    let (_, id, request) = h.new_invite();
    let start = h.now;
    h.tx.respond(h.now, id, reply(&request, 603, "Decline", Some("t")));
    h.sent();
    let sends = h.run_until(start, Duration::from_secs(33));
    assert_eq!(
        sends,
        vec![
            500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
        ]
    );
    let events = h.events();
    assert!(
        matches!(events.as_slice(), [TxEvent::NoAck { .. }]),
        "{events:?}"
    );
    assert_eq!(h.now - start, Duration::from_secs(32));
}

#[test]
fn cancel_matches_pending_invite_and_2xx_ack_goes_to_the_dialog() {
    let mut h = Harness::new();
    let udp = peer(Transport::Udp);
    let inv = invite(&new_branch());
    h.receive(udp, &inv);
    h.sent();
    let Some(TxEvent::Request { id, request, .. }) = h.events().pop() else {
        panic!("no request")
    };
    h.receive(udp, &with_method(&inv, "CANCEL", None));
    assert_eq!(h.sent().iter().map(status).collect::<Vec<_>>(), vec![200]);
    let events = h.events();
    assert!(matches!(events.as_slice(), [TxEvent::Cancelled { invite }] if *invite == id));
    h.tx.respond(
        h.now,
        id,
        reply(&request, 487, "Request Terminated", Some("t")),
    );
    assert_eq!(h.sent().iter().map(status).collect::<Vec<_>>(), vec![487]);
    // A CANCEL for nothing gets 481.
    h.receive(udp, &with_method(&invite(&new_branch()), "CANCEL", None));
    assert_eq!(h.sent().iter().map(status).collect::<Vec<_>>(), vec![481]);

    // 2xx: the ACK (new branch) is the dialog's, and INVITE copies are absorbed.
    let inv2 = invite(&new_branch());
    h.receive(udp, &inv2);
    h.sent();
    let Some(TxEvent::Request { id, request, .. }) = h.events().pop() else {
        panic!("no request")
    };
    h.tx.respond(h.now, id, reply(&request, 200, "OK", Some("t2")));
    assert_eq!(h.sent().len(), 1);
    h.receive(udp, &inv2);
    assert!(h.sent().is_empty() && h.events().is_empty());
    let ack = String::from_utf8_lossy(&with_method(&inv2, "ACK", Some("t2")))
        .replace("branch=z9hG4bK", "branch=z9hG4bKack")
        .into_bytes();
    h.receive(udp, &ack);
    let events = h.events();
    assert!(
        matches!(events.as_slice(), [TxEvent::Ack { .. }]),
        "{events:?}"
    );
}

#[test]
fn client_transactions_retransmit_time_out_and_ack_failures() {
    let mut h = Harness::new();
    let udp = peer(Transport::Udp);
    // Non-INVITE over UDP: timer E doubles to T2, timer F at 64*T1.
    let mut bye = Request::new(Method::Bye, "sip:alice@127.0.0.1:5070");
    bye.headers.push(
        "Via",
        format!("SIP/2.0/UDP 127.0.0.1:5060;branch={}", new_branch()),
    );
    for (n, v) in [
        ("From", "<sip:100@x>;tag=1"),
        ("To", "<sip:a@y>;tag=2"),
        ("Call-ID", "b@x"),
        ("CSeq", "2 BYE"),
    ] {
        bye.headers.push(n, v);
    }
    let start = h.now;
    let id = h.tx.send_request(h.now, udp, bye);
    assert_eq!(h.sent().len(), 1);
    let sends = h.run_until(start, Duration::from_secs(33));
    assert_eq!(
        sends,
        vec![
            500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
        ]
    );
    let events = h.events();
    assert!(matches!(events.as_slice(), [TxEvent::Timeout { id: t }] if *t == id));

    // INVITE over UDP answered 486: we ACK, and ACK again for a copy.
    let mut inv = Request::new(Method::Invite, "sip:bob@127.0.0.1:5070");
    inv.headers.push(
        "Via",
        format!("SIP/2.0/UDP 127.0.0.1:5060;branch={}", new_branch()),
    );
    for (n, v) in [
        ("From", "<sip:100@x>;tag=1"),
        ("To", "<sip:bob@y>"),
        ("Call-ID", "i@x"),
        ("CSeq", "1 INVITE"),
    ] {
        inv.headers.push(n, v);
    }
    let id = h.tx.send_request(h.now, udp, inv.clone());
    h.sent();
    let busy = reply(&inv, 486, "Busy Here", Some("b1")).to_bytes();
    h.receive(udp, &busy);
    let sent = h.sent();
    let [Message::Request(ack)] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert_eq!(ack.method, Method::Ack);
    assert_eq!(ack.headers.get("CSeq"), Some("1 ACK"));
    assert!(ack.headers.get("To").is_some_and(|t| t.contains("tag=b1")));
    let events = h.events();
    assert!(
        matches!(events.as_slice(), [TxEvent::Response { id: r, response }] if *r == id && response.status == 486)
    );
    h.receive(udp, &busy);
    assert_eq!(h.sent().len(), 1, "ACK repeated for a retransmitted 486");
    assert!(h.events().is_empty());
    let resp = reply(&inv, 486, "Busy Here", Some("b1"));
    assert_eq!(to_tag(&resp).as_deref(), Some("b1"));
    assert_eq!(ack_for(&inv, &resp).headers.get("Call-ID"), Some("i@x"));
}

#[test]
fn tcp_never_retransmits() {
    let mut h = Harness::new();
    let tcp = peer(Transport::Tcp);
    h.receive(tcp, &invite(&new_branch()));
    h.sent();
    let Some(TxEvent::Request { id, request, .. }) = h.events().pop() else {
        panic!("no request")
    };
    let start = h.now;
    h.tx.respond(
        h.now,
        id,
        reply(&request, 480, "Temporarily Unavailable", Some("t")),
    );
    h.sent();
    assert!(h.run_until(start, Duration::from_secs(40)).is_empty());
    assert!(matches!(h.events().as_slice(), [TxEvent::NoAck { .. }]));
}

#[test]
fn an_invite_the_tu_never_answers_is_reported_then_forgotten() {
    use plugboard_sip::transaction::UNANSWERED_INVITE;
    for tu_answers in [true, false] {
        let mut h = Harness::new();
        let (_, id, request) = h.new_invite();
        let start = h.now;
        assert!(h.run_until(start, UNANSWERED_INVITE).is_empty());
        assert_eq!(h.now - start, UNANSWERED_INVITE);
        let events = h.events();
        assert!(
            matches!(events.as_slice(), [TxEvent::Unanswered { id: i }] if *i == id),
            "{events:?}"
        );
        let answered = h.now;
        if tu_answers {
            h.tx.respond(
                h.now,
                id,
                reply(&request, 500, "Server Internal Error", Some("t")),
            );
            assert_eq!(h.sent().iter().map(status).collect::<Vec<_>>(), vec![500]);
            assert!(!h.tx.reject(h.now, id, 500, "u"), "answered already");
        } else {
            // A TU that lost the request answers from what the layer kept.
            assert!(h.tx.reject(h.now, id, 500, "u"));
            let sent = h.sent();
            let [Message::Response(r)] = sent.as_slice() else {
                panic!("{sent:?}")
            };
            assert_eq!(r.status, 500);
            assert!(r.headers.get("To").is_some_and(|t| t.ends_with(";tag=u")));
            for name in ["Via", "From", "Call-ID", "CSeq"] {
                assert_eq!(r.headers.get(name), request.headers.get(name), "{name}");
            }
        }
        let sends = h.run_until(answered, Duration::from_secs(33));
        // Retransmitted as any final answer until timer H (64·T1).
        assert_eq!(sends.first(), Some(&500));
        assert_eq!(sends.last(), Some(&31500), "{sends:?}");
        assert!(matches!(h.events().as_slice(), [TxEvent::NoAck { .. }]));
        assert_eq!(h.tx.len(), (0, 0), "answered by the TU: {tu_answers}");
    }
}

#[test]
fn past_the_bound_a_new_request_gets_503_and_no_transaction() {
    let mut h = Harness::new();
    h.tx.set_max_servers(2);
    let udp = peer(Transport::Udp);
    for _ in 0..2 {
        h.receive(udp, &invite(&new_branch()));
        assert_eq!(h.sent().iter().map(status).collect::<Vec<_>>(), vec![100]);
    }
    assert_eq!(h.events().len(), 2);
    let third = invite(&new_branch());
    h.receive(udp, &third);
    let sent = h.sent();
    assert_eq!(sent.iter().map(status).collect::<Vec<_>>(), vec![503]);
    let Message::Response(r) = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_eq!(r.headers.get("Retry-After"), Some("5"));
    assert!(h.events().is_empty());
    assert_eq!(h.tx.len(), (2, 0));
    // An ACK needs no transaction and still goes through.
    h.receive(udp, &with_method(&third, "ACK", Some("x")));
    assert!(matches!(h.events().as_slice(), [TxEvent::Ack { .. }]));
}

#[test]
fn an_invite_answered_in_time_is_never_reported_unanswered() {
    use plugboard_sip::transaction::UNANSWERED_INVITE;
    for code in [200u16, 486] {
        let mut h = Harness::new();
        let (inv, id, request) = h.new_invite();
        let start = h.now;
        h.tx.respond(h.now, id, reply(&request, code, "Answer", Some("t")));
        if code >= 300 {
            h.receive(peer(Transport::Udp), &with_method(&inv, "ACK", Some("t")));
        }
        h.run_until(start, UNANSWERED_INVITE + Duration::from_secs(60));
        let events = h.events();
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, TxEvent::Unanswered { .. })),
            "{code}: {events:?}"
        );
        assert_eq!(h.tx.len(), (0, 0));
        assert_eq!(h.tx.timers_len(), 0);
    }
}
