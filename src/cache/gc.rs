//! Garbage collection: which unreferenced blobs leave the cache, oldest first.
//!
//! A referenced blob is never evicted. The others go, least recently brought in first,
//! while the cache is larger than its cap or the filesystem under it has less free space
//! than the floor; partial blobs of nothing referenced go as well.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::Cache;
use crate::oci::digest::Digest;

/// The limits a collection keeps to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest the cache may be while unreferenced blobs remain.
    pub max_size: u64,
    /// Free bytes the filesystem must keep; unreferenced blobs go while it has less.
    pub min_free: u64,
}

/// What a collection did.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Collected {
    /// Blobs removed.
    pub evicted: usize,
    /// Bytes freed.
    pub freed: u64,
    /// Blobs kept because something references them.
    pub referenced: usize,
    /// Unreferenced blobs kept (within the limits).
    pub unreferenced: usize,
    /// Bytes the cache holds afterwards.
    pub bytes: u64,
}

/// Evicts unreferenced blobs, oldest first, until the cache is within `limits`.
/// `free` tells the free bytes of the cache's filesystem now.
pub fn collect(
    cache: &Cache,
    referenced: &HashSet<Digest>,
    limits: Limits,
    free: &dyn Fn(&Path) -> Option<u64>,
) -> Result<Collected> {
    let listing = cache.list()?;
    let mut out = Collected::default();
    let mut bytes = listing.bytes();
    // A partial of something nobody wants is only ever resumed by a writer that wants it.
    for (d, len) in &listing.partials {
        if !referenced.contains(d) && cache.has(d).is_none() && !cache.writing(d) {
            out.freed += cache.remove(d)?;
            bytes = bytes.saturating_sub(*len);
        }
    }
    let mut candidates: Vec<_> = listing
        .blobs
        .iter()
        .filter(|b| !referenced.contains(&b.digest))
        .collect();
    out.referenced = listing.blobs.len() - candidates.len();
    candidates.sort_by_key(|b| b.modified);
    let mut freed_since = 0u64;
    let start_free = free(cache.root());
    for b in candidates {
        let low_on_space = start_free.is_some_and(|f| f + freed_since < limits.min_free);
        if bytes <= limits.max_size && !low_on_space {
            out.unreferenced += 1;
            continue;
        }
        let n = cache.remove(&b.digest)?;
        tracing::info!(digest = %b.digest, "evicted from the cache ({n} bytes, referenced by nothing)");
        out.evicted += 1;
        out.freed += n;
        freed_since += n;
        bytes = bytes.saturating_sub(n);
    }
    cache.forget_missing()?;
    out.bytes = bytes;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::{Duration, SystemTime};

    fn put(c: &Cache, data: &[u8], age_secs: u64) -> Digest {
        let d = c.put_bytes(data).expect("put");
        let t = SystemTime::now() - Duration::from_secs(age_secs);
        fs::File::options()
            .write(true)
            .open(c.blob(&d))
            .and_then(|f| f.set_modified(t))
            .expect("set mtime");
        d
    }

    fn no_pressure(_: &Path) -> Option<u64> {
        Some(u64::MAX / 2)
    }

    #[test]
    fn referenced_blobs_stay_and_the_oldest_unreferenced_go_first() {
        let t = tempfile::tempdir().expect("tempdir");
        let c = Cache::new(t.path().join("c"));
        c.ensure().expect("ensure");
        let kept = put(&c, &[1u8; 1000], 500);
        let old = put(&c, &[2u8; 1000], 400);
        let newer = put(&c, &[3u8; 1000], 10);
        let refs: HashSet<Digest> = [kept].into();
        let r = collect(
            &c,
            &refs,
            Limits {
                max_size: 2000,
                min_free: 0,
            },
            &no_pressure,
        )
        .expect("gc");
        assert_eq!(r.evicted, 1);
        assert!(c.has(&kept).is_some(), "a referenced blob was evicted");
        assert!(c.has(&old).is_none(), "the oldest unreferenced blob stayed");
        assert!(c.has(&newer).is_some(), "evicted beyond the cap");
        assert_eq!(r.bytes, 2000);
    }

    #[test]
    fn a_cap_of_zero_leaves_only_what_is_referenced() {
        let t = tempfile::tempdir().expect("tempdir");
        let c = Cache::new(t.path().join("c"));
        c.ensure().expect("ensure");
        let kept = put(&c, b"kept", 1);
        for i in 0..5u8 {
            put(&c, &[i; 10], 1);
        }
        let limits = Limits {
            max_size: 0,
            min_free: 0,
        };
        let r = collect(&c, &[kept].into(), limits, &no_pressure).expect("gc");
        assert_eq!((r.evicted, r.referenced), (5, 1));
        assert_eq!(c.list().expect("list").blobs.len(), 1);
    }

    #[test]
    fn low_free_space_evicts_even_under_the_cap() {
        let t = tempfile::tempdir().expect("tempdir");
        let c = Cache::new(t.path().join("c"));
        c.ensure().expect("ensure");
        let a = put(&c, &[7u8; 100], 100);
        let b = put(&c, &[8u8; 100], 50);
        // 150 bytes free, 200 wanted: the older blob frees enough.
        let free = |_: &Path| Some(150u64);
        let limits = Limits {
            max_size: u64::MAX,
            min_free: 200,
        };
        let r = collect(&c, &HashSet::new(), limits, &free).expect("gc");
        assert_eq!(r.evicted, 1);
        assert!(c.has(&a).is_none() && c.has(&b).is_some());
    }

    #[test]
    fn partials_of_unreferenced_blobs_go() {
        let t = tempfile::tempdir().expect("tempdir");
        let c = Cache::new(t.path().join("c"));
        c.ensure().expect("ensure");
        let want = Digest::of(b"wanted later");
        let other = Digest::of(b"nobody");
        for d in [want, other] {
            let mut w = c.writer(d, 12).expect("writer");
            std::io::Write::write_all(&mut w, b"part").expect("write");
        }
        let limits = Limits {
            max_size: u64::MAX,
            min_free: 0,
        };
        collect(&c, &[want].into(), limits, &no_pressure).expect("gc");
        assert_eq!(c.list().expect("list").partials, vec![(want, 4)]);
    }
}
