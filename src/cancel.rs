//! Stopping a piece of work from outside: the daemon cancels an import when its device
//! goes away or when it is told to stop. The work looks at the token between blobs and
//! images, while reading (see [`Checked`]) and while a `skopeo copy` runs (see
//! [`crate::process::run_cancellable`]).

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A shared flag with the reason it was raised. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    raised: AtomicBool,
    why: Mutex<String>,
}

/// The error work ends with when it was cancelled.
#[derive(Debug, thiserror::Error)]
#[error("abandoned: {0}")]
pub struct Cancelled(pub String);

impl Cancel {
    /// Asks the work to stop; the first reason given is kept.
    pub fn cancel(&self, why: &str) {
        let mut w = self.0.why.lock().unwrap_or_else(|p| p.into_inner());
        if !self.0.raised.swap(true, Ordering::SeqCst) {
            *w = why.to_string();
        }
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.raised.load(Ordering::Relaxed)
    }

    /// Fails with [`Cancelled`] once cancelled.
    pub fn check(&self) -> Result<(), Cancelled> {
        if self.is_cancelled() {
            Err(Cancelled(
                self.0.why.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            ))
        } else {
            Ok(())
        }
    }
}

/// Whether `err` (or what caused it) is a cancellation.
pub fn is_cancelled(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<Cancelled>().is_some()
            || e.downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.downcast_ref::<Cancelled>().is_some())
    })
}

/// A reader that fails with [`Cancelled`] once the token is raised, so a long read
/// (hashing a blob, walking a tar stream) stops within one buffer.
pub struct Checked<R> {
    inner: R,
    cancel: Cancel,
}

impl<R> Checked<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, cancel: &Cancel) -> Self {
        Checked {
            inner,
            cancel: cancel.clone(),
        }
    }
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.cancel.check().map_err(io::Error::other)?;
        self.inner.read(buf)
    }
}

/// A test hook: with `LONGSHORE_TEST_STOP_AT=NAME` in the environment, the process stops
/// itself (SIGSTOP) at the point called NAME, so a test can kill it exactly there
/// (tests/crash.rs names every point).
pub fn fault_point(name: &str) {
    if std::env::var("LONGSHORE_TEST_STOP_AT").is_ok_and(|v| v == name) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_token_stops_a_reader_and_is_recognised() {
        let c = Cancel::default();
        let data = [7u8; 64];
        let mut r = Checked::new(&data[..], &c);
        let mut buf = [0u8; 16];
        assert_eq!(r.read(&mut buf).unwrap(), 16);
        c.clone().cancel("device /dev/sdb1 was removed");
        c.cancel("a second reason is not kept");
        let err = r.read(&mut buf).unwrap_err();
        let err = anyhow::Error::from(err).context("reading blob");
        assert!(is_cancelled(&err));
        assert!(
            format!("{err:#}").contains("/dev/sdb1 was removed"),
            "{err:#}"
        );
        assert!(!is_cancelled(&anyhow::anyhow!("disk full")));
    }
}
