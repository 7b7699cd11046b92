//! systemd: over D-Bus (`org.freedesktop.systemd1`), reload or restart a unit and wait
//! for the job to finish, and follow a unit's `ActiveState`; over `$NOTIFY_SOCKET`
//! (sd_notify), tell the service manager how the daemon is doing; and the journal's
//! fixed message IDs.
//!
//! A job is followed by its `JobRemoved` signal, whose `result` says how it ended (`done`,
//! `canceled`, `timeout`, `failed`, `dependency`, `skipped`); see
//! org.freedesktop.systemd1(5). The signal stream is opened before the job is queued, so
//! a job that ends at once is not missed.

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use zbus::zvariant::OwnedObjectPath;
use zbus::Connection;

use crate::config::Bus;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn reload_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_enter_timestamp_monotonic(&self) -> zbus::Result<u64>;
}

/// How long a reload or restart job may take before longshore stops waiting.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// A job that did not end well.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job ended with a result other than `done`.
    #[error("{verb} of {unit} failed: systemd reports job result {result:?}; see `journalctl -u {unit}`")]
    Failed {
        /// `reload` or `restart`.
        verb: &'static str,
        /// The unit.
        unit: String,
        /// The job's result.
        result: String,
    },
    /// The job did not end in time.
    #[error("{verb} of {unit} did not finish within {secs} s")]
    Timeout {
        /// `reload` or `restart`.
        verb: &'static str,
        /// The unit.
        unit: String,
        /// The time waited.
        secs: u64,
    },
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The unit was reloaded.
    Done,
    /// The unit is not active (its `ActiveState` is given), so nothing was done; it
    /// reads its configuration when it starts.
    NotActive(String),
}

/// A connection to systemd.
#[derive(Clone)]
pub struct Systemd {
    conn: Connection,
}

impl Systemd {
    /// Connects to the bus systemd is on: the system bus for the system manager, the
    /// session bus for a user manager (tests).
    pub async fn connect(bus: Bus) -> Result<Systemd> {
        let conn = match bus {
            Bus::System => Connection::system().await,
            Bus::Session => Connection::session().await,
        }
        .with_context(|| format!("connecting to the {} bus", bus.name()))?;
        Ok(Systemd { conn })
    }

    /// Whether a service manager (`org.freedesktop.systemd1`) is on the bus: not in a
    /// container or on a machine whose init is not systemd.
    pub async fn present(&self) -> bool {
        let Ok(dbus) = zbus::fdo::DBusProxy::new(&self.conn).await else {
            return false;
        };
        let Ok(name) = zbus::names::BusName::try_from("org.freedesktop.systemd1") else {
            return false;
        };
        dbus.name_has_owner(name).await.unwrap_or(false)
    }

    /// The connection, to share with other services on the same bus.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    async fn manager(&self) -> Result<ManagerProxy<'static>> {
        ManagerProxy::new(&self.conn)
            .await
            .context("reaching systemd's manager object")
    }

    async fn unit(&self, name: &str) -> Result<UnitProxy<'static>> {
        let path = self
            .manager()
            .await?
            .load_unit(name)
            .await
            .with_context(|| format!("loading unit {name}"))?;
        UnitProxy::builder(&self.conn)
            .path(path)?
            .build()
            .await
            .with_context(|| format!("reaching unit {name}"))
    }

    /// The unit's `ActiveState` (`active`, `inactive`, `failed`, `activating`, …).
    pub async fn active_state(&self, unit: &str) -> Result<String> {
        self.unit(unit)
            .await?
            .active_state()
            .await
            .with_context(|| format!("reading ActiveState of {unit}"))
    }

    /// When the unit last became active (monotonic µs; 0 if never). Unlike `ActiveState`,
    /// this tells two activations apart even when the manager reports only the end of
    /// a quick restart.
    pub async fn active_since(&self, unit: &str) -> Result<u64> {
        self.unit(unit)
            .await?
            .active_enter_timestamp_monotonic()
            .await
            .with_context(|| format!("reading ActiveEnterTimestampMonotonic of {unit}"))
    }

    /// Reloads `unit` if it is active, and waits for the job to finish.
    pub async fn reload(&self, unit: &str) -> Result<Reload> {
        let state = self.active_state(unit).await?;
        if state != "active" {
            return Ok(Reload::NotActive(state));
        }
        self.run_job("reload", unit).await?;
        Ok(Reload::Done)
    }

    /// Restarts `unit` and waits for the job to finish.
    pub async fn restart(&self, unit: &str) -> Result<()> {
        self.run_job("restart", unit).await
    }

    async fn run_job(&self, verb: &'static str, unit: &str) -> Result<()> {
        let manager = self.manager().await?;
        // Without a subscription the manager sends no job signals. Subscribing twice
        // from one connection is harmless.
        if let Err(e) = manager.subscribe().await {
            tracing::debug!("systemd Subscribe: {e}");
        }
        let mut removed = manager
            .receive_job_removed()
            .await
            .context("listening for systemd's JobRemoved")?;
        let job = match verb {
            "restart" => manager.restart_unit(unit, "replace").await,
            _ => manager.reload_unit(unit, "replace").await,
        }
        .with_context(|| format!("asking systemd to {verb} {unit}"))?;
        tracing::debug!(%unit, job = %job.as_str(), "{verb} job queued");
        let wait = async {
            while let Some(sig) = removed.next().await {
                let args = sig.args().context("reading JobRemoved")?;
                if args.job.as_str() == job.as_str() {
                    return Ok(args.result);
                }
            }
            anyhow::bail!("the bus connection closed while waiting for the {verb} of {unit}")
        };
        let result = tokio::time::timeout(JOB_TIMEOUT, wait)
            .await
            .map_err(|_| JobError::Timeout {
                verb,
                unit: unit.to_string(),
                secs: JOB_TIMEOUT.as_secs(),
            })??;
        if result != "done" {
            return Err(JobError::Failed {
                verb,
                unit: unit.to_string(),
                result,
            }
            .into());
        }
        Ok(())
    }

    /// A stream of the unit's `ActiveState`, one item per change.
    pub async fn watch_active_state(
        &self,
        unit: &str,
    ) -> Result<impl futures_util::Stream<Item = String> + Unpin + use<>> {
        // The manager sends unit signals, PropertiesChanged included, only to subscribers.
        if let Err(e) = self.manager().await?.subscribe().await {
            tracing::debug!("systemd Subscribe: {e}");
        }
        let proxy = self.unit(unit).await?;
        let changes = proxy.receive_active_state_changed().await;
        Ok(Box::pin(
            changes.filter_map(|c| async move { c.get().await.ok() }),
        ))
    }
}

/// Tells the service manager the daemon is ready, with a status line.
pub fn notify_ready(status: &str) {
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Sets the status line `systemctl status` shows.
pub fn notify_status(status: &str) {
    notify(&[sd_notify::NotifyState::Status(status)]);
}

/// Tells the service manager the daemon is stopping.
pub fn notify_stopping() {
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("Stopping"),
    ]);
}

/// Pings the service manager's watchdog.
pub fn notify_watchdog() {
    notify(&[sd_notify::NotifyState::Watchdog]);
}

/// The watchdog interval the service manager asks for (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    // Without $NOTIFY_SOCKET (a command run by hand) this does nothing.
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Fixed `MESSAGE_ID`s of the journal entries people search for
/// (`journalctl MESSAGE_ID=…`); listed in docs/journal.md.
pub mod message_id {
    /// Bundle media (or a bundle on them) was detected.
    pub const BUNDLE_DETECTED: &str = "0694dbaaaeb14384977c32f6c298f544";
    /// A bundle was imported: every image is in the store.
    pub const BUNDLE_IMPORTED: &str = "dace14cd1ca4471f8697171a376ea349";
    /// A bundle could not be imported.
    pub const BUNDLE_FAILED: &str = "2fb6a1ccf3be4217bfe8bf4d0cd12a1c";
    /// An image set became ready: every image present (and pinned).
    pub const SET_READY: &str = "df616eee526b4fe6a680ffd21c99cea5";
    /// An image set became degraded: images missing, or its pins overridden.
    pub const SET_DEGRADED: &str = "328f2117836047cca39fa15ca07e43e1";
}
