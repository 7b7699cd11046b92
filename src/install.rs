//! What installs longshore on an RHEL CoreOS node: an Ignition config for the first boot,
//! its Butane source, and MachineConfig manifests for day 2. `longshore generate` renders
//! them with the hash of the binary, so nobody edits a hash by hand.
//!
//! Every file comes from the source tree (`systemd/`, `config/`), embedded at build time,
//! so a rendering always carries the files of the binary that rendered it. On RHCOS `/usr`
//! is read-only: the binary goes to `/usr/local/bin` and the other files under `/etc`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha512};

/// The unit as shipped; its `ExecStart` names `/usr/bin/longshore`.
pub const UNIT: &str = include_str!("../systemd/longshore.service");
/// The udev rules.
pub const UDEV_RULES: &str = include_str!("../systemd/70-longshore.rules");
/// The D-Bus bus policy.
pub const BUS_POLICY: &str = include_str!("../systemd/io.longshore.Longshore1.conf");
/// The tmpfiles.d entries.
pub const TMPFILES: &str = include_str!("../systemd/longshore.tmpfiles");
/// The default configuration, every key with its default and what it means.
pub const DEFAULTS: &str = include_str!("../config/10-defaults.toml");

/// Where the binary goes on an RHCOS node.
pub const NODE_BINARY: &str = "/usr/local/bin/longshore";
/// The Ignition spec versions that can be rendered; the first is the default.
/// 3.3.0 is the default: every supported RHCOS reads it, Debian's ignition-validate
/// (2.14) checks it, and nothing longshore renders needs what 3.4.0 added.
pub const IGNITION_VERSIONS: [&str; 2] = ["3.3.0", "3.4.0"];

/// What a rendering needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where nodes fetch the binary from.
    pub binary_url: String,
    /// The binary's SHA-512, hex.
    pub binary_sha512: String,
    /// The Ignition spec version.
    pub ignition_version: String,
    /// Extra files: (path on the node, contents): a site configuration, set files.
    pub extra: Vec<(String, String)>,
}

impl NodeConfig {
    /// A rendering for the binary at `binary`.
    pub fn for_binary(binary_url: &str, binary: &Path) -> Result<NodeConfig> {
        Ok(NodeConfig {
            binary_url: binary_url.to_string(),
            binary_sha512: sha512_file(binary)?,
            ignition_version: IGNITION_VERSIONS[0].to_string(),
            extra: vec![],
        })
    }

    /// Adds `file` as the site configuration, `/etc/longshore/config.d/50-site.toml`,
    /// once it is checked as the node would check it.
    pub fn with_config(mut self, file: &Path) -> Result<NodeConfig> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        crate::config::check_fragment(file, &text)?;
        self.extra
            .push(("/etc/longshore/config.d/50-site.toml".into(), text));
        Ok(self)
    }

    /// Adds `file` as a set file, `/etc/longshore/sets.d/<its name>`, once it is checked.
    pub fn with_set(mut self, file: &Path) -> Result<NodeConfig> {
        crate::sets::check_file(file)?;
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .context("a set file needs a name")?;
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        self.extra
            .push((format!("/etc/longshore/sets.d/{name}"), text));
        Ok(self)
    }

    fn check(&self) -> Result<()> {
        if !IGNITION_VERSIONS.contains(&self.ignition_version.as_str()) {
            bail!(
                "Ignition spec {} is not one longshore renders ({})",
                self.ignition_version,
                IGNITION_VERSIONS.join(", ")
            );
        }
        if !(self.binary_url.starts_with("https://") || self.binary_url.starts_with("http://")) {
            bail!(
                "--binary-url {}: nodes fetch the binary over HTTP(S); give an http:// or https:// URL",
                self.binary_url
            );
        }
        Ok(())
    }

    /// The files installed besides the binary: (path, mode, contents).
    fn files(&self) -> Vec<(String, u32, String)> {
        let mut files = vec![
            (
                "/etc/udev/rules.d/70-longshore.rules".to_string(),
                0o644,
                UDEV_RULES.to_string(),
            ),
            (
                "/etc/dbus-1/system.d/io.longshore.Longshore1.conf".to_string(),
                0o644,
                BUS_POLICY.to_string(),
            ),
            (
                "/etc/tmpfiles.d/longshore.conf".to_string(),
                0o644,
                TMPFILES.to_string(),
            ),
        ];
        // Without a site configuration, the defaults, to read and to copy from.
        if !self.extra.iter().any(|(p, _)| p.contains("/config.d/")) {
            files.push((
                "/etc/longshore/config.d/10-defaults.toml".to_string(),
                0o644,
                DEFAULTS.to_string(),
            ));
        }
        for (p, text) in &self.extra {
            files.push((p.clone(), 0o644, text.clone()));
        }
        files
    }

    /// `longshore.service` with the node's binary.
    pub fn unit(&self) -> String {
        unit_for(NODE_BINARY)
    }

    /// The one-shot unit a MachineConfig uses to fetch the binary: the Machine Config
    /// Operator serves files it holds itself and fetches no remote file (see
    /// docs/MachineConfiguration.md in openshift/machine-config-operator), and a binary
    /// of several MiB is no object to keep in etcd. It fetches only when the binary there
    /// is not the one named, and installs nothing whose SHA-512 differs.
    pub fn fetch_unit(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Fetches the longshore binary this MachineConfig names, checked by its SHA-512."
        );
        let _ = writeln!(s, "[Unit]");
        let _ = writeln!(s, "Description=Fetch the longshore binary");
        let _ = writeln!(s, "Documentation=man:longshore-daemon(8)");
        let _ = writeln!(s, "Wants=network-online.target");
        let _ = writeln!(s, "After=network-online.target");
        let _ = writeln!(s, "Before=longshore.service");
        let _ = writeln!(s);
        let _ = writeln!(s, "[Service]");
        let _ = writeln!(s, "Type=oneshot");
        let _ = writeln!(s, "RemainAfterExit=yes");
        let _ = writeln!(s, "Environment=LONGSHORE_URL={}", self.binary_url);
        let _ = writeln!(s, "Environment=LONGSHORE_SHA512={}", self.binary_sha512);
        let _ = writeln!(s, "Environment=LONGSHORE_BIN={NODE_BINARY}");
        // `$$` is a `$` for the shell: systemd expands `$NAME` in command lines itself.
        let _ = writeln!(
            s,
            "ExecStart=/bin/sh -ec 'if echo \"$${{LONGSHORE_SHA512}}  $${{LONGSHORE_BIN}}\" | sha512sum -c --status 2>/dev/null; then exit 0; fi; tmp=$$(mktemp \"$${{LONGSHORE_BIN}}.XXXXXX\"); trap \"rm -f $${{tmp}}\" EXIT; curl -fsSL --retry 5 -o \"$${{tmp}}\" \"$${{LONGSHORE_URL}}\"; echo \"$${{LONGSHORE_SHA512}}  $${{tmp}}\" | sha512sum -c --status; chmod 0755 \"$${{tmp}}\"; mv -f \"$${{tmp}}\" \"$${{LONGSHORE_BIN}}\"'"
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "[Install]");
        let _ = writeln!(s, "RequiredBy=longshore.service");
        s
    }

    /// The Ignition config for a node's first boot: Ignition fetches the binary and
    /// checks its hash.
    pub fn ignition(&self) -> Result<Value> {
        self.check()?;
        let mut files = vec![json!({
            "path": NODE_BINARY,
            "mode": 0o755,
            "overwrite": true,
            "contents": {
                "source": self.binary_url,
                "verification": { "hash": format!("sha512-{}", self.binary_sha512) },
            },
        })];
        files.extend(self.data_files());
        Ok(json!({
            "ignition": { "version": self.ignition_version },
            "storage": { "files": files },
            "systemd": {
                "units": [{ "name": "longshore.service", "enabled": true, "contents": self.unit() }],
            },
        }))
    }

    /// The Ignition config a MachineConfig carries: every file inline, and a unit that
    /// fetches the binary.
    pub fn machine_ignition(&self) -> Result<Value> {
        self.check()?;
        Ok(json!({
            "ignition": { "version": self.ignition_version },
            "storage": { "files": self.data_files() },
            "systemd": {
                "units": [
                    { "name": "longshore-fetch.service", "enabled": true, "contents": self.fetch_unit() },
                    { "name": "longshore.service", "enabled": true, "contents": self.unit() },
                ],
            },
        }))
    }

    fn data_files(&self) -> Vec<Value> {
        self.files()
            .into_iter()
            .map(|(path, mode, text)| {
                json!({
                    "path": path,
                    "mode": mode,
                    "overwrite": true,
                    "contents": { "source": data_url(&text) },
                })
            })
            .collect()
    }

    /// A MachineConfig for the pool `role`, as YAML (the Ignition config inside is JSON,
    /// which YAML reads as it is).
    pub fn machineconfig(&self, role: &str) -> Result<String> {
        check_role(role)?;
        let config = serde_json::to_string(&self.machine_ignition()?)
            .context("serialising the Ignition config")?;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# longshore for the {role} pool: rendered by `longshore generate machineconfig`."
        );
        let _ = writeln!(s, "apiVersion: machineconfiguration.openshift.io/v1");
        let _ = writeln!(s, "kind: MachineConfig");
        let _ = writeln!(s, "metadata:");
        let _ = writeln!(s, "  name: 50-{role}-longshore");
        let _ = writeln!(s, "  labels:");
        let _ = writeln!(s, "    machineconfiguration.openshift.io/role: {role}");
        let _ = writeln!(s, "spec:");
        let _ = writeln!(s, "  config: {config}");
        Ok(s)
    }

    /// The Butane source of [`NodeConfig::ignition`] (variant `fcos` 1.5.0 gives Ignition
    /// spec 3.4.0, 1.4.0 gives 3.3.0).
    pub fn butane(&self) -> Result<String> {
        self.check()?;
        let version = if self.ignition_version == "3.4.0" {
            "1.5.0"
        } else {
            "1.4.0"
        };
        let mut s = String::new();
        let _ = writeln!(s, "# longshore on an RHEL CoreOS node: rendered by `longshore generate ignition --butane`.");
        let _ = writeln!(s, "variant: fcos");
        let _ = writeln!(s, "version: {version}");
        let _ = writeln!(s, "storage:");
        let _ = writeln!(s, "  files:");
        let _ = writeln!(s, "    - path: {NODE_BINARY}");
        let _ = writeln!(s, "      mode: 0755");
        let _ = writeln!(s, "      overwrite: true");
        let _ = writeln!(s, "      contents:");
        let _ = writeln!(s, "        source: {}", self.binary_url);
        let _ = writeln!(s, "        verification:");
        let _ = writeln!(s, "          hash: sha512-{}", self.binary_sha512);
        for (path, mode, text) in self.files() {
            let _ = writeln!(s, "    - path: {path}");
            let _ = writeln!(s, "      mode: 0{mode:o}");
            let _ = writeln!(s, "      overwrite: true");
            let _ = writeln!(s, "      contents:");
            let _ = writeln!(s, "        inline: |");
            push_block(&mut s, &text, 10);
        }
        let _ = writeln!(s, "systemd:");
        let _ = writeln!(s, "  units:");
        let _ = writeln!(s, "    - name: longshore.service");
        let _ = writeln!(s, "      enabled: true");
        let _ = writeln!(s, "      contents: |");
        push_block(&mut s, &self.unit(), 8);
        Ok(s)
    }
}

/// The pools a MachineConfig may name here.
pub fn check_role(role: &str) -> Result<()> {
    if role.is_empty()
        || !role
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!("role {role:?}: a pool name is lowercase letters, digits and '-' (worker, master)");
    }
    Ok(())
}

/// The unit with `binary` as the program.
pub fn unit_for(binary: &str) -> String {
    UNIT.replace(
        "ExecStart=/usr/bin/longshore ",
        &format!("ExecStart={binary} "),
    )
}

/// Indents each line of `text` by `indent` spaces, for a YAML literal block.
fn push_block(s: &mut String, text: &str, indent: usize) {
    for line in text.lines() {
        if line.is_empty() {
            s.push('\n');
        } else {
            let _ = writeln!(s, "{:indent$}{line}", "");
        }
    }
}

/// An RFC 2397 data URL holding `text`, percent-encoded.
pub fn data_url(text: &str) -> String {
    let mut s = String::from("data:,");
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            s.push(b as char);
        } else {
            let _ = write!(s, "%{b:02X}");
        }
    }
    s
}

/// The SHA-512 of a file, hex.
pub fn sha512_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha512::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// The running executable, the binary rendered for when none is named.
pub fn this_binary() -> Result<PathBuf> {
    std::env::current_exe().context("finding the running executable")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NodeConfig {
        NodeConfig {
            binary_url: "https://example.com/longshore".into(),
            binary_sha512: "ab".repeat(64),
            ignition_version: "3.3.0".into(),
            extra: vec![],
        }
    }

    #[test]
    fn data_urls_decode_to_the_text() {
        let text = "a b/c\n%ü";
        let url = data_url(text);
        assert_eq!(url, "data:,a%20b%2Fc%0A%25%C3%BC");
    }

    #[test]
    fn the_unit_runs_the_binary_where_it_is_installed() {
        let u = cfg().unit();
        assert!(
            u.contains("ExecStart=/usr/local/bin/longshore daemon"),
            "{u}"
        );
        assert!(!u.contains("/usr/bin/longshore"), "{u}");
    }

    #[test]
    fn ignition_carries_the_hash_and_every_file() {
        let ign = cfg().ignition().unwrap();
        let files = ign["storage"]["files"].as_array().unwrap();
        assert_eq!(
            files[0]["contents"]["verification"]["hash"],
            format!("sha512-{}", "ab".repeat(64))
        );
        assert_eq!(files[0]["mode"], 0o755);
        let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
        for p in [
            "/usr/local/bin/longshore",
            "/etc/udev/rules.d/70-longshore.rules",
            "/etc/dbus-1/system.d/io.longshore.Longshore1.conf",
            "/etc/tmpfiles.d/longshore.conf",
            "/etc/longshore/config.d/10-defaults.toml",
        ] {
            assert!(paths.contains(&p), "{p} missing from {paths:?}");
        }
        assert_eq!(ign["systemd"]["units"][0]["enabled"], true);
        let mut bad = cfg();
        bad.binary_url = "file:///tmp/longshore".into();
        assert!(bad.ignition().is_err());
        bad = cfg();
        bad.ignition_version = "3.5.0".into();
        assert!(format!("{:#}", bad.ignition().unwrap_err()).contains("3.3.0, 3.4.0"));
        assert!(check_role("Worker").is_err());
    }
}
