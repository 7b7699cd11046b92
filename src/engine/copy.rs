//! The copy scheduler: which names of which images skopeo copies, in what order.

use super::*;

impl Engine {
    /// Copies the missing images of a verified bundle layout.
    ///
    /// skopeo reads each image through a `dir:` view: a directory of symbolic links to the
    /// manifest and blobs in the layout. The `oci:` transport of containers/image only
    /// looks at index entries whose media type is OCI (oci_src.go in image/oci/layout),
    /// while a bundle keeps Docker schema 2 manifests as they are so they keep their
    /// digests; `dir:` reads both. skopeo still checks every blob's digest as it copies.
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
    pub(super) fn copy_missing(&self, plan: &Plan, present: &[bool]) -> Result<usize> {
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
                        let _ = tx.send(crate::events::Progress {
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
}

pub(super) struct Scheduler {
    pending: VecDeque<usize>,
    /// Layers a running copy is writing.
    busy: HashSet<Digest>,
    /// Layers the store holds.
    stored: HashSet<Digest>,
    done: usize,
    failed: Option<anyhow::Error>,
}
