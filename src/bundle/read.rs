//! Reading and verifying bundles: a directory in place, or a tar stream in one pass that
//! extracts into a staging directory and checks every digest on the way.
//!
//! Nothing a bundle says is trusted until the chain holds: `bundle.json` (whose sha256 is
//! the bundle's digest) names `index.json` by digest, `index.json` names each manifest,
//! each manifest names its config and layers, and every blob's content must hash to its
//! name. Files outside that chain are refused, so every byte that is kept is accounted for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};

use super::archive::{Entry, Kind, Reader, TarError};
use super::format::*;
use super::intake::Layout;
use super::Rejected;
use crate::cancel::{Cancel, Checked};
use crate::oci::digest::{hash_reader, Digest, Hasher, HASH_BUFFER};
use crate::untrusted::{quote, Tree};

/// A bundle whose digest chain has been checked end to end.
#[derive(Debug)]
pub struct Verified {
    /// The bundle's digest (sha256 of `bundle.json`).
    pub digest: Digest,
    /// Its metadata.
    pub meta: BundleMeta,
    /// The directory holding the verified OCI layout.
    pub layout: PathBuf,
    /// Total bytes of the blobs that were hashed.
    pub bytes_verified: u64,
}

/// How a bundle's bytes arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// Looks at the first bytes of a file to tell a (compressed) tar stream apart.
/// `None` means the content is not a tar stream this reader understands.
pub fn sniff(head: &[u8]) -> Option<Compression> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Some(Compression::None)
    } else {
        None
    }
}

/// Opens `path` (a file or a block device) as a decompressed tar stream.
pub fn open_stream(path: &Path) -> Result<(Compression, Box<dyn Read + Send>)> {
    let f = crate::untrusted::open_input(path)?;
    let mut r = BufReader::with_capacity(HASH_BUFFER, f);
    let head = r
        .fill_buf()
        .with_context(|| format!("reading {}", path.display()))?;
    let Some(kind) = sniff(head) else {
        return Err(Rejected::new(path, "is not a tar stream (plain, gzip or zstd)").into());
    };
    let stream: Box<dyn Read + Send> = match kind {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(BufReader::with_capacity(
            HASH_BUFFER,
            flate2::bufread::MultiGzDecoder::new(r),
        )),
        Compression::Zstd => Box::new(BufReader::with_capacity(
            HASH_BUFFER,
            zstd::stream::read::Decoder::with_buffer(r)
                .with_context(|| format!("starting zstd decoder for {}", path.display()))?,
        )),
    };
    Ok((kind, stream))
}

/// Reads just `bundle.json` of a bundle directory: its digest and metadata.
pub fn read_meta_dir(dir: &Path) -> Result<(Digest, BundleMeta)> {
    let bytes = Tree::open(dir)?.read(BUNDLE_JSON, MAX_BUNDLE_JSON)?;
    parse_meta(&dir.join(BUNDLE_JSON), &bytes)
}

/// Reads just the first entry of a tar bundle, which must be `bundle.json`.
pub fn read_meta_stream(path: &Path) -> Result<(Digest, BundleMeta)> {
    let mut found = None;
    walk_stream(path, &Cancel::default(), |name, entry| {
        match name.as_str() {
            "" | "blobs" | "blobs/sha256" if entry.kind == Kind::Dir => Ok(Flow::Next),
            BUNDLE_JSON => {
                let bytes = read_entry_limited(path, &name, entry, MAX_BUNDLE_JSON)?;
                found = Some(parse_meta(&path.join(BUNDLE_JSON), &bytes)?);
                Ok(Flow::Stop)
            }
            _ => Err(Rejected::new(
                path,
                format!(
                    "has {} as its first entry; a bundle starts with bundle.json",
                    quote(name.as_bytes())
                ),
            )
            .into()),
        }
    })?;
    found.ok_or_else(|| Rejected::new(path, "is an empty tar stream").into())
}

/// Whether [`walk_stream`] goes on to the next entry.
enum Flow {
    Next,
    Stop,
}

/// The stream a bundle's entries are read from.
type Stream = Checked<Box<dyn Read + Send>>;

/// Reads the tar stream at `path` entry by entry, handing each to `visit` with its
/// checked, normalised name (see [`entry_name`]), until `visit` stops or the stream ends.
fn walk_stream(
    path: &Path,
    cancel: &Cancel,
    visit: impl FnMut(String, &mut Entry<'_, Stream>) -> Result<Flow>,
) -> Result<()> {
    let res = walk_stream_entries(path, cancel, visit);
    // A read stopped from outside surfaces as whatever the tar reader made of it; say
    // what it was.
    match cancel.check() {
        Err(c) if res.is_err() => Err(c.into()),
        _ => res,
    }
}

fn walk_stream_entries(
    path: &Path,
    cancel: &Cancel,
    mut visit: impl FnMut(String, &mut Entry<'_, Stream>) -> Result<Flow>,
) -> Result<()> {
    let (_, stream) = open_stream(path)?;
    let mut reader = Reader::new(Checked::new(stream, cancel));
    loop {
        let mut entry = match reader.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(TarError::Io(e)) => {
                return Err(Rejected::new(path, format!("cannot be read: {e}")).into())
            }
            Err(e) => return Err(Rejected::new(path, e.to_string()).into()),
        };
        let name = entry_name(path, &entry)?;
        if let Flow::Stop = visit(name, &mut entry)? {
            break;
        }
    }
    Ok(())
}

/// What a bundle says about itself before its blobs: `bundle.json` and `index.json`,
/// checked against each other.
#[derive(Debug)]
pub struct Head {
    /// The bundle digest.
    pub digest: Digest,
    /// `bundle.json`.
    pub meta: BundleMeta,
}

/// Reads and cross-checks `bundle.json` and `index.json` of a bundle directory.
pub fn read_head_dir(dir: &Path, expected: Option<Digest>) -> Result<Head> {
    let (digest, meta) = read_meta_dir(dir)?;
    check_expected(&dir.join(BUNDLE_JSON), &digest, expected)?;
    let index_path = dir.join("index.json");
    let index = Tree::open(dir)?.read("index.json", MAX_DOCUMENT)?;
    check_index(dir, &meta, &index_path, &index)?;
    Ok(Head { digest, meta })
}

/// Reads and cross-checks `bundle.json` and `index.json` of a tar bundle, which both come
/// before the first blob.
pub fn read_head_stream(path: &Path, expected: Option<Digest>) -> Result<Head> {
    let (digest, meta) = read_meta_stream(path)?;
    check_expected(&path.join(BUNDLE_JSON), &digest, expected)?;
    let mut index_checked = false;
    walk_stream(path, &Cancel::default(), |name, entry| {
        if name == "index.json" {
            if entry.size != meta.index.size {
                return Err(Rejected::new(
                    &path.join("index.json"),
                    format!(
                        "has {} bytes, but bundle.json says {}",
                        entry.size, meta.index.size
                    ),
                )
                .into());
            }
            let bytes = read_entry_limited(path, &name, entry, MAX_DOCUMENT)?;
            check_index(path, &meta, &path.join("index.json"), &bytes)?;
            index_checked = true;
            return Ok(Flow::Stop);
        }
        Ok(if name.starts_with("blobs/sha256/") {
            Flow::Stop
        } else {
            Flow::Next
        })
    })?;
    if !index_checked {
        return Err(Rejected::new(
            path,
            "has no index.json before its first blob; index.json precedes the blobs",
        )
        .into());
    }
    Ok(Head { digest, meta })
}

/// Parses and checks `bundle.json` (read from `path`, named in errors): its schema version,
/// then every rule of docs/bundle-format.md §3 that needs nothing else.
pub fn parse_meta(path: &Path, bytes: &[u8]) -> Result<(Digest, BundleMeta)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Version {
        schema_version: u32,
    }
    let v: Version = serde_json::from_slice(bytes)
        .map_err(|e| Rejected::new(path, format!("is not valid bundle metadata: {e}")))?;
    if v.schema_version != SCHEMA_VERSION {
        return Err(Rejected::new(
            path,
            format!(
                "has schemaVersion {}; this longshore reads version {SCHEMA_VERSION}",
                v.schema_version
            ),
        )
        .into());
    }
    let meta: BundleMeta = serde_json::from_slice(bytes)
        .map_err(|e| Rejected::new(path, format!("is not valid bundle metadata: {e}")))?;
    check_meta(path, &meta)?;
    Ok((Digest::of(bytes), meta))
}

/// Checks `bundle.json` for consistency with itself, before anything it names is read.
fn check_meta(path: &Path, meta: &BundleMeta) -> Result<()> {
    let bad = |msg: String| -> anyhow::Error { Rejected::new(path, msg).into() };
    if !valid_set_name(&meta.name) {
        return Err(bad(format!(
            "has name {:?}; use letters, digits, '.', '_' and '-'",
            meta.name
        )));
    }
    if meta.images.is_empty() {
        return Err(bad("lists no images".into()));
    }
    let mut refs = HashSet::new();
    let mut names = HashSet::new();
    let mut tagged: HashMap<String, &str> = HashMap::new();
    for img in &meta.images {
        match split_reference(&img.reference) {
            Some((repo, RefTail::Tag(tag)))
                if repo == img.repository && img.tags.first() == Some(&tag) => {}
            Some((repo, RefTail::Digest(d)))
                if repo == img.repository && d == img.digest && img.tags.is_empty() => {}
            _ => {
                let why = crate::oci::reference::parse(&img.reference)
                    .err()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(bad(format!(
                    "image {}: reference must be repository:first-tag, or repository@digest for an untagged image{why}",
                    quote(img.reference.as_bytes())
                )));
            }
        }
        if let Some(t) = img.tags.iter().find(|t| !valid_tag(t)) {
            return Err(bad(format!(
                "image {}: invalid tag {}",
                quote(img.reference.as_bytes()),
                quote(t.as_bytes())
            )));
        }
        if !refs.insert(img.reference.as_str()) {
            return Err(bad(format!("lists image {:?} twice", img.reference)));
        }
        names.insert(img.digest_name());
        for t in &img.tags {
            let name = format!("{}:{t}", img.repository);
            if let Some(other) = tagged.insert(name.clone(), img.reference.as_str()) {
                return Err(bad(if other == img.reference {
                    format!("image {:?}: tag {t:?} is listed twice", img.reference)
                } else {
                    format!(
                        "gives {name:?} to two images: {other:?} and {:?}",
                        img.reference
                    )
                }));
            }
        }
        if img.media_type != OCI_MANIFEST && img.media_type != DOCKER_MANIFEST {
            return Err(bad(format!(
                "image {:?}: unsupported manifest media type {:?}",
                img.reference, img.media_type
            )));
        }
    }
    check_declared_sizes(path, meta)?;
    let mut set_names = HashSet::new();
    for set in &meta.sets {
        if !valid_set_name(&set.name) {
            return Err(bad(format!(
                "set {:?}: invalid name (use letters, digits, '.', '_' and '-')",
                set.name
            )));
        }
        if !set_names.insert(set.name.as_str()) {
            return Err(bad(format!("declares set {:?} twice", set.name)));
        }
        let mut members = HashSet::new();
        if let Some(twice) = set.images.iter().find(|r| !members.insert(*r)) {
            return Err(bad(format!("set {:?} lists {twice:?} twice", set.name)));
        }
        if let Some(missing) = set.images.iter().find(|r| !names.contains(*r)) {
            return Err(bad(format!(
                "set {:?} lists {missing:?}, which is not one of the bundle's images",
                set.name
            )));
        }
    }
    Ok(())
}

/// Every blob `bundle.json` declares, with its size: manifests (whose size is the image's
/// size less its config and layers), configs and layers. Checked for consistency when
/// `bundle.json` is read, so blobs can be refused before a byte of them is stored.
pub fn declared_blobs(meta: &BundleMeta) -> HashMap<Digest, u64> {
    let mut out = HashMap::new();
    for img in &meta.images {
        declare(img, &mut out);
    }
    out
}

/// The digests of every blob of `images`.
pub fn declared_blobs_of(images: &[ImageMeta]) -> HashSet<Digest> {
    let mut out = HashMap::new();
    for img in images {
        declare(img, &mut out);
    }
    out.into_keys().collect()
}

fn declare(img: &ImageMeta, out: &mut HashMap<Digest, u64>) {
    let layers: u64 = img.layers.iter().map(|l| l.size).sum();
    let manifest = img
        .size
        .saturating_sub(img.config.size)
        .saturating_sub(layers);
    out.insert(img.digest, manifest);
    out.insert(img.config.digest, img.config.size);
    for l in &img.layers {
        out.insert(l.digest, l.size);
    }
}

fn check_declared_sizes(path: &Path, meta: &BundleMeta) -> Result<()> {
    let mut sizes: HashMap<Digest, u64> = HashMap::new();
    for img in &meta.images {
        let layers = img
            .layers
            .iter()
            .try_fold(0u64, |a, l| a.checked_add(l.size));
        let manifest = layers
            .and_then(|l| img.size.checked_sub(l))
            .and_then(|r| r.checked_sub(img.config.size))
            .filter(|m| *m > 0 && *m <= MAX_DOCUMENT);
        let Some(manifest) = manifest else {
            return Err(Rejected::new(
                path,
                format!(
                    "image {:?}: size {} does not leave room for a manifest beside its config and layers",
                    img.reference, img.size
                ),
            )
            .into());
        };
        let blobs = std::iter::once((img.digest, manifest))
            .chain(std::iter::once((img.config.digest, img.config.size)))
            .chain(img.layers.iter().map(|l| (l.digest, l.size)));
        for (d, size) in blobs {
            if *sizes.entry(d).or_insert(size) != size {
                return Err(Rejected::new(
                    path,
                    format!("declares blob {d} with two different sizes"),
                )
                .into());
            }
        }
    }
    Ok(())
}

/// Whether `n` may name an image set (it becomes part of file and object paths).
pub fn valid_set_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && !n.starts_with(['.', '-'])
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Verifies a bundle directory. With `into`, every file is copied into that private
/// layout while it is hashed, and what is copied is what was checked (the input can
/// change afterwards without effect); `keep`, when given, limits the blobs copied to
/// those (the others are hashed only). Without `into`, it only checks.
///
/// `expected` is the digest the caller requires; it is checked before anything else is
/// read. Nothing below the directory is followed: every file is opened beneath it,
/// links refused (see [`crate::untrusted`]).
pub fn verify_dir(
    dir: &Path,
    expected: Option<Digest>,
    cancel: &Cancel,
    into: Option<(&Layout, Option<&HashSet<Digest>>)>,
) -> Result<Verified> {
    let tree = Tree::open(dir)?;
    let meta_bytes = tree.read(BUNDLE_JSON, MAX_BUNDLE_JSON)?;
    let (digest, meta) = parse_meta(&dir.join(BUNDLE_JSON), &meta_bytes)?;
    check_expected(&dir.join(BUNDLE_JSON), &digest, expected)?;
    let layout_bytes = tree.read("oci-layout", 4096)?;
    check_oci_layout(&dir.join("oci-layout"), &layout_bytes)?;
    let index_path = dir.join("index.json");
    let index = tree.read("index.json", MAX_DOCUMENT)?;
    check_index(dir, &meta, &index_path, &index)?;

    check_dir_entries(&tree, &["bundle.json", "oci-layout", "index.json", "blobs"])?;
    let blobs_tree = tree.dir("blobs")?;
    check_dir_entries(&blobs_tree, &["sha256"])?;
    let blob_tree = blobs_tree.dir("sha256")?;
    let declared = declared_blobs(&meta);
    let mut files = Vec::new();
    for (name, kind) in blob_tree.list()? {
        let shown = blob_tree.shown(&name);
        let digest = Digest::from_hex(&name)
            .map_err(|_| Rejected::new(&shown, "is not named by a sha256 digest"))?;
        if kind != rustix::fs::FileType::RegularFile {
            return Err(Rejected::new(
                &shown,
                format!(
                    "is {}, not a regular file",
                    crate::untrusted::describe(kind)
                ),
            )
            .into());
        }
        match declared.get(&digest) {
            None => {
                return Err(Rejected::new(
                    dir,
                    format!("holds blob {digest}, which no image references"),
                )
                .into())
            }
            Some(&size) => files.push((digest, size)),
        }
    }
    let copy = into;
    let (blobs, manifests) = hash_files(&blob_tree, files, &meta, cancel, copy)?;
    let bytes_verified = blobs.values().sum();
    check_chain(dir, &meta, &index_path, &index, &blobs, &manifests)?;
    let layout = match into {
        Some((l, _)) => {
            l.put_file(BUNDLE_JSON, &meta_bytes)?;
            l.put_file("oci-layout", &layout_bytes)?;
            l.put_file("index.json", &index)?;
            l.dir().to_path_buf()
        }
        None => dir.to_path_buf(),
    };
    Ok(Verified {
        digest,
        meta,
        layout,
        bytes_verified,
    })
}

/// Refuses anything in `dir` but `allowed`, as a tar stream's reader refuses stray entries.
fn check_dir_entries(dir: &Tree, allowed: &[&str]) -> Result<()> {
    for (name, _) in dir.list()? {
        if !allowed.contains(&name.as_str()) {
            return Err(Rejected::new(
                &dir.shown(&name),
                "does not belong in a bundle (it holds only bundle.json, oci-layout, index.json and blobs/sha256/)",
            )
            .into());
        }
    }
    Ok(())
}

/// What was hashed: each blob's size, and the bytes of each manifest.
type Hashed = (HashMap<Digest, u64>, HashMap<Digest, Vec<u8>>);

/// Hashes blob files on all cores, largest first, and checks each against its name and
/// declared size; with `copy`, writes each (or those it keeps) into the layout as it is
/// hashed. Manifests are read whole (they are small) and kept, so the bytes parsed are
/// the bytes hashed.
fn hash_files(
    blobs: &Tree,
    mut files: Vec<(Digest, u64)>,
    meta: &BundleMeta,
    cancel: &Cancel,
    copy: Option<(&Layout, Option<&HashSet<Digest>>)>,
) -> Result<Hashed> {
    files.sort_by_key(|f| std::cmp::Reverse(f.1));
    let manifest_digests: HashSet<Digest> = meta.images.iter().map(|i| i.digest).collect();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let manifests: Mutex<HashMap<Digest, Vec<u8>>> = Mutex::new(HashMap::new());
    std::thread::scope(|s| {
        for _ in 0..workers.min(files.len().max(1)) {
            s.spawn(|| {
                let mut buf = vec![0u8; HASH_BUFFER];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((want, size)) = files.get(i) else {
                        return;
                    };
                    let res = hash_one(
                        blobs,
                        want,
                        *size,
                        &manifest_digests,
                        cancel,
                        copy,
                        &mut buf,
                    )
                    .map(|kept| {
                        if let Some(bytes) = kept {
                            manifests
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(*want, bytes);
                        }
                    });
                    if let Err(e) = res {
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        next.store(files.len(), Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        cancel.check()?;
        return Err(e);
    }
    Ok((
        files.into_iter().collect(),
        manifests.into_inner().unwrap_or_else(|p| p.into_inner()),
    ))
}

/// Hashes (and copies) one blob; returns its bytes when it is a manifest.
fn hash_one(
    blobs: &Tree,
    want: &Digest,
    size: u64,
    manifests: &HashSet<Digest>,
    cancel: &Cancel,
    copy: Option<(&Layout, Option<&HashSet<Digest>>)>,
    buf: &mut [u8],
) -> Result<Option<Vec<u8>>> {
    let name = want.hex();
    let shown = blobs.shown(&name);
    let (file, len) = blobs.file(&name)?;
    if len != size {
        return Err(Rejected::new(
            &shown,
            format!("has {len} bytes, but bundle.json declares {size}"),
        )
        .into());
    }
    let mut reader = Checked::new(file, cancel).take(size + 1);
    let (got, n, kept) = if manifests.contains(want) {
        if size > MAX_DOCUMENT {
            return Err(
                Rejected::new(&shown, format!("is larger than {MAX_DOCUMENT} bytes")).into(),
            );
        }
        let mut bytes = Vec::with_capacity(size as usize);
        reader
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", shown.display()))?;
        if let Some((layout, _)) = copy {
            layout.put_bytes(&bytes)?;
        }
        (Digest::of(&bytes), bytes.len() as u64, Some(bytes))
    } else {
        match copy {
            Some((layout, keep)) if keep.is_none_or(|k| k.contains(want)) => {
                let (d, n) = layout.put(&mut reader, size, &shown, "")?;
                if d != *want {
                    let _ = fs::remove_file(layout.blob(&d));
                }
                (d, n, None)
            }
            _ => {
                let (d, n) = hash_reader(&mut reader, buf)
                    .with_context(|| format!("reading {}", shown.display()))?;
                (d, n, None)
            }
        }
    };
    if n != size {
        return Err(Rejected::new(&shown, "changed while the bundle was being verified").into());
    }
    if got != *want {
        return Err(Rejected::new(
            &shown,
            format!("has content with digest {got}, not the {want} its name says"),
        )
        .into());
    }
    Ok(kept)
}

/// Verifies a tar bundle in one pass. With `staging` (a directory that must not exist yet,
/// removed again on failure) it extracts the bundle there; without, it only checks, keeping
/// no more than the manifests in memory. `skip` names blobs that are hashed but not
/// written (those the cache holds already); manifests are always written.
pub fn verify_stream(
    path: &Path,
    staging: Option<&Path>,
    expected: Option<Digest>,
    cancel: &Cancel,
    skip: Option<&HashSet<Digest>>,
) -> Result<Verified> {
    let Some(staging) = staging else {
        return extract_verified(path, None, expected, cancel, None);
    };
    fs::create_dir(staging)
        .with_context(|| format!("creating staging directory {}", staging.display()))?;
    let res = extract_verified(path, Some(staging), expected, cancel, skip);
    if res.is_err() {
        if let Err(e) = fs::remove_dir_all(staging) {
            tracing::warn!("removing staging directory {}: {e}", staging.display());
        }
    }
    res
}

fn extract_verified(
    path: &Path,
    staging: Option<&Path>,
    expected: Option<Digest>,
    cancel: &Cancel,
    skip: Option<&HashSet<Digest>>,
) -> Result<Verified> {
    if let Some(staging) = staging {
        fs::create_dir_all(staging.join("blobs/sha256"))
            .with_context(|| format!("creating {}", staging.display()))?;
    }
    let mut manifests: HashMap<Digest, Vec<u8>> = HashMap::new();
    let mut declared: HashMap<Digest, u64> = HashMap::new();

    let mut meta: Option<(Digest, BundleMeta)> = None;
    let mut index: Option<Vec<u8>> = None;
    let mut layout_seen = false;
    let mut blobs: HashMap<Digest, u64> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut buf = vec![0u8; HASH_BUFFER];

    walk_stream(path, cancel, |name, entry| {
        let q = quote(name.as_bytes());
        if entry.kind == Kind::Dir {
            if !matches!(name.as_str(), "" | "blobs" | "blobs/sha256") {
                return Err(Rejected::new(
                    path,
                    format!("has unexpected directory entry {}", quote(name.as_bytes())),
                )
                .into());
            }
            return Ok(Flow::Next);
        }
        if !seen.insert(name.clone()) {
            return Err(
                Rejected::new(path, format!("has entry {} twice", quote(name.as_bytes()))).into(),
            );
        }
        if meta.is_none() && name != BUNDLE_JSON {
            return Err(Rejected::new(
                path,
                format!(
                    "has {} before bundle.json; a bundle starts with bundle.json",
                    quote(name.as_bytes())
                ),
            )
            .into());
        }
        match name.as_str() {
            BUNDLE_JSON => {
                let bytes = read_entry_limited(path, &name, entry, MAX_BUNDLE_JSON)?;
                let (digest, m) = parse_meta(&path.join(BUNDLE_JSON), &bytes)?;
                check_expected(&path.join(BUNDLE_JSON), &digest, expected)?;
                write_staged(staging, BUNDLE_JSON, &bytes)?;
                declared = declared_blobs(&m);
                meta = Some((digest, m));
            }
            "oci-layout" => {
                let bytes = read_entry_limited(path, &name, entry, 4096)?;
                check_oci_layout(&path.join("oci-layout"), &bytes)?;
                write_staged(staging, "oci-layout", &bytes)?;
                layout_seen = true;
            }
            "index.json" => {
                let want = meta.as_ref().map_or(0, |(_, m)| m.index.size);
                if entry.size != want {
                    return Err(Rejected::new(
                        &path.join("index.json"),
                        format!("has {} bytes, but bundle.json says {want}", entry.size),
                    )
                    .into());
                }
                let bytes = read_entry_limited(path, &name, entry, MAX_DOCUMENT)?;
                if let Some((_, m)) = &meta {
                    check_index(path, m, &path.join("index.json"), &bytes)?;
                }
                write_staged(staging, "index.json", &bytes)?;
                index = Some(bytes);
            }
            _ => {
                let Some(hex_name) = name.strip_prefix("blobs/sha256/") else {
                    return Err(Rejected::new(path, format!("has unexpected entry {q}")).into());
                };
                let want = Digest::from_hex(hex_name).map_err(|_| {
                    Rejected::new(
                        path,
                        format!("has entry {q}, which is not named by a sha256 digest"),
                    )
                })?;
                if index.is_none() {
                    return Err(Rejected::new(
                        path,
                        format!("has {q} before index.json; index.json precedes the blobs"),
                    )
                    .into());
                }
                let header_size = entry.size;
                // bundle.json came first, so every legitimate blob and its size is known.
                let expected_size = declared.get(&want).copied();
                match expected_size {
                    None => {
                        return Err(Rejected::new(
                            path,
                            format!("holds blob {want}, which no image references"),
                        )
                        .into())
                    }
                    Some(size) if size != header_size => {
                        return Err(Rejected::new(
                            path,
                            format!(
                            "entry {q} has {header_size} bytes, but bundle.json declares {size}"
                        ),
                        )
                        .into())
                    }
                    Some(_) => {}
                }
                let is_manifest = meta
                    .as_ref()
                    .is_some_and(|(_, m)| m.images.iter().any(|i| i.digest == want));
                let mut kept = Vec::new();
                let (got, len) = if is_manifest {
                    kept = read_entry_limited(path, &name, entry, MAX_DOCUMENT)?;
                    write_staged(staging, &name, &kept)?;
                    (Digest::of(&kept), kept.len() as u64)
                } else {
                    let dest = staging
                        .filter(|_| !skip.is_some_and(|k| k.contains(&want)))
                        .map(|s| s.join(&name));
                    copy_hashed(path, &name, entry, dest.as_deref(), &mut buf)?
                };
                if len != header_size {
                    return Err(Rejected::new(
                        path,
                        format!("is truncated: entry {q} ends after {len} of {header_size} bytes"),
                    )
                    .into());
                }
                if got != want {
                    return Err(Rejected::new(
                        path,
                        format!(
                            "entry {q} has content with digest {got}, not the {want} its name says"
                        ),
                    )
                    .into());
                }
                blobs.insert(got, len);
                if is_manifest {
                    manifests.insert(got, kept);
                }
            }
        }
        Ok(Flow::Next)
    })?;
    let Some((digest, meta)) = meta else {
        return Err(Rejected::new(path, "holds no bundle.json").into());
    };
    if !layout_seen {
        return Err(Rejected::new(path, "holds no oci-layout file").into());
    }
    let Some(index) = index else {
        return Err(Rejected::new(path, "holds no index.json").into());
    };
    check_chain(
        path,
        &meta,
        &path.join("index.json"),
        &index,
        &blobs,
        &manifests,
    )?;
    Ok(Verified {
        digest,
        meta,
        layout: staging.unwrap_or(path).to_path_buf(),
        bytes_verified: blobs.values().sum(),
    })
}

/// The normalised path of a tar entry, after refusing every kind of entry and path that
/// could place something outside the staging directory or that a bundle never holds.
fn entry_name<R: Read>(path: &Path, entry: &Entry<'_, R>) -> Result<String> {
    let shown = quote(&entry.name);
    if !matches!(entry.kind, Kind::File | Kind::Dir) {
        return Err(Rejected::new(
            path,
            format!(
                "has entry {shown}, which is {}; bundles hold only regular files and directories",
                entry.kind.describe()
            ),
        )
        .into());
    }
    let text = std::str::from_utf8(&entry.name)
        .map_err(|_| Rejected::new(path, format!("has entry {shown}, whose name is not UTF-8")))?;
    if text.starts_with('/') {
        return Err(Rejected::new(path, format!("has entry {shown} with an absolute path")).into());
    }
    let mut parts = Vec::new();
    for c in text.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(Rejected::new(
                    path,
                    format!("has entry {shown}, whose path contains \"..\""),
                )
                .into())
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

fn read_entry_limited<R: Read>(
    path: &Path,
    name: &str,
    entry: &mut Entry<'_, R>,
    limit: u64,
) -> Result<Vec<u8>> {
    let declared = entry.size;
    let name = quote(name.as_bytes());
    if declared > limit {
        return Err(
            Rejected::new(path, format!("entry {name} is larger than {limit} bytes")).into(),
        );
    }
    let mut bytes = Vec::new();
    entry
        .by_ref()
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| entry_read_error(path, &name, e))?;
    if bytes.len() as u64 > limit {
        return Err(
            Rejected::new(path, format!("entry {name} is larger than {limit} bytes")).into(),
        );
    }
    if bytes.len() as u64 != declared {
        return Err(Rejected::new(
            path,
            format!(
                "is truncated: entry {name} ends after {} of {declared} bytes",
                bytes.len()
            ),
        )
        .into());
    }
    Ok(bytes)
}

fn copy_hashed(
    path: &Path,
    name: &str,
    mut entry: impl Read,
    dest: Option<&Path>,
    buf: &mut [u8],
) -> Result<(Digest, u64)> {
    let mut out = match dest {
        Some(dest) => Some(
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dest)
                .with_context(|| format!("creating {}", dest.display()))?,
        ),
        None => None,
    };
    let mut h = Hasher::new();
    loop {
        let n = match entry.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(entry_read_error(path, name, e)),
        };
        h.update(&buf[..n]);
        if let (Some(out), Some(dest)) = (out.as_mut(), dest) {
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", dest.display()))?;
        }
    }
    Ok(h.finish())
}

/// A failed read of an entry's data: the stream ended early, or could not be read.
fn entry_read_error(path: &Path, name: &str, e: io::Error) -> anyhow::Error {
    if let Some(c) = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<crate::cancel::Cancelled>())
    {
        return crate::cancel::Cancelled(c.0.clone()).into();
    }
    let name = if name.starts_with('"') {
        name.to_string()
    } else {
        quote(name.as_bytes())
    };
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Rejected::new(
            path,
            format!("is truncated: entry {name} ends inside its data"),
        )
        .into()
    } else {
        Rejected::new(path, format!("entry {name} cannot be read: {e}")).into()
    }
}

fn write_staged(staging: Option<&Path>, name: &str, bytes: &[u8]) -> Result<()> {
    match staging {
        Some(s) => write_new(&s.join(name), bytes),
        None => Ok(()),
    }
}

fn write_new(dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .with_context(|| format!("creating {}", dest.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", dest.display()))
}

fn check_expected(path: &Path, got: &Digest, expected: Option<Digest>) -> Result<()> {
    match expected {
        Some(want) if want != *got => {
            Err(Rejected::new(path, format!("has digest {got}, but {want} was required")).into())
        }
        _ => Ok(()),
    }
}

/// Checks an `oci-layout` file.
pub fn check_oci_layout(path: &Path, bytes: &[u8]) -> Result<()> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct OciLayout {
        image_layout_version: String,
    }
    let l: OciLayout = serde_json::from_slice(bytes)
        .map_err(|e| Rejected::new(path, format!("is not a valid oci-layout file: {e}")))?;
    if l.image_layout_version != "1.0.0" {
        return Err(Rejected::new(
            path,
            format!(
                "has unsupported imageLayoutVersion {:?}",
                l.image_layout_version
            ),
        )
        .into());
    }
    Ok(())
}

/// Checks `index.json` against `bundle.json`: its digest and size, and one entry per
/// image with the same reference, digest and media type, in the same order.
pub fn check_index(
    layout: &Path,
    meta: &BundleMeta,
    index_path: &Path,
    index_bytes: &[u8],
) -> Result<Index> {
    let bundle_json = layout.join(BUNDLE_JSON);
    let got = Digest::of(index_bytes);
    if got != meta.index.digest || index_bytes.len() as u64 != meta.index.size {
        return Err(Rejected::new(
            index_path,
            format!(
                "has digest {got} and size {}, but bundle.json says {} and {}",
                index_bytes.len(),
                meta.index.digest,
                meta.index.size
            ),
        )
        .into());
    }
    let index: Index = serde_json::from_slice(index_bytes)
        .map_err(|e| Rejected::new(index_path, format!("is not a valid OCI index: {e}")))?;
    if index.schema_version != 2 || index.media_type.as_deref().is_some_and(|m| m != OCI_INDEX) {
        return Err(Rejected::new(
            index_path,
            "is not an OCI image index (schemaVersion 2, mediaType application/vnd.oci.image.index.v1+json)",
        )
        .into());
    }
    if index.manifests.len() != meta.images.len() {
        return Err(Rejected::new(
            &bundle_json,
            format!(
                "lists {} images, but index.json has {}",
                meta.images.len(),
                index.manifests.len()
            ),
        )
        .into());
    }
    for (img, desc) in meta.images.iter().zip(&index.manifests) {
        let ref_name = desc
            .annotations
            .get(REF_NAME)
            .map(String::as_str)
            .unwrap_or("");
        if ref_name != img.reference
            || desc.digest != img.digest
            || desc.media_type != img.media_type
        {
            return Err(Rejected::new(
                &bundle_json,
                format!(
                    "image {:?} ({}) does not match index.json's entry {ref_name:?} ({})",
                    img.reference, img.digest, desc.digest
                ),
            )
            .into());
        }
    }
    Ok(index)
}

fn check_chain(
    layout: &Path,
    meta: &BundleMeta,
    index_path: &Path,
    index_bytes: &[u8],
    blobs: &HashMap<Digest, u64>,
    manifests: &HashMap<Digest, Vec<u8>>,
) -> Result<()> {
    let bundle_json = layout.join(BUNDLE_JSON);
    let index = check_index(layout, meta, index_path, index_bytes)?;
    let mut referenced: HashSet<Digest> = HashSet::new();
    for (img, desc) in meta.images.iter().zip(&index.manifests) {
        let what = |d: &Digest| format!("image {:?}: blob {d}", img.reference);
        let blob_size = |d: &Digest, want: u64| -> Result<()> {
            match blobs.get(d) {
                None => Err(Rejected::new(
                    layout,
                    format!("{} is missing from the bundle", what(d)),
                )
                .into()),
                Some(&len) if len != want => Err(Rejected::new(
                    layout,
                    format!("{} has {len} bytes, but {want} are declared", what(d)),
                )
                .into()),
                Some(_) => Ok(()),
            }
        };
        blob_size(&desc.digest, desc.size)?;
        let manifest_path = layout.join("blobs/sha256").join(desc.digest.hex());
        let manifest_bytes = manifests.get(&desc.digest).ok_or_else(|| {
            Rejected::new(
                layout,
                format!("{} is missing from the bundle", what(&desc.digest)),
            )
        })?;
        let manifest: Manifest = serde_json::from_slice(manifest_bytes).map_err(|e| {
            Rejected::new(
                &manifest_path,
                format!("is not a valid image manifest: {e}"),
            )
        })?;
        if manifest.schema_version != 2 {
            return Err(Rejected::new(&manifest_path, "is not a schema 2 image manifest").into());
        }
        // An OCI manifest may leave mediaType out; a Docker schema 2 manifest always states it.
        let stated = manifest.media_type.as_deref().unwrap_or(OCI_MANIFEST);
        if stated != img.media_type {
            return Err(Rejected::new(
                &manifest_path,
                format!(
                    "has media type {:?}, but index.json says {:?}",
                    manifest.media_type, img.media_type
                ),
            )
            .into());
        }
        blob_size(&manifest.config.digest, manifest.config.size)?;
        let declared_layers: Vec<(Digest, u64)> =
            img.layers.iter().map(|l| (l.digest, l.size)).collect();
        let real_layers: Vec<(Digest, u64)> =
            manifest.layers.iter().map(|l| (l.digest, l.size)).collect();
        if img.config.digest != manifest.config.digest
            || img.config.size != manifest.config.size
            || declared_layers != real_layers
        {
            return Err(Rejected::new(
                &bundle_json,
                format!(
                    "image {:?}: config and layers do not match its manifest {}",
                    img.reference, img.digest
                ),
            )
            .into());
        }
        let mut total = desc.size + manifest.config.size;
        for (d, size) in &real_layers {
            blob_size(d, *size)?;
            total += size;
            referenced.insert(*d);
        }
        if total != img.size {
            return Err(Rejected::new(
                &bundle_json,
                format!(
                    "image {:?}: size is {} bytes, but bundle.json says {}",
                    img.reference, total, img.size
                ),
            )
            .into());
        }
        referenced.insert(desc.digest);
        referenced.insert(manifest.config.digest);
    }
    let unreferenced: BTreeMap<String, ()> = blobs
        .keys()
        .filter(|d| !referenced.contains(d))
        .map(|d| (d.to_string(), ()))
        .collect();
    if let Some(d) = unreferenced.keys().next() {
        return Err(Rejected::new(
            layout,
            format!(
                "holds blob {d}, which no image references ({} unreferenced in all)",
                unreferenced.len()
            ),
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::testkit;

    fn images() -> Vec<(&'static str, Vec<Vec<u8>>)> {
        vec![
            ("example.com/a:1", vec![vec![1u8; 5000], vec![2u8; 300]]),
            ("example.com/b:1", vec![vec![1u8; 5000], vec![3u8; 700]]),
        ]
    }

    fn made() -> (tempfile::TempDir, PathBuf, Digest, BundleMeta) {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("bundle");
        let (d, meta) = testkit::bundle(t.path(), &dir, &images());
        (t, dir, d, meta)
    }

    fn blob(dir: &Path, d: &Digest) -> PathBuf {
        dir.join("blobs/sha256").join(d.hex())
    }

    #[test]
    fn an_intact_bundle_verifies_and_a_copy_keeps_only_what_is_asked() {
        let (t, dir, digest, meta) = made();
        let v = verify_dir(&dir, Some(digest), &Cancel::default(), None).expect("verify");
        assert_eq!(v.digest, digest);
        assert_eq!(v.meta, meta);
        // The shared layer is hashed once: the bytes of the unique blobs.
        assert_eq!(
            v.bytes_verified,
            declared_blobs(&meta).values().sum::<u64>()
        );
        let keep: HashSet<Digest> = [meta.images[0].layers[1].digest].into();
        let into = Layout::create(&t.path().join("copy"), 0).expect("layout");
        verify_dir(&dir, None, &Cancel::default(), Some((&into, Some(&keep)))).expect("copy");
        let copied: Vec<_> = fs::read_dir(t.path().join("copy/blobs/sha256"))
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        // The kept layer, and the manifests (always copied: they are read whole).
        assert!(
            copied.contains(&meta.images[0].layers[1].digest.hex()),
            "{copied:?}"
        );
        assert!(
            !copied.contains(&meta.images[0].layers[0].digest.hex()),
            "{copied:?}"
        );
        assert!(t.path().join("copy/bundle.json").exists());
    }

    #[test]
    fn a_changed_byte_is_refused_naming_the_blob() {
        let (_t, dir, _, meta) = made();
        let p = blob(&dir, &meta.images[1].layers[1].digest);
        let mut bytes = fs::read(&p).expect("read");
        bytes[10] ^= 1;
        fs::write(&p, bytes).expect("write");
        let e = verify_dir(&dir, None, &Cancel::default(), None).expect_err("accepted");
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&meta.images[1].layers[1].digest.hex()),
            "{msg}"
        );
        assert!(msg.contains("not the"), "{msg}");
        assert!(e.downcast_ref::<Rejected>().is_some(), "{msg}");
    }

    #[test]
    fn a_wrong_digest_is_refused_before_any_blob_is_read() {
        let (_t, dir, _, meta) = made();
        // Even with a blob gone, the digest is what fails first.
        fs::remove_file(blob(&dir, &meta.images[0].layers[0].digest)).expect("remove");
        let other = Digest::of(b"another bundle");
        let e = verify_dir(&dir, Some(other), &Cancel::default(), None).expect_err("accepted");
        assert!(format!("{e:#}").contains("was required"), "{e:#}");
    }

    #[test]
    fn links_strays_and_short_blobs_are_refused() {
        let (_t, dir, _, meta) = made();
        let layer = blob(&dir, &meta.images[0].layers[1].digest);
        let saved = fs::read(&layer).expect("read");
        fs::remove_file(&layer).expect("remove");
        std::os::unix::fs::symlink("/dev/zero", &layer).expect("link");
        let e = verify_dir(&dir, None, &Cancel::default(), None).expect_err("a link");
        assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
        fs::remove_file(&layer).expect("remove");
        fs::write(&layer, &saved[..saved.len() - 1]).expect("short");
        let e = verify_dir(&dir, None, &Cancel::default(), None).expect_err("short");
        assert!(format!("{e:#}").contains("declares"), "{e:#}");
        fs::write(&layer, &saved).expect("restore");
        let stray = dir.join("blobs/sha256").join(Digest::of(b"x").hex());
        fs::write(&stray, b"x").expect("stray");
        let e = verify_dir(&dir, None, &Cancel::default(), None).expect_err("stray");
        assert!(
            format!("{e:#}").contains("which no image references"),
            "{e:#}"
        );
        fs::remove_file(&stray).expect("remove");
        fs::write(dir.join("notes.txt"), b"hi").expect("write");
        let e = verify_dir(&dir, None, &Cancel::default(), None).expect_err("extra file");
        assert!(format!("{e:#}").contains("does not belong"), "{e:#}");
    }
}
