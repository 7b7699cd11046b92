//! A node in a qemu VM: Debian 12 with Debian's own kernel, longshore installed with
//! `make install`, systemd as PID 1, real udev and a real system bus. The host plugs USB
//! sticks in and out and changes CDs over QMP, cuts the power, and runs commands in the
//! guest through qemu-guest-agent. See tests/vm/README.md.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::node::{require, run_ok};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Where the guest is built and kept between runs: outside the checkout, since CI works
/// in a fresh clone every time.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("LONGSHORE_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/longshore-test"))
        .join("guest")
}

/// The host tools the VM tests need; without them the tests are skipped with a note.
pub fn available() -> bool {
    require(&[
        "qemu-system-x86_64",
        "qemu-img",
        "debootstrap",
        "mke2fs",
        "make",
        "mkfs.vfat",
        "mcopy",
        "mkfs.exfat",
        "exfatlabel",
        "xorriso",
        "skopeo",
    ])
}

/// Builds the guest (once per process; the script itself does nothing when its stamp
/// matches) and returns its directory.
pub fn guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let dir = cache_dir();
        fs::create_dir_all(&dir).expect("guest cache dir");
        // Several test binaries may build at once: flock(1) on the cache directory.
        let out = Command::new("flock")
            .arg(&dir)
            .arg(Path::new(ROOT).join("tests/vm/build-guest.sh"))
            .arg(&dir)
            .output()
            .expect("running build-guest.sh");
        assert!(
            out.status.success(),
            "build-guest.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// A node's root disk: the guest with longshore installed into it.
pub struct NodeImage {
    /// The raw ext4 image, the guest's /dev/vda (never written: each VM has an overlay).
    pub path: PathBuf,
}

/// The stand-in for CRI-O: it counts the reloads it gets in /run/crio-hups and notes when
/// it started in /run/crio-started.
const CRIO_UNIT: &str = "[Unit]
Description=stand-in for CRI-O (counts reloads)

[Service]
ExecStart=/bin/sh -c 'trap \"echo hup >> /run/crio-hups\" HUP; touch /run/crio-hups; cat /proc/uptime > /run/crio-started; while :; do sleep 1 & wait $$!; done'
ExecReload=/bin/sh -c 'kill -HUP $MAINPID'

[Install]
WantedBy=multi-user.target
";

/// longshore's copies go through this wrapper, which logs each one (`start DEST`, `done
/// DEST`) in /run/longshore/copies.log and first sleeps as many seconds as
/// /etc/longshore-test/copy-delay says (none when absent), so a test can act while an
/// import is under way.
const SLOW_SKOPEO: &str = r#"#!/bin/bash
log=/run/longshore/copies.log
for a in "$@"; do
  if [ "$a" = copy ]; then
    dest="${@: -1}"
    echo "start $dest" >> $log
    sleep "$(cat /etc/longshore-test/copy-delay 2>/dev/null || echo 0)"
    skopeo "$@" &
    child=$!
    trap 'kill -TERM $child 2>/dev/null; wait $child; exit 143' TERM
    wait $child || exit $?
    echo "done $dest" >> $log
    exit 0
  fi
done
exec skopeo "$@"
"#;

impl NodeImage {
    /// The node image of this test run, made once: a copy of the guest's tree, longshore
    /// installed into it as a package would (`make install DESTDIR=`), its unit and the
    /// stand-in CRI-O enabled, then `mke2fs -d`.
    pub fn get() -> &'static NodeImage {
        static IMAGE: OnceLock<NodeImage> = OnceLock::new();
        IMAGE.get_or_init(|| {
            let guest = guest();
            let dir = Path::new(ROOT).join("target/vm");
            fs::create_dir_all(&dir).unwrap();
            remove_stale(&dir);
            let root = dir.join(format!("root-{}", std::process::id()));
            let _ = Command::new("rm").arg("-rf").arg(&root).status();
            run_ok(
                Command::new("cp")
                    .args(["-a", "--reflink=auto"])
                    .arg(guest.join("rootfs"))
                    .arg(&root),
            );
            run_ok(
                Command::new("make")
                    .current_dir(ROOT)
                    .args([
                        "install",
                        "CARGO_PROFILE=dev",
                        "TARGET_DIR=target/packaging",
                    ])
                    .arg(format!("DESTDIR={}", root.display())),
            );
            let write = |rel: &str, text: &str, mode: u32| {
                let p = root.join(rel);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, text).unwrap();
                fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .unwrap();
            };
            write("etc/systemd/system/crio.service", CRIO_UNIT, 0o644);
            write("usr/local/bin/slow-skopeo", SLOW_SKOPEO, 0o755);
            write(
                "etc/longshore/config.d/50-test.toml",
                "[skopeo]\ncommand = \"/usr/local/bin/slow-skopeo\"\n",
                0o644,
            );
            // The host's share, for test files in and out.
            let fstab = fs::read_to_string(root.join("etc/fstab")).unwrap();
            write(
                "etc/fstab",
                &format!(
                    "{fstab}host0 /mnt/host 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0\n"
                ),
                0o644,
            );
            for unit in ["longshore.service", "crio.service"] {
                super::node::enable_unit(&root, unit);
            }
            let path = dir.join(format!("node-{}.img", std::process::id()));
            run_ok(
                Command::new("mke2fs")
                    .args(["-q", "-F", "-t", "ext4", "-L", "node", "-m", "0"])
                    .args(["-E", "lazy_itable_init=0,lazy_journal_init=0", "-d"])
                    .arg(&root)
                    .arg(&path)
                    .arg("3G"),
            );
            let _ = Command::new("rm").arg("-rf").arg(&root).status();
            NodeImage { path }
        })
    }
}

/// Removes what earlier test runs left in `dir` (node images, trees, VM run
/// directories, each named `<what>-<pid>`) when the process that made it is gone.
fn remove_stale(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .trim_end_matches(".img")
            .rsplit_once('-')
            .and_then(|(_, p)| p.parse::<i32>().ok());
        let Some(pid) = pid else { continue };
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
            let _ = Command::new("rm").arg("-rf").arg(e.path()).status();
        }
    }
}

/// A USB stick: an image file plugged into the VM's xHCI controller.
#[derive(Clone, Debug)]
pub struct Stick {
    /// qemu's device id (the block node is `node-<id>`).
    pub id: String,
    /// The image file.
    pub file: PathBuf,
    /// The USB serial number, the guest's ID_SERIAL_SHORT.
    pub serial: String,
    /// Whether the guest may write to it.
    pub writable: bool,
}

impl Stick {
    /// A read-only stick.
    pub fn new(id: &str, file: &Path) -> Stick {
        Stick {
            id: id.into(),
            file: file.into(),
            serial: id.to_uppercase(),
            writable: false,
        }
    }

    /// The same, writable.
    pub fn writable(mut self) -> Stick {
        self.writable = true;
        self
    }

    fn blockdev(&self) -> Value {
        json!({
            "driver": "raw",
            "node-name": format!("node-{}", self.id),
            "read-only": !self.writable,
            "file": {"driver": "file", "filename": self.file, "read-only": !self.writable},
        })
    }

    fn device(&self) -> Value {
        json!({
            "driver": "usb-storage",
            "bus": "xhci.0",
            "drive": format!("node-{}", self.id),
            "id": self.id,
            "removable": true,
            "serial": self.serial,
        })
    }
}

/// A running VM.
pub struct Vm {
    /// Its run directory: overlay disk, sockets, console.log, the share.
    pub run: PathBuf,
    qmp: Option<Qmp>,
    pid: i32,
}

impl Vm {
    /// Boots `image` with the disk overlay in `run` (made when absent, so booting the same
    /// `run` again is a reboot of the same disk) and `sticks` plugged in before power-on.
    /// `run/share` is the guest's /mnt/host.
    pub fn boot(image: &NodeImage, run: &Path, sticks: &[Stick]) -> Vm {
        Vm::boot_with(image, run, sticks, "")
    }

    /// [`Vm::boot`] with more on the kernel command line.
    pub fn boot_with(image: &NodeImage, run: &Path, sticks: &[Stick], cmdline: &str) -> Vm {
        fs::create_dir_all(run.join("share")).unwrap();
        let disk = run.join("disk.qcow2");
        if !disk.exists() {
            run_ok(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                    .arg(&image.path)
                    .arg(&disk),
            );
        }
        let guest = guest();
        let path = |n: &str| run.join(n).display().to_string();
        assert!(
            path("qmp.sock").len() < 100,
            "socket path too long: {}",
            path("qmp.sock")
        );
        for s in ["qmp.sock", "qga.sock", "qemu.pid"] {
            let _ = fs::remove_file(run.join(s));
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        // One vCPU: two VMs run at once on a machine of two cores, and a guest whose
        // second vCPU thread is starved can stall in early boot (seen once at PCI
        // enumeration); the guest's work here is small.
        cmd.args(["-nodefaults", "-no-user-config", "-m", "2048", "-smp", "1"])
            .args(["-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max,-svm"])
            .arg("-kernel")
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(guest.join("initrd.img"))
            // Sticks are found by udev as the kernel polls; a CD change within a second.
            .arg("-append")
            .arg(format!(
                "root=/dev/vda rw console=ttyS0 panic=5 block.events_dfl_poll_msecs=1000 mitigations=off {cmdline}"
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2,discard=unmap",
                disk.display()
            ))
            .args(["-device", "qemu-xhci,id=xhci"])
            .args(["-device", "virtio-scsi-pci,id=scsi0"])
            .args(["-device", "scsi-cd,bus=scsi0.0,id=cd0"])
            .arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                path("qga.sock")
            ))
            .args(["-device", "virtio-serial-pci,id=vser0"])
            .args([
                "-device",
                "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", path("qmp.sock")))
            .arg("-chardev")
            .arg(format!("file,id=con0,path={},append=on", path("console.log")))
            .args(["-serial", "chardev:con0", "-display", "none", "-nic", "none"])
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=host0,security_model=passthrough,id=host0",
                path("share")
            ))
            .arg("-pidfile")
            .arg(path("qemu.pid"))
            .arg("-daemonize");
        for s in sticks {
            cmd.arg("-blockdev").arg(s.blockdev().to_string());
            let d = s.device();
            cmd.arg("-device").arg(format!(
                "usb-storage,bus=xhci.0,drive={},id={},removable=on,serial={}",
                d["drive"].as_str().unwrap(),
                s.id,
                s.serial
            ));
        }
        run_ok(&mut cmd);
        let pid: i32 = fs::read_to_string(run.join("qemu.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut vm = Vm {
            run: run.into(),
            qmp: None,
            pid,
        };
        vm.qmp = Some(Qmp::connect(&run.join("qmp.sock")));
        vm.wait_for_agent(Duration::from_secs(400));
        vm
    }

    /// A VM left running by an earlier test (`LONGSHORE_VM_KEEP=1`), for a look inside;
    /// it is left running again.
    pub fn reattach(run: &Path) -> Vm {
        Vm {
            run: run.into(),
            qmp: None,
            pid: 0,
        }
    }

    fn wait_for_agent(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            if Agent::connect(&self.run.join("qga.sock"), Duration::from_secs(5)).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "the guest agent did not answer in {limit:?}\n{}",
                self.console_tail()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The last lines of the serial console, for failure messages.
    pub fn console_tail(&self) -> String {
        let text = fs::read_to_string(self.run.join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The guest's share directory on the host (/mnt/host in the guest).
    pub fn share(&self) -> PathBuf {
        self.run.join("share")
    }

    /// Runs a shell line in the guest (as root, dash), returning its exit code, stdout and
    /// stderr. Killed after `limit`.
    pub fn sh_within(&self, line: &str, limit: Duration) -> (i32, String, String) {
        let mut agent = Agent::connect(&self.run.join("qga.sock"), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("guest agent: {e}\n{}", self.console_tail()));
        let r = agent.call(
            "guest-exec",
            json!({"path": "/bin/sh", "arg": ["-c", line], "capture-output": true}),
        );
        let pid = r["pid"].as_i64().expect("guest-exec pid");
        let start = Instant::now();
        loop {
            let st = agent.call("guest-exec-status", json!({"pid": pid}));
            if st["exited"].as_bool() == Some(true) {
                let text = |k: &str| {
                    String::from_utf8_lossy(&base64_decode(st[k].as_str().unwrap_or("")))
                        .into_owned()
                };
                let code = st["exitcode"]
                    .as_i64()
                    .unwrap_or_else(|| 128 + st["signal"].as_i64().unwrap_or(0));
                return (code as i32, text("out-data"), text("err-data"));
            }
            if start.elapsed() > limit {
                agent.call(
                    "guest-exec",
                    json!({"path": "/bin/kill", "arg": ["-9", pid.to_string()]}),
                );
                panic!("`{line}` ran past {limit:?} in the guest");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a shell line in the guest; see [`Vm::sh_within`].
    pub fn sh(&self, line: &str) -> (i32, String, String) {
        self.sh_within(line, Duration::from_secs(120))
    }

    /// Runs a shell line that must succeed; returns its stdout.
    pub fn ok(&self, line: &str) -> String {
        let (code, out, err) = self.sh(line);
        assert_eq!(code, 0, "`{line}` in the guest failed:\n{out}\n{err}");
        out
    }

    /// Runs `line` until it succeeds, at most `secs` seconds; returns its stdout.
    pub fn wait_until(&self, line: &str, secs: u64) -> String {
        let start = Instant::now();
        loop {
            let (code, out, err) = self.sh(line);
            if code == 0 {
                return out;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "`{line}` did not succeed in {secs} s:\n{out}\n{err}\njournal:\n{}",
                self.sh("journalctl -b -u longshore --no-pager | tail -40")
                    .1
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn qmp(&mut self) -> &mut Qmp {
        self.qmp.as_mut().expect("QMP connection")
    }

    /// Plugs a stick in.
    pub fn plug(&mut self, stick: &Stick) {
        self.qmp().call("blockdev-add", stick.blockdev());
        self.qmp().call("device_add", stick.device());
    }

    /// Pulls a stick out: the device goes at once, as when a technician pulls it.
    pub fn pull(&mut self, stick: &Stick) {
        let qmp = self.qmp();
        qmp.call("device_del", json!({"id": stick.id}));
        // The stick's own event, not that of the disk inside it.
        qmp.wait_event("DEVICE_DELETED", &stick.id, Duration::from_secs(30));
        qmp.call(
            "blockdev-del",
            json!({"node-name": format!("node-{}", stick.id)}),
        );
    }

    /// Puts a disc into the CD drive (a media change on the existing /dev/sr0).
    pub fn cd_insert(&mut self, iso: &Path) {
        self.qmp().call(
            "blockdev-change-medium",
            json!({"id": "cd0", "filename": iso, "format": "raw", "read-only-mode": "read-only"}),
        );
    }

    /// Ejects the disc and closes the empty tray, so the guest sees the change.
    pub fn cd_eject(&mut self) {
        self.qmp()
            .call("eject", json!({"id": "cd0", "force": true}));
        self.qmp().call("blockdev-close-tray", json!({"id": "cd0"}));
    }

    /// Cuts the power: qemu exits at once and the guest gets no say.
    pub fn power_cut(mut self) {
        let _ = self.qmp().send("quit", json!({}));
        self.wait_gone(Duration::from_secs(30));
    }

    fn wait_gone(&mut self, limit: Duration) {
        let start = Instant::now();
        while nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), None).is_ok() {
            if start.elapsed() > limit {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.pid = 0;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A failed test may leave its VM for a look inside (tests/vm/README.md).
        let keep =
            std::thread::panicking() && std::env::var("LONGSHORE_VM_KEEP").is_ok_and(|v| v == "1");
        if keep {
            eprintln!("VM left running: {}", self.run.display());
        } else if self.pid > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A QMP session: one per VM, held for its life.
struct Qmp {
    out: UnixStream,
    lines: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(sock: &Path) -> Qmp {
        let stream = UnixStream::connect(sock).expect("QMP socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut q = Qmp {
            out: stream.try_clone().unwrap(),
            lines: BufReader::new(stream),
            events: Vec::new(),
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.call("qmp_capabilities", json!({}));
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.lines.read_line(&mut line).expect("reading QMP");
        assert!(!line.is_empty(), "QMP closed");
        serde_json::from_str(&line).expect("QMP JSON")
    }

    fn send(&mut self, cmd: &str, args: Value) -> std::io::Result<()> {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.out, "{msg}")
    }

    fn call(&mut self, cmd: &str, args: Value) -> Value {
        self.send(cmd, args.clone()).expect("writing QMP");
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(r) = v.get("return") {
                return r.clone();
            } else {
                panic!("QMP {cmd} {args}: {v}");
            }
        }
    }

    fn wait_event(&mut self, name: &str, device: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["event"] == name && e["data"]["device"] == device)
            {
                return self.events.remove(i);
            }
            assert!(start.elapsed() < limit, "no QMP event {name} in {limit:?}");
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}

/// A qemu-guest-agent session. The agent serves one client at a time and may hold
/// replies from an earlier client: every session begins with a delimited sync.
struct Agent {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Agent {
    fn connect(sock: &Path, wait: Duration) -> std::io::Result<Agent> {
        let stream = UnixStream::connect(sock)?;
        stream.set_read_timeout(Some(wait))?;
        let mut a = Agent {
            out: stream.try_clone()?,
            input: BufReader::new(stream),
        };
        let id: u32 = std::process::id() ^ (Instant::now().elapsed().subsec_nanos() | 1);
        a.out.write_all(&[0xff])?;
        writeln!(
            a.out,
            "{}",
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
        )?;
        loop {
            // Skip to the 0xff the agent puts before its answer, then read the answer.
            let mut b = [0u8; 1];
            loop {
                a.input.read_exact(&mut b)?;
                if b[0] == 0xff {
                    break;
                }
            }
            let mut line = String::new();
            a.input.read_line(&mut line)?;
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["return"] == id {
                    break;
                }
            }
        }
        a.input
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(a)
    }

    fn call(&mut self, cmd: &str, args: Value) -> Value {
        writeln!(self.out, "{}", json!({"execute": cmd, "arguments": args})).expect("agent");
        let mut line = String::new();
        self.input.read_line(&mut line).expect("agent reply");
        let v: Value = serde_json::from_str(&line).expect("agent JSON");
        match v.get("return") {
            Some(r) => r.clone(),
            None => panic!("agent {cmd}: {v}"),
        }
    }
}

/// Standard base64, as the agent sends command output.
pub fn base64_decode(text: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in text.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
