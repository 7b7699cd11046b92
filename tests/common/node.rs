//! A node in a temp dir: a sysroot with its own config, state and containers-storage,
//! the `longshore` binary run against it, and what the store then holds.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether the tools a test needs are here. Outside CI a missing tool skips the test
/// with a message; under `CI=true` it fails it.
pub fn require(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .collect();
    let root = nix::unistd::geteuid().is_root();
    if missing.is_empty() && root {
        return true;
    }
    let why = if root {
        format!("missing tools: {}", missing.join(", "))
    } else {
        "needs root (overlay storage)".to_string()
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("test prerequisite missing under CI: {why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

/// A sysroot with its own store.
pub struct Node {
    pub tmp: tempfile::TempDir,
    pub sysroot: PathBuf,
    /// Extra environment for every longshore and skopeo run.
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn new() -> Node {
        let tmp = tempfile::Builder::new()
            .prefix("longshore-node")
            .tempdir()
            .expect("temp dir");
        let sysroot = tmp.path().join("root");
        fs::create_dir_all(&sysroot).expect("sysroot");
        let node = Node {
            tmp,
            sysroot,
            env: Vec::new(),
        };
        // No systemd to reload CRI-O through unless a test brings one (usermgr.rs).
        node.write_config("00-test.toml", "[crio]\nreload = false\n");
        node
    }

    /// A scratch directory for inputs, outside the sysroot.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        p
    }

    /// Runs `longshore --sysroot … ARGS`.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_longshore"))
            .arg("--sysroot")
            .arg(&self.sysroot)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("LONGSHORE_LOG")
            .output()
            .expect("running longshore")
    }

    /// Starts `longshore --sysroot … ARGS` without waiting, output captured.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_longshore"))
            .arg("--sysroot")
            .arg(&self.sysroot)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting longshore")
    }

    /// Runs longshore and insists that it succeeded; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "longshore {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `longshore bundle create -o OUT EXTRA… oci:LAYOUT:REF…` for every image of
    /// `layout`; returns the bundle digest it prints.
    pub fn bundle_create(
        &self,
        layout: &super::fixture::Layout,
        out: &Path,
        extra: &[&str],
    ) -> String {
        let out = out.display().to_string();
        let sources: Vec<String> = layout
            .images
            .iter()
            .map(|i| layout.transport_ref(&i.reference))
            .collect();
        let mut args = vec!["bundle", "create", "-o", out.as_str()];
        args.extend_from_slice(extra);
        args.extend(sources.iter().map(String::as_str));
        self.ok(&args)
            .lines()
            .find_map(|l| l.strip_prefix("digest "))
            .expect("bundle create prints the digest")
            .to_string()
    }

    /// Runs longshore and insists that it failed with `code`; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "longshore {args:?}: expected exit {code}\nstdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    pub fn store_root(&self) -> PathBuf {
        self.sysroot.join("var/lib/containers/storage")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.sysroot.join("var/lib/longshore")
    }

    /// The containers-storage reference of `name` in this node's store.
    pub fn store_ref(&self, name: &str) -> String {
        format!(
            "containers-storage:[overlay@{}+{}]{}",
            self.store_root().display(),
            self.sysroot.join("run/containers/storage").display(),
            name
        )
    }

    /// The manifest digest `skopeo inspect` reports for `name` in the store, or `None`
    /// when the store does not hold it.
    pub fn inspect_digest(&self, name: &str) -> Option<String> {
        let out = Command::new("skopeo")
            .args(["inspect", &self.store_ref(name)])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("running skopeo inspect");
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("skopeo inspect JSON");
        v["Digest"].as_str().map(str::to_string)
    }

    /// Every name of every image in the store (empty when there is no store yet).
    pub fn store_names(&self) -> Vec<String> {
        let p = self.store_root().join("overlay-images/images.json");
        let Ok(bytes) = fs::read(&p) else {
            return vec![];
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("images.json");
        let mut names: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|i| i["names"].as_array().cloned().unwrap_or_default())
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// Number of images in the store.
    pub fn store_image_count(&self) -> usize {
        let p = self.store_root().join("overlay-images/images.json");
        let Ok(bytes) = fs::read(&p) else { return 0 };
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("images.json");
        v.as_array().map_or(0, Vec::len)
    }

    /// Entries left in the staging directory (should be none after any import).
    pub fn staging_leftovers(&self) -> Vec<String> {
        match fs::read_dir(self.state_dir().join("staging")) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => vec![],
        }
    }

    /// Writes a config fragment into /etc/longshore/config.d.
    pub fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let dir = self.sysroot.join("etc/longshore/config.d");
        fs::create_dir_all(&dir).expect("config dir");
        let p = dir.join(name);
        fs::write(&p, text).expect("config file");
        p
    }

    /// Makes every `skopeo copy` of this node take `delay` seconds longer and leave a
    /// line in a log (`start DEST`, then `done DEST` once it succeeded), so a test can
    /// act while an import is under way and see which copies ran. Returns the log.
    pub fn slow_copies(&self, delay: f32) -> PathBuf {
        let log = self.scratch("copies.log");
        let wrapper = self.scratch("slow-skopeo");
        fs::write(
            &wrapper,
            format!(
                r#"#!/bin/bash
for a in "$@"; do
  if [ "$a" = copy ]; then
    dest="${{@: -1}}"
    echo "start $dest" >> '{log}'
    sleep {delay}
    # Stopped, the wrapper stops its skopeo too, as longshore stops a plain skopeo.
    skopeo "$@" &
    child=$!
    trap 'kill -TERM $child 2>/dev/null; wait $child; exit 143' TERM
    wait $child || exit $?
    echo "done $dest" >> '{log}'
    exit 0
  fi
done
exec skopeo "$@"
"#,
                log = log.display()
            ),
        )
        .expect("writing the skopeo wrapper");
        fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("making the wrapper executable");
        self.write_config(
            "50-slow-skopeo.toml",
            &format!("[skopeo]\ncommand = \"{}\"\n", wrapper.display()),
        );
        log
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status JSON")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // containers-storage's overlay driver leaves its home mounted; take down every
        // mount under this node, deepest first, before the temp dir is removed.
        unmount_under(self.tmp.path());
    }
}

/// Detaches every mount at or below `dir`.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(Path::new(&p), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Waits until the file at `path` holds `needle`.
pub fn wait_for_text(path: &Path, needle: &str, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !fs::read_to_string(path)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never held {needle:?}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Copies the directory tree `src` to `dst` (regular files and directories).
pub fn copy_tree(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// The largest blob of a bundle directory or OCI layout: a layer.
pub fn largest_blob(dir: &Path) -> PathBuf {
    fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap()
}

/// Runs a command and insists that it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Enables `unit` in the root `root` for multi-user.target, as `systemctl enable` would:
/// a wants link to wherever the unit is installed (/etc or /usr/lib).
pub fn enable_unit(root: &Path, unit: &str) {
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).unwrap();
    let target = ["etc/systemd/system", "usr/lib/systemd/system"]
        .iter()
        .map(|d| Path::new("/").join(d).join(unit))
        .find(|p| root.join(p.strip_prefix("/").unwrap()).exists())
        .unwrap_or_else(|| panic!("{unit} is not installed"));
    std::os::unix::fs::symlink(target, wants.join(unit)).unwrap();
}
