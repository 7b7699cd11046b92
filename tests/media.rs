//! Bundle media with a real systemd-udevd and loop devices: the daemon notices them,
//! mounts read-only, imports, pins and unmounts; other media are left alone.

mod common;

use std::fs;

use common::daemon::Daemon;
use common::fixture::{self, Layout};
use common::loopdev::{ensure_udevd, ext4_image, iso_image, vfat_image, Loop};
use common::node::{require, Node};
use common::notify::NotifyingDaemon;
use common::usermgr::UserManager;

const TOOLS: &[&str] = &[
    "skopeo",
    "dbus-daemon",
    "systemctl",
    "unshare",
    "busctl",
    "losetup",
    "udevadm",
    "mkfs.vfat",
    "mcopy",
    "mkfs.ext4",
    "xorriso",
];

fn setup() -> Option<(UserManager, Node)> {
    if !require(TOOLS) {
        return None;
    }
    ensure_udevd();
    let (um, node) = UserManager::with_crio();
    Some((um, node))
}

fn layout(node: &Node, prefix: &str) -> Layout {
    fixture::write_oci_layout(&node.scratch("layout"), &fixture::small_images(prefix, 2)).unwrap()
}

fn assert_in_store_and_pinned(node: &Node, layout: &Layout) {
    let pins = fs::read_to_string(
        node.sysroot
            .join("etc/crio/crio.conf.d/99-longshore-pinned-images.conf"),
    )
    .unwrap();
    for img in &layout.images {
        assert_eq!(
            node.inspect_digest(&img.reference).as_deref(),
            Some(img.manifest_digest.as_str())
        );
        assert!(
            pins.contains(&img.reference),
            "{} not pinned:\n{pins}",
            img.reference
        );
    }
}

fn media_mounts(node: &Node) -> Vec<String> {
    let base = node
        .sysroot
        .join("run/longshore/media")
        .display()
        .to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&base))
        .map(str::to_string)
        .collect()
}

/// Whether the running kernel can mount `fs` (some VMs' kernels carry ext4 alone).
fn kernel_has(fs: &str) -> bool {
    fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fs))
}

#[test]
fn an_ext4_stick_labelled_longshore_is_imported_pinned_and_unmounted() {
    let Some((um, node)) = setup() else { return };
    let layout = layout(&node, "example.com/stick");
    let content = node.scratch("content");
    fs::create_dir_all(&content).unwrap();
    node.bundle_create(&layout, &content.join("site-1.0"), &["--name", "site"]);
    let image = node.scratch("stick.img");
    ext4_image(&image, "LONGSHORE", &content, 64);
    let daemon = Daemon::start(&node);
    let stick = Loop::attach(&image);
    daemon.wait_for("bundle site (", 60);
    daemon.wait_for("unmounted", 30);
    assert_in_store_and_pinned(&node, &layout);
    assert!(media_mounts(&node).is_empty(), "{:?}", media_mounts(&node));
    assert!(
        daemon.log().contains(&format!(
            "{} (ext4, label \"LONGSHORE\")",
            stick.dev.display()
        )),
        "{}",
        daemon.log()
    );
    um.expect_hups(1, "one reload for the stick's pins");
    drop(stick);
}

#[test]
fn an_ext4_stick_with_a_zstd_bundle_is_imported() {
    let Some((_um, node)) = setup() else { return };
    let layout = layout(&node, "example.com/ext4");
    let content = node.scratch("content");
    fs::create_dir_all(&content).unwrap();
    node.bundle_create(&layout, &content.join("apps.tar.zst"), &["--name", "apps"]);
    let image = node.scratch("ext4.img");
    ext4_image(&image, "LONGSHORE_X", &content, 64);
    let daemon = Daemon::start(&node);
    let stick = Loop::attach(&image);
    daemon.wait_for("bundle apps (", 60);
    daemon.wait_for("unmounted", 30);
    assert_in_store_and_pinned(&node, &layout);
    drop(stick);
}

/// vfat sticks and ISO images are recognised from udev's view of them; where the kernel
/// can mount them they are imported, and where it cannot the mount error says so.
#[test]
fn vfat_and_iso_media_are_recognised() {
    let Some((_um, node)) = setup() else { return };
    node.write_config(
        "60-media.toml",
        "[media]\nlabels = [\"LONGSHORE*\", \"upgrade_*\"]\n",
    );
    let layout = layout(&node, "example.com/fat");
    let content = node.scratch("content");
    fs::create_dir_all(&content).unwrap();
    node.bundle_create(&layout, &content.join("release"), &["--name", "release"]);
    let fat = node.scratch("fat.img");
    vfat_image(&fat, "LONGSHORE", &content.join("release"), 64);
    let iso = node.scratch("release.iso");
    iso_image(&iso, "upgrade_4_16", &content);
    let daemon = Daemon::start(&node);
    for (image, fs_type, label) in [
        (&fat, "vfat", "LONGSHORE"),
        (&iso, "iso9660", "upgrade_4_16"),
    ] {
        let dev = Loop::attach(image);
        let seen = format!(
            "bundle media: {} ({fs_type}, label \"{label}\")",
            dev.dev.display()
        );
        daemon.wait_for(&seen, 60);
        if kernel_has(fs_type) {
            daemon.wait_for("unmounted", 60);
            assert_in_store_and_pinned(&node, &layout);
        } else {
            daemon.wait_for(
                &format!("mounting {} ({fs_type}) read-only", dev.dev.display()),
                30,
            );
            eprintln!("this kernel cannot mount {fs_type}; recognised, mount refused as expected");
        }
    }
}

#[test]
fn a_raw_tar_on_a_device_is_imported_and_another_label_is_left_alone() {
    let Some((_um, node)) = setup() else { return };
    let layout = layout(&node, "example.com/raw");
    let tar = node.scratch("raw.tar");
    node.bundle_create(&layout, &tar, &["--name", "raw"]);
    // A device image: the tar written from its first byte, padded as dd onto a stick.
    let image = node.scratch("raw.img");
    fs::copy(&tar, &image).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&image).unwrap();
    f.set_len(32 << 20).unwrap();
    drop(f);

    let other_content = node.scratch("photos");
    fs::create_dir_all(&other_content).unwrap();
    let other_layout = fixture::write_oci_layout(
        &node.scratch("other-layout"),
        &fixture::small_images("example.com/photos", 1),
    )
    .unwrap();
    node.bundle_create(
        &other_layout,
        &other_content.join("b"),
        &["--name", "photos"],
    );
    let other = node.scratch("photos.img");
    ext4_image(&other, "PHOTOS", &other_content, 64);

    let daemon = Daemon::start(&node);
    let other_dev = Loop::attach(&other);
    let raw_dev = Loop::attach(&image);
    daemon.wait_for("bundle raw (", 60);
    assert!(
        daemon.log().contains(&format!(
            "{} (no filesystem, label \"\") holds a bundle written raw",
            raw_dev.dev.display()
        )),
        "{}",
        daemon.log()
    );
    assert_in_store_and_pinned(&node, &layout);
    // udev may report the two devices in either order; the other one is judged too.
    daemon.wait_for(
        &format!(
            "not bundle media: {} (ext4, label \"PHOTOS\")",
            other_dev.dev.display()
        ),
        30,
    );
    assert!(node
        .inspect_digest(&other_layout.images[0].reference)
        .is_none());
    assert!(media_mounts(&node).is_empty());
}

/// The copies a slowed skopeo finished, by destination, from its log.
fn copies_done(log: &std::path::Path) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("done "))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_stick_pulled_mid_import_pins_nothing_and_resumes_when_it_is_back() {
    let Some((_um, node)) = setup() else { return };
    node.write_config(
        "60-media.toml",
        "[media]\nlabels = [\"LSRESUME\"]\n[import]\njobs = 1\n",
    );
    let copies = node.slow_copies(0.4);
    let layout = fixture::write_oci_layout(
        &node.scratch("layout"),
        &fixture::small_images("example.com/resume", 4),
    )
    .unwrap();
    let content = node.scratch("content");
    fs::create_dir_all(&content).unwrap();
    node.bundle_create(
        &layout,
        &content.join("resume-1"),
        &["--name", "resume", "--set", "line-3"],
    );
    let image = node.scratch("resume.img");
    ext4_image(&image, "LSRESUME", &content, 64);
    let daemon = Daemon::start(&node);
    let stick = Loop::attach(&image);

    // One image in (its digest name and its tag), then the stick goes.
    daemon.wait_for("Importing bundle resume: 1/4 images", 60);
    stick.uevent("remove");
    daemon.wait_for("went away during the import", 30);
    daemon.wait_for("abandoned:", 30);
    daemon.wait_for("unmounted", 30);
    assert!(media_mounts(&node).is_empty(), "{:?}", media_mounts(&node));
    let first = copies_done(&copies);
    assert!(
        (2..8).contains(&first.len()),
        "the import should stop part-way: {first:?}"
    );
    // Nothing of the incomplete set is pinned; the set says what it waits for.
    let pins = node
        .sysroot
        .join("etc/crio/crio.conf.d/99-longshore-pinned-images.conf");
    let pinned = fs::read_to_string(&pins).unwrap_or_default();
    assert!(!pinned.contains("example.com/resume"), "{pinned}");
    let status = node.status();
    let set = status["sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "line-3")
        .expect("the set is known");
    assert!(!set["missing"].as_array().unwrap().is_empty(), "{set}");
    let bundle = &status["bundles"][0];
    assert_eq!(bundle["state"], "importing", "{bundle}");

    // The stick comes back: only what was not copied is copied.
    stick.uevent("add");
    daemon.wait_for("bundle resume imported", 60);
    daemon.wait_for("unmounted /", 30);
    let all = copies_done(&copies);
    let second = &all[first.len()..];
    for done in &first {
        assert!(!second.contains(done), "{done} copied twice: {all:?}");
    }
    // Each image by digest and by tag, at most once each; a copy stopped just as it
    // committed may have left its name without its "done" line.
    assert!(all.len() <= 8 && all.len() >= 7, "{all:?}");
    let log = daemon.log();
    // A destination is `containers-storage:[…]NAME`; a digest name carries `@`.
    let by_digest = |d: &&String| d.rsplit(']').next().is_some_and(|n| n.contains('@'));
    let copied = 4 - first.iter().filter(by_digest).count();
    assert!(
        log.contains(&format!(
            "bundle resume imported: {copied} images copied, {} already present",
            4 - copied
        )),
        "{log}"
    );
    assert_in_store_and_pinned(&node, &layout);
    assert!(media_mounts(&node).is_empty());
}

#[test]
fn critical_sets_on_media_present_at_start_are_in_before_ready() {
    let Some((_um, node)) = setup() else { return };
    node.write_config(
        "60-media.toml",
        "[media]\nlabels = [\"LSBOOT\"]\n[import]\njobs = 1\n",
    );
    let copies = node.slow_copies(0.3);
    let base = fixture::write_oci_layout(
        &node.scratch("base-layout"),
        &fixture::small_images("example.com/base", 2),
    )
    .unwrap();
    let apps = fixture::write_oci_layout(
        &node.scratch("apps-layout"),
        &fixture::small_images("example.com/apps", 2),
    )
    .unwrap();
    // One stick carrying both: the critical bundle comes before READY=1, the other after.
    let content = node.scratch("content");
    fs::create_dir_all(&content).unwrap();
    node.bundle_create(
        &apps,
        &content.join("apps.tar"),
        &["--name", "apps", "--set", "apps"],
    );
    node.bundle_create(
        &base,
        &content.join("base"),
        &["--name", "base", "--set", "base", "--critical"],
    );
    let image = node.scratch("boot.img");
    ext4_image(&image, "LSBOOT", &content, 64);
    let _stick = Loop::attach(&image);
    common::loopdev::settle();

    let mut d = NotifyingDaemon::start(&node, None);
    let ready = d.notes.wait_for_line("READY=1");
    // At READY=1 the critical set is in and pinned; the other has not begun.
    let done = copies_done(&copies);
    assert_eq!(
        done.len(),
        4,
        "base's two images, each by digest and tag: {done:?}"
    );
    assert!(
        done.iter().all(|c| c.contains("example.com/base")),
        "{done:?}"
    );
    assert!(
        ready.contains("STATUS=Idle: 1 of 1 image sets ready"),
        "{ready}"
    );
    let pins = fs::read_to_string(
        node.sysroot
            .join("etc/crio/crio.conf.d/99-longshore-pinned-images.conf"),
    )
    .unwrap();
    for img in &base.images {
        assert!(pins.contains(&img.reference), "{pins}");
    }
    let log = d.log();
    let before_ready = &log[..log.find("ready: following").expect("ready logged")];
    assert!(before_ready.contains("carries a critical set"), "{log}");
    assert!(before_ready.contains("bundle base imported"), "{log}");
    assert!(!before_ready.contains("bundle apps"), "{log}");

    // Everything else follows in the background, from the same stick.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !d.log().contains("bundle apps imported") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !media_mounts(&node).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            media_mounts(&node)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_in_store_and_pinned(&node, &apps);
    // The media were announced once (the bundle-detected MESSAGE_ID of
    // docs/journal.md), though they were mounted twice.
    assert_eq!(
        d.log().matches("0694dbaaaeb14384977c32f6c298f544").count(),
        1,
        "{}",
        d.log()
    );
    let status = node.status();
    let base_set = status["sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "base")
        .unwrap()
        .clone();
    assert_eq!(base_set["critical"], true, "{base_set}");
}

#[test]
fn sigterm_while_critical_sets_come_in_stops_at_once_without_ready() {
    let Some((_um, node)) = setup() else { return };
    node.write_config(
        "60-media.toml",
        "[media]\nlabels = [\"LSSTOP\"]\n[import]\njobs = 1\n",
    );
    let copies = node.slow_copies(2.0);
    let base = fixture::write_oci_layout(
        &node.scratch("layout"),
        &fixture::small_images("example.com/early", 3),
    )
    .unwrap();
    let content = node.scratch("content");
    fs::create_dir_all(&content).unwrap();
    node.bundle_create(
        &base,
        &content.join("early"),
        &["--name", "early", "--critical"],
    );
    let image = node.scratch("stop.img");
    ext4_image(&image, "LSSTOP", &content, 64);
    let _stick = Loop::attach(&image);
    common::loopdev::settle();

    let mut d = NotifyingDaemon::start(&node, None);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !fs::read_to_string(&copies)
        .unwrap_or_default()
        .contains("start ")
    {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let asked = std::time::Instant::now();
    d.terminate();
    let status = d.child.wait().unwrap();
    let took = asked.elapsed();
    assert!(status.success(), "{}", d.log());
    // Six copies of two seconds were due; the one in hand was stopped.
    assert!(
        took < std::time::Duration::from_secs(3),
        "stopping took {took:?}"
    );
    d.notes.wait_for_line("STOPPING=1");
    assert!(
        !d.notes
            .seen
            .iter()
            .any(|m| m.lines().any(|l| l == "READY=1")),
        "{:?}",
        d.notes.seen
    );
    assert!(
        d.log().contains("abandoned: longshore is stopping"),
        "{}",
        d.log()
    );
    assert!(media_mounts(&node).is_empty(), "{:?}", media_mounts(&node));
}

#[test]
fn an_xfs_stick_is_imported() {
    if !kernel_has("xfs") || !require(&["mkfs.xfs"]) {
        eprintln!("skipped: this kernel or machine has no XFS");
        return;
    }
    let Some((_um, node)) = setup() else { return };
    node.write_config("60-media.toml", "[media]\nlabels = [\"LSXFS\"]\n");
    let layout = layout(&node, "example.com/xfs");
    let content = node.scratch("content");
    fs::create_dir_all(&content).unwrap();
    node.bundle_create(&layout, &content.join("site"), &["--name", "xfs-site"]);
    let image = node.scratch("xfs.img");
    // mkfs.xfs refuses filesystems under 300 MiB; the file is sparse.
    common::loopdev::xfs_image(&image, "LSXFS", &content, 320);
    let daemon = Daemon::start(&node);
    let stick = Loop::attach(&image);
    daemon.wait_for(
        &format!(
            "bundle media: {} (xfs, label \"LSXFS\")",
            stick.dev.display()
        ),
        60,
    );
    daemon.wait_for("bundle xfs-site (", 60);
    daemon.wait_for("unmounted", 30);
    assert_in_store_and_pinned(&node, &layout);
    assert!(media_mounts(&node).is_empty(), "{:?}", media_mounts(&node));
}
