//! Self-test of the test-image generator in `tests/common/fixture.rs`:
//! determinism, blob sharing, content addressing, and (when skopeo is
//! installed) acceptance by containers-image.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture::{self, ImageSpec, Layout};
use sha2::{Digest, Sha256};

const PREFIX: &str = "example.com/test";

/// All regular files under `dir`, relative path → content.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("under root").to_path_buf();
                out.insert(rel, fs::read(&path).expect("read file"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).expect("read json")).expect("parse json")
}

fn small_layout(dir: &Path, n: usize) -> Layout {
    fixture::write_oci_layout(dir, &fixture::small_images(PREFIX, n)).expect("write layout")
}

#[test]
fn layouts_are_deterministic() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let la = small_layout(a.path(), 3);
    let lb = small_layout(b.path(), 3);

    assert_eq!(la.images, lb.images);
    let digests: std::collections::HashSet<_> =
        la.images.iter().map(|i| &i.manifest_digest).collect();
    assert_eq!(digests.len(), 3, "images must have distinct manifests");
    assert_eq!(
        tree(a.path()),
        tree(b.path()),
        "trees must be byte-identical"
    );

    // Rewriting into an existing layout changes nothing.
    let again = small_layout(a.path(), 3);
    assert_eq!(again.images, la.images);
    assert_eq!(tree(a.path()), tree(b.path()));
}

#[test]
fn shared_layers_are_stored_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = small_layout(dir.path(), 3);

    let base = &layout.images[0].layers[0];
    for image in &layout.images {
        assert_eq!(image.layers.len(), 2);
        assert_eq!(&image.layers[0], base, "base layer is shared");
    }
    // 1 shared base + 3 own layers + 3 configs + 3 manifests, no temp files.
    let blobs: Vec<_> = fs::read_dir(dir.path().join("blobs/sha256"))
        .expect("read blobs")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(blobs.len(), 10, "blobs: {blobs:?}");
    for name in ["oci-layout", "index.json"] {
        assert!(dir.path().join(name).is_file(), "{name} missing");
    }
}

#[test]
fn blobs_are_content_addressed_and_consistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = fixture::small_images(PREFIX, 2);
    let layout = fixture::write_oci_layout(dir.path(), &specs).expect("write layout");

    for (name, data) in tree(&dir.path().join("blobs/sha256")) {
        assert_eq!(
            sha256(&data),
            format!("sha256:{}", name.display()),
            "blob name must be its digest"
        );
    }

    let index = json(&dir.path().join("index.json"));
    assert_eq!(index["schemaVersion"], 2);
    for ((spec, image), desc) in specs
        .iter()
        .zip(&layout.images)
        .zip(index["manifests"].as_array().expect("manifests"))
    {
        assert_eq!(desc["digest"], image.manifest_digest.as_str());
        assert_eq!(desc["size"], image.manifest_size);
        assert_eq!(
            desc["annotations"]["org.opencontainers.image.ref.name"],
            spec.reference.as_str()
        );

        let manifest = json(&layout.blob_path(&image.manifest_digest));
        assert_eq!(manifest["config"]["digest"], image.config_digest.as_str());
        let config = json(&layout.blob_path(&image.config_digest));
        assert_eq!(config["architecture"], fixture::oci_arch());
        assert_eq!(
            config["config"]["Labels"]["fixture.reference"],
            spec.reference.as_str()
        );

        for (i, (layer, layer_spec)) in image.layers.iter().zip(&spec.layers).enumerate() {
            assert_eq!(manifest["layers"][i]["digest"], layer.digest.as_str());
            assert_eq!(manifest["layers"][i]["size"], layer.size);
            assert_eq!(config["rootfs"]["diff_ids"][i], layer.diff_id.as_str());

            // The gunzipped blob hashes to the diff_id and holds the file.
            let blob = fs::read(layout.blob_path(&layer.digest)).expect("read layer");
            assert_eq!(blob.len() as u64, layer.size);
            let mut tar = Vec::new();
            flate2::read::GzDecoder::new(&blob[..])
                .read_to_end(&mut tar)
                .expect("gunzip layer");
            assert_eq!(sha256(&tar), layer.diff_id);
            assert_eq!(tar.len() as u64, layer.uncompressed_size);
            assert!(layer.size < layer.uncompressed_size, "layer must compress");

            let mut archive = tar::Archive::new(&tar[..]);
            let files: Vec<(String, u64)> = archive
                .entries()
                .expect("tar entries")
                .map(|e| {
                    let e = e.expect("tar entry");
                    let path = e.path().expect("path").display().to_string();
                    (path, e.header().size().expect("size"))
                })
                .filter(|(p, _)| p.ends_with(".bin"))
                .collect();
            assert_eq!(
                files,
                [(
                    format!("data/{}.bin", layer_spec.seed),
                    layer_spec.size as u64
                )]
            );
        }
    }
}

#[test]
fn bench_images_have_expected_shape() {
    let total = 10 << 20;
    let images = fixture::bench_images(40, total);
    assert_eq!(images.len(), 40);
    assert_eq!(
        images[7].reference,
        "bench.example.com/release/component-07:v1"
    );
    let mut unique = std::collections::HashSet::new();
    for image in &images {
        unique.extend(image.layers.iter().copied());
    }
    let bytes: u64 = unique.iter().map(|l| l.size as u64).sum();
    assert_eq!(bytes, total);
    let bases: std::collections::HashSet<_> = images.iter().map(|i| i.layers[0]).collect();
    assert_eq!(bases.len(), 3);
}

/// Whether skopeo can be used; panics in CI if it is missing.
fn have_skopeo() -> bool {
    let found = Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("skopeo is required in CI but was not found on PATH");
        }
        eprintln!("skipping: skopeo not found on PATH");
    }
    found
}

/// `skopeo inspect <reference>` as JSON.
fn skopeo_inspect(reference: &str) -> serde_json::Value {
    let out = Command::new("skopeo")
        .args(["inspect", reference])
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect {reference} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("skopeo inspect output")
}

/// `skopeo copy` (which verifies every blob digest) into a `dir:` target.
fn skopeo_copy_to_dir(src: &str, target: &Path) {
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet", src])
        .arg(format!("dir:{}", target.display()))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {src} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn skopeo_accepts_oci_layout() {
    if !have_skopeo() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = small_layout(&dir.path().join("layout"), 2);
    for image in &layout.images {
        let src = layout.transport_ref(&image.reference);
        let info = skopeo_inspect(&src);
        assert_eq!(info["Digest"], image.manifest_digest.as_str());
        assert_eq!(info["Architecture"], fixture::oci_arch());
        let layers: Vec<_> = image.layers.iter().map(|l| l.digest.as_str()).collect();
        assert_eq!(info["Layers"], serde_json::json!(layers));
    }
    let img = &layout.images[1];
    skopeo_copy_to_dir(
        &layout.transport_ref(&img.reference),
        &dir.path().join("copy"),
    );
}

#[test]
fn skopeo_accepts_docker_archive() {
    if !have_skopeo() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let specs: Vec<ImageSpec> = fixture::small_images(PREFIX, 2);
    let layout = small_layout(&dir.path().join("layout"), 2);

    let single = dir.path().join("single.tar");
    fixture::write_docker_archive(&single, &specs[..1]).expect("write archive");
    let info = skopeo_inspect(&format!("docker-archive:{}", single.display()));
    let diff_ids: Vec<_> = layout.images[0]
        .layers
        .iter()
        .map(|l| l.diff_id.as_str())
        .collect();
    assert_eq!(info["Layers"], serde_json::json!(diff_ids));
    assert_eq!(
        info["Labels"]["fixture.reference"],
        specs[0].reference.as_str()
    );

    // Image N (0-based) of a multi-image archive is addressed as `:@N`.
    let multi = dir.path().join("multi.tar");
    fixture::write_docker_archive(&multi, &specs).expect("write archive");
    for (n, spec) in specs.iter().enumerate() {
        let src = format!("docker-archive:{}:@{n}", multi.display());
        let info = skopeo_inspect(&src);
        assert_eq!(info["Labels"]["fixture.reference"], spec.reference.as_str());
    }
    skopeo_copy_to_dir(
        &format!("docker-archive:{}:@1", multi.display()),
        &dir.path().join("copy"),
    );
}
