//! `bundle create` from a real registry (the distribution registry on loopback): an OCI
//! image and a Docker schema 2 image keep their registry digests through the bundle and
//! the import.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fixture;
use common::node::{require, Node};

struct Registry {
    child: Child,
    port: u16,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry(dir: &Path) -> Registry {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("registry.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting docker-registry");
    let reg = Registry { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
            if resp.starts_with("HTTP/1.") && resp.contains(" 200") {
                return reg;
            }
        }
        assert!(
            Instant::now() < deadline,
            "registry on port {port} did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn skopeo(node: &Node, args: &[&str]) -> String {
    let out = Command::new("skopeo")
        .args(args)
        .envs(node.env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn registry_images_keep_their_digests() {
    if !require(&["skopeo", "docker-registry"]) {
        return;
    }
    let node = Node::new();
    let reg = start_registry(node.tmp.path());
    let host = format!("127.0.0.1:{}", reg.port);
    // The registry speaks plain HTTP, hence --tls-verify=false throughout.

    let layout = fixture::write_oci_layout(
        &node.scratch("layout"),
        &fixture::small_images("example.com/reg", 2),
    )
    .unwrap();
    let oci_ref = format!("{host}/edge/oci:1");
    let v2s2_ref = format!("{host}/edge/v2s2:1");
    skopeo(
        &node,
        &[
            "copy",
            "-q",
            "--dest-tls-verify=false",
            &layout.transport_ref(&layout.images[0].reference),
            &format!("docker://{oci_ref}"),
        ],
    );
    skopeo(
        &node,
        &[
            "copy",
            "-q",
            "--dest-tls-verify=false",
            "--format",
            "v2s2",
            &layout.transport_ref(&layout.images[1].reference),
            &format!("docker://{v2s2_ref}"),
        ],
    );
    let digest_of = |r: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(&skopeo(
            &node,
            &["inspect", "--tls-verify=false", &format!("docker://{r}")],
        ))
        .unwrap();
        v["Digest"].as_str().unwrap().to_string()
    };
    let oci_digest = digest_of(&oci_ref);
    let v2s2_digest = digest_of(&v2s2_ref);
    assert_eq!(oci_digest, layout.images[0].manifest_digest);
    assert_ne!(
        v2s2_digest, layout.images[1].manifest_digest,
        "the registry copy was converted to schema 2"
    );

    let bundle = node.scratch("from-registry.tar.zst");
    node.ok(&[
        "bundle",
        "create",
        "--tls-verify=false",
        "-o",
        bundle.to_str().unwrap(),
        &format!("docker://{oci_ref}"),
        &format!("docker://{v2s2_ref}"),
    ]);
    let listing = Command::new("tar")
        .arg("-xOf")
        .arg(&bundle)
        .arg("bundle.json")
        .output()
        .unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    assert_eq!(meta["images"][0]["digest"], oci_digest.as_str());
    assert_eq!(
        meta["images"][0]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(meta["images"][1]["digest"], v2s2_digest.as_str());
    assert_eq!(
        meta["images"][1]["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );

    node.ok(&["import", bundle.to_str().unwrap()]);
    assert_eq!(
        node.inspect_digest(&oci_ref).as_deref(),
        Some(oci_digest.as_str())
    );
    assert_eq!(
        node.inspect_digest(&v2s2_ref).as_deref(),
        Some(v2s2_digest.as_str())
    );
    let v2s2_repo = v2s2_ref.rsplit_once(':').unwrap().0;
    assert!(node
        .store_names()
        .contains(&format!("{v2s2_repo}@{v2s2_digest}")));
}
