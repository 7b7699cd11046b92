//! The copy scheduler: which names of which images skopeo copies, in what order.
//!
//! Images are copied two at a time (`[import] jobs`), never two that would write the same
//! layer at once: the second waits, then reuses the layer. Each image is copied once under
//! its first name, which writes its layers; its other names (the digest name last) are
//! copies that write no layer, on a lane of their own beside the next image's copy. An
//! image counts as done once it has every name.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use anyhow::Result;

use super::Store;
use crate::cancel::Cancel;
use crate::oci::digest::Digest;

/// One image to copy.
#[derive(Debug, Clone)]
pub struct CopyJob {
    /// Where skopeo reads it from.
    pub source: String,
    /// The names it gets, in order: the first copy writes the layers.
    pub names: Vec<String>,
    /// Its layers.
    pub layers: Vec<Digest>,
    /// Its bytes, for progress.
    pub size: u64,
    /// How errors name it (`repository@digest`).
    pub label: String,
}

/// Progress after an image got all its names.
#[derive(Debug, Clone, Copy)]
pub struct Copied {
    /// Images done so far.
    pub done: usize,
    /// Of these bytes in all.
    pub bytes: u64,
}

struct Scheduler {
    /// Every job handed in so far; pending and running ones are indexes into it.
    jobs: Vec<CopyJob>,
    pending: VecDeque<usize>,
    /// Layers a running copy is writing.
    busy: HashSet<Digest>,
    /// Layers the store holds.
    stored: HashSet<Digest>,
    done: usize,
    failed: Option<anyhow::Error>,
    /// No more jobs will come.
    closed: bool,
}

impl Scheduler {
    /// The first pending image none of whose missing layers another copy is writing;
    /// its missing layers are claimed.
    fn pick(&mut self) -> Option<(usize, Vec<Digest>)> {
        let jobs = &self.jobs;
        let p = self.pending.iter().position(|&i| {
            jobs[i]
                .layers
                .iter()
                .all(|l| self.stored.contains(l) || !self.busy.contains(l))
        })?;
        let i = self.pending.remove(p)?;
        let claimed: Vec<Digest> = self.jobs[i]
            .layers
            .iter()
            .filter(|d| !self.stored.contains(*d))
            .copied()
            .collect();
        self.busy.extend(claimed.iter().copied());
        Some((i, claimed))
    }

    /// A copy ended: its layers are no longer being written, and stored if it worked.
    fn release(&mut self, claimed: Vec<Digest>, ok: bool) {
        for d in &claimed {
            self.busy.remove(d);
        }
        if ok {
            self.stored.extend(claimed);
        }
    }
}

/// Where a copy's jobs come from.
pub enum Feed<'a> {
    /// All of them, known before the first copy.
    Fixed(&'a [CopyJob]),
    /// As they become ready (images fetched whole while others still come); the copies
    /// end once the sender is gone and every job received is done.
    Stream(mpsc::Receiver<CopyJob>),
}

/// Copies the jobs `feed` gives into `store` with `workers` copies at once. `stored` are
/// the layers the store holds already. `on_copied` hears of each image once it has all
/// its names. Returns the number of images copied; the first failure stops the rest.
pub fn copy_all(
    store: &Store,
    feed: Feed<'_>,
    workers: usize,
    stored: HashSet<Digest>,
    cancel: &Cancel,
    on_copied: &(dyn Fn(&CopyJob, Copied) + Sync),
) -> Result<usize> {
    let (jobs, incoming, workers) = match feed {
        Feed::Fixed(jobs) => (jobs.to_vec(), None, workers.max(1).min(jobs.len())),
        Feed::Stream(rx) => (vec![], Some(Mutex::new(rx)), workers.max(1)),
    };
    let bytes_done = AtomicU64::new(0);
    let sched = Mutex::new(Scheduler {
        pending: (0..jobs.len()).collect(),
        closed: incoming.is_none(),
        jobs,
        busy: HashSet::new(),
        stored,
        done: 0,
        failed: None,
    });
    let wake = Condvar::new();
    let lock = || sched.lock().unwrap_or_else(|p| p.into_inner());
    let fail = |e: anyhow::Error, job: &CopyJob| {
        lock()
            .failed
            .get_or_insert(e.context(format!("copying {}", job.label)));
        wake.notify_all();
    };
    let (names_tx, names_rx) = mpsc::channel::<usize>();
    // Read by the name lane alone; the lock only makes it shareable with the scope.
    let names_rx = Mutex::new(names_rx);
    std::thread::scope(|s| {
        // The feeder: jobs that become ready join the queue.
        if let Some(incoming) = &incoming {
            s.spawn(|| {
                let rx = incoming.lock().unwrap_or_else(|p| p.into_inner());
                while let Ok(job) = rx.recv() {
                    let mut g = lock();
                    g.jobs.push(job);
                    let i = g.jobs.len() - 1;
                    g.pending.push_back(i);
                    wake.notify_all();
                }
                lock().closed = true;
                wake.notify_all();
            });
        }
        // The name lane: every name of an image but its first.
        s.spawn(|| {
            let rx = names_rx.lock().unwrap_or_else(|p| p.into_inner());
            while let Ok(i) = rx.recv() {
                let job = lock().jobs[i].clone();
                if lock().failed.is_some() {
                    continue;
                }
                let res = job.names[1..]
                    .iter()
                    .try_for_each(|n| store.copy(&job.source, n));
                if let Err(e) = res {
                    fail(e, &job);
                    continue;
                }
                let done = {
                    let mut g = lock();
                    if g.done == 0 {
                        crate::cancel::fault_point("copied-one");
                    }
                    g.done += 1;
                    g.done
                };
                let bytes = bytes_done.fetch_add(job.size, Ordering::Relaxed) + job.size;
                on_copied(&job, Copied { done, bytes });
            }
        });
        let workers: Vec<_> = (0..workers)
            .map(|_| {
                let names_tx = names_tx.clone();
                let (wake, lock, fail) = (&wake, &lock, &fail);
                s.spawn(move || loop {
                    let (i, claimed, job) = {
                        let mut g = lock();
                        loop {
                            if g.failed.is_some() || (g.pending.is_empty() && g.closed) {
                                return;
                            }
                            if let Err(c) = cancel.check() {
                                g.failed = Some(c.into());
                                wake.notify_all();
                                return;
                            }
                            match g.pick() {
                                Some((i, claimed)) => {
                                    let job = g.jobs[i].clone();
                                    break (i, claimed, job);
                                }
                                None => g = wake.wait(g).unwrap_or_else(|p| p.into_inner()),
                            }
                        }
                    };
                    tracing::info!(image = %job.label, "copying into the store");
                    let res = store.copy(&job.source, &job.names[0]);
                    lock().release(claimed, res.is_ok());
                    wake.notify_all();
                    match res {
                        Ok(()) => {
                            let _ = names_tx.send(i);
                        }
                        Err(e) => fail(e, &job),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(layers: &[u8]) -> CopyJob {
        CopyJob {
            source: String::new(),
            names: vec!["x".into()],
            layers: layers.iter().map(|b| Digest::of(&[*b])).collect(),
            size: 1,
            label: String::new(),
        }
    }

    fn sched(jobs: &[CopyJob], stored: &[u8]) -> Scheduler {
        Scheduler {
            jobs: jobs.to_vec(),
            closed: true,
            pending: (0..jobs.len()).collect(),
            busy: HashSet::new(),
            stored: stored.iter().map(|b| Digest::of(&[*b])).collect(),
            done: 0,
            failed: None,
        }
    }

    #[test]
    fn two_copies_never_write_one_layer_at_once() {
        let jobs = [job(&[1, 2]), job(&[1, 3]), job(&[4])];
        let mut s = sched(&jobs, &[]);
        let (a, claimed_a) = s.pick().expect("first");
        assert_eq!(a, 0);
        // Image 1 shares layer 1 with the running copy: image 2 goes first.
        let (b, claimed_b) = s.pick().expect("second");
        assert_eq!(b, 2);
        assert!(s.pick().is_none(), "image 1 must wait for layer 1");
        s.release(claimed_b, true);
        assert!(s.pick().is_none());
        s.release(claimed_a, true);
        // Layer 1 is stored now: image 1 claims only its own layer.
        let (c, claimed_c) = s.pick().expect("third");
        assert_eq!((c, claimed_c), (1, vec![Digest::of(&[3])]));
    }

    #[test]
    fn a_stored_layer_is_no_reason_to_wait_and_a_failed_copy_stores_nothing() {
        let jobs = [job(&[1, 2]), job(&[1, 3])];
        let mut s = sched(&jobs, &[1]);
        let (_, claimed) = s.pick().expect("first");
        assert_eq!(claimed, vec![Digest::of(&[2])]);
        assert!(s.pick().is_some(), "layer 1 is stored, so both run");
        s.release(claimed, false);
        assert!(!s.stored.contains(&Digest::of(&[2])));
        assert!(s.busy.contains(&Digest::of(&[3])));
    }
}
