//! What a killed longshore left behind, removed.

use super::*;

/// Removes what a longshore killed at any point left behind (called with the state lock
/// held, so no other import is using any of it): half-made staging directories, staged
/// bundles no held record names, temporary state files, skopeo's temporary files.
pub(super) fn sweep(paths: &HostPaths, state: &State) {
    let held: HashSet<PathBuf> = state
        .bundles
        .values()
        .filter_map(|b| b.staged.clone())
        .collect();
    let alive = |pid: &str| {
        pid.parse::<i32>()
            .is_ok_and(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok())
    };
    let remove = |p: &Path| {
        let res = if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(p)
        } else {
            fs::remove_file(p)
        };
        match res {
            Ok(()) => tracing::info!("removed {}, left by an interrupted run", p.display()),
            Err(e) => tracing::warn!("removing {}: {e}", p.display()),
        }
    };
    let entries = |d: &Path| -> Vec<(String, PathBuf)> {
        fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (name, p) in entries(&paths.staging_dir()) {
        let stale = if let Some(rest) = name.strip_prefix(".verify-") {
            // `longshore verify` takes no lock; its directory goes once it is gone.
            !alive(rest.split('-').next().unwrap_or(""))
        } else {
            name.starts_with(".tmp-") || !held.contains(&p)
        };
        if stale {
            remove(&p);
        }
    }
    for (name, p) in entries(&paths.state_dir) {
        if name.starts_with(".state.json.tmp") {
            remove(&p);
        }
    }
    for (name, p) in entries(&paths.state_dir.join("bundles")) {
        if name.starts_with(".tmp-") {
            remove(&p);
        }
    }
    // The cache's own temporary files (its index being rewritten); partial blobs stay,
    // to be resumed, until collection finds nothing wants them.
    for (name, p) in entries(&paths.cache_dir()) {
        if name.starts_with('.') && name.contains(".tmp") {
            remove(&p);
        }
    }
    for (_, p) in entries(&paths.state_dir.join("tmp")) {
        remove(&p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BundleRecord, BundleState};

    #[test]
    fn what_a_killed_run_left_goes_and_what_is_in_use_stays() {
        let t = tempfile::tempdir().expect("tempdir");
        let paths = HostPaths::new(t.path());
        let staging = paths.staging_dir();
        let cache = paths.cache_dir();
        let d = |p: &Path| fs::create_dir_all(p).expect("mkdir");
        let f = |p: &Path| {
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(p, b"x").expect("write");
        };
        let held = staging.join("ab".repeat(32));
        let orphan = staging.join("cd".repeat(32));
        let live_verify = staging.join(format!(".verify-{}-0", std::process::id()));
        // No process has a pid this large (pid_max is at most 2^22).
        let dead_verify = staging.join(".verify-99999999-0");
        let gone = [
            staging.join(".tmp-1-0"),
            orphan.clone(),
            dead_verify,
            paths.state_dir.join(".state.json.tmp42"),
            paths.state_dir.join("tmp/storage1234"),
            cache.join(".index.json.tmp7"),
            paths.state_dir.join("bundles/.tmp-3"),
        ];
        for p in [&held, &live_verify, &gone[0], &gone[1], &gone[2], &gone[4]] {
            d(p);
        }
        for p in [&gone[3], &gone[5], &gone[6]] {
            f(p);
        }
        let partial = cache
            .join("blobs/sha256")
            .join(format!("{}.partial", "ef".repeat(32)));
        f(&partial);
        f(&cache.join("index.json"));
        let mut state = State::default();
        let digest = Digest::of(b"held");
        state.bundles.insert(
            digest,
            BundleRecord {
                staged: Some(held.clone()),
                ..BundleRecord::for_test(digest, "held", BundleState::Held)
            },
        );
        sweep(&paths, &state);
        for p in &gone {
            assert!(!p.exists(), "{} left", p.display());
        }
        for p in [&held, &live_verify, &partial, &cache.join("index.json")] {
            assert!(p.exists(), "{} removed", p.display());
        }
    }
}
