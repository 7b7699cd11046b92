//! Opening files whose names and content come from strangers: bundle directories and
//! image layouts on media, configuration that may point anywhere.
//!
//! Inside an input, nothing is followed: every path is opened relative to the input's
//! directory with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so neither a symbolic
//! link (of any component) nor `..` leads outside, and a directory swapped for a link
//! after it was looked at is refused rather than followed. Files are opened with
//! `O_NONBLOCK`, so a FIFO never blocks, and only regular files are read, never more
//! than their caller's limit.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

use crate::bundle::Rejected;

/// A directory whose content is not trusted, held open so it cannot be switched.
#[derive(Debug)]
pub struct Tree {
    path: PathBuf,
    fd: OwnedFd,
}

fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

impl Tree {
    /// Opens the directory at `path` (named by whoever runs longshore, so a link in the
    /// path itself is theirs to make).
    pub fn open(path: &Path) -> Result<Tree> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening directory {}", path.display()))?;
        Ok(Tree {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// The directory's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` below the directory, for messages.
    pub fn shown(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Opens the subdirectory `rel`, refusing links.
    pub fn dir(&self, rel: &str) -> Result<Tree> {
        let fd = rustix::fs::openat2(
            &self.fd,
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            resolve(),
        )
        .map_err(|e| self.refusal(rel, e, "a directory"))?;
        Ok(Tree {
            path: self.path.join(rel),
            fd,
        })
    }

    /// What `rel` is, without following a link; `None` when it does not exist.
    pub fn kind(&self, rel: &str) -> Result<Option<FileType>> {
        match rustix::fs::openat2(
            &self.fd,
            rel,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            resolve(),
        ) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd)
                    .with_context(|| format!("reading {}", self.shown(rel).display()))?;
                Ok(Some(FileType::from_raw_mode(st.st_mode)))
            }
            Err(rustix::io::Errno::NOENT) => Ok(None),
            // A link somewhere in the path: it is there, and it is not a plain file.
            Err(rustix::io::Errno::XDEV) | Err(rustix::io::Errno::LOOP) => {
                Ok(Some(FileType::Symlink))
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", self.shown(rel).display())),
        }
    }

    /// Whether `rel` is a regular file (not a link to one).
    pub fn is_file(&self, rel: &str) -> bool {
        matches!(self.kind(rel), Ok(Some(FileType::RegularFile)))
    }

    /// Opens the regular file `rel` for reading, with its length.
    pub fn file(&self, rel: &str) -> Result<(File, u64)> {
        let fd = rustix::fs::openat2(
            &self.fd,
            rel,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve(),
        )
        .map_err(|e| self.refusal(rel, e, "a regular file"))?;
        let st = rustix::fs::fstat(&fd)
            .with_context(|| format!("reading {}", self.shown(rel).display()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(Rejected::new(&self.shown(rel), "is not a regular file").into());
        }
        Ok((File::from(fd), st.st_size as u64))
    }

    /// Reads the regular file `rel` whole, refusing it above `limit` bytes.
    pub fn read(&self, rel: &str, limit: u64) -> Result<Vec<u8>> {
        let (f, len) = self.file(rel)?;
        read_bounded(f, len, limit, &self.shown(rel))
    }

    /// The names in this directory and what each is (links are reported as links).
    pub fn list(&self) -> Result<Vec<(String, FileType)>> {
        let dir = rustix::fs::Dir::read_from(&self.fd)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let mut out = Vec::new();
        for e in dir {
            let e = e.with_context(|| format!("reading {}", self.path.display()))?;
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let Ok(name) = std::str::from_utf8(name) else {
                return Err(Rejected::new(
                    &self.path,
                    format!("holds {}, whose name is not UTF-8", quote(name)),
                )
                .into());
            };
            let kind = match e.file_type() {
                FileType::Unknown => self.kind(name)?.unwrap_or(FileType::Unknown),
                k => k,
            };
            out.push((name.to_string(), kind));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn refusal(&self, rel: &str, e: rustix::io::Errno, what: &str) -> anyhow::Error {
        let shown = self.shown(rel);
        match e {
            rustix::io::Errno::NOENT => Rejected::new(&shown, "is missing").into(),
            rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => Rejected::new(
                &shown,
                format!("leads through a symbolic link or outside the input; it must be {what} inside it"),
            )
            .into(),
            rustix::io::Errno::NOTDIR => match self.kind(rel) {
                Ok(Some(FileType::Symlink)) => Rejected::new(
                    &shown,
                    format!("is a symbolic link; it must be {what} inside the input"),
                )
                .into(),
                Ok(Some(k)) => Rejected::new(&shown, format!("is {}, not {what}", describe(k))).into(),
                _ => Rejected::new(&shown, format!("is not {what}")).into(),
            },
            e => anyhow::Error::from(std::io::Error::from(e))
                .context(format!("opening {}", shown.display())),
        }
    }
}

/// Opens an input given by path (a file or a block device, never a FIFO, a character
/// device or a socket) without blocking, with its length (0 for a device).
pub fn open_input(path: &Path) -> Result<File> {
    let (fd, st) = open_nonblocking(path)?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile | FileType::BlockDevice => Ok(File::from(fd)),
        FileType::Directory => Err(Rejected::new(path, "is a directory").into()),
        other => Err(Rejected::new(
            path,
            format!(
                "is {}; an input is a directory, a file or a block device",
                describe(other)
            ),
        )
        .into()),
    }
}

/// Reads a file an administrator wrote (configuration, set files): links are followed,
/// as the administrator may make them, but only a regular file is read, never more than
/// `limit` bytes, and never blocking.
pub fn read_admin_file(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let (fd, st) = open_nonblocking(path)?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::RegularFile {
        anyhow::bail!(
            "{} is {}, not a regular file",
            path.display(),
            describe(kind)
        );
    }
    let len = st.st_size as u64;
    if len > limit {
        anyhow::bail!(
            "{} has {len} bytes; at most {limit} are read",
            path.display()
        );
    }
    let mut bytes = Vec::with_capacity(len as usize);
    File::from(fd)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > limit {
        anyhow::bail!(
            "{} grew past {limit} bytes while it was read",
            path.display()
        );
    }
    Ok(bytes)
}

/// Opens `path` for reading without blocking (a FIFO opens at once), with what it is.
fn open_nonblocking(path: &Path) -> Result<(OwnedFd, rustix::fs::Stat)> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", path.display()))?;
    let st = rustix::fs::fstat(&fd).with_context(|| format!("reading {}", path.display()))?;
    Ok((fd, st))
}

/// Reads `f` (whose length was `len` when opened) whole, up to `limit` bytes.
fn read_bounded(f: File, len: u64, limit: u64, shown: &Path) -> Result<Vec<u8>> {
    if len > limit {
        return Err(Rejected::new(shown, format!("is larger than {limit} bytes")).into());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", shown.display()))?;
    if bytes.len() as u64 > limit || bytes.len() as u64 != len {
        return Err(Rejected::new(shown, "changed while it was read").into());
    }
    Ok(bytes)
}

/// What a file type is, for messages.
pub fn describe(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

/// Hostile text for a message: at most [`QUOTE_MAX`] characters of it, quoted, with how
/// long it really was when it was cut.
pub fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let shown: String = text.chars().take(QUOTE_MAX).collect();
    if shown.len() < text.len() {
        format!("{shown:?}… ({} bytes)", bytes.len())
    } else {
        format!("{shown:?}")
    }
}

/// How many characters of hostile text a message quotes.
pub const QUOTE_MAX: usize = 100;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn nothing_is_followed_inside_a_tree() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::fs::create_dir(t.path().join("sub")).unwrap();
        std::fs::write(t.path().join("sub/ok"), "fine").unwrap();
        symlink(outside.path(), t.path().join("link")).unwrap();
        symlink(
            outside.path().join("secret"),
            t.path().join("sub/file-link"),
        )
        .unwrap();
        symlink("/dev/zero", t.path().join("zero")).unwrap();
        nix::unistd::mkfifo(&t.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let tree = Tree::open(t.path()).unwrap();
        assert_eq!(tree.read("sub/ok", 10).unwrap(), b"fine");
        for bad in [
            "link/secret",
            "sub/file-link",
            "zero",
            "../x",
            "/etc/passwd",
        ] {
            let e = format!("{:#}", tree.read(bad, 10).unwrap_err());
            assert!(
                e.contains("symbolic link") || e.contains("missing"),
                "{bad}: {e}"
            );
        }
        let e = format!("{:#}", tree.read("fifo", 10).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
        assert!(tree.dir("link").is_err());
        assert!(format!("{:#}", tree.read("sub/ok", 2).unwrap_err()).contains("larger"));
        let kinds = tree.list().unwrap();
        assert!(
            kinds.contains(&("link".into(), FileType::Symlink)),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&("fifo".into(), FileType::Fifo)),
            "{kinds:?}"
        );
    }

    #[test]
    fn inputs_and_admin_files_are_never_fifos_or_devices() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(format!("{:#}", open_input(&fifo).unwrap_err()).contains("FIFO"));
        assert!(
            format!("{:#}", open_input(Path::new("/dev/zero")).unwrap_err())
                .contains("character device")
        );
        let link = t.path().join("conf.toml");
        symlink("/dev/zero", &link).unwrap();
        assert!(
            format!("{:#}", read_admin_file(&link, 100).unwrap_err()).contains("character device")
        );
        assert!(read_admin_file(&fifo, 100).is_err());
    }

    #[test]
    fn quotes_are_short() {
        let long = vec![b'a'; 1 << 20];
        let q = quote(&long);
        assert!(q.len() < 200, "{q}");
        assert!(q.contains("1048576 bytes"), "{q}");
        assert_eq!(quote(b"ok"), "\"ok\"");
    }
}
