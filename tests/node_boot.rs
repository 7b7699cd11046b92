//! A node booted with systemd as PID 1 (systemd-nspawn on a debootstrapped Debian 12):
//! longshore installed with `make install`, its hardened unit started by the real system
//! manager, its bus policy loaded by the real system bus, a stand-in `crio.service`
//! ordered after it. A check unit inside imports a bundle through the CLI and the daemon
//! and records what the node shows; the test reads it afterwards.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture;
use common::node::{require, run_ok as run, Node};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A Debian 12 root with systemd, dbus and skopeo, made once and kept under target/.
fn base_rootfs() -> PathBuf {
    let base = Path::new(ROOT).join("target/packaging/node-rootfs");
    // Named for what it holds, so a root made with other packages is made again.
    let ready = base.join(".longshore-ready-jq");
    if !ready.exists() {
        fs::create_dir_all(base.parent().unwrap()).unwrap();
        // The package mirror is the one outside thing here; a second try rides out a
        // dropped connection.
        for attempt in 1..=2 {
            let _ = fs::remove_dir_all(&base);
            let out = Command::new("debootstrap")
                .args([
                    "--variant=minbase",
                    "--include=systemd,systemd-sysv,dbus,containernetworking-plugins,skopeo,jq",
                    "bookworm",
                ])
                .arg(&base)
                .arg("http://deb.debian.org/debian")
                .output()
                .expect("running debootstrap");
            if out.status.success() {
                break;
            }
            assert!(
                attempt < 2,
                "debootstrap failed twice:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        fs::write(&ready, "").unwrap();
    }
    base
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn enable(root: &Path, unit: &str) {
    common::node::enable_unit(root, unit);
}

const CHECK: &str = r#"#!/bin/sh
# Runs once longshore.service and crio.service are up; records what the node shows.
out=/out
exec > $out/check.log 2>&1
set -x
systemctl is-active longshore.service > $out/active
systemctl show longshore.service -p Type -p ActiveState -p StatusText -p NRestarts > $out/show
systemctl show crio.service -p After > $out/crio-after
grep -E '^Cap(Bnd|Eff)' /proc/$(systemctl show -p MainPID --value longshore.service)/status > $out/caps
longshore import /srv/bundle > $out/import.out 2> $out/import.err
echo $? > $out/import.rc
longshore status --json > $out/status.json 2> $out/status.err
busctl tree --list io.longshore.Longshore1 > $out/tree
setpriv --reuid=65534 --regid=65534 --clear-groups busctl get-property io.longshore.Longshore1 /io/longshore/Longshore1 io.longshore.Longshore1.Manager StatusText > $out/nobody-get 2>&1
echo $? > $out/nobody-get.rc
setpriv --reuid=65534 --regid=65534 --clear-groups busctl call io.longshore.Longshore1 /io/longshore/Longshore1 io.longshore.Longshore1.Manager Rescan > $out/nobody-call 2>&1
echo $? > $out/nobody-call.rc
cat /etc/crio/crio.conf.d/99-longshore-pinned-images.conf > $out/pins
cat /run/crio-hups > $out/hups
# Removing longshore as docs/install.md says: unpin, then stop and disable the unit.
for s in $(longshore sets --json | jq -r '.sets[] | select(.source.kind == "bundle") | .name'); do
    longshore sets remove "$s" >> $out/remove.out 2>&1
done
ls /etc/crio/crio.conf.d > $out/dropins-after
cat /run/crio-hups > $out/hups-after
systemctl disable --now longshore.service > $out/disable 2>&1
systemctl show longshore.service -p ActiveState -p Result -p UnitFileState > $out/show-after
journalctl -u longshore.service -o verbose --no-pager > $out/journal
systemctl poweroff
"#;

#[test]
fn a_booted_node_runs_the_installed_unit_and_imports_through_it() {
    if !require(&["make", "debootstrap", "systemd-nspawn", "skopeo"]) {
        return;
    }
    let base = base_rootfs();
    let tmp = tempfile::Builder::new()
        .prefix("longshore-boot")
        .tempdir_in(Path::new(ROOT).join("target/packaging"))
        .unwrap();
    let root = tmp.path().join("root");
    run(Command::new("cp").arg("-a").arg(&base).arg(&root));
    let out = tmp.path().join("out");
    fs::create_dir_all(&out).unwrap();

    // longshore as make install lays it out, and a bundle to import.
    run(Command::new("make")
        .current_dir(ROOT)
        .args([
            "install",
            "CARGO_PROFILE=dev",
            "TARGET_DIR=target/packaging",
        ])
        .arg(format!("DESTDIR={}", root.display())));
    let node = Node::new();
    let layout = fixture::write_oci_layout(
        &node.scratch("layout"),
        &fixture::small_images("example.com/boot", 2),
    )
    .unwrap();
    node.bundle_create(
        &layout,
        &root.join("srv/bundle"),
        &["--name", "site", "--set", "line-1"],
    );
    enable(&root, "longshore.service");

    // The stand-in for CRI-O, and the check that runs when both are up.
    write(
        &root.join("etc/systemd/system/crio.service"),
        "[Unit]\nDescription=stand-in for CRI-O\n\n[Service]\n\
         ExecStart=/bin/sh -c 'trap \"echo hup >> /run/crio-hups\" HUP; touch /run/crio-hups; while :; do sleep 1 & wait $$!; done'\n\
         ExecReload=/bin/sh -c 'kill -HUP $MAINPID'\n\n[Install]\nWantedBy=multi-user.target\n",
    );
    enable(&root, "crio.service");
    write(&root.join("usr/local/sbin/longshore-check"), CHECK);
    run(Command::new("chmod")
        .arg("0755")
        .arg(root.join("usr/local/sbin/longshore-check")));
    write(
        &root.join("etc/systemd/system/longshore-check.service"),
        "[Unit]\nAfter=longshore.service crio.service\nWants=longshore.service crio.service\n\n\
         [Service]\nType=oneshot\nExecStart=/usr/local/sbin/longshore-check\n\n\
         [Install]\nWantedBy=multi-user.target\n",
    );
    enable(&root, "longshore-check.service");

    let boot = Command::new("timeout")
        .arg("300")
        .arg("systemd-nspawn")
        .args([
            "-q",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            "-b",
            "-D",
        ])
        .arg(&root)
        .arg(format!("--bind={}:/out", out.display()))
        .output()
        .unwrap();
    let read = |f: &str| fs::read_to_string(out.join(f)).unwrap_or_default();
    let messages: Vec<String> = read("journal")
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("MESSAGE="))
        .map(str::to_string)
        .collect();
    let context = format!(
        "boot: {}\n{}\ncheck:\n{}\nimport:\n{}\njournal:\n{}",
        boot.status,
        String::from_utf8_lossy(&boot.stderr),
        read("check.log"),
        read("import.err"),
        messages.join("\n")
    );
    assert_eq!(read("active").trim(), "active", "{context}");

    // Type=notify, with the daemon's status line, never restarted.
    let show = read("show");
    assert!(show.contains("Type=notify"), "{show}");
    assert!(
        show.contains("StatusText=Idle: 0 of 0 image sets ready"),
        "{show}\n{context}"
    );
    assert!(show.contains("NRestarts=0"), "{show}");
    // Ordered before CRI-O.
    assert!(
        read("crio-after").contains("longshore.service"),
        "{}",
        read("crio-after")
    );
    // Running with the unit's capability bounding set: CAP_SYS_ADMIN (21), CAP_SYS_CHROOT
    // (18), CAP_CHOWN (0), CAP_DAC_OVERRIDE (1), CAP_DAC_READ_SEARCH (2), CAP_FOWNER (3),
    // CAP_FSETID (4), CAP_MKNOD (27), CAP_SETFCAP (31).
    let want: u64 = [21u32, 18, 0, 1, 2, 3, 4, 27, 31]
        .iter()
        .map(|b| 1u64 << b)
        .sum();
    let caps = read("caps");
    assert!(caps.contains(&format!("CapBnd:\t{want:016x}")), "{caps}");

    // The CLI went through the daemon on the system bus, and the bundle is in and pinned.
    assert_eq!(
        read("import.rc").trim(),
        "0",
        "{}\n{context}",
        read("import.err")
    );
    // Lines from the daemon's Progress signals: only the D-Bus path prints them.
    assert!(
        read("import.err").contains("site: copied example.com/boot/img1@"),
        "{}",
        read("import.err")
    );
    let status: serde_json::Value =
        serde_json::from_str(&read("status.json")).expect("status JSON");
    assert_eq!(status["bundles"][0]["state"], "imported", "{status}");
    assert_eq!(status["daemon"]["state"], "idle", "{status}");
    let pins = read("pins");
    for img in &layout.images {
        assert!(pins.contains(&img.reference), "{pins}");
    }
    assert!(read("hups").lines().count() >= 1, "CRI-O was reloaded");
    assert!(
        read("tree").contains("/io/longshore/Longshore1/set/line_2d1"),
        "{}",
        read("tree")
    );

    // The bus policy: anyone reads, only root calls.
    assert_eq!(read("nobody-get.rc").trim(), "0", "{}", read("nobody-get"));
    assert_ne!(read("nobody-call.rc").trim(), "0");
    assert!(
        read("nobody-call").contains("Access denied")
            || read("nobody-call").contains("AccessDenied"),
        "{}",
        read("nobody-call")
    );

    // Removed as docs/install.md says: the pins go, CRI-O is reloaded once more, and the
    // unit stops cleanly.
    assert!(
        read("remove.out").contains("removed set line-1"),
        "{}",
        read("remove.out")
    );
    assert!(
        !read("dropins-after").contains("99-longshore-pinned-images.conf"),
        "{}",
        read("dropins-after")
    );
    assert!(read("hups-after").lines().count() > read("hups").lines().count());
    let after = read("show-after");
    assert!(
        after.contains("ActiveState=inactive") && after.contains("Result=success"),
        "{after}"
    );
    assert!(after.contains("UnitFileState=disabled"), "{after}");

    // The journal carries the structured fields and the fixed MESSAGE_IDs under their
    // own names, as `journalctl MESSAGE_ID=…` looks for them (not `F_MESSAGE_ID`).
    let journal = read("journal");
    let fields: Vec<&str> = journal.lines().map(str::trim_start).collect();
    assert!(
        fields.contains(&"MESSAGE_ID=dace14cd1ca4471f8697171a376ea349"),
        "{journal}"
    );
    assert!(fields.contains(&"BUNDLE=site"), "{journal}");
}
