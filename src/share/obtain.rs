//! Bringing into the cache what a request of this node's CRI-O needs and the cache
//! lacks: from the other nodes that provide it (see [`super::peers`]), checked by digest
//! before anything is stored or served.
//!
//! - Up to [`PROVIDERS`] providers are asked with `HEAD` at once and tried in the order
//!   they answered, the fastest first. A blob is written to its partial in the cache and
//!   hashed on the way; when a provider stops answering mid-way, the next one is asked
//!   for the rest (`Range: bytes=N-`, a 206 with the matching `Content-Range`).
//! - When the whole is there its digest and length are checked: a blob that does not
//!   match is discarded, the providers that sent its bytes are not asked again, and the
//!   others are tried from the first byte. Nothing unchecked is served: the endpoint
//!   answers from the cache once the blob is in it.
//! - However many requests want one digest, it is fetched once: the first starts the
//!   fetch on a task of its own (a client going away does not stop it), the others
//!   wait for its outcome.
//! - With `[share] upstream`, what no node has is fetched from the registry itself (its
//!   mirrors first, as registries.conf says, leaving out this node's own endpoint), with
//!   the node's pull secret, into the cache; the other nodes then find it here.
//! - Requests to other nodes are signed with the cluster key and go to their peer
//!   listener, which answers from its cache only: a request between nodes never goes
//!   further.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use super::serve::Endpoint;
use crate::bundle::format::MAX_DOCUMENT;
use crate::oci::digest::Digest;

/// Providers asked for one digest.
pub const PROVIDERS: usize = 3;
/// How long the DHT is given to name providers.
pub const FIND_WAIT: Duration = Duration::from_secs(5);
/// How long a transfer from another node may stall before it is given up.
const STALL: Duration = Duration::from_secs(30);
/// How long a node waits for another to pull a digest through.
const THROUGH_WAIT: Duration = Duration::from_secs(3600);

/// Where a digest may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Other nodes, then (with pull-through) the registry, through the node the digest
    /// ranks highest.
    Anywhere,
    /// The registry only: another node asked this one to pull it through.
    Upstream,
}

/// What is needed: a manifest (or list), or a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A manifest or list, at most [`MAX_DOCUMENT`] bytes.
    Document,
    /// A config or layer.
    Blob,
}

impl Endpoint {
    /// Makes the cache hold `d`, fetched at most once however many ask; whether it does.
    pub async fn obtain(self: &Arc<Self>, name: &str, d: Digest, kind: Kind) -> bool {
        self.obtain_as(name, d, kind, Via::Anywhere).await
    }

    /// [`Endpoint::obtain`], from the places `via` allows.
    pub async fn obtain_as(self: &Arc<Self>, name: &str, d: Digest, kind: Kind, via: Via) -> bool {
        if self.cache.has(&d).is_some() {
            return true;
        }
        let mut rx = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(&d) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(d, rx.clone());
                    let (ep, name) = (self.clone(), name.to_string());
                    tokio::spawn(async move {
                        let ok = ep.obtain_now(&name, d, kind, via).await;
                        ep.inflight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&d);
                        let _ = tx.send(Some(ok));
                    });
                    rx
                }
            }
        };
        loop {
            if let Some(ok) = *rx.borrow_and_update() {
                return ok;
            }
            if rx.changed().await.is_err() {
                return self.cache.has(&d).is_some();
            }
        }
    }

    async fn obtain_now(&self, name: &str, d: Digest, kind: Kind, via: Via) -> bool {
        let started = Instant::now();
        if let (Some(remote), Via::Anywhere) = (&self.remote, via) {
            match self.fetch_from_peers(remote, name, d, kind).await {
                Ok((n, from)) => {
                    self.stats.fetched_peer.fetch_add(n, Ordering::Relaxed);
                    remote.peers.provide(vec![d]);
                    tracing::info!(
                        "fetched {d} ({n} bytes) from {from} in {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                    return true;
                }
                Err(e) => tracing::debug!("{d} from the other nodes: {e:#}"),
            }
        }
        let Some(up) = &self.upstream else {
            return false;
        };
        // One node fetches each digest from the registry: the one the digest ranks
        // highest. Another node asks it to, and takes the digest from it.
        if let (Some(remote), Via::Anywhere) = (&self.remote, via) {
            if let Some(owner) = remote.peers.owner(&d) {
                match self.fetch_through(remote, owner, name, d, kind).await {
                    Ok(n) => {
                        self.stats.fetched_peer.fetch_add(n, Ordering::Relaxed);
                        remote.peers.provide(vec![d]);
                        tracing::info!(
                            "fetched {d} ({n} bytes) through {owner}, which pulled it through, in {:.1} s",
                            started.elapsed().as_secs_f64()
                        );
                        return true;
                    }
                    Err(e) => tracing::warn!(
                        "{d}: {owner} did not pull it through ({e:#}); pulling it here"
                    ),
                }
            }
        }
        match self.fetch_from_upstream(up, name, d, kind).await {
            Ok((n, from)) => {
                self.stats.fetched_upstream.fetch_add(n, Ordering::Relaxed);
                if let Some(r) = &self.remote {
                    r.peers.provide(vec![d]);
                }
                tracing::info!(
                    "fetched {d} ({n} bytes) from {from} (pull-through) in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                true
            }
            Err(e) => {
                tracing::warn!("{d} (pull-through): {e:#}");
                false
            }
        }
    }

    /// Fetches `d` from the registry the request's repository names (its mirrors first,
    /// as registries.conf says, but never this node's endpoint), with the node's
    /// credentials.
    async fn fetch_from_upstream(
        &self,
        up: &super::Upstream,
        name: &str,
        d: Digest,
        kind: Kind,
    ) -> Result<(u64, String)> {
        let repo = super::source_repository(name).context("not a repository")?;
        let conf = crate::registry::conf::RegistriesConf::load(&up.paths)?;
        let sources = conf.pull_sources(&format!("{repo}@{d}"));
        if sources.is_empty() {
            bail!("registries.conf blocks {repo} and names no other mirror for it");
        }
        let size = match kind {
            Kind::Document => None,
            Kind::Blob => {
                let size = self
                    .size_of(&d)
                    .context("no manifest answered here gave its size")?;
                self.check_room(size)?;
                Some(size)
            }
        };
        let mut errors = Vec::new();
        for src in &sources {
            let res = match size {
                None => up.client.document(src, d).await.and_then(|bytes| {
                    self.cache.put_bytes(&bytes)?;
                    Ok(bytes.len() as u64)
                }),
                Some(size) => up
                    .client
                    .fetch_blob(src, d, size, &self.cache)
                    .await
                    .map(|f| f.downloaded),
            };
            match res {
                Ok(n) => return Ok((n, src.reference.clone())),
                Err(e) => errors.push(format!("{}: {e:#}", src.reference)),
            }
        }
        bail!("{}", errors.join("; "))
    }

    /// Fails when writing `size` bytes would leave less than `[store] min_free_space`
    /// free on the cache's filesystem.
    fn check_room(&self, size: u64) -> Result<()> {
        let free = fs2::available_space(self.cache.root()).with_context(|| {
            format!("reading the free space of {}", self.cache.root().display())
        })?;
        if free < size.saturating_add(self.min_free) {
            bail!(
                "{} bytes would leave less than {} free in {}",
                size,
                crate::config::human_size(self.min_free),
                self.cache.root().display()
            );
        }
        Ok(())
    }

    /// The size a manifest this endpoint answered gave `d`.
    pub fn size_of(&self, d: &Digest) -> Option<u64> {
        self.sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .copied()
    }

    /// Notes the sizes a manifest gives its blobs, for when they are fetched.
    pub fn note_sizes(&self, blobs: &[(Digest, u64)]) {
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        if sizes.len() > 100_000 {
            sizes.clear();
        }
        sizes.extend(blobs.iter().copied());
    }

    /// Whether `d` can be had: another node provides it, or pull-through may fetch it.
    pub async fn can_follow(&self, d: Digest) -> bool {
        if self.upstream.is_some() {
            return true;
        }
        match &self.remote {
            Some(r) => !r.peers.find(d, 1, FIND_WAIT).await.is_empty(),
            None => false,
        }
    }

    async fn fetch_from_peers(
        &self,
        remote: &super::Remote,
        name: &str,
        d: Digest,
        kind: Kind,
    ) -> Result<(u64, String)> {
        let providers = remote.peers.find(d, PROVIDERS, FIND_WAIT).await;
        if providers.is_empty() {
            bail!("no other node has it");
        }
        let path = format!(
            "/v2/{name}/{}/{d}",
            match kind {
                Kind::Document => "manifests",
                Kind::Blob => "blobs",
            }
        );
        let ranked = remote.rank(&providers, &path).await;
        if ranked.is_empty() {
            bail!("none of {providers:?} answered for it");
        }
        match kind {
            Kind::Document => {
                for (p, _) in &ranked {
                    match remote.document(*p, &path, d).await {
                        Ok(bytes) => {
                            let cache = self.cache.clone();
                            let n = bytes.len() as u64;
                            tokio::task::spawn_blocking(move || cache.put_bytes(&bytes))
                                .await
                                .context("storing a manifest")??;
                            return Ok((n, p.to_string()));
                        }
                        Err(e) => tracing::warn!("{d} from {p}: {e:#}"),
                    }
                }
                bail!("no provider gave it whole and as its digest says")
            }
            Kind::Blob => {
                // Only a size a manifest gave (and its digest vouches for) is trusted:
                // a provider's length could be anything.
                let size = self
                    .size_of(&d)
                    .context("no manifest answered here named it, so its size is unknown")?;
                self.check_room(size)?;
                self.blob_from(remote, &ranked, &path, d, size).await
            }
        }
    }

    /// Fetches blob `d` of `size` bytes from `ranked` providers into the cache, resuming
    /// at the byte across providers.
    async fn blob_from(
        &self,
        remote: &super::Remote,
        ranked: &[(SocketAddr, Option<u64>)],
        path: &str,
        d: Digest,
        size: u64,
    ) -> Result<(u64, String)> {
        let mut bad: HashSet<SocketAddr> = HashSet::new();
        let mut received = 0u64;
        loop {
            let mut w = loop {
                match self.cache.writer(d, size) {
                    Ok(w) => break w,
                    // Another writer (a fetch of a set) has it: wait for it.
                    Err(e) if e.downcast_ref::<crate::cache::Busy>().is_some() => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if self.cache.has(&d) == Some(size) {
                            return Ok((0, "this node".into()));
                        }
                    }
                    Err(e) => return Err(e),
                }
            };
            let mut used = Vec::new();
            for (p, _) in ranked.iter().filter(|(p, _)| !bad.contains(p)) {
                if w.written() == size {
                    break;
                }
                used.push(*p);
                match remote.blob_into(*p, path, &mut w, size).await {
                    Ok(n) => received += n,
                    Err((n, e)) => {
                        received += n;
                        tracing::warn!("{d} from {p}: {e:#}; asking the next provider");
                    }
                }
            }
            if w.written() < size {
                bail!(
                    "the providers gave {} of its {size} bytes; what came is kept to resume",
                    w.written()
                );
            }
            match w.finish() {
                Ok(_) => {
                    let from = used
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Ok((received, from));
                }
                Err(e) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "{d} from {}: {e:#}; those nodes are not asked for it again",
                        used.iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    bad.extend(used);
                    if ranked.iter().all(|(p, _)| bad.contains(p)) {
                        bail!("no provider gave it as its digest says");
                    }
                }
            }
        }
    }
}

impl Endpoint {
    /// Asks `owner` to pull `d` through, then takes it from there.
    async fn fetch_through(
        &self,
        remote: &super::Remote,
        owner: SocketAddr,
        name: &str,
        d: Digest,
        kind: Kind,
    ) -> Result<u64> {
        let (what, size) = match kind {
            Kind::Document => ("manifests", None),
            Kind::Blob => (
                "blobs",
                Some(
                    self.size_of(&d)
                        .context("no manifest answered here gave its size")?,
                ),
            ),
        };
        let mut ask = format!("/v2/{name}/{what}/{d}?through=1");
        if let Some(n) = size {
            ask += &format!("&size={n}");
        }
        // The owner answers once it has the digest: its own fetch may take long.
        let r = remote
            .signed(reqwest::Method::HEAD, owner, &ask)
            .timeout(THROUGH_WAIT)
            .send()
            .await?;
        if r.status() != reqwest::StatusCode::OK {
            bail!("answered {}", r.status());
        }
        let path = format!("/v2/{name}/{what}/{d}");
        match size {
            None => {
                let bytes = remote.document(owner, &path, d).await?;
                let n = bytes.len() as u64;
                self.cache.put_bytes(&bytes)?;
                Ok(n)
            }
            Some(size) => Ok(self
                .blob_from(remote, &[(owner, Some(size))], &path, d, size)
                .await?
                .0),
        }
    }
}

impl super::Remote {
    fn url(&self, p: SocketAddr, path: &str) -> String {
        format!("http://{p}{path}")
    }

    fn signed(
        &self,
        method: reqwest::Method,
        p: SocketAddr,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let auth = self.key.sign(method.as_str(), path);
        self.http
            .request(method, self.url(p, path))
            .header(reqwest::header::AUTHORIZATION, auth)
    }

    /// The providers that answer `HEAD` for `path` with 200, fastest first, with the
    /// length each gave.
    async fn rank(&self, providers: &[SocketAddr], path: &str) -> Vec<(SocketAddr, Option<u64>)> {
        let mut asks = futures_util::stream::FuturesUnordered::new();
        for p in providers {
            let req = self
                .signed(reqwest::Method::HEAD, *p, path)
                .timeout(Duration::from_secs(5));
            let p = *p;
            asks.push(async move { (p, req.send().await) });
        }
        let mut out = Vec::new();
        while let Some((p, res)) = futures_util::StreamExt::next(&mut asks).await {
            match res {
                Ok(r) if r.status() == reqwest::StatusCode::OK => {
                    let len = r
                        .headers()
                        .get(reqwest::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok()?.parse().ok());
                    out.push((p, len));
                }
                Ok(r) => tracing::debug!("{p}{path}: {}", r.status()),
                Err(e) => tracing::debug!("{p}{path}: {e}"),
            }
        }
        out
    }

    /// A manifest from `p`, checked against `d`.
    async fn document(&self, p: SocketAddr, path: &str, d: Digest) -> Result<Vec<u8>> {
        let mut r = self
            .signed(reqwest::Method::GET, p, path)
            .timeout(Duration::from_secs(30))
            .send()
            .await?;
        if r.status() != reqwest::StatusCode::OK {
            bail!("answered {}", r.status());
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = r.chunk().await? {
            if (bytes.len() + chunk.len()) as u64 > MAX_DOCUMENT {
                bail!("longer than {MAX_DOCUMENT} bytes");
            }
            bytes.extend_from_slice(&chunk);
        }
        let got = Digest::of(&bytes);
        if got != d {
            bail!("came with digest {got}; discarded");
        }
        Ok(bytes)
    }

    /// Appends what `p` has of the blob from the writer's position on; the bytes
    /// received, and why it stopped early when it did.
    async fn blob_into(
        &self,
        p: SocketAddr,
        path: &str,
        w: &mut crate::cache::BlobWriter,
        size: u64,
    ) -> std::result::Result<u64, (u64, anyhow::Error)> {
        let from = w.written();
        let mut req = self.signed(reqwest::Method::GET, p, path);
        if from > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        let mut r = match tokio::time::timeout(STALL, req.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err((0, e.into())),
            Err(_) => return Err((0, anyhow::anyhow!("no answer in {} s", STALL.as_secs()))),
        };
        let ok = match r.status().as_u16() {
            200 => from == 0,
            206 => r
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| crate::registry::client::content_range_matches(v, from, size)),
            _ => false,
        };
        if !ok {
            return Err((
                0,
                anyhow::anyhow!("answered {} to bytes {from}-", r.status()),
            ));
        }
        let mut n = 0u64;
        loop {
            let chunk = match tokio::time::timeout(STALL, r.chunk()).await {
                Ok(c) => c,
                Err(_) => {
                    return Err((n, anyhow::anyhow!("no byte came in {} s", STALL.as_secs())))
                }
            };
            match chunk {
                Ok(Some(bytes)) => {
                    n += bytes.len() as u64;
                    if let Err(e) = std::io::Write::write_all(w, &bytes) {
                        return Err((n, e.into()));
                    }
                }
                Ok(None) => return Ok(n),
                Err(e) => return Err((n, e.into())),
            }
        }
    }
}
