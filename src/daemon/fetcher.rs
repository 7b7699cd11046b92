//! The daemon's fetcher: pre-loads, in the background, what sets that fetch lack
//! ([`crate::fetch`]), without the state lock, so media are imported meanwhile. What the
//! cache then holds whole is imported and pinned by the worker (a heal).
//!
//! A round runs at start, when set files change, when CRI-O becomes active, and when
//! the last one asks for it: after a network failure, with backoff from one minute
//! doubling to half an hour; outside the fetch windows, when the next one opens.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use super::*;
use crate::engine::FetchReport;
use crate::fetch::{Board, Failure, Options, Outcome, Reason, Want};

/// The first wait after a round with network failures.
const RETRY_FIRST: Duration = Duration::from_secs(60);
/// The longest.
const RETRY_MAX: Duration = Duration::from_secs(30 * 60);
/// How often a round that only met refusals (credentials, policy, not found) tries again:
/// the pull secret may have been fixed, and is not watched.
const REFUSED_RETRY: Duration = Duration::from_secs(30 * 60);
/// How often a fetch in progress republishes the sets on D-Bus.
const REPUBLISH: Duration = Duration::from_secs(30);

/// A fetch asked for on D-Bus.
pub(super) struct Order {
    pub(super) sets: Vec<String>,
    pub(super) reply: oneshot::Sender<Result<FetchReport>>,
}

pub(super) struct Fetcher {
    pub(super) paths: HostPaths,
    pub(super) settings: Settings,
    pub(super) progress: crate::events::ProgressSender,
    pub(super) jobs: mpsc::UnboundedSender<Job>,
    /// Shared with the worker: whether a [`Job::Fetched`] waits for it.
    pub(super) fetched_queued: Arc<std::sync::atomic::AtomicBool>,
    pub(super) wake: Arc<Notify>,
    pub(super) stopping: Cancel,
    pub(super) failures: BTreeMap<String, Failure>,
}

impl Fetcher {
    pub(super) async fn serve(mut self, mut orders: mpsc::Receiver<Order>) {
        let mut delay = Some(Duration::ZERO);
        let mut backoff = RETRY_FIRST;
        loop {
            let sleep = async {
                match delay {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                order = orders.recv() => match order {
                    Some(o) => {
                        self.now(o).await;
                        continue;
                    }
                    None => break,
                },
                _ = self.wake.notified() => backoff = RETRY_FIRST,
                _ = sleep => {}
            }
            if self.stopping.is_cancelled() {
                break;
            }
            delay = self.round(&mut backoff).await;
        }
    }

    /// The sets' state, read without the lock.
    async fn views(&self) -> Result<Vec<SetView>> {
        let state = State::load(&self.paths.state_dir)?;
        let store = crate::store::Store::new(&self.paths, &self.settings);
        Ok(
            engine::evaluate_sets(&self.paths, &self.settings, &state, &store, None)
                .await?
                .0,
        )
    }

    async fn fetch(&mut self, wants: &[Want], opts: &Options) -> Outcome {
        let progress = self.progress.clone();
        let jobs = self.jobs.clone();
        let last = std::sync::Mutex::new(None::<Instant>);
        let on_board = move |b: &Board| {
            for p in crate::cli::board_progress(b) {
                systemd::notify_status(&format!(
                    "Fetching {}: {} of {}; {}",
                    p.bundle,
                    crate::config::human_size(p.done),
                    crate::config::human_size(p.total),
                    p.image
                ));
                let _ = progress.send(p);
            }
            // The sets' D-Bus objects say Progressing, with the figures of the moment.
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|t| t.elapsed() >= REPUBLISH) {
                *last = Some(Instant::now());
                let _ = jobs.send(Job::Sync);
            }
        };
        // Images whole in the cache are copied into the store by the worker while the
        // rest come; one such job waiting is enough.
        let (jobs, queued) = (self.jobs.clone(), self.fetched_queued.clone());
        let on_image = move |_: &str| {
            if !queued.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let _ = jobs.send(Job::Fetched);
            }
        };
        let hooks = crate::fetch::Hooks {
            board: &on_board,
            image: &on_image,
        };
        let outcome = crate::fetch::fetch(
            &self.paths,
            &self.settings,
            wants,
            opts,
            &self.failures,
            &self.stopping,
            &hooks,
        )
        .await;
        self.failures = outcome.failures.clone();
        outcome
    }

    /// One background round; returns when the next is due (`None`: when woken).
    async fn round(&mut self, backoff: &mut Duration) -> Option<Duration> {
        if !self.settings.fetch.enabled {
            Board::clear(&self.paths);
            return None;
        }
        let wants = match self
            .views()
            .await
            .and_then(|v| engine::wanted(&self.paths, &v, &[]))
        {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("working out what to fetch: {e:#}");
                return Some(RETRY_MAX);
            }
        };
        if wants.is_empty() {
            self.failures.clear();
            Board::clear(&self.paths);
            return None;
        }
        tracing::info!("fetching {} images from registries", wants.len());
        let outcome = self.fetch(&wants, &Options::default()).await;
        // A release whose image came in: its payload is wanted next, at once.
        if engine::expand_releases(&self.paths) > 0 {
            let _ = self.jobs.send(Job::Sync);
            return Some(Duration::ZERO);
        }
        if !outcome.fetched.is_empty() {
            let _ = self.jobs.send(Job::Heal);
        } else {
            let _ = self.jobs.send(Job::Sync);
        }
        if let Some(m) = outcome.waiting_minutes {
            tracing::info!("outside the fetch windows; fetching again in {m} min");
            return Some(Duration::from_secs(u64::from(m) * 60));
        }
        if outcome.failures.is_empty() {
            *backoff = RETRY_FIRST;
            return Some(Duration::ZERO).filter(|_| outcome.fetched.len() < wants.len());
        }
        if outcome
            .failures
            .values()
            .any(|f| matches!(f.reason, Reason::Retrying))
        {
            let wait = *backoff;
            *backoff = (*backoff * 2).min(RETRY_MAX);
            tracing::info!(
                "{} images could not be fetched yet; trying again in {} s",
                outcome.failures.len(),
                wait.as_secs()
            );
            return Some(wait);
        }
        Some(REFUSED_RETRY)
    }

    /// A fetch asked for on D-Bus: now, whatever the windows say.
    async fn now(&mut self, order: Order) {
        let res = async {
            engine::check_enabled(&self.settings)?;
            let before = self.views().await?;
            let wants = engine::wanted(&self.paths, &before, &order.sets)?;
            let now = Options {
                ignore_windows: true,
            };
            let mut wants = wants;
            let mut outcome = self.fetch(&wants, &now).await;
            if engine::expand_releases(&self.paths) > 0 {
                let more = engine::wanted(&self.paths, &self.views().await?, &order.sets)?;
                let next = self.fetch(&more, &now).await;
                let failures = outcome.failures.clone();
                outcome.merge(next);
                self.failures.extend(failures);
                wants.extend(more);
            }
            let (tx, rx) = oneshot::channel();
            self.jobs
                .send(Job::HealReply(tx))
                .map_err(|_| anyhow::anyhow!("the daemon is stopping"))?;
            let after = rx
                .await
                .map_err(|_| anyhow::anyhow!("the daemon dropped the import"))??;
            if self.failures.is_empty() {
                Board::clear(&self.paths);
            }
            Ok(FetchReport::new(
                outcome,
                &before,
                after,
                &wants,
                &order.sets,
            ))
        }
        .await;
        let _ = order.reply.send(res);
    }
}
