//! A real systemd user manager on a private D-Bus session bus, and a stand-in
//! `crio.service` whose process records each SIGHUP it gets (the reload CRI-O's unit
//! does), as ../shared/TESTING.md describes.
#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct UserManager {
    pub dir: tempfile::TempDir,
    pub runtime_dir: PathBuf,
    pub config_home: PathBuf,
    pub bus_address: String,
    dbus_pid: i32,
    systemd: Child,
    /// Held for the manager's life: see [`SERIAL`].
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// One user manager at a time. Managers of the same user share that user's cgroup, so
/// one that stops takes the services of another with it, and their unit signals get
/// lost; the tests that need one therefore take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How the stand-in CRI-O answers a reload.
#[derive(Clone, PartialEq, Eq)]
pub enum Reload {
    /// `kill -HUP $MAINPID`, as CRI-O's unit does.
    Hup,
    /// As `Hup`, after appending the file's content to the snapshot log, so a test sees
    /// what CRI-O would have read at each reload.
    HupAndSnapshot(PathBuf),
    /// A reload command that fails, so the job ends `failed`.
    Fails,
}

/// Starts a private session bus listening on `address`; returns its pid.
pub fn start_bus(address: &str) -> i32 {
    let out = Command::new("dbus-daemon")
        .args(["--session", "--fork", "--print-pid", "--address", address])
        .output()
        .expect("starting dbus-daemon");
    assert!(
        out.status.success(),
        "dbus-daemon: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("dbus pid")
}

impl UserManager {
    pub fn start() -> UserManager {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::Builder::new()
            .prefix("longshore-usermgr")
            .tempdir()
            .unwrap();
        let runtime_dir = dir.path().join("run");
        let config_home = dir.path().join("config");
        fs::create_dir_all(&runtime_dir).unwrap();
        fs::create_dir_all(config_home.join("systemd/user")).unwrap();
        let mut perms = fs::metadata(&runtime_dir).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o700);
        fs::set_permissions(&runtime_dir, perms).unwrap();
        let bus_address = format!("unix:path={}/bus", runtime_dir.display());
        let dbus_pid = start_bus(&bus_address);
        // systemd --user insists on /run/systemd/system; a private mount namespace with
        // its own /run gives it one without touching the host.
        let systemd = Command::new("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec /lib/systemd/systemd --user",
            ])
            .env("XDG_RUNTIME_DIR", &runtime_dir)
            .env("XDG_CONFIG_HOME", &config_home)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus_address)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting systemd --user");
        let um = UserManager {
            dir,
            runtime_dir,
            config_home,
            bus_address,
            dbus_pid,
            systemd,
            _serial: serial,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !um.systemctl(&["show", "-p", "Version"]).status.success() {
            assert!(Instant::now() < deadline, "systemd --user did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        // systemd --user owns org.freedesktop.systemd1 on the bus once it is up.
        while !Command::new("busctl")
            .args(["--user", "status", "org.freedesktop.systemd1"])
            .envs(um.env())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "systemd --user did not take its bus name"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        um
    }

    /// A node whose longshore reaches this manager's systemd on its session bus and
    /// reloads CRI-O through it.
    pub fn node(&self) -> super::node::Node {
        let mut node = super::node::Node::new();
        node.env.extend(self.env());
        node.write_config("50-bus.toml", "bus = \"session\"\n[crio]\nreload = true\n");
        node
    }

    /// The environment that points a client at this manager's bus.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DBUS_SESSION_BUS_ADDRESS".into(), self.bus_address.clone()),
            (
                "XDG_RUNTIME_DIR".into(),
                self.runtime_dir.display().to_string(),
            ),
        ]
    }

    pub fn systemctl(&self, args: &[&str]) -> Output {
        Command::new("systemctl")
            .arg("--user")
            .args(args)
            .envs(self.env())
            .output()
            .expect("running systemctl")
    }

    /// A manager running the stand-in `crio.service`, and a node on its bus.
    pub fn with_crio() -> (UserManager, super::node::Node) {
        let um = UserManager::start();
        um.install_crio(Reload::Hup);
        um.start_crio();
        let node = um.node();
        (um, node)
    }

    /// Installs a unit file (not started) and reloads the manager.
    pub fn install_unit(&self, name: &str, text: &str) {
        fs::write(self.config_home.join("systemd/user").join(name), text).unwrap();
        let out = self.systemctl(&["daemon-reload"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Installs the stand-in `crio.service` (not started).
    pub fn install_crio(&self, reload: Reload) {
        let log = self.hup_log();
        let reload_line = match reload {
            Reload::Hup => "/bin/kill -s HUP $MAINPID".to_string(),
            Reload::HupAndSnapshot(file) => format!(
                "/bin/sh -c 'cat {f} >> {snap}; echo ==== >> {snap}; kill -s HUP $MAINPID'",
                f = file.display(),
                snap = self.snapshot_log().display()
            ),
            Reload::Fails => "/bin/false".to_string(),
        };
        fs::write(
            self.config_home.join("systemd/user/crio.service"),
            format!(
                "[Unit]\nDescription=stand-in for CRI-O\n\n[Service]\n\
                 ExecStart=/bin/sh -c 'trap \"echo hup >> {log}\" HUP; while :; do sleep 1 & wait $!; done'\n\
                 ExecReload={reload_line}\n",
                log = log.display()
            ),
        )
        .unwrap();
        let out = self.systemctl(&["daemon-reload"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start_crio(&self) {
        let out = self.systemctl(&["start", "crio.service"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn stop_crio(&self) {
        let out = self.systemctl(&["stop", "crio.service"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn snapshot_log(&self) -> PathBuf {
        self.dir.path().join("crio-snapshots.log")
    }

    /// What the watched file held at each reload, in order.
    pub fn snapshots(&self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        fs::read_to_string(self.snapshot_log())
            .unwrap_or_default()
            .split("====\n")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// What the manager says about the stand-in, for failure messages.
    pub fn journal(&self) -> String {
        let out = self.systemctl(&["status", "--no-pager", "crio.service"]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The stand-in's main PID (changes when it is restarted).
    pub fn crio_pid(&self) -> String {
        let out = self.systemctl(&["show", "-p", "MainPID", "--value", "crio.service"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn hup_log(&self) -> PathBuf {
        self.dir.path().join("crio-hups.log")
    }

    /// Waits (up to 20 s) until the stand-in has received `n` SIGHUPs, then a little
    /// longer to be sure no more arrive; panics with `context` if the count is not `n`.
    pub fn expect_hups(&self, n: usize, context: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.hups() < n && Instant::now() < deadline {}
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(self.hups(), n, "{context}");
    }

    /// How many SIGHUPs the stand-in CRI-O has received.
    pub fn hups(&self) -> usize {
        // The trap runs between sleeps: give a HUP that was just sent a moment to land.
        std::thread::sleep(Duration::from_millis(300));
        fs::read_to_string(self.hup_log()).map_or(0, |s| s.lines().count())
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        let _ = self.systemctl(&["stop", "crio.service"]);
        // Stop what was started by its PID, never by name: SIGTERM lets the manager stop
        // its units; SIGKILL if it does not go.
        let pid = nix::unistd::Pid::from_raw(self.systemd.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.systemd.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.systemd.kill();
        let _ = self.systemd.wait();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.dbus_pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// A D-Bus session bus with no service manager on it.
pub struct BareBus {
    dir: tempfile::TempDir,
    pub address: String,
    pid: i32,
}

impl BareBus {
    pub fn start() -> BareBus {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix:path={}/bus", dir.path().display());
        let pid = start_bus(&address);
        BareBus { dir, address, pid }
    }
}

impl Drop for BareBus {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = &self.dir;
    }
}
