//! The cache of original blobs, with real skopeo and containers-storage: each blob stored
//! once across bundles, the store healed from the cache alone, collection by reference
//! and cap, held bundles kept, and the move of retained copies from the layout before.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use common::fixture::{self, ImageSpec, LayerSpec, Layout};
use common::node::{require, Node};
use sha2::{Digest as _, Sha256};

const TOOLS: &[&str] = &["skopeo"];

fn cache_dir(node: &Node) -> PathBuf {
    node.state_dir().join("cache")
}

/// Every file of the cache's blobs directory: name -> length. Each complete blob is
/// checked to hash to its name.
fn cache_blobs(node: &Node) -> BTreeMap<String, u64> {
    let dir = cache_dir(node).join("blobs/sha256");
    let mut out = BTreeMap::new();
    for e in fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let bytes = fs::read(e.path()).unwrap();
        if !name.ends_with(".partial") {
            assert_eq!(
                hex(&Sha256::digest(&bytes)),
                name,
                "a cache blob's content does not match its name"
            );
        }
        out.insert(name, bytes.len() as u64);
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_of(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_string()
}

/// The blobs (manifest, config, layers) of `layout`'s images.
fn blobs_of(layout: &Layout) -> BTreeSet<String> {
    layout
        .images
        .iter()
        .flat_map(|i| {
            [i.manifest_digest.clone(), i.config_digest.clone()]
                .into_iter()
                .chain(i.layers.iter().map(|l| l.digest.clone()))
        })
        .map(|d| hex_of(&d))
        .collect()
}

fn images(prefix: &str, n: usize, base: u64) -> Vec<ImageSpec> {
    (0..n)
        .map(|i| ImageSpec {
            reference: format!("example.com/{prefix}/img{i}:1"),
            layers: vec![
                LayerSpec {
                    seed: base,
                    size: 96 * 1024,
                },
                LayerSpec {
                    seed: base * 1000 + i as u64,
                    size: 8 * 1024,
                },
            ],
        })
        .collect()
}

fn wipe_store(node: &Node) {
    common::node::unmount_under(&node.store_root());
    fs::remove_dir_all(node.store_root()).unwrap();
    let _ = fs::remove_dir_all(node.sysroot.join("run/containers/storage"));
}

fn bundle(
    node: &Node,
    name: &str,
    specs: &[ImageSpec],
    extra: &[&str],
) -> (Layout, PathBuf, String) {
    let layout =
        fixture::write_oci_layout(&node.scratch(&format!("{name}-layout")), specs).unwrap();
    let out = node.scratch(&format!("{name}.tar"));
    let mut args = vec!["--name", name];
    args.extend_from_slice(extra);
    let digest = node.bundle_create(&layout, &out, &args);
    (layout, out, digest)
}

fn cache_json(node: &Node) -> serde_json::Value {
    serde_json::from_str(&node.ok(&["cache", "--json"])).unwrap()
}

#[test]
fn two_bundles_sharing_layers_store_each_blob_once() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    // The same base layer under both bundles, and one image in both.
    let a_specs = images("shared", 3, 7);
    let mut b_specs = images("shared", 2, 7);
    b_specs.push(images("other", 1, 9).remove(0));
    let (a, a_tar, a_digest) = bundle(&node, "a", &a_specs, &[]);
    let (b, b_tar, b_digest) = bundle(&node, "b", &b_specs, &[]);
    node.ok(&["import", a_tar.to_str().unwrap()]);
    let after_a = cache_blobs(&node);
    let base = hex_of(&a.images[0].layers[0].digest);
    let base_inode = fs::metadata(cache_dir(&node).join("blobs/sha256").join(&base))
        .unwrap()
        .ino();
    node.ok(&["import", b_tar.to_str().unwrap()]);
    let after_b = cache_blobs(&node);

    // Exactly the union of both bundles' blobs, plus each bundle's bundle.json and
    // index.json; no partial left.
    let mut want: BTreeSet<String> = blobs_of(&a).union(&blobs_of(&b)).cloned().collect();
    want.insert(hex_of(&a_digest));
    want.insert(hex_of(&b_digest));
    let docs: BTreeSet<String> = after_b
        .keys()
        .filter(|k| !want.contains(*k))
        .cloned()
        .collect();
    assert_eq!(
        docs.len(),
        2,
        "only the two index.json besides the blobs: {docs:?}"
    );
    assert!(after_b.keys().all(|k| !k.ends_with(".partial")));
    assert!(
        want.iter().all(|w| after_b.contains_key(w)),
        "a blob is missing"
    );
    // The shared base layer is the file bundle a brought, untouched by bundle b.
    let inode = fs::metadata(cache_dir(&node).join("blobs/sha256").join(&base))
        .unwrap()
        .ino();
    assert_eq!(inode, base_inode, "the shared layer was written again");
    for (k, len) in &after_a {
        assert_eq!(after_b.get(k), Some(len), "{k} changed");
    }
    // Bytes on disk: each blob once.
    let bytes: u64 = after_b.values().sum();
    let report = cache_json(&node);
    assert_eq!(report["bytes"], bytes);
    assert_eq!(report["blobs"], after_b.len());
    // The index names every image by its full references.
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(cache_dir(&node).join("index.json")).unwrap()).unwrap();
    let names: BTreeSet<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for img in a.images.iter().chain(&b.images) {
        let (repo, _) = img.reference.rsplit_once(':').unwrap();
        assert!(
            names.contains(&img.reference),
            "{} not named",
            img.reference
        );
        assert!(names.contains(&format!("{repo}@{}", img.manifest_digest)));
    }
    assert!(node.staging_leftovers().is_empty());
}

#[test]
fn a_wiped_store_is_restored_from_the_cache_alone() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let (a, a_tar, _) = bundle(&node, "edge", &images("edge", 3, 3), &["--set", "edge"]);
    let (b, b_dir, _) = {
        let layout =
            fixture::write_oci_layout(&node.scratch("apps-layout"), &images("apps", 2, 4)).unwrap();
        let out = node.scratch("apps-dir");
        node.bundle_create(&layout, &out, &["--name", "apps", "--set", "apps"]);
        (layout, out, ())
    };
    node.ok(&["import", a_tar.to_str().unwrap()]);
    node.ok(&["import", b_dir.to_str().unwrap()]);
    // The media are gone, and so is everything CRI-O had.
    fs::remove_file(&a_tar).unwrap();
    fs::remove_dir_all(&b_dir).unwrap();
    fs::remove_dir_all(&a.dir).unwrap();
    fs::remove_dir_all(&b.dir).unwrap();
    wipe_store(&node);
    for img in a.images.iter().chain(&b.images) {
        assert!(node.inspect_digest(&img.reference).is_none());
    }
    let out = node.ok(&["sync"]);
    for img in a.images.iter().chain(&b.images) {
        let (repo, _) = img.reference.rsplit_once(':').unwrap();
        for name in [
            img.reference.clone(),
            format!("{repo}@{}", img.manifest_digest),
        ] {
            assert_eq!(
                node.inspect_digest(&name).as_deref(),
                Some(img.manifest_digest.as_str()),
                "{name} not restored: {out}"
            );
        }
    }
    let status = node.status();
    for set in status["sets"].as_array().unwrap() {
        let ready = set["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], true, "{set}");
    }
}

#[test]
fn collection_keeps_what_sets_reference_and_evicts_the_rest_under_the_cap() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    // Imports keep nothing on their own: only what is in force or held stays.
    node.write_config(
        "60-cache.toml",
        "[cache]\nmax_size = 0\nkeep_imported = 0\n",
    );
    let (keep, keep_tar, keep_digest) =
        bundle(&node, "keep", &images("keep", 2, 5), &["--set", "keep"]);
    let (gone, gone_tar, gone_digest) =
        bundle(&node, "gone", &images("gone", 2, 6), &["--set", "gone"]);
    node.ok(&["import", keep_tar.to_str().unwrap()]);
    node.ok(&["import", gone_tar.to_str().unwrap()]);
    // Both sets in force: nothing goes, even with a cap of zero.
    let before = cache_blobs(&node);
    assert!(blobs_of(&gone).iter().all(|b| before.contains_key(b)));
    let r: serde_json::Value = serde_json::from_str(&node.ok(&["cache", "gc", "--json"])).unwrap();
    assert_eq!(r["evicted"], 0, "{r}");

    node.ok(&["sets", "remove", "gone"]);
    let r: serde_json::Value = serde_json::from_str(&node.ok(&["cache", "gc", "--json"])).unwrap();
    let after = cache_blobs(&node);
    for b in blobs_of(&keep) {
        assert!(
            after.contains_key(&b),
            "a blob set keep references was evicted"
        );
    }
    assert!(after.contains_key(&hex_of(&keep_digest)));
    for b in blobs_of(&gone).difference(&blobs_of(&keep)) {
        assert!(
            !after.contains_key(b),
            "{b} of the removed set stayed: {r}\n{}",
            node.ok(&["cache"])
        );
    }
    assert!(!after.contains_key(&hex_of(&gone_digest)));
    assert!(
        r["evicted"].as_u64().unwrap() >= blobs_of(&gone).len() as u64,
        "{r}"
    );
    assert_eq!(r["bytes"], after.values().sum::<u64>());
    // The index no longer names what went.
    let report = cache_json(&node);
    let names: Vec<&str> = report["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains("/gone/")), "{names:?}");
    assert!(names.iter().any(|n| n.contains("/keep/")), "{names:?}");
    assert_eq!(report["bundles"].as_array().unwrap().len(), 1, "{report}");

    // With room under a generous cap, unreferenced blobs stay until needed.
    let node2 = Node::new();
    node2.write_config(
        "60-cache.toml",
        "[cache]\nmax_size = \"1GiB\"\nkeep_imported = 0\n",
    );
    let (_, t, _) = bundle(&node2, "x", &images("x", 1, 8), &["--set", "x"]);
    node2.ok(&["import", t.to_str().unwrap()]);
    node2.ok(&["sets", "remove", "x"]);
    let n = cache_blobs(&node2).len();
    let r: serde_json::Value = serde_json::from_str(&node2.ok(&["cache", "gc", "--json"])).unwrap();
    assert_eq!(r["evicted"], 0);
    assert_eq!(cache_blobs(&node2).len(), n);
}

#[test]
fn a_held_bundle_survives_collection_until_applied_then_until_its_set_goes() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    node.write_config(
        "60-cache.toml",
        "[cache]\nmax_size = 0\nkeep_imported = 0\n",
    );
    let (held, tar, digest) = bundle(&node, "later", &images("later", 2, 11), &["--set", "later"]);
    node.ok(&["import", "--hold", tar.to_str().unwrap()]);
    fs::remove_file(&tar).unwrap();
    assert!(
        node.staging_leftovers().is_empty(),
        "held bundles wait in the cache"
    );
    for _ in 0..2 {
        node.ok(&["cache", "gc"]);
    }
    let blobs = cache_blobs(&node);
    for b in blobs_of(&held) {
        assert!(blobs.contains_key(&b), "a held bundle's blob was evicted");
    }
    let text = node.ok(&["cache"]);
    assert!(
        text.contains("bundle later") && text.contains("held"),
        "{text}"
    );
    // Applied from the cache, media gone.
    node.ok(&["apply", "later"]);
    for img in &held.images {
        assert_eq!(
            node.inspect_digest(&img.reference).as_deref(),
            Some(img.manifest_digest.as_str())
        );
    }
    node.ok(&["cache", "gc"]);
    assert!(
        cache_blobs(&node).contains_key(&hex_of(&digest)),
        "in force now"
    );
    node.ok(&["sets", "remove", "later"]);
    node.ok(&["cache", "gc"]);
    let left = cache_blobs(&node);
    assert!(
        blobs_of(&held).iter().all(|b| !left.contains_key(b)),
        "unreferenced blobs stayed: {left:?}"
    );
}

#[test]
fn retained_copies_of_the_old_layout_move_into_the_cache_once() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let layout =
        fixture::write_oci_layout(&node.scratch("old-layout"), &images("old", 2, 12)).unwrap();
    let dir = node.scratch("old-bundle");
    let digest = node.bundle_create(&layout, &dir, &["--name", "old", "--set", "old"]);
    node.ok(&["import", dir.to_str().unwrap()]);
    // Turn the node back into one of the layout before the cache: the bundle kept in
    // bundles/<digest>, named by the record, and no cache.
    let retained = node.state_dir().join("bundles").join(hex_of(&digest));
    fs::create_dir_all(retained.parent().unwrap()).unwrap();
    common::node::copy_tree(&dir, &retained);
    fs::remove_dir_all(cache_dir(&node)).unwrap();
    let state_path = node.state_dir().join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&fs::read(&state_path).unwrap()).unwrap();
    for b in state["bundles"].as_object_mut().unwrap().values_mut() {
        b["retained"] = serde_json::Value::from(retained.display().to_string());
        b.as_object_mut().unwrap().remove("cached");
    }
    fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    let big = layout.images[0].layers[0].digest.clone();
    let inode = fs::metadata(retained.join("blobs/sha256").join(hex_of(&big)))
        .unwrap()
        .ino();

    node.ok(&["sync"]);
    assert!(!retained.exists(), "the retained copy is still there");
    let moved = cache_dir(&node).join("blobs/sha256").join(hex_of(&big));
    assert_eq!(
        fs::metadata(&moved).unwrap().ino(),
        inode,
        "copied, not moved"
    );
    let blobs = cache_blobs(&node);
    assert!(blobs_of(&layout).iter().all(|b| blobs.contains_key(b)));
    let state: serde_json::Value = serde_json::from_slice(&fs::read(&state_path).unwrap()).unwrap();
    let rec = state["bundles"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert!(rec.get("retained").is_none(), "{rec}");
    assert_eq!(rec["cached"], true, "{rec}");
    // And the store heals from it.
    wipe_store(&node);
    fs::remove_dir_all(&dir).unwrap();
    node.ok(&["sync"]);
    assert!(node.inspect_digest(&layout.images[1].reference).is_some());
}

#[test]
fn partials_a_killed_writer_left_are_resumed_or_removed_never_named_wrongly() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let layout = fixture::write_oci_layout(&node.scratch("p-layout"), &images("p", 2, 13)).unwrap();
    let dir = node.scratch("p-bundle");
    let digest = node.bundle_create(&layout, &dir, &["--name", "p"]);
    let blobs = cache_dir(&node).join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    // What writers killed mid-way leave: the first half of bundle.json, and a layer's
    // partial holding the wrong bytes.
    let meta = fs::read(dir.join("bundle.json")).unwrap();
    fs::write(
        blobs.join(format!("{}.partial", hex_of(&digest))),
        &meta[..meta.len() / 2],
    )
    .unwrap();
    let layer = hex_of(&layout.images[0].layers[0].digest);
    fs::write(blobs.join(format!("{layer}.partial")), vec![0xee; 4096]).unwrap();
    node.ok(&["import", dir.to_str().unwrap()]);
    let cached = cache_blobs(&node);
    assert!(
        cached.keys().all(|k| !k.ends_with(".partial")),
        "{cached:?}"
    );
    assert_eq!(
        fs::read(blobs.join(hex_of(&digest))).unwrap(),
        meta,
        "bundle.json resumed"
    );
    assert!(cached.contains_key(&layer));
}

#[test]
fn a_cache_on_a_filesystem_of_its_own_is_filled_by_copying() {
    if !require(&["skopeo", "unshare", "mount"]) {
        return;
    }
    let node = Node::new();
    let (layout, tar, _) = bundle(&node, "own-fs", &images("ownfs", 2, 14), &[]);
    let cache = cache_dir(&node);
    fs::create_dir_all(&cache).unwrap();
    // In a mount namespace of its own: the cache is a tmpfs, staging stays on the disk.
    let script = format!(
        "mount -t tmpfs cache {cache} && {bin} --sysroot {root} import {tar} && \
         find {cache}/blobs/sha256 -type f | wc -l > {out}",
        cache = cache.display(),
        bin = env!("CARGO_BIN_EXE_longshore"),
        root = node.sysroot.display(),
        tar = tar.display(),
        out = node.scratch("count").display(),
    );
    let st = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .envs(node.env.iter().map(|(k, v)| (k, v)))
        .status()
        .unwrap();
    assert!(st.success(), "import with the cache on its own filesystem");
    let count: usize = fs::read_to_string(node.scratch("count"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Every blob, bundle.json and index.json, copied across.
    assert_eq!(count, blobs_of(&layout).len() + 2);
    for img in &layout.images {
        assert!(node.inspect_digest(&img.reference).is_some());
    }
    assert!(node.staging_leftovers().is_empty());
}
