//! Credentials for a registry, from the files CRI-O and containers/image read.
//!
//! In order, the first file that has an entry for the repository wins:
//! 1. the node's pull secret, `/var/lib/kubelet/config.json` (CRI-O's `global_auth_file`
//!    on OpenShift nodes);
//! 2. the containers-auth.json(5) locations for root: `/run/containers/0/auth.json`,
//!    `/root/.config/containers/auth.json`, then Docker's `/root/.docker/config.json`.
//!
//! Within a file the most specific key wins (containers/image `pkg/docker/config`,
//! `authKeysForKey`): for `quay.io/org/app`, the keys `quay.io/org/app`, `quay.io/org`,
//! then `quay.io`. Keys written the old Docker way, with a scheme and a path
//! (`https://index.docker.io/v1/`), name their host alone. An entry is `auth`
//! (base64 of `user:password`) or `username` and `password`, or an `identitytoken`.
//!
//! With `--sysroot`, every file is read under the sysroot. Each is read with a size limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::paths::HostPaths;

/// Largest credentials file read.
pub const MAX_AUTH_FILE: u64 = 4 << 20;

/// The files, in the order they are consulted, as paths on the node.
pub const AUTH_FILES: [&str; 4] = [
    "/var/lib/kubelet/config.json",
    "/run/containers/0/auth.json",
    "/root/.config/containers/auth.json",
    "/root/.docker/config.json",
];

/// Credentials for one registry request.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// HTTP Basic, or the same pair exchanged for a bearer token.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// An OAuth2 refresh token to exchange for a bearer token.
    IdentityToken(String),
}

impl std::fmt::Debug for Credentials {
    // Never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credentials::IdentityToken(_) => write!(f, "IdentityToken(***)"),
        }
    }
}

/// Where the credentials came from, for messages (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The credentials.
    pub credentials: Credentials,
    /// The file.
    pub file: PathBuf,
    /// The key that matched.
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Debug, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The credentials for `repository` (`host[:port]/path`), from the node's files.
pub fn lookup(paths: &HostPaths, repository: &str) -> Result<Option<Found>> {
    for f in AUTH_FILES {
        let p = paths.host(Path::new(f));
        if !p.exists() {
            continue;
        }
        if let Some(found) = lookup_in(&p, repository)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The credentials for `repository` in one file.
pub fn lookup_in(file: &Path, repository: &str) -> Result<Option<Found>> {
    let bytes = crate::untrusted::read_admin_file(file, MAX_AUTH_FILE)?;
    let parsed: AuthFile = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a valid credentials file", file.display()))?;
    let by_key: BTreeMap<String, &Entry> = parsed
        .auths
        .iter()
        .map(|(k, v)| (normalise_key(k), v))
        .collect();
    for key in keys_for(repository) {
        let Some(entry) = by_key.get(&key) else {
            continue;
        };
        let credentials = decode(entry)
            .with_context(|| format!("{}: the entry for {key} cannot be read", file.display()))?;
        return Ok(Some(Found {
            credentials,
            file: file.to_path_buf(),
            key,
        }));
    }
    Ok(None)
}

/// The keys to try for a repository, most specific first; Docker Hub's host aliases
/// last.
fn keys_for(repository: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut k = repository.to_string();
    loop {
        out.push(k.clone());
        match k.rfind('/') {
            Some(i) => k.truncate(i),
            None => break,
        }
    }
    if out.last().is_some_and(|h| h == "docker.io") {
        out.push("index.docker.io".into());
        out.push("registry-1.docker.io".into());
    }
    out
}

/// A key as containers/image compares it: one with a URL scheme names its host only.
fn normalise_key(key: &str) -> String {
    match key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
    {
        Some(rest) => rest.split('/').next().unwrap_or(rest).to_string(),
        None => key.trim_end_matches('/').to_string(),
    }
}

fn decode(e: &Entry) -> Result<Credentials> {
    if let Some(t) = e.identitytoken.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Credentials::IdentityToken(t.to_string()));
    }
    if let Some(a) = e.auth.as_deref().filter(|a| !a.is_empty()) {
        let raw = base64_decode(a.trim()).context("auth is not base64")?;
        let text = String::from_utf8(raw).context("auth is not UTF-8")?;
        let (u, p) = text.split_once(':').context("auth is not user:password")?;
        return Ok(Credentials::Basic {
            username: u.to_string(),
            password: p.to_string(),
        });
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) => Ok(Credentials::Basic {
            username: u.clone(),
            password: p.clone(),
        }),
        _ => anyhow::bail!("it has neither auth, username and password, nor identitytoken"),
    }
}

/// Standard base64, padding optional (Docker writes it, other tools may not).
fn base64_decode(s: &str) -> Result<Vec<u8>> {
    use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        general_purpose::PAD.with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    base64::Engine::decode(&LENIENT, s).context("invalid base64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, v: serde_json::Value) {
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, v.to_string()).expect("write");
    }

    #[test]
    fn the_most_specific_key_wins_within_a_file() {
        let t = tempfile::tempdir().expect("tempdir");
        let f = t.path().join("config.json");
        write(
            &f,
            serde_json::json!({"auths": {
                "quay.io": {"auth": "aG9zdDpob3N0cGFzcw=="},
                "quay.io/org": {"username": "org", "password": "orgpass"},
                "https://index.docker.io/v1/": {"auth": "aHViOmh1YnBhc3M="},
            }}),
        );
        let got = |repo| {
            lookup_in(&f, repo)
                .expect("lookup")
                .map(|f| (f.key, f.credentials))
        };
        assert_eq!(
            got("quay.io/org/app"),
            Some((
                "quay.io/org".into(),
                Credentials::Basic {
                    username: "org".into(),
                    password: "orgpass".into()
                }
            ))
        );
        assert_eq!(
            got("quay.io/other/app").map(|c| c.1),
            Some(Credentials::Basic {
                username: "host".into(),
                password: "hostpass".into()
            })
        );
        // The legacy Docker Hub key names its host.
        assert_eq!(
            got("docker.io/library/busybox").map(|c| c.0).as_deref(),
            Some("index.docker.io")
        );
        assert_eq!(got("registry.example.com/app"), None);
    }

    #[test]
    fn the_pull_secret_comes_before_the_auth_files() {
        let t = tempfile::tempdir().expect("tempdir");
        let paths = HostPaths::new(t.path());
        write(
            &t.path().join("var/lib/kubelet/config.json"),
            serde_json::json!({"auths": {"quay.io": {"identitytoken": "tok"}}}),
        );
        write(
            &t.path().join("run/containers/0/auth.json"),
            serde_json::json!({"auths": {"quay.io/org/app": {"auth": "dTpw"},
                                         "registry.lab": {"auth": "dTpw"}}}),
        );
        let f = lookup(&paths, "quay.io/org/app")
            .expect("lookup")
            .expect("found");
        assert_eq!(f.credentials, Credentials::IdentityToken("tok".into()));
        assert!(f.file.ends_with("var/lib/kubelet/config.json"));
        let f = lookup(&paths, "registry.lab/x")
            .expect("lookup")
            .expect("found");
        assert!(f.file.ends_with("run/containers/0/auth.json"));
        assert_eq!(
            format!("{:?}", f.credentials),
            "Basic(u, ***)",
            "no secret in Debug"
        );
        assert!(lookup(&paths, "nowhere.example/x")
            .expect("lookup")
            .is_none());
    }

    #[test]
    fn a_broken_entry_is_reported_naming_the_file_and_key_not_the_secret() {
        let t = tempfile::tempdir().expect("tempdir");
        let f = t.path().join("auth.json");
        write(
            &f,
            serde_json::json!({"auths": {"quay.io": {"auth": "bm9jb2xvbg=="}}}),
        );
        let e = lookup_in(&f, "quay.io/a").expect_err("accepted");
        let msg = format!("{e:#}");
        assert!(
            msg.contains("auth.json") && msg.contains("quay.io"),
            "{msg}"
        );
        assert!(!msg.contains("nocolon"), "{msg}");
        std::fs::write(&f, b"{not json").expect("write");
        assert!(lookup_in(&f, "quay.io/a").is_err());
    }

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(base64_decode("dTpw").expect("decode"), b"u:p");
        assert_eq!(
            base64_decode("aG9zdDpob3N0cGFzcw==").expect("decode"),
            b"host:hostpass"
        );
        assert_eq!(
            base64_decode("aG9zdDpob3N0cGFzcw").expect("decode"),
            b"host:hostpass"
        );
        assert!(base64_decode("a*b").is_err());
    }
}
