//! The mirror drop-in: `/etc/containers/registries.conf.d/99-longshore-mirror.conf`
//! puts longshore's loopback endpoint first among the mirrors of the registries it
//! serves, so CRI-O (and podman, skopeo) on this node pull through it.
//!
//! Facts from containers/image `pkg/sysregistriesv2/system_registries_v2.go` that shape
//! the file:
//! - drop-ins are read in lexical order after `registries.conf`, and a `[[registry]]` of
//!   a later file **replaces** the earlier one with the same prefix whole
//!   (`updateWithConfigurationFrom`): the file carries, for every prefix it writes, the
//!   mirrors and settings that the files before it gave that prefix (MCO's IDMS and ITMS
//!   entries among them), after longshore's mirror;
//! - the longest matching prefix wins (`FindRegistry`): an earlier entry for a path under
//!   a mirrored registry (`quay.io/openshift-release-dev/ocp-release`) would take those
//!   references away from an entry for the registry, so each such entry is written too,
//!   with longshore's mirror first;
//! - a mirror's reference is the reference with the matched prefix replaced by the
//!   mirror's location, and no `ns` is sent: the location carries the source
//!   (`127.0.0.1:5050/quay.io/…`, see [`crate::share`]);
//! - `mirror-by-digest-only` on a registry and `pull-from-mirror` on one of its mirrors
//!   may not be combined (`postProcessRegistries`): such an entry is written with
//!   `pull-from-mirror = "digest-only"` on each of its mirrors instead, which means the
//!   same;
//! - `blocked = true` keeps the registry itself from being contacted while its mirrors
//!   are still tried (OpenShift's `NeverContactSource`).
//!
//! CRI-O reads the files again when it is reloaded (`systemctl reload crio`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::registry::conf::{Mirror, PullFromMirror, RegistriesConf, Registry};

/// The drop-in's file name: `99-` and `longshore` make it sort after MCO's files.
pub const MIRROR_FILE: &str = "99-longshore-mirror.conf";

/// Whether a mirror location is on a loopback address: longshore's local listener may
/// be nowhere else (see [`crate::config`]), and it always writes its mirror first.
pub fn is_loopback(location: &str) -> bool {
    let host = location.split('/').next().unwrap_or("");
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.split_once(']'))
        .map_or_else(
            || host.rsplit_once(':').map_or(host, |(h, _)| h),
            |(h, _)| h,
        );
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// What the drop-in says.
#[derive(Debug, Clone)]
pub struct MirrorPlan {
    /// The loopback listener.
    pub local: SocketAddr,
    /// Registries mirrored (`host[:port]`).
    pub hosts: BTreeSet<String>,
    /// Mirror tags too, not only digests.
    pub tags: bool,
    /// Block the registries themselves.
    pub block: bool,
}

/// The drop-in's text, and the registries that could not be mirrored (a host no path
/// component can stand for).
pub fn render(before: &RegistriesConf, plan: &MirrorPlan) -> (String, Vec<String>) {
    let mut entries: Vec<Registry> = Vec::new();
    let mut skipped = Vec::new();
    for host in &plan.hosts {
        let Some(component) = crate::share::mirror_component(host) else {
            skipped.push(host.clone());
            continue;
        };
        let mut own: Vec<Registry> = before
            .registries
            .iter()
            .filter(|r| r.prefix == *host || r.prefix.starts_with(&format!("{host}/")))
            .cloned()
            .collect();
        if !own.iter().any(|r| r.prefix == *host) {
            // A `*.domain` entry that matches the host lends it its settings; the new
            // entry, being longer, would otherwise hide them.
            let base = before
                .find(&format!("{host}/x"))
                .filter(|r| r.prefix.starts_with('*'));
            own.push(Registry {
                prefix: host.clone(),
                location: match base {
                    Some(b) if !b.location.is_empty() => b.location.clone(),
                    _ => host.clone(),
                },
                insecure: base.is_some_and(|b| b.insecure),
                blocked: base.is_some_and(|b| b.blocked),
                mirror_by_digest_only: base.is_some_and(|b| b.mirror_by_digest_only),
                mirrors: base.map(|b| b.mirrors.clone()).unwrap_or_default(),
            });
        }
        for mut r in own {
            let rest = &r.prefix[host.len()..];
            let ours = Mirror {
                location: format!("{}/{component}{rest}", plan.local),
                insecure: true,
                pull_from_mirror: if plan.tags {
                    PullFromMirror::All
                } else {
                    PullFromMirror::DigestOnly
                },
            };
            if r.mirror_by_digest_only {
                r.mirror_by_digest_only = false;
                for m in &mut r.mirrors {
                    m.pull_from_mirror = PullFromMirror::DigestOnly;
                }
            }
            let mine = format!("{}/", plan.local);
            r.mirrors.retain(|m| !m.location.starts_with(&mine));
            r.mirrors.insert(0, ours);
            r.blocked |= plan.block;
            entries.push(r);
        }
    }
    entries.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    (text(&entries, plan), skipped)
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn text(entries: &[Registry], plan: &MirrorPlan) -> String {
    let mut s = format!(
        "# Written by longshore; edits are overwritten.\n\
         # longshore's cache, served on {}, is the first mirror of these registries.\n\
         # Each entry also carries the mirrors and settings the files before this one\n\
         # gave its prefix, which this file would otherwise replace.\n",
        plan.local
    );
    for r in entries {
        s.push_str(&format!(
            "\n[[registry]]\nprefix = {}\nlocation = {}\ninsecure = {}\nblocked = {}\n",
            q(&r.prefix),
            q(&r.location),
            r.insecure,
            r.blocked
        ));
        for m in &r.mirrors {
            let pull = match m.pull_from_mirror {
                PullFromMirror::All => "all",
                PullFromMirror::DigestOnly => "digest-only",
                PullFromMirror::TagOnly => "tag-only",
            };
            s.push_str(&format!(
                "\n[[registry.mirror]]\nlocation = {}\ninsecure = {}\npull-from-mirror = {}\n",
                q(&m.location),
                m.insecure,
                q(pull)
            ));
        }
    }
    s
}

/// The drop-ins read after the mirror file that set a prefix it writes: CRI-O takes theirs.
pub fn overriding(later: &[PathBuf], written: &str) -> Vec<PathBuf> {
    let Ok(ours) = crate::registry::conf::parse(std::path::Path::new(MIRROR_FILE), written, true)
    else {
        return vec![];
    };
    later
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n != MIRROR_FILE))
        .filter(|p| {
            crate::config::read_text(p, crate::registry::conf::MAX_CONF)
                .ok()
                .and_then(|t| crate::registry::conf::parse(p, &t, true).ok())
                .is_some_and(|regs| {
                    regs.iter()
                        .any(|r| ours.iter().any(|o| o.prefix == r.prefix))
                })
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn plan(hosts: &[&str], tags: bool, block: bool) -> MirrorPlan {
        MirrorPlan {
            local: "127.0.0.1:5050".parse().unwrap(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            tags,
            block,
        }
    }

    fn conf(text: &str) -> RegistriesConf {
        RegistriesConf {
            registries: crate::registry::conf::parse(Path::new("a.conf"), text, true).unwrap(),
            sources: vec![],
        }
    }

    fn sources(written: &str, reference: &str) -> Vec<String> {
        conf(written)
            .pull_sources(reference)
            .into_iter()
            .map(|s| s.reference)
            .collect()
    }

    #[test]
    fn the_endpoint_comes_first_and_earlier_mirrors_are_kept() {
        let before = conf(
            r#"
[[registry]]
prefix = "quay.io/openshift-release-dev/ocp-release"
location = "quay.io/openshift-release-dev/ocp-release"
[[registry.mirror]]
location = "mirror.corp:8443/ocp/release"
pull-from-mirror = "digest-only"
"#,
        );
        let (written, skipped) = render(&before, &plan(&["quay.io"], false, false));
        assert!(skipped.is_empty());
        let d = format!("@{}", crate::oci::digest::Digest::of(b"x"));
        assert_eq!(
            sources(
                &written,
                &format!("quay.io/openshift-release-dev/ocp-release{d}")
            ),
            vec![
                format!("127.0.0.1:5050/quay.io/openshift-release-dev/ocp-release{d}"),
                format!("mirror.corp:8443/ocp/release{d}"),
                format!("quay.io/openshift-release-dev/ocp-release{d}"),
            ]
        );
        assert_eq!(
            sources(&written, &format!("quay.io/app/x{d}")),
            vec![
                format!("127.0.0.1:5050/quay.io/app/x{d}"),
                format!("quay.io/app/x{d}")
            ]
        );
        // Digests only, by default: a tag goes to the source.
        assert_eq!(
            sources(&written, "quay.io/app/x:1"),
            vec!["quay.io/app/x:1"]
        );
        // Other registries are not written.
        assert!(conf(&written).find("docker.io/library/x:1").is_none());
    }

    #[test]
    fn never_contact_source_blocks_and_tags_may_be_mirrored() {
        let (written, _) = render(
            &RegistriesConf::default(),
            &plan(&["registry.local:5000"], true, true),
        );
        assert_eq!(
            sources(&written, "registry.local:5000/app:1"),
            vec!["127.0.0.1:5050/registry.local_5000/app:1"]
        );
    }

    #[test]
    fn mirror_by_digest_only_becomes_pull_from_mirror() {
        let before = conf(
            r#"
[[registry]]
location = "quay.io"
mirror-by-digest-only = true
[[registry.mirror]]
location = "mirror.corp/quay"
"#,
        );
        let (written, _) = render(&before, &plan(&["quay.io"], true, false));
        // It parses (the two settings together would be refused) and means the same.
        assert_eq!(
            sources(&written, "quay.io/a:1"),
            vec!["127.0.0.1:5050/quay.io/a:1", "quay.io/a:1"]
        );
        let d = format!("@{}", crate::oci::digest::Digest::of(b"x"));
        assert_eq!(sources(&written, &format!("quay.io/a{d}")).len(), 3);
    }

    #[test]
    fn a_wildcard_entry_lends_its_settings() {
        let before = conf(
            r#"
[[registry]]
prefix = "*.corp.example"
blocked = true
[[registry.mirror]]
location = "mirror.corp.example/all"
"#,
        );
        let (written, _) = render(&before, &plan(&["reg.corp.example"], true, false));
        assert_eq!(
            sources(&written, "reg.corp.example/a:1"),
            vec![
                "127.0.0.1:5050/reg.corp.example/a:1",
                "mirror.corp.example/all/a:1"
            ]
        );
    }

    #[test]
    fn loopback_locations() {
        assert!(is_loopback("127.0.0.1:5050/quay.io"));
        assert!(is_loopback("[::1]:5050/quay.io"));
        assert!(!is_loopback("mirror.corp:5050/quay.io"));
        assert!(!is_loopback("10.0.0.1:5050/quay.io"));
    }
}
