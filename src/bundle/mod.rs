//! Bundles: the format, reading and verifying it, writing it, and recognising the foreign
//! inputs (`docker save` archives, oci-archives, OCI layouts, `dir:` trees) that are taken
//! as implicit bundles.

pub mod archive;
pub mod foreign;
pub mod format;
pub mod intake;
pub mod read;
pub mod write;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A bundle or input was refused: it is malformed, lies about its content, or is not what
/// was required. The message names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct Rejected {
    /// The file (or entry's container) at fault.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

impl Rejected {
    /// A rejection of `path` because `message`.
    pub fn new(path: &Path, message: impl Into<String>) -> Self {
        Rejected {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// What a path given to `import` or `verify` turned out to hold.
#[derive(Debug)]
pub enum Input {
    /// A bundle directory (`bundle.json` beside an OCI layout).
    BundleDir(PathBuf),
    /// A tar bundle: a file or a block device, plain, gzip or zstd.
    BundleStream(PathBuf),
    /// Something else longshore can import, as an implicit bundle.
    Foreign(foreign::Foreign),
    /// A directory holding several of the above, each imported on its own.
    Collection(PathBuf, Vec<PathBuf>),
}

/// How deep a directory is searched for the inputs it holds.
pub const COLLECTION_DEPTH: usize = 3;

/// Looks at the content of `path` (never its name) and says what it holds.
pub fn detect(path: &Path) -> Result<Input> {
    detect_in(path, None)
}

/// As [`detect`], for an input found inside the collection `root` (which names `dir:`
/// trees by their path below it).
pub fn detect_in(path: &Path, root: Option<&Path>) -> Result<Input> {
    // Inside a collection nothing is followed (the scan skips links; one that appeared
    // since is refused).
    if root.is_some()
        && fs::symlink_metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .file_type()
            .is_symlink()
    {
        return Err(Rejected::new(path, "is a symbolic link inside the collection").into());
    }
    let md = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if md.is_dir() {
        // Any bundle.json makes a bundle directory, whatever it is; the bundle's reader
        // then says what is wrong with it.
        if crate::untrusted::Tree::open(path)?
            .kind(format::BUNDLE_JSON)?
            .is_some()
        {
            return Ok(Input::BundleDir(path.to_path_buf()));
        }
        return match foreign::detect_dir_in(path, root) {
            Ok(f) => Ok(Input::Foreign(f)),
            Err(e) if e.downcast_ref::<foreign::NotForeign>().is_some() => {
                let items = foreign::scan_collection(path, COLLECTION_DEPTH)?;
                if items.is_empty() {
                    return Err(Rejected::new(
                        path,
                        "holds no bundle, image archive or image layout",
                    )
                    .into());
                }
                Ok(Input::Collection(path.to_path_buf(), items))
            }
            Err(e) => Err(e),
        };
    }
    let mut head = vec![0u8; 512];
    let n = read_head(path, &mut head)?;
    head.truncate(n);
    if read::sniff(&head).is_none() {
        return Err(Rejected::new(path, "is neither a bundle nor an image archive longshore knows (expected a directory or a tar, tar.gz or tar.zst stream)").into());
    }
    match read::read_meta_stream(path) {
        Ok(_) => Ok(Input::BundleStream(path.to_path_buf())),
        Err(e) if e.downcast_ref::<Rejected>().is_some() => foreign::detect_archive(path)
            .map(Input::Foreign)
            .map_err(|fe| {
                if fe.downcast_ref::<foreign::NotForeign>().is_some() {
                    e
                } else {
                    fe
                }
            }),
        Err(e) => Err(e),
    }
}

fn read_head(path: &Path, buf: &mut [u8]) -> Result<usize> {
    let mut f = crate::untrusted::open_input(path)?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok(n)
}

/// Small bundles made by hand for unit tests: an OCI layout written directly, made into a
/// bundle by longshore's own intake, with no skopeo.
#[cfg(test)]
pub(crate) mod testkit {
    use std::fs;
    use std::path::{Path, PathBuf};

    use super::format::{BundleMeta, REF_NAME};
    use super::intake::{stage_foreign, Layout};
    use crate::cancel::Cancel;
    use crate::oci::digest::Digest;

    /// Writes an OCI layout at `dir` holding one image per `(reference, layers)`; each
    /// layer is the bytes given, as an uncompressed layer.
    pub fn oci_layout(dir: &Path, images: &[(&str, Vec<Vec<u8>>)]) {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).expect("layout dir");
        let put = |b: &[u8]| {
            let d = Digest::of(b);
            fs::write(blobs.join(d.hex()), b).expect("blob");
            (d, b.len())
        };
        let mut manifests = Vec::new();
        for (reference, layers) in images {
            let descs: Vec<(Digest, usize)> = layers.iter().map(|l| put(l)).collect();
            let config = serde_json::json!({
                "architecture": crate::bundle::write::host_architecture(),
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": descs.iter().map(|(d, _)| d.to_string()).collect::<Vec<_>>()},
            });
            let (cd, cs) = put(&serde_json::to_vec(&config).expect("json"));
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": cs},
                "layers": descs.iter().map(|(d, s)| serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.to_string(), "size": s})).collect::<Vec<_>>(),
            });
            let (md, ms) = put(&serde_json::to_vec(&manifest).expect("json"));
            manifests.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md.to_string(),
                "size": ms,
                "annotations": {REF_NAME: reference},
            }));
        }
        let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
        fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&index).expect("json"),
        )
        .expect("index");
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
    }

    /// A bundle directory at `out` made of those images: its digest and metadata.
    pub fn bundle(
        work: &Path,
        out: &Path,
        images: &[(&str, Vec<Vec<u8>>)],
    ) -> (Digest, BundleMeta) {
        let src: PathBuf = work.join("src-layout");
        oci_layout(&src, images);
        let f = super::foreign::detect_dir(&src).expect("detect");
        let layout = Layout::create(out, 0).expect("layout");
        let staged = stage_foreign(&f, &layout, true, &Cancel::default()).expect("stage");
        (staged.digest, staged.meta)
    }
}
