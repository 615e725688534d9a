//! What the email channel takes from a message: sender, subject, the
//! text the customer wrote (without the quoted thread below it), the
//! threading ids and the attachments. Parsing is `mail-parser`'s.

use mail_parser::{MessageParser, MimeHeaders, PartType};

/// The parts of an email the conversation needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedMail {
    /// The From address (lower-cased), or the envelope sender.
    pub from: String,
    /// The From display name.
    pub name: Option<String>,
    /// Subject.
    pub subject: Option<String>,
    /// The text the sender wrote: the plain part (or the HTML part as
    /// text), without the quoted earlier messages.
    pub text: String,
    /// Whether quoted text was cut off.
    pub quoted_cut: bool,
    /// Message-ID, without angle brackets.
    pub message_id: Option<String>,
    /// In-Reply-To and References ids, newest first, without brackets.
    pub thread: Vec<String>,
    /// Attachments: name, MIME type, bytes.
    pub attachments: Vec<(String, String, Vec<u8>)>,
    /// Whether it is a delivery status notification (a bounce).
    pub is_report: bool,
    /// For a bounce: the Message-ID of the message that bounced.
    pub bounced_id: Option<String>,
    /// For a bounce: why (the report's Status and Diagnostic-Code).
    pub bounce_reason: Option<String>,
    /// Sent by a machine (`Auto-Submitted` other than `no`, RFC 3834).
    pub auto_submitted: bool,
}

fn strip_brackets(id: &str) -> String {
    id.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// Parses a message as received (`envelope_from` stands in for a missing
/// From).
pub fn parse(data: &[u8], envelope_from: &str) -> ParsedMail {
    let Some(m) = MessageParser::default().parse(data) else {
        return ParsedMail {
            from: envelope_from.to_ascii_lowercase(),
            text: String::from_utf8_lossy(data).into_owned(),
            ..ParsedMail::default()
        };
    };
    let sender = m.from().and_then(|a| a.first());
    let from = sender
        .and_then(|a| a.address())
        .map(str::to_ascii_lowercase)
        .unwrap_or_else(|| envelope_from.to_ascii_lowercase());
    let name = sender
        .and_then(|a| a.name())
        .map(str::to_string)
        .filter(|n| !n.trim().is_empty());
    let full = m.body_text(0).map(|t| t.into_owned()).unwrap_or_default();
    let (text, quoted_cut) = cut_quoted(&full);
    let mut thread = Vec::new();
    for v in [m.in_reply_to(), m.references()] {
        let ids: Vec<String> = match v.as_text_list() {
            Some(list) => list.iter().map(|s| strip_brackets(s)).collect(),
            None => v.as_text().map(strip_brackets).into_iter().collect(),
        };
        // References run oldest first: the newest is the best match.
        for id in ids.into_iter().rev() {
            if !id.is_empty() && !thread.contains(&id) {
                thread.push(id);
            }
        }
    }
    let attachments = m
        .attachments()
        .map(|p| {
            let name = p.attachment_name().unwrap_or("attachment").to_string();
            let ctype = p
                .content_type()
                .map(|c| match c.subtype() {
                    Some(sub) => format!("{}/{sub}", c.ctype()),
                    None => c.ctype().to_string(),
                })
                .unwrap_or_else(|| "application/octet-stream".into());
            (name, ctype, p.contents().to_vec())
        })
        .collect();
    let is_report = m.content_type().is_some_and(|c| {
        c.ctype().eq_ignore_ascii_case("multipart")
            && c.subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("report"))
    });
    let (mut bounced_id, mut bounce_reason) = (None, None);
    if is_report {
        for part in &m.parts {
            let ctype = part
                .content_type()
                .map(|c| {
                    format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")).to_ascii_lowercase()
                })
                .unwrap_or_default();
            match (&part.body, ctype.as_str()) {
                (PartType::Message(inner), _) => {
                    bounced_id = bounced_id.or_else(|| inner.message_id().map(strip_brackets));
                }
                (_, "text/rfc822-headers") => {
                    let headers = part.contents();
                    if let Some(inner) = MessageParser::default().parse(headers) {
                        bounced_id = bounced_id.or_else(|| inner.message_id().map(strip_brackets));
                    }
                }
                (_, "message/delivery-status") => {
                    let text = String::from_utf8_lossy(part.contents()).into_owned();
                    let wanted: Vec<&str> = text
                        .lines()
                        .filter(|l| {
                            let l = l.to_ascii_lowercase();
                            l.starts_with("status:") || l.starts_with("diagnostic-code:")
                        })
                        .map(str::trim)
                        .collect();
                    if !wanted.is_empty() {
                        bounce_reason = Some(wanted.join("; "));
                    }
                }
                _ => {}
            }
        }
    }
    ParsedMail {
        from,
        name,
        subject: m.subject().map(str::to_string),
        text,
        quoted_cut,
        message_id: m.message_id().map(strip_brackets),
        thread,
        attachments,
        is_report,
        bounced_id,
        bounce_reason,
        auto_submitted: m
            .header_raw("Auto-Submitted")
            .is_some_and(|v| !v.trim().eq_ignore_ascii_case("no")),
    }
}

/// The part of a reply above the quoted thread: cut at an attribution
/// line ("On … wrote:"), an Outlook "Original Message" divider, or the
/// first line of a trailing `>` quote.
pub fn cut_quoted(text: &str) -> (String, bool) {
    let lines: Vec<&str> = text.lines().collect();
    let mut cut = lines.len();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim();
        let attribution = t.starts_with("On ") && t.ends_with("wrote:");
        let outlook = t.starts_with("-----Original Message-----")
            || t.starts_with("-------- Original Message --------");
        if attribution || outlook {
            cut = i;
            break;
        }
        // A quote that runs to the end (only quotes and blank lines after).
        if t.starts_with('>')
            && lines[i..]
                .iter()
                .all(|r| r.trim().is_empty() || r.trim_start().starts_with('>'))
        {
            cut = i;
            break;
        }
    }
    let kept = lines[..cut].join("\n").trim().to_string();
    if kept.is_empty() {
        // Nothing above the quote: keep everything rather than nothing.
        return (text.trim().to_string(), false);
    }
    (kept, cut < lines.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_keeps_the_new_text_and_its_thread() {
        let raw = b"From: =?UTF-8?B?QW5uYSDFoGlsaW7El2xpcw==?= <Anna@Example.com>\r\n\
To: help@acme.test\r\n\
Subject: =?UTF-8?Q?Re:_U=C5=BEsakymas?=\r\n\
Message-ID: <r2@example.com>\r\n\
In-Reply-To: <m1@acme.test>\r\n\
References: <m0@acme.test> <m1@acme.test>\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
Yes, 12345 please.\r\n\
\r\n\
On Mon, 1 Dec 2026 at 10:00, Acme <help@acme.test> wrote:\r\n\
> What is your order number?\r\n";
        let p = parse(raw, "bounce@example.com");
        assert_eq!(p.from, "anna@example.com");
        assert_eq!(p.name.as_deref(), Some("Anna Šilinėlis"));
        assert_eq!(p.subject.as_deref(), Some("Re: Užsakymas"));
        assert_eq!(p.text, "Yes, 12345 please.");
        assert!(p.quoted_cut);
        assert_eq!(p.message_id.as_deref(), Some("r2@example.com"));
        assert_eq!(p.thread, ["m1@acme.test", "m0@acme.test"]);
    }

    #[test]
    fn attachments_and_html_only_bodies() {
        let raw = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n\
Content-Type: text/html; charset=utf-8\r\n\r\n<p>Hello <b>there</b></p>\r\n--XX\r\n\
Content-Type: application/pdf; name=\"inv.pdf\"\r\nContent-Disposition: attachment; filename=\"inv.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--XX--\r\n";
        let p = parse(raw, "");
        assert!(
            p.text.contains("Hello") && p.text.contains("there"),
            "{}",
            p.text
        );
        assert!(!p.text.contains("<b>"));
        assert_eq!(p.attachments.len(), 1);
        assert_eq!(p.attachments[0].0, "inv.pdf");
        assert_eq!(p.attachments[0].1, "application/pdf");
        assert_eq!(p.attachments[0].2, b"%PDF-");
    }

    #[test]
    fn a_bounce_names_the_message_that_bounced() {
        let raw = b"From: MAILER-DAEMON@relay.test\r\nTo: help@acme.test\r\nSubject: Undelivered\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n\
--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\
--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay.test\r\n\r\n\
Final-Recipient: rfc822; gone@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n\
Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n\
--B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: help@acme.test\r\nTo: gone@example.com\r\n\
Message-ID: <msg-1-2@acme.test>\r\nSubject: Re: hi\r\n\r\n--B--\r\n";
        let p = parse(raw, "");
        assert!(p.is_report);
        assert_eq!(p.bounced_id.as_deref(), Some("msg-1-2@acme.test"));
        assert_eq!(
            p.bounce_reason.as_deref(),
            Some("Status: 5.1.1; Diagnostic-Code: smtp; 550 5.1.1 no such user")
        );
    }

    #[test]
    fn quotes_in_the_middle_stay() {
        let (t, cut) = cut_quoted("You said:\n> a\nBut I think b.\n");
        assert_eq!(t, "You said:\n> a\nBut I think b.");
        assert!(!cut);
        let (t, cut) = cut_quoted("> only a quote\n");
        assert_eq!(t, "> only a quote");
        assert!(!cut);
    }
}
