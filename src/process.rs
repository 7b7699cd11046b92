//! Running helper programs (skopeo) in one way: log the command line, capture stderr, and
//! turn a failure into an error that says what ran and what it said.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cancel::{Cancel, Cancelled};

/// Runs `cmd` to completion with stdin closed and stdout and stderr captured; fails with
/// the command line, the exit status and the end of stderr when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let line = command_line(cmd);
    tracing::debug!(command = %line, "running");
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("starting {line}"))?;
    succeeded(&line, out)
}

/// Like [`run`], but stops the program when `cancel` is raised: SIGTERM, then SIGKILL if it
/// is still there after a grace period. The error is then [`Cancelled`].
pub fn run_cancellable(cmd: &mut Command, cancel: &Cancel) -> Result<Output> {
    let line = command_line(cmd);
    tracing::debug!(command = %line, "running");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {line}"))?;
    // Both pipes are drained on their own threads, so a chatty program never blocks.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    // The program is waited for here, without polling, so its end is seen at once; a
    // watcher thread looks at the token meanwhile and stops it when asked. The watcher
    // only signals while the child is not reaped yet: the wait below leaves it a zombie
    // (WNOWAIT) until the watcher is told it is done.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stopped, cancel) = (stopped.clone(), cancel.clone());
        std::thread::spawn(move || {
            let mut stopped_at: Option<Instant> = None;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(POLL) {
                if cancel.is_cancelled() {
                    use nix::sys::signal::{kill, Signal};
                    match stopped_at {
                        None => {
                            let _ = kill(pid, Signal::SIGTERM);
                            stopped.store(true, std::sync::atomic::Ordering::SeqCst);
                            stopped_at = Some(Instant::now());
                        }
                        Some(t) if t.elapsed() > STOP_GRACE => {
                            let _ = kill(pid, Signal::SIGKILL);
                        }
                        Some(_) => {}
                    }
                }
            }
        })
    };
    let waited = loop {
        match nix::sys::wait::waitid(
            nix::sys::wait::Id::Pid(pid),
            nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    let _ = done_tx.send(());
    let _ = watcher.join();
    if let Err(e) = waited {
        tracing::debug!("waitid on {line}: {e}");
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {line}"))?;
    let stopped_at = stopped
        .load(std::sync::atomic::Ordering::SeqCst)
        .then_some(());
    let out = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if stopped_at.is_some() {
        let why = cancel
            .check()
            .err()
            .unwrap_or_else(|| Cancelled(String::new()));
        return Err(anyhow::Error::new(why).context(format!("stopped {line}")));
    }
    succeeded(&line, out)
}

/// How often the token of a cancellable program is looked at.
const POLL: Duration = Duration::from_millis(50);
/// How long a program asked to stop gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// `out` when the program succeeded; otherwise an error with the command line, the exit
/// status and the end of stderr.
fn succeeded(line: &str, out: Output) -> Result<Output> {
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            stderr_tail(&out.stderr)
        );
    }
    Ok(out)
}

/// The command as a person would type it, for logs and errors.
pub fn command_line(cmd: &Command) -> String {
    let mut s = quote(cmd.get_program());
    for a in cmd.get_args() {
        let _ = write!(s, " {}", quote(a));
    }
    s
}

fn quote(a: &OsStr) -> String {
    let a = a.to_string_lossy();
    if !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@+,[]".contains(&b))
    {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// The last lines of a program's stderr, trimmed, enough to say why it failed.
pub fn stderr_tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(5)..];
    if tail.is_empty() {
        "no output on stderr".to_string()
    } else {
        tail.join(" / ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_command_and_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("sh -c 'echo oops >&2; exit 3'"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
    }

    #[test]
    fn a_cancelled_program_is_stopped() {
        let cancel = Cancel::default();
        let c = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c.cancel("the device went away");
        });
        let started = Instant::now();
        let err = run_cancellable(Command::new("sleep").arg("30"), &cancel).unwrap_err();
        t.join().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(crate::cancel::is_cancelled(&err), "{err:#}");
        assert!(
            format!("{err:#}").contains("the device went away"),
            "{err:#}"
        );
        // Not cancelled: a normal run, output kept.
        let out = run_cancellable(Command::new("echo").arg("hi"), &Cancel::default()).unwrap();
        assert_eq!(out.stdout, b"hi\n");
    }
}
