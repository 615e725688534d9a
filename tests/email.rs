//! The email channel end to end: the real server's SMTP port, real mail
//! clients (swaks, Python's smtplib, Postfix's smtp-source), a real
//! receiving SMTP server for the replies (aiosmtpd), and the JSON
//! logistics hotline answering by email with an HTTP lookup.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_tests::{
    LOOPBACK, Server, SmtpSink, TinyHttp, available_agent, deploy_hotline, dns, eventually, header,
    unfolded, waybills,
};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// A server with SMTP on, replies to `sink`, and tenant `freight` whose
/// mailbox `help@freight.test` runs the logistics hotline.
fn setup(
    dir: &std::path::Path,
    sink: &SmtpSink,
    mis_port: u16,
    extra: &[&str],
) -> (Server, String, u16) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let relay = format!("smtp://127.0.0.1:{}", sink.port);
    let mut flags: Vec<&str> = LOOPBACK.to_vec();
    flags.extend([
        "--smtp",
        "127.0.0.1:0",
        "--smtp-hostname",
        "mx.plugboard.test",
        "--smtp-relay",
        &relay,
        // SPF, DKIM and DMARC are checked against a real DNS server.
        "--smtp-auth-dns",
        &dns().addr,
    ]);
    flags.extend(extra);
    let s = Server::start(&data, &flags).unwrap();
    let smtp = s.logged("SMTP listening on ");
    let key = s.tenant("freight");
    wire(&s, &key, mis_port);
    (s, key, smtp)
}

fn wire(s: &Server, key: &str, mis_port: u16) {
    deploy_hotline(s, "freight", key, mis_port);
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/addresses/help@freight.test",
        key,
        &json!({"channel": "email", "flow": "hotline"}),
    );
    assert_eq!(a.status, 200, "{a:?}");
}

fn swaks(port: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{port}"), "--timeout", "20"])
        .args(args)
        .output()
        .expect("swaks (run scripts/setup.sh)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Runs a Python script with `args`; (success, output).
fn python(script: &str, args: &[String]) -> (bool, String) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn interactions(s: &Server, key: &str) -> Vec<Value> {
    s.interactions("freight", key)
}

fn messages(s: &Server, key: &str, ix: &str) -> Vec<Value> {
    s.messages("freight", key, ix)
}

/// Waits until `f` holds (at most `limit`).

#[test]
fn an_email_conversation_is_answered_by_the_flow_threaded_and_continued() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let sink = SmtpSink::start(&dir.path().join("sink"), 0);
    let (s, key, smtp) = setup(dir.path(), &sink, mis.port, &[]);

    // The customer writes "track" (a keyword of the menu).
    let (ok, out) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.com",
            "--to",
            "help@freight.test",
            "--header",
            "Subject: Where is my cargo?",
            "--header",
            "Message-Id: <first@example.com>",
            "--body",
            "track",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("250 2.0.0 queued as msg-"), "{out}");

    // The flow's answer (menu, then the waybill prompt) goes out as one
    // email, threaded on the customer's.
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(got.len(), 1, "no reply reached the smart host");
    let reply = &got[0];
    assert_eq!(header(reply, "To").as_deref(), Some("ann@example.com"));
    assert_eq!(header(reply, "From").as_deref(), Some("help@freight.test"));
    assert_eq!(
        header(reply, "In-Reply-To").as_deref(),
        Some("<first@example.com>")
    );
    assert_eq!(
        header(reply, "Subject").as_deref(),
        Some("Re: Where is my cargo?")
    );
    assert!(unfolded(reply).contains("waybill number"), "{reply}");
    let our_id = header(reply, "Message-ID").unwrap();

    // The customer answers from their mail program: quoting us, naming
    // our message in In-Reply-To (Python's smtplib this time).
    let script = r#"
import smtplib, sys
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "Ann <ann@example.com>"
m["To"] = "help@freight.test"
m["Subject"] = "Re: Where is my cargo?"
m["Message-ID"] = "<second@example.com>"
m["In-Reply-To"] = sys.argv[2]
m["References"] = "<first@example.com> " + sys.argv[2]
m.set_content("123\n\nOn Mon, 1 Dec 2026, help@freight.test wrote:\n> Please enter your waybill number\n")
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20) as c:
    c.send_message(m)
print("sent")
"#;
    let (ok, out) = python(script, &[smtp.to_string(), our_id.clone()]);
    assert!(ok, "{out}");

    let got = sink.wait_for(2, Duration::from_secs(20));
    assert_eq!(got.len(), 2, "no second reply");
    let second = &unfolded(&got[1]);
    assert!(
        second.contains("in transit") && second.contains("near Vilnius"),
        "{second}"
    );
    assert_eq!(
        header(second, "In-Reply-To").as_deref(),
        Some("<second@example.com>")
    );
    let refs = header(second, "References").unwrap();
    for id in [
        "<first@example.com>",
        our_id.as_str(),
        "<second@example.com>",
    ] {
        assert!(refs.contains(id), "{refs} lacks {id}");
    }

    // One conversation, four messages, in order; the customer's text
    // without the quote; ours sent.
    let all = interactions(&s, &key);
    let email: Vec<&Value> = all.iter().filter(|i| i["channel"] == "email").collect();
    assert_eq!(email.len(), 1, "{all:?}");
    let ix = email[0]["id"].as_str().unwrap();
    assert_eq!(email[0]["from"], "ann@example.com");
    let msgs = messages(&s, &key, ix);
    let dirs: Vec<&str> = msgs
        .iter()
        .map(|m| m["direction"].as_str().unwrap())
        .collect();
    assert_eq!(
        dirs,
        ["inbound", "outbound", "inbound", "outbound"],
        "{msgs:?}"
    );
    assert_eq!(msgs[2]["text"], "123");
    assert_eq!(msgs[2]["meta"]["quoted_cut"], "true");
    assert!(
        eventually(Duration::from_secs(5), || messages(&s, &key, ix)
            .iter()
            .filter(|m| m["direction"] == "outbound")
            .all(|m| m["status"] == "sent")),
        "{:?}",
        messages(&s, &key, ix)
    );
    // The raw message is kept.
    let raw = msgs[0]["meta"]["raw"].as_str().unwrap();
    let r = s
        .call(
            "GET",
            &format!("/v1/tenants/freight/blobs/{raw}"),
            Some(&key),
            None,
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.as_str().unwrap().contains("Where is my cargo?"));

    // The timeline has the flow's lookup.
    let rec = s.get(&format!("/v1/tenants/freight/interactions/{ix}"), &key);
    let kinds: Vec<&str> = rec.body["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"host_call"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "message").count(), 4);

    // The customer is one, with this conversation in their history.
    let c = s.get(
        "/v1/tenants/freight/customers?channel=email&address=ANN@example.com",
        &key,
    );
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(c.body["name"], "Ann");
    let h = s.get(
        &format!(
            "/v1/tenants/freight/customers/{}",
            c.body["id"].as_str().unwrap()
        ),
        &key,
    );
    assert_eq!(h.body["interactions"][0]["id"], ix);
    assert_eq!(
        h.body["interactions"][0]["messages"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // The second reply bounces (the relay sends a DSN back to our
    // mailbox, from the null sender): it joins the conversation, marks
    // that reply failed, and is not answered.
    let second_id = header(&got[1], "Message-ID").unwrap();
    let script = r#"
import smtplib, sys
dsn = ("From: MAILER-DAEMON@relay.example\r\nTo: help@freight.test\r\nSubject: Undelivered Mail\r\n"
       "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n"
       "--B\r\nContent-Type: text/plain\r\n\r\nCould not deliver.\r\n"
       "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay.example\r\n\r\n"
       "Final-Recipient: rfc822; ann@example.com\r\nAction: failed\r\nStatus: 5.2.2\r\n"
       "Diagnostic-Code: smtp; 552 5.2.2 mailbox full\r\n"
       "--B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: help@freight.test\r\nTo: ann@example.com\r\n"
       "Message-ID: " + sys.argv[2] + "\r\n\r\n--B--\r\n")
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20) as c:
    c.sendmail("", ["help@freight.test"], dsn)
"#;
    let (ok, out) = python(script, &[smtp.to_string(), second_id]);
    assert!(ok, "{out}");
    assert!(
        eventually(Duration::from_secs(10), || {
            let m = messages(&s, &key, ix);
            m.len() == 5
                && m[3]["status"] == "failed"
                && m[3]["error"].as_str().is_some_and(|e| e.contains("5.2.2"))
                && m[4]["author"]["type"] == "system"
        }),
        "{:?}",
        messages(&s, &key, ix)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sink.messages().len(), 2, "a bounce was answered");

    // Another tenant sees none of it.
    let other = s.tenant("other");
    assert_eq!(
        s.get(
            &format!("/v1/tenants/freight/interactions/{ix}/messages"),
            &other
        )
        .status,
        403
    );
    assert_eq!(
        s.get(
            &format!("/v1/tenants/other/interactions/{ix}/messages"),
            &other
        )
        .status,
        404
    );
}

#[test]
fn a_flow_sends_a_new_email_from_the_address_it_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let sink = SmtpSink::start(&dir.path().join("sink"), 0);
    let (s, key, smtp) = setup(dir.path(), &sink, mis.port, &[]);
    // Bookings mailed to ops@ are passed on to the carrier's dispatch desk
    // as a new email (not a reply), and the flow ends the conversation.
    let flow = json!({"name": "pass-on", "start": "tell", "nodes": {
        "tell": {"type": "send", "channel": "email", "to": "dispatch@carrier.test",
                 "subject": "Booking from {{caller}}", "text": "New booking from {{caller}}.",
                 "next": "done"},
        "done": {"type": "hangup"}}});
    let d = s
        .call(
            "POST",
            "/v1/tenants/freight/flows/pass-on",
            Some(&key),
            Some(flow.to_string().into_bytes()),
        )
        .unwrap();
    assert_eq!(d.status, 201, "{d:?}");
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/addresses/ops@freight.test",
        &key,
        &json!({"channel": "email", "flow": "pass-on"}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let (ok, out) = swaks(
        smtp,
        &[
            "--from",
            "bob@shipper.test",
            "--to",
            "ops@freight.test",
            "--header",
            "Subject: Booking",
            "--body",
            "2 pallets Friday",
        ],
    );
    assert!(ok, "{out}");
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(got.len(), 1, "nothing reached the smart host");
    let mail = &got[0];
    assert_eq!(header(mail, "To").as_deref(), Some("dispatch@carrier.test"));
    assert_eq!(header(mail, "From").as_deref(), Some("ops@freight.test"));
    assert_eq!(
        header(mail, "Subject").as_deref(),
        Some("Booking from bob@shipper.test")
    );
    assert!(header(mail, "In-Reply-To").is_none(), "{mail}");
    // Two conversations: the booking (closed by the flow, a `sent` entry
    // on its timeline) and the new one to dispatch, sent by its flow.
    let all = interactions(&s, &key);
    let booking = all
        .iter()
        .find(|ix| ix["from"] == "bob@shipper.test")
        .unwrap();
    let booking = s.interaction("freight", &key, booking["id"].as_str().unwrap());
    let sent = booking["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "sent")
        .unwrap_or_else(|| panic!("{booking}"));
    let out_ix = sent["data"]["interaction"].as_str().unwrap();
    let m = &messages(&s, &key, out_ix)[0];
    assert_eq!(m["to"], "dispatch@carrier.test", "{m}");
    assert_eq!(m["author"]["type"], "flow", "{m}");
    assert_eq!(m["meta"]["sent_by_interaction"], booking["id"], "{m}");
}

#[test]
fn bad_mail_gets_the_right_refusal_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let sink = SmtpSink::start(&dir.path().join("sink"), 0);
    let (s, key, smtp) = setup(dir.path(), &sink, mis.port, &["--smtp-max-size", "100000"]);

    // Unknown recipient: 550, nothing stored.
    let (ok, out) = swaks(
        smtp,
        &[
            "--from",
            "x@example.com",
            "--to",
            "nobody@freight.test",
            "--body",
            "hi",
        ],
    );
    assert!(!ok);
    assert!(out.contains("550 5.1.1"), "{out}");

    // Too big: 552 (smtplib announces SIZE, so at MAIL FROM; sent
    // without it, at the end of DATA).
    let script = r#"
import smtplib, sys
big = "x" * 200000
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20) as c:
    try:
        c.sendmail("x@example.com", ["help@freight.test"], "Subject: big\r\n\r\n" + big)
        print("accepted")
    except smtplib.SMTPSenderRefused as e:
        print("refused", e.smtp_code)
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20) as c:
    c.ehlo()
    c.esmtp_features.pop("size", None)
    try:
        c.sendmail("x@example.com", ["help@freight.test"], "Subject: big\r\n\r\n" + big)
        print("accepted")
    except smtplib.SMTPDataError as e:
        print("data", e.smtp_code)
    # The session goes on after a refusal.
    c.sendmail("x@example.com", ["help@freight.test"], "Subject: small\r\n\r\nsmall one")
    print("small ok")
"#;
    let (ok, out) = python(script, &[smtp.to_string()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("refused 552") && out.contains("data 552"),
        "{out}"
    );
    assert!(out.contains("small ok"), "{out}");

    // A client that drops mid-DATA leaves no half message.
    let before = interactions(&s, &key).len();
    let mut c = TcpStream::connect(("127.0.0.1", smtp)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    let _ = c.read(&mut buf).unwrap();
    c.write_all(
        b"EHLO drop\r\nMAIL FROM:<d@example.com>\r\nRCPT TO:<help@freight.test>\r\nDATA\r\n",
    )
    .unwrap();
    let mut seen = String::new();
    while !seen.contains("354") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    c.write_all(b"Subject: half\r\n\r\nthis message never ends")
        .unwrap();
    drop(c);

    // Garbage and out-of-order commands get 5xx; the server keeps serving.
    let mut c = TcpStream::connect(("127.0.0.1", smtp)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.read(&mut buf).unwrap();
    c.write_all(b"DATA\r\n\x01\x02\xff garbage\r\n").unwrap();
    let mut seen = String::new();
    while seen.matches("\r\n").count() < 2 {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        seen.starts_with("503 ") && seen.contains("\r\n50"),
        "{seen}"
    );
    drop(c);

    // Attachments, HTML and a non-ASCII subject (and the server is up).
    let script = r#"
import smtplib, sys
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "Jonas <jonas@example.lt>"
m["To"] = "help@freight.test"
m["Subject"] = "Siunta į Kauną — ačiū"
m.set_content("Plain part: 123")
m.add_alternative("<p>HTML part: <b>123</b></p>", subtype="html")
m.add_attachment(bytes(range(256)) * 4, maintype="application", subtype="octet-stream", filename="waybill.bin")
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20) as c:
    c.send_message(m)
print("sent")
"#;
    let (ok, out) = python(script, &[smtp.to_string()]);
    assert!(ok, "{out}");
    assert!(eventually(Duration::from_secs(10), || {
        interactions(&s, &key)
            .iter()
            .any(|i| i["from"] == "jonas@example.lt")
    }));
    let all = interactions(&s, &key);
    let jonas = all
        .iter()
        .find(|i| i["from"] == "jonas@example.lt")
        .unwrap();
    let msgs = messages(&s, &key, jonas["id"].as_str().unwrap());
    assert_eq!(msgs[0]["subject"], "Siunta į Kauną — ačiū");
    assert_eq!(msgs[0]["text"], "Plain part: 123");
    let att = &msgs[0]["attachments"][0];
    assert_eq!(att["name"], "waybill.bin");
    assert_eq!(att["size"], 1024);
    let (status, bytes) = s.get_bytes(
        &format!(
            "/v1/tenants/freight/blobs/{}",
            att["blob"].as_str().unwrap()
        ),
        &key,
    );
    assert_eq!(status, 200);
    let want: Vec<u8> = (0..4).flat_map(|_| 0u8..=255).collect();
    assert_eq!(bytes, want, "the attachment comes back byte for byte");

    // Only the small message and Jonas's arrived: no half message, no
    // oversize one, nothing for the unknown mailbox.
    let after = interactions(&s, &key);
    assert_eq!(after.len(), before + 1, "{after:?}");
    let texts: Vec<String> = after
        .iter()
        .flat_map(|i| messages(&s, &key, i["id"].as_str().unwrap()))
        .filter(|m| m["direction"] == "inbound")
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    assert!(texts.iter().all(|t| !t.contains("never ends")), "{texts:?}");
    assert!(texts.iter().any(|t| t == "small one"), "{texts:?}");

    // One email to two of the tenant's mailboxes is two conversations;
    // sent again (same Message-ID), it is still two.
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/addresses/sales@freight.test",
        &key,
        &json!({"channel": "email", "flow": "hotline"}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    for _ in 0..2 {
        let (ok, out) = swaks(
            smtp,
            &[
                "--from",
                "multi@example.com",
                "--to",
                "help@freight.test,sales@freight.test",
                "--header",
                "Message-Id: <both@example.com>",
                "--body",
                "track",
            ],
        );
        assert!(ok, "{out}");
    }
    let multi = || -> Vec<Value> {
        interactions(&s, &key)
            .into_iter()
            .filter(|i| i["from"] == "multi@example.com")
            .collect()
    };
    assert!(eventually(Duration::from_secs(10), || multi().len() >= 2));
    std::thread::sleep(Duration::from_millis(300));
    let multi = multi();
    let mut to: Vec<&str> = multi.iter().map(|i| i["to"].as_str().unwrap()).collect();
    to.sort();
    assert_eq!(to, ["help@freight.test", "sales@freight.test"], "{multi:?}");
}

#[test]
fn parallel_senders_and_a_kill_lose_and_duplicate_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    // The smart host defers the first replies: the outbox retries them.
    let sink = SmtpSink::start(&dir.path().join("sink"), 2);
    let (s, key, smtp) = setup(dir.path(), &sink, mis.port, &[]);

    // Postfix's smtp-source: 5 sessions in parallel, 40 messages.
    let out = Command::new("/usr/sbin/smtp-source")
        .args([
            "-s",
            "5",
            "-m",
            "40",
            "-f",
            "load@example.com",
            "-t",
            "help@freight.test",
            &format!("127.0.0.1:{smtp}"),
        ])
        .output()
        .expect("smtp-source (run scripts/setup.sh)");
    assert!(out.status.success(), "{out:?}");
    assert!(
        eventually(Duration::from_secs(30), || interactions(&s, &key).len()
            == 40),
        "{} interactions",
        interactions(&s, &key).len()
    );
    // Every one answered through the smart host, the deferred ones too.
    let got = sink.wait_for(40, Duration::from_secs(60));
    assert_eq!(got.len(), 40);

    // Now a client sends numbered messages while the server is killed:
    // every message that got its 250 is stored exactly once after a
    // restart (a retry with the same Message-ID is the same message).
    let script = r#"
import smtplib, sys, time
port = int(sys.argv[1]); n = int(sys.argv[2])
acked = []
for i in range(n):
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
            msg = "From: kill@example.com\r\nTo: help@freight.test\r\nSubject: n%d\r\nMessage-ID: <k%d@example.com>\r\n\r\nmessage %d\r\n" % (i, i, i)
            c.sendmail("kill@example.com", ["help@freight.test"], msg)
            acked.append(i)
    except Exception as e:
        break
print(",".join(map(str, acked)))
"#;
    let args = [smtp.to_string(), "400".to_string()];
    let sender = std::thread::spawn(move || python(script, &args));
    std::thread::sleep(Duration::from_millis(700));
    s.kill();
    let (_, out) = sender.join().unwrap();
    let acked: Vec<u32> = out
        .lines()
        .last()
        .unwrap_or("")
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged before the kill: {out}"
    );
    eprintln!("{} messages acknowledged before the kill", acked.len());

    let data = dir.path().join("data");
    let s = Server::start(&data, &{
        let mut f = LOOPBACK.to_vec();
        let relay = format!("smtp://127.0.0.1:{}", sink.port);
        f.extend(["--smtp", "127.0.0.1:0", "--smtp-relay"]);
        f.push(Box::leak(relay.into_boxed_str()));
        f.extend(["--smtp-auth-dns", &dns().addr]);
        f
    })
    .unwrap();
    let smtp = s.logged("SMTP listening on ");
    // The client retries everything it sent after a failure, the
    // acknowledged ones included: duplicates must not appear.
    for i in 0..acked.len() as u32 + 3 {
        let msg = format!(
            "From: kill@example.com\r\nTo: help@freight.test\r\nSubject: n{i}\r\nMessage-ID: <k{i}@example.com>\r\n\r\nmessage {i}\r\n"
        );
        let script = "import smtplib,sys\nwith smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=10) as c: c.sendmail('kill@example.com', ['help@freight.test'], sys.argv[2])";
        let (ok, out) = python(script, &[smtp.to_string(), msg]);
        assert!(ok, "{out}");
    }
    let all = interactions(&s, &key);
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for i in all.iter().filter(|i| i["from"] == "kill@example.com") {
        for m in messages(&s, &key, i["id"].as_str().unwrap()) {
            if m["direction"] == "inbound" {
                *seen
                    .entry(m["text"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
    }
    for i in &acked {
        assert_eq!(
            seen.get(&format!("message {i}")),
            Some(&1),
            "message {i}: {seen:?}"
        );
    }
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    // Every stored message was run through the flow (the ones waiting at
    // the kill too): each has its reply.
    assert!(
        eventually(Duration::from_secs(30), || {
            s.get("/v1/tenants/freight/interactions?limit=1000", &key)
                .body["interactions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["from"] == "kill@example.com")
                .all(|i| {
                    messages(&s, &key, i["id"].as_str().unwrap())
                        .iter()
                        .any(|m| m["direction"] == "outbound")
                })
        }),
        "a conversation was left unanswered after the restart"
    );
}

/// Sends a plain email with smtplib; `reply_to` names the message it
/// answers.
fn send(smtp: u16, from: &str, id: &str, reply_to: Option<&str>, body: &str) {
    let script = r#"
import smtplib, sys
from email.message import EmailMessage
m = EmailMessage()
m["From"] = sys.argv[2]
m["To"] = "help@freight.test"
m["Subject"] = "Cargo"
m["Message-ID"] = sys.argv[3]
if sys.argv[4]:
    m["In-Reply-To"] = sys.argv[4]
    m["References"] = sys.argv[4]
m.set_content(sys.argv[5])
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20) as c:
    c.send_message(m)
"#;
    let args = [
        smtp.to_string(),
        from.to_string(),
        id.to_string(),
        reply_to.unwrap_or("").to_string(),
        body.to_string(),
    ];
    let (ok, out) = python(script, &args);
    assert!(ok, "{out}");
}

#[test]
fn an_agent_takes_the_conversation_replies_by_email_and_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let sink = SmtpSink::start(&dir.path().join("sink"), 0);
    let (s, key, smtp) = setup(dir.path(), &sink, mis.port, &[]);
    let ann = available_agent(&s, "freight", &key, "ann", json!({"email": 3}));

    // The tenant's event stream, as an agent desktop would follow it.
    let mut ws = s.tenant_stream("freight", &key);

    // "agent": the flow asks to hold and queues the conversation.
    send(smtp, "bo@example.com", "<a1@example.com>", None, "agent");
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert!(
        unfolded(&got[0]).contains("an agent will be with you"),
        "{}",
        got[0]
    );
    let ix = interactions(&s, &key)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Offered to Ann (the task is the interaction).
    assert!(eventually(Duration::from_secs(10), || {
        s.get(&format!("/v1/tenants/freight/tasks/{ix}"), &key).body["state"] == "offered"
    }));
    // Not hers yet: she may not write.
    let early = s.json(
        "POST",
        &format!("/v1/tenants/freight/interactions/{ix}/messages"),
        &ann,
        &json!({"text": "hello"}),
    );
    assert_eq!(early.status, 403, "{early:?}");
    let acc = s.json(
        "POST",
        &format!("/v1/tenants/freight/tasks/{ix}/accept"),
        &ann,
        &json!({}),
    );
    assert_eq!(acc.status, 200, "{acc:?}");

    // The customer writes again: the message is the agent's (on the
    // stream), the flow says nothing.
    send(
        smtp,
        "bo@example.com",
        "<a2@example.com>",
        Some("<a1@example.com>"),
        "Thanks, waiting.",
    );
    let mut heard = false;
    let t0 = Instant::now();
    while !heard && t0.elapsed() < Duration::from_secs(10) {
        let Ok(msg) = ws.read() else { break };
        let Ok(text) = msg.to_text() else { continue };
        let v: Value = serde_json::from_str(text).unwrap_or_default();
        heard = v["kind"] == "message"
            && v["interaction"] == ix.as_str()
            && v["data"]["text"] == "Thanks, waiting.";
    }
    assert!(
        heard,
        "the customer's message did not reach the event stream"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sink.messages().len(),
        1,
        "the flow answered a conversation an agent holds"
    );

    // Ann answers; it leaves by email, threaded on the customer's last.
    let r = s.json(
        "POST",
        &format!("/v1/tenants/freight/interactions/{ix}/messages"),
        &ann,
        &json!({"text": "Hello Bo, your cargo left Riga this morning."}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["author"], json!({"type": "agent", "id": "ann"}));
    let got = sink.wait_for(2, Duration::from_secs(20));
    assert_eq!(got.len(), 2);
    assert!(unfolded(&got[1]).contains("left Riga"), "{}", got[1]);
    assert_eq!(
        header(&got[1], "In-Reply-To").as_deref(),
        Some("<a2@example.com>")
    );
    // An agent without the task sees nothing of it.
    s.json(
        "PUT",
        "/v1/tenants/freight/agents/cy",
        &key,
        &json!({"capacity": {"email": 1}}),
    );
    let cy = s.json(
        "POST",
        "/v1/tenants/freight/agents/cy/token",
        &key,
        &json!({}),
    );
    let cy = cy.body["token"].as_str().unwrap();
    assert_eq!(
        s.get(
            &format!("/v1/tenants/freight/interactions/{ix}/messages"),
            cy
        )
        .status,
        403
    );
    assert_eq!(
        s.get(
            &format!("/v1/tenants/freight/interactions/{ix}/messages"),
            &ann
        )
        .status,
        200
    );

    // She completes the task: the conversation is closed, and the
    // customer's next email starts a new one, run by the flow again.
    let done = s.json(
        "POST",
        &format!("/v1/tenants/freight/tasks/{ix}/complete"),
        &ann,
        &json!({}),
    );
    assert_eq!(done.status, 200, "{done:?}");
    assert!(eventually(Duration::from_secs(10), || {
        s.get(&format!("/v1/tenants/freight/interactions/{ix}"), &key)
            .body["state"]
            == "closed"
    }));
    let closed = s.json(
        "POST",
        &format!("/v1/tenants/freight/interactions/{ix}/messages"),
        &key,
        &json!({"text": "late"}),
    );
    assert_eq!(closed.status, 409, "{closed:?}");
    send(
        smtp,
        "bo@example.com",
        "<a3@example.com>",
        Some("<a2@example.com>"),
        "track",
    );
    let got = sink.wait_for(3, Duration::from_secs(20));
    assert!(unfolded(&got[2]).contains("waybill number"), "{}", got[2]);
    let all = interactions(&s, &key);
    assert_eq!(all.len(), 2, "{all:?}");
    let states: Vec<&str> = all.iter().map(|i| i["state"].as_str().unwrap()).collect();
    assert!(
        states.contains(&"closed") && states.contains(&"in_flow"),
        "{states:?}"
    );
}

#[test]
fn starttls_with_the_configured_certificate_and_a_cap_on_connections_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let sink = SmtpSink::start(&dir.path().join("sink"), 0);
    let ca = plugboard_tests::TestCa::new();
    let (cert, key_pem) = &ca.server_pem;
    let cert_file = dir.path().join("smtp.crt");
    let key_file = dir.path().join("smtp.key");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key_pem).unwrap();
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let (cf, kf) = (
        cert_file.display().to_string(),
        key_file.display().to_string(),
    );
    let (s, key, smtp) = setup(
        dir.path(),
        &sink,
        mis.port,
        &[
            "--smtp-cert",
            &cf,
            "--smtp-key",
            &kf,
            "--smtp-max-per-ip",
            "3",
        ],
    );

    // smtplib verifies the certificate against the test CA, upgrades,
    // and sends; swaks does the same from Perl.
    let script = r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
with smtplib.SMTP("localhost", int(sys.argv[1]), timeout=20) as c:
    c.ehlo()
    assert c.has_extn("starttls"), c.esmtp_features
    c.starttls(context=ctx)
    c.ehlo()
    assert not c.has_extn("starttls"), "offered twice"
    c.sendmail("tls@example.com", ["help@freight.test"], "Subject: over TLS\r\nMessage-ID: <tls1@example.com>\r\n\r\ntrack\r\n")
print("sent over", c.sock.version() if c.sock else "closed")
"#;
    let (ok, out) = python(script, &[smtp.to_string(), ca_file.display().to_string()]);
    assert!(ok, "{out}");
    let (ok, out) = swaks(
        smtp,
        &[
            "--tls",
            "--from",
            "tls2@example.com",
            "--to",
            "help@freight.test",
            "--body",
            "track",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("TLS started"), "{out}");
    assert!(eventually(Duration::from_secs(10), || {
        let all = interactions(&s, &key);
        all.len() == 2
            && all
                .iter()
                .all(|i| messages(&s, &key, i["id"].as_str().unwrap())[0]["meta"]["tls"] == "true")
    }));

    // Three connections from one address are served; a fourth is told
    // 421 at once; when one closes, a new one is served again.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(("127.0.0.1", smtp)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"220 "),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(c);
    }
    let mut c = TcpStream::connect(("127.0.0.1", smtp)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("421 4.7.0"), "{text}");
    held.pop();
    assert!(eventually(Duration::from_secs(5), || {
        let mut c = TcpStream::connect(("127.0.0.1", smtp)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).unwrap_or(0);
        buf[..n].starts_with(b"220 ")
    }));
}

/// A request as received: headers (lower-cased names) and body.
type Received = (Vec<(String, String)>, Vec<u8>);

/// An HTTP receiver that records each request (headers and body) and
/// answers 500 to the first `fail` of them.
struct HookReceiver {
    port: u16,
    got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
}

impl HookReceiver {
    fn start(fail: usize) -> HookReceiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut headers = Vec::new();
                let mut line = String::new();
                let _ = std::io::BufRead::read_line(&mut reader, &mut line);
                let mut len = 0;
                loop {
                    let mut l = String::new();
                    if std::io::BufRead::read_line(&mut reader, &mut l).unwrap_or(0) == 0
                        || l == "\r\n"
                    {
                        break;
                    }
                    if let Some((k, v)) = l.trim_end().split_once(':') {
                        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                        if k == "content-length" {
                            len = v.parse().unwrap_or(0);
                        }
                        headers.push((k, v));
                    }
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                n += 1;
                let status = if n <= fail { 500 } else { 200 };
                if status == 200 {
                    g.lock().unwrap().push((headers, body));
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        HookReceiver { port, got }
    }
}

#[test]
fn signed_webhooks_push_messages_to_an_integrators_system_and_retry() {
    use hmac::Mac;
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let sink = SmtpSink::start(&dir.path().join("sink"), 0);
    let (s, key, smtp) = setup(dir.path(), &sink, mis.port, &[]);
    let hooks = HookReceiver::start(1);
    let sec = s.json(
        "PUT",
        "/v1/tenants/freight/secrets/hook-key",
        &key,
        &json!({"value": "whsec-test-123"}),
    );
    assert!(sec.status == 200 || sec.status == 204, "{sec:?}");
    // A secret the tenant does not have is refused.
    let bad = s.json(
        "PUT",
        "/v1/tenants/freight/webhooks/crm",
        &key,
        &json!({"url": format!("http://127.0.0.1:{}/in", hooks.port), "secret": "nope"}),
    );
    assert_eq!(bad.status, 400, "{bad:?}");
    let h = s.json(
        "PUT",
        "/v1/tenants/freight/webhooks/crm",
        &key,
        &json!({"url": format!("http://127.0.0.1:{}/in", hooks.port), "secret": "hook-key", "events": ["message"]}),
    );
    assert_eq!(h.status, 200, "{h:?}");

    send(smtp, "dee@example.com", "<h1@example.com>", None, "track");
    // The inbound message and the flow's reply; the first POST got a 500
    // and was retried.
    assert!(
        eventually(Duration::from_secs(20), || hooks.got.lock().unwrap().len()
            >= 2),
        "{} deliveries",
        hooks.got.lock().unwrap().len()
    );
    let got = hooks.got.lock().unwrap().clone();
    let mut directions = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for (headers, body) in &got {
        let hv = |k: &str| {
            headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(hv("x-plugboard-event"), "message");
        let sig = hv("x-plugboard-signature");
        let (t, v1) = sig.split_once(",v1=").unwrap();
        let t = t.strip_prefix("t=").unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"whsec-test-123").unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            v1,
            "bad signature"
        );
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["tenant"], "freight");
        assert_eq!(v["id"], hv("x-plugboard-delivery"));
        ids.insert(v["id"].as_str().unwrap().to_string());
        directions.push(v["data"]["direction"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), got.len(), "a delivery came twice after its 2xx");
    assert!(
        directions.contains(&"inbound".to_string()) && directions.contains(&"outbound".to_string()),
        "{directions:?}"
    );
    // Deleting it stops the deliveries.
    let d = s
        .call(
            "DELETE",
            "/v1/tenants/freight/webhooks/crm",
            Some(&key),
            None,
        )
        .unwrap();
    assert_eq!(d.status, 204);
    assert_eq!(
        s.get("/v1/tenants/freight/webhooks", &key).body["webhooks"],
        json!([])
    );
}

#[test]
fn replies_from_a_domain_with_a_dkim_key_are_signed_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let sink = SmtpSink::start(&dir.path().join("sink"), 0);
    let (s, key, smtp) = setup(dir.path(), &sink, mis.port, &[]);
    // An RSA key (PKCS#1 PEM) and its public half, as DNS would publish it.
    let pem_file = dir.path().join("dkim.pem");
    let ok = Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&pem_file)
        .arg("2048")
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl genrsa");
    let der = Command::new("openssl")
        .args(["rsa", "-pubout", "-outform", "DER", "-in"])
        .arg(&pem_file)
        .output()
        .unwrap();
    assert!(der.status.success());
    let public_b64 = {
        let out = Command::new("base64")
            .args(["-w0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = out;
        out.stdin.take().unwrap().write_all(&der.stdout).unwrap();
        String::from_utf8(out.wait_with_output().unwrap().stdout).unwrap()
    };
    let pem = std::fs::read_to_string(&pem_file).unwrap();
    let sec = s.json(
        "PUT",
        "/v1/tenants/freight/secrets/dkim-key",
        &key,
        &json!({"value": pem}),
    );
    assert!(sec.status == 200 || sec.status == 204, "{sec:?}");
    // A domain that is none of the tenant's is refused.
    let bad = s.json(
        "PUT",
        "/v1/tenants/freight/email-domains/other.test",
        &key,
        &json!({"dkim_selector": "s1", "dkim_key_secret": "dkim-key"}),
    );
    assert_eq!(bad.status, 400, "{bad:?}");
    let d = s.json(
        "PUT",
        "/v1/tenants/freight/email-domains/freight.test",
        &key,
        &json!({"dkim_selector": "s1", "dkim_key_secret": "dkim-key"}),
    );
    assert_eq!(d.status, 200, "{d:?}");

    send(smtp, "eve@example.com", "<d1@example.com>", None, "track");
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(got.len(), 1);
    let sig = header(&got[0], "DKIM-Signature").expect("no DKIM-Signature");
    assert!(
        sig.contains("d=freight.test") && sig.contains("s=s1"),
        "{sig}"
    );
    // dkimpy checks it against the published key (DNS answered here).
    let script = r#"
import dkim, sys
raw = open(sys.argv[1], "rb").read()
record = ("v=DKIM1; k=rsa; p=" + sys.argv[2]).encode()
def dns(name, timeout=5):
    assert name == b"s1._domainkey.freight.test.", name
    return record
print("valid" if dkim.verify(raw, dnsfunc=dns) else "invalid")
tampered = raw.replace(b"Subject: ", b"Subject: Urgent ", 1)
print("tampered-valid" if dkim.verify(tampered, dnsfunc=dns) else "tampered-invalid")
"#;
    let eml = sink.dir.join("0001.eml");
    let out = Command::new(plugboard_tests::peers_python())
        .arg("-c")
        .arg(script)
        .arg(&eml)
        .arg(public_b64.trim())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..2], ["valid", "tampered-invalid"], "{text}");
}

#[test]
fn the_sender_is_checked_with_spf_dkim_and_dmarc_and_spoofed_mail_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let sink = SmtpSink::start(&dir.path().join("sink"), 0);
    let (s, key, smtp) = setup(dir.path(), &sink, mis.port, &[]);
    // Five senders, each a real SMTP client (smtplib) and, for the signed
    // ones, a real DKIM signer (dkimpy) with the key DNS publishes for
    // signed.test. 127.0.0.2 is a loopback address that signed.test's
    // SPF record does not list.
    let script = r#"
import dkim, smtplib, sys
port, key = int(sys.argv[1]), open(sys.argv[2], "rb").read()
def message(frm, mid, subject, body):
    return ("From: %s\r\nTo: help@freight.test\r\nSubject: %s\r\nMessage-ID: <%s>\r\n"
            "Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n\r\n%s\r\n" % (frm, subject, mid, body)).encode()
def signed(raw):
    return dkim.sign(raw, b"pb", b"signed.test", key, include_headers=[b"From", b"To", b"Subject", b"Message-ID"]) + raw
def send(name, source, mail_from, raw):
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test",
                          source_address=(source, 0), timeout=20) as c:
            c.sendmail(mail_from, ["help@freight.test"], raw)
        print(name, "accepted")
    except smtplib.SMTPDataError as e:
        print(name, "refused", e.smtp_code, e.smtp_error.decode())
send("signed", "127.0.0.1", "alice@signed.test",
     signed(message("Alice <alice@signed.test>", "a1@signed.test", "Where is AB-1001?", "track AB-1001")))
send("spoofed", "127.0.0.2", "ceo@signed.test",
     message("CEO <ceo@signed.test>", "s1@signed.test", "Wire the money", "urgent"))
tampered = signed(message("Alice <alice@signed.test>", "t1@signed.test", "Invoice", "pay 100"))
send("tampered", "127.0.0.2", "alice@signed.test", tampered.replace(b"pay 100", b"pay 9999"))
send("relaxed", "127.0.0.2", "bob@relaxed.test",
     message("Bob <bob@relaxed.test>", "b1@relaxed.test", "Hello", "hello"))
send("unknown", "127.0.0.1", "carol@nowhere.test",
     message("Carol <carol@nowhere.test>", "c1@nowhere.test", "Hi", "hi"))
send("two-froms", "127.0.0.1", "dave@nowhere.test",
     message("ceo@signed.test, dave@nowhere.test", "f1@nowhere.test", "Pay", "pay"))
send("bounce", "127.0.0.1", "",
     message("MAILER-DAEMON@client.test", "n1@client.test", "Undelivered", "gone"))
"#;
    let out = Command::new(plugboard_tests::peers_python())
        .arg("-c")
        .arg(script)
        .arg(smtp.to_string())
        .arg(&dns().dkim_key)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7, "{text}");
    assert_eq!(lines[0], "signed accepted", "{text}");
    // Spoofed and tampered mail fails DMARC, and signed.test says reject.
    for (line, name) in [(lines[1], "spoofed"), (lines[2], "tampered")] {
        assert!(
            line.starts_with(&format!("{name} refused 550 5.7.1")),
            "{text}"
        );
        assert!(line.contains("dmarc=fail"), "{text}");
    }
    // The altered body breaks the signature (mail-auth calls a body that
    // no longer matches its hash `neutral`).
    assert!(
        lines[2].contains("dkim=neutral") || lines[2].contains("dkim=fail"),
        "{text}"
    );
    // Two From domains: no one domain to check DMARC for, refused.
    assert!(
        lines[5].starts_with("two-froms refused 550 5.7.1") && lines[5].contains("dmarc=permerror"),
        "{text}"
    );
    // A bounce (null sender): SPF of the HELO name.
    assert_eq!(lines[6], "bounce accepted", "{text}");
    // relaxed.test's policy is none: kept, with what failed recorded.
    assert_eq!(lines[3], "relaxed accepted", "{text}");
    assert_eq!(lines[4], "unknown accepted", "{text}");

    // What each accepted message keeps.
    let meta_of = |from: &str| -> Value {
        let mut found = Value::Null;
        assert!(
            eventually(Duration::from_secs(20), || {
                for ix in interactions(&s, &key) {
                    for m in messages(&s, &key, ix["id"].as_str().unwrap()) {
                        if m["meta"]["envelope_from"] == from {
                            found = m["meta"].clone();
                            return true;
                        }
                    }
                }
                false
            }),
            "no message from {from}"
        );
        found
    };
    let alice = meta_of("alice@signed.test");
    assert_eq!(alice["spf"], "pass", "{alice}");
    assert_eq!(alice["dkim"], "pass", "{alice}");
    assert_eq!(alice["dkim_domains"], "signed.test", "{alice}");
    assert_eq!(alice["dmarc"], "pass", "{alice}");
    assert_eq!(alice["dmarc_policy"], "reject", "{alice}");
    let ar = alice["authentication_results"].as_str().unwrap();
    assert!(ar.starts_with("mx.plugboard.test;"), "{ar}");
    assert!(
        ar.contains("dkim=pass") && ar.contains("header.i=@signed.test"),
        "{ar}"
    );
    assert!(ar.contains("spf=pass") && ar.contains("dmarc=pass"), "{ar}");
    // The stored raw message starts with the same header.
    let raw = s.get(
        &format!(
            "/v1/tenants/freight/blobs/{}",
            alice["raw"].as_str().unwrap()
        ),
        &key,
    );
    assert_eq!(raw.status, 200);
    let raw = raw.body.as_str().unwrap();
    assert!(
        raw.starts_with(&format!("Authentication-Results: {ar}\r\n")),
        "{raw}"
    );
    let bob = meta_of("bob@relaxed.test");
    assert_eq!(
        (
            &bob["spf"],
            &bob["dkim"],
            &bob["dmarc"],
            &bob["dmarc_policy"]
        ),
        (
            &json!("softfail"),
            &json!("none"),
            &json!("fail"),
            &json!("none")
        ),
        "{bob}"
    );
    let carol = meta_of("carol@nowhere.test");
    assert_eq!(
        (&carol["spf"], &carol["dkim"], &carol["dmarc"]),
        (&json!("none"), &json!("none"), &json!("none")),
        "{carol}"
    );
    // Nothing of the refused mail was stored.
    for ix in interactions(&s, &key) {
        for m in messages(&s, &key, ix["id"].as_str().unwrap()) {
            let from = m["meta"]["envelope_from"].as_str().unwrap_or("");
            assert!(from != "ceo@signed.test", "{m}");
            assert!(!m["text"].as_str().unwrap_or("").contains("9999"), "{m}");
        }
    }
}

/// Retention by part, with a pinned clock: `attachments_days` takes an
/// old email's attachment and raw message and leaves its text;
/// `messages_days` then takes its messages; the conversation itself stays
/// (no `interactions_days`), and a newer email keeps everything.
#[test]
fn retention_takes_old_attachments_then_old_messages_and_keeps_newer_mail() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let sink = SmtpSink::start(&dir.path().join("sink"), 0);
    let (s, key, smtp) = setup(dir.path(), &sink, mis.port, &[]);
    let script = r#"
import smtplib, sys
from email.message import EmailMessage
m = EmailMessage()
m["From"] = sys.argv[2]
m["To"] = "help@freight.test"
m["Subject"] = "Papers"
m.set_content("Papers for " + sys.argv[2])
m.add_attachment(b"PDF" * 300, maintype="application", subtype="pdf", filename="papers.pdf")
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20) as c:
    c.send_message(m)
"#;
    let arrive = |from: &str| -> Value {
        let (ok, out) = python(script, &[smtp.to_string(), from.to_string()]);
        assert!(ok, "{out}");
        let mut found = Value::Null;
        assert!(eventually(Duration::from_secs(10), || {
            found = interactions(&s, &key)
                .into_iter()
                .find(|i| i["from"] == from)
                .unwrap_or(Value::Null);
            !found.is_null()
        }));
        let id = found["id"].as_str().unwrap().to_string();
        let path = format!("/v1/tenants/freight/interactions/{id}/close");
        assert_eq!(s.json("POST", &path, &key, &json!({})).status, 204);
        let msgs = messages(&s, &key, &id);
        let inbound = msgs.iter().find(|m| m["direction"] == "inbound").unwrap();
        json!({
            "id": id,
            "blob": inbound["attachments"][0]["blob"],
            "raw": inbound["meta"]["raw"],
        })
    };
    let old = arrive("old@example.lt");
    std::thread::sleep(Duration::from_millis(50));
    let between = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    std::thread::sleep(Duration::from_millis(50));
    let new = arrive("new@example.lt");
    let blob = |ix: &Value, part: &str| {
        s.get_bytes(
            &format!("/v1/tenants/freight/blobs/{}", ix[part].as_str().unwrap()),
            &key,
        )
        .0
    };
    for ix in [&old, &new] {
        assert_eq!(blob(ix, "blob"), 200, "{ix}");
        assert_eq!(blob(ix, "raw"), 200, "{ix}");
    }
    let texts = |ix: &Value| -> Vec<String> {
        messages(&s, &key, ix["id"].as_str().unwrap())
            .iter()
            .filter_map(|m| m["text"].as_str().map(String::from))
            .collect()
    };
    let old_texts = texts(&old);
    assert!(old_texts.iter().any(|t| t.contains("old@example.lt")));
    let run = |retention: Value| {
        let r = s.json("PUT", "/v1/tenants/freight/retention", &key, &retention);
        assert_eq!(r.status, 200, "{r:?}");
        let r = s.json(
            "POST",
            "/v1/retention/run",
            &s.admin,
            &json!({"now_ms": between + 86_400_000}),
        );
        assert_eq!(r.status, 200, "{r:?}");
    };

    // A day for attachments (and raw messages): the old email's go.
    run(json!({"attachments_days": 1}));
    assert_eq!(blob(&old, "blob"), 404);
    assert_eq!(blob(&old, "raw"), 404);
    assert_eq!(texts(&old), old_texts, "the old text stays");
    assert_eq!(blob(&new, "blob"), 200);
    assert_eq!(blob(&new, "raw"), 200);

    // A day for messages: the old conversation's messages go, it stays.
    run(json!({"messages_days": 1}));
    assert!(texts(&old).is_empty(), "{:?}", texts(&old));
    let a = s.get(
        &format!(
            "/v1/tenants/freight/interactions/{}",
            old["id"].as_str().unwrap()
        ),
        &key,
    );
    assert_eq!(a.status, 200, "the conversation stays: {a:?}");
    assert!(texts(&new).iter().any(|t| t.contains("new@example.lt")));
    assert_eq!(blob(&new, "blob"), 200);
}
