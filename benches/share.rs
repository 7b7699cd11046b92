//! `make bench`, sharing between nodes. Prints a table; asserts nothing.
//!
//! Figures:
//! - serving one 1 GiB blob to another host: longshore's peer listener (a signed
//!   request, as another node makes it) against docker-registry serving the same file,
//!   both in network namespaces on one LAN of veth links, the client in a third; five
//!   rounds each, taking turns, medians compared;
//! - a set (`BENCH_SHARE_BYTES`, 256 MiB of layer content by default, in
//!   `BENCH_SHARE_IMAGES` images sharing base layers) pulled by four nodes at once with
//!   pull-through on and nothing cached, from a registry behind a link shaped with
//!   `tc tbf` (`BENCH_LINK_MBIT`, 200 by default): the bytes the registry's link sent
//!   against the set's size, and the wall time until every node has the set against one
//!   node pulling it alone with skopeo, straight from the registry; three rounds each.
//!
//! Needs root (network namespaces, tc), docker-registry and skopeo.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/memory.rs"]
mod memory;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Instant;

use common::cluster::{self, repo_at, ClusterNode};
use common::fixture;
use common::netns::{in_netns, Lan};

const ROUNDS: usize = 5;
const DIST_ROUNDS: usize = 3;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn row(figure: &str, ours: &str, base: &str, ratio: Option<f64>, target: &str) {
    let ratio = match ratio {
        Some(r) => format!("{r:.2}"),
        None if figure == "figure" => "ratio".to_string(),
        None => String::new(),
    };
    println!("{figure:<58} {ours:>12} {base:>12} {ratio:>7}  {target}");
}

/// A file of `size` bytes that does not compress, and its digest.
fn random_blob(path: &Path, size: u64) -> longshore::oci::digest::Digest {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(path).unwrap());
    let mut h = longshore::oci::digest::Hasher::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n as u64;
    }
    f.flush().unwrap();
    h.finish().0
}

/// GETs `path` from `addr`, reading the body to its end; the bytes and the seconds.
fn get(addr: &str, path: &str, auth: Option<String>) -> (u64, f64) {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(a) = auth {
        req += &format!("Authorization: {a}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut body = 0u64;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if body == 0 && !head.ends_with(b"\r\n\r\n") {
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                assert!(
                    head.starts_with(b"HTTP/1.1 200"),
                    "{}",
                    String::from_utf8_lossy(&head)
                );
                body = (head.len() - end - 4) as u64;
                head.truncate(end + 4);
            }
        } else {
            body += n as u64;
        }
    }
    (body, started.elapsed().as_secs_f64())
}

fn serving() {
    let size = env_or("BENCH_BLOB_BYTES", 1 << 30);
    let lan = Lan::new(3);
    let up = cluster::upstream(&lan);
    let nodes = cluster::nodes(&lan, &up, "");
    let server = &nodes[0];
    let client = &lan.hosts[1].0;
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("blob");
    let d = random_blob(&blob, size);
    let hex = d.hex();
    // The registry's storage, as docker-registry lays it out, and the cache: one file,
    // linked twice.
    let data = up
        .log
        .as_ref()
        .unwrap()
        .parent()
        .unwrap()
        .join("data/docker/registry/v2");
    let reg_blob = data.join(format!("blobs/sha256/{}/{hex}/data", &hex[..2]));
    fs::create_dir_all(reg_blob.parent().unwrap()).unwrap();
    fs::hard_link(&blob, &reg_blob).unwrap();
    let link = data.join(format!("repositories/bench/blob/_layers/sha256/{hex}/link"));
    fs::create_dir_all(link.parent().unwrap()).unwrap();
    fs::write(&link, format!("sha256:{hex}")).unwrap();
    let cached = server
        .node
        .state_dir()
        .join("cache/blobs/sha256")
        .join(&hex);
    fs::create_dir_all(cached.parent().unwrap()).unwrap();
    fs::hard_link(&blob, &cached).unwrap();
    let key_text =
        fs::read_to_string(server.node.sysroot.join("etc/longshore/cluster.key")).unwrap();
    let key = longshore::share::auth::ClusterKey::parse(&key_text).unwrap();

    let reg_path = format!("/v2/bench/blob/blobs/sha256:{hex}");
    let ours_path = format!(
        "/v2/{}/bench/blob/blobs/sha256:{hex}",
        up.addr.replace(':', "_")
    );
    let ours_addr = format!("{}:5051", server.ip);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let cpu = |pid: u32| -> f64 {
        let st = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let f: Vec<&str> = st
            .rsplit_once(')')
            .map_or("", |x| x.1)
            .split_whitespace()
            .collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (t(11) + t(12)) / 100.0
    };
    let daemon_pid = server.daemon.as_ref().unwrap().pid() as u32;
    let cpu_before = cpu(daemon_pid);
    let reg_before = cpu(up.pid());
    let mut ours_secs = 0.0;
    let mut theirs_secs = 0.0;
    // A round of each first, not counted: the file comes into the page cache.
    // The two take turns, each going first every other round.
    for round in 0..=ROUNDS {
        let ours_get = || {
            in_netns(&client.name, || {
                get(&ours_addr, &ours_path, Some(key.sign("GET", &ours_path)))
            })
        };
        let theirs_get = || in_netns(&client.name, || get(&up.addr, &reg_path, None));
        let ((n, t), (m, u)) = if round % 2 == 0 {
            let a = ours_get();
            (a, theirs_get())
        } else {
            let b = theirs_get();
            (ours_get(), b)
        };
        assert_eq!(n, size);
        assert_eq!(m, size);
        theirs_secs += u;
        ours_secs += t;
        if round > 0 {
            ours.push(size as f64 / t / (1u64 << 20) as f64);
            theirs.push(size as f64 / u / (1u64 << 20) as f64);
        }
    }
    if std::env::var_os("BENCH_CPU").is_some() {
        eprintln!(
            "daemon CPU {:.2} s over {:.2} s of serving; docker-registry CPU {:.2} s over {:.2} s",
            cpu(daemon_pid) - cpu_before,
            ours_secs,
            cpu(up.pid()) - reg_before,
            theirs_secs
        );
    }
    let (o, r) = (median(&mut ours), median(&mut theirs));
    row(
        &format!("serving a {} MiB blob to another host (MiB/s)", size >> 20),
        &format!("{o:.0}"),
        &format!("{r:.0}"),
        Some(o / r),
        ">= 1.0 (docker-registry)",
    );
    let pid = server.daemon.as_ref().unwrap().pid() as u32;
    if let Some(peak) = memory::status_bytes(pid, "VmHWM") {
        row(
            "  peak RSS of the serving daemon",
            &format!("{:.1} MiB", peak as f64 / (1u64 << 20) as f64),
            "",
            None,
            "",
        );
    }
}

/// Bytes sent by the namespace's `eth0`.
fn tx_bytes(ns: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "cat",
            "/sys/class/net/eth0/statistics/tx_bytes",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn distribution() {
    let images = env_or("BENCH_SHARE_IMAGES", 12) as usize;
    let bytes = env_or("BENCH_SHARE_BYTES", 256 << 20);
    let mbit = env_or("BENCH_LINK_MBIT", 200) as u32;
    let lan = Lan::new(5);
    let up = cluster::upstream(&lan);
    let (up_ns, _) = lan.hosts.last().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = fixture::write_oci_layout(
        &dir.path().join("layout"),
        &fixture::bench_images(images, bytes),
    )
    .unwrap();
    cluster::push(&lan, &up, &layout);
    let mut blobs: Vec<(String, u64)> = Vec::new();
    for img in &layout.images {
        blobs.push((img.manifest_digest.clone(), img.manifest_size));
        blobs.push((
            img.config_digest.clone(),
            fs::metadata(layout.blob_path(&img.config_digest))
                .unwrap()
                .len(),
        ));
        blobs.extend(img.layers.iter().map(|l| (l.digest.clone(), l.size)));
    }
    blobs.sort();
    blobs.dedup();
    let set: u64 = blobs.iter().map(|b| b.1).sum();
    up_ns.shape(mbit);

    // One node alone: with pull-through, as each of the four pulls; and straight from
    // the registry with skopeo, for reference (each image on its own: shared layers come
    // again for every image).
    let mut alone = Vec::new();
    let mut alone_sent = Vec::new();
    let mut direct = Vec::new();
    let mut direct_sent = Vec::new();
    for round in 0..DIST_ROUNDS {
        let nodes = cluster::some_nodes(&lan, &up, "upstream = true\n", 1);
        let before = tx_bytes(&up_ns.name);
        let started = Instant::now();
        pull_all(&nodes[0], &up.addr, &layout);
        alone.push(started.elapsed().as_secs_f64());
        alone_sent.push((tx_bytes(&up_ns.name) - before) as f64);
        drop(nodes);

        let (ns, _) = &lan.hosts[0];
        let before = tx_bytes(&up_ns.name);
        let started = Instant::now();
        for img in &layout.images {
            let dest = dir
                .path()
                .join(format!("alone-{round}-{}", &img.manifest_digest[7..19]));
            let out = ns
                .command("skopeo")
                .args(["copy", "-q", "--src-tls-verify=false"])
                .arg(format!(
                    "docker://{}@{}",
                    repo_at(&up.addr, img),
                    img.manifest_digest
                ))
                .arg(format!("dir:{}", dest.display()))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        direct.push(started.elapsed().as_secs_f64());
        direct_sent.push((tx_bytes(&up_ns.name) - before) as f64);
    }

    // Four nodes at once, pull-through on, nothing cached: a new cluster each round.
    let mut four = Vec::new();
    let mut four_sent = Vec::new();
    for _ in 0..DIST_ROUNDS {
        let nodes = cluster::nodes(&lan, &up, "upstream = true\n");
        cluster::wait_joined(&nodes);
        let before = tx_bytes(&up_ns.name);
        let started = Instant::now();
        std::thread::scope(|s| {
            for n in &nodes {
                let (layout, addr) = (&layout, up.addr.clone());
                s.spawn(move || pull_all(n, &addr, layout));
            }
        });
        four.push(started.elapsed().as_secs_f64());
        four_sent.push((tx_bytes(&up_ns.name) - before) as f64);
        if let Some(d) = std::env::var_os("BENCH_LOG_DIR") {
            for (i, n) in nodes.iter().enumerate() {
                let _ = fs::write(Path::new(&d).join(format!("node{i}.log")), n.log());
            }
        }
    }
    let (a, f, d) = (median(&mut alone), median(&mut four), median(&mut direct));
    let (a_sent, f_sent, d_sent) = (
        median(&mut alone_sent),
        median(&mut four_sent),
        median(&mut direct_sent),
    );
    let mib = |b: f64| format!("{:.1} MiB", b / (1u64 << 20) as f64);
    row(
        &format!(
            "set of {images} images ({}), {mbit} Mbit/s to the registry:",
            mib(set as f64)
        ),
        "4 nodes",
        "1 node",
        None,
        "",
    );
    row(
        "  bytes the registry's link sent vs the set",
        &mib(f_sent),
        &mib(set as f64),
        Some(f_sent / set as f64),
        "1.0x (headers and TCP included)",
    );
    row(
        "  the same for one node alone (pull-through)",
        &mib(a_sent),
        &mib(set as f64),
        Some(a_sent / set as f64),
        "ref",
    );
    row(
        "  wall time: 4 nodes at once vs 1 node alone",
        &format!("{f:.2} s"),
        &format!("{a:.2} s"),
        Some(f / a),
        "<= 1.5",
    );
    row(
        "  1 node alone with skopeo, no longshore: time, bytes",
        &format!("{d:.2} s"),
        &mib(d_sent),
        Some(d_sent / set as f64),
        "ref",
    );
}

fn pull_all(n: &ClusterNode, up: &str, layout: &fixture::Layout) {
    for img in &layout.images {
        let got = n
            .pull(up, img)
            .unwrap_or_else(|e| panic!("node {}: {e}\n{}", n.ip, n.log()));
        assert_eq!(got, img.manifest_digest);
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("share benchmark: needs root (network namespaces and tc); skipped");
        return;
    }
    row("figure", "longshore", "baseline", None, "target");
    let only = std::env::var("BENCH_SHARE_ONLY").unwrap_or_default();
    if only.is_empty() || only == "serving" {
        serving();
    }
    if only.is_empty() || only == "distribution" {
        distribution();
    }
}
