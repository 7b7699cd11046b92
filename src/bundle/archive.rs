//! Reading tar streams that come from strangers: bundles on media, `docker save` and
//! oci-archive files.
//!
//! The `tar` crate reads a GNU long name or a pax extended header whole into memory,
//! whatever size its header declares (`read_all` in its archive.rs), so a 35 KB
//! compressed stream can make it allocate gigabytes. This reader holds nothing whole but
//! those headers, and refuses them above [`MAX_LONG_NAME`] and [`MAX_PAX_HEADER`].
//!
//! It reads POSIX ustar, GNU and v7 headers; GNU long names and links (`L`, `K`); pax
//! extended headers (`x`), of which `path`, `linkpath` and `size` are applied; pax global
//! headers (`g`), which are skipped. Sparse files are refused here: no bundle or image
//! archive holds one, and their layout would only widen what must be parsed. An entry's
//! data is read through [`Entry`]; whatever a caller leaves unread is skipped before the
//! next header.

use std::io::{self, Read};

/// Longest name a GNU long-name or long-link entry may carry (Linux's PATH_MAX).
pub const MAX_LONG_NAME: u64 = 4096;
/// Largest pax extended header, local or global.
pub const MAX_PAX_HEADER: u64 = 64 << 10;

const BLOCK: usize = 512;

/// What a stream is not, said in a short sentence; the caller names the file.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The stream breaks the format.
    #[error("is not a valid tar stream: {0}")]
    Invalid(String),
    /// The stream ends in the middle of a header or of an entry's data.
    #[error("is truncated: {0}")]
    Truncated(String),
    /// Reading the underlying stream failed (a device error, a bad compressed frame, a
    /// cancellation).
    #[error("cannot be read: {0}")]
    Io(#[from] io::Error),
}

/// The kind of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (`0`, NUL, or the contiguous `7`).
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A hard link.
    HardLink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A FIFO.
    Fifo,
    /// Any other type flag.
    Other(u8),
}

impl Kind {
    fn of(flag: u8) -> Kind {
        match flag {
            b'0' | 0 | b'7' => Kind::File,
            b'5' => Kind::Dir,
            b'2' => Kind::Symlink,
            b'1' => Kind::HardLink,
            b'3' => Kind::CharDevice,
            b'4' => Kind::BlockDevice,
            b'6' => Kind::Fifo,
            other => Kind::Other(other),
        }
    }

    /// What it is, for messages.
    pub fn describe(self) -> String {
        match self {
            Kind::File => "a regular file".into(),
            Kind::Dir => "a directory".into(),
            Kind::Symlink => "a symbolic link".into(),
            Kind::HardLink => "a hard link".into(),
            Kind::CharDevice => "a character device".into(),
            Kind::BlockDevice => "a block device".into(),
            Kind::Fifo => "a FIFO".into(),
            Kind::Other(f) => format!("of unsupported type {:?}", f as char),
        }
    }
}

/// A tar stream read entry by entry.
pub struct Reader<R> {
    inner: R,
    /// Bytes of the current entry's data (and padding) not consumed yet.
    pending: u64,
    /// Bytes of the current entry's data the caller may still read.
    left: u64,
    done: bool,
    entries: u64,
}

/// One entry: its header, and its data through [`Read`].
pub struct Entry<'a, R> {
    /// Its name, as stored (long names and pax paths applied), not yet checked.
    pub name: Vec<u8>,
    /// Its kind.
    pub kind: Kind,
    /// Bytes of data it carries.
    pub size: u64,
    /// The target of a link.
    pub link: Vec<u8>,
    reader: &'a mut Reader<R>,
}

impl<R: Read> Reader<R> {
    /// Reads the tar stream `inner`.
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            pending: 0,
            left: 0,
            done: false,
            entries: 0,
        }
    }

    /// How many entries were read so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The next entry, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<Entry<'_, R>>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip_pending()?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Pax> = None;
        loop {
            let mut block = [0u8; BLOCK];
            match self.read_block(&mut block)? {
                false if long_name.is_some() || long_link.is_some() || pax.is_some() => {
                    return Err(TarError::Truncated(
                        "an extended header describes an entry that never comes".into(),
                    ))
                }
                false => {
                    self.done = true;
                    return Ok(None);
                }
                true => {}
            }
            if block.iter().all(|b| *b == 0) {
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(TarError::Invalid(
                        "an extended header is followed by the end of the archive".into(),
                    ));
                }
                // The end-of-archive marker; what follows it is not read.
                self.done = true;
                return Ok(None);
            }
            let header = Header::parse(&block)?;
            self.entries += 1;
            match header.flag {
                b'L' | b'K' => {
                    let what = if header.flag == b'L' { "name" } else { "link" };
                    if header.size > MAX_LONG_NAME {
                        return Err(TarError::Invalid(format!(
                            "a GNU long {what} of {} bytes (at most {MAX_LONG_NAME})",
                            header.size
                        )));
                    }
                    let slot = if header.flag == b'L' {
                        &mut long_name
                    } else {
                        &mut long_link
                    };
                    if slot.is_some() {
                        return Err(TarError::Invalid(format!(
                            "two GNU long {what}s for one entry"
                        )));
                    }
                    let mut v = self.read_whole(header.size)?;
                    while v.last() == Some(&0) {
                        v.pop();
                    }
                    *slot = Some(v);
                }
                b'x' | b'g' => {
                    let what = if header.flag == b'x' { "" } else { "global " };
                    if header.size > MAX_PAX_HEADER {
                        return Err(TarError::Invalid(format!(
                            "a pax {what}header of {} bytes (at most {MAX_PAX_HEADER})",
                            header.size
                        )));
                    }
                    let bytes = self.read_whole(header.size)?;
                    if header.flag == b'x' {
                        if pax.is_some() {
                            return Err(TarError::Invalid("two pax headers for one entry".into()));
                        }
                        pax = Some(Pax::parse(&bytes)?);
                    }
                    // A global header's defaults name no file; none of them matters here.
                }
                b'S' => {
                    return Err(TarError::Invalid(
                        "a sparse file; bundles and image archives hold none".into(),
                    ))
                }
                flag => {
                    let pax = pax.unwrap_or_default();
                    let name = pax.path.or(long_name).unwrap_or(header.name);
                    let link = pax.linkpath.or(long_link).unwrap_or(header.link);
                    let kind = Kind::of(flag);
                    let size = pax.size.unwrap_or(header.size);
                    // Only regular files carry data; any other entry's size field is
                    // still honoured for positioning, as GNU tar does.
                    self.left = size;
                    self.pending = padded(size)?;
                    return Ok(Some(Entry {
                        name,
                        kind,
                        size,
                        link,
                        reader: self,
                    }));
                }
            }
        }
    }

    /// Reads one block; `false` at a clean end of stream before it.
    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, TarError> {
        let mut n = 0;
        while n < BLOCK {
            match self.inner.read(&mut block[n..]) {
                Ok(0) if n == 0 => return Ok(false),
                Ok(0) => return Err(TarError::Truncated("it ends inside a header".into())),
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Reads an extension header's data (already bounded by the caller) and its padding.
    fn read_whole(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        let mut v = vec![0u8; size as usize];
        self.inner.read_exact(&mut v).map_err(eof_is_truncation)?;
        self.skip(padded(size)? - size)?;
        Ok(v)
    }

    fn skip_pending(&mut self) -> Result<(), TarError> {
        let n = self.pending;
        self.pending = 0;
        self.left = 0;
        self.skip(n)
    }

    fn skip(&mut self, n: u64) -> Result<(), TarError> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        if copied < n {
            return Err(TarError::Truncated("it ends inside an entry's data".into()));
        }
        Ok(())
    }
}

impl<R: Read> Read for Entry<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = &mut *self.reader;
        if r.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(r.left).unwrap_or(usize::MAX));
        let n = r.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ends inside this entry's data",
            ));
        }
        r.left -= n as u64;
        r.pending -= n as u64;
        Ok(n)
    }
}

fn eof_is_truncation(e: io::Error) -> TarError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        TarError::Truncated("it ends inside an extended header".into())
    } else {
        TarError::Io(e)
    }
}

/// `size` rounded up to whole blocks.
fn padded(size: u64) -> Result<u64, TarError> {
    size.checked_add(BLOCK as u64 - 1)
        .map(|s| s & !(BLOCK as u64 - 1))
        .ok_or_else(|| TarError::Invalid("an entry size that overflows".into()))
}

/// The fields of a header block that matter here.
struct Header {
    name: Vec<u8>,
    link: Vec<u8>,
    size: u64,
    flag: u8,
}

impl Header {
    fn parse(b: &[u8; BLOCK]) -> Result<Header, TarError> {
        let stored = octal(&b[148..156])
            .ok_or_else(|| TarError::Invalid("a header with an unreadable checksum".into()))?;
        let sum: u64 = b[..148]
            .iter()
            .chain(&[b' '; 8])
            .chain(&b[156..])
            .map(|x| u64::from(*x))
            .sum();
        if sum != stored {
            return Err(TarError::Invalid("a header checksum mismatch".into()));
        }
        let size = if b[124] & 0x80 != 0 {
            // GNU base-256: a big-endian number with the top bit set; negative is refused.
            if b[124] & 0x40 != 0 {
                return Err(TarError::Invalid("a negative entry size".into()));
            }
            let digits = &b[124..136];
            if digits[..4]
                .iter()
                .enumerate()
                .any(|(i, d)| if i == 0 { d & 0x7f != 0 } else { *d != 0 })
            {
                return Err(TarError::Invalid("an entry size beyond 2^64".into()));
            }
            digits[4..]
                .iter()
                .fold(0u64, |a, d| (a << 8) | u64::from(*d))
        } else {
            octal(&b[124..136])
                .ok_or_else(|| TarError::Invalid("a header with an unreadable size".into()))?
        };
        let mut name = cstr(&b[..100]).to_vec();
        // POSIX ustar keeps the start of long names in a prefix field; GNU headers use
        // those bytes for other things.
        if &b[257..263] == b"ustar\0" {
            let prefix = cstr(&b[345..500]);
            if !prefix.is_empty() {
                let mut full = prefix.to_vec();
                full.push(b'/');
                full.extend_from_slice(&name);
                name = full;
            }
        }
        Ok(Header {
            name,
            link: cstr(&b[157..257]).to_vec(),
            size,
            flag: b[156],
        })
    }
}

fn cstr(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|x| *x == 0).unwrap_or(b.len());
    &b[..end]
}

/// An octal field: optional leading spaces, digits, then spaces or NULs.
fn octal(field: &[u8]) -> Option<u64> {
    let s = field
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| **b != b' ' && **b != 0);
    let mut n: u64 = 0;
    let mut digits = 0;
    for b in s {
        if !(b'0'..=b'7').contains(b) {
            return None;
        }
        n = n.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0 || field.iter().all(|b| *b == 0 || *b == b' ')).then_some(n)
}

/// What a pax extended header says of the entry after it.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
}

impl Pax {
    /// Records of the form `LEN key=value\n`, LEN counting the whole record.
    fn parse(mut bytes: &[u8]) -> Result<Pax, TarError> {
        let bad = || TarError::Invalid("a malformed pax header".into());
        let mut out = Pax::default();
        while !bytes.is_empty() {
            let sp = bytes.iter().position(|b| *b == b' ').ok_or_else(bad)?;
            let len: usize = std::str::from_utf8(&bytes[..sp])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
            if len <= sp + 1 || len > bytes.len() || bytes[len - 1] != b'\n' {
                return Err(bad());
            }
            let record = &bytes[sp + 1..len - 1];
            let eq = record.iter().position(|b| *b == b'=').ok_or_else(bad)?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            match key {
                b"path" => out.path = Some(value.to_vec()),
                b"linkpath" => out.linkpath = Some(value.to_vec()),
                b"size" => {
                    let n = std::str::from_utf8(value)
                        .ok()
                        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(bad)?;
                    out.size = Some(n);
                }
                _ => {}
            }
            bytes = &bytes[len..];
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &[u8], flag: u8, size: u64) -> [u8; BLOCK] {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            let n = name.len().min(100);
            g.name[..n].copy_from_slice(&name[..n]);
        }
        h.set_entry_type(tar::EntryType::new(flag));
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        let mut b = [0u8; BLOCK];
        b.copy_from_slice(h.as_bytes());
        b
    }

    fn entry(out: &mut Vec<u8>, name: &[u8], flag: u8, data: &[u8]) {
        out.extend_from_slice(&header(name, flag, data.len() as u64));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }

    fn names(bytes: &[u8]) -> Result<Vec<(String, Kind, Vec<u8>)>, TarError> {
        let mut r = Reader::new(bytes);
        let mut out = Vec::new();
        while let Some(mut e) = r.next_entry()? {
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            out.push((String::from_utf8_lossy(&e.name).into_owned(), e.kind, data));
        }
        Ok(out)
    }

    #[test]
    fn reads_what_the_tar_crate_writes() {
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("blobs/sha256/{}", "a".repeat(150));
        for (name, data) in [
            ("bundle.json", &b"{}"[..]),
            (long.as_str(), &[7u8; 1000][..]),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, data).unwrap();
        }
        let bytes = b.into_inner().unwrap();
        let got = names(&bytes).unwrap();
        assert_eq!(got[0].0, "bundle.json");
        assert_eq!(got[0].2, b"{}");
        assert_eq!(got[1].0, long);
        assert_eq!(got[1].2, vec![7u8; 1000]);
    }

    #[test]
    fn pax_path_and_size_apply_to_the_next_entry() {
        let mut out = Vec::new();
        entry(
            &mut out,
            b"PaxHeaders/x",
            b'x',
            b"18 path=very/long\n10 size=3\n",
        );
        // The header's own size field says 0 (as Go writes for sizes over 8 GiB).
        out.extend_from_slice(&header(b"short", b'0', 0));
        out.extend_from_slice(b"abc");
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
        entry(&mut out, b"next", b'0', b"z");
        let got = names(&out).unwrap();
        assert_eq!(got[0].0, "very/long");
        assert_eq!(got[0].2, b"abc");
        assert_eq!(got[1].0, "next");
    }

    #[test]
    fn oversized_extension_headers_are_refused_before_they_are_read() {
        for (flag, size) in [
            (b'L', MAX_LONG_NAME + 1),
            (b'x', MAX_PAX_HEADER + 1),
            (b'g', 1 << 30),
        ] {
            // Only the header: the data would be a gigabyte, and is never read.
            let bytes = header(b"././@LongLink", flag, size);
            let err = names(&bytes).unwrap_err();
            assert!(format!("{err}").contains("at most"), "{err}");
        }
    }

    #[test]
    fn damage_is_named() {
        let mut out = Vec::new();
        entry(&mut out, b"a", b'0', &[1u8; 2000]);
        let cut = &out[..1000];
        assert!(matches!(
            names(cut),
            Err(TarError::Io(_)) | Err(TarError::Truncated(_))
        ));
        let mut bad = out.clone();
        bad[0] ^= 1;
        assert!(format!("{}", names(&bad).unwrap_err()).contains("checksum"));
        let mut sparse = Vec::new();
        entry(&mut sparse, b"s", b'S', b"");
        assert!(format!("{}", names(&sparse).unwrap_err()).contains("sparse"));
        let mut dangling = Vec::new();
        entry(&mut dangling, b"L", b'L', b"name\0");
        assert!(names(&dangling).is_err());
    }

    #[test]
    fn kinds_are_reported() {
        let mut out = Vec::new();
        entry(&mut out, b"d/", b'5', b"");
        entry(&mut out, b"l", b'2', b"");
        entry(&mut out, b"f", b'6', b"");
        let kinds: Vec<Kind> = names(&out).unwrap().into_iter().map(|e| e.1).collect();
        assert_eq!(kinds, vec![Kind::Dir, Kind::Symlink, Kind::Fifo]);
    }
}
