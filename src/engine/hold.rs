//! Held bundles: verified into the cache now, copied into the store by `apply` later.

use super::*;

impl Engine {
    /// Copies a held bundle's images from the cache into the store.
    pub async fn apply(&mut self, which: &str) -> Result<ImportReport> {
        sets::load_files(&self.paths)?;
        let rec = self.find_bundle(which)?.clone();
        if rec.state != BundleState::Held {
            bail!(
                "bundle {} ({}) is not held: it is {:?}",
                rec.name,
                rec.digest,
                rec.state
            );
        }
        let report = self.import_from_cache(&rec.digest, false).await;
        self.collect_quietly();
        report
    }
    pub(super) fn find_bundle(&self, which: &str) -> Result<&BundleRecord> {
        let matches: Vec<&BundleRecord> = self
            .state
            .bundles
            .values()
            .filter(|b| {
                b.name == which
                    || b.digest.to_string() == which
                    || b.digest
                        .hex()
                        .starts_with(which.trim_start_matches("sha256:"))
                        && which.len() >= 12
            })
            .collect();
        match matches.as_slice() {
            [one] => Ok(one),
            [] => Err(crate::error::NotFound(format!(
                "no bundle named {which:?} is known; `longshore status` lists them"
            ))
            .into()),
            _ => bail!("{which:?} names {} bundles; give the digest", matches.len()),
        }
    }
}
