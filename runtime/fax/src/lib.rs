//! Fax for Plugboard.
//!
//! - [`Terminal`]: a T.30 fax terminal, sans-IO — over G.711 audio (8 kHz
//!   samples in, samples out) or over T.38 (UDPTL datagrams in and out,
//!   see [`t38`]); time is the samples that went by. It is spandsp's (Debian's `libspandsp` 0.0.6, LGPL-2.1), reached through a
//!   thin FFI of our own ([`spandsp`], the crate's only unsafe code) and
//!   linked dynamically, as FreeSWITCH's `mod_spandsp` and Asterisk's
//!   `res_fax_spandsp` use it: there is no credible pure-Rust T.30, and
//!   the `spandsp` crates on crates.io are unmaintained bindings that
//!   build a static copy.
//! - [`document`]: what is faxed and what is kept — a PDF or TIFF turned
//!   into fax pages (TIFF/F at 204×196 dpi, 1728 pixels wide) by
//!   Ghostscript, text set on a page, received pages turned into a PDF by
//!   libtiff's `tiff2pdf`. Both run as separate programs (Ghostscript is
//!   AGPL: never linked).

mod spandsp;

pub mod document;
pub mod t38;

use std::ffi::{CStr, CString};
use std::path::Path;

/// Samples per 20 ms frame at 8 kHz.
pub const FRAME: usize = 160;

/// How long a terminal may go on alone after the call ended (ms of
/// audio, run at once): enough to finish a DCN, too short for a page.
pub const DRAIN_MS: u64 = 3_000;

/// spandsp's completion codes this crate reads (`T30_ERR_*`).
mod code {
    pub const OK: i32 = 0;
    pub const T0_EXPIRED: i32 = 2;
    pub const T1_EXPIRED: i32 = 3;
    pub const RETRY_DCN: i32 = 48;
    pub const CALL_DROPPED: i32 = 49;
}

/// Listens for a fax machine's calling tone (CNG: 1100 Hz in half-second
/// bursts) on a voice call — spandsp's detector, as FreeSWITCH's
/// `spandsp_start_fax_detection` and Asterisk's `faxdetect` use.
pub struct CngDetector {
    cng: spandsp::Cng,
}

impl CngDetector {
    /// A detector.
    pub fn new() -> Result<CngDetector, FaxError> {
        Ok(CngDetector {
            cng: spandsp::Cng::new().ok_or(FaxError::Setup)?,
        })
    }

    /// A frame heard from the caller (8 kHz); true once a fax machine's
    /// calling tone was heard.
    pub fn heard(&mut self, frame: &[i16]) -> bool {
        self.cng.heard(frame)
    }
}

/// Why a fax could not be set up or a document converted.
#[derive(Debug, thiserror::Error)]
pub enum FaxError {
    /// The document cannot be faxed (not a PDF or TIFF, unreadable, no
    /// pages).
    #[error("{0}")]
    Document(String),
    /// A helper program is missing or failed.
    #[error("{0}")]
    Tool(String),
    /// spandsp refused to set up a terminal.
    #[error("cannot set up the fax terminal")]
    Setup,
    /// Files around the fax.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Which side of the fax a terminal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends a TIFF/F file.
    Send,
    /// Receives into a TIFF/F file.
    Receive,
}

/// Transfer statistics of a fax.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pages sent or received, whole.
    pub pages: u32,
    /// Pages in the file being sent (0 when receiving).
    pub pages_in_file: u32,
    /// Modem bit rate of the image transfer (bits/s).
    pub bit_rate: u32,
    /// Error correction mode was used.
    pub ecm: bool,
    /// Horizontal and vertical resolution of the last page (pixels per
    /// metre).
    pub resolution: (u32, u32),
    /// Width and length of the last page, in pixels.
    pub size: (u32, u32),
    /// Rows of the last page received damaged (without ECM).
    pub bad_rows: u32,
}

/// How a fax ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every page went (or came) and the session ended properly.
    pub ok: bool,
    /// spandsp's completion code (`T30_ERR_*`).
    pub code: i32,
    /// What happened, in words (`OK`, `no fax detected`, spandsp's text).
    pub text: String,
    /// The far end's station id (TSI/CSI).
    pub remote_ident: String,
    /// What went across.
    pub stats: Stats,
}

impl Outcome {
    /// No fax machine answered or called: the far end never said a
    /// T.30 word (timers ran out, or our calls for it went unanswered).
    pub fn no_fax(&self) -> bool {
        matches!(
            self.code,
            code::T0_EXPIRED | code::T1_EXPIRED | code::RETRY_DCN
        ) && self.stats.pages == 0
            && self.remote_ident.is_empty()
    }
}

/// A T.30 fax terminal over audio: feed it what the far end sends
/// ([`Terminal::rx`]), send what it makes ([`Terminal::tx`]), frame by
/// frame, until [`Terminal::outcome`] says it is over. Switched to T.38
/// ([`Terminal::use_t38`]), it takes and makes UDPTL datagrams instead
/// ([`Terminal::udptl_in`], [`Terminal::tick`]).
pub struct Terminal {
    engine: Engine,
    role: Role,
    calling: bool,
    /// Our station id and the file, as spandsp takes them.
    ident: CString,
    path: CString,
    /// Samples that went by, both ways (the terminal's clock).
    samples: u64,
}

/// How spandsp's T.30 engine is set up for `role`, on `path`.
fn setup<'a>(role: Role, calling: bool, ident: &'a CStr, path: &'a CStr) -> spandsp::Setup<'a> {
    let (tx, rx) = match role {
        Role::Send => (Some(path), None),
        Role::Receive => (None, Some(path)),
    };
    spandsp::Setup {
        calling,
        ident,
        tx,
        rx,
        ecm: true,
        max_pages: i32::try_from(document::MAX_PAGES).unwrap_or(i32::MAX),
    }
}

/// What the terminal runs over.
enum Engine {
    Audio(spandsp::Fax),
    T38(spandsp::T38, t38::Udptl),
}

impl Terminal {
    /// A terminal that sends `file` (TIFF/F, see [`document`]) or
    /// receives into it. `calling` is the side that dialled (it sends
    /// CNG); `ident` is our station id (up to 20 characters: digits, `+`
    /// and spaces; a number of bare digits is shown in international
    /// form, with a `+`). ECM (error correction) is offered.
    pub fn new(role: Role, calling: bool, file: &Path, ident: &str) -> Result<Terminal, FaxError> {
        let mut ident: String = ident
            .chars()
            .filter(|c| c.is_ascii_digit() || matches!(c, '+' | ' '))
            .take(20)
            .collect();
        if !ident.is_empty() && ident.len() < 20 && ident.bytes().all(|b| b.is_ascii_digit()) {
            ident.insert(0, '+');
        }
        let ident = CString::new(ident).map_err(|_| FaxError::Setup)?;
        // spandsp keeps file names in 256 bytes and would cut a longer
        // one silently.
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(file.as_os_str());
        if bytes.len() >= 256 {
            return Err(FaxError::Tool(format!(
                "the fax file's path is too long for spandsp ({} bytes): {}",
                bytes.len(),
                file.display()
            )));
        }
        let path =
            CString::new(bytes).map_err(|_| FaxError::Document("a file name with a NUL".into()))?;
        let fax = spandsp::Fax::new(&setup(role, calling, &ident, &path)).ok_or(FaxError::Setup)?;
        Ok(Terminal {
            engine: Engine::Audio(fax),
            role,
            calling,
            ident,
            path,
            samples: 0,
        })
    }

    /// Goes over to T.38 with the parameters both sides agreed (a
    /// re-INVITE to `image/t38`): T.30 starts again over IFP packets, as
    /// FreeSWITCH's and Asterisk's terminals do; a page under way over
    /// audio is lost (the switch comes before the first, in practice).
    pub fn use_t38(&mut self, params: &t38::Params) -> Result<(), FaxError> {
        let options = spandsp::T38Options {
            version: i32::from(params.version),
            max_bit_rate: i32::try_from(params.max_bit_rate).unwrap_or(14_400),
            transferred_tcf: params.transferred_tcf,
            max_datagram: i32::try_from(params.max_datagram).unwrap_or(400),
        };
        let setup = setup(self.role, self.calling, &self.ident, &self.path);
        let engine = spandsp::T38::new(&setup, options).ok_or(FaxError::Setup)?;
        // spandsp opens the file only when a page starts: the audio engine,
        // dropped here, closes what it had open before the new one does.
        self.engine = Engine::T38(engine, t38::Udptl::new(params.redundancy));
        Ok(())
    }

    /// True once the terminal runs over T.38.
    pub fn is_t38(&self) -> bool {
        matches!(self.engine, Engine::T38(..))
    }

    fn t30(&self) -> &spandsp::T30 {
        match &self.engine {
            Engine::Audio(f) => f.t30(),
            Engine::T38(t, _) => t.t30(),
        }
    }

    /// A frame heard from the far end (ignored over T.38).
    pub fn rx(&mut self, heard: &[i16]) {
        if let Engine::Audio(f) = &mut self.engine {
            f.rx(heard);
        }
    }

    /// The next frame to send (silence over T.38, whose time goes by in
    /// [`Terminal::tick`]).
    pub fn tx(&mut self) -> [i16; FRAME] {
        let mut out = [0i16; FRAME];
        if let Engine::Audio(f) = &mut self.engine {
            f.tx(&mut out);
            self.samples += FRAME as u64;
        }
        out
    }

    /// One frame period over audio: what was heard in, what to send out.
    pub fn frame(&mut self, heard: &[i16]) -> [i16; FRAME] {
        self.rx(heard);
        self.tx()
    }

    /// A UDPTL datagram from the far end (over T.38; ignored over audio,
    /// and so is a datagram that is not UDPTL).
    pub fn udptl_in(&mut self, datagram: &[u8]) {
        if let Engine::T38(t, udptl) = &mut self.engine {
            for (seq, ifp) in udptl.receive(datagram) {
                t.rx(&ifp, seq);
            }
        }
    }

    /// One frame period over T.38: the UDPTL datagrams to send (each
    /// already repeated as many times as it is to be sent). Nothing over
    /// audio.
    pub fn tick(&mut self) -> Vec<Vec<u8>> {
        let Engine::T38(t, udptl) = &mut self.engine else {
            return Vec::new();
        };
        t.advance(FRAME as i32);
        self.samples += FRAME as u64;
        let mut out = Vec::new();
        for (ifp, count) in t.take() {
            let datagram = udptl.send(ifp);
            for _ in 1..count {
                out.push(datagram.clone());
            }
            out.push(datagram);
        }
        out
    }

    /// Time on the line so far, in milliseconds.
    pub fn elapsed_ms(&self) -> u64 {
        self.samples / 8
    }

    /// What went across so far.
    pub fn stats(&mut self) -> Stats {
        let s = self.t30().stats();
        let u = |v: i32| u32::try_from(v).unwrap_or(0);
        Stats {
            pages: match self.role {
                Role::Send => u(s.pages_tx),
                Role::Receive => u(s.pages_rx),
            },
            pages_in_file: match self.role {
                Role::Send => u(s.pages_in_file),
                Role::Receive => 0,
            },
            bit_rate: u(s.bit_rate),
            ecm: s.error_correcting_mode != 0,
            resolution: (u(s.x_resolution), u(s.y_resolution)),
            size: (u(s.width), u(s.length)),
            bad_rows: u(s.bad_rows),
        }
    }

    /// How it ended, once it has.
    pub fn outcome(&mut self) -> Option<Outcome> {
        let code = self.t30().completion()?;
        Some(self.outcome_of(code))
    }

    /// Ends the fax because the call ended; how it went (a fax cut
    /// mid-page keeps its whole pages and is not `ok`).
    ///
    /// The far end hangs up as soon as it has our last word (DCN), often
    /// before our side of T.30 has finished sending it: the terminal
    /// first gets up to [`DRAIN_MS`] of silence, in virtual time, to end
    /// on its own.
    pub fn hang_up(&mut self) -> Outcome {
        let silence = [0i16; FRAME];
        for _ in 0..DRAIN_MS / 20 {
            if let Some(done) = self.outcome() {
                return done;
            }
            if self.is_t38() {
                self.tick();
            } else {
                self.frame(&silence);
            }
        }
        if let Some(done) = self.outcome() {
            return done;
        }
        // spandsp says CALL_DROPPED for a session cut short, and OK for
        // one whose last page was confirmed and only the goodbye was left.
        self.t30().terminate();
        let code = self.t30().completion().unwrap_or(code::CALL_DROPPED);
        self.outcome_of(code)
    }

    fn outcome_of(&mut self, code: i32) -> Outcome {
        let stats = self.stats();
        let mut outcome = Outcome {
            ok: code == code::OK,
            code,
            text: spandsp::completion_text(code),
            remote_ident: self.t30().remote_ident(),
            stats,
        };
        if outcome.no_fax() {
            outcome.text = "no fax detected".into();
        } else if code == code::CALL_DROPPED {
            outcome.text = "the call ended before the fax did".into();
        }
        outcome
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Two terminals wired back to back, frame by frame, for at most
    /// `max_frames` (virtual time).
    fn exchange(a: &mut Terminal, b: &mut Terminal, max_frames: usize) -> usize {
        let (mut from_a, mut from_b) = ([0i16; FRAME], [0i16; FRAME]);
        for n in 0..max_frames {
            let next_a = a.frame(&from_b);
            let next_b = b.frame(&from_a);
            from_a = next_a;
            from_b = next_b;
            if a.outcome().is_some() && b.outcome().is_some() {
                return n;
            }
        }
        max_frames
    }

    #[test]
    fn a_document_goes_from_one_terminal_to_another_page_for_page() {
        let dir = tempfile::tempdir().unwrap();
        let tiff = dir.path().join("out.tif");
        let pages = document::text_to_fax(
            &document::Tools::default(),
            "Waybill 123\nDelivered to dock 4.\n\x0cPage two.",
            &tiff,
        )
        .unwrap();
        assert_eq!(pages, 2);
        let rx = dir.path().join("in.tif");
        let mut sender = Terminal::new(Role::Send, true, &tiff, "+1 555 0100").unwrap();
        let mut receiver = Terminal::new(Role::Receive, false, &rx, "+1 555 0200").unwrap();
        let frames = exchange(&mut sender, &mut receiver, 50 * 300);
        assert!(frames < 50 * 300, "the fax never ended");
        let (sent, got) = (sender.outcome().unwrap(), receiver.outcome().unwrap());
        assert!(sent.ok && got.ok, "{sent:?} {got:?}");
        assert_eq!((sent.stats.pages, got.stats.pages), (2, 2));
        assert_eq!(got.remote_ident, "+1 555 0100");
        assert_eq!(sent.remote_ident, "+1 555 0200");
        assert!(got.stats.ecm && got.stats.bit_rate >= 9600, "{got:?}");
        assert_eq!(document::tiff_pages(&std::fs::read(&rx).unwrap()), 2);
    }

    #[test]
    fn over_t38_a_fax_survives_lost_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let tiff = dir.path().join("out.tif");
        document::text_to_fax(&document::Tools::default(), "one\x0ctwo", &tiff).unwrap();
        let rx = dir.path().join("in.tif");
        let mut sender = Terminal::new(Role::Send, true, &tiff, "+1 555 0100").unwrap();
        let mut receiver = Terminal::new(Role::Receive, false, &rx, "+1 555 0200").unwrap();
        // Both went over after a little audio, as after a re-INVITE.
        for _ in 0..10 {
            sender.frame(&[0; FRAME]);
            receiver.frame(&[0; FRAME]);
        }
        let params = t38::Params::default();
        sender.use_t38(&params).unwrap();
        receiver.use_t38(&params).unwrap();
        assert!(sender.is_t38() && receiver.is_t38());
        let (mut n, mut lost) = (0u64, 0);
        while n < 50 * 300 && (sender.outcome().is_none() || receiver.outcome().is_none()) {
            for d in sender.tick() {
                n += 1;
                // Every seventh datagram is lost; redundancy brings it back.
                if n % 7 == 0 {
                    lost += 1;
                    continue;
                }
                receiver.udptl_in(&d);
            }
            for d in receiver.tick() {
                sender.udptl_in(&d);
            }
        }
        let (sent, got) = (sender.outcome().unwrap(), receiver.outcome().unwrap());
        assert!(sent.ok && got.ok, "{sent:?} {got:?}");
        assert!(lost > 10, "{lost}");
        assert_eq!((sent.stats.pages, got.stats.pages), (2, 2));
        assert_eq!(got.remote_ident, "+1 555 0100");
        assert_eq!(document::tiff_pages(&std::fs::read(&rx).unwrap()), 2);
    }

    #[test]
    fn a_calling_fax_machine_is_heard_and_a_voice_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let tiff = dir.path().join("out.tif");
        document::text_to_fax(&document::Tools::default(), "x", &tiff).unwrap();
        let mut caller = Terminal::new(Role::Send, true, &tiff, "1").unwrap();
        let mut cng = CngDetector::new().unwrap();
        let heard_after = (0..50 * 5).find(|_| cng.heard(&caller.tx()));
        let frames = heard_after.expect("no CNG heard in 5 s");
        assert!(frames <= 50 * 2, "{frames}");
        // A voice-like mix of tones and silence is no fax.
        let mut cng = CngDetector::new().unwrap();
        for n in 0..50 * 10u32 {
            let frame: Vec<i16> = (0..FRAME as u32)
                .map(|i| {
                    let t = f64::from(n * FRAME as u32 + i) / 8000.0;
                    let f = 300.0 + 200.0 * (t * 3.0).sin();
                    (8000.0 * (2.0 * std::f64::consts::PI * f * t).sin()) as i16
                })
                .collect();
            assert!(!cng.heard(&frame), "voice taken for CNG at frame {n}");
        }
    }

    #[test]
    fn silence_is_no_fax_and_a_cut_call_is_not_ok() {
        let dir = tempfile::tempdir().unwrap();
        let rx = dir.path().join("in.tif");
        let mut receiver = Terminal::new(Role::Receive, false, &rx, "1").unwrap();
        let mut n = 0;
        while receiver.outcome().is_none() && n < 50 * 120 {
            receiver.frame(&[0i16; FRAME]);
            n += 1;
        }
        let o = receiver.outcome().expect("T.30 gives up on silence");
        assert!(o.no_fax() && !o.ok, "{o:?}");
        assert_eq!(o.text, "no fax detected");
        assert!(receiver.elapsed_ms() < 60_000);

        let tiff = dir.path().join("out.tif");
        document::text_to_fax(&document::Tools::default(), "one\x0ctwo\x0cthree", &tiff).unwrap();
        let rx2 = dir.path().join("in2.tif");
        let mut sender = Terminal::new(Role::Send, true, &tiff, "2").unwrap();
        let mut receiver = Terminal::new(Role::Receive, false, &rx2, "3").unwrap();
        // Wire them until the first page is in, then cut the call.
        let (mut from_a, mut from_b) = ([0i16; FRAME], [0i16; FRAME]);
        for _ in 0..50 * 300 {
            let next_a = sender.frame(&from_b);
            let next_b = receiver.frame(&from_a);
            (from_a, from_b) = (next_a, next_b);
            if receiver.stats().pages >= 1 {
                break;
            }
        }
        let cut = receiver.hang_up();
        assert!(!cut.ok, "{cut:?}");
        assert_eq!(cut.stats.pages, 1, "{cut:?}");
        assert!(!sender.hang_up().ok);
    }
}
