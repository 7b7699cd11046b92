//! An import killed with SIGKILL at each named point of its path, and at points chosen
//! by the clock, then run again: the store is consistent, every pin names an image the
//! store holds, the state file is valid, and nothing is left behind once the import
//! has completed.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fixture;
use common::node::{require, Node};
use sha2::Digest as _;

/// Every point where `LONGSHORE_TEST_STOP_AT` can stop an import.
const POINTS: [&str; 8] = [
    "verified",
    "cached-one",
    "cache-partial",
    "recorded",
    "copied-one",
    "copied",
    "imported",
    "before-rename",
];

struct Case {
    node: Node,
    bundle: PathBuf,
    layout: fixture::Layout,
}

impl Case {
    fn new() -> Case {
        let node = Node::new();
        let layout = fixture::write_oci_layout(
            &node.scratch("layout"),
            &fixture::small_images("example.com/crash", 3),
        )
        .unwrap();
        let bundle = node.scratch("crash.tar.zst");
        node.bundle_create(&layout, &bundle, &["--name", "crash"]);
        Case {
            node,
            bundle,
            layout,
        }
    }

    fn pins(&self) -> Vec<String> {
        let p = self
            .node
            .sysroot
            .join("etc/crio/crio.conf.d/99-longshore-pinned-images.conf");
        let Ok(text) = fs::read_to_string(p) else {
            return vec![];
        };
        let v: toml::Table = text.parse().expect("the pin file is valid TOML");
        v["crio"]["image"]["pinned_images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect()
    }

    /// What must hold at any instant: a valid state file, and pins only of images the
    /// store holds under that name.
    fn consistent(&self, when: &str) {
        let state = self.node.state_dir().join("state.json");
        if state.exists() {
            let _: serde_json::Value = serde_json::from_slice(&fs::read(&state).unwrap())
                .unwrap_or_else(|e| panic!("{when}: state.json is not valid: {e}"));
        }
        for pin in self.pins() {
            assert!(
                self.node.inspect_digest(&pin).is_some(),
                "{when}: {pin} is pinned but not in the store"
            );
        }
    }

    /// What must hold once an import has completed.
    fn complete(&self, when: &str) {
        let mut want = Vec::new();
        for img in &self.layout.images {
            let (repo, _) = img.reference.rsplit_once(':').unwrap();
            let by_digest = format!("{repo}@{}", img.manifest_digest);
            for name in [&img.reference, &by_digest] {
                assert_eq!(
                    self.node.inspect_digest(name).as_deref(),
                    Some(img.manifest_digest.as_str()),
                    "{when}: {name}"
                );
                want.push(name.clone());
            }
        }
        want.sort();
        let mut pins = self.pins();
        pins.sort();
        assert_eq!(pins, want, "{when}: pins");
        let status = self.node.status();
        assert_eq!(status["bundles"][0]["state"], "imported", "{when}");
        assert!(
            self.node.staging_leftovers().is_empty(),
            "{when}: staging holds {:?}",
            self.node.staging_leftovers()
        );
        let left = |dir: PathBuf, pattern: &str| -> Vec<String> {
            fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.contains(pattern))
                        .collect()
                })
                .unwrap_or_default()
        };
        // Whatever the kill interrupted, the cache names no blob wrongly and keeps no
        // partial once the import is complete.
        let blobs = self.node.state_dir().join("cache/blobs/sha256");
        for e in fs::read_dir(&blobs).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.ends_with(".partial"), "{when}: partial {name} left");
            let bytes = fs::read(e.path()).unwrap();
            let got: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(got, name, "{when}: cache blob {name} holds other content");
        }
        for img in &self.layout.images {
            let hex = img.manifest_digest.trim_start_matches("sha256:");
            assert!(blobs.join(hex).exists(), "{when}: manifest not cached");
        }
        assert!(
            left(self.node.state_dir().join("tmp"), "").is_empty(),
            "{when}: tmp"
        );
        assert!(
            left(self.node.state_dir(), ".tmp").is_empty(),
            "{when}: state temp"
        );
        assert!(
            left(self.node.sysroot.join("etc/crio"), "longshore-tmp").is_empty(),
            "{when}"
        );
    }

    fn import(&self) -> String {
        self.node.ok(&["import", self.bundle.to_str().unwrap()])
    }
}

fn stopped(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

fn kill9(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status();
    let _ = child.wait();
    // The image proxy and the copies die with it (pdeathsig); give them a moment.
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn killed_at_each_named_point_the_next_import_completes_and_cleans() {
    if !require(&["skopeo", "kill"]) {
        return;
    }
    for point in POINTS {
        let mut case = Case::new();
        case.node
            .env
            .push(("LONGSHORE_TEST_STOP_AT".into(), point.into()));
        let mut child = case.node.spawn(&["import", case.bundle.to_str().unwrap()]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stopped(child.id()) {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("{point}: the import ended ({st}) without reaching the point");
            }
            assert!(Instant::now() < deadline, "{point}: never reached");
            std::thread::sleep(Duration::from_millis(20));
        }
        kill9(&mut child);
        case.consistent(&format!("killed at {point}"));
        if point == "cache-partial" {
            // Killed in the middle of a write into the cache: a partial is there, and
            // nothing under its digest name.
            let blobs = case.node.state_dir().join("cache/blobs/sha256");
            let partials: Vec<String> = fs::read_dir(&blobs)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".partial"))
                .collect();
            assert_eq!(partials.len(), 1, "{partials:?}");
            let named = partials[0].trim_end_matches(".partial");
            assert!(!blobs.join(named).exists(), "named before it was complete");
        }
        case.node.env.clear();
        case.import();
        case.complete(&format!("after a kill at {point}"));
        // And once more: nothing to do.
        assert!(case.import().contains("already in the store"), "{point}");
    }
}

#[test]
fn killed_at_moments_chosen_by_the_clock_the_next_import_completes() {
    if !require(&["skopeo", "kill"]) {
        return;
    }
    // How long a whole import takes here, to spread the kills over it.
    let probe = Case::new();
    let started = Instant::now();
    probe.import();
    let whole = started.elapsed();
    // A fixed spread of fractions, so a failure can be run again.
    for (i, frac) in [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95]
        .into_iter()
        .enumerate()
    {
        let case = Case::new();
        let mut child = case.node.spawn(&["import", case.bundle.to_str().unwrap()]);
        std::thread::sleep(whole.mul_f64(frac));
        kill9(&mut child);
        case.consistent(&format!("kill {i} at {frac} of {whole:?}"));
        case.import();
        case.complete(&format!("after kill {i} at {frac} of {whole:?}"));
    }
}
