//! Verify a bundle without importing it.

use super::*;

/// Verifies a bundle without importing it. Foreign inputs are brought into a temporary
/// staging directory under `paths` to be checked (see [`crate::bundle::intake`]), and it
/// is removed again.
pub async fn verify(
    path: &Path,
    expected: Option<Digest>,
    settings: &Settings,
    paths: &HostPaths,
    cancel: &Cancel,
) -> Result<Vec<VerifyReport>> {
    let inputs = match bundle::detect(path)? {
        Input::Collection(dir, items) => items
            .into_iter()
            .map(|p| bundle::detect_in(&p, Some(&dir)))
            .collect::<Result<Vec<_>>>()?,
        one => vec![one],
    };
    one_input_for_digest(path, inputs.len(), expected)?;
    let mut out = Vec::new();
    for input in inputs {
        out.push(match input {
            Input::BundleDir(d) => {
                VerifyReport::from(&d, read::verify_dir(&d, expected, cancel, None)?)
            }
            Input::BundleStream(p) => {
                VerifyReport::from(&p, read::verify_stream(&p, None, expected, cancel, None)?)
            }
            Input::Foreign(f) => {
                // Where longshore's staging cannot be made (a user's machine, not root),
                // the system's temporary directory takes its place.
                let mut dir = paths.staging_dir();
                if let Err(e) = fs::create_dir_all(&dir) {
                    let tmp = std::env::temp_dir();
                    tracing::warn!(
                        "creating {}: {e}; unpacking into {} to verify",
                        dir.display(),
                        tmp.display()
                    );
                    dir = tmp;
                }
                let n = STAGING_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let tmp = dir.join(format!(".verify-{}-{n}", std::process::id()));
                let res = Layout::create(&tmp, settings.store.min_free_space)
                    .and_then(|l| intake::stage_foreign(&f, &l, settings.pin_foreign, cancel));
                let _ = fs::remove_dir_all(&tmp);
                let staged = res?;
                check_expected(&f.path, &staged.digest, expected)?;
                VerifyReport {
                    path: f.path.clone(),
                    digest: staged.digest,
                    name: staged.meta.name,
                    images: staged.meta.images.len(),
                    bytes_verified: staged.bytes_read,
                }
            }
            Input::Collection(d, _) => {
                bail!("{}: nested collections are not verified", d.display())
            }
        });
    }
    Ok(out)
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// The input.
    pub path: PathBuf,
    /// Its digest.
    pub digest: Digest,
    /// Its name.
    pub name: String,
    /// Number of images.
    pub images: usize,
    /// Bytes hashed.
    pub bytes_verified: u64,
}

impl VerifyReport {
    fn from(path: &Path, v: Verified) -> VerifyReport {
        VerifyReport {
            path: path.to_path_buf(),
            digest: v.digest,
            name: v.meta.name,
            images: v.meta.images.len(),
            bytes_verified: v.bytes_verified,
        }
    }
}
