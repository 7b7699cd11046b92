//! A corpus of hostile inputs, generated here, one per way a stranger's stick can attack
//! the media path: archives that write outside, links and FIFOs in directories, header
//! bombs, names containers/image refuses, broken configuration. Each must be refused
//! with exit code 3 (or 1 for configuration) and a short message naming the file and the
//! problem, and must leave nothing behind: nothing written outside, nothing in the store
//! or the state, no pins, nothing in staging or in skopeo's temporary directory.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fixture;
use common::node::{copy_tree, largest_blob, require, Node};
use common::rawtar::RawTar;
use tar::EntryType as T;

const REJECTED: i32 = 3;

/// A hostile archive entry: case name, entry name, type, link target, what the refusal says.
type Hostile = (&'static str, &'static [u8], T, &'static [u8], &'static str);

struct Corpus {
    node: Node,
    /// A directory outside the node that hostile links point into; it must stay empty.
    canary: PathBuf,
    /// A good bundle directory.
    good: PathBuf,
    /// Its bundle.json.
    meta: Vec<u8>,
    /// The OCI layout the good bundle was made from.
    layout: fixture::Layout,
    cases: usize,
}

impl Corpus {
    fn new() -> Corpus {
        let node = Node::new();
        let layout = fixture::write_oci_layout(
            &node.scratch("layout"),
            &fixture::small_images("example.com/hostile", 2),
        )
        .unwrap();
        let good = node.scratch("good");
        node.bundle_create(&layout, &good, &["--name", "good"]);
        let canary = node.scratch("canary");
        fs::create_dir_all(&canary).unwrap();
        let meta = fs::read(good.join("bundle.json")).unwrap();
        Corpus {
            node,
            canary,
            good,
            meta,
            layout,
            cases: 0,
        }
    }

    /// `import` and `verify` of `input` both refuse it with `code`, naming `file_part`
    /// and saying `needle`, quickly and briefly, and nothing is left anywhere.
    fn refused(&mut self, input: &Path, code: i32, file_part: &str, needle: &str) {
        self.cases += 1;
        let p = input.to_str().unwrap();
        for cmd in ["import", "verify"] {
            let started = Instant::now();
            let err = self.node.fails(&[cmd, p], code);
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(60),
                "{cmd} {p} took {took:?}: {err}"
            );
            assert!(
                err.contains(file_part),
                "{cmd}: should name {file_part:?}: {err}"
            );
            assert!(err.contains(needle), "{cmd}: should say {needle:?}: {err}");
            assert!(
                err.len() < 2000,
                "{cmd}: the message is not short: {} bytes",
                err.len()
            );
            self.nothing_left(&format!("{cmd} {p}"));
        }
    }

    fn nothing_left(&self, what: &str) {
        let node = &self.node;
        assert_eq!(node.store_image_count(), 0, "{what}: the store was written");
        assert!(
            node.staging_leftovers().is_empty(),
            "{what}: staging holds {:?}",
            node.staging_leftovers()
        );
        let tmp = node.state_dir().join("tmp");
        let left: Vec<_> = fs::read_dir(&tmp)
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{what}: skopeo's temporary files {left:?}");
        let state = node.state_dir().join("state.json");
        if state.exists() {
            let v: serde_json::Value = serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
            assert_eq!(v["bundles"], serde_json::json!({}), "{what}: recorded");
            assert_eq!(v["sets"], serde_json::json!({}), "{what}: a set in force");
        }
        assert!(
            !node
                .sysroot
                .join("etc/crio/crio.conf.d/99-longshore-pinned-images.conf")
                .exists(),
            "{what}: pinned"
        );
        let canary: Vec<_> = fs::read_dir(&self.canary)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(canary.is_empty(), "{what}: written outside: {canary:?}");
    }

    /// A copy of the good bundle directory to break.
    fn copy_good(&self, name: &str) -> PathBuf {
        let d = self.node.scratch(name);
        copy_tree(&self.good, &d);
        d
    }

    /// The good layout as an oci-archive's entries (without the end of archive).
    fn oci_archive(&self) -> RawTar {
        let mut t = RawTar::new();
        t.layout(&self.layout.dir);
        t
    }

    /// A good docker archive's entries (without the end of archive).
    fn docker_archive(&self) -> RawTar {
        let path = self.node.scratch("docker-good.tar");
        fixture::write_docker_archive(&path, &fixture::small_images("example.com/hostile", 1))
            .unwrap();
        let bytes = fs::read(&path).unwrap();
        let _ = fs::remove_file(&path);
        // Take the entries, not the two zero blocks that end the archive.
        let mut end = bytes.len();
        while end >= 512 && bytes[end - 512..end].iter().all(|b| *b == 0) {
            end -= 512;
        }
        RawTar(bytes[..end].to_vec())
    }

    fn write(&self, name: &str, t: &mut RawTar) -> PathBuf {
        let p = self.node.scratch(name);
        fs::write(&p, t.bytes()).unwrap();
        p
    }

    /// `t`, then `zeros` zero bytes (the data of a header it ends with, padded), then the
    /// end of the archive, as a zstd stream written as it is made.
    fn write_zstd(&self, name: &str, t: &RawTar, zeros: u64) -> PathBuf {
        use std::io::Write;
        let p = self.node.scratch(name);
        let mut z = zstd::Encoder::new(fs::File::create(&p).unwrap(), 1).unwrap();
        z.write_all(&t.0).unwrap();
        let chunk = vec![0u8; 1 << 20];
        let mut left = zeros.div_ceil(512) * 512 + 1024;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            z.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        z.finish().unwrap();
        p
    }
}

fn manifest_blob(dir: &Path) -> PathBuf {
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("bundle.json")).unwrap()).unwrap();
    let d = meta["images"][0]["digest"].as_str().unwrap();
    dir.join("blobs/sha256")
        .join(d.strip_prefix("sha256:").unwrap())
}

#[test]
fn archives_never_write_outside_and_never_reach_skopeo_unchecked() {
    if !require(&["skopeo"]) {
        return;
    }
    let mut c = Corpus::new();
    let canary = c.canary.display().to_string();

    // The attack that was found: a link to a directory, then a file through it.
    let mut t = c.oci_archive();
    t.entry(b"evil", T::Symlink, b"", canary.as_bytes());
    t.entry(b"evil/owned", T::Regular, b"root was here", b"");
    let p = c.write("link-then-file.oci.tar", &mut t);
    c.refused(
        &p,
        REJECTED,
        "link-then-file.oci.tar",
        "leads outside the archive",
    );

    let entries: [Hostile; 8] = [
        (
            "absolute-link",
            b"abs",
            T::Symlink,
            b"/etc/shadow",
            "leads outside the archive",
        ),
        (
            "climbing-link",
            b"blobs/up",
            T::Symlink,
            b"../../../../etc",
            "leads outside the archive",
        ),
        ("char-device", b"zero", T::Char, b"", "character device"),
        ("block-device", b"disk", T::Block, b"", "block device"),
        ("fifo", b"pipe", T::Fifo, b"", "FIFO"),
        ("hard-link", b"passwd", T::Link, b"/etc/passwd", "hard link"),
        (
            "dotdot-name",
            b"blobs/../../escape",
            T::Regular,
            b"",
            "climbs out",
        ),
        (
            "absolute-name",
            b"/tmp/longshore-abs-owned",
            T::Regular,
            b"",
            "absolute",
        ),
    ];
    for (name, entry, kind, link, needle) in entries {
        let mut t = c.oci_archive();
        let data: &[u8] = if kind == T::Regular { b"x" } else { b"" };
        t.entry(entry, kind, data, link);
        let p = c.write(&format!("{name}.oci.tar"), &mut t);
        c.refused(&p, REJECTED, &format!("{name}.oci.tar"), needle);
        assert!(!Path::new("/tmp/longshore-abs-owned").exists());
    }
    // The same in docker archives, which skopeo would untar into /var/tmp.
    for (name, entry, kind, link, needle) in [
        (
            "docker-abs-link",
            &b"abs"[..],
            T::Symlink,
            &b"/dev/zero"[..],
            "leads outside the archive",
        ),
        (
            "docker-climb",
            b"x/layer.tar",
            T::Symlink,
            b"../../../etc/shadow",
            "leads outside the archive",
        ),
        ("docker-device", b"dev", T::Char, b"", "character device"),
    ] {
        let mut t = c.docker_archive();
        t.entry(entry, kind, b"", link);
        let p = c.write(&format!("{name}.tar"), &mut t);
        c.refused(&p, REJECTED, &format!("{name}.tar"), needle);
    }
    // A blob whose content is not what its name says.
    let mut t = c.oci_archive();
    t.file(&format!("blobs/sha256/{}", "0".repeat(64)), b"not that");
    let p = c.write("lying-blob.oci.tar", &mut t);
    c.refused(
        &p,
        REJECTED,
        "lying-blob.oci.tar",
        "not the one its name says",
    );
}

#[test]
fn bombs_are_refused_before_they_are_read() {
    if !require(&["skopeo"]) {
        return;
    }
    let mut c = Corpus::new();
    // A GNU long name, a pax header and a pax global header each declaring a gigabyte,
    // in a few KB of zstd, right after bundle.json.
    for (name, flag, needle) in [
        ("long-name", b'L', "GNU long name"),
        ("long-link", b'K', "GNU long link"),
        ("pax", b'x', "pax header"),
        ("pax-global", b'g', "pax global header"),
    ] {
        let mut t = RawTar::new();
        t.file("bundle.json", &c.meta.clone());
        t.header_only(b"././@LongLink", T::new(flag), 1 << 30);
        let p = c.write_zstd(&format!("{name}.tar.zst"), &t, 1 << 30);
        assert!(fs::metadata(&p).unwrap().len() < 1 << 20);
        c.refused(&p, REJECTED, &format!("{name}.tar.zst"), needle);
    }
    // A name of 4000 characters is read, and quoted only in part.
    let mut t = RawTar::new();
    t.file("bundle.json", &c.meta.clone());
    let long = format!("{}\n", "n".repeat(3999));
    t.entry(b"././@LongLink", T::new(b'L'), long.as_bytes(), b"");
    t.entry(b"short", T::Regular, b"x", b"");
    let p = c.write("long-entry-name.tar", &mut t);
    c.refused(&p, REJECTED, "long-entry-name.tar", "");

    // A compressed docker archive that unpacks to 2 GiB of a file no archive holds.
    let mut t = c.docker_archive();
    t.header_only(b"junk.bin", T::Regular, 2 << 30);
    let p = c.write_zstd("bomb.docker.tar.zst", &t, 2 << 30);
    assert!(fs::metadata(&p).unwrap().len() < 1 << 20);
    c.refused(
        &p,
        REJECTED,
        "bomb.docker.tar.zst",
        "does not belong in an image archive",
    );

    // manifest.json and index.json larger than any real one.
    let mut t = c.docker_archive();
    let huge = vec![b' '; 5 << 20];
    t.file("manifest.json", &huge);
    let p = c.write("huge-manifest.tar", &mut t);
    c.refused(&p, REJECTED, "huge-manifest.tar", "bytes");

    // A FIFO and a character device given as the input, and a sparse entry.
    let fifo = c.node.scratch("input.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    c.refused(&fifo, REJECTED, "input.fifo", "FIFO");
    c.refused(
        Path::new("/dev/zero"),
        REJECTED,
        "/dev/zero",
        "character device",
    );
    let mut t = RawTar::new();
    t.file("bundle.json", &c.meta.clone());
    t.entry(b"blobs/sha256/sparse", T::GNUSparse, b"", b"");
    let p = c.write("sparse.tar", &mut t);
    c.refused(&p, REJECTED, "sparse.tar", "sparse");
    assert!(c.cases >= 10);
}

#[test]
fn directories_are_read_without_following_anything() {
    if !require(&["skopeo"]) {
        return;
    }
    let mut c = Corpus::new();
    // A layer blob, then a manifest, that is a link to /dev/zero: refused at once, never
    // streamed.
    let d = c.copy_good("layer-zero-link");
    let blob = largest_blob(&d);
    fs::remove_file(&blob).unwrap();
    symlink("/dev/zero", &blob).unwrap();
    c.refused(&d, REJECTED, "layer-zero-link", "symbolic link");

    let d = c.copy_good("manifest-zero-link");
    let m = manifest_blob(&d);
    fs::remove_file(&m).unwrap();
    symlink("/dev/zero", &m).unwrap();
    c.refused(&d, REJECTED, "manifest-zero-link", "symbolic link");

    // A blob that is a FIFO: refused, never waited on.
    let d = c.copy_good("fifo-blob");
    let blob = largest_blob(&d);
    fs::remove_file(&blob).unwrap();
    nix::unistd::mkfifo(&blob, nix::sys::stat::Mode::S_IRWXU).unwrap();
    c.refused(&d, REJECTED, "fifo-blob", "FIFO");

    // blobs/ as a link to a directory holding the right blobs: the whole set could be
    // switched after verification.
    let d = c.copy_good("blobs-link");
    let real = c.node.scratch("blobs-elsewhere");
    fs::rename(d.join("blobs"), &real).unwrap();
    symlink(&real, d.join("blobs")).unwrap();
    c.refused(&d, REJECTED, "blobs-link", "symbolic link");

    // bundle.json and index.json as links to good copies of themselves.
    for f in ["bundle.json", "index.json"] {
        let d = c.copy_good(&format!("{f}-link"));
        let real = c.node.scratch(&format!("{f}-real"));
        fs::rename(d.join(f), &real).unwrap();
        symlink(&real, d.join(f)).unwrap();
        c.refused(&d, REJECTED, &format!("{f}-link"), "symbolic link");
    }

    // An OCI layout (no bundle.json) whose layer is a link out, and a dir: tree whose
    // manifest is a link to /dev/zero and whose layer is a FIFO.
    let d = c.node.scratch("layout-link");
    copy_tree(&c.layout.dir, &d);
    let blob = largest_blob(&d);
    fs::remove_file(&blob).unwrap();
    symlink(c.canary.join("x"), &blob).unwrap();
    c.refused(&d, REJECTED, "layout-link", "symbolic link");

    let tree = c.node.scratch("dir-tree");
    common::node::run_ok(std::process::Command::new("skopeo").args([
        "copy",
        "-q",
        &c.layout.transport_ref(&c.layout.images[0].reference),
        &format!("dir:{}", tree.display()),
    ]));
    let d = c.node.scratch("dir-zero-manifest");
    copy_tree(&tree, &d);
    fs::remove_file(d.join("manifest.json")).unwrap();
    symlink("/dev/zero", d.join("manifest.json")).unwrap();
    // Without a regular manifest.json it is no dir: tree at all.
    let err = c.node.fails(&["import", d.to_str().unwrap()], REJECTED);
    assert!(err.contains("dir-zero-manifest"), "{err}");
    c.nothing_left("dir: tree with a linked manifest");
    c.cases += 1;

    let d = c.node.scratch("dir-fifo-layer");
    copy_tree(&tree, &d);
    let layer = c.layout.images[0].layers[1]
        .digest
        .strip_prefix("sha256:")
        .unwrap()
        .to_string();
    fs::remove_file(d.join(&layer)).unwrap();
    nix::unistd::mkfifo(&d.join(&layer), nix::sys::stat::Mode::S_IRWXU).unwrap();
    c.refused(&d, REJECTED, &layer, "regular file");
    assert!(c.cases >= 9);
}

/// Rewrites the good bundle's first image under `repository`, keeping bundle.json and
/// index.json consistent, so only the name is wrong.
fn renamed(c: &Corpus, dir_name: &str, repository: &str) -> PathBuf {
    let d = c.copy_good(dir_name);
    let mut meta: serde_json::Value = serde_json::from_slice(&c.meta).unwrap();
    let old_repo = meta["images"][0]["repository"]
        .as_str()
        .unwrap()
        .to_string();
    let tag = meta["images"][0]["tags"][0].as_str().unwrap().to_string();
    let digest = meta["images"][0]["digest"].as_str().unwrap().to_string();
    meta["images"][0]["repository"] = repository.into();
    meta["images"][0]["reference"] = format!("{repository}:{tag}").into();
    let sets = meta["sets"][0]["images"].as_array_mut().unwrap();
    for r in sets.iter_mut() {
        if r.as_str() == Some(&format!("{old_repo}@{digest}")) {
            *r = format!("{repository}@{digest}").into();
        }
    }
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] =
        format!("{repository}:{tag}").into();
    let index = serde_json::to_vec(&index).unwrap();
    fs::write(d.join("index.json"), &index).unwrap();
    meta["index"]["digest"] = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&index))
    )
    .into();
    meta["index"]["size"] = index.len().into();
    fs::write(
        d.join("bundle.json"),
        serde_json::to_vec_pretty(&meta).unwrap(),
    )
    .unwrap();
    d
}

#[test]
fn names_containers_image_refuses_are_refused_before_anything_is_recorded() {
    if !require(&["skopeo"]) {
        return;
    }
    let mut c = Corpus::new();
    let long = format!("example.com/{}", "a".repeat(250));
    for (i, repo) in [
        "example.com/a..b",
        "-evil.com/x",
        "evil-.com/x",
        "host:notaport/x",
        "example.com/UPPER",
        "example.com/x__-y",
        long.as_str(),
    ]
    .into_iter()
    .enumerate()
    {
        let d = renamed(&c, &format!("bad-name-{i}"), repo);
        c.refused(&d, REJECTED, &format!("bad-name-{i}"), "reference must be");
    }
    // The same names as docker archive tags and as OCI ref.names.
    for (i, tag) in ["-evil.com/x:1", "example.com/a..b:1", "host:notaport/x:1"]
        .into_iter()
        .enumerate()
    {
        let mut t = c.docker_archive();
        let manifest = serde_json::json!([{
            "Config": "missing.json", "RepoTags": [tag], "Layers": []
        }]);
        t.file("manifest.json", &serde_json::to_vec(&manifest).unwrap());
        let p = c.write(&format!("bad-tag-{i}.tar"), &mut t);
        c.refused(
            &p,
            REJECTED,
            &format!("bad-tag-{i}.tar"),
            "not a valid image reference",
        );
    }
}

#[test]
fn broken_configuration_stops_an_import_before_it_copies() {
    if !require(&["skopeo"]) {
        return;
    }
    let mut c = Corpus::new();
    let good = c.good.clone();
    // A set file naming an image by a reference containers/image refuses.
    let sets = c.node.sysroot.join("etc/longshore/sets.d");
    fs::create_dir_all(&sets).unwrap();
    fs::write(
        sets.join("broken.toml"),
        "images = [\"example.com/a..b@sha256:0000000000000000000000000000000000000000000000000000000000000000\"]\n",
    )
    .unwrap();
    let err = c.node.fails(&["import", good.to_str().unwrap()], 1);
    assert!(err.contains("broken.toml") && err.contains("a..b"), "{err}");
    c.nothing_left("a broken set file");
    fs::remove_file(sets.join("broken.toml")).unwrap();

    // A set file, then a configuration fragment, that is a link to /dev/zero.
    symlink("/dev/zero", sets.join("zero.toml")).unwrap();
    let err = c.node.fails(&["import", good.to_str().unwrap()], 1);
    assert!(
        err.contains("zero.toml") && err.contains("character device"),
        "{err}"
    );
    c.nothing_left("a set file linked to /dev/zero");
    fs::remove_file(sets.join("zero.toml")).unwrap();

    let conf = c.node.sysroot.join("etc/longshore/config.d/60-zero.toml");
    symlink("/dev/zero", &conf).unwrap();
    let err = c.node.fails(&["import", good.to_str().unwrap()], 1);
    assert!(
        err.contains("60-zero.toml") && err.contains("character device"),
        "{err}"
    );
    fs::remove_file(&conf).unwrap();
    c.node
        .write_config("61-huge.toml", &format!("# {}\n", "x".repeat(2 << 20)));
    let err = c.node.fails(&["status"], 1);
    assert!(
        err.contains("61-huge.toml") && err.contains("at most"),
        "{err}"
    );
    c.nothing_left("huge configuration");
    c.cases += 4;
}
