//! A cluster of the test's own: nodes in network namespaces on one LAN, each with its
//! own daemon, store, cache and registries.conf, and an upstream registry
//! (docker-registry) on the LAN's last host.
#![allow(dead_code)]

use std::fs;
use std::net::IpAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::daemon::Daemon;
use super::fixture::{FixtureImage, Layout};
use super::netns::Lan;
use super::node::Node;
use super::registry::{start_registry_with, Options, Registry};
use super::usermgr::BareBus;

/// One node: its sysroot, its namespace and its daemon.
pub struct ClusterNode {
    pub node: Node,
    pub ns: String,
    pub ip: IpAddr,
    pub daemon: Option<Daemon>,
    _bus: BareBus,
}

impl ClusterNode {
    pub fn start(&mut self) {
        self.daemon = Some(Daemon::start_in(&self.node, Some(&self.ns)));
    }

    pub fn log(&self) -> String {
        self.daemon.as_ref().map(|d| d.log()).unwrap_or_default()
    }

    /// skopeo in the node's namespace, with the node's /etc/containers in place of the
    /// machine's (in a mount namespace of its own).
    pub fn skopeo(&self, args: &[&str]) -> Output {
        let etc = self.node.sysroot.join("etc/containers");
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "unshare",
                "-m",
                "--propagation",
                "private",
            ])
            .args([
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/containers && exec skopeo \"$@\"",
            ])
            .arg(&etc)
            .args(args)
            .output()
            .unwrap()
    }

    /// Pulls `img` by digest into a `dir:` as CRI-O would; the copy's manifest digest.
    pub fn pull(&self, upstream: &str, img: &FixtureImage) -> Result<String, String> {
        let dest = self
            .node
            .scratch(&format!("pull-{}", &img.manifest_digest[7..19]));
        let _ = fs::remove_dir_all(&dest);
        let out = self.skopeo(&[
            "copy",
            "-q",
            &format!(
                "docker://{}@{}",
                repo_at(upstream, img),
                img.manifest_digest
            ),
            &format!("dir:{}", dest.display()),
        ]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let m = fs::read(dest.join("manifest.json")).unwrap();
        Ok(format!(
            "sha256:{}",
            longshore::oci::digest::Digest::of(&m).hex()
        ))
    }

    pub fn board(&self) -> serde_json::Value {
        let p = self.node.sysroot.join("run/longshore/share.json");
        fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// `UPSTREAM/share/imgN`, the repository of a fixture image on the upstream registry.
pub fn repo_at(upstream: &str, img: &FixtureImage) -> String {
    let path = img.reference.split_once('/').unwrap().1;
    format!("{upstream}/{}", path.rsplit_once(':').unwrap().0)
}

/// The LAN's last host runs the upstream registry; the others are nodes, each started.
pub fn cluster(lan: &Lan, extra: &str) -> (Vec<ClusterNode>, Upstream) {
    let reg = upstream(lan);
    (nodes(lan, &reg, extra), reg)
}

/// The upstream registry and its data, removed when dropped.
pub struct Upstream {
    pub reg: Registry,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Upstream {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.reg
    }
}

/// The upstream registry, on the LAN's last host, logging its requests.
pub fn upstream(lan: &Lan) -> Upstream {
    let (up_ns, up_ip) = lan.hosts.last().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let reg = start_registry_with(
        dir.path(),
        &Options {
            log: true,
            netns: Some((up_ns.name.clone(), *up_ip)),
            ..Options::default()
        },
    );
    Upstream { reg, _dir: dir }
}

/// A node, started, on each of the LAN's hosts but the last, with `extra` in `[share]`.
pub fn nodes(lan: &Lan, reg: &Registry, extra: &str) -> Vec<ClusterNode> {
    some_nodes(lan, reg, extra, lan.hosts.len() - 1)
}

/// A node, started, on each of the LAN's first `n` hosts (all named in `bootstrap`).
pub fn some_nodes(lan: &Lan, reg: &Registry, extra: &str, n: usize) -> Vec<ClusterNode> {
    nodes_with(lan, reg, extra, n, None)
}

/// [`some_nodes`], with a configuration fragment read after the cluster's (`late`).
pub fn nodes_with(
    lan: &Lan,
    reg: &Registry,
    extra: &str,
    n: usize,
    late: Option<&str>,
) -> Vec<ClusterNode> {
    let key = longshore::share::auth::ClusterKey::generate().unwrap();
    let members: Vec<&(super::netns::Netns, IpAddr)> =
        lan.hosts[..lan.hosts.len() - 1].iter().collect();
    let bootstrap: Vec<String> = members
        .iter()
        .map(|(_, ip)| format!("\"{ip}:5051\""))
        .collect();
    let mut nodes = Vec::new();
    for (ns, ip) in members.into_iter().take(n) {
        let bus = BareBus::start();
        let mut node = Node::new();
        node.env
            .push(("DBUS_SESSION_BUS_ADDRESS".into(), bus.address.clone()));
        node.write_config(
            "50-cluster.toml",
            &format!(
                "bus = \"session\"\n[crio]\nreload = false\n\
                 [share]\nenabled = true\nlocal = \"127.0.0.1:5050\"\npeer = \"{ip}:5051\"\n\
                 bootstrap = [{}]\nkey_file = \"/etc/longshore/cluster.key\"\n\
                 registries = [\"{}\"]\n{extra}",
                bootstrap.join(", "),
                reg.addr
            ),
        );
        if let Some(text) = late {
            node.write_config("60-late.toml", text);
        }
        let etc = node.sysroot.join("etc");
        fs::create_dir_all(etc.join("containers")).unwrap();
        fs::create_dir_all(etc.join("longshore")).unwrap();
        fs::copy(
            "/etc/containers/policy.json",
            etc.join("containers/policy.json"),
        )
        .unwrap();
        fs::write(
            etc.join("containers/registries.conf"),
            format!(
                "[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
                reg.addr
            ),
        )
        .unwrap();
        let kp = etc.join("longshore/cluster.key");
        fs::write(&kp, &key).unwrap();
        fs::set_permissions(&kp, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let mut n = ClusterNode {
            node,
            ns: ns.name.clone(),
            ip: *ip,
            daemon: None,
            _bus: bus,
        };
        n.start();
        nodes.push(n);
    }
    nodes
}

/// Waits until every running node knows every other one (the board counts connections).
pub fn wait_joined(nodes: &[ClusterNode]) {
    let running = nodes.iter().filter(|n| n.daemon.is_some()).count();
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in nodes.iter().filter(|n| n.daemon.is_some()) {
        loop {
            let b = n.board();
            let connected = b["peers"]
                .as_array()
                .map_or(0, |p| p.iter().filter(|p| p["connected"] == true).count());
            if connected >= running - 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} knows {connected} of {} peers: {b}\n{}",
                n.ip,
                running - 1,
                n.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Pushes every image of `layout` to the upstream registry, from its namespace.
pub fn push(lan: &Lan, reg: &Registry, layout: &Layout) {
    let (up_ns, _) = lan.hosts.last().unwrap();
    for img in &layout.images {
        let out = up_ns
            .command("skopeo")
            .args(["copy", "-q", "--dest-tls-verify=false"])
            .arg(layout.transport_ref(&img.reference))
            .arg(format!("docker://{}:1", repo_at(&reg.addr, img)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every digest an image's pull asks for: manifest, config, layers (hex).
pub fn digests(img: &FixtureImage) -> Vec<String> {
    std::iter::once(&img.manifest_digest)
        .chain(std::iter::once(&img.config_digest))
        .chain(img.layers.iter().map(|l| &l.digest))
        .map(|d| d.trim_start_matches("sha256:").to_string())
        .collect()
}
