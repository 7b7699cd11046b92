//! Deterministic generator of OCI image layouts and `docker save` style
//! archives, for integration tests and benchmarks.
//!
//! Everything produced here is a pure function of the [`ImageSpec`]s passed
//! in: no timestamps, random numbers or host details leak into the output
//! (apart from the image architecture, see [`oci_arch`]), so writing the same
//! specs twice yields byte-identical trees and therefore identical digests.
//!
//! Layers are streamed (tar → gzip → file) and hashed on the fly, so even a
//! benchmark data set of a gigabyte never holds more than a few MiB per
//! worker thread in memory.
//!
//! This file is shared between the integration tests (`tests/common/mod.rs`)
//! and the benchmark (`#[path = "../tests/common/fixture.rs"]`), so it only
//! depends on `std` and on crates that are regular dependencies of longshore.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;

use flate2::{Compression, GzBuilder};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Media type of an OCI image index (`index.json`).
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image config.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a gzip-compressed OCI layer.
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Annotation carrying the image reference in `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Label set in every generated config, holding the image reference, so
/// that images with identical layers still have distinct configs.
pub const LABEL_REFERENCE: &str = "fixture.reference";

/// Fixed creation time written into every image config.
const CREATED: &str = "2026-01-01T00:00:00Z";
/// Granularity of the semi-compressible data pattern.
const DATA_BLOCK: usize = 4096;
/// Buffer size for file output.
const IO_BUF: usize = 1 << 20;
/// Size of a tar header / padding block.
const TAR_BLOCK: u64 = 512;

/// One layer: a tar holding a single regular file `data/<seed>.bin` of
/// `size` bytes whose content is determined by `seed`.
///
/// Two layers with the same `(seed, size)` are byte-identical.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerSpec {
    /// Seed of the content generator; also names the file in the layer.
    pub seed: u64,
    /// Exact size in bytes of the one file inside the layer tar.
    pub size: usize,
}

/// One image to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    /// Full image reference, e.g. `example.com/app/web:2`.
    pub reference: String,
    /// Layers, base first.
    pub layers: Vec<LayerSpec>,
}

/// A generated layer blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixtureLayer {
    /// Digest of the compressed blob, `sha256:<hex>`.
    pub digest: String,
    /// Size of the compressed blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed layer tar, `sha256:<hex>`.
    pub diff_id: String,
    /// Size of the uncompressed layer tar in bytes.
    pub uncompressed_size: u64,
}

/// A generated image inside an OCI layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixtureImage {
    /// The reference from the [`ImageSpec`], also the `ref.name` annotation.
    pub reference: String,
    /// Digest of the image manifest, `sha256:<hex>`.
    pub manifest_digest: String,
    /// Size of the image manifest in bytes.
    pub manifest_size: u64,
    /// Digest of the image config, `sha256:<hex>`.
    pub config_digest: String,
    /// The image's layers, base first.
    pub layers: Vec<FixtureLayer>,
}

/// An OCI image layout written by [`write_oci_layout`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Root directory of the layout (holds `index.json`).
    pub dir: PathBuf,
    /// The images, in the order of the specs.
    pub images: Vec<FixtureImage>,
}

impl Layout {
    /// Path of the blob with the given `sha256:<hex>` digest.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join("blobs").join("sha256").join(hex)
    }

    /// The generated image with the given reference, if any.
    pub fn image(&self, reference: &str) -> Option<&FixtureImage> {
        self.images.iter().find(|i| i.reference == reference)
    }

    /// The `oci:DIR:REF` transport string for skopeo / containers-image.
    pub fn transport_ref(&self, reference: &str) -> String {
        format!("oci:{}:{}", self.dir.display(), reference)
    }
}

/// The OCI architecture name of the host: `amd64` on x86_64, `arm64` on
/// aarch64, otherwise [`std::env::consts::ARCH`] unchanged.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// `n` small images, `{prefix}/img{i}:1`, that all share one 64 KiB base
/// layer and each have one own 16 KiB layer.
pub fn small_images(prefix: &str, n: usize) -> Vec<ImageSpec> {
    let base = LayerSpec {
        seed: 1,
        size: 64 * 1024,
    };
    (0..n)
        .map(|i| ImageSpec {
            reference: format!("{prefix}/img{i}:1"),
            layers: vec![
                base,
                LayerSpec {
                    seed: 100 + i as u64,
                    size: 16 * 1024,
                },
            ],
        })
        .collect()
}

/// `n` images shaped like a product release, totalling about `total_bytes`
/// of unique uncompressed file data.
///
/// There are three distinct base layers (fewer if `n < 3`) of 15 % of
/// `total_bytes` each; image `i` uses base `i % 3`. Every image also has one
/// own layer; the own layers have deterministic, varying sizes (weights 1 to
/// 7) and together make up the rest of `total_bytes`. References are
/// `bench.example.com/release/component-{i:02}:v1`.
pub fn bench_images(n: usize, total_bytes: u64) -> Vec<ImageSpec> {
    if n == 0 {
        return Vec::new();
    }
    let bases = n.min(3);
    let base_size = total_bytes * 15 / 100;
    let own_total = total_bytes.saturating_sub(base_size * bases as u64);

    let mut rng = XorShift64Star::new(0xb3_7c_4d);
    let weights: Vec<u64> = (0..n).map(|_| 1 + rng.next_u64() % 7).collect();
    let weight_sum: u64 = weights.iter().sum();
    let mut own_sizes: Vec<u64> = weights
        .iter()
        .map(|w| (u128::from(own_total) * u128::from(*w) / u128::from(weight_sum)) as u64)
        .collect();
    // Hand the rounding remainder to the last image so the total is exact.
    let assigned: u64 = own_sizes.iter().sum();
    if let Some(last) = own_sizes.last_mut() {
        *last += own_total - assigned;
    }

    own_sizes
        .iter()
        .enumerate()
        .map(|(i, own)| ImageSpec {
            reference: format!("bench.example.com/release/component-{i:02}:v1"),
            layers: vec![
                LayerSpec {
                    seed: 1_000 + (i % bases) as u64,
                    size: base_size as usize,
                },
                LayerSpec {
                    seed: 2_000 + i as u64,
                    size: *own as usize,
                },
            ],
        })
        .collect()
}

/// Writes an OCI image layout holding `images` into `dir` (created if
/// missing) and returns the digests of everything written.
///
/// The layout has `oci-layout`, `index.json` with one manifest descriptor
/// per image (annotated with `org.opencontainers.image.ref.name` =
/// reference), and `blobs/sha256/<hex>` for every manifest, config and
/// gzip-compressed layer. Layers with equal `(seed, size)` are generated
/// once and stored once; blobs already present in `dir` are not rewritten.
/// Distinct layers are generated in parallel on all available cores.
pub fn write_oci_layout(dir: &Path, images: &[ImageSpec]) -> io::Result<Layout> {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs)?;

    let (unique, slot) = unique_layers(images);
    let built = par_map(&unique, |spec| write_layer_blob(&blobs, spec))?;

    let mut fixture_images = Vec::with_capacity(images.len());
    for image in images {
        let layers: Vec<FixtureLayer> = image
            .layers
            .iter()
            .map(|l| built[slot[l]].clone())
            .collect();
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();

        let config = config_json(&image.reference, &diff_ids)?;
        let config_digest = write_blob(&blobs, &config)?;

        let manifest = serde_json::to_vec(&Manifest {
            schema_version: 2,
            media_type: MEDIA_TYPE_OCI_MANIFEST,
            config: Descriptor {
                media_type: MEDIA_TYPE_OCI_CONFIG,
                digest: &config_digest,
                size: config.len() as u64,
                annotations: None,
            },
            layers: layers
                .iter()
                .map(|l| Descriptor {
                    media_type: MEDIA_TYPE_OCI_LAYER_GZIP,
                    digest: &l.digest,
                    size: l.size,
                    annotations: None,
                })
                .collect(),
        })?;
        let manifest_digest = write_blob(&blobs, &manifest)?;

        fixture_images.push(FixtureImage {
            reference: image.reference.clone(),
            manifest_digest,
            manifest_size: manifest.len() as u64,
            config_digest,
            layers,
        });
    }

    let index = serde_json::to_vec(&Index {
        schema_version: 2,
        media_type: MEDIA_TYPE_OCI_INDEX,
        manifests: fixture_images
            .iter()
            .map(|i| Descriptor {
                media_type: MEDIA_TYPE_OCI_MANIFEST,
                digest: &i.manifest_digest,
                size: i.manifest_size,
                annotations: Some(BTreeMap::from([(
                    ANNOTATION_REF_NAME,
                    i.reference.as_str(),
                )])),
            })
            .collect(),
    })?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    fs::write(dir.join("index.json"), index)?;

    Ok(Layout {
        dir: dir.to_path_buf(),
        images: fixture_images,
    })
}

/// Writes `images` as one uncompressed `docker save` style tarball to
/// `file` (replacing it).
///
/// The archive holds `<diff_id hex>/layer.tar` (the uncompressed layer tar)
/// once per distinct layer, `<config hex>.json` per image (same config
/// content as in [`write_oci_layout`], so the config digests match) and
/// `manifest.json` listing `Config`, `RepoTags: [reference]` and `Layers`
/// per image, in spec order. skopeo addresses image `N` (0-based) of a
/// multi-image archive as `docker-archive:FILE:@N`.
///
/// Layer tars are generated twice (once to learn their digests, once into
/// the archive) rather than buffered.
pub fn write_docker_archive(file: &Path, images: &[ImageSpec]) -> io::Result<()> {
    let (unique, slot) = unique_layers(images);
    let hashed = par_map(&unique, |spec| {
        let mut sink = HashingWriter::new(io::sink());
        write_layer_tar(spec, &mut sink)?;
        Ok(sink.finish())
    })?;

    let out = BufWriter::with_capacity(IO_BUF, File::create(file)?);
    let result = write_archive_entries(out, images, &unique, &slot, &hashed);
    if result.is_err() {
        let _ = fs::remove_file(file);
    }
    result
}

/// The body of [`write_docker_archive`]: layer tars, configs and
/// `manifest.json`, given the `(diff_id, tar length)` of every distinct
/// layer.
fn write_archive_entries(
    out: BufWriter<File>,
    images: &[ImageSpec],
    unique: &[LayerSpec],
    slot: &HashMap<LayerSpec, usize>,
    hashed: &[(String, u64)],
) -> io::Result<()> {
    let mut out = tar::Builder::new(out);

    for (spec, (diff_id, tar_len)) in unique.iter().zip(hashed) {
        let name = format!("{}/layer.tar", hex_of(diff_id));
        let mut header = file_header(&name, *tar_len)?;
        header.set_cksum();
        let dst = out.get_mut();
        dst.write_all(header.as_bytes())?;
        let mut counted = HashingWriter::counting_only(&mut *dst);
        write_layer_tar(spec, &mut counted)?;
        if counted.count != *tar_len {
            return Err(io::Error::other(format!(
                "layer tar for seed {} changed size between passes ({} != {})",
                spec.seed, counted.count, tar_len
            )));
        }
        let pad = (TAR_BLOCK - tar_len % TAR_BLOCK) % TAR_BLOCK;
        dst.write_all(&[0u8; TAR_BLOCK as usize][..pad as usize])?;
    }

    let mut entries = Vec::with_capacity(images.len());
    let mut written_configs = HashSet::new();
    for image in images {
        let diff_ids: Vec<String> = image
            .layers
            .iter()
            .map(|l| hashed[slot[l]].0.clone())
            .collect();
        let config = config_json(&image.reference, &diff_ids)?;
        let config_name = format!("{}.json", hex::encode(Sha256::digest(&config)));
        if written_configs.insert(config_name.clone()) {
            append_file(&mut out, &config_name, &config)?;
        }
        entries.push(DockerManifestEntry {
            config: config_name,
            repo_tags: vec![image.reference.clone()],
            layers: diff_ids
                .iter()
                .map(|d| format!("{}/layer.tar", hex_of(d)))
                .collect(),
        });
    }
    append_file(&mut out, "manifest.json", &serde_json::to_vec(&entries)?)?;

    out.into_inner()?
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    Ok(())
}

/// Writes the uncompressed tar of one layer to `w`: a `data/` directory
/// entry (mode 0755) and the regular file `data/<seed>.bin` (mode 0644),
/// both owned by 0:0 with mtime 0, followed by the end-of-archive marker.
pub fn write_layer_tar<W: Write>(spec: &LayerSpec, w: W) -> io::Result<()> {
    let mut builder = tar::Builder::new(w);

    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_path("data/")?;
    dir.set_size(0);
    dir.set_mode(0o755);
    dir.set_uid(0);
    dir.set_gid(0);
    dir.set_mtime(0);
    dir.set_cksum();
    builder.append(&dir, io::empty())?;

    let mut file = file_header(&format!("data/{}.bin", spec.seed), spec.size as u64)?;
    file.set_cksum();
    builder.append(&file, LayerData::new(spec.seed, spec.size as u64))?;

    builder.into_inner()?;
    Ok(())
}

/// A regular-file tar header (GNU format, 0644, 0:0, mtime 0) without
/// checksum.
fn file_header(path: &str, size: u64) -> io::Result<tar::Header> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_path(path)?;
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    Ok(header)
}

/// Appends a small in-memory file to a tar archive.
fn append_file<W: Write>(out: &mut tar::Builder<W>, path: &str, data: &[u8]) -> io::Result<()> {
    let mut header = file_header(path, data.len() as u64)?;
    header.set_cksum();
    out.append(&header, data)
}

/// Distinct layers of `images` in order of first appearance, and the index
/// of each `LayerSpec` in that list.
fn unique_layers(images: &[ImageSpec]) -> (Vec<LayerSpec>, HashMap<LayerSpec, usize>) {
    let mut unique = Vec::new();
    let mut slot = HashMap::new();
    for layer in images.iter().flat_map(|i| &i.layers) {
        slot.entry(*layer).or_insert_with(|| {
            unique.push(*layer);
            unique.len() - 1
        });
    }
    (unique, slot)
}

/// Generates one gzip-compressed layer blob into `blobs` (tar → gzip →
/// temp file, hashing both streams) and renames it to its digest. If a blob
/// with that digest already exists, the new copy is discarded.
fn write_layer_blob(blobs: &Path, spec: &LayerSpec) -> io::Result<FixtureLayer> {
    let tmp = temp_path(blobs);
    let result = (|| {
        let file = BufWriter::with_capacity(IO_BUF, File::create(&tmp)?);
        let gz = GzBuilder::new()
            .mtime(0)
            .write(HashingWriter::new(file), Compression::fast());
        let mut raw = HashingWriter::new(gz);
        write_layer_tar(spec, &mut raw)?;
        let (diff_id, uncompressed_size) = raw.digest();
        let mut compressed = raw.inner.finish()?;
        let (digest, size) = compressed.digest();
        compressed
            .inner
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        persist(&tmp, &blobs.join(hex_of(&digest)))?;
        Ok(FixtureLayer {
            digest,
            size,
            diff_id,
            uncompressed_size,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Stores `data` as `blobs/<sha256 hex>` unless already present and
/// returns its `sha256:<hex>` digest.
fn write_blob(blobs: &Path, data: &[u8]) -> io::Result<String> {
    let hex = hex::encode(Sha256::digest(data));
    let path = blobs.join(&hex);
    if !path.exists() {
        let tmp = temp_path(blobs);
        if let Err(e) = fs::write(&tmp, data).and_then(|()| persist(&tmp, &path)) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    }
    Ok(format!("sha256:{hex}"))
}

/// Moves `tmp` to `dst`, or drops it if `dst` already exists (blobs are
/// content-addressed, so the existing file has the same bytes).
fn persist(tmp: &Path, dst: &Path) -> io::Result<()> {
    if dst.exists() {
        fs::remove_file(tmp)
    } else {
        fs::rename(tmp, dst)
    }
}

/// A fresh hidden temp-file name inside `dir`.
fn temp_path(dir: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".fixture-tmp-{}-{n}", std::process::id()))
}

/// The image config (valid both as OCI and Docker config): fixed
/// `created`, host [`oci_arch`], `linux`, `Cmd ["/bin/sh"]`, the reference
/// as label [`LABEL_REFERENCE`], and `rootfs.diff_ids`.
fn config_json(reference: &str, diff_ids: &[String]) -> io::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&ImageConfig {
        created: CREATED,
        architecture: oci_arch(),
        os: "linux",
        config: RunConfig {
            cmd: ["/bin/sh"],
            labels: BTreeMap::from([(LABEL_REFERENCE, reference)]),
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids,
        },
    })?)
}

/// The hex part of a `sha256:<hex>` digest.
fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Runs `f` over `items` on up to `available_parallelism` threads (largest
/// layers first) and returns the results in item order, or the first error.
fn par_map<R, F>(items: &[LayerSpec], f: F) -> io::Result<Vec<R>>
where
    R: Send,
    F: Fn(&LayerSpec) -> io::Result<R> + Sync,
{
    let workers = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if workers <= 1 {
        return items.iter().map(&f).collect();
    }

    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(items[i].size));
    let next = AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);

    let done: Vec<Vec<(usize, io::Result<R>)>> = thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            break;
                        };
                        let r = f(&items[i]);
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        out.push((i, r));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });

    let mut results: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    for (i, r) in done.into_iter().flatten() {
        results[i] = Some(r?);
    }
    results
        .into_iter()
        .map(|r| r.ok_or_else(|| io::Error::other("layer generation aborted")))
        .collect()
}

/// xorshift64* pseudo-random generator (Vigna), seeded via splitmix64.
struct XorShift64Star(u64);

impl XorShift64Star {
    fn new(seed: u64) -> Self {
        // splitmix64 finaliser: unrelated streams for adjacent seeds.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // The state must never be zero.
        Self(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Reader producing the file content of a layer: per 4 KiB block, 2 KiB of
/// PRNG output followed by 2 KiB of one repeated (PRNG-chosen) byte, so
/// gzip shrinks it to a little over half.
struct LayerData {
    rng: XorShift64Star,
    block: [u8; DATA_BLOCK],
    pos: usize,
    remaining: u64,
}

impl LayerData {
    fn new(seed: u64, size: u64) -> Self {
        Self {
            rng: XorShift64Star::new(seed),
            block: [0; DATA_BLOCK],
            pos: DATA_BLOCK,
            remaining: size,
        }
    }

    fn refill(&mut self) {
        let (random, fill) = self.block.split_at_mut(DATA_BLOCK / 2);
        for word in random.chunks_exact_mut(8) {
            word.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        fill.fill((self.rng.next_u64() >> 56) as u8);
        self.pos = 0;
    }
}

impl Read for LayerData {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() && self.remaining > 0 {
            if self.pos == DATA_BLOCK {
                self.refill();
            }
            let take = (buf.len() - n)
                .min(DATA_BLOCK - self.pos)
                .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
            buf[n..n + take].copy_from_slice(&self.block[self.pos..self.pos + take]);
            self.pos += take;
            self.remaining -= take as u64;
            n += take;
        }
        Ok(n)
    }
}

/// Writer adapter that counts and (optionally) SHA-256-hashes everything
/// written through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Option<Sha256>,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Some(Sha256::new()),
            count: 0,
        }
    }

    fn counting_only(inner: W) -> Self {
        Self {
            inner,
            hasher: None,
            count: 0,
        }
    }

    /// `sha256:<hex>` of the bytes written so far (resets the hasher) and
    /// their count.
    fn digest(&mut self) -> (String, u64) {
        let hex = self
            .hasher
            .as_mut()
            .map(|h| hex::encode(h.finalize_reset()))
            .unwrap_or_default();
        (format!("sha256:{hex}"), self.count)
    }

    fn finish(mut self) -> (String, u64) {
        self.digest()
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// OCI / Docker image config, in a fixed field order.
#[derive(Serialize)]
struct ImageConfig<'a> {
    created: &'a str,
    architecture: &'a str,
    os: &'a str,
    config: RunConfig<'a>,
    rootfs: RootFs<'a>,
}

#[derive(Serialize)]
struct RunConfig<'a> {
    #[serde(rename = "Cmd")]
    cmd: [&'a str; 1],
    #[serde(rename = "Labels")]
    labels: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    diff_ids: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor<'a> {
    media_type: &'a str,
    digest: &'a str,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<&'a str, &'a str>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: Descriptor<'a>,
    layers: Vec<Descriptor<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Index<'a> {
    schema_version: u32,
    media_type: &'a str,
    manifests: Vec<Descriptor<'a>>,
}

/// One entry of a docker-archive `manifest.json`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    repo_tags: Vec<String>,
    layers: Vec<String>,
}
