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
}

/// How the stand-in CRI-O answers a reload.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// `kill -HUP $MAINPID`, as CRI-O's unit does.
    Hup,
    /// A reload command that fails, so the job ends `failed`.
    Fails,
}

impl UserManager {
    pub fn start() -> UserManager {
        let dir = tempfile::Builder::new().prefix("longshore-usermgr").tempdir().unwrap();
        let runtime_dir = dir.path().join("run");
        let config_home = dir.path().join("config");
        fs::create_dir_all(&runtime_dir).unwrap();
        fs::create_dir_all(config_home.join("systemd/user")).unwrap();
        let mut perms = fs::metadata(&runtime_dir).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o700);
        fs::set_permissions(&runtime_dir, perms).unwrap();
        let bus_address = format!("unix:path={}/bus", runtime_dir.display());
        let out = Command::new("dbus-daemon")
            .args(["--session", "--fork", "--print-pid", "--address"])
            .arg(&bus_address)
            .output()
            .expect("starting dbus-daemon");
        assert!(out.status.success(), "dbus-daemon: {}", String::from_utf8_lossy(&out.stderr));
        let dbus_pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("dbus pid");
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
        let um = UserManager { dir, runtime_dir, config_home, bus_address, dbus_pid, systemd };
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
            assert!(Instant::now() < deadline, "systemd --user did not take its bus name");
            std::thread::sleep(Duration::from_millis(100));
        }
        um
    }

    /// The environment that points a client at this manager's bus.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DBUS_SESSION_BUS_ADDRESS".into(), self.bus_address.clone()),
            ("XDG_RUNTIME_DIR".into(), self.runtime_dir.display().to_string()),
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

    /// Installs the stand-in `crio.service` (not started).
    pub fn install_crio(&self, reload: Reload) {
        let log = self.hup_log();
        let reload_line = match reload {
            Reload::Hup => "/bin/kill -s HUP $MAINPID".to_string(),
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
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn start_crio(&self) {
        let out = self.systemctl(&["start", "crio.service"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn stop_crio(&self) {
        let out = self.systemctl(&["stop", "crio.service"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    fn hup_log(&self) -> PathBuf {
        self.dir.path().join("crio-hups.log")
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
