//! Bringing an input into longshore's own staging, verified, before any other program
//! sees it.
//!
//! skopeo's archive transports unpack into /var/tmp and follow what they find there, as
//! root; its directory transports read names that can be switched after longshore looked
//! at them. So every input is copied, hashed on the way, into a private [`Layout`] under
//! the state directory, and skopeo only ever reads that copy. A foreign input (a `docker
//! save` archive, an oci-archive, an OCI layout, a `dir:` tree) becomes a bundle there:
//! longshore writes its `bundle.json`, `index.json` and, for a docker archive, the
//! manifest containers/image would make of it, so the rest of the import is a bundle's.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use serde::Deserialize;

use super::archive::{Kind, Reader, TarError};
use super::foreign::Foreign;
use super::format::*;
use super::Rejected;
use crate::cancel::{Cancel, Checked};
use crate::oci::digest::{Digest, Hasher, HASH_BUFFER};
use crate::state::SourceKind;
use crate::untrusted::{quote, Tree};

/// Most entries an archive may hold (docker archives of a whole release hold a few
/// thousand).
pub const MAX_ARCHIVE_ENTRIES: u64 = 100_000;
/// How many bytes are written between two looks at the free space left.
const SPACE_CHECK_EVERY: u64 = 64 << 20;

/// A private OCI layout being written: blobs are content-addressed, written to a
/// temporary name while hashed, and renamed to their digest.
#[derive(Debug)]
pub struct Layout {
    dir: PathBuf,
    floor: u64,
    seq: AtomicU64,
    since_check: AtomicU64,
}

impl Layout {
    /// Makes the layout's directory (which must not exist) and its `blobs/sha256`.
    /// Writing fails once the filesystem has less than `floor` bytes free.
    pub fn create(dir: &Path, floor: u64) -> Result<Layout> {
        fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::create_dir_all(dir.join("blobs/sha256"))
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Layout {
            dir: dir.to_path_buf(),
            floor,
            seq: AtomicU64::new(0),
            since_check: AtomicU64::new(0),
        })
    }

    /// The layout's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where blob `d` lives.
    pub fn blob(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    /// The size of blob `d`, if the layout holds it.
    pub fn has(&self, d: &Digest) -> Option<u64> {
        fs::symlink_metadata(self.blob(d)).ok().map(|m| m.len())
    }

    /// Writes a top-level file (`bundle.json`, `index.json`, `oci-layout`).
    pub fn put_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self.dir.join(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .with_context(|| format!("creating {}", p.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", p.display()))
    }

    /// Stores `bytes` as a blob.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let (d, _) = self.put(&mut &bytes[..], bytes.len() as u64, &self.dir, "")?;
        Ok(d)
    }

    /// Stores what `r` yields as a blob, reading at most `limit` bytes (more is refused,
    /// naming `shown`). Returns its digest and length. A blob already there is kept.
    pub fn put(
        &self,
        r: &mut dyn Read,
        limit: u64,
        shown: &Path,
        what: &str,
    ) -> Result<(Digest, u64)> {
        let tmp = self.dir.join(format!(
            "blobs/.partial-{}",
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let res = self.write_hashed(r, limit, shown, what, &tmp);
        match res {
            Ok((d, len)) => {
                let dest = self.blob(&d);
                if dest.exists() {
                    let _ = fs::remove_file(&tmp);
                } else {
                    fs::rename(&tmp, &dest)
                        .with_context(|| format!("renaming {}", tmp.display()))?;
                }
                Ok((d, len))
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn write_hashed(
        &self,
        r: &mut dyn Read,
        limit: u64,
        shown: &Path,
        what: &str,
        tmp: &Path,
    ) -> Result<(Digest, u64)> {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut h = Hasher::new();
        let mut buf = vec![0u8; HASH_BUFFER.min(limit as usize + 1).max(1)];
        let mut r = r.take(limit + 1);
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if let Some(c) = cancelled(&e) {
                        return Err(c);
                    }
                    return Err(Rejected::new(shown, format!("{what}cannot be read: {e}")).into());
                }
            };
            h.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", tmp.display()))?;
            if self.since_check.fetch_add(n as u64, Ordering::Relaxed) + n as u64
                > SPACE_CHECK_EVERY
            {
                self.since_check.store(0, Ordering::Relaxed);
                self.check_floor(shown)?;
            }
        }
        let (d, len) = h.finish();
        if len > limit {
            return Err(Rejected::new(shown, format!("{what}is larger than {limit} bytes")).into());
        }
        Ok((d, len))
    }

    fn check_floor(&self, input: &Path) -> Result<()> {
        let st = nix::sys::statvfs::statvfs(&self.dir)
            .with_context(|| format!("checking free space on {}", self.dir.display()))?;
        let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
        if avail < self.floor {
            return Err(crate::store::NoSpace {
                input: input.to_path_buf(),
                message: format!(
                    "unpacking it into {} would leave less than the {} bytes that must stay free ({avail} left)",
                    self.dir.display(),
                    self.floor
                ),
            }
            .into());
        }
        Ok(())
    }

    /// Removes every blob but those in `keep` (the other files of an unpacked archive).
    pub fn prune(&self, keep: &std::collections::HashSet<Digest>) -> Result<()> {
        let dir = self.dir.join("blobs/sha256");
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            let name = e.file_name();
            let kept = name
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
                .is_some_and(|d| keep.contains(&d));
            if !kept {
                fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        Ok(())
    }

    /// Reads blob `d` whole, up to `limit` bytes.
    pub fn read(&self, d: &Digest, limit: u64) -> Result<Vec<u8>> {
        let p = self.blob(d);
        let len = fs::metadata(&p)
            .with_context(|| format!("reading {}", p.display()))?
            .len();
        if len > limit {
            return Err(Rejected::new(&p, format!("is larger than {limit} bytes")).into());
        }
        fs::read(&p).with_context(|| format!("reading {}", p.display()))
    }
}

fn cancelled(e: &io::Error) -> Option<anyhow::Error> {
    let inner = e.get_ref()?;
    let c = inner.downcast_ref::<crate::cancel::Cancelled>()?;
    Some(crate::cancel::Cancelled(c.0.clone()).into())
}

/// A foreign input brought into `layout` as a bundle: the bundle digest and metadata of
/// the `bundle.json` written there, and the bytes read from the input.
#[derive(Debug)]
pub struct Staged {
    /// sha256 of the `bundle.json` written.
    pub digest: Digest,
    /// Its content.
    pub meta: BundleMeta,
    /// Bytes read from the input.
    pub bytes_read: u64,
}

/// One image once its blobs are in the layout.
struct Found {
    repository: String,
    tags: Vec<String>,
    manifest: Digest,
    manifest_size: u64,
    media_type: String,
    config: BlobRef,
    layers: Vec<LayerMeta>,
}

/// Copies the images of `f` into `layout`, checking every digest, and writes the
/// bundle files that describe them. The implicit bundle has one set, named as the
/// input, pinned when `pinned`.
pub fn stage_foreign(
    f: &Foreign,
    layout: &Layout,
    pinned: bool,
    cancel: &Cancel,
) -> Result<Staged> {
    let (found, bytes_read) = match f.kind {
        SourceKind::DockerArchive | SourceKind::OciArchive => {
            let files = extract(&f.path, f.kind, layout, cancel)?;
            let found = if f.kind == SourceKind::DockerArchive {
                docker_images(f, layout, &files)?
            } else {
                let index = files.read(layout, &f.path, "index.json", MAX_DOCUMENT)?;
                check_oci_layout(&f.path, &files.read(layout, &f.path, "oci-layout", 4096)?)?;
                let mut present = |d: &Digest, size: u64| -> Result<()> {
                    match layout.has(d) {
                        Some(s) if s == size => Ok(()),
                        Some(s) => Err(Rejected::new(
                            &f.path,
                            format!("blob {d} has {s} bytes, but {size} are declared"),
                        )
                        .into()),
                        None => Err(Rejected::new(&f.path, format!("blob {d} is missing")).into()),
                    }
                };
                oci_images(f, layout, &index, &mut present)?
            };
            (found, files.bytes)
        }
        SourceKind::OciLayout => {
            let tree = Tree::open(&f.path)?;
            check_oci_layout(&tree.shown("oci-layout"), &tree.read("oci-layout", 4096)?)?;
            let index = tree.read("index.json", MAX_DOCUMENT)?;
            let mut bytes = 0u64;
            let mut fetch = |d: &Digest, size: u64| -> Result<()> {
                bytes += copy_blob(
                    &tree,
                    &format!("blobs/sha256/{}", d.hex()),
                    d,
                    size,
                    layout,
                    cancel,
                )?;
                Ok(())
            };
            let found = oci_images(f, layout, &index, &mut fetch)?;
            (found, bytes)
        }
        SourceKind::Dir => {
            let tree = Tree::open(&f.path)?;
            let img = f.images.first().context("a dir: tree holds one image")?;
            let raw = tree.read("manifest.json", MAX_DOCUMENT)?;
            let d = layout.put_bytes(&raw)?;
            let mut bytes = raw.len() as u64;
            let mut fetch = |d: &Digest, size: u64| -> Result<()> {
                bytes += copy_blob(&tree, &d.hex(), d, size, layout, cancel)?;
                Ok(())
            };
            let found = image_from_manifest(
                &tree.shown("manifest.json"),
                &img.repository,
                &img.tags,
                d,
                &raw,
                &mut fetch,
            )?;
            (vec![found], bytes)
        }
        SourceKind::BundleDir | SourceKind::BundleTar => {
            anyhow::bail!("{} is a bundle, not a foreign input", f.path.display())
        }
    };
    write_bundle_files(f, layout, found, pinned, bytes_read)
}

/// Copies `rel` of `tree` into the layout, checking it holds `size` bytes hashing to `d`.
fn copy_blob(
    tree: &Tree,
    rel: &str,
    d: &Digest,
    size: u64,
    layout: &Layout,
    cancel: &Cancel,
) -> Result<u64> {
    if layout.has(d) == Some(size) {
        return Ok(0);
    }
    let shown = tree.shown(rel);
    let (file, len) = tree.file(rel)?;
    if len != size {
        return Err(
            Rejected::new(&shown, format!("has {len} bytes, but {size} are declared")).into(),
        );
    }
    let (got, n) = layout.put(&mut Checked::new(file, cancel), size, &shown, "")?;
    if got != *d || n != size {
        let _ = fs::remove_file(layout.blob(&got));
        return Err(Rejected::new(
            &shown,
            format!("has content with digest {got} ({n} bytes), not the {d} its manifest names"),
        )
        .into());
    }
    Ok(n)
}

/// The regular files of an unpacked archive, by their normalised names, and the
/// symbolic links among its entries (never made on disk: only followed by name, inside
/// the archive).
struct Files {
    by_name: HashMap<String, (Digest, u64)>,
    links: HashMap<String, String>,
    bytes: u64,
}

impl Files {
    /// The file `name` names, through at most a few links.
    fn resolve(&self, name: &str) -> Option<(Digest, u64)> {
        let mut n = normalise(name)?;
        for _ in 0..8 {
            if let Some(f) = self.by_name.get(&n) {
                return Some(*f);
            }
            n = self.links.get(&n)?.clone();
        }
        None
    }

    fn read(&self, layout: &Layout, path: &Path, name: &str, limit: u64) -> Result<Vec<u8>> {
        let (d, size) = self
            .resolve(name)
            .ok_or_else(|| Rejected::new(path, format!("holds no {name}")))?;
        if size > limit {
            return Err(Rejected::new(path, format!("{name} is larger than {limit} bytes")).into());
        }
        layout.read(&d, limit)
    }
}

/// `a/./b/` as `a/b`; `None` for absolute names and names that climb out with `..`.
fn normalise(name: &str) -> Option<String> {
    if name.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Whether a file of this name belongs in an archive of `kind`. `docker save` writes
/// `<id>/layer.tar`, `<id>/json`, `<id>/VERSION`, `<config>.json`, `manifest.json` and
/// `repositories` (and, since Docker 25, an OCI layout beside them); containers/image's
/// writer (`podman save`) adds `<diff id>.tar` (docker/internal/tarfile/writer.go). Any
/// other name is refused before a byte of it is written.
fn belongs(kind: SourceKind, name: &str) -> bool {
    let hex = |s: &str| Digest::from_hex(s).is_ok();
    let oci = matches!(name, "oci-layout" | "index.json")
        || name.strip_prefix("blobs/sha256/").is_some_and(hex);
    match kind {
        SourceKind::DockerArchive => {
            oci || matches!(name, "manifest.json" | "repositories")
                || name.strip_suffix(".json").is_some_and(hex)
                || name.strip_suffix(".tar").is_some_and(hex)
                || name.split_once('/').is_some_and(|(id, file)| {
                    hex(id) && matches!(file, "layer.tar" | "json" | "VERSION")
                })
        }
        _ => oci || matches!(name, "manifest.json" | "repositories"),
    }
}

/// Unpacks every regular file of the archive at `path` into the layout, by content.
fn extract(path: &Path, kind: SourceKind, layout: &Layout, cancel: &Cancel) -> Result<Files> {
    let (_, stream) = super::read::open_stream(path)?;
    let mut reader = Reader::new(Checked::new(stream, cancel));
    let mut files = Files {
        by_name: HashMap::new(),
        links: HashMap::new(),
        bytes: 0,
    };
    let tar_err = |e: TarError| -> anyhow::Error {
        match e {
            TarError::Io(io) => cancelled(&io)
                .unwrap_or_else(|| Rejected::new(path, format!("cannot be read: {io}")).into()),
            e => Rejected::new(path, e.to_string()).into(),
        }
    };
    loop {
        let Some(mut entry) = reader.next_entry().map_err(tar_err)? else {
            break;
        };
        let shown = quote(&entry.name);
        let name = std::str::from_utf8(&entry.name)
            .ok()
            .and_then(|n| {
                (!n.starts_with('/') && !n.split('/').any(|c| c == "..")).then_some(n)
            })
            .and_then(normalise)
            .ok_or_else(|| {
                Rejected::new(
                    path,
                    format!("has entry {shown}, whose name is absolute, climbs out with \"..\" or is not UTF-8"),
                )
            })?;
        match entry.kind {
            Kind::Dir => continue,
            Kind::File => {
                if !belongs(kind, &name) {
                    return Err(Rejected::new(
                        path,
                        format!("has entry {shown}, which does not belong in an image archive"),
                    )
                    .into());
                }
                if files.by_name.contains_key(&name) || files.links.contains_key(&name) {
                    return Err(Rejected::new(path, format!("has entry {shown} twice")).into());
                }
                let what = format!("entry {shown} ");
                let size = entry.size;
                let (d, len) = layout.put(&mut entry, size, path, &what)?;
                if len != size {
                    return Err(Rejected::new(path, format!("is truncated: entry {shown} ends after {len} of {size} bytes")).into());
                }
                // A blob named by its digest must have that digest.
                if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                    if Digest::from_hex(hex).ok() != Some(d) {
                        return Err(Rejected::new(
                            path,
                            format!("entry {shown} has content with digest {d}, not the one its name says"),
                        )
                        .into());
                    }
                }
                files.bytes += len;
                files.by_name.insert(name, (d, len));
            }
            Kind::Symlink => {
                // `docker save` links a layer it already wrote under another name; such a
                // link is followed by name, inside the archive, and never made.
                let target = std::str::from_utf8(&entry.link).ok().filter(|t| !t.starts_with('/'));
                let parent = name.rsplit_once('/').map_or("", |(p, _)| p);
                let Some(resolved) = target.and_then(|t| normalise(&format!("{parent}/{t}"))) else {
                    return Err(Rejected::new(
                        path,
                        format!(
                            "has entry {shown}, a symbolic link to {}, which leads outside the archive",
                            quote(&entry.link)
                        ),
                    )
                    .into());
                };
                if files.by_name.contains_key(&name) || files.links.insert(name, resolved).is_some() {
                    return Err(Rejected::new(path, format!("has entry {shown} twice")).into());
                }
            }
            kind => {
                return Err(Rejected::new(
                    path,
                    format!(
                        "has entry {shown}, which is {}; image archives hold only regular files, directories and links between their own files",
                        kind.describe()
                    ),
                )
                .into())
            }
        }
        if reader.entries() > MAX_ARCHIVE_ENTRIES {
            return Err(Rejected::new(
                path,
                format!("has more than {MAX_ARCHIVE_ENTRIES} entries"),
            )
            .into());
        }
    }
    Ok(files)
}

/// The images of a `docker save` archive, with the manifest containers/image makes of
/// each written as a blob.
fn docker_images(f: &Foreign, layout: &Layout, files: &Files) -> Result<Vec<Found>> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        layers: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(Deserialize)]
    struct RootFs {
        diff_ids: Vec<Digest>,
    }
    let path = &f.path;
    let entries: Vec<Entry> =
        serde_json::from_slice(&files.read(layout, path, "manifest.json", MAX_DOCUMENT)?).map_err(
            |e| {
                Rejected::new(
                    path,
                    format!("manifest.json is not a docker archive manifest: {e}"),
                )
            },
        )?;
    let mut out = Vec::new();
    for img in &f.images {
        let e = entries.get(img.index).ok_or_else(|| {
            Rejected::new(path, format!("manifest.json has no image {}", img.index))
        })?;
        let locate = |name: &str| {
            files.resolve(name).ok_or_else(|| {
                Rejected::new(
                    path,
                    format!(
                        "image {}: {} names {}, which the archive does not hold",
                        img.index,
                        "manifest.json",
                        quote(name.as_bytes())
                    ),
                )
            })
        };
        let (config_digest, config_size) = locate(&e.config)?;
        let config_bytes = layout.read(&config_digest, MAX_DOCUMENT)?;
        let config: Config = serde_json::from_slice(&config_bytes).map_err(|err| {
            Rejected::new(
                path,
                format!(
                    "image {}: its config {} is not an image config: {err}",
                    img.index,
                    quote(e.config.as_bytes())
                ),
            )
        })?;
        if config.rootfs.diff_ids.len() != e.layers.len() {
            return Err(Rejected::new(
                path,
                format!(
                    "image {}: its config lists {} layers, but manifest.json {}",
                    img.index,
                    config.rootfs.diff_ids.len(),
                    e.layers.len()
                ),
            )
            .into());
        }
        let mut layers = Vec::new();
        for (name, diff_id) in e.layers.iter().zip(&config.rootfs.diff_ids) {
            let (d, size) = locate(name)?;
            if d != *diff_id && uncompressed_digest(&layout.blob(&d))? != Some(*diff_id) {
                return Err(Rejected::new(
                    path,
                    format!(
                        "image {}: layer {} does not hold the layer {diff_id} its config names",
                        img.index,
                        quote(name.as_bytes())
                    ),
                )
                .into());
            }
            layers.push(LayerMeta {
                digest: d,
                size,
                uncompressed_size: None,
            });
        }
        // The manifest containers/image's docker-archive source makes of an archive entry
        // (docker/internal/tarfile/src.go, GetManifest): the config as it is, and each
        // layer file as a blob, whatever its compression, byte for byte in this form.
        let mut m = String::from(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":"#,
        );
        m.push_str(&format!(
            r#"{config_size},"digest":"{config_digest}"}},"layers":["#
        ));
        for (i, l) in layers.iter().enumerate() {
            if i > 0 {
                m.push(',');
            }
            m.push_str(&format!(
                r#"{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":{},"digest":"{}"}}"#,
                l.size, l.digest
            ));
        }
        m.push_str("]}");
        let manifest = layout.put_bytes(m.as_bytes())?;
        out.push(Found {
            repository: img.repository.clone(),
            tags: img.tags.clone(),
            manifest,
            manifest_size: m.len() as u64,
            media_type: DOCKER_MANIFEST.to_string(),
            config: BlobRef {
                digest: config_digest,
                size: config_size,
            },
            layers,
        });
    }
    Ok(out)
}

/// The digest of a gzip or zstd layer's uncompressed content; `None` when it is neither.
fn uncompressed_digest(p: &Path) -> Result<Option<Digest>> {
    let mut f = File::open(p).with_context(|| format!("reading {}", p.display()))?;
    let mut head = [0u8; 4];
    let n = f.read(&mut head).unwrap_or(0);
    drop(f);
    let f = File::open(p).with_context(|| format!("reading {}", p.display()))?;
    let mut reader: Box<dyn Read> = match &head[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(f)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::stream::read::Decoder::new(f)?),
        _ => return Ok(None),
    };
    let mut buf = vec![0u8; HASH_BUFFER];
    Ok(crate::oci::digest::hash_reader(&mut reader, &mut buf)
        .ok()
        .map(|(d, _)| d))
}

/// The images of an OCI layout's index, each resolved to one image manifest (the one
/// for this machine's platform, when the index names an image index), with every blob
/// brought into the layout by `fetch`.
fn oci_images(
    f: &Foreign,
    layout: &Layout,
    index_bytes: &[u8],
    fetch: &mut dyn FnMut(&Digest, u64) -> Result<()>,
) -> Result<Vec<Found>> {
    let index_path = f.path.join("index.json");
    let index: Index = serde_json::from_slice(index_bytes)
        .map_err(|e| Rejected::new(&index_path, format!("is not a valid OCI index: {e}")))?;
    let mut out = Vec::new();
    for img in &f.images {
        let mut desc = index
            .manifests
            .get(img.index)
            .ok_or_else(|| Rejected::new(&index_path, format!("has no entry {}", img.index)))?
            .clone();
        // An image index names one manifest per platform: take this machine's.
        for _ in 0..2 {
            if desc.media_type != OCI_INDEX && desc.media_type != DOCKER_LIST {
                break;
            }
            check_document(&desc, &index_path)?;
            fetch(&desc.digest, desc.size)?;
            let nested: Index = serde_json::from_slice(&layout.read(&desc.digest, MAX_DOCUMENT)?)
                .map_err(|e| {
                Rejected::new(
                    &index_path,
                    format!("image index {} is not valid: {e}", desc.digest),
                )
            })?;
            desc = pick_platform(&nested, &index_path, &desc.digest)?;
        }
        check_document(&desc, &index_path)?;
        fetch(&desc.digest, desc.size)?;
        let raw = layout.read(&desc.digest, MAX_DOCUMENT)?;
        out.push(image_from_manifest(
            &index_path,
            &img.repository,
            &img.tags,
            desc.digest,
            &raw,
            fetch,
        )?);
    }
    Ok(out)
}

/// The Docker manifest list media type.
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

fn check_document(desc: &Descriptor, shown: &Path) -> Result<()> {
    if desc.size > MAX_DOCUMENT {
        return Err(Rejected::new(
            shown,
            format!(
                "names a manifest {} of {} bytes (at most {MAX_DOCUMENT})",
                desc.digest, desc.size
            ),
        )
        .into());
    }
    Ok(())
}

fn pick_platform(index: &Index, shown: &Path, digest: &Digest) -> Result<Descriptor> {
    let arch = crate::bundle::write::host_architecture();
    let platform = |d: &Descriptor| {
        let p = d.platform.as_ref();
        let get = |k: &str| {
            p.and_then(|p| p.get(k))
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        (get("os"), get("architecture"))
    };
    if let Some(d) = index
        .manifests
        .iter()
        .find(|d| platform(d) == ("linux".to_string(), arch.to_string()))
    {
        return Ok(d.clone());
    }
    let have: Vec<String> = index
        .manifests
        .iter()
        .map(|d| {
            let (os, a) = platform(d);
            format!("{os}/{a}")
        })
        .collect();
    Err(Rejected::new(
        shown,
        format!(
            "image index {digest} has no image for linux/{arch} (it has {})",
            have.join(", ")
        ),
    )
    .into())
}

/// One image from its manifest `raw` (already in the layout as `digest`): its config and
/// layers are brought in by `fetch`.
fn image_from_manifest(
    shown: &Path,
    repository: &str,
    tags: &[String],
    digest: Digest,
    raw: &[u8],
    fetch: &mut dyn FnMut(&Digest, u64) -> Result<()>,
) -> Result<Found> {
    if Digest::of(raw) != digest {
        return Err(Rejected::new(
            shown,
            format!("manifest {digest} changed while it was read"),
        )
        .into());
    }
    let m: Manifest = serde_json::from_slice(raw).map_err(|e| {
        Rejected::new(
            shown,
            format!("manifest {digest} is not a schema 2 image manifest: {e}"),
        )
    })?;
    let media_type = m
        .media_type
        .clone()
        .unwrap_or_else(|| OCI_MANIFEST.to_string());
    if m.schema_version != 2 || (media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST) {
        return Err(Rejected::new(
            shown,
            format!(
                "manifest {digest} is not an OCI or Docker schema 2 image manifest ({})",
                quote(media_type.as_bytes())
            ),
        )
        .into());
    }
    fetch(&m.config.digest, m.config.size)?;
    let mut layers = Vec::new();
    for l in &m.layers {
        fetch(&l.digest, l.size)?;
        layers.push(LayerMeta {
            digest: l.digest,
            size: l.size,
            uncompressed_size: None,
        });
    }
    Ok(Found {
        repository: repository.to_string(),
        tags: tags.to_vec(),
        manifest: digest,
        manifest_size: raw.len() as u64,
        media_type,
        config: BlobRef {
            digest: m.config.digest,
            size: m.config.size,
        },
        layers,
    })
}

fn check_oci_layout(path: &Path, bytes: &[u8]) -> Result<()> {
    super::read::check_oci_layout(path, bytes)
}

/// Writes `oci-layout`, `index.json` and `bundle.json` for the images found.
fn write_bundle_files(
    f: &Foreign,
    layout: &Layout,
    found: Vec<Found>,
    pinned: bool,
    bytes_read: u64,
) -> Result<Staged> {
    if found.is_empty() {
        return Err(Rejected::new(&f.path, "holds no image").into());
    }
    let mut images = Vec::new();
    let mut descriptors = Vec::new();
    for i in found {
        let reference = match i.tags.first() {
            Some(t) => format!("{}:{t}", i.repository),
            None => format!("{}@{}", i.repository, i.manifest),
        };
        let size = i.manifest_size + i.config.size + i.layers.iter().map(|l| l.size).sum::<u64>();
        descriptors.push(Descriptor {
            media_type: i.media_type.clone(),
            digest: i.manifest,
            size: i.manifest_size,
            annotations: [(REF_NAME.to_string(), reference.clone())].into(),
            platform: None,
        });
        images.push(ImageMeta {
            reference,
            repository: i.repository,
            tags: i.tags,
            digest: i.manifest,
            media_type: i.media_type,
            size,
            uncompressed_size: None,
            config: i.config,
            layers: i.layers,
        });
    }
    let referenced = super::read::declared_blobs_of(&images);
    layout.prune(&referenced)?;
    let index = serde_json::to_vec(&Index {
        schema_version: 2,
        media_type: Some(OCI_INDEX.to_string()),
        manifests: descriptors,
    })
    .context("serialising index.json")?;
    let meta = BundleMeta {
        schema_version: SCHEMA_VERSION,
        name: f.name.clone(),
        version: None,
        architecture: crate::bundle::write::host_architecture().to_string(),
        // A fixed time: the same input makes the same bundle, and so the same digest.
        created: "1970-01-01T00:00:00Z".to_string(),
        index: BlobRef {
            digest: Digest::of(&index),
            size: index.len() as u64,
        },
        sets: vec![SetMeta {
            name: f.name.clone(),
            images: images.iter().map(ImageMeta::digest_name).collect(),
            pinned,
            critical: false,
        }],
        images,
    };
    let bundle_json = serde_json::to_vec_pretty(&meta).context("serialising bundle.json")?;
    layout.put_file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    layout.put_file("index.json", &index)?;
    layout.put_file(BUNDLE_JSON, &bundle_json)?;
    // What was written must read back as a bundle; anything the input said that does not
    // (two images under one name, say) is refused here.
    let (digest, meta) = super::read::read_meta_dir(layout.dir())
        .map_err(|e| Rejected::new(&f.path, format!("{e:#}")))?;
    Ok(Staged {
        digest,
        meta,
        bytes_read,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_names_image_archives_hold_are_taken() {
        let h = "a".repeat(64);
        for ok in [
            "manifest.json",
            "repositories",
            &format!("{h}.json"),
            &format!("{h}/layer.tar"),
            &format!("{h}.tar"),
            &format!("blobs/sha256/{h}"),
        ] {
            assert!(belongs(SourceKind::DockerArchive, ok), "{ok}");
        }
        for bad in [
            "junk.bin",
            &format!("{h}/other"),
            "blobs/sha256/xyz",
            "etc/passwd",
        ] {
            assert!(!belongs(SourceKind::DockerArchive, bad), "{bad}");
        }
        assert!(!belongs(SourceKind::OciArchive, &format!("{h}.json")));
    }

    #[test]
    fn names_are_normalised_inside_the_archive() {
        assert_eq!(normalise("./a/./b/"), Some("a/b".into()));
        assert_eq!(normalise("a/../b"), Some("b".into()));
        assert_eq!(normalise("../b"), None);
        assert_eq!(normalise("/etc/passwd"), None);
    }
}
