//! `longshore daemon`: keeps CRI-O's pins in line with the image sets and with CRI-O's
//! other drop-ins, and heals the store when CRI-O (re)starts.
//!
//! It serves `io.longshore.Longshore1` on D-Bus (see [`crate::api`]) and reacts to five
//! things, one at a time:
//! - a method call of that service (an import, a verification, …);
//! - a block device that udev reports (see [`crate::media`]): bundle media are mounted
//!   read-only, their bundles imported (or held, by `[media] policy`), and unmounted;
//! - a change in `/etc/crio/crio.conf.d`, `/etc/crio` or a `sets.d` directory (inotify):
//!   another file's pins or a set changed, so the pin file is synced;
//! - CRI-O's unit becoming active again (its `ActiveState` over D-Bus): an unclean
//!   shutdown may have made CRI-O wipe its storage, so every set is checked and lost
//!   images are put back from retained bundles;
//! - SIGTERM or SIGINT: it stops.
//!
//! The state lock is taken for each piece of work, so `longshore import` can run beside
//! the daemon.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use inotify::WatchMask;
use tokio::signal::unix::{signal, SignalKind};

use tokio::sync::mpsc;

use crate::api::{self, Api, Request};
use crate::config::{MediaPolicy, Settings};
use crate::engine::{self, Engine, ImportOptions};
use crate::media::{self, Verdict};
use crate::paths::HostPaths;
use crate::sets::SetView;
use crate::state::State;
use crate::systemd::{self, message_id};

/// How long a burst of file events is gathered before one sync.
const SETTLE: Duration = Duration::from_millis(200);

/// Runs until SIGTERM or SIGINT.
pub async fn run(paths: HostPaths, settings: Settings) -> Result<()> {
    let unit = settings.crio.unit.clone();
    let manager = systemd::Systemd::connect(settings.bus).await?;
    let mut states = manager.watch_active_state(&unit).await?;
    let mut last_state = manager.active_state(&unit).await?;
    let mut last_since = manager.active_since(&unit).await?;
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
    let api = Api::serve(settings.bus, requests_tx).await?;
    let (progress_tx, progress_rx) = mpsc::unbounded_channel();
    api::forward_progress(api.connection(), progress_rx);
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    tracing::info!("longshore daemon started; {unit} is {last_state}");

    let mut d = Daemon {
        paths,
        settings,
        api,
        progress: progress_tx,
        sets: SetStates::default(),
    };
    d.work("checking", Work::Heal).await;
    tracing::info!("ready: following {unit} and the configuration directories");
    systemd::notify_ready(&d.sets.summary());
    let mut watchdog = systemd::watchdog_interval().map(|p| tokio::time::interval(p / 2));
    loop {
        tokio::select! {
            _ = async { watchdog.as_mut().expect("checked by the guard").tick().await }, if watchdog.is_some() => {
                systemd::notify_watchdog();
            }
            Some(req) = requests.recv() => {
                if let Some(rescan) = d.on_request(req).await {
                    // A rescan looks at every device again.
                    seen = media::Seen::default();
                    if media_on {
                        if let Err(e) = media::enumerate(&media_tx) {
                            tracing::warn!("rescanning block devices: {e:#}");
                        }
                    }
                    let _ = rescan.send(Ok(()));
                }
            }
            r = watcher.changed() => {
                r?;
                // Gather the rest of a burst (a rename is several events).
                while let Ok(r) = tokio::time::timeout(SETTLE, watcher.changed()).await {
                    r?;
                }
                d.work("checking", Work::Sync).await;
            }
            state = states.next() => {
                let Some(state) = state else {
                    anyhow::bail!("lost the D-Bus connection to systemd");
                };
                if state == "active" {
                    let since = manager.active_since(&unit).await.unwrap_or_default();
                    if last_state != "active" || since != last_since {
                        tracing::info!("{unit} became active; checking that the store still holds every set");
                        d.status("checking", &format!("Checking image sets: {unit} became active")).await;
                        d.work("checking", Work::Heal).await;
                    }
                    last_since = since;
                }
                last_state = state;
            }
            Some(dev) = media_rx.recv(), if media_on => {
                if seen.is_new(&dev) {
                    d.on_device(dev).await;
                    d.work("checking", Work::Sync).await;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("longshore daemon stopping");
    systemd::notify_stopping();
    d.status("stopping", "Stopping").await;
    Ok(())
}

/// The daemon's parts, for the handlers.
struct Daemon {
    paths: HostPaths,
    settings: Settings,
    api: Api,
    progress: mpsc::UnboundedSender<api::Progress>,
    sets: SetStates,
}

#[derive(Clone, Copy)]
enum Work {
    Sync,
    Heal,
}

impl Daemon {
    /// Says what the daemon does, on D-Bus and to systemd.
    async fn status(&self, state: &str, text: &str) {
        systemd::notify_status(text);
        if let Err(e) = self.api.set_status(state, text).await {
            tracing::debug!("D-Bus status: {e:#}");
        }
    }

    fn engine(&self) -> Result<Engine> {
        let mut e = Engine::open(self.paths.clone(), self.settings.clone())?;
        e.report_progress(self.progress.clone());
        Ok(e)
    }

    /// Does one piece of work under the state lock, then publishes the result. A failure
    /// is logged, not fatal: the next event tries again.
    async fn work(&mut self, state: &str, what: Work) {
        let res = async {
            let mut engine = self.engine()?;
            match what {
                Work::Sync => engine.sync().await,
                Work::Heal => engine.heal().await,
            }
        };
        self.status(state, "Checking image sets").await;
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

    /// Answers a method call. A `Rescan` is answered by the caller, once it has
    /// restarted the device scan: its reply is handed back.
    async fn on_request(
        &mut self,
        req: Request,
    ) -> Option<tokio::sync::oneshot::Sender<Result<()>>> {
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
                let res = async {
                    self.engine()?
                        .import(std::path::Path::new(&path), &opts)
                        .await
                }
                .await;
                log_outcome(&path, &res);
                let _ = reply.send(res);
                self.work("checking", Work::Sync).await;
            }
            Request::Verify {
                path,
                digest,
                reply,
            } => {
                self.status("checking", &format!("Verifying {path}")).await;
                let res = engine::verify(std::path::Path::new(&path), digest, &self.settings).await;
                let _ = reply.send(res);
                self.publish(None).await;
            }
            Request::Apply { bundle, reply } => {
                self.status("importing", &format!("Importing held bundle {bundle}"))
                    .await;
                let res = async { self.engine()?.apply(&bundle).await }.await;
                let _ = reply.send(res);
                self.work("checking", Work::Sync).await;
            }
            Request::RemoveSet { name, reply } => {
                let res = async { self.engine()?.remove_set(&name).await }.await;
                let _ = reply.send(res);
                self.work("checking", Work::Sync).await;
            }
            Request::Rescan { reply } => {
                self.work("checking", Work::Heal).await;
                return Some(reply);
            }
        }
        None
    }

    /// Imports what a device carries, if it is bundle media.
    async fn on_device(&mut self, dev: media::BlockDevice) {
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
        match media::judge(&dev, &self.settings.media) {
            Verdict::Ignore(why) => tracing::debug!("not bundle media: {what}: {why}"),
            Verdict::RawTar => {
                tracing::info!(message_id = message_id::BUNDLE_DETECTED, device = %dev.devnode.display(), "bundle media: {what} holds a bundle written raw");
                self.status(
                    "importing",
                    &format!("Importing the bundle on {}", dev.devnode.display()),
                )
                .await;
                self.import(&dev.devnode, &opts).await;
            }
            Verdict::Mount(fs_type) => {
                tracing::info!(message_id = message_id::BUNDLE_DETECTED, device = %dev.devnode.display(), "bundle media: {what}");
                self.status(
                    "importing",
                    &format!("Importing the bundles on {}", dev.devnode.display()),
                )
                .await;
                match media::mount(&dev, &fs_type, &self.paths.run_dir.join("media")) {
                    Ok(m) => {
                        self.import(&m.point.clone(), &opts).await;
                        m.unmount();
                    }
                    Err(e) => tracing::error!("{e:#}"),
                }
            }
        }
    }

    async fn import(&mut self, path: &std::path::Path, opts: &ImportOptions) {
        let res = async { self.engine()?.import(path, opts).await }.await;
        log_outcome(&path.display().to_string(), &res);
    }
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
}

impl SetStates {
    fn update(&mut self, views: &Option<Vec<SetView>>) {
        let Some(views) = views else { return };
        let mut now = std::collections::BTreeMap::new();
        self.degraded.clear();
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
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
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
