//! `make bench`: import of a release-sized bundle against the same work done with a
//! `skopeo copy` loop, measured in the same run. Prints a table; asserts nothing.
//!
//! Figures:
//! - cold import of ~40 images (~1 GiB, shared base layers) vs a `skopeo copy` loop from
//!   the same layout into an empty store;
//! - no-op re-import vs the same loop run again over the images already present;
//! - verification throughput vs `openssl dgst -sha256` over the same bytes;
//! - peak RSS of longshore while importing and verifying;
//! - cold import into an empty store whose cache already holds the bundle's blobs, vs
//!   the cold import that fills the cache, and the cache's bytes on disk per bundle byte;
//! - a matrix of shapes, each cold and no-op against the loop in the same run: one base
//!   layer shared by every image (a release payload's usual shape), no sharing at all,
//!   200 tiny images, and 2 images of 1 GiB layers (`BENCH_MATRIX=0` skips it).
//!
//! Page caches are dropped before each cold run when this runs as root, so both sides
//! read the bundle from disk.

#[path = "../tests/common/fixture.rs"]
mod fixture;
#[path = "common/memory.rs"]
mod memory;
#[path = "../tests/common/node.rs"]
mod node;

use node::unmount_under;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LONGSHORE: &str = env!("CARGO_BIN_EXE_longshore");

struct Sandbox {
    dir: PathBuf,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs a command to completion, failing loudly; returns the wall time and the peak RSS
/// of the process itself (VmHWM, sampled until it exits).
fn measure(cmd: &mut Command) -> (Duration, u64) {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (status, peak) = memory::wait_with_peak(&mut child);
    let elapsed = start.elapsed();
    if !status.success() {
        let mut err = String::new();
        use std::io::Read;
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        panic!("{cmd:?} failed: {err}");
    }
    (elapsed, peak)
}

fn time(cmd: &mut Command) -> Duration {
    measure(cmd).0
}

fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn store(root: &Path) -> String {
    format!(
        "containers-storage:[overlay@{}+{}]",
        root.join("storage").display(),
        root.join("run").display()
    )
}

fn skopeo_loop(bundle: &Path, refs: &[String], root: &Path) -> Duration {
    let dest = store(root);
    let start = Instant::now();
    for r in refs {
        let st = Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                &format!("oci:{}:{r}", bundle.display()),
                &format!("{dest}{r}"),
            ])
            .status()
            .expect("skopeo");
        assert!(st.success(), "skopeo copy {r}");
    }
    start.elapsed()
}

/// The loop again, each image also copied under its digest name, as the import stores it
/// (pins match stored names only, so a tagged image in a set is stored by both; see
/// docs/image-sets.md). skopeo 1.9.3 writes one name per copy.
fn skopeo_loop_both_names(bundle: &Path, refs: &[String], root: &Path) -> Duration {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("index.json")).expect("index")).expect("json");
    let digest_of = |r: &str| -> String {
        index["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == r)
            .and_then(|m| m["digest"].as_str())
            .expect("digest of ref")
            .to_string()
    };
    let dest = store(root);
    let start = Instant::now();
    for r in refs {
        let repo = r.rsplit_once(':').map_or(r.as_str(), |(repo, _)| repo);
        for name in [r.clone(), format!("{repo}@{}", digest_of(r))] {
            let st = Command::new("skopeo")
                .args([
                    "copy",
                    "--quiet",
                    &format!("oci:{}:{r}", bundle.display()),
                    &format!("{dest}{name}"),
                ])
                .status()
                .expect("skopeo");
            assert!(st.success(), "skopeo copy {r} to {name}");
        }
    }
    start.elapsed()
}

/// Bytes the files under `p` take on disk (allocated blocks).
fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = fs::symlink_metadata(p) else {
        return 0;
    };
    if !md.is_dir() {
        return md.blocks() * 512;
    }
    fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| disk_usage(&e.path())).sum())
        .unwrap_or(0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// A shape of the matrix, by its key, to run when it is wanted.
type ShapeRun<'a> = Box<dyn Fn() -> Shape + 'a>;

/// One shape of the matrix: cold and no-op import, longshore against the loop.
struct Shape {
    name: &'static str,
    cold: (Duration, Duration),
    /// The loop that stores every name the import stores.
    both_cold: Duration,
    noop: (Duration, Duration),
}

/// Imports `specs` cold and again, with longshore and with the loop, into fresh stores
/// under `dir`.
fn shape(dir: &Path, name: &'static str, specs: &[fixture::ImageSpec]) -> Shape {
    eprintln!("matrix: {name} ({} images) ...", specs.len());
    fs::create_dir_all(dir).expect("shape dir");
    let layout = fixture::write_oci_layout(&dir.join("layout"), specs).expect("layout");
    let refs: Vec<String> = layout.images.iter().map(|i| i.reference.clone()).collect();
    let bundle = dir.join("bundle");
    let mut create = Command::new(LONGSHORE);
    create
        .args(["bundle", "create", "--name", "shape", "-o"])
        .arg(&bundle);
    for r in &refs {
        create.arg(layout.transport_ref(r));
    }
    measure(&mut create);
    let _ = fs::remove_dir_all(dir.join("layout"));
    let node = dir.join("node");
    let d = node.join("etc/longshore/config.d");
    fs::create_dir_all(&d).expect("config dir");
    fs::write(d.join("50-bench.toml"), "[crio]\nreload = false\n").expect("config");
    let import = || {
        time(
            Command::new(LONGSHORE)
                .arg("--sysroot")
                .arg(&node)
                .arg("import")
                .arg(&bundle),
        )
    };
    drop_caches();
    let loop_cold = skopeo_loop(&bundle, &refs, &dir.join("loop"));
    drop_caches();
    let ours_cold = import();
    let loop_noop = skopeo_loop(&bundle, &refs, &dir.join("loop"));
    let ours_noop = import();
    drop_caches();
    let both_cold = skopeo_loop_both_names(&bundle, &refs, &dir.join("loop-both"));
    unmount_under(dir);
    if std::env::var("BENCH_KEEP").is_ok_and(|v| v == "1") {
        let _ = fs::remove_dir_all(dir.join("node"));
        let _ = fs::remove_dir_all(dir.join("loop"));
        let _ = fs::remove_dir_all(dir.join("loop-both"));
        eprintln!("kept {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(dir);
    }
    Shape {
        name,
        cold: (ours_cold, loop_cold),
        both_cold,
        noop: (ours_noop, loop_noop),
    }
}

/// `n` images `bench.example.com/<prefix>/img-<i>:1`, image `i` made of `layers(i)`.
fn images(
    prefix: &str,
    n: usize,
    layers: impl Fn(usize) -> Vec<fixture::LayerSpec>,
) -> Vec<fixture::ImageSpec> {
    (0..n)
        .map(|i| fixture::ImageSpec {
            reference: format!("bench.example.com/{prefix}/img-{i:03}:1"),
            layers: layers(i),
        })
        .collect()
}

fn layer(seed: u64, size: usize) -> fixture::LayerSpec {
    fixture::LayerSpec { seed, size }
}

fn matrix(base: &Path) -> Vec<Shape> {
    // BENCH_SHAPES=shared,tiny runs only those.
    let only = std::env::var("BENCH_SHAPES").ok();
    let wanted = |k: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == k));
    let mut out = Vec::new();
    let all: [(&str, ShapeRun); 4] = [
        (
            "shared",
            Box::new(|| {
                shape(
                    &base.join("shared"),
                    "one base shared by 16 images",
                    &images("shared", 16, |i| {
                        vec![layer(1, 64 << 20), layer(100 + i as u64, 4 << 20)]
                    }),
                )
            }),
        ),
        (
            "unshared",
            Box::new(|| {
                shape(
                    &base.join("unshared"),
                    "16 images, no layer shared",
                    &images("unshared", 16, |i| {
                        vec![
                            layer(200 + i as u64, 16 << 20),
                            layer(300 + i as u64, 4 << 20),
                        ]
                    }),
                )
            }),
        ),
        (
            "tiny",
            Box::new(|| {
                shape(
                    &base.join("tiny"),
                    "200 tiny images",
                    &images("tiny", 200, |i| vec![layer(1000 + i as u64, 16 << 10)]),
                )
            }),
        ),
        (
            "big",
            Box::new(|| {
                shape(
                    &base.join("big"),
                    "2 images of 1 GiB layers",
                    &images("big", 2, |i| vec![layer(5000 + i as u64, 1 << 30)]),
                )
            }),
        ),
    ];
    for (key, run) in all {
        if wanted(key) {
            out.push(run());
        }
    }
    out
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` support: nothing to list.
    }
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    if std::env::var("BENCH_MATRIX_ONLY").is_ok_and(|v| v == "1") {
        let dir = base.join(format!("longshore-matrix-{}", std::process::id()));
        print_matrix(&matrix(&dir));
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
    let sb = Sandbox {
        dir: base.join(format!("longshore-bench-{}", std::process::id())),
    };
    fs::create_dir_all(&sb.dir).expect("bench dir");

    eprintln!(
        "generating {images} images, {} of layer content ...",
        mib(total)
    );
    let specs = fixture::bench_images(images, total);
    let layout = fixture::write_oci_layout(&sb.dir.join("layout"), &specs).expect("layout");
    let refs: Vec<String> = layout.images.iter().map(|i| i.reference.clone()).collect();

    eprintln!("longshore bundle create ...");
    let bundle = sb.dir.join("bundle");
    let mut create = Command::new(LONGSHORE);
    create
        .args(["bundle", "create", "--name", "bench", "-o"])
        .arg(&bundle);
    for r in &refs {
        create.arg(layout.transport_ref(r));
    }
    let (create_time, create_rss) = measure(&mut create);
    let blob_bytes: u64 = fs::read_dir(bundle.join("blobs/sha256"))
        .expect("blobs")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum();
    let blob_files: Vec<PathBuf> = fs::read_dir(bundle.join("blobs/sha256"))
        .expect("blobs")
        .map(|e| e.expect("entry").path())
        .collect();

    // Cold: the loop into one store, longshore into another.
    eprintln!("cold: skopeo copy loop ...");
    let dropped = drop_caches();
    let loop_root = sb.dir.join("loop");
    let loop_cold = skopeo_loop(&bundle, &refs, &loop_root);
    eprintln!("cold: longshore import ...");
    drop_caches();
    let node = sb.dir.join("node");
    // No CRI-O here to reload; the pins are still computed and written.
    let no_reload = |root: &Path| {
        let d = root.join("etc/longshore/config.d");
        fs::create_dir_all(&d).expect("config dir");
        fs::write(d.join("50-bench.toml"), "[crio]\nreload = false\n").expect("config");
    };
    no_reload(&node);
    no_reload(&sb.dir.join("node-tar"));
    let (import_cold, import_rss) = measure(
        Command::new(LONGSHORE)
            .arg("--sysroot")
            .arg(&node)
            .arg("import")
            .arg(&bundle),
    );

    // No-op: the same again over what is present.
    eprintln!("no-op passes ...");
    let loop_noop = skopeo_loop(&bundle, &refs, &loop_root);
    let import_noop = time(
        Command::new(LONGSHORE)
            .arg("--sysroot")
            .arg(&node)
            .arg("import")
            .arg(&bundle),
    );

    // Verification, warm cache, best of three each.
    eprintln!("verification ...");
    let best = |f: &mut dyn FnMut() -> (Duration, u64)| {
        (0..3).map(|_| f()).min_by_key(|r| r.0).expect("runs")
    };
    let (verify_time, verify_rss) =
        best(&mut || measure(Command::new(LONGSHORE).arg("verify").arg(&bundle)));
    let (openssl_time, _) = best(&mut || {
        measure(
            Command::new("openssl")
                .args(["dgst", "-sha256"])
                .args(&blob_files),
        )
    });
    let (sha256sum_time, _) = best(&mut || measure(Command::new("sha256sum").args(&blob_files)));

    // A tar stream verified in one pass (decompression included), for reference.
    let tar = sb.dir.join("bundle.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&bundle)
        .args(["bundle.json", "oci-layout", "index.json", "blobs"])
        .status()
        .expect("tar");
    assert!(st.success());
    let (verify_tar, verify_tar_rss) =
        best(&mut || measure(Command::new(LONGSHORE).arg("verify").arg(&tar)));

    // The stick case: the same bundle as one tar stream, extracted into staging while it
    // is verified, then copied.
    eprintln!("cold: longshore import of the tar stream ...");
    drop_caches();
    let (import_tar, import_tar_rss) = measure(
        Command::new(LONGSHORE)
            .arg("--sysroot")
            .arg(sb.dir.join("node-tar"))
            .arg("import")
            .arg(&tar),
    );

    // Cold into an empty store whose cache already holds the bundle's blobs (a second
    // node's disk prepared from the first, or the store wiped as CRI-O's wipe does):
    // every blob is still hashed from the bundle, none written to the cache.
    eprintln!("cold: longshore import with the blobs already cached ...");
    let cache_of = |root: &Path| root.join("var/lib/longshore/cache");
    let node_cached = sb.dir.join("node-cached");
    no_reload(&node_cached);
    fs::create_dir_all(cache_of(&node_cached).parent().expect("parent")).expect("state dir");
    let st = Command::new("cp")
        .arg("-a")
        .arg(cache_of(&node))
        .arg(cache_of(&node_cached))
        .status()
        .expect("cp");
    assert!(st.success());
    drop_caches();
    let import_cached = time(
        Command::new(LONGSHORE)
            .arg("--sysroot")
            .arg(&node_cached)
            .arg("import")
            .arg(&bundle),
    );
    let cache_disk = disk_usage(&cache_of(&node));

    let tput = |d: Duration| blob_bytes as f64 / d.as_secs_f64() / (1 << 20) as f64;
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4);

    let rate = |d: Duration| format!("{:.0} MiB/s", tput(d));
    println!();
    println!(
        "longshore import benchmark: {images} images, {} unique layer content, {} of blobs in the bundle",
        mib(total),
        mib(blob_bytes)
    );
    println!(
        "page caches dropped before cold runs: {}",
        if dropped { "yes" } else { "no (not root)" }
    );
    println!();
    row("figure", "longshore", "baseline", None, "target");
    row(
        "cold import vs skopeo copy loop",
        &secs(import_cold),
        &secs(loop_cold),
        Some(ratio(import_cold, loop_cold)),
        "<= 1.00",
    );
    row(
        "no-op re-import vs loop over present images",
        &secs(import_noop),
        &secs(loop_noop),
        Some(ratio(import_noop, loop_noop)),
        "<= 0.25, < 1 s",
    );
    row(
        &format!("verify dir ({threads} threads) vs openssl dgst -sha256"),
        &rate(verify_time),
        &rate(openssl_time),
        Some(tput(verify_time) / tput(openssl_time)),
        ">= 0.80",
    );
    row(
        "verify tar stream (1 pass) vs openssl",
        &rate(verify_tar),
        &rate(openssl_time),
        Some(tput(verify_tar) / tput(openssl_time)),
        "(reference)",
    );
    row(
        "openssl vs coreutils sha256sum",
        &rate(openssl_time),
        &rate(sha256sum_time),
        Some(tput(openssl_time) / tput(sha256sum_time)),
        "(reference)",
    );
    row(
        "cold import of the tar stream vs the loop",
        &secs(import_tar),
        &secs(loop_cold),
        Some(ratio(import_tar, loop_cold)),
        "(reference)",
    );
    row(
        "cold import, blobs already cached vs not",
        &secs(import_cached),
        &secs(import_cold),
        Some(ratio(import_cached, import_cold)),
        "(reference)",
    );
    row(
        "cache on disk vs the bundle's blob bytes",
        &mib(cache_disk),
        &mib(blob_bytes),
        Some(cache_disk as f64 / blob_bytes as f64),
        "(reference)",
    );
    row("peak RSS, import", &mib(import_rss), "", None, "< 64 MiB");
    row(
        "peak RSS, import of the tar stream",
        &mib(import_tar_rss),
        "",
        None,
        "< 64 MiB",
    );
    row(
        "peak RSS, verify dir",
        &mib(verify_rss),
        "",
        None,
        "< 64 MiB",
    );
    row(
        "peak RSS, verify tar",
        &mib(verify_tar_rss),
        "",
        None,
        "< 64 MiB",
    );
    row(
        &format!("bundle create ({images} images via the proxy)"),
        &secs(create_time),
        "",
        None,
        "",
    );
    row("peak RSS, bundle create", &mib(create_rss), "", None, "");
    drop(sb);
    if std::env::var("BENCH_MATRIX").as_deref() != Ok("0") {
        let dir = base.join(format!("longshore-matrix-{}", std::process::id()));
        let shapes = matrix(&dir);
        print_matrix(&shapes);
    }
}

fn print_matrix(shapes: &[Shape]) {
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!();
    println!("matrix: each shape against a skopeo copy loop over the same bundle, same run");
    row("figure", "longshore", "loop", None, "target");
    for s in shapes {
        row(
            &format!("cold: {}", s.name),
            &secs(s.cold.0),
            &secs(s.cold.1),
            Some(ratio(s.cold.0, s.cold.1)),
            "<= 1.00",
        );
        row(
            &format!("cold vs loop of both names: {}", s.name),
            &secs(s.cold.0),
            &secs(s.both_cold),
            Some(ratio(s.cold.0, s.both_cold)),
            "",
        );
        row(
            &format!("no-op: {}", s.name),
            &secs(s.noop.0),
            &secs(s.noop.1),
            Some(ratio(s.noop.0, s.noop.1)),
            "<= 0.25",
        );
    }
}

fn row(figure: &str, ours: &str, base: &str, ratio: Option<f64>, target: &str) {
    let ratio = match ratio {
        Some(r) => format!("{r:.2}"),
        None if figure == "figure" => "ratio".to_string(),
        None => String::new(),
    };
    println!("{figure:<46} {ours:>12} {base:>12} {ratio:>7}  {target}");
}
