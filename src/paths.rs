//! Every host path longshore touches, taken under `--sysroot` when one is given.
//!
//! A node never passes `--sysroot`; tests and the demo do, so that a whole node's worth of
//! configuration, state and container storage lives in one directory.

use std::path::{Path, PathBuf};

/// The host paths, resolved once at start.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// The directory every path below lives under (`/` on a node).
    pub sysroot: PathBuf,
    /// Configuration fragment directories, lowest precedence first.
    pub config_dirs: [PathBuf; 3],
    /// Persistent state: records, staging, the lock.
    pub state_dir: PathBuf,
    /// Runtime state: media mount points.
    pub run_dir: PathBuf,
    /// CRI-O's drop-in directory.
    pub crio_conf_dir: PathBuf,
}

impl HostPaths {
    /// Paths under `sysroot` (`/` for the host itself).
    pub fn new(sysroot: &Path) -> Self {
        let at = |p: &str| under(sysroot, p);
        HostPaths {
            sysroot: sysroot.to_path_buf(),
            config_dirs: [
                at("/usr/lib/longshore"),
                at("/run/longshore"),
                at("/etc/longshore"),
            ],
            state_dir: at("/var/lib/longshore"),
            run_dir: at("/run/longshore"),
            crio_conf_dir: at("/etc/crio/crio.conf.d"),
        }
    }

    /// `path` (absolute, as on a node) taken under the sysroot.
    pub fn host(&self, path: &Path) -> PathBuf {
        under(&self.sysroot, &path.to_string_lossy())
    }

    /// The path as the node sees it, for paths written into files other programs read
    /// (CRI-O's drop-ins): `path` with the sysroot taken off.
    pub fn on_node(&self, path: &Path) -> PathBuf {
        match path.strip_prefix(&self.sysroot) {
            Ok(rest) => Path::new("/").join(rest),
            Err(_) => path.to_path_buf(),
        }
    }

    /// Where bundles are verified into before their blobs move into the cache.
    pub fn staging_dir(&self) -> PathBuf {
        self.state_dir.join("staging")
    }

    /// The cache of original blobs (see [`crate::cache`]). It shares the state
    /// directory's filesystem with staging, so verified blobs move in by renaming.
    pub fn cache_dir(&self) -> PathBuf {
        self.state_dir.join("cache")
    }
}

fn under(root: &Path, absolute: &str) -> PathBuf {
    root.join(absolute.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_under_sysroot() {
        let p = HostPaths::new(Path::new("/tmp/node"));
        assert_eq!(p.state_dir, Path::new("/tmp/node/var/lib/longshore"));
        assert_eq!(p.config_dirs[2], Path::new("/tmp/node/etc/longshore"));
        assert_eq!(
            p.host(Path::new("/var/lib/containers/storage")),
            Path::new("/tmp/node/var/lib/containers/storage")
        );
        assert_eq!(
            p.on_node(Path::new("/tmp/node/var/lib/longshore/storage")),
            Path::new("/var/lib/longshore/storage")
        );
        let host = HostPaths::new(Path::new("/"));
        assert_eq!(
            host.on_node(Path::new("/var/lib/x")),
            Path::new("/var/lib/x")
        );
        assert_eq!(host.crio_conf_dir, Path::new("/etc/crio/crio.conf.d"));
    }
}
