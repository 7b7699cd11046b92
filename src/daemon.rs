//! `longshore daemon`: keeps CRI-O's pins in line with the image sets and with CRI-O's
//! other drop-ins, and heals the store when CRI-O (re)starts.
//!
//! It reacts to four things:
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

use crate::config::{MediaPolicy, Settings};
use crate::engine::{Engine, ImportOptions};
use crate::media::{self, Verdict};
use crate::paths::HostPaths;
use crate::sets::SetView;
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
    let (media_tx, mut media_rx) = tokio::sync::mpsc::unbounded_channel();
    let media_on = match media::spawn_monitor(media_tx) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("bundle media will not be noticed: {e:#}");
            false
        }
    };
    let mut seen = media::Seen::default();
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    tracing::info!("longshore daemon started; {unit} is {last_state}");

    let mut sets = SetStates::default();
    let views = work(&paths, &settings, Work::Heal).await;
    sets.update(&views);
    tracing::info!("ready: following {unit} and the configuration directories");
    systemd::notify_ready(&sets.summary());
    let mut watchdog = systemd::watchdog_interval().map(|d| tokio::time::interval(d / 2));
    loop {
        tokio::select! {
            _ = async { watchdog.as_mut().expect("checked by the guard").tick().await }, if watchdog.is_some() => {
                systemd::notify_watchdog();
            }
            r = watcher.changed() => {
                r?;
                // Gather the rest of a burst (a rename is several events).
                while let Ok(r) = tokio::time::timeout(SETTLE, watcher.changed()).await {
                    r?;
                }
                let views = work(&paths, &settings, Work::Sync).await;
                sets.update(&views);
                systemd::notify_status(&sets.summary());
            }
            state = states.next() => {
                let Some(state) = state else {
                    anyhow::bail!("lost the D-Bus connection to systemd");
                };
                if state == "active" {
                    let since = manager.active_since(&unit).await.unwrap_or_default();
                    if last_state != "active" || since != last_since {
                        tracing::info!("{unit} became active; checking that the store still holds every set");
                        systemd::notify_status(&format!("Checking image sets: {unit} became active"));
                        let views = work(&paths, &settings, Work::Heal).await;
                        sets.update(&views);
                        systemd::notify_status(&sets.summary());
                    }
                    last_since = since;
                }
                last_state = state;
            }
            Some(dev) = media_rx.recv(), if media_on => {
                if seen.is_new(&dev) {
                    on_device(&paths, &settings, dev).await;
                    let views = work(&paths, &settings, Work::Sync).await;
                    sets.update(&views);
                    systemd::notify_status(&sets.summary());
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("longshore daemon stopping");
    systemd::notify_stopping();
    Ok(())
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

#[derive(Clone, Copy)]
enum Work {
    Sync,
    Heal,
}

/// Does one piece of work under the state lock. A failure is logged, not fatal: the
/// next event tries again.
async fn work(paths: &HostPaths, settings: &Settings, what: Work) -> Option<Vec<SetView>> {
    let res = async {
        let mut engine = Engine::open(paths.clone(), settings.clone())?;
        match what {
            Work::Sync => engine.sync().await,
            Work::Heal => engine.heal().await,
        }
    }
    .await;
    match res {
        Ok(views) => Some(views),
        Err(e) => {
            tracing::error!("{e:#}");
            None
        }
    }
}

/// Imports what a device carries, if it is bundle media.
async fn on_device(paths: &HostPaths, settings: &Settings, dev: media::BlockDevice) {
    let what = format!(
        "{} ({}, label {:?})",
        dev.devnode.display(),
        dev.fs_type.as_deref().unwrap_or("no filesystem"),
        dev.label.as_deref().unwrap_or("")
    );
    let opts = ImportOptions {
        hold: settings.media.policy == MediaPolicy::Hold,
        ..Default::default()
    };
    match media::judge(&dev, &settings.media) {
        Verdict::Ignore(why) => tracing::debug!("not bundle media: {what}: {why}"),
        Verdict::RawTar => {
            tracing::info!(message_id = message_id::BUNDLE_DETECTED, device = %dev.devnode.display(), "bundle media: {what} holds a bundle written raw");
            systemd::notify_status(&format!(
                "Importing the bundle on {}",
                dev.devnode.display()
            ));
            import(paths, settings, &dev.devnode.clone(), &opts).await;
        }
        Verdict::Mount(fs_type) => {
            tracing::info!(message_id = message_id::BUNDLE_DETECTED, device = %dev.devnode.display(), "bundle media: {what}");
            systemd::notify_status(&format!(
                "Importing the bundles on {}",
                dev.devnode.display()
            ));
            match media::mount(&dev, &fs_type, &paths.run_dir.join("media")) {
                Ok(m) => {
                    import(paths, settings, &m.point.clone(), &opts).await;
                    m.unmount();
                }
                Err(e) => tracing::error!("{e:#}"),
            }
        }
    }
}

async fn import(
    paths: &HostPaths,
    settings: &Settings,
    path: &std::path::Path,
    opts: &ImportOptions,
) {
    let res = async {
        let mut engine = Engine::open(paths.clone(), settings.clone())?;
        engine.import(path, opts).await
    }
    .await;
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
            tracing::error!(message_id = message_id::BUNDLE_FAILED, input = %path.display(), "{}: {e:#}", path.display())
        }
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
