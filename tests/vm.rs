//! A real node in a VM (tests/vm/README.md): Debian's own kernel under qemu, longshore
//! installed with `make install` and run by systemd as PID 1 on the guest's system bus,
//! with the stand-in CRI-O ordered after it. USB sticks (vfat, exfat, a raw tar) are
//! plugged in and pulled out over QMP, an ISO goes into the CD drive, and the power is
//! cut mid-import. Each case ends with the images in the guest's store under both
//! names, pinned, CRI-O reloaded once per change, and the media unmounted.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture::{self, Layout};
use common::loopdev::{iso_image, vfat_image};
use common::node::{run_ok, Node};
use common::vm::{self, NodeImage, Stick, Vm};

const PINS: &str = "/etc/crio/crio.conf.d/99-longshore-pinned-images.conf";

/// A run directory for one VM, short enough for qemu's socket paths.
fn run_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/vm")
        .join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// Two small images under `prefix` and a bundle of them in `out` (a directory, or a
/// `.tar`/`.tar.zst` stream), made on the host by the longshore under test.
fn bundle(node: &Node, prefix: &str, out: &Path, extra: &[&str]) -> Layout {
    bundle_of(node, prefix, 2, out, extra)
}

/// [`bundle`] with `n` images.
fn bundle_of(node: &Node, prefix: &str, n: usize, out: &Path, extra: &[&str]) -> Layout {
    let layout = fixture::write_oci_layout(
        &node.scratch(&format!("layout-{}", prefix.replace('/', "-"))),
        &fixture::small_images(prefix, n),
    )
    .unwrap();
    node.bundle_create(&layout, out, extra);
    layout
}

/// What the guest's store, pins and stand-in CRI-O show.
struct Seen {
    names: Vec<String>,
    pins: String,
    hups: usize,
}

fn seen(vm: &Vm) -> Seen {
    // Read as root by the guest; containers-storage's own list of names.
    let images = vm
        .ok("cat /var/lib/containers/storage/overlay-images/images.json 2>/dev/null || echo '[]'");
    let v: serde_json::Value = serde_json::from_str(&images).expect("images.json");
    let names = v
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["names"].as_array().cloned().unwrap_or_default())
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    Seen {
        names,
        pins: vm.sh(&format!("cat {PINS}")).1,
        hups: vm.ok("cat /run/crio-hups").lines().count(),
    }
}

/// Waits until every image of `layout` is stored under its tag and its digest name and
/// pinned under both, and the bundle `name` is recorded as imported.
fn wait_imported(vm: &Vm, name: &str, layout: &Layout, secs: u64) -> Seen {
    vm.wait_until(
        &format!(
            "longshore status --json | grep -q '\"name\": *\"{name}\"' && \
             longshore status --json | tr -d ' \\n' | grep -q '\"name\":\"{name}\",[^}}]*\"state\":\"imported\"'"
        ),
        secs,
    );
    let s = seen(vm);
    for img in &layout.images {
        let repo = img.reference.rsplit_once(':').unwrap().0;
        let by_digest = format!("{repo}@{}", img.manifest_digest);
        for n in [&img.reference, &by_digest] {
            assert!(s.names.contains(n), "{n} not stored: {:?}", s.names);
            assert!(s.pins.contains(n.as_str()), "{n} not pinned:\n{}", s.pins);
        }
    }
    s
}

/// Waits until nothing of longshore's is mounted any more.
fn wait_unmounted(vm: &Vm) {
    vm.wait_until(
        "! grep -q /run/longshore/media /proc/$(systemctl show -p MainPID --value longshore)/mounts",
        60,
    );
}

/// The guest's journal entries with `MESSAGE_ID=id` in this boot, as JSON objects.
fn journal(vm: &Vm, id: &str) -> Vec<serde_json::Value> {
    vm.ok(&format!("journalctl -b -o json --no-pager MESSAGE_ID={id}"))
        .lines()
        .map(|l| serde_json::from_str(l).expect("journal JSON"))
        .collect()
}

/// The lines of the copy log the wrapper keeps (see common/vm.rs), from line `from` on.
fn copies(vm: &Vm, from: usize) -> Vec<String> {
    let text = vm.sh("cat /run/longshore/copies.log").1;
    text.lines().skip(from).map(str::to_string).collect()
}

const DETECTED: &str = "0694dbaaaeb14384977c32f6c298f544";
const IMPORTED: &str = "dace14cd1ca4471f8697171a376ea349";
const FAILED: &str = "2fb6a1ccf3be4217bfe8bf4d0cd12a1c";
const SET_READY: &str = "df616eee526b4fe6a680ffd21c99cea5";

#[test]
fn sticks_and_discs_in_a_real_kernel() {
    if !vm::available() {
        return;
    }
    let image = NodeImage::get();
    let node = Node::new();
    let run = run_dir("media");
    let mut vm = Vm::boot(image, &run, &[]);
    vm.wait_until("systemctl is-active longshore.service crio.service", 120);
    let hups = std::cell::Cell::new(seen(&vm).hups);
    let step = |vm: &Vm, what: &str, name: &str, layout: &Layout| {
        let s = wait_imported(vm, name, layout, 300);
        assert_eq!(s.hups, hups.get() + 1, "{what}: one reload for one change");
        hups.set(s.hups);
        wait_unmounted(vm);
    };

    // A vfat stick labelled LONGSHORE holding a bundle directory, hot-plugged.
    let content = node.scratch("vfat");
    fs::create_dir_all(&content).unwrap();
    let vfat = bundle(
        &node,
        "example.com/vfat",
        &content.join("apps"),
        &["--name", "vfat-apps"],
    );
    let img = run.join("vfat.img");
    vfat_image(&img, "LONGSHORE", &content.join("apps"), 64);
    let stick = Stick::new("vfat", &img);
    vm.plug(&stick);
    step(&vm, "vfat", "vfat-apps", &vfat);
    vm.pull(&stick);

    // An exfat stick holding a .tar.zst. Nothing on the host writes exfat, so the guest
    // fills the stick under another label first, and the host then relabels it.
    let exfat = bundle(
        &node,
        "example.com/exfat",
        &vm.share().join("apps.tar.zst"),
        &["--name", "exfat-apps"],
    );
    let img = run.join("exfat.img");
    run_ok(Command::new("truncate").args(["-s", "64M"]).arg(&img));
    run_ok(Command::new("mkfs.exfat").args(["-L", "FILLING"]).arg(&img));
    let filling = Stick::new("fill", &img).writable();
    vm.plug(&filling);
    vm.ok("udevadm wait --timeout=60 /dev/disk/by-label/FILLING && \
           mount -t exfat /dev/disk/by-label/FILLING /mnt/scratch && \
           cp /mnt/host/apps.tar.zst /mnt/scratch/ && umount /mnt/scratch");
    vm.pull(&filling);
    run_ok(Command::new("exfatlabel").arg(&img).arg("LONGSHORE"));
    let stick = Stick::new("exfat", &img);
    vm.plug(&stick);
    step(&vm, "exfat", "exfat-apps", &exfat);
    vm.pull(&stick);

    // An ISO in the CD drive that is already there: a media change, not a new device.
    let content = node.scratch("iso");
    let iso_layout = bundle(&node, "example.com/iso", &content, &["--name", "iso-apps"]);
    let iso = run.join("apps.iso");
    iso_image(&iso, "LONGSHORE", &content);
    vm.cd_insert(&iso);
    step(&vm, "ISO", "iso-apps", &iso_layout);
    vm.cd_eject();
    vm.wait_until(
        "! udevadm info --query=property /dev/sr0 | grep -q ID_FS_TYPE=iso9660",
        60,
    );
    // Taking the disc out unpins nothing.
    let s = seen(&vm);
    assert!(
        s.pins.contains(&iso_layout.images[0].reference),
        "{}",
        s.pins
    );
    assert_eq!(s.hups, hups.get(), "an eject reloads nothing");

    // A stick whose label matches nothing, then a bundle tar written raw onto a stick.
    // The daemon takes devices in order, so once the raw one is in, the other was judged.
    let content = node.scratch("photos");
    bundle(&node, "example.com/photos", &content, &["--name", "photos"]);
    let img = run.join("photos.img");
    vfat_image(&img, "PHOTOS", &content, 64);
    let photos = Stick::new("photos", &img);
    let daemon_log = |vm: &Vm| vm.ok("journalctl -b -u longshore --no-pager -o cat");
    let logged = daemon_log(&vm).lines().count();
    vm.plug(&photos);
    vm.ok("udevadm wait --timeout=60 /dev/disk/by-label/PHOTOS");
    let photos_dev = vm
        .ok("readlink -f /dev/disk/by-label/PHOTOS")
        .trim()
        .to_string();
    let raw = run.join("raw.tar");
    let raw_layout = bundle(&node, "example.com/raw", &raw, &["--name", "raw-apps"]);
    // Whole sectors: what `dd` onto a stick leaves after the tar is never read.
    run_ok(Command::new("truncate").args(["-s", "%1M"]).arg(&raw));
    let stick = Stick::new("raw", &raw);
    vm.plug(&stick);
    step(&vm, "raw tar", "raw-apps", &raw_layout);
    let status = vm.ok("longshore status --json");
    assert!(!status.contains("\"photos\""), "{status}");
    assert!(!seen(&vm).names.iter().any(|n| n.contains("/photos/")));
    let log: Vec<String> = daemon_log(&vm)
        .lines()
        .skip(logged)
        .map(str::to_string)
        .collect();
    assert!(
        !log.iter()
            .any(|l| l.starts_with(&format!("mounted {photos_dev} "))),
        "{log:?}"
    );
    vm.pull(&stick);
    vm.pull(&photos);

    // A stick pulled out mid-import: copies are slowed, the stick goes once one is done.
    let content = node.scratch("pulled");
    let pulled = bundle_of(
        &node,
        "example.com/pulled",
        3,
        &content,
        &["--name", "pulled"],
    );
    let img = run.join("pulled.img");
    vfat_image(&img, "LONGSHORE_P", &content, 64);
    vm.ok("mkdir -p /etc/longshore-test && echo 4 > /etc/longshore-test/copy-delay");
    let before = copies(&vm, 0).len();
    let stick = Stick::new("pull1", &img);
    vm.plug(&stick);
    vm.wait_until(
        "grep -q '^done .*example.com/pulled' /run/longshore/copies.log",
        300,
    );
    vm.pull(&stick);
    vm.wait_until(
        &format!("journalctl -b -o cat MESSAGE_ID={FAILED} | grep -q 'went away'"),
        120,
    );
    wait_unmounted(&vm);
    let done: Vec<String> = copies(&vm, before)
        .iter()
        .filter_map(|l| l.strip_prefix("done ").map(str::to_string))
        .collect();
    assert!(!done.is_empty());
    let s = seen(&vm);
    assert!(
        !s.pins.contains("example.com/pulled"),
        "nothing of the pulled stick is pinned:\n{}",
        s.pins
    );
    assert_eq!(s.hups, hups.get(), "nothing changed, nothing reloaded");
    let status = vm.ok("longshore status --json");
    assert!(status.contains("\"importing\""), "{status}");

    // The same stick again: only what is missing is copied.
    vm.ok("rm /etc/longshore-test/copy-delay");
    let before = copies(&vm, 0).len();
    let stick = Stick::new("pull2", &img);
    vm.plug(&stick);
    step(&vm, "stick back", "pulled", &pulled);
    let again = copies(&vm, before);
    for d in &done {
        assert!(
            !again.iter().any(|l| l == &format!("start {d}")),
            "{d} was copied again: {again:?}"
        );
    }
    assert!(!again.is_empty(), "the missing names were copied");
    vm.pull(&stick);

    // What an administrator looks at.
    let status = vm.ok("longshore status");
    for b in ["vfat-apps", "exfat-apps", "iso-apps", "raw-apps", "pulled"] {
        assert!(status.contains(b), "{b} not in status:\n{status}");
    }
    let text = vm.ok(
        "busctl get-property io.longshore.Longshore1 /io/longshore/Longshore1 \
         io.longshore.Longshore1.Manager StatusText",
    );
    assert!(text.contains("Idle: 5 of 5 image sets ready"), "{text}");
    let show = vm.ok("systemctl show longshore.service -p StatusText -p ActiveState -p NRestarts");
    assert!(
        show.contains("ActiveState=active") && show.contains("NRestarts=0"),
        "{show}"
    );
    assert!(show.contains("StatusText=Idle: 5 of 5"), "{show}");
    // One "media detected" per bundle stick or disc (the stick pulled counts twice, the
    // stick filled in the guest and PHOTOS not at all), one "imported" per bundle, one
    // abandoned import, and every set ready.
    assert_eq!(journal(&vm, DETECTED).len(), 6, "media detected");
    let imported: Vec<String> = journal(&vm, IMPORTED)
        .iter()
        .map(|e| e["BUNDLE"].as_str().unwrap_or("").to_string())
        .collect();
    for b in ["vfat-apps", "exfat-apps", "iso-apps", "raw-apps", "pulled"] {
        assert!(imported.iter().any(|i| i == b), "{b}: {imported:?}");
    }
    assert_eq!(journal(&vm, FAILED).len(), 1);
    assert!(journal(&vm, SET_READY).len() >= 5);
}

/// A `systemctl show -p PROP --value` number of the guest.
fn show_number(vm: &Vm, unit: &str, prop: &str) -> u64 {
    let v = vm.ok(&format!("systemctl show -p {prop} --value {unit}"));
    v.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{unit} {prop}: {v:?}"))
}

/// The store, the state file and the pins agree, and nothing is left over: every name the
/// store has reads back with the guest's skopeo, every pinned test image is stored, the
/// state file parses, and staging and skopeo's temporary directory are empty.
fn assert_consistent(vm: &Vm) {
    let s = seen(vm);
    for n in &s.names {
        vm.ok(&format!(
            "skopeo inspect --raw 'containers-storage:[overlay@/var/lib/containers/storage+/run/containers/storage]{n}' > /dev/null"
        ));
    }
    for line in s.pins.lines() {
        let Some(pin) = line.trim().strip_prefix('"') else {
            continue;
        };
        let pin = pin.trim_end_matches(',').trim_end_matches('"');
        if pin.starts_with("example.com/") {
            assert!(s.names.iter().any(|n| n == pin), "{pin} pinned, not stored");
        }
    }
    let state = vm.ok("cat /var/lib/longshore/state.json");
    serde_json::from_str::<serde_json::Value>(&state).expect("state.json parses");
    let left = vm.ok(
        "ls -A /var/lib/longshore/staging /var/lib/longshore/tmp 2>/dev/null; \
         ls -A /var/lib/longshore | grep '^\\.' || true",
    );
    let left: Vec<&str> = left
        .lines()
        .filter(|l| !l.is_empty() && !l.ends_with(':'))
        .collect();
    assert!(left.is_empty(), "left over: {left:?}");
}

#[test]
fn a_boot_with_a_critical_stick_and_a_power_cut() {
    if !vm::available() {
        return;
    }
    let image = NodeImage::get();
    let node = Node::new();
    let run = run_dir("boot");

    // The node is switched on with a stick carrying a critical set already in it.
    let content = node.scratch("critical");
    let critical = bundle(
        &node,
        "example.com/critical",
        &content,
        &["--name", "site-critical", "--set", "cni", "--critical"],
    );
    let img = run.join("critical.img");
    vfat_image(&img, "LONGSHORE", &content, 64);
    let stick = Stick::new("crit", &img);
    // usb-storage waits 24 s (instead of 1) before it scans the stick, so its disk comes
    // well after the daemon starts, as with a slow stick or hub on hardware, even on a
    // loaded machine where the guest boots slowly; the daemon waits up to 30 s from its
    // own start, so the stick is still in time.
    let mut vm = Vm::boot_with(
        image,
        &run,
        std::slice::from_ref(&stick),
        "usb-storage.delay_use=24",
    );
    vm.wait_until("systemctl is-active longshore.service crio.service", 300);
    let s = wait_imported(&vm, "site-critical", &critical, 60);
    // READY=1 came after the import, and CRI-O started after READY=1 (systemd's clocks).
    let imported = journal(&vm, IMPORTED);
    assert_eq!(imported.len(), 1, "{imported:?}");
    let imported_at: u64 = imported[0]["__MONOTONIC_TIMESTAMP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ready_at = show_number(&vm, "longshore.service", "ActiveEnterTimestampMonotonic");
    let crio_at = show_number(&vm, "crio.service", "ExecMainStartTimestampMonotonic");
    assert!(
        imported_at < ready_at,
        "imported at {imported_at} µs, ready at {ready_at} µs"
    );
    assert!(
        ready_at <= crio_at,
        "ready at {ready_at} µs, CRI-O at {crio_at} µs"
    );
    // The daemon had to wait for the stick's disk (the 24 s above).
    let log = vm.ok("journalctl -b -u longshore -o cat --no-pager");
    assert!(
        log.contains("waiting for USB storage"),
        "the daemon did not wait for the stick:\n{log}"
    );
    // CRI-O was not running when the pins were first written: no reload was needed.
    assert_eq!(s.hups, 0, "CRI-O started with the pins in place");
    let sets = vm.ok("longshore sets --json");
    assert!(sets.contains("\"critical\": true"), "{sets}");
    wait_unmounted(&vm);
    vm.pull(&stick);

    // A power cut in the middle of an import.
    let content = node.scratch("late");
    let late = bundle_of(&node, "example.com/late", 3, &content, &["--name", "late"]);
    let img = run.join("late.img");
    vfat_image(&img, "LONGSHORE", &content, 64);
    vm.ok("mkdir -p /etc/longshore-test && echo 4 > /etc/longshore-test/copy-delay && sync");
    let stick = Stick::new("late", &img);
    vm.plug(&stick);
    vm.wait_until(
        "grep -q '^done .*example.com/late' /run/longshore/copies.log",
        300,
    );
    let boot_id = vm.ok("cat /proc/sys/kernel/random/boot_id");
    vm.power_cut();

    // Switched on again without the stick: the daemon starts clean, and completes the
    // interrupted import from its cache, where the verified bundle already is.
    let vm = Vm::boot(image, &run, &[]);
    assert_ne!(vm.ok("cat /proc/sys/kernel/random/boot_id"), boot_id);
    vm.wait_until("systemctl is-active longshore.service crio.service", 300);
    vm.ok("rm -f /etc/longshore-test/copy-delay");
    wait_imported(&vm, "late", &late, 300);
    assert_consistent(&vm);
    let log = vm.ok("journalctl -b -u longshore -o cat --no-pager");
    assert!(
        log.contains("bundle late was not completely imported; completing it from the cache"),
        "{log}"
    );
    let status = vm.ok("longshore status --json");
    assert!(status.contains("site-critical"), "{status}");
    let pins = seen(&vm).pins;
    for img in &critical.images {
        assert!(pins.contains(&img.reference), "{pins}");
    }
    // The journal kept the boot before.
    let boots = vm.ok("journalctl --list-boots --no-pager | wc -l");
    assert!(boots.trim().parse::<u32>().unwrap() >= 2, "{boots}");

    // The stick seen again: everything is in, nothing is copied again.
    let before = copies(&vm, 0).len();
    let mut vm = vm;
    vm.plug(&Stick::new("late2", &img));
    vm.wait_until(
        "journalctl -b -u longshore -o cat --no-pager | grep -q 'late.*all 3 images already in the store'",
        300,
    );
    wait_unmounted(&vm);
    assert_eq!(copies(&vm, before), Vec::<String>::new(), "copied again");
    assert_consistent(&vm);
}

/// `LONGSHORE_VM_RUN=DIR LONGSHORE_VM_SH='cmd' cargo test --test vm -- --ignored look`
/// runs a shell line in a VM a failed test left running (`LONGSHORE_VM_KEEP=1`).
#[test]
#[ignore]
fn look() {
    let run = std::env::var("LONGSHORE_VM_RUN").expect("LONGSHORE_VM_RUN");
    let line = std::env::var("LONGSHORE_VM_SH").expect("LONGSHORE_VM_SH");
    let (code, out, err) = Vm::reattach(Path::new(&run)).sh(&line);
    println!("{out}");
    eprintln!("{err}exit {code}");
}
