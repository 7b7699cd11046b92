//! Sharing the cache: a read-only registry endpoint for this node's CRI-O and for the
//! cluster's other nodes ([`serve`]), and the requests between nodes ([`auth`]).
//!
//! The endpoint answers from the cache only what can be pulled whole (see
//! [`serve`]); CRI-O is pointed at it by the mirror drop-in
//! ([`crate::crio::mirrors`]). A registry host becomes one path component in the
//! mirror's location (`127.0.0.1:5050/quay.io`), because containers/image sends no
//! `ns` parameter to a mirror; a port is written `_PORT` there, since `:` may not stand
//! in a repository path (`registry.local:5000` → `registry.local_5000`).

pub mod auth;
pub mod http;
pub mod obtain;
pub mod peers;
pub mod serve;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::cache::Cache;
use crate::config::Settings;
use crate::paths::HostPaths;

/// How often the daemon writes its figures for `longshore status`.
const BOARD_EVERY: Duration = Duration::from_secs(2);

/// The endpoint, running.
struct Running {
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops serving.
    fn stop(self, paths: &HostPaths) {
        for t in self.tasks {
            t.abort();
        }
        ShareBoard::clear(paths);
    }
}

/// The endpoint and the DHT, running on a thread and a runtime of their own: serving
/// never waits on the daemon's other work (an import's copies, a fetch), nor that work on
/// serving.
pub struct Sharing {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Sharing {
    /// Starts it, when `[share] enabled`; otherwise clears what a past daemon reported.
    pub fn spawn(paths: &HostPaths, settings: &Settings) -> Option<Sharing> {
        if !settings.share.enabled {
            ShareBoard::clear(paths);
            return None;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (paths, settings) = (paths.clone(), settings.clone());
        let thread = std::thread::Builder::new()
            .name("longshore-share".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("longshore-share")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("sharing did not start: {e}");
                        return;
                    }
                };
                rt.block_on(async {
                    let running = start(&paths, &settings).await;
                    let _ = stopped.await;
                    if let Some(r) = running {
                        r.stop(&paths);
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            });
        match thread {
            Ok(thread) => Some(Sharing { stop, thread }),
            Err(e) => {
                tracing::error!("sharing did not start: {e}");
                None
            }
        }
    }

    /// Stops serving and waits until the listeners are closed.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Starts the endpoint's listeners, when `[share] enabled`. A listener that cannot start
/// (its address taken, no cluster key) is reported and left out; the daemon's other
/// work goes on without it.
async fn start(paths: &HostPaths, settings: &Settings) -> Option<Running> {
    let share = &settings.share;
    if !share.enabled {
        ShareBoard::clear(paths);
        return None;
    }
    let stats = Arc::new(Stats::default());
    let cache = Cache::new(paths.cache_dir());
    let mut board = ShareBoard {
        pid: std::process::id(),
        ..Default::default()
    };
    let mut problem = |p: String| {
        tracing::error!("{p}");
        board.problems.push(p);
    };
    // The peer listener and the DHT need the cluster key; without one this node still
    // serves its own CRI-O.
    let mut peer_side = None;
    if let Some(addr) = share.peer {
        let started = match auth::ClusterKey::load(&paths.host(&share.key_file)) {
            Err(e) => Err(format!("{e:#}")),
            Ok(key) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Ok((l, key)),
                Err(e) => Err(format!("{e}")),
            },
        };
        match started {
            Ok((l, key)) => peer_side = Some((addr, l, key)),
            Err(e) => problem(format!("the peer listener {addr} did not start: {e}")),
        }
    }
    let mut remote = None;
    if let Some((addr, _, key)) = &peer_side {
        let cfg = peers::PeerConfig {
            listen: std::net::SocketAddr::new(addr.ip(), addr.port().wrapping_add(1)),
            http_port: addr.port(),
            bootstrap: share.bootstrap.clone(),
            mdns: share.mdns,
        };
        let http = crate::registry::tls::plain_only().and_then(|tls| {
            Ok(reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .no_proxy()
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(Duration::from_secs(30))
                .user_agent(concat!("longshore/", env!("CARGO_PKG_VERSION")))
                .build()?)
        });
        match (peers::Peers::start(key, cfg), http) {
            (Ok(p), Ok(http)) => {
                board.peer_id = Some(p.id.clone());
                remote = Some(Remote {
                    peers: p,
                    key: key.clone(),
                    http,
                });
            }
            (Err(e), _) => problem(format!("the DHT did not start: {e:#}")),
            (_, Err(e)) => problem(format!("the HTTP client for peers: {e:#}")),
        }
    }
    let peers = remote.as_ref().map(|r| r.peers.clone());
    let upstream = if share.upstream && share.never_contact_source {
        tracing::warn!(
            "[share] upstream is ignored: never_contact_source says the registries are never contacted"
        );
        None
    } else if share.upstream && !settings.fetch.enabled {
        tracing::warn!(
            "[share] upstream is ignored: [fetch] enabled = false says this node contacts no registry"
        );
        None
    } else if share.upstream {
        // A pull waits on it: a few quick tries, not the patient ones of a pre-load.
        let retry = crate::registry::client::Retry {
            attempts: 3,
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(5),
        };
        match crate::registry::client::Client::new(paths, retry) {
            Ok(client) => Some(Upstream {
                client,
                paths: paths.clone(),
            }),
            Err(e) => {
                problem(format!("pull-through is off: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let ep = Arc::new(serve::Endpoint {
        cache: cache.clone(),
        arch: crate::bundle::write::host_architecture(),
        stats: stats.clone(),
        remote,
        upstream,
        min_free: settings.store.min_free_space,
        sizes: Default::default(),
        inflight: Default::default(),
    });
    // Each listener has its own cap: connections strangers open on the cluster network
    // never take the places of this node's CRI-O.
    let conns = || Arc::new(tokio::sync::Semaphore::new(share.max_connections));
    let mut tasks = Vec::new();
    match tokio::net::TcpListener::bind(share.local).await {
        Ok(l) => {
            tracing::info!("serving the cache to this node on {}", share.local);
            board.local = Some(share.local.to_string());
            tasks.push(tokio::spawn(serve::run(
                l,
                serve::Side::Local,
                ep.clone(),
                conns(),
            )));
        }
        Err(e) => problem(format!(
            "the local listener {} did not start: {e}",
            share.local
        )),
    }
    if let Some((addr, l, key)) = peer_side {
        tracing::info!("serving the cache to the cluster's nodes on {addr}");
        board.peer = Some(addr.to_string());
        tasks.push(tokio::spawn(serve::run(
            l,
            serve::Side::Peer(key),
            ep.clone(),
            conns(),
        )));
    }
    if let Some(p) = peers.clone() {
        tasks.push(tokio::spawn(advertise(cache, p)));
    }
    board.write(paths);
    let board_paths = paths.clone();
    tasks.push(tokio::spawn(async move {
        let mut last = board.clone();
        loop {
            tokio::time::sleep(BOARD_EVERY).await;
            board.update(&stats, peers.as_ref());
            if board != last {
                board.write(&board_paths);
                last = board.clone();
            }
        }
    }));
    Some(Running { tasks })
}

/// How often the cache is looked at for blobs to provide or withdraw, besides when
/// its blob directory changes.
const ADVERTISE_EVERY: Duration = Duration::from_secs(60);
/// How long a burst of changes in the cache is gathered before it is looked at.
const ADVERTISE_SETTLE: Duration = Duration::from_millis(300);

/// Provides a record for every blob and manifest the cache holds, and withdraws those of
/// blobs that left it: when the blob directory changes (inotify), and every
/// [`ADVERTISE_EVERY`] besides.
async fn advertise(cache: Cache, peers: peers::Peers) {
    use futures_util::StreamExt;
    let _ = cache.ensure();
    let mut events = inotify::Inotify::init()
        .and_then(|ino| {
            ino.watches().add(
                cache.blobs_dir(),
                inotify::WatchMask::MOVED_TO
                    | inotify::WatchMask::MOVED_FROM
                    | inotify::WatchMask::DELETE,
            )?;
            ino.into_event_stream(vec![0u8; 4096])
        })
        .map_err(|e| tracing::warn!("the cache is looked at every minute only: {e}"))
        .ok();
    let mut provided: std::collections::HashSet<crate::oci::digest::Digest> = Default::default();
    loop {
        let c = cache.clone();
        let now = tokio::task::spawn_blocking(move || c.digests())
            .await
            .unwrap_or_default();
        let new: Vec<_> = now.difference(&provided).copied().collect();
        let gone: Vec<_> = provided.difference(&now).copied().collect();
        if !new.is_empty() || !gone.is_empty() {
            tracing::debug!(
                "the DHT: providing {} new digests, withdrawing {}",
                new.len(),
                gone.len()
            );
        }
        peers.provide(new);
        peers.withdraw(gone);
        provided = now;
        match events.as_mut() {
            Some(ev) => {
                if tokio::time::timeout(ADVERTISE_EVERY, ev.next())
                    .await
                    .is_ok()
                {
                    // The rest of a burst (an import renames many blobs in), for a while.
                    let until = tokio::time::Instant::now() + 4 * ADVERTISE_SETTLE;
                    while tokio::time::Instant::now() < until {
                        if !matches!(
                            tokio::time::timeout(ADVERTISE_SETTLE, ev.next()).await,
                            Ok(Some(_))
                        ) {
                            break;
                        }
                    }
                }
            }
            None => tokio::time::sleep(ADVERTISE_EVERY).await,
        }
    }
}

/// The path component standing for registry `host` (`host[:port]`) in the mirror's
/// location; `None` for a host that cannot be one (a bracketed IPv6 address).
pub fn mirror_component(host: &str) -> Option<String> {
    if host.starts_with('[') {
        return None;
    }
    let c = host.replacen(':', "_", 1).to_ascii_lowercase();
    crate::oci::reference::check_name(&format!("localhost/{c}"))
        .ok()
        .map(|_| c)
}

/// The repository a request path's name stands for: its first component back to a
/// registry host (`registry.local_5000/app` → `registry.local:5000/app`), checked as
/// containers/image checks names.
pub fn source_repository(name: &str) -> Option<String> {
    let (first, rest) = name.split_once('/')?;
    let host = match first.rsplit_once('_') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{h}:{port}")
        }
        _ => first.to_string(),
    };
    let repo = format!("{host}/{rest}");
    crate::oci::reference::check_name(&repo).ok()?;
    // A first component that is no registry host would be read by containers/image as
    // part of a Docker Hub path; it names nothing here.
    (host.contains(['.', ':']) || host == "localhost").then_some(repo)
}

/// What one listener did.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests answered (any status).
    pub requests: AtomicU64,
    /// Body bytes sent.
    pub bytes: AtomicU64,
    /// Manifests and blobs not answered (404).
    pub misses: AtomicU64,
    /// Requests refused for want of a valid signature.
    pub refused: AtomicU64,
}

/// What the endpoint did since the daemon started.
#[derive(Debug, Default)]
pub struct Stats {
    /// The loopback listener (this node's CRI-O and tools).
    pub local: Counters,
    /// The peer listener (other nodes).
    pub peer: Counters,
    /// Bytes fetched from other nodes.
    pub fetched_peer: AtomicU64,
    /// Bytes fetched from the registries themselves (pull-through).
    pub fetched_upstream: AtomicU64,
    /// Blobs and manifests that came with the wrong digest and were discarded.
    pub rejected: AtomicU64,
}

/// How this node reaches the others: the DHT, the key requests are signed with, and
/// an HTTP client that goes to them directly (never through a proxy).
pub struct Remote {
    /// The DHT.
    pub peers: peers::Peers,
    /// The cluster key.
    pub key: auth::ClusterKey,
    /// Plain HTTP to the peer listeners.
    pub http: reqwest::Client,
}

/// Pull-through: the registry client, with the node's credentials and registries.conf.
pub struct Upstream {
    /// The client.
    pub client: crate::registry::client::Client,
    /// Where the node's configuration is.
    pub paths: HostPaths,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("peer", &self.peers.id)
            .finish()
    }
}

/// One listener's figures, as reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersView {
    /// Requests answered.
    pub requests: u64,
    /// Body bytes sent.
    pub bytes: u64,
    /// Manifests and blobs not answered.
    pub misses: u64,
    /// Requests refused for want of a valid signature.
    pub refused: u64,
}

impl Counters {
    fn view(&self) -> CountersView {
        CountersView {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// The endpoint's state for `longshore status`: written by the daemon to
/// `/run/longshore/share.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareBoard {
    /// The daemon serving; the board is stale once it is gone.
    pub pid: u32,
    /// The loopback listener's address, when it listens.
    pub local: Option<String>,
    /// The peer listener's address, when it listens.
    pub peer: Option<String>,
    /// Why a listener is not running, when one is configured but failed.
    pub problems: Vec<String>,
    /// Requests of this node's CRI-O and tools.
    pub served_local: CountersView,
    /// Requests of other nodes.
    pub served_peer: CountersView,
    /// This node's identity in the DHT, when it takes part.
    pub peer_id: Option<String>,
    /// The other nodes this one knows.
    pub peers: Vec<peers::PeerView>,
    /// Bytes fetched from other nodes.
    pub fetched_peer: u64,
    /// Bytes fetched from the registries (pull-through).
    pub fetched_upstream: u64,
    /// Blobs and manifests discarded for a wrong digest.
    pub rejected: u64,
}

const BOARD: &str = "share.json";

impl ShareBoard {
    /// The board of a daemon still running, if there is one.
    pub fn read(paths: &HostPaths) -> Option<ShareBoard> {
        crate::state::board::read(paths, BOARD, |b: &ShareBoard| b.pid)
    }

    /// Fills in the figures of `stats`.
    pub fn update(&mut self, stats: &Stats, peers: Option<&peers::Peers>) {
        self.served_local = stats.local.view();
        self.served_peer = stats.peer.view();
        self.fetched_peer = stats.fetched_peer.load(Ordering::Relaxed);
        self.fetched_upstream = stats.fetched_upstream.load(Ordering::Relaxed);
        self.rejected = stats.rejected.load(Ordering::Relaxed);
        if let Some(p) = peers {
            self.peers = p.known();
        }
    }

    /// Writes it for others to read.
    pub fn write(&self, paths: &HostPaths) {
        crate::state::board::write(paths, BOARD, self)
    }

    /// Removes it (the daemon stops).
    pub fn clear(paths: &HostPaths) {
        crate::state::board::clear(paths, BOARD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_hosts_become_one_path_component_and_back() {
        assert_eq!(mirror_component("quay.io").as_deref(), Some("quay.io"));
        assert_eq!(
            mirror_component("registry.local:5000").as_deref(),
            Some("registry.local_5000")
        );
        assert_eq!(
            mirror_component("127.0.0.1:5000").as_deref(),
            Some("127.0.0.1_5000")
        );
        assert_eq!(mirror_component("[::1]:5000"), None);
        assert_eq!(
            source_repository("registry.local_5000/ocp/release").as_deref(),
            Some("registry.local:5000/ocp/release")
        );
        assert_eq!(
            source_repository("quay.io/openshift/x").as_deref(),
            Some("quay.io/openshift/x")
        );
        assert_eq!(source_repository("library/busybox"), None);
        assert_eq!(source_repository("quay.io"), None);
        assert_eq!(source_repository("quay.io/../etc"), None);
        assert_eq!(source_repository("quay.io/UPPER"), None);
    }
}
