//! The read-only registry endpoint: the OCI distribution API's pull half, answered from
//! the cache.
//!
//! - `GET|HEAD /v2/`: 200, `Docker-Distribution-API-Version: registry/2.0`.
//! - `GET|HEAD /v2/<name>/manifests/<digest|tag>`: the manifest with its media type,
//!   length and `Docker-Content-Digest`. A tag is answered only when the cache's index
//!   names `<source>/<repo>:<tag>`, that is when an image set or a bundle brought it.
//! - `GET|HEAD /v2/<name>/blobs/<digest>`: the blob; one `Range` (`bytes=N-`, `N-M`,
//!   `-N`) is answered 206 with `Content-Range`, an unsatisfiable one 416.
//!
//! The loopback listener answers a manifest only when every blob it names can follow
//! (for a list, the image of this node's platform and its blobs): containers/image takes
//! every blob of an image from the mirror that gave its manifest and fails the pull on a
//! blob 404 (`docker/docker_image_src.go`), while a manifest 404 makes it try the next
//! mirror, then the source. The peer listener answers any manifest or blob the cache
//! holds, to requests signed with the cluster key ([`super::auth`]); it never asks
//! further, so a request between nodes goes one hop only.
//!
//! Every file is opened by digest under the cache, never by a name from the request;
//! names are checked with containers/image's grammar before they are looked up. Requests
//! are served on their own tasks, at most `max_connections` connections at a time, with
//! a limit on how long a client may take to send its request.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::auth::ClusterKey;
use super::http::{self, Payload, Reply, Request};
use super::obtain::{Kind, Via};
use super::{Counters, Stats};
use crate::bundle::format::MAX_DOCUMENT;
use crate::cache::Cache;
use crate::oci::digest::Digest;

/// Which listener a request came to.
#[derive(Debug, Clone)]
pub enum Side {
    /// Loopback: this node's CRI-O and tools; no authentication.
    Local,
    /// The cluster: requests must be signed with the key.
    Peer(ClusterKey),
}

/// What the endpoint answers from.
#[derive(Debug)]
pub struct Endpoint {
    /// The cache.
    pub cache: Cache,
    /// This node's platform (`amd64`, …), for lists of images.
    pub arch: &'static str,
    /// What was served.
    pub stats: Arc<Stats>,
    /// The other nodes, when this one takes part in the cluster.
    pub remote: Option<super::Remote>,
    /// Pull-through, when on.
    pub upstream: Option<super::Upstream>,
    /// Free space fetches leave on the cache's filesystem (`[store] min_free_space`).
    pub min_free: u64,
    /// Blob sizes the manifests answered gave (see [`Endpoint::note_sizes`]).
    pub sizes: std::sync::Mutex<std::collections::HashMap<Digest, u64>>,
    /// Digests being fetched now, and what waits for them.
    pub inflight: std::sync::Mutex<
        std::collections::HashMap<Digest, tokio::sync::watch::Receiver<Option<bool>>>,
    >,
}

impl Endpoint {
    fn counters(&self, side: &Side) -> &Counters {
        match side {
            Side::Local => &self.stats.local,
            Side::Peer(_) => &self.stats.peer,
        }
    }
}

/// Serves `listener` until the task is aborted: one task per connection, at most as many
/// connections at once as `conns` has permits (others wait in the listen queue).
pub async fn run(listener: TcpListener, side: Side, ep: Arc<Endpoint>, conns: Arc<Semaphore>) {
    let side = Arc::new(side);
    loop {
        let Ok(permit) = conns.clone().acquire_owned().await else {
            return;
        };
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(false);
        let (ep, side) = (ep.clone(), side.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, remote, &ep, &side).await {
                tracing::debug!("connection from {remote}: {e}");
            }
            drop(permit);
        });
    }
}

/// Adds the bytes of bodies sent to the listener's counters.
fn sent_to(ep: &Arc<Endpoint>, side: &Side) -> http::Sent {
    let stats = ep.stats.clone();
    let peer = matches!(side, Side::Peer(_));
    Arc::new(move |n| {
        let c = if peer { &stats.peer } else { &stats.local };
        c.bytes.fetch_add(n, Ordering::Relaxed);
    })
}

/// Answers the requests of one connection, in order, until the client closes it, asks
/// for it to be closed, or sends something this endpoint does not take.
async fn connection(
    mut stream: TcpStream,
    remote: SocketAddr,
    ep: &Arc<Endpoint>,
    side: &Side,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let req = match tokio::time::timeout(
            http::HEADER_TIMEOUT,
            http::read_request(&mut stream, &mut buf),
        )
        .await
        {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => {
                let r = error(400, "UNSUPPORTED", &e.to_string());
                let _ = http::write_reply(stream, r, false, false, sent_to(ep, side)).await;
                return Err(e);
            }
            Ok(Ok(Some(r))) => r,
        };
        // A body is never read: the connection ends after the answer.
        let keep = req.keep_alive && !http::has_body(&req);
        let head = req.method == "HEAD";
        let reply = handle(ep, side, remote, &req).await;
        stream = http::write_reply(stream, reply, head, keep, sent_to(ep, side)).await?;
        if !keep {
            return Ok(());
        }
    }
}

async fn handle(ep: &Arc<Endpoint>, side: &Side, remote: SocketAddr, req: &Request) -> Reply {
    let counters = ep.counters(side);
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method.as_str();
    if method != "GET" && method != "HEAD" {
        return error(405, "UNSUPPORTED", "this registry is read-only");
    }
    let path = req.path().to_string();
    if let Side::Peer(key) = side {
        let auth = req.header("authorization");
        if let Err(e) = key.verify(method, &req.target, auth) {
            let n = counters.refused.fetch_add(1, Ordering::Relaxed) + 1;
            // Said for the first few and then now and then, so a flood does not fill the
            // journal.
            if n <= 10 || n.is_power_of_two() {
                tracing::warn!(
                    "refused {method} {path} from {remote} on the peer listener: {e} ({n} refused so far)"
                );
            }
            return error(401, "UNAUTHORIZED", &e.to_string());
        }
    }
    if path == "/metrics" && matches!(side, Side::Local) {
        let mut r = Reply::new(200, Payload::Bytes(Bytes::from(metrics(ep))));
        r.set("content-type", "text/plain; version=0.0.4");
        return r;
    }
    if path == "/v2/" || path == "/v2" {
        let mut r = Reply::new(200, Payload::Bytes(Bytes::from_static(b"{}")));
        r.set("content-type", "application/json");
        return with_api_version(r);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return error(404, "NOT_FOUND", "not a registry path");
    };
    let route = rest
        .rsplit_once("/manifests/")
        .map(|(n, r)| (n, r, true))
        .or_else(|| rest.rsplit_once("/blobs/").map(|(n, r)| (n, r, false)));
    let Some((name, reference, is_manifest)) = route else {
        return error(404, "NOT_FOUND", "not a registry path");
    };
    let Some(repo) = super::source_repository(name) else {
        counters.misses.fetch_add(1, Ordering::Relaxed);
        return error(404, "NAME_UNKNOWN", "not a repository this mirror serves");
    };
    // Another node asking this one to pull a digest through from its registry.
    if let (Side::Peer(_), Some(q)) = (side, req.query()) {
        if let Some(r) = pull_through(ep, name, reference, is_manifest, q).await {
            return r;
        }
    }
    let res = if is_manifest {
        manifest(ep, side, name, &repo, reference).await
    } else {
        blob(ep, side, name, reference, req.header("range")).await
    };
    match res {
        Some(r) => r,
        None => {
            counters.misses.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("{method} {path} from {remote}: not served");
            if is_manifest {
                error(
                    404,
                    "MANIFEST_UNKNOWN",
                    match side {
                        Side::Local => "longshore: neither this node's cache nor another node has this image whole",
                        Side::Peer(_) => "longshore: not in this node's cache",
                    },
                )
            } else {
                error(
                    404,
                    "BLOB_UNKNOWN",
                    match side {
                        Side::Local => {
                            "longshore: neither this node's cache nor another node has this blob"
                        }
                        Side::Peer(_) => "longshore: not in this node's cache",
                    },
                )
            }
        }
    }
}

/// `?through=1[&size=N]` on the peer listener: fetches the digest from the registry
/// (never from another node: one hop only) when pull-through is on here, then lets the
/// request be answered from the cache. An answer of its own when it is refused.
async fn pull_through(
    ep: &Arc<Endpoint>,
    name: &str,
    reference: &str,
    is_manifest: bool,
    query: &str,
) -> Option<Reply> {
    let mut through = false;
    let mut size = None;
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("through", "1")) => through = true,
            Some(("size", n)) => size = n.parse::<u64>().ok(),
            _ => {}
        }
    }
    if !through {
        return None;
    }
    if ep.upstream.is_none() {
        return Some(error(
            404,
            "UNSUPPORTED",
            "pull-through is off on this node",
        ));
    }
    let d = parse_digest(reference)?;
    let kind = if is_manifest {
        Kind::Document
    } else {
        match size {
            Some(n) => ep.note_sizes(&[(d, n)]),
            None => {
                return Some(error(
                    400,
                    "SIZE_INVALID",
                    "a blob is pulled through with its size",
                ))
            }
        }
        Kind::Blob
    };
    if ep.obtain_as(name, d, kind, Via::Upstream).await {
        None
    } else {
        Some(error(404, "BLOB_UNKNOWN", "the registry did not give it"))
    }
}

/// The endpoint's counters in Prometheus' text format (loopback only).
fn metrics(ep: &Endpoint) -> String {
    let st = &ep.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut family = |name: &str, help: &str, samples: &[(&str, u64)]| {
        out += &format!("# HELP longshore_share_{name} {help}\n# TYPE longshore_share_{name} ");
        out += if name.ends_with("_total") {
            "counter\n"
        } else {
            "gauge\n"
        };
        for (labels, v) in samples {
            out += &format!("longshore_share_{name}{labels} {v}\n");
        }
    };
    let both = |f: fn(&Counters) -> &std::sync::atomic::AtomicU64| {
        [
            ("{listener=\"local\"}", load(f(&st.local))),
            ("{listener=\"peer\"}", load(f(&st.peer))),
        ]
    };
    family(
        "requests_total",
        "Requests answered, by listener.",
        &both(|c| &c.requests),
    );
    family(
        "served_bytes_total",
        "Body bytes sent, by listener.",
        &both(|c| &c.bytes),
    );
    family(
        "misses_total",
        "Manifests and blobs not answered, by listener.",
        &both(|c| &c.misses),
    );
    family(
        "refused_total",
        "Requests refused on the peer listener for want of a valid signature.",
        &[("", load(&st.peer.refused))],
    );
    family(
        "fetched_bytes_total",
        "Bytes brought into the cache for requests, by source.",
        &[
            ("{source=\"peer\"}", load(&st.fetched_peer)),
            ("{source=\"upstream\"}", load(&st.fetched_upstream)),
        ],
    );
    family(
        "rejected_total",
        "Blobs and manifests discarded for a wrong digest.",
        &[("", load(&st.rejected))],
    );
    if let Some(r) = &ep.remote {
        let known = r.peers.known();
        let connected = known.iter().filter(|p| p.connected).count() as u64;
        family(
            "peers",
            "Other nodes known, by whether a connection is open.",
            &[
                ("{state=\"connected\"}", connected),
                ("{state=\"known\"}", known.len() as u64 - connected),
            ],
        );
    }
    out
}

/// A digest as a request names it: `sha256:` and 64 lower-case hex digits.
fn parse_digest(s: &str) -> Option<Digest> {
    let hex = s.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| Digest::from_hex(hex).ok())
        .flatten()
}

async fn manifest(
    ep: &Arc<Endpoint>,
    side: &Side,
    name: &str,
    repo: &str,
    reference: &str,
) -> Option<Reply> {
    let local = matches!(side, Side::Local);
    let top = match parse_digest(reference) {
        Some(d) => d,
        None if crate::oci::reference::valid_tag(reference) => {
            let name = format!("{repo}:{reference}");
            let cache = ep.cache.clone();
            tokio::task::spawn_blocking(move || cache.index_by_name().get(&name).map(|e| e.digest))
                .await
                .ok()??
        }
        None => return None,
    };
    let bytes = document(ep, local, name, top).await?;
    let media_type = media_type_of(&bytes)?;
    if local && !servable(ep, name, &bytes).await {
        return None;
    }
    let mut r = Reply::new(200, Payload::Bytes(Bytes::from(bytes)));
    r.set("content-type", media_type);
    r.set("docker-content-digest", top.to_string());
    r.set("etag", format!("\"{top}\""));
    Some(with_api_version(r))
}

/// Manifest `d` from the cache; on loopback, fetched from another node first when the
/// cache lacks it.
async fn document(ep: &Arc<Endpoint>, local: bool, name: &str, d: Digest) -> Option<Vec<u8>> {
    let read = |ep: &Arc<Endpoint>| {
        let cache = ep.cache.clone();
        tokio::task::spawn_blocking(move || cache.read(&d, MAX_DOCUMENT).ok())
    };
    if let Some(b) = read(ep).await.ok()? {
        return Some(b);
    }
    if !local || !ep.obtain(name, d, Kind::Document).await {
        return None;
    }
    read(ep).await.ok()?
}

/// Whether every blob manifest `bytes` names can follow it: in the cache, or on another
/// node (for a list, the image of this node's platform and its blobs).
async fn servable(ep: &Arc<Endpoint>, name: &str, bytes: &[u8]) -> bool {
    let image = match crate::oci::list_instance(bytes, ep.arch) {
        None => bytes.to_vec(),
        Some(None) => return false,
        Some(Some((d, size))) => match document(ep, true, name, d).await {
            Some(b) if b.len() as u64 == size => b,
            _ => return false,
        },
    };
    let Some((config, layers)) = crate::oci::sized_blobs_of_manifest(&image) else {
        return false;
    };
    let blobs: Vec<(Digest, u64)> = std::iter::once(config).chain(layers).collect();
    ep.note_sizes(&blobs);
    let missing: Vec<Digest> = blobs
        .iter()
        .filter(|(d, size)| ep.cache.has(d) != Some(*size))
        .map(|(d, _)| *d)
        .collect();
    if missing.is_empty() {
        return true;
    }
    let found = futures_util::future::join_all(missing.iter().map(|d| ep.can_follow(*d))).await;
    found.into_iter().all(|f| f)
}

/// The media type a manifest says it has; an OCI document without one is an index when
/// it lists manifests and an image manifest otherwise. Anything that is not a manifest or
/// a list (a config, a layer someone asked for by the manifests path) is `None`.
fn media_type_of(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc {
        schema_version: Option<u32>,
        media_type: Option<String>,
        config: Option<serde::de::IgnoredAny>,
        manifests: Option<serde::de::IgnoredAny>,
    }
    let d: Doc = serde_json::from_slice(bytes).ok()?;
    if d.schema_version != Some(2) {
        return None;
    }
    match d.media_type {
        Some(t) if t.contains("manifest") || t.contains("index") => Some(t),
        Some(_) => None,
        None if d.manifests.is_some() && d.config.is_none() => {
            Some("application/vnd.oci.image.index.v1+json".into())
        }
        None if d.config.is_some() => Some("application/vnd.oci.image.manifest.v1+json".into()),
        None => None,
    }
}

async fn blob(
    ep: &Arc<Endpoint>,
    side: &Side,
    name: &str,
    reference: &str,
    range: Option<&str>,
) -> Option<Reply> {
    let d = parse_digest(reference)?;
    let open = |ep: &Arc<Endpoint>| {
        let cache = ep.cache.clone();
        tokio::task::spawn_blocking(move || cache.open(&d).ok())
    };
    let (file, len) = match open(ep).await.ok()? {
        Some(x) => x,
        None if matches!(side, Side::Local) && ep.obtain(name, d, Kind::Blob).await => {
            open(ep).await.ok()??
        }
        None => return None,
    };
    let (status, start, end) = match range.map(|v| parse_range(v, len)) {
        None | Some(Range::Ignored) => (200, 0, len),
        Some(Range::Unsatisfiable) => {
            let mut r = error(416, "RANGE_INVALID", "range not satisfiable");
            r.set("content-range", format!("bytes */{len}"));
            return Some(r);
        }
        Some(Range::Bytes(s, e)) => (206, s, e),
    };
    let mut r = Reply::new(
        status,
        Payload::File {
            file,
            start,
            len: end - start,
        },
    );
    r.set("content-type", "application/octet-stream");
    r.set("accept-ranges", "bytes");
    r.set("docker-content-digest", d.to_string());
    r.set("etag", format!("\"{d}\""));
    if status == 206 {
        r.set("content-range", format!("bytes {start}-{}/{len}", end - 1));
    }
    Some(with_api_version(r))
}

/// A `Range` header, for a blob of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// Bytes `start..end`.
    Bytes(u64, u64),
    /// No byte of the blob is in the range.
    Unsatisfiable,
    /// Not one byte range (several, another unit, malformed): the whole blob is sent,
    /// as RFC 9110 allows.
    Ignored,
}

fn parse_range(v: &str, len: u64) -> Range {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Range::Ignored;
    };
    if spec.contains(',') {
        return Range::Ignored;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Ignored;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.len() <= 20 && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim(), b.trim()) {
        ("", suffix) => match num(suffix) {
            Some(0) => Range::Unsatisfiable,
            Some(n) if len > 0 => Range::Bytes(len.saturating_sub(n), len),
            Some(_) => Range::Unsatisfiable,
            None => Range::Ignored,
        },
        (s, "") => match num(s) {
            Some(s) if s < len => Range::Bytes(s, len),
            Some(_) => Range::Unsatisfiable,
            None => Range::Ignored,
        },
        (s, e) => match (num(s), num(e)) {
            (Some(s), Some(e)) if s > e => Range::Ignored,
            (Some(s), Some(_)) if s >= len => Range::Unsatisfiable,
            (Some(s), Some(e)) => Range::Bytes(s, e.min(len - 1) + 1),
            _ => Range::Ignored,
        },
    }
}

fn with_api_version(mut r: Reply) -> Reply {
    r.set("docker-distribution-api-version", "registry/2.0");
    r
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    let mut r = Reply::new(status, Payload::Bytes(Bytes::from(body)));
    r.set("content-type", "application/json");
    with_api_version(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Range::Bytes(0, 10));
        assert_eq!(parse_range("bytes=4-", 10), Range::Bytes(4, 10));
        assert_eq!(parse_range("bytes=4-6", 10), Range::Bytes(4, 7));
        assert_eq!(parse_range("bytes=4-60", 10), Range::Bytes(4, 10));
        assert_eq!(parse_range("bytes=-3", 10), Range::Bytes(7, 10));
        assert_eq!(parse_range("bytes=-30", 10), Range::Bytes(0, 10));
        assert_eq!(parse_range("bytes=10-", 10), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=10-12", 10), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 10), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,4-5", 10), Range::Ignored);
        assert_eq!(parse_range("items=0-1", 10), Range::Ignored);
        assert_eq!(parse_range("bytes=6-4", 10), Range::Ignored);
        assert_eq!(parse_range("bytes=x-", 10), Range::Ignored);
        assert_eq!(
            parse_range("bytes=99999999999999999999999-", 10),
            Range::Ignored
        );
    }

    #[test]
    fn digests_from_requests_are_strict() {
        let d = Digest::of(b"x");
        assert_eq!(parse_digest(&d.to_string()), Some(d));
        assert_eq!(parse_digest(&d.to_string().to_uppercase()), None);
        assert_eq!(parse_digest("sha256:../../etc/passwd"), None);
        assert_eq!(parse_digest(&format!("sha512:{}", d.hex())), None);
    }

    #[test]
    fn media_types() {
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{}}"#).as_deref(),
            Some("application/vnd.docker.distribution.manifest.v2+json")
        );
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"config":{},"layers":[]}"#).as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        // A config or a layer is no manifest.
        assert_eq!(media_type_of(br#"{"architecture":"amd64"}"#), None);
        assert_eq!(
            media_type_of(
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.config.v1+json"}"#
            ),
            None
        );
        assert_eq!(media_type_of(b"\x1f\x8b"), None);
    }
}
