//! Fetching blobs from a registry into the cache, never downloading a byte twice.
//!
//! A blob is written through the cache's partial file ([`crate::cache::BlobWriter`]):
//! whatever was there already (from a cut connection, a daemon restart, a reboot) is
//! kept, and the request asks for the rest with `Range: bytes=N-`. The answer must be
//! `206 Partial Content` with a `Content-Range` starting at N; a server that answers
//! `200` sends the whole blob, and the partial is started again. The digest is checked
//! over the whole blob before it is named.
//!
//! Errors are classified once ([`FetchError`]): refused credentials, a missing blob or a
//! policy refusal are not retried; a cut connection, 408, 429 and 5xx are, with
//! exponential backoff and jitter ([`Retry`]).
//!
//! Authentication follows the distribution protocol: a `401` names the scheme in
//! `WWW-Authenticate`; `Basic` is answered with the repository's credentials
//! ([`super::auth`]), `Bearer` by asking the named realm for a pull token first.
//!
//! TLS is set up per host as containers/image does ([`super::tls`]: the system's CAs,
//! certs.d); plain HTTP is used only for locations registries.conf marks `insecure`.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use super::auth::{self, Credentials};
use super::conf::PullSource;
use crate::cache::Cache;
use crate::oci::digest::Digest;
use crate::paths::HostPaths;

/// Largest answer of a token realm read.
const MAX_TOKEN_ANSWER: usize = 1 << 20;

/// Why a fetch failed, as far as retrying goes.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Credentials missing or refused (401, 403): retrying will not help.
    #[error("{0}: the registry refused the credentials (or none were found)")]
    Auth(String),
    /// The registry has no such blob or repository (404).
    #[error("{0}: not found")]
    NotFound(String),
    /// Worth another try: a cut connection, 408, 429, 5xx.
    #[error("{0}")]
    Transient(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl FetchError {
    /// Whether another attempt may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, FetchError::Transient(_))
    }

    fn of_status(what: &str, status: u16) -> FetchError {
        let what = format!("{what}: HTTP {status}");
        match status {
            401 | 403 => FetchError::Auth(what),
            404 => FetchError::NotFound(what),
            408 | 429 | 500 | 502 | 503 | 504 => FetchError::Transient(what),
            _ => FetchError::Other(what),
        }
    }
}

/// How often and how patiently to try again.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all (the first included).
    pub attempts: u32,
    /// The first wait; each next one doubles, up to `max_delay`.
    pub first_delay: Duration,
    /// The longest wait.
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 6,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl Retry {
    /// The wait before attempt `n` (1 is the first retry): doubling, capped, with up to
    /// a quarter of it added at random so many nodes do not retry in step.
    pub fn delay(&self, n: u32) -> Duration {
        let base = self
            .first_delay
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.max_delay);
        let jitter = base.as_millis() as u64 / 4;
        let r = if jitter == 0 {
            0
        } else {
            // A cheap source of spread, not of secrets.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as u64);
            nanos % jitter
        };
        base + Duration::from_millis(r)
    }
}

/// What one fetch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes received over the network for this blob, over every attempt.
    pub downloaded: u64,
    /// Bytes the partial already held when the fetch began.
    pub resumed_from: u64,
    /// Attempts made.
    pub attempts: u32,
}

/// A registry client for one node.
pub struct Client {
    paths: HostPaths,
    retry: Retry,
    rate: Option<RateLimit>,
    /// One HTTP client per host, with that host's TLS set-up ([`super::tls`]).
    clients: std::sync::Mutex<std::collections::HashMap<String, reqwest::Client>>,
    /// Hosts registries.conf marks insecure, and the scheme each answered on.
    insecure: std::sync::Mutex<std::collections::HashMap<String, Option<&'static str>>>,
}

/// How much unused time the rate cap makes up for.
const RATE_SLACK: Duration = Duration::from_millis(50);

/// A cap on the bytes per second of every transfer of one client together.
///
/// Each chunk received books the time it takes at the cap, after whatever was booked
/// before; the transfer waits until its booking ends before reading on, so TCP's window
/// slows the sender and the link is left free for others.
#[derive(Debug)]
struct RateLimit {
    bytes_per_sec: u64,
    next: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl RateLimit {
    async fn take(&self, n: u64) {
        let until = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            // Time left unused between transfers (a request on its way) is made up for,
            // but at most the last 50 ms of it: no long idle is saved up for a burst.
            let floor = now.checked_sub(RATE_SLACK).unwrap_or(now);
            let start = next.map_or(now, |t| t.max(floor));
            let t = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
            *next = Some(t);
            t
        };
        tokio::time::sleep_until(until).await;
    }
}

/// Where the registry `host` answers: Docker Hub's references name `docker.io`, its API is
/// at `registry-1.docker.io` (containers/image `docker/docker_client.go`,
/// `newDockerClient`); credentials and certs.d still go by the name the reference gives.
fn endpoint(host: &str) -> &str {
    if host == "docker.io" {
        "registry-1.docker.io"
    } else {
        host
    }
}

/// `host[:port]`, the repository path, for a reference `host/path/repo[:tag|@digest]`.
fn split_repository(reference: &str) -> Result<(&str, &str)> {
    let name = match reference.find('@') {
        Some(i) => &reference[..i],
        None => match reference.rfind(':') {
            Some(i) if !reference[i..].contains('/') => &reference[..i],
            _ => reference,
        },
    };
    let (host, repo) = name
        .split_once('/')
        .with_context(|| format!("{reference:?} names no registry host"))?;
    Ok((host, repo))
}

impl Client {
    /// A client reading credentials from the node at `paths`. Proxy variables
    /// (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`) apply as for any program.
    pub fn new(paths: &HostPaths, retry: Retry) -> Result<Client> {
        Ok(Client {
            paths: paths.clone(),
            retry,
            rate: None,
            clients: Default::default(),
            insecure: Default::default(),
        })
    }

    /// The HTTP client for `host` (`host[:port]`), made on first use: the system's CAs
    /// and the host's certs.d, or no verification where registries.conf says insecure.
    fn http(&self, host: &str) -> Result<reqwest::Client> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(host) {
            return Ok(c.clone());
        }
        let insecure = self
            .insecure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(host);
        let tls = super::tls::client_config(&self.paths, host, insecure)
            .map_err(|e| FetchError::Other(format!("{host}: {e:#}")))?;
        let c = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            // A stalled transfer counts as cut; what arrived stays in the partial.
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("longshore/", env!("CARGO_PKG_VERSION")))
            .use_preconfigured_tls(tls)
            .build()
            .context("making the HTTP client")?;
        clients.insert(host.to_string(), c.clone());
        Ok(c)
    }

    /// The client for the host of `url`.
    fn http_for_url(&self, url: &reqwest::Url) -> Result<reqwest::Client> {
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => bail_other(format!("{url} names no host"))?,
        };
        self.http(&host)
    }

    /// How it tries again.
    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// Caps the bytes per second of all this client's transfers together.
    pub fn with_max_rate(mut self, bytes_per_sec: Option<u64>) -> Client {
        self.rate = bytes_per_sec.filter(|r| *r > 0).map(|r| RateLimit {
            bytes_per_sec: r,
            next: std::sync::Mutex::new(None),
        });
        self
    }

    /// `https://host`; for an insecure location, HTTPS when it answers on it (its
    /// certificate unchecked), else plain HTTP, as containers/image tries them.
    async fn base_url(&self, src: &PullSource, host: &str) -> Result<String> {
        if !src.insecure {
            return Ok(format!("https://{}", endpoint(host)));
        }
        let known = {
            let mut m = self.insecure.lock().unwrap_or_else(|p| p.into_inner());
            *m.entry(host.to_string()).or_insert(None)
        };
        if let Some(scheme) = known {
            return Ok(format!("{scheme}://{host}"));
        }
        let probe = self
            .http(host)?
            .get(format!("https://{host}/v2/"))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let scheme = if probe.is_ok() { "https" } else { "http" };
        tracing::debug!("{host} is insecure in registries.conf; using {scheme}");
        self.insecure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_string(), Some(scheme));
        Ok(format!("{scheme}://{host}"))
    }

    /// Fetches blob `digest` of `size` bytes of the image `src` names into `cache`,
    /// resuming from what its partial holds, retrying what is worth retrying.
    pub async fn fetch_blob(
        &self,
        src: &PullSource,
        digest: Digest,
        size: u64,
        cache: &Cache,
    ) -> Result<Fetched> {
        self.fetch_blob_reporting(src, digest, size, cache, &|_| {})
            .await
    }

    /// [`Client::fetch_blob`], telling `on_bytes` of every chunk received.
    pub async fn fetch_blob_reporting(
        &self,
        src: &PullSource,
        digest: Digest,
        size: u64,
        cache: &Cache,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Fetched> {
        let mut done = Fetched::default();
        if cache.has(&digest) == Some(size) {
            return Ok(done);
        }
        done.resumed_from = Some(cache.partial_len(&digest))
            .filter(|n| *n <= size)
            .unwrap_or(0);
        // Attempts that moved the blob on do not count against the limit: a link cut
        // every few megabytes still brings a large blob in, one stretch at a time.
        let mut in_row = 0;
        loop {
            done.attempts += 1;
            in_row += 1;
            let before = cache.partial_len(&digest);
            match self
                .fetch_once(src, digest, size, cache, &mut done, on_bytes)
                .await
            {
                Ok(()) => return Ok(done),
                Err(e) => {
                    let retryable = e
                        .downcast_ref::<FetchError>()
                        .is_some_and(FetchError::retryable);
                    // Progress is what the partial kept: bytes of a whole blob whose
                    // digest was wrong were thrown away, and are none.
                    if cache.partial_len(&digest) > before {
                        in_row = 1;
                    }
                    if !retryable || in_row >= self.retry.attempts {
                        return Err(e.context(format!(
                            "fetching {digest} from {} ({} attempts)",
                            src.reference, done.attempts
                        )));
                    }
                    let wait = self.retry.delay(in_row);
                    tracing::warn!(
                        "fetching {digest} from {}: {e:#}; trying again in {:.1} s",
                        src.reference,
                        wait.as_secs_f64()
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn fetch_once(
        &self,
        src: &PullSource,
        digest: Digest,
        size: u64,
        cache: &Cache,
        done: &mut Fetched,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<()> {
        let (host, repo) = split_repository(&src.reference)?;
        let url = format!(
            "{}/v2/{repo}/blobs/{digest}",
            self.base_url(src, host).await?
        );
        // Nothing is made in the cache until the registry answers with the blob.
        let from = Some(cache.partial_len(&digest))
            .filter(|n| *n <= size)
            .unwrap_or(0);
        let resp = self
            .get(&url, host, repo, (from > 0).then_some(from))
            .await?;
        let status = resp.status().as_u16();
        if !matches!(status, 200 | 206 | 416) {
            return Err(FetchError::of_status(&url, status).into());
        }
        let mut w = cache.writer(digest, size).map_err(|e| {
            if e.downcast_ref::<crate::cache::Busy>().is_some() {
                anyhow!(FetchError::Transient(format!("{e:#}")))
            } else {
                e
            }
        })?;
        if w.resume_at() != from && status == 206 {
            drop(w);
            cache.remove(&digest)?;
            return Err(FetchError::Transient(format!(
                "{url}: the partial changed while it was asked for"
            ))
            .into());
        }
        match status {
            206 if from > 0 => {
                let range = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if !content_range_matches(range, from, size) {
                    // Not the rest of this blob: start again from nothing.
                    drop(w);
                    cache.remove(&digest)?;
                    return Err(FetchError::Transient(format!(
                        "{url}: asked for bytes {from}- and got Content-Range {range:?}"
                    ))
                    .into());
                }
            }
            200 => {
                if from > 0 {
                    tracing::info!(
                        "{url} answered the whole blob to a range request; starting it again"
                    );
                    drop(w);
                    cache.remove(&digest)?;
                    w = cache.writer(digest, size)?;
                }
            }
            416 => {
                drop(w);
                cache.remove(&digest)?;
                return Err(FetchError::Transient(format!(
                    "{url}: range {from}- not satisfiable; starting the blob again"
                ))
                .into());
            }
            s => return Err(FetchError::of_status(&url, s).into()),
        }
        let mut resp = resp;
        loop {
            match resp.chunk().await {
                Ok(Some(bytes)) => {
                    if let Some(r) = &self.rate {
                        r.take(bytes.len() as u64).await;
                    }
                    done.downloaded += bytes.len() as u64;
                    on_bytes(bytes.len() as u64);
                    std::io::Write::write_all(&mut w, &bytes)
                        .map_err(|e| FetchError::Other(format!("{url}: {e}")))?;
                }
                Ok(None) => break,
                // The partial keeps what arrived; the next attempt asks for the rest.
                Err(e) => return Err(FetchError::Transient(format!("{url}: {e}")).into()),
            }
        }
        w.finish().map_err(|e| {
            // A whole blob whose digest is wrong: the partial was discarded, so another
            // attempt starts from nothing.
            anyhow!(FetchError::Transient(format!("{url}: {e:#}")))
        })?;
        Ok(())
    }

    /// A GET that answers the registry's authentication challenge once.
    async fn get(
        &self,
        url: &str,
        host: &str,
        repo: &str,
        from: Option<u64>,
    ) -> Result<reqwest::Response> {
        self.get_accepting(url, host, repo, from, None).await
    }

    async fn get_accepting(
        &self,
        url: &str,
        host: &str,
        repo: &str,
        from: Option<u64>,
        accept: Option<&str>,
    ) -> Result<reqwest::Response> {
        let http = self.http(host)?;
        let request = |auth: Option<&str>| {
            let mut r = http.get(url);
            if let Some(n) = from {
                r = r.header(reqwest::header::RANGE, format!("bytes={n}-"));
            }
            if let Some(a) = accept {
                r = r.header(reqwest::header::ACCEPT, a);
            }
            if let Some(a) = auth {
                r = r.header(reqwest::header::AUTHORIZATION, a);
            }
            r
        };
        let transient = |e: reqwest::Error| of_send_error(url, &e);
        let resp = request(None).send().await.map_err(transient)?;
        if resp.status().as_u16() != 401 {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let creds = auth::lookup(&self.paths, &format!("{host}/{repo}"))?;
        let header = match creds.as_ref().map(|f| &f.credentials) {
            _ if challenge.to_ascii_lowercase().starts_with("bearer") => {
                let token = self
                    .bearer_token(&challenge, repo, creds.as_ref().map(|f| &f.credentials))
                    .await?;
                format!("Bearer {token}")
            }
            Some(Credentials::Basic { username, password }) => basic(username, password),
            _ => return Err(FetchError::Auth(url.to_string()).into()),
        };
        let resp = request(Some(&header)).send().await.map_err(transient)?;
        if matches!(resp.status().as_u16(), 401 | 403) {
            return Err(FetchError::Auth(url.to_string()).into());
        }
        Ok(resp)
    }

    /// A pull token from the realm a `Bearer` challenge names.
    async fn bearer_token(
        &self,
        challenge: &str,
        repo: &str,
        creds: Option<&Credentials>,
    ) -> Result<String> {
        let params = challenge_params(challenge);
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                FetchError::Other(format!("a Bearer challenge without a realm: {challenge:?}"))
            })?;
        let service = params
            .iter()
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.clone());
        let scope = format!("repository:{repo}:pull");
        let mut q: Vec<(&str, String)> = vec![("scope", scope.clone())];
        if let Some(s) = &service {
            q.push(("service", s.clone()));
        }
        let bad_realm =
            |e: &dyn std::fmt::Display| FetchError::Other(format!("realm {realm:?}: {e}"));
        let url = reqwest::Url::parse_with_params(&realm, &q).map_err(|e| bad_realm(&e))?;
        let http = self.http_for_url(&url)?;
        let mut r = http.get(url);
        match creds {
            Some(Credentials::Basic { username, password }) => {
                r = r.header(reqwest::header::AUTHORIZATION, basic(username, password));
            }
            Some(Credentials::IdentityToken(t)) => {
                // An OAuth2 refresh token is exchanged at the same realm.
                let mut form = reqwest::Url::parse("http://form/").map_err(|e| bad_realm(&e))?;
                form.query_pairs_mut()
                    .append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", t)
                    .append_pair("scope", &scope)
                    .append_pair("client_id", "longshore");
                if let Some(s) = &service {
                    form.query_pairs_mut().append_pair("service", s);
                }
                r = http
                    .post(reqwest::Url::parse(&realm).map_err(|e| bad_realm(&e))?)
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(form.query().unwrap_or("").to_string());
            }
            None => {}
        }
        let resp = r.send().await.map_err(|e| of_send_error(&realm, &e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(FetchError::of_status(&realm, status).into());
        }
        // A token answer is small; more than 1 MiB is refused, not read.
        let body = read_limited(resp, &realm, "the token answer", MAX_TOKEN_ANSWER).await?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body).map_err(|e| {
            FetchError::Other(format!("{realm}: the token answer is not JSON: {e}"))
        })?;
        t.token
            .or(t.access_token)
            .ok_or_else(|| FetchError::Other(format!("{realm}: the answer holds no token")).into())
    }
}

/// The manifest media types asked for, images and lists of images.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// An image fetched into the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedImage {
    /// The image manifest's digest (for a list, that of this node's platform).
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Where it came from (a mirror or the registry itself).
    pub source: String,
    /// Bytes received for its blobs.
    pub downloaded: u64,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Desc {
    digest: String,
    size: u64,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyManifest {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    config: Option<Desc>,
    #[serde(default)]
    layers: Vec<Desc>,
    #[serde(default)]
    manifests: Vec<Desc>,
}

/// A request that got no answer: worth retrying (a cut, a timeout, a refused
/// connection), unless TLS refused the server, which another try will not change.
fn of_send_error(url: &str, e: &reqwest::Error) -> FetchError {
    let mut all = String::new();
    let mut tls = false;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>()
            || err
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            tls = true;
        }
        let text = err.to_string();
        // rustls's own words, for when its error is boxed out of reach of a downcast.
        tls |= [
            "invalid peer certificate",
            "received fatal alert",
            "peer is incompatible",
        ]
        .iter()
        .any(|w| text.starts_with(w));
        if !all.contains(&text) {
            if !all.is_empty() {
                all += ": ";
            }
            all += &text;
        }
        cur = err.source();
    }
    if tls {
        FetchError::Other(format!(
            "{url}: TLS: {all} (is the registry's CA in /etc/containers/certs.d/HOST:PORT/*.crt?)"
        ))
    } else {
        FetchError::Transient(format!("{url}: {all}"))
    }
}

fn bail_other<T>(msg: String) -> Result<T> {
    Err(FetchError::Other(msg).into())
}

fn parse_digest(what: &str, d: &str) -> Result<Digest> {
    d.strip_prefix("sha256:")
        .and_then(|h| Digest::from_hex(h).ok())
        .ok_or_else(|| FetchError::Other(format!("{what}: {d:?} is not a sha256 digest")).into())
}

/// An image's manifest as one source serves it: what is left to fetch is its blobs.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Where it came from.
    pub source: PullSource,
    /// The image manifest's digest (for a list, that of this node's platform).
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// The manifest's bytes, checked against `digest`.
    pub manifest: Vec<u8>,
    /// The list of images the reference named, when it named one.
    pub list: Option<Listed>,
    /// Its config and layers, with their sizes, config first.
    pub blobs: Vec<(Digest, u64)>,
}

/// A list of images (an OCI index or a Docker manifest list) a reference named.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its digest, checked.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

impl Resolved {
    /// Bytes of its blobs.
    pub fn size(&self) -> u64 {
        self.blobs.iter().map(|b| b.1).sum()
    }

    /// Bytes of its manifest and list.
    pub fn documents_len(&self) -> u64 {
        (self.manifest.len() + self.list.as_ref().map_or(0, |l| l.bytes.len())) as u64
    }

    /// Stores the manifest in `cache` and names the image there as `names` (full
    /// references): by digest, and by the tag a set gives it. Done before its blobs are
    /// fetched, so the partials of an image a set wants are referenced, and not
    /// collected, while they wait to be resumed; whether the cache holds every blob is
    /// checked wherever the image is used.
    ///
    /// When the reference named a list, the list is kept too, and every name but the
    /// image's own digest name names the list: the store then knows the image by the
    /// list's digest, as CRI-O's pull does.
    pub fn name_in(&self, cache: &Cache, names: &[String]) -> Result<()> {
        cache.put_bytes(&self.manifest)?;
        if let Some(l) = &self.list {
            cache.put_bytes(&l.bytes)?;
        }
        let own = format!("@{}", self.digest);
        let entries: Vec<crate::cache::IndexEntry> = names
            .iter()
            .map(|n| {
                let (media_type, digest, size) = match &self.list {
                    Some(l) if !n.ends_with(&own) => {
                        (l.media_type.clone(), l.digest, l.bytes.len() as u64)
                    }
                    _ => (
                        self.media_type.clone(),
                        self.digest,
                        self.manifest.len() as u64,
                    ),
                };
                crate::cache::IndexEntry {
                    media_type,
                    digest,
                    size,
                    annotations: [(crate::cache::REF_NAME.to_string(), n.clone())].into(),
                }
            })
            .collect();
        cache.name_images(&entries)
    }
}

/// `host/path/repo` of a reference, without tag or digest.
pub fn repository_of(reference: &str) -> String {
    match split_repository(reference) {
        Ok((h, r)) => format!("{h}/{r}"),
        Err(_) => reference.to_string(),
    }
}

impl Client {
    /// Fetches the image `reference` names into `cache`: its manifest (for a list, the
    /// one for this node's platform), config and layers, each checked by digest, from the
    /// first of `sources` that serves all of it (containers/image takes every blob from
    /// the mirror that gave the manifest). The image is then named in the cache's index
    /// by digest.
    pub async fn fetch_image(
        &self,
        reference: &str,
        sources: &[PullSource],
        cache: &Cache,
    ) -> Result<FetchedImage> {
        let mut errors = Vec::new();
        for src in sources {
            let res = async {
                let r = self.resolve(reference, src).await?;
                r.name_in(
                    cache,
                    &[format!("{}@{}", repository_of(reference), r.digest)],
                )?;
                let mut downloaded = 0;
                for (blob, size) in &r.blobs {
                    downloaded += self.fetch_blob(src, *blob, *size, cache).await?.downloaded;
                }
                anyhow::Ok(FetchedImage {
                    digest: r.digest,
                    media_type: r.media_type,
                    source: src.reference.clone(),
                    downloaded,
                })
            };
            match res.await {
                Ok(img) => return Ok(img),
                Err(e) => {
                    tracing::warn!("{reference} from {}: {e:#}", src.reference);
                    errors.push(format!("{}: {e:#}", src.reference));
                }
            }
        }
        if errors.is_empty() {
            anyhow::bail!("{reference}: registries.conf leaves no place to pull it from (blocked, with no mirror for it)");
        }
        anyhow::bail!("{reference}: no source served it: {}", errors.join("; "))
    }

    /// The manifest of the image `reference` names, from `src` (for a list, the one for
    /// this node's platform), checked against the digest the reference gives.
    pub async fn resolve(&self, reference: &str, src: &PullSource) -> Result<Resolved> {
        let (host, repo) = split_repository(&src.reference)?;
        let base = self.base_url(src, host).await?;
        // The tag or digest as the reference gives it.
        let tail = match src.reference.find('@') {
            Some(i) => src.reference[i + 1..].to_string(),
            None => src.reference[host.len() + 1 + repo.len()..]
                .trim_start_matches(':')
                .to_string(),
        };
        let tail = if tail.is_empty() {
            "latest".to_string()
        } else {
            tail
        };
        let wanted = tail
            .strip_prefix("sha256:")
            .and_then(|h| Digest::from_hex(h).ok());
        let (mut digest, mut bytes) = self.manifest(&base, host, repo, &tail, wanted).await?;
        let mut m: AnyManifest = serde_json::from_slice(&bytes).map_err(|e| {
            FetchError::Other(format!("{reference}: the manifest is not JSON: {e}"))
        })?;
        let mut list = None;
        if m.config.is_none() && !m.manifests.is_empty() {
            let arch = crate::bundle::write::host_architecture();
            let (d, _) = crate::oci::list_instance(&bytes, arch)
                .flatten()
                .ok_or_else(|| {
                    FetchError::Other(format!(
                        "{reference}: no image for linux/{arch} (by sha256) in its list"
                    ))
                })?;
            let (image_digest, image_bytes) = self
                .manifest(&base, host, repo, &d.to_string(), Some(d))
                .await?;
            list = Some(Listed {
                digest,
                media_type: if m.media_type.is_empty() {
                    crate::bundle::format::OCI_INDEX.to_string()
                } else {
                    m.media_type.clone()
                },
                bytes: std::mem::replace(&mut bytes, image_bytes),
            });
            digest = image_digest;
            m = serde_json::from_slice(&bytes).map_err(|e| {
                FetchError::Other(format!("{reference}: the manifest is not JSON: {e}"))
            })?;
        }
        let config = m.config.as_ref().ok_or_else(|| {
            FetchError::Other(format!("{reference}: the manifest names no config"))
        })?;
        let mut blobs = Vec::new();
        for d in std::iter::once(config).chain(&m.layers) {
            let b = (parse_digest(reference, &d.digest)?, d.size);
            if !blobs.contains(&b) {
                blobs.push(b);
            }
        }
        let media_type = if m.media_type.is_empty() {
            crate::bundle::format::OCI_MANIFEST.to_string()
        } else {
            m.media_type.clone()
        };
        Ok(Resolved {
            source: src.clone(),
            digest,
            media_type,
            manifest: bytes,
            list,
            blobs,
        })
    }

    /// A manifest by tag or digest, at most 4 MiB, checked against `wanted`.
    /// The manifest (or list) `d` of the repository `src` names, as the registry has
    /// it, checked against `d`.
    pub async fn document(&self, src: &PullSource, d: Digest) -> Result<Vec<u8>> {
        let (host, repo) = split_repository(&src.reference)?;
        let base = self.base_url(src, host).await?;
        Ok(self
            .manifest(&base, host, repo, &d.to_string(), Some(d))
            .await?
            .1)
    }

    async fn manifest(
        &self,
        base: &str,
        host: &str,
        repo: &str,
        tail: &str,
        wanted: Option<Digest>,
    ) -> Result<(Digest, Vec<u8>)> {
        let url = format!("{base}/v2/{repo}/manifests/{tail}");
        let resp = self
            .get_accepting(&url, host, repo, None, Some(ACCEPT_MANIFESTS))
            .await?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(FetchError::of_status(&url, status).into());
        }
        let limit = crate::bundle::format::MAX_DOCUMENT as usize;
        let bytes = read_limited(resp, &url, "the manifest", limit).await?;
        let got = Digest::of(&bytes);
        if let Some(w) = wanted {
            if got != w {
                return Err(FetchError::Other(format!(
                    "{url}: the manifest has digest {got}, not the {w} asked for"
                ))
                .into());
            }
        }
        Ok((got, bytes))
    }
}

/// A response body read whole, refused (not read on) past `limit` bytes.
async fn read_limited(
    mut resp: reqwest::Response,
    url: &str,
    what: &str,
    limit: usize,
) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| FetchError::Transient(format!("{url}: {e}")))?
    {
        if body.len() + chunk.len() > limit {
            return Err(
                FetchError::Other(format!("{url}: {what} is larger than {limit} bytes")).into(),
            );
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn basic(username: &str, password: &str) -> String {
    use base64::Engine;
    let raw = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw.as_bytes())
    )
}

/// Whether `Content-Range: bytes FROM-END/TOTAL` continues a blob of `size` at `from`.
pub(crate) fn content_range_matches(v: &str, from: u64, size: u64) -> bool {
    let Some(rest) = v.trim().strip_prefix("bytes ") else {
        return false;
    };
    let Some((range, total)) = rest.split_once('/') else {
        return false;
    };
    let Some((start, end)) = range.split_once('-') else {
        return false;
    };
    let total_ok = total == "*" || total.parse::<u64>() == Ok(size);
    start.parse::<u64>() == Ok(from) && end.parse::<u64>() == Ok(size.saturating_sub(1)) && total_ok
}

/// The `key="value"` pairs of a `WWW-Authenticate` challenge.
fn challenge_params(challenge: &str) -> Vec<(String, String)> {
    let rest = challenge.split_once(' ').map_or("", |(_, r)| r);
    let mut out = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let Some((k, v)) = s.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (value, tail) = if let Some(q) = v.strip_prefix('"') {
            match q.find('"') {
                Some(i) => (&q[..i], &q[i + 1..]),
                None => (q, ""),
            }
        } else {
            match v.find(',') {
                Some(i) => (&v[..i], &v[i..]),
                None => (v, ""),
            }
        };
        out.push((k, value.to_string()));
        s = tail.trim_start_matches(',').trim();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_are_split_from_host_tag_and_digest() {
        assert_eq!(
            split_repository("127.0.0.1:5000/a/b:1").unwrap(),
            ("127.0.0.1:5000", "a/b")
        );
        assert_eq!(
            split_repository("quay.io/org/app@sha256:abc").unwrap(),
            ("quay.io", "org/app")
        );
        assert_eq!(
            split_repository("lab:5000/app").unwrap(),
            ("lab:5000", "app")
        );
        assert!(split_repository("app").is_err());
    }

    #[test]
    fn docker_hub_is_reached_at_its_api_host() {
        assert_eq!(endpoint("docker.io"), "registry-1.docker.io");
        assert_eq!(endpoint("quay.io"), "quay.io");
        assert_eq!(endpoint("docker.io:5000"), "docker.io:5000");
    }

    #[test]
    fn a_content_range_must_continue_the_blob_exactly() {
        assert!(content_range_matches("bytes 100-999/1000", 100, 1000));
        assert!(content_range_matches("bytes 100-999/*", 100, 1000));
        assert!(!content_range_matches("bytes 0-999/1000", 100, 1000));
        assert!(!content_range_matches("bytes 100-500/1000", 100, 1000));
        assert!(!content_range_matches("bytes 100-999/2000", 100, 1000));
        assert!(!content_range_matches("", 100, 1000));
    }

    #[test]
    fn statuses_are_classified_once() {
        for (s, retry) in [
            (401, false),
            (403, false),
            (404, false),
            (400, false),
            (408, true),
            (429, true),
            (500, true),
            (502, true),
            (503, true),
            (504, true),
        ] {
            assert_eq!(FetchError::of_status("x", s).retryable(), retry, "{s}");
        }
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap_with_some_jitter() {
        let r = Retry {
            attempts: 10,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
        };
        for (n, base) in [
            (1u32, 1000u64),
            (2, 2000),
            (3, 4000),
            (4, 8000),
            (5, 10_000),
            (9, 10_000),
        ] {
            let d = r.delay(n).as_millis() as u64;
            assert!(d >= base && d <= base + base / 4, "attempt {n}: {d} ms");
        }
    }

    #[test]
    fn bearer_challenges_are_read() {
        let p = challenge_params(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(
            p,
            [
                (
                    "realm".to_string(),
                    "https://auth.example/token".to_string()
                ),
                ("service".to_string(), "registry.example".to_string()),
                ("scope".to_string(), "repository:a/b:pull".to_string()),
            ]
        );
    }
}
