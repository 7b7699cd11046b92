//! Heal: images CRI-O's store lost put back from retained bundles; retention.

use super::*;

impl Engine {
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
    pub(super) fn retain(&self, digest: &Digest, from: Retain) -> Result<PathBuf> {
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
    pub(super) fn gc_retained(&mut self) -> bool {
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
}

/// Where a retained copy comes from.
pub(super) enum Retain {
    /// A staged, verified layout, moved into place.
    Move(PathBuf),
}
