//! Configuration: TOML fragments from `config.d/` directories, merged into typed settings.
//!
//! Fragments are read from `/usr/lib/longshore/config.d`, `/run/longshore/config.d` and
//! `/etc/longshore/config.d`, in that order of precedence: a file in a later directory
//! replaces the file of the same name in an earlier one, and a symlink to `/dev/null`
//! masks it. The surviving files are applied in lexical order of their names, each value
//! overriding the one before. Every value is checked where it is read, so an error names
//! the file, the key and the line.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer};

use crate::paths::HostPaths;

/// One fragment as written: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fragment {
    bus: Option<Bus>,
    store: Option<StoreFragment>,
    skopeo: Option<SkopeoFragment>,
    import: Option<ImportFragment>,
    crio: Option<CrioFragment>,
    media: Option<MediaFragment>,
    cache: Option<CacheFragment>,
    fetch: Option<FetchFragment>,
    share: Option<ShareFragment>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareFragment {
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "loopback_addr")]
    local: Option<SocketAddr>,
    #[serde(default, deserialize_with = "peer_addr")]
    peer: Option<Option<SocketAddr>>,
    #[serde(default, deserialize_with = "host_ports")]
    bootstrap: Option<Vec<String>>,
    #[serde(default, deserialize_with = "absolute_path")]
    key_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "registry_hosts")]
    registries: Option<Vec<String>>,
    never_contact_source: Option<bool>,
    upstream: Option<bool>,
    mirror_tags: Option<bool>,
    mdns: Option<bool>,
    #[serde(default, deserialize_with = "connection_cap")]
    max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchFragment {
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "copy_jobs")]
    jobs: Option<usize>,
    #[serde(default, deserialize_with = "byte_size")]
    max_rate: Option<u64>,
    #[serde(default, deserialize_with = "time_windows")]
    windows: Option<Vec<Window>>,
}

/// A daily time window, in minutes after midnight UTC: `start` inclusive, `end`
/// exclusive; a window whose end is before its start runs over midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Minute of the day it opens.
    pub start: u16,
    /// Minute of the day it closes.
    pub end: u16,
}

impl Window {
    /// Parses `HH:MM-HH:MM`.
    pub fn parse(s: &str) -> Result<Window> {
        let bad = || {
            anyhow::anyhow!("invalid time window {s:?}: expected HH:MM-HH:MM, e.g. \"01:00-05:00\"")
        };
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let minute = |t: &str| -> Result<u16> {
            let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 24 || m > 59 || (h == 24 && m != 0) || t.trim().len() != 5 {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        let (start, end) = (minute(a)?, minute(b)?);
        if start == end {
            bail!("invalid time window {s:?}: it opens and closes at the same minute");
        }
        Ok(Window { start, end })
    }

    /// Whether minute `m` of the day (UTC) is inside.
    pub fn contains(&self, m: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&m)
        } else {
            m >= self.start || m < self.end
        }
    }

    /// Minutes from minute `m` of the day until the window next opens (0 when open).
    pub fn opens_in(&self, m: u16) -> u16 {
        if self.contains(m) {
            0
        } else {
            (self.start + 1440 - m) % 1440
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

fn time_windows<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Window>>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|s| Window::parse(s))
        .collect::<Result<Vec<_>>>()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `[fetch]`: pre-loading sets from registries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchSettings {
    /// Whether sets whose images are in neither the store nor the cache are fetched.
    pub enabled: bool,
    /// Blobs in flight at once.
    pub jobs: usize,
    /// Bytes per second over all blobs together; `None` is no cap.
    pub max_rate: Option<u64>,
    /// When fetching may run (UTC); empty is at any time.
    pub windows: Vec<Window>,
}

impl FetchSettings {
    /// Minutes until fetching may run, at minute `m` of the day UTC (0 when it may now).
    pub fn wait_minutes(&self, m: u16) -> u16 {
        self.windows
            .iter()
            .map(|w| w.opens_in(m))
            .min()
            .unwrap_or(0)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFragment {
    #[serde(default, deserialize_with = "byte_size")]
    max_size: Option<u64>,
    #[serde(default, deserialize_with = "duration_secs")]
    keep_imported: Option<u64>,
}

/// A duration: a number of seconds, or a number with `s`, `m`, `h` or `d`.
fn duration_secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(n) => Ok(Some(n)),
        Raw::Text(t) => parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// Parses `90`, `90s`, `15m`, `24h`, `7d`.
pub fn parse_duration(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a duration (like 90s, 15m, 24h or 7d)"))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => anyhow::bail!("{s:?} is not a duration (like 90s, 15m, 24h or 7d)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("{s:?} is too long a duration"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MediaFragment {
    #[serde(default, deserialize_with = "label_globs")]
    labels: Option<Vec<String>>,
    removable: Option<bool>,
    raw_tar: Option<bool>,
    policy: Option<MediaPolicy>,
}

/// What the daemon does with a bundle found on media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaPolicy {
    /// Import it.
    Apply,
    /// Verify and stage it; import on `longshore apply`.
    Hold,
}

/// Which devices the daemon takes as bundle media.
#[derive(Debug, Clone)]
pub struct MediaSettings {
    /// Glob patterns (`*`, `?`) on the filesystem label.
    pub labels: Vec<String>,
    /// Also take any removable device with an allowed filesystem, whatever its label.
    pub removable: bool,
    /// Take a device with no filesystem whose first tar entry is bundle.json.
    pub raw_tar: bool,
    /// Import, or hold.
    pub policy: MediaPolicy,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CrioFragment {
    unit: Option<String>,
    reload: Option<bool>,
    allow_restart: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportFragment {
    #[serde(default, deserialize_with = "copy_jobs")]
    jobs: Option<usize>,
    pin_foreign: Option<bool>,
    retain_bundles: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFragment {
    mode: Option<StoreMode>,
    driver: Option<Driver>,
    #[serde(default, deserialize_with = "absolute_path")]
    root: Option<PathBuf>,
    #[serde(default, deserialize_with = "absolute_path")]
    run_root: Option<PathBuf>,
    #[serde(default, deserialize_with = "byte_size")]
    min_free_space: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SkopeoFragment {
    command: Option<String>,
}

/// Which D-Bus bus longshore uses to reach systemd (and, later, to serve its API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    /// The system bus: a node.
    System,
    /// The session bus of the caller: tests with a user manager.
    Session,
}

impl Bus {
    /// The bus's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Bus::System => "system",
            Bus::Session => "session",
        }
    }
}

/// Where imported images live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreMode {
    /// CRI-O's own store (`[store] root`).
    Primary,
    /// longshore's own store, `/var/lib/longshore/storage`, which CRI-O reads as an
    /// additional, read-only image store.
    Additional,
}

/// The storage driver of the store longshore writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// overlay, what CRI-O uses on RHEL CoreOS.
    Overlay,
    /// vfs, for filesystems that cannot host overlay.
    Vfs,
}

impl Driver {
    /// The name containers-storage knows the driver by.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Overlay => "overlay",
            Driver::Vfs => "vfs",
        }
    }
}

/// Where images are written.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// CRI-O's store or an additional one.
    pub mode: StoreMode,
    /// Storage driver.
    pub driver: Driver,
    /// Graph root, as on the node (before `--sysroot` is applied).
    pub root: PathBuf,
    /// Run root, as on the node.
    pub run_root: PathBuf,
    /// Free space that must remain on the store's filesystem after an import.
    pub min_free_space: u64,
}

/// How longshore treats CRI-O.
#[derive(Debug, Clone)]
pub struct CrioSettings {
    /// CRI-O's systemd unit.
    pub unit: String,
    /// Whether CRI-O is reloaded when the pins change.
    pub reload: bool,
    /// Whether CRI-O may be restarted when a change needs it (the additional store).
    pub allow_restart: bool,
}

/// `[share]`: serving the cache to this node's CRI-O and to the cluster's other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSettings {
    /// Whether the endpoint runs and the mirror drop-in is written.
    pub enabled: bool,
    /// The loopback listener for this node's CRI-O and tools (no authentication).
    pub local: SocketAddr,
    /// The listener for the cluster's other nodes (authenticated); `None` is none.
    pub peer: Option<SocketAddr>,
    /// Peers to join the cluster through: `HOST:PORT`, a host name may name several.
    pub bootstrap: Vec<String>,
    /// The cluster key, shared by every node of the cluster.
    pub key_file: PathBuf,
    /// The registries mirrored through the endpoint; empty is every registry the cache
    /// holds images from.
    pub registries: Vec<String>,
    /// The mirrored registries themselves are never contacted (`blocked = true`).
    pub never_contact_source: bool,
    /// A miss on every node is fetched from the source into the cache.
    pub upstream: bool,
    /// The mirror is used for tags too (`pull-from-mirror = "all"`), not only digests.
    pub mirror_tags: bool,
    /// Also find the cluster's nodes with multicast DNS.
    pub mdns: bool,
    /// Connections served at once, over both listeners.
    pub max_connections: usize,
}

/// The merged, validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The store images are imported into.
    pub store: StoreSettings,
    /// The skopeo program used for copies and the image proxy.
    pub skopeo: String,
    /// How many images are copied into the store at once.
    pub import_jobs: usize,
    /// Whether the implicit set of a foreign input (a `podman save` archive) is pinned.
    pub pin_foreign: bool,
    /// `[import] retain_bundles`: read so that older configuration still loads, with no
    /// effect now that the cache keeps every imported bundle's blobs.
    pub retain_bundles: bool,
    /// `[cache] max_size`: the cap beyond which unreferenced cache blobs are evicted;
    /// `None` is a quarter of the cache's filesystem.
    pub cache_max_size: Option<u64>,
    /// `[cache] keep_imported`: seconds an import keeps its bundle's blobs referenced
    /// after nothing in force names them any more.
    pub cache_keep_imported: u64,
    /// `[fetch]`.
    pub fetch: FetchSettings,
    /// `[share]`.
    pub share: ShareSettings,
    /// The bus systemd is reached on.
    pub bus: Bus,
    /// CRI-O.
    pub crio: CrioSettings,
    /// Bundle media.
    pub media: MediaSettings,
    /// The fragment files that were applied, in order.
    pub sources: Vec<PathBuf>,
}

/// Default number of concurrent copies: two keep both stages of a copy (fetching and
/// unpacking) busy without the store's lock becoming the queue.
pub const DEFAULT_IMPORT_JOBS: usize = 2;

/// Default free-space floor: 1 GiB stays free for the node after an import.
pub const DEFAULT_MIN_FREE_SPACE: u64 = 1 << 30;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            store: StoreSettings {
                mode: StoreMode::Primary,
                driver: Driver::Overlay,
                root: PathBuf::from("/var/lib/containers/storage"),
                run_root: PathBuf::from("/run/containers/storage"),
                min_free_space: DEFAULT_MIN_FREE_SPACE,
            },
            skopeo: "skopeo".to_string(),
            import_jobs: DEFAULT_IMPORT_JOBS,
            pin_foreign: true,
            retain_bundles: false,
            cache_max_size: None,
            cache_keep_imported: 24 * 3600,
            fetch: FetchSettings {
                enabled: true,
                jobs: 4,
                max_rate: None,
                windows: vec![],
            },
            share: ShareSettings {
                enabled: false,
                local: SocketAddr::from(([127, 0, 0, 1], 5050)),
                peer: None,
                bootstrap: vec![],
                key_file: PathBuf::from("/etc/longshore/cluster.key"),
                registries: vec![],
                never_contact_source: false,
                upstream: false,
                mirror_tags: false,
                mdns: false,
                max_connections: 64,
            },
            bus: Bus::System,
            crio: CrioSettings {
                unit: "crio.service".to_string(),
                reload: true,
                allow_restart: false,
            },
            media: MediaSettings {
                labels: vec!["LONGSHORE*".to_string()],
                removable: false,
                raw_tar: true,
                policy: MediaPolicy::Apply,
            },
            sources: Vec::new(),
        }
    }
}

impl Settings {
    /// Reads and merges every fragment under the host's config directories.
    pub fn load(paths: &HostPaths) -> Result<Settings> {
        let dirs: Vec<PathBuf> = paths
            .config_dirs
            .iter()
            .map(|d| d.join("config.d"))
            .collect();
        let files = fragment_files(&dirs, "toml")?;
        let mut settings = Settings::default();
        for file in files {
            let text = read_text(&file, MAX_FRAGMENT)
                .with_context(|| format!("reading configuration file {}", file.display()))?;
            let fragment: Fragment = toml::from_str(&text)
                .with_context(|| format!("configuration file {}", file.display()))?;
            settings.apply(fragment);
            settings.sources.push(file);
        }
        Ok(settings)
    }

    fn apply(&mut self, f: Fragment) {
        set(&mut self.bus, f.bus);
        if let Some(s) = f.store {
            set(&mut self.store.mode, s.mode);
            set(&mut self.store.driver, s.driver);
            set(&mut self.store.root, s.root);
            set(&mut self.store.run_root, s.run_root);
            set(&mut self.store.min_free_space, s.min_free_space);
        }
        if let Some(s) = f.skopeo {
            set(&mut self.skopeo, s.command);
        }
        if let Some(i) = f.import {
            set(&mut self.import_jobs, i.jobs);
            set(&mut self.pin_foreign, i.pin_foreign);
            set(&mut self.retain_bundles, i.retain_bundles);
        }
        if let Some(c) = f.cache {
            if c.max_size.is_some() {
                self.cache_max_size = c.max_size;
            }
            set(&mut self.cache_keep_imported, c.keep_imported);
        }
        if let Some(x) = f.fetch {
            set(&mut self.fetch.enabled, x.enabled);
            set(&mut self.fetch.jobs, x.jobs);
            if x.max_rate.is_some() {
                self.fetch.max_rate = x.max_rate.filter(|r| *r > 0);
            }
            set(&mut self.fetch.windows, x.windows);
        }
        if let Some(x) = f.share {
            let s = &mut self.share;
            set(&mut s.enabled, x.enabled);
            set(&mut s.local, x.local);
            set(&mut s.peer, x.peer);
            set(&mut s.bootstrap, x.bootstrap);
            set(&mut s.key_file, x.key_file);
            set(&mut s.registries, x.registries);
            set(&mut s.never_contact_source, x.never_contact_source);
            set(&mut s.upstream, x.upstream);
            set(&mut s.mirror_tags, x.mirror_tags);
            set(&mut s.mdns, x.mdns);
            set(&mut s.max_connections, x.max_connections);
        }
        if let Some(m) = f.media {
            set(&mut self.media.labels, m.labels);
            set(&mut self.media.removable, m.removable);
            set(&mut self.media.raw_tar, m.raw_tar);
            set(&mut self.media.policy, m.policy);
        }
        if let Some(c) = f.crio {
            set(&mut self.crio.unit, c.unit);
            set(&mut self.crio.reload, c.reload);
            set(&mut self.crio.allow_restart, c.allow_restart);
        }
    }
}

/// Largest configuration fragment read.
pub const MAX_FRAGMENT: u64 = 1 << 20;

/// Reads a UTF-8 file an administrator wrote, up to `limit` bytes; a link is followed,
/// but only to a regular file (see [`crate::untrusted::read_admin_file`]).
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    let bytes = crate::untrusted::read_admin_file(path, limit)?;
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Checks one configuration fragment as [`Settings::load`] would read it, for files that
/// are shipped to nodes (`longshore generate --config`).
pub fn check_fragment(file: &Path, text: &str) -> Result<()> {
    toml::from_str::<Fragment>(text)
        .map(|_| ())
        .with_context(|| format!("configuration file {}", file.display()))
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// The `*.EXT` files of drop-in directories `dirs` (lowest precedence first), after
/// overriding by name and masking, in lexical order of their names.
pub fn fragment_files(dirs: &[PathBuf], ext: &str) -> Result<Vec<PathBuf>> {
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in dirs {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(&format!(".{ext}")) {
                continue;
            }
            by_name.insert(name.to_string(), entry.path());
        }
    }
    Ok(by_name.into_values().filter(|p| !is_masked(p)).collect())
}

fn is_masked(p: &Path) -> bool {
    fs::read_link(p).is_ok_and(|t| t == Path::new("/dev/null"))
}

fn absolute_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let p = PathBuf::deserialize(d)?;
    if !p.is_absolute() {
        return Err(serde::de::Error::custom(format!(
            "{} is not an absolute path",
            p.display()
        )));
    }
    Ok(Some(p))
}

fn label_globs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    if let Some(bad) = v.iter().find(|p| p.is_empty() || p.len() > 64) {
        return Err(serde::de::Error::custom(format!(
            "label pattern {bad:?} must be 1 to 64 characters"
        )));
    }
    Ok(Some(v))
}

/// The loopback listener's address: it answers without authentication, so it may only
/// be on a loopback address.
fn loopback_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    let a: SocketAddr = s.parse().map_err(|_| {
        serde::de::Error::custom(format!("{s:?} is not an address and port (IP:PORT)"))
    })?;
    if !a.ip().is_loopback() {
        return Err(serde::de::Error::custom(format!(
            "{s:?} is not a loopback address; the local listener answers anyone who reaches it, \
             so it must be on 127.0.0.1 or ::1 (other nodes use `peer`)"
        )));
    }
    Ok(Some(a))
}

/// The peer listener's address, `IP:PORT` (`0.0.0.0:PORT` for every address of the
/// node); an empty string is no peer listener.
fn peer_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<SocketAddr>>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(Some(None));
    }
    let a: SocketAddr = s.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{s:?} is not an address and port (IP:PORT, or 0.0.0.0:PORT for every address)"
        ))
    })?;
    Ok(Some(Some(a)))
}

/// `HOST` or `HOST:PORT` entries: a host name, an IPv4 address or a bracketed IPv6
/// address.
fn host_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    for s in &v {
        if let Err(e) = check_host_port(s) {
            return Err(serde::de::Error::custom(format!("{s:?}: {e}")));
        }
    }
    Ok(Some(v))
}

/// Checks a `HOST` or `HOST:PORT` (a host name, an IPv4 address, or an IPv6 address in
/// brackets), and splits it.
pub fn check_host_port(s: &str) -> Result<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| anyhow::anyhow!("{s:?} opens a bracket it does not close"))?;
        v6.parse::<std::net::Ipv6Addr>()
            .map_err(|_| anyhow::anyhow!("{v6:?} is not an IPv6 address"))?;
        match after {
            "" => (v6.to_string(), None),
            p => match p.strip_prefix(':') {
                Some(p) => (v6.to_string(), Some(p)),
                None => bail!("expected [IPv6]:PORT"),
            },
        }
    } else {
        let (h, p) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            bail!("{h:?} is not a host name or address");
        }
        (h.to_string(), p)
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => bail!("{p:?} is not a port"),
        },
    };
    Ok((host, port))
}

/// Registry hosts to mirror: `host[:port]`, as image references name them.
fn registry_hosts<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    for s in &v {
        let host =
            s.rsplit_once(':').map_or(
                s.as_str(),
                |(h, p)| {
                    if p.parse::<u16>().is_ok() {
                        h
                    } else {
                        s
                    }
                },
            );
        let ok = !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok || s.contains('/') {
            return Err(serde::de::Error::custom(format!(
                "{s:?} is not a registry host (HOST or HOST:PORT, as in image references)"
            )));
        }
    }
    Ok(Some(v))
}

fn connection_cap<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=4096).contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "{n} is out of range; expected 1 to 4096"
        )));
    }
    Ok(Some(n as usize))
}

fn copy_jobs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=16).contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "{n} is out of range; expected 1 to 16"
        )));
    }
    Ok(Some(n as usize))
}

fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) if n >= 0 => Ok(Some(n as u64)),
        Raw::Int(n) => Err(serde::de::Error::custom(format!(
            "{n} is negative; expected a size in bytes"
        ))),
        Raw::Text(s) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Parses a size such as `512MiB`, `2 GiB`, `1GB` or `1048576`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().with_context(|| {
        format!("invalid size {s:?}: expected a number and a unit such as 2GiB")
    })?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => bail!("invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("invalid size {s:?}: too large"))
}

/// Formats a byte count for people: `1.5 GiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn node() -> (tempfile::TempDir, HostPaths) {
        let t = tempfile::tempdir().unwrap();
        let p = HostPaths::new(t.path());
        (t, p)
    }

    fn write(p: &Path, text: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    #[test]
    fn defaults_without_files() {
        let (_t, p) = node();
        let s = Settings::load(&p).unwrap();
        assert_eq!(s.store.root, Path::new("/var/lib/containers/storage"));
        assert_eq!(s.store.min_free_space, DEFAULT_MIN_FREE_SPACE);
        assert!(s.sources.is_empty());
    }

    #[test]
    fn later_dir_replaces_same_name_and_lexical_order_applies() {
        let (_t, p) = node();
        write(
            &p.config_dirs[0].join("config.d/10-a.toml"),
            "[store]\nmin_free_space = \"1MiB\"\ndriver = \"vfs\"\n",
        );
        write(
            &p.config_dirs[2].join("config.d/10-a.toml"),
            "[store]\nmin_free_space = \"2MiB\"\n",
        );
        write(
            &p.config_dirs[1].join("config.d/20-b.toml"),
            "[store]\nroot = \"/srv/storage\"\n",
        );
        let s = Settings::load(&p).unwrap();
        // /etc's 10-a.toml replaced /usr/lib's whole file: driver falls back to the default.
        assert_eq!(s.store.min_free_space, 2 << 20);
        assert_eq!(s.store.driver, Driver::Overlay);
        assert_eq!(s.store.root, Path::new("/srv/storage"));
        assert_eq!(s.sources.len(), 2);
    }

    #[test]
    fn dev_null_symlink_masks() {
        let (_t, p) = node();
        write(
            &p.config_dirs[0].join("config.d/10-a.toml"),
            "[store]\ndriver = \"vfs\"\n",
        );
        fs::create_dir_all(p.config_dirs[2].join("config.d")).unwrap();
        symlink("/dev/null", p.config_dirs[2].join("config.d/10-a.toml")).unwrap();
        let s = Settings::load(&p).unwrap();
        assert_eq!(s.store.driver, Driver::Overlay);
    }

    #[test]
    fn unknown_key_names_file_key_and_line() {
        let (_t, p) = node();
        let f = p.config_dirs[2].join("config.d/30-typo.toml");
        write(&f, "# comment\n[store]\nmin_free = 5\n");
        let msg = format!("{:#}", Settings::load(&p).unwrap_err());
        assert!(msg.contains("30-typo.toml"), "{msg}");
        assert!(msg.contains("min_free"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn bad_values_are_errors() {
        for (text, needle) in [
            ("[store]\nmin_free_space = \"12 parsecs\"\n", "unknown unit"),
            ("[store]\nmin_free_space = -1\n", "negative"),
            ("[store]\nroot = \"relative/dir\"\n", "not an absolute path"),
            ("[store]\ndriver = \"btrfs\"\n", "btrfs"),
            ("[nope]\n", "nope"),
            (
                "[share]\nlocal = \"10.0.0.1:5050\"\n",
                "not a loopback address",
            ),
            (
                "[share]\nlocal = \"localhost\"\n",
                "not an address and port",
            ),
            ("[share]\npeer = \"eth0:5051\"\n", "not an address and port"),
            (
                "[share]\nbootstrap = [\"node a:5051\"]\n",
                "not a host name",
            ),
            ("[share]\nbootstrap = [\"node:0\"]\n", "not a port"),
            (
                "[share]\nregistries = [\"quay.io/openshift\"]\n",
                "not a registry host",
            ),
            (
                "[share]\nkey_file = \"cluster.key\"\n",
                "not an absolute path",
            ),
            ("[share]\nmax_connections = 0\n", "out of range"),
        ] {
            let (_t, p) = node();
            write(&p.config_dirs[2].join("config.d/50-bad.toml"), text);
            let msg = format!("{:#}", Settings::load(&p).unwrap_err());
            assert!(
                msg.contains("50-bad.toml") && msg.contains(needle),
                "{text}: {msg}"
            );
        }
    }

    #[test]
    fn share_keys_are_read() {
        let (_t, p) = node();
        write(
            &p.config_dirs[2].join("config.d/60-share.toml"),
            "[share]\nenabled = true\nlocal = \"[::1]:6000\"\npeer = \"0.0.0.0:5051\"\n\
             bootstrap = [\"master-0.example.internal\", \"10.0.0.5:5051\", \"[fd00::5]:5051\"]\n\
             registries = [\"quay.io\", \"registry.local:5000\"]\nmirror_tags = true\n",
        );
        let s = Settings::load(&p).unwrap().share;
        assert!(s.enabled && s.mirror_tags && !s.upstream);
        assert_eq!(s.local, "[::1]:6000".parse().unwrap());
        assert_eq!(s.peer, Some("0.0.0.0:5051".parse().unwrap()));
        assert_eq!(s.bootstrap.len(), 3);
        assert_eq!(s.registries, ["quay.io", "registry.local:5000"]);
        // An empty peer in a later file turns the peer listener off again.
        write(
            &p.config_dirs[2].join("config.d/70-no-peer.toml"),
            "[share]\npeer = \"\"\n",
        );
        assert_eq!(Settings::load(&p).unwrap().share.peer, None);
    }

    #[test]
    fn shipped_defaults_are_the_built_in_defaults() {
        let (_t, p) = node();
        write(
            &p.config_dirs[0].join("config.d/10-defaults.toml"),
            include_str!("../config/10-defaults.toml"),
        );
        let shipped = Settings::load(&p).unwrap();
        let built_in = Settings::default();
        assert_eq!(shipped.sources.len(), 1);
        assert_eq!(shipped.store.driver, built_in.store.driver);
        assert_eq!(shipped.store.root, built_in.store.root);
        assert_eq!(shipped.store.run_root, built_in.store.run_root);
        assert_eq!(shipped.store.min_free_space, built_in.store.min_free_space);
        assert_eq!(shipped.import_jobs, built_in.import_jobs);
        assert_eq!(shipped.skopeo, built_in.skopeo);
        assert_eq!(shipped.store.mode, built_in.store.mode);
        assert_eq!(shipped.pin_foreign, built_in.pin_foreign);
        assert_eq!(shipped.retain_bundles, built_in.retain_bundles);
        assert_eq!(shipped.cache_max_size, built_in.cache_max_size);
        assert_eq!(shipped.cache_keep_imported, built_in.cache_keep_imported);
        assert_eq!(shipped.fetch, built_in.fetch);
        assert_eq!(shipped.share, built_in.share);
        assert_eq!(shipped.bus, built_in.bus);
        assert_eq!(shipped.crio.unit, built_in.crio.unit);
        assert_eq!(shipped.crio.reload, built_in.crio.reload);
        assert_eq!(shipped.crio.allow_restart, built_in.crio.allow_restart);
        assert_eq!(shipped.media.labels, built_in.media.labels);
        assert_eq!(shipped.media.removable, built_in.media.removable);
        assert_eq!(shipped.media.raw_tar, built_in.media.raw_tar);
        assert_eq!(shipped.media.policy, built_in.media.policy);
    }

    #[test]
    fn fetch_windows_are_read_and_may_run_over_midnight() {
        let w = Window::parse("01:00-05:00").unwrap();
        assert!(w.contains(60) && w.contains(299) && !w.contains(300) && !w.contains(59));
        assert_eq!(w.opens_in(0), 60);
        assert_eq!(w.opens_in(301), 1440 - 301 + 60);
        let night = Window::parse("22:30-04:00").unwrap();
        assert!(night.contains(23 * 60) && night.contains(0) && !night.contains(12 * 60));
        assert_eq!(night.to_string(), "22:30-04:00");
        for bad in [
            "1:00-5:00",
            "01:00",
            "25:00-01:00",
            "01:00-01:00",
            "aa:bb-cc:dd",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
        let f = FetchSettings {
            enabled: true,
            jobs: 1,
            max_rate: None,
            windows: vec![w, night],
        };
        assert_eq!(f.wait_minutes(12 * 60), 10 * 60 + 30);
        assert_eq!(f.wait_minutes(2 * 60), 0);
        let (_t, p) = node();
        write(
            &p.config_dirs[2].join("config.d/50-fetch.toml"),
            "[fetch]\nwindows = [\"01:00-5:00\"]\n",
        );
        let e = Settings::load(&p).unwrap_err();
        assert!(format!("{e:#}").contains("invalid time window"), "{e:#}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("2 GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("3GB").unwrap(), 3_000_000_000);
        assert!(parse_size("GiB").is_err());
        assert_eq!(human_size(1536 << 20), "1.5 GiB");
        assert_eq!(human_size(12), "12 B");
    }
}
