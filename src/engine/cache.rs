//! The cache's side of the engine: verified layouts moved into the cache, bundles read
//! back from it, what references what, collection, and migration from retained copies.

use super::*;
use crate::bundle::format::MAX_BUNDLE_JSON;
use crate::cache::gc::{self, Collected, Limits};
use crate::cache::{IndexEntry, REF_NAME};

/// What the cache holds and what references it, for `longshore cache`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheReport {
    /// Its directory.
    pub path: PathBuf,
    /// Bytes of its blobs and partial blobs.
    pub bytes: u64,
    /// The size cap beyond which unreferenced blobs are evicted.
    pub max_size: u64,
    /// Complete blobs.
    pub blobs: usize,
    /// Partial blobs (being written, or left to resume).
    pub partials: usize,
    /// Bytes of the partial blobs.
    pub partial_bytes: u64,
    /// Blobs something references.
    pub referenced_blobs: usize,
    /// Bytes of those.
    pub referenced_bytes: u64,
    /// Images the index names, by full reference.
    pub images: Vec<String>,
    /// Bundles the cache holds whole, and why they are kept.
    pub bundles: Vec<CachedBundle>,
}

/// A bundle the cache holds.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedBundle {
    /// Its name.
    pub name: String,
    /// Its digest.
    pub digest: Digest,
    /// Bytes of its blobs (each counted once).
    pub bytes: u64,
    /// Why its blobs stay: the sets in force it brought, `held`, `recent import`; empty
    /// when nothing keeps it.
    pub referenced_by: Vec<String>,
}

impl CacheReport {
    /// For people.
    pub fn render(&self) -> String {
        let mut s = format!(
            "cache {}: {} in {} blobs ({} referenced, {}), cap {}\n",
            self.path.display(),
            human_size(self.bytes),
            self.blobs,
            self.referenced_blobs,
            human_size(self.referenced_bytes),
            human_size(self.max_size),
        );
        if self.partials > 0 {
            s += &format!(
                "  {} partial blobs, {} (resumed when next written)\n",
                self.partials,
                human_size(self.partial_bytes)
            );
        }
        s += &format!("  {} images named\n", self.images.len());
        for b in &self.bundles {
            let why = if b.referenced_by.is_empty() {
                "unreferenced: evicted first when the cache is over its cap".to_string()
            } else {
                format!("kept for {}", b.referenced_by.join(", "))
            };
            s += &format!(
                "  bundle {} ({}), {}: {why}\n",
                b.name,
                b.digest,
                human_size(b.bytes)
            );
        }
        s
    }
}

/// The cache with the records that say what references it: what `longshore cache` and
/// the daemon's `Cache` method read, without the state lock.
pub struct CacheView<'a> {
    paths: &'a HostPaths,
    cache: &'a Cache,
    state: &'a State,
    settings: &'a Settings,
}

/// What the cache of the node at `paths` holds, read without taking the state lock.
pub fn cache_report(paths: &HostPaths, settings: &Settings) -> Result<CacheReport> {
    let state = State::load(&paths.state_dir)?;
    let cache = Cache::new(paths.cache_dir());
    CacheView {
        paths,
        cache: &cache,
        state: &state,
        settings,
    }
    .report()
}

impl Engine {
    fn view(&self) -> CacheView<'_> {
        CacheView {
            paths: &self.paths,
            cache: &self.cache,
            state: &self.state,
            settings: &self.settings,
        }
    }

    /// What the cache holds and what references it.
    pub fn cache_report(&self) -> Result<CacheReport> {
        self.view().report()
    }

    pub(super) fn cached_meta(&self, digest: &Digest) -> Result<Option<BundleMeta>> {
        self.view().cached_meta(digest)
    }

    pub(super) fn cache_holds(&self, meta: &BundleMeta) -> bool {
        self.view().holds(meta)
    }

    /// Moves a verified staging layout into the cache: each blob by renaming it (one the
    /// cache has already is dropped), `bundle.json` and `index.json` as blobs, and every
    /// name of every image into the cache's index. The staging directory is removed.
    pub(super) fn cache_layout(&mut self, staged: &Path, plan: &Plan) -> Result<()> {
        self.cache.ensure()?;
        let res = (|| {
            let blobs = staged.join("blobs/sha256");
            let mut n = 0usize;
            for e in fs::read_dir(&blobs).with_context(|| format!("reading {}", blobs.display()))? {
                let e = e.with_context(|| format!("reading {}", blobs.display()))?;
                let Some(d) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| Digest::from_hex(n).ok())
                else {
                    continue;
                };
                self.cache.adopt(&e.path(), &d)?;
                n += 1;
                if n == 1 {
                    crate::cancel::fault_point("cached-one");
                }
            }
            for doc in [BUNDLE_JSON, "index.json"] {
                let p = staged.join(doc);
                let bytes = crate::untrusted::read_admin_file(&p, MAX_BUNDLE_JSON)?;
                self.cache.put_bytes(&bytes)?;
            }
            self.name_in_cache(plan)
        })();
        remove_staging(staged);
        res?;
        if let Some(b) = self.state.bundles.get_mut(&plan.digest) {
            b.cached = true;
        }
        Ok(())
    }

    /// Names the plan's images in the cache's index.
    fn name_in_cache(&self, plan: &Plan) -> Result<()> {
        let mut entries = Vec::new();
        for img in &plan.images {
            let size = self
                .cache
                .has(&img.digest)
                .with_context(|| format!("the cache lacks the manifest of {}", img.repository))?;
            for name in img.record().names {
                entries.push(IndexEntry {
                    media_type: img.media_type.clone(),
                    digest: img.digest,
                    size,
                    annotations: [(REF_NAME.to_string(), name)].into(),
                });
            }
        }
        self.cache.name_images(&entries)
    }

    /// What verifying `meta` into the cache takes on the cache's filesystem: the blobs
    /// it does not hold yet, each once.
    pub(super) fn cache_need(&self, meta: &BundleMeta) -> SpaceNeed {
        let bytes = read::declared_blobs(meta)
            .iter()
            .filter(|(d, _)| self.cache.has(d).is_none())
            .map(|(_, s)| *s)
            .sum::<u64>()
            + meta.index.size;
        SpaceNeed {
            path: self.cache.root().to_path_buf(),
            bytes,
        }
    }

    /// The blobs the cache does not hold: what verification must write.
    pub(super) fn not_cached(&self, meta: &BundleMeta) -> HashSet<Digest> {
        read::declared_blobs(meta)
            .into_keys()
            .filter(|d| self.cache.has(d).is_none())
            .collect()
    }

    /// Imports bundle `digest` from the cache alone: held bundles on `apply`, and lost
    /// images on heal (`restore`).
    pub(super) async fn import_from_cache(
        &mut self,
        digest: &Digest,
        restore: bool,
    ) -> Result<ImportReport> {
        let rec = self
            .state
            .bundles
            .get(digest)
            .cloned()
            .with_context(|| format!("bundle {digest} is not known"))?;
        let meta = self
            .cached_meta(digest)?
            .filter(|m| self.cache_holds(m))
            .with_context(|| {
                format!(
                    "the cache no longer holds every blob of bundle {} ({digest})",
                    rec.name
                )
            })?;
        let mut plan = plan_from_meta(*digest, &meta, rec.kind);
        plan.restore = restore;
        let present = self.presence_of(&plan).await?;
        check_space(
            &[self.store_need(&plan, &present)],
            self.settings.store.min_free_space,
            self.cache.root(),
        )?;
        // skopeo checks every blob's digest as it copies, so a blob the disk damaged
        // fails its copy rather than entering the store.
        let root = self.cache.root().to_path_buf();
        self.commit(&rec.source, &mut plan, &present, Some(&root), None)
            .await
    }

    /// Evicts unreferenced blobs beyond the cap, oldest first, and while the cache's
    /// filesystem has less free space than the store's floor.
    pub fn collect_cache(&mut self) -> Result<Collected> {
        let referenced = self.view().referenced_blobs()?;
        let limits = Limits {
            max_size: self.view().cap(),
            min_free: self.settings.store.min_free_space,
        };
        let out = gc::collect(&self.cache, &referenced, limits, &free_space)?;
        if out.evicted > 0 {
            let mut changed = false;
            let digests: Vec<Digest> = self.state.bundles.keys().copied().collect();
            for d in digests {
                let whole = self.cached_meta(&d)?.is_some_and(|m| self.cache_holds(&m));
                if let Some(b) = self.state.bundles.get_mut(&d) {
                    if b.cached != whole {
                        b.cached = whole;
                        changed = true;
                    }
                }
            }
            if changed {
                self.state.save(&self.paths.state_dir)?;
            }
            tracing::info!(
                "cache collected: {} blobs evicted, {} freed, {} left",
                out.evicted,
                human_size(out.freed),
                human_size(out.bytes)
            );
        }
        Ok(out)
    }

    /// Collects after an import; a failure is logged, not returned (the import is done).
    pub(super) fn collect_quietly(&mut self) {
        if let Err(e) = self.collect_cache() {
            tracing::warn!("collecting the cache: {e:#}");
        }
    }

    /// Moves the bundle copies of the layout before the cache (retained copies in
    /// `bundles/`, held bundles' staged copies) into the cache, once: blobs are renamed,
    /// not copied. A copy that cannot be moved is left where it is and logged.
    pub(super) fn migrate_to_cache(&mut self) -> Result<()> {
        let old: Vec<(Digest, PathBuf)> = self
            .state
            .bundles
            .values()
            .flat_map(|b| {
                [b.retained.clone(), b.staged.clone()]
                    .into_iter()
                    .flatten()
                    .map(|p| (b.digest, p))
            })
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        for (digest, dir) in old {
            if dir.is_dir() {
                // longshore wrote these copies from verified bundles; they are checked
                // again as they are moved, so a damaged one is not brought in.
                let res = read::verify_dir(&dir, Some(digest), &self.cancel, None).and_then(|v| {
                    let plan = plan_from_meta(digest, &v.meta, SourceKind::BundleDir);
                    tracing::info!(
                        "moving the copy of bundle {} in {} into the cache",
                        plan.name,
                        dir.display()
                    );
                    self.cache_layout(&dir, &plan)
                });
                if let Err(e) = res {
                    tracing::warn!("moving {} into the cache: {e:#}", dir.display());
                    continue;
                }
            }
            if let Some(b) = self.state.bundles.get_mut(&digest) {
                b.retained = None;
                b.staged = None;
            }
        }
        self.state.save(&self.paths.state_dir)?;
        let old_dir = self.paths.state_dir.join("bundles");
        let _ = fs::remove_dir(old_dir);
        Ok(())
    }
}

impl CacheView<'_> {
    /// The metadata of bundle `digest`, when the cache has its `bundle.json`.
    pub fn cached_meta(&self, digest: &Digest) -> Result<Option<BundleMeta>> {
        if self.cache.has(digest).is_none() {
            return Ok(None);
        }
        let bytes = self.cache.read(digest, MAX_BUNDLE_JSON)?;
        let (_, meta) = read::parse_meta(&self.cache.blob(digest), &bytes)?;
        Ok(Some(meta))
    }

    /// Whether the cache holds every blob of `meta` (and its index).
    pub fn holds(&self, meta: &BundleMeta) -> bool {
        self.cache.has(&meta.index.digest).is_some()
            && read::declared_blobs(meta)
                .iter()
                .all(|(d, size)| self.cache.has(d) == Some(*size))
    }

    /// The blobs something keeps in the cache: every blob of the bundles whose sets are
    /// in force, of held bundles, and of bundles imported within `[cache]
    /// keep_imported`; and every blob of an image a set in force or a set file names,
    /// where the cache's index has that name.
    pub fn referenced_blobs(&self) -> Result<HashSet<Digest>> {
        let mut out = HashSet::new();
        for (digest, _) in self.keeping_bundles() {
            if let Some(meta) = self.cached_meta(&digest)? {
                out.insert(digest);
                out.insert(meta.index.digest);
                out.extend(read::declared_blobs(&meta).into_keys());
            }
        }
        let index = self.cache.index()?;
        // Set files too: a set file may name images a bundle brought. One that cannot be
        // read references nothing (it is reported where sets are shown).
        let files = sets::load_files(self.paths).unwrap_or_default();
        let names: HashSet<&str> = self
            .state
            .sets
            .values()
            .flat_map(|s| s.images.iter().map(String::as_str))
            .chain(
                files
                    .iter()
                    .flat_map(|f| f.images.iter().map(String::as_str)),
            )
            .collect();
        for e in index
            .iter()
            .filter(|e| e.name().is_some_and(|n| names.contains(n)))
        {
            if out.contains(&e.digest) {
                continue;
            }
            // A list keeps the manifests of its images the cache holds, and their blobs.
            out.extend(self.cache.closure(&e.digest));
        }
        Ok(out)
    }

    /// The bundles whose blobs stay, each with why.
    fn keeping_bundles(&self) -> Vec<(Digest, Vec<String>)> {
        let now = now();
        self.state
            .bundles
            .values()
            .filter_map(|b| {
                let mut why: Vec<String> = self
                    .state
                    .sets
                    .values()
                    .filter(|s| s.bundle == b.digest)
                    .map(|s| format!("set {}", s.name))
                    .collect();
                if b.state == BundleState::Held {
                    why.push("held".into());
                }
                if b.state == BundleState::Importing {
                    why.push("an unfinished import".into());
                }
                if now.saturating_sub(b.updated) < self.settings.cache_keep_imported {
                    why.push("recent import".into());
                }
                (!why.is_empty()).then_some((b.digest, why))
            })
            .collect()
    }

    /// The cap: `[cache] max_size`, or a quarter of the cache's filesystem.
    pub fn cap(&self) -> u64 {
        self.settings
            .cache_max_size
            .unwrap_or_else(|| fs_size(self.cache.root()).map_or(u64::MAX, |s| s / 4))
    }

    /// What the cache holds and what references it.
    pub fn report(&self) -> Result<CacheReport> {
        let listing = self.cache.list()?;
        let referenced = self.referenced_blobs()?;
        let keeping: HashMap<Digest, Vec<String>> = self.keeping_bundles().into_iter().collect();
        let mut bundles = Vec::new();
        for b in self.state.bundles.values() {
            let Some(meta) = self.cached_meta(&b.digest)? else {
                continue;
            };
            if !self.holds(&meta) {
                continue;
            }
            bundles.push(CachedBundle {
                name: b.name.clone(),
                digest: b.digest,
                bytes: read::declared_blobs(&meta).values().sum(),
                referenced_by: keeping.get(&b.digest).cloned().unwrap_or_default(),
            });
        }
        let in_use: Vec<_> = listing
            .blobs
            .iter()
            .filter(|b| referenced.contains(&b.digest))
            .collect();
        Ok(CacheReport {
            path: self.cache.root().to_path_buf(),
            bytes: listing.bytes(),
            max_size: self.cap(),
            blobs: listing.blobs.len(),
            partials: listing.partials.len(),
            partial_bytes: listing.partials.iter().map(|p| p.1).sum(),
            referenced_blobs: in_use.len(),
            referenced_bytes: in_use.iter().map(|b| b.size).sum(),
            images: self
                .cache
                .index()?
                .iter()
                .filter_map(|e| e.name().map(str::to_string))
                .collect(),
            bundles,
        })
    }
}

fn free_space(p: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(p).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

fn fs_size(p: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(p).ok()?;
    Some(st.blocks() as u64 * st.fragment_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::testkit;
    use crate::state::{ActiveSet, BundleRecord};

    /// A bundle of `images` moved into `cache` as the engine does, and its record.
    fn cached(
        t: &Path,
        cache: &Cache,
        name: &str,
        images: &[(&str, Vec<Vec<u8>>)],
        state: BundleState,
    ) -> (BundleRecord, BundleMeta) {
        let work = t.join(name);
        let dir = work.join("bundle");
        let (digest, meta) = testkit::bundle(&work, &dir, images);
        cache.ensure().expect("ensure");
        for e in fs::read_dir(dir.join("blobs/sha256"))
            .expect("read")
            .flatten()
        {
            let d = Digest::from_hex(&e.file_name().to_string_lossy()).expect("digest");
            cache.adopt(&e.path(), &d).expect("adopt");
        }
        for doc in [BUNDLE_JSON, "index.json"] {
            cache
                .put_bytes(&fs::read(dir.join(doc)).expect("read"))
                .expect("put");
        }
        let plan = plan_from_meta(digest, &meta, SourceKind::BundleDir);
        let entries: Vec<IndexEntry> = plan
            .images
            .iter()
            .flat_map(|i| {
                i.record().names.into_iter().map(|n| IndexEntry {
                    media_type: i.media_type.clone(),
                    digest: i.digest,
                    size: 1,
                    annotations: [(REF_NAME.to_string(), n)].into(),
                })
            })
            .collect();
        cache.name_images(&entries).expect("name");
        let rec = BundleRecord {
            cached: true,
            ..BundleRecord::for_test(digest, name, state)
        };
        (rec, meta)
    }

    #[test]
    fn sets_in_force_and_held_bundles_reference_their_blobs_and_nothing_else_does() {
        let t = tempfile::tempdir().expect("tempdir");
        let paths = HostPaths::new(&t.path().join("root"));
        let cache = Cache::new(paths.cache_dir());
        let shared = vec![9u8; 4000];
        let (a, a_meta) = cached(
            t.path(),
            &cache,
            "a",
            &[("example.com/a:1", vec![shared.clone(), vec![1u8; 100]])],
            BundleState::Imported,
        );
        let (h, h_meta) = cached(
            t.path(),
            &cache,
            "h",
            &[("example.com/h:1", vec![vec![2u8; 100]])],
            BundleState::Held,
        );
        let (old, old_meta) = cached(
            t.path(),
            &cache,
            "old",
            &[("example.com/old:1", vec![shared, vec![3u8; 100]])],
            BundleState::Imported,
        );
        let mut state = State::default();
        for r in [&a, &h, &old] {
            state.bundles.insert(r.digest, r.clone());
        }
        state.sets.insert(
            "a".into(),
            ActiveSet {
                name: "a".into(),
                images: vec![a_meta.images[0].digest_name()],
                pinned: true,
                critical: false,
                bundle: a.digest,
                previous: vec![],
            },
        );
        let settings = Settings::default();
        let view = CacheView {
            paths: &paths,
            cache: &cache,
            state: &state,
            settings: &settings,
        };
        let refs = view.referenced_blobs().expect("referenced");
        for m in [&a_meta, &h_meta] {
            assert!(read::declared_blobs(m).keys().all(|d| refs.contains(d)));
            assert!(refs.contains(&m.index.digest));
        }
        assert!(refs.contains(&a.digest) && refs.contains(&h.digest));
        // The old bundle's own layer is unreferenced; the layer it shares with a is not.
        assert!(!refs.contains(&old_meta.images[0].layers[1].digest));
        assert!(refs.contains(&old_meta.images[0].layers[0].digest));
        assert!(!refs.contains(&old.digest));

        let report = view.report().expect("report");
        let why = |n: &str| {
            report
                .bundles
                .iter()
                .find(|b| b.name == n)
                .map(|b| b.referenced_by.clone())
                .expect("listed")
        };
        assert_eq!(why("a"), ["set a"]);
        assert_eq!(why("h"), ["held"]);
        assert!(why("old").is_empty());
        assert_eq!(report.blobs, cache.list().expect("list").blobs.len());

        // With the cap at zero, a collection takes exactly the unreferenced blobs.
        let out = gc::collect(
            &cache,
            &refs,
            Limits {
                max_size: 0,
                min_free: 0,
            },
            &|_| None,
        )
        .expect("gc");
        assert_eq!(out.referenced, refs.len());
        assert!(cache.has(&old_meta.images[0].layers[1].digest).is_none());
        assert!(cache.has(&old_meta.images[0].layers[0].digest).is_some());
        let names: Vec<String> = cache
            .index()
            .expect("index")
            .iter()
            .filter_map(|e| e.name().map(str::to_string))
            .collect();
        assert!(names.iter().all(|n| !n.contains("/old")), "{names:?}");
        assert_eq!(names.len(), 4, "a and h, by tag and by digest: {names:?}");
    }
}
