//! Configuration fragments and set files, on any text: each is accepted or refused with
//! an error that names the file, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let conf = Path::new("/etc/longshore/config.d/50-fuzz.toml");
    if let Err(e) = longshore::config::check_fragment(conf, text) {
        assert!(format!("{e:#}").contains("50-fuzz.toml"));
    }
    let set = Path::new("/etc/longshore/sets.d/fuzz.toml");
    if let Err(e) = longshore::sets::parse_file(set, "fuzz".into(), text) {
        assert!(format!("{e:#}").contains("fuzz.toml"));
    }
});
