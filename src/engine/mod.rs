//! The import path that ties the parts together: detect → read metadata → see what the
//! store holds → check space → verify into staging → move into the cache → copy from it
//! (or hold) → pin → reload CRI-O → record.
//!
//! A bundle moves through these states (recorded in [`crate::state`]):
//!
//! ```text
//!   (new) --verify ok, --hold--> Held --apply--> Importing --copies done--> Imported
//!   (new) --verify ok---------------------->     Importing --copies done--> Imported
//!   (new) --verification fails--> (new): nothing recorded, nothing pinned, staging removed
//!   Importing --a copy fails--> Importing (its sets say what is missing)
//! ```
//!
//! Nothing enters the store before the whole bundle has been verified. When a bundle's
//! sets change what is pinned, the pins of what stays are written first (so images that
//! left a set become collectable), then the new images are copied, then pinned; CRI-O is
//! reloaded after each change of the pin file.
//!
//! One room per job, sharing the [`Engine`] and the plan types here: `import` (a path's
//! inputs in), `cache` (verified layouts into the cache, what references it, collection,
//! migration), `copy` (the views skopeo reads, and the jobs for the store's scheduler),
//! `hold` (held bundles and `apply`), `pins` (sets in force and drop-ins; CRI-O is
//! reloaded by [`crate::crio::control`]), `heal` (putting back what the store lost, from
//! the cache), `verify`, and `sweep` (what a killed run left).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::bundle::foreign::Foreign;
use crate::bundle::format::{BundleMeta, ImageMeta, BUNDLE_JSON};
use crate::bundle::intake::{self, Layout};
use crate::bundle::read::{self, Verified};
use crate::bundle::{self, Input, Rejected};
use crate::cache::Cache;
use crate::cancel::Cancel;
use crate::config::{human_size, Settings, StoreMode};
use crate::crio::{CrioConfig, FileChange};
use crate::oci::digest::Digest;
use crate::paths::HostPaths;
use crate::sets::{self, Activity, SetView};
use crate::state::{
    now, ActiveSet, BundleRecord, BundleState, ImageRecord, SetRecord, SourceKind, State, StateLock,
};
use crate::store::{check_space, SpaceNeed, Store, Wanted};

mod cache;
mod copy;
mod fetch;
mod heal;
mod hold;
mod import;
mod pins;
mod sweep;
mod verify;

pub use cache::{cache_report, CacheReport, CacheView, CachedBundle};
pub use fetch::{check_enabled, expand_releases, wanted, FetchReport};
use pins::Busy;
pub use pins::{crio_config, evaluate_sets};
use sweep::sweep;
pub use verify::{verify, VerifyReport};

/// Options of `import`.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The bundle digest the caller requires.
    pub expected: Option<Digest>,
    /// Verify and stage only; copy on `apply`.
    pub hold: bool,
    /// Only put back missing images (healing from the cache): the bundle's sets
    /// are not put in force again, so a newer definition of a set stays.
    pub restore: bool,
}

/// What an import did, for people and for `--json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportReport {
    /// The bundle's digest.
    pub digest: Digest,
    /// Its name.
    pub name: String,
    /// Its images.
    pub images: usize,
    /// Images copied into the store now.
    pub copied: usize,
    /// Images the store already held.
    pub present: usize,
    /// Bytes hashed during verification.
    pub bytes_verified: u64,
    /// The state it ended in.
    pub state: BundleState,
}

impl ImportReport {
    /// One line for people.
    pub fn summary(&self) -> String {
        match (self.state, self.copied) {
            (BundleState::Held, _) => format!(
                "bundle {} ({}) verified and held: {} images staged; run `longshore apply {}` to import",
                self.name, self.digest, self.images, self.name
            ),
            (BundleState::Imported, 0) => format!(
                "bundle {} ({}): all {} images already in the store, nothing copied",
                self.name, self.digest, self.images
            ),
            (BundleState::Imported, n) => format!(
                "bundle {} ({}) imported: {n} images copied, {} already present",
                self.name, self.digest, self.present
            ),
            (BundleState::Importing, _) => format!(
                "bundle {} ({}) is not completely imported",
                self.name, self.digest
            ),
        }
    }
}

/// What importing a path did: a report per input that went in, and the inputs of a
/// collection that failed, with why.
#[derive(Debug, Default)]
pub struct ImportOutcome {
    /// Inputs imported (or held).
    pub reports: Vec<ImportReport>,
    /// Inputs that failed.
    pub failures: Vec<(PathBuf, anyhow::Error)>,
}

/// The engine: settings, the store, and the state it owns while the lock is held.
pub struct Engine {
    /// Host paths.
    pub paths: HostPaths,
    /// Settings.
    pub settings: Settings,
    /// The store written to.
    pub store: Store,
    /// CRI-O's configuration files.
    pub crio: CrioConfig,
    /// The original blobs of what was brought in.
    cache: Cache,
    state: State,
    /// Reloads CRI-O when its drop-ins change.
    control: crate::crio::control::Control,
    /// Sets whose images this engine is copying now.
    busy: std::collections::BTreeSet<String>,
    /// Where copy progress goes (the daemon's `Progress` signal).
    progress: Option<crate::events::ProgressSender>,
    /// Raised to abandon the work (the daemon's device went away, or it is stopping).
    cancel: Cancel,
    _lock: StateLock,
}

/// Tells apart the staging directories one process makes.
static STAGING_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A bundle's images as the engine handles them, whatever the input was.
struct Plan {
    /// Whether this is a restore (see [`ImportOptions::restore`]).
    restore: bool,
    /// Images of sets fetched from registries, not a bundle's (`name` says which sets).
    fetched: bool,
    digest: Digest,
    name: String,
    version: Option<String>,
    kind: SourceKind,
    images: Vec<PlannedImage>,
    sets: Vec<SetRecord>,
}

struct PlannedImage {
    /// Where skopeo reads it from, once verified.
    source: String,
    repository: String,
    tags: Vec<String>,
    digest: Digest,
    /// The manifest's media type.
    media_type: String,
    size: u64,
    /// (digest, bytes it takes in the store) of each layer.
    layers: Vec<(Digest, u64)>,
    /// Manifest and config bytes.
    overhead: u64,
    /// The config blob (bundles only: foreign inputs are read by skopeo directly).
    config: Option<Digest>,
    /// When `digest` is a list of images (fetched by the list's digest or by a tag that
    /// names a list), the manifest of this node's image in it.
    instance: Option<Digest>,
}

impl Plan {
    /// Bytes the missing images will take in the store: each layer counted once, and
    /// not at all when an image already present has it.
    fn store_bytes(&self, present: &[bool]) -> u64 {
        let have = self.present_layers(present);
        let mut counted = HashSet::new();
        let mut bytes = 0u64;
        for (img, _) in self.images.iter().zip(present).filter(|(_, p)| !**p) {
            bytes += img.overhead;
            for (d, size) in &img.layers {
                if !have.contains(d) && counted.insert(*d) {
                    bytes += size;
                }
            }
        }
        bytes
    }

    /// The layers of the images the store already holds.
    fn present_layers(&self, present: &[bool]) -> HashSet<Digest> {
        self.images
            .iter()
            .zip(present)
            .filter(|(_, p)| **p)
            .flat_map(|(i, _)| i.layers.iter().map(|l| l.0))
            .collect()
    }
}

impl PlannedImage {
    fn wanted(&self) -> Wanted<'_> {
        Wanted {
            repository: &self.repository,
            digest: self.digest,
            tags: &self.tags,
        }
    }

    fn record(&self) -> ImageRecord {
        let mut names = vec![format!("{}@{}", self.repository, self.digest)];
        names.extend(self.tags.iter().map(|t| format!("{}:{t}", self.repository)));
        ImageRecord {
            repository: self.repository.clone(),
            digest: self.digest,
            tags: self.tags.clone(),
            names,
            size: self.size,
            layers: self.layers.clone(),
            overhead: self.overhead,
        }
    }
}

impl Engine {
    /// Loads settings and state and takes the lock.
    pub fn open(paths: HostPaths, settings: Settings) -> Result<Engine> {
        let lock = StateLock::acquire(&paths.state_dir)?;
        let state = State::load(&paths.state_dir)?;
        let store = Store::new(&paths, &settings);
        let crio = crio_config(&paths);
        let control = crate::crio::control::Control::new(&settings, &paths, crio.pin_file());
        sweep(&paths, &state);
        let cache = Cache::new(paths.cache_dir());
        let mut engine = Engine {
            paths,
            settings,
            store,
            crio,
            cache,
            state,
            control,
            busy: Default::default(),
            progress: None,
            cancel: Cancel::default(),
            _lock: lock,
        };
        engine.migrate_to_cache()?;
        Ok(engine)
    }

    /// Sends copy progress to `tx` from now on.
    pub fn report_progress(&mut self, tx: crate::events::ProgressSender) {
        self.progress = Some(tx);
    }

    /// Abandons the work when `cancel` is raised: verification stops within a buffer, a
    /// `skopeo copy` is stopped, and no further image is started. What was copied stays
    /// in the store and is found there next time; nothing incomplete is recorded or
    /// pinned. A layer the stopped copy was writing keeps containers-storage's
    /// `incomplete` flag, and the store deletes it when next loaded for writing (`Load`
    /// in containers/storage's layers.go).
    pub fn cancel_with(&mut self, cancel: Cancel) {
        self.store.cancel_with(cancel.clone());
        self.cancel = cancel;
    }

    /// The recorded state.
    pub fn state(&self) -> &State {
        &self.state
    }

    fn record_held(
        &mut self,
        source: &Path,
        plan: &Plan,
        bytes_verified: u64,
    ) -> Result<ImportReport> {
        let rec = self.record(source, plan, BundleState::Held, None);
        self.state.bundles.insert(plan.digest, rec);
        self.state.save(&self.paths.state_dir)?;
        Ok(ImportReport {
            digest: plan.digest,
            name: plan.name.clone(),
            images: plan.images.len(),
            copied: 0,
            present: 0,
            bytes_verified,
            state: BundleState::Held,
        })
    }

    fn record(
        &self,
        source: &Path,
        plan: &Plan,
        state: BundleState,
        staged: Option<PathBuf>,
    ) -> BundleRecord {
        BundleRecord {
            digest: plan.digest,
            name: plan.name.clone(),
            version: plan.version.clone(),
            kind: plan.kind,
            source: source.to_path_buf(),
            state,
            staged,
            updated: now(),
            images: plan.images.iter().map(PlannedImage::record).collect(),
            sets: plan.sets.clone(),
            retained: None,
            cached: self.cache.has(&plan.digest).is_some(),
        }
    }
}

fn plan_from_meta(digest: Digest, meta: &BundleMeta, kind: SourceKind) -> Plan {
    Plan {
        restore: false,
        fetched: false,
        digest,
        name: meta.name.clone(),
        version: meta.version.clone(),
        kind,
        images: meta.images.iter().map(planned_from_meta).collect(),
        sets: meta
            .sets
            .iter()
            .map(|s| SetRecord {
                name: s.name.clone(),
                images: s.images.clone(),
                pinned: s.pinned,
                critical: s.critical,
            })
            .collect(),
    }
}

fn planned_from_meta(i: &ImageMeta) -> PlannedImage {
    PlannedImage {
        // The layout is prefixed once it is known to be verified.
        source: i.reference.clone(),
        repository: i.repository.clone(),
        tags: i.tags.clone(),
        digest: i.digest,
        media_type: i.media_type.clone(),
        size: i.size,
        layers: i
            .layers
            .iter()
            .map(|l| {
                (
                    l.digest,
                    l.uncompressed_size.unwrap_or(l.size.saturating_mul(2)),
                )
            })
            .collect(),
        overhead: i.size - i.layers.iter().map(|l| l.size).sum::<u64>(),
        config: Some(i.config.digest),
        instance: None,
    }
}

/// `--digest` names one bundle: a collection must then hold exactly one input.
fn one_input_for_digest(dir: &Path, inputs: usize, expected: Option<Digest>) -> Result<()> {
    if expected.is_some() && inputs != 1 {
        bail!(
            "{} holds {inputs} inputs; --digest names a single bundle",
            dir.display()
        );
    }
    Ok(())
}

fn check_expected(path: &Path, got: &Digest, expected: Option<Digest>) -> Result<()> {
    match expected {
        Some(want) if want != *got => {
            Err(Rejected::new(path, format!("has digest {got}, but {want} was required")).into())
        }
        _ => Ok(()),
    }
}

fn ensure_same(v: &Verified, digest: &Digest, path: &Path) -> Result<()> {
    if v.digest != *digest {
        return Err(Rejected::new(
            path,
            format!(
                "changed while it was read: bundle.json now has digest {}",
                v.digest
            ),
        )
        .into());
    }
    Ok(())
}

fn dir_size(p: &Path) -> Result<u64> {
    let md = fs::symlink_metadata(p).with_context(|| format!("reading {}", p.display()))?;
    if !md.is_dir() {
        return Ok(md.len());
    }
    let mut total = 0;
    for e in fs::read_dir(p).with_context(|| format!("reading {}", p.display()))? {
        total += dir_size(
            &e.with_context(|| format!("reading {}", p.display()))?
                .path(),
        )?;
    }
    Ok(total)
}

fn remove_staging(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        tracing::warn!("removing staging directory {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::format::{BlobRef, LayerMeta};

    fn image(name: &str, layers: &[(u8, u64, Option<u64>)]) -> ImageMeta {
        let layers: Vec<LayerMeta> = layers
            .iter()
            .map(|(b, size, unc)| LayerMeta {
                digest: Digest::of(&[*b]),
                size: *size,
                uncompressed_size: *unc,
            })
            .collect();
        let size = 100 + 10 + layers.iter().map(|l| l.size).sum::<u64>();
        ImageMeta {
            reference: format!("example.com/{name}:1"),
            repository: format!("example.com/{name}"),
            tags: vec!["1".into()],
            digest: Digest::of(name.as_bytes()),
            media_type: crate::bundle::format::OCI_MANIFEST.into(),
            size,
            uncompressed_size: None,
            config: BlobRef {
                digest: Digest::of(format!("{name}-config").as_bytes()),
                size: 10,
            },
            layers,
        }
    }

    fn meta(images: Vec<ImageMeta>) -> BundleMeta {
        BundleMeta {
            schema_version: 1,
            name: "b".into(),
            version: None,
            architecture: "amd64".into(),
            created: "2026-12-01T00:00:00Z".into(),
            index: BlobRef {
                digest: Digest::of(b"index"),
                size: 5,
            },
            images,
            sets: vec![],
        }
    }

    #[test]
    fn the_store_need_counts_each_layer_once_and_none_a_present_image_has() {
        // a and b share layer 1 (uncompressed size known); c has layer 9, whose
        // uncompressed size is unknown and counted as twice its compressed size.
        let m = meta(vec![
            image("a", &[(1, 40, Some(100)), (2, 5, Some(20))]),
            image("b", &[(1, 40, Some(100)), (3, 5, Some(30))]),
            image("c", &[(9, 7, None)]),
        ]);
        let plan = plan_from_meta(Digest::of(b"bundle"), &m, SourceKind::BundleDir);
        // Manifest and config bytes: size minus the layers.
        assert!(plan.images.iter().all(|i| i.overhead == 110));
        assert_eq!(
            plan.store_bytes(&[false, false, false]),
            3 * 110 + 100 + 20 + 30 + 14
        );
        // a is present: its layer 1 is no cost for b.
        assert_eq!(plan.store_bytes(&[true, false, false]), 2 * 110 + 30 + 14);
        assert_eq!(plan.store_bytes(&[true, true, true]), 0);
    }

    #[test]
    fn an_image_record_names_it_by_digest_and_by_each_tag() {
        let m = meta(vec![image("a", &[(1, 4, None)])]);
        let plan = plan_from_meta(Digest::of(b"bundle"), &m, SourceKind::BundleDir);
        let rec = plan.images[0].record();
        assert_eq!(
            rec.names,
            [
                format!("example.com/a@{}", Digest::of(b"a")),
                "example.com/a:1".to_string()
            ]
        );
    }

    #[test]
    fn a_digest_is_required_only_of_a_single_input() {
        let d = Digest::of(b"x");
        assert!(one_input_for_digest(Path::new("/m"), 3, None).is_ok());
        assert!(one_input_for_digest(Path::new("/m"), 1, Some(d)).is_ok());
        let e = one_input_for_digest(Path::new("/m"), 2, Some(d)).unwrap_err();
        assert!(format!("{e}").contains("holds 2 inputs"), "{e}");
        let e = check_expected(Path::new("/m/b"), &d, Some(Digest::of(b"y"))).unwrap_err();
        assert!(e.downcast_ref::<Rejected>().is_some());
        assert!(check_expected(Path::new("/m/b"), &d, Some(d)).is_ok());
    }
}
