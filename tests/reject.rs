//! Bad input is refused with a message that names the file and the problem, and nothing
//! reaches the store, the state or the staging directory.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::fixture;
use common::node::{copy_tree as copy_dir, largest_blob, require, Node};
use common::rawtar::RawTar;

const REJECTED: i32 = 3;
const NO_SPACE: i32 = 4;

/// A node and a good bundle directory made from two small images.
fn good_bundle(node: &Node) -> (PathBuf, String) {
    let layout = fixture::write_oci_layout(
        &node.scratch("layout"),
        &fixture::small_images("example.com/bad", 2),
    )
    .unwrap();
    let out = node.scratch("good");
    let digest = node.bundle_create(&layout, &out, &["--name", "good"]);
    (out, digest)
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
}

fn write_json(p: &Path, v: &serde_json::Value) {
    fs::write(p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// Imports `input`, expects refusal naming `file_part` and `needle`, and checks that
/// nothing was kept anywhere.
fn assert_refused(node: &Node, input: &Path, extra: &[&str], file_part: &str, needle: &str) {
    let mut args = vec!["import", input.to_str().unwrap()];
    args.extend_from_slice(extra);
    let err = node.fails(&args, REJECTED);
    assert!(
        err.contains(file_part),
        "message should name {file_part:?}: {err}"
    );
    assert!(err.contains(needle), "message should say {needle:?}: {err}");
    assert_eq!(
        node.store_image_count(),
        0,
        "nothing may enter the store: {err}"
    );
    assert!(
        node.staging_leftovers().is_empty(),
        "staging not cleaned: {:?}",
        node.staging_leftovers()
    );
    let state = node.state_dir().join("state.json");
    if state.exists() {
        assert_eq!(
            json(&state)["bundles"],
            serde_json::json!({}),
            "nothing may be recorded"
        );
    }
}

#[test]
fn corrupt_blob_in_directory() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let (good, _) = good_bundle(&node);
    let bad = node.scratch("corrupt");
    copy_dir(&good, &bad);
    let blob = largest_blob(&bad);
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&blob, bytes).unwrap();
    let name = blob.file_name().unwrap().to_string_lossy().into_owned();
    assert_refused(&node, &bad, &[], &name, "its name says");
}

#[test]
fn corrupt_blob_and_truncation_in_tar_streams() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let (good, _) = good_bundle(&node);

    let bad = node.scratch("corrupt-copy");
    copy_dir(&good, &bad);
    let blob = largest_blob(&bad);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[10] ^= 0x01;
    fs::write(&blob, bytes).unwrap();
    let tar = node.scratch("corrupt.tar");
    RawTar::new().bundle(&bad).finish(&tar);
    assert_refused(&node, &tar, &[], "corrupt.tar", "its name says");

    // The good bundle as a tar, cut in the middle of a layer.
    let whole = node.scratch("whole.tar");
    RawTar::new().bundle(&good).finish(&whole);
    let bytes = fs::read(&whole).unwrap();
    let cut = node.scratch("cut.tar");
    fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    assert_refused(&node, &cut, &[], "cut.tar", "truncated");

    // A zstd stream cut short.
    let zst = node.scratch("cut.tar.zst");
    let compressed = zstd::encode_all(&bytes[..], 3).unwrap();
    fs::write(&zst, &compressed[..compressed.len() / 2]).unwrap();
    assert_refused(&node, &zst, &[], "cut.tar.zst", "");
}

#[test]
fn bundle_json_that_lies() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let (good, _) = good_bundle(&node);

    // Wrong index digest.
    let d = node.scratch("index-lie");
    copy_dir(&good, &d);
    let mut meta = json(&d.join("bundle.json"));
    meta["index"]["digest"] = serde_json::json!(format!("sha256:{}", "0".repeat(64)));
    write_json(&d.join("bundle.json"), &meta);
    assert_refused(&node, &d, &[], "index.json", "but bundle.json says");

    // index.json changed behind bundle.json's back.
    let d = node.scratch("index-changed");
    copy_dir(&good, &d);
    let mut index = fs::read(d.join("index.json")).unwrap();
    index.push(b'\n');
    fs::write(d.join("index.json"), index).unwrap();
    assert_refused(&node, &d, &[], "index.json", "but bundle.json says");

    // Wrong image size.
    let d = node.scratch("size-lie");
    copy_dir(&good, &d);
    let mut meta = json(&d.join("bundle.json"));
    meta["images"][0]["size"] = serde_json::json!(meta["images"][0]["size"].as_u64().unwrap() + 1);
    write_json(&d.join("bundle.json"), &meta);
    assert_refused(&node, &d, &[], "size-lie", "but bundle.json declares");

    // Wrong layer size, with the image's size made to agree.
    let d = node.scratch("layer-size-lie");
    copy_dir(&good, &d);
    let mut meta = json(&d.join("bundle.json"));
    let real = meta["images"][1]["layers"][1]["size"].as_u64().unwrap();
    meta["images"][1]["layers"][1]["size"] = serde_json::json!(7);
    meta["images"][1]["size"] =
        serde_json::json!(meta["images"][1]["size"].as_u64().unwrap() - real + 7);
    write_json(&d.join("bundle.json"), &meta);
    assert_refused(
        &node,
        &d,
        &[],
        "layer-size-lie",
        "but bundle.json declares 7",
    );

    // A shared layer given two sizes.
    let d = node.scratch("two-sizes");
    copy_dir(&good, &d);
    let mut meta = json(&d.join("bundle.json"));
    meta["images"][1]["layers"][0]["size"] = serde_json::json!(7);
    write_json(&d.join("bundle.json"), &meta);
    assert_refused(&node, &d, &[], "bundle.json", "with two different sizes");

    // A tar entry whose header claims more than bundle.json declares is refused before
    // it is stored.
    let t = node.scratch("oversized.tar");
    let blob = largest_blob(&good);
    let mut big = fs::read(&blob).unwrap();
    big.extend_from_slice(&[0u8; 4096]);
    let mut tar2 = RawTar::new();
    for f in ["bundle.json", "oci-layout", "index.json"] {
        tar2.file(f, &fs::read(good.join(f)).unwrap());
    }
    tar2.file(
        &format!(
            "blobs/sha256/{}",
            blob.file_name().unwrap().to_string_lossy()
        ),
        &big,
    );
    tar2.finish(&t);
    assert_refused(&node, &t, &[], "oversized.tar", "but bundle.json declares");

    // An image missing from bundle.json.
    let d = node.scratch("image-missing");
    copy_dir(&good, &d);
    let mut meta = json(&d.join("bundle.json"));
    meta["images"].as_array_mut().unwrap().pop();
    meta["sets"][0]["images"].as_array_mut().unwrap().pop();
    write_json(&d.join("bundle.json"), &meta);
    assert_refused(
        &node,
        &d,
        &[],
        "bundle.json",
        "lists 1 images, but index.json has 2",
    );

    // A blob missing from the bundle.
    let d = node.scratch("blob-missing");
    copy_dir(&good, &d);
    fs::remove_file(largest_blob(&d)).unwrap();
    assert_refused(&node, &d, &[], "blob-missing", "is missing from the bundle");

    // A blob no image references.
    let d = node.scratch("extra-blob");
    copy_dir(&good, &d);
    let extra = b"stowaway";
    let hex = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(extra));
    fs::write(d.join("blobs/sha256").join(&hex), extra).unwrap();
    assert_refused(&node, &d, &[], "extra-blob", "which no image references");

    // A set naming an image the bundle does not carry.
    let d = node.scratch("set-lie");
    copy_dir(&good, &d);
    let mut meta = json(&d.join("bundle.json"));
    meta["sets"][0]["images"][0] =
        serde_json::json!(format!("example.com/elsewhere@sha256:{}", "1".repeat(64)));
    write_json(&d.join("bundle.json"), &meta);
    assert_refused(
        &node,
        &d,
        &[],
        "bundle.json",
        "not one of the bundle's images",
    );
}

#[test]
fn digest_mismatch_is_refused_before_anything_is_read() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let (good, digest) = good_bundle(&node);
    let other = format!("sha256:{}", "a".repeat(64));
    assert_refused(
        &node,
        &good,
        &["--digest", &other],
        "bundle.json",
        &format!("but {other} was required"),
    );
    let tar = node.scratch("good.tar");
    RawTar::new().bundle(&good).finish(&tar);
    assert_refused(
        &node,
        &tar,
        &["--digest", &other],
        "bundle.json",
        "was required",
    );
    // The right digest is accepted.
    node.ok(&["verify", tar.to_str().unwrap(), "--digest", &digest]);
}

/// (test name, entry name, type, content, link target, what the message says)
type Hostile = (
    &'static str,
    &'static [u8],
    tar::EntryType,
    &'static [u8],
    &'static [u8],
    &'static str,
);

#[test]
fn hostile_tar_entries() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let (good, _) = good_bundle(&node);
    let meta = fs::read(good.join("bundle.json")).unwrap();
    use tar::EntryType as T;
    let cases: [Hostile; 7] = [
        (
            "dotdot",
            b"blobs/../../escape",
            T::Regular,
            b"x",
            b"",
            "contains \"..\"",
        ),
        (
            "absolute",
            b"/etc/cron.d/evil",
            T::Regular,
            b"x",
            b"",
            "absolute path",
        ),
        (
            "symlink",
            b"blobs/sha256/link",
            T::Symlink,
            b"",
            b"/etc/shadow",
            "symbolic link",
        ),
        (
            "hardlink",
            b"index.json",
            T::Link,
            b"",
            b"../../etc/passwd",
            "hard link",
        ),
        (
            "device",
            b"oci-layout",
            T::Char,
            b"",
            b"",
            "character device",
        ),
        ("fifo", b"fifo", T::Fifo, b"", b"", "FIFO"),
        (
            "stray",
            b"etc/passwd",
            T::Regular,
            b"root::0:0::/:/bin/sh\n",
            b"",
            "unexpected entry",
        ),
    ];
    for (name, entry, kind, data, link, needle) in cases {
        let path = node.scratch(&format!("{name}.tar"));
        let mut t = RawTar::new();
        t.file("bundle.json", &meta);
        t.entry(entry, kind, data, link);
        t.bundle_rest(&good);
        t.finish(&path);
        assert_refused(&node, &path, &[], &format!("{name}.tar"), needle);
        assert!(
            !node.sysroot.join("etc/cron.d/evil").exists()
                && !Path::new("/etc/cron.d/evil").exists()
        );
    }

    // The same file twice.
    let path = node.scratch("duplicate.tar");
    let mut t = RawTar::new();
    t.file("bundle.json", &meta);
    t.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    t.bundle_rest(&good);
    t.finish(&path);
    assert_refused(&node, &path, &[], "duplicate.tar", "twice");

    // bundle.json not first: not a bundle (and not another known archive either).
    let path = node.scratch("late.tar");
    let mut t = RawTar::new();
    t.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    t.file("bundle.json", &meta);
    t.finish(&path);
    assert_refused(
        &node,
        &path,
        &[],
        "late.tar",
        "a bundle starts with bundle.json",
    );
}

#[test]
fn input_that_is_no_bundle() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let text = node.scratch("notes.txt");
    fs::write(&text, "hello\n").unwrap();
    assert_refused(
        &node,
        &text,
        &[],
        "notes.txt",
        "neither a bundle nor an image archive",
    );

    let empty = node.scratch("empty");
    fs::create_dir_all(&empty).unwrap();
    assert_refused(&node, &empty, &[], "empty", "holds no bundle");

    let junk_tar = node.scratch("junk.tar");
    RawTar::new().file("hello.txt", b"hi").finish(&junk_tar);
    assert_refused(
        &node,
        &junk_tar,
        &[],
        "junk.tar",
        "a bundle starts with bundle.json",
    );

    let garbage_json = node.scratch("garbage");
    fs::create_dir_all(&garbage_json).unwrap();
    fs::write(garbage_json.join("bundle.json"), "{not json").unwrap();
    assert_refused(
        &node,
        &garbage_json,
        &[],
        "bundle.json",
        "not valid bundle metadata",
    );

    let future = node.scratch("future");
    fs::create_dir_all(&future).unwrap();
    fs::write(future.join("bundle.json"), r#"{"schemaVersion": 9}"#).unwrap();
    assert_refused(&node, &future, &[], "bundle.json", "schemaVersion 9");

    let missing = node.scratch("does-not-exist");
    let err = node.fails(&["import", missing.to_str().unwrap()], 1);
    assert!(err.contains("does-not-exist"), "{err}");
}

#[test]
fn space_check_refuses_with_needed_available_and_floor() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let (good, _) = good_bundle(&node);
    node.write_config("50-floor.toml", "[store]\nmin_free_space = \"1000 TiB\"\n");
    let err = node.fails(&["import", good.to_str().unwrap()], NO_SPACE);
    for needle in ["needed", "available", "floor", "must stay free", "good"] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert_eq!(node.store_image_count(), 0);
}

#[test]
fn config_errors_name_file_and_key() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let (good, _) = good_bundle(&node);
    node.write_config("40-typo.toml", "[store]\nmin_free_spcae = 1\n");
    let err = node.fails(&["import", good.to_str().unwrap()], 1);
    assert!(
        err.contains("40-typo.toml") && err.contains("min_free_spcae") && err.contains("line 2"),
        "{err}"
    );
}

#[test]
fn staging_of_a_failed_stream_is_removed() {
    if !require(&["skopeo"]) {
        return;
    }
    // A stream that fails only at its last check (an unreferenced blob at the end) has
    // been extracted almost whole; none of it may stay.
    let node = Node::new();
    let (good, _) = good_bundle(&node);
    let path = node.scratch("late-failure.tar");
    let mut t = RawTar::new();
    t.bundle(&good);
    let extra = b"late";
    let hex = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(extra));
    t.file(&format!("blobs/sha256/{hex}"), extra);
    t.finish(&path);
    assert_refused(
        &node,
        &path,
        &[],
        "late-failure.tar",
        "which no image references",
    );
}

#[test]
fn a_tar_with_bundle_json_is_judged_as_a_bundle() {
    if !require(&["skopeo"]) {
        return;
    }
    // Every tar bundle is also a valid oci-archive. One that breaks the bundle rules must
    // be refused as a bundle, not imported as an oci-archive with its bundle.json ignored.
    let node = Node::new();
    let (good, _) = good_bundle(&node);
    let late = node.scratch("oci-first.tar");
    let mut t = RawTar::new();
    t.file("oci-layout", &fs::read(good.join("oci-layout")).unwrap());
    t.file("bundle.json", &fs::read(good.join("bundle.json")).unwrap());
    t.bundle_rest(&good);
    t.finish(&late);
    assert_refused(
        &node,
        &late,
        &[],
        "oci-first.tar",
        "a bundle starts with bundle.json",
    );

    let d = node.scratch("future-version");
    copy_dir(&good, &d);
    let mut meta = json(&d.join("bundle.json"));
    meta["schemaVersion"] = serde_json::json!(2);
    write_json(&d.join("bundle.json"), &meta);
    let future = node.scratch("future.tar");
    RawTar::new().bundle(&d).finish(&future);
    assert_refused(&node, &future, &[], "future.tar", "schemaVersion 2");

    // Blobs before index.json break the order the stream reader relies on.
    let early = node.scratch("blob-first.tar");
    let mut t = RawTar::new();
    t.file("bundle.json", &fs::read(good.join("bundle.json")).unwrap());
    let blob = largest_blob(&good);
    t.file(
        &format!(
            "blobs/sha256/{}",
            blob.file_name().unwrap().to_string_lossy()
        ),
        &fs::read(&blob).unwrap(),
    );
    t.finish(&early);
    assert_refused(
        &node,
        &early,
        &[],
        "blob-first.tar",
        "index.json precedes the blobs",
    );
}

#[test]
fn a_pax_global_header_is_accepted() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let (good, digest) = good_bundle(&node);
    let pax = node.scratch("pax.tar");
    let mut t = RawTar::new();
    t.entry(
        b"pax_global_header",
        tar::EntryType::XGlobalHeader,
        b"",
        b"",
    );
    t.bundle(&good);
    t.finish(&pax);
    node.ok(&["import", pax.to_str().unwrap(), "--digest", &digest]);
    assert_eq!(node.store_image_count(), 2);
}

#[test]
fn a_bundle_directory_holds_nothing_else() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let (good, _) = good_bundle(&node);
    let d = node.scratch("with-readme");
    copy_dir(&good, &d);
    fs::write(d.join("README"), "hello").unwrap();
    assert_refused(&node, &d, &[], "README", "does not belong in a bundle");
    let d = node.scratch("with-sha512");
    copy_dir(&good, &d);
    fs::create_dir_all(d.join("blobs/sha512")).unwrap();
    assert_refused(&node, &d, &[], "sha512", "does not belong in a bundle");
}

#[test]
fn names_that_collide_are_refused() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let (good, _) = good_bundle(&node);
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let d = node.scratch(name);
        copy_dir(&good, &d);
        let mut meta = json(&d.join("bundle.json"));
        f(&mut meta);
        write_json(&d.join("bundle.json"), &meta);
        d
    };
    let d = edit("same-tag", &|m| {
        let repo = m["images"][0]["repository"].clone();
        let tag = m["images"][0]["tags"][0].clone();
        m["images"][1]["repository"] = repo;
        m["images"][1]["tags"] = serde_json::json!(["other", tag]);
        m["images"][1]["reference"] = serde_json::json!(format!(
            "{}:other",
            m["images"][1]["repository"].as_str().unwrap()
        ));
    });
    assert_refused(&node, &d, &[], "bundle.json", "to two images");
    let d = edit("tag-twice", &|m| {
        let tag = m["images"][0]["tags"][0].clone();
        m["images"][0]["tags"] = serde_json::json!([tag.clone(), tag]);
    });
    assert_refused(&node, &d, &[], "bundle.json", "is listed twice");
    let d = edit("set-twice", &|m| {
        let first = m["sets"][0]["images"][0].clone();
        m["sets"][0]["images"].as_array_mut().unwrap().push(first);
    });
    assert_refused(&node, &d, &[], "bundle.json", "twice");
    let d = edit("bad-name", &|m| m["name"] = serde_json::json!("../../etc"));
    assert_refused(&node, &d, &[], "bundle.json", "has name");
}

#[test]
fn a_lying_index_is_refused_even_when_nothing_would_be_copied() {
    if !require(&["skopeo"]) {
        return;
    }
    let node = Node::new();
    let (good, _) = good_bundle(&node);
    node.ok(&["import", good.to_str().unwrap()]);
    let d = node.scratch("index-changed-later");
    copy_dir(&good, &d);
    let mut index = fs::read(d.join("index.json")).unwrap();
    index.push(b' ');
    fs::write(d.join("index.json"), index).unwrap();
    let err = node.fails(&["import", d.to_str().unwrap()], REJECTED);
    assert!(
        err.contains("index.json") && err.contains("but bundle.json says"),
        "{err}"
    );
}
