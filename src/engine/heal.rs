//! Heal: images CRI-O's store lost put back from the cache.

use super::*;

impl Engine {
    /// Checks every set and puts back, from the cache, the images the store lost (an
    /// unclean shutdown or an upgrade can make CRI-O wipe its storage) and the images
    /// fetched from registries that are not in the store yet; then syncs the pins. Media
    /// are not needed: the cache holds the bundles' original blobs.
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
            .filter(|b| b.cached && b.state != BundleState::Held)
            .filter(|b| {
                b.images
                    .iter()
                    .any(|i| i.names.iter().any(|n| missing.contains(n)))
            })
            .cloned()
            .collect();
        for b in sources {
            let whole = self
                .cached_meta(&b.digest)
                .ok()
                .flatten()
                .is_some_and(|m| self.cache_holds(&m));
            if !whole {
                tracing::error!(
                    "the store lost images of bundle {}, and the cache no longer holds all of it",
                    b.name
                );
                if let Some(rec) = self.state.bundles.get_mut(&b.digest) {
                    rec.cached = false;
                }
                self.state.save(&self.paths.state_dir)?;
                continue;
            }
            if b.state == BundleState::Importing {
                // Interrupted (a power cut, a kill) after it was verified: its blobs are
                // all in the cache, so it is completed from there, media or not.
                tracing::warn!(
                    "bundle {} was not completely imported; completing it from the cache",
                    b.name
                );
            } else {
                tracing::warn!(
                    "the store lost images of bundle {}; importing them again from the cache",
                    b.name
                );
            }
            let res = self.import_from_cache(&b.digest, true).await;
            // The record keeps where the bundle first came from.
            if let Some(rec) = self.state.bundles.get_mut(&b.digest) {
                rec.source = b.source.clone();
                rec.kind = b.kind;
            }
            self.state.save(&self.paths.state_dir)?;
            if let Err(e) = res {
                tracing::error!("restoring bundle {} from the cache: {e:#}", b.name);
            }
        }
        let views = self.sync().await?;
        match self.import_named(&views).await {
            Ok(None) => Ok(views),
            Ok(Some(after)) => Ok(after),
            Err(e) => {
                tracing::error!("importing images from the cache: {e:#}");
                Ok(views)
            }
        }
    }
}
