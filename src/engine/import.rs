//! Import: a path's inputs verified, staged, copied, pinned and recorded.

use super::*;

impl Engine {
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

    pub(super) async fn import_one(
        &mut self,
        input: Input,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        match input {
            Input::BundleDir(dir) => self.import_bundle(&dir, false, opts).await,
            Input::BundleStream(p) => self.import_bundle(&p, true, opts).await,
            Input::Foreign(f) => self.import_foreign(f, opts).await,
            Input::Collection(dir, _) => {
                bail!("{}: nested collections are not imported", dir.display())
            }
        }
    }

    pub(super) async fn import_bundle(
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
        // Its bundle.json too: the cache knows a bundle by it (heal, apply, references).
        let cached = self.cache.has(&digest).is_some() && self.cache_holds(&meta);
        if !opts.hold && cached && present.iter().all(|p| *p) {
            return self.commit(path, &mut plan, &present, None, None).await;
        }
        // The cache and the store each on their own filesystem: the cache takes what it
        // lacks of the bundle (verified into staging beside it, then moved in), the store
        // what its missing images unpack to.
        let needs = [self.store_need(&plan, &present), self.cache_need(&meta)];
        check_space(&needs, self.settings.store.min_free_space, path)?;
        let tmp = self.temp_staging()?;
        // Every blob is hashed; only those the cache lacks are written.
        let verified = if stream {
            let cached: HashSet<Digest> = read::declared_blobs(&meta)
                .into_keys()
                .filter(|d| self.cache.has(d).is_some())
                .collect();
            read::verify_stream(path, Some(&tmp), opts.expected, &self.cancel, Some(&cached))
        } else {
            let keep = Some(self.not_cached(&meta));
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
    pub(super) async fn presence_of(&self, plan: &Plan) -> Result<Vec<bool>> {
        let names = self.store.names()?;
        Ok(plan
            .images
            .iter()
            .map(|i| names.holds(&i.wanted()))
            .collect())
    }

    /// Brings a foreign input into staging as a bundle (see [`crate::bundle::intake`]),
    /// then imports that bundle.
    pub(super) async fn import_foreign(
        &mut self,
        f: Foreign,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
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
        let cached = self.cache.has(&plan.digest).is_some() && self.cache_holds(&staged.meta);
        if !opts.hold && present.iter().all(|p| *p) && cached {
            let _ = fs::remove_dir_all(&tmp);
            return self.commit(&f.path, &mut plan, &present, None, None).await;
        }
        if let Err(e) = check_space(&[self.store_need(&plan, &present)], floor, &f.path) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        self.finish_staged(&f.path, plan, present, tmp, staged.bytes_read, opts.hold)
            .await
    }

    /// After a bundle is verified into `tmp`: moves it into the cache, then holds it
    /// or copies its missing images from the cache into the store.
    pub(super) async fn finish_staged(
        &mut self,
        source: &Path,
        mut plan: Plan,
        present: Vec<bool>,
        tmp: PathBuf,
        bytes_verified: u64,
        hold: bool,
    ) -> Result<ImportReport> {
        crate::cancel::fault_point("verified");
        self.cache_layout(&tmp, &plan)?;
        let report = if hold {
            self.record_held(source, &plan, bytes_verified)
        } else {
            let root = self.cache.root().to_path_buf();
            self.commit(
                source,
                &mut plan,
                &present,
                Some(&root),
                Some(bytes_verified),
            )
            .await
        };
        self.collect_quietly();
        report
    }

    /// Bytes the missing images will take in the store: each layer counted once, and not
    /// at all when an image already present has it.
    pub(super) fn store_need(&self, plan: &Plan, present: &[bool]) -> SpaceNeed {
        SpaceNeed {
            path: self.store.root.clone(),
            bytes: plan.store_bytes(present),
        }
    }

    /// A fresh name for a bundle being verified into staging.
    pub(super) fn temp_staging(&self) -> Result<PathBuf> {
        let dir = self.paths.staging_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let n = STAGING_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(dir.join(format!(".tmp-{}-{n}", std::process::id())))
    }

    /// After verification (or when the store holds everything already): the bundle's
    /// sets come into force, the pins of what stays are written, the missing images are
    /// copied from `layout` (the cache), and the new pins are written.
    pub(super) async fn commit(
        &mut self,
        source: &Path,
        plan: &mut Plan,
        present: &[bool],
        layout: Option<&Path>,
        bytes_verified: Option<u64>,
    ) -> Result<ImportReport> {
        let already = self
            .state
            .bundles
            .get(&plan.digest)
            .is_some_and(|b| b.state == BundleState::Imported);
        let known = self.state.bundles.contains_key(&plan.digest);
        if plan.restore && known {
            if let Some(b) = self.state.bundles.get_mut(&plan.digest) {
                b.to_importing()?;
            }
        } else {
            let rec = self.record(source, plan, BundleState::Importing, None);
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
        if let Some(b) = self.state.bundles.get_mut(&plan.digest) {
            b.to_imported()?;
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
    pub(super) fn activate_sets(&mut self, plan: &Plan) {
        for s in &plan.sets {
            let new = ActiveSet {
                name: s.name.clone(),
                images: s.images.clone(),
                pinned: s.pinned,
                critical: s.critical,
                bundle: plan.digest,
                previous: vec![],
            };
            match self.state.sets.get_mut(&s.name) {
                Some(old) => old.replace_with(new),
                None => {
                    self.state.sets.insert(s.name.clone(), new);
                }
            }
        }
    }
}
