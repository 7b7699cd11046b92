//! Image sets: named lists of images that must be present on the node, and usually pinned
//! in CRI-O. The node-local counterpart of OpenShift's PinnedImageSet.
//!
//! Sets come from bundles (recorded in the state when the bundle is imported; a later
//! bundle that declares the same name replaces the set) and from files an administrator
//! drops into `sets.d/` beside the configuration (`/usr/lib`, `/run`, `/etc`, with the
//! same precedence and masking as configuration). A file's set takes precedence over a
//! bundle's set of the same name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::bundle::format::{split_reference, RefTail};
use crate::bundle::read::valid_set_name;
use crate::config::fragment_files;
use crate::oci::digest::Digest;
use crate::paths::HostPaths;
use crate::state::State;
use crate::store::StoredNames;

/// A set file as written (`/etc/longshore/sets.d/NAME.toml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetFile {
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    release: Option<String>,
    #[serde(default = "yes")]
    pinned: bool,
    #[serde(default)]
    allow_tags: bool,
    #[serde(default)]
    critical: bool,
    #[serde(default = "yes")]
    fetch: bool,
}

fn yes() -> bool {
    true
}

/// Where a set comes from.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Source {
    /// Declared by a bundle.
    Bundle {
        /// The bundle's name.
        name: String,
        /// The bundle's digest.
        digest: Digest,
    },
    /// Written by an administrator.
    File {
        /// The file.
        path: PathBuf,
    },
}

/// A set in force.
#[derive(Debug, Clone)]
pub struct SetDef {
    /// Name.
    pub name: String,
    /// Image references (digest references; tags where the file allows them).
    pub images: Vec<String>,
    /// Whether its images are pinned once all are present.
    pub pinned: bool,
    /// Whether the node needs it before the container runtime starts.
    pub critical: bool,
    /// Where it comes from.
    pub source: Source,
    /// The images of the definition it replaces, while it is not complete yet.
    pub previous: Vec<String>,
    /// Whether images neither the store nor the cache holds are fetched from registries
    /// (set files, unless they say `fetch = false`; a bundle's sets come with it).
    pub fetch: bool,
    /// The release image the set is named by (`release =`); its payload images are in
    /// `images` once known.
    pub release: Option<String>,
    /// Why the set cannot be complete yet though every image it lists may be present
    /// (a release whose payload has not been read).
    pub pending: Option<String>,
}

/// Largest set file read (a release's thousand images take about 100 KiB).
pub const MAX_SET_FILE: u64 = 4 << 20;

/// Reads the set files of every `sets.d` directory.
pub fn load_files(paths: &HostPaths) -> Result<Vec<SetDef>> {
    let dirs: Vec<PathBuf> = paths.config_dirs.iter().map(|d| d.join("sets.d")).collect();
    let mut out = Vec::new();
    for path in fragment_files(&dirs, "toml")? {
        let mut def = load_file(&path)?;
        if let Some(r) = def.release.clone() {
            match crate::release::recorded(paths, &r) {
                Some(p) => {
                    for i in p.images {
                        if !def.images.contains(&i) {
                            def.images.push(i);
                        }
                    }
                }
                None => {
                    def.pending = Some(format!(
                        "the payload of release {r} is read once the release image is in the cache"
                    ))
                }
            }
        }
        out.push(def);
    }
    Ok(out)
}

/// Checks a set file as the node would read it, for files that are shipped to nodes.
pub fn check_file(path: &Path) -> Result<()> {
    load_file(path).map(|_| ())
}

fn load_file(path: &Path) -> Result<SetDef> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !valid_set_name(&name) {
        anyhow::bail!(
            "set file {}: the file name must be the set's name: letters, digits, '.', '_' and '-'",
            path.display()
        );
    }
    let text = crate::config::read_text(path, MAX_SET_FILE)
        .with_context(|| format!("reading set file {}", path.display()))?;
    parse_file(path, name, &text)
}

/// Parses the text of the set file `path`, which defines the set `name`.
pub fn parse_file(path: &Path, name: String, text: &str) -> Result<SetDef> {
    let f: SetFile =
        toml::from_str(text).with_context(|| format!("set file {}", path.display()))?;
    let mut images = f.images.clone();
    if let Some(r) = &f.release {
        match split_reference(r) {
            Some((_, RefTail::Digest(_))) => {}
            Some((_, RefTail::Tag(_))) if f.allow_tags => {}
            Some((_, RefTail::Tag(_))) => anyhow::bail!(
                "set file {}: release {r:?} is named by tag; name it by digest (repository@sha256:…), or set allow_tags = true",
                path.display()
            ),
            None => anyhow::bail!(
                "set file {}: release {} is not a full image reference: {}",
                path.display(),
                crate::untrusted::quote(r.as_bytes()),
                crate::oci::reference::parse(r).err().unwrap_or_default()
            ),
        }
        if !images.contains(r) {
            images.insert(0, r.clone());
        }
    } else if f.images.is_empty() {
        anyhow::bail!(
            "set file {}: it names no image: give `images = [...]` or `release = \"...\"`",
            path.display()
        );
    }
    let mut seen = BTreeSet::new();
    for r in &f.images {
        match split_reference(r) {
            Some((_, RefTail::Digest(_))) => {}
            Some((_, RefTail::Tag(_))) if f.allow_tags => {}
            Some((_, RefTail::Tag(_))) => anyhow::bail!(
                "set file {}: image {r:?} is named by tag; use repository@sha256:…, or set allow_tags = true",
                path.display()
            ),
            None => anyhow::bail!(
                "set file {}: image {} is not a full image reference (registry/repository@sha256:…): {}",
                path.display(),
                crate::untrusted::quote(r.as_bytes()),
                crate::oci::reference::parse(r).err().unwrap_or_default()
            ),
        }
        if !seen.insert(r) {
            anyhow::bail!("set file {}: image {r:?} is listed twice", path.display());
        }
    }
    Ok(SetDef {
        name,
        images,
        pinned: f.pinned,
        critical: f.critical,
        source: Source::File {
            path: path.to_path_buf(),
        },
        previous: vec![],
        fetch: f.fetch,
        release: f.release,
        pending: None,
    })
}

/// The sets in force: those of the state's bundles, with the files' sets taking the
/// place of any of the same name.
pub fn effective(state: &State, files: Vec<SetDef>) -> Vec<SetDef> {
    let mut by_name: BTreeMap<String, SetDef> = BTreeMap::new();
    for s in state.sets.values() {
        let bundle_name = state
            .bundles
            .get(&s.bundle)
            .map(|b| b.name.clone())
            .unwrap_or_default();
        by_name.insert(
            s.name.clone(),
            SetDef {
                name: s.name.clone(),
                images: s.images.clone(),
                pinned: s.pinned,
                critical: s.critical,
                source: Source::Bundle {
                    name: bundle_name,
                    digest: s.bundle,
                },
                previous: s.previous.clone(),
                fetch: false,
                release: None,
                pending: None,
            },
        );
    }
    for f in files {
        if let Some(old) = by_name.get(&f.name) {
            if let Source::Bundle { name, .. } = &old.source {
                tracing::warn!(
                    "set {} is declared by bundle {name} and by {}; the file's definition is used",
                    f.name,
                    match &f.source {
                        Source::File { path } => path.display().to_string(),
                        Source::Bundle { name, .. } => name.clone(),
                    }
                );
            }
        }
        by_name.insert(f.name.clone(), f);
    }
    by_name.into_values().collect()
}

/// A condition of a set, in the manner of Kubernetes conditions.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Whether it holds.
    pub status: bool,
    /// A CamelCase reason.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

/// An image of a set, as the store holds it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageView {
    /// The reference the set names.
    pub reference: String,
    /// Whether the store holds it.
    pub present: bool,
    /// The names it is stored under that are pinned for it.
    pub names: Vec<String>,
}

/// A set and its state.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SetView {
    /// Name.
    pub name: String,
    /// Where it comes from.
    pub source: Source,
    /// Whether it asks to be pinned.
    pub pinned: bool,
    /// Whether the node needs it before the container runtime starts.
    pub critical: bool,
    /// Its images.
    pub images: Vec<ImageView>,
    /// References of the images the store lacks.
    pub missing: Vec<String>,
    /// Estimated bytes its present images take in the store, shared layers counted once.
    pub bytes_on_disk: u64,
    /// `Ready`, `Progressing`, `Degraded`.
    pub conditions: Vec<Condition>,
    /// The names pinned for it now.
    #[serde(skip)]
    pub pins: Vec<String>,
}

/// What the engine is busy with, so sets can say `Progressing`.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    /// Sets whose images are being imported now.
    pub importing: BTreeSet<String>,
    /// Drop-ins that set `pinned_images` after longshore's file and so override it.
    pub overriding: Vec<PathBuf>,
    /// What the fetcher is doing, if one runs.
    pub fetch: Option<crate::fetch::Board>,
}

/// Looks each image up among the names the store holds and works out every set's state
/// and pins.
pub fn evaluate(
    defs: &[SetDef],
    state: &State,
    names: &StoredNames,
    activity: &Activity,
) -> Vec<SetView> {
    let lookup = |r: &str| names.lookup(r);
    // What the records know of each image: its layers, and the names bundles gave it.
    let mut known: HashMap<Digest, (&crate::state::ImageRecord, Vec<String>)> = HashMap::new();
    for b in state.bundles.values() {
        for i in &b.images {
            let e = known.entry(i.digest).or_insert((i, Vec::new()));
            e.1.extend(i.names.iter().cloned());
        }
    }
    let mut views = Vec::new();
    for def in defs {
        let mut images = Vec::new();
        let mut missing = Vec::new();
        let mut layers_seen = BTreeSet::new();
        let mut bytes = 0u64;
        for r in &def.images {
            let found = lookup(r);
            let mut names = Vec::new();
            if let Some(d) = found {
                names.push(r.clone());
                // An image named by tag is stored by digest too (a digest pin does not
                // pin an image stored by tag alone, docs/crio.md): both are pinned.
                if let Ok((repo, crate::oci::reference::Tail::Tag(_))) =
                    crate::oci::reference::parse(r)
                {
                    let by_digest = format!("{repo}@{d}");
                    if lookup(&by_digest) == Some(d) {
                        names.push(by_digest);
                    }
                }
                if let Some((rec, recorded)) = known.get(&d) {
                    for n in recorded {
                        // A recorded tag may since have moved to another image.
                        if n != r && lookup(n) == Some(d) {
                            names.push(n.clone());
                        }
                    }
                    bytes += rec.overhead;
                    for (l, size) in &rec.layers {
                        if layers_seen.insert(*l) {
                            bytes += size;
                        }
                    }
                }
                names.sort();
                names.dedup();
            } else {
                missing.push(r.clone());
            }
            images.push(ImageView {
                reference: r.clone(),
                present: found.is_some(),
                names,
            });
        }
        let complete = missing.is_empty() && def.pending.is_none();
        let pins: Vec<String> = if !def.pinned {
            vec![]
        } else if complete {
            images
                .iter()
                .flat_map(|i| i.names.iter().cloned())
                .collect()
        } else {
            // While a new definition comes in, what it keeps of the old one stays pinned.
            images
                .iter()
                .filter(|i| i.present && def.previous.contains(&i.reference))
                .flat_map(|i| i.names.iter().cloned())
                .collect()
        };
        let conditions = conditions(def, &missing, activity, state);
        views.push(SetView {
            name: def.name.clone(),
            source: def.source.clone(),
            pinned: def.pinned,
            critical: def.critical,
            images,
            missing,
            bytes_on_disk: bytes,
            conditions,
            pins,
        });
    }
    views
}

fn conditions(
    def: &SetDef,
    missing: &[String],
    activity: &Activity,
    state: &State,
) -> Vec<Condition> {
    let importing = activity.importing.contains(&def.name);
    let total = def.images.len();
    let overridden = def.pinned && !activity.overriding.is_empty();
    let mut out = Vec::new();
    let (ready, reason, message) = if !missing.is_empty() {
        (
            false,
            "ImagesMissing",
            format!("{} of {total} images are not in the store", missing.len()),
        )
    } else if let Some(p) = &def.pending {
        (false, "ReleasePending", p.clone())
    } else if importing {
        // Present, but not pinned yet: the import is still under way.
        (
            false,
            "Importing",
            format!("all {total} images are in the store; the import is finishing"),
        )
    } else if overridden {
        (
            false,
            "PinsOverridden",
            format!(
                "{} sets pinned_images after longshore's drop-in, replacing its pins",
                activity
                    .overriding
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    } else if def.pinned {
        (
            true,
            "Pinned",
            format!("all {total} images are in the store and pinned"),
        )
    } else {
        (
            true,
            "Present",
            format!("all {total} images are in the store (not pinned)"),
        )
    };
    out.push(Condition {
        kind: "Ready",
        status: ready,
        reason,
        message,
    });
    let fetching = activity.fetch.as_ref().and_then(|b| {
        b.sets
            .get(&def.name)
            .filter(|p| b.active || p.waiting.is_some())
    });
    let failures: Vec<(&String, &crate::fetch::Failure)> = activity
        .fetch
        .as_ref()
        .map(|b| {
            b.failures
                .iter()
                .filter(|(r, _)| missing.contains(r))
                .collect()
        })
        .unwrap_or_default();
    out.push(if importing {
        Condition {
            kind: "Progressing",
            status: true,
            reason: "Importing",
            message: format!("importing its images ({} missing)", missing.len()),
        }
    } else if let Some(p) = fetching.filter(|_| !missing.is_empty()) {
        match &p.waiting {
            Some(w) => Condition {
                kind: "Progressing",
                status: true,
                reason: "WaitingForWindow",
                message: w.clone(),
            },
            None => Condition {
                kind: "Progressing",
                status: true,
                reason: "Fetching",
                message: format!(
                    "fetching from registries: {} of {}{}",
                    crate::config::human_size(p.done),
                    crate::config::human_size(p.total),
                    p.eta
                        .map(|s| format!(", about {} left", crate::report::human_duration(s)))
                        .unwrap_or_default()
                ),
            },
        }
    } else {
        Condition {
            kind: "Progressing",
            status: false,
            reason: "Idle",
            message: String::new(),
        }
    });
    if let Some((_, first)) = failures.first() {
        let lines: Vec<String> = failures
            .iter()
            .map(|(r, f)| {
                format!(
                    "{r}: {} since {}: {}",
                    f.reason.name(),
                    crate::bundle::write::rfc3339(f.since),
                    f.message
                )
            })
            .collect();
        out.push(Condition {
            kind: "Degraded",
            status: true,
            reason: first.reason.name(),
            message: lines.join("; "),
        });
        return out;
    }
    out.push(if !missing.is_empty() {
        let from = retained_source(def, state);
        let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
        let more = if missing.len() > shown.len() {
            format!(" and {} more", missing.len() - shown.len())
        } else {
            String::new()
        };
        Condition {
            kind: "Degraded",
            status: true,
            reason: "ImagesMissing",
            message: format!(
                "missing {}{more}; {}",
                shown.join(", "),
                match from {
                    Some(b) => format!(
                        "the cache holds bundle {b}, which can restore them (`longshore sync`)"
                    ),
                    None if def.fetch => {
                        "they are fetched from registries (`longshore fetch`)".to_string()
                    }
                    None => "import a bundle that carries them".to_string(),
                }
            ),
        }
    } else if overridden {
        Condition {
            kind: "Degraded",
            status: true,
            reason: "PinsOverridden",
            message: "CRI-O does not see longshore's pins".to_string(),
        }
    } else {
        Condition {
            kind: "Degraded",
            status: false,
            reason: "AsExpected",
            message: String::new(),
        }
    });
    out
}

/// The name of a bundle the cache holds whole that carries every image of the set, if
/// there is one.
fn retained_source(def: &SetDef, state: &State) -> Option<String> {
    state
        .bundles
        .values()
        .filter(|b| b.cached)
        .find(|b| {
            def.images.iter().all(|r| {
                b.images.iter().any(|i| {
                    i.names.iter().any(|n| n == r) || format!("{}@{}", i.repository, i.digest) == *r
                })
            })
        })
        .map(|b| b.name.clone())
}

/// Every name to pin: the pins of every set.
pub fn pins(views: &[SetView]) -> BTreeSet<String> {
    views.iter().flat_map(|v| v.pins.iter().cloned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(text: &str) -> Result<SetDef> {
        parse_file(
            Path::new("/etc/longshore/sets.d/edge.toml"),
            "edge".into(),
            text,
        )
    }

    #[test]
    fn a_set_file_names_images_by_digest_unless_it_allows_tags() {
        let def = parse(&format!("images = [\"quay.io/a/b@{D}\"]\n")).unwrap();
        assert_eq!(def.images, vec![format!("quay.io/a/b@{D}")]);
        assert!(def.pinned, "pinned by default");
        assert!(!def.critical, "not critical by default");
        let e = parse("images = [\"quay.io/a/b:1\"]\n").unwrap_err();
        assert!(format!("{e:#}").contains("named by tag"), "{e:#}");
        let def =
            parse("images = [\"quay.io/a/b:1\"]\nallow_tags = true\ncritical = true\n").unwrap();
        assert!(def.critical);
    }

    #[test]
    fn a_set_file_is_refused_for_duplicates_bad_names_and_unknown_keys() {
        let twice = format!("images = [\"quay.io/a/b@{D}\", \"quay.io/a/b@{D}\"]\n");
        assert!(format!("{:#}", parse(&twice).unwrap_err()).contains("listed twice"));
        let bad = parse("images = [\"-evil.com/x@sha256:00\"]\n").unwrap_err();
        assert!(
            format!("{bad:#}").contains("not a full image reference"),
            "{bad:#}"
        );
        assert!(
            parse("images = []\npinnned = false\n").is_err(),
            "a typo is an error"
        );
    }

    #[test]
    fn a_file_set_takes_the_place_of_a_bundle_set_of_the_same_name() {
        let bundle: Digest = D.parse().unwrap();
        let mut state = State::default();
        for name in ["edge", "core"] {
            state.sets.insert(
                name.into(),
                crate::state::ActiveSet {
                    name: name.into(),
                    images: vec![format!("quay.io/{name}/x@{D}")],
                    pinned: true,
                    critical: false,
                    bundle,
                    previous: vec![],
                },
            );
        }
        let file = parse(&format!(
            "images = [\"quay.io/file/y@{D}\"]\npinned = false\n"
        ))
        .unwrap();
        let sets = effective(&state, vec![file]);
        assert_eq!(sets.len(), 2);
        let edge = sets.iter().find(|s| s.name == "edge").unwrap();
        assert!(matches!(edge.source, Source::File { .. }));
        assert_eq!(edge.images, vec![format!("quay.io/file/y@{D}")]);
        assert!(!edge.pinned);
        let core = sets.iter().find(|s| s.name == "core").unwrap();
        assert!(matches!(core.source, Source::Bundle { .. }));
    }
}
