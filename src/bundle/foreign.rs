//! Foreign inputs: `docker save` / `podman save` archives, oci-archive files, OCI layouts
//! without `bundle.json`, and `dir:` trees, recognised from their content. Each becomes an
//! implicit bundle whose images skopeo reads straight from the input.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use super::format::{split_reference, valid_tag, Index, RefTail, REF_NAME};
use super::read::{open_stream, valid_set_name};
use super::Rejected;
use crate::state::SourceKind;

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
    /// How skopeo addresses it, such as `docker-archive:/m/app.tar:@0`.
    pub source: String,
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
    if dir.join("oci-layout").is_file() && dir.join("index.json").is_file() {
        let index_path = dir.join("index.json");
        let bytes =
            fs::read(&index_path).with_context(|| format!("reading {}", index_path.display()))?;
        let images = oci_images(&index_path, &bytes, &name, |r| match r {
            Some(r) => format!("oci:{}:{r}", dir.display()),
            None => format!("oci:{}", dir.display()),
        })?;
        return Ok(Foreign {
            path: dir.into(),
            kind: SourceKind::OciLayout,
            name,
            images,
        });
    }
    if is_dir_transport(dir) {
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
                source: format!("dir:{}", dir.display()),
                repository,
                tags,
            }],
        });
    }
    Err(NotForeign(dir.into()).into())
}

/// Whether `dir` holds an image in skopeo's `dir:` format (`manifest.json` and `version`).
pub fn is_dir_transport(dir: &Path) -> bool {
    dir.join("manifest.json").is_file()
        && fs::read_to_string(dir.join("version"))
            .is_ok_and(|v| v.starts_with("Directory Transport Version"))
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
                        format!("image {i} has tag {t:?}, which is not a valid image reference"),
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
                source: format!("docker-archive:{}:@{i}", path.display()),
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
        let images = oci_images(&index_path, &bytes, &name, |r| match r {
            Some(r) => format!("oci-archive:{}:{r}", path.display()),
            None => format!("oci-archive:{}", path.display()),
        })?;
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

/// Reads the entry names of a tar archive, keeping `manifest.json` and `index.json`.
fn scan_archive(path: &Path) -> Result<ArchiveScan> {
    let (_, stream) = open_stream(path)?;
    let mut archive = tar::Archive::new(stream);
    let mut docker = None;
    let mut index = None;
    let mut layout = false;
    let mut bundle_json = false;
    let entries = archive
        .entries()
        .map_err(|e| Rejected::new(path, format!("is not a valid tar stream: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| Rejected::new(path, format!("is not a valid tar stream: {e}")))?;
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_string();
        let keep = match name.as_str() {
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
        let mut bytes = Vec::new();
        (&mut entry)
            .take(super::format::MAX_DOCUMENT)
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

fn oci_images(
    index_path: &Path,
    bytes: &[u8],
    name: &str,
    source: impl Fn(Option<&str>) -> String,
) -> Result<Vec<ForeignImage>> {
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
                    Rejected::new(index_path, format!("entry {i} has ref.name {r:?}, which is neither a full image reference nor a tag"))
                })?;
                images.push(ForeignImage { source: source(Some(r)), repository, tags });
            }
            None if index.manifests.len() == 1 => images.push(ForeignImage {
                source: source(None),
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
            if path.join(super::format::BUNDLE_JSON).is_file()
                || (path.join("oci-layout").is_file() && path.join("index.json").is_file())
                || is_dir_transport(&path)
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
    let Ok(mut f) = File::open(path) else {
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
