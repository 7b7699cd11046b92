//! Where an image is pulled from, as CRI-O would pull it: `registries.conf` and the
//! drop-ins of `registries.conf.d`.
//!
//! The rules follow containers/image `pkg/sysregistriesv2/system_registries_v2.go`:
//! - `/etc/containers/registries.conf` is read first; it may be in the v1 format
//!   (`[registries.search|insecure|block]`), which is converted. Then every `*.conf` file
//!   of `/etc/containers/registries.conf.d`, in lexical order, not recursing; drop-ins must
//!   be v2. A `[[registry]]` of a later file **replaces** an earlier one with the same
//!   prefix, whole (`updateWithConfigurationFrom`); within one file the first of a prefix
//!   wins.
//! - A prefix defaults to the location; `*.example.com` matches subdomains. A reference
//!   matches a prefix when it equals it or continues with `/`, `:` or `@`
//!   (`refMatchingPrefix`); the longest matching prefix wins (`FindRegistry`).
//! - The sources of a pull are the mirrors in order, each unless its `pull-from-mirror`
//!   (`all`, `digest-only`, `tag-only`) or the registry's `mirror-by-digest-only` rules
//!   it out for this reference, then the registry itself (`PullSourcesFromReference`).
//!   The reference is rewritten by replacing the matched prefix with the location.
//! - `blocked = true` keeps the registry itself from being contacted; its mirrors are
//!   still tried (OpenShift's `NeverContactSource`; see ../shared DESIGN.md).
//! - `insecure = true` allows plain HTTP and unverified certificates for that location.
//!
//! Files are read with a size limit and never followed into anything but a regular file
//! (see [`crate::untrusted::read_admin_file`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::paths::HostPaths;

/// Where the drop-ins are, on a node.
pub const DROPIN_DIR: &str = "/etc/containers/registries.conf.d";

/// Largest registries configuration file read.
pub const MAX_CONF: u64 = 1 << 20;

/// Where a mirror may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullFromMirror {
    /// For digest and tag references.
    #[default]
    All,
    /// For digest references only.
    DigestOnly,
    /// For tag references only.
    TagOnly,
}

/// A mirror of a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port][/path]`.
    pub location: String,
    /// Plain HTTP and unverified TLS allowed.
    pub insecure: bool,
    /// Which references it serves.
    pub pull_from_mirror: PullFromMirror,
}

/// One `[[registry]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// What references it applies to: `host[:port][/path]` or `*.domain`.
    pub prefix: String,
    /// Where it is; empty only for a wildcard prefix (the reference's own host).
    pub location: String,
    /// Plain HTTP and unverified TLS allowed.
    pub insecure: bool,
    /// The registry itself is never contacted.
    pub blocked: bool,
    /// Mirrors only for digest references.
    pub mirror_by_digest_only: bool,
    /// Tried in order before the registry itself.
    pub mirrors: Vec<Mirror>,
}

/// A place to pull one reference from, in the order to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSource {
    /// The reference rewritten for this place (`host/path/repo:tag` or `@digest`).
    pub reference: String,
    /// Plain HTTP and unverified TLS allowed.
    pub insecure: bool,
    /// Whether it is a mirror (not the registry the reference names).
    pub mirror: bool,
}

/// The registries configuration of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistriesConf {
    /// By prefix, sorted.
    pub registries: Vec<Registry>,
    /// The files read, in order.
    pub sources: Vec<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FileV2 {
    #[serde(default)]
    registry: Vec<RawRegistry>,
    // Read so that v1 and v2 can be told apart; short names are not used here.
    #[serde(default)]
    unqualified_search_registries: Option<Vec<String>>,
    #[serde(default)]
    registries: Option<V1>,
}

#[derive(Debug, Default, Deserialize)]
struct V1 {
    #[serde(default)]
    search: Option<V1List>,
    #[serde(default)]
    insecure: Option<V1List>,
    #[serde(default)]
    block: Option<V1List>,
}

#[derive(Debug, Default, Deserialize)]
struct V1List {
    #[serde(default)]
    registries: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawRegistry {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    location: String,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    blocked: bool,
    #[serde(default)]
    mirror_by_digest_only: bool,
    #[serde(default)]
    pull_from_mirror: Option<String>,
    #[serde(default)]
    mirror: Vec<RawMirror>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawMirror {
    #[serde(default)]
    location: String,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    pull_from_mirror: Option<String>,
}

impl RegistriesConf {
    /// Reads the node's `registries.conf` and `registries.conf.d` (under its sysroot), as
    /// longshore pulls: the mirror longshore's own drop-in puts first (its loopback
    /// endpoint) is left out, so longshore never asks itself; everything else in that
    /// file (the other mirrors, `blocked`) holds. Missing files are no error: then every
    /// reference is pulled from its own host.
    pub fn load(paths: &HostPaths) -> Result<RegistriesConf> {
        Ok(Self::read(paths, None, true)?.0)
    }

    /// The configuration of `registries.conf` and the drop-ins whose names sort before
    /// `stop` (all of them with `None`), and the drop-ins at or after it.
    pub fn load_until(
        paths: &HostPaths,
        stop: Option<&str>,
    ) -> Result<(RegistriesConf, Vec<PathBuf>)> {
        Self::read(paths, stop, false)
    }

    fn read(
        paths: &HostPaths,
        stop: Option<&str>,
        strip_own: bool,
    ) -> Result<(RegistriesConf, Vec<PathBuf>)> {
        let main = paths.host(Path::new("/etc/containers/registries.conf"));
        let dir = paths.host(Path::new(DROPIN_DIR));
        let mut conf = RegistriesConf::default();
        if main.exists() {
            let text = crate::config::read_text(&main, MAX_CONF)?;
            conf.registries = parse(&main, &text, false)?;
            conf.sources.push(main);
        }
        let mut dropins: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "conf") && !p.is_dir())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        dropins.sort();
        let mut later = Vec::new();
        for p in dropins {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if stop.is_some_and(|stop| name.as_str() >= stop) {
                later.push(p);
                continue;
            }
            let text = crate::config::read_text(&p, MAX_CONF)?;
            let mut regs = parse(&p, &text, true)?;
            if strip_own && name == crate::crio::mirrors::MIRROR_FILE {
                for r in &mut regs {
                    if r.mirrors
                        .first()
                        .is_some_and(|m| crate::crio::mirrors::is_loopback(&m.location))
                    {
                        r.mirrors.remove(0);
                    }
                }
            }
            conf.merge(regs);
            conf.sources.push(p);
        }
        Ok((conf, later))
    }

    /// A later file's registries replace those of the same prefix.
    fn merge(&mut self, later: Vec<Registry>) {
        for r in later {
            self.registries.retain(|e| e.prefix != r.prefix);
            self.registries.push(r);
        }
        self.registries.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    }

    /// The registry whose prefix matches `reference` longest, if any.
    pub fn find(&self, reference: &str) -> Option<&Registry> {
        self.registries
            .iter()
            .filter(|r| matching_prefix(reference, &r.prefix).is_some())
            .max_by_key(|r| r.prefix.len())
    }

    /// Where to pull `reference` from, in order. A reference no registry matches is
    /// pulled from its own host. Empty when its registry is blocked and no mirror
    /// serves this kind of reference.
    pub fn pull_sources(&self, reference: &str) -> Vec<PullSource> {
        let Some(reg) = self.find(reference) else {
            return vec![PullSource {
                reference: reference.to_string(),
                insecure: false,
                mirror: false,
            }];
        };
        let digested = reference.contains('@');
        let end = matching_prefix(reference, &reg.prefix).unwrap_or(0);
        let rewrite = |location: &str| -> String {
            if location.is_empty() {
                reference.to_string()
            } else {
                format!("{location}{}", &reference[end..])
            }
        };
        let mut out = Vec::new();
        for m in &reg.mirrors {
            let usable = if reg.mirror_by_digest_only {
                digested
            } else {
                match m.pull_from_mirror {
                    PullFromMirror::All => true,
                    PullFromMirror::DigestOnly => digested,
                    PullFromMirror::TagOnly => !digested,
                }
            };
            if usable {
                out.push(PullSource {
                    reference: rewrite(&m.location),
                    insecure: m.insecure,
                    mirror: true,
                });
            }
        }
        if !reg.blocked {
            out.push(PullSource {
                reference: rewrite(&reg.location),
                insecure: reg.insecure,
                mirror: false,
            });
        }
        out
    }
}

/// Where `prefix` ends in `reference` when it matches it (containers/image
/// `refMatchingPrefix` and `refMatchingSubdomainPrefix`).
fn matching_prefix(reference: &str, prefix: &str) -> Option<usize> {
    if let Some(domain) = prefix.strip_prefix('*') {
        // `*.example.com`: anywhere in the host part, then the end of the host.
        let at = reference.find(domain)?;
        if reference[..at].contains('/') {
            return None;
        }
        let end = at + domain.len();
        return match reference.as_bytes().get(end) {
            None | Some(b':' | b'/' | b'@') => Some(end),
            _ => None,
        };
    }
    if !reference.starts_with(prefix) {
        return None;
    }
    match reference.as_bytes().get(prefix.len()) {
        None | Some(b':' | b'/' | b'@') => Some(prefix.len()),
        _ => None,
    }
}

/// A location or prefix as containers/image takes it: trailing slashes dropped, no URL
/// scheme.
fn location(file: &Path, value: &str) -> Result<String> {
    let v = value.trim_end_matches('/');
    if v.starts_with("http://") || v.starts_with("https://") {
        bail!(
            "{}: location {v:?} has a URL scheme; registries.conf takes host[:port][/path]",
            file.display()
        );
    }
    Ok(v.to_string())
}

fn pull_from(file: &Path, prefix: &str, v: &Option<String>) -> Result<PullFromMirror> {
    Ok(match v.as_deref() {
        None | Some("") | Some("all") => PullFromMirror::All,
        Some("digest-only") => PullFromMirror::DigestOnly,
        Some("tag-only") => PullFromMirror::TagOnly,
        Some(other) => bail!(
            "{}: registry {prefix:?}: pull-from-mirror {other:?} is not all, digest-only or tag-only",
            file.display()
        ),
    })
}

/// Parses one file; `dropin` files must be v2.
pub fn parse(file: &Path, text: &str, dropin: bool) -> Result<Vec<Registry>> {
    let raw: FileV2 =
        toml::from_str(text).with_context(|| format!("{} is not valid TOML", file.display()))?;
    let v1 = raw.registries.as_ref().is_some_and(|v| {
        [&v.search, &v.insecure, &v.block]
            .iter()
            .any(|l| l.as_ref().is_some_and(|l| !l.registries.is_empty()))
    });
    if v1 {
        if dropin {
            bail!("{}: a drop-in must be in the v2 format", file.display());
        }
        if !raw.registry.is_empty() || raw.unqualified_search_registries.is_some() {
            bail!("{}: mixes the v1 and v2 formats", file.display());
        }
        return from_v1(file, raw.registries.unwrap_or_default());
    }
    let mut out: Vec<Registry> = Vec::new();
    for r in raw.registry {
        let loc = location(file, &r.location)?;
        let prefix = if r.prefix.is_empty() {
            if loc.is_empty() {
                bail!(
                    "{}: a [[registry]] has neither location nor prefix",
                    file.display()
                );
            }
            loc.clone()
        } else {
            location(file, &r.prefix)?
        };
        if let Some(domain) = prefix.strip_prefix("*.") {
            if domain.contains(['/', '@', ':']) {
                bail!(
                    "{}: wildcard prefix {prefix:?} must be *.domain, with no port or path",
                    file.display()
                );
            }
        } else if loc.is_empty() {
            bail!(
                "{}: registry {prefix:?} has no location (only a *.domain prefix may omit it)",
                file.display()
            );
        }
        if r.pull_from_mirror.as_deref().is_some_and(|v| !v.is_empty()) {
            bail!(
                "{}: registry {prefix:?}: pull-from-mirror belongs to a mirror, not the registry",
                file.display()
            );
        }
        let mut mirrors = Vec::new();
        for m in &r.mirror {
            let ml = location(file, &m.location)?;
            if ml.is_empty() {
                bail!("{}: a mirror of {prefix:?} has no location", file.display());
            }
            if r.mirror_by_digest_only && m.pull_from_mirror.is_some() {
                bail!(
                    "{}: registry {prefix:?} sets mirror-by-digest-only and a mirror's pull-from-mirror",
                    file.display()
                );
            }
            mirrors.push(Mirror {
                location: ml,
                insecure: m.insecure,
                pull_from_mirror: pull_from(file, &prefix, &m.pull_from_mirror)?,
            });
        }
        // Within one file, the first entry of a prefix wins.
        if out.iter().any(|e| e.prefix == prefix) {
            continue;
        }
        out.push(Registry {
            prefix,
            location: loc,
            insecure: r.insecure,
            blocked: r.blocked,
            mirror_by_digest_only: r.mirror_by_digest_only,
            mirrors,
        });
    }
    // The same location named twice must agree on insecure and blocked.
    for a in &out {
        for b in out
            .iter()
            .filter(|b| !a.location.is_empty() && b.location == a.location)
        {
            if a.insecure != b.insecure || a.blocked != b.blocked {
                bail!(
                    "{}: registry {:?} is defined more than once with conflicting insecure or blocked settings",
                    file.display(),
                    a.location
                );
            }
        }
    }
    out.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    Ok(out)
}

fn from_v1(file: &Path, v1: V1) -> Result<Vec<Registry>> {
    let mut out: Vec<Registry> = Vec::new();
    let mut entry = |loc: &str| -> Result<usize> {
        let loc = location(file, loc)?;
        if let Some(i) = out.iter().position(|r| r.location == loc) {
            return Ok(i);
        }
        out.push(Registry {
            prefix: loc.clone(),
            location: loc,
            insecure: false,
            blocked: false,
            mirror_by_digest_only: false,
            mirrors: vec![],
        });
        Ok(out.len() - 1)
    };
    let mut blocked = Vec::new();
    for r in v1.block.map(|l| l.registries).unwrap_or_default() {
        blocked.push(entry(&r)?);
    }
    let mut insecure = Vec::new();
    for r in v1.insecure.map(|l| l.registries).unwrap_or_default() {
        insecure.push(entry(&r)?);
    }
    for i in blocked {
        out[i].blocked = true;
    }
    for i in insecure {
        out[i].insecure = true;
    }
    out.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> RegistriesConf {
        RegistriesConf {
            registries: parse(Path::new("registries.conf"), text, false).expect("parse"),
            sources: vec![],
        }
    }

    const D: &str = "@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn mirrors_come_first_then_the_source_rewritten_by_prefix() {
        let c = conf(
            r#"
[[registry]]
prefix = "quay.io/openshift-release-dev"
location = "quay.io/openshift-release-dev"
[[registry.mirror]]
location = "mirror.site:5000/ocp"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "127.0.0.1:5050/quay.io/openshift-release-dev"
insecure = true
"#,
        );
        let by_digest = format!("quay.io/openshift-release-dev/ocp-release{D}");
        let s = c.pull_sources(&by_digest);
        assert_eq!(
            s.iter().map(|s| s.reference.as_str()).collect::<Vec<_>>(),
            [
                format!("mirror.site:5000/ocp/ocp-release{D}"),
                format!("127.0.0.1:5050/quay.io/openshift-release-dev/ocp-release{D}"),
                by_digest.clone(),
            ]
        );
        assert_eq!(
            s.iter().map(|s| (s.insecure, s.mirror)).collect::<Vec<_>>(),
            [(false, true), (true, true), (false, false)]
        );
        // A tag pull skips the digest-only mirror.
        let s = c.pull_sources("quay.io/openshift-release-dev/ocp-release:4.17.3-x86_64");
        assert_eq!(s.len(), 2);
        assert!(s[0].reference.starts_with("127.0.0.1:5050/"));
    }

    #[test]
    fn the_longest_prefix_wins_and_a_prefix_ends_at_a_separator() {
        let c = conf(
            r#"
[[registry]]
location = "example.com"
insecure = true
[[registry]]
prefix = "example.com/team"
location = "other.example.net/team"
"#,
        );
        assert_eq!(
            c.find("example.com/team/app:1")
                .map(|r| r.location.as_str()),
            Some("other.example.net/team")
        );
        // "example.com/teamwork" is not under the prefix "example.com/team".
        assert_eq!(
            c.find("example.com/teamwork/app:1")
                .map(|r| r.location.as_str()),
            Some("example.com")
        );
        assert!(c.find("example.community/app:1").is_none());
        let s = c.pull_sources("elsewhere.io/app:1");
        assert_eq!(s[0].reference, "elsewhere.io/app:1");
        assert!(!s[0].insecure);
    }

    #[test]
    fn a_blocked_source_is_never_contacted_but_its_mirrors_are() {
        let c = conf(
            r#"
[[registry]]
location = "registry.redhat.io"
blocked = true
mirror-by-digest-only = true
[[registry.mirror]]
location = "127.0.0.1:5050/registry.redhat.io"
"#,
        );
        let s = c.pull_sources(&format!("registry.redhat.io/ubi9/ubi{D}"));
        assert_eq!(s.len(), 1);
        assert!(s[0].mirror);
        // A tag pull has no mirror here, and the source is blocked: nowhere to go.
        assert!(c
            .pull_sources("registry.redhat.io/ubi9/ubi:latest")
            .is_empty());
    }

    #[test]
    fn a_wildcard_prefix_matches_subdomains_only() {
        let c = conf(
            r#"
[[registry]]
prefix = "*.example.com"
[[registry.mirror]]
location = "mirror.local"
"#,
        );
        assert!(c.find("a.example.com/x:1").is_some());
        assert!(c.find("a.b.example.com:5000/x:1").is_some());
        assert!(c.find("example.com/x:1").is_none());
        assert!(c.find("evil.com/a.example.com/x:1").is_none());
        let s = c.pull_sources("a.example.com/x:1");
        assert_eq!(s[0].reference, "mirror.local/x:1");
        assert_eq!(
            s[1].reference, "a.example.com/x:1",
            "the source is the reference's host"
        );
    }

    #[test]
    fn a_dropin_replaces_a_registry_of_the_same_prefix_whole() {
        let t = tempfile::tempdir().expect("tempdir");
        let paths = HostPaths::new(t.path());
        let etc = t.path().join("etc/containers");
        std::fs::create_dir_all(etc.join("registries.conf.d")).expect("mkdir");
        std::fs::write(
            etc.join("registries.conf"),
            "[[registry]]\nlocation = \"quay.io\"\n[[registry.mirror]]\nlocation = \"mco.mirror/quay\"\n",
        )
        .expect("write");
        std::fs::write(
            etc.join("registries.conf.d/50-site.conf"),
            "[[registry]]\nlocation = \"quay.io\"\n[[registry.mirror]]\nlocation = \"site.mirror/quay.io\"\n",
        )
        .expect("write");
        std::fs::write(etc.join("registries.conf.d/notes.txt"), "not read").expect("write");
        let c = RegistriesConf::load(&paths).expect("load");
        assert_eq!(c.sources.len(), 2);
        let r = c.find("quay.io/a/b:1").expect("found");
        // Mirrors are not merged: the drop-in's list is the whole list.
        assert_eq!(r.mirrors.len(), 1);
        assert_eq!(r.mirrors[0].location, "site.mirror/quay.io");

        // longshore's own drop-in: as longshore pulls, its loopback mirror is left out and
        // the rest of what it says holds.
        std::fs::write(
            etc.join("registries.conf.d/99-longshore-mirror.conf"),
            "[[registry]]\nlocation = \"quay.io\"\nblocked = true\n\
             [[registry.mirror]]\nlocation = \"127.0.0.1:5050/quay.io\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"site.mirror/quay.io\"\n",
        )
        .expect("write");
        let c = RegistriesConf::load(&paths).expect("load");
        let r = c.find("quay.io/a/b:1").expect("found");
        assert!(r.blocked);
        assert_eq!(r.mirrors.len(), 1);
        assert_eq!(r.mirrors[0].location, "site.mirror/quay.io");
        let (before, later) =
            RegistriesConf::load_until(&paths, Some("99-longshore-mirror.conf")).expect("load");
        assert_eq!(later.len(), 1);
        assert!(!before.find("quay.io/a/b:1").expect("found").blocked);
    }

    #[test]
    fn the_v1_format_is_converted_in_the_main_file_only() {
        let v1 = "[registries.insecure]\nregistries = [\"lab:5000\"]\n[registries.block]\nregistries = [\"docker.io\"]\n";
        let c = conf(v1);
        assert!(c.find("lab:5000/x:1").is_some_and(|r| r.insecure));
        assert!(c.pull_sources("docker.io/library/x:1").is_empty());
        assert!(parse(Path::new("d.conf"), v1, true).is_err());
    }

    #[test]
    fn malformed_entries_are_refused_naming_the_file() {
        for (text, want) in [
            ("[[registry]]\nlocation = \"https://quay.io\"\n", "URL scheme"),
            ("[[registry]]\nprefix = \"*.a.com:5000\"\n", "wildcard"),
            ("[[registry]]\nprefix = \"a.com\"\n", "no location"),
            ("[[registry]]\n", "neither location nor prefix"),
            (
                "[[registry]]\nlocation = \"a.com\"\n[[registry.mirror]]\nlocation = \"m\"\npull-from-mirror = \"sometimes\"\n",
                "not all, digest-only or tag-only",
            ),
            (
                "[[registry]]\nlocation = \"a.com\"\nmirror-by-digest-only = true\n[[registry.mirror]]\nlocation = \"m\"\npull-from-mirror = \"all\"\n",
                "mirror-by-digest-only",
            ),
            (
                "[[registry]]\nprefix = \"a.com/x\"\nlocation = \"a.com\"\n[[registry]]\nprefix = \"a.com/y\"\nlocation = \"a.com\"\ninsecure = true\n",
                "conflicting",
            ),
        ] {
            let e = parse(Path::new("/etc/containers/registries.conf"), text, false)
                .expect_err(text);
            let msg = format!("{e:#}");
            assert!(msg.contains(want), "{text}: {msg}");
            assert!(msg.contains("/etc/containers/registries.conf"), "{msg}");
        }
    }
}
