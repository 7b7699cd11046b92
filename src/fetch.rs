//! Pre-loading: the images of set files fetched from registries into the cache, days
//! before they are needed, never downloading a byte twice.
//!
//! ```text
//!   wanted images (in neither the store nor the cache)
//!     -> policy.json       refused: PolicyRefused, never contacted
//!     -> manifests         from the first source registries.conf gives that serves it
//!     -> disk check        cache: the blobs it lacks; store: twice their compressed size
//!     -> named in the cache (so their partials are referenced while they wait)
//!     -> blobs             `[fetch] jobs` at once, under `max_rate`, inside `windows`,
//!                          each resumed from its partial and checked by digest
//! ```
//!
//! This room only fills the cache; the engine then copies what the cache holds whole
//! into the store and pins it, as it does for a bundle's images (`Engine::heal`). It
//! works without the state lock, so the daemon keeps importing media meanwhile: the
//! cache's partials and index are locked on their own.
//!
//! What it is doing is written to `/run/longshore/fetch.json` (the [`Board`]), which
//! the sets' conditions are read from: `Progressing` with bytes and an ETA, `Degraded`
//! with a reason per image.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::cancel::Cancel;
use crate::config::{human_size, Settings};
use crate::oci::digest::Digest;
use crate::paths::HostPaths;
use crate::registry::client::{repository_of, Client, FetchError, Resolved, Retry};
use crate::registry::conf::RegistriesConf;
use crate::registry::policy::Policy;
use crate::store::{check_space, SpaceNeed};

/// An image to fetch, and the sets that want it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// The reference as the set names it.
    pub reference: String,
    /// The sets naming it.
    pub sets: BTreeSet<String>,
}

/// Why an image could not be fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// The registry refused the credentials, or there were none.
    AuthRefused,
    /// No source has it.
    NotFound,
    /// The node's policy.json would refuse it.
    PolicyRefused,
    /// The cache or the store lacks the space.
    NoSpace,
    /// A network error or a busy registry; tried again later.
    Retrying,
    /// Anything else (a malformed manifest, a bad configuration).
    Failed,
}

impl Reason {
    /// The CamelCase reason of the set's `Degraded` condition.
    pub fn name(self) -> &'static str {
        match self {
            Reason::AuthRefused => "AuthRefused",
            Reason::NotFound => "NotFound",
            Reason::PolicyRefused => "PolicyRefused",
            Reason::NoSpace => "NoSpace",
            Reason::Retrying => "Retrying",
            Reason::Failed => "FetchFailed",
        }
    }

    fn of(e: &anyhow::Error) -> Reason {
        if e.chain()
            .any(|c| c.downcast_ref::<crate::store::NoSpace>().is_some())
        {
            return Reason::NoSpace;
        }
        match e.chain().find_map(|c| c.downcast_ref::<FetchError>()) {
            Some(FetchError::Auth(_)) => Reason::AuthRefused,
            Some(FetchError::NotFound(_)) => Reason::NotFound,
            Some(FetchError::Transient(_)) => Reason::Retrying,
            _ => Reason::Failed,
        }
    }
}

/// An image that failed, for the sets' `Degraded` condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    /// Why.
    pub reason: Reason,
    /// For people: what failed where.
    pub message: String,
    /// Unix seconds of the first failure of this kind in a row.
    pub since: u64,
    /// The sets naming the image.
    pub sets: BTreeSet<String>,
}

/// A set's fetch in progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetProgress {
    /// Bytes of its images the cache holds now.
    pub done: u64,
    /// Bytes of its images in all (known once their manifests are).
    pub total: u64,
    /// Seconds still to go at the rate so far, when there is one.
    pub eta: Option<u64>,
    /// Why nothing moves now (outside the fetch windows), if so.
    pub waiting: Option<String>,
}

/// What the fetcher is doing, in `/run/longshore/fetch.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Board {
    /// The process fetching; the board is stale once it is gone.
    pub pid: u32,
    /// Whether it is fetching now.
    pub active: bool,
    /// Sets being fetched.
    pub sets: BTreeMap<String, SetProgress>,
    /// Images that failed, by reference.
    pub failures: BTreeMap<String, Failure>,
}

const BOARD: &str = "fetch.json";

impl Board {
    /// The board of a fetcher still running, if there is one.
    pub fn read(paths: &HostPaths) -> Option<Board> {
        crate::state::board::read(paths, BOARD, |b: &Board| b.pid)
    }

    /// Writes it for others to read.
    pub fn write(&self, paths: &HostPaths) {
        crate::state::board::write(paths, BOARD, self)
    }

    /// Removes it (the fetcher stops).
    pub fn clear(paths: &HostPaths) {
        crate::state::board::clear(paths, BOARD)
    }
}

/// What a fetch did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// Images the cache now holds whole.
    pub fetched: Vec<String>,
    /// Images that failed.
    pub failures: BTreeMap<String, Failure>,
    /// Bytes received from registries.
    pub downloaded: u64,
    /// Bytes of the images' blobs in all.
    pub total: u64,
    /// Minutes until the next fetch window opens, when fetching was not allowed now.
    pub waiting_minutes: Option<u16>,
    /// Milliseconds the fetch took (manifests, disk check and blobs).
    pub elapsed_ms: u64,
    /// Milliseconds from the first blob asked for to the last byte received: what a
    /// rate is measured over.
    pub transfer_ms: u64,
}

impl Outcome {
    /// Adds what a later fetch of other images did.
    pub fn merge(&mut self, next: Outcome) {
        self.fetched.extend(next.fetched);
        self.failures.extend(next.failures);
        self.downloaded += next.downloaded;
        self.total += next.total;
        self.waiting_minutes = self.waiting_minutes.or(next.waiting_minutes);
        self.elapsed_ms += next.elapsed_ms;
        self.transfer_ms += next.transfer_ms;
    }
}

/// Options of one fetch.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Fetch now even outside `[fetch] windows` (an administrator's `longshore fetch`).
    pub ignore_windows: bool,
}

/// Minute of the day, UTC.
fn minute_now() -> u16 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    ((secs / 60) % 1440) as u16
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A blob this large is fetched while no other such blob is (small ones go beside it).
const LARGE_BLOB: u64 = 16 << 20;

/// Progress shared by the transfers and the board writer.
struct Shared {
    board: Mutex<Board>,
    /// Each blob of a resolved image: its size, and the bytes of it the cache holds.
    blobs: Mutex<HashMap<Digest, (u64, Arc<AtomicU64>)>>,
    /// The blobs of each image, by reference, once its manifest is known.
    images: Mutex<HashMap<String, Vec<Digest>>>,
    downloaded: AtomicU64,
}

impl Shared {
    /// Bytes held and in all of the blobs of `references`, each blob counted once
    /// however many of them share it.
    fn progress<'a>(&self, references: impl Iterator<Item = &'a String>) -> (u64, u64) {
        let images = self.images.lock().unwrap_or_else(|p| p.into_inner());
        let blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::new();
        let (mut done, mut total) = (0, 0);
        for d in references.flat_map(|r| images.get(r).into_iter().flatten()) {
            if seen.insert(*d) {
                if let Some((size, held)) = blobs.get(d) {
                    total += size;
                    done += held.load(Ordering::Relaxed).min(*size);
                }
            }
        }
        (done, total)
    }

    /// The counter of the bytes of `d` the cache holds.
    fn held(&self, d: &Digest) -> Option<Arc<AtomicU64>> {
        let blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        blobs.get(d).map(|b| b.1.clone())
    }
}

impl Shared {
    fn fail(
        &self,
        want: &Want,
        reason: Reason,
        message: String,
        earlier: &BTreeMap<String, Failure>,
    ) {
        let since = earlier
            .get(&want.reference)
            .filter(|f| f.reason == reason)
            .map_or_else(unix_now, |f| f.since);
        let mut b = self.board.lock().unwrap_or_else(|p| p.into_inner());
        b.failures.insert(
            want.reference.clone(),
            Failure {
                reason,
                message,
                since,
                sets: want.sets.clone(),
            },
        );
    }
}

/// Who hears what a fetch does, as it does it.
pub struct Hooks<'a> {
    /// The board, about once a second.
    pub board: &'a (dyn Fn(&Board) + Send + Sync),
    /// An image the cache now holds whole (its reference as wanted), as soon as it does:
    /// it can be copied into the store while the rest is still coming.
    pub image: &'a (dyn Fn(&str) + Send + Sync),
}

/// Fetches `wants` into the cache of the node at `paths`. `earlier` are the failures of
/// the previous round (so `since` says how long an image has been failing); `hooks`
/// hear of progress and of each image complete.
pub async fn fetch(
    paths: &HostPaths,
    settings: &Settings,
    wants: &[Want],
    opts: &Options,
    earlier: &BTreeMap<String, Failure>,
    cancel: &Cancel,
    hooks: &Hooks<'_>,
) -> Outcome {
    let on_board = hooks.board;
    let mut out = Outcome::default();
    if wants.is_empty() {
        return out;
    }
    let wait = settings.fetch.wait_minutes(minute_now());
    if wait > 0 && !opts.ignore_windows {
        out.waiting_minutes = Some(wait);
        let mut b = Board {
            pid: std::process::id(),
            active: false,
            ..Default::default()
        };
        for w in wants {
            for s in &w.sets {
                b.sets.entry(s.clone()).or_default().waiting = Some(format!(
                    "outside the fetch windows ({}); the next opens in {} min",
                    settings
                        .fetch
                        .windows
                        .iter()
                        .map(|w| w.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    wait
                ));
            }
        }
        b.write(paths);
        on_board(&b);
        return out;
    }
    let shared = Arc::new(Shared {
        board: Mutex::new(Board {
            pid: std::process::id(),
            active: true,
            ..Default::default()
        }),
        blobs: Default::default(),
        images: Default::default(),
        downloaded: AtomicU64::new(0),
    });
    let work = run(
        paths,
        settings,
        wants,
        opts,
        earlier,
        cancel,
        &shared,
        hooks.image,
    );
    let started = Instant::now();
    let publish = |final_: bool| {
        let mut b = shared
            .board
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        b.active = !final_;
        let rate = shared.downloaded.load(Ordering::Relaxed) as f64
            / started.elapsed().as_secs_f64().max(0.001);
        let mut by_set: BTreeMap<&String, Vec<&String>> = BTreeMap::new();
        for w in wants {
            for s in &w.sets {
                by_set.entry(s).or_default().push(&w.reference);
            }
        }
        for (set, references) in by_set {
            let (done, total) = shared.progress(references.into_iter());
            let p = b.sets.entry(set.clone()).or_default();
            p.done = done;
            p.total = total;
        }
        for p in b.sets.values_mut() {
            p.eta = (rate > 1.0 && p.total > p.done)
                .then(|| ((p.total - p.done) as f64 / rate).ceil() as u64);
        }
        b
    };
    tokio::pin!(work);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick() => {
                let b = publish(false);
                b.write(paths);
                on_board(&b);
            }
        }
    };
    let b = publish(true);
    b.write(paths);
    on_board(&b);
    out.failures = b.failures.clone();
    (out.fetched, out.transfer_ms) = result;
    out.total = shared.progress(wants.iter().map(|w| &w.reference)).1;
    out.downloaded = shared.downloaded.load(Ordering::Relaxed);
    out.elapsed_ms = started.elapsed().as_millis() as u64;
    out
}

/// Resolves, checks and fetches; failures go to the board, and `on_image` hears of each
/// image once the cache holds it whole.
#[allow(clippy::too_many_arguments)]
async fn run(
    paths: &HostPaths,
    settings: &Settings,
    wants: &[Want],
    opts: &Options,
    earlier: &BTreeMap<String, Failure>,
    cancel: &Cancel,
    shared: &Shared,
    on_image: &(dyn Fn(&str) + Send + Sync),
) -> (Vec<String>, u64) {
    let mut fetched = Vec::new();
    let cache = Cache::new(paths.cache_dir());
    let fail_all = |reason: Reason, msg: String| {
        for w in wants {
            shared.fail(w, reason, msg.clone(), earlier);
        }
    };
    let conf = match RegistriesConf::load(paths) {
        Ok(c) => c,
        Err(e) => {
            fail_all(Reason::Failed, format!("{e:#}"));
            return (fetched, 0);
        }
    };
    let client = match Client::new(paths, Retry::default()) {
        Ok(c) => c.with_max_rate(settings.fetch.max_rate),
        Err(e) => {
            fail_all(Reason::Failed, format!("{e:#}"));
            return (fetched, 0);
        }
    };
    let policy = Policy::load(paths);
    let index = cache.index().unwrap_or_default();

    // Manifests first: nothing else is fetched before the disk check.
    let jobs = settings.fetch.jobs.max(1);
    let resolved: Vec<(Want, Result<Resolved>)> = futures_util::stream::iter(wants.iter().cloned())
        .map(|w| {
            let (client, conf, policy, index) = (&client, &conf, &policy, &index);
            async move {
                if let Err(why) = policy.check(&w.reference) {
                    return (w, Err(anyhow::Error::msg(why).context(PolicyRefusal)));
                }
                // A tag the cache already resolved stays what it was.
                let reference = match index
                    .iter()
                    .find(|e| e.name() == Some(w.reference.as_str()))
                {
                    Some(e) => format!("{}@{}", repository_of(&w.reference), e.digest),
                    None => w.reference.clone(),
                };
                let r = resolve(client, conf, &reference, &client.retry()).await;
                (w, r)
            }
        })
        .buffer_unordered(jobs)
        .collect()
        .await;
    let mut images = Vec::new();
    for (w, r) in resolved {
        match r {
            Ok(r) => images.push((w, r)),
            Err(e) => {
                let reason = if e.downcast_ref::<PolicyRefusal>().is_some() {
                    Reason::PolicyRefused
                } else {
                    Reason::of(&e)
                };
                tracing::warn!("{}: {e:#}", w.reference);
                shared.fail(&w, reason, format!("{e:#}"), earlier);
            }
        }
    }
    if images.is_empty() {
        return (fetched, 0);
    }

    // The disk: the blobs the cache lacks, once each, on the cache's filesystem; the
    // store's side as OpenShift estimates a pull, twice the compressed size.
    let mut need_cache = 0u64;
    let mut need_store = 0u64;
    let mut seen = HashSet::new();
    for (w, r) in &images {
        shared
            .images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(w.reference.clone(), r.blobs.iter().map(|b| b.0).collect());
        for (d, size) in &r.blobs {
            if seen.insert(*d) {
                if cache.has(d).is_none() {
                    need_cache += size.saturating_sub(cache.partial_len(d));
                }
                need_store += size.saturating_mul(2);
            }
        }
        need_cache += r.documents_len();
    }
    let store_root = crate::store::Store::new(paths, settings).root;
    let space = check_space(
        &[
            SpaceNeed {
                path: cache.root().to_path_buf(),
                bytes: need_cache,
            },
            SpaceNeed {
                path: store_root,
                bytes: need_store,
            },
        ],
        settings.store.min_free_space,
        Path::new("the images to fetch"),
    );
    if let Err(e) = space {
        let msg = format!(
            "{e:#} (the cache needs {} for blobs it lacks; the store about {}, twice their compressed size)",
            human_size(need_cache),
            human_size(need_store)
        );
        tracing::error!("not fetching: {msg}");
        for (w, _) in &images {
            shared.fail(w, Reason::NoSpace, msg.clone(), earlier);
        }
        return (fetched, 0);
    }

    // Named in the cache before their blobs come, so nothing collects the partials.
    for (w, r) in &images {
        let mut names = vec![format!("{}@{}", repository_of(&w.reference), r.digest)];
        if !names.contains(&w.reference) {
            names.push(w.reference.clone());
        }
        if let Err(e) = r.name_in(&cache, &names) {
            shared.fail(w, Reason::Failed, format!("{e:#}"), earlier);
        }
        // What the cache holds already counts as done.
        let mut blobs = shared.blobs.lock().unwrap_or_else(|p| p.into_inner());
        for (d, size) in &r.blobs {
            blobs.entry(*d).or_insert_with(|| {
                let have = match cache.has(d) {
                    Some(_) => *size,
                    None => cache.partial_len(d).min(*size),
                };
                (*size, Arc::new(AtomicU64::new(have)))
            });
        }
    }

    // Each blob once, from the source of the first image that names it, in the order
    // that makes images whole soonest, so they are copied into the store while the rest
    // come.
    let order = fetch_order(&images, |d| cache.has(d).is_some());
    let mut blobs: Vec<(Digest, u64, usize)> = Vec::new();
    let mut users: HashMap<Digest, Vec<usize>> = HashMap::new();
    for &i in &order {
        for (d, size) in &images[i].1.blobs {
            let u = users.entry(*d).or_default();
            if u.is_empty() {
                blobs.push((*d, *size, i));
            }
            u.push(i);
        }
    }
    // Blobs each image still waits for; it is whole when none is left. An image is
    // settled once whole or failed.
    let mut waiting: Vec<u64> = images.iter().map(|(_, r)| r.blobs.len() as u64).collect();
    let mut settled = vec![false; images.len()];
    let mut failed: HashMap<usize, (Reason, String)> = HashMap::new();
    // A blob starts only for one of the first `jobs` images not settled yet: a large
    // layer many images wait for then has the link nearly to itself, instead of sharing
    // it with a crowd of later, small blobs that cannot make an image whole before it.
    let in_window = |settled: &[bool], i: usize| {
        order
            .iter()
            .take_while(|j| **j != i)
            .filter(|j| !settled[**j])
            .count()
            < jobs
    };
    let transfer = Instant::now();
    let mut queue = blobs.into_iter().peekable();
    let mut large_running = 0usize;
    let mut running = futures_util::stream::FuturesUnordered::new();
    loop {
        while running.len() < jobs && !cancel.is_cancelled() {
            let Some(&(_, _, i)) = queue.peek() else {
                break;
            };
            if !running.is_empty() && !in_window(&settled, i) {
                break;
            }
            // One large blob at a time: two would each take half the link, and the
            // images waiting for the first would be whole later.
            if queue.peek().is_some_and(|b| b.1 > LARGE_BLOB) && large_running > 0 {
                break;
            }
            // A window that closes lets what is in flight finish and starts nothing.
            if !opts.ignore_windows && settings.fetch.wait_minutes(minute_now()) > 0 {
                queue = Vec::new().into_iter().peekable();
                break;
            }
            let Some((d, size, i)) = queue.next() else {
                break;
            };
            let (client, cache, images) = (&client, &cache, &images);
            if size > LARGE_BLOB {
                large_running += 1;
            }
            running.push(async move {
                if cache.has(&d) == Some(size) {
                    return (d, size, Ok(()));
                }
                let held = shared.held(&d);
                let on_bytes = |n: u64| {
                    shared.downloaded.fetch_add(n, Ordering::Relaxed);
                    if let Some(h) = &held {
                        h.fetch_add(n, Ordering::Relaxed);
                    }
                };
                let res = client
                    .fetch_blob_reporting(&images[i].1.source, d, size, cache, &on_bytes)
                    .await;
                // What the cache holds now, whatever was started again on the way.
                if let Some(h) = &held {
                    let now = if res.is_ok() {
                        size
                    } else {
                        cache.partial_len(&d)
                    };
                    h.store(now.min(size), Ordering::Relaxed);
                }
                (d, size, res.map(|_| ()))
            });
        }
        let Some((d, size, res)) = running.next().await else {
            break;
        };
        if size > LARGE_BLOB {
            large_running -= 1;
        }
        match res {
            Ok(()) => {
                for &u in &users[&d] {
                    waiting[u] = waiting[u].saturating_sub(1);
                    if waiting[u] == 0 && !settled[u] {
                        settled[u] = true;
                        on_image(&images[u].0.reference);
                    }
                }
            }
            Err(e) => {
                for &u in &users[&d] {
                    settled[u] = true;
                    failed
                        .entry(u)
                        .or_insert_with(|| (Reason::of(&e), format!("{e:#}")));
                }
            }
        }
    }
    let transfer_ms = transfer.elapsed().as_millis() as u64;
    for (i, (w, r)) in images.iter().enumerate() {
        let whole = r.blobs.iter().all(|(d, s)| cache.has(d) == Some(*s));
        if whole {
            fetched.push(w.reference.clone());
            let mut b = shared.board.lock().unwrap_or_else(|p| p.into_inner());
            b.failures.remove(&w.reference);
            continue;
        }
        match failed.get(&i) {
            Some((reason, msg)) => {
                tracing::warn!("{}: {msg}", w.reference);
                shared.fail(w, *reason, msg.clone(), earlier);
            }
            None if cancel.is_cancelled() => {}
            None => shared.fail(
                w,
                Reason::Retrying,
                "the fetch window closed before it was complete".into(),
                earlier,
            ),
        }
    }
    (fetched, transfer_ms)
}

/// The order in which to fetch `images`. First, one after another, the image that brings
/// each layer several images share (a base layer), cheapest first: these take the store
/// longest to copy, so they come while the link still has the rest to bring. Then the
/// others, each time the one with the fewest bytes still to fetch, so each is whole as
/// soon as it can be. Blobs `have` says the cache holds cost nothing.
fn fetch_order(images: &[(Want, Resolved)], have: impl Fn(&Digest) -> bool) -> Vec<usize> {
    let mut users: HashMap<Digest, usize> = HashMap::new();
    for (_, r) in images {
        for (d, _) in &r.blobs {
            *users.entry(*d).or_default() += 1;
        }
    }
    let shared = |d: &Digest| users.get(d).is_some_and(|n| *n > 1) && !have(d);
    let mut coming: HashSet<Digest> = HashSet::new();
    let mut left: Vec<usize> = (0..images.len()).collect();
    let mut order = Vec::with_capacity(images.len());
    let mut bases_done = false;
    while !left.is_empty() {
        let cost = |i: usize| -> u64 {
            images[i]
                .1
                .blobs
                .iter()
                .filter(|(d, _)| !coming.contains(d) && !have(d))
                .map(|(_, s)| *s)
                .sum()
        };
        let brings_base = |i: usize| {
            images[i]
                .1
                .blobs
                .iter()
                .any(|(d, _)| shared(d) && !coming.contains(d))
        };
        let candidates: Vec<(usize, usize)> = left
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, i)| bases_done || brings_base(*i))
            .collect();
        if candidates.is_empty() {
            bases_done = true;
            continue;
        }
        let (at, _) = candidates
            .into_iter()
            .min_by_key(|(_, i)| (cost(*i), *i))
            .expect("not empty");
        let i = left.remove(at);
        coming.extend(images[i].1.blobs.iter().map(|(d, _)| *d));
        order.push(i);
    }
    order
}

/// Marks a refusal by the node's policy.
#[derive(Debug, thiserror::Error)]
#[error("refused by the node's policy")]
struct PolicyRefusal;

/// The manifest of `reference` from the first source registries.conf gives that serves
/// it (mirrors in order, then the registry unless it is blocked).
async fn resolve(
    client: &Client,
    conf: &RegistriesConf,
    reference: &str,
    retry: &Retry,
) -> Result<Resolved> {
    // Every source in turn, as containers/image goes through them; the whole list again
    // after a wait when what decided was worth another try (a cut, a busy registry).
    let mut attempt = 0;
    loop {
        attempt += 1;
        let e = match resolve_once(client, conf, reference).await {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        let transient = e
            .chain()
            .find_map(|c| c.downcast_ref::<FetchError>())
            .is_some_and(FetchError::retryable);
        if !transient || attempt >= retry.attempts {
            return Err(e);
        }
        let wait = retry.delay(attempt);
        tracing::warn!(
            "{reference}: {e:#}; trying again in {:.1} s",
            wait.as_secs_f64()
        );
        tokio::time::sleep(wait).await;
    }
}

async fn resolve_once(client: &Client, conf: &RegistriesConf, reference: &str) -> Result<Resolved> {
    let sources = conf.pull_sources(reference);
    if sources.is_empty() {
        anyhow::bail!(
            "{reference}: registries.conf blocks its registry and gives no mirror for it"
        );
    }
    let mut errors = Vec::new();
    let mut last = None;
    for src in &sources {
        match client.resolve(reference, src).await {
            Ok(r) => {
                if src.mirror {
                    tracing::info!("{reference}: from mirror {}", src.reference);
                }
                return Ok(r);
            }
            Err(e) => {
                tracing::debug!("{reference} from {}: {e:#}", src.reference);
                errors.push(format!("{}: {e:#}", src.reference));
                last = Some(e);
            }
        }
    }
    // The kind of the last error decides (the registry itself comes last); what the
    // sources before it said is kept in the message.
    let e = last.expect("a source was tried");
    errors.pop();
    Err(if errors.is_empty() {
        e
    } else {
        e.context(format!("after {}", errors.join("; ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::conf::PullSource;

    fn image(name: &str, blobs: &[(&str, u64)]) -> (Want, Resolved) {
        (
            Want {
                reference: name.to_string(),
                sets: BTreeSet::new(),
            },
            Resolved {
                source: PullSource {
                    reference: name.to_string(),
                    insecure: false,
                    mirror: false,
                },
                digest: Digest::of(name.as_bytes()),
                media_type: String::new(),
                manifest: vec![],
                list: None,
                blobs: blobs
                    .iter()
                    .map(|(b, s)| (Digest::of(b.as_bytes()), *s))
                    .collect(),
            },
        )
    }

    #[test]
    fn images_bringing_shared_layers_come_first_then_the_cheapest() {
        // Two bases, each shared by two images; one image of its own.
        let images = vec![
            image("a1", &[("base-a", 100), ("own-a1", 9)]),
            image("b1", &[("base-b", 80), ("own-b1", 7)]),
            image("a2", &[("base-a", 100), ("own-a2", 1)]),
            image("solo", &[("own-solo", 3)]),
            image("b2", &[("base-b", 80), ("own-b2", 2)]),
        ];
        let order = fetch_order(&images, |_| false);
        let names: Vec<&str> = order
            .iter()
            .map(|i| images[*i].0.reference.as_str())
            .collect();
        // b2 brings base-b most cheaply (82), then a2 base-a (101); then by bytes left.
        assert_eq!(names, ["b2", "a2", "solo", "b1", "a1"]);
        // A base the cache holds is no reason to come first.
        let have = Digest::of(b"base-b");
        let order = fetch_order(&images, |d| *d == have);
        let names: Vec<&str> = order
            .iter()
            .map(|i| images[*i].0.reference.as_str())
            .collect();
        assert_eq!(names, ["a2", "b2", "solo", "b1", "a1"]);
    }
}
