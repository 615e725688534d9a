//! Documents around a fax: what goes out becomes TIFF/F pages at fax
//! resolution (204×196 dpi, 1728 pixels wide, Group 4), what came in
//! becomes a PDF.
//!
//! Two programs do the work, each as a separate process with a time
//! limit: Ghostscript (`gs`, AGPL, so never linked) renders PDF and
//! PostScript pages; libtiff's `tiff2pdf` (BSD-style licence) wraps fax
//! pages into a PDF without decoding them. Only input that starts as a
//! PDF or a TIFF reaches them: Ghostscript is never handed PostScript
//! from outside (it is a programming language); the PostScript for a
//! text page is ours.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::FaxError;

/// Fax page size in pixels at 204×196 dpi (A4 width of the T.4 standard,
/// 1728 pixels; 297 mm long).
const PAGE: &str = "-g1728x2292";
/// How long one conversion may take.
const TIME_LIMIT: Duration = Duration::from_secs(60);
/// At most this many pages in one fax.
pub const MAX_PAGES: u32 = 200;

/// The programs used, by path or name on `PATH`.
#[derive(Debug, Clone)]
pub struct Tools {
    /// Ghostscript.
    pub gs: PathBuf,
    /// libtiff's `tiff2pdf`.
    pub tiff2pdf: PathBuf,
}

impl Default for Tools {
    fn default() -> Tools {
        Tools {
            gs: PathBuf::from("gs"),
            tiff2pdf: PathBuf::from("tiff2pdf"),
        }
    }
}

/// What a document is, by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `%PDF-`.
    Pdf,
    /// A TIFF (either byte order).
    Tiff,
}

/// The kind of `bytes`, if it is one we fax.
pub fn kind(bytes: &[u8]) -> Option<Kind> {
    if bytes.starts_with(b"%PDF-") {
        Some(Kind::Pdf)
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        Some(Kind::Tiff)
    } else {
        None
    }
}

/// Runs a program with a time limit; its standard error (written to
/// `log`, never a pipe it could fill and block on) on failure.
fn run(mut cmd: Command, what: &str, log: &Path) -> Result<String, FaxError> {
    let errors = std::fs::File::create(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(errors))
        .spawn()
        .map_err(|e| FaxError::Tool(format!("cannot run {what}: {e}")))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(FaxError::Document(format!(
                "{what} took longer than {} s",
                TIME_LIMIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Ok(f) = std::fs::File::open(log) {
        let _ = f.take(64 << 10).read_to_string(&mut stderr);
    }
    let _ = std::fs::remove_file(log);
    if status.success() {
        Ok(stderr)
    } else {
        Err(FaxError::Document(format!(
            "{what} failed: {}",
            first_lines(&stderr)
        )))
    }
}

/// The first meaningful lines of a program's complaint.
fn first_lines(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(2)
        .collect();
    if lines.is_empty() {
        "no reason given".into()
    } else {
        lines.join(" ")
    }
}

/// Renders a PDF or PostScript file of ours into fax pages.
fn render(tools: &Tools, input: &Path, out: &Path, pdf: bool) -> Result<u32, FaxError> {
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new(&tools.gs);
    cmd.args([
        "-q",
        "-dNOPAUSE",
        "-dBATCH",
        "-dSAFER",
        "-sDEVICE=tiffg4",
        "-r204x196",
        PAGE,
        "-dFirstPage=1",
    ]);
    // One page more than a fax may have: enough to refuse a longer one
    // without rendering all of it.
    cmd.arg(format!("-dLastPage={}", MAX_PAGES + 1));
    if pdf {
        cmd.arg("-dPDFFitPage");
    }
    cmd.arg(format!("-sOutputFile={}", out.display()))
        .arg(input);
    let complaint = run(cmd, "ghostscript", &out.with_extension("gs.log"))?;
    let pages = std::fs::read(out).map(|b| tiff_pages(&b)).unwrap_or(0);
    if pages == 0 {
        return Err(FaxError::Document(format!(
            "the document has no page that can be read ({})",
            first_lines(&complaint)
        )));
    }
    if pages > MAX_PAGES {
        return Err(FaxError::Document(format!(
            "more than {MAX_PAGES} pages: a fax has at most {MAX_PAGES}"
        )));
    }
    Ok(pages)
}

/// Turns a PDF or TIFF into fax pages at `out` (TIFF/F); the number of
/// pages. A document that is neither, or that Ghostscript cannot read,
/// is a [`FaxError::Document`] saying why.
pub fn to_fax(tools: &Tools, document: &[u8], out: &Path) -> Result<u32, FaxError> {
    let input = out.with_extension("source");
    let result = match kind(document) {
        None => Err(FaxError::Document(
            "not a PDF or TIFF document (it must start with %PDF- or a TIFF header)".into(),
        )),
        Some(Kind::Pdf) => {
            std::fs::write(&input, document)?;
            render(tools, &input, out, true)
        }
        Some(Kind::Tiff) => {
            // Any TIFF (another resolution, colour) is rendered again at
            // fax resolution, through a PDF of its pages.
            std::fs::write(&input, document)?;
            let pdf = out.with_extension("source.pdf");
            let r = to_pdf(tools, &input, &pdf).and_then(|()| render(tools, &pdf, out, true));
            let _ = std::fs::remove_file(&pdf);
            r
        }
    };
    let _ = std::fs::remove_file(&input);
    result
}

/// Sets `text` on fax pages at `out` (a form feed starts a new page;
/// long lines wrap; characters outside printable ASCII show as `?`).
pub fn text_to_fax(tools: &Tools, text: &str, out: &Path) -> Result<u32, FaxError> {
    let input = out.with_extension("ps");
    std::fs::write(&input, text_postscript(text))?;
    let r = render(tools, &input, out, false);
    let _ = std::fs::remove_file(&input);
    r
}

/// Columns of a text page (Courier 11 on A4 with 1-inch margins).
const COLUMNS: usize = 72;
/// Lines of a text page.
const LINES: usize = 56;

/// PostScript setting `text` in Courier, page by page.
fn text_postscript(text: &str) -> String {
    let mut pages: Vec<Vec<String>> = vec![Vec::new()];
    for (i, part) in text.split('\x0c').enumerate() {
        if i > 0 {
            pages.push(Vec::new());
        }
        for line in part.lines() {
            let clean: Vec<char> = line
                .chars()
                .map(|c| if c == '\t' { ' ' } else { c })
                .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
                .collect();
            let chunks: Vec<String> = if clean.is_empty() {
                vec![String::new()]
            } else {
                clean.chunks(COLUMNS).map(|c| c.iter().collect()).collect()
            };
            for chunk in chunks {
                if pages.last().is_some_and(|p| p.len() >= LINES) {
                    pages.push(Vec::new());
                }
                if let Some(p) = pages.last_mut() {
                    p.push(chunk);
                }
            }
        }
    }
    let mut ps = String::from("%!PS-Adobe-3.0\n/Courier findfont 11 scalefont setfont\n");
    for page in pages {
        for (n, line) in page.iter().enumerate() {
            let escaped = line
                .replace('\\', "\\\\")
                .replace('(', "\\(")
                .replace(')', "\\)");
            ps.push_str(&format!("72 {} moveto ({escaped}) show\n", 770 - 12 * n));
        }
        ps.push_str("showpage\n");
    }
    ps
}

/// Wraps received fax pages (TIFF/F) into a PDF at `out`.
pub fn to_pdf(tools: &Tools, tiff: &Path, out: &Path) -> Result<(), FaxError> {
    let mut cmd = Command::new(&tools.tiff2pdf);
    cmd.arg("-o").arg(out).arg(tiff);
    run(cmd, "tiff2pdf", &out.with_extension("log")).map(drop)
}

/// The number of pages (image directories) in a TIFF; 0 for what is not
/// one. (Counting is a walk down the directory chain: no TIFF crate is
/// needed for it.)
pub fn tiff_pages(bytes: &[u8]) -> u32 {
    let little = match bytes.get(..4) {
        Some(b"II*\0") => true,
        Some(b"MM\0*") => false,
        _ => return 0,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b: [u8; 2] = bytes.get(at..at + 2)?.try_into().ok()?;
        Some(if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let mut pages = 0;
    let mut at = u32_at(4).unwrap_or(0) as usize;
    // A chain that loops or runs off the end stops the count.
    while at != 0 && pages < 10_000 {
        let Some(entries) = u16_at(at) else { break };
        pages += 1;
        let next = at + 2 + 12 * usize::from(entries);
        match u32_at(next) {
            Some(n) if (n as usize) > at => at = n as usize,
            _ => break,
        }
    }
    pages
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_a_readable_pdf_or_tiff_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.tif");
        let t = Tools::default();
        let e = to_fax(&t, b"hello", &out).unwrap_err();
        assert!(e.to_string().contains("not a PDF or TIFF"), "{e}");
        let e = to_fax(&t, b"%PDF-1.4\ngarbage\n%%EOF", &out).unwrap_err();
        assert!(matches!(e, FaxError::Document(_)), "{e}");
        assert!(e.to_string().contains("no page"), "{e}");
        let e = to_fax(&t, b"II*\0\x08\0\0\0garbage", &out).unwrap_err();
        assert!(matches!(e, FaxError::Document(_)), "{e}");
    }

    #[test]
    fn text_pages_and_pdf_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tools::default();
        let tif = dir.path().join("t.tif");
        let long: String = (0..130).map(|i| format!("line {i} (a) \\ b\n")).collect();
        assert_eq!(text_to_fax(&t, &long, &tif).unwrap(), 3);
        let pdf = dir.path().join("t.pdf");
        to_pdf(&t, &tif, &pdf).unwrap();
        let bytes = std::fs::read(&pdf).unwrap();
        assert_eq!(kind(&bytes), Some(Kind::Pdf));
        // The PDF faxes again with the same pages, and so does the TIFF.
        let again = dir.path().join("again.tif");
        assert_eq!(to_fax(&t, &bytes, &again).unwrap(), 3);
        let tiff = std::fs::read(&tif).unwrap();
        assert_eq!(to_fax(&t, &tiff, &again).unwrap(), 3);
    }
}
