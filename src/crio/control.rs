//! CRI-O control: reloading or restarting its unit over systemd's D-Bus API, only when
//! this host's CRI-O is the one the files were written for.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::{Bus, Settings};
use crate::paths::HostPaths;
use crate::systemd::{Reload, Systemd};

/// Reloads and restarts CRI-O after its drop-ins changed.
pub struct Control {
    unit: String,
    reload: bool,
    allow_restart: bool,
    bus: Bus,
    sysroot: PathBuf,
    /// The pin file, named in messages.
    pin_file: PathBuf,
    systemd: Option<Systemd>,
}

impl Control {
    /// Control of the CRI-O of the node at `paths`, as configured.
    pub fn new(settings: &Settings, paths: &HostPaths, pin_file: PathBuf) -> Control {
        Control {
            unit: settings.crio.unit.clone(),
            reload: settings.crio.reload,
            allow_restart: settings.crio.allow_restart,
            bus: settings.bus,
            sysroot: paths.sysroot.clone(),
            pin_file,
            systemd: None,
        }
    }

    async fn systemd(&mut self) -> Result<Systemd> {
        if let Some(s) = &self.systemd {
            return Ok(s.clone());
        }
        let s = Systemd::connect(self.bus).await?;
        self.systemd = Some(s.clone());
        Ok(s)
    }

    /// Whether CRI-O is this host's to reload: not when `--sysroot` names another node's
    /// disk (prepared offline, the factory case), whose CRI-O reads the new files when
    /// that node boots; the running host's CRI-O on the system bus is never its CRI-O.
    pub fn is_ours(&self) -> bool {
        let ours = self.sysroot == Path::new("/") || self.bus != Bus::System;
        if !ours {
            tracing::info!(
                "{} is not reloaded: {} is another node's root, whose CRI-O reads the files when it starts",
                self.unit,
                self.sysroot.display()
            );
        }
        ours
    }

    /// Whether systemd is on the bus to reload CRI-O through; without it (a container, a
    /// machine not booted with systemd) the files are written and CRI-O reads them when
    /// it starts.
    async fn manager_present(&mut self) -> Result<bool> {
        let (pins, unit) = (self.pin_file.clone(), self.unit.clone());
        let sd = self.systemd().await.with_context(|| {
            format!(
                "the pins are written to {}, but {unit} cannot be reloaded",
                pins.display()
            )
        })?;
        if sd.present().await {
            return Ok(true);
        }
        tracing::warn!(
            "systemd is not on the {} bus, so {} was not reloaded; CRI-O reads {} when it starts",
            self.bus.name(),
            self.unit,
            self.pin_file.display()
        );
        Ok(false)
    }

    /// Reloads CRI-O so it reads its pins again (`ReloadUnit`, then the job's result),
    /// when it is active, configured to be reloaded, and this host's.
    pub async fn reload(&mut self) -> Result<()> {
        let unit = self.unit.clone();
        if !self.reload {
            tracing::info!("{unit} not reloaded ([crio] reload = false)");
            return Ok(());
        }
        if !self.is_ours() || !self.manager_present().await? {
            return Ok(());
        }
        let pins = self.pin_file.clone();
        let outcome = async { self.systemd().await?.reload(&unit).await }
            .await
            .with_context(|| {
                format!(
                    "the pins are written to {}, but {unit} was not reloaded",
                    pins.display()
                )
            })?;
        match outcome {
            Reload::Done => tracing::info!("reloaded {unit}"),
            Reload::NotActive(state) => tracing::info!(
                "{unit} is {state}, so it was not reloaded; CRI-O reads the pins when it starts"
            ),
        }
        Ok(())
    }

    /// Restarts CRI-O for a new image store configuration, when allowed; otherwise says a
    /// restart is needed and reloads the pins.
    pub async fn restart(&mut self) -> Result<()> {
        let unit = self.unit.clone();
        if !self.allow_restart {
            tracing::warn!(
                "CRI-O's image store configuration changed; it takes effect when {unit} restarts \
                 (`systemctl restart {unit}`; set [crio] allow_restart = true to let longshore do it)"
            );
            // The pins still reload without a restart.
            return self.reload().await;
        }
        if !self.is_ours() || !self.manager_present().await? {
            return Ok(());
        }
        let sd = self.systemd().await?;
        if sd.active_state(&unit).await? != "active" {
            tracing::info!("{unit} is not active; it reads the new configuration when it starts");
            return Ok(());
        }
        sd.restart(&unit)
            .await
            .with_context(|| format!("restarting {unit} for its new image store"))?;
        tracing::info!("restarted {unit}");
        Ok(())
    }
}
