//! Tar streams built entry by entry, with names, types and sizes exactly as given, so
//! the tests can make what a well-behaved writer refuses to.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

/// Builds a tar stream entry by entry, writing names and types exactly as given, so
/// entries a well-behaved writer refuses to make can be made.
pub struct RawTar(pub Vec<u8>);

impl RawTar {
    pub fn new() -> Self {
        RawTar(Vec::new())
    }

    pub fn entry(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        data: &[u8],
        link: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..name.len()].copy_from_slice(name);
            g.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        if kind == tar::EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(name.as_bytes(), tar::EntryType::Regular, data, b"")
    }

    /// Every file of a bundle directory, bundle.json first.
    pub fn bundle(&mut self, dir: &Path) -> &mut Self {
        self.file("bundle.json", &fs::read(dir.join("bundle.json")).unwrap());
        self.layout(dir)
    }

    /// Every file of an OCI layout (as an oci-archive holds it): oci-layout, index.json,
    /// then the blobs in name order.
    pub fn layout(&mut self, dir: &Path) -> &mut Self {
        for f in ["oci-layout", "index.json"] {
            self.file(f, &fs::read(dir.join(f)).unwrap());
        }
        let mut blobs: Vec<PathBuf> = fs::read_dir(dir.join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        blobs.sort();
        for b in blobs {
            let name = format!("blobs/sha256/{}", b.file_name().unwrap().to_string_lossy());
            self.file(&name, &fs::read(&b).unwrap());
        }
        self
    }

    pub fn finish(&mut self, path: &Path) {
        self.0.extend(std::iter::repeat_n(0u8, 1024));
        fs::write(path, &self.0).unwrap();
    }
}

impl RawTar {
    /// The bundle's files other than bundle.json.
    pub fn bundle_rest(&mut self, dir: &Path) -> &mut Self {
        let mut full = RawTar::new();
        full.bundle(dir);
        // Skip the first entry (bundle.json): header plus padded data.
        let len = fs::metadata(dir.join("bundle.json")).unwrap().len() as usize;
        let skip = 512 + len.div_ceil(512) * 512;
        self.0.extend_from_slice(&full.0[skip..]);
        self
    }
}

impl RawTar {
    /// A header alone, declaring `size` bytes that never follow (for headers whose data a
    /// reader must refuse before reading it).
    pub fn header_only(&mut self, name: &[u8], kind: tar::EntryType, size: u64) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..name.len()].copy_from_slice(name);
        }
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self
    }

    /// `len` bytes of data after a header written by [`RawTar::header_only`], padded.
    pub fn zeros(&mut self, len: u64) -> &mut Self {
        let padded = len.div_ceil(512) * 512;
        self.0.extend(std::iter::repeat_n(0u8, padded as usize));
        self
    }

    /// The stream, ended.
    pub fn bytes(&mut self) -> Vec<u8> {
        let mut v = self.0.clone();
        v.extend(std::iter::repeat_n(0u8, 1024));
        v
    }
}
