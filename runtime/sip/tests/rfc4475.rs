//! Every RFC 4475 torture message, as datagram and as stream, handled as
//! `../shared/conformance/sip-rfc4475/README.md` says.

use std::path::PathBuf;

use plugboard_sip::{Framed, Inbound, StreamFramer, UasPolicy, parse_datagram, screen};

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/sip-rfc4475")
}

/// What a UAS does with a message: act on it, answer with a status, or
/// not answer at all (responses and what cannot be answered).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Outcome {
    Accept,
    Status(u16),
    Silent,
}

fn outcome(inbound: Inbound) -> Outcome {
    match inbound {
        Inbound::Request(..) => Outcome::Accept,
        Inbound::Reply(r) => Outcome::Status(r.status),
        Inbound::Response(_) | Inbound::Drop(_) => Outcome::Silent,
    }
}

/// The expectations of the README table; `None` where RFC 4475 allows
/// either accepting or 400.
fn expected(name: &str) -> Option<Outcome> {
    use Outcome::*;
    Some(match name {
        "wsinv" | "esc01" | "escnull" | "lwsdisp" | "longreq" | "dblreq" | "semiuri"
        | "transports" | "badbranch" | "unksm2" | "regaut01" | "cparam01" | "cparam02"
        | "regescrt" | "inv2543" => Accept,
        // The README's 483 is the proxy answer; RFC 4475 §3.3.11: "An
        // endpoint should process the request as if the Max-Forwards field
        // value were still positive."
        "zeromf" => Accept,
        "intmeth" | "esc02" => Status(501),
        // A MESSAGE: well-formed, but not a method we implement.
        "mpart01" => Status(405),
        // soap.beep: a well-formed URI of a scheme we do not serve.
        "novelsc" => Status(416),
        "unreason" | "noreason" | "bigcode" | "scalarlg" | "bcast" => Silent,
        "badinv01" | "clerr" | "ncl" | "scalar02" | "quotbal" | "ltgtruri" | "lwsruri"
        | "baddn" | "mismatch01" | "mismatch02" | "insuf" | "multi01" | "mcl01" => Status(400),
        "badvers" => Status(505),
        "unkscm" => Status(416),
        "bext01" => Status(420),
        "invut" => Status(415),
        "sdp01" => Status(406),
        "lwsstart" | "trws" | "escruri" | "baddate" | "regbadct" | "badaspec" => return None,
        other => panic!("unknown corpus file {other}"),
    })
}

fn files() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus())
        .unwrap_or_else(|e| panic!("corpus at {}: {e}", corpus().display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "dat"))
        .map(|p| {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            (
                name,
                std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn all_49_as_datagrams() {
    let policy = UasPolicy::default();
    let files = files();
    assert_eq!(files.len(), 49);
    let mut failures = Vec::new();
    for (name, bytes) in &files {
        let got = outcome(screen(parse_datagram(bytes), &policy));
        match expected(name) {
            Some(want) if want != got => {
                failures.push(format!("{name}: want {want:?}, got {got:?}"))
            }
            None if !matches!(got, Outcome::Accept | Outcome::Status(400)) => {
                failures.push(format!("{name}: want accept or 400, got {got:?}"))
            }
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Over a stream the same messages frame by Content-Length; a message whose
/// body is shorter than announced just waits for more bytes (clerr), and
/// bytes after a message are the next message (dblreq).
#[test]
fn all_49_as_stream_never_panic_and_agree() {
    let policy = UasPolicy::default();
    for (name, bytes) in files() {
        let mut framer = StreamFramer::new();
        // Feed in small pieces to exercise partial reads.
        let mut results = Vec::new();
        for chunk in bytes.chunks(7) {
            framer.push(chunk);
            loop {
                match framer.next_message() {
                    Ok(Some(Framed::Message(m))) => results.push(outcome(screen(Ok(m), &policy))),
                    Ok(Some(Framed::KeepAlive)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        results.push(outcome(screen(Err(e), &policy)));
                        break;
                    }
                }
            }
            if results
                .last()
                .is_some_and(|o| matches!(o, Outcome::Status(400)))
            {
                break;
            }
        }
        let first = results.first().copied();
        match (name.as_str(), expected(&name)) {
            // Framing differs from UDP only for these.
            ("clerr", _) => assert_eq!(first, None, "{name}"),
            (_, Some(want)) if first.is_some() => assert_eq!(first, Some(want), "{name}"),
            _ => {}
        }
    }
}

fn reply_to(name: &str) -> plugboard_sip::Response {
    let bytes = std::fs::read(corpus().join(format!("{name}.dat")))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    match screen(parse_datagram(&bytes), &UasPolicy::default()) {
        Inbound::Reply(r) => *r,
        other => panic!("{name}: expected a reply, got {other:?}"),
    }
}

/// The refusals carry what RFC 3261 asks for, and every reply can be
/// matched by the sender: its Via, Call-ID and CSeq are copied, a To tag
/// is added, and the reply itself parses.
#[test]
fn refusals_carry_the_right_headers() {
    let r = reply_to("intmeth");
    assert!(r.headers.get("Allow").is_some_and(|a| a.contains("INVITE")));
    assert_eq!(
        r.headers.get("CSeq"),
        Some("139122385 !interesting-Method0123456789_*+`.%indeed'~")
    );
    let r = reply_to("bext01");
    assert_eq!(
        r.headers.get("Unsupported"),
        Some("nothingSupportsThis, nothingSupportsThisEither")
    );
    let r = reply_to("invut");
    assert!(
        r.headers
            .get("Accept")
            .is_some_and(|a| a.contains("application/sdp"))
    );
    let r = reply_to("sdp01");
    assert_eq!(r.status, 406);
    assert!(
        r.headers
            .get("Warning")
            .is_some_and(|w| w.starts_with("399 "))
    );
    let r = reply_to("lwsruri");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.headers.get("Call-ID"),
        Some("lwsruri.asdfasdoeoi2323-asdfwrn23-asd834rk423")
    );
    for name in ["unkscm", "badvers", "mismatch01", "multi01"] {
        let r = reply_to(name);
        let again = parse_datagram(&r.to_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let plugboard_sip::Message::Response(again) = again else {
            panic!("{name}: reply is not a response")
        };
        assert_eq!(again.status, r.status);
        assert!(again.headers.get("Via").is_some(), "{name}");
        let to = again.headers.get("To").unwrap_or("");
        assert!(to.contains("tag="), "{name}: {to}");
    }
}
