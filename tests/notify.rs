//! The daemon's sd_notify messages, read from a NOTIFY_SOCKET the test provides:
//! READY=1 with a status line, STATUS= while it imports, WATCHDOG=1 when asked, and
//! STOPPING=1 on SIGTERM.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::fixture;
use common::node::{require, wait_for_text};
use common::notify::NotifyingDaemon;
use common::usermgr::UserManager;

#[test]
fn ready_status_watchdog_and_stopping() {
    if !require(&["skopeo", "dbus-daemon", "systemctl", "unshare", "busctl"]) {
        return;
    }
    let (_um, node) = UserManager::with_crio();
    let layout = fixture::write_oci_layout(
        &node.scratch("layout"),
        &fixture::small_images("example.com/notify", 2),
    )
    .unwrap();
    let bundle = node.scratch("b");
    node.bundle_create(&layout, &bundle, &["--name", "notify", "--set", "edge"]);
    node.ok(&["import", bundle.to_str().unwrap()]);

    let mut d = NotifyingDaemon::start(&node, Some(400_000));
    let n = &mut d.notes;

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

    d.terminate();
    d.notes.wait_for_line("STOPPING=1");
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{}", d.log());
    let log = d.log();
    assert!(log.contains("image set later is degraded"), "{log}");
    // The fixed MESSAGE_ID of docs/journal.md travels with it (a field in the journal).
    assert!(log.contains("328f2117836047cca39fa15ca07e43e1"), "{log}");
}

#[test]
fn sigterm_abandons_the_copy_in_hand_and_pins_nothing_incomplete() {
    if !require(&["skopeo", "dbus-daemon", "systemctl", "unshare", "busctl"]) {
        return;
    }
    let (_um, node) = UserManager::with_crio();
    node.write_config("60-jobs.toml", "[import]\njobs = 1\n");
    let copies = node.slow_copies(1.0);
    let layout = fixture::write_oci_layout(
        &node.scratch("layout"),
        &fixture::small_images("example.com/term", 3),
    )
    .unwrap();
    let bundle = node.scratch("b");
    node.bundle_create(&layout, &bundle, &["--name", "term", "--set", "edge"]);

    let mut d = NotifyingDaemon::start(&node, None);
    d.notes.wait_for_line("READY=1");
    // The CLI hands the import to the daemon over D-Bus.
    let import = node.spawn(&["import", bundle.to_str().unwrap()]);
    wait_for_text(&copies, "start ", 60);
    let asked = Instant::now();
    d.terminate();
    d.notes.wait_for_line("STOPPING=1");
    let status = d.child.wait().unwrap();
    let took = asked.elapsed();
    assert!(status.success(), "{}", d.log());
    // The copy in hand was stopped, not waited out (each takes a second here, and
    // three were due).
    assert!(took < Duration::from_secs(3), "stopping took {took:?}");
    let log = d.log();
    assert!(log.contains("abandoned: longshore is stopping"), "{log}");

    let out = import.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("abandoned"), "{err}");

    // Nothing incomplete is pinned, and the bundle is not recorded as imported.
    let pins = node
        .sysroot
        .join("etc/crio/crio.conf.d/99-longshore-pinned-images.conf");
    let pinned = fs::read_to_string(&pins).unwrap_or_default();
    assert!(!pinned.contains("example.com/term"), "{pinned}");
    let status = node.status();
    assert_eq!(status["bundles"][0]["state"], "importing", "{status}");
    assert!(
        !fs::read_to_string(&copies).unwrap().contains("done "),
        "the first copy was stopped before it finished"
    );
}
