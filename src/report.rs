//! What `longshore status` and `longshore sets` show, gathered once for the command line
//! and for the daemon's D-Bus `Status` and `Sets` methods, so both say the same.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use crate::config::{human_size, Settings};
use crate::engine;
use crate::oci::digest::Digest;
use crate::paths::HostPaths;
use crate::sets::{SetView, Source};
use crate::state::{BundleState, State};
use crate::store::{Store, Wanted};

/// The version of `status --json` output; bumped only on incompatible changes.
pub const STATUS_API_VERSION: &str = "longshore.io/v1";

/// What the daemon is doing, when the status comes from it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonStatus {
    /// `idle`, `importing`, `checking` or `stopping` (the D-Bus `State` property).
    pub state: String,
    /// The D-Bus `StatusText` property, as `systemctl status` shows it.
    pub status_text: String,
}

/// The sets alone, as `sets --json` prints them.
pub fn sets_json(sets: &[SetView]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": STATUS_API_VERSION,
        "sets": sets,
    })
}

/// The sets in force and their state.
pub async fn sets(paths: &HostPaths, settings: &Settings) -> Result<Vec<SetView>> {
    let state = State::load(&paths.state_dir)?;
    let store = Store::new(paths, settings);
    let (views, _) = engine::evaluate_sets(paths, settings, &state, &store, None).await?;
    Ok(views)
}

/// `status --json`: a stable interface, documented in docs/status-json.md.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Always [`STATUS_API_VERSION`].
    pub api_version: &'static str,
    /// The store, as skopeo addresses it.
    pub store: String,
    /// Bundles.
    pub bundles: Vec<BundleStatus>,
    /// Image sets, with their state.
    pub sets: Vec<SetView>,
    /// Images.
    pub images: Vec<ImageStatus>,
    /// What the daemon is doing; only when the status comes from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daemon: Option<DaemonStatus>,
    /// The endpoint; only with `[share] enabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharing: Option<SharingStatus>,
}

/// The endpoint in `status`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SharingStatus {
    /// Whether a daemon serves now.
    pub running: bool,
    /// The loopback listener's address, when it listens.
    pub local: Option<String>,
    /// The peer listener's address, when it listens.
    pub peer: Option<String>,
    /// Why a configured listener is not running.
    pub problems: Vec<String>,
    /// What this node's CRI-O and tools were served.
    pub served_local: crate::share::CountersView,
    /// What other nodes were served.
    pub served_peer: crate::share::CountersView,
    /// This node's identity in the DHT, when it takes part.
    pub peer_id: Option<String>,
    /// The other nodes known.
    pub peers: Vec<crate::share::peers::PeerView>,
    /// Bytes fetched from other nodes.
    pub fetched_peer: u64,
    /// Bytes pulled through from registries.
    pub fetched_upstream: u64,
    /// Copies discarded for a wrong digest.
    pub rejected: u64,
}

/// The endpoint's state, from the board the daemon writes.
pub fn sharing(paths: &HostPaths, settings: &Settings) -> Option<SharingStatus> {
    if !settings.share.enabled {
        return None;
    }
    Some(match crate::share::ShareBoard::read(paths) {
        Some(b) => SharingStatus {
            running: true,
            local: b.local,
            peer: b.peer,
            problems: b.problems,
            served_local: b.served_local,
            served_peer: b.served_peer,
            peer_id: b.peer_id,
            peers: b.peers,
            fetched_peer: b.fetched_peer,
            fetched_upstream: b.fetched_upstream,
            rejected: b.rejected,
        },
        None => SharingStatus {
            running: false,
            local: None,
            peer: None,
            problems: vec!["the daemon is not running, so nothing is served".into()],
            served_local: Default::default(),
            served_peer: Default::default(),
            peer_id: None,
            peers: vec![],
            fetched_peer: 0,
            fetched_upstream: 0,
            rejected: 0,
        },
    })
}

/// The endpoint for a person.
pub fn render_sharing(s: &SharingStatus) -> String {
    let mut out = String::from("SHARING\n");
    let listener = |a: &Option<String>| a.clone().unwrap_or_else(|| "not listening".into());
    let _ = writeln!(
        out,
        "  local {:<24} {} requests, {} served, {} not here",
        listener(&s.local),
        s.served_local.requests,
        human_size(s.served_local.bytes),
        s.served_local.misses
    );
    let _ = writeln!(
        out,
        "  peer  {:<24} {} requests, {} served, {} not here, {} refused",
        listener(&s.peer),
        s.served_peer.requests,
        human_size(s.served_peer.bytes),
        s.served_peer.misses,
        s.served_peer.refused
    );
    if s.peer_id.is_some() {
        let connected = s.peers.iter().filter(|p| p.connected).count();
        let _ = writeln!(
            out,
            "  peers {} known, {connected} connected; fetched {} from peers, {} pulled through, {} copies discarded",
            s.peers.len(),
            human_size(s.fetched_peer),
            human_size(s.fetched_upstream),
            s.rejected
        );
    }
    for p in &s.problems {
        let _ = writeln!(out, "  problem: {p}");
    }
    out
}

/// A bundle in `status`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleStatus {
    /// Name.
    pub name: String,
    /// Version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Digest.
    pub digest: Digest,
    /// `held` or `imported`.
    pub state: BundleState,
    /// What kind of input it came from.
    pub kind: crate::state::SourceKind,
    /// Where it was read from.
    pub source: PathBuf,
    /// Number of images.
    pub images: usize,
    /// When it reached its state, RFC 3339.
    pub updated: String,
}

/// An image in `status`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// `repository@digest`.
    pub reference: String,
    /// Every name it is stored under.
    pub names: Vec<String>,
    /// `present`, `missing` or `held` (staged, not imported yet).
    pub state: &'static str,
    /// Bundles that carry it.
    pub bundles: Vec<String>,
    /// Bytes as carried in its bundle.
    pub size: u64,
}

/// Gathers the status: reads the state and asks the store what it holds.
pub async fn status(paths: &HostPaths, settings: &Settings) -> Result<Status> {
    let state = State::load(&paths.state_dir)?;
    let store = Store::new(paths, settings);
    let mut images: Vec<ImageStatus> = Vec::new();
    let names = store.names()?;
    for b in state.bundles.values() {
        for i in &b.images {
            let reference = format!("{}@{}", i.repository, i.digest);
            if let Some(existing) = images.iter_mut().find(|s| s.reference == reference) {
                existing.bundles.push(b.name.clone());
                continue;
            }
            let st = match b.state {
                BundleState::Imported | BundleState::Importing => {
                    let w = Wanted {
                        repository: &i.repository,
                        digest: i.digest,
                        tags: &i.tags,
                    };
                    if names.holds(&w) {
                        "present"
                    } else {
                        "missing"
                    }
                }
                _ => "held",
            };
            images.push(ImageStatus {
                reference,
                names: i.names.clone(),
                state: st,
                bundles: vec![b.name.clone()],
                size: i.size,
            });
        }
    }
    let (sets, _) = engine::evaluate_sets(paths, settings, &state, &store, None).await?;
    let mut bundles: Vec<BundleStatus> = state
        .bundles
        .values()
        .map(|b| BundleStatus {
            name: b.name.clone(),
            version: b.version.clone(),
            digest: b.digest,
            state: b.state,
            kind: b.kind,
            source: b.source.clone(),
            images: b.images.len(),
            updated: crate::bundle::write::rfc3339(b.updated),
        })
        .collect();
    bundles.sort_by(|a, b| a.name.cmp(&b.name).then(a.digest.cmp(&b.digest)));
    images.sort_by(|a, b| a.reference.cmp(&b.reference));
    Ok(Status {
        api_version: STATUS_API_VERSION,
        store: store.reference(""),
        bundles,
        sets,
        images,
        daemon: None,
        sharing: sharing(paths, settings),
    })
}

/// The status for a person.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    if s.bundles.is_empty() {
        let _ = writeln!(out, "No bundles imported yet. Store: {}", s.store);
        if let Some(sh) = &s.sharing {
            out.push_str(&render_sharing(sh));
        }
        return out;
    }
    let _ = writeln!(out, "BUNDLES");
    for b in &s.bundles {
        let state = match b.state {
            BundleState::Held => "held",
            BundleState::Importing => "importing",
            BundleState::Imported => "imported",
        };
        let _ = writeln!(
            out,
            "  {:<28} {:<9} {:>4} images  {}  {}",
            match &b.version {
                Some(v) => format!("{} {v}", b.name),
                None => b.name.clone(),
            },
            state,
            b.images,
            short(&b.digest),
            b.updated
        );
    }
    out.push_str(&render_sets(&s.sets));
    let _ = writeln!(out, "IMAGES");
    for i in &s.images {
        let _ = writeln!(
            out,
            "  {:<8} {:>10}  {}",
            i.state,
            human_size(i.size),
            i.names.join(", ")
        );
    }
    if let Some(sh) = &s.sharing {
        out.push_str(&render_sharing(sh));
    }
    out
}

/// The image sets for a person.
pub fn render_sets(sets: &[SetView]) -> String {
    let mut out = String::new();
    if sets.is_empty() {
        let _ = writeln!(out, "SETS\n  none");
        return out;
    }
    let _ = writeln!(out, "SETS");
    for set in sets {
        let cond = |k: &str| set.conditions.iter().find(|c| c.kind == k);
        let state = if cond("Progressing").is_some_and(|c| c.status) {
            "progressing"
        } else if cond("Ready").is_some_and(|c| c.status) {
            "ready"
        } else {
            "degraded"
        };
        let source = match &set.source {
            Source::Bundle { name, .. } => format!("bundle {name}"),
            Source::File { path } => path.display().to_string(),
        };
        let _ = writeln!(
            out,
            "  {:<28} {:<11} {:<9} {:>4} images {:>10}  from {source}",
            set.name,
            state,
            if set.pinned { "pinned" } else { "unpinned" },
            set.images.len(),
            human_size(set.bytes_on_disk),
        );
        for c in &set.conditions {
            if c.status && (c.kind == "Degraded" || c.kind == "Progressing") {
                let _ = writeln!(out, "      {} ({}): {}", c.kind, c.reason, c.message);
            }
        }
    }
    out
}

fn short(d: &Digest) -> String {
    format!("sha256:{}", &d.hex()[..12])
}

/// A number of seconds for people: `45 s`, `12 min`, `3 h 20 min`, `2 d 4 h`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=86399 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86400, secs % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sets::Condition;

    fn set(name: &str, conditions: Vec<Condition>) -> SetView {
        SetView {
            name: name.into(),
            source: Source::File {
                path: format!("/etc/longshore/sets.d/{name}.toml").into(),
            },
            pinned: true,
            critical: false,
            images: vec![],
            missing: vec![],
            bytes_on_disk: 0,
            conditions,
            pins: vec![],
        }
    }

    fn cond(kind: &'static str, status: bool, reason: &'static str, message: &str) -> Condition {
        Condition {
            kind,
            status,
            reason,
            message: message.into(),
        }
    }

    #[test]
    fn a_set_reads_progressing_before_ready_and_degraded_says_why() {
        let sets = vec![
            set(
                "busy",
                vec![
                    cond("Ready", true, "AllPresent", ""),
                    cond("Progressing", true, "Importing", "copying"),
                ],
            ),
            set("fine", vec![cond("Ready", true, "AllPresent", "")]),
            set(
                "short",
                vec![
                    cond("Ready", false, "ImagesMissing", ""),
                    cond(
                        "Degraded",
                        true,
                        "ImagesMissing",
                        "missing quay.io/a/b@sha256:…",
                    ),
                ],
            ),
        ];
        let text = render_sets(&sets);
        let line = |n: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(n))
                .unwrap()
                .to_string()
        };
        assert!(line("busy").contains("progressing"), "{text}");
        assert!(line("fine").contains("ready"), "{text}");
        assert!(line("short").contains("degraded"), "{text}");
        assert!(
            text.contains("Degraded (ImagesMissing): missing quay.io/a/b@sha256:…"),
            "{text}"
        );
        assert!(
            line("fine").contains("from /etc/longshore/sets.d/fine.toml"),
            "{text}"
        );
    }

    #[test]
    fn the_sets_json_carries_the_api_version() {
        let v = sets_json(&[set("fine", vec![cond("Ready", true, "AllPresent", "")])]);
        assert_eq!(v["apiVersion"], STATUS_API_VERSION);
        assert_eq!(v["sets"][0]["name"], "fine");
        assert_eq!(v["sets"][0]["conditions"][0]["type"], "Ready");
        assert!(
            v["sets"][0].get("pins").is_none(),
            "pins are not part of the interface"
        );
        assert_eq!(render_sets(&[]), "SETS\n  none\n");
    }
}
