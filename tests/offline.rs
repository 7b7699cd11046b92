//! Where there is no systemd to reload CRI-O through: a node's disk prepared offline
//! under `--sysroot` (the factory case), a daemon whose bus has no service manager, and
//! drop-ins that would make CRI-O panic.

mod common;

use std::fs;
use std::path::PathBuf;

use common::daemon::Daemon;
use common::fixture;
use common::node::{require, Node};

fn bundle(node: &Node, prefix: &str) -> (PathBuf, fixture::Layout) {
    let layout =
        fixture::write_oci_layout(&node.scratch("layout"), &fixture::small_images(prefix, 2))
            .unwrap();
    let out = node.scratch("offline.tar.zst");
    node.bundle_create(&layout, &out, &["--name", "offline"]);
    (out, layout)
}

fn pin_file(node: &Node) -> PathBuf {
    node.sysroot
        .join("etc/crio/crio.conf.d/99-longshore-pinned-images.conf")
}

#[test]
fn a_disk_prepared_offline_is_pinned_and_the_running_hosts_crio_is_left_alone() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    // Reloading is on, on the system bus: the running host's CRI-O, which a --sysroot
    // import must never touch (this machine has no system bus at all; before, the import
    // failed trying to reach it after it had copied and pinned).
    node.write_config(
        "90-reload.toml",
        "bus = \"system\"\n[crio]\nreload = true\n",
    );
    let (b, layout) = bundle(&node, "example.com/offline");
    let out = node.run(&["import", b.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("is not reloaded"), "{stderr}");
    assert!(stderr.contains("another node's root"), "{stderr}");
    let pins = fs::read_to_string(pin_file(&node)).unwrap();
    for img in &layout.images {
        assert!(pins.contains(&img.reference), "{pins}");
        assert_eq!(
            node.inspect_digest(&img.reference).as_deref(),
            Some(img.manifest_digest.as_str())
        );
    }
    // containers/image's blob-info cache is the node's, not the host's.
    let cache = node
        .sysroot
        .join("var/lib/containers/cache/blob-info-cache-v1.boltdb");
    assert!(cache.is_file(), "{} is missing", cache.display());
}

#[test]
fn a_bare_wildcard_pin_is_never_written_and_is_reported() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let dropins = node.sysroot.join("etc/crio/crio.conf.d");
    fs::create_dir_all(&dropins).unwrap();
    fs::write(
        dropins.join("50-everything.conf"),
        "[crio.image]\npinned_images = [\"*\", \"registry.example.com/keep:1\"]\n",
    )
    .unwrap();
    let (b, layout) = bundle(&node, "example.com/wild");
    let out = node.run(&["import", b.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("50-everything.conf") && stderr.contains("panic"),
        "{stderr}"
    );
    let text = fs::read_to_string(pin_file(&node)).unwrap();
    let v: toml::Table = text.parse().unwrap();
    let pins: Vec<&str> = v["crio"]["image"]["pinned_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(!pins.contains(&"*"), "{pins:?}");
    assert!(pins.contains(&"registry.example.com/keep:1"), "{pins:?}");
    assert!(
        pins.contains(&layout.images[0].reference.as_str()),
        "{pins:?}"
    );
}

#[test]
fn a_daemon_without_systemd_keeps_working_and_says_so() {
    if !require(&["skopeo", "dbus-daemon"]) {
        return;
    }
    let bus = common::usermgr::BareBus::start();
    let mut node = Node::new();
    node.env
        .push(("DBUS_SESSION_BUS_ADDRESS".into(), bus.address.clone()));
    node.write_config("90-bus.toml", "bus = \"session\"\n[crio]\nreload = true\n");
    let (b, layout) = bundle(&node, "example.com/nosystemd");
    let daemon = Daemon::start(&node);
    assert!(daemon.log().contains("is not followed"), "{}", daemon.log());
    // The command line goes through the daemon, which imports and pins.
    let out = node.run(&["import", b.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", daemon.log());
    assert!(stderr.contains("asking it to do this"), "{stderr}");
    let pins = fs::read_to_string(pin_file(&node)).unwrap();
    assert!(pins.contains(&layout.images[1].reference), "{pins}");
    daemon.wait_for("was not reloaded", 10);
    let status = node.ok(&["status"]);
    assert!(status.contains("systemd is not on the bus"), "{status}");
}
