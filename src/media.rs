//! Bundle media: block devices seen through udev, matched against `[media]`, mounted
//! read-only while their bundles are imported.
//!
//! The udev monitor (netlink, subsystem `block`) runs on its own thread, because the
//! udev handles are not `Send`; it first reports the devices already present (a stick
//! inserted before boot, an install ISO), then every event, over a channel. A loop device
//! gaining or losing its backing file and an optical drive gaining or losing a disc both
//! arrive as `change` events, so a device is judged by what it holds now, whatever the
//! action.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::{MntFlags, MsFlags};

use crate::config::MediaSettings;

/// Filesystems a bundle medium may carry.
pub const FILESYSTEMS: [&str; 6] = ["vfat", "exfat", "ext4", "xfs", "iso9660", "udf"];

/// A block device as udev describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// `/dev/sdb1`, `/dev/loop0`, `/dev/sr0`.
    pub devnode: PathBuf,
    /// Its kernel name (`sdb1`).
    pub sysname: String,
    /// udev's action, or `present` for a device found at start.
    pub action: String,
    /// `ID_FS_TYPE`, when udev found a filesystem.
    pub fs_type: Option<String>,
    /// `ID_FS_LABEL`.
    pub label: Option<String>,
    /// Whether the disk says it is removable.
    pub removable: bool,
    /// Whether it carries a partition table (then its partitions are the candidates).
    pub partitioned: bool,
    /// Its size in 512-byte sectors: 0 for a loop device with no file, a drive with no
    /// disc.
    pub sectors: u64,
}

impl BlockDevice {
    /// Whether the device is gone, or holds nothing any more (a loop device detached, a
    /// disc ejected).
    pub fn is_gone(&self) -> bool {
        self.action == "remove" || self.sectors == 0
    }
}

/// What to do with a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Mount this filesystem read-only and import what it carries.
    Mount(String),
    /// A bundle tar written straight onto the device: import the device itself.
    RawTar,
    /// Not bundle media, with why.
    Ignore(String),
}

/// Judges a device against the rules. Reading the first block of an unformatted device
/// is the one side effect (to recognise a raw tar bundle).
pub fn judge(dev: &BlockDevice, rules: &MediaSettings) -> Verdict {
    if dev.is_gone() {
        return Verdict::Ignore("removed".into());
    }
    match &dev.fs_type {
        Some(fs) => {
            let label = dev.label.as_deref().unwrap_or("");
            let by_label = rules.labels.iter().any(|p| glob(p, label));
            let by_removable = rules.removable && dev.removable;
            if !(by_label || by_removable) {
                return Verdict::Ignore(format!("label {label:?} matches no [media] labels"));
            }
            if !FILESYSTEMS.contains(&fs.as_str()) {
                return Verdict::Ignore(format!(
                    "filesystem {fs} is not one bundle media may carry"
                ));
            }
            Verdict::Mount(fs.clone())
        }
        None if dev.partitioned => Verdict::Ignore("partitioned; its partitions are judged".into()),
        None if rules.raw_tar && starts_with_bundle_json(&dev.devnode) => Verdict::RawTar,
        None => Verdict::Ignore("no filesystem and no bundle".into()),
    }
}

/// Whether the device begins with a tar header for `bundle.json`.
fn starts_with_bundle_json(devnode: &Path) -> bool {
    let mut head = [0u8; 512];
    let ok = fs::File::open(devnode)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok();
    ok && &head[257..262] == b"ustar" && {
        let name_end = head[..100].iter().position(|b| *b == 0).unwrap_or(100);
        let name = &head[..name_end];
        name == b"bundle.json" || name == b"./bundle.json"
    }
}

/// Matches `text` against a glob `pattern` of literal characters, `*` (any run) and `?`
/// (any one character).
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn describe(device: &udev::Device, action: &str) -> Option<BlockDevice> {
    let devnode = device.devnode()?.to_path_buf();
    let prop = |k: &str| {
        device
            .property_value(k)
            .map(|v| v.to_string_lossy().into_owned())
            .filter(|v| !v.is_empty())
    };
    // The removable flag lives on the disk, not on its partitions.
    let disk = if device.devtype().is_some_and(|t| t == "partition") {
        device.parent()
    } else {
        Some(device.clone())
    };
    let removable = disk
        .as_ref()
        .and_then(|d| d.attribute_value("removable"))
        .is_some_and(|v| v == "1");
    Some(BlockDevice {
        devnode,
        sysname: device.sysname().to_string_lossy().into_owned(),
        action: action.to_string(),
        // A RAID member or an encrypted volume is not a filesystem to mount.
        fs_type: prop("ID_FS_TYPE")
            .filter(|_| prop("ID_FS_USAGE").is_none_or(|u| u == "filesystem")),
        label: prop("ID_FS_LABEL"),
        removable,
        partitioned: prop("ID_PART_TABLE_TYPE").is_some(),
        sectors: device
            .attribute_value("size")
            .and_then(|v| v.to_str()?.trim().parse().ok())
            .unwrap_or(0),
    })
}

/// Starts the udev monitor thread. It sends each block device present now (action
/// `present`), then each event. Fails when udev cannot be reached.
pub fn spawn_monitor(tx: tokio::sync::mpsc::UnboundedSender<BlockDevice>) -> Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    std::thread::Builder::new()
        .name("udev-monitor".into())
        .spawn(move || {
            let socket = match udev::MonitorBuilder::new()
                .and_then(|b| b.match_subsystem("block"))
                .and_then(|b| b.listen())
            {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e).context("listening to udev")));
                    return;
                }
            };
            // Listen first, then enumerate: a device that appears in between is reported
            // twice rather than missed.
            if let Err(e) = enumerate(&tx) {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            loop {
                let mut fds = [nix::poll::PollFd::new(
                    socket.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::error!("udev monitor: {e}");
                        return;
                    }
                }
                for event in socket.iter() {
                    let action = match event.event_type() {
                        udev::EventType::Add => "add",
                        udev::EventType::Change => "change",
                        udev::EventType::Remove => "remove",
                        _ => continue,
                    };
                    if let Some(dev) = describe(&event.device(), action) {
                        if tx.send(dev).is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .context("starting the udev monitor thread")?;
    ready_rx
        .recv()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the udev monitor thread stopped")))
}

/// Sends every block device present now, with action `present`.
pub fn enumerate(tx: &tokio::sync::mpsc::UnboundedSender<BlockDevice>) -> Result<()> {
    let mut en = udev::Enumerator::new().context("listing block devices")?;
    en.match_subsystem("block")
        .context("listing block devices")?;
    for d in en.scan_devices().context("listing block devices")? {
        if let Some(dev) = describe(&d, "present") {
            if tx.send(dev).is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// What is still on its way to becoming a block device: udev's event queue while it is
/// not empty, and every USB mass-storage interface (`usb-storage` or `uas` bound) with no
/// disk below it yet. The kernel reports a stick's disk a second or more after the stick
/// itself (usb-storage waits `delay_use` before it scans), and at boot the controller's
/// driver may still be loading when the daemon starts.
pub fn still_arriving() -> Vec<String> {
    let mut out = Vec::new();
    // systemd-udevd keeps this file while events are queued; libudev's
    // udev_queue_get_queue_is_empty (systemd src/libudev/libudev-queue.c) asks
    // udev_queue_is_empty (src/shared/udev-util.c), which tests for it.
    if Path::new("/run/udev/queue").exists() {
        out.push("udev's event queue".to_string());
    }
    let scan = |subsystem: &str| -> Vec<udev::Device> {
        udev::Enumerator::new()
            .and_then(|mut en| {
                en.match_subsystem(subsystem)?;
                Ok(en.scan_devices()?.collect())
            })
            .unwrap_or_default()
    };
    let interfaces: Vec<PathBuf> = scan("usb")
        .into_iter()
        .filter(|d| d.devtype().is_some_and(|t| t == "usb_interface"))
        .filter(|d| {
            d.driver()
                .is_some_and(|drv| drv == "usb-storage" || drv == "uas")
        })
        .map(|d| d.syspath().to_path_buf())
        .collect();
    if interfaces.is_empty() {
        return out;
    }
    let disks: Vec<PathBuf> = scan("block")
        .into_iter()
        .map(|d| d.syspath().to_path_buf())
        .collect();
    for i in interfaces {
        if !disks.iter().any(|d| d.starts_with(&i)) {
            out.push(format!(
                "USB storage {}",
                i.file_name().unwrap_or_default().to_string_lossy()
            ));
        }
    }
    out
}

/// A filesystem mounted read-only for as long as it is needed.
#[derive(Debug)]
pub struct Mounted {
    /// The mount point.
    pub point: PathBuf,
    /// The device.
    pub devnode: PathBuf,
}

/// Mounts `dev` read-only, nosuid, nodev, noexec on `base/<sysname>`.
pub fn mount(dev: &BlockDevice, fs_type: &str, base: &Path) -> Result<Mounted> {
    let point = base.join(&dev.sysname);
    fs::create_dir_all(&point).with_context(|| format!("creating {}", point.display()))?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    nix::mount::mount(
        Some(dev.devnode.as_path()),
        &point,
        Some(fs_type),
        flags,
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "mounting {} ({fs_type}) read-only on {}",
            dev.devnode.display(),
            point.display()
        )
    })?;
    tracing::info!(
        "mounted {} ({fs_type}) read-only on {}",
        dev.devnode.display(),
        point.display()
    );
    Ok(Mounted {
        point,
        devnode: dev.devnode.clone(),
    })
}

impl Mounted {
    /// Unmounts; a busy or vanished filesystem is detached instead.
    pub fn unmount(self) {
        let res = nix::mount::umount2(&self.point, MntFlags::empty())
            .or_else(|_| nix::mount::umount2(&self.point, MntFlags::MNT_DETACH));
        match res {
            Ok(()) => tracing::info!("unmounted {}", self.point.display()),
            Err(e) => tracing::warn!("unmounting {}: {e}", self.point.display()),
        }
        let _ = fs::remove_dir(&self.point);
    }
}

/// The devices being worked on, so a device is handled once until it goes away.
#[derive(Debug, Default)]
pub struct Seen(HashMap<PathBuf, Option<String>>);

impl Seen {
    /// Whether `dev` holds something new: a device not handled yet, or one whose
    /// filesystem changed (a new disc, a loop device given a new file).
    pub fn is_new(&mut self, dev: &BlockDevice) -> bool {
        if dev.is_gone() {
            self.0.remove(&dev.devnode);
            return false;
        }
        let key = dev
            .fs_type
            .clone()
            .map(|f| format!("{f}:{}", dev.label.clone().unwrap_or_default()));
        match self.0.insert(dev.devnode.clone(), key.clone()) {
            Some(old) => old != key,
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MediaPolicy;

    fn rules() -> MediaSettings {
        MediaSettings {
            labels: vec!["LONGSHORE*".into(), "upgrade_*".into()],
            removable: false,
            raw_tar: true,
            policy: MediaPolicy::Apply,
        }
    }

    fn dev(fs: Option<&str>, label: Option<&str>) -> BlockDevice {
        BlockDevice {
            devnode: "/dev/null".into(),
            sysname: "sdz1".into(),
            action: "add".into(),
            fs_type: fs.map(str::to_string),
            label: label.map(str::to_string),
            removable: false,
            partitioned: false,
            sectors: 2048,
        }
    }

    #[test]
    fn globs() {
        assert!(glob("LONGSHORE*", "LONGSHORE"));
        assert!(glob("LONGSHORE*", "LONGSHORE_4.16"));
        assert!(glob("upgrade_*", "upgrade_2026"));
        assert!(glob("a?c*", "abcdef"));
        assert!(glob("*", ""));
        assert!(!glob("LONGSHORE*", "longshore"));
        assert!(!glob("LONGSHORE*", "MY_LONGSHORE"));
        assert!(!glob("a?c", "ac"));
    }

    #[test]
    fn verdicts() {
        let r = rules();
        assert_eq!(
            judge(&dev(Some("vfat"), Some("LONGSHORE")), &r),
            Verdict::Mount("vfat".into())
        );
        assert_eq!(
            judge(&dev(Some("iso9660"), Some("upgrade_4")), &r),
            Verdict::Mount("iso9660".into())
        );
        assert!(matches!(
            judge(&dev(Some("vfat"), Some("PHOTOS")), &r),
            Verdict::Ignore(_)
        ));
        assert!(
            matches!(judge(&dev(Some("ntfs"), Some("LONGSHORE")), &r), Verdict::Ignore(m) if m.contains("ntfs"))
        );
        let mut removable = dev(Some("exfat"), Some("PHOTOS"));
        removable.removable = true;
        assert!(matches!(judge(&removable, &r), Verdict::Ignore(_)));
        let mut any = rules();
        any.removable = true;
        assert_eq!(judge(&removable, &any), Verdict::Mount("exfat".into()));
        // /dev/null has no tar header.
        assert!(matches!(judge(&dev(None, None), &r), Verdict::Ignore(_)));
    }

    #[test]
    fn seen_once_until_gone() {
        let mut seen = Seen::default();
        let d = dev(Some("vfat"), Some("LONGSHORE"));
        assert!(seen.is_new(&d));
        assert!(!seen.is_new(&d));
        let mut detached = d.clone();
        detached.action = "change".into();
        detached.fs_type = None;
        detached.sectors = 0;
        assert!(!seen.is_new(&detached));
        assert!(seen.is_new(&d));
    }
}
