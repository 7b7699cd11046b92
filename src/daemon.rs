//! `longshore daemon`: keeps CRI-O's pins in line with the image sets and with CRI-O's
//! other drop-ins, imports what bundle media carry, and heals the store when CRI-O
//! (re)starts.
//!
//! It serves `io.longshore.Longshore1` on D-Bus (see [`crate::api`]). Its loop turns
//! what happens into work, queued and done one piece at a time by a worker task:
//! - a method call of that service (an import, a verification, …);
//! - a block device that udev reports (see [`crate::media`]): bundle media are mounted
//!   read-only, their bundles imported (or held, by `[media] policy`), and unmounted;
//! - a change in `/etc/crio/crio.conf.d`, `/etc/crio` or a `sets.d` directory (inotify):
//!   another file's pins or a set changed, so the pin file is synced;
//! - CRI-O's unit becoming active again (its `ActiveState` over D-Bus): an unclean
//!   shutdown may have made CRI-O wipe its storage, so every set is checked and lost
//!   images are put back from the cache.
//!
//! The loop stays free while the worker copies, so it can abandon the work in hand: when
//! the device being read goes away, and on SIGTERM or SIGINT, which stop the daemon. An
//! abandoned import keeps the images it finished (the next import of the same bundle
//! copies only the rest) and pins nothing that is not complete.
//!
//! At start, before it reports ready, the daemon checks every set and imports the
//! bundles that carry critical sets from the media present; everything else follows.
//! The state lock is taken for each piece of work, so `longshore import` can run beside
//! the daemon.

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use inotify::WatchMask;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::api::{self, Api, Request};
use crate::bundle::{self, read, Input};
use crate::cancel::Cancel;
use crate::config::{MediaPolicy, Settings};
use crate::engine::{self, Engine, ImportOptions};
use crate::media::{self, BlockDevice, Verdict};
use crate::oci::digest::Digest;
use crate::paths::HostPaths;
use crate::sets::SetView;
use crate::state::State;
use crate::systemd::{self, message_id};

mod fetcher;

/// How long a burst of file events is gathered before one sync.
const SETTLE: Duration = Duration::from_millis(200);
/// How long the work in hand gets to stop when the daemon is told to.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs until SIGTERM or SIGINT.
pub async fn run(paths: HostPaths, settings: Settings) -> Result<()> {
    let unit = settings.crio.unit.clone();
    let manager = systemd::Systemd::connect(settings.bus).await?;
    // Without systemd on the bus the daemon still imports and pins; it looks for systemd
    // again now and then, and follows CRI-O once it is there.
    let (mut states, mut last_state, mut last_since) = match follow(&manager, &unit).await {
        Ok((s, state, since)) => (Some(s), state, since),
        Err(e) => {
            SYSTEMD_ABSENT.store(true, Ordering::SeqCst);
            tracing::warn!(
                "{unit} is not followed: {e:#}; looking again every {}s",
                FOLLOW_RETRY.as_secs()
            );
            (None, "unknown".to_string(), 0)
        }
    };
    let mut retry = tokio::time::interval(FOLLOW_RETRY);
    let mut watcher = Watcher::new(&watched_dirs(&paths))?;
    let (media_tx, mut media_rx) = mpsc::unbounded_channel();
    let media_on = match media::spawn_monitor(media_tx.clone()) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("bundle media will not be noticed: {e:#}");
            false
        }
    };
    let mut seen = media::Seen::default();
    let (requests_tx, mut requests) = mpsc::channel(16);
    let api = Api::serve(settings.bus, requests_tx, paths.clone(), settings.clone()).await?;
    let (progress_tx, progress_rx) = mpsc::unbounded_channel();
    api::forward_progress(api.connection(), progress_rx);
    tracing::info!("longshore daemon started; {unit} is {last_state}");
    // The endpoint serves from the cache on a thread and runtime of its own, from the
    // start: pulls of this node's CRI-O never wait for the boot's work or an import.
    let sharing = crate::share::Sharing::spawn(&paths, &settings);

    let current = Arc::new(Mutex::new(Current::default()));
    // SIGTERM and SIGINT are watched on their own task, so they are heard at once, also
    // while the critical sets come in at start.
    let stopping = Cancel::default();
    let mut stop_asked = watch_signals(stopping.clone(), current.clone())?;
    let sync_queued = Arc::new(AtomicBool::new(false));
    let fetched_queued = Arc::new(AtomicBool::new(false));
    let mut worker = Worker {
        paths,
        settings,
        api,
        progress: progress_tx,
        sets: SetStates::default(),
        current: current.clone(),
        sync_queued: sync_queued.clone(),
        fetched_queued: fetched_queued.clone(),
        cancel: Cancel::default(),
        stopping: stopping.clone(),
    };

    // Boot: the sets are checked and the critical ones brought in from the media present
    // before systemd hears that the daemon is ready.
    worker.run(Job::Heal).await;
    let mut later = VecDeque::new();
    if media_on {
        let present = media_at_start(&mut media_rx, &mut seen).await;
        later = worker.boot(present).await;
    }
    if stopping.is_cancelled() {
        worker.status("stopping", "Stopping").await;
        return Ok(());
    }
    for name in &worker.sets.critical_waiting {
        tracing::warn!(
            set = %name,
            "critical image set {name} is not ready; reporting ready anyway, as no medium present holds what it lacks"
        );
    }
    tracing::info!("ready: following {unit} and the configuration directories");
    systemd::notify_ready(&worker.sets.summary());

    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    for dev in later {
        let _ = jobs_tx.send(Job::Rest(dev));
    }
    let worker_paths = worker.paths.clone();
    let fetch_wake = Arc::new(tokio::sync::Notify::new());
    let (orders_tx, orders_rx) = mpsc::channel(4);
    let fetcher = fetcher::Fetcher {
        paths: worker.paths.clone(),
        settings: worker.settings.clone(),
        progress: worker.progress.clone(),
        jobs: jobs_tx.clone(),
        fetched_queued,
        wake: fetch_wake.clone(),
        stopping: stopping.clone(),
        failures: Default::default(),
    };
    let fetcher = tokio::spawn(fetcher.serve(orders_rx));
    let worker = tokio::spawn(worker.serve(jobs_rx));
    let queue = |job: Job| {
        if jobs_tx.send(job).is_err() {
            tracing::error!("the worker stopped; work is no longer done");
        }
    };
    let mut watchdog = systemd::watchdog_interval().map(|p| tokio::time::interval(p / 2));
    loop {
        tokio::select! {
            _ = async { watchdog.as_mut().expect("checked by the guard").tick().await }, if watchdog.is_some() => {
                systemd::notify_watchdog();
            }
            Some(req) = requests.recv() => {
                if let Request::Rescan { .. } = &req {
                    // A rescan looks at every device again; they are queued after the
                    // check of the sets that answers the call.
                    seen = media::Seen::default();
                    if media_on {
                        if let Err(e) = media::enumerate(&media_tx) {
                            tracing::warn!("rescanning block devices: {e:#}");
                        }
                    }
                }
                match req {
                    Request::Fetch { sets, reply } => {
                        if let Err(e) = orders_tx.send(fetcher::Order { sets, reply }).await {
                            let _ = e.0.reply.send(Err(anyhow::anyhow!("the daemon is stopping")));
                        }
                    }
                    req => queue(Job::Request(req)),
                }
            }
            r = watcher.changed() => {
                r?;
                // Gather the rest of a burst (a rename is several events).
                while let Ok(r) = tokio::time::timeout(SETTLE, watcher.changed()).await {
                    r?;
                }
                // One sync waiting is enough: it reads everything when it runs.
                if !sync_queued.swap(true, Ordering::SeqCst) {
                    queue(Job::Sync);
                }
                // A set file may want new images.
                fetch_wake.notify_one();
            }
            _ = retry.tick(), if states.is_none() => {
                if let Ok((s, state, since)) = follow(&manager, &unit).await {
                    tracing::info!("systemd is on the bus now; following {unit}");
                    SYSTEMD_ABSENT.store(false, Ordering::SeqCst);
                    states = Some(s);
                    last_state = state;
                    last_since = since;
                    queue(Job::Heal);
                }
            }
            state = async { states.as_mut().expect("checked by the guard").next().await }, if states.is_some() => {
                let Some(state) = state else {
                    anyhow::bail!("lost the D-Bus connection to systemd");
                };
                if state == "active" {
                    let since = manager.active_since(&unit).await.unwrap_or_default();
                    if last_state != "active" || since != last_since {
                        tracing::info!("{unit} became active; checking that the store still holds every set");
                        queue(Job::Heal);
                        fetch_wake.notify_one();
                    }
                    last_since = since;
                }
                last_state = state;
            }
            Some(dev) = media_rx.recv(), if media_on => {
                if dev.is_gone() {
                    lock(&current).device_gone(&dev.devnode);
                }
                if seen.is_new(&dev) {
                    queue(Job::Device(dev));
                }
            }
            _ = &mut stop_asked => break,
        }
    }
    drop(orders_tx);
    fetcher.abort();
    if let Some(s) = sharing {
        s.stop();
    }
    crate::fetch::Board::clear(&worker_paths);
    drop(jobs_tx);
    match tokio::time::timeout(STOP_TIMEOUT, worker).await {
        Ok(Ok(worker)) => worker.status("stopping", "Stopping").await,
        Ok(Err(e)) => tracing::error!("the worker failed: {e}"),
        Err(_) => tracing::error!(
            "the work in hand did not stop within {}s; leaving it",
            STOP_TIMEOUT.as_secs()
        ),
    }
    Ok(())
}

/// At start, how long the block devices must have been quiet before the media present
/// are taken as all there.
const MEDIA_QUIET: Duration = Duration::from_secs(1);
/// At start, how long at most to wait for media still arriving.
const MEDIA_ARRIVAL_LIMIT: Duration = Duration::from_secs(30);

/// The devices present at start. The monitor thread reports those already there before
/// it says it listens; at boot a stick left in the machine may not be a block device yet
/// (the USB controller's driver loading, usb-storage waiting before it scans), so the
/// devices are gathered until none has come for [`MEDIA_QUIET`] and nothing is still on
/// its way ([`media::still_arriving`]), for at most [`MEDIA_ARRIVAL_LIMIT`].
async fn media_at_start(
    rx: &mut mpsc::UnboundedReceiver<BlockDevice>,
    seen: &mut media::Seen,
) -> Vec<BlockDevice> {
    let start = std::time::Instant::now();
    let mut last = start;
    let mut present: Vec<BlockDevice> = Vec::new();
    let mut told = false;
    loop {
        while let Ok(dev) = rx.try_recv() {
            last = std::time::Instant::now();
            if dev.is_gone() {
                present.retain(|d| d.devnode != dev.devnode);
            }
            if seen.is_new(&dev) {
                present.retain(|d| d.devnode != dev.devnode);
                present.push(dev);
            }
        }
        let arriving = tokio::task::spawn_blocking(media::still_arriving)
            .await
            .unwrap_or_default();
        if arriving.is_empty() && last.elapsed() >= MEDIA_QUIET {
            break;
        }
        if start.elapsed() >= MEDIA_ARRIVAL_LIMIT {
            tracing::warn!(
                "still waiting for {} after {} s; going on with the media present",
                arriving.join(", "),
                MEDIA_ARRIVAL_LIMIT.as_secs()
            );
            break;
        }
        if !arriving.is_empty() && !told {
            tracing::info!(
                "waiting for {} before looking at the media present",
                arriving.join(", ")
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    present
}

/// How often the daemon looks for systemd when it is not on the bus.
const FOLLOW_RETRY: Duration = Duration::from_secs(30);

/// Set while systemd is not on the bus, so the status line says so.
static SYSTEMD_ABSENT: AtomicBool = AtomicBool::new(false);

/// A stream of the unit's ActiveState, with its state and activation time now; fails
/// when systemd is not on the bus.
async fn follow(
    manager: &systemd::Systemd,
    unit: &str,
) -> Result<(
    Box<dyn futures_util::Stream<Item = String> + Unpin + Send>,
    String,
    u64,
)> {
    anyhow::ensure!(manager.present().await, "systemd is not on the bus");
    let states = manager.watch_active_state(unit).await?;
    let state = manager.active_state(unit).await?;
    let since = manager.active_since(unit).await?;
    Ok((Box::new(states), state, since))
}

/// Why work is abandoned when the daemon stops.
const STOPPING: &str = "longshore is stopping";

/// Waits for SIGTERM or SIGINT on a task of its own; then tells systemd, raises
/// `stopping` and abandons the work in hand. The receiver fires once that is done.
fn watch_signals(
    stopping: Cancel,
    current: Arc<Mutex<Current>>,
) -> Result<tokio::sync::oneshot::Receiver<()>> {
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("longshore daemon stopping");
        systemd::notify_stopping();
        stopping.cancel(STOPPING);
        lock(&current).cancel.cancel(STOPPING);
        let _ = tx.send(());
    });
    Ok(rx)
}

/// A piece of work for the worker.
enum Job {
    /// Bring the pin file in line with the sets.
    Sync,
    /// Check every set and put back what is missing.
    Heal,
    /// Copy into the store the images the fetcher brought into the cache whole so far
    /// (a heal), while it fetches on.
    Fetched,
    /// Import what a device carries, if it is bundle media.
    Device(BlockDevice),
    /// Import the rest of what a device present at start carries, once its critical
    /// bundles are in.
    Rest(BlockDevice),
    /// Answer a method call.
    Request(Request),
    /// Check every set, put back what is missing, and say how the sets are then (after
    /// a fetch the daemon was asked for).
    HealReply(tokio::sync::oneshot::Sender<Result<Vec<SetView>>>),
}

/// The work in hand, so the loop can abandon it.
#[derive(Default)]
struct Current {
    /// The device it reads, if it reads one.
    device: Option<PathBuf>,
    cancel: Cancel,
}

impl Current {
    fn device_gone(&self, devnode: &Path) {
        if self.device.as_deref() == Some(devnode) {
            tracing::warn!(
                "{} went away during the import; abandoning it",
                devnode.display()
            );
            self.cancel
                .cancel(&format!("{} went away", devnode.display()));
        }
    }
}

fn lock(c: &Mutex<Current>) -> std::sync::MutexGuard<'_, Current> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// Does the daemon's work, one job at a time.
struct Worker {
    paths: HostPaths,
    settings: Settings,
    api: Api,
    progress: crate::events::ProgressSender,
    sets: SetStates,
    current: Arc<Mutex<Current>>,
    sync_queued: Arc<AtomicBool>,
    /// Whether a [`Job::Fetched`] waits in the queue: one is enough.
    fetched_queued: Arc<AtomicBool>,
    /// The job in hand's token.
    cancel: Cancel,
    /// Raised when the daemon is told to stop.
    stopping: Cancel,
}

impl Worker {
    /// Takes jobs until the queue closes. Once the daemon stops, what is still queued is
    /// dropped (a waiting caller hears that the request was dropped).
    async fn serve(mut self, mut jobs: mpsc::UnboundedReceiver<Job>) -> Self {
        while let Some(job) = jobs.recv().await {
            if self.stopping.is_cancelled() {
                continue;
            }
            self.run(job).await;
        }
        self
    }

    /// Does one job with a fresh token, which the loop can raise.
    async fn run(&mut self, job: Job) {
        self.cancel = Cancel::default();
        {
            let mut c = lock(&self.current);
            // Once the daemon stops, a job that still starts (at start) is born abandoned.
            if self.stopping.is_cancelled() {
                self.cancel.cancel(STOPPING);
            }
            c.cancel = self.cancel.clone();
            c.device = match &job {
                Job::Device(d) | Job::Rest(d) => Some(d.devnode.clone()),
                _ => None,
            };
        }
        match job {
            Job::Sync => {
                self.sync_queued.store(false, Ordering::SeqCst);
                self.work(Work::Sync).await;
            }
            Job::Heal => {
                self.status("checking", "Checking image sets").await;
                self.work(Work::Heal).await;
            }
            Job::Fetched => {
                self.fetched_queued.store(false, Ordering::SeqCst);
                self.status("importing", "Importing fetched images").await;
                self.work(Work::Heal).await;
            }
            Job::Device(dev) => {
                // Most block devices are no bundle media and call for nothing.
                if self.on_device(dev, Pass::All).await != Handled::Ignored {
                    self.work(Work::Sync).await;
                }
            }
            Job::Rest(dev) => {
                self.on_device(dev, Pass::Rest).await;
                self.work(Work::Sync).await;
            }
            Job::Request(req) => self.on_request(req).await,
            Job::HealReply(reply) => {
                self.status("importing", "Importing fetched images").await;
                let res = async { self.engine()?.heal().await }.await;
                let views = res.as_ref().ok().cloned();
                if let Err(e) = &res {
                    tracing::error!("{e:#}");
                }
                let _ = reply.send(res);
                self.publish(views).await;
            }
        }
        lock(&self.current).device = None;
    }

    /// Says what the daemon does, on D-Bus and to systemd.
    async fn status(&self, state: &str, text: &str) {
        let text = if SYSTEMD_ABSENT.load(Ordering::SeqCst) {
            format!("{text}; systemd is not on the bus, so CRI-O is not followed or reloaded")
        } else {
            text.to_string()
        };
        let text = text.as_str();
        systemd::notify_status(text);
        if let Err(e) = self.api.set_status(state, text).await {
            tracing::debug!("D-Bus status: {e:#}");
        }
    }

    fn engine(&self) -> Result<Engine> {
        let mut e = Engine::open(self.paths.clone(), self.settings.clone())?;
        e.report_progress(self.progress.clone());
        e.cancel_with(self.cancel.clone());
        Ok(e)
    }

    /// Does one piece of work under the state lock, then publishes the result. A failure
    /// is logged, not fatal: the next event tries again.
    async fn work(&mut self, what: Work) {
        let res = async {
            let mut engine = self.engine()?;
            match what {
                Work::Sync => engine.sync().await,
                Work::Heal => engine.heal().await,
            }
        };
        let views = match res.await {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!("{e:#}");
                None
            }
        };
        self.publish(views).await;
    }

    /// Updates the set states, the D-Bus objects and the status line.
    async fn publish(&mut self, views: Option<Vec<SetView>>) {
        self.sets.update(&views);
        if let Some(views) = &views {
            let res = match State::load(&self.paths.state_dir) {
                Ok(state) => self.api.publish(&state, views).await,
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                tracing::warn!("publishing on D-Bus: {e:#}");
            }
        }
        let summary = self.sets.summary();
        self.status("idle", &summary).await;
    }

    /// Answers a method call.
    async fn on_request(&mut self, req: Request) {
        match req {
            Request::Import {
                path,
                hold,
                digest,
                reply,
            } => {
                self.status("importing", &format!("Importing {path}")).await;
                let opts = ImportOptions {
                    expected: digest,
                    hold,
                    restore: false,
                };
                let res = async { self.engine()?.import(Path::new(&path), &opts).await }.await;
                log_outcome(&path, &res);
                let _ = reply.send(res);
                self.work(Work::Sync).await;
            }
            Request::Verify {
                path,
                digest,
                reply,
            } => {
                self.status("checking", &format!("Verifying {path}")).await;
                let res = engine::verify(
                    Path::new(&path),
                    digest,
                    &self.settings,
                    &self.paths,
                    &self.cancel,
                )
                .await;
                let _ = reply.send(res);
                self.publish(None).await;
            }
            Request::Apply { bundle, reply } => {
                self.status("importing", &format!("Importing held bundle {bundle}"))
                    .await;
                let res = async { self.engine()?.apply(&bundle).await }.await;
                let _ = reply.send(res);
                self.work(Work::Sync).await;
            }
            Request::RemoveSet { name, reply } => {
                let res = async { self.engine()?.remove_set(&name).await }.await;
                let _ = reply.send(res);
                self.work(Work::Sync).await;
            }
            Request::CollectCache { reply } => {
                let res = async { self.engine()?.collect_cache() }.await;
                let _ = reply.send(res);
            }
            Request::Rescan { reply } => {
                self.status("checking", "Checking image sets").await;
                self.work(Work::Heal).await;
                let _ = reply.send(Ok(()));
            }
            // The fetcher answers these; the main loop hands them to it.
            Request::Fetch { reply, .. } => {
                let _ = reply.send(Err(anyhow::anyhow!("the fetcher is not running")));
            }
        }
    }

    /// At start: imports, from the devices present, the bundles that carry a critical
    /// set or an image a critical set names. Returns the devices that still have work
    /// for later (everything else they carry).
    async fn boot(&mut self, present: Vec<BlockDevice>) -> VecDeque<BlockDevice> {
        let critical = match self.critical_images() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("reading the critical sets: {e:#}");
                BTreeSet::new()
            }
        };
        let mut later = VecDeque::new();
        let mut imported = false;
        for dev in present {
            lock(&self.current).device = Some(dev.devnode.clone());
            match self.on_device(dev.clone(), Pass::Critical(&critical)).await {
                Handled::Left => later.push_back(dev),
                Handled::Done => imported = true,
                Handled::Ignored => {}
            }
            lock(&self.current).device = None;
        }
        if imported || !later.is_empty() {
            self.work(Work::Sync).await;
        }
        later
    }

    /// The digests of the images the node's critical sets name.
    fn critical_images(&self) -> Result<BTreeSet<Digest>> {
        let state = State::load(&self.paths.state_dir)?;
        let files = crate::sets::load_files(&self.paths)?;
        Ok(crate::sets::effective(&state, files)
            .iter()
            .filter(|s| s.critical)
            .flat_map(|s| s.images.iter())
            .filter_map(|r| match bundle::format::split_reference(r) {
                Some((_, bundle::format::RefTail::Digest(d))) => Some(d),
                _ => None,
            })
            .collect())
    }

    /// Imports what a device carries, if it is bundle media: everything, or in the
    /// critical pass at start only the bundles that carry critical sets (the device is
    /// then [`Handled::Left`] when it carries others).
    async fn on_device(&mut self, dev: BlockDevice, pass: Pass<'_>) -> Handled {
        let critical = match pass {
            Pass::Critical(c) => Some(c),
            Pass::All | Pass::Rest => None,
        };
        let what = format!(
            "{} ({}, label {:?})",
            dev.devnode.display(),
            dev.fs_type.as_deref().unwrap_or("no filesystem"),
            dev.label.as_deref().unwrap_or("")
        );
        let opts = ImportOptions {
            hold: self.settings.media.policy == MediaPolicy::Hold,
            ..Default::default()
        };
        let verdict = media::judge(&dev, &self.settings.media);
        if let Verdict::Ignore(why) = &verdict {
            tracing::debug!("not bundle media: {what}: {why}");
            return Handled::Ignored;
        }
        // A device left for later at start was announced then.
        if pass != Pass::Rest {
            let raw = if verdict == Verdict::RawTar {
                " holds a bundle written raw"
            } else {
                ""
            };
            tracing::info!(message_id = message_id::BUNDLE_DETECTED, device = %dev.devnode.display(), "bundle media: {what}{raw}");
        }
        let mut left = false;
        match verdict {
            Verdict::Ignore(_) => {}
            Verdict::RawTar => {
                let path = dev.devnode.clone();
                if critical.is_some_and(|c| !carries_critical(&path, c)) {
                    left = true;
                } else {
                    self.status(
                        "importing",
                        &format!("Importing the bundle on {}", dev.devnode.display()),
                    )
                    .await;
                    self.import(&path, None, &opts).await;
                }
            }
            Verdict::Mount(fs_type) => {
                match media::mount(&dev, &fs_type, &self.paths.run_dir.join("media")) {
                    Ok(m) => {
                        self.status(
                            "importing",
                            &format!("Importing the bundles on {}", dev.devnode.display()),
                        )
                        .await;
                        match critical {
                            None => self.import(&m.point.clone(), None, &opts).await,
                            Some(c) => {
                                left = self.import_critical(&m.point.clone(), c, &opts).await
                            }
                        }
                        m.unmount();
                    }
                    Err(e) => tracing::error!("{e:#}"),
                }
            }
        }
        if left {
            Handled::Left
        } else {
            Handled::Done
        }
    }

    /// Imports the inputs below `root` that carry critical sets; returns whether others
    /// were left.
    async fn import_critical(
        &mut self,
        root: &Path,
        critical: &BTreeSet<Digest>,
        opts: &ImportOptions,
    ) -> bool {
        let items = match bundle::detect(root) {
            Ok(Input::Collection(_, items)) => items,
            Ok(_) => vec![root.to_path_buf()],
            Err(e) => {
                log_outcome(&root.display().to_string(), &Err(e));
                return false;
            }
        };
        let mut left = false;
        for item in items {
            if carries_critical(&item, critical) {
                tracing::info!(
                    "{} carries a critical set; importing it before reporting ready",
                    item.display()
                );
                let within = (item != root).then_some(root);
                self.import(&item, within, opts).await;
            } else {
                left = true;
            }
        }
        left
    }

    /// Imports `path` (an item of the collection `root`, when given).
    async fn import(&mut self, path: &Path, root: Option<&Path>, opts: &ImportOptions) {
        let res = async {
            let mut engine = self.engine()?;
            match root {
                Some(root) => {
                    engine
                        .import_item(path, root, opts)
                        .await
                        .map(|r| engine::ImportOutcome {
                            reports: vec![r],
                            failures: vec![],
                        })
                }
                None => engine.import(path, opts).await,
            }
        }
        .await;
        log_outcome(&path.display().to_string(), &res);
    }
}

/// Whether the bundle at `path` declares a critical set or holds an image of one.
/// Foreign inputs declare no sets; anything unreadable is left for the import to report.
fn carries_critical(path: &Path, critical: &BTreeSet<Digest>) -> bool {
    let head = match bundle::detect(path) {
        Ok(Input::BundleDir(d)) => read::read_head_dir(&d, None),
        Ok(Input::BundleStream(p)) => read::read_head_stream(&p, None),
        _ => return false,
    };
    head.is_ok_and(|h| {
        h.meta.sets.iter().any(|s| s.critical)
            || h.meta.images.iter().any(|i| critical.contains(&i.digest))
    })
}

/// Which of a device's bundles to import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass<'a> {
    /// At start: those that carry critical sets (or images they name).
    Critical(&'a BTreeSet<Digest>),
    /// All of them.
    All,
    /// All of them, for a device whose critical pass was done (and announced) at start.
    Rest,
}

/// What became of a device.
#[derive(Debug, PartialEq, Eq)]
enum Handled {
    /// No bundle media.
    Ignored,
    /// Its bundles were imported (or failed, which is logged).
    Done,
    /// At start: some of its bundles wait until the daemon is ready.
    Left,
}

#[derive(Clone, Copy)]
enum Work {
    Sync,
    Heal,
}

fn log_outcome(path: &str, res: &Result<engine::ImportOutcome>) {
    match res {
        Ok(outcome) => {
            for r in &outcome.reports {
                tracing::info!("{}", r.summary());
            }
            for (p, e) in &outcome.failures {
                tracing::error!(message_id = message_id::BUNDLE_FAILED, input = %p.display(), "{}: {e:#}", p.display());
            }
        }
        Err(e) => {
            tracing::error!(message_id = message_id::BUNDLE_FAILED, input = %path, "{path}: {e:#}")
        }
    }
}

/// What the daemon last knew of each set, to log when one becomes ready or degraded and
/// to say it in one line for `systemctl status`.
#[derive(Default)]
struct SetStates {
    ready: std::collections::BTreeMap<String, bool>,
    degraded: Vec<String>,
    /// Critical sets that are not ready.
    critical_waiting: Vec<String>,
}

impl SetStates {
    fn update(&mut self, views: &Option<Vec<SetView>>) {
        let Some(views) = views else { return };
        let mut now = std::collections::BTreeMap::new();
        self.degraded.clear();
        self.critical_waiting.clear();
        for v in views {
            let cond = |k: &str| v.conditions.iter().find(|c| c.kind == k);
            let ready = cond("Ready").is_some_and(|c| c.status);
            if let Some(d) = cond("Degraded").filter(|c| c.status) {
                self.degraded.push(format!("{}: {}", v.name, d.message));
            }
            if self.ready.get(&v.name) != Some(&ready) {
                if ready {
                    tracing::info!(message_id = message_id::SET_READY, set = %v.name, "image set {} is ready", v.name);
                } else if let Some(d) = cond("Degraded").filter(|c| c.status) {
                    tracing::warn!(
                        message_id = message_id::SET_DEGRADED, set = %v.name, reason = d.reason,
                        "image set {} is degraded: {}", v.name, d.message
                    );
                }
            }
            if v.critical && !ready {
                self.critical_waiting.push(v.name.clone());
            }
            now.insert(v.name.clone(), ready);
        }
        self.ready = now;
    }

    fn summary(&self) -> String {
        let total = self.ready.len();
        let ready = self.ready.values().filter(|r| **r).count();
        let mut s = format!("Idle: {ready} of {total} image sets ready");
        if let Some(first) = self.degraded.first() {
            s.push_str(&format!("; degraded: {first}"));
            if self.degraded.len() > 1 {
                s.push_str(&format!(" (and {} more)", self.degraded.len() - 1));
            }
        }
        s
    }
}

/// The directories whose changes call for a sync, and whether to make each one if it
/// is missing (the shipped `/usr/lib` one is left alone).
fn watched_dirs(paths: &HostPaths) -> Vec<(PathBuf, bool)> {
    let mut dirs = vec![(paths.crio_conf_dir.clone(), true)];
    if let Some(parent) = paths.crio_conf_dir.parent() {
        dirs.push((parent.to_path_buf(), true));
    }
    for (i, d) in paths.config_dirs.iter().enumerate() {
        dirs.push((d.join("sets.d"), i > 0));
    }
    // The registries configuration: the mirror drop-in carries what the others say.
    let registries = paths.host(Path::new(crate::registry::conf::DROPIN_DIR));
    if let Some(parent) = registries.parent() {
        dirs.push((parent.to_path_buf(), true));
    }
    dirs.push((registries, true));
    dirs
}

/// inotify on a few directories, readable from tokio.
struct Watcher {
    events: inotify::EventStream<Vec<u8>>,
}

impl Watcher {
    fn new(dirs: &[(PathBuf, bool)]) -> Result<Watcher> {
        let ino = inotify::Inotify::init().context("starting inotify")?;
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::ATTRIB;
        for (d, make) in dirs {
            // A directory that does not exist yet is made, so a file dropped into it
            // later is seen.
            if *make && !d.exists() {
                // On a node the directories come from tmpfiles.d; one that cannot be made
                // (a read-only /etc) is not watched, and said so.
                if let Err(e) = std::fs::create_dir_all(d) {
                    tracing::warn!("{} will not be watched: creating it: {e}", d.display());
                }
            }
            if d.is_dir() {
                ino.watches()
                    .add(d, mask)
                    .with_context(|| format!("watching {}", d.display()))?;
            }
        }
        let events = ino
            .into_event_stream(vec![0u8; 4096])
            .context("reading inotify events")?;
        Ok(Watcher { events })
    }

    /// Waits for the next event.
    async fn changed(&mut self) -> Result<()> {
        match self.events.next().await {
            Some(ev) => ev.map(|_| ()).context("reading inotify events"),
            None => anyhow::bail!("inotify stopped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sets::{Condition, Source};

    fn view(name: &str, ready: bool, degraded: Option<&str>, critical: bool) -> SetView {
        let c = |kind: &'static str, status: bool, message: &str| Condition {
            kind,
            status,
            reason: "Test",
            message: message.to_string(),
        };
        SetView {
            name: name.into(),
            source: Source::File {
                path: PathBuf::from("/etc/longshore/sets.d/x.toml"),
            },
            pinned: true,
            critical,
            images: vec![],
            missing: vec![],
            bytes_on_disk: 0,
            conditions: vec![
                c("Ready", ready, ""),
                c("Degraded", degraded.is_some(), degraded.unwrap_or("")),
            ],
            pins: vec![],
        }
    }

    #[test]
    fn the_status_line_counts_ready_sets_and_names_the_first_degraded() {
        let mut s = SetStates::default();
        s.update(&Some(vec![
            view("a", true, None, false),
            view("b", false, Some("missing example.com/b"), true),
            view("c", false, Some("missing example.com/c"), false),
        ]));
        assert_eq!(
            s.summary(),
            "Idle: 1 of 3 image sets ready; degraded: b: missing example.com/b (and 1 more)"
        );
        assert_eq!(s.critical_waiting, ["b"]);
        // No new views (a failed check): what was known stays.
        s.update(&None);
        assert_eq!(s.ready.len(), 3);
        s.update(&Some(vec![view("a", true, None, false)]));
        assert_eq!(s.summary(), "Idle: 1 of 1 image sets ready");
        assert!(s.critical_waiting.is_empty());
    }

    #[test]
    fn changes_to_crio_drop_ins_and_set_files_are_watched() {
        let paths = HostPaths::new(Path::new("/sysroot"));
        let dirs = watched_dirs(&paths);
        assert!(dirs.contains(&(PathBuf::from("/sysroot/etc/crio/crio.conf.d"), true)));
        // The shipped directory under /usr/lib is watched but never made.
        assert!(dirs
            .iter()
            .any(|(d, make)| d.ends_with("sets.d") && d.starts_with("/sysroot/usr") && !make));
        assert!(dirs
            .iter()
            .any(|(d, make)| d == Path::new("/sysroot/etc/longshore/sets.d") && *make));
    }

    #[test]
    fn a_bundle_carries_critical_images_when_it_holds_one_a_critical_set_names() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("b");
        let (_, meta) = crate::bundle::testkit::bundle(
            t.path(),
            &dir,
            &[("example.com/x:1", vec![vec![1u8; 10]])],
        );
        assert!(!carries_critical(&dir, &BTreeSet::new()));
        assert!(carries_critical(&dir, &[meta.images[0].digest].into()));
        assert!(!carries_critical(
            &t.path().join("nothing"),
            &BTreeSet::new()
        ));
    }
}
