//! Sets fetched from registries: which images they still want, and copying what the
//! cache holds whole into the store (the fetching itself is [`crate::fetch`]).

use super::*;
use crate::fetch::{Board, Outcome, Want};
use crate::store::copy::CopyJob;

/// The images that sets which fetch (set files, unless `fetch = false`) lack in the store
/// and that the cache does not hold whole, with the sets wanting each. `only` limits it
/// to the sets named; a name no fetching set has is an error.
pub fn wanted(paths: &HostPaths, views: &[SetView], only: &[String]) -> Result<Vec<Want>> {
    let files = sets::load_files(paths)?;
    let fetching: HashSet<&str> = files
        .iter()
        .filter(|f| f.fetch)
        .map(|f| f.name.as_str())
        .collect();
    for n in only {
        if !fetching.contains(n.as_str()) {
            return Err(crate::error::NotFound(format!(
                "no set file {n}.toml that fetches; `longshore sets` lists the sets (a bundle's sets come with it, and a file may say fetch = false)"
            ))
            .into());
        }
    }
    let cache = Cache::new(paths.cache_dir());
    let index = cache.index_by_name();
    let mut by_ref: std::collections::BTreeMap<String, Want> = Default::default();
    for v in views {
        if !fetching.contains(v.name.as_str()) || (!only.is_empty() && !only.contains(&v.name)) {
            continue;
        }
        for r in &v.missing {
            if index
                .get(r)
                .is_some_and(|e| cache.complete_entry(e.clone()).is_some())
            {
                continue;
            }
            by_ref
                .entry(r.clone())
                .or_insert_with(|| Want {
                    reference: r.clone(),
                    sets: Default::default(),
                })
                .sets
                .insert(v.name.clone());
        }
    }
    Ok(by_ref.into_values().collect())
}

/// Refuses a fetch an administrator asks for when the node's configuration turns
/// fetching off: such a node is not to contact registries at all.
pub fn check_enabled(settings: &Settings) -> Result<()> {
    anyhow::ensure!(
        settings.fetch.enabled,
        "fetching from registries is turned off on this node ([fetch] enabled = false); its set files' images come from bundles"
    );
    Ok(())
}

/// Reads the payload of every release a set file names whose release image the cache now
/// holds whole (fetched, or brought by a bundle) and whose payload is not known yet.
/// Returns how many were read; one that cannot be read is logged and left pending.
pub fn expand_releases(paths: &HostPaths) -> usize {
    let Ok(files) = sets::load_files(paths) else {
        return 0;
    };
    let cache = Cache::new(paths.cache_dir());
    let mut n = 0;
    for f in files.iter().filter(|f| f.pending.is_some()) {
        let Some(r) = &f.release else { continue };
        if cache.complete(r).is_none() {
            tracing::debug!("set {}: release {r} is not in the cache whole yet", f.name);
            continue;
        }
        match crate::release::expand(paths, &cache, r) {
            Ok(_) => n += 1,
            Err(e) => tracing::error!("set {}: {e:#}", f.name),
        }
    }
    n
}

/// What `longshore fetch` did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FetchReport {
    /// The fetch itself.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Images copied into the store from the cache afterwards.
    pub imported: usize,
    /// The sets fetched for, as they are now.
    pub sets: Vec<SetView>,
    /// Images those sets still lack in the store.
    pub missing: usize,
    /// The report for people.
    pub text: String,
}

impl FetchReport {
    /// The report of a fetch of `wants` for the sets `only`, from the sets' state
    /// `before` it and `after` the import that followed.
    pub fn new(
        outcome: Outcome,
        before: &[SetView],
        after: Vec<SetView>,
        wants: &[Want],
        only: &[String],
    ) -> FetchReport {
        let was: usize = before.iter().map(|v| v.missing.len()).sum();
        let now: usize = after.iter().map(|v| v.missing.len()).sum();
        let names: HashSet<&String> = wants.iter().flat_map(|w| w.sets.iter()).collect();
        let sets: Vec<SetView> = after
            .into_iter()
            .filter(|v| names.contains(&v.name) || only.contains(&v.name))
            .collect();
        let mut r = FetchReport {
            outcome,
            imported: was.saturating_sub(now),
            missing: sets.iter().map(|v| v.missing.len()).sum(),
            sets,
            text: String::new(),
        };
        r.text = r.render();
        r
    }

    /// Lines for people.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(m) = self.outcome.waiting_minutes {
            s += &format!(
                "outside the fetch windows; the next opens in {m} min (nothing fetched)\n"
            );
        }
        s += &format!(
            "fetched {} images ({} received, {} in all), {} copied into the store\n",
            self.outcome.fetched.len(),
            human_size(self.outcome.downloaded),
            human_size(self.outcome.total),
            self.imported
        );
        for (r, f) in &self.outcome.failures {
            s += &format!("  {r}: {} ({})\n", f.message, f.reason.name());
        }
        for v in &self.sets {
            let ready = v.missing.is_empty();
            s += &format!(
                "set {}: {}\n",
                v.name,
                if ready {
                    format!("all {} images present", v.images.len())
                } else {
                    format!("{} of {} images missing", v.missing.len(), v.images.len())
                }
            );
        }
        s
    }
}

impl Engine {
    /// Fetches what the sets `only` (every fetching set when empty) lack, then copies it
    /// into the store and pins it: `longshore fetch` without the daemon. Images are
    /// copied into the store as they come in whole, while the rest are fetched.
    pub async fn fetch(
        &mut self,
        only: &[String],
        opts: &crate::fetch::Options,
        on_board: &(dyn Fn(&Board) + Send + Sync),
    ) -> Result<FetchReport> {
        check_enabled(&self.settings)?;
        let views = self.sync().await?;
        let mut wants = wanted(&self.paths, &views, only)?;
        let earlier = Board::read(&self.paths)
            .map(|b| b.failures)
            .unwrap_or_default();
        let mut outcome = self
            .fetch_importing(&wants, opts, &earlier, on_board)
            .await?;
        // A release's payload is known once its image is in: then that is fetched too.
        if expand_releases(&self.paths) > 0 {
            let views = self.sync().await?;
            let more = wanted(&self.paths, &views, only)?;
            let failures = outcome.failures.clone();
            let next = self
                .fetch_importing(&more, opts, &failures, on_board)
                .await?;
            outcome.merge(next);
            wants.extend(more);
        }
        let after = self.heal().await?;
        Board::clear(&self.paths);
        Ok(FetchReport::new(outcome, &views, after, &wants, only))
    }

    /// Fetches `wants` on a task of its own while this thread copies each image into the
    /// store as soon as the cache holds it whole (pins follow once a set is complete, in
    /// the heal after the fetch).
    async fn fetch_importing(
        &mut self,
        wants: &[Want],
        opts: &crate::fetch::Options,
        earlier: &std::collections::BTreeMap<String, crate::fetch::Failure>,
        on_board: &(dyn Fn(&Board) + Send + Sync),
    ) -> Result<Outcome> {
        let (boards_tx, boards) = std::sync::mpsc::channel::<Board>();
        let (whole_tx, whole) = std::sync::mpsc::channel::<String>();
        let task = {
            let (paths, settings, cancel) = (
                self.paths.clone(),
                self.settings.clone(),
                self.cancel.clone(),
            );
            let (wants, opts, earlier) = (wants.to_vec(), opts.clone(), earlier.clone());
            tokio::spawn(async move {
                let board = move |b: &Board| {
                    let _ = boards_tx.send(b.clone());
                };
                let image = move |r: &str| {
                    let _ = whole_tx.send(r.to_string());
                };
                let hooks = crate::fetch::Hooks {
                    board: &board,
                    image: &image,
                };
                crate::fetch::fetch(&paths, &settings, &wants, &opts, &earlier, &cancel, &hooks)
                    .await
            })
        };
        // Both channels close when the fetch is over and its hooks are gone.
        let copied = tokio::task::block_in_place(|| {
            std::thread::scope(|s| {
                s.spawn(move || {
                    for b in boards {
                        on_board(&b);
                    }
                });
                self.copy_as_whole(whole)
            })
        });
        match copied {
            Ok(0) => {}
            Ok(n) => tracing::info!("{n} fetched images copied into the store as they came in"),
            // What is left is copied again after the fetch.
            Err(e) => tracing::warn!("copying fetched images into the store: {e:#}"),
        }
        task.await
            .map_err(|e| anyhow::anyhow!("the fetch task failed: {e}"))
    }

    /// Copies into the store each image `whole` names as it comes (the cache holds it
    /// whole then), with `[import] jobs` copies at once, until `whole` closes.
    fn copy_as_whole(&self, whole: std::sync::mpsc::Receiver<String>) -> Result<usize> {
        let views = self
            .paths
            .staging_dir()
            .join(format!(".tmp-views-{}-fetch", std::process::id()));
        let _ = fs::remove_dir_all(&views);
        let stored = self.store.names()?;
        let (jobs_tx, jobs) = std::sync::mpsc::channel();
        let cache = &self.cache;
        let on_copied = |job: &CopyJob, c: crate::store::copy::Copied| {
            tracing::info!(
                "{} copied into the store ({} fetched images so far)",
                job.label,
                c.done
            );
        };
        let res = std::thread::scope(|s| {
            let (views, stored) = (&views, &stored);
            s.spawn(move || {
                // A name is given once, whichever reference of the image came first.
                let mut given = HashSet::new();
                for (n, r) in whole.into_iter().enumerate() {
                    match whole_job(cache, &r, &views.join(n.to_string()), stored, &mut given) {
                        Ok(Some(job)) => {
                            if jobs_tx.send(job).is_err() {
                                break;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!("{r}: {e:#}"),
                    }
                }
            });
            crate::store::copy::copy_all(
                &self.store,
                crate::store::copy::Feed::Stream(jobs),
                self.settings.import_jobs,
                HashSet::new(),
                &self.cancel,
                &on_copied,
            )
        });
        let _ = fs::remove_dir_all(&views);
        res
    }

    /// Copies into the store the images sets lack that the cache holds whole under the
    /// name the set gives (fetched from registries), then brings the pins in line.
    /// Returns the sets' state afterwards when anything was copied.
    pub(super) async fn import_named(&mut self, views: &[SetView]) -> Result<Option<Vec<SetView>>> {
        // One copy per repository and digest: the same image under two repositories is
        // stored under both names.
        let mut by_digest: HashMap<(String, Digest), PlannedImage> = HashMap::new();
        let mut sets_of: std::collections::BTreeSet<String> = Default::default();
        let index = self.cache.index_by_name();
        for v in views {
            for r in &v.missing {
                let Some(cached) = index
                    .get(r)
                    .and_then(|e| self.cache.complete_entry(e.clone()))
                else {
                    continue;
                };
                let img = planned_from_cache(r, &cached);
                sets_of.insert(v.name.clone());
                let e = by_digest
                    .entry((img.repository.clone(), img.digest))
                    .or_insert(img);
                if let Ok((_, crate::oci::reference::Tail::Tag(tag))) =
                    crate::oci::reference::parse(r)
                {
                    if !e.tags.contains(&tag) {
                        e.tags.push(tag);
                    }
                }
            }
        }
        if by_digest.is_empty() {
            return Ok(None);
        }
        let mut plan = Plan {
            restore: true,
            fetched: true,
            digest: Digest::of(b"fetched"),
            name: format!(
                "set{} {}",
                if sets_of.len() > 1 { "s" } else { "" },
                sets_of.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
            version: None,
            kind: SourceKind::OciLayout,
            images: by_digest.into_values().collect(),
            sets: vec![],
        };
        let present = vec![false; plan.images.len()];
        check_space(
            &[self.store_need(&plan, &present)],
            self.settings.store.min_free_space,
            self.cache.root(),
        )?;
        tracing::info!(
            "importing {} images of {} from the cache",
            plan.images.len(),
            plan.name
        );
        self.busy = sets_of;
        let marker = Busy::mark(&self.paths, &self.busy);
        let root = self.cache.root().to_path_buf();
        let res = tokio::task::block_in_place(|| self.copy_from_layout(&mut plan, &present, &root));
        self.busy.clear();
        let copied = res?;
        // The mark stays until the pins are written: until then, a look from outside
        // sees the sets as still coming in.
        let views = self.sync().await?;
        drop(marker);
        tracing::info!(
            message_id = crate::systemd::message_id::BUNDLE_IMPORTED,
            "{} imported from the cache: {copied} images copied",
            plan.name
        );
        Ok(Some(views))
    }
}

/// The copy of the image `reference` names, which the cache holds whole, through a `dir:`
/// view at `view`: under the names `stored` lacks and no earlier job was `given`.
fn whole_job(
    cache: &Cache,
    reference: &str,
    view: &Path,
    stored: &crate::store::StoredNames,
    given: &mut HashSet<String>,
) -> Result<Option<CopyJob>> {
    let cached = cache
        .complete(reference)
        .context("the cache does not hold it whole")?;
    let mut img = planned_from_cache(reference, &cached);
    if let Ok((_, crate::oci::reference::Tail::Tag(tag))) = crate::oci::reference::parse(reference)
    {
        img.tags.push(tag);
    }
    let names: Vec<String> = img
        .wanted()
        .names()
        .into_iter()
        .filter(|n| stored.lookup(n) != Some(img.digest))
        .filter(|n| given.insert(n.clone()))
        .collect();
    if names.is_empty() {
        return Ok(None);
    }
    let blobs = cache.root().join("blobs/sha256");
    let blobs = blobs
        .canonicalize()
        .with_context(|| format!("resolving {}", blobs.display()))?;
    let layers: Vec<Digest> = cached.layers.iter().map(|l| l.0).collect();
    let of = crate::cache::ViewOf {
        manifest: &cached.manifest,
        list: cached.list.as_ref(),
        config: &cached.config.0,
        layers: &layers,
    };
    crate::cache::write_dir_view(&blobs, &of, view)?;
    Ok(Some(CopyJob {
        source: format!("dir:{}", view.display()),
        names,
        layers,
        size: img.size,
        label: format!("{}@{}", img.repository, img.digest),
    }))
}

/// The image `reference` names, as the cache holds it, for copying.
fn planned_from_cache(reference: &str, cached: &crate::cache::CachedImage) -> PlannedImage {
    let compressed: u64 = cached.layers.iter().map(|l| l.1).sum();
    let overhead = cached.manifest_len + cached.config.1;
    PlannedImage {
        source: String::new(),
        repository: crate::registry::client::repository_of(reference),
        tags: vec![],
        // The list's digest, when the name gives a list: the store knows the image by
        // it, as when CRI-O pulls by the list.
        digest: cached.entry.digest,
        media_type: cached.entry.media_type.clone(),
        size: overhead + compressed,
        // As OpenShift estimates a pull: twice the compressed size.
        layers: cached
            .layers
            .iter()
            .map(|(d, s)| (*d, s.saturating_mul(2)))
            .collect(),
        overhead,
        config: Some(cached.config.0),
        instance: cached.list.map(|_| cached.manifest),
    }
}
