//! The cluster key, and how a request between nodes proves it was made by a holder of
//! that key.
//!
//! The key file is the one every node of a cluster holds (an administrator distributes it
//! with a MachineConfig). It is 32 random bytes, written either as 64 hex digits on one
//! line or in the private-network key format libp2p reads
//! (`/key/swarm/psk/1.0.0/`, `/base16/`, then the hex digits), so that one file also
//! keeps strangers out of the discovery network.
//!
//! A request to another node's peer listener carries
//! `Authorization: Longshore-HMAC t=<unix seconds>,n=<nonce>,s=<signature>`, where the
//! signature is HMAC-SHA256, under a key derived from the cluster key, of the method, the
//! path and query, the time and the nonce. The listener refuses a request whose time is
//! more than [`MAX_SKEW`] from its own clock or whose signature does not verify (compared
//! in constant time). The key itself never crosses the network. What the signature does
//! not give is secrecy: the bytes of an image travel in the clear on the cluster network
//! (see docs/sharing.md).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Largest key file read.
const MAX_KEY_FILE: u64 = 4096;
/// How far a request's time may be from the listener's clock.
pub const MAX_SKEW: u64 = 300;
/// The scheme of the `Authorization` header.
pub const SCHEME: &str = "Longshore-HMAC";

type HmacSha256 = Hmac<Sha256>;

/// The cluster key.
#[derive(Clone)]
pub struct ClusterKey {
    psk: [u8; 32],
    http: [u8; 32],
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// Reads the key file. It must be a regular file that only its owner may read or
    /// write: a key others can read is no secret.
    pub fn load(path: &Path) -> Result<ClusterKey> {
        let bytes = crate::untrusted::read_admin_file(path, MAX_KEY_FILE)
            .with_context(|| format!("reading the cluster key {}", path.display()))?;
        let meta = std::fs::metadata(path)
            .with_context(|| format!("reading the cluster key {}", path.display()))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
        if mode & 0o077 != 0 {
            bail!(
                "the cluster key {} has mode {:04o}; it must be readable by its owner only (0600 or 0400)",
                path.display(),
                mode & 0o7777
            );
        }
        let text = std::str::from_utf8(&bytes)
            .with_context(|| format!("the cluster key {} is not text", path.display()))?;
        ClusterKey::parse(text).with_context(|| format!("the cluster key {}", path.display()))
    }

    /// Parses 64 hex digits, bare or in libp2p's private-network key format.
    pub fn parse(text: &str) -> Result<ClusterKey> {
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let digits = match lines.as_slice() {
            [hex] => *hex,
            ["/key/swarm/psk/1.0.0/", "/base16/", hex] => *hex,
            ["/key/swarm/psk/1.0.0/", enc, _] => {
                bail!("encoding {enc:?} is not read; write the key as /base16/")
            }
            _ => bail!("expected 64 hex digits, or the /key/swarm/psk/1.0.0/ format"),
        };
        let mut psk = [0u8; 32];
        hex::decode_to_slice(digits, &mut psk)
            .map_err(|_| anyhow::anyhow!("expected 64 hex digits (32 bytes)"))?;
        if psk.iter().all(|b| *b == psk[0]) {
            bail!("the key is one byte repeated; make one with `longshore share keygen`");
        }
        let mut mac = HmacSha256::new_from_slice(&psk).expect("HMAC takes any key length");
        mac.update(b"longshore peer http v1");
        let http: [u8; 32] = mac.finalize().into_bytes().into();
        Ok(ClusterKey { psk, http })
    }

    /// A new random key, in the format libp2p reads too.
    pub fn generate() -> Result<String> {
        let mut psk = [0u8; 32];
        getrandom(&mut psk)?;
        Ok(format!(
            "/key/swarm/psk/1.0.0/\n/base16/\n{}\n",
            hex::encode(psk)
        ))
    }

    /// The 32 bytes, for the discovery network's private-network key.
    pub fn psk(&self) -> [u8; 32] {
        self.psk
    }

    fn mac(&self, method: &str, path: &str, t: u64, nonce: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.http).expect("HMAC takes any key length");
        for part in [method, path, &t.to_string(), nonce] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac
    }

    /// The `Authorization` header value for a request.
    pub fn sign(&self, method: &str, path_and_query: &str) -> String {
        let t = now();
        let mut n = [0u8; 12];
        // A nonce only makes signatures of the same request differ; without randomness
        // the time alone still signs.
        let _ = getrandom(&mut n);
        let nonce = hex::encode(n);
        let s = hex::encode(
            self.mac(method, path_and_query, t, &nonce)
                .finalize()
                .into_bytes(),
        );
        format!("{SCHEME} t={t},n={nonce},s={s}")
    }

    /// Checks an `Authorization` header value; the error says why it is refused.
    pub fn verify(&self, method: &str, path_and_query: &str, header: Option<&str>) -> Result<()> {
        let Some(header) = header else {
            bail!("no Authorization header");
        };
        let Some(params) = header
            .strip_prefix(SCHEME)
            .and_then(|r| r.strip_prefix(' '))
        else {
            bail!("not a {SCHEME} signature");
        };
        let (mut t, mut n, mut s) = (None, None, None);
        for kv in params.split(',') {
            match kv.trim().split_once('=') {
                Some(("t", v)) => t = v.parse::<u64>().ok(),
                Some(("n", v)) if v.len() <= 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    n = Some(v)
                }
                Some(("s", v)) => s = hex::decode(v).ok(),
                _ => bail!("malformed signature"),
            }
        }
        let (Some(t), Some(n), Some(s)) = (t, n, s) else {
            bail!("malformed signature");
        };
        if now().abs_diff(t) > MAX_SKEW {
            bail!("signature time is more than {MAX_SKEW}s from this node's clock");
        }
        self.mac(method, path_and_query, t, n)
            .verify_slice(&s)
            .map_err(|_| anyhow::anyhow!("bad signature"))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .context("reading /dev/urandom")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_request_and_key() {
        let key = ClusterKey::parse(&ClusterKey::generate().unwrap()).unwrap();
        let other = ClusterKey::parse(&ClusterKey::generate().unwrap()).unwrap();
        let h = key.sign("GET", "/v2/x/blobs/sha256:00");
        key.verify("GET", "/v2/x/blobs/sha256:00", Some(&h))
            .unwrap();
        assert!(key
            .verify("HEAD", "/v2/x/blobs/sha256:00", Some(&h))
            .is_err());
        assert!(key
            .verify("GET", "/v2/x/blobs/sha256:01", Some(&h))
            .is_err());
        assert!(other
            .verify("GET", "/v2/x/blobs/sha256:00", Some(&h))
            .is_err());
        assert!(key.verify("GET", "/v2/", None).is_err());
        assert!(key.verify("GET", "/v2/", Some("Bearer x")).is_err());
        // An old signature is refused even when it verifies.
        let old = now() - MAX_SKEW - 5;
        let s = hex::encode(key.mac("GET", "/v2/", old, "ab").finalize().into_bytes());
        let e = key
            .verify("GET", "/v2/", Some(&format!("{SCHEME} t={old},n=ab,s={s}")))
            .unwrap_err();
        assert!(e.to_string().contains("clock"), "{e}");
    }

    #[test]
    fn key_formats() {
        let hex = "ab".repeat(16) + &"cd".repeat(16);
        let a = ClusterKey::parse(&hex).unwrap();
        let b = ClusterKey::parse(&format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n")).unwrap();
        assert_eq!(a.psk(), b.psk());
        assert!(ClusterKey::parse("abcd").is_err());
        assert!(ClusterKey::parse(&"00".repeat(32)).is_err());
        assert!(ClusterKey::parse("/key/swarm/psk/1.0.0/\n/base64/\nAAAA").is_err());
    }
}
