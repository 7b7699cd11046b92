//! The node's signature policy, `/etc/containers/policy.json`, for images pulled from
//! registries: an image the policy would refuse to CRI-O is not fetched, so it is never
//! imported.
//!
//! The scope an image is judged by follows containers/image: for the `docker` transport,
//! the most specific scope present wins: the full reference (`host/repo:tag` or
//! `host/repo@sha256:…`), the repository, each parent namespace, the host, then
//! `*.domain` scopes for the host's parent domains, then the transport's `""` scope;
//! with none of these, the policy's `default` (`docker/policyconfiguration.go`
//! `PolicyConfigurationNamespaces`, `signature/policy_eval.go`
//! `requirementsForImageRef`). Every requirement of the scope must hold.
//!
//! longshore decides `insecureAcceptAnything` and `reject` itself. It does not verify
//! signatures: an image whose scope asks for `signedBy` or `sigstoreSigned` is refused
//! with that reason rather than imported unverified. A missing policy.json is no policy
//! (everything accepted), as for a node without one; one that cannot be read or parsed
//! refuses everything, as containers/image does.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::paths::HostPaths;

/// Largest policy.json read.
const MAX_POLICY: u64 = 4 << 20;

#[derive(Debug, Deserialize)]
struct Raw {
    #[serde(default)]
    default: Vec<Requirement>,
    #[serde(default)]
    transports: BTreeMap<String, BTreeMap<String, Vec<Requirement>>>,
}

#[derive(Debug, Clone, Deserialize)]
struct Requirement {
    #[serde(rename = "type")]
    kind: String,
}

/// The policy of a node.
#[derive(Debug)]
pub struct Policy {
    file: PathBuf,
    rules: Result<Option<Raw>, String>,
}

impl Policy {
    /// Reads the node's policy.json (under its sysroot).
    pub fn load(paths: &HostPaths) -> Policy {
        let file = paths.host(std::path::Path::new("/etc/containers/policy.json"));
        let missing = matches!(std::fs::symlink_metadata(&file), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        let rules = if missing {
            Ok(None)
        } else {
            crate::untrusted::read_admin_file(&file, MAX_POLICY)
                .map_err(|e| format!("{e:#}"))
                .and_then(|bytes| {
                    serde_json::from_slice::<Raw>(&bytes)
                        .map(Some)
                        .map_err(|e| format!("{} is not a valid policy: {e}", file.display()))
                })
        };
        Policy { file, rules }
    }

    /// Whether the policy lets CRI-O pull `reference` (a full reference), and if not,
    /// why.
    pub fn check(&self, reference: &str) -> Result<(), String> {
        let raw = match &self.rules {
            Ok(None) => return Ok(()),
            Ok(Some(r)) => r,
            Err(e) => return Err(format!("{e}; every image is refused")),
        };
        let (scope, reqs) = match raw.transports.get("docker").and_then(|t| {
            scopes(reference)
                .into_iter()
                .find_map(|s| t.get(&s).map(|r| (s, r)))
        }) {
            Some((s, r)) => (format!("scope {s:?} of transport docker"), r),
            None => ("its default".to_string(), &raw.default),
        };
        if reqs.is_empty() {
            return Err(format!(
                "{} gives {reference} no requirement in {scope}, which refuses it",
                self.file.display()
            ));
        }
        for r in reqs {
            match r.kind.as_str() {
                "insecureAcceptAnything" => {}
                "reject" => {
                    return Err(format!(
                        "{} rejects {reference} ({scope})",
                        self.file.display()
                    ))
                }
                "signedBy" | "sigstoreSigned" => {
                    return Err(format!(
                        "{} requires {reference} to be signed ({} in {scope}); longshore does not verify signatures, so it does not fetch it",
                        self.file.display(),
                        r.kind
                    ))
                }
                other => {
                    return Err(format!(
                        "{} has a requirement of unknown type {other:?} for {reference} ({scope})",
                        self.file.display()
                    ))
                }
            }
        }
        Ok(())
    }
}

/// The scopes that apply to `reference`, most specific first.
fn scopes(reference: &str) -> Vec<String> {
    let mut out = vec![reference.to_string()];
    let repo = super::client::repository_of(reference);
    let mut name = repo.as_str();
    loop {
        out.push(name.to_string());
        match name.rfind('/') {
            Some(i) => name = &name[..i],
            None => break,
        }
    }
    // `*.example.com` for each parent domain of the host (without its port).
    let host = name.split(':').next().unwrap_or(name);
    let mut rest = host;
    while let Some(i) = rest.find('.') {
        rest = &rest[i + 1..];
        out.push(format!("*.{rest}"));
    }
    out.push(String::new());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy {
            file: PathBuf::from("/etc/containers/policy.json"),
            rules: serde_json::from_str(text)
                .map(Some)
                .map_err(|e| e.to_string()),
        }
    }

    #[test]
    fn scopes_go_from_the_reference_to_the_transport() {
        assert_eq!(
            scopes("reg.example.com:5000/a/b:1"),
            [
                "reg.example.com:5000/a/b:1",
                "reg.example.com:5000/a/b",
                "reg.example.com:5000/a",
                "reg.example.com:5000",
                "*.example.com",
                "*.com",
                ""
            ]
        );
    }

    #[test]
    fn the_most_specific_scope_decides() {
        let p = policy(
            r#"{"default":[{"type":"reject"}],
                "transports":{"docker":{
                  "quay.io":[{"type":"insecureAcceptAnything"}],
                  "quay.io/bad":[{"type":"reject"}],
                  "*.redhat.io":[{"type":"signedBy","keyType":"GPGKeys","keyPath":"/k"}]}}}"#,
        );
        assert!(p.check("quay.io/good/x:1").is_ok());
        let e = p.check("quay.io/bad/x:1").unwrap_err();
        assert!(e.contains("rejects") && e.contains("quay.io/bad"), "{e}");
        let e = p.check("registry.redhat.io/ubi9/ubi:9").unwrap_err();
        assert!(e.contains("signed"), "{e}");
        let e = p.check("docker.io/library/busybox:1").unwrap_err();
        assert!(e.contains("its default"), "{e}");
        // No file: no policy.
        let none = Policy {
            file: PathBuf::from("/x"),
            rules: Ok(None),
        };
        assert!(none.check("docker.io/library/busybox:1").is_ok());
        // A damaged file refuses everything.
        let bad = policy("{not json");
        assert!(bad.check("quay.io/good/x:1").is_err());
    }
}
