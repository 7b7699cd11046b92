//! Persistent state in `/var/lib/longshore`: what was imported and held, written
//! atomically, and the lock that keeps to one writer at a time.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fs2::FileExt;
use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;

/// Version of the state file's schema.
const STATE_VERSION: u32 = 1;

/// Holds the state directory's lock for as long as it lives.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock of `state_dir`, waiting (and saying so) while another longshore
    /// holds it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let path = state_dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if file.try_lock_exclusive().is_err() {
            tracing::info!(
                "waiting for another longshore to finish (lock {})",
                path.display()
            );
            file.lock_exclusive()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Ok(StateLock { _file: file })
    }
}

/// Where a bundle stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BundleState {
    /// Verified and staged; its images are copied on `longshore apply`.
    Held,
    /// Verified; its sets are in force and its images are being copied. A bundle whose
    /// copy failed stays here until it is imported again.
    Importing,
    /// Every image is in the store.
    Imported,
}

impl BundleState {
    /// Whether a recorded bundle may go from this state to `to`:
    ///
    /// ```text
    ///   Held ------apply-----> Importing --copies done--> Imported
    ///   Importing --a copy failed, or imported again--> Importing
    ///   Imported --imported again, or restored after the store lost images--> Importing
    /// ```
    ///
    /// A new record may start in `Held` or `Importing`; nothing goes back to `Held`, and
    /// nothing reaches `Imported` but through `Importing`.
    pub fn may_become(self, to: BundleState) -> bool {
        use BundleState::*;
        matches!(
            (self, to),
            (Held, Importing)
                | (Importing, Importing)
                | (Importing, Imported)
                | (Imported, Importing)
        )
    }
}

/// A move of a recorded bundle that its state does not allow (a bug, not bad input).
#[derive(Debug, thiserror::Error)]
#[error("bundle {name} cannot go from {from:?} to {to:?}")]
pub struct BadTransition {
    /// The bundle.
    pub name: String,
    /// Where it stands.
    pub from: BundleState,
    /// Where it was sent.
    pub to: BundleState,
}

impl BundleRecord {
    fn become_(&mut self, to: BundleState) -> std::result::Result<(), BadTransition> {
        if !self.state.may_become(to) {
            return Err(BadTransition {
                name: self.name.clone(),
                from: self.state,
                to,
            });
        }
        self.state = to;
        self.updated = now();
        Ok(())
    }

    /// Its images are being copied: from `Held` (apply), `Importing` (again) or `Imported`
    /// (imported again, or restored).
    pub fn to_importing(&mut self) -> std::result::Result<(), BadTransition> {
        self.become_(BundleState::Importing)
    }

    /// Every image is in the store: from `Importing` only.
    pub fn to_imported(&mut self) -> std::result::Result<(), BadTransition> {
        self.become_(BundleState::Imported)
    }

    /// A record of a bundle directory with no images, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(digest: Digest, name: &str, state: BundleState) -> BundleRecord {
        BundleRecord {
            digest,
            name: name.into(),
            version: None,
            kind: SourceKind::BundleDir,
            source: format!("/media/{name}").into(),
            state,
            staged: None,
            updated: 0,
            images: vec![],
            sets: vec![],
            retained: None,
            cached: false,
        }
    }
}

/// What kind of input a bundle came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// A bundle directory.
    BundleDir,
    /// A tar bundle (file or device).
    BundleTar,
    /// `docker save` / `podman save` archive.
    DockerArchive,
    /// An oci-archive file.
    OciArchive,
    /// An OCI layout without bundle.json.
    OciLayout,
    /// A `dir:` tree.
    Dir,
}

/// One image of a recorded bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// Repository.
    pub repository: String,
    /// Manifest digest.
    pub digest: Digest,
    /// Tags.
    pub tags: Vec<String>,
    /// Every name it is stored under.
    pub names: Vec<String>,
    /// Bytes as stored in the bundle.
    pub size: u64,
    /// Its layers and the bytes each takes in the store (unpacked, or an estimate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<(Digest, u64)>,
    /// Bytes of manifest and config.
    #[serde(default)]
    pub overhead: u64,
}

/// An image set as recorded from a bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SetRecord {
    /// Name.
    pub name: String,
    /// Digest references of its images.
    pub images: Vec<String>,
    /// Whether it is to be pinned.
    pub pinned: bool,
    /// Whether it is needed before the container runtime starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub critical: bool,
}

/// A bundle longshore has seen through.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BundleRecord {
    /// The bundle's digest.
    pub digest: Digest,
    /// Its name.
    pub name: String,
    /// Its version, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// What it came from.
    pub kind: SourceKind,
    /// The path it was read from.
    pub source: PathBuf,
    /// Where it stands.
    pub state: BundleState,
    /// The verified copy a held bundle is applied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<PathBuf>,
    /// When it reached its state (seconds since the epoch).
    pub updated: u64,
    /// Its images.
    pub images: Vec<ImageRecord>,
    /// Its image sets, as it declared them.
    pub sets: Vec<SetRecord>,
    /// Where the layout before the cache kept a verified copy to heal from; moved into
    /// the cache at start (see engine), never written now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained: Option<PathBuf>,
    /// Whether the cache holds every blob of the bundle: heal and `apply` read it there.
    #[serde(default)]
    pub cached: bool,
}

/// An image set in force, from the bundle that declared it last.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ActiveSet {
    /// Name.
    pub name: String,
    /// Digest references of its images.
    pub images: Vec<String>,
    /// Whether it is to be pinned.
    pub pinned: bool,
    /// Whether it is needed before the container runtime starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub critical: bool,
    /// The bundle that declared it.
    pub bundle: Digest,
    /// While a new definition replaces an older one and its images are not all in yet:
    /// the older definition's images, which stay pinned where the new one keeps them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<String>,
}

/// Where a set in force stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetPhase {
    /// Its definition is the one pinned (once its images are in).
    InForce,
    /// A new definition came and its images are not all in yet: the older definition's
    /// images stay pinned where the new one keeps them.
    Replacing,
}

impl ActiveSet {
    /// Where it stands.
    pub fn phase(&self) -> SetPhase {
        if self.previous.is_empty() {
            SetPhase::InForce
        } else {
            SetPhase::Replacing
        }
    }

    /// A new definition of the same set comes into force (from either phase). When its
    /// images differ, the set is `Replacing`, remembering the images of the last
    /// definition that was whole: a set replaced twice before the first replacement
    /// completed still keeps the pins it had before either.
    pub fn replace_with(&mut self, new: ActiveSet) {
        let previous = match self.phase() {
            _ if new.images == self.images => std::mem::take(&mut self.previous),
            SetPhase::InForce => std::mem::take(&mut self.images),
            SetPhase::Replacing => std::mem::take(&mut self.previous),
        };
        *self = ActiveSet { previous, ..new };
    }

    /// Every image of the new definition is in: from `Replacing` to `InForce`. Returns
    /// whether it moved (a set in force stays as it is).
    pub fn settle(&mut self) -> bool {
        match self.phase() {
            SetPhase::Replacing => {
                self.previous.clear();
                true
            }
            SetPhase::InForce => false,
        }
    }
}

/// The state file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// Schema version.
    pub version: u32,
    /// Bundles by digest.
    pub bundles: BTreeMap<Digest, BundleRecord>,
    /// Image sets in force, by name.
    #[serde(default)]
    pub sets: BTreeMap<String, ActiveSet>,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: STATE_VERSION,
            bundles: BTreeMap::new(),
            sets: BTreeMap::new(),
        }
    }
}

impl State {
    /// The state file of `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("state.json")
    }

    /// Loads the state, empty when there is none yet.
    pub fn load(state_dir: &Path) -> Result<State> {
        let path = Self::path(state_dir);
        match fs::read(&path) {
            Ok(bytes) => {
                let s: State = serde_json::from_slice(&bytes)
                    .with_context(|| format!("parsing state file {}", path.display()))?;
                anyhow::ensure!(
                    s.version == STATE_VERSION,
                    "state file {} has version {}; this longshore reads version {STATE_VERSION}",
                    path.display(),
                    s.version
                );
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e).with_context(|| format!("reading state file {}", path.display())),
        }
    }

    /// Writes the state atomically.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).context("serialising state")?;
        bytes.push(b'\n');
        write_atomic(&Self::path(state_dir), &bytes)
    }
}

/// A board: a JSON file in the runtime directory that a running process writes for
/// others to read (`longshore status`): the fetcher's `fetch.json`, the endpoint's
/// `share.json`. It names the process, and is stale once that process is gone.
pub mod board {
    use serde::{de::DeserializeOwned, Serialize};

    use crate::paths::HostPaths;

    /// The board `name` of a process still running (`pid` says which process wrote it).
    pub fn read<T: DeserializeOwned>(
        paths: &HostPaths,
        name: &str,
        pid: impl Fn(&T) -> u32,
    ) -> Option<T> {
        let p = paths.run_dir.join(name);
        let bytes = crate::untrusted::read_admin_file(&p, 16 << 20).ok()?;
        let b: T = serde_json::from_slice(&bytes).ok()?;
        let alive =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid(&b) as i32), None).is_ok();
        alive.then_some(b)
    }

    /// Writes board `name`; a failure is only logged (the board is for people).
    pub fn write<T: Serialize>(paths: &HostPaths, name: &str, value: &T) {
        let p = paths.run_dir.join(name);
        let res = std::fs::create_dir_all(&paths.run_dir)
            .map_err(anyhow::Error::from)
            .and_then(|_| super::write_atomic(&p, &serde_json::to_vec(value)?));
        if let Err(e) = res {
            tracing::debug!("writing {}: {e:#}", p.display());
        }
    }

    /// Removes board `name` (its process stops).
    pub fn clear(paths: &HostPaths, name: &str) {
        let _ = std::fs::remove_file(paths.run_dir.join(name));
    }
}

/// Replaces `path` with `bytes` so that a crash at any point leaves either the old file or
/// the new one: write a temporary file beside it, fsync it, rename it over, fsync the
/// directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing directory {}", dir.display()))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Seconds since the epoch, now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    fn record(state: BundleState) -> BundleRecord {
        let digest = format!("sha256:{}", "cd".repeat(32)).parse().unwrap();
        BundleRecord::for_test(digest, "site", state)
    }

    #[test]
    fn bundle_states_move_only_along_the_machine() {
        use BundleState::*;
        let all = [Held, Importing, Imported];
        let allowed = [
            (Held, Importing),
            (Importing, Importing),
            (Importing, Imported),
            (Imported, Importing),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.may_become(to),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
        // Applying a held bundle, then finishing it.
        let mut r = record(Held);
        r.to_importing().unwrap();
        assert!(r.updated > 0, "the time of the move is recorded");
        r.to_imported().unwrap();
        assert_eq!(r.state, Imported);
        // A held bundle is never imported without its copies.
        let mut r = record(Held);
        let e = r.to_imported().unwrap_err();
        assert_eq!((e.from, e.to), (Held, Imported));
        assert_eq!(r.state, Held, "a refused move changes nothing");
        assert_eq!(r.updated, 0);
    }

    use super::*;

    #[test]
    fn round_trip_and_no_temp_left() {
        let t = tempfile::tempdir().unwrap();
        let mut s = State::default();
        let d = Digest::of(b"bundle");
        s.bundles.insert(
            d,
            BundleRecord {
                digest: d,
                name: "b".into(),
                version: None,
                kind: SourceKind::BundleDir,
                source: "/x".into(),
                state: BundleState::Imported,
                staged: None,
                updated: 1,
                images: vec![],
                sets: vec![],
                retained: None,
                cached: false,
            },
        );
        s.save(t.path()).unwrap();
        s.save(t.path()).unwrap();
        assert_eq!(State::load(t.path()).unwrap(), s);
        let names: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn lock_is_exclusive() {
        let t = tempfile::tempdir().unwrap();
        let _held = StateLock::acquire(t.path()).unwrap();
        let f = File::open(t.path().join("lock")).unwrap();
        assert!(f.try_lock_exclusive().is_err());
    }

    fn set(images: &[&str]) -> ActiveSet {
        ActiveSet {
            name: "s".into(),
            images: images.iter().map(|s| s.to_string()).collect(),
            pinned: true,
            critical: false,
            bundle: Digest::of(images.join(",").as_bytes()),
            previous: vec![],
        }
    }

    #[test]
    fn a_set_replaced_keeps_the_images_of_its_last_whole_definition() {
        let mut s = set(&["a", "b"]);
        assert_eq!(s.phase(), SetPhase::InForce);
        assert!(!s.settle(), "a set in force does not settle");
        s.replace_with(set(&["b", "c"]));
        assert_eq!(s.phase(), SetPhase::Replacing);
        assert_eq!(s.previous, ["a", "b"]);
        assert_eq!(s.images, ["b", "c"]);
        // Replaced again before c came in: a and b are still what was whole.
        s.replace_with(set(&["c", "d"]));
        assert_eq!(s.previous, ["a", "b"]);
        assert_eq!(s.bundle, set(&["c", "d"]).bundle);
        assert!(s.settle());
        assert_eq!(s.phase(), SetPhase::InForce);
        assert!(s.previous.is_empty());
    }

    #[test]
    fn the_same_definition_again_changes_no_phase() {
        let mut s = set(&["a"]);
        s.replace_with(set(&["a"]));
        assert_eq!(s.phase(), SetPhase::InForce);
        let mut r = set(&["a"]);
        r.replace_with(set(&["b"]));
        r.replace_with(set(&["b"]));
        assert_eq!(r.phase(), SetPhase::Replacing, "still waiting for b");
        assert_eq!(r.previous, ["a"]);
    }
}
