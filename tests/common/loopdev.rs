//! Block devices for media tests: image files with a filesystem (or a raw tar) attached
//! to loop devices, seen by a real systemd-udevd.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Starts systemd-udevd if it is not answering (TESTING.md: `--daemon`), and waits until
/// it does. A socket left by a udevd that was killed is no sign of a running one, so
/// udevd is asked (`udevadm control --ping`). Tests in one binary run on several
/// threads, and two udevds started at once fight over the control socket, so callers
/// take turns.
pub fn ensure_udevd() {
    static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    let ping = || {
        Command::new("udevadm")
            .args(["control", "--ping", "--timeout=2"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ping() {
        let _ = std::fs::remove_file("/run/udev/control");
        let st = Command::new("/lib/systemd/systemd-udevd")
            .arg("--daemon")
            .status()
            .expect("starting systemd-udevd");
        // A udevd started by another test binary or the demo may have won the socket
        // meanwhile; the ping below is what decides.
        if !st.success() {
            eprintln!("systemd-udevd --daemon: {st}; waiting for the one that runs");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ping() {
        assert!(Instant::now() < deadline, "systemd-udevd does not answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    settle();
}

pub fn settle() {
    let _ = Command::new("udevadm")
        .args(["settle", "--timeout=30"])
        .status();
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("running a media tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loop device, detached when dropped.
pub struct Loop {
    pub dev: PathBuf,
    pub image: PathBuf,
}

impl Loop {
    /// Attaches `image`.
    pub fn attach(image: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Loop {
            dev,
            image: image.to_path_buf(),
        }
    }

    /// Has udev report `action` for the device (`remove`, `add`), as the kernel does when
    /// a stick is pulled or plugged in. The kernel here keeps a mounted loop device
    /// attached until it is unmounted, so a test cannot pull it for real while it is
    /// read; the event the daemon sees is the same.
    pub fn uevent(&self, action: &str) {
        run(Command::new("udevadm")
            .args(["trigger", "--settle", "--action", action])
            .arg(&self.dev));
    }

    pub fn detach(&mut self) {
        if !self.dev.as_os_str().is_empty() {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
            self.dev = PathBuf::new();
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.detach();
    }
}

/// A FAT image labelled `label` holding `content` (a file or directory) at its root.
pub fn vfat_image(path: &Path, label: &str, content: &Path, size_mb: u64) {
    run(Command::new("truncate")
        .arg("-s")
        .arg(format!("{size_mb}M"))
        .arg(path));
    run(Command::new("mkfs.vfat").args(["-n", label]).arg(path));
    run(Command::new("mcopy")
        .args(["-s", "-i"])
        .arg(path)
        .arg(content)
        .arg("::/"));
}

/// An ext4 image labelled `label` holding `content` (built with mkfs.ext4 -d).
pub fn ext4_image(path: &Path, label: &str, content_dir: &Path, size_mb: u64) {
    run(Command::new("truncate")
        .arg("-s")
        .arg(format!("{size_mb}M"))
        .arg(path));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-L", label, "-d"])
        .arg(content_dir)
        .arg(path));
}

/// An XFS image labelled `label` holding `content_dir`. mkfs.xfs cannot fill a
/// filesystem, so the image is mounted here for a moment to copy the content in.
pub fn xfs_image(path: &Path, label: &str, content_dir: &Path, size_mb: u64) {
    run(Command::new("truncate")
        .arg("-s")
        .arg(format!("{size_mb}M"))
        .arg(path));
    run(Command::new("mkfs.xfs").args(["-q", "-L", label]).arg(path));
    let mnt = path.with_extension("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(path)
        .arg(&mnt));
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", content_dir.display()))
        .arg(&mnt)
        .status();
    run(Command::new("umount").arg(&mnt));
    assert!(
        copied.is_ok_and(|s| s.success()),
        "copying into the XFS image"
    );
    let _ = std::fs::remove_dir(&mnt);
}

/// An ISO 9660 image with volume id `label` holding `content_dir` (Rock Ridge names).
pub fn iso_image(path: &Path, label: &str, content_dir: &Path) {
    run(Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-R", "-V", label, "-o"])
        .arg(path)
        .arg(content_dir));
}
