//! What the copies read: `dir:` views of a verified layout, and the jobs handed to the
//! store's copy scheduler.

use super::*;
use crate::store::copy::{copy_all, Copied, CopyJob, Feed};

impl Engine {
    /// Copies the missing images of a verified bundle layout.
    ///
    /// skopeo reads each image through a `dir:` view ([`crate::cache::write_dir_view`]):
    /// a bundle keeps Docker schema 2 manifests as they are, so they keep their digests,
    /// and `dir:` reads both kinds. skopeo still checks every blob's digest as it copies.
    pub(super) fn copy_from_layout(
        &self,
        plan: &mut Plan,
        present: &[bool],
        layout: &Path,
    ) -> Result<usize> {
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
                let config = img
                    .config
                    .with_context(|| format!("{} has no config", img.repository))?;
                let layers: Vec<Digest> = img.layers.iter().map(|l| l.0).collect();
                let (manifest, list) = match &img.instance {
                    Some(m) => (m, Some(&img.digest)),
                    None => (&img.digest, None),
                };
                let of = crate::cache::ViewOf {
                    manifest,
                    list,
                    config: &config,
                    layers: &layers,
                };
                crate::cache::write_dir_view(&blobs, &of, &view)?;
                img.source = format!("dir:{}", view.display());
            }
            self.copy_missing(plan, present)
        })();
        let _ = fs::remove_dir_all(&views);
        res
    }

    /// Copies the images the store lacks with the store's scheduler
    /// ([`crate::store::copy`]), reporting each as it is done.
    pub(super) fn copy_missing(&self, plan: &Plan, present: &[bool]) -> Result<usize> {
        // The names each image still lacks: one an earlier, interrupted import gave it is
        // not copied again.
        let stored_names = self.store.names()?;
        let jobs: Vec<CopyJob> = plan
            .images
            .iter()
            .zip(present)
            .filter(|(_, p)| !**p)
            .map(|(img, _)| {
                let all = img.wanted().names();
                let lacking: Vec<String> = all
                    .iter()
                    .filter(|n| stored_names.lookup(n) != Some(img.digest))
                    .cloned()
                    .collect();
                CopyJob {
                    source: img.source.clone(),
                    names: if lacking.is_empty() { all } else { lacking },
                    layers: img.layers.iter().map(|l| l.0).collect(),
                    size: img.size,
                    label: format!("{}@{}", img.repository, img.digest),
                }
            })
            .collect();
        let total = jobs.len();
        let total_bytes: u64 = jobs.iter().map(|j| j.size).sum();
        let on_copied = |job: &CopyJob, c: Copied| {
            let line = format!(
                "Importing {}{}: {}/{total} images, {}/{}",
                if plan.fetched { "" } else { "bundle " },
                plan.name,
                c.done,
                human_size(c.bytes),
                human_size(total_bytes)
            );
            tracing::info!("{line}");
            crate::systemd::notify_status(&line);
            if let Some(tx) = &self.progress {
                let _ = tx.send(crate::events::Progress {
                    bundle: plan.name.clone(),
                    image: job.label.clone(),
                    done: c.bytes,
                    total: total_bytes,
                    images: Some((c.done, total)),
                    fetching: false,
                });
            }
        };
        copy_all(
            &self.store,
            Feed::Fixed(&jobs),
            self.settings.import_jobs,
            plan.present_layers(present),
            &self.cancel,
            &on_copied,
        )
    }
}
