//! The interpreter and the validator, on the order-hotline example document.
//! HTTP is answered in process here; the server tests run the same document
//! in the sandbox against a real HTTP server.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_core::Channel;
use plugboard_core::flow::{Action, Event};
use plugboard_flowgraph::{FlowHost, HttpFailure, HttpRequest, HttpResponse, Input, handle, parse};
use serde_json::{Value, json};

/// 2026-11-23 (Monday) 10:00 UTC.
const MONDAY_10: u64 = 1_795_428_000_000;
/// 2026-11-28 (Saturday) 10:00 UTC.
const SATURDAY_10: u64 = MONDAY_10 + 5 * 86_400_000;

struct Host {
    now: u64,
    offset: i32,
    requests: Vec<HttpRequest>,
}

impl FlowHost for Host {
    fn http(&mut self, req: HttpRequest) -> Result<HttpResponse, HttpFailure> {
        self.requests.push(req.clone());
        if req.url.ends_with("/orders/1234") {
            Ok(HttpResponse {
                status: 200,
                body: br#"{"status":"out for delivery"}"#.to_vec(),
            })
        } else if req.url.contains("/orders/") {
            Ok(HttpResponse {
                status: 404,
                body: b"no such order".to_vec(),
            })
        } else if req.url.contains("/slow") {
            Err(HttpFailure::Timeout)
        } else {
            Err(HttpFailure::Other("connection refused".into()))
        }
    }
    fn now_ms(&mut self) -> u64 {
        self.now
    }
    fn utc_offset_minutes(&mut self) -> i32 {
        self.offset
    }
    fn config(&self, key: &str) -> Option<String> {
        (key == "mis_url").then(|| "http://127.0.0.1:9/base".to_string())
    }
}

fn doc() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/order-hotline/flow.json"
    ))
    .unwrap()
}

/// A host answering as of `now` (UTC offset in minutes).
fn host_at(now: u64, offset: i32) -> Host {
    Host {
        now,
        offset,
        requests: Vec::new(),
    }
}

fn run(channel: Channel, now: u64, offset: i32, events: &[Event]) -> (Vec<Vec<Action>>, Host) {
    let flow = parse(&doc()).unwrap().flow;
    let mut host = host_at(now, offset);
    let input = Input {
        channel,
        from: "+37060000000",
        to: "+37052000000",
        attributes: &[],
    };
    let mut state = String::new();
    let mut out = Vec::new();
    for e in std::iter::once(&Event::Started).chain(events) {
        let step = handle(&flow, input, &state, e, &mut host).unwrap();
        state = step.state;
        out.push(step.actions);
    }
    (out, host)
}

fn digits(d: &str) -> Event {
    Event::Digits {
        digits: d.into(),
        terminated: false,
    }
}

fn js(actions: &[Action]) -> Value {
    serde_json::to_value(actions).unwrap()
}

#[test]
fn open_menu_sales() {
    let (steps, _) = run(Channel::Voice, MONDAY_10, 0, &[digits("1")]);
    assert_eq!(
        js(&steps[0]),
        json!([{"type":"gather","prompt":{"text":"Welcome. Press 1 for sales, 2 to track an order."},"max_digits":1,"timeout_ms":5000,"inter_digit_timeout_ms":3000,"speech":false}])
    );
    assert_eq!(
        js(&steps[1]),
        json!([{"type":"say","text":"Connecting you to sales."},{"type":"enqueue","queue":"sales","priority":0,"skills":[]}])
    );
}

#[test]
fn order_lookup_found_and_not_found() {
    let (steps, host) = run(Channel::Voice, MONDAY_10, 0, &[digits("2"), digits("1234")]);
    assert_eq!(
        js(&steps[1]),
        json!([{"type":"gather","prompt":{"text":"Please enter your order number, then press hash."},"max_digits":10,"terminator":"#","timeout_ms":8000,"inter_digit_timeout_ms":3000,"speech":false}])
    );
    assert_eq!(
        js(&steps[2]),
        json!([{"type":"say","text":"Order 1234 is out for delivery."},{"type":"hangup"}])
    );
    assert_eq!(host.requests[0].url, "http://127.0.0.1:9/base/orders/1234");
    assert_eq!(host.requests[0].method, "GET");

    let (steps, _) = run(Channel::Voice, MONDAY_10, 0, &[digits("2"), digits("9 9")]);
    assert_eq!(
        js(&steps[2]),
        json!([{"type":"say","text":"Sorry, we could not find order 9 9."},{"type":"hangup"}])
    );
}

#[test]
fn closed_hours_weekend_holiday_and_time_zone() {
    let voicemail = json!([{"type":"say","text":"We are closed. Please leave a message after the tone."},{"type":"record","max_secs":60,"beep":true}]);
    let (steps, _) = run(
        Channel::Voice,
        SATURDAY_10,
        0,
        &[Event::Recorded {
            id: "rec-1".into(),
            duration_ms: 4000,
        }],
    );
    assert_eq!(js(&steps[0]), voicemail);
    assert_eq!(
        js(&steps[1]),
        json!([{"type":"say","text":"Thank you for your message. Goodbye."},{"type":"hangup"}])
    );
    // 10:00 UTC is 19:00 in UTC+9: closed.
    let (steps, _) = run(Channel::Voice, MONDAY_10, 9 * 60, &[]);
    assert_eq!(js(&steps[0]), voicemail);
    // 25 December 2026 is a Friday: a holiday.
    let christmas = MONDAY_10 + 32 * 86_400_000;
    let (steps, _) = run(Channel::Voice, christmas, 0, &[]);
    assert_eq!(js(&steps[0]), voicemail);
}

#[test]
fn no_input_goes_to_voicemail_and_hangup_ends() {
    let (steps, _) = run(
        Channel::Voice,
        MONDAY_10,
        0,
        &[Event::Timeout, Event::Hangup, digits("1")],
    );
    assert_eq!(
        js(&steps[1]),
        json!([{"type":"say","text":"Please leave a message after the tone."},{"type":"record","max_secs":60,"beep":true}])
    );
    assert!(steps[2].is_empty());
    assert!(steps[3].is_empty(), "nothing after hangup");
}

#[test]
fn chat_channel_replies_and_matches_keywords() {
    let (steps, _) = run(
        Channel::Chat,
        MONDAY_10,
        0,
        &[Event::Message {
            text: " Sales ".into(),
            subject: None,
            attachments: vec![],
        }],
    );
    assert_eq!(
        js(&steps[0]),
        json!([{"type":"reply","text":"Welcome. Press 1 for sales, 2 to track an order."}])
    );
    assert_eq!(
        js(&steps[1]),
        json!([{"type":"reply","text":"Connecting you to sales."},{"type":"enqueue","queue":"sales","priority":0,"skills":[]}])
    );
}

#[test]
fn an_enqueue_hands_the_variables_it_names_to_the_agent() {
    let flow = parse(
        json!({"start": "ask", "nodes": {
            "ask": {"type": "gather", "prompt": "Your order?", "var": "order", "max_digits": 6, "next": "look"},
            "look": {"type": "http", "url": "{{config.mis_url}}/orders/{{order}}", "into": "found", "next": "set", "error": "set"},
            "set": {"type": "set", "vars": {"note": "order {{order}}", "vip": true, "none": null, "tags": ["a", "b"]}, "next": "queue"},
            "queue": {"type": "enqueue", "queue": "sales",
                      "attributes": ["order", "found", "note", "vip", "none", "tags", "missing", "caller"]}
        }})
        .to_string()
        .as_bytes(),
    )
    .unwrap()
    .flow;
    let mut host = host_at(MONDAY_10, 0);
    let input = Input {
        channel: Channel::Voice,
        from: "+37060000000",
        to: "+37052000000",
        attributes: &[],
    };
    let first = handle(&flow, input, "", &Event::Started, &mut host).unwrap();
    let step = handle(&flow, input, &first.state, &digits("1234"), &mut host).unwrap();
    // Only the variables the enqueue names, in its order; an object is
    // flattened, a null or unset one left out.
    assert_eq!(
        js(&step.actions),
        json!([
            {"type": "set_attribute", "name": "order", "value": "1234"},
            {"type": "set_attribute", "name": "found.status", "value": "out for delivery"},
            {"type": "set_attribute", "name": "note", "value": "order 1234"},
            {"type": "set_attribute", "name": "vip", "value": "true"},
            {"type": "set_attribute", "name": "tags", "value": "[\"a\",\"b\"]"},
            {"type": "set_attribute", "name": "caller", "value": "+37060000000"},
            {"type": "enqueue", "queue": "sales", "priority": 0, "skills": []}
        ])
    );
}

fn refused(doc: Value) -> (Option<String>, String) {
    let e = parse(doc.to_string().as_bytes()).unwrap_err();
    (e.node, e.reason)
}

#[test]
fn bad_documents_are_refused_naming_the_node() {
    let (node, reason) = refused(json!({"start": "a", "nodes": {
        "a": {"type": "say", "text": "hi", "next": "nowhere"}
    }}));
    assert_eq!(node.as_deref(), Some("a"));
    assert!(reason.contains("\"nowhere\""), "{reason}");

    let (node, reason) = refused(json!({"start": "a", "nodes": {
        "a": {"type": "say", "text": "hi", "next": "b"},
        "b": {"type": "teleport"}
    }}));
    assert_eq!(node.as_deref(), Some("b"));
    assert!(
        reason.contains("unknown node type \"teleport\""),
        "{reason}"
    );

    let (node, reason) = refused(json!({"start": "a", "nodes": {
        "a": {"type": "say", "text": "hi", "next": "b"},
        "b": {"type": "set", "vars": {"x": "1"}, "next": "c"},
        "c": {"type": "condition", "if": {"set": "x"}, "then": "a", "else": "d"},
        "d": {"type": "hangup"}
    }}));
    assert!(matches!(node.as_deref(), Some("a" | "b" | "c")), "{node:?}");
    assert!(reason.contains("never waits for input"), "{reason}");

    // A fax taken at once ends the flow: it has no next.
    let (node, reason) = refused(json!({"start": "a", "nodes": {
        "a": {"type": "receive_fax", "next": "b"},
        "b": {"type": "hangup"}
    }}));
    assert_eq!(node.as_deref(), Some("a"));
    assert!(reason.contains("no next"), "{reason}");
    let (_, reason) = refused(json!({"start": "a", "nodes": {
        "a": {"type": "receive_fax", "detect_secs": 600, "next": "b"},
        "b": {"type": "hangup"}
    }}));
    assert!(reason.contains("detect_secs"), "{reason}");

    // A loop through a menu waits for the caller each time round: fine.
    let ok = json!({"start": "m", "nodes": {
        "m": {"type": "menu", "prompt": "1 again", "options": {"1": "s"}},
        "s": {"type": "say", "text": "again", "next": "m"}
    }});
    assert!(parse(ok.to_string().as_bytes()).is_ok());

    let (node, reason) = refused(json!({"start": "a", "nodes": {
        "a": {"type": "say", "text": "hi {{name", "next": "b"},
        "b": {"type": "hangup"}
    }}));
    assert_eq!(node.as_deref(), Some("a"));
    assert!(reason.contains("unclosed"), "{reason}");

    let (node, reason) = refused(json!({"start": "a", "nodes": {
        "a": {"type": "menu", "prompt": "x", "options": {"1": "a"}, "colour": "red"}
    }}));
    assert_eq!(node.as_deref(), Some("a"));
    assert!(reason.contains("colour"), "{reason}");

    let (node, reason) = refused(json!({"start": "zz", "nodes": {"a": {"type": "hangup"}}}));
    assert_eq!(node, None);
    assert!(reason.contains("\"zz\""), "{reason}");

    let (_, reason) = refused(json!({"start": "a", "nodes": {
        "a": {"type": "condition", "if": {"business_hours": {"days": ["mon"], "open": "9am", "close": "17:00"}}, "then": "b", "else": "b"},
        "b": {"type": "hangup"}
    }}));
    assert!(reason.contains("9am"), "{reason}");
}

#[test]
fn unreachable_nodes_are_warnings() {
    let p = parse(
        json!({"start": "a", "nodes": {"a": {"type": "hangup"}, "b": {"type": "hangup"}}})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(p.warnings.len(), 1);
}

fn schema() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../plugins/flow-graph/flow.schema.json"
        ))
        .unwrap(),
    )
    .unwrap()
}

#[test]
fn the_json_schema_accepts_the_example_and_agrees_with_the_parser() {
    let schema = schema();
    let v = jsonschema::validator_for(&schema).unwrap();
    let example: Value = serde_json::from_slice(&doc()).unwrap();
    let errors: Vec<String> = v.iter_errors(&example).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    // Documents the parser refuses for their shape, the schema refuses too.
    for bad in [
        json!({"start": "a", "nodes": {"a": {"type": "teleport"}}}),
        json!({"start": "a", "nodes": {"a": {"type": "hangup", "colour": "red"}}}),
        json!({"start": "a", "nodes": {"a": {"type": "menu", "prompt": "x", "options": {}}}}),
        json!({"start": "a", "nodes": {"a": {"type": "condition", "if": {"weekday": ["someday"]}, "then": "a", "else": "a"}}}),
        json!({"nodes": {"a": {"type": "hangup"}}}),
    ] {
        assert!(!v.is_valid(&bad), "schema accepted {bad}");
        assert!(
            parse(bad.to_string().as_bytes()).is_err(),
            "parser accepted {bad}"
        );
    }
    // The schema lists exactly the node types the parser knows.
    let mut in_schema: Vec<String> = schema["$defs"]["node"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            n["properties"]["type"]["const"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    in_schema.sort();
    let mut known: Vec<String> = in_schema
        .iter()
        .filter(|t| {
            let node = json!({"type": t});
            let e = parse(
                json!({"start": "a", "nodes": {"a": node}})
                    .to_string()
                    .as_bytes(),
            );
            !matches!(e, Err(e) if e.reason.contains("unknown node type"))
        })
        .cloned()
        .collect();
    known.sort();
    assert_eq!(known, in_schema);
    assert_eq!(in_schema.len(), 15);
}

#[test]
fn http_outcomes_take_their_edges() {
    let doc = json!({"start": "a", "nodes": {
        "a": {"type": "http", "url": "{{config.mis_url}}/{{attr.kind}}/{{attr.id}}", "into": "r",
              "next": "ok", "error": "err", "timeout": "slow"},
        "ok": {"type": "say", "text": "ok {{http_status}}", "next": "end"},
        "err": {"type": "say", "text": "error: {{error}}", "next": "end"},
        "slow": {"type": "say", "text": "slow: {{error}}", "next": "end"},
        "end": {"type": "hangup"}
    }});
    let flow = parse(doc.to_string().as_bytes()).unwrap().flow;
    let said = |kind: &str, id: &str| {
        let attrs = vec![
            ("kind".to_string(), kind.to_string()),
            ("id".to_string(), id.to_string()),
        ];
        let mut host = host_at(MONDAY_10, 0);
        let input = Input {
            channel: Channel::Voice,
            from: "1",
            to: "2",
            attributes: &attrs,
        };
        let step = handle(&flow, input, "", &Event::Started, &mut host).unwrap();
        match &step.actions[0] {
            Action::Say { text, .. } => text.clone(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(said("orders", "1234"), "ok 200");
    assert_eq!(said("orders", "1"), "error: HTTP status 404");
    // Values are URL-encoded: a slash in a variable cannot change the path.
    assert_eq!(said("orders", "x/1234"), "error: HTTP status 404");
    assert_eq!(said("slow", "1"), "slow: timeout");
    assert_eq!(said("elsewhere", "1"), "error: connection refused");
}

#[test]
fn load_reads_a_validated_document_as_parse_does() {
    let parsed = parse(&doc()).unwrap().flow;
    assert_eq!(plugboard_flowgraph::Flow::load(&doc()).unwrap(), parsed);
    // Unvalidated input cannot loop forever or run off the graph.
    let looping = json!({"start": "a", "nodes": {
        "a": {"type": "set", "vars": {}, "next": "b"},
        "b": {"type": "set", "vars": {}, "next": "a"}
    }});
    let flow = plugboard_flowgraph::Flow::load(looping.to_string().as_bytes()).unwrap();
    let mut host = Host {
        now: MONDAY_10,
        offset: 0,
        requests: Vec::new(),
    };
    let input = Input {
        channel: Channel::Voice,
        from: "1",
        to: "2",
        attributes: &[],
    };
    assert!(handle(&flow, input, "", &Event::Started, &mut host).is_err());
    let dangling =
        json!({"start": "a", "nodes": {"a": {"type": "say", "text": "x", "next": "zz"}}});
    let flow = plugboard_flowgraph::Flow::load(dangling.to_string().as_bytes()).unwrap();
    assert!(handle(&flow, input, "", &Event::Started, &mut host).is_err());
}
