//! Hosts of a test's own: network namespaces joined by veth links to a bridge in a
//! namespace of its own, with no link to the machine's network.
#![allow(dead_code)]

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A network namespace, deleted when dropped.
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        // A namespace left by a killed run of the same name goes first.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Netns {
            name: name.to_string(),
        }
    }

    /// `ip netns exec NAME PROGRAM`: PROGRAM runs in the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread that entered the namespace (only that thread does).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.name, f)
    }

    /// Caps what leaves the namespace's `eth0` at `mbit` (a token bucket).
    pub fn shape(&self, mbit: u32) {
        ip_tc(&self.name, &format!("{mbit}mbit"));
    }
}

/// Runs `f` on a thread that entered namespace `name` (only that thread does).
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(format!("/var/run/netns/{name}"))
                .expect("opening the namespace");
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("entering the namespace");
            f()
        })
        .join()
        .expect("the thread in the namespace")
    })
}

fn ip_tc(ns: &str, rate: &str) {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root",
        ])
        .args(["tbf", "rate", rate, "burst", "64kb", "latency", "50ms"])
        .output()
        .expect("running tc");
    assert!(
        out.status.success(),
        "tc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Hosts on one LAN: `hosts[i]` has address `10.231.9.(i+1)`, on `eth0`.
pub struct Lan {
    pub hosts: Vec<(Netns, IpAddr)>,
    /// The namespace holding the bridge; dropped last.
    pub switch: Netns,
}

impl Lan {
    pub fn new(n: usize) -> Lan {
        let tag = format!(
            "ls{}x{}",
            std::process::id() % 100000,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let switch = Netns::new(&format!("{tag}-sw"));
        ip(&["-n", &switch.name, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch.name, "link", "set", "br0", "up"]);
        let mut hosts = Vec::new();
        for i in 0..n {
            let host = Netns::new(&format!("{tag}-h{i}"));
            let port = format!("p{i}");
            ip(&[
                "-n",
                &switch.name,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host.name,
            ]);
            ip(&[
                "-n",
                &switch.name,
                "link",
                "set",
                &port,
                "master",
                "br0",
                "up",
            ]);
            let addr: IpAddr = format!("10.231.9.{}", i + 1).parse().unwrap();
            ip(&[
                "-n",
                &host.name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &host.name, "link", "set", "eth0", "up"]);
            hosts.push((host, addr));
        }
        Lan { hosts, switch }
    }
}
