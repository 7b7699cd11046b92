//! Foreign inputs: `docker save` / `podman save` archives, oci-archive files, OCI layouts
//! without `bundle.json`, and `dir:` trees, recognised from their content. Each becomes an
//! implicit bundle; [`super::intake`] brings its images into longshore's staging, where
//! they are checked, before any other program reads them.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use super::archive::{Kind, Reader};
use super::format::{split_reference, valid_tag, Index, RefTail, MAX_DOCUMENT, REF_NAME};
use super::read::{open_stream, valid_set_name};
use super::Rejected;
use crate::state::SourceKind;
use crate::untrusted::{quote, Tree};

/// The input is not one of the foreign formats.
#[derive(Debug, thiserror::Error)]
#[error("{}: not an image archive or layout longshore knows", .0.display())]
pub struct NotForeign(pub PathBuf);

/// An input taken as an implicit bundle.
#[derive(Debug, Clone)]
pub struct Foreign {
    /// Where it is.
    pub path: PathBuf,
    /// What it is.
    pub kind: SourceKind,
    /// The name of the implicit bundle and of its one image set.
    pub name: String,
    /// Its images.
    pub images: Vec<ForeignImage>,
}

/// An image of a foreign input.
#[derive(Debug, Clone)]
pub struct ForeignImage {
    /// Where it is in the input: its entry in `manifest.json` (docker archives) or in
    /// `index.json` (OCI layouts and archives).
    pub index: usize,
    /// Repository it is stored under.
    pub repository: String,
    /// Tags it is stored under.
    pub tags: Vec<String>,
}

/// Recognises a directory: an OCI layout or a `dir:` tree.
pub fn detect_dir(dir: &Path) -> Result<Foreign> {
    detect_dir_in(dir, None)
}

/// As [`detect_dir`], for a directory found inside the collection `root`: a `dir:` tree
/// is then named by its path below the root, as `skopeo sync` lays trees out
/// (`registry.example.com/team/app:1.0`).
pub fn detect_dir_in(dir: &Path, root: Option<&Path>) -> Result<Foreign> {
    let name = implicit_name(dir);
    let tree = Tree::open(dir)?;
    if tree.is_file("oci-layout") && tree.is_file("index.json") {
        let index_path = dir.join("index.json");
        let bytes = tree.read("index.json", MAX_DOCUMENT)?;
        let images = oci_images(&index_path, &bytes, &name)?;
        return Ok(Foreign {
            path: dir.into(),
            kind: SourceKind::OciLayout,
            name,
            images,
        });
    }
    if is_dir_transport(&tree) {
        let base = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let below_root = root
            .and_then(|r| dir.strip_prefix(r).ok())
            .map(|p| p.to_string_lossy().into_owned());
        let (repository, tags) = match below_root.as_deref().and_then(split_reference) {
            Some((repo, RefTail::Tag(t))) => (repo, vec![t]),
            _ => name_from_path_text(&base, &name),
        };
        return Ok(Foreign {
            path: dir.into(),
            kind: SourceKind::Dir,
            name,
            images: vec![ForeignImage {
                index: 0,
                repository,
                tags,
            }],
        });
    }
    Err(NotForeign(dir.into()).into())
}

/// Whether `dir` holds an image in skopeo's `dir:` format (`manifest.json` and `version`).
pub fn is_dir_transport(dir: &Tree) -> bool {
    dir.is_file("manifest.json")
        && dir
            .read("version", 256)
            .is_ok_and(|v| v.starts_with(b"Directory Transport Version"))
}

/// Recognises a tar archive: `docker save` output or an oci-archive.
pub fn detect_archive(path: &Path) -> Result<Foreign> {
    let name = implicit_name(path);
    let ArchiveScan {
        docker_manifest,
        oci_index,
        has_layout,
        has_bundle_json,
    } = scan_archive(path)?;
    if has_bundle_json {
        return Err(NotForeign(path.into()).into());
    }
    if let Some(bytes) = docker_manifest {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
        }
        let entries: Vec<Entry> = serde_json::from_slice(&bytes).map_err(|e| {
            Rejected::new(
                path,
                format!("manifest.json is not a docker archive manifest: {e}"),
            )
        })?;
        if entries.is_empty() {
            return Err(Rejected::new(path, "is a docker archive with no images").into());
        }
        let mut images = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let mut repository = None;
            let mut tags = Vec::new();
            for t in e.repo_tags.iter().flatten() {
                let full = normalize_docker_name(t);
                let Some((repo, RefTail::Tag(tag))) = split_reference(&full) else {
                    return Err(Rejected::new(
                        path,
                        format!(
                            "image {i} has tag {}, which is not a valid image reference",
                            quote(t.as_bytes())
                        ),
                    )
                    .into());
                };
                // An archive entry tagged into two repositories is stored under the first.
                if repository.get_or_insert_with(|| repo.clone()) == &repo {
                    tags.push(tag);
                } else {
                    tracing::warn!(
                        "{}: image {i} is tagged {t:?} as well; only the tags of {} are kept",
                        path.display(),
                        repository.as_deref().unwrap_or_default()
                    );
                }
            }
            let repository = repository.unwrap_or_else(|| format!("localhost/{name}"));
            if tags.is_empty() {
                tags.push(format!("{i}"));
            }
            images.push(ForeignImage {
                index: i,
                repository,
                tags,
            });
        }
        return Ok(Foreign {
            path: path.into(),
            kind: SourceKind::DockerArchive,
            name,
            images,
        });
    }
    if let (Some(bytes), true) = (oci_index, has_layout) {
        let index_path = path.join("index.json");
        let images = oci_images(&index_path, &bytes, &name)?;
        return Ok(Foreign {
            path: path.into(),
            kind: SourceKind::OciArchive,
            name,
            images,
        });
    }
    Err(NotForeign(path.into()).into())
}

/// What the entry names of an archive say it is.
struct ArchiveScan {
    /// `manifest.json` of a `docker save` archive.
    docker_manifest: Option<Vec<u8>>,
    /// `index.json` of an oci-archive.
    oci_index: Option<Vec<u8>>,
    /// Whether an `oci-layout` file is there.
    has_layout: bool,
    /// Whether a `bundle.json` is there: then it is a bundle, right or wrong, never an
    /// oci-archive.
    has_bundle_json: bool,
}

/// Reads the entry names of a tar archive, keeping `manifest.json` and `index.json`
/// (each read only up to [`MAX_DOCUMENT`]).
fn scan_archive(path: &Path) -> Result<ArchiveScan> {
    let (_, stream) = open_stream(path)?;
    let mut reader = Reader::new(stream);
    let mut docker = None;
    let mut index = None;
    let mut layout = false;
    let mut bundle_json = false;
    let bad = |e: super::archive::TarError| Rejected::new(path, e.to_string());
    while let Some(mut entry) = reader.next_entry().map_err(bad)? {
        if entry.kind != Kind::File {
            continue;
        }
        let raw = String::from_utf8_lossy(&entry.name).into_owned();
        let name = raw.trim_start_matches("./");
        let keep = match name {
            "manifest.json" => &mut docker,
            "index.json" => &mut index,
            "oci-layout" => {
                layout = true;
                continue;
            }
            super::format::BUNDLE_JSON => {
                bundle_json = true;
                continue;
            }
            _ => continue,
        };
        if entry.size > MAX_DOCUMENT {
            return Err(Rejected::new(
                path,
                format!("{name} has {} bytes (at most {MAX_DOCUMENT})", entry.size),
            )
            .into());
        }
        let mut bytes = Vec::new();
        (&mut entry)
            .take(MAX_DOCUMENT)
            .read_to_end(&mut bytes)
            .map_err(|e| Rejected::new(path, format!("entry {name:?} cannot be read: {e}")))?;
        *keep = Some(bytes);
    }
    Ok(ArchiveScan {
        docker_manifest: docker,
        oci_index: index,
        has_layout: layout,
        has_bundle_json: bundle_json,
    })
}

fn oci_images(index_path: &Path, bytes: &[u8], name: &str) -> Result<Vec<ForeignImage>> {
    let index: Index = serde_json::from_slice(bytes)
        .map_err(|e| Rejected::new(index_path, format!("is not a valid OCI index: {e}")))?;
    if index.manifests.is_empty() {
        return Err(Rejected::new(index_path, "lists no images").into());
    }
    let mut images = Vec::new();
    for (i, d) in index.manifests.iter().enumerate() {
        match d.annotations.get(REF_NAME) {
            Some(r) => {
                let (repository, tags) = name_from_ref_name(r, name).ok_or_else(|| {
                    Rejected::new(index_path, format!("entry {i} has ref.name {}, which is neither a full image reference nor a tag", quote(r.as_bytes())))
                })?;
                images.push(ForeignImage { index: i, repository, tags });
            }
            None if index.manifests.len() == 1 => images.push(ForeignImage {
                index: i,
                repository: format!("localhost/{name}"),
                tags: vec!["latest".into()],
            }),
            None => {
                return Err(Rejected::new(
                    index_path,
                    format!("entry {i} ({}) has no org.opencontainers.image.ref.name, so it cannot be addressed", d.digest),
                )
                .into())
            }
        }
    }
    Ok(images)
}

/// The repository and tags for an OCI `ref.name`: a full reference as it is, a bare tag
/// under `localhost/<input name>`.
fn name_from_ref_name(r: &str, name: &str) -> Option<(String, Vec<String>)> {
    match split_reference(r) {
        Some((repo, RefTail::Tag(t))) => Some((repo, vec![t])),
        Some((repo, RefTail::Digest(_))) => Some((repo, vec![])),
        None if valid_tag(r) => Some((format!("localhost/{name}"), vec![r.to_string()])),
        None => None,
    }
}

/// Names an image from a directory name such as `app:1.0` (what `skopeo sync` writes).
fn name_from_path_text(text: &str, name: &str) -> (String, Vec<String>) {
    if let Some((repo, tag)) = text.rsplit_once(':') {
        let repo = sanitize(repo);
        if valid_tag(tag) && !repo.is_empty() {
            return (format!("localhost/{repo}"), vec![tag.to_string()]);
        }
    }
    (format!("localhost/{name}"), vec!["latest".into()])
}

/// Docker's short names: `busybox:1` is `docker.io/library/busybox:1`, `org/app:1` is
/// `docker.io/org/app:1`.
fn normalize_docker_name(t: &str) -> String {
    let first = t.split('/').next().unwrap_or("");
    let has_host =
        t.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_host {
        t.to_string()
    } else if t.contains('/') {
        format!("docker.io/{t}")
    } else {
        format!("docker.io/library/{t}")
    }
}

/// The implicit bundle's name: the input's file name without its archive extensions,
/// reduced to the characters set names allow.
pub fn implicit_name(path: &Path) -> String {
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "input".into());
    let mut stem = base.as_str();
    while let Some(shorter) = [".gz", ".zst", ".tgz", ".tzst", ".tar", ".oci", ".docker"]
        .iter()
        .find_map(|ext| stem.strip_suffix(ext))
    {
        stem = shorter;
    }
    let s = sanitize(stem);
    if valid_set_name(&s) {
        s
    } else {
        "input".into()
    }
}

fn sanitize(s: &str) -> String {
    let lowered: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    lowered.trim_start_matches(['.', '-']).to_string()
}

/// Finds the inputs inside a directory that is neither a bundle nor a foreign layout:
/// bundle directories, tar streams and foreign inputs, in `dir` and up to `depth - 1`
/// levels of directories below it, sorted by path. Files that are none of these are
/// skipped.
pub fn scan_collection(dir: &Path, depth: usize) -> Result<Vec<PathBuf>> {
    let mut found = BTreeMap::new();
    scan_into(dir, depth, &mut found)?;
    Ok(found.into_keys().collect())
}

fn scan_into(dir: &Path, depth: usize, found: &mut BTreeMap<PathBuf, ()>) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let path = entry.path();
        let ft = entry
            .file_type()
            .with_context(|| format!("reading {}", path.display()))?;
        if entry.file_name().to_string_lossy().starts_with('.') || ft.is_symlink() {
            continue;
        }
        if ft.is_dir() {
            let tree = Tree::open(&path)?;
            if tree.is_file(super::format::BUNDLE_JSON)
                || (tree.is_file("oci-layout") && tree.is_file("index.json"))
                || is_dir_transport(&tree)
            {
                found.insert(path, ());
            } else if depth > 1 {
                scan_into(&path, depth - 1, found)?;
            }
        } else if ft.is_file() && looks_like_tar(&path) {
            found.insert(path, ());
        }
    }
    Ok(())
}

fn looks_like_tar(path: &Path) -> bool {
    let mut head = [0u8; 512];
    let Ok(mut f) = crate::untrusted::open_input(path) else {
        return false;
    };
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    super::read::sniff(&head[..n]).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_names() {
        assert_eq!(
            normalize_docker_name("busybox:1"),
            "docker.io/library/busybox:1"
        );
        assert_eq!(normalize_docker_name("org/app:1"), "docker.io/org/app:1");
        assert_eq!(normalize_docker_name("localhost/app:1"), "localhost/app:1");
        assert_eq!(normalize_docker_name("quay.io/a/b:2"), "quay.io/a/b:2");
    }

    #[test]
    fn implicit_names_strip_every_archive_ending() {
        assert_eq!(implicit_name(Path::new("/m/site.tzst")), "site");
        assert_eq!(implicit_name(Path::new("/m/x.tar.oci")), "x");
        assert_eq!(implicit_name(Path::new("/m/x.oci.tar.gz")), "x");
    }

    #[test]
    fn implicit_names() {
        assert_eq!(
            implicit_name(Path::new("/m/App Images.tar.gz")),
            "app-images"
        );
        assert_eq!(implicit_name(Path::new("/m/web.oci")), "web");
    }

    #[test]
    fn path_names() {
        assert_eq!(
            name_from_path_text("busybox:1.36", "x"),
            ("localhost/busybox".into(), vec!["1.36".into()])
        );
        assert_eq!(
            name_from_path_text("plain", "plain"),
            ("localhost/plain".into(), vec!["latest".into()])
        );
    }
}
