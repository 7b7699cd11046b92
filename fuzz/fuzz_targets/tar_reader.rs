//! The tar reader of bundles and image archives, on any bytes: it must end every stream
//! with entries or an error, never panic, and never hold more than its limits.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use longshore::bundle::archive::{Reader, MAX_LONG_NAME};

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mut buf = [0u8; 4096];
    while let Ok(Some(mut e)) = r.next_entry() {
        assert!(e.name.len() as u64 <= MAX_LONG_NAME.max(256));
        let mut total = 0u64;
        loop {
            match e.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(_) => break,
            }
        }
        assert!(total <= e.size);
    }
});
