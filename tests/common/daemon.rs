//! `longshore daemon` for the length of a test, with its log at debug level.
#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::node::Node;

pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `node` and waits until it is ready.
    pub fn start(node: &Node) -> Daemon {
        Daemon::start_in(node, None)
    }

    /// Starts the daemon on `node` in network namespace `netns` (by `ip netns exec`,
    /// which execs it: the child is the daemon itself).
    pub fn start_in(node: &Node, netns: Option<&str>) -> Daemon {
        let log = node.scratch("daemon.log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_longshore")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_longshore")),
        };
        let child = cmd
            .arg("--sysroot")
            .arg(&node.sysroot)
            .arg("daemon")
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .env("LONGSHORE_LOG", "longshore=debug")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting the daemon");
        let d = Daemon { child, log };
        d.wait_for("ready: following", 30);
        d
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle`.
    pub fn wait_for(&self, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "waited for {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Daemon {
    /// Kills it with SIGKILL, as a power cut or the OOM killer would, and waits.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}
