//! The D-Bus service `io.longshore.Longshore1`: the daemon's state as properties, its
//! actions as methods, a `Progress` signal while images are copied, and one object per
//! bundle and per image set below `/io/longshore/Longshore1`, which carries
//! `org.freedesktop.DBus.ObjectManager`.
//!
//! Methods hand their work to the daemon over a channel and wait for the answer; the
//! daemon queues it with media and file events and does one piece of work at a time. Errors are named D-Bus errors under `io.longshore.Longshore1.Error`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};
use zbus::{interface, Connection};

use crate::config::Bus;
use crate::engine::{ImportOutcome, ImportReport, VerifyReport};
use crate::error::ErrorKind;
use crate::sets::{SetView, Source};
use crate::state::State;

/// The service's well-known name.
pub const BUS_NAME: &str = "io.longshore.Longshore1";
/// The manager object.
pub const PATH: &str = "/io/longshore/Longshore1";

/// The sharing object.
pub const SHARING_PATH: &str = "/io/longshore/Longshore1/Sharing";

/// The named errors of the API.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "io.longshore.Longshore1.Error")]
pub enum ApiError {
    /// A D-Bus failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The input was refused: malformed, not a bundle, a digest or size that does not
    /// match, a hostile tar entry, or not the digest required.
    Rejected(String),
    /// Not enough free space.
    NoSpace(String),
    /// No such bundle or set.
    NotFound(String),
    /// The options are wrong.
    InvalidArgs(String),
    /// The work was abandoned before it finished: the daemon is stopping, or the device
    /// it read from went away. What was copied stays; the same call later resumes.
    Abandoned(String),
    /// Anything else; the message says what.
    Failed(String),
}

impl ApiError {
    /// The API's error for an engine error: its [`ErrorKind`], with the whole message.
    pub fn from_anyhow(e: &anyhow::Error) -> ApiError {
        let text = format!("{e:#}");
        match ErrorKind::of(e) {
            ErrorKind::Rejected => ApiError::Rejected(text),
            ErrorKind::NoSpace => ApiError::NoSpace(text),
            ErrorKind::NotFound => ApiError::NotFound(text),
            ErrorKind::Abandoned => ApiError::Abandoned(text),
            ErrorKind::Failed => ApiError::Failed(text),
        }
    }
}

/// One import's result as D-Bus carries it, `(sssuuut)`: the engine's [`ImportReport`]
/// field for field, so the other side gets the report itself back (digest, name, state,
/// images copied, images already present, images in all, bytes verified).
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, zbus::zvariant::Type,
)]
pub struct ImportResult {
    /// `sha256:…` of the bundle.
    pub digest: String,
    /// The bundle's name.
    pub name: String,
    /// The state it ended in (`held`, `importing`, `imported`).
    pub state: String,
    /// Images copied into the store.
    pub copied: u32,
    /// Images the store already held.
    pub present: u32,
    /// The bundle's images.
    pub images: u32,
    /// Bytes hashed while verifying it.
    pub bytes_verified: u64,
}

/// What a cache collection did, as `CollectCache` returns it: `uttuu`, blobs evicted,
/// bytes freed, bytes left, blobs referenced, unreferenced blobs kept.
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, zbus::zvariant::Type,
)]
pub struct Collected {
    /// Blobs evicted.
    pub evicted: u32,
    /// Bytes freed.
    pub freed: u64,
    /// Bytes the cache holds afterwards.
    pub bytes: u64,
    /// Blobs kept because something references them.
    pub referenced: u32,
    /// Unreferenced blobs kept within the limits.
    pub unreferenced: u32,
}

impl From<&crate::cache::gc::Collected> for Collected {
    fn from(c: &crate::cache::gc::Collected) -> Collected {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Collected {
            evicted: count(c.evicted),
            freed: c.freed,
            bytes: c.bytes,
            referenced: count(c.referenced),
            unreferenced: count(c.unreferenced),
        }
    }
}

impl From<Collected> for crate::cache::gc::Collected {
    fn from(c: Collected) -> Self {
        crate::cache::gc::Collected {
            evicted: c.evicted as usize,
            freed: c.freed,
            bytes: c.bytes,
            referenced: c.referenced as usize,
            unreferenced: c.unreferenced as usize,
        }
    }
}

impl From<&ImportReport> for ImportResult {
    fn from(r: &ImportReport) -> ImportResult {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        ImportResult {
            digest: r.digest.to_string(),
            name: r.name.clone(),
            state: serde_json::to_value(r.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            copied: count(r.copied),
            present: count(r.present),
            images: count(r.images),
            bytes_verified: r.bytes_verified,
        }
    }
}

impl TryFrom<ImportResult> for ImportReport {
    type Error = anyhow::Error;

    fn try_from(r: ImportResult) -> Result<ImportReport> {
        Ok(ImportReport {
            digest: r
                .digest
                .parse()
                .context("the bundle digest from the daemon")?,
            name: r.name,
            images: r.images as usize,
            copied: r.copied as usize,
            present: r.present as usize,
            bytes_verified: r.bytes_verified,
            state: serde_json::from_value(serde_json::Value::String(r.state))
                .context("the bundle state from the daemon")?,
        })
    }
}

/// Work the daemon's loop does for a method call.
pub enum Request {
    /// `Import`.
    Import {
        /// What to import.
        path: String,
        /// `--hold`.
        hold: bool,
        /// `--digest`.
        digest: Option<crate::oci::digest::Digest>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<ImportOutcome>>,
    },
    /// `Verify`.
    Verify {
        /// What to verify.
        path: String,
        /// `--digest`.
        digest: Option<crate::oci::digest::Digest>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Vec<VerifyReport>>>,
    },
    /// `Apply`.
    Apply {
        /// The held bundle.
        bundle: String,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<ImportReport>>,
    },
    /// `RemoveSet`.
    RemoveSet {
        /// The set.
        name: String,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<()>>,
    },
    /// `CollectCache`.
    CollectCache {
        /// Where the answer goes.
        reply: oneshot::Sender<Result<crate::cache::gc::Collected>>,
    },
    /// `Rescan`.
    Rescan {
        /// Where the answer goes.
        reply: oneshot::Sender<Result<()>>,
    },
    /// `Fetch`.
    Fetch {
        /// The sets; every set file that fetches when empty.
        sets: Vec<String>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<crate::engine::FetchReport>>,
    },
}

mod iface {
    //! The manager interface, kept in its own module: the interface macro also makes a
    //! public `ManagerSignals` trait, which is no part of longshore's API.
    use super::*;

    /// `io.longshore.Longshore1.Manager`.
    pub(crate) struct Manager {
        pub(super) requests: mpsc::Sender<Request>,
        /// For `Status` and `Sets`, which read without queueing behind the work.
        pub(super) paths: crate::paths::HostPaths,
        pub(super) settings: crate::config::Settings,
        /// Shared with [`Api`], which updates it while a method call may hold this
        /// interface: zbus keeps an interface borrowed during each call, so the daemon must
        /// never need `&mut Manager`.
        pub(super) props: Arc<Mutex<ManagerProps>>,
    }

    /// The manager's properties.
    #[derive(Default)]
    pub(super) struct ManagerProps {
        pub(super) state: String,
        pub(super) status_text: String,
        pub(super) bundles: Vec<OwnedObjectPath>,
        pub(super) sets: Vec<OwnedObjectPath>,
    }

    impl Manager {
        fn props(&self) -> std::sync::MutexGuard<'_, ManagerProps> {
            self.props.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    impl Manager {
        async fn ask<T>(
            &self,
            make: impl FnOnce(oneshot::Sender<Result<T>>) -> Request,
        ) -> Result<T, ApiError> {
            let (tx, rx) = oneshot::channel();
            self.requests
                .send(make(tx))
                .await
                .map_err(|_| ApiError::Failed("the daemon is stopping".into()))?;
            match rx.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(ApiError::from_anyhow(&e)),
                Err(_) => Err(ApiError::Failed("the daemon dropped the request".into())),
            }
        }
    }

    fn check_format(format: &str) -> Result<bool, ApiError> {
        match format {
            "text" => Ok(false),
            "json" => Ok(true),
            other => Err(ApiError::InvalidArgs(format!(
                "format {other:?}: use \"text\" or \"json\""
            ))),
        }
    }

    fn to_json<T: serde::Serialize>(v: &T) -> Result<String, ApiError> {
        serde_json::to_string_pretty(v).map_err(|e| ApiError::Failed(format!("serialising: {e}")))
    }

    fn option_digest(
        options: &HashMap<String, OwnedValue>,
    ) -> Result<Option<crate::oci::digest::Digest>, ApiError> {
        match options.get("digest") {
            None => Ok(None),
            Some(v) => {
                let s: String = v
                    .try_clone()
                    .ok()
                    .and_then(|v| String::try_from(v).ok())
                    .ok_or_else(|| {
                        ApiError::InvalidArgs("option digest must be a string".into())
                    })?;
                s.parse()
                    .map(Some)
                    .map_err(|e: crate::oci::digest::InvalidDigest| {
                        ApiError::InvalidArgs(e.to_string())
                    })
            }
        }
    }

    fn check_options(
        options: &HashMap<String, OwnedValue>,
        known: &[&str],
    ) -> Result<(), ApiError> {
        match options.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(ApiError::InvalidArgs(format!(
                "unknown option {k:?}; known: {}",
                known.join(", ")
            ))),
            None => Ok(()),
        }
    }

    #[interface(name = "io.longshore.Longshore1.Manager")]
    impl Manager {
        /// `idle`, `importing` or `checking`.
        #[zbus(property)]
        fn state(&self) -> String {
            self.props().state.clone()
        }

        /// What the daemon is doing, for people (what `systemctl status` shows).
        #[zbus(property)]
        fn status_text(&self) -> String {
            self.props().status_text.clone()
        }

        /// The bundle objects.
        #[zbus(property)]
        fn bundles(&self) -> Vec<OwnedObjectPath> {
            self.props().bundles.clone()
        }

        /// The image set objects.
        #[zbus(property)]
        fn image_sets(&self) -> Vec<OwnedObjectPath> {
            self.props().sets.clone()
        }

        /// Imports what `path` holds, as `longshore import` does. Options: `hold` (b),
        /// `digest` (s). Returns one (digest, name, state, copied, present) per input.
        async fn import(
            &self,
            path: String,
            options: HashMap<String, OwnedValue>,
        ) -> Result<Vec<ImportResult>, ApiError> {
            check_options(&options, &["hold", "digest"])?;
            let hold = match options.get("hold") {
                None => false,
                Some(v) => v
                    .try_clone()
                    .ok()
                    .and_then(|v| bool::try_from(v).ok())
                    .ok_or_else(|| ApiError::InvalidArgs("option hold must be a boolean".into()))?,
            };
            let digest = option_digest(&options)?;
            let outcome = self
                .ask(|reply| Request::Import {
                    path,
                    hold,
                    digest,
                    reply,
                })
                .await?;
            if let Some((p, e)) = outcome.failures.first() {
                let err = ApiError::from_anyhow(e);
                return Err(match err {
                    ApiError::Rejected(m) => ApiError::Rejected(format!("{}: {m}", p.display())),
                    other => other,
                });
            }
            Ok(outcome.reports.iter().map(ImportResult::from).collect())
        }

        /// Verifies what `path` holds without importing it. Option: `digest` (s). Returns one
        /// (digest, name, images, bytes verified) per input.
        async fn verify(
            &self,
            path: String,
            options: HashMap<String, OwnedValue>,
        ) -> Result<Vec<(String, String, u32, u64)>, ApiError> {
            check_options(&options, &["digest"])?;
            let digest = option_digest(&options)?;
            let reports = self
                .ask(|reply| Request::Verify {
                    path,
                    digest,
                    reply,
                })
                .await?;
            Ok(reports
                .iter()
                .map(|r| {
                    (
                        r.digest.to_string(),
                        r.name.clone(),
                        r.images as u32,
                        r.bytes_verified,
                    )
                })
                .collect())
        }

        /// Imports a held bundle (by name or digest).
        async fn apply(&self, bundle: String) -> Result<ImportResult, ApiError> {
            let r = self.ask(|reply| Request::Apply { bundle, reply }).await?;
            Ok(ImportResult::from(&r))
        }

        /// Removes a set that came from a bundle; its images are unpinned.
        async fn remove_set(&self, name: String) -> Result<(), ApiError> {
            self.ask(|reply| Request::RemoveSet { name, reply }).await
        }

        /// The status as `longshore status` shows it: `format` is `text` or `json` (the
        /// stable `status --json` document, with a `daemon` member). Answered at once,
        /// also while an import runs.
        async fn status(&self, format: String) -> Result<String, ApiError> {
            let json = check_format(&format)?;
            let mut status = crate::report::status(&self.paths, &self.settings)
                .await
                .map_err(|e| ApiError::from_anyhow(&e))?;
            let daemon = {
                let p = self.props();
                crate::report::DaemonStatus {
                    state: p.state.clone(),
                    status_text: p.status_text.clone(),
                }
            };
            if json {
                status.daemon = Some(daemon);
                to_json(&status)
            } else {
                Ok(format!(
                    "Daemon: {}\n{}",
                    daemon.status_text,
                    crate::report::render_status(&status)
                ))
            }
        }

        /// The image sets as `longshore sets` shows them: `format` is `text` or `json`.
        async fn sets(&self, format: String) -> Result<String, ApiError> {
            let json = check_format(&format)?;
            let sets = crate::report::sets(&self.paths, &self.settings)
                .await
                .map_err(|e| ApiError::from_anyhow(&e))?;
            if json {
                to_json(&crate::report::sets_json(&sets))
            } else {
                Ok(crate::report::render_sets(&sets))
            }
        }

        /// What the cache holds, as `longshore cache` shows it: `format` is `text` or
        /// `json`. Answered at once, also while an import runs.
        async fn cache(&self, format: String) -> Result<String, ApiError> {
            let json = check_format(&format)?;
            let r = crate::engine::cache_report(&self.paths, &self.settings)
                .map_err(|e| ApiError::from_anyhow(&e))?;
            if json {
                to_json(&r)
            } else {
                Ok(r.render())
            }
        }

        /// Evicts what nothing references beyond the cache's cap, as `longshore cache gc`.
        async fn collect_cache(&self) -> Result<Collected, ApiError> {
            let done: crate::cache::gc::Collected =
                self.ask(|reply| Request::CollectCache { reply }).await?;
            Ok(Collected::from(&done))
        }

        /// Checks every set again and looks at the block devices present for bundle media.
        async fn rescan(&self) -> Result<(), ApiError> {
            self.ask(|reply| Request::Rescan { reply }).await
        }

        /// Fetches from registries, now (whatever `[fetch] windows` says), what the named
        /// sets lack (every set file that fetches, when `sets` is empty), then imports
        /// and pins it, as `longshore fetch`. Returns the report as `longshore fetch
        /// --json` prints it. `Progress` signals follow the fetch, one per set, with
        /// `set NAME` in place of the bundle.
        async fn fetch(&self, sets: Vec<String>) -> Result<String, ApiError> {
            let r = self.ask(|reply| Request::Fetch { sets, reply }).await?;
            to_json(&r)
        }

        /// Sent as images are copied: the bundle, the image, bytes done and bytes in all.
        #[zbus(signal)]
        pub async fn progress(
            emitter: &SignalEmitter<'_>,
            bundle: &str,
            image: &str,
            done: u64,
            total: u64,
        ) -> zbus::Result<()>;
    }
}

use iface::Manager;

/// `io.longshore.Longshore1.Bundle`, one object per bundle.
#[derive(Clone, PartialEq)]
struct BundleObject {
    name: String,
    version: String,
    digest: String,
    state: String,
    kind: String,
    source: String,
    images: u32,
}

#[interface(name = "io.longshore.Longshore1.Bundle")]
impl BundleObject {
    #[zbus(property)]
    fn name(&self) -> String {
        self.name.clone()
    }
    #[zbus(property)]
    fn version(&self) -> String {
        self.version.clone()
    }
    #[zbus(property)]
    fn digest(&self) -> String {
        self.digest.clone()
    }
    /// `held`, `importing` or `imported`.
    #[zbus(property)]
    fn state(&self) -> String {
        self.state.clone()
    }
    #[zbus(property)]
    fn kind(&self) -> String {
        self.kind.clone()
    }
    #[zbus(property)]
    fn source(&self) -> String {
        self.source.clone()
    }
    #[zbus(property)]
    fn images(&self) -> u32 {
        self.images
    }
}

/// `io.longshore.Longshore1.Sharing` at `/io/longshore/Longshore1/Sharing`: the endpoint
/// and the other nodes, read from what the daemon's endpoint reports each time a
/// property is read (the properties change without signals).
struct SharingObject {
    paths: crate::paths::HostPaths,
    enabled: bool,
}

impl SharingObject {
    fn board(&self) -> crate::share::ShareBoard {
        crate::share::ShareBoard::read(&self.paths).unwrap_or_default()
    }
}

#[interface(name = "io.longshore.Longshore1.Sharing")]
impl SharingObject {
    /// `[share] enabled`.
    #[zbus(property(emits_changed_signal = "false"))]
    fn enabled(&self) -> bool {
        self.enabled
    }
    /// The loopback listener's address (empty when it does not listen).
    #[zbus(property(emits_changed_signal = "false"))]
    fn local_endpoint(&self) -> String {
        self.board().local.unwrap_or_default()
    }
    /// The peer listener's address (empty when it does not listen).
    #[zbus(property(emits_changed_signal = "false"))]
    fn peer_endpoint(&self) -> String {
        self.board().peer.unwrap_or_default()
    }
    /// This node's identity in the DHT.
    #[zbus(property(emits_changed_signal = "false"))]
    fn peer_id(&self) -> String {
        self.board().peer_id.unwrap_or_default()
    }
    /// The other nodes known: (identity, peer listener, connected now).
    #[zbus(property(emits_changed_signal = "false"))]
    fn peers(&self) -> Vec<(String, String, bool)> {
        self.board()
            .peers
            .into_iter()
            .map(|p| (p.id, p.address, p.connected))
            .collect()
    }
    /// Bytes served to this node's CRI-O and tools, all from the cache.
    #[zbus(property(emits_changed_signal = "false"))]
    fn bytes_served_local(&self) -> u64 {
        self.board().served_local.bytes
    }
    /// Bytes served to other nodes.
    #[zbus(property(emits_changed_signal = "false"))]
    fn bytes_served_peers(&self) -> u64 {
        self.board().served_peer.bytes
    }
    /// Bytes fetched from other nodes.
    #[zbus(property(emits_changed_signal = "false"))]
    fn bytes_fetched_peers(&self) -> u64 {
        self.board().fetched_peer
    }
    /// Bytes fetched from registries by pull-through.
    #[zbus(property(emits_changed_signal = "false"))]
    fn bytes_fetched_upstream(&self) -> u64 {
        self.board().fetched_upstream
    }
    /// Requests refused on the peer listener for want of a valid signature.
    #[zbus(property(emits_changed_signal = "false"))]
    fn refused(&self) -> u64 {
        self.board().served_peer.refused
    }
    /// Blobs and manifests from other nodes or registries discarded for a wrong digest.
    #[zbus(property(emits_changed_signal = "false"))]
    fn rejected(&self) -> u64 {
        self.board().rejected
    }
    /// Why a configured listener or the DHT is not running.
    #[zbus(property(emits_changed_signal = "false"))]
    fn problems(&self) -> Vec<String> {
        self.board().problems
    }
}

/// `io.longshore.Longshore1.ImageSet`, one object per set in force.
#[derive(Clone, PartialEq)]
struct SetObject {
    name: String,
    source: String,
    pinned: bool,
    critical: bool,
    ready: bool,
    progressing: bool,
    degraded: bool,
    reason: String,
    message: String,
    images: Vec<String>,
    missing: Vec<String>,
    bytes_on_disk: u64,
}

#[interface(name = "io.longshore.Longshore1.ImageSet")]
impl SetObject {
    #[zbus(property)]
    fn name(&self) -> String {
        self.name.clone()
    }
    /// `bundle NAME` or the set file's path.
    #[zbus(property)]
    fn source(&self) -> String {
        self.source.clone()
    }
    #[zbus(property)]
    fn pinned(&self) -> bool {
        self.pinned
    }
    #[zbus(property)]
    fn critical(&self) -> bool {
        self.critical
    }
    #[zbus(property)]
    fn ready(&self) -> bool {
        self.ready
    }
    #[zbus(property)]
    fn progressing(&self) -> bool {
        self.progressing
    }
    #[zbus(property)]
    fn degraded(&self) -> bool {
        self.degraded
    }
    /// The reason of the condition that matters most (Degraded, else Ready).
    #[zbus(property)]
    fn reason(&self) -> String {
        self.reason.clone()
    }
    #[zbus(property)]
    fn message(&self) -> String {
        self.message.clone()
    }
    #[zbus(property)]
    fn images(&self) -> Vec<String> {
        self.images.clone()
    }
    #[zbus(property)]
    fn missing(&self) -> Vec<String> {
        self.missing.clone()
    }
    #[zbus(property)]
    fn bytes_on_disk(&self) -> u64 {
        self.bytes_on_disk
    }
}

/// The service, as the daemon drives it.
pub struct Api {
    conn: Connection,
    props: Arc<Mutex<iface::ManagerProps>>,
    bundles: BTreeMap<String, BundleObject>,
    sets: BTreeMap<String, SetObject>,
}

/// A D-Bus path element for `name`: characters other than letters and digits become
/// `_xx` (their hex), as systemd escapes unit names.
pub fn path_element(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

impl Api {
    /// Serves the objects, then takes the bus name (so a client that sees the name finds
    /// the objects).
    pub async fn serve(
        bus: Bus,
        requests: mpsc::Sender<Request>,
        paths: crate::paths::HostPaths,
        settings: crate::config::Settings,
    ) -> Result<Api> {
        let props = Arc::new(Mutex::new(iface::ManagerProps {
            state: "idle".into(),
            status_text: "Starting".into(),
            ..Default::default()
        }));
        let sharing = SharingObject {
            paths: paths.clone(),
            enabled: settings.share.enabled,
        };
        let manager = Manager {
            requests,
            paths,
            settings,
            props: props.clone(),
        };
        let builder = match bus {
            Bus::System => zbus::connection::Builder::system(),
            Bus::Session => zbus::connection::Builder::session(),
        }
        .with_context(|| format!("connecting to the {} bus", bus.name()))?;
        let conn = builder
            .serve_at(PATH, manager)?
            .serve_at(PATH, zbus::fdo::ObjectManager)?
            .serve_at(SHARING_PATH, sharing)?
            .name(BUS_NAME)?
            .build()
            .await
            .with_context(|| format!("serving {BUS_NAME} on the {} bus", bus.name()))?;
        Ok(Api {
            conn,
            props,
            bundles: BTreeMap::new(),
            sets: BTreeMap::new(),
        })
    }

    /// The connection, for signals sent from elsewhere.
    pub fn connection(&self) -> Connection {
        self.conn.clone()
    }

    /// Sets `State` and `StatusText`.
    pub async fn set_status(&self, state: &str, text: &str) -> Result<()> {
        let (state_changed, text_changed) = {
            let mut p = self.props.lock().unwrap_or_else(|p| p.into_inner());
            let changes = (p.state != state, p.status_text != text);
            p.state = state.to_string();
            p.status_text = text.to_string();
            changes
        };
        if state_changed || text_changed {
            let iface = self
                .conn
                .object_server()
                .interface::<_, Manager>(PATH)
                .await?;
            let m = iface.get().await;
            if state_changed {
                m.state_changed(iface.signal_emitter()).await?;
            }
            if text_changed {
                m.status_text_changed(iface.signal_emitter()).await?;
            }
        }
        Ok(())
    }

    /// Brings the bundle and set objects in line with the state and the sets' views. An
    /// object that changed is replaced (InterfacesRemoved, then InterfacesAdded).
    pub async fn publish(&mut self, state: &State, views: &[SetView]) -> Result<()> {
        let server = self.conn.object_server();
        let mut bundles = BTreeMap::new();
        for b in state.bundles.values() {
            let path = format!("{PATH}/bundle/{}", b.digest.hex());
            let obj = BundleObject {
                name: b.name.clone(),
                version: b.version.clone().unwrap_or_default(),
                digest: b.digest.to_string(),
                state: json_word(&b.state),
                kind: json_word(&b.kind),
                source: b.source.display().to_string(),
                images: b.images.len() as u32,
            };
            bundles.insert(path, obj);
        }
        let mut sets = BTreeMap::new();
        for v in views {
            let path = format!("{PATH}/set/{}", path_element(&v.name));
            let cond = |k: &str| v.conditions.iter().find(|c| c.kind == k).cloned();
            let degraded = cond("Degraded").filter(|c| c.status);
            let main = degraded.clone().or_else(|| cond("Ready"));
            let obj = SetObject {
                name: v.name.clone(),
                source: match &v.source {
                    Source::Bundle { name, .. } => format!("bundle {name}"),
                    Source::File { path } => path.display().to_string(),
                },
                pinned: v.pinned,
                critical: v.critical,
                ready: cond("Ready").is_some_and(|c| c.status),
                progressing: cond("Progressing").is_some_and(|c| c.status),
                degraded: degraded.is_some(),
                reason: main
                    .as_ref()
                    .map(|c| c.reason.to_string())
                    .unwrap_or_default(),
                message: main.map(|c| c.message).unwrap_or_default(),
                images: v.images.iter().map(|i| i.reference.clone()).collect(),
                missing: v.missing.clone(),
                bytes_on_disk: v.bytes_on_disk,
            };
            sets.insert(path, obj);
        }
        let bundles_changed = sync_objects(server, &mut self.bundles, bundles).await?;
        let sets_changed = sync_objects(server, &mut self.sets, sets).await?;
        if bundles_changed || sets_changed {
            let paths = |m: Vec<&String>| -> Vec<OwnedObjectPath> {
                m.into_iter()
                    .filter_map(|p| OwnedObjectPath::try_from(p.as_str()).ok())
                    .collect()
            };
            {
                let mut p = self.props.lock().unwrap_or_else(|p| p.into_inner());
                p.bundles = paths(self.bundles.keys().collect());
                p.sets = paths(self.sets.keys().collect());
            }
            let iface = server.interface::<_, Manager>(PATH).await?;
            let m = iface.get().await;
            if bundles_changed {
                m.bundles_changed(iface.signal_emitter()).await?;
            }
            if sets_changed {
                m.image_sets_changed(iface.signal_emitter()).await?;
            }
        }
        Ok(())
    }
}

fn json_word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Makes the objects at the paths of `want` what `want` says; returns whether the set of
/// paths changed.
async fn sync_objects<T>(
    server: &zbus::ObjectServer,
    have: &mut BTreeMap<String, T>,
    want: BTreeMap<String, T>,
) -> Result<bool>
where
    T: zbus::object_server::Interface + Clone + PartialEq,
{
    let mut paths_changed = false;
    let gone: Vec<String> = have
        .keys()
        .filter(|p| !want.contains_key(*p))
        .cloned()
        .collect();
    for p in gone {
        server.remove::<T, _>(p.as_str()).await?;
        have.remove(&p);
        paths_changed = true;
    }
    for (p, obj) in want {
        match have.get(&p) {
            Some(old) if *old == obj => continue,
            Some(_) => {
                server.remove::<T, _>(p.as_str()).await?;
            }
            None => paths_changed = true,
        }
        server.at(p.as_str(), obj.clone()).await?;
        have.insert(p, obj);
    }
    Ok(paths_changed)
}

/// Sends `Progress` signals from a channel, so the copy threads need no bus handle.
pub fn forward_progress(
    conn: Connection,
    mut rx: mpsc::UnboundedReceiver<crate::events::Progress>,
) {
    tokio::spawn(async move {
        let Ok(emitter) = SignalEmitter::new(&conn, PATH) else {
            return;
        };
        while let Some(p) = rx.recv().await {
            if let Err(e) = Manager::progress(&emitter, &p.bundle, &p.image, p.done, p.total).await
            {
                tracing::debug!("sending Progress: {e}");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_import_report_crosses_the_bus_whole() {
        let report = ImportReport {
            digest: format!("sha256:{}", "ab".repeat(32)).parse().unwrap(),
            name: "site".into(),
            images: 5,
            copied: 3,
            present: 1,
            bytes_verified: 123_456_789_012,
            state: crate::state::BundleState::Importing,
        };
        let wire = ImportResult::from(&report);
        assert_eq!(
            <ImportResult as zbus::zvariant::Type>::SIGNATURE.to_string(),
            "(sssuuut)",
            "{wire:?}"
        );
        let back = ImportReport::try_from(wire).unwrap();
        assert_eq!(back.digest, report.digest);
        assert_eq!(back.name, "site");
        assert_eq!((back.images, back.copied, back.present), (5, 3, 1));
        assert_eq!(back.bytes_verified, 123_456_789_012);
        assert_eq!(back.state, report.state);
    }

    #[test]
    fn api_error_names_are_those_of_their_kinds() {
        use zbus::DBusError;
        for k in ErrorKind::ALL {
            let e = match k {
                ErrorKind::Rejected => ApiError::Rejected(String::new()),
                ErrorKind::NoSpace => ApiError::NoSpace(String::new()),
                ErrorKind::NotFound => ApiError::NotFound(String::new()),
                ErrorKind::Abandoned => ApiError::Abandoned(String::new()),
                ErrorKind::Failed => ApiError::Failed(String::new()),
            };
            assert_eq!(ErrorKind::from_dbus_name(e.name().as_str()), k);
        }
    }

    #[test]
    fn path_elements() {
        assert_eq!(path_element("edge-critical"), "edge_2dcritical");
        assert_eq!(path_element("ocp_4.16"), "ocp_5f4_2e16");
        assert_eq!(path_element("abc123"), "abc123");
    }
}
