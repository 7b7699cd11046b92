//! The containers-storage store images are written to: presence checks, space checks,
//! copies with `skopeo copy` and the scheduler that orders them ([`copy`]), and the
//! bracket around skopeo's image proxy ([`proxy`]).

pub mod copy;
pub mod proxy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cancel::Cancel;
use crate::config::{human_size, Settings, StoreMode};
use crate::oci::digest::Digest;
use crate::paths::HostPaths;
use crate::process;

/// A containers-storage store, as skopeo addresses it.
#[derive(Debug, Clone)]
pub struct Store {
    /// `overlay` or `vfs`.
    pub driver: &'static str,
    /// Graph root on this machine (sysroot applied).
    pub root: PathBuf,
    /// Run root on this machine (sysroot applied).
    pub run_root: PathBuf,
    skopeo: String,
    policy: Option<PathBuf>,
    /// Where skopeo keeps its temporary files (`--tmpdir`), swept by longshore.
    tmp: PathBuf,
    /// Environment for copies (see [`Store::new`]).
    env: Vec<(String, String)>,
    cancel: Cancel,
}

/// An image as the store should hold it.
#[derive(Debug, Clone)]
pub struct Wanted<'a> {
    /// Repository, such as `quay.io/org/app`.
    pub repository: &'a str,
    /// Manifest digest.
    pub digest: Digest,
    /// Tags it must also carry.
    pub tags: &'a [String],
}

impl Wanted<'_> {
    /// Every name the image is stored under, in the order they are given: each tag, then
    /// the digest name. Sets name images by digest, so an image counts as present only
    /// once it carries all its names.
    pub fn names(&self) -> Vec<String> {
        self.tags
            .iter()
            .map(|t| format!("{}:{t}", self.repository))
            .chain(std::iter::once(format!(
                "{}@{}",
                self.repository, self.digest
            )))
            .collect()
    }
}

impl Store {
    /// The store the settings name, under the sysroot.
    pub fn new(paths: &HostPaths, settings: &Settings) -> Store {
        // Under a sysroot, the sysroot's signature policy applies if it has one; on a node
        // (sysroot /) skopeo reads /etc/containers/policy.json itself.
        let policy = paths.host(Path::new("/etc/containers/policy.json"));
        let policy = (paths.sysroot != Path::new("/") && policy.exists()).then_some(policy);
        let (root, run_root) = match settings.store.mode {
            StoreMode::Primary => (
                paths.host(&settings.store.root),
                paths.host(&settings.store.run_root),
            ),
            StoreMode::Additional => (
                paths.state_dir.join("storage"),
                paths.run_dir.join("storage"),
            ),
        };
        Store {
            driver: settings.store.driver.name(),
            root,
            run_root,
            skopeo: settings.skopeo.clone(),
            policy,
            tmp: paths.state_dir.join("tmp"),
            env: blob_info_cache_env(paths),
            cancel: Cancel::default(),
        }
    }

    /// The containers-storage reference of `name` in this store.
    pub fn reference(&self, name: &str) -> String {
        format!(
            "containers-storage:[{}@{}+{}]{}",
            self.driver,
            self.root.display(),
            self.run_root.display(),
            name
        )
    }

    /// The names the store has recorded for its images, read from containers-storage's
    /// `<driver>-images/images.json` (images.go, written whole and renamed into place, so
    /// it is read without the store's lock). CRI-O's pins match these names and nothing
    /// else: containers/image resolves `repo@digest` to an image stored as `repo:tag`
    /// with that digest, but such an image is not pinned by `repo@digest`
    /// (../shared/DESIGN.md), so presence is decided on the names themselves.
    pub fn names(&self) -> Result<StoredNames> {
        #[derive(serde::Deserialize)]
        struct Image {
            #[serde(default)]
            digest: Option<String>,
            #[serde(default)]
            digests: Vec<String>,
            #[serde(default)]
            names: Vec<String>,
            /// `manifest-<digest>` for every manifest stored with the image (images.go
            /// `recomputeDigests` derives the image's digests from these too).
            #[serde(default, rename = "big-data-names")]
            big_data_names: Vec<String>,
        }
        let path = self
            .root
            .join(format!("{}-images", self.driver))
            .join("images.json");
        let bytes = match crate::untrusted::read_admin_file(&path, MAX_IMAGES_JSON) {
            Ok(b) => b,
            Err(_) if !path.exists() => return Ok(StoredNames::default()),
            Err(e) => return Err(e),
        };
        let images: Vec<Image> = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        let mut out = StoredNames::default();
        for img in images {
            let digests: Vec<Digest> = img
                .digest
                .iter()
                .chain(&img.digests)
                .map(String::as_str)
                .chain(
                    img.big_data_names
                        .iter()
                        .filter_map(|n| n.strip_prefix("manifest-")),
                )
                .filter_map(|d| d.parse().ok())
                .collect();
            let Some(primary) = digests.first().copied() else {
                continue;
            };
            for n in img.names {
                out.0.insert(n, (primary, digests.clone()));
            }
        }
        Ok(out)
    }

    /// Makes the store openable read-only, as CRI-O opens an additional image store:
    /// containers-storage then needs its lock files to exist already (images.go
    /// `newROImageStore`, layers.go `newROLayerStore`), and the layer directory.
    pub fn prepare_read_only(&self) -> Result<()> {
        let d = self.driver;
        for dir in [format!("{d}-images"), format!("{d}-layers"), d.to_string()] {
            let p = self.root.join(dir);
            std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        }
        for lock in [
            format!("{d}-images/images.lock"),
            format!("{d}-layers/layers.lock"),
        ] {
            let p = self.root.join(lock);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("creating {}", p.display()))?;
        }
        Ok(())
    }

    /// Stops copies when `cancel` is raised.
    pub fn cancel_with(&mut self, cancel: Cancel) {
        self.cancel = cancel;
    }

    /// Copies `source` (any transport skopeo reads) into the store under `name`, keeping
    /// the manifest byte for byte so the image keeps its digest.
    pub fn copy(&self, source: &str, name: &str) -> Result<()> {
        // containers/image stages layers in a temporary directory ("storage*",
        // storage/storage_dest.go) under /var/tmp unless told otherwise; under the state
        // directory, what a killed copy leaves is swept (see engine).
        std::fs::create_dir_all(&self.tmp)
            .with_context(|| format!("creating {}", self.tmp.display()))?;
        // A copy dies with longshore (as the image proxy does): a killed import leaves no
        // skopeo writing on behind it.
        let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "SIGKILL", "--"]).arg(&self.skopeo);
            c
        } else {
            Command::new(&self.skopeo)
        };
        cmd.arg("--tmpdir").arg(&self.tmp);
        if let Some(p) = &self.policy {
            cmd.arg("--policy").arg(p);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.args(["copy", "--quiet", "--preserve-digests", source])
            .arg(self.reference(name));
        process::run_cancellable(&mut cmd, &self.cancel).map(|_| ())
    }
}

/// Where a copy records what it learnt of blobs. containers/image keeps a cache of blob
/// locations and digests, for root at `/var/lib/containers/cache`, a host path skopeo has
/// no option for (pkg/blobinfocache/default.go, `blobInfoCacheDir`). For another node's
/// root (`--sysroot`) that would write the running host's cache, so the copy is told to
/// take the path a non-root user would, `$XDG_DATA_HOME/containers/cache`, with
/// `XDG_DATA_HOME` the node's `/var/lib`: the cache lands where that node keeps its own.
/// `_CONTAINERS_ROOTLESS_UID` is the variable containers/image reads for that decision
/// (internal/rootless/rootless.go, `GetRootlessEUID`); the store itself is named
/// explicitly, so nothing else about the copy changes.
fn blob_info_cache_env(paths: &HostPaths) -> Vec<(String, String)> {
    if paths.sysroot == Path::new("/") {
        return vec![];
    }
    vec![
        ("_CONTAINERS_ROOTLESS_UID".into(), "65534".into()),
        (
            "XDG_DATA_HOME".into(),
            paths.host(Path::new("/var/lib")).display().to_string(),
        ),
    ]
}

/// Largest `images.json` read (about 1 KiB per image).
const MAX_IMAGES_JSON: u64 = 256 << 20;

/// The names a store holds, each with its image's manifest digest and every digest the
/// image is known by.
#[derive(Debug, Default, Clone)]
pub struct StoredNames(HashMap<String, (Digest, Vec<Digest>)>);

impl StoredNames {
    /// The digest of the image stored under `name` exactly: for a digest name, the digest
    /// it names (when the image has it); for a tag, the image's manifest digest.
    pub fn lookup(&self, name: &str) -> Option<Digest> {
        let (primary, all) = self.0.get(name)?;
        match crate::bundle::format::split_reference(name) {
            Some((_, crate::bundle::format::RefTail::Digest(d))) => all.contains(&d).then_some(d),
            _ => Some(*primary),
        }
    }

    /// Whether `image` is stored under its digest name and under every tag, all naming
    /// it (a tag that names another image counts as missing, so the copy moves it).
    pub fn holds(&self, image: &Wanted<'_>) -> bool {
        image.names().iter().all(|n| match self.0.get(n) {
            Some((primary, all)) => *primary == image.digest || all.contains(&image.digest),
            None => false,
        })
    }
}

/// An import was refused because a filesystem lacks the space it needs.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", input.display())]
pub struct NoSpace {
    /// The input that would not fit.
    pub input: PathBuf,
    /// Needed, available and floor, for people.
    pub message: String,
}

/// Space needed on one filesystem.
#[derive(Debug, Default, Clone)]
pub struct SpaceNeed {
    /// A path on the filesystem, for messages.
    pub path: PathBuf,
    /// Bytes that will be written there.
    pub bytes: u64,
}

/// Checks that every filesystem in `needs` has room for what will be written to it plus
/// `floor` bytes to spare. Two needs on the same filesystem are added up.
pub fn check_space(needs: &[SpaceNeed], floor: u64, input: &Path) -> Result<()> {
    let mut by_fs: HashMap<u64, (PathBuf, u64, u64)> = HashMap::new();
    for need in needs {
        let at = existing_ancestor(&need.path);
        let st = nix::sys::statvfs::statvfs(&at)
            .with_context(|| format!("checking free space on {}", at.display()))?;
        let fsid = st.filesystem_id() as u64;
        let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
        let e = by_fs.entry(fsid).or_insert((need.path.clone(), 0, avail));
        e.1 += need.bytes;
    }
    for (path, needed, avail) in by_fs.values() {
        if needed + floor > *avail {
            return Err(NoSpace {
                input: input.to_path_buf(),
                message: format!(
                    "needs {} on {} but only {} is available there and {} must stay free (needed {needed}, available {avail}, floor {floor} bytes)",
                    human_size(*needed),
                    path.display(),
                    human_size(*avail),
                    human_size(floor),
                ),
            }
            .into());
        }
    }
    Ok(())
}

fn existing_ancestor(p: &Path) -> PathBuf {
    let mut p = p.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            return PathBuf::from("/");
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn names_are_matched_exactly_as_the_store_records_them() {
        let t = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(t.path());
        let store = Store::new(&paths, &Settings::default());
        assert!(store.names().unwrap().lookup("quay.io/a/b:1").is_none());
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let dir = store.root.join("overlay-images");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("images.json"),
            serde_json::json!([
                {"id": "1", "digest": a.to_string(), "names": ["quay.io/a/b:1", format!("quay.io/a/b@{a}")]},
                // Stored by tag alone, with a second manifest recorded as big data.
                {"id": "2", "digest": b.to_string(), "names": ["quay.io/a/c:1"],
                 "big-data-names": [format!("manifest-{a}")]},
            ])
            .to_string(),
        )
        .unwrap();
        let names = store.names().unwrap();
        assert_eq!(names.lookup("quay.io/a/b:1"), Some(a));
        assert_eq!(names.lookup(&format!("quay.io/a/b@{a}")), Some(a));
        // containers/image would resolve this to image 2; the store holds no such name.
        assert_eq!(names.lookup(&format!("quay.io/a/c@{b}")), None);
        let tags = ["1".to_string()];
        let wanted = |repo, digest| Wanted {
            repository: repo,
            digest,
            tags: &tags,
        };
        assert!(names.holds(&wanted("quay.io/a/b", a)));
        assert!(!names.holds(&wanted("quay.io/a/c", b)));
        assert!(!names.holds(&wanted("quay.io/a/b", b)));
    }

    #[test]
    fn needs_on_one_filesystem_add_up_against_the_floor() {
        let t = tempfile::tempdir().unwrap();
        let st = nix::sys::statvfs::statvfs(t.path()).unwrap();
        let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
        let need = |bytes| SpaceNeed {
            path: t.path().join("not/made/yet"),
            bytes,
        };
        let input = Path::new("/media/stick/b.tar");
        assert!(check_space(&[need(1), need(1)], 0, input).is_ok());
        // Each alone fits; together with the floor they do not.
        // Three fifths each: a concurrent test freeing space cannot make both fit.
        let half = avail / 5 * 3;
        let e = check_space(&[need(half), need(half)], 0, input).unwrap_err();
        let e = e.downcast::<NoSpace>().expect("a NoSpace");
        assert_eq!(e.input, input);
        assert!(e.message.contains("must stay free"), "{}", e.message);
        assert!(
            check_space(&[need(1)], avail, input).is_err(),
            "the floor counts"
        );
    }
}
