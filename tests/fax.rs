//! Fax end to end: the real server sends a multi-page PDF through a
//! tenant's trunk to another tenant's fax number (SIP/RTP G.711 over
//! loopback, T.30 both ways in spandsp), and an independent peer — a
//! Python harness on libspandsp through ctypes, with its own SIP and RTP
//! (`tests/peers/fax_peer.py`) — receives a fax from the server and sends
//! one to it — over G.711, and over T.38 after a re-INVITE either side
//! sends. Pages are compared as rasterised images (poppler's
//! `pdftoppm`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_tests::{Server, eventually, free_sip_port, root, run_sipp};
use serde_json::{Value, json};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A PDF of `pages` A4 pages in a frame, each with its number in large
/// type and a block whose place depends on it (so pages differ visibly),
/// made by Ghostscript from PostScript.
fn make_pdf(dir: &Path, name: &str, pages: u32) -> PathBuf {
    let ps = dir.join(format!("{name}.ps"));
    std::fs::write(
        &ps,
        format!(
            "%!PS\n/Helvetica findfont 40 scalefont setfont\n\
             1 1 {pages} {{ /n exch def\n\
             4 setlinewidth newpath 40 40 moveto 555 40 lineto 555 800 lineto 40 800 lineto closepath stroke\n\
             72 730 moveto ({name} page ) show n 3 string cvs show\n\
             72 670 moveto (Waybill 4711 / claim 99) show\n\
             n 1 sub 160 mul 70 add 200 130 300 rectfill\n\
             showpage }} for\n"
        ),
    )
    .unwrap();
    let pdf = dir.join(format!("{name}.pdf"));
    let st = Command::new("gs")
        .args([
            "-q",
            "-dNOPAUSE",
            "-dBATCH",
            "-dSAFER",
            "-sDEVICE=pdfwrite",
            "-sPAPERSIZE=a4",
        ])
        .arg(format!("-sOutputFile={}", pdf.display()))
        .arg(&ps)
        .status()
        .unwrap();
    assert!(st.success());
    pdf
}

/// The pages of a PDF as grey images scaled to one size (PGM bodies).
fn raster(pdf: &Path) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("p");
    let st = Command::new("pdftoppm")
        .args([
            "-gray",
            "-scale-to-x",
            &W.to_string(),
            "-scale-to-y",
            &H.to_string(),
        ])
        .arg(pdf)
        .arg(&prefix)
        .status()
        .unwrap();
    assert!(st.success(), "pdftoppm {}", pdf.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).unwrap();
            // P5\n300 420\n255\n then the pixels.
            let mut fields = 0;
            let mut at = 0;
            while fields < 4 {
                while bytes[at].is_ascii_whitespace() {
                    at += 1;
                }
                while !bytes[at].is_ascii_whitespace() {
                    at += 1;
                }
                fields += 1;
            }
            bytes[at + 1..].to_vec()
        })
        .collect()
}

/// Width and height of the rasters.
const W: usize = 300;
const H: usize = 420;

/// The inked part of a page image (its bounding box of dark pixels),
/// resampled to 200×200: the same content matches whatever margin and
/// scale the fax page gave it.
fn ink(page: &[u8]) -> Vec<bool> {
    let dark = |x: usize, y: usize| page[y * W + x] < 128;
    let (mut x0, mut y0, mut x1, mut y1) = (W, H, 0, 0);
    for y in 0..H {
        for x in 0..W {
            if dark(x, y) {
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            }
        }
    }
    assert!(x1 > x0 && y1 > y0, "a blank page");
    let mut out = Vec::with_capacity(200 * 200);
    for j in 0..200 {
        for i in 0..200 {
            out.push(dark(x0 + i * (x1 - x0) / 199, y0 + j * (y1 - y0) / 199));
        }
    }
    out
}

/// The share of the inked areas' pixels that differ between two pages.
fn difference(a: &[u8], b: &[u8]) -> f64 {
    let (a, b) = (ink(a), ink(b));
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    differ as f64 / a.len() as f64
}

/// Every received page matches the sent page of the same number (within
/// fax resolution) better than any other sent page.
fn same_pages(sent: &Path, received: &Path) {
    let (s, r) = (raster(sent), raster(received));
    assert_eq!(s.len(), r.len(), "page count");
    for (i, page) in r.iter().enumerate() {
        let own = difference(page, &s[i]);
        eprintln!(
            "page {}: {:.4} of the inked area differs from the page sent",
            i + 1,
            own
        );
        assert!(
            own < 0.05,
            "page {} differs from the one sent: {own}",
            i + 1
        );
        for (j, other) in s.iter().enumerate() {
            if j != i {
                let d = difference(page, other);
                eprintln!("  and {d:.4} from sent page {}", j + 1);
                assert!(
                    d > own * 2.0 && d > 0.05,
                    "page {} is as close to sent page {} ({d}) as to its own ({own})",
                    i + 1,
                    j + 1
                );
            }
        }
    }
}

/// A flow for fax numbers that only ends the conversation.
const FAX_FLOW: &str =
    r#"{"name": "fax-in", "start": "done", "nodes": {"done": {"type": "hangup"}}}"#;

/// Tenant `t` with the fax flow on `numbers` (channel fax).
fn fax_tenant(s: &Server, t: &str, numbers: &[&str]) -> String {
    let key = s.tenant(t);
    let d = s
        .call(
            "POST",
            &format!("/v1/tenants/{t}/flows/fax-in"),
            Some(&key),
            Some(FAX_FLOW.as_bytes().to_vec()),
        )
        .unwrap();
    assert_eq!(d.status, 201, "{d:?}");
    for n in numbers {
        let a = s.json(
            "PUT",
            &format!("/v1/tenants/{t}/addresses/{n}"),
            &key,
            &json!({"channel": "fax", "flow": "fax-in"}),
        );
        assert_eq!(a.status, 200, "{a:?}");
    }
    key
}

/// A server with tenant `shipper` (fax number +15550170, its trunk to
/// `trunk_port`, or this server) and `insurer` (+15550190).
fn shipper_and_insurer(trunk_port: Option<u16>) -> (tempfile::TempDir, Server, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).unwrap();
    let shipper = fax_tenant(&s, "shipper", &["+15550170"]);
    let insurer = fax_tenant(&s, "insurer", &["+15550190"]);
    let port = trunk_port.unwrap_or(s.sip_port);
    let t = s.json(
        "PUT",
        "/v1/tenants/shipper/trunks/default",
        &shipper,
        &json!({"host": format!("127.0.0.1:{port}"), "username": "u", "password": "p"}),
    );
    assert_eq!(t.status, 200, "{t:?}");
    (dir, s, shipper, insurer)
}

/// The tenant's fax interactions.
fn faxes(s: &Server, t: &str, key: &str) -> Vec<Value> {
    s.interactions(t, key)
        .into_iter()
        .filter(|ix| ix["channel"] == "fax")
        .collect()
}

/// Waits for a message of the tenant's fax conversation `ix` matching `f`.
fn wait_message(
    s: &Server,
    t: &str,
    key: &str,
    ix: &str,
    limit: Duration,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let mut found = None;
    let ok = eventually(limit, || {
        found = s.messages(t, key, ix).into_iter().find(|m| f(m));
        found.is_some()
    });
    assert!(ok, "{:?}", s.messages(t, key, ix));
    found.unwrap()
}

#[test]
fn a_pdf_goes_from_one_tenant_to_another_and_arrives_with_the_same_pages() {
    // The shipper faxes through its trunk, which is this server; the
    // insurer's number answers as a fax machine.
    let (dir, s, shipper, insurer) = shipper_and_insurer(None);
    let pdf = make_pdf(dir.path(), "claim", 3);

    // Bad input is refused at the API, with the reason, and nothing is
    // queued.
    let bad = s
        .call(
            "POST",
            "/v1/tenants/shipper/faxes?from=%2B15550170&to=%2B15550190",
            Some(&shipper),
            Some(b"%PDF-1.4\nthis is no pdf\n%%EOF".to_vec()),
        )
        .unwrap();
    assert_eq!(bad.status, 400, "{bad:?}");
    let why = bad.body["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("cannot be faxed") && why.contains("no page"),
        "{why}"
    );
    let bad = s.json(
        "POST",
        "/v1/tenants/shipper/faxes",
        &shipper,
        &json!({"from": "+15550170", "to": "+15550190", "document": "aGVsbG8="}),
    );
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(
        bad.body.to_string().contains("not a PDF or TIFF"),
        "{bad:?}"
    );
    let bad = s.json(
        "POST",
        "/v1/tenants/shipper/faxes",
        &shipper,
        &json!({"from": "+15550170", "to": "sip:evil@example.com", "text": "x"}),
    );
    assert_eq!(bad.status, 400, "{bad:?}");
    // Another tenant's fax number is not the shipper's to send from.
    let bad = s.json(
        "POST",
        "/v1/tenants/shipper/faxes",
        &shipper,
        &json!({"from": "+15550190", "to": "+15550170", "text": "x"}),
    );
    assert_eq!(bad.status, 404, "{bad:?}");
    assert!(faxes(&s, "shipper", &shipper).is_empty());

    // The insurer's event stream, read aside until the fax has ended.
    let mut ws = s.tenant_stream("insurer", &insurer);
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let until = std::time::Instant::now() + Duration::from_secs(200);
        while std::time::Instant::now() < until {
            match ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["kind"] == "fax" {
                        let ended = v["data"]["state"] == "ended";
                        seen.push(v["data"].clone());
                        if ended {
                            break;
                        }
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        seen
    });
    // The CLI sends the PDF.
    let (ok, out, err) = s.cli(&[
        "fax",
        "send",
        "shipper",
        "--from",
        "+15550170",
        "--to",
        "+15550190",
        pdf.to_str().unwrap(),
    ]);
    assert!(ok, "{out} {err}");
    let sent: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(sent["pages"], 3, "{sent}");
    let out_ix = sent["interaction"].as_str().unwrap().to_string();

    // The sender's message is marked sent, with what the far end said.
    let m = wait_message(
        &s,
        "shipper",
        &shipper,
        &out_ix,
        Duration::from_secs(180),
        |m| m["status"] != "queued",
    );
    assert_eq!(m["status"], "sent", "{m}");
    assert_eq!(m["meta"]["fax_pages"], "3", "{m}");
    assert_eq!(m["meta"]["fax_ok"], "true", "{m}");
    assert_eq!(m["meta"]["fax_remote_station"], "+15550190", "{m}");
    assert_eq!(m["meta"]["fax_resolution"], "204x196", "{m}");

    // The insurer has it: a fax conversation whose message holds the PDF
    // and the TIFF, from the shipper's number and station id.
    let mut got = Vec::new();
    assert!(eventually(Duration::from_secs(30), || {
        got = faxes(&s, "insurer", &insurer);
        !got.is_empty()
    }));
    let in_ix = got[0]["id"].as_str().unwrap().to_string();
    assert_eq!(got[0]["from"], "15550170", "{}", got[0]);
    let msg = wait_message(
        &s,
        "insurer",
        &insurer,
        &in_ix,
        Duration::from_secs(10),
        |m| m["direction"] == "inbound",
    );
    assert_eq!(msg["meta"]["fax_pages"], "3", "{msg}");
    assert_eq!(msg["meta"]["fax_ok"], "true", "{msg}");
    assert_eq!(msg["meta"]["fax_remote_station"], "+15550170", "{msg}");
    assert!(
        msg["meta"]["fax_bit_rate"]
            .as_str()
            .unwrap()
            .parse::<u32>()
            .unwrap()
            >= 9600
    );
    let types: Vec<&str> = msg["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["content_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["application/pdf", "image/tiff"], "{msg}");

    // The stream told the fax's progress, page by page (the last call's,
    // should the first have been tried again).
    let events = watcher.join().unwrap();
    let last = events
        .iter()
        .rposition(|d| d["state"] == "receiving")
        .unwrap_or_default();
    let states: Vec<String> = events[last..]
        .iter()
        .map(|d| format!("{} {}", d["state"].as_str().unwrap(), d["pages"]))
        .collect();
    assert_eq!(
        states,
        ["receiving null", "page 1", "page 2", "page 3", "ended 3"],
        "{states:?}"
    );
    // The CLI lists it and fetches the PDF; its pages are the ones sent.
    let (ok, out, _) = s.cli(&["fax", "list", "insurer"]);
    assert!(ok && out.contains(&in_ix), "{out}");
    let received = dir.path().join("received.pdf");
    let (ok, out, err) = s.cli(&[
        "fax",
        "get",
        "insurer",
        &in_ix,
        "--pdf",
        received.to_str().unwrap(),
    ]);
    assert!(ok, "{out} {err}");
    same_pages(&pdf, &received);
    // The shipper cannot read the insurer's fax, by the insurer's path or
    // its own.
    let blob = msg["attachments"][0]["blob"].as_str().unwrap();
    let (status, _) = s.get_bytes(&format!("/v1/tenants/insurer/blobs/{blob}"), &shipper);
    assert_eq!(status, 403);
    let (status, _) = s.get_bytes(&format!("/v1/tenants/shipper/blobs/{blob}"), &shipper);
    assert_eq!(status, 404);
    let (status, _) = s.get_bytes(&format!("/v1/tenants/insurer/blobs/{blob}"), &insurer);
    assert_eq!(status, 200);
    let file = format!(
        "/v1/tenants/insurer/messages/{}/attachments/0",
        msg["id"].as_str().unwrap()
    );
    assert_eq!(s.get_bytes(&file, &shipper).0, 403);
    assert_eq!(s.get_bytes(&file, &insurer).0, 200);
    // The insurer keeps fax documents a day: a day later (a pinned clock)
    // the document goes, the fax's record stays; the shipper keeps all.
    let r = s.json(
        "PUT",
        "/v1/tenants/insurer/retention",
        &insurer,
        &json!({"faxes_days": 1}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let tomorrow = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 86_400_000
        + 60_000;
    let r = s.json(
        "POST",
        "/v1/retention/run",
        &s.admin,
        &json!({"now_ms": tomorrow}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(s.get_bytes(&file, &insurer).0, 404);
    let (status, _) = s.get_bytes(&format!("/v1/tenants/insurer/blobs/{blob}"), &insurer);
    assert_eq!(status, 404);
    let kept = s.get(
        &format!("/v1/tenants/insurer/interactions/{in_ix}"),
        &insurer,
    );
    assert_eq!(kept.status, 200, "{kept:?}");
    assert!(!faxes(&s, "shipper", &shipper).is_empty());
}

/// Fax pages (TIFF/F, as a fax machine keeps them) of a PDF, made by
/// Ghostscript at fax resolution.
fn make_tiff(pdf: &Path) -> PathBuf {
    let tif = pdf.with_extension("tif");
    let st = Command::new("gs")
        .args([
            "-q",
            "-dNOPAUSE",
            "-dBATCH",
            "-dSAFER",
            "-sDEVICE=tiffg4",
            "-r204x196",
        ])
        .args(["-g1728x2292", "-dPDFFitPage"])
        .arg(format!("-sOutputFile={}", tif.display()))
        .arg(pdf)
        .status()
        .unwrap();
    assert!(st.success());
    tif
}

/// A PDF of a TIFF's pages (libtiff's tiff2pdf).
fn tiff_pdf(tif: &Path) -> PathBuf {
    let pdf = tif.with_extension("received.pdf");
    let st = Command::new("tiff2pdf")
        .arg("-o")
        .arg(&pdf)
        .arg(tif)
        .status()
        .unwrap();
    assert!(st.success());
    pdf
}

/// Runs the independent fax peer; its JSON result.
fn peer(args: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg(root().join("tests/peers/fax_peer.py"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|_| {
        panic!(
            "fax peer: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The peer calls `to` at the server and sends the TIFF `file`, with
/// `extra` options; its JSON result.
fn peer_sends(s: &Server, to: &str, file: &Path, extra: &[&str]) -> Value {
    let sip = format!("127.0.0.1:{}", s.sip_port);
    let mut args = vec!["send", "--server", &sip, "--to", to, "--file"];
    args.push(file.to_str().unwrap());
    args.extend(extra);
    peer(&args)
}

/// The first message of the tenant's newest fax other than `seen`, with
/// that fax's interaction id.
fn next_fax_message(s: &Server, t: &str, key: &str, seen: &[String]) -> (String, Value) {
    let ix = next_fax(s, t, key, seen);
    let msg = wait_message(s, t, key, &ix, Duration::from_secs(10), |_| true);
    (ix, msg)
}

/// A received fax message's PDF, saved as `dir/name`.
fn fax_pdf(s: &Server, t: &str, key: &str, msg: &Value, dir: &Path, name: &str) -> PathBuf {
    let blob = msg["attachments"][0]["blob"].as_str().unwrap();
    let (status, bytes) = s.get_bytes(&format!("/v1/tenants/{t}/blobs/{blob}"), key);
    assert_eq!(status, 200, "{msg}");
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The receiving peer's JSON result, once it exited with T.30 OK.
fn peer_result(
    mut machine: std::process::Child,
    mut lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) -> Value {
    let result: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(machine.wait().unwrap().success(), "{result}");
    result
}

/// The message of the tenant's outbound fax `ix`, once it was sent.
fn sent_fax(s: &Server, t: &str, key: &str, ix: &str) -> Value {
    wait_message(s, t, key, ix, Duration::from_secs(30), |m| {
        m["status"] == "sent"
    })
}

/// The newest fax interaction of the tenant other than `seen`.
fn next_fax(s: &Server, t: &str, key: &str, seen: &[String]) -> String {
    let mut id = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            id = faxes(s, t, key)
                .into_iter()
                .filter_map(|ix| ix["id"].as_str().map(str::to_string))
                .find(|i| !seen.contains(i));
            id.is_some()
        }),
        "no new fax for {t}"
    );
    id.unwrap()
}

#[test]
fn an_independent_fax_machine_receives_from_us_and_sends_to_us() {
    let peer_port = free_sip_port();
    let (dir, s, shipper, insurer) = shipper_and_insurer(Some(peer_port));
    // The trunk asks for T.38, which this peer refuses (488): the fax
    // goes on over G.711.
    let t = s.json(
        "PUT",
        "/v1/tenants/shipper/trunks/default",
        &shipper,
        &json!({"host": format!("127.0.0.1:{peer_port}"), "t38": true}),
    );
    assert_eq!(t.status, 200, "{t:?}");

    // The peer receives a 2-page PDF sent as JSON over the API.
    let pdf = make_pdf(dir.path(), "invoice", 2);
    let rx = dir.path().join("peer-rx.tif");
    let (machine, lines) = peer_receiving(peer_port, &rx, &[]);
    use base64::Engine as _;
    let doc = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&pdf).unwrap());
    let a = s.json(
        "POST",
        "/v1/tenants/shipper/faxes",
        &shipper,
        &json!({"from": "+15550170", "to": "+15559999", "document": doc, "name": "invoice.pdf"}),
    );
    assert_eq!(a.status, 202, "{a:?}");
    assert_eq!(a.body["pages"], 2);
    let out_ix = a.body["interaction"].as_str().unwrap().to_string();
    let result = peer_result(machine, lines);
    assert_eq!(result["pages"], 2, "{result}");
    assert_eq!(result["remote"], "+15550170", "{result}");
    assert_eq!(result["ecm"], true, "{result}");
    same_pages(&pdf, &tiff_pdf(&rx));
    let m = sent_fax(&s, "shipper", &shipper, &out_ix);
    assert_eq!(m["meta"]["fax_remote_station"], "+1 555 0999", "{m}");
    assert_eq!(m["meta"]["fax_pages"], "2", "{m}");
    assert_eq!(m["meta"]["fax_transport"], "g711", "{m}");
    assert_eq!(result["t38"], false, "{result}");

    // The peer sends us a 2-page fax.
    let letter = make_pdf(dir.path(), "letter", 2);
    let tif = make_tiff(&letter);
    let result = peer_sends(&s, "15550190", &tif, &["--ident", "+44 20 7946 0000"]);
    assert_eq!(result["code"], 0, "{result}");
    assert_eq!(result["pages"], 2, "{result}");
    assert_eq!(result["remote"], "+15550190", "{result}");
    let (first, msg) = next_fax_message(&s, "insurer", &insurer, &[]);
    assert_eq!(msg["meta"]["fax_pages"], "2", "{msg}");
    assert_eq!(msg["meta"]["fax_ok"], "true", "{msg}");
    assert_eq!(
        msg["meta"]["fax_remote_station"], "+44 20 7946 0000",
        "{msg}"
    );
    let got = fax_pdf(&s, "insurer", &insurer, &msg, dir.path(), "got.pdf");
    same_pages(&tiff_pdf(&tif), &got);

    // A fax cut during its second page keeps the whole first page, and
    // says it was cut.
    let three = make_tiff(&make_pdf(dir.path(), "three", 3));
    let result = peer_sends(&s, "15550190", &three, &["--cut-after-pages", "1"]);
    assert_eq!(result["by"], "cut", "{result}");
    let (_, msg) = next_fax_message(&s, "insurer", &insurer, &[first]);
    assert_eq!(msg["meta"]["fax_pages"], "1", "{msg}");
    assert_eq!(msg["meta"]["fax_ok"], "false", "{msg}");
    assert!(msg["text"].as_str().unwrap().contains("cut short"), "{msg}");
    let got = fax_pdf(&s, "insurer", &insurer, &msg, dir.path(), "cut.pdf");
    assert_eq!(raster(&got).len(), 1);
}

/// Starts the peer receiving on `port` into `rx` with `extra` options;
/// returns it and its output once it is ready.
fn peer_receiving(
    port: u16,
    rx: &Path,
    extra: &[&str],
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    let mut machine = Command::new("python3")
        .arg(root().join("tests/peers/fax_peer.py"))
        .args(["receive", "--port", &port.to_string(), "--out"])
        .arg(rx)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(machine.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("ready"));
    (machine, lines)
}

#[test]
fn over_t38_after_a_reinvite_from_either_side() {
    let peer_port = free_sip_port();
    let (dir, s, shipper, insurer) = shipper_and_insurer(Some(peer_port));
    let trunk = |t38: bool| {
        let t = s.json(
            "PUT",
            "/v1/tenants/shipper/trunks/default",
            &shipper,
            &json!({"host": format!("127.0.0.1:{peer_port}"), "t38": t38}),
        );
        assert_eq!(t.status, 200, "{t:?}");
    };
    let send = |pdf: &Path| {
        let a = s.call(
            "POST",
            "/v1/tenants/shipper/faxes?from=%2B15550170&to=%2B15559999",
            Some(&shipper),
            Some(std::fs::read(pdf).unwrap()),
        );
        let a = a.unwrap();
        assert_eq!(a.status, 202, "{a:?}");
        a.body["interaction"].as_str().unwrap().to_string()
    };

    // 1. The trunk asks for T.38: once the peer answers, we re-INVITE to
    //    image/t38, the peer accepts, and the pages go as IFP packets.
    trunk(true);
    let pdf = make_pdf(dir.path(), "manifest", 2);
    let rx = dir.path().join("peer-t38.tif");
    let (machine, lines) = peer_receiving(peer_port, &rx, &["--t38", "accept"]);
    let out_ix = send(&pdf);
    let result = peer_result(machine, lines);
    assert_eq!(result["t38"], true, "{result}");
    assert_eq!(result["pages"], 2, "{result}");
    assert_eq!(result["remote"], "+15550170", "{result}");
    // The peer sent its 200 twice: each was acknowledged.
    assert_eq!(result["reinvite_acks"], 2, "{result}");
    same_pages(&pdf, &tiff_pdf(&rx));
    let m = sent_fax(&s, "shipper", &shipper, &out_ix);
    assert_eq!(m["meta"]["fax_transport"], "t38", "{m}");
    assert_eq!(m["meta"]["fax_pages"], "2", "{m}");

    // 2. The far end re-INVITEs our outbound leg to T.38 itself (a
    //    gateway that heard our CNG): accepted, and the fax goes over it.
    //    The peer takes no notice of our first 200: the second makes it.
    trunk(false);
    let pdf = make_pdf(dir.path(), "bill", 1);
    let rx = dir.path().join("peer-offer.tif");
    let (machine, lines) = peer_receiving(peer_port, &rx, &["--t38", "offer"]);
    let out_ix = send(&pdf);
    let result = peer_result(machine, lines);
    assert_eq!(
        (result["t38"].clone(), result["pages"].clone()),
        (json!(true), json!(1)),
        "{result}"
    );
    same_pages(&pdf, &tiff_pdf(&rx));
    let m = sent_fax(&s, "shipper", &shipper, &out_ix);
    assert_eq!(m["meta"]["fax_transport"], "t38", "{m}");

    // 3. The peer calls our fax number and re-INVITEs to T.38 half a
    //    second in: our fax call accepts and receives over UDPTL.
    let letter = make_pdf(dir.path(), "claim", 2);
    let tif = make_tiff(&letter);
    let result = peer_sends(&s, "15550190", &tif, &["--t38", "offer"]);
    assert_eq!(result["code"], 0, "{result}");
    assert_eq!(
        (result["t38"].clone(), result["pages"].clone()),
        (json!(true), json!(2)),
        "{result}"
    );
    let (_, msg) = next_fax_message(&s, "insurer", &insurer, &[]);
    assert_eq!(msg["meta"]["fax_transport"], "t38", "{msg}");
    assert_eq!(msg["meta"]["fax_pages"], "2", "{msg}");
    assert_eq!(msg["meta"]["fax_ok"], "true", "{msg}");
    let got = fax_pdf(&s, "insurer", &insurer, &msg, dir.path(), "got-t38.pdf");
    same_pages(&tiff_pdf(&tif), &got);
}

#[test]
fn a_voice_number_takes_the_fax_it_hears_and_a_flow_faxes_a_receipt() {
    let peer_port = free_sip_port();
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).unwrap();
    let key = s.tenant("depot");
    // The fax number's flow faxes the sender a receipt; the front desk's
    // voice flow listens for a fax machine for ten seconds while it
    // greets the caller.
    let flows = [
        (
            "fax-receipt",
            json!({"name": "fax-receipt", "start": "ack", "nodes": {
                "ack": {"type": "send_fax", "to": "{{caller}}",
                        "text": "Depot: your fax was received. Thank you.", "next": "done"},
                "done": {"type": "hangup"}}}),
        ),
        (
            "front-desk",
            json!({"name": "front-desk", "start": "listen", "nodes": {
                "listen": {"type": "receive_fax", "detect_secs": 10, "next": "menu"},
                "menu": {"type": "menu", "prompt": "Welcome to the depot. Press 1 for bookings.",
                         "options": {"1": "bye"}, "timeout_ms": 15000, "no_input": "bye"},
                "bye": {"type": "hangup"}}}),
        ),
    ];
    for (name, flow) in flows {
        let d = s
            .call(
                "POST",
                &format!("/v1/tenants/depot/flows/{name}"),
                Some(&key),
                Some(flow.to_string().into_bytes()),
            )
            .unwrap();
        assert_eq!(d.status, 201, "{d:?}");
    }
    for (number, channel, flow) in [
        ("+15550175", "fax", "fax-receipt"),
        ("+15550176", "voice", "front-desk"),
    ] {
        let a = s.json(
            "PUT",
            &format!("/v1/tenants/depot/addresses/{number}"),
            &key,
            &json!({"channel": channel, "flow": flow}),
        );
        assert_eq!(a.status, 200, "{a:?}");
    }
    let t = s.json(
        "PUT",
        "/v1/tenants/depot/trunks/default",
        &key,
        &json!({"host": format!("127.0.0.1:{peer_port}")}),
    );
    assert_eq!(t.status, 200, "{t:?}");

    // The receipt goes to the sender's number, where this peer answers.
    let rx = dir.path().join("receipt.tif");
    let (receipt_machine, lines) = peer_receiving(peer_port, &rx, &[]);
    // A fax machine calls the voice number.
    let tif = make_tiff(&make_pdf(dir.path(), "delivery-note", 1));
    let result = peer_sends(&s, "15550176", &tif, &["--ident", "+1 555 0177"]);
    let log = s.log();
    let tail = &log[log.len().saturating_sub(4000)..];
    assert_eq!(result["code"], 0, "{result}\n{tail}");
    assert_eq!(result["pages"], 1, "{result}");

    // The call's timeline says it became a fax, filed under the fax number.
    let voice: Vec<Value> = s
        .interactions("depot", &key)
        .into_iter()
        .filter(|ix| ix["channel"] == "voice")
        .collect();
    assert_eq!(voice.len(), 1, "{voice:?}");
    let call_id = voice[0]["id"].as_str().unwrap();
    let mut call = Value::Null;
    assert!(eventually(Duration::from_secs(20), || {
        call = s.interaction("depot", &key, call_id);
        call["closed_ms"].is_u64()
    }));
    let fax_entries: Vec<&Value> = call["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "fax")
        .collect();
    assert_eq!(fax_entries.len(), 2, "{call}");
    assert_eq!(fax_entries[0]["data"]["address"], "15550175", "{call}");
    assert_eq!(fax_entries[1]["data"]["pages"], 1, "{call}");
    assert!(
        call["attributes"]["hangup_cause"]
            .as_str()
            .unwrap()
            .contains("calling tone"),
        "{call}"
    );
    // The received fax, and the receipt its flow sent: two fax
    // conversations.
    let mut msg = Value::Null;
    assert!(eventually(Duration::from_secs(20), || {
        msg = faxes(&s, "depot", &key)
            .into_iter()
            .filter_map(|f| f["id"].as_str().map(str::to_string))
            .flat_map(|i| s.messages("depot", &key, &i))
            .find(|m| m["direction"] == "inbound")
            .unwrap_or(Value::Null);
        !msg.is_null()
    }));
    let ix = msg["interaction"].as_str().unwrap().to_string();
    assert_eq!(msg["meta"]["fax_pages"], "1", "{msg}");
    assert_eq!(msg["meta"]["fax_ok"], "true", "{msg}");

    // The fax number's flow faxed a receipt back: one page, from the fax
    // number, marked as sent by that conversation's flow.
    let result = peer_result(receipt_machine, lines);
    assert_eq!(result["pages"], 1, "{result}");
    assert_eq!(result["remote"], "+15550175", "{result}");
    let mut receipt = Value::Null;
    assert!(eventually(Duration::from_secs(30), || {
        receipt = faxes(&s, "depot", &key)
            .into_iter()
            .filter_map(|f| f["id"].as_str().map(str::to_string))
            .filter(|i| *i != ix)
            .flat_map(|i| s.messages("depot", &key, &i))
            .find(|m| m["status"] == "sent")
            .unwrap_or(Value::Null);
        !receipt.is_null()
    }));
    assert_eq!(
        receipt["meta"]["sent_by_interaction"],
        ix.as_str(),
        "{receipt}"
    );
    assert_eq!(receipt["author"]["type"], "flow", "{receipt}");
    let conv = s.interaction("depot", &key, &ix);
    assert!(
        conv["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "sent" && e["data"]["channel"] == "fax"),
        "{conv}"
    );
}

#[test]
fn a_call_that_is_not_a_fax_ends_as_no_fax_detected() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).unwrap();
    let key = fax_tenant(&s, "insurer", &["+15550190"]);
    // SIPp talks (its speech capture) and then stays silent; the server
    // hangs up on its own (the scenario fails without our BYE). T.30 gives
    // up after its three unanswered DIS (about 20 s here), well before
    // SIPp's 90 s wait and the server's 60 s without RTP.
    run_sipp(
        &s,
        dir.path(),
        &root().join("tests/sipp/fax_speech.xml"),
        "15550190",
        "u1",
        &[],
    )
    .unwrap();
    let (ix, msg) = next_fax_message(&s, "insurer", &key, &[]);
    assert_eq!(msg["text"], "No fax received: no fax detected", "{msg}");
    assert_eq!(msg["meta"]["fax_pages"], "0", "{msg}");
    assert!(
        msg.get("attachments").is_none_or(|a| a == &json!([])),
        "{msg}"
    );
    assert!(msg["meta"].get("fax_resolution").is_none(), "{msg}");
    // Recorded, closed, and no flow ran on it.
    let record = s.get(&format!("/v1/tenants/insurer/interactions/{ix}"), &key);
    assert_eq!(record.body["state"], "closed", "{record:?}");
    assert!(
        !record.body.to_string().contains("\"actions\""),
        "{record:?}"
    );
}
