//! Running helper programs (skopeo) in one way: log the command line, capture stderr, and
//! turn a failure into an error that says what ran and what it said.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

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
}
