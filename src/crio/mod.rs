//! CRI-O's configuration: the drop-in that pins images, and the one that adds
//! longshore's store as an additional image store; [`control`] reloads CRI-O when they
//! change.
//!
//! Facts this rests on (cri-o/cri-o):
//! - pkg/config/config.go, `UpdateFromPath`: every file below `/etc/crio/crio.conf.d`
//!   is parsed as TOML, whatever its name (dot-files and subdirectories included), in
//!   lexical walk order, after `/etc/crio/crio.conf`; a list such as `pinned_images` set
//!   by a later file replaces the earlier list, while `storage_option` is appended.
//!   So the pin file sorts last, carries the pins of the files before it, and is
//!   written elsewhere and renamed in, never left half-written in the directory.
//! - pkg/config/reload.go, `Reload`: SIGHUP re-reads the files and `pinned_images`;
//!   `storage_option` only takes effect when CRI-O restarts.
//! - internal/storage/image.go, `FilterPinnedImage`: pins are matched against the names
//!   images are stored under.

pub mod control;
pub mod mirrors;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The pin drop-in's file name; `99-` and `longshore` make it sort after OpenShift's
/// `50-pinned-images` and most others.
pub const PIN_FILE: &str = "99-longshore-pinned-images.conf";
/// The drop-in that adds longshore's store as an additional image store.
pub const STORE_FILE: &str = "99-longshore-storage.conf";

/// Largest CRI-O configuration file read.
const MAX_CRIO_FILE: u64 = 16 << 20;

/// CRI-O's configuration files on this host.
#[derive(Debug, Clone)]
pub struct CrioConfig {
    /// `/etc/crio/crio.conf`.
    pub main: PathBuf,
    /// `/etc/crio/crio.conf.d`.
    pub dropins: PathBuf,
}

/// The `pinned_images` other files set.
#[derive(Debug, Default, Clone)]
pub struct OtherPins {
    /// Pins of `crio.conf` and of every drop-in read before the pin file.
    pub before: BTreeSet<String>,
    /// Drop-ins read after the pin file that set `pinned_images`, replacing its list.
    pub overriding: Vec<PathBuf>,
    /// Files that pin a bare `*`, which panics CRI-O (never carried into the pin file).
    pub wildcard: Vec<PathBuf>,
}

/// What a sync did to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileChange {
    /// The file already said this.
    Unchanged,
    /// The file was written.
    Written,
    /// The file was removed.
    Removed,
}

impl FileChange {
    /// Whether CRI-O must be told.
    pub fn changed(self) -> bool {
        self != FileChange::Unchanged
    }
}

impl CrioConfig {
    /// Where the pin file lives.
    pub fn pin_file(&self) -> PathBuf {
        self.dropins.join(PIN_FILE)
    }

    /// The pins the other configuration files set. A file that does not parse is an error:
    /// without its pins, the union would drop them.
    pub fn other_pins(&self) -> Result<OtherPins> {
        let mut out = OtherPins::default();
        if self.main.exists() {
            let pins = pins_of(&self.main)?.unwrap_or_default();
            if pins.iter().any(|p| p == "*") {
                out.wildcard.push(self.main.clone());
            }
            out.before.extend(pins);
        }
        let mut files = Vec::new();
        walk_sorted(&self.dropins, &mut files)?;
        let ours = self.pin_file();
        let mut after = false;
        for f in files {
            if f == ours {
                after = true;
                continue;
            }
            let Some(pins) = pins_of(&f)? else { continue };
            if pins.iter().any(|p| p == "*") {
                out.wildcard.push(f.clone());
            }
            if after || walk_key(&self.dropins, &f) > walk_key(&self.dropins, &ours) {
                out.overriding.push(f);
            } else {
                out.before.extend(pins);
            }
        }
        Ok(out)
    }

    /// Makes the pin file hold exactly `pins` (sorted, each once), writing only when its
    /// content changes; with no pins, the file is removed.
    pub fn write_pins(&self, pins: &BTreeSet<String>) -> Result<FileChange> {
        let path = self.pin_file();
        anyhow::ensure!(
            !pins.contains("*"),
            "refusing to pin \"*\": CRI-O panics on it"
        );
        if pins.is_empty() {
            return remove_if_present(&path);
        }
        write_if_changed(&path, &render_pins(pins))
    }

    /// Makes the store drop-in name `store` as an additional image store, or removes it.
    pub fn write_store(&self, store: Option<&Path>) -> Result<FileChange> {
        let path = self.dropins.join(STORE_FILE);
        match store {
            None => remove_if_present(&path),
            Some(root) => write_if_changed(&path, &render_store(root)),
        }
    }
}

/// The pin file's text.
pub fn render_pins(pins: &BTreeSet<String>) -> String {
    let mut s = String::from(
        "# Written by longshore; edits are overwritten.\n\
         # The images of complete, pinned image sets (`longshore sets`), and the pins of\n\
         # /etc/crio/crio.conf and of the drop-ins before this one, whose lists this one\n\
         # would otherwise replace.\n\
         [crio.image]\npinned_images = [\n",
    );
    for p in pins {
        s.push_str("  ");
        s.push_str(&toml::Value::String(p.clone()).to_string());
        s.push_str(",\n");
    }
    s.push_str("]\n");
    s
}

fn render_store(root: &Path) -> String {
    // CRI-O appends storage_option across files (see the module comment), so this file
    // only adds its own option.
    format!(
        "# Written by longshore: images imported by longshore live in {root}, which\n\
         # CRI-O reads as an additional, read-only image store. Takes effect when CRI-O\n\
         # restarts.\n\
         [crio]\nstorage_option = [\n  {opt},\n]\n",
        root = root.display(),
        opt = toml::Value::String(format!("overlay.imagestore={}", root.display()))
    )
}

/// The `crio.image.pinned_images` of a CRI-O configuration file, if it sets them.
fn pins_of(path: &Path) -> Result<Option<Vec<String>>> {
    let text = crate::config::read_text(path, MAX_CRIO_FILE)
        .with_context(|| format!("reading CRI-O configuration {}", path.display()))?;
    let v: toml::Table = text
        .parse()
        .with_context(|| format!("CRI-O configuration {} is not valid TOML", path.display()))?;
    let Some(list) = v
        .get("crio")
        .and_then(|c| c.get("image"))
        .and_then(|i| i.get("pinned_images"))
    else {
        return Ok(None);
    };
    let arr = list
        .as_array()
        .with_context(|| format!("{}: crio.image.pinned_images is not a list", path.display()))?;
    arr.iter()
        .map(|p| {
            p.as_str().map(str::to_string).with_context(|| {
                format!(
                    "{}: crio.image.pinned_images holds a non-string",
                    path.display()
                )
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Files below `dir` in the order Go's `filepath.Walk` visits them: names sorted at each
/// level, a directory's content right where its name sorts.
fn walk_sorted(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("reading {}", dir.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let ft = e
            .file_type()
            .with_context(|| format!("reading {}", p.display()))?;
        if ft.is_dir() {
            walk_sorted(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn walk_key(root: &Path, p: &Path) -> Vec<std::ffi::OsString> {
    p.strip_prefix(root)
        .unwrap_or(p)
        .components()
        .map(|c| c.as_os_str().to_os_string())
        .collect()
}

pub(crate) fn remove_if_present(path: &Path) -> Result<FileChange> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(path)?;
            Ok(FileChange::Removed)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileChange::Unchanged),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Writes `text` to `path` unless it already holds it. The new content is written to a
/// temporary file in the parent of CRI-O's directory (which CRI-O does not read), synced,
/// then renamed over the old file, and the directory is synced: CRI-O's directory holds
/// the old file or the new one, whole, at every instant.
pub(crate) fn write_if_changed(path: &Path, text: &str) -> Result<FileChange> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(FileChange::Unchanged);
    }
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    let outside = dir
        .parent()
        .with_context(|| format!("{} has no parent", dir.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    remove_stale_temps(outside, &name);
    let tmp = outside.join(format!(".{name}.longshore-tmp{}", std::process::id()));
    let res = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(f);
        crate::cancel::fault_point("before-rename");
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        sync_dir(path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map(|()| FileChange::Written)
}

/// Temporary files a killed longshore left beside CRI-O's directory.
fn remove_stale_temps(outside: &Path, name: &str) {
    let prefix = format!(".{name}.longshore-tmp");
    if let Ok(rd) = fs::read_dir(outside) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, CrioConfig) {
        let t = tempfile::tempdir().unwrap();
        let c = CrioConfig {
            main: t.path().join("crio.conf"),
            dropins: t.path().join("crio.conf.d"),
        };
        fs::create_dir_all(&c.dropins).unwrap();
        (t, c)
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn other_pins_before_and_after() {
        let (_t, c) = setup();
        fs::write(&c.main, "[crio.image]\npinned_images = [\"main/a:1\"]\n").unwrap();
        fs::write(
            c.dropins.join("50-pinned-images"),
            "[crio.image]\npinned_images = [\"mco/b@sha256:1\"]\n",
        )
        .unwrap();
        fs::write(
            c.dropins.join("10-other.conf"),
            "[crio.runtime]\nlog_level = \"info\"\n",
        )
        .unwrap();
        fs::create_dir_all(c.dropins.join("20-sub")).unwrap();
        fs::write(
            c.dropins.join("20-sub/x.conf"),
            "[crio.image]\npinned_images = [\"sub/c:*\"]\n",
        )
        .unwrap();
        fs::write(
            c.dropins.join("99-zzz.conf"),
            "[crio.image]\npinned_images = []\n",
        )
        .unwrap();
        let o = c.other_pins().unwrap();
        assert_eq!(o.before, set(&["main/a:1", "mco/b@sha256:1", "sub/c:*"]));
        assert_eq!(o.overriding, vec![c.dropins.join("99-zzz.conf")]);
    }

    #[test]
    fn unparsable_file_is_an_error_naming_it() {
        let (_t, c) = setup();
        fs::write(c.dropins.join("50-broken.conf"), "[crio.image\n").unwrap();
        let msg = format!("{:#}", c.other_pins().unwrap_err());
        assert!(msg.contains("50-broken.conf"), "{msg}");
    }

    #[test]
    fn written_only_on_change_and_removed_when_empty() {
        let (t, c) = setup();
        let pins = set(&["b/y@sha256:2", "a/x:1"]);
        assert_eq!(c.write_pins(&pins).unwrap(), FileChange::Written);
        assert_eq!(c.write_pins(&pins).unwrap(), FileChange::Unchanged);
        let text = fs::read_to_string(c.pin_file()).unwrap();
        let v: toml::Table = text.parse().unwrap();
        let listed: Vec<&str> = v["crio"]["image"]["pinned_images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(listed, vec!["a/x:1", "b/y@sha256:2"]);
        assert_eq!(c.write_pins(&BTreeSet::new()).unwrap(), FileChange::Removed);
        assert!(!c.pin_file().exists());
        assert_eq!(
            c.write_pins(&BTreeSet::new()).unwrap(),
            FileChange::Unchanged
        );
        // Nothing was left beside CRI-O's directory.
        let stray: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("tmp"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }

    #[test]
    fn store_dropin() {
        let (_t, c) = setup();
        let root = Path::new("/var/lib/longshore/storage");
        assert_eq!(c.write_store(Some(root)).unwrap(), FileChange::Written);
        let v: toml::Table = fs::read_to_string(c.dropins.join(STORE_FILE))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            v["crio"]["storage_option"][0].as_str(),
            Some("overlay.imagestore=/var/lib/longshore/storage")
        );
        assert_eq!(c.write_store(Some(root)).unwrap(), FileChange::Unchanged);
        assert_eq!(c.write_store(None).unwrap(), FileChange::Removed);
    }
}
