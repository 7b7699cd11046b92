//! `make bench`, daemon figures: the time from a bundle stick appearing (the loop device
//! attached; udev's event follows) to the daemon starting its import, and the idle
//! daemon's RSS. Needs root, systemd-udevd, dbus-daemon and a systemd user manager, as
//! the media tests do. Prints a table; asserts nothing.

#[path = "../tests/common/fixture.rs"]
mod fixture;
#[path = "../tests/common/loopdev.rs"]
mod loopdev;
#[path = "common/memory.rs"]
mod memory;
#[path = "../tests/common/node.rs"]
mod node;
#[path = "../tests/common/usermgr.rs"]
mod usermgr;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    loopdev::ensure_udevd();
    let um = usermgr::UserManager::start();
    um.install_crio(usermgr::Reload::Hup);
    um.start_crio();
    let node = um.node();
    let layout = fixture::write_oci_layout(
        &node.scratch("layout"),
        &fixture::small_images("bench.example.com/stick", 2),
    )
    .expect("layout");
    let content = node.scratch("content");
    fs::create_dir_all(&content).expect("content");
    node.bundle_create(&layout, &content.join("b"), &["--name", "stick"]);

    let log = node.scratch("daemon.log");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_longshore"))
        .arg("--sysroot")
        .arg(&node.sysroot)
        .arg("daemon")
        .envs(node.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("log"))
        .spawn()
        .expect("daemon");
    let read_log = || fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_log().contains("ready: following") {
        assert!(
            Instant::now() < deadline,
            "daemon not ready:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(2));
    let idle_rss = memory::status_bytes(daemon.id(), "VmRSS").unwrap_or(0) / 1024;

    let mut latencies = Vec::new();
    for round in 0..5 {
        let image = node.scratch(&format!("stick{round}.img"));
        loopdev::ext4_image(&image, "LONGSHORE", &content, 32);
        let before = read_log().matches("bundle media:").count();
        let start = Instant::now();
        let stick = loopdev::Loop::attach(&image);
        while read_log().matches("bundle media:").count() == before {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no import started:\n{}",
                read_log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        latencies.push(start.elapsed());
        let done = read_log().matches("unmounted").count();
        while read_log().matches("unmounted").count() == done {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(stick);
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();

    latencies.sort();
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!();
    println!("longshore daemon benchmark (5 sticks attached one after another)");
    println!();
    let row =
        |figure: &str, value: String, target: &str| println!("{figure:<46} {value:>12}  {target}");
    row("figure", "longshore".into(), "target");
    row(
        "udev event to import start, median",
        ms(latencies[latencies.len() / 2]),
        "< 1 s",
    );
    row(
        "udev event to import start, worst",
        ms(latencies[latencies.len() - 1]),
        "< 1 s",
    );
    row(
        "idle daemon RSS",
        format!("{:.1} MiB", idle_rss as f64 / 1024.0),
        "< 20 MiB",
    );
}
