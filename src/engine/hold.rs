//! Held bundles: verified and staged now, copied by `apply` later.

use super::*;

impl Engine {
    /// Copies a held bundle's images into the store.
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
        let staged = rec
            .staged
            .clone()
            .with_context(|| format!("bundle {} is held but has no staged copy", rec.name))?;
        // The staged copy is longshore's own, verified when it was made; it is checked
        // again before it is used.
        let verified = read::verify_dir(&staged, Some(rec.digest), &self.cancel, None)?;
        let mut plan = plan_from_meta(verified.digest, &verified.meta, rec.kind);
        let present = self.presence_of(&plan).await?;
        check_space(
            &[self.store_need(&plan, &present)],
            self.settings.store.min_free_space,
            &staged,
        )?;
        let retain = self
            .settings
            .retain_bundles
            .then(|| Retain::Move(staged.clone()));
        let report = self
            .commit(
                &rec.source,
                &mut plan,
                &present,
                Some(&staged),
                Some(verified.bytes_verified),
                retain,
            )
            .await?;
        if staged.exists() {
            remove_staging(&staged);
        }
        Ok(report)
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
