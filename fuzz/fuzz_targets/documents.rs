//! bundle.json, index.json and manifests, and image references: the input is a
//! bundle.json, a NUL byte, then an index.json checked against it. Parsing must refuse or
//! accept, never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use longshore::bundle::format::{Index, Manifest};
use longshore::bundle::read::{check_index, parse_meta};

fuzz_target!(|data: &[u8]| {
    let (meta, index) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let dir = Path::new("/fuzz");
    if let Ok((_, m)) = parse_meta(&dir.join("bundle.json"), meta) {
        let _ = check_index(dir, &m, &dir.join("index.json"), index);
        for img in &m.images {
            assert!(longshore::oci::reference::parse(&img.reference).is_ok());
        }
    }
    let _ = serde_json::from_slice::<Index>(index);
    let _ = serde_json::from_slice::<Manifest>(meta);
    if let Ok(text) = std::str::from_utf8(meta) {
        let _ = longshore::oci::reference::parse(text);
    }
});
