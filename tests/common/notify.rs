//! A NOTIFY_SOCKET the test provides, and the daemon started with it, to read what the
//! daemon tells systemd.
#![allow(dead_code)]

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::node::Node;

pub struct Notifications {
    socket: UnixDatagram,
    pub seen: Vec<String>,
}

impl Notifications {
    pub fn bind(path: &std::path::Path) -> Notifications {
        let socket = UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notifications {
            socket,
            seen: vec![],
        }
    }

    /// Waits until a message satisfies `want`; returns it.
    pub fn wait_for(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        if let Some(m) = self.seen.iter().find(|m| want(m)) {
            return m.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        loop {
            assert!(Instant::now() < deadline, "no {what} among {:?}", self.seen);
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(m.clone());
                    if want(&m) {
                        return m;
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("reading the notify socket: {e}"),
            }
        }
    }

    /// Waits for a message holding the line `line`.
    pub fn wait_for_line(&mut self, line: &str) -> String {
        self.wait_for(line, |m| m.lines().any(|l| l == line))
    }
}

/// The daemon, started as systemd would start a `Type=notify` service.
pub struct NotifyingDaemon {
    pub child: Child,
    pub notes: Notifications,
    pub log: PathBuf,
}

impl NotifyingDaemon {
    /// Starts `longshore daemon` on `node` with a NOTIFY_SOCKET and, when given,
    /// WATCHDOG_USEC.
    pub fn start(node: &Node, watchdog_usec: Option<u64>) -> NotifyingDaemon {
        let path = node.scratch("notify.sock");
        let notes = Notifications::bind(&path);
        let log = node.scratch("daemon.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_longshore"));
        cmd.arg("--sysroot")
            .arg(&node.sysroot)
            .arg("daemon")
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .env("NOTIFY_SOCKET", &path)
            .env("LONGSHORE_LOG", "longshore=debug")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        if let Some(usec) = watchdog_usec {
            cmd.env("WATCHDOG_USEC", usec.to_string());
        }
        let child = cmd.spawn().expect("starting the daemon");
        NotifyingDaemon { child, notes, log }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }
}

impl Drop for NotifyingDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
            let _ = self.child.wait();
        }
    }
}
