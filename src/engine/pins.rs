//! Sets in force, the pin drop-in, the store drop-in and CRI-O control.

use super::*;

impl Engine {
    /// Brings CRI-O's configuration in line with the sets: evaluates every set against
    /// the store, writes the pin file (and the additional-store drop-in), and reloads or
    /// restarts CRI-O when a file changed. Returns the sets' state.
    pub async fn sync(&mut self) -> Result<Vec<SetView>> {
        // A release a set file names may have come in with a bundle (no registry in
        // reach): its payload is read from the cache here, not only after a fetch.
        expand_releases(&self.paths);
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
                changed |= a.settle();
            }
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
        let mirror_change = self.sync_mirror_dropin()?;
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
            self.control.restart().await?;
        } else if pin_change.changed() || mirror_change.changed() {
            self.control.reload().await?;
        }
        Ok(views)
    }

    /// In additional-store mode, makes sure CRI-O can open longshore's store read-only
    /// and that the drop-in names it; in primary mode, that no such drop-in is left.
    pub(super) fn sync_store_dropin(&self) -> Result<FileChange> {
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

    /// With `[share] enabled`, makes the mirror drop-in put the endpoint first for the
    /// registries served (see [`crate::crio::mirrors`]); otherwise, that none is left.
    pub(super) fn sync_mirror_dropin(&self) -> Result<FileChange> {
        use crate::crio::mirrors;
        let dir = self
            .paths
            .host(Path::new(crate::registry::conf::DROPIN_DIR));
        let path = dir.join(mirrors::MIRROR_FILE);
        let share = &self.settings.share;
        if !share.enabled {
            let change = crate::crio::remove_if_present(&path)?;
            if change.changed() {
                tracing::info!("removed {}: sharing is off", path.display());
            }
            return Ok(change);
        }
        let hosts: std::collections::BTreeSet<String> = if share.registries.is_empty() {
            self.cache
                .index()
                .unwrap_or_default()
                .iter()
                .filter_map(|e| Some(e.name()?.split('/').next()?.to_string()))
                .collect()
        } else {
            share.registries.iter().cloned().collect()
        };
        if hosts.is_empty() {
            // Nothing to serve yet (an empty cache, no `registries`): no file at all.
            return crate::crio::remove_if_present(&path);
        }
        let (before, later) = crate::registry::conf::RegistriesConf::load_until(
            &self.paths,
            Some(mirrors::MIRROR_FILE),
        )
        .context("reading the registries configuration the mirror drop-in must carry")?;
        let plan = mirrors::MirrorPlan {
            local: share.local,
            hosts,
            tags: share.mirror_tags,
            block: share.never_contact_source,
        };
        let (text, skipped) = mirrors::render(&before, &plan);
        for h in skipped {
            tracing::warn!(
                "registry {h} is not mirrored: its address cannot stand in a mirror's path"
            );
        }
        for f in mirrors::overriding(&later, &text) {
            tracing::warn!(
                "{} is read after {} and sets the same registries, so CRI-O does not pull through longshore for them",
                f.display(),
                path.display()
            );
        }
        let change = crate::crio::write_if_changed(&path, &text)?;
        if change.changed() {
            tracing::info!(
                "wrote {}: {} mirrors {} registries",
                path.display(),
                share.local,
                plan.hosts.len()
            );
        }
        Ok(change)
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
            return Err(crate::error::NotFound(format!(
                "no set named {name:?}; `longshore sets` lists them"
            ))
            .into());
        }
        self.state.save(&self.paths.state_dir)?;
        tracing::info!("removed set {name}; its images are no longer pinned");
        self.sync().await?;
        Ok(())
    }
}

/// A mark in `/run/longshore/progress.json` that sets are being imported, so another
/// process (`longshore status`) can report them as progressing. Removed when dropped.
pub(super) struct Busy(Option<PathBuf>);

impl Busy {
    pub(super) fn mark(paths: &HostPaths, sets: &std::collections::BTreeSet<String>) -> Busy {
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
pub(super) fn busy_elsewhere(paths: &HostPaths) -> std::collections::BTreeSet<String> {
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
        fetch: crate::fetch::Board::read(paths),
    };
    if defs.is_empty() {
        return Ok((vec![], other));
    }
    let _ = settings;
    let views = sets::evaluate(&defs, state, &store.names()?, &activity);
    Ok((views, other))
}
