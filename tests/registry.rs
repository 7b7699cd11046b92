//! `bundle create` from a real registry (the distribution registry on loopback): an OCI
//! image and a Docker schema 2 image keep their registry digests through the bundle and
//! the import.

mod common;

use std::process::Command;

use common::fixture;
use common::node::{require, Node};
use common::registry::start_registry;

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
