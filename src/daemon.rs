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
use crate::systemd::Systemd;

/// How long a burst of file events is gathered before one sync.
const SETTLE: Duration = Duration::from_millis(200);

/// Runs until SIGTERM or SIGINT.
pub async fn run(paths: HostPaths, settings: Settings) -> Result<()> {
    let unit = settings.crio.unit.clone();
    let systemd = Systemd::connect(settings.bus).await?;
    let mut states = systemd.watch_active_state(&unit).await?;
    let mut last_state = systemd.active_state(&unit).await?;
    let mut last_since = systemd.active_since(&unit).await?;
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

    work(&paths, &settings, Work::Heal).await;
    tracing::info!("ready: following {unit} and the configuration directories");
    loop {
        tokio::select! {
            r = watcher.changed() => {
                r?;
                // Gather the rest of a burst (a rename is several events).
                while let Ok(r) = tokio::time::timeout(SETTLE, watcher.changed()).await {
                    r?;
                }
                work(&paths, &settings, Work::Sync).await;
            }
            state = states.next() => {
                let Some(state) = state else {
                    anyhow::bail!("lost the D-Bus connection to systemd");
                };
                if state == "active" {
                    let since = systemd.active_since(&unit).await.unwrap_or_default();
                    if last_state != "active" || since != last_since {
                        tracing::info!("{unit} became active; checking that the store still holds every set");
                        work(&paths, &settings, Work::Heal).await;
                    }
                    last_since = since;
                }
                last_state = state;
            }
            Some(dev) = media_rx.recv(), if media_on => {
                if seen.is_new(&dev) {
                    on_device(&paths, &settings, dev).await;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("longshore daemon stopping");
    Ok(())
}

#[derive(Clone, Copy)]
enum Work {
    Sync,
    Heal,
}

/// Does one piece of work under the state lock. A failure is logged, not fatal: the
/// next event tries again.
async fn work(paths: &HostPaths, settings: &Settings, what: Work) {
    let res = async {
        let mut engine = Engine::open(paths.clone(), settings.clone())?;
        match what {
            Work::Sync => engine.sync().await,
            Work::Heal => engine.heal().await,
        }
    }
    .await;
    match res {
        Ok(views) => {
            for v in views.iter().filter(|v| !v.missing.is_empty()) {
                tracing::warn!(
                    "set {} is degraded: {} of {} images missing",
                    v.name,
                    v.missing.len(),
                    v.images.len()
                );
            }
        }
        Err(e) => tracing::error!("{e:#}"),
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
            tracing::info!("bundle media: {what} holds a bundle written raw");
            import(paths, settings, &dev.devnode.clone(), &opts).await;
        }
        Verdict::Mount(fs_type) => {
            tracing::info!("bundle media: {what}");
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
                tracing::error!("{}: {e:#}", p.display());
            }
        }
        Err(e) => tracing::error!("{}: {e:#}", path.display()),
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
