//! The import path that ties the parts together: detect → read metadata → see what the
//! store holds → check space → verify → stage or copy → pin → reload CRI-O → record.
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

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::bundle::foreign::Foreign;
use crate::bundle::format::{BundleMeta, ImageMeta};
use crate::bundle::read::{self, Verified};
use crate::bundle::{self, Input, Rejected};
use crate::cancel::Cancel;
use crate::config::{human_size, Settings, StoreMode};
use crate::crio::{CrioConfig, FileChange};
use crate::digest::Digest;
use crate::paths::HostPaths;
use crate::proxy::Proxy;
use crate::sets::{self, Activity, SetView};
use crate::state::{
    now, ActiveSet, BundleRecord, BundleState, ImageRecord, SetRecord, SourceKind, State, StateLock,
};
use crate::store::{check_space, SpaceNeed, Store, Wanted};
use crate::systemd::{Reload, Systemd};

/// Options of `import`.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The bundle digest the caller requires.
    pub expected: Option<Digest>,
    /// Verify and stage only; copy on `apply`.
    pub hold: bool,
    /// Only put back missing images (healing from a retained copy): the bundle's sets
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
    state: State,
    systemd: Option<Systemd>,
    /// Sets whose images this engine is copying now.
    busy: std::collections::BTreeSet<String>,
    /// Where copy progress goes (the daemon's `Progress` signal).
    progress: Option<tokio::sync::mpsc::UnboundedSender<crate::api::Progress>>,
    /// Raised to abandon the work (the daemon's device went away, or it is stopping).
    cancel: Cancel,
    _lock: StateLock,
}

/// A bundle's images as the engine handles them, whatever the input was.
struct Plan {
    /// Whether this is a restore (see [`ImportOptions::restore`]).
    restore: bool,
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
    size: u64,
    /// (digest, bytes it takes in the store) of each layer.
    layers: Vec<(Digest, u64)>,
    /// Manifest and config bytes.
    overhead: u64,
    /// The config blob (bundles only: foreign inputs are read by skopeo directly).
    config: Option<Digest>,
}

impl Plan {
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
        Ok(Engine {
            paths,
            settings,
            store,
            crio,
            state,
            systemd: None,
            busy: Default::default(),
            progress: None,
            cancel: Cancel::default(),
            _lock: lock,
        })
    }

    /// Sends copy progress to `tx` from now on.
    pub fn report_progress(
        &mut self,
        tx: tokio::sync::mpsc::UnboundedSender<crate::api::Progress>,
    ) {
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

    /// Imports whatever `path` holds. A directory of several inputs imports each in turn;
    /// one that fails is reported and the others still go in.
    pub async fn import(&mut self, path: &Path, opts: &ImportOptions) -> Result<ImportOutcome> {
        match bundle::detect(path)? {
            Input::Collection(dir, items) => {
                one_input_for_digest(&dir, items.len(), opts.expected)?;
                let mut outcome = ImportOutcome::default();
                for item in items {
                    tracing::info!("importing {}", item.display());
                    let res = match bundle::detect_in(&item, Some(&dir)) {
                        Ok(input) => self.import_one(input, opts).await,
                        Err(e) => Err(e),
                    };
                    match res {
                        Ok(r) => outcome.reports.push(r),
                        // Reported by the caller, which has the whole outcome.
                        Err(e) => outcome.failures.push((item, e)),
                    }
                }
                Ok(outcome)
            }
            input => Ok(ImportOutcome {
                reports: vec![self.import_one(input, opts).await?],
                failures: vec![],
            }),
        }
    }

    /// Imports one input of the collection `root` (as [`Engine::import`] does for each).
    pub async fn import_item(
        &mut self,
        item: &Path,
        root: &Path,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        let input = bundle::detect_in(item, Some(root))?;
        self.import_one(input, opts).await
    }

    async fn import_one(&mut self, input: Input, opts: &ImportOptions) -> Result<ImportReport> {
        match input {
            Input::BundleDir(dir) => self.import_bundle(&dir, false, opts).await,
            Input::BundleStream(p) => self.import_bundle(&p, true, opts).await,
            Input::Foreign(f) => self.import_foreign(f, opts).await,
            Input::Collection(dir, _) => {
                bail!("{}: nested collections are not imported", dir.display())
            }
        }
    }

    async fn import_bundle(
        &mut self,
        path: &Path,
        stream: bool,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        // bundle.json and index.json, checked against each other (and against --digest).
        // When the store already holds every image, this is all that is read: no blob of
        // the bundle would be used.
        let read::Head { digest, meta } = if stream {
            read::read_head_stream(path, opts.expected)?
        } else {
            read::read_head_dir(path, opts.expected)?
        };
        let proxy = Proxy::start(&self.settings.skopeo).await?;
        let mut plan = plan_from_meta(
            digest,
            &meta,
            if stream {
                SourceKind::BundleTar
            } else {
                SourceKind::BundleDir
            },
        );
        plan.restore = opts.restore;
        let present = self.presence(&proxy, &plan).await;
        proxy.finish().await.ok();
        let present = present?;
        if !opts.hold && present.iter().all(|p| *p) {
            return self
                .commit(path, &mut plan, &present, None, None, None)
                .await;
        }

        let staging_needed = stream || opts.hold;
        let mut needs = vec![self.store_need(&plan, &present)];
        if staging_needed || self.settings.retain_bundles {
            // A stream is staged (and then kept when retained); a directory is copied
            // when held or retained.
            needs.push(SpaceNeed {
                path: self.paths.staging_dir(),
                bytes: unique_bundle_bytes(&meta),
            });
        }
        check_space(&needs, self.settings.store.min_free_space, path)?;

        let tmp = self.temp_staging(&digest)?;
        let verified = match (stream, opts.hold) {
            (true, _) => read::verify_stream(path, Some(&tmp), opts.expected, &self.cancel),
            (false, false) => read::verify_dir(path, opts.expected, &self.cancel),
            (false, true) => stage_dir(path, &tmp, opts.expected, &self.cancel),
        };
        let verified = verified.inspect_err(|_| {
            let _ = fs::remove_dir_all(&tmp);
        })?;
        ensure_same(&verified, &digest, path)?;
        tracing::info!(
            bundle = %meta.name, digest = %digest,
            "verified {} images, {} hashed", meta.images.len(), human_size(verified.bytes_verified)
        );

        let layout = if staging_needed {
            let final_dir = self.paths.staging_dir().join(digest.hex());
            replace_dir(&tmp, &final_dir)?;
            final_dir
        } else {
            verified.layout.clone()
        };
        if opts.hold {
            return self.record_held(path, &plan, layout, verified.bytes_verified);
        }
        let retain = match (self.settings.retain_bundles, staging_needed) {
            (false, _) => None,
            (true, true) => Some(Retain::Move(layout.clone())),
            (true, false) => Some(Retain::CopyDir(layout.clone())),
        };
        let report = self
            .commit(
                path,
                &mut plan,
                &present,
                Some(&layout),
                Some(verified.bytes_verified),
                retain,
            )
            .await;
        if staging_needed && layout.exists() {
            remove_staging(&layout);
        }
        report
    }

    async fn import_foreign(&mut self, f: Foreign, opts: &ImportOptions) -> Result<ImportReport> {
        let proxy = Proxy::start(&self.settings.skopeo).await?;
        let res = self.import_foreign_with(&proxy, f, opts).await;
        proxy.finish().await.ok();
        res
    }

    async fn import_foreign_with(
        &mut self,
        proxy: &Proxy,
        f: Foreign,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        let mut images = Vec::new();
        let mut opened = Vec::new();
        for fi in &f.images {
            let img = proxy
                .open(&fi.source)
                .await
                .map_err(|e| Rejected::new(&f.path, format!("{e:#}")))?;
            let layers: Vec<(Digest, u64)> = img
                .manifest
                .layers
                .iter()
                .map(|l| (l.digest, l.size))
                .collect();
            images.push(PlannedImage {
                source: fi.source.clone(),
                repository: fi.repository.clone(),
                tags: fi.tags.clone(),
                digest: img.digest,
                size: img.manifest.config.size + layers.iter().map(|l| l.1).sum::<u64>(),
                // Layer sizes here are as stored; unpacked they may be larger, so count
                // them twice, as OpenShift's rule does where the true size is unknown.
                layers: layers
                    .iter()
                    .map(|(d, s)| (*d, s.saturating_mul(2)))
                    .collect(),
                overhead: img.manifest.config.size,
                config: None,
            });
            opened.push(img);
        }
        let digest = implicit_digest(&f, &images);
        check_expected(&f.path, &digest, opts.expected)?;
        let plan = Plan {
            restore: opts.restore,
            digest,
            name: f.name.clone(),
            version: None,
            kind: f.kind,
            sets: vec![SetRecord {
                name: f.name.clone(),
                images: images
                    .iter()
                    .map(|i| format!("{}@{}", i.repository, i.digest))
                    .collect(),
                pinned: self.settings.pin_foreign,
                critical: false,
            }],
            images,
        };
        let mut plan = plan;
        let present = self.presence(proxy, &plan).await?;
        if !opts.hold && present.iter().all(|p| *p) {
            for img in opened {
                proxy.close(img).await?;
            }
            return self
                .commit(&f.path, &mut plan, &present, None, None, None)
                .await;
        }
        let mut needs = vec![self.store_need(&plan, &present)];
        if opts.hold || self.settings.retain_bundles {
            needs.push(SpaceNeed {
                path: self.paths.staging_dir(),
                bytes: dir_size(&f.path)?,
            });
        }
        check_space(&needs, self.settings.store.min_free_space, &f.path)?;

        // Verify every blob before anything is copied: the proxy and this reader both
        // check each digest and size.
        let mut verified = 0u64;
        let mut seen = HashSet::new();
        for (img, planned) in opened.iter().zip(&plan.images) {
            let blobs = std::iter::once((img.manifest.config.digest, img.manifest.config.size))
                .chain(img.manifest.layers.iter().map(|l| (l.digest, l.size)));
            for (d, size) in blobs {
                if !seen.insert(d) {
                    continue;
                }
                proxy
                    .read_blob(img, &d, size, &mut |_| Ok(()))
                    .await
                    .map_err(|e| {
                        Rejected::new(&f.path, format!("image {}: {e:#}", planned.repository))
                    })?;
                verified += size;
            }
        }
        for img in opened {
            proxy.close(img).await?;
        }
        tracing::info!(input = %f.path.display(), "verified {} images, {} read", plan.images.len(), human_size(verified));
        if opts.hold {
            let tmp = self.temp_staging(&digest)?;
            let staged_input =
                tmp.join(f.path.file_name().unwrap_or(std::ffi::OsStr::new("input")));
            fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            copy_tree(&f.path, &staged_input, &self.cancel).inspect_err(|_| {
                let _ = fs::remove_dir_all(&tmp);
            })?;
            let final_dir = self.paths.staging_dir().join(digest.hex());
            replace_dir(&tmp, &final_dir)?;
            return self.record_held(&f.path, &plan, final_dir, verified);
        }
        let retain = self
            .settings
            .retain_bundles
            .then(|| Retain::CopyInput(f.path.clone()));
        self.commit(&f.path, &mut plan, &present, None, Some(verified), retain)
            .await
    }

    /// Copies a held bundle's images into the store.
    pub async fn apply(&mut self, which: &str) -> Result<ImportReport> {
        let rec = self.find_bundle(which)?.clone();
        if rec.state != BundleState::Held {
            bail!(
                "bundle {} ({}) is not held: it is {:?}",
                rec.name,
                rec.digest,
                rec.state
            );
        }
        let staged = rec
            .staged
            .clone()
            .with_context(|| format!("bundle {} is held but has no staged copy", rec.name))?;
        let report = match rec.kind {
            SourceKind::BundleDir | SourceKind::BundleTar => {
                let verified = read::verify_dir(&staged, Some(rec.digest), &self.cancel)?;
                let mut plan = plan_from_meta(verified.digest, &verified.meta, rec.kind);
                let proxy = Proxy::start(&self.settings.skopeo).await?;
                let present = self.presence(&proxy, &plan).await;
                proxy.finish().await.ok();
                let present = present?;
                check_space(
                    &[self.store_need(&plan, &present)],
                    self.settings.store.min_free_space,
                    &staged,
                )?;
                let retain = self
                    .settings
                    .retain_bundles
                    .then(|| Retain::Move(staged.clone()));
                self.commit(
                    &rec.source,
                    &mut plan,
                    &present,
                    Some(&staged),
                    Some(verified.bytes_verified),
                    retain,
                )
                .await?
            }
            _ => {
                let name = fs::read_dir(&staged)
                    .with_context(|| format!("reading {}", staged.display()))?
                    .next()
                    .with_context(|| format!("{} is empty", staged.display()))?
                    .with_context(|| format!("reading {}", staged.display()))?
                    .path();
                let Input::Foreign(f) = bundle::detect(&name)? else {
                    bail!("{} no longer holds the input that was held", name.display());
                };
                let opts = ImportOptions {
                    expected: Some(rec.digest),
                    hold: false,
                    restore: false,
                };
                let mut r = self.import_foreign(f, &opts).await?;
                // Recorded under the staged path by import_foreign; keep the original.
                if let Some(b) = self.state.bundles.get_mut(&r.digest) {
                    b.source = rec.source.clone();
                }
                self.state.save(&self.paths.state_dir)?;
                r.state = BundleState::Imported;
                r
            }
        };
        if staged.exists() {
            remove_staging(&staged);
        }
        Ok(report)
    }

    fn find_bundle(&self, which: &str) -> Result<&BundleRecord> {
        let matches: Vec<&BundleRecord> = self
            .state
            .bundles
            .values()
            .filter(|b| {
                b.name == which
                    || b.digest.to_string() == which
                    || b.digest
                        .hex()
                        .starts_with(which.trim_start_matches("sha256:"))
                        && which.len() >= 12
            })
            .collect();
        match matches.as_slice() {
            [one] => Ok(one),
            [] => bail!("no bundle named {which:?} is known; `longshore status` lists them"),
            _ => bail!("{which:?} names {} bundles; give the digest", matches.len()),
        }
    }

    async fn presence(&self, proxy: &Proxy, plan: &Plan) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(plan.images.len());
        for img in &plan.images {
            out.push(self.store.holds(proxy, &img.wanted()).await?);
        }
        Ok(out)
    }

    /// Bytes the missing images will take in the store: each layer counted once, and not
    /// at all when an image already present has it.
    fn store_need(&self, plan: &Plan, present: &[bool]) -> SpaceNeed {
        let have = plan.present_layers(present);
        let mut counted = HashSet::new();
        let mut bytes = 0u64;
        for (img, _) in plan.images.iter().zip(present).filter(|(_, p)| !**p) {
            bytes += img.overhead;
            for (d, size) in &img.layers {
                if !have.contains(d) && counted.insert(*d) {
                    bytes += size;
                }
            }
        }
        SpaceNeed {
            path: self.store.root.clone(),
            bytes,
        }
    }

    fn temp_staging(&self, digest: &Digest) -> Result<PathBuf> {
        let dir = self.paths.staging_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Leftovers of an interrupted run are of no use: their content was never recorded.
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(dir.join(format!(
            ".tmp-{}-{}",
            &digest.hex()[..12],
            std::process::id()
        )))
    }

    /// Copies the missing images of a verified bundle layout.
    ///
    /// skopeo reads each image through a `dir:` view: a directory of symbolic links to the
    /// manifest and blobs in the layout. The `oci:` transport of containers/image only
    /// looks at index entries whose media type is OCI (oci_src.go in image/oci/layout),
    /// while a bundle keeps Docker schema 2 manifests as they are so they keep their
    /// digests; `dir:` reads both. skopeo still checks every blob's digest as it copies.
    fn copy_from_layout(&self, plan: &mut Plan, present: &[bool], layout: &Path) -> Result<usize> {
        let views = self
            .paths
            .staging_dir()
            .join(format!(".tmp-views-{}", std::process::id()));
        let _ = fs::remove_dir_all(&views);
        let res = (|| {
            let blobs = layout.join("blobs/sha256");
            let blobs = blobs
                .canonicalize()
                .with_context(|| format!("resolving {}", blobs.display()))?;
            for (i, (img, _)) in plan
                .images
                .iter_mut()
                .zip(present)
                .enumerate()
                .filter(|(_, (_, p))| !**p)
            {
                let view = views.join(i.to_string());
                fs::create_dir_all(&view)
                    .with_context(|| format!("creating {}", view.display()))?;
                fs::write(view.join("version"), "Directory Transport Version: 1.1\n")
                    .with_context(|| format!("writing {}", view.display()))?;
                let link = |digest: &Digest, name: &str| {
                    std::os::unix::fs::symlink(blobs.join(digest.hex()), view.join(name))
                        .with_context(|| format!("linking {name} in {}", view.display()))
                };
                link(&img.digest, "manifest.json")?;
                let config = img
                    .config
                    .with_context(|| format!("{} has no config", img.repository))?;
                link(&config, &config.hex())?;
                for (l, _) in &img.layers {
                    if !view.join(l.hex()).exists() {
                        link(l, &l.hex())?;
                    }
                }
                img.source = format!("dir:{}", view.display());
            }
            self.copy_missing(plan, present)
        })();
        let _ = fs::remove_dir_all(&views);
        res
    }

    /// Copies the images the store lacks, two at a time, never two that would write the
    /// same layer at once (the second waits and then reuses it).
    fn copy_missing(&self, plan: &Plan, present: &[bool]) -> Result<usize> {
        let todo: Vec<&PlannedImage> = plan
            .images
            .iter()
            .zip(present)
            .filter(|(_, p)| !**p)
            .map(|(i, _)| i)
            .collect();
        let jobs = self.settings.import_jobs.max(1);
        let total = todo.len();
        let total_bytes: u64 = todo.iter().map(|i| i.size).sum();
        let bytes_done = std::sync::atomic::AtomicU64::new(0);
        let stored = plan.present_layers(present);
        let sched = Mutex::new(Scheduler {
            pending: (0..total).collect(),
            busy: HashSet::new(),
            stored,
            done: 0,
            failed: None,
        });
        let wake = Condvar::new();
        std::thread::scope(|s| {
            for _ in 0..jobs.min(total) {
                s.spawn(|| loop {
                    let (i, claimed) = {
                        let mut g = sched.lock().unwrap_or_else(|p| p.into_inner());
                        loop {
                            if g.failed.is_some() || g.pending.is_empty() {
                                return;
                            }
                            if let Err(c) = self.cancel.check() {
                                g.failed = Some(c.into());
                                wake.notify_all();
                                return;
                            }
                            // A layer another copy is writing now is waited for, then
                            // reused; a layer already stored is no reason to wait.
                            let pick = g.pending.iter().position(|&i| {
                                todo[i]
                                    .layers
                                    .iter()
                                    .all(|l| g.stored.contains(&l.0) || !g.busy.contains(&l.0))
                            });
                            match pick {
                                Some(p) => {
                                    let i = g.pending.remove(p).unwrap_or_default();
                                    let claimed: Vec<Digest> = todo[i]
                                        .layers
                                        .iter()
                                        .map(|l| l.0)
                                        .filter(|d| !g.stored.contains(d))
                                        .collect();
                                    g.busy.extend(claimed.iter().copied());
                                    break (i, claimed);
                                }
                                None => g = wake.wait(g).unwrap_or_else(|p| p.into_inner()),
                            }
                        }
                    };
                    let img = todo[i];
                    tracing::info!(image = %img.repository, digest = %img.digest, "copying into the store");
                    let res = self.store.copy_image(&img.source, &img.wanted());
                    let mut g = sched.lock().unwrap_or_else(|p| p.into_inner());
                    for d in &claimed {
                        g.busy.remove(d);
                    }
                    if res.is_ok() {
                        g.stored.extend(claimed);
                    }
                    match res {
                        Ok(()) => {
                            g.done += 1;
                            let bytes = bytes_done
                                .fetch_add(img.size, std::sync::atomic::Ordering::Relaxed)
                                + img.size;
                            let line = format!(
                                "Importing bundle {}: {}/{total} images, {}/{}",
                                plan.name,
                                g.done,
                                human_size(bytes),
                                human_size(total_bytes)
                            );
                            tracing::info!("{line}");
                            crate::systemd::notify_status(&line);
                            if let Some(tx) = &self.progress {
                                let _ = tx.send(crate::api::Progress {
                                    bundle: plan.name.clone(),
                                    image: format!("{}@{}", img.repository, img.digest),
                                    done: bytes,
                                    total: total_bytes,
                                    images: Some((g.done, total)),
                                });
                            }
                        }
                        Err(e) => {
                            g.failed.get_or_insert(e.context(format!("copying {}@{}", img.repository, img.digest)));
                        }
                    }
                    wake.notify_all();
                });
            }
        });
        let g = sched.into_inner().unwrap_or_else(|p| p.into_inner());
        match g.failed {
            Some(e) => Err(e),
            None => Ok(g.done),
        }
    }

    /// After verification (or when the store holds everything already): the bundle's
    /// sets come into force, the pins of what stays are written, the missing images are
    /// copied, the bundle is retained if so configured, and the new pins are written.
    async fn commit(
        &mut self,
        source: &Path,
        plan: &mut Plan,
        present: &[bool],
        layout: Option<&Path>,
        bytes_verified: Option<u64>,
        retain: Option<Retain>,
    ) -> Result<ImportReport> {
        let already = self
            .state
            .bundles
            .get(&plan.digest)
            .is_some_and(|b| b.state == BundleState::Imported);
        let known = self.state.bundles.contains_key(&plan.digest);
        if plan.restore && known {
            if let Some(b) = self.state.bundles.get_mut(&plan.digest) {
                b.state = BundleState::Importing;
            }
        } else {
            let mut rec = self.record(source, plan, BundleState::Importing, None);
            rec.retained = self
                .state
                .bundles
                .get(&plan.digest)
                .and_then(|b| b.retained.clone());
            self.state.bundles.insert(plan.digest, rec);
            self.activate_sets(plan);
        }
        self.state.save(&self.paths.state_dir)?;

        let missing = present.iter().filter(|p| !**p).count();
        let replaced = plan.sets.iter().any(|s| {
            self.state
                .sets
                .get(&s.name)
                .is_some_and(|a| !a.previous.is_empty())
        });
        let mut copied = 0;
        if missing > 0 {
            if replaced {
                // First the pins of what stays, so images that left a set are collectable
                // while the new ones are copied.
                self.sync().await?;
            }
            self.busy = plan.sets.iter().map(|s| s.name.clone()).collect();
            let marker = Busy::mark(&self.paths, &self.busy);
            // The copies wait on skopeo processes; other tasks (the daemon's D-Bus
            // service) move to the other worker meanwhile.
            let res = tokio::task::block_in_place(|| match layout {
                Some(l) => self.copy_from_layout(plan, present, l),
                None => self.copy_missing(plan, present),
            });
            drop(marker);
            self.busy.clear();
            copied = res?;
        }
        if let Some(from) = retain {
            match self.retain(&plan.digest, from) {
                Ok(p) => {
                    if let Some(b) = self.state.bundles.get_mut(&plan.digest) {
                        b.retained = Some(p);
                    }
                }
                Err(e) => tracing::warn!("keeping a copy of bundle {}: {e:#}", plan.name),
            }
        }
        if let Some(b) = self.state.bundles.get_mut(&plan.digest) {
            b.state = BundleState::Imported;
            b.updated = now();
        }
        self.state.save(&self.paths.state_dir)?;
        if copied == 0 && already {
            tracing::info!(bundle = %plan.name, "already imported; nothing to copy");
        }
        self.sync().await?;
        tracing::info!(
            message_id = crate::systemd::message_id::BUNDLE_IMPORTED,
            bundle = %plan.name, digest = %plan.digest,
            "bundle {} imported: {copied} images copied, {} already present",
            plan.name,
            plan.images.len() - copied
        );
        Ok(ImportReport {
            digest: plan.digest,
            name: plan.name.clone(),
            images: plan.images.len(),
            copied,
            present: present.iter().filter(|p| **p).count(),
            bytes_verified: bytes_verified.unwrap_or(0),
            state: BundleState::Imported,
        })
    }

    /// Puts the bundle's sets in force. A set that replaces another definition of the
    /// same name remembers the images it had, which stay pinned meanwhile where the new
    /// definition keeps them.
    fn activate_sets(&mut self, plan: &Plan) {
        for s in &plan.sets {
            let previous = match self.state.sets.get(&s.name) {
                Some(old) if old.images != s.images => {
                    if old.previous.is_empty() {
                        old.images.clone()
                    } else {
                        old.previous.clone()
                    }
                }
                Some(old) => old.previous.clone(),
                None => vec![],
            };
            self.state.sets.insert(
                s.name.clone(),
                ActiveSet {
                    name: s.name.clone(),
                    images: s.images.clone(),
                    pinned: s.pinned,
                    critical: s.critical,
                    bundle: plan.digest,
                    previous,
                },
            );
        }
    }

    /// Brings CRI-O's configuration in line with the sets: evaluates every set against
    /// the store, writes the pin file (and the additional-store drop-in), and reloads or
    /// restarts CRI-O when a file changed. Returns the sets' state.
    pub async fn sync(&mut self) -> Result<Vec<SetView>> {
        let (views, other) = evaluate_sets(
            &self.paths,
            &self.settings,
            &self.state,
            &self.store,
            &self.busy,
        )
        .await?;
        let mut changed = false;
        for v in views.iter().filter(|v| v.missing.is_empty()) {
            if let Some(a) = self.state.sets.get_mut(&v.name) {
                if !a.previous.is_empty() {
                    a.previous.clear();
                    changed = true;
                }
            }
        }
        if self.gc_retained() {
            changed = true;
        }
        if changed {
            self.state.save(&self.paths.state_dir)?;
        }
        for f in &other.overriding {
            tracing::warn!(
                "{} sets crio.image.pinned_images and is read after {}, so CRI-O ignores longshore's pins",
                f.display(),
                self.crio.pin_file().display()
            );
        }
        let mut pins = other.before;
        pins.extend(sets::pins(&views));
        let pin_change = self.crio.write_pins(&pins)?;
        let store_change = self.sync_store_dropin()?;
        match pin_change {
            FileChange::Written => tracing::info!(
                "wrote {} with {} pinned images",
                self.crio.pin_file().display(),
                pins.len()
            ),
            FileChange::Removed => {
                tracing::info!("removed {}: nothing to pin", self.crio.pin_file().display())
            }
            FileChange::Unchanged => {}
        }
        if store_change.changed() {
            self.restart_crio().await?;
        } else if pin_change.changed() {
            self.reload_crio().await?;
        }
        Ok(views)
    }

    async fn systemd(&mut self) -> Result<Systemd> {
        if let Some(s) = &self.systemd {
            return Ok(s.clone());
        }
        let s = Systemd::connect(self.settings.bus).await?;
        self.systemd = Some(s.clone());
        Ok(s)
    }

    async fn reload_crio(&mut self) -> Result<()> {
        let unit = self.settings.crio.unit.clone();
        if !self.settings.crio.reload {
            tracing::info!("{unit} not reloaded ([crio] reload = false)");
            return Ok(());
        }
        let outcome = async { self.systemd().await?.reload(&unit).await }
            .await
            .with_context(|| {
                format!(
                    "the pins are written to {}, but {unit} was not reloaded",
                    self.crio.pin_file().display()
                )
            })?;
        match outcome {
            Reload::Done => tracing::info!("reloaded {unit}"),
            Reload::NotActive(state) => tracing::info!(
                "{unit} is {state}, so it was not reloaded; CRI-O reads the pins when it starts"
            ),
        }
        Ok(())
    }

    async fn restart_crio(&mut self) -> Result<()> {
        let unit = self.settings.crio.unit.clone();
        if !self.settings.crio.allow_restart {
            tracing::warn!(
                "CRI-O's image store configuration changed; it takes effect when {unit} restarts \
                 (`systemctl restart {unit}`; set [crio] allow_restart = true to let longshore do it)"
            );
            // The pins still reload without a restart.
            return self.reload_crio().await;
        }
        let sd = self.systemd().await?;
        if sd.active_state(&unit).await? != "active" {
            tracing::info!("{unit} is not active; it reads the new configuration when it starts");
            return Ok(());
        }
        sd.restart(&unit)
            .await
            .with_context(|| format!("restarting {unit} for its new image store"))?;
        tracing::info!("restarted {unit}");
        Ok(())
    }

    /// In additional-store mode, makes sure CRI-O can open longshore's store read-only
    /// and that the drop-in names it; in primary mode, that no such drop-in is left.
    fn sync_store_dropin(&self) -> Result<FileChange> {
        match self.settings.store.mode {
            StoreMode::Primary => self.crio.write_store(None),
            StoreMode::Additional => {
                self.store.prepare_read_only()?;
                // CRI-O runs on the host, so the drop-in names the path as the host sees it.
                let on_node = self.paths.on_node(&self.store.root);
                self.crio.write_store(Some(&on_node))
            }
        }
    }

    /// Removes a set that came from a bundle; its images are unpinned (not removed).
    pub async fn remove_set(&mut self, name: &str) -> Result<()> {
        if let Some(f) = sets::load_files(&self.paths)?
            .into_iter()
            .find(|f| f.name == name)
        {
            if let sets::Source::File { path } = f.source {
                bail!(
                    "set {name} comes from {}; remove that file to remove the set",
                    path.display()
                );
            }
        }
        if self.state.sets.remove(name).is_none() {
            bail!("no set named {name:?}; `longshore sets` lists them");
        }
        self.state.save(&self.paths.state_dir)?;
        tracing::info!("removed set {name}; its images are no longer pinned");
        self.sync().await?;
        Ok(())
    }

    /// Checks every set and puts back, from retained bundles, the images the store lost
    /// (an unclean shutdown can make CRI-O wipe its storage); then syncs the pins.
    pub async fn heal(&mut self) -> Result<Vec<SetView>> {
        let views = self.sync().await?;
        let missing: HashSet<String> = views
            .iter()
            .flat_map(|v| v.missing.iter().cloned())
            .collect();
        if missing.is_empty() {
            return Ok(views);
        }
        let sources: Vec<BundleRecord> = self
            .state
            .bundles
            .values()
            .filter(|b| b.retained.as_ref().is_some_and(|p| p.exists()))
            .filter(|b| {
                b.images
                    .iter()
                    .any(|i| i.names.iter().any(|n| missing.contains(n)))
            })
            .cloned()
            .collect();
        for b in sources {
            let Some(retained) = b.retained.clone() else {
                continue;
            };
            tracing::warn!(
                "the store lost images of bundle {}; importing them again from {}",
                b.name,
                retained.display()
            );
            let input = match b.kind {
                SourceKind::BundleDir | SourceKind::BundleTar => Ok(Input::BundleDir(retained)),
                _ => first_entry(&retained).and_then(|p| bundle::detect(&p)),
            };
            let opts = ImportOptions {
                expected: Some(b.digest),
                hold: false,
                restore: true,
            };
            let res = match input {
                Ok(input) => self.import_one(input, &opts).await,
                Err(e) => Err(e),
            };
            // The record keeps where the bundle first came from.
            if let Some(rec) = self.state.bundles.get_mut(&b.digest) {
                rec.source = b.source.clone();
                rec.kind = b.kind;
            }
            self.state.save(&self.paths.state_dir)?;
            if let Err(e) = res {
                tracing::error!("restoring bundle {} from its retained copy: {e:#}", b.name);
            }
        }
        self.sync().await
    }

    /// Keeps a verified copy of a bundle in `/var/lib/longshore/bundles/<digest>`.
    fn retain(&self, digest: &Digest, from: Retain) -> Result<PathBuf> {
        let dir = self.paths.state_dir.join("bundles");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dest = dir.join(digest.hex());
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            &digest.hex()[..12],
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&tmp);
        match from {
            Retain::Move(p) if p == dest => return Ok(dest),
            Retain::Move(p) => replace_dir(&p, &dest)?,
            Retain::CopyDir(p) if p == dest => return Ok(dest),
            Retain::CopyDir(p) => {
                copy_tree(&p, &tmp, &self.cancel).inspect_err(|_| {
                    let _ = fs::remove_dir_all(&tmp);
                })?;
                replace_dir(&tmp, &dest)?;
            }
            Retain::CopyInput(p) if p.starts_with(&dest) => return Ok(dest),
            Retain::CopyInput(p) => {
                fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                let name = p.file_name().unwrap_or(std::ffi::OsStr::new("input"));
                copy_tree(&p, &tmp.join(name), &self.cancel).inspect_err(|_| {
                    let _ = fs::remove_dir_all(&tmp);
                })?;
                replace_dir(&tmp, &dest)?;
            }
        }
        tracing::info!("kept a verified copy of the bundle in {}", dest.display());
        Ok(dest)
    }

    /// Drops retained copies of bundles that no set in force comes from. Returns whether
    /// the state changed.
    fn gc_retained(&mut self) -> bool {
        let in_use: HashSet<Digest> = self.state.sets.values().map(|s| s.bundle).collect();
        let mut changed = false;
        for b in self.state.bundles.values_mut() {
            if in_use.contains(&b.digest) {
                continue;
            }
            if let Some(p) = b.retained.take() {
                tracing::info!(
                    "no set comes from bundle {} any more; removing its retained copy {}",
                    b.name,
                    p.display()
                );
                if let Err(e) = fs::remove_dir_all(&p) {
                    tracing::warn!("removing {}: {e}", p.display());
                }
                changed = true;
            }
        }
        changed
    }

    fn record_held(
        &mut self,
        source: &Path,
        plan: &Plan,
        staged: PathBuf,
        bytes_verified: u64,
    ) -> Result<ImportReport> {
        let rec = self.record(source, plan, BundleState::Held, Some(staged));
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
        }
    }
}

/// Where a retained copy comes from.
enum Retain {
    /// A staged, verified layout, moved into place.
    Move(PathBuf),
    /// A verified bundle directory, copied.
    CopyDir(PathBuf),
    /// A foreign input (file or directory), copied.
    CopyInput(PathBuf),
}

/// A mark in `/run/longshore/progress.json` that sets are being imported, so another
/// process (`longshore status`) can report them as progressing. Removed when dropped.
struct Busy(Option<PathBuf>);

impl Busy {
    fn mark(paths: &HostPaths, sets: &std::collections::BTreeSet<String>) -> Busy {
        let path = paths.run_dir.join("progress.json");
        let doc = serde_json::json!({ "pid": std::process::id(), "sets": sets });
        let res = fs::create_dir_all(&paths.run_dir)
            .map_err(anyhow::Error::from)
            .and_then(|_| crate::state::write_atomic(&path, doc.to_string().as_bytes()));
        match res {
            Ok(()) => Busy(Some(path)),
            Err(e) => {
                tracing::debug!("writing {}: {e:#}", path.display());
                Busy(None)
            }
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// The sets a process marked as being imported, if it is still running.
fn busy_elsewhere(paths: &HostPaths) -> std::collections::BTreeSet<String> {
    #[derive(serde::Deserialize)]
    struct Progress {
        pid: i32,
        sets: Vec<String>,
    }
    let Ok(bytes) = fs::read(paths.run_dir.join("progress.json")) else {
        return Default::default();
    };
    let Ok(p) = serde_json::from_slice::<Progress>(&bytes) else {
        return Default::default();
    };
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), None).is_ok();
    if alive {
        p.sets.into_iter().collect()
    } else {
        Default::default()
    }
}

/// CRI-O's configuration files on this host.
pub fn crio_config(paths: &HostPaths) -> CrioConfig {
    CrioConfig {
        main: paths.host(Path::new("/etc/crio/crio.conf")),
        dropins: paths.crio_conf_dir.clone(),
    }
}

/// Every set in force and its state, and the pins of CRI-O's other files.
pub async fn evaluate_sets(
    paths: &HostPaths,
    settings: &Settings,
    state: &State,
    store: &Store,
    busy: &std::collections::BTreeSet<String>,
) -> Result<(Vec<SetView>, crate::crio::OtherPins)> {
    let files = sets::load_files(paths)?;
    let defs = sets::effective(state, files);
    let other = crio_config(paths).other_pins()?;
    let mut importing = busy_elsewhere(paths);
    importing.extend(busy.iter().cloned());
    let activity = Activity {
        importing,
        overriding: other.overriding.clone(),
    };
    if defs.is_empty() {
        return Ok((vec![], other));
    }
    let proxy = Proxy::start(&settings.skopeo).await?;
    let views = sets::evaluate(&defs, state, store, &proxy, &activity).await;
    proxy.finish().await.ok();
    Ok((views?, other))
}

/// The one entry of a retained foreign input's directory.
fn first_entry(dir: &Path) -> Result<PathBuf> {
    Ok(fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .next()
        .with_context(|| format!("{} is empty", dir.display()))?
        .with_context(|| format!("reading {}", dir.display()))?
        .path())
}

struct Scheduler {
    pending: VecDeque<usize>,
    /// Layers a running copy is writing.
    busy: HashSet<Digest>,
    /// Layers the store holds.
    stored: HashSet<Digest>,
    done: usize,
    failed: Option<anyhow::Error>,
}

/// Verifies a bundle without importing it.
pub async fn verify(
    path: &Path,
    expected: Option<Digest>,
    settings: &Settings,
    cancel: &Cancel,
) -> Result<Vec<VerifyReport>> {
    let inputs = match bundle::detect(path)? {
        Input::Collection(dir, items) => items
            .into_iter()
            .map(|p| bundle::detect_in(&p, Some(&dir)))
            .collect::<Result<Vec<_>>>()?,
        one => vec![one],
    };
    one_input_for_digest(path, inputs.len(), expected)?;
    let mut out = Vec::new();
    for input in inputs {
        out.push(match input {
            Input::BundleDir(d) => VerifyReport::from(&d, read::verify_dir(&d, expected, cancel)?),
            Input::BundleStream(p) => {
                VerifyReport::from(&p, read::verify_stream(&p, None, expected, cancel)?)
            }
            Input::Foreign(f) => {
                let proxy = Proxy::start(&settings.skopeo).await?;
                let r = verify_foreign(&proxy, &f, expected).await;
                proxy.finish().await.ok();
                r?
            }
            Input::Collection(d, _) => {
                bail!("{}: nested collections are not verified", d.display())
            }
        });
    }
    Ok(out)
}

async fn verify_foreign(
    proxy: &Proxy,
    f: &Foreign,
    expected: Option<Digest>,
) -> Result<VerifyReport> {
    let mut images = Vec::new();
    let mut bytes = 0;
    let mut seen = HashSet::new();
    for fi in &f.images {
        let img = proxy
            .open(&fi.source)
            .await
            .map_err(|e| Rejected::new(&f.path, format!("{e:#}")))?;
        let blobs: Vec<(Digest, u64)> =
            std::iter::once((img.manifest.config.digest, img.manifest.config.size))
                .chain(img.manifest.layers.iter().map(|l| (l.digest, l.size)))
                .collect();
        for (d, size) in blobs {
            if seen.insert(d) {
                proxy
                    .read_blob(&img, &d, size, &mut |_| Ok(()))
                    .await
                    .map_err(|e| {
                        Rejected::new(&f.path, format!("image {}: {e:#}", fi.repository))
                    })?;
                bytes += size;
            }
        }
        images.push(PlannedImage {
            source: fi.source.clone(),
            repository: fi.repository.clone(),
            tags: fi.tags.clone(),
            digest: img.digest,
            size: 0,
            layers: vec![],
            overhead: 0,
            config: None,
        });
        proxy.close(img).await?;
    }
    let digest = implicit_digest(f, &images);
    check_expected(&f.path, &digest, expected)?;
    Ok(VerifyReport {
        path: f.path.clone(),
        digest,
        name: f.name.clone(),
        images: images.len(),
        bytes_verified: bytes,
    })
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// The input.
    pub path: PathBuf,
    /// Its digest.
    pub digest: Digest,
    /// Its name.
    pub name: String,
    /// Number of images.
    pub images: usize,
    /// Bytes hashed.
    pub bytes_verified: u64,
}

impl VerifyReport {
    fn from(path: &Path, v: Verified) -> VerifyReport {
        VerifyReport {
            path: path.to_path_buf(),
            digest: v.digest,
            name: v.meta.name,
            images: v.meta.images.len(),
            bytes_verified: v.bytes_verified,
        }
    }
}

fn plan_from_meta(digest: Digest, meta: &BundleMeta, kind: SourceKind) -> Plan {
    Plan {
        restore: false,
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
    }
}

/// Bytes of a bundle's blobs, each counted once: what staging it takes.
fn unique_bundle_bytes(meta: &BundleMeta) -> u64 {
    let mut seen = HashSet::new();
    let mut total = meta.index.size;
    for i in &meta.images {
        for (d, s) in [
            (
                i.digest,
                i.size - i.config.size - i.layers.iter().map(|l| l.size).sum::<u64>(),
            ),
            (i.config.digest, i.config.size),
        ]
        .into_iter()
        .chain(i.layers.iter().map(|l| (l.digest, l.size)))
        {
            if seen.insert(d) {
                total += s;
            }
        }
    }
    total
}

/// The identity of a foreign input: the digest of what it holds, so the same images
/// under the same names are the same implicit bundle wherever they come from.
fn implicit_digest(f: &Foreign, images: &[PlannedImage]) -> Digest {
    let doc = serde_json::json!({
        "kind": f.kind,
        "name": f.name,
        "images": images.iter().map(|i| serde_json::json!({
            "repository": i.repository,
            "tags": i.tags,
            "digest": i.digest.to_string(),
        })).collect::<Vec<_>>(),
    });
    Digest::of(doc.to_string().as_bytes())
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

/// Copies a bundle directory into `tmp` and verifies the copy, so what is held is exactly
/// what was checked.
fn stage_dir(
    src: &Path,
    tmp: &Path,
    expected: Option<Digest>,
    cancel: &Cancel,
) -> Result<Verified> {
    copy_tree(src, tmp, cancel)?;
    read::verify_dir(tmp, expected, cancel)
}

fn copy_tree(src: &Path, dst: &Path, cancel: &Cancel) -> Result<()> {
    cancel.check()?;
    let md = fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
    if md.is_dir() {
        fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
        for e in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
            let e = e.with_context(|| format!("reading {}", src.display()))?;
            copy_tree(&e.path(), &dst.join(e.file_name()), cancel)?;
        }
    } else if md.is_file() {
        fs::copy(src, dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    } else {
        return Err(Rejected::new(src, "is neither a regular file nor a directory").into());
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

fn replace_dir(tmp: &Path, final_dir: &Path) -> Result<()> {
    if final_dir.exists() {
        fs::remove_dir_all(final_dir)
            .with_context(|| format!("removing {}", final_dir.display()))?;
    }
    fs::rename(tmp, final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))
}

fn remove_staging(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        tracing::warn!("removing staging directory {}: {e}", dir.display());
    }
}
