//! `make bench`, pre-loading from a registry: `longshore fetch` of a set against a
//! `skopeo copy docker://` loop over the same images, measured in the same run. Prints a
//! table; asserts nothing.
//!
//! Figures:
//! - a 40-image set (about 1 GiB of layer content, shared base layers, named by digest as
//!   a release payload names its images) from a registry in a network namespace of its
//!   own, over a veth link shaped with `tc tbf` (`BENCH_LINK_MBIT`, 400 by default; the
//!   two sides take turns, five runs each, and their medians are compared), and the same
//!   over loopback with no cap: longshore (fetch into the cache, import into the store,
//!   pin) against the loop (each image copied into an empty store);
//! - the same set over a link cut every 64 MiB (a proxy of the bench's own that drops
//!   whichever connection is passing bytes at each 64 MiB that crossed it): the bytes
//!   longshore fetched against the set's size, and what the loop fetched on the same
//!   link (`skopeo copy --retry-times 3`, which starts a cut copy again from nothing);
//! - the rate achieved under `[fetch] max_rate` against the cap.
//!
//! Needs root (network namespaces, tc), docker-registry and skopeo.

#[path = "../tests/common/fixture.rs"]
mod fixture;
#[path = "common/memory.rs"]
mod memory;
#[path = "../tests/common/node.rs"]
mod node;
#[path = "../tests/common/proxy.rs"]
mod proxy;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const LONGSHORE: &str = env!("CARGO_BIN_EXE_longshore");
/// The registry's address on the shaped link, and the node's.
const REG_ADDR: &str = "10.231.7.1";
const NODE_ADDR: &str = "10.231.7.2";
/// Where the link is cut, in bytes.
const CUT_EVERY: u64 = 64 << 20;

/// Directories, namespaces and processes, all taken down when dropped.
struct Sandbox {
    dir: PathBuf,
    netns: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::env::var_os("BENCH_KEEP").is_some() {
            eprintln!(
                "kept {} and {:?} (BENCH_KEEP)",
                self.dir.display(),
                self.netns
            );
            return;
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        node::unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// A command run in network namespace `ns` (the root namespace when `None`).
fn in_ns(ns: Option<&str>, program: &str) -> Command {
    match ns {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n, program]);
            c
        }
        None => Command::new(program),
    }
}

/// Two namespaces joined by a veth pair shaped to `mbit` in both directions.
fn shaped_link(sb: &mut Sandbox, mbit: u32) -> (String, String) {
    let id = std::process::id();
    let (reg, node) = (format!("lsb-reg-{id}"), format!("lsb-node-{id}"));
    for n in [&reg, &node] {
        ip(&["netns", "add", n]);
        sb.netns.push(n.clone());
        ip(&["-n", n, "link", "set", "lo", "up"]);
    }
    let (a, b) = (
        format!("lsbr{}", id % 100_000),
        format!("lsbn{}", id % 100_000),
    );
    ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    ip(&["link", "set", &a, "netns", &reg]);
    ip(&["link", "set", &b, "netns", &node]);
    for (ns, dev, addr) in [(&reg, &a, REG_ADDR), (&node, &b, NODE_ADDR)] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
        run(Command::new("tc").args([
            "-n",
            ns,
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            &format!("{mbit}mbit"),
            "burst",
            "1mb",
            "latency",
            "50ms",
        ]));
    }
    (reg, node)
}

/// docker-registry serving `data` on `addr:port` in `ns`; waits until it answers.
fn registry(sb: &mut Sandbox, ns: Option<&str>, data: &Path, addr: &str, port: u16) {
    let config = sb.dir.join(format!("registry-{addr}-{port}.yml"));
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}:{port}\n",
            data.display()
        ),
    )
    .expect("registry config");
    let child = in_ns(ns, "docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting docker-registry");
    sb.children.push(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = in_ns(ns, "bash")
            .arg("-c")
            .arg(format!(
                "exec 3<>/dev/tcp/{addr}/{port} && printf 'GET /v2/ HTTP/1.0\\r\\n\\r\\n' >&3 && head -c 8 <&3"
            ))
            .output()
            .expect("probe");
        if String::from_utf8_lossy(&probe.stdout).starts_with("HTTP/1.") {
            return;
        }
        assert!(Instant::now() < deadline, "registry on {addr}:{port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn store(root: &Path) -> String {
    format!(
        "containers-storage:[overlay@{}+{}]",
        root.join("storage").display(),
        root.join("run").display()
    )
}

/// Each image copied with `skopeo copy docker://` into the store under `root`; returns the
/// wall time and how many copies failed (the first failure's message is printed).
fn skopeo_loop(ns: Option<&str>, refs: &[String], root: &Path, retries: bool) -> (Duration, usize) {
    let dest = store(root);
    let start = Instant::now();
    let mut failed = 0;
    for r in refs {
        let mut cmd = in_ns(ns, "skopeo");
        cmd.args(["copy", "--quiet", "--src-tls-verify=false"]);
        if retries {
            cmd.args(["--retry-times", "3"]);
        }
        let out = cmd
            .arg(format!("docker://{r}"))
            .arg(format!("{dest}{r}"))
            .stdout(Stdio::null())
            .output()
            .expect("skopeo");
        if !out.status.success() {
            if failed == 0 {
                let text = String::from_utf8_lossy(&out.stderr);
                eprintln!("skopeo copy {r}: {}", text.trim());
            }
            failed += 1;
        }
    }
    (start.elapsed(), failed)
}

/// A node's root for `longshore --sysroot`: the set file naming `refs`, registries.conf
/// marking `host` insecure (plain HTTP), no CRI-O to reload, and `extra` configuration.
fn sysroot(dir: &Path, host: &str, refs: &[String], extra: &str) -> PathBuf {
    let _ = fs::remove_dir_all(dir);
    let sets = dir.join("etc/longshore/sets.d");
    let config = dir.join("etc/longshore/config.d");
    let containers = dir.join("etc/containers");
    for d in [&sets, &config, &containers] {
        fs::create_dir_all(d).expect("sysroot");
    }
    let list: Vec<String> = refs.iter().map(|r| format!("{r:?}")).collect();
    fs::write(
        sets.join("bench.toml"),
        format!("images = [{}]\n", list.join(", ")),
    )
    .expect("set file");
    fs::write(
        config.join("50-bench.toml"),
        format!("[crio]\nreload = false\n{extra}"),
    )
    .expect("config");
    fs::write(
        containers.join("registries.conf"),
        format!("[[registry]]\nlocation = \"{host}\"\ninsecure = true\n"),
    )
    .expect("registries.conf");
    dir.to_path_buf()
}

/// `longshore fetch --json` on `root` in `ns`: the wall time, the report, and the peak
/// RSS of the longshore process (VmHWM, sampled every 5 ms; skopeo's is not counted).
fn longshore_fetch(ns: Option<&str>, root: &Path) -> (Duration, serde_json::Value, u64) {
    let start = Instant::now();
    let mut child = in_ns(ns, LONGSHORE)
        .arg("--sysroot")
        .arg(root)
        .args(["fetch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("longshore fetch");
    // Output is read on threads of its own, so a full pipe never stalls the fetch.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut b);
        b
    });
    // Under `ip netns exec`, the child execs longshore in place: same pid.
    let (status, peak) = memory::wait_with_peak(&mut child);
    let took = start.elapsed();
    let (stdout, stderr) = (
        out_reader.join().expect("stdout"),
        err_reader.join().expect("stderr"),
    );
    if let Some(dir) = std::env::var_os("BENCH_LOG_DIR") {
        let name = root
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let _ = fs::write(Path::new(&dir).join(format!("{name}.log")), &stderr);
    }
    let report: serde_json::Value = serde_json::from_slice(&stdout)
        .unwrap_or_else(|e| panic!("longshore fetch: {e}: {}", String::from_utf8_lossy(&stderr)));
    assert!(
        status.success(),
        "longshore fetch failed: {report}\n{}",
        String::from_utf8_lossy(&stderr)
    );
    (took, report, peak)
}

/// How often each side runs on the shaped link.
const ROUNDS: usize = 5;

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

fn row(figure: &str, ours: &str, base: &str, ratio: Option<f64>, target: &str) {
    let ratio = match ratio {
        Some(r) => format!("{r:.2}"),
        None if figure == "figure" => "ratio".to_string(),
        None => String::new(),
    };
    println!("{figure:<52} {ours:>12} {base:>12} {ratio:>7}  {target}");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("preload benchmark: needs root (network namespaces and tc); skipped");
        return;
    }
    let images: usize = std::env::var("BENCH_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let total: u64 = std::env::var("BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let mbit: u32 = std::env::var("BENCH_LINK_MBIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let mut sb = Sandbox {
        dir: base.join(format!("longshore-preload-{}", std::process::id())),
        netns: vec![],
        children: vec![],
    };
    fs::create_dir_all(&sb.dir).expect("bench dir");

    eprintln!(
        "generating {images} images, {} of layer content ...",
        mib(total)
    );
    let specs = fixture::bench_images(images, total);
    let layout = fixture::write_oci_layout(&sb.dir.join("layout"), &specs).expect("layout");
    let blob_bytes: u64 = {
        let mut seen = std::collections::BTreeMap::new();
        for i in &layout.images {
            for l in &i.layers {
                seen.insert(l.digest.clone(), l.size);
            }
            let c = fs::metadata(layout.blob_path(&i.config_digest)).expect("config");
            seen.insert(i.config_digest.clone(), c.len());
        }
        seen.values().sum()
    };

    // The registry, in a namespace of its own behind the shaped link; filled from
    // inside that namespace, so the pushes do not cross the link.
    let (reg_ns, node_ns) = shaped_link(&mut sb, mbit);
    let data = sb.dir.join("registry");
    registry(&mut sb, Some(&reg_ns), &data, REG_ADDR, 5000);
    let far = format!("{REG_ADDR}:5000");
    eprintln!("pushing {images} images ...");
    for img in &layout.images {
        let repo = img.reference.trim_start_matches("bench.example.com/");
        run(in_ns(Some(&reg_ns), "skopeo").args([
            "copy".to_string(),
            "--quiet".into(),
            "--dest-tls-verify=false".into(),
            layout.transport_ref(&img.reference),
            format!("docker://{far}/{repo}"),
        ]));
    }
    // As a release names its payload: by digest.
    let refs_at = |host: &str| -> Vec<String> {
        layout
            .images
            .iter()
            .map(|i| {
                let repo = i.reference.trim_start_matches("bench.example.com/");
                let repo = repo.split(':').next().expect("repository");
                format!("{host}/{repo}@{}", i.manifest_digest)
            })
            .collect()
    };

    // 1. The shaped link: each side five times, taking turns, each into an empty store
    // and (longshore) an empty cache; the medians are compared.
    let refs = refs_at(&far);
    let (mut loops, mut ours) = (vec![], vec![]);
    for round in 0..ROUNDS {
        eprintln!(
            "shaped link ({mbit} Mbit/s), round {}: skopeo copy loop ...",
            round + 1
        );
        let dir = sb.dir.join("loop-shaped");
        let (t, failed) = skopeo_loop(Some(&node_ns), &refs, &dir, false);
        assert_eq!(failed, 0, "the loop failed on a clean link");
        loops.push(t);
        node::unmount_under(&dir);
        let _ = fs::remove_dir_all(&dir);
        eprintln!("shaped link, round {}: longshore fetch ...", round + 1);
        let dir = sb.dir.join("node-shaped");
        let root = sysroot(&dir, &far, &refs, "");
        let (t, report, _) = longshore_fetch(Some(&node_ns), &root);
        assert_eq!(report["missing"], 0, "{report}");
        ours.push(t);
        node::unmount_under(&dir);
    }
    let (loop_shaped, ours_shaped) = (median(&mut loops), median(&mut ours));

    // 2. Loopback, no cap: a second registry on the same data in this namespace.
    let port = free_port();
    registry(&mut sb, None, &data, "127.0.0.1", port);
    let near = format!("127.0.0.1:{port}");
    let refs = refs_at(&near);
    eprintln!("loopback: skopeo copy loop ...");
    let (loop_lo, loop_failed) = skopeo_loop(None, &refs, &sb.dir.join("loop-lo"), false);
    assert_eq!(loop_failed, 0, "the loop failed on loopback");
    eprintln!("loopback: longshore fetch ...");
    let root = sysroot(&sb.dir.join("node-lo"), &near, &refs, "");
    let (ours_lo, report, ours_rss) = longshore_fetch(None, &root);
    assert_eq!(report["missing"], 0, "{report}");

    // 3. A link cut every 64 MiB.
    let cut = proxy::start_proxy(port, proxy::Fault::CutLinkEvery { bytes: CUT_EVERY });
    let via = format!("127.0.0.1:{}", cut.port);
    let refs = refs_at(&via);
    eprintln!("cut link: longshore fetch ...");
    let root = sysroot(&sb.dir.join("node-cut"), &via, &refs, "");
    let (ours_cut, report, _) = longshore_fetch(None, &root);
    assert_eq!(report["missing"], 0, "{report}");
    let ours_cut_bytes = cut.body_bytes.swap(0, Ordering::SeqCst);
    eprintln!("cut link: skopeo copy loop (--retry-times 3) ...");
    let (loop_cut, loop_cut_failed) = skopeo_loop(None, &refs, &sb.dir.join("loop-cut"), true);
    let loop_cut_bytes = cut.body_bytes.load(Ordering::SeqCst);

    // 4. The rate cap, over loopback: half the images, capped at 32 MiB/s.
    let cap: u64 = 32 << 20;
    let few = &refs_at(&near)[..images.div_ceil(2)];
    eprintln!("max_rate = 32MiB: longshore fetch ...");
    let root = sysroot(
        &sb.dir.join("node-rate"),
        &near,
        few,
        "[fetch]\nmax_rate = \"32MiB\"\n",
    );
    let (_, report, _) = longshore_fetch(None, &root);
    let got = report["downloaded"].as_u64().unwrap_or(0);
    let ms = report["transferMs"].as_u64().unwrap_or(1).max(1);
    let achieved = got as f64 / (ms as f64 / 1000.0);

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!();
    println!(
        "longshore pre-load benchmark: {images} images named by digest, {} of blobs",
        mib(blob_bytes)
    );
    println!();
    row("figure", "longshore", "baseline", None, "target");
    row(
        &format!("pre-load vs skopeo copy loop, {mbit} Mbit/s link"),
        &secs(ours_shaped),
        &secs(loop_shaped),
        Some(ratio(ours_shaped, loop_shaped)),
        "<= 0.80",
    );
    let all = |t: &[Duration]| {
        t.iter()
            .map(|d| format!("{:.1}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "  (medians of {ROUNDS}; longshore {} s, loop {} s)",
        all(&ours),
        all(&loops)
    );
    row(
        "pre-load vs skopeo copy loop, loopback",
        &secs(ours_lo),
        &secs(loop_lo),
        Some(ratio(ours_lo, loop_lo)),
        "(reference)",
    );
    row(
        "bytes fetched over a link cut every 64 MiB vs set",
        &mib(ours_cut_bytes),
        &mib(blob_bytes),
        Some(ours_cut_bytes as f64 / blob_bytes as f64),
        "<= 1.05",
    );
    row(
        &format!(
            "  the loop on that link ({} of {images} failed)",
            loop_cut_failed
        ),
        &mib(loop_cut_bytes),
        &mib(blob_bytes),
        Some(loop_cut_bytes as f64 / blob_bytes as f64),
        "(reference)",
    );
    row(
        "  time on that link: longshore vs the loop",
        &secs(ours_cut),
        &secs(loop_cut),
        Some(ratio(ours_cut, loop_cut)),
        "(reference)",
    );
    row(
        "rate under max_rate = 32MiB (per s)",
        &mib(achieved as u64),
        &mib(cap),
        Some(achieved / cap as f64),
        "0.95 - 1.05",
    );
    row(
        "peak RSS, longshore fetch over loopback",
        &mib(ours_rss),
        "",
        None,
        "< 64 MiB",
    );
    drop(sb);
}
