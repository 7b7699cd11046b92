//! Nodes of one cluster share what one of them has: each node is a network namespace of
//! the test's own with its own daemon, store, cache and registries.conf.d, on one LAN
//! with an upstream registry (docker-registry) in a namespace of its own. Images are
//! pulled with the real skopeo through each node's registries.conf, as CRI-O would.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::{cluster, digests, push, wait_joined, ClusterNode};
use common::fixture::{self, ImageSpec, LayerSpec, Layout};
use common::netns::Lan;
use common::node::{require, Node};
use common::registry::Registry;

const TOOLS: &[&str] = &[
    "skopeo",
    "docker-registry",
    "dbus-daemon",
    "unshare",
    "ip",
    "tc",
];

/// The cluster tests run one at a time: four daemons each are load enough for a small
/// machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn images(prefix: &str, n: usize, big: Option<usize>) -> Vec<ImageSpec> {
    let mut specs = fixture::small_images(prefix, n);
    if let Some(size) = big {
        specs.push(ImageSpec {
            reference: format!("{prefix}/big:1"),
            layers: vec![LayerSpec { seed: 7, size }],
        });
    }
    specs
}

fn scratch_layout(dir: &Path, specs: &[ImageSpec]) -> Layout {
    fixture::write_oci_layout(dir, specs).unwrap()
}

fn bundle_of(node: &Node, layout: &Layout) -> PathBuf {
    let out = node.scratch("cluster.tar.zst");
    node.bundle_create(layout, &out, &["--name", "cluster"]);
    out
}

#[test]
fn nodes_take_a_bundles_images_from_the_node_that_has_them_even_when_one_dies_mid_blob() {
    if !require(TOOLS) {
        return;
    }
    let _one = one_at_a_time();
    let lan = Lan::new(5);
    let (mut nodes, reg) = cluster(&lan, "");
    let up = reg.addr.clone();
    let dir = tempfile::tempdir().unwrap();
    // The layer is random data, so it does not compress: 48 MiB cross the link.
    let layout = scratch_layout(
        &dir.path().join("layout"),
        &images(&format!("{up}/share"), 3, Some(48 << 20)),
    );
    // The registry has them too, but must never be asked.
    push(&lan, &reg, &layout);
    let before = reg.requests().len();
    let b = bundle_of(&nodes[0].node, &layout);
    nodes[0].node.ok(&["import", b.to_str().unwrap()]);
    wait_joined(&nodes);

    // The second node takes every image from the first.
    for img in &layout.images {
        let got = nodes[1]
            .pull(&up, img)
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", nodes[1].log(), nodes[0].log()));
        assert_eq!(got, img.manifest_digest);
    }
    let layers: std::collections::BTreeMap<&str, u64> = layout
        .images
        .iter()
        .flat_map(|i| i.layers.iter().map(|l| (l.digest.as_str(), l.size)))
        .collect();
    let set: u64 = layers.values().sum();
    std::thread::sleep(Duration::from_millis(2500));
    let fetched = nodes[1].board()["fetched_peer"].as_u64().unwrap();
    assert!(
        fetched >= set && fetched < set + (1 << 20),
        "{fetched} fetched for a set of {set}"
    );

    // The third node pulls the big image over slow links from the first two; the one
    // sending it is killed mid-blob, and the other sends the rest.
    for n in &nodes[..2] {
        let ns = lan.hosts.iter().find(|(ns, _)| ns.name == n.ns).unwrap();
        ns.0.shape(24);
    }
    let big = layout.images.last().unwrap();
    let big_size = big.layers[0].size;
    let pids: Vec<i32> = nodes[..2]
        .iter()
        .map(|n| n.daemon.as_ref().unwrap().pid())
        .collect();
    let served = |i: usize| {
        nodes[i].board()["served_peer"]["bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    let base = [served(0), served(1)];
    let (victim, res) = std::thread::scope(|s| {
        let third = &nodes[2];
        let up = up.clone();
        let h = s.spawn(move || third.pull(&up, big));
        let deadline = Instant::now() + Duration::from_secs(60);
        let victim = loop {
            let sending = (0..2).find(|i| served(*i) > base[*i] + (4 << 20));
            if let Some(i) = sending {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pids[i]),
                    nix::sys::signal::Signal::SIGKILL,
                );
                break i;
            }
            assert!(Instant::now() < deadline, "no node sends the big layer");
            std::thread::sleep(Duration::from_millis(100));
        };
        (victim, h.join().unwrap())
    });
    let got = res.unwrap_or_else(|e| panic!("{e}\n{}", nodes[2].log()));
    assert_eq!(got, big.manifest_digest);
    let log = nodes[2].log();
    assert!(log.contains("asking the next provider"), "{log}");
    std::thread::sleep(Duration::from_millis(2500));
    let third = nodes[2].board()["fetched_peer"].as_u64().unwrap();
    assert!(
        third >= big_size && (third as f64) < big_size as f64 * 1.05,
        "{third} bytes fetched for a layer of {big_size}: resumed at the byte?"
    );
    nodes[victim].daemon.take();

    // The fourth node still gets everything, from those left.
    for img in &layout.images {
        let got = nodes[3]
            .pull(&up, img)
            .unwrap_or_else(|e| panic!("{e}\n{}", nodes[3].log()));
        assert_eq!(got, img.manifest_digest);
    }
    let after: Vec<String> = reg.requests()[before..].to_vec();
    for img in &layout.images {
        for d in digests(img) {
            assert!(
                !after.iter().any(|r| r.contains(&d)),
                "upstream asked for {d}: {after:?}"
            );
        }
    }
}

/// How many times the registry's log shows a GET of each of `digests` (hex).
fn sent(reg: &Registry, from: usize, digests: &[String]) -> Vec<(String, usize)> {
    let log = std::fs::read_to_string(reg.log.as_ref().unwrap()).unwrap_or_default();
    let gets: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("response completed") && l.contains("http.request.method=GET"))
        .collect();
    let _ = from;
    digests
        .iter()
        .map(|d| {
            (
                d.clone(),
                gets.iter().filter(|l| l.contains(d.as_str())).count(),
            )
        })
        .collect()
}

#[test]
fn pull_through_sends_each_blob_from_upstream_once_and_a_hostile_copy_is_refused() {
    if !require(TOOLS) {
        return;
    }
    let _one = one_at_a_time();
    let lan = Lan::new(5);
    let (nodes, reg) = cluster(&lan, "upstream = true\n");
    let up = reg.addr.clone();
    let dir = tempfile::tempdir().unwrap();
    let layout = scratch_layout(
        &dir.path().join("layout"),
        &images(&format!("{up}/share"), 3, Some(6 << 20)),
    );
    push(&lan, &reg, &layout);
    let pushed = reg.requests().len();
    wait_joined(&nodes);

    // Nothing pre-loaded anywhere; all four pull the whole set at once.
    std::thread::scope(|s| {
        for n in &nodes {
            let (layout, up) = (&layout, up.clone());
            s.spawn(move || {
                for img in &layout.images {
                    let got = n
                        .pull(&up, img)
                        .unwrap_or_else(|e| panic!("node {}: {e}\n{}", n.ip, n.log()));
                    assert_eq!(got, img.manifest_digest);
                }
            });
        }
    });
    let mut all: Vec<String> = layout.images.iter().flat_map(digests).collect();
    all.sort();
    all.dedup();
    for (d, n) in sent(&reg, pushed, &all) {
        assert_eq!(n, 1, "the registry sent {d} {n} times");
    }

    // Nodes whose copy of a layer is wrong (a disk gone bad, or worse) offer it; the
    // node that takes it refuses it by digest and still gets the image, from the
    // registry in the end.
    let more = scratch_layout(
        &dir.path().join("more"),
        &[ImageSpec {
            reference: format!("{up}/share/other:1"),
            layers: vec![LayerSpec {
                seed: 99,
                size: 1 << 20,
            }],
        }],
    );
    push(&lan, &reg, &more);
    let other = &more.images[0];
    nodes[0].pull(&up, other).unwrap();
    let layer = other.layers[0]
        .digest
        .trim_start_matches("sha256:")
        .to_string();
    // Whichever nodes hold it (the one that pulled, and the one that pulled it through
    // for it) hold it wrong; a node that lacks it pulls the image.
    let holds = |n: &ClusterNode| {
        n.node
            .state_dir()
            .join("cache/blobs/sha256")
            .join(&layer)
            .exists()
    };
    let taker = nodes
        .iter()
        .position(|n| !holds(n))
        .expect("a node without it");
    let mut spoiled = 0;
    for n in nodes.iter().filter(|n| holds(n)) {
        let cached = n.node.state_dir().join("cache/blobs/sha256").join(&layer);
        let mut bytes = fs::read(&cached).unwrap();
        bytes[1000] ^= 0xff;
        fs::write(&cached, &bytes).unwrap();
        spoiled += 1;
    }
    assert!(spoiled >= 1);
    let taker = &nodes[taker];
    let got = taker
        .pull(&up, other)
        .unwrap_or_else(|e| panic!("{e}\n{}", taker.log()));
    assert_eq!(got, other.manifest_digest);
    let log = taker.log();
    assert!(log.contains("not asked for it again"), "{log}");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(taker.board()["rejected"].as_u64().unwrap() >= 1);
    // What it keeps is the layer itself, and no partial is left.
    let kept = taker.node.state_dir().join("cache/blobs/sha256");
    assert_eq!(
        fs::read(kept.join(&layer)).unwrap(),
        fs::read(more.blob_path(&other.layers[0].digest)).unwrap()
    );
    let partials: Vec<_> = fs::read_dir(&kept)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
}

#[test]
fn never_contact_source_keeps_every_node_off_the_registry() {
    if !require(TOOLS) {
        return;
    }
    let _one = one_at_a_time();
    let lan = Lan::new(3);
    let (nodes, reg) = cluster(&lan, "never_contact_source = true\nupstream = true\n");
    let up = reg.addr.clone();
    let dir = tempfile::tempdir().unwrap();
    let layout = scratch_layout(
        &dir.path().join("layout"),
        &images(&format!("{up}/share"), 2, None),
    );
    push(&lan, &reg, &layout);
    let pushed = reg.requests().len();
    // The first node has the first image only.
    let one = Layout {
        dir: layout.dir.clone(),
        images: vec![layout.images[0].clone()],
    };
    let b = bundle_of(&nodes[0].node, &one);
    nodes[0].node.ok(&["import", b.to_str().unwrap()]);
    let text = fs::read_to_string(
        nodes[1]
            .node
            .sysroot
            .join("etc/containers/registries.conf.d/99-longshore-mirror.conf"),
    )
    .unwrap();
    assert!(text.contains("blocked = true"), "{text}");
    wait_joined(&nodes);

    let got = nodes[1]
        .pull(&up, &layout.images[0])
        .unwrap_or_else(|e| panic!("{e}\n{}", nodes[1].log()));
    assert_eq!(got, layout.images[0].manifest_digest);
    // No node has the second: the pull fails and says why; the registry hears nothing.
    let e = nodes[1].pull(&up, &layout.images[1]).unwrap_err();
    assert!(
        e.contains("neither this node's cache nor another node"),
        "{e}"
    );
    let after = reg.requests()[pushed..].to_vec();
    assert!(after.is_empty(), "the registry was asked: {after:?}");
    assert!(nodes[1].log().contains("[share] upstream is ignored"));
}

#[test]
fn nodes_with_no_bootstrap_find_each_other_by_mdns() {
    if !require(TOOLS) {
        return;
    }
    let _one = one_at_a_time();
    let lan = Lan::new(3);
    let reg = common::cluster::upstream(&lan);
    let nodes = common::cluster::nodes_with(
        &lan,
        &reg,
        "",
        2,
        Some("[share]\nbootstrap = []\nmdns = true\n"),
    );
    wait_joined(&nodes);
    // And they share: what one imports, the other pulls from it.
    let dir = tempfile::tempdir().unwrap();
    let layout = scratch_layout(
        &dir.path().join("layout"),
        &images(&format!("{}/share", reg.addr), 1, None),
    );
    let b = bundle_of(&nodes[0].node, &layout);
    nodes[0].node.ok(&["import", b.to_str().unwrap()]);
    let img = &layout.images[0];
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        match nodes[1].pull(&reg.addr, img) {
            Ok(d) => break d,
            // The first node's records may still be on their way.
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("{e}\n{}", nodes[1].log()),
        }
    };
    assert_eq!(got, img.manifest_digest);
}
