//! The daemon's D-Bus service on a private bus, driven with busctl (and a zbus client
//! where the error's name matters): properties, methods, objects, signals, named errors,
//! and the CLI going through the daemon.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::fixture::{self, Layout};
use common::node::{require, wait_for_text, Node};
use common::usermgr::UserManager;

const DEST: &str = "io.longshore.Longshore1";
const PATH: &str = "/io/longshore/Longshore1";
const IFACE: &str = "io.longshore.Longshore1.Manager";

fn busctl(node: &Node, args: &[&str]) -> Output {
    Command::new("busctl")
        .arg("--user")
        .args(args)
        .envs(node.env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

fn busctl_ok(node: &Node, args: &[&str]) -> String {
    let out = busctl(node, args);
    assert!(
        out.status.success(),
        "busctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn bundle(node: &Node, dir: &str, prefix: &str, name: &str) -> (Layout, PathBuf) {
    let layout =
        fixture::write_oci_layout(&node.scratch(dir), &fixture::small_images(prefix, 2)).unwrap();
    let out = node.scratch(&format!("{name}.tar"));
    node.bundle_create(&layout, &out, &["--name", name]);
    (layout, out)
}

/// Calls a manager method with a zbus client; returns the D-Bus error name on failure.
fn call_error_name(bus: &str, method: &str, path: &str) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus)
            .unwrap()
            .build()
            .await
            .unwrap();
        let options: HashMap<String, zbus::zvariant::Value> = HashMap::new();
        match conn
            .call_method(Some(DEST), PATH, Some(IFACE), method, &(path, options))
            .await
        {
            Ok(_) => None,
            Err(zbus::Error::MethodError(name, _, _)) => Some(name.to_string()),
            Err(e) => panic!("{e}"),
        }
    })
}

#[test]
fn properties_methods_objects_signals_and_errors() {
    if !require(&["skopeo", "dbus-daemon", "systemctl", "unshare", "busctl"]) {
        return;
    }
    let (um, node) = UserManager::with_crio();
    let (layout, tar) = bundle(&node, "la", "example.com/api", "api");
    let _daemon = Daemon::start(&node);

    assert_eq!(
        busctl_ok(&node, &["get-property", DEST, PATH, IFACE, "State"]).trim(),
        "s \"idle\""
    );
    let status = busctl_ok(&node, &["get-property", DEST, PATH, IFACE, "StatusText"]);
    assert!(status.contains("Idle: 0 of 0 image sets ready"), "{status}");

    // Watch the signals while importing over D-Bus.
    let monitor = Command::new("busctl")
        .args(["--user", "monitor", DEST])
        .envs(node.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let reply = busctl_ok(
        &node,
        &[
            "--timeout=120",
            "call",
            DEST,
            PATH,
            IFACE,
            "Import",
            "sa{sv}",
            tar.to_str().unwrap(),
            "1",
            "hold",
            "b",
            "false",
        ],
    );
    // The report whole: digest, name, state, copied, present, images, bytes verified.
    assert!(reply.starts_with("a(sssuuut) 1 \""), "{reply}");
    assert!(reply.contains("\"api\" \"imported\" 2 0 2 "), "{reply}");
    let verified: u64 = reply
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bytes verified at the end: {reply}"));
    assert!(verified > 0, "{reply}");
    for img in &layout.images {
        assert_eq!(
            node.inspect_digest(&img.reference).as_deref(),
            Some(img.manifest_digest.as_str())
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let seen = String::from_utf8_lossy(&monitor.wait_with_output().unwrap().stdout).into_owned();
    assert!(
        seen.contains("Member=Progress"),
        "no Progress signal:\n{seen}"
    );
    assert!(
        seen.contains("Member=PropertiesChanged"),
        "no PropertiesChanged:\n{seen}"
    );
    assert!(
        seen.contains("Member=InterfacesAdded"),
        "no InterfacesAdded:\n{seen}"
    );

    // One object per bundle and per set, listed by the manager and the ObjectManager.
    let tree = busctl_ok(&node, &["tree", "--list", DEST]);
    assert!(tree.contains(&format!("{PATH}/set/api")), "{tree}");
    assert!(
        tree.lines()
            .any(|l| l.starts_with(&format!("{PATH}/bundle/"))),
        "{tree}"
    );
    let sets = busctl_ok(&node, &["get-property", DEST, PATH, IFACE, "ImageSets"]);
    assert!(sets.contains(&format!("{PATH}/set/api")), "{sets}");
    let ready = busctl_ok(
        &node,
        &[
            "get-property",
            DEST,
            &format!("{PATH}/set/api"),
            "io.longshore.Longshore1.ImageSet",
            "Ready",
        ],
    );
    assert_eq!(ready.trim(), "b true");
    let managed = busctl_ok(
        &node,
        &[
            "call",
            DEST,
            PATH,
            "org.freedesktop.DBus.ObjectManager",
            "GetManagedObjects",
        ],
    );
    assert!(
        managed.contains("io.longshore.Longshore1.ImageSet")
            && managed.contains("io.longshore.Longshore1.Bundle"),
        "{managed}"
    );

    // Named errors.
    let junk = node.scratch("junk.txt");
    fs::write(&junk, "not a bundle").unwrap();
    let bus = um.bus_address.clone();
    assert_eq!(
        call_error_name(&bus, "Import", junk.to_str().unwrap()).as_deref(),
        Some("io.longshore.Longshore1.Error.Rejected")
    );
    let out = busctl(
        &node,
        &["call", DEST, PATH, IFACE, "Apply", "s", "no-such-bundle"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no bundle named"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = busctl(
        &node,
        &[
            "call",
            DEST,
            PATH,
            IFACE,
            "Import",
            "sa{sv}",
            tar.to_str().unwrap(),
            "1",
            "colour",
            "s",
            "blue",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown option \"colour\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // RemoveSet unpins over D-Bus, and the set object goes away.
    busctl_ok(&node, &["call", DEST, PATH, IFACE, "RemoveSet", "s", "api"]);
    let tree = busctl_ok(&node, &["tree", "--list", DEST]);
    assert!(!tree.contains(&format!("{PATH}/set/api")), "{tree}");
    busctl_ok(&node, &["call", DEST, PATH, IFACE, "Rescan"]);

    // The cache over D-Bus: the CLI's `cache` goes through the daemon and sees what the
    // cache directory holds; CollectCache answers with its typed result.
    let cached = fs::read_dir(node.state_dir().join("cache/blobs/sha256"))
        .unwrap()
        .count();
    assert!(cached > 0);
    let out = node.run(&["cache", "--json"]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["blobs"], cached, "{report}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("asking it"),
        "not through the daemon"
    );
    let reply = busctl_ok(&node, &["call", DEST, PATH, IFACE, "CollectCache"]);
    assert!(reply.starts_with("uttuu 0 0 "), "{reply}");
    let gc: serde_json::Value = serde_json::from_str(&node.ok(&["cache", "gc", "--json"])).unwrap();
    assert_eq!(gc["evicted"], 0, "an import of the last day stays: {gc}");

    // With the daemon running, the CLI's import goes through it (one writer of the state).
    let (layout2, tar2) = bundle(&node, "lb", "example.com/api-cli", "cli");
    let out = node.run(&["import", tar2.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the longshore daemon is running; asking it to do this"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("bundle cli ("),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Not on a terminal, the daemon's Progress signals become plain lines.
    assert!(
        stderr.contains(&format!(
            "cli: copied {}@{}",
            layout2.images[0].reference.split(':').next().unwrap(),
            layout2.images[0].manifest_digest
        )) || stderr.contains("cli: copied example.com/api-cli/"),
        "{stderr}"
    );
    assert!(stderr.contains("100%)"), "{stderr}");
    let log = fs::read_to_string(&_daemon.log).unwrap();
    assert!(
        log.contains(&format!("Importing {}", tar2.display())) || log.contains("bundle cli ("),
        "{log}"
    );
    assert!(node.inspect_digest(&layout2.images[0].reference).is_some());
    // `--json` through the daemon prints the engine's report whole, as a local import
    // does: nothing is left out or made up on the way across the bus.
    let (_, tar3) = bundle(&node, "lc", "example.com/api-json", "json");
    let json: serde_json::Value =
        serde_json::from_str(&node.ok(&["import", "--json", tar3.to_str().unwrap()])).unwrap();
    let r = &json[0];
    assert_eq!(r["name"], "json", "{json}");
    assert_eq!(r["state"], "imported", "{json}");
    assert_eq!(
        (r["images"].as_u64(), r["copied"].as_u64()),
        (Some(2), Some(2)),
        "{json}"
    );
    assert!(r["bytesVerified"].as_u64().unwrap_or(0) > 0, "{json}");
    // Its errors keep their exit codes.
    node.fails(&["import", junk.to_str().unwrap()], 3);

    // status and sets come from the daemon too: its JSON carries what it is doing.
    let status: serde_json::Value = serde_json::from_str(&node.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["apiVersion"], "longshore.io/v1", "{status}");
    assert_eq!(status["daemon"]["state"], "idle", "{status}");
    assert!(
        status["bundles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"] == "cli"),
        "{status}"
    );
    let text = node.ok(&["status"]);
    assert!(text.starts_with("Daemon: Idle:"), "{text}");
    assert!(text.contains("BUNDLES"), "{text}");
    let sets: serde_json::Value = serde_json::from_str(&node.ok(&["sets", "--json"])).unwrap();
    assert!(
        sets["sets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "cli"),
        "{sets}"
    );
    assert!(node.ok(&["sets"]).contains("cli"));
    let err = busctl(&node, &["call", DEST, PATH, IFACE, "Status", "s", "yaml"]);
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("use \"text\" or \"json\""),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    node.ok(&["sets", "remove", "cli"]);
}

/// Work is queued behind the import in hand, while status answers at once.
#[test]
fn status_answers_during_an_import_and_a_second_import_waits_its_turn() {
    if !require(&["skopeo", "dbus-daemon", "systemctl", "unshare", "busctl"]) {
        return;
    }
    let (_um, node) = UserManager::with_crio();
    node.write_config("60-jobs.toml", "[import]\njobs = 1\n");
    let copies = node.slow_copies(0.5);
    let (_, first) = bundle(&node, "la", "example.com/first", "first");
    let (_, second) = bundle(&node, "lb", "example.com/second", "second");
    let _daemon = Daemon::start(&node);
    let a = node.spawn(&["import", first.to_str().unwrap()]);
    wait_for_text(&copies, "start ", 60);
    let b = node.spawn(&["import", second.to_str().unwrap()]);
    let asked = Instant::now();
    let status: serde_json::Value = serde_json::from_str(&node.ok(&["status", "--json"])).unwrap();
    let took = asked.elapsed();
    assert_eq!(status["daemon"]["state"], "importing", "{status}");
    assert!(
        status["daemon"]["statusText"]
            .as_str()
            .unwrap()
            .contains("Importing"),
        "{status}"
    );
    // Answered beside the copies (four of half a second each are due), not after them.
    assert!(took < Duration::from_millis(1500), "status took {took:?}");
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // One after the other: every copy of the first bundle ended before the second began.
    let log = fs::read_to_string(&copies).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let last_first = lines
        .iter()
        .rposition(|l| l.contains("example.com/first"))
        .unwrap();
    let first_second = lines
        .iter()
        .position(|l| l.contains("example.com/second"))
        .unwrap();
    assert!(last_first < first_second, "{log}");
}

/// The shipped bus policy loads into a real dbus-daemon as a system bus would load it,
/// and a bus started with it lets root own the name.
#[test]
fn the_bus_policy_loads() {
    if !require(&["dbus-daemon", "busctl"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policy =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd/io.longshore.Longshore1.conf");
    let socket = dir.path().join("bus");
    let config = dir.path().join("bus.conf");
    fs::write(
        &config,
        format!(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN\" \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig>\n\
             <type>system</type>\n<listen>unix:path={}</listen>\n<auth>EXTERNAL</auth>\n\
             <policy context=\"default\"><allow user=\"*\"/><deny own=\"*\"/>\
             <deny send_type=\"method_call\"/><allow send_type=\"signal\"/>\
             <allow send_requested_reply=\"true\" send_type=\"method_return\"/>\
             <allow send_requested_reply=\"true\" send_type=\"error\"/>\
             <allow receive_type=\"method_call\"/><allow receive_type=\"method_return\"/>\
             <allow receive_type=\"error\"/><allow receive_type=\"signal\"/>\
             <allow send_destination=\"org.freedesktop.DBus\"/></policy>\n\
             <include>{}</include>\n</busconfig>\n",
            socket.display(),
            policy.display()
        ),
    )
    .unwrap();
    let mut bus = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", config.display()))
        .arg("--nofork")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(st) = bus.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut bus.stderr.take().unwrap(), &mut err).unwrap();
            panic!("dbus-daemon refused the policy ({st}): {err}");
        }
        assert!(Instant::now() < deadline, "dbus-daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Root may own the name on that bus.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let owned = rt.block_on(async {
        let conn =
            zbus::connection::Builder::address(format!("unix:path={}", socket.display()).as_str())
                .unwrap()
                .build()
                .await
                .unwrap();
        conn.request_name(DEST).await.is_ok()
    });
    let _ = bus.kill();
    let _ = bus.wait();
    assert!(owned, "root could not own {DEST} under the shipped policy");
}
