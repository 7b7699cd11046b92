//! The cache: the original blobs and manifests of every image longshore brought in, each
//! stored once, in an OCI layout under `/var/lib/longshore/cache`.
//!
//! containers-storage keeps only unpacked layers (containers/image
//! `storage/storage_src.go`: `GetBlob` answers only by uncompressed digest, and copying an
//! image out re-compresses it under new digests), so without this cache an imported image
//! can be neither re-imported byte for byte nor served to another node.
//!
//! ```text
//! cache/
//!   oci-layout
//!   index.json                  every cached image, by full reference (ref.name annotation)
//!   blobs/sha256/<hex>          a blob whose content hashes to <hex>, nothing else
//!   blobs/sha256/<hex>.partial  a blob being written; its length is what is there already
//! ```
//!
//! A name in `blobs/sha256/` is only ever made by renaming a file whose content was hashed
//! to that digest: a verified file moved in from staging on the same filesystem, or a
//! partial completed by [`BlobWriter::finish`]. A bundle's own `bundle.json` and
//! `index.json` are kept as blobs too (the bundle digest is the sha256 of its
//! `bundle.json`), so a bundle is known to the cache by its digest alone.
//!
//! The cache never decides what is referenced: [`gc`] is told by the engine.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::oci::digest::{hash_reader, Digest, Hasher};

pub mod gc;

/// The OCI annotation an index entry names its image by.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Largest `index.json` of the cache read (about 300 bytes per name).
const MAX_INDEX: u64 = 64 << 20;

/// Suffix of a blob being written.
const PARTIAL: &str = ".partial";

/// The content-addressed cache of original blobs.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// One image the cache's index names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The manifest's media type.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// The manifest's digest.
    pub digest: Digest,
    /// The manifest's length.
    pub size: u64,
    /// `org.opencontainers.image.ref.name`: the full reference.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl IndexEntry {
    /// The full reference this entry names its image by.
    pub fn name(&self) -> Option<&str> {
        self.annotations.get(REF_NAME).map(String::as_str)
    }
}

/// An image the cache holds, as an index entry names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImage {
    /// The index entry: its digest is the image's as the name gives it (a list's, when
    /// the name is of a list).
    pub entry: IndexEntry,
    /// The image manifest (of this node's platform, for a list).
    pub manifest: Digest,
    /// The list the name gives, if it gives one.
    pub list: Option<Digest>,
    /// The image manifest's length.
    pub manifest_len: u64,
    /// Its config.
    pub config: crate::oci::Sized,
    /// Its layers.
    pub layers: Vec<crate::oci::Sized>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

/// A blob file of the cache, as listed.
#[derive(Debug, Clone)]
pub struct BlobFile {
    /// Its digest.
    pub digest: Digest,
    /// Bytes on disk.
    pub size: u64,
    /// When it was last written or brought in.
    pub modified: SystemTime,
}

/// What the cache holds.
#[derive(Debug, Default)]
pub struct Listing {
    /// Complete blobs.
    pub blobs: Vec<BlobFile>,
    /// Partial blobs: (the digest they will have, bytes there so far).
    pub partials: Vec<(Digest, u64)>,
}

impl Listing {
    /// Bytes of every file listed.
    pub fn bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum::<u64>()
            + self.partials.iter().map(|p| p.1).sum::<u64>()
    }
}

impl Cache {
    /// The cache under `root` (nothing is created until [`Cache::ensure`]).
    pub fn new(root: PathBuf) -> Cache {
        Cache { root }
    }

    /// Its directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blobs are.
    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    /// Makes the layout's files if they are missing.
    pub fn ensure(&self) -> Result<()> {
        let blobs = self.blobs_dir();
        fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        let layout = self.root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !self.root.join("index.json").exists() {
            self.write_index(&[])?;
        }
        Ok(())
    }

    /// Where blob `d` is (or would be).
    pub fn blob(&self, d: &Digest) -> PathBuf {
        self.blobs_dir().join(d.hex())
    }

    fn partial(&self, d: &Digest) -> PathBuf {
        self.blobs_dir().join(format!("{}{PARTIAL}", d.hex()))
    }

    /// The length of blob `d`, when the cache holds it complete.
    pub fn has(&self, d: &Digest) -> Option<u64> {
        fs::symlink_metadata(self.blob(d))
            .ok()
            .filter(|m| m.file_type().is_file())
            .map(|m| m.len())
    }

    /// Opens complete blob `d` for reading, with its length; never through a link.
    pub fn open(&self, d: &Digest) -> Result<(fs::File, u64)> {
        let f = open_regular(&self.blob(d))?;
        let len = f
            .metadata()
            .with_context(|| format!("reading {}", self.blob(d).display()))?
            .len();
        Ok((f, len))
    }

    /// Brings in `file`, whose content the caller hashed to `d`, by renaming it (it must be
    /// on the cache's filesystem). When the cache has `d` already, `file` is removed and
    /// the cached one kept. Returns whether the blob is new.
    pub fn adopt(&self, file: &Path, d: &Digest) -> Result<bool> {
        let dest = self.blob(d);
        if self.has(d).is_some() {
            fs::remove_file(file).with_context(|| format!("removing {}", file.display()))?;
            return Ok(false);
        }
        // Durable before the name says it is there.
        let f = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", file.display()))?;
        match fs::rename(file, &dest) {
            Ok(()) => {}
            // The cache mounted on a filesystem of its own: copied through a partial,
            // hashed again on the way.
            Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
                let size = f
                    .metadata()
                    .with_context(|| format!("reading {}", file.display()))?
                    .len();
                let mut w = self.writer(*d, size)?;
                if w.resume_at() > 0 {
                    drop(w);
                    let _ = fs::remove_file(self.partial(d));
                    w = self.writer(*d, size)?;
                }
                w.copy_from(&mut io::BufReader::new(&f))?;
                w.finish()?;
                fs::remove_file(file).with_context(|| format!("removing {}", file.display()))?;
                return Ok(true);
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("moving {} into {}", file.display(), dest.display()))
            }
        }
        sync_dir(&self.blobs_dir());
        // A partial of the same blob is of no use any more.
        let _ = fs::remove_file(self.partial(d));
        Ok(true)
    }

    /// Stores a small document (a `bundle.json`, an `index.json`) and returns its digest.
    /// A partial left by a killed writer is resumed; if what it held turns out wrong, it
    /// is discarded and the document written again whole.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of(bytes);
        if self.has(&d).is_some() {
            return Ok(d);
        }
        let write = || -> Result<bool> {
            let mut w = self.writer(d, bytes.len() as u64)?;
            let from = w.resume_at() as usize;
            // Written in two halves, with the crash tests' stop between them.
            let half = from + (bytes.len() - from) / 2;
            w.write_all(&bytes[from..half])?;
            w.flush()?;
            crate::cancel::fault_point("cache-partial");
            w.write_all(&bytes[half..])?;
            match w.finish() {
                Ok(_) => Ok(true),
                Err(_) if from > 0 => Ok(false),
                Err(e) => Err(e),
            }
        };
        if !write()? {
            write()?;
        }
        Ok(d)
    }

    /// Reads blob `d` whole, at most `limit` bytes, checking its digest.
    pub fn read(&self, d: &Digest, limit: u64) -> Result<Vec<u8>> {
        let p = self.blob(d);
        let f = open_regular(&p)?;
        let mut bytes = Vec::new();
        f.take(limit + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", p.display()))?;
        if bytes.len() as u64 > limit {
            bail!("{} is larger than {limit} bytes", p.display());
        }
        let got = Digest::of(&bytes);
        if got != *d {
            bail!(
                "{} has content with digest {got}: the cache is damaged",
                p.display()
            );
        }
        Ok(bytes)
    }

    /// Hashes blob `d` and checks it against its name and `size`.
    pub fn check(&self, d: &Digest, size: u64) -> Result<()> {
        let p = self.blob(d);
        let f = open_regular(&p)?;
        let mut buf = vec![0u8; 1 << 20];
        let (got, n) = hash_reader(f.take(size + 1), &mut buf)
            .with_context(|| format!("reading {}", p.display()))?;
        if got != *d || n != size {
            bail!(
                "{} has {n} bytes with digest {got}, not {size} with {d}: the cache is damaged",
                p.display()
            );
        }
        Ok(())
    }

    /// Bytes a partial of blob `d` holds now (0 when there is none).
    pub fn partial_len(&self, d: &Digest) -> u64 {
        fs::symlink_metadata(self.partial(d))
            .ok()
            .filter(|m| m.file_type().is_file())
            .map_or(0, |m| m.len())
    }

    /// Starts (or resumes) writing blob `want` of `size` bytes.
    ///
    /// A partial left by an earlier writer is kept when it is no longer than `size`: its
    /// bytes are hashed again and writing continues at [`BlobWriter::resume_at`]. One
    /// longer than the blob can be is removed and writing starts again from nothing.
    /// A partial is written by one writer at a time: it holds an exclusive lock on the
    /// file, and another writer is refused ([`Busy`]) rather than interleaving bytes.
    pub fn writer(&self, want: Digest, size: u64) -> Result<BlobWriter> {
        self.ensure()?;
        let path = self.partial(&want);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .custom_flags(libc_nofollow())
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if fs2::FileExt::try_lock_exclusive(&file).is_err() {
            return Err(Busy(want).into());
        }
        let mut len = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let mut hasher = Hasher::new();
        if len > size {
            file.set_len(0)
                .with_context(|| format!("truncating {}", path.display()))?;
            len = 0;
        } else if len > 0 {
            file.seek(SeekFrom::Start(0))
                .with_context(|| format!("reading {}", path.display()))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = len;
            while left > 0 {
                let n = file
                    .read(&mut buf[..left.min(1 << 20) as usize])
                    .with_context(|| format!("reading {}", path.display()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
            len -= left;
        }
        Ok(BlobWriter {
            cache: self.clone(),
            want,
            size,
            path,
            file,
            hasher,
            written: len,
            resumed: len,
        })
    }

    /// The image the index names `name`, when the cache holds its manifest and every blob
    /// the manifest names: an image that can be copied from the cache alone. A name of a
    /// list of images (by the list's digest, or a tag that named a list) is the image of
    /// this node's platform, as containers/image pulls it.
    pub fn complete(&self, name: &str) -> Option<CachedImage> {
        let e = self
            .index()
            .ok()?
            .into_iter()
            .find(|e| e.name() == Some(name))?;
        self.complete_entry(e)
    }

    /// The index by name, read once for many lookups with [`Cache::complete_entry`]. An
    /// index that cannot be read names nothing.
    pub fn index_by_name(&self) -> std::collections::HashMap<String, IndexEntry> {
        self.index()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| Some((e.name()?.to_string(), e)))
            .collect()
    }

    /// [`Cache::complete`] for an index entry already read.
    pub fn complete_entry(&self, e: IndexEntry) -> Option<CachedImage> {
        let img = self.image_of(e)?;
        std::iter::once(&img.config)
            .chain(&img.layers)
            .all(|(d, size)| self.has(d) == Some(*size))
            .then_some(img)
    }

    /// What index entry `e` names, when the cache holds its manifest (and, for a list,
    /// the manifest of this node's platform).
    fn image_of(&self, e: IndexEntry) -> Option<CachedImage> {
        let top = self
            .read(&e.digest, crate::bundle::format::MAX_DOCUMENT)
            .ok()?;
        let arch = crate::bundle::write::host_architecture();
        let (manifest, list, bytes) = match crate::oci::list_instance(&top, arch) {
            None => (e.digest, None, top),
            Some(None) => return None,
            Some(Some((d, size))) => {
                let bytes = self.read(&d, crate::bundle::format::MAX_DOCUMENT).ok()?;
                (bytes.len() as u64 == size).then_some((d, Some(e.digest), bytes))?
            }
        };
        let (config, layers) = crate::oci::sized_blobs_of_manifest(&bytes)?;
        Some(CachedImage {
            entry: e,
            manifest,
            list,
            manifest_len: bytes.len() as u64,
            config,
            layers,
        })
    }

    /// Every blob the image or list `top` reaches that the cache holds: itself and, for
    /// a list, each of its images' manifests the cache holds; then each manifest's config
    /// and layers.
    pub fn closure(&self, top: &Digest) -> Vec<Digest> {
        let Ok(bytes) = self.read(top, crate::bundle::format::MAX_DOCUMENT) else {
            return vec![];
        };
        let mut out = vec![*top];
        let manifests: Vec<(Digest, Vec<u8>)> = match crate::oci::list_instances(&bytes) {
            Some(all) => all
                .into_iter()
                .filter_map(|d| {
                    let b = self.read(&d, crate::bundle::format::MAX_DOCUMENT).ok()?;
                    Some((d, b))
                })
                .collect(),
            None => vec![(*top, bytes)],
        };
        for (d, b) in manifests {
            if d != *top {
                out.push(d);
            }
            out.extend(crate::oci::blobs_of_manifest(&b));
        }
        out
    }

    /// Whether a writer holds the partial of `d` now.
    pub fn writing(&self, d: &Digest) -> bool {
        fs::File::open(self.partial(d)).is_ok_and(|f| fs2::FileExt::try_lock_shared(&f).is_err())
    }

    /// Serialises changes of `index.json` between processes (the daemon's fetches and an
    /// import).
    fn index_lock(&self) -> Result<fs::File> {
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        let p = self.root.join(".index.lock");
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc_nofollow())
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        fs2::FileExt::lock_exclusive(&f).with_context(|| format!("locking {}", p.display()))?;
        Ok(f)
    }

    /// The images the index names.
    pub fn index(&self) -> Result<Vec<IndexEntry>> {
        let p = self.root.join("index.json");
        let f = match fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e).with_context(|| format!("opening {}", p.display())),
        };
        let mut bytes = Vec::new();
        f.take(MAX_INDEX)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", p.display()))?;
        let index: Index = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid index", p.display()))?;
        Ok(index.manifests)
    }

    /// Names `entries` in the index: an entry for a name already there replaces it. An
    /// index that cannot be read (a damaged disk) is started again: the blobs stay, and
    /// each import names its images anew.
    pub fn name_images(&self, entries: &[IndexEntry]) -> Result<()> {
        let _lock = self.index_lock()?;
        let mut all = self.index().unwrap_or_else(|e| {
            tracing::warn!("starting the cache's index again: {e:#}");
            vec![]
        });
        all.retain(|e| !entries.iter().any(|n| n.name() == e.name()));
        all.extend(entries.iter().cloned());
        all.sort_by(|a, b| a.name().cmp(&b.name()));
        self.write_index(&all)
    }

    /// Drops the index entries whose manifest the cache no longer holds.
    pub fn forget_missing(&self) -> Result<usize> {
        let _lock = self.index_lock()?;
        let Ok(mut all) = self.index() else {
            return Ok(0);
        };
        let before = all.len();
        all.retain(|e| self.has(&e.digest).is_some());
        if all.len() != before {
            self.write_index(&all)?;
        }
        Ok(before - all.len())
    }

    fn write_index(&self, entries: &[IndexEntry]) -> Result<()> {
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        let bytes = serde_json::to_vec_pretty(&Index {
            schema_version: 2,
            manifests: entries.to_vec(),
        })?;
        write_atomic(&self.root.join("index.json"), &bytes)
    }

    /// The digests of the complete blobs (an unreadable cache holds none).
    pub fn digests(&self) -> std::collections::HashSet<Digest> {
        self.list()
            .map(|l| l.blobs.into_iter().map(|b| b.digest).collect())
            .unwrap_or_default()
    }

    /// Every blob and partial in the cache. Files of other names are not listed.
    pub fn list(&self) -> Result<Listing> {
        let dir = self.blobs_dir();
        let mut out = Listing::default();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for e in rd {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(md) = e.metadata() else { continue };
            if !md.file_type().is_file() {
                continue;
            }
            if let Some(hex) = name.strip_suffix(PARTIAL) {
                if let Ok(d) = Digest::from_hex(hex) {
                    out.partials.push((d, md.len()));
                }
            } else if let Ok(d) = Digest::from_hex(name) {
                out.blobs.push(BlobFile {
                    digest: d,
                    size: md.len(),
                    modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        out.blobs.sort_by_key(|b| b.digest.hex());
        Ok(out)
    }

    /// Removes blob `d` (and any partial of it). Returns the bytes freed.
    pub fn remove(&self, d: &Digest) -> Result<u64> {
        let mut freed = 0;
        for p in [self.blob(d), self.partial(d)] {
            if let Ok(md) = fs::symlink_metadata(&p) {
                fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                freed += md.len();
            }
        }
        Ok(freed)
    }
}

/// Makes `view` a `dir:` transport directory for one image whose blobs are in
/// `blobs` (a layout's `blobs/sha256`, absolute): the version file and a symbolic link per
/// blob, the manifest as `manifest.json`. skopeo reads both OCI and Docker schema 2
/// manifests this way (the `oci:` transport only looks at index entries whose media type
/// is OCI, containers/image `oci/layout/oci_src.go`), and checks every blob's digest.
///
/// With `list`, `manifest.json` is that list and the image's manifest is
/// `<hex>.manifest.json` (as `skopeo copy --all` writes a list to `dir:`): skopeo then
/// picks this node's image from the list, and the store records the list's digest as
/// the image's, as when CRI-O pulls by the list.
pub fn write_dir_view(blobs: &Path, image: &ViewOf<'_>, view: &Path) -> Result<()> {
    fs::create_dir_all(view).with_context(|| format!("creating {}", view.display()))?;
    fs::write(view.join("version"), "Directory Transport Version: 1.1\n")
        .with_context(|| format!("writing {}", view.display()))?;
    let link = |digest: &Digest, name: &str| {
        std::os::unix::fs::symlink(blobs.join(digest.hex()), view.join(name))
            .with_context(|| format!("linking {name} in {}", view.display()))
    };
    match image.list {
        Some(list) => {
            link(list, "manifest.json")?;
            link(
                image.manifest,
                &format!("{}.manifest.json", image.manifest.hex()),
            )?;
        }
        None => link(image.manifest, "manifest.json")?,
    }
    link(image.config, &image.config.hex())?;
    for l in image.layers {
        if !view.join(l.hex()).exists() {
            link(l, &l.hex())?;
        }
    }
    Ok(())
}

/// The blobs of one image, for [`write_dir_view`].
#[derive(Debug, Clone, Copy)]
pub struct ViewOf<'a> {
    /// The image manifest.
    pub manifest: &'a Digest,
    /// The list it was chosen from, when the image is named by a list.
    pub list: Option<&'a Digest>,
    /// Its config.
    pub config: &'a Digest,
    /// Its layers.
    pub layers: &'a [Digest],
}

impl Cache {
    /// Makes `view` a `dir:` directory of the image the cache holds whole as `name`
    /// ([`write_dir_view`]).
    pub fn dir_view(&self, name: &str, view: &Path) -> Result<()> {
        let img = self.complete(name).with_context(|| {
            format!("the cache does not hold {name} whole (`longshore cache` lists what it holds)")
        })?;
        let blobs = self
            .blobs_dir()
            .canonicalize()
            .with_context(|| format!("resolving {}", self.blobs_dir().display()))?;
        let layers: Vec<Digest> = img.layers.iter().map(|l| l.0).collect();
        write_dir_view(
            &blobs,
            &ViewOf {
                manifest: &img.manifest,
                list: img.list.as_ref(),
                config: &img.config.0,
                layers: &layers,
            },
            view,
        )
    }
}

/// Another writer is writing this blob's partial now.
#[derive(Debug, thiserror::Error)]
#[error("blob {0} is being written into the cache by another writer")]
pub struct Busy(pub Digest);

/// A blob being written into the cache: hashed as it is written, renamed to its digest
/// only when complete and correct.
pub struct BlobWriter {
    cache: Cache,
    want: Digest,
    size: u64,
    path: PathBuf,
    file: fs::File,
    hasher: Hasher,
    written: u64,
    resumed: u64,
}

impl BlobWriter {
    /// Bytes already in the partial file: the offset the source must continue from.
    pub fn resume_at(&self) -> u64 {
        self.resumed
    }

    /// Bytes in the partial file now.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Copies what `r` yields, refusing to grow past the declared size. Returns the bytes
    /// copied.
    pub fn copy_from(&mut self, r: &mut dyn Read) -> Result<u64> {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        loop {
            let k = match r.read(&mut buf) {
                Ok(0) => return Ok(n),
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading the blob's source"),
            };
            self.write_all(&buf[..k])?;
            n += k as u64;
        }
    }

    /// Checks length and digest, syncs, and renames the partial to its digest. A blob
    /// whose content is not what its digest says is removed: nothing wrong is ever named.
    pub fn finish(mut self) -> Result<Digest> {
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))?;
        let (got, len) = std::mem::take(&mut self.hasher).finish();
        if len != self.size || got != self.want {
            let _ = fs::remove_file(&self.path);
            bail!(
                "blob {} came out as {len} bytes with digest {got}, not the {} bytes declared; it was discarded",
                self.want,
                self.size
            );
        }
        self.file
            .sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        let dest = self.cache.blob(&self.want);
        fs::rename(&self.path, &dest)
            .with_context(|| format!("renaming {}", self.path.display()))?;
        sync_dir(&self.cache.blobs_dir());
        Ok(self.want)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "blob {} is longer than the {} bytes declared",
                    self.want, self.size
                ),
            ));
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

use std::os::unix::fs::OpenOptionsExt;

fn libc_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Opens a cache file, refusing anything but a regular file.
fn open_regular(p: &Path) -> Result<fs::File> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_nofollow() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(p)
        .with_context(|| format!("opening {}", p.display()))?;
    let md = f
        .metadata()
        .with_context(|| format!("reading {}", p.display()))?;
    if !md.file_type().is_file() {
        bail!("{} is not a regular file", p.display());
    }
    Ok(f)
}

/// Writes `bytes` to `path` through a temporary file, synced, then renamed.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> (tempfile::TempDir, Cache) {
        let t = tempfile::tempdir().expect("tempdir");
        let c = Cache::new(t.path().join("cache"));
        c.ensure().expect("ensure");
        (t, c)
    }

    #[test]
    fn a_blob_is_named_only_once_complete_and_correct() {
        let (_t, c) = cache();
        let data = b"hello, cache".to_vec();
        let d = Digest::of(&data);
        let mut w = c.writer(d, data.len() as u64).expect("writer");
        w.write_all(&data[..5]).expect("write");
        assert!(c.has(&d).is_none(), "named before it was complete");
        w.write_all(&data[5..]).expect("write");
        w.finish().expect("finish");
        assert_eq!(c.has(&d), Some(data.len() as u64));
        assert_eq!(c.read(&d, 100).expect("read"), data);
        assert!(c.list().expect("list").partials.is_empty());
    }

    #[test]
    fn a_partial_is_resumed_at_its_length() {
        let (_t, c) = cache();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let d = Digest::of(&data);
        // A writer that stopped after 40,000 bytes (dropped, as a killed one would be).
        let mut w = c.writer(d, data.len() as u64).expect("writer");
        w.write_all(&data[..40_000]).expect("write");
        drop(w);
        assert_eq!(c.list().expect("list").partials, vec![(d, 40_000)]);
        let mut w = c.writer(d, data.len() as u64).expect("writer");
        assert_eq!(w.resume_at(), 40_000);
        w.copy_from(&mut &data[40_000..]).expect("copy");
        w.finish().expect("finish");
        c.check(&d, data.len() as u64).expect("check");
    }

    #[test]
    fn wrong_content_is_discarded_never_named() {
        let (_t, c) = cache();
        let d = Digest::of(b"the real thing");
        let mut w = c.writer(d, 14).expect("writer");
        w.write_all(b"a fake  thing!").expect("write");
        let e = w.finish().expect_err("a wrong blob was accepted");
        assert!(format!("{e:#}").contains("discarded"), "{e:#}");
        assert!(c.has(&d).is_none());
        let l = c.list().expect("list");
        assert!(l.blobs.is_empty() && l.partials.is_empty(), "{l:?}");
    }

    #[test]
    fn a_wrong_partial_of_a_document_is_replaced() {
        let (_t, c) = cache();
        let doc = br#"{"schemaVersion":2}"#;
        let d = Digest::of(doc);
        fs::write(c.partial(&d), b"{\"junk").expect("write");
        assert_eq!(c.put_bytes(doc).expect("put"), d);
        assert_eq!(c.read(&d, 100).expect("read"), doc);
        assert!(c.list().expect("list").partials.is_empty());
    }

    #[test]
    fn a_damaged_index_is_started_again() {
        let (_t, c) = cache();
        fs::write(c.root().join("index.json"), b"{not json").expect("write");
        assert!(c.index().is_err());
        let e = IndexEntry {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: Digest::of(b"m"),
            size: 1,
            annotations: [(REF_NAME.to_string(), "example.com/x:1".to_string())].into(),
        };
        c.name_images(std::slice::from_ref(&e)).expect("name");
        assert_eq!(c.index().expect("index"), vec![e]);
    }

    #[test]
    fn a_blob_cannot_grow_past_its_declared_size() {
        let (_t, c) = cache();
        let d = Digest::of(b"abc");
        let mut w = c.writer(d, 3).expect("writer");
        assert!(w.write_all(b"abcd").is_err());
    }

    #[test]
    fn a_partial_longer_than_the_blob_starts_again() {
        let (_t, c) = cache();
        let d = Digest::of(b"abc");
        fs::write(c.partial(&d), b"far too long").expect("write");
        let w = c.writer(d, 3).expect("writer");
        assert_eq!(w.resume_at(), 0);
    }

    #[test]
    fn adopting_a_blob_the_cache_has_keeps_one_copy() {
        let (t, c) = cache();
        let d = Digest::of(b"layer");
        for _ in 0..2 {
            let f = t.path().join("staged");
            fs::write(&f, b"layer").expect("write");
            c.adopt(&f, &d).expect("adopt");
            assert!(!f.exists());
        }
        assert_eq!(c.list().expect("list").blobs.len(), 1);
    }

    #[test]
    fn the_index_names_each_reference_once() {
        let (_t, c) = cache();
        let e = |name: &str, d: &Digest| IndexEntry {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: *d,
            size: 1,
            annotations: [(REF_NAME.to_string(), name.to_string())].into(),
        };
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        c.name_images(&[e("example.com/x:1", &a)]).expect("name");
        c.name_images(&[e("example.com/x:1", &b), e("example.com/y:1", &a)])
            .expect("name");
        let idx = c.index().expect("index");
        assert_eq!(idx.len(), 2);
        assert_eq!(idx[0].name(), Some("example.com/x:1"));
        assert_eq!(idx[0].digest, b, "a name moves to its newest image");
    }
}
