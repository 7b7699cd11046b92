//! The containers-storage store images are written to: presence checks through the image
//! proxy, space checks, and copies with `skopeo copy`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cancel::Cancel;
use crate::config::{human_size, Settings, StoreMode};
use crate::digest::Digest;
use crate::paths::HostPaths;
use crate::process;
use crate::proxy::Proxy;

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

    /// Whether the store holds `image` under its digest and under every tag (a tag that
    /// names another image counts as missing, so the copy moves it).
    pub async fn holds(&self, proxy: &Proxy, image: &Wanted<'_>) -> Result<bool> {
        let by_digest = format!("{}@{}", image.repository, image.digest);
        let Some(img) = proxy.open_optional(&self.reference(&by_digest)).await? else {
            return Ok(false);
        };
        let found = img.digest;
        proxy.close(img).await?;
        if found != image.digest {
            return Ok(false);
        }
        for tag in image.tags {
            let name = format!("{}:{}", image.repository, tag);
            match proxy.open_optional(&self.reference(&name)).await? {
                Some(img) => {
                    let d = img.digest;
                    proxy.close(img).await?;
                    if d != image.digest {
                        return Ok(false);
                    }
                }
                None => return Ok(false),
            }
        }
        Ok(true)
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

    /// The digest of the image the store holds under `reference` (a digest or tag
    /// reference), or `None` when it holds none.
    pub async fn lookup(&self, proxy: &Proxy, reference: &str) -> Result<Option<Digest>> {
        let Some(img) = proxy.open_optional(&self.reference(reference)).await? else {
            return Ok(None);
        };
        let d = img.digest;
        proxy.close(img).await?;
        // A digest reference resolves to an image with that digest in the same repository;
        // any other answer is not the image asked for.
        if let Some((_, crate::bundle::format::RefTail::Digest(want))) =
            crate::bundle::format::split_reference(reference)
        {
            if want != d {
                return Ok(None);
            }
        }
        Ok(Some(d))
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
        cmd.args(["copy", "--quiet", "--preserve-digests", source])
            .arg(self.reference(name));
        process::run_cancellable(&mut cmd, &self.cancel).map(|_| ())
    }

    /// Copies one image and gives it every name it should carry: each tag first, then the
    /// digest name (later copies of the same image only add the name). Sets name images
    /// by digest, so an image counts as present only once it carries all its names.
    /// `source` is longshore's private, verified copy, so every name points at the
    /// manifest that was verified.
    pub fn copy_image(&self, source: &str, image: &Wanted<'_>) -> Result<()> {
        for tag in image.tags {
            self.copy(source, &format!("{}:{}", image.repository, tag))?;
        }
        self.copy(source, &format!("{}@{}", image.repository, image.digest))
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
