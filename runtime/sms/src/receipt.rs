//! Delivery receipts: a `deliver_sm` with esm_class message type 0x04
//! names the message it reports on (`receipted_message_id`, or `id:` in
//! the text of SMPP 3.4 appendix B) and its final state.

use plugboard_core::MessageStatus;

/// A delivery receipt's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The SMSC's id of the message it reports on.
    pub id: String,
    /// The state: `DELIVRD`, `EXPIRED`, `DELETED`, `UNDELIV`, `ACCEPTD`,
    /// `UNKNOWN`, `REJECTD`, `ENROUTE`.
    pub stat: String,
    /// The network's error code, if any.
    pub err: Option<String>,
}

impl Receipt {
    /// Reads a receipt from its TLVs (`receipted_message_id`,
    /// `message_state`) or, where they are missing, its text
    /// (`id:… sub:… dlvr:… submit date:… done date:… stat:… err:… text:…`).
    pub fn parse(tlv_id: Option<&str>, tlv_state: Option<u8>, text: &str) -> Option<Receipt> {
        let field = |name: &str| {
            let lower = text.to_ascii_lowercase();
            let at = lower
                .match_indices(&format!("{name}:"))
                .find(|(i, _)| *i == 0 || text.as_bytes()[i - 1] == b' ')?
                .0;
            let value = &text[at + name.len() + 1..];
            Some(value.split(' ').next().unwrap_or("").to_string())
        };
        let id = tlv_id
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or_else(|| field("id"))
            .filter(|s| !s.is_empty())?;
        let stat = tlv_state
            .and_then(state_name)
            .map(str::to_string)
            .or_else(|| field("stat").map(|s| s.to_ascii_uppercase()))
            .unwrap_or_else(|| "UNKNOWN".into());
        let err = field("err").filter(|e| !e.trim_start_matches('0').is_empty());
        Some(Receipt { id, stat, err })
    }

    /// What the receipt means for our message: delivered, failed (with
    /// why), or nothing final yet.
    pub fn status(&self) -> Option<(MessageStatus, Option<String>)> {
        let why = || {
            Some(match &self.err {
                Some(e) => format!("{} (error {e})", self.stat),
                None => self.stat.clone(),
            })
        };
        match self.stat.as_str() {
            "DELIVRD" => Some((MessageStatus::Delivered, None)),
            "EXPIRED" | "DELETED" | "UNDELIV" | "REJECTD" => Some((MessageStatus::Failed, why())),
            _ => None,
        }
    }
}

/// The receipt name of an SMPP `message_state`.
fn state_name(state: u8) -> Option<&'static str> {
    Some(match state {
        1 => "ENROUTE",
        2 => "DELIVRD",
        3 => "EXPIRED",
        4 => "DELETED",
        5 => "UNDELIV",
        6 => "ACCEPTD",
        7 => "UNKNOWN",
        8 => "REJECTD",
        _ => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_receipts_are_read() {
        let r = Receipt::parse(
            None,
            None,
            "id:7f3a sub:001 dlvr:001 submit date:2612011200 done date:2612011201 stat:DELIVRD err:000 text:Hello id:x",
        )
        .unwrap();
        assert_eq!(r.id, "7f3a");
        assert_eq!(r.stat, "DELIVRD");
        assert_eq!(r.err, None);
        assert_eq!(r.status(), Some((MessageStatus::Delivered, None)));
        let r = Receipt::parse(None, None, "id:9 stat:UNDELIV err:034").unwrap();
        assert_eq!(
            r.status(),
            Some((MessageStatus::Failed, Some("UNDELIV (error 034)".into())))
        );
    }

    #[test]
    fn tlvs_win_over_the_text() {
        let r = Receipt::parse(Some("42"), Some(2), "id:41 stat:UNDELIV").unwrap();
        assert_eq!((r.id.as_str(), r.stat.as_str()), ("42", "DELIVRD"));
        assert_eq!(
            Receipt::parse(None, Some(6), "").map(|r| r.status()),
            None,
            "no id"
        );
        let r = Receipt::parse(Some("5"), Some(6), "").unwrap();
        assert_eq!(r.status(), None);
    }
}
