//! The web chat channel end to end: the real server, the widget built from
//! TypeScript, embedded in a page of another origin and driven in headless
//! Chromium; raw WebSocket clients for the limits, retries and a SIGKILL.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_tests::{
    Browser, LOOPBACK, Server, Smsc, SmtpSink, StaticSite, TinyHttp, available_agent,
    console_sign_in, deploy_hotline, dns, eventually, files_containing, plugin, smpp_carrier,
    text_of, waybills,
};
use serde_json::{Value, json};
use std::net::TcpStream;
use std::time::{Duration, Instant};

type Ws = tungstenite::WebSocket<TcpStream>;

/// Tenant `freight` whose chat address `web-freight` runs the logistics
/// hotline (keyword menu, HTTP lookup, hand-over to the `agents` queue).
fn wire(s: &Server, mis_port: u16) -> String {
    let key = s.tenant("freight");
    deploy_hotline(s, "freight", &key, mis_port);
    let r = s.json(
        "PUT",
        "/v1/tenants/freight/addresses/web-freight",
        &key,
        &json!({"channel": "chat", "flow": "hotline"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    key
}

/// [`wire`], with the hotline also on email (`help@freight.test`) and
/// SMS (`37060000001`, through the SMSC, bound).
fn wire_all(s: &Server, mis_port: u16, smsc: &Smsc) -> String {
    let key = wire(s, mis_port);
    for (address, channel) in [("help@freight.test", "email"), ("37060000001", "sms")] {
        let a = s.json(
            "PUT",
            &format!("/v1/tenants/freight/addresses/{address}"),
            &key,
            &json!({"channel": channel, "flow": "hotline"}),
        );
        assert_eq!(a.status, 200, "{a:?}");
    }
    smpp_carrier(s, "freight", &key, smsc.port, "secret", &[]);
    smsc.wait_for(Duration::from_secs(30), |e| e["ev"] == "bind");
    key
}

fn ws_connect(s: &Server, origin: Option<&str>) -> Result<Ws, String> {
    let stream = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let url = format!("ws://127.0.0.1:{}/chat/web-freight/ws", s.port);
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
        .map_err(|e| e.to_string())?;
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    match tungstenite::client(req, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            Err(format!("HTTP {}", r.status().as_u16()))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn send(ws: &mut Ws, frame: Value) {
    ws.send(tungstenite::Message::Text(frame.to_string().into()))
        .unwrap();
}

/// The next JSON frame (`None` when the server closed or went quiet).
fn next(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => return serde_json::from_str(&t).ok(),
            Ok(tungstenite::Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// The next frame of `kind`, skipping others.
fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let f = next(ws).unwrap_or_else(|| panic!("no {kind} frame"));
        if f["type"] == kind {
            return f;
        }
    }
}

/// Opens a widget connection and says hello; (socket, welcome, history).
fn hello(s: &Server, hello: Value) -> (Ws, Value, Value) {
    let mut ws = ws_connect(s, None).unwrap();
    send(&mut ws, hello);
    let welcome = next(&mut ws).unwrap();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let history = next(&mut ws).unwrap();
    assert_eq!(history["type"], "history", "{history}");
    (ws, welcome, history)
}

fn messages(s: &Server, key: &str, ix: &str) -> Vec<Value> {
    s.messages("freight", key, ix)
}

/// The widget's messages on the page: (from, text, status) each.
const SHOWN: &str = r#"Array.from(document.querySelector('[data-pb=root]').shadowRoot
    .querySelectorAll('[data-pb=msg]')).map(m => [m.dataset.from,
    m.querySelector('[data-pb=text]').textContent, m.dataset.status || '',
    Array.from(m.querySelectorAll('[data-pb=file-name]')).map(f => f.textContent).join(',')])"#;

fn shown(b: &mut Browser) -> Vec<(String, String, String, String)> {
    let v = b.must(json!({"op": "eval", "js": SHOWN}));
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m[0].as_str().unwrap().to_string(),
                m[1].as_str().unwrap().to_string(),
                m[2].as_str().unwrap().to_string(),
                m[3].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until a message from `from` containing `text` is on the page.
fn wait_shown(b: &mut Browser, from: &str, text: &str) {
    let js = format!(
        "({SHOWN}).some(m => m[0] === {} && m[1].includes({}))",
        json!(from),
        json!(text)
    );
    if let Err(e) = b.run(json!({"op": "wait", "js": js, "ms": 20000})) {
        panic!(
            "no {from} message with {text:?}: {e}; shown: {:?}",
            shown(b)
        );
    }
}

fn type_and_send(b: &mut Browser, text: &str) {
    b.must(json!({"op": "fill", "sel": "[data-pb=input]", "text": text}));
    b.must(json!({"op": "press", "sel": "[data-pb=input]", "key": "Enter"}));
}

#[test]
fn a_visitor_chats_in_chromium_with_the_hotline_reloads_and_is_handed_to_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let s = Server::start(dir.path(), LOOPBACK).unwrap();
    let key = wire(&s, mis.port);
    // The customer's own site, on another origin, embeds the widget.
    let page = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Baltic Freight</title></head>\
         <body><h1>Baltic Freight</h1>\
         <script>window.PlugboardChat = {{name: \"Rita\"}};</script>\
         <script src=\"http://127.0.0.1:{}/chat/widget.js\" data-address=\"web-freight\" async></script>\
         </body></html>",
        s.port
    );
    let site = StaticSite::start(&[("index.html", page)]);
    let w = s.json(
        "PUT",
        "/v1/tenants/freight/chat-widgets/web-freight",
        &key,
        &json!({"origins": [site.origin()], "title": "Baltic Freight", "max_file_bytes": 100000}),
    );
    assert_eq!(w.status, 200, "{w:?}");
    // An agent, for the hand-over.
    let ann = available_agent(&s, "freight", &key, "ann", json!({"chat": 3}));

    let mut b = Browser::start();
    b.must(json!({"op": "open", "url": format!("{}/index.html", site.origin())}));
    b.must(json!({"op": "click", "sel": "[data-pb=open]"}));
    b.must(json!({"op": "wait", "js": "document.querySelector('[data-pb=root]').shadowRoot.querySelector('[data-pb=state]').textContent === ''"}));
    // The keyword menu, then the waybill looked up over HTTP.
    type_and_send(&mut b, "track");
    wait_shown(&mut b, "bot", "waybill number");
    type_and_send(&mut b, "123");
    wait_shown(&mut b, "bot", "near Vilnius");
    let before = shown(&mut b);
    let mine: Vec<_> = before.iter().filter(|m| m.0 == "visitor").collect();
    assert_eq!(mine.len(), 2, "{before:?}");
    assert!(
        mine.iter().all(|m| m.2 == "received"),
        "acknowledged: {before:?}"
    );
    let ixs = s.get("/v1/tenants/freight/interactions", &key).body["interactions"].clone();
    let ixs = ixs.as_array().unwrap();
    assert_eq!(ixs.len(), 1, "{ixs:?}");
    let ix = ixs[0]["id"].as_str().unwrap().to_string();
    assert_eq!(ixs[0]["channel"], "chat");

    // A reload: the same visitor, the whole conversation back (what is
    // stored by then: the flow may have said more after `before`).
    b.must(json!({"op": "reload"}));
    wait_shown(&mut b, "bot", "near Vilnius");
    let texts =
        |v: &[(String, String, String, String)]| v.iter().map(|m| m.1.clone()).collect::<Vec<_>>();
    let stored = messages(&s, &key, &ix);
    let stored_texts: Vec<String> = stored
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || texts(&shown(&mut b))
            == stored_texts),
        "history after a reload: {:?}, stored {stored_texts:?}",
        shown(&mut b)
    );
    assert!(texts(&shown(&mut b)).starts_with(&texts(&before)));
    let visitor = stored[0]["from"].as_str().unwrap().to_string();
    assert!(visitor.starts_with("v-"), "{visitor}");

    // The tenant's event stream, as an agent desktop follows it.
    let mut events = s.tenant_stream("freight", &key);

    // "0" (the menu after a lookup): the flow hands the conversation to
    // the queue; Ann takes it.
    type_and_send(&mut b, "0");
    wait_shown(&mut b, "bot", "an agent will be with you");
    assert!(eventually(Duration::from_secs(10), || {
        s.get(&format!("/v1/tenants/freight/tasks/{ix}"), &key).body["state"] == "offered"
    }));
    let acc = s.json(
        "POST",
        &format!("/v1/tenants/freight/tasks/{ix}/accept"),
        &ann,
        &json!({}),
    );
    assert_eq!(acc.status, 200, "{acc:?}");
    // The visitor types: Ann's desktop sees it.
    b.must(json!({"op": "fill", "sel": "[data-pb=input]", "text": "Hello?"}));
    let mut typing = false;
    let t0 = Instant::now();
    while !typing && t0.elapsed() < Duration::from_secs(10) {
        let Ok(msg) = events.read() else { break };
        let Ok(text) = msg.to_text() else { continue };
        let v: Value = serde_json::from_str(text).unwrap_or_default();
        typing = v["kind"] == "typing"
            && v["interaction"] == ix.as_str()
            && v["data"]["author"]["type"] == "customer";
    }
    assert!(typing, "the visitor's typing did not reach the stream");
    b.must(json!({"op": "press", "sel": "[data-pb=input]", "key": "Enter"}));
    wait_shown(&mut b, "visitor", "Hello?");
    // Ann types, then answers: the widget shows both.
    let t = s.json(
        "POST",
        &format!("/v1/tenants/freight/interactions/{ix}/typing"),
        &ann,
        &json!({"on": true}),
    );
    assert_eq!(t.status, 204, "{t:?}");
    b.must(json!({"op": "wait", "js": "document.querySelector('[data-pb=root]').shadowRoot.querySelector('[data-pb=typing]').textContent.includes('typing')"}));
    let r = s.json(
        "POST",
        &format!("/v1/tenants/freight/interactions/{ix}/messages"),
        &ann,
        &json!({"text": "Hi Rita, Ann here. Your truck is on time."}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let reply_id = r.body["id"].as_str().unwrap().to_string();
    wait_shown(&mut b, "agent", "Ann here");
    // The open widget reads it: the receipt reaches the message.
    assert!(
        eventually(Duration::from_secs(10), || {
            s.get(&format!("/v1/tenants/freight/messages/{reply_id}"), &ann)
                .body["status"]
                == "read"
        }),
        "the widget's read receipt"
    );
    // Ann reads the visitor's message: the widget shows it read.
    let hello_id = messages(&s, &key, &ix)
        .iter()
        .find(|m| m["text"] == "Hello?")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rd = s.json(
        "POST",
        &format!("/v1/tenants/freight/messages/{hello_id}/read"),
        &ann,
        &json!({}),
    );
    assert_eq!(rd.status, 200, "{rd:?}");
    b.must(json!({"op": "wait", "js": format!("({SHOWN}).some(m => m[1] === 'Hello?' && m[2] === 'read')")}));

    // A file, stored as a blob of the conversation.
    b.must(json!({"op": "file", "sel": "[data-pb=file]", "name": "waybill.pdf", "mime": "application/pdf", "size": 2048}));
    b.must(json!({"op": "wait", "js": format!("({SHOWN}).some(m => m[3].includes('waybill.pdf') && m[2] === 'received')")}));
    let with_file = messages(&s, &key, &ix)
        .into_iter()
        .find(|m| m["attachments"].as_array().is_some_and(|a| !a.is_empty()))
        .expect("the message with the file");
    let att = &with_file["attachments"][0];
    assert_eq!(att["name"], "waybill.pdf");
    assert_eq!(att["size"], 2048);
    let (status, bytes) = s.get_bytes(
        &format!(
            "/v1/tenants/freight/blobs/{}",
            att["blob"].as_str().unwrap()
        ),
        &key,
    );
    assert_eq!((status, bytes.len()), (200, 2048));
    // Ann, who has the conversation, gets the file as the message's; the
    // tenant's blobs stay the tenant key's.
    let file_id = with_file["id"].as_str().unwrap();
    let (status, got) = s.get_bytes(
        &format!("/v1/tenants/freight/messages/{file_id}/attachments/0"),
        &ann,
    );
    assert_eq!(status, 200);
    assert_eq!(got, bytes);
    let (status, _) = s.get_bytes(
        &format!("/v1/tenants/freight/messages/{file_id}/attachments/1"),
        &ann,
    );
    assert_eq!(status, 404);
    let (status, _) = s.get_bytes(
        &format!(
            "/v1/tenants/freight/blobs/{}",
            att["blob"].as_str().unwrap()
        ),
        &ann,
    );
    assert_eq!(status, 403);
    // A file over the widget's cap is refused with a clear message.
    b.must(json!({"op": "file", "sel": "[data-pb=file]", "name": "huge.bin", "mime": "application/octet-stream", "size": 200000}));
    let err = b.must(json!({"op": "wait", "js": "document.querySelector('[data-pb=root]').shadowRoot.querySelector('[data-pb=error]').textContent"}));
    assert!(err.as_str().unwrap().contains("too large"), "{err}");

    // One customer: the chat visitor, with the name the site gave.
    let c = s.get(
        &format!("/v1/tenants/freight/customers?channel=chat&address={visitor}"),
        &key,
    );
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(c.body["name"], "Rita", "{c:?}");
    let log = b.must(json!({"op": "log"}));
    assert!(
        !log.to_string().contains("pageerror"),
        "errors on the page: {log}"
    );
}

#[test]
fn an_agent_answers_a_chat_in_the_console_and_a_supervisor_watches_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let s = Server::start(dir.path(), LOOPBACK).unwrap();
    let key = wire(&s, mis.port);
    let page = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Baltic Freight</title></head>\
         <body><script>window.PlugboardChat = {{name: \"Rita\"}};</script>\
         <script src=\"http://127.0.0.1:{}/chat/widget.js\" data-address=\"web-freight\" async></script>\
         </body></html>",
        s.port
    );
    let site = StaticSite::start(&[("index.html", page)]);
    let w = s.json(
        "PUT",
        "/v1/tenants/freight/chat-widgets/web-freight",
        &key,
        &json!({"origins": [site.origin()]}),
    );
    assert_eq!(w.status, 200, "{w:?}");
    // The queue asks the kv-crm plugin (the tenant's customer directory in
    // its kv) for the screen pop.
    let d = s.deploy("freight", &key, "kv-crm", plugin("kv_crm"));
    assert!(d.status == 200 || d.status == 201, "{d:?}");
    let g = s.json(
        "PUT",
        "/v1/tenants/freight/plugins/kv-crm/grants",
        &key,
        &json!({"kv": true}),
    );
    assert_eq!(g.status, 200, "{g:?}");
    let q = s.json(
        "PUT",
        "/v1/tenants/freight/queues/agents",
        &key,
        &json!({"crm": "kv-crm", "offer_timeout": 60, "dispositions": ["resolved", "follow-up"]}),
    );
    assert_eq!(q.status, 200, "{q:?}");
    let mut tokens = Vec::new();
    for (agent, role) in [("ann", "agent"), ("bob", "agent"), ("sue", "supervisor")] {
        let a = s.json(
            "PUT",
            &format!("/v1/tenants/freight/agents/{agent}"),
            &key,
            &json!({"capacity": {"chat": 3}}),
        );
        assert_eq!(a.status, 200, "{a:?}");
        let t = s.json(
            "POST",
            &format!("/v1/tenants/freight/agents/{agent}/token"),
            &key,
            &json!({"role": role}),
        );
        tokens.push(t.body["token"].as_str().unwrap().to_string());
    }
    let (ann, bob, sue) = (&tokens[0], &tokens[1], &tokens[2]);
    // Bob is signed in too (to the event stream): he must see nothing of
    // Ann's chat.
    let mut bobs = s.tenant_stream("freight", bob);

    // Ann signs in to the console and goes available there.
    let mut desk = Browser::start();
    console_sign_in(&mut desk, &s, "freight", ann, "desk");
    assert_eq!(text_of(&mut desk, "[data-pb=whoami]"), "ann (agent)");
    desk.must(json!({"op": "select", "sel": "[data-pb=presence]", "value": "available"}));
    desk.must(json!({"op": "wait", "js": "document.querySelector('[data-pb=state]').textContent === 'available'"}));
    // A wrong token does not sign in.
    let mut wrong = Browser::start();
    wrong.must(json!({"op": "open", "url": format!("http://127.0.0.1:{}/console/", s.port)}));
    wrong.must(json!({"op": "fill", "sel": "[data-pb=tenant]", "text": "freight"}));
    wrong.must(json!({"op": "fill", "sel": "[data-pb=token]", "text": "pbt.freight.nope"}));
    wrong.must(json!({"op": "click", "sel": "[data-pb=signin]"}));
    let e = wrong
        .must(json!({"op": "wait", "js": "document.querySelector('[data-pb=error]').textContent"}));
    assert!(e.as_str().unwrap().contains("Sign-in failed"), "{e}");
    drop(wrong);

    // The visitor chats: a waybill lookup, then "0" for an agent.
    let mut b = Browser::start();
    b.must(json!({"op": "open", "url": format!("{}/index.html", site.origin())}));
    b.must(json!({"op": "click", "sel": "[data-pb=open]"}));
    type_and_send(&mut b, "track");
    wait_shown(&mut b, "bot", "waybill number");
    let ix = s.get("/v1/tenants/freight/interactions", &key).body["interactions"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let visitor = messages(&s, &key, &ix)[0]["from"]
        .as_str()
        .unwrap()
        .to_string();
    // The tenant's directory knows this visitor (the kv the crm reads).
    let kv = s
        .call(
            "PUT",
            &format!("/v1/tenants/freight/kv/crm/customer/{visitor}"),
            Some(&key),
            Some(br#"{"id": "c-77", "name": "Rita Jansen", "tier": "gold"}"#.to_vec()),
        )
        .unwrap();
    assert_eq!(kv.status, 204, "{kv:?}");
    type_and_send(&mut b, "123");
    wait_shown(&mut b, "bot", "near Vilnius");
    type_and_send(&mut b, "0");
    wait_shown(&mut b, "bot", "an agent will be with you");

    // The offer pops up on Ann's desk with its queue and a countdown; she
    // accepts it there.
    let sel = format!("[data-pb=offer][data-task=\"{ix}\"]");
    desk.must(json!({"op": "wait", "js": format!("document.querySelector({})", json!(sel))}));
    let offer = text_of(&mut desk, &sel);
    assert!(offer.contains("chat · agents"), "{offer}");
    let left = text_of(&mut desk, "[data-pb=countdown]");
    assert!(
        left.ends_with('s') && !left.starts_with('0'),
        "countdown {left:?}"
    );
    desk.must(json!({"op": "click", "sel": format!("{sel} [data-pb=accept]")}));
    assert!(eventually(Duration::from_secs(10), || {
        s.get(&format!("/v1/tenants/freight/tasks/{ix}"), &key).body["state"] == "connected"
    }));
    // The screen pop: the conversation so far, what the flow gathered,
    // and the CRM's profile.
    desk.must(json!({"op": "wait", "js": "[...document.querySelectorAll('[data-pb=transcript] [data-pb=msg]')].some(m => m.textContent.includes('near Vilnius'))"}));
    let transcript = text_of(&mut desk, "[data-pb=transcript]");
    assert!(transcript.contains("track"), "{transcript}");
    assert_eq!(
        text_of(&mut desk, "[data-pb=attributes] [data-attr=waybill]"),
        "123"
    );
    assert_eq!(
        text_of(&mut desk, "[data-pb=profile] [data-field=name]"),
        "Rita Jansen"
    );
    assert_eq!(
        text_of(&mut desk, "[data-pb=profile] [data-field=tier]"),
        "gold"
    );

    // The visitor writes; Ann sees it live and answers from the desk.
    type_and_send(&mut b, "Hello?");
    desk.must(json!({"op": "wait", "js": "[...document.querySelectorAll('[data-pb=msg][data-from=customer]')].some(m => m.textContent.includes('Hello?'))"}));
    desk.must(json!({"op": "fill", "sel": "[data-pb=reply]", "text": "Hi Rita, Ann here. Your truck is on time."}));
    desk.must(json!({"op": "click", "sel": "[data-pb=send]"}));
    wait_shown(&mut b, "agent", "Ann here");
    desk.must(json!({"op": "wait", "js": "[...document.querySelectorAll('[data-pb=msg][data-from=agent]')].some(m => m.textContent.includes('Ann here'))"}));
    let shots = plugboard_tests::root().join("target/screenshots");
    desk.must(json!({"op": "screenshot", "path": shots.join("agent-desktop.png")}));

    // Sue's wall: the queue with Ann's chat connected, Ann busy.
    let mut wall = Browser::start();
    console_sign_in(&mut wall, &s, "freight", sue, "wall");
    wall.must(json!({"op": "wait", "js": "document.querySelector('[data-queue=agents] [data-col=connected]')?.textContent === '1'"}));
    wall.must(json!({"op": "wait", "js": "document.querySelector('[data-agent=ann] [data-col=state]')?.textContent === 'busy'"}));
    wall.must(json!({"op": "screenshot", "path": shots.join("supervisor-wall.png")}));
    // Ann completes the chat and wraps up with one of the queue's codes:
    // the wall follows, and the CRM records the conversation.
    desk.must(json!({"op": "click", "sel": "[data-pb=complete]"}));
    desk.must(json!({"op": "select", "sel": "[data-pb=disposition]", "value": "follow-up"}));
    desk.must(json!({"op": "fill", "sel": "[data-pb=notes]", "text": "Call back on Friday."}));
    desk.must(json!({"op": "click", "sel": "[data-pb=save-wrap-up]"}));
    desk.must(json!({"op": "wait", "js": "document.querySelector('[data-pb=wrapped]')"}));
    assert!(
        eventually(Duration::from_secs(10), || {
            let (status, body) = s.get_bytes(
                &format!("/v1/tenants/freight/kv/crm/history/{visitor}"),
                &key,
            );
            status == 200 && String::from_utf8_lossy(&body).contains(&ix)
        }),
        "the crm plugin recorded the conversation"
    );
    // The wrap-up is on the queue event log (written in the background).
    assert!(
        eventually(Duration::from_secs(10), || {
            let events = s.get(&format!("/v1/tenants/freight/queue-events?task={ix}"), &key);
            events.body["events"].as_array().is_some_and(|v| {
                v.iter().any(|e| {
                    e["type"] == "wrap_up"
                        && e["disposition"] == "follow-up"
                        && e["notes"] == "Call back on Friday."
                        && e["agent"] == "ann"
                })
            })
        }),
        "the wrap-up in the queue event log"
    );
    // A code the queue does not list is refused; a wrap-up is once per
    // agent, and not for an agent who never had the task.
    let wrap_up = |token: &str, code: &str| {
        s.json(
            "POST",
            &format!("/v1/tenants/freight/tasks/{ix}/wrap-up"),
            token,
            &json!({ "disposition": code }),
        )
        .status
    };
    assert_eq!(wrap_up(ann, "whatever"), 400);
    assert_eq!(wrap_up(ann, "resolved"), 409);
    assert_eq!(wrap_up(bob, "resolved"), 403);
    wall.must(json!({"op": "wait", "js": "document.querySelector('[data-queue=agents] [data-col=connected]')?.textContent === '0' && document.querySelector('[data-queue=agents] [data-col=answered]')?.textContent === '1'"}));
    // The report of today, from the stored queue events: the chat
    // answered, and Ann's.
    wall.must(json!({"op": "click", "sel": "[data-pb=report-refresh]"}));
    wall.must(json!({"op": "wait", "js": "[...document.querySelectorAll('[data-pb=report-table] tr[data-row^=\"agents@\"] [data-col=answered]')].some(td => td.textContent === '1')"}));
    wall.must(json!({"op": "select", "sel": "[data-pb=report-of]", "value": "agents"}));
    wall.must(json!({"op": "wait", "js": "[...document.querySelectorAll('[data-pb=report-table] tr[data-row^=\"ann@\"] [data-col=completed]')].some(td => td.textContent === '1')"}));
    wall.must(json!({"op": "select", "sel": "[data-pb=report-of]", "value": "queues"}));
    wall.must(json!({"op": "wait", "js": "document.querySelector('[data-pb=report-chart] .bar')"}));
    wall.must(json!({"op": "screenshot", "path": shots.join("report.png")}));

    // Bob's stream carried nothing of Ann's chat, and the API refuses him
    // its screen.
    let mut seen = Vec::new();
    bobs.get_ref()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(m) = bobs.read() {
        if let Ok(t) = m.to_text() {
            seen.push(t.to_string());
        }
    }
    assert!(
        !seen
            .iter()
            .any(|e| e.contains(&ix) || e.contains("\"ann\"")),
        "Bob saw: {seen:?}"
    );
    let denied = s.get(&format!("/v1/tenants/freight/tasks/{ix}/screen"), bob);
    assert_eq!(denied.status, 403, "{denied:?}");
    // A new token for Bob revokes the old one: his open stream ends
    // within the stream's next check (30 s).
    let t = s.json(
        "POST",
        "/v1/tenants/freight/agents/bob/token",
        &key,
        &json!({}),
    );
    assert_eq!(t.status, 201, "{t:?}");
    let revoked = Instant::now();
    let closed = loop {
        match bobs.read() {
            Ok(tungstenite::Message::Close(_)) => break true,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if revoked.elapsed() > Duration::from_secs(45) {
                    break false;
                }
            }
            Err(_) => break true,
        }
    };
    assert!(closed, "the revoked token's stream stayed open");
    for (who, b) in [
        ("desk", &mut desk),
        ("wall", &mut wall),
        ("visitor", &mut b),
    ] {
        let log = b.must(json!({"op": "log"}));
        assert!(
            !log.to_string().contains("pageerror"),
            "errors on the {who} page: {log}"
        );
    }
}

#[test]
fn an_agent_passes_a_chat_to_another_queue_and_it_goes_on_there() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let s = Server::start(dir.path(), LOOPBACK).unwrap();
    let key = wire(&s, mis.port);
    let ann = available_agent(&s, "freight", &key, "ann", json!({"chat": 3}));
    let (mut ws, _, _) = hello(&s, json!({"type": "hello"}));
    send(
        &mut ws,
        json!({"type": "message", "client_id": "a-1", "text": "agent"}),
    );
    let ix = next_of(&mut ws, "ack")["conversation"]
        .as_str()
        .unwrap()
        .to_string();
    let task = format!("/v1/tenants/freight/tasks/{ix}");
    assert!(eventually(Duration::from_secs(10), || {
        s.get(&task, &key).body["state"] == "offered"
    }));
    let acc = s.json("POST", &format!("{task}/accept"), &ann, &json!({}));
    assert_eq!(acc.status, 200, "{acc:?}");
    // Billing has Cat (the only one with the skill).
    let q = s.json(
        "PUT",
        "/v1/tenants/freight/queues/billing",
        &key,
        &json!({"skills": ["billing"]}),
    );
    assert_eq!(q.status, 200, "{q:?}");
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/agents/cat",
        &key,
        &json!({"skills": {"billing": 5}, "capacity": {"chat": 3}}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let cat = s.json(
        "POST",
        "/v1/tenants/freight/agents/cat/token",
        &key,
        &json!({}),
    );
    let cat = cat.body["token"].as_str().unwrap().to_string();
    let p = s.json(
        "PUT",
        "/v1/tenants/freight/agents/cat/presence",
        &cat,
        &json!({"state": "available"}),
    );
    assert_eq!(p.status, 204, "{p:?}");
    // A chat cannot go to a phone number; the refusal leaves it with Ann.
    let bad = s.json(
        "POST",
        &format!("{task}/transfer"),
        &ann,
        &json!({"to": "+37060000000"}),
    );
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(s.get(&task, &key).body["state"], "connected");
    // Ann passes it to billing: Cat is offered it and answers.
    let t = s.json(
        "POST",
        &format!("{task}/transfer"),
        &ann,
        &json!({"to": "queue:billing"}),
    );
    assert_eq!(t.status, 200, "{t:?}");
    assert!(
        eventually(Duration::from_secs(10), || {
            let v = s.get(&task, &key).body;
            v["state"] == "offered" && v["agent"] == "cat" && v["queue"] == "billing"
        }),
        "{:?}",
        s.get(&task, &key)
    );
    let acc = s.json("POST", &format!("{task}/accept"), &cat, &json!({}));
    assert_eq!(acc.status, 200, "{acc:?}");
    let r = s.json(
        "POST",
        &format!("/v1/tenants/freight/interactions/{ix}/messages"),
        &cat,
        &json!({"text": "Cat from billing here."}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    loop {
        let f = next_of(&mut ws, "message");
        if f["message"]["text"] == "Cat from billing here." {
            break;
        }
    }
    // Ann no longer reaches it; the timeline says where it went.
    let late = s.json(
        "POST",
        &format!("/v1/tenants/freight/interactions/{ix}/messages"),
        &ann,
        &json!({"text": "still me"}),
    );
    assert_eq!(late.status, 403, "{late:?}");
    let ixv = s.get(&format!("/v1/tenants/freight/interactions/{ix}"), &key);
    let timeline = ixv.body["timeline"].as_array().unwrap();
    assert!(
        timeline
            .iter()
            .any(|e| e["kind"] == "transfer" && e["data"]["target"] == "queue:billing"),
        "{timeline:?}"
    );
    assert_ne!(ixv.body["state"], "closed");
    // Ann, who passed it on, wraps up her part.
    let w = s.json(
        "POST",
        &format!("{task}/wrap-up"),
        &ann,
        &json!({"disposition": "billing question"}),
    );
    assert_eq!(w.status, 200, "{w:?}");
}

#[test]
fn origins_tokens_identities_retries_sizes_and_a_flood() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let mut flags: Vec<&str> = LOOPBACK.to_vec();
    flags.extend(["--chat-max-per-ip", "6"]);
    let s = Server::start(dir.path(), &flags).unwrap();
    let key = wire(&s, mis.port);
    let w = s.json(
        "PUT",
        "/v1/tenants/freight/chat-widgets/web-freight",
        &key,
        &json!({"origins": ["https://shop.example"], "identity_secret": "site-key"}),
    );
    assert_eq!(w.status, 200, "{w:?}");
    let sec = s.json(
        "PUT",
        "/v1/tenants/freight/secrets/site-key",
        &key,
        &json!({"value": "k3y-of-the-site"}),
    );
    assert_eq!(sec.status, 200, "{sec:?}");

    // Another site's page may not open it; the allowed one may.
    assert_eq!(
        ws_connect(&s, Some("https://evil.example"))
            .err()
            .as_deref(),
        Some("HTTP 403")
    );
    assert!(ws_connect(&s, Some("https://shop.example")).is_ok());
    // An address that is not a chat address.
    let stream = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let url = format!("ws://127.0.0.1:{}/chat/nobody/ws", s.port);
    assert!(tungstenite::client(url.as_str(), stream).is_err());

    // The page to try it, and the widget itself, are public.
    let (status, page) = s.get_bytes("/chat/web-freight", "");
    let page = String::from_utf8(page).unwrap();
    assert_eq!(status, 200);
    assert!(
        page.contains(r#"<script src="/chat/widget.js" data-address="web-freight""#),
        "{page}"
    );
    let (status, js) = s.get_bytes("/chat/widget.js", "");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&js).contains("/ws"));
    assert_eq!(s.get_bytes("/chat/nobody", "").0, 404);

    // The first frame must be hello.
    let mut ws = ws_connect(&s, None).unwrap();
    send(
        &mut ws,
        json!({"type": "message", "client_id": "x", "text": "hi"}),
    );
    assert_eq!(next(&mut ws).unwrap()["code"], "hello_first");

    // An anonymous visitor gets a token; with it, it is the same visitor.
    let (mut ws, welcome, history) = hello(&s, json!({"type": "hello"}));
    let visitor = welcome["visitor"].as_str().unwrap().to_string();
    let token = welcome["token"].as_str().unwrap().to_string();
    assert_eq!(history["messages"], json!([]));
    send(
        &mut ws,
        json!({"type": "message", "client_id": "c-1", "text": "track"}),
    );
    let ack = next_of(&mut ws, "ack");
    assert_eq!(ack["duplicate"], false, "{ack}");
    let ix = ack["conversation"].as_str().unwrap().to_string();
    // The same message again (a retry after a lost ack): the same one.
    send(
        &mut ws,
        json!({"type": "message", "client_id": "c-1", "text": "track"}),
    );
    let again = next_of(&mut ws, "ack");
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["id"], ack["id"]);
    drop(ws);
    let (ws_a, welcome, history) = hello(&s, json!({"type": "hello", "token": token}));
    assert_eq!(welcome["visitor"], visitor.as_str());
    let hist = history["messages"].as_array().unwrap();
    assert!(
        hist.iter()
            .any(|m| m["text"] == "track" && m["from"] == "visitor"),
        "{history}"
    );
    let inbound: Vec<Value> = messages(&s, &key, &ix)
        .into_iter()
        .filter(|m| m["direction"] == "inbound")
        .collect();
    assert_eq!(inbound.len(), 1, "a retry stored twice: {inbound:?}");
    // A forged token is not that visitor.
    let forged = format!("{visitor}.{}", "0".repeat(32));
    let (ws_b, welcome, history) = hello(&s, json!({"type": "hello", "token": forged}));
    assert_ne!(welcome["visitor"], visitor.as_str());
    assert_eq!(history["messages"], json!([]));

    // A verified user: the site signs the user's id.
    let hash = {
        use hmac::{Hmac, Mac};
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(b"k3y-of-the-site").unwrap();
        m.update(b"42");
        hex::encode(m.finalize().into_bytes())
    };
    let (ws_c, welcome, _) = hello(
        &s,
        json!({"type": "hello", "user": {"id": "42", "hash": hash}}),
    );
    assert_eq!(welcome["visitor"], "u-42");
    assert_eq!(welcome["verified"], true);
    assert_eq!(welcome["token"], Value::Null);
    let mut ws = ws_connect(&s, None).unwrap();
    send(
        &mut ws,
        json!({"type": "hello", "user": {"id": "42", "hash": "00".repeat(32)}}),
    );
    assert_eq!(next(&mut ws).unwrap()["code"], "bad_identity");
    assert!(next(&mut ws).is_none(), "closed after a bad identity");

    // Too much text: a clear error, and the connection goes on.
    let (mut ws, _, _) = hello(&s, json!({"type": "hello"}));
    send(
        &mut ws,
        json!({"type": "message", "client_id": "big", "text": "x".repeat(70_000)}),
    );
    let e = next_of(&mut ws, "error");
    assert_eq!(e["code"], "too_large", "{e}");
    assert_eq!(e["client_id"], "big");
    send(&mut ws, json!({"type": "ping"}));
    assert_eq!(next_of(&mut ws, "pong")["type"], "pong");
    // Not a frame of the protocol.
    send(&mut ws, json!({"type": "launch"}));
    assert_eq!(next_of(&mut ws, "error")["code"], "bad_frame");

    // A flood from one visitor: the burst is taken, the rest refused with
    // when to retry; nothing refused is stored, nothing taken is lost.
    let mut acked = Vec::new();
    let mut limited = 0;
    for n in 0..60 {
        send(
            &mut ws,
            json!({"type": "message", "client_id": format!("f-{n}"), "text": format!("flood {n}")}),
        );
    }
    let mut answers = 0;
    while answers < 60 {
        let f = next(&mut ws).expect("an answer for every message");
        match f["type"].as_str() {
            Some("ack") => {
                acked.push(f["client_id"].as_str().unwrap().to_string());
                answers += 1;
            }
            Some("error") => {
                assert_eq!(f["code"], "rate_limited", "{f}");
                assert!(f["retry_after_ms"].as_u64().unwrap() > 0, "{f}");
                limited += 1;
                answers += 1;
            }
            _ => {}
        }
    }
    assert!(
        (10..=14).contains(&acked.len()),
        "a burst of 10 (and a few refilled): {} acked",
        acked.len()
    );
    assert_eq!(acked.len() + limited, 60);
    let ix2 = s.get("/v1/tenants/freight/interactions", &key).body["interactions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] != ix.as_str() && i["from"].as_str().unwrap().starts_with("v-"))
        .map(|i| i["id"].as_str().unwrap().to_string());
    let flood: Vec<String> = ix2
        .iter()
        .flat_map(|ix| messages(&s, &key, ix))
        .filter(|m| m["text"].as_str().unwrap_or("").starts_with("flood"))
        .map(|m| m["client_id"].as_str().unwrap().to_string())
        .collect();
    let mut want = acked.clone();
    want.sort();
    let mut got = flood.clone();
    got.sort();
    assert_eq!(got, want, "stored exactly the acknowledged messages");
    assert_eq!(s.get("/healthz", "").status, 200);

    // Connections per IP address are capped (6 here): more get 429.
    drop((ws, ws_a, ws_b, ws_c));
    std::thread::sleep(Duration::from_millis(500));
    let mut open = Vec::new();
    for _ in 0..8 {
        match ws_connect(&s, None) {
            Ok(w) => open.push(w),
            Err(e) => {
                assert_eq!(e, "HTTP 429");
                break;
            }
        }
    }
    assert_eq!(open.len(), 6, "the cap is 6 connections per address");
}

/// Sends mails over one SMTP session (Python's smtplib) until the server
/// dies; prints `ok N` for each one answered 250 and `refused N CODE` for
/// one whose recipient was refused (and goes on).
const SMTP_CLIENT: &str = r#"
import smtplib, sys
from email.message import EmailMessage
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20)
for n in range(int(sys.argv[2])):
    m = EmailMessage()
    m["From"] = "rita@example.com"; m["To"] = "help@freight.test"
    m["Subject"] = f"mail {n}"; m.set_content(f"mail {n}")
    try:
        s.send_message(m)
        print(f"ok {n}", flush=True)
    except smtplib.SMTPRecipientsRefused as e:
        code = list(e.recipients.values())[0][0]
        print(f"refused {n} {code}", flush=True)
        s.rset()
    except Exception:
        break
"#;

/// (channel, inbound texts, outbound messages) of a customer's history.
fn history(s: &Server, key: &str, channel: &str, address: &str) -> (Vec<String>, Vec<Value>) {
    let c = s.get(
        &format!("/v1/tenants/freight/customers?channel={channel}&address={address}"),
        key,
    );
    assert_eq!(c.status, 200, "{c:?}");
    let h = s.get(
        &format!(
            "/v1/tenants/freight/customers/{}?limit=500",
            c.body["id"].as_str().unwrap()
        ),
        key,
    );
    assert_eq!(h.status, 200, "{h:?}");
    let mut inbound = Vec::new();
    let mut outbound = Vec::new();
    for ix in h.body["interactions"].as_array().unwrap() {
        for m in ix["messages"].as_array().unwrap() {
            if m["direction"] == "inbound" {
                inbound.push(m["text"].as_str().unwrap().trim().to_string());
            } else {
                outbound.push(m.clone());
            }
        }
    }
    (inbound, outbound)
}

#[test]
fn acknowledged_chat_email_and_sms_survive_a_sigkill_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let sink = SmtpSink::start(&dir.path().join("sent"), 0);
    let smsc = Smsc::start("test", "secret");
    let relay = format!("smtp://127.0.0.1:{}", sink.port);
    let mut flags: Vec<&str> = LOOPBACK.to_vec();
    flags.extend(["--chat-rate", "100000", "--chat-ip-rate", "100000"]);
    flags.extend(["--smtp", "127.0.0.1:0", "--smtp-relay", &relay]);
    flags.extend(["--smtp-auth-dns", &dns().addr]);
    let data = dir.path().join("data");
    let s = Server::start(&data, &flags).unwrap();
    let smtp = s.logged("SMTP listening on ");
    let key = wire_all(&s, mis.port, &smsc);

    const N: usize = 300;
    // Mail and texts flow while the chat sends (and after the kill, until
    // their clients notice).
    let mut mailer = std::process::Command::new(plugboard_tests::peers_python())
        .args(["-c", SMTP_CLIENT, &smtp.to_string(), "1000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mailed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let out = std::io::BufReader::new(mailer.stdout.take().unwrap());
        let mailed = mailed.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in out.lines().map_while(Result::ok) {
                if let Some(n) = l.strip_prefix("ok ") {
                    mailed.lock().unwrap().push(format!("mail {n}"));
                }
            }
        })
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let texter = {
        let stop = stop.clone();
        let mut cmds = Vec::new();
        for n in 0..1000 {
            cmds.push(
                json!({"cmd": "mo", "tag": format!("s{n}"), "from": "37069990001",
                             "to": "37060000001", "text": format!("sms {n}")}),
            );
        }
        let tx = smsc.commands();
        std::thread::spawn(move || {
            for c in cmds {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                tx(c);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // Mail and texts are going (some already taken) before the chat starts.
    assert!(eventually(Duration::from_secs(30), || {
        !mailed.lock().unwrap().is_empty()
            && smsc
                .named("deliver_sm_resp")
                .iter()
                .any(|e| e["status"] == 0)
    }));
    let (mut ws, welcome, _) = hello(&s, json!({"type": "hello"}));
    let token = welcome["token"].as_str().unwrap().to_string();
    // Send everything, read acks as they come, and SIGKILL the server
    // after the first 100 acks (the rest are in flight or unsent).
    let mut acked = std::collections::BTreeSet::new();
    let mut sent = 0;
    let pid = s.pid();
    while acked.len() < 100 {
        while sent < N && sent < acked.len() + 20 {
            send(
                &mut ws,
                json!({"type": "message", "client_id": format!("m-{sent:03}"), "text": format!("message {sent}")}),
            );
            sent += 1;
        }
        let f = next(&mut ws).expect("acks before the kill");
        if f["type"] == "ack" {
            acked.insert(f["client_id"].as_str().unwrap().to_string());
        }
    }
    let kill = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Whatever else was acknowledged before the socket died counts too.
    while let Some(f) = next(&mut ws) {
        if f["type"] == "ack" {
            acked.insert(f["client_id"].as_str().unwrap().to_string());
        }
    }
    mailer.wait().unwrap();
    reader.join().unwrap();
    let mailed = mailed.lock().unwrap().clone();
    texter.join().unwrap();
    s.kill();
    let texted: Vec<String> = smsc
        .named("deliver_sm_resp")
        .iter()
        .filter(|e| e["status"] == 0)
        .map(|e| format!("sms {}", &e["tag"].as_str().unwrap()[1..]))
        .collect();
    assert!(
        !mailed.is_empty() && !texted.is_empty(),
        "{mailed:?} {texted:?}"
    );

    let s = Server::start(&data, &flags).unwrap();
    // The widget reconnects with its token and sends every message it
    // has no ack for, with the same ids.
    let (mut ws, welcome, history_frame) = hello(&s, json!({"type": "hello", "token": token}));
    assert_eq!(welcome["token"], token.as_str());
    let seen: std::collections::BTreeSet<String> = history_frame["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["client_id"].as_str().map(str::to_string))
        .collect();
    for c in &acked {
        assert!(seen.contains(c), "acknowledged {c} is not in the history");
    }
    let mut resend = 0;
    for n in 0..N {
        let c = format!("m-{n:03}");
        if !acked.contains(&c) {
            send(
                &mut ws,
                json!({"type": "message", "client_id": c, "text": format!("message {n}")}),
            );
            resend += 1;
        }
    }
    let mut acks = 0;
    while acks < resend {
        let f = next(&mut ws).expect("acks after the restart");
        if f["type"] == "ack" {
            acks += 1;
        }
    }
    let ix = history_frame["messages"][0]["conversation"]
        .as_str()
        .unwrap()
        .to_string();
    let all: Vec<String> = messages(&s, &key, &ix)
        .into_iter()
        .filter(|m| m["direction"] == "inbound")
        .map(|m| m["client_id"].as_str().unwrap().to_string())
        .collect();
    let distinct: std::collections::BTreeSet<&String> = all.iter().collect();
    assert_eq!(
        all.len(),
        N,
        "every message stored once: {} stored",
        all.len()
    );
    assert_eq!(distinct.len(), N);
    // Every mail answered 250 and every text answered 0 is stored once.
    let (mails, _) = history(&s, &key, "email", "rita@example.com");
    for m in &mailed {
        assert_eq!(
            mails.iter().filter(|t| *t == m).count(),
            1,
            "{m}: {mails:?}"
        );
    }
    let (texts, _) = history(&s, &key, "sms", "37069990001");
    for t in &texted {
        assert_eq!(
            texts.iter().filter(|x| *x == t).count(),
            1,
            "{t}: {texts:?}"
        );
    }
    eprintln!(
        "acknowledged before the kill: {} chat, {} mail, {} sms",
        acked.len(),
        mailed.len(),
        texted.len()
    );
    // Every reply the flow wrote leaves the outbox (sent), none lost.
    assert!(
        eventually(Duration::from_secs(60), || {
            messages(&s, &key, &ix)
                .iter()
                .filter(|m| m["direction"] == "outbound")
                .all(|m| m["status"] != "queued")
                && history(&s, &key, "email", "rita@example.com")
                    .1
                    .iter()
                    .chain(&history(&s, &key, "sms", "37069990001").1)
                    .all(|m| m["status"] == "sent")
        }),
        "replies still queued after the restart"
    );
    // Each mail reply reached the relay once (by Message-ID); each text
    // reply reached the SMSC once, but for those in flight at the kill
    // (SMPP cannot tell whether the SMSC took them): at most a window.
    let (_, mail_out) = history(&s, &key, "email", "rita@example.com");
    let relayed: std::collections::BTreeSet<String> = sink
        .wait_for(mail_out.len(), Duration::from_secs(30))
        .iter()
        .filter_map(|m| plugboard_tests::header(m, "Message-ID"))
        .collect();
    assert_eq!(relayed.len(), mail_out.len());
    let (_, sms_out) = history(&s, &key, "sms", "37069990001");
    let submits = smsc
        .named("submit_sm")
        .iter()
        .filter(|e| e["destination_addr"] == "37069990001")
        .count();
    eprintln!(
        "text replies: {} stored, {submits} submitted",
        sms_out.len()
    );
    assert!(
        submits >= sms_out.len() && submits <= sms_out.len() + 10,
        "{submits} submits for {} replies",
        sms_out.len()
    );
    // Usage for billing: every stored message counted once, by channel
    // and direction, across the kill.
    let (mails, mail_out) = history(&s, &key, "email", "rita@example.com");
    let (texts, _) = history(&s, &key, "sms", "37069990001");
    let chat_out = messages(&s, &key, &ix)
        .iter()
        .filter(|m| m["direction"] == "outbound")
        .count();
    let a = s.get("/v1/tenants/freight/usage?granularity=total", &key);
    assert_eq!(a.status, 200, "{a:?}");
    let used = &a.body["rows"][0]["messages"];
    eprintln!("usage: {used}");
    assert_eq!(used["chat/inbound"], N, "{used}");
    assert_eq!(used["chat/outbound"], chat_out, "{used}");
    assert_eq!(used["email/inbound"], mails.len(), "{used}");
    assert_eq!(used["email/outbound"], mail_out.len(), "{used}");
    assert_eq!(used["sms/inbound"], texts.len(), "{used}");
    assert_eq!(used["sms/outbound"], sms_out.len(), "{used}");
}

#[test]
fn one_customer_writes_by_chat_then_email_then_sms_and_the_merged_history_has_all_three() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let mut flags: Vec<&str> = LOOPBACK.to_vec();
    flags.extend(["--smtp", "127.0.0.1:0", "--smtp-auth-dns", &dns().addr]);
    let s = Server::start(dir.path(), &flags).unwrap();
    let smtp = s.logged("SMTP listening on ");
    let key = wire(&s, mis.port);
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/addresses/help@freight.test",
        &key,
        &json!({"channel": "email", "flow": "hotline"}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/addresses/37060000001",
        &key,
        &json!({"channel": "sms", "flow": "hotline"}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let mut smsc = Smsc::start("test", "secret");
    smpp_carrier(&s, "freight", &key, smsc.port, "secret", &[]);
    smsc.wait_for(Duration::from_secs(30), |e| e["ev"] == "bind");

    // First by chat…
    let (mut ws, welcome, _) = hello(&s, json!({"type": "hello", "name": "Rita Ray"}));
    let visitor = welcome["visitor"].as_str().unwrap().to_string();
    send(
        &mut ws,
        json!({"type": "message", "client_id": "r-1", "text": "track"}),
    );
    let chat_ix = next_of(&mut ws, "ack")["conversation"]
        .as_str()
        .unwrap()
        .to_string();
    // … then by email (swaks, a real SMTP client).
    let out = std::process::Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{smtp}"), "--timeout", "20"])
        .args(["--from", "rita@example.com", "--to", "help@freight.test"])
        .args(["--header", "Subject: my cargo", "--body", "track"])
        .output()
        .expect("swaks (run scripts/setup.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let find = |channel: &str, address: &str| {
        let mut c = Value::Null;
        assert!(eventually(Duration::from_secs(10), || {
            let r = s.get(
                &format!("/v1/tenants/freight/customers?channel={channel}&address={address}"),
                &key,
            );
            c = r.body;
            r.status == 200
        }));
        c
    };
    // … then by SMS (over SMPP from the carrier's SMSC).
    smsc.send(json!({"cmd": "mo", "tag": "t", "from": "+37069990001", "to": "37060000001", "text": "track"}));
    let r = smsc.wait_for(Duration::from_secs(30), |e| e["ev"] == "deliver_sm_resp");
    assert_eq!(r["status"], 0);
    let by_chat = find("chat", &visitor);
    let by_email = find("email", "rita@example.com");
    assert_ne!(by_chat["id"], by_email["id"], "two customers until merged");
    assert_eq!(by_chat["name"], "Rita Ray");
    let by_sms = find("sms", "37069990001");
    assert_ne!(by_sms["id"], by_email["id"]);
    // The agent (or the CRM) says they are one person.
    for other in [&by_chat, &by_sms] {
        let m = s.json(
            "POST",
            &format!(
                "/v1/tenants/freight/customers/{}/merge",
                by_email["id"].as_str().unwrap()
            ),
            &key,
            &json!({"from": other["id"]}),
        );
        assert_eq!(m.status, 200, "{m:?}");
    }
    let h = s.get(
        &format!(
            "/v1/tenants/freight/customers/{}",
            by_email["id"].as_str().unwrap()
        ),
        &key,
    );
    assert_eq!(h.status, 200, "{h:?}");
    let list = h.body["interactions"].as_array().unwrap();
    let channels: Vec<&str> = list
        .iter()
        .map(|i| i["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, ["chat", "email", "sms"], "oldest first: {h:?}");
    assert_eq!(list[0]["id"], chat_ix.as_str());
    assert!(
        list.iter().all(|i| i["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["text"] == "track")),
        "each with its messages: {h:?}"
    );
    // Looked up by either address, it is the one customer.
    assert_eq!(find("chat", &visitor)["id"], by_email["id"]);
    assert_eq!(find("sms", "37069990001")["id"], by_email["id"]);
    // A phone number is one address whether it texts or calls.
    assert_eq!(find("voice", "37069990001")["id"], by_email["id"]);
}

#[test]
fn a_tenant_over_its_chat_and_message_limits_is_refused_in_each_channels_words() {
    let dir = tempfile::tempdir().unwrap();
    let mis = TinyHttp::start(waybills);
    let smsc = Smsc::start("test", "secret");
    let mut flags: Vec<&str> = LOOPBACK.to_vec();
    flags.extend(["--chat-rate", "100000", "--chat-ip-rate", "100000"]);
    flags.extend(["--smtp", "127.0.0.1:0", "--smtp-auth-dns", &dns().addr]);
    let s = Server::start(&dir.path().join("data"), &flags).unwrap();
    let smtp = s.logged("SMTP listening on ");
    let key = wire_all(&s, mis.port, &smsc);
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/limits",
        &s.admin,
        &json!({"chats": 1, "messages_per_second": 1}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["capacity"]["chats"], 1, "{a:?}");

    // Chat: one conversation at once; a second visitor is told why.
    let (mut ws, _, _) = hello(&s, json!({"type": "hello"}));
    let mut second = ws_connect(&s, None).unwrap();
    send(&mut second, json!({"type": "hello"}));
    let refused = next(&mut second).unwrap();
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "capacity", "{refused}");
    assert!(refused["retry_after_ms"].as_u64().unwrap() > 0, "{refused}");
    assert!(next(&mut second).is_none(), "the refused socket closes");
    assert_eq!(
        s.get("/v1/tenants/freight/limits", &key).body["in_use"]["chats"],
        1
    );
    // One message a second: of five at once, the first is taken, the
    // rest are refused with when to try again, and taken when retried.
    for n in 0..5 {
        send(
            &mut ws,
            json!({"type": "message", "client_id": format!("c{n}"), "text": format!("hi {n}")}),
        );
    }
    let (mut acked, mut limited) = (Vec::new(), Vec::new());
    let mut ix = String::new();
    while acked.len() + limited.len() < 5 {
        let f = next(&mut ws).expect("an answer to each message");
        match f["type"].as_str() {
            Some("ack") => {
                acked.push(f["client_id"].as_str().unwrap().to_string());
                ix = f["conversation"].as_str().unwrap().to_string();
            }
            Some("error") if f["code"] == "rate_limited" => {
                assert_eq!(f["retry_after_ms"], 1000, "{f}");
                limited.push(f["client_id"].as_str().unwrap().to_string());
            }
            _ => {}
        }
    }
    assert_eq!(acked, ["c0"], "{limited:?}");
    assert_eq!(limited.len(), 4);
    // Replies through the API keep to the rate too: 429 with Retry-After.
    let reply = |text: &str| {
        s.json(
            "POST",
            &format!("/v1/tenants/freight/interactions/{ix}/messages"),
            &key,
            &json!({"text": text}),
        )
    };
    let first = reply("one");
    assert_eq!(first.status, 201, "{first:?}");
    let second = reply("two");
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(second.retry_after, Some(1), "{second:?}");
    assert_eq!(second.body["limit"], "messages_per_second", "{second:?}");
    drop(ws);
    // The place is given back when the visitor leaves.
    assert!(eventually(Duration::from_secs(10), || {
        s.get("/v1/tenants/freight/limits", &key).body["in_use"]["chats"] == 0
    }));

    // Email (a bucket of its own): the mails over the rate are deferred
    // with 452 at RCPT.
    let out = std::process::Command::new(plugboard_tests::peers_python())
        .args(["-c", SMTP_CLIENT, &smtp.to_string(), "3"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.starts_with("ok 0\n"), "{said}");
    assert!(
        said.contains("refused 1 452") && said.contains("refused 2 452"),
        "{said}"
    );

    // SMS over SMPP: the SMSC is told to retry (ESME_RTHROTTLED, 0x58).
    let tx = smsc.commands();
    for n in 0..3 {
        tx(
            json!({"cmd": "mo", "tag": format!("t{n}"), "from": "37069990001",
                  "to": "37060000001", "text": format!("sms {n}")}),
        );
    }
    assert!(eventually(Duration::from_secs(20), || {
        smsc.named("deliver_sm_resp").len() >= 3
    }));
    let statuses: Vec<u64> = smsc
        .named("deliver_sm_resp")
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 0).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 0x58).count(),
        2,
        "{statuses:?}"
    );

    // Storage: a file that would pass the tenant's 1 MiB is refused, and
    // what is stored shows in its limits and usage.
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/limits",
        &s.admin,
        &json!({"storage_mib": 1}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let (mut ws, _, _) = hello(&s, json!({"type": "hello"}));
    let file = |n: u8| {
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(vec![n; 700 * 1024]);
        json!([{"name": format!("scan{n}.pdf"), "type": "application/pdf", "data": data}])
    };
    send(
        &mut ws,
        json!({"type": "message", "client_id": "f1", "text": "", "files": file(1)}),
    );
    assert_eq!(next_of(&mut ws, "ack")["client_id"], "f1");
    send(
        &mut ws,
        json!({"type": "message", "client_id": "f2", "text": "", "files": file(2)}),
    );
    let full = next_of(&mut ws, "error");
    assert_eq!(
        (full["code"].clone(), full["limit"].clone()),
        (json!("over_limit"), json!("storage_mib")),
        "{full}"
    );
    let used = s.get("/v1/tenants/freight/limits", &key).body["in_use"]["storage_bytes"].clone();
    assert!(used.as_u64().unwrap() >= 700 * 1024, "{used}");
    let usage = s.get("/v1/tenants/freight/usage?granularity=total", &key);
    assert_eq!(usage.body["rows"][0]["stored_bytes"], used, "{usage:?}");

    // Every refusal is counted for the tenant, by limit.
    let seen = s.get("/v1/tenants/freight/limits", &key).body;
    assert_eq!(seen["refused"]["chats"], 1, "{seen}");
    assert_eq!(seen["refused"]["messages_per_second"], 9, "{seen}");
    let metrics = s.get("/metrics", "").body.to_string();
    assert!(
        metrics.contains(
            r#"plugboard_tenant_refusals_total{tenant=\"freight\",limit=\"messages_per_second\"} 9"#
        ),
        "{metrics}"
    );
}

/// One person of the erasure test: their addresses on each channel and a
/// word only their messages, notes and voicemail's record carry.
struct Person {
    name: &'static str,
    email: &'static str,
    phone: &'static str,
    marker: &'static str,
}

/// Everything the person leaves: a chat, an email, a voicemail (a call
/// with a recording) and a plugin's kv note under their customer id,
/// linked into one customer. Returns (customer id, chat visitor, the
/// recording's URL).
fn leave_traces(s: &Server, key: &str, smtp: u16, p: &Person) -> (String, String, String) {
    let (mut ws, welcome, _) = hello(s, json!({"type": "hello", "name": p.name}));
    let visitor = welcome["visitor"].as_str().unwrap().to_string();
    send(
        &mut ws,
        json!({"type": "message", "client_id": "1", "text": format!("track {}", p.marker)}),
    );
    let chat_ix = next_of(&mut ws, "ack")["conversation"]
        .as_str()
        .unwrap()
        .to_string();
    // The flow answered before the conversation is closed.
    assert!(eventually(Duration::from_secs(20), || {
        messages(s, key, &chat_ix)
            .iter()
            .any(|m| m["direction"] == "outbound")
    }));
    let out = std::process::Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{smtp}"), "--timeout", "20"])
        .args(["--from", p.email, "--to", "help@freight.test"])
        .args(["--header", &format!("Subject: cargo of {}", p.name)])
        .args(["--body", &format!("track {}", p.marker)])
        .output()
        .expect("swaks (run scripts/setup.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let xml = plugboard_tests::root().join("tests/sipp/voicemail_as.xml");
    plugboard_tests::run_sipp(
        s,
        &s.data_dir.with_extension("sipp"),
        &xml,
        "15550155",
        "u1",
        &["-key", "caller", p.phone],
    )
    .unwrap();
    // The email's customer takes the chat visitor and the phone number.
    let mut customer = Value::Null;
    assert!(eventually(Duration::from_secs(20), || {
        let r = s.get(
            &format!(
                "/v1/tenants/freight/customers?channel=email&address={}",
                p.email
            ),
            key,
        );
        customer = r.body;
        r.status == 200
    }));
    let id = customer["id"].as_str().unwrap().to_string();
    for (channel, address) in [("chat", visitor.as_str()), ("voice", p.phone)] {
        let a = s.json(
            "POST",
            &format!("/v1/tenants/freight/customers/{id}/addresses"),
            key,
            &json!({"channel": channel, "address": address}),
        );
        assert_eq!(a.status, 200, "{a:?}");
    }
    let kv = s.call(
        "PUT",
        &format!("/v1/tenants/freight/kv/customers/{id}/notes"),
        Some(key),
        Some(format!("prefers mornings, {}", p.marker).into_bytes()),
    );
    assert!(kv.is_ok_and(|a| a.status == 204 || a.status == 200));
    // Plugin data kept under the address, not the customer id.
    let kv = s.call(
        "PUT",
        &format!("/v1/tenants/freight/kv/customers/{}/last-call", p.phone),
        Some(key),
        Some(format!("asked about {}", p.marker).into_bytes()),
    );
    assert!(kv.is_ok_and(|a| a.status == 204 || a.status == 200));
    // The recording of the call.
    let mut url = String::new();
    assert!(eventually(Duration::from_secs(30), || {
        let h = s.get(&format!("/v1/tenants/freight/customers/{id}"), key);
        let calls: Vec<&Value> = h.body["interactions"]
            .as_array()
            .map(|l| l.iter().filter(|i| i["channel"] == "voice").collect())
            .unwrap_or_default();
        let Some(call) = calls.first() else {
            return false;
        };
        let ix = s.interaction("freight", key, call["id"].as_str().unwrap());
        let rec = ix["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == "recording")
            .map(|e| e["data"]["url"].as_str().unwrap().to_string());
        url = rec.unwrap_or_default();
        !url.is_empty()
    }));
    // Their conversations are closed (an erasure refuses open ones).
    let h = s.get(&format!("/v1/tenants/freight/customers/{id}"), key);
    let list = h.body["interactions"].as_array().unwrap();
    let channels: std::collections::BTreeSet<&str> = list
        .iter()
        .map(|i| i["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, ["chat", "email", "voice"].into(), "{h:?}");
    for ix in list.iter().filter(|i| i["channel"] != "voice") {
        let path = format!(
            "/v1/tenants/freight/interactions/{}/close",
            ix["id"].as_str().unwrap()
        );
        let a = s.json("POST", &path, key, &json!({}));
        assert_eq!(a.status, 204, "{a:?}");
    }
    (id, visitor, url)
}

/// Erasure on one store: Rita and Bob each chat, email and leave a
/// voicemail; Rita asks to be forgotten.
fn erase_one_of_two(postgres: bool) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.with_extension("sipp")).unwrap();
    let mis = TinyHttp::start(waybills);
    let db = postgres.then(|| plugboard_tests::postgres().database());
    let mut flags: Vec<&str> = LOOPBACK.to_vec();
    flags.extend(["--smtp", "127.0.0.1:0", "--smtp-auth-dns", &dns().addr]);
    if let Some(db) = &db {
        flags.extend(["--store", db]);
    }
    let s = Server::start(&data, &flags).unwrap();
    let smtp = s.logged("SMTP listening on ");
    let key = wire(&s, mis.port);
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/addresses/help@freight.test",
        &key,
        &json!({"channel": "email", "flow": "hotline"}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let doc = json!({
        "name": "voicemail",
        "start": "record",
        "nodes": {
            "record": {"type": "record", "prompt": "Leave a message.", "max_secs": 2, "next": "end"},
            "end": {"type": "hangup"}
        }
    });
    let a = s.json("POST", "/v1/tenants/freight/flows/voicemail", &key, &doc);
    assert!(a.status == 200 || a.status == 201, "{a:?}");
    let a = s.json(
        "PUT",
        "/v1/tenants/freight/addresses/15550155",
        &key,
        &json!({"channel": "voice", "flow": "voicemail"}),
    );
    assert_eq!(a.status, 200, "{a:?}");

    let rita = Person {
        name: "Rita Ray",
        email: "rita.ray@example.com",
        phone: "447900112233",
        marker: "RITA7731SECRET",
    };
    let bob = Person {
        name: "Bob Bell",
        email: "bob.bell@example.com",
        phone: "447900445566",
        marker: "BOB5511KEEP",
    };
    let (rita_id, rita_visitor, rita_rec) = leave_traces(&s, &key, smtp, &rita);
    let (bob_id, _, bob_rec) = leave_traces(&s, &key, smtp, &bob);
    assert_eq!(s.get_bytes(&rita_rec, &key).0, 200);

    // A call in progress would refuse it; none is. Erase Rita: by her
    // customer id on one store, by her phone number on the other (the
    // address leads to her customer, and so to everything).
    let erase = if postgres {
        format!(
            "/v1/tenants/freight/customers?channel=voice&address={}",
            rita.phone
        )
    } else {
        format!("/v1/tenants/freight/customers/{rita_id}")
    };
    let e = s.json("DELETE", &erase, &key, &json!({}));
    assert_eq!(e.status, 200, "{e:?}");
    let removed = &e.body["removed"];
    assert_eq!(removed["interactions"], 3, "{e:?}");
    assert_eq!(removed["recordings"], 1, "{e:?}");
    assert_eq!(removed["kv_keys"], 2, "under her id and her number: {e:?}");
    assert!(removed["messages"].as_u64().unwrap() >= 4, "{e:?}");
    assert!(
        removed["files"].as_u64().unwrap() >= 1,
        "the raw email: {e:?}"
    );
    assert_eq!(e.body["more"], false);

    // Nothing of Rita in the API.
    let gone = s.get(&format!("/v1/tenants/freight/customers/{rita_id}"), &key);
    assert_eq!(gone.status, 404, "{gone:?}");
    for (channel, address) in [
        ("email", rita.email),
        ("chat", rita_visitor.as_str()),
        ("voice", rita.phone),
    ] {
        let r = s.get(
            &format!("/v1/tenants/freight/customers?channel={channel}&address={address}"),
            &key,
        );
        assert_eq!(r.status, 404, "{channel}: {r:?}");
    }
    assert_eq!(s.get_bytes(&rita_rec, &key).0, 404);
    let kv = s.get_bytes(
        &format!("/v1/tenants/freight/kv/customers/{rita_id}/notes"),
        &key,
    );
    assert_eq!(kv.0, 404);
    let kv = s.get_bytes(
        &format!("/v1/tenants/freight/kv/customers/{}/last-call", rita.phone),
        &key,
    );
    assert_eq!(kv.0, 404);
    let listed = serde_json::to_string(
        &s.get("/v1/tenants/freight/interactions?limit=500", &key)
            .body,
    )
    .unwrap();
    for trace in [rita.email, rita.phone, rita.marker, rita_visitor.as_str()] {
        assert!(!listed.contains(trace), "{trace} still listed");
    }
    // The audit record says what and when, not who or what it said.
    let audit = s.get("/v1/tenants/freight/erasures", &key);
    assert_eq!(audit.status, 200);
    assert_eq!(audit.body.as_array().unwrap().len(), 1, "{audit:?}");
    assert_eq!(audit.body[0]["interactions"].as_array().unwrap().len(), 3);
    let text = audit.body.to_string();
    for trace in [rita.email, rita.phone, rita.marker, rita.name] {
        assert!(!text.contains(trace), "the audit names {trace}");
    }

    // Bob is untouched.
    let h = s.get(&format!("/v1/tenants/freight/customers/{bob_id}"), &key);
    assert_eq!(h.status, 200, "{h:?}");
    assert_eq!(h.body["interactions"].as_array().unwrap().len(), 3, "{h:?}");
    assert_eq!(s.get_bytes(&bob_rec, &key).0, 200);
    assert!(listed.contains(bob.marker) || listed.contains(bob.email));
    let kv = s.get_bytes(
        &format!("/v1/tenants/freight/kv/customers/{bob_id}/notes"),
        &key,
    );
    assert_eq!(kv.0, 200);
    let kv = s.get_bytes(
        &format!("/v1/tenants/freight/kv/customers/{}/last-call", bob.phone),
        &key,
    );
    assert_eq!(kv.0, 200);

    // Nothing of Rita where the data lives: the data directory, or the
    // database (pg_dump); Bob's words are found there, so the search
    // finds what is there.
    // The embedded store gives deleted data back to the disk when it is
    // compacted (a minute after an erasure; here at once).
    let c = s.json("POST", "/v1/store/compact", &s.admin, &json!({}));
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(c.body["compacted"].is_null(), postgres, "{c:?}");
    // Bob is still served, and the server still takes messages.
    assert_eq!(s.get_bytes(&bob_rec, &key).0, 200);
    let h = s.get(&format!("/v1/tenants/freight/customers/{bob_id}"), &key);
    assert_eq!(h.body["interactions"].as_array().unwrap().len(), 3, "{h:?}");
    let (mut ws, _, _) = hello(&s, json!({"type": "hello"}));
    send(
        &mut ws,
        json!({"type": "message", "client_id": "after", "text": "track"}),
    );
    assert_eq!(next_of(&mut ws, "ack")["duplicate"], false);
    if let Some(db) = &db {
        let dump = plugboard_tests::postgres().dump(db);
        // Binary columns (blobs, kv values, raw emails) are dumped as hex.
        let hex = |t: &str| t.bytes().map(|b| format!("{b:02x}")).collect::<String>();
        assert!(dump.contains(bob.marker), "the dump holds Bob's messages");
        assert!(dump.contains(&hex(bob.marker)), "and his binary values");
        for trace in [rita.email, rita.phone, rita.marker, rita_visitor.as_str()] {
            assert!(!dump.contains(trace), "{trace} is still in PostgreSQL");
            assert!(
                !dump.contains(&hex(trace)),
                "{trace} is still in PostgreSQL's binary values"
            );
        }
    } else {
        assert!(!files_containing(&data, bob.marker.as_bytes()).is_empty());
        for trace in [rita.email, rita.phone, rita.marker, rita_visitor.as_str()] {
            let found = files_containing(&data, trace.as_bytes());
            assert!(found.is_empty(), "{trace} is still on disk in {found:?}");
        }
    }
}

#[test]
fn erasing_a_customer_removes_their_calls_chats_emails_and_recordings_on_sled() {
    erase_one_of_two(false);
}

#[test]
fn erasing_a_customer_removes_their_calls_chats_emails_and_recordings_on_postgres() {
    erase_one_of_two(true);
}
