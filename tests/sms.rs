//! The SMS channel end to end: the real server binds over SMPP to an
//! SMSC we did not write (node-smpp's server, scripted by
//! tests/peers/smsc/smsc.js); the JSON logistics hotline answers texts
//! with an HTTP lookup.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_tests::{
    LOOPBACK, Server, Smsc, TinyHttp, deploy_hotline, eventually, smpp_carrier, waybills,
};
use serde_json::{Value, json};
use std::time::Duration;

const NUMBER: &str = "37060000001";
const CUSTOMER: &str = "37060000009";
const WAIT: Duration = Duration::from_secs(30);

/// A server whose tenant `freight` has SMS number [`NUMBER`] on the
/// hotline and a carrier bound to `smsc`.
fn setup(dir: &std::path::Path, smsc: &Smsc, mis_port: u16) -> (Server, String) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let s = Server::start(&data, LOOPBACK).unwrap();
    let key = s.tenant("freight");
    deploy_hotline(&s, "freight", &key, mis_port);
    let a = s.json(
        "PUT",
        &format!("/v1/tenants/freight/addresses/{NUMBER}"),
        &key,
        &json!({"channel": "sms", "flow": "hotline"}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    carrier(&s, &key, smsc.port, "secret");
    smsc.wait_for(WAIT, |e| e["ev"] == "bind" && e["ok"] == true);
    assert!(
        eventually(WAIT, || {
            s.get("/v1/tenants/freight/sms-carriers/smsc", &key).body["link"]["state"] == "bound"
        }),
        "{:?}",
        s.get("/v1/tenants/freight/sms-carriers/smsc", &key)
    );
    (s, key)
}

fn carrier(s: &Server, key: &str, port: u16, password: &str) {
    smpp_carrier(s, "freight", key, port, password, &[NUMBER]);
}

fn interactions(s: &Server, key: &str) -> Vec<Value> {
    s.interactions("freight", key)
}

fn messages(s: &Server, key: &str, ix: &str) -> Vec<Value> {
    s.messages("freight", key, ix)
}

/// Texts the SMSC was asked to send to the customer, in order.
fn sent_texts(smsc: &Smsc) -> Vec<String> {
    smsc.named("submit_sm")
        .iter()
        .filter(|e| e["destination_addr"] == CUSTOMER)
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect()
}

/// The customer's text, as a `deliver_sm`; waits for our answer to it.
fn mo(smsc: &mut Smsc, tag: &str, cmd: Value) -> Value {
    let mut cmd = cmd;
    cmd["cmd"] = json!("mo");
    cmd["tag"] = json!(tag);
    smsc.send(cmd);
    smsc.wait_for(WAIT, |e| e["ev"] == "deliver_sm_resp" && e["tag"] == tag)
}

/// The parts of a long UCS-2 text as a phone sends them: 67 characters
/// each behind a concatenation UDH.
fn ucs2_parts(text: &str, reference: u8) -> Vec<String> {
    let units: Vec<u16> = text.encode_utf16().collect();
    let chunks: Vec<&[u16]> = units.chunks(67).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut b = vec![5, 0, 3, reference, chunks.len() as u8, i as u8 + 1];
            b.extend(c.iter().flat_map(|u| u.to_be_bytes()));
            b.iter().map(|x| format!("{x:02x}")).collect()
        })
        .collect()
}

#[test]
fn a_text_runs_the_hotline_and_long_texts_and_receipts_go_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let mut smsc = Smsc::start("test", "secret");
    let (s, key) = setup(dir.path(), &smsc, mis.port);
    let bind = smsc.named("bind")[0].clone();
    assert_eq!(bind["interface_version"], 0x34, "SMPP 3.4");

    // The customer texts; the hotline's menu comes back by SMS.
    let r = mo(
        &mut smsc,
        "hi",
        json!({"from": CUSTOMER, "to": NUMBER, "text": "Hello"}),
    );
    assert_eq!(r["status"], 0);
    smsc.wait_for(WAIT, |e| {
        e["ev"] == "submit_sm" && e["text"].as_str().unwrap().starts_with("Welcome to Baltic")
    });
    let first = smsc.named("submit_sm")[0].clone();
    assert_eq!(first["source_addr"], NUMBER);
    assert_eq!(first["destination_addr"], CUSTOMER);
    assert_eq!(first["source_addr_ton"], 1, "international");
    assert_eq!(first["registered_delivery"], 1, "a receipt is asked for");
    assert_eq!(first["data_coding"], 0, "GSM 03.38");
    assert_eq!(first["esm_class"], 0);
    // Track (1), then the waybill: the MIS answers and so does the flow.
    mo(
        &mut smsc,
        "one",
        json!({"from": CUSTOMER, "to": NUMBER, "text": "1"}),
    );
    smsc.wait_for(WAIT, |e| {
        e["ev"] == "submit_sm" && e["text"].as_str().unwrap().contains("waybill number")
    });
    mo(
        &mut smsc,
        "wb",
        json!({"from": CUSTOMER, "to": NUMBER, "text": "123"}),
    );
    let where_ = smsc.wait_for(WAIT, |e| {
        e["ev"] == "submit_sm" && e["text"].as_str().unwrap().contains("near Vilnius")
    });

    // One conversation holds it all, in order.
    let ixs = interactions(&s, &key);
    let sms: Vec<&Value> = ixs.iter().filter(|i| i["channel"] == "sms").collect();
    assert_eq!(sms.len(), 1, "{ixs:?}");
    let ix = sms[0]["id"].as_str().unwrap().to_string();
    let ms = messages(&s, &key, &ix);
    let inbound: Vec<&str> = ms
        .iter()
        .filter(|m| m["direction"] == "inbound")
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(inbound, ["Hello", "1", "123"]);

    // A receipt for the answer marks it delivered.
    let answer = ms
        .iter()
        .find(|m| m["text"].as_str().unwrap_or("").contains("near Vilnius"))
        .unwrap()
        .clone();
    smsc.send(json!({"cmd": "dlr", "id": where_["message_id"], "stat": "DELIVRD", "tag": "dlr1"}));
    let r = smsc.wait_for(WAIT, |e| e["ev"] == "deliver_sm_resp" && e["tag"] == "dlr1");
    assert_eq!(r["status"], 0);
    let id = answer["id"].as_str().unwrap();
    assert!(
        eventually(WAIT, || {
            s.get(&format!("/v1/tenants/freight/messages/{id}"), &key)
                .body["status"]
                == "delivered"
        }),
        "{:?}",
        s.get(&format!("/v1/tenants/freight/messages/{id}"), &key)
    );

    let long: String = "Sveiki! Ar galite pasakyti, kur mano krovinys? Ačiū. "
        .repeat(6)
        .chars()
        .take(300)
        .collect();
    assert_eq!(long.chars().count(), 300);
    // A 300-character text in Lithuanian goes out: five UCS-2 parts that
    // join up again.
    let before = smsc.named("submit_sm").len();
    let a = s.json(
        "POST",
        &format!("/v1/tenants/freight/interactions/{ix}/messages"),
        &key,
        &json!({"text": long}),
    );
    assert_eq!(a.status, 201, "{a:?}");
    let out = smsc.wait_count("submit_sm", before + 5, WAIT)[before..].to_vec();
    assert!(
        out.iter()
            .all(|e| e["data_coding"] == 8 && e["esm_class"] == 0x40)
    );
    let mut by_seq: Vec<&Value> = out.iter().collect();
    by_seq.sort_by_key(|e| e["concat"]["seq"].as_u64());
    assert!(by_seq.iter().all(|e| e["concat"]["total"] == 5));
    let reference = &by_seq[0]["concat"]["ref"];
    assert!(by_seq.iter().all(|e| &e["concat"]["ref"] == reference));
    let joined: String = by_seq.iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(joined, long);
    // A failure receipt for any of its parts marks it failed.
    let sent_id = a.body["id"].as_str().unwrap().to_string();
    assert!(eventually(WAIT, || {
        s.get(&format!("/v1/tenants/freight/messages/{sent_id}"), &key)
            .body["status"]
            == "sent"
    }));
    smsc.send(
        json!({"cmd": "dlr", "id": by_seq[3]["message_id"], "stat": "UNDELIV", "err": "034"}),
    );
    assert!(eventually(WAIT, || {
        let m = s
            .get(&format!("/v1/tenants/freight/messages/{sent_id}"), &key)
            .body;
        m["status"] == "failed" && m["error"] == "UNDELIV (error 034)"
    }));

    // The customer sends it back (it ends the flow's menu): five parts,
    // the second one twice (the SMSC sent it again): one message, whole.
    let parts = ucs2_parts(&long, 77);
    assert_eq!(parts.len(), 5);
    let order = [0, 1, 1, 3, 2, 4];
    for (n, i) in order.iter().enumerate() {
        let r = mo(
            &mut smsc,
            &format!("part{n}"),
            json!({"from": CUSTOMER, "to": NUMBER, "hex": parts[*i], "data_coding": 8, "esm_class": 0x40}),
        );
        assert_eq!(r["status"], 0, "part {i}");
    }
    assert!(
        eventually(WAIT, || {
            messages(&s, &key, &ix)
                .iter()
                .filter(|m| m["direction"] == "inbound")
                .count()
                == 4
        }),
        "{:?}",
        messages(&s, &key, &ix)
    );
    let ms = messages(&s, &key, &ix);
    let got = ms.iter().rfind(|m| m["direction"] == "inbound").unwrap();
    assert_eq!(got["text"], long);

    // Nothing of the customer's texts was sent twice.
    let texts = sent_texts(&smsc);
    assert_eq!(
        texts.iter().filter(|t| t.contains("near Vilnius")).count(),
        1,
        "{texts:?}"
    );
}

#[test]
fn other_tenants_numbers_bad_passwords_and_bad_input_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let mut smsc = Smsc::start("test", "secret");
    let (s, key) = setup(dir.path(), &smsc, mis.port);
    // Another tenant's number: the freight carrier cannot write to it.
    let other = s.tenant("other");
    deploy_hotline(&s, "other", &other, mis.port);
    let a = s.json(
        "PUT",
        "/v1/tenants/other/addresses/37060000002",
        &other,
        &json!({"channel": "sms", "flow": "hotline"}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let r = mo(
        &mut smsc,
        "x",
        json!({"from": CUSTOMER, "to": "37060000002", "text": "hi"}),
    );
    assert_eq!(r["status"], 0x0B, "invalid destination");
    let a = s.get("/v1/tenants/other/interactions?limit=10", &other);
    assert_eq!(a.body["interactions"].as_array().unwrap().len(), 0, "{a:?}");
    // An empty text is refused for good; the link stays up.
    let r = mo(
        &mut smsc,
        "e",
        json!({"from": CUSTOMER, "to": NUMBER, "text": ""}),
    );
    assert_eq!(r["status"], 0x65);
    let r = mo(
        &mut smsc,
        "ok",
        json!({"from": CUSTOMER, "to": NUMBER, "text": "hi"}),
    );
    assert_eq!(r["status"], 0);

    // Settings are checked.
    for (bad, why) in [
        (
            json!({"smpp": {"host": "127.0.0.1", "system_id": "test", "password_secret": "nope"}}),
            "secret",
        ),
        (
            json!({"numbers": ["37060000002"], "smpp": {"host": "127.0.0.1", "system_id": "test", "password_secret": "smpp-password"}}),
            "not an SMS address",
        ),
        (
            json!({"smpp": {"host": "127.0.0.1", "system_id": "a-system-id-too-long", "password_secret": "smpp-password"}}),
            "system_id",
        ),
        (
            json!({"smpp": {"host": "127.0.0.1", "system_id": "t", "password_secret": "smpp-password", "window": 0}}),
            "window",
        ),
    ] {
        let a = s.json("PUT", "/v1/tenants/freight/sms-carriers/bad", &key, &bad);
        assert_eq!(a.status, 400, "{a:?}");
        assert!(a.body.to_string().contains(why), "{a:?}");
    }
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/secrets/long",
        &key,
        &json!({"value": "longer-than-8"}),
    );
    assert!(a.status == 200 || a.status == 204);
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/sms-carriers/bad",
        &key,
        &json!({"smpp": {"host": "127.0.0.1", "system_id": "t", "password_secret": "long"}}),
    );
    assert_eq!(a.status, 400, "{a:?}");
    // Another tenant cannot see freight's carrier.
    let a = s.get("/v1/tenants/freight/sms-carriers/smsc", &other);
    assert!(
        a.status == 401 || a.status == 403 || a.status == 404,
        "{a:?}"
    );

    // A wrong password: the bind is refused, the link says why and keeps
    // trying; the right one binds again.
    let binds = smsc.named("bind").len();
    carrier(&s, &key, smsc.port, "wrong");
    smsc.wait_count("bind", binds + 1, WAIT);
    assert!(eventually(WAIT, || {
        let l = &s.get("/v1/tenants/freight/sms-carriers/smsc", &key).body["link"];
        l["state"] == "down" && l["error"].as_str().unwrap_or("").contains("bind refused")
    }));
    carrier(&s, &key, smsc.port, "secret");
    assert!(eventually(WAIT, || {
        s.get("/v1/tenants/freight/sms-carriers/smsc", &key).body["link"]["state"] == "bound"
    }));
    // The CLI lists the carriers with their links; deleting one unbinds.
    let cli = |args: &[&str]| {
        std::process::Command::new(plugboard_tests::binary())
            .args(["--url", &s.url(), "--token", &key])
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(&["carrier", "list", "freight"]);
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["name"], "smsc");
    assert_eq!(listed[0]["link"]["state"], "bound");
    let unbinds = smsc.named("unbind").len();
    let out = cli(&["carrier", "delete", "freight", "smsc"]);
    assert!(out.status.success(), "{out:?}");
    smsc.wait_count("unbind", unbinds + 1, WAIT);
    let out = cli(&["carrier", "list", "freight"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}

#[test]
fn throttling_and_a_dropped_link_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let mut smsc = Smsc::start("test", "secret");
    let (s, key) = setup(dir.path(), &smsc, mis.port);
    mo(
        &mut smsc,
        "hi",
        json!({"from": CUSTOMER, "to": NUMBER, "text": "Hello"}),
    );
    smsc.wait_for(WAIT, |e| e["ev"] == "submit_sm");
    let ix = interactions(&s, &key)
        .iter()
        .find(|i| i["channel"] == "sms")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // The SMSC throttles the next 6 submits, then drops the link while
    // the rest are going out. (A conversation's messages go one at a time,
    // so the same message is throttled again and again: the pauses double,
    // 200 ms to 6.4 s.)
    let throttles = 6;
    smsc.send(json!({"cmd": "throttle", "n": throttles}));
    let n = 60;
    for i in 0..n {
        let a = s.json(
            "POST",
            &format!("/v1/tenants/freight/interactions/{ix}/messages"),
            &key,
            &json!({"text": format!("update {i}")}),
        );
        assert_eq!(a.status, 201, "{a:?}");
        if i == n / 2 {
            smsc.send(json!({"cmd": "drop"}));
        }
    }
    // Every update reaches the SMSC and is marked sent.
    assert!(
        eventually(Duration::from_secs(60), || {
            let texts = sent_texts(&smsc);
            (0..n).all(|i| texts.contains(&format!("update {i}")))
        }),
        "{:?}",
        sent_texts(&smsc)
    );
    assert!(eventually(Duration::from_secs(60), || {
        messages(&s, &key, &ix)
            .iter()
            .filter(|m| m["text"].as_str().unwrap_or("").starts_with("update "))
            .all(|m| m["status"] == "sent")
    }));
    assert!(smsc.named("bind").len() >= 2, "the link bound again");
    assert_eq!(smsc.named("throttled").len(), throttles);
    // The throttled ones went once; a submit the SMSC took just as the
    // link dropped may go again (SMPP cannot tell): at most the window.
    let texts = sent_texts(&smsc);
    let twice = (0..n)
        .filter(|i| {
            texts
                .iter()
                .filter(|t| **t == format!("update {i}"))
                .count()
                > 1
        })
        .count();
    eprintln!("sent again after the drop: {twice} of {n}");
    assert!(twice <= 10, "{texts:?}");
    // ... and they went in the order they were written.
    let mut first_seen: Vec<usize> = Vec::new();
    for t in &texts {
        if let Some(i) = t.strip_prefix("update ").and_then(|i| i.parse().ok())
            && !first_seen.contains(&i)
        {
            first_seen.push(i);
        }
    }
    assert_eq!(first_seen, (0..n).collect::<Vec<_>>(), "{texts:?}");
}

/// The carrier's HTTP API stand-in (tests/peers/sms_api.py): its requests.
struct SmsApi {
    child: std::process::Child,
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl SmsApi {
    fn start() -> SmsApi {
        use std::io::BufRead;
        let port = plugboard_tests::free_port();
        let mut child = std::process::Command::new(plugboard_tests::peers_python())
            .arg(plugboard_tests::root().join("tests/peers/sms_api.py"))
            .arg(port.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.contains("listening"), "{line}");
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = requests.clone();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(serde_json::from_str(&l).unwrap());
            }
        });
        SmsApi {
            child,
            port,
            requests,
        }
    }

    fn wait(&self, n: usize) -> Vec<Value> {
        assert!(
            eventually(WAIT, || self.requests.lock().unwrap().len() >= n),
            "{:?}",
            self.requests.lock().unwrap()
        );
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for SmsApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Twilio's webhook signature: HMAC-SHA1 of the URL and the sorted
/// fields, base64.
fn twilio_signature(token: &str, url: &str, fields: &[(&str, &str)]) -> String {
    use base64::Engine as _;
    use hmac::Mac;
    let mut sorted = fields.to_vec();
    sorted.sort();
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).unwrap();
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// POSTs a webhook; (status, body).
fn webhook(url: &str, content_type: &str, headers: &[(&str, String)], body: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.post(url).header("content-type", content_type);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let mut r = req.send(body).unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

fn form(fields: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

#[test]
fn http_carriers_send_through_their_api_and_take_only_signed_webhooks() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let api = SmsApi::start();
    let data = dir.path().join("data");
    let s = Server::start(&data, LOOPBACK).unwrap();
    let key = s.tenant("freight");
    deploy_hotline(&s, "freight", &key, mis.port);
    for n in [NUMBER, "37060000003"] {
        let a = s.json(
            "PUT",
            &format!("/v1/tenants/freight/addresses/{n}"),
            &key,
            &json!({"channel": "sms", "flow": "hotline"}),
        );
        assert_eq!(a.status, 200, "{a:?}");
    }
    for (name, value) in [("twilio", "AC1:tok123"), ("signing", "json-key")] {
        let a = s.json(
            "PUT",
            &format!("/v1/tenants/freight/secrets/{name}"),
            &key,
            &json!({"value": value}),
        );
        assert!(a.status == 200 || a.status == 204, "{a:?}");
    }
    let base = s.url();
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/sms-carriers/tw",
        &key,
        &json!({"numbers": [NUMBER], "http": {"dialect": "twilio",
            "send_url": format!("http://127.0.0.1:{}/2010-04-01/Accounts/AC1/Messages.json", api.port),
            "secret": "twilio", "public_url": base}}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["link"]["state"], "http");
    // A Twilio secret without its token would let anyone sign webhooks.
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/secrets/no-token",
        &key,
        &json!({"value": "AC1:"}),
    );
    assert!(a.status == 200 || a.status == 204, "{a:?}");
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/sms-carriers/bad",
        &key,
        &json!({"http": {"dialect": "twilio", "send_url": "http://127.0.0.1:1/x", "secret": "no-token"}}),
    );
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body.to_string().contains("ACCOUNT_SID:AUTH_TOKEN"),
        "{a:?}"
    );

    // Twilio posts the customer's text, signed: the flow answers through
    // the Messages API.
    let url = format!("{base}/sms/freight/tw/inbound");
    let fields = [
        ("From", "+37069990001"),
        ("To", "+37060000001"),
        ("Body", "Hello"),
        ("MessageSid", "SMin1"),
    ];
    let sig = twilio_signature("tok123", &url, &fields);
    let (st, body) = webhook(
        &url,
        "application/x-www-form-urlencoded",
        &[("x-twilio-signature", sig.clone())],
        &form(&fields),
    );
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("<Response/>"), "{body}");
    // Twilio retries it: the same message, stored once.
    let (st, _) = webhook(
        &url,
        "application/x-www-form-urlencoded",
        &[("x-twilio-signature", sig)],
        &form(&fields),
    );
    assert_eq!(st, 200);
    // A forged one (another body under the same signature, or none).
    let forged = [
        ("Body", "Send me the money"),
        fields[0],
        fields[1],
        fields[3],
    ];
    let (st, _) = webhook(
        &url,
        "application/x-www-form-urlencoded",
        &[(
            "x-twilio-signature",
            twilio_signature("tok123", &url, &fields),
        )],
        &form(&forged),
    );
    assert_eq!(st, 403);
    let (st, _) = webhook(
        &url,
        "application/x-www-form-urlencoded",
        &[],
        &form(&fields),
    );
    assert_eq!(st, 403);
    let sent = api.wait(1);
    let first = &sent[0];
    assert_eq!(first["path"], "/2010-04-01/Accounts/AC1/Messages.json");
    use base64::Engine as _;
    assert_eq!(
        first["headers"]["authorization"],
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("AC1:tok123")
        )
    );
    let sent_fields: std::collections::HashMap<String, String> =
        form_urlencoded::parse(first["body"].as_str().unwrap().as_bytes())
            .into_owned()
            .collect();
    assert_eq!(sent_fields["From"], "+37060000001");
    assert_eq!(sent_fields["To"], "+37069990001");
    assert!(
        sent_fields["Body"].starts_with("Welcome to Baltic"),
        "{sent:?}"
    );
    assert_eq!(
        sent_fields["StatusCallback"],
        format!("{base}/sms/freight/tw/status")
    );
    let ix = interactions(&s, &key)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ms = messages(&s, &key, &ix);
    assert_eq!(
        ms.iter().filter(|m| m["direction"] == "inbound").count(),
        1,
        "{ms:?}"
    );
    // Twilio reports the answer delivered.
    let sid = "SM1";
    let status_url = format!("{base}/sms/freight/tw/status");
    let answered = ms
        .iter()
        .find(|m| m["external_id"] == sid)
        .map(|m| m["id"].as_str().unwrap().to_string());
    let answered = answered.unwrap_or_else(|| {
        assert!(eventually(WAIT, || messages(&s, &key, &ix)
            .iter()
            .any(|m| m["external_id"] == sid)));
        messages(&s, &key, &ix)
            .iter()
            .find(|m| m["external_id"] == sid)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    });
    let fields = [("MessageSid", sid), ("MessageStatus", "delivered")];
    let (st, body) = webhook(
        &status_url,
        "application/x-www-form-urlencoded",
        &[(
            "x-twilio-signature",
            twilio_signature("tok123", &status_url, &fields),
        )],
        &form(&fields),
    );
    assert_eq!(st, 200, "{body}");
    let m = s.get(&format!("/v1/tenants/freight/messages/{answered}"), &key);
    assert_eq!(m.body["status"], "delivered", "{m:?}");

    // The JSON dialect, both ways signed as our webhooks are.
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/sms-carriers/js",
        &key,
        &json!({"numbers": ["37060000003"], "http": {"dialect": "json",
            "send_url": format!("http://127.0.0.1:{}/send", api.port), "secret": "signing"}}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let body = json!({"id": "p-1", "from": "+37069990002", "to": "37060000003", "text": "Hello"})
        .to_string();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |t: u64, body: &str| {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"json-key").unwrap();
        mac.update(format!("{t}.{body}").as_bytes());
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    };
    let url = format!("{base}/sms/freight/js/inbound");
    let (st, _) = webhook(
        &url,
        "application/json",
        &[("x-plugboard-signature", sign(t - 3600, &body))],
        &body,
    );
    assert_eq!(st, 403, "a stale signature");
    let (st, answer) = webhook(
        &url,
        "application/json",
        &[("x-plugboard-signature", sign(t, &body))],
        &body,
    );
    assert_eq!(st, 200, "{answer}");
    assert!(eventually(WAIT, || api
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| r["path"] == "/send")));
    let sent = api.wait(1);
    let out = sent.iter().find(|r| r["path"] == "/send").unwrap();
    let out_body = out["body"].as_str().unwrap();
    let v: Value = serde_json::from_str(out_body).unwrap();
    assert_eq!(
        (v["from"].as_str(), v["to"].as_str()),
        (Some("37060000003"), Some("37069990002"))
    );
    let given = out["headers"]["x-plugboard-signature"].as_str().unwrap();
    let t_given: u64 = given[2..given.find(',').unwrap()].parse().unwrap();
    assert_eq!(given, sign(t_given, out_body), "our send is signed");
    // Another tenant's carrier name does not reach freight's number.
    let (st, _) = webhook(
        &format!("{base}/sms/other/js/inbound"),
        "application/json",
        &[("x-plugboard-signature", sign(t, &body))],
        &body,
    );
    assert_eq!(st, 404);
}
