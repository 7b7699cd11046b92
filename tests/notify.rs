//! The daemon's sd_notify messages, read from a NOTIFY_SOCKET the test provides:
//! READY=1 with a status line, STATUS= while it imports, WATCHDOG=1 when asked, and
//! STOPPING=1 on SIGTERM.

mod common;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixture;
use common::node::require;
use common::usermgr::{Reload, UserManager};

struct Notifications {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Notifications {
    /// Waits until a message satisfies `want`; returns it.
    fn wait_for(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
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
}

#[test]
fn ready_status_watchdog_and_stopping() {
    if !require(&["skopeo", "dbus-daemon", "systemctl", "unshare", "busctl"]) {
        return;
    }
    let um = UserManager::start();
    um.install_crio(Reload::Hup);
    um.start_crio();
    let node = um.node();
    let layout = fixture::write_oci_layout(
        &node.scratch("layout"),
        &fixture::small_images("example.com/notify", 2),
    )
    .unwrap();
    let bundle = node.scratch("b");
    node.bundle_create(&layout, &bundle, &["--name", "notify", "--set", "edge"]);
    node.ok(&["import", bundle.to_str().unwrap()]);

    let path = node.scratch("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut n = Notifications {
        socket,
        seen: vec![],
    };
    let log = node.scratch("daemon.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_longshore"))
        .arg("--sysroot")
        .arg(&node.sysroot)
        .arg("daemon")
        .envs(node.env.iter().map(|(k, v)| (k, v)))
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();

    let ready = n.wait_for("READY=1", |m| m.lines().any(|l| l == "READY=1"));
    assert!(
        ready.contains("STATUS=Idle: 1 of 1 image sets ready"),
        "{ready}"
    );
    n.wait_for("WATCHDOG=1", |m| m.lines().any(|l| l == "WATCHDOG=1"));

    // A set file naming an image the store lacks: the status says the set is degraded.
    let sets_d = node.sysroot.join("etc/longshore/sets.d");
    fs::create_dir_all(&sets_d).unwrap();
    fs::write(
        sets_d.join("later.toml"),
        format!(
            "images = [\"example.com/absent@sha256:{}\"]\n",
            "4".repeat(64)
        ),
    )
    .unwrap();
    let degraded = n.wait_for("a degraded status", |m| {
        m.contains("STATUS=Idle: 1 of 2 image sets ready; degraded: later")
    });
    assert!(
        degraded.contains("1 of 1 images are not in the store") || degraded.contains("missing"),
        "{degraded}"
    );

    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    n.wait_for("STOPPING=1", |m| m.lines().any(|l| l == "STOPPING=1"));
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let log = fs::read_to_string(&log).unwrap();
    assert!(log.contains("image set later is degraded"), "{log}");
    // The fixed MESSAGE_ID of docs/journal.md travels with it (a field in the journal).
    assert!(log.contains("328f2117836047cca39fa15ca07e43e1"), "{log}");
}
