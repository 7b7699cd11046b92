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
