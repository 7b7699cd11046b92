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
use crate::bundle::intake::{self, Layout};
use crate::bundle::read::{self, Verified};
use crate::bundle::{self, Input, Rejected};
use crate::cancel::Cancel;
use crate::config::{human_size, Bus, Settings, StoreMode};
use crate::crio::{CrioConfig, FileChange};
use crate::digest::Digest;
use crate::paths::HostPaths;
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

/// Tells apart the staging directories one process makes.
static STAGING_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
    /// Every blob the images the store lacks are made of.
    fn blobs_of_missing(&self, meta: &BundleMeta, present: &[bool]) -> HashSet<Digest> {
        meta.images
            .iter()
            .zip(present)
            .filter(|(_, p)| !**p)
            .flat_map(|(i, _)| {
                [i.digest, i.config.digest]
                    .into_iter()
                    .chain(i.layers.iter().map(|l| l.digest))
            })
            .collect()
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
        sweep(&paths, &state);
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
        // A set file that cannot be read stops the import before anything is recorded
        // or copied, rather than after.
        sets::load_files(&self.paths)?;
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
            input => {
                let res = self.import_one(input, opts).await;
                sweep(&self.paths, &self.state);
                Ok(ImportOutcome {
                    reports: vec![res?],
                    failures: vec![],
                })
            }
        }
    }

    /// Imports one input of the collection `root` (as [`Engine::import`] does for each).
    pub async fn import_item(
        &mut self,
        item: &Path,
        root: &Path,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        sets::load_files(&self.paths)?;
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
        let kind = if stream {
            SourceKind::BundleTar
        } else {
            SourceKind::BundleDir
        };
        let mut plan = plan_from_meta(digest, &meta, kind);
        plan.restore = opts.restore;
        let present = self.presence_of(&plan).await?;
        if !opts.hold && present.iter().all(|p| *p) {
            return self
                .commit(path, &mut plan, &present, None, None, None)
                .await;
        }
        // What is copied into the store is a private copy, made while it is verified.
        // longshore's own staged and retained copies are read in place.
        if !stream && !opts.hold && path.starts_with(&self.paths.state_dir) {
            let verified = read::verify_dir(path, opts.expected, &self.cancel, None)?;
            ensure_same(&verified, &digest, path)?;
            check_space(
                &[self.store_need(&plan, &present)],
                self.settings.store.min_free_space,
                path,
            )?;
            return self
                .commit(
                    path,
                    &mut plan,
                    &present,
                    Some(path),
                    Some(verified.bytes_verified),
                    None,
                )
                .await;
        }
        let needs = [
            self.store_need(&plan, &present),
            SpaceNeed {
                path: self.paths.staging_dir(),
                bytes: unique_bundle_bytes(&meta),
            },
        ];
        check_space(&needs, self.settings.store.min_free_space, path)?;
        let tmp = self.temp_staging()?;
        let verified = if stream {
            read::verify_stream(path, Some(&tmp), opts.expected, &self.cancel)
        } else {
            // Only what the missing images need is copied, unless the whole bundle is
            // kept (held, or retained to heal from).
            let keep = (!opts.hold && !self.settings.retain_bundles)
                .then(|| plan.blobs_of_missing(&meta, &present));
            Layout::create(&tmp, self.settings.store.min_free_space).and_then(|layout| {
                read::verify_dir(
                    path,
                    opts.expected,
                    &self.cancel,
                    Some((&layout, keep.as_ref())),
                )
            })
        };
        let verified = verified
            .and_then(|v| ensure_same(&v, &digest, path).map(|_| v))
            .inspect_err(|_| {
                let _ = fs::remove_dir_all(&tmp);
            })?;
        tracing::info!(
            bundle = %meta.name, digest = %digest,
            "verified {} images, {} hashed", meta.images.len(), human_size(verified.bytes_verified)
        );
        self.finish_staged(path, plan, present, tmp, verified.bytes_verified, opts.hold)
            .await
    }

    /// Sees which of the plan's images the store holds under all their names.
    async fn presence_of(&self, plan: &Plan) -> Result<Vec<bool>> {
        let names = self.store.names()?;
        Ok(plan
            .images
            .iter()
            .map(|i| names.holds(&i.wanted()))
            .collect())
    }

    /// Brings a foreign input into staging as a bundle (see [`crate::bundle::intake`]),
    /// then imports that bundle.
    async fn import_foreign(&mut self, f: Foreign, opts: &ImportOptions) -> Result<ImportReport> {
        let floor = self.settings.store.min_free_space;
        check_space(
            &[SpaceNeed {
                path: self.paths.staging_dir(),
                bytes: dir_size(&f.path)?,
            }],
            floor,
            &f.path,
        )?;
        let tmp = self.temp_staging()?;
        let res = async {
            let layout = Layout::create(&tmp, floor)?;
            let staged =
                intake::stage_foreign(&f, &layout, self.settings.pin_foreign, &self.cancel)?;
            check_expected(&f.path, &staged.digest, opts.expected)?;
            let mut plan = plan_from_meta(staged.digest, &staged.meta, f.kind);
            plan.restore = opts.restore;
            let present = self.presence_of(&plan).await?;
            anyhow::Ok((staged, plan, present))
        }
        .await;
        let (staged, mut plan, present) = res.inspect_err(|_| {
            let _ = fs::remove_dir_all(&tmp);
        })?;
        tracing::info!(input = %f.path.display(), "verified {} images, {} read", plan.images.len(), human_size(staged.bytes_read));
        if !opts.hold && present.iter().all(|p| *p) {
            let _ = fs::remove_dir_all(&tmp);
            return self
                .commit(&f.path, &mut plan, &present, None, None, None)
                .await;
        }
        if let Err(e) = check_space(&[self.store_need(&plan, &present)], floor, &f.path) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        self.finish_staged(&f.path, plan, present, tmp, staged.bytes_read, opts.hold)
            .await
    }

    /// After a bundle is verified into `tmp`: holds it, or copies its missing images into
    /// the store (keeping the copy when bundles are retained).
    async fn finish_staged(
        &mut self,
        source: &Path,
        mut plan: Plan,
        present: Vec<bool>,
        tmp: PathBuf,
        bytes_verified: u64,
        hold: bool,
    ) -> Result<ImportReport> {
        crate::cancel::fault_point("verified");
        let final_dir = self.paths.staging_dir().join(plan.digest.hex());
        if let Err(e) = replace_dir(&tmp, &final_dir) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if hold {
            return self.record_held(source, &plan, final_dir, bytes_verified);
        }
        let retain = self
            .settings
            .retain_bundles
            .then(|| Retain::Move(final_dir.clone()));
        let report = self
            .commit(
                source,
                &mut plan,
                &present,
                Some(&final_dir),
                Some(bytes_verified),
                retain,
            )
            .await;
        if final_dir.exists() {
            remove_staging(&final_dir);
        }
        report
    }

    /// Copies a held bundle's images into the store.
    pub async fn apply(&mut self, which: &str) -> Result<ImportReport> {
        sets::load_files(&self.paths)?;
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
        // The staged copy is longshore's own, verified when it was made; it is checked
        // again before it is used.
        let verified = read::verify_dir(&staged, Some(rec.digest), &self.cancel, None)?;
        let mut plan = plan_from_meta(verified.digest, &verified.meta, rec.kind);
        let present = self.presence_of(&plan).await?;
        check_space(
            &[self.store_need(&plan, &present)],
            self.settings.store.min_free_space,
            &staged,
        )?;
        let retain = self
            .settings
            .retain_bundles
            .then(|| Retain::Move(staged.clone()));
        let report = self
            .commit(
                &rec.source,
                &mut plan,
                &present,
                Some(&staged),
                Some(verified.bytes_verified),
                retain,
            )
            .await?;
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

    /// A fresh name for a bundle being verified into staging.
    fn temp_staging(&self) -> Result<PathBuf> {
        let dir = self.paths.staging_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let n = STAGING_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(dir.join(format!(".tmp-{}-{n}", std::process::id())))
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
    /// same layer at once (the second waits and then reuses it). Each image is copied
    /// once under its first name, which writes its layers; its other names (the digest
    /// name last) are then added by copies on a lane of their own, which write no layer
    /// and so run beside the next image's copy rather than after it.
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
        // The names each image still lacks: one an earlier, interrupted import gave it is
        // not copied again.
        let stored_names = self.store.names()?;
        let missing_names: Vec<Vec<String>> = todo
            .iter()
            .map(|img| {
                let all = img.wanted().names();
                let lacking: Vec<String> = all
                    .iter()
                    .filter(|n| stored_names.lookup(n) != Some(img.digest))
                    .cloned()
                    .collect();
                if lacking.is_empty() {
                    all
                } else {
                    lacking
                }
            })
            .collect();
        let missing_names = &missing_names;
        let (names_tx, names_rx) = std::sync::mpsc::channel::<usize>();
        // Read by the name lane alone; the lock only makes it shareable with the scope.
        let names_rx = Mutex::new(names_rx);
        let fail = |e: anyhow::Error, img: &PlannedImage| {
            let mut g = sched.lock().unwrap_or_else(|p| p.into_inner());
            g.failed
                .get_or_insert(e.context(format!("copying {}@{}", img.repository, img.digest)));
            wake.notify_all();
        };
        std::thread::scope(|s| {
            // The name lane: every name of an image but its first, the digest name last,
            // so the image counts as present only once it has them all.
            s.spawn(|| {
                let rx = names_rx.lock().unwrap_or_else(|p| p.into_inner());
                while let Ok(i) = rx.recv() {
                    let img = todo[i];
                    if sched
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .failed
                        .is_some()
                    {
                        continue;
                    }
                    let res = missing_names[i][1..]
                        .iter()
                        .try_for_each(|n| self.store.copy(&img.source, n));
                    if let Err(e) = res {
                        fail(e, img);
                        continue;
                    }
                    let mut g = sched.lock().unwrap_or_else(|p| p.into_inner());
                    if g.done == 0 {
                        crate::cancel::fault_point("copied-one");
                    }
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
            });
            let (sched, wake, todo, fail) = (&sched, &wake, &todo, &fail);
            let workers: Vec<_> = (0..jobs.min(total))
                .map(|_| {
                    let names_tx = names_tx.clone();
                    s.spawn(move || loop {
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
                                    todo[i].layers.iter().all(|l| {
                                        g.stored.contains(&l.0) || !g.busy.contains(&l.0)
                                    })
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
                        let res = self.store.copy(&img.source, &missing_names[i][0]);
                        {
                            let mut g = sched.lock().unwrap_or_else(|p| p.into_inner());
                            for d in &claimed {
                                g.busy.remove(d);
                            }
                            if res.is_ok() {
                                g.stored.extend(claimed);
                            }
                            wake.notify_all();
                        }
                        match res {
                            Ok(()) => {
                                let _ = names_tx.send(i);
                            }
                            Err(e) => fail(e, img),
                        }
                    })
                })
                .collect();
            drop(names_tx);
            for w in workers {
                let _ = w.join();
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
        crate::cancel::fault_point("recorded");

        let missing = present.iter().filter(|p| !**p).count();
        let replaced = plan.sets.iter().any(|s| {
            self.state
                .sets
                .get(&s.name)
                .is_some_and(|a| !a.previous.is_empty())
        });
        let mut copied = 0;
        let _marker = if missing > 0 {
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
            // The mark stays until the pins are written below: until then, a look from
            // outside sees the sets as still coming in, not as ready.
            self.busy.clear();
            copied = res?;
            crate::cancel::fault_point("copied");
            Some(marker)
        } else {
            None
        };
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
        crate::cancel::fault_point("imported");
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
            Some(&self.busy),
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
        for f in &other.wildcard {
            tracing::warn!(
                "{} pins \"*\", which makes CRI-O panic at start and on reload; longshore leaves it out of {}",
                f.display(),
                self.crio.pin_file().display()
            );
        }
        let mut pins = other.before;
        pins.extend(sets::pins(&views));
        // CRI-O panics on a bare "*" (see docs/crio.md); it is never written.
        pins.remove("*");
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

    /// Whether CRI-O is this host's to reload: not when `--sysroot` names another node's
    /// disk (prepared offline, the factory case), whose CRI-O reads the new files when
    /// that node boots; the running host's CRI-O on the system bus is never its CRI-O.
    fn crio_is_ours(&self) -> bool {
        let ours = self.paths.sysroot == Path::new("/") || self.settings.bus != Bus::System;
        if !ours {
            tracing::info!(
                "{} is not reloaded: {} is another node's root, whose CRI-O reads the files when it starts",
                self.settings.crio.unit,
                self.paths.sysroot.display()
            );
        }
        ours
    }

    /// Whether systemd is on the bus to reload CRI-O through; without it (a container, a
    /// machine not booted with systemd) the files are written and CRI-O reads them when
    /// it starts.
    async fn manager_present(&mut self) -> Result<bool> {
        let sd = self.systemd().await.with_context(|| {
            format!(
                "the pins are written to {}, but {} cannot be reloaded",
                self.crio.pin_file().display(),
                self.settings.crio.unit
            )
        })?;
        if sd.present().await {
            return Ok(true);
        }
        tracing::warn!(
            "systemd is not on the {} bus, so {} was not reloaded; CRI-O reads {} when it starts",
            self.settings.bus.name(),
            self.settings.crio.unit,
            self.crio.pin_file().display()
        );
        Ok(false)
    }

    async fn reload_crio(&mut self) -> Result<()> {
        let unit = self.settings.crio.unit.clone();
        if !self.settings.crio.reload {
            tracing::info!("{unit} not reloaded ([crio] reload = false)");
            return Ok(());
        }
        if !self.crio_is_ours() {
            return Ok(());
        }
        if !self.manager_present().await? {
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
        if !self.crio_is_ours() {
            return Ok(());
        }
        if !self.manager_present().await? {
            return Ok(());
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
                // CRI-O refuses to start when the directory a store option names is
                // missing: the drop-in is written only once it exists.
                anyhow::ensure!(
                    self.store.root.is_dir(),
                    "{} is missing, so CRI-O could not start with it as an image store",
                    self.store.root.display()
                );
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
            // Every retained copy is a bundle directory longshore wrote, foreign inputs
            // included (see crate::bundle::intake).
            let input: Result<Input> = Ok(Input::BundleDir(retained));
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
        let Retain::Move(p) = from;
        if p != dest {
            replace_dir(&p, &dest)?;
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

/// Removes what a longshore killed at any point left behind (called with the state lock
/// held, so no other import is using any of it): half-made staging directories, staged
/// bundles no held record names, temporary state files, skopeo's temporary files.
fn sweep(paths: &HostPaths, state: &State) {
    let held: HashSet<PathBuf> = state
        .bundles
        .values()
        .filter_map(|b| b.staged.clone())
        .collect();
    let alive = |pid: &str| {
        pid.parse::<i32>()
            .is_ok_and(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok())
    };
    let remove = |p: &Path| {
        let res = if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(p)
        } else {
            fs::remove_file(p)
        };
        match res {
            Ok(()) => tracing::info!("removed {}, left by an interrupted run", p.display()),
            Err(e) => tracing::warn!("removing {}: {e}", p.display()),
        }
    };
    let entries = |d: &Path| -> Vec<(String, PathBuf)> {
        fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (name, p) in entries(&paths.staging_dir()) {
        let stale = if let Some(rest) = name.strip_prefix(".verify-") {
            // `longshore verify` takes no lock; its directory goes once it is gone.
            !alive(rest.split('-').next().unwrap_or(""))
        } else {
            name.starts_with(".tmp-") || !held.contains(&p)
        };
        if stale {
            remove(&p);
        }
    }
    for (name, p) in entries(&paths.state_dir) {
        if name.starts_with(".state.json.tmp") {
            remove(&p);
        }
    }
    for (name, p) in entries(&paths.state_dir.join("bundles")) {
        if name.starts_with(".tmp-") {
            remove(&p);
        }
    }
    for (_, p) in entries(&paths.state_dir.join("tmp")) {
        remove(&p);
    }
}

/// Where a retained copy comes from.
enum Retain {
    /// A staged, verified layout, moved into place.
    Move(PathBuf),
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
///
/// `busy` is what the caller is importing itself, when it holds the state lock (then no
/// other process imports); without it, the mark an importing process leaves is read.
pub async fn evaluate_sets(
    paths: &HostPaths,
    settings: &Settings,
    state: &State,
    store: &Store,
    busy: Option<&std::collections::BTreeSet<String>>,
) -> Result<(Vec<SetView>, crate::crio::OtherPins)> {
    let files = sets::load_files(paths)?;
    let defs = sets::effective(state, files);
    let other = crio_config(paths).other_pins()?;
    let importing = match busy {
        Some(b) => b.clone(),
        None => busy_elsewhere(paths),
    };
    let activity = Activity {
        importing,
        overriding: other.overriding.clone(),
    };
    if defs.is_empty() {
        return Ok((vec![], other));
    }
    let _ = settings;
    let views = sets::evaluate(&defs, state, &store.names()?, &activity);
    Ok((views, other))
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

/// Verifies a bundle without importing it. Foreign inputs are brought into a temporary
/// staging directory under `paths` to be checked (see [`crate::bundle::intake`]), and it
/// is removed again.
pub async fn verify(
    path: &Path,
    expected: Option<Digest>,
    settings: &Settings,
    paths: &HostPaths,
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
            Input::BundleDir(d) => {
                VerifyReport::from(&d, read::verify_dir(&d, expected, cancel, None)?)
            }
            Input::BundleStream(p) => {
                VerifyReport::from(&p, read::verify_stream(&p, None, expected, cancel)?)
            }
            Input::Foreign(f) => {
                // Where longshore's staging cannot be made (a user's machine, not root),
                // the system's temporary directory takes its place.
                let mut dir = paths.staging_dir();
                if let Err(e) = fs::create_dir_all(&dir) {
                    let tmp = std::env::temp_dir();
                    tracing::warn!(
                        "creating {}: {e}; unpacking into {} to verify",
                        dir.display(),
                        tmp.display()
                    );
                    dir = tmp;
                }
                let n = STAGING_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let tmp = dir.join(format!(".verify-{}-{n}", std::process::id()));
                let res = Layout::create(&tmp, settings.store.min_free_space)
                    .and_then(|l| intake::stage_foreign(&f, &l, settings.pin_foreign, cancel));
                let _ = fs::remove_dir_all(&tmp);
                let staged = res?;
                check_expected(&f.path, &staged.digest, expected)?;
                VerifyReport {
                    path: f.path.clone(),
                    digest: staged.digest,
                    name: staged.meta.name,
                    images: staged.meta.images.len(),
                    bytes_verified: staged.bytes_read,
                }
            }
            Input::Collection(d, _) => {
                bail!("{}: nested collections are not verified", d.display())
            }
        });
    }
    Ok(out)
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
