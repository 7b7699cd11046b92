//! Pinning in CRI-O: the pin drop-in, its union with CRI-O's other files, reloads over
//! systemd's D-Bus API (a real systemd user manager and a stand-in crio.service), the
//! order of changes, crash safety, healing from the cache, and the additional
//! image store.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::fixture::{self, Layout};
use common::node::{require, Node};
use common::usermgr::{Reload, UserManager};

const TOOLS: &[&str] = &["skopeo", "dbus-daemon", "systemctl", "unshare", "busctl"];

fn pin_file(node: &Node) -> PathBuf {
    node.sysroot
        .join("etc/crio/crio.conf.d/99-longshore-pinned-images.conf")
}

/// The pins the pin file lists; the file must parse as TOML.
fn pins(node: &Node) -> BTreeSet<String> {
    let Ok(text) = fs::read_to_string(pin_file(node)) else {
        return BTreeSet::new();
    };
    parse_pins(&text)
}

fn parse_pins(text: &str) -> BTreeSet<String> {
    let v: toml::Table = text.parse().expect("the pin file is valid TOML");
    v["crio"]["image"]["pinned_images"]
        .as_array()
        .expect("pinned_images is a list")
        .iter()
        .map(|p| p.as_str().expect("a string").to_string())
        .collect()
}

fn layout(node: &Node, dir: &str, prefix: &str, n: usize) -> Layout {
    fixture::write_oci_layout(&node.scratch(dir), &fixture::small_images(prefix, n)).unwrap()
}

/// The names an image of the fixture is stored under.
fn names(img: &fixture::FixtureImage) -> Vec<String> {
    let (repo, _) = img.reference.rsplit_once(':').unwrap();
    vec![
        img.reference.clone(),
        format!("{repo}@{}", img.manifest_digest),
    ]
}

fn stored_names(node: &Node, layout: &Layout) -> BTreeSet<String> {
    let in_store: BTreeSet<String> = node.store_names().into_iter().collect();
    let mut want = BTreeSet::new();
    for img in &layout.images {
        for n in names(img) {
            assert!(
                in_store.contains(&n),
                "{n} is not a stored name: {in_store:?}"
            );
            want.insert(n);
        }
    }
    want
}

fn set_condition(node: &Node, set: &str, kind: &str) -> (bool, String, String) {
    let status = node.status();
    let set = status["sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == set)
        .unwrap_or_else(|| panic!("no set {set} in {status}"))
        .clone();
    let c = set["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap()
        .clone();
    (
        c["status"].as_bool().unwrap(),
        c["reason"].as_str().unwrap().to_string(),
        c["message"].as_str().unwrap().to_string(),
    )
}

#[test]
fn one_reload_per_change_of_pins_and_none_without_change() {
    if !require(TOOLS) {
        return;
    }
    let (um, node) = UserManager::with_crio();
    let a = layout(&node, "la", "example.com/pin-a", 2);
    let bundle_a = node.scratch("a.tar");
    node.bundle_create(&a, &bundle_a, &["--name", "a"]);
    let b = layout(&node, "lb", "example.com/pin-b", 1);
    let bundle_b = node.scratch("b");
    node.bundle_create(&b, &bundle_b, &["--name", "b"]);

    let out = node.run(&["import", bundle_a.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("reloaded crio.service"));
    um.expect_hups(1, "one reload for the first pins");
    assert_eq!(pins(&node), stored_names(&node, &a));

    node.ok(&["import", bundle_a.to_str().unwrap()]);
    node.ok(&["sync"]);
    um.expect_hups(1, "no change, no reload");

    node.ok(&["import", bundle_b.to_str().unwrap()]);
    um.expect_hups(2, "");
    let mut both = stored_names(&node, &a);
    both.extend(stored_names(&node, &b));
    assert_eq!(pins(&node), both);

    node.ok(&["sets", "remove", "a"]);
    um.expect_hups(3, "unpinning is a change");
    assert_eq!(pins(&node), stored_names(&node, &b));
    // Removing a set unpins; the images stay in the store.
    assert!(node.inspect_digest(&a.images[0].reference).is_some());

    node.ok(&["sets", "remove", "b"]);
    um.expect_hups(4, "");
    assert!(
        !pin_file(&node).exists(),
        "nothing to pin: the file is removed"
    );
    node.ok(&["sync"]);
    um.expect_hups(4, "");
}

#[test]
fn an_inactive_unit_is_not_reloaded() {
    if !require(TOOLS) {
        return;
    }
    let um = UserManager::start();
    um.install_crio(Reload::Hup);
    let node = um.node();
    let a = layout(&node, "la", "example.com/inactive", 1);
    let bundle = node.scratch("a");
    node.bundle_create(&a, &bundle, &["--name", "a"]);
    let out = node.run(&["import", bundle.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "crio.service is inactive, so it was not reloaded; CRI-O reads the pins when it starts"
        ),
        "{stderr}"
    );
    um.expect_hups(0, "");
    assert_eq!(pins(&node), stored_names(&node, &a));
}

#[test]
fn a_failed_reload_job_is_reported_as_a_failure() {
    if !require(TOOLS) {
        return;
    }
    let um2 = UserManager::start();
    um2.install_crio(Reload::Fails);
    um2.start_crio();
    let node2 = um2.node();
    let a = layout(&node2, "la", "example.com/failed-reload", 1);
    let bundle = node2.scratch("a");
    node2.bundle_create(&a, &bundle, &["--name", "a"]);
    let out = node2.run(&["import", bundle.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("reload of crio.service failed: systemd reports job result \"failed\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("but crio.service was not reloaded"),
        "{stderr}"
    );
}

#[test]
fn pins_of_crio_conf_and_earlier_dropins_survive_and_are_resynced_by_the_daemon() {
    if !require(TOOLS) {
        return;
    }
    let (um, node) = UserManager::with_crio();
    let crio = node.sysroot.join("etc/crio");
    fs::create_dir_all(crio.join("crio.conf.d")).unwrap();
    fs::write(
        crio.join("crio.conf"),
        "[crio.image]\npause_image = \"registry.k8s.io/pause:3.9\"\npinned_images = [\"registry.k8s.io/pause:3.9\"]\n",
    )
    .unwrap();
    let mco = crio.join("crio.conf.d/50-pinned-images");
    fs::write(&mco, "[crio.image]\npinned_images = [\"quay.io/openshift/release@sha256:1111111111111111111111111111111111111111111111111111111111111111\"]\n").unwrap();
    let a = layout(&node, "la", "example.com/union", 2);
    let bundle = node.scratch("a");
    node.bundle_create(&a, &bundle, &["--name", "a"]);
    node.ok(&["import", bundle.to_str().unwrap()]);
    let mut want = stored_names(&node, &a);
    want.insert("registry.k8s.io/pause:3.9".into());
    want.insert("quay.io/openshift/release@sha256:1111111111111111111111111111111111111111111111111111111111111111".into());
    assert_eq!(pins(&node), want);
    um.expect_hups(1, "");

    // With the daemon running, an edit of 50-pinned-images is carried into our file.
    let daemon = Daemon::start(&node);
    um.expect_hups(
        1,
        &format!(
            "the daemon found nothing to change at start:\n{}",
            daemon.log()
        ),
    );
    let added = "quay.io/openshift/release@sha256:2222222222222222222222222222222222222222222222222222222222222222";
    fs::write(
        &mco,
        format!("[crio.image]\npinned_images = [\"{added}\"]\n"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !pins(&node).contains(added) {
        assert!(
            Instant::now() < deadline,
            "the daemon did not re-sync: {:?}\n{}",
            pins(&node),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    want.remove("quay.io/openshift/release@sha256:1111111111111111111111111111111111111111111111111111111111111111");
    want.insert(added.to_string());
    assert_eq!(pins(&node), want);
    um.expect_hups(2, &format!("one reload for the re-sync:\n{}", daemon.log()));
    drop(daemon);
}

#[test]
fn a_replaced_set_unpins_what_left_before_the_new_images_come_in() {
    if !require(TOOLS) {
        return;
    }
    let um = UserManager::start();
    let node = um.node();
    um.install_crio(Reload::HupAndSnapshot(pin_file(&node)));
    um.start_crio();
    let all = layout(&node, "l", "example.com/order", 3);
    let v1 = Layout {
        dir: all.dir.clone(),
        images: all.images[0..2].to_vec(),
    };
    let v2 = Layout {
        dir: all.dir.clone(),
        images: all.images[1..3].to_vec(),
    };
    let b1 = node.scratch("v1");
    let b2 = node.scratch("v2");
    node.bundle_create(&v1, &b1, &["--name", "apps-1", "--set", "apps"]);
    node.bundle_create(&v2, &b2, &["--name", "apps-2", "--set", "apps"]);
    node.ok(&["import", b1.to_str().unwrap()]);
    node.ok(&["import", b2.to_str().unwrap()]);
    let snaps = um.snapshots();
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    let img = |i: usize| names(&all.images[i]).into_iter().collect::<BTreeSet<_>>();
    let union = |sets: &[BTreeSet<String>]| sets.iter().flatten().cloned().collect::<BTreeSet<_>>();
    assert_eq!(parse_pins(&snaps[0]), union(&[img(0), img(1)]), "v1 pinned");
    assert_eq!(
        parse_pins(&snaps[1]),
        img(1),
        "what stays, before v2's new image is copied"
    );
    assert_eq!(
        parse_pins(&snaps[2]),
        union(&[img(1), img(2)]),
        "v2 pinned once present"
    );
}

#[test]
fn a_killed_writer_leaves_the_old_file_or_the_new_one() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let a = layout(&node, "la", "example.com/crash-a", 1);
    let b = layout(&node, "lb", "example.com/crash-b", 1);
    let (ba, bb) = (node.scratch("a"), node.scratch("b"));
    node.bundle_create(&a, &ba, &["--name", "a"]);
    node.bundle_create(&b, &bb, &["--name", "b"]);
    node.ok(&["import", ba.to_str().unwrap()]);
    let old = fs::read_to_string(pin_file(&node)).unwrap();

    // Stop the writer between writing the new content and renaming it in, then kill it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_longshore"))
        .arg("--sysroot")
        .arg(&node.sysroot)
        .args(["import", bb.to_str().unwrap()])
        .env("LONGSHORE_TEST_STOP_AT", "before-rename")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stopped(child.id()) {
        assert!(
            Instant::now() < deadline,
            "longshore never reached the rename"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "longshore exited before the rename"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir = node.sysroot.join("etc/crio/crio.conf.d");
    let listing = || -> Vec<String> {
        fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(listing(), vec!["99-longshore-pinned-images.conf"]);
    assert_eq!(
        fs::read_to_string(pin_file(&node)).unwrap(),
        old,
        "the old file, whole"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(listing(), vec!["99-longshore-pinned-images.conf"]);
    assert_eq!(fs::read_to_string(pin_file(&node)).unwrap(), old);
    parse_pins(&old);

    // The next run writes the new file and clears what the killed one left outside.
    node.ok(&["sync"]);
    let mut both = stored_names(&node, &a);
    both.extend(stored_names(&node, &b));
    assert_eq!(pins(&node), both);
    assert_eq!(listing(), vec!["99-longshore-pinned-images.conf"]);
    let strays: Vec<String> = fs::read_dir(node.sysroot.join("etc/crio"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");
}

fn stopped(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

#[test]
fn a_wiped_store_is_healed_from_the_cache() {
    if !require(TOOLS) {
        return;
    }
    let (um, node) = UserManager::with_crio();
    let a = layout(&node, "la", "example.com/heal", 2);
    let bundle = node.scratch("heal.tar.zst");
    node.bundle_create(&a, &bundle, &["--name", "heal", "--set", "edge"]);
    node.ok(&["import", bundle.to_str().unwrap()]);
    fs::remove_file(&bundle).unwrap();
    assert!(set_condition(&node, "edge", "Ready").0);
    let active = um.systemctl(&["is-active", "crio.service"]);
    assert_eq!(
        String::from_utf8_lossy(&active.stdout).trim(),
        "active",
        "{}",
        um.journal()
    );
    let daemon = Daemon::start(&node);

    // CRI-O's wipe after an unclean shutdown: the whole store is gone.
    wipe_store(&node);
    assert!(node.inspect_digest(&a.images[0].reference).is_none());
    let (degraded, reason, message) = set_condition(&node, "edge", "Degraded");
    assert!(degraded && reason == "ImagesMissing", "{reason}: {message}");
    assert!(message.contains("the cache holds bundle heal"), "{message}");
    assert!(!set_condition(&node, "edge", "Ready").0);

    // CRI-O comes back; the daemon notices and puts the images back.
    let out = um.systemctl(&["restart", "crio.service"]);
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !set_condition(&node, "edge", "Ready").0 {
        assert!(Instant::now() < deadline, "not healed:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    for img in &a.images {
        assert_eq!(
            node.inspect_digest(&img.reference).as_deref(),
            Some(img.manifest_digest.as_str())
        );
    }
    assert!(!set_condition(&node, "edge", "Degraded").0);
    assert_eq!(pins(&node), stored_names(&node, &a));
    let status = node.status();
    assert_eq!(
        status["bundles"][0]["source"],
        bundle.display().to_string(),
        "the record keeps the original source"
    );
}

#[test]
fn without_the_cache_the_set_stays_degraded_naming_what_is_missing() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let a = layout(&node, "la", "example.com/lost", 1);
    let bundle = node.scratch("lost");
    node.bundle_create(&a, &bundle, &["--name", "lost"]);
    node.ok(&["import", bundle.to_str().unwrap()]);
    assert!(!pins(&node).is_empty());
    wipe_store(&node);
    // The cache lost too (a new disk, say): nothing can put the images back.
    fs::remove_dir_all(node.sysroot.join("var/lib/longshore/cache")).unwrap();
    let out = node.ok(&["sync"]);
    assert!(out.contains("degraded"), "{out}");
    let (degraded, _, message) = set_condition(&node, "lost", "Degraded");
    assert!(degraded);
    assert!(
        message.contains(&a.images[0].reference.replace(":1", "")),
        "{message}"
    );
    assert!(
        message.contains("import a bundle that carries them"),
        "{message}"
    );
    assert!(!pin_file(&node).exists(), "an incomplete set is not pinned");
}

/// What CRI-O's `crio wipe` does to an unclean node's storage.
fn wipe_store(node: &Node) {
    common::node::unmount_under(&node.store_root());
    fs::remove_dir_all(node.store_root()).unwrap();
    let _ = fs::remove_dir_all(node.sysroot.join("run/containers/storage"));
}

#[test]
fn set_files_pin_present_images_and_unpin_when_removed() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let a = layout(&node, "la", "example.com/admin", 2);
    let bundle = node.scratch("a");
    node.bundle_create(&a, &bundle, &["--name", "a", "--no-pin"]);
    node.ok(&["import", bundle.to_str().unwrap()]);
    assert!(!pin_file(&node).exists(), "the bundle asked for no pins");

    let sets_d = node.sysroot.join("etc/longshore/sets.d");
    fs::create_dir_all(&sets_d).unwrap();
    let img = &a.images[0];
    let (repo, _) = img.reference.rsplit_once(':').unwrap();
    let by_digest = format!("{repo}@{}", img.manifest_digest);
    fs::write(
        sets_d.join("edge-critical.toml"),
        format!("images = [\"{by_digest}\"]\n"),
    )
    .unwrap();
    node.ok(&["sync"]);
    assert_eq!(pins(&node), names(img).into_iter().collect());
    let listed: serde_json::Value = serde_json::from_str(&node.ok(&["sets", "--json"])).unwrap();
    let set = listed["sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "edge-critical")
        .unwrap();
    assert_eq!(set["source"]["kind"], "file");
    assert!(set["bytesOnDisk"].as_u64().unwrap() > 0);

    let err = node.fails(&["sets", "remove", "edge-critical"], 1);
    assert!(err.contains("edge-critical.toml"), "{err}");

    // A set naming an image the store lacks is reported, and not pinned.
    fs::write(
        sets_d.join("later.toml"),
        format!(
            "images = [\"example.com/not-here@sha256:{}\"]\n",
            "3".repeat(64)
        ),
    )
    .unwrap();
    node.ok(&["sync"]);
    let (degraded, reason, _) = set_condition(&node, "later", "Degraded");
    assert!(degraded && reason == "ImagesMissing");
    assert_eq!(pins(&node), names(img).into_iter().collect());

    // Tags need allow_tags; a bad file is an error naming it.
    fs::write(
        sets_d.join("tagged.toml"),
        format!("images = [\"{}\"]\n", img.reference),
    )
    .unwrap();
    let err = node.fails(&["sync"], 1);
    assert!(
        err.contains("tagged.toml") && err.contains("allow_tags"),
        "{err}"
    );
    fs::write(
        sets_d.join("tagged.toml"),
        format!("allow_tags = true\nimages = [\"{}\"]\n", img.reference),
    )
    .unwrap();
    node.ok(&["sync"]);

    fs::remove_file(sets_d.join("edge-critical.toml")).unwrap();
    fs::remove_file(sets_d.join("tagged.toml")).unwrap();
    node.ok(&["sync"]);
    assert!(!pin_file(&node).exists(), "no complete pinned set is left");
}

#[test]
fn foreign_inputs_are_pinned_unless_configured_otherwise() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let specs = fixture::small_images("example.com/saved-pin", 1);
    let archive = node.scratch("saved.tar");
    fixture::write_docker_archive(&archive, &specs).unwrap();
    node.ok(&["import", archive.to_str().unwrap()]);
    assert!(pins(&node).contains(&specs[0].reference));

    let node2 = Node::new();
    node2.write_config("60-foreign.toml", "[import]\npin_foreign = false\n");
    node2.ok(&["import", archive.to_str().unwrap()]);
    assert!(!pin_file(&node2).exists());
    assert_eq!(set_condition(&node2, "saved", "Ready").1, "Present");
}

#[test]
fn additional_store_mode_writes_the_store_dropin_and_restarts_only_when_allowed() {
    if !require(TOOLS) {
        return;
    }
    let (um, node) = UserManager::with_crio();
    node.write_config("60-store.toml", "[store]\nmode = \"additional\"\n");
    let a = layout(&node, "la", "example.com/extra-store", 1);
    let bundle = node.scratch("a");
    node.bundle_create(&a, &bundle, &["--name", "a"]);
    let pid_before = um.crio_pid();
    let out = node.run(&["import", bundle.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("takes effect when crio.service restarts"),
        "{stderr}"
    );
    assert_eq!(
        um.crio_pid(),
        pid_before,
        "not restarted without allow_restart"
    );

    let store = node.state_dir().join("storage");
    for lock in ["overlay-images/images.lock", "overlay-layers/layers.lock"] {
        assert!(store.join(lock).exists(), "{lock}");
    }
    let dropin = node
        .sysroot
        .join("etc/crio/crio.conf.d/99-longshore-storage.conf");
    let v: toml::Table = fs::read_to_string(&dropin).unwrap().parse().unwrap();
    assert_eq!(
        v["crio"]["storage_option"][0].as_str(),
        Some("overlay.imagestore=/var/lib/longshore/storage"),
        "the path as the node sees it"
    );
    // The images are in longshore's store, not CRI-O's.
    let out = Command::new("skopeo")
        .arg("inspect")
        .arg(format!(
            "containers-storage:[overlay@{}+{}]{}",
            store.display(),
            node.sysroot.join("run/longshore/storage").display(),
            a.images[0].reference
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(node.inspect_digest(&a.images[0].reference).is_none());
    assert!(pins(&node).contains(&a.images[0].reference));

    // Back to the primary store, with restarts allowed: the drop-in goes, CRI-O restarts.
    node.write_config(
        "60-store.toml",
        "[store]\nmode = \"primary\"\n[crio]\nallow_restart = true\n",
    );
    node.ok(&["sync"]);
    assert!(!dropin.exists());
    assert_ne!(um.crio_pid(), pid_before, "restarted");
}

#[allow(dead_code)]
fn _paths(_: &Path) {}

#[test]
fn healing_from_an_older_bundle_does_not_bring_back_its_old_sets() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let all = layout(&node, "l", "example.com/restore", 3);
    let v1 = Layout {
        dir: all.dir.clone(),
        images: all.images[0..2].to_vec(),
    };
    let v2 = Layout {
        dir: all.dir.clone(),
        images: all.images[1..3].to_vec(),
    };
    let b1 = node.scratch("v1");
    let b2 = node.scratch("v2");
    node.bundle_create(&v1, &b1, &["--name", "apps-1", "--set", "apps"]);
    node.bundle_create(&v2, &b2, &["--name", "apps-2", "--set", "apps"]);
    // v1 also declares a second set, which keeps it referenced in the cache after v2
    // replaces "apps".
    let meta_path = b1.join("bundle.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    let first = meta["sets"][0]["images"][0].clone();
    meta["sets"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "base", "images": [first], "pinned": true}));
    fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
    node.ok(&["import", b1.to_str().unwrap()]);
    node.ok(&["import", b2.to_str().unwrap()]);

    wipe_store(&node);
    node.ok(&["sync"]);
    for img in &all.images {
        assert!(
            node.inspect_digest(&img.reference).is_some(),
            "{} restored",
            img.reference
        );
    }
    let sets: serde_json::Value = serde_json::from_str(&node.ok(&["sets", "--json"])).unwrap();
    let apps = sets["sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "apps")
        .unwrap();
    assert_eq!(
        apps["source"]["name"], "apps-2",
        "the newer definition stays: {apps}"
    );
    let refs: Vec<&str> = apps["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["reference"].as_str().unwrap())
        .collect();
    let want: Vec<String> = v2.images.iter().map(|i| names(i)[1].clone()).collect();
    assert_eq!(refs, want);
    // img0 is pinned only for "base" now; "apps" pins img1 and img2.
    let mut expect = stored_names(&node, &v2);
    expect.extend(names(&all.images[0]));
    assert_eq!(pins(&node), expect);
}
