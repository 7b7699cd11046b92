//! Progress of long work on the command line: on a terminal, one bar redrawn in place
//! on stderr, with log lines printed above it; otherwise a plain line per step, which
//! reads well in a log file or a CI job.

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;

use crate::config::human_size;
use crate::events::Progress;

/// The bar on screen, if any: what log lines must clear and redraw.
static BAR: Mutex<Option<String>> = Mutex::new(None);

/// How wide the bar's body is, in characters.
const WIDTH: usize = 24;

/// Shows the progress of copies, as a bar on a terminal or as lines elsewhere.
pub struct Display {
    tty: bool,
    /// Whether plain lines are wanted as well (the log does not carry them already).
    lines: bool,
}

impl Display {
    /// A display on stderr. `lines_logged` says whether the log already prints a line per
    /// step (a local import logs them; an import in the daemon does not, here).
    pub fn stderr(lines_logged: bool) -> Display {
        Display {
            tty: io::stderr().is_terminal(),
            lines: !lines_logged,
        }
    }

    /// Shows one step.
    pub fn step(&self, p: &Progress) {
        if self.tty {
            let line = bar_line(p);
            let mut bar = lock();
            let _ = write!(io::stderr(), "\r\x1b[K{line}");
            *bar = Some(line);
        } else if self.lines {
            let _ = writeln!(io::stderr(), "{}", plain_line(p));
        }
    }

    /// Takes the bar off the screen.
    pub fn finish(&self) {
        if self.tty && lock().take().is_some() {
            let _ = write!(io::stderr(), "\r\x1b[K");
        }
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        self.finish();
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<String>> {
    BAR.lock().unwrap_or_else(|p| p.into_inner())
}

fn fraction(p: &Progress) -> f64 {
    if p.total == 0 {
        1.0
    } else {
        (p.done as f64 / p.total as f64).clamp(0.0, 1.0)
    }
}

/// `bundle [#######.........] 4.2 GiB/15.1 GiB  37/190 images`.
pub fn bar_line(p: &Progress) -> String {
    let filled = (fraction(p) * WIDTH as f64).round() as usize;
    let mut s = format!(
        "{} [{}{}] {}/{}",
        p.bundle,
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        human_size(p.done),
        human_size(p.total)
    );
    if let Some((done, total)) = p.images {
        s.push_str(&format!("  {done}/{total} images"));
    }
    s
}

/// `bundle: copied IMAGE (4.2 GiB/15.1 GiB, 28%)`, or for a fetch
/// `set NAME: fetching, about 3 min left (1.1 GiB/4.0 GiB, 27%)`.
pub fn plain_line(p: &Progress) -> String {
    format!(
        "{}: {}{} ({}/{}, {:.0}%)",
        p.bundle,
        if p.fetching { "" } else { "copied " },
        p.image,
        human_size(p.done),
        human_size(p.total),
        fraction(p) * 100.0
    )
}

/// Stderr for log lines that keeps the bar below them: the bar is cleared, the line
/// written, and the bar drawn again.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bar = lock();
        let mut err = io::stderr().lock();
        if bar.is_some() {
            err.write_all(b"\r\x1b[K")?;
        }
        err.write_all(buf)?;
        if let Some(line) = bar.as_ref() {
            if buf.ends_with(b"\n") {
                err.write_all(line.as_bytes())?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(done: u64, total: u64, images: Option<(usize, usize)>) -> Progress {
        Progress {
            bundle: "ocp-4.16.3".into(),
            image: "quay.io/x/y@sha256:ab".into(),
            done,
            total,
            images,
            fetching: false,
        }
    }

    #[test]
    fn the_bar_fills_with_the_bytes_copied() {
        let gib = 1 << 30;
        let half = bar_line(&p(gib, 2 * gib, Some((37, 190))));
        assert!(
            half.starts_with("ocp-4.16.3 [############............] "),
            "{half}"
        );
        assert!(half.ends_with("  37/190 images"), "{half}");
        let full = bar_line(&p(5, 5, None));
        assert!(full.contains(&format!("[{}]", "#".repeat(WIDTH))), "{full}");
        assert!(!full.contains("images"), "{full}");
        // Nothing to copy counts as done, not as a division by zero.
        assert!(bar_line(&p(0, 0, None)).contains(&"#".repeat(WIDTH)));
        assert_eq!(
            plain_line(&p(1, 4, None)),
            "ocp-4.16.3: copied quay.io/x/y@sha256:ab (1 B/4 B, 25%)"
        );
        let fetch = Progress {
            bundle: "set edge".into(),
            image: "fetching, about 2 min left".into(),
            fetching: true,
            ..p(1, 4, None)
        };
        assert_eq!(
            plain_line(&fetch),
            "set edge: fetching, about 2 min left (1 B/4 B, 25%)"
        );
    }
}
