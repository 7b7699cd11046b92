//! Sets that fetch, against real registries (docker-registry on loopback): a set file's
//! images come from the registry into the cache, then into the store, pinned; mirrors
//! come before the source, a blocked source is never contacted, credentials come from
//! the node's pull secret and a refusal is the set's `Degraded` reason; policy.json is
//! obeyed; cut connections and a killed daemon cost no byte twice.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use common::fixture::{self, ImageSpec, LayerSpec, Layout};
use common::node::{require, Node};
use common::registry::{start_registry, start_registry_with, Options, Registry};

const TOOLS: &[&str] = &["skopeo", "docker-registry"];

/// Two small images sharing a base layer, written as an OCI layout.
fn layout(node: &Node, name: &str, sizes: (usize, usize)) -> Layout {
    fixture::write_oci_layout(
        &node.scratch(name),
        &[
            ImageSpec {
                reference: "example.com/preload/a:1".into(),
                layers: vec![
                    LayerSpec {
                        seed: 1,
                        size: sizes.0,
                    },
                    LayerSpec {
                        seed: 2,
                        size: sizes.1,
                    },
                ],
            },
            ImageSpec {
                reference: "example.com/preload/b:1".into(),
                layers: vec![
                    LayerSpec {
                        seed: 1,
                        size: sizes.0,
                    },
                    LayerSpec {
                        seed: 3,
                        size: sizes.1,
                    },
                ],
            },
        ],
    )
    .unwrap()
}

/// Pushes every image of `layout` to `host/preload/<a|b>:1`.
fn push(layout: &Layout, host: &str, extra: &[&str]) {
    for img in &layout.images {
        let repo = img.reference.trim_start_matches("example.com/");
        let st = Command::new("skopeo")
            .args(["copy", "-q", "--dest-tls-verify=false"])
            .args(extra)
            .arg(layout.transport_ref(&img.reference))
            .arg(format!("docker://{host}/{repo}"))
            .status()
            .unwrap();
        assert!(st.success(), "skopeo copy to {host}");
    }
}

/// The references a set names for the images of `layout` at `host`: a by digest, b by
/// tag.
fn references(layout: &Layout, host: &str) -> Vec<String> {
    vec![
        format!("{host}/preload/a@{}", layout.images[0].manifest_digest),
        format!("{host}/preload/b:1"),
    ]
}

fn write_set(node: &Node, name: &str, images: &[String], extra: &str) {
    let dir = node.sysroot.join("etc/longshore/sets.d");
    fs::create_dir_all(&dir).unwrap();
    let list: Vec<String> = images.iter().map(|i| format!("{i:?}")).collect();
    fs::write(
        dir.join(format!("{name}.toml")),
        format!("images = [{}]\nallow_tags = true\n{extra}", list.join(", ")),
    )
    .unwrap();
}

/// registries.conf naming `host` alone, reached over plain HTTP.
fn plain_http_registry(node: &Node, host: &str) {
    write_registries_conf(
        node,
        &format!("[[registry]]\nlocation = \"{host}\"\ninsecure = true\n"),
    );
}

fn write_registries_conf(node: &Node, text: &str) {
    let etc = node.sysroot.join("etc/containers");
    fs::create_dir_all(&etc).unwrap();
    fs::write(etc.join("registries.conf"), text).unwrap();
}

fn pins(node: &Node) -> BTreeSet<String> {
    let p = node
        .sysroot
        .join("etc/crio/crio.conf.d/99-longshore-pinned-images.conf");
    let Ok(text) = fs::read_to_string(p) else {
        return BTreeSet::new();
    };
    let v: toml::Value = toml::from_str(&text).unwrap();
    v["crio"]["image"]["pinned_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn fetch_json(node: &Node, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["fetch", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&node.ok(&all)).unwrap()
}

fn set_json(node: &Node, name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&node.ok(&["sets", "--json"])).unwrap();
    v["sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no set {name} in {v}"))
}

fn condition<'a>(set: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    set["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap()
}

fn partials(node: &Node) -> Vec<String> {
    fs::read_dir(node.state_dir().join("cache/blobs/sha256"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".partial"))
                .collect()
        })
        .unwrap_or_default()
}

fn logged(dir: &Path) -> Registry {
    start_registry_with(
        dir,
        &Options {
            log: true,
            ..Options::default()
        },
    )
}

#[test]
fn a_set_file_brings_its_images_from_a_registry_into_the_store_pinned() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let reg = start_registry(&node.scratch("registry"));
    let host = format!("127.0.0.1:{}", reg.port);
    let lay = layout(&node, "layout", (300_000, 20_000));
    push(&lay, &host, &[]);
    plain_http_registry(&node, &host);
    let refs = references(&lay, &host);
    write_set(&node, "edge", &refs, "");

    let before = set_json(&node, "edge");
    assert_eq!(condition(&before, "Ready")["status"], false);
    assert!(
        condition(&before, "Degraded")["message"]
            .as_str()
            .unwrap()
            .contains("fetched from registries"),
        "{before}"
    );

    let r = fetch_json(&node, &[]);
    assert_eq!(r["fetched"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["missing"], 0, "{r}");
    assert!(r["failures"].as_object().unwrap().is_empty(), "{r}");
    // The shared base layer crossed once.
    let blob_bytes: u64 = lay
        .images
        .iter()
        .flat_map(|i| i.layers.iter().map(|l| (l.digest.clone(), l.size)))
        .collect::<std::collections::BTreeMap<_, _>>()
        .values()
        .sum();
    let downloaded = r["downloaded"].as_u64().unwrap();
    assert!(
        downloaded >= blob_bytes && downloaded < blob_bytes + 10_000,
        "downloaded {downloaded}, layers {blob_bytes}"
    );

    // In the store under the set's names and their digest names, and pinned.
    let names: BTreeSet<String> = node.store_names().into_iter().collect();
    let a = format!("{host}/preload/a@{}", lay.images[0].manifest_digest);
    let b_digest = format!("{host}/preload/b@{}", lay.images[1].manifest_digest);
    for n in [&a, &b_digest, &refs[1]] {
        assert!(names.contains(n), "{n} not stored: {names:?}");
    }
    let pinned = pins(&node);
    for n in [&a, &b_digest, &refs[1]] {
        assert!(pinned.contains(n), "{n} not pinned: {pinned:?}");
    }
    let after = set_json(&node, "edge");
    assert_eq!(condition(&after, "Ready")["reason"], "Pinned", "{after}");
    assert!(partials(&node).is_empty());

    // Again: nothing to fetch, nothing crosses the link.
    let again = fetch_json(&node, &[]);
    assert_eq!(again["downloaded"], 0, "{again}");
    assert!(again["fetched"].as_array().unwrap().is_empty(), "{again}");

    // A wiped store comes back from the cache alone, with the registry gone.
    drop(reg);
    let _ = fs::remove_dir_all(node.store_root());
    node.ok(&["sync"]);
    let names: BTreeSet<String> = node.store_names().into_iter().collect();
    assert!(names.contains(&a) && names.contains(&refs[1]), "{names:?}");
}

#[test]
fn a_mirror_comes_before_the_source_and_a_blocked_source_is_never_contacted() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let source = logged(&node.scratch("source"));
    let mirror = logged(&node.scratch("mirror"));
    let src = format!("127.0.0.1:{}", source.port);
    let mir = format!("127.0.0.1:{}", mirror.port);
    let lay = layout(&node, "layout", (50_000, 5_000));
    push(&lay, &src, &[]);
    push(&lay, &mir, &[]);
    let pushed_to_source = source.requests().len();
    write_registries_conf(
        &node,
        &format!(
            "[[registry]]\nlocation = \"{src}\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{mir}\"\ninsecure = true\n"
        ),
    );
    write_set(&node, "edge", &references(&lay, &src), "");
    let r = fetch_json(&node, &[]);
    assert_eq!(r["missing"], 0, "{r}");
    // Stored under the source's names, every byte from the mirror.
    let names = node.store_names();
    assert!(
        names
            .iter()
            .any(|n| n.starts_with(&format!("{src}/preload/a@"))),
        "{names:?}"
    );
    assert_eq!(
        source.requests().len(),
        pushed_to_source,
        "the source was asked: {:?}",
        &source.requests()[pushed_to_source..]
    );
    assert!(
        mirror
            .requests()
            .iter()
            .any(|u| u.contains("/blobs/sha256:")),
        "{:?}",
        mirror.requests()
    );

    // A blocked source, and a mirror that lacks the image: the fetch fails with a
    // clear error, and the source still hears nothing.
    let other = fixture::write_oci_layout(
        &node.scratch("other"),
        &[ImageSpec {
            reference: "example.com/preload/c:1".into(),
            layers: vec![LayerSpec {
                seed: 9,
                size: 4096,
            }],
        }],
    )
    .unwrap();
    for img in &other.images {
        let st = Command::new("skopeo")
            .args(["copy", "-q", "--dest-tls-verify=false"])
            .arg(other.transport_ref(&img.reference))
            .arg(format!("docker://{src}/preload/c:1"))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let pushed = source.requests().len();
    write_registries_conf(
        &node,
        &format!(
            "[[registry]]\nlocation = \"{src}\"\ninsecure = true\nblocked = true\n\
             [[registry.mirror]]\nlocation = \"{mir}\"\ninsecure = true\n"
        ),
    );
    let c = format!("{src}/preload/c@{}", other.images[0].manifest_digest);
    write_set(&node, "more", std::slice::from_ref(&c), "");
    let out = node.run(&["fetch", "--json", "more"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &r["failures"][&c];
    assert_eq!(f["reason"], "NotFound", "{r}");
    assert!(
        f["message"].as_str().unwrap().contains(&mir),
        "the error names the mirror tried: {r}"
    );
    assert_eq!(
        source.requests().len(),
        pushed,
        "a blocked source was contacted: {:?}",
        &source.requests()[pushed..]
    );
    assert!(partials(&node).is_empty());
}

#[test]
fn credentials_come_from_the_pull_secret_and_a_refusal_degrades_the_set() {
    if !require(&["skopeo", "docker-registry", "htpasswd"]) {
        return;
    }
    let node = Node::new();
    let reg = start_registry_with(
        &node.scratch("registry"),
        &Options {
            users: vec![("puller".into(), "s3cret".into())],
            ..Options::default()
        },
    );
    let host = format!("127.0.0.1:{}", reg.port);
    let lay = layout(&node, "layout", (40_000, 4_000));
    push(&lay, &host, &["--dest-creds", "puller:s3cret"]);
    plain_http_registry(&node, &host);
    write_set(&node, "edge", &references(&lay, &host), "");
    let kubelet = node.sysroot.join("var/lib/kubelet");
    fs::create_dir_all(&kubelet).unwrap();
    let secret = |user: &str, pass: &str| {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        fs::write(
            kubelet.join("config.json"),
            format!("{{\"auths\":{{\"{host}\":{{\"auth\":\"{auth}\"}}}}}}"),
        )
        .unwrap();
    };

    // Wrong credentials: AuthRefused, no retry storm, nothing stored.
    secret("puller", "wrong");
    let out = node.run(&["fetch", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for reference in references(&lay, &host) {
        assert_eq!(r["failures"][&reference]["reason"], "AuthRefused", "{r}");
    }
    let msg = serde_json::to_string(&r).unwrap();
    assert!(!msg.contains("wrong"), "a secret in the report: {msg}");
    assert!(node.store_names().is_empty());

    // The board stays while a fetcher lives; the daemon's sets say Degraded with the
    // reason. Here the command has exited, so its board is gone: the set says missing.
    let set = set_json(&node, "edge");
    assert_eq!(condition(&set, "Ready")["status"], false);

    // The right ones: in, pinned.
    secret("puller", "s3cret");
    let r = fetch_json(&node, &[]);
    assert_eq!(r["missing"], 0, "{r}");
    assert_eq!(
        condition(&set_json(&node, "edge"), "Ready")["reason"],
        "Pinned"
    );
}

#[test]
fn an_image_the_policy_refuses_is_not_fetched() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let reg = logged(&node.scratch("registry"));
    let host = format!("127.0.0.1:{}", reg.port);
    let lay = layout(&node, "layout", (20_000, 2_000));
    push(&lay, &host, &[]);
    let pushed = reg.requests().len();
    plain_http_registry(&node, &host);
    let refs = references(&lay, &host);
    write_set(&node, "edge", &refs, "");
    fs::write(
        node.sysroot.join("etc/containers/policy.json"),
        format!(
            r#"{{"default":[{{"type":"insecureAcceptAnything"}}],
                "transports":{{"docker":{{"{host}/preload/b":[{{"type":"reject"}}]}}}}}}"#
        ),
    )
    .unwrap();
    let out = node.run(&["fetch", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["failures"][&refs[1]]["reason"], "PolicyRefused", "{r}");
    assert!(r["failures"].get(&refs[0]).is_none(), "{r}");
    // a came in; b was never asked for.
    let names = node.store_names();
    assert!(names.iter().any(|n| n == &refs[0]), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("preload/b")), "{names:?}");
    assert!(
        !reg.requests()[pushed..]
            .iter()
            .any(|u| u.contains("preload/b")),
        "{:?}",
        reg.requests()
    );
}

#[test]
fn a_set_that_says_fetch_false_is_left_alone() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    write_set(
        &node,
        "manual",
        &["127.0.0.1:1/preload/a:1".to_string()],
        "fetch = false\n",
    );
    let e = node.fails(&["fetch", "manual"], 1);
    assert!(e.contains("fetch = false"), "{e}");
    let r = fetch_json(&node, &[]);
    assert_eq!(r["fetched"].as_array().unwrap().len(), 0, "{r}");
    // A node that turns fetching off contacts no registry, even when asked.
    node.write_config("60-nofetch.toml", "[fetch]\nenabled = false\n");
    let e = node.fails(&["fetch"], 1);
    assert!(e.contains("[fetch] enabled = false"), "{e}");
}

#[test]
fn tls_is_verified_against_certs_d_and_an_unknown_ca_is_refused_at_once() {
    if !require(&["skopeo", "docker-registry", "openssl"]) {
        return;
    }
    let node = Node::new();
    let (ca, cert, key) = common::registry::test_ca(node.tmp.path());
    let reg = start_registry_with(
        &node.scratch("registry"),
        &Options {
            tls: Some((cert, key)),
            ..Options::default()
        },
    );
    let host = format!("127.0.0.1:{}", reg.port);
    let lay = layout(&node, "layout", (30_000, 3_000));
    push(&lay, &host, &[]);
    // No registries.conf at all: the registry is reached over TLS, and its CA is not
    // known yet.
    write_set(&node, "edge", &references(&lay, &host), "");
    let t = std::time::Instant::now();
    let out = node.run(&["fetch", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &r["failures"][&references(&lay, &host)[0]];
    assert!(f["message"].as_str().unwrap().contains("TLS"), "{r}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "a certificate refusal was retried"
    );
    // Its CA in certs.d: in.
    let dir = node.sysroot.join("etc/containers/certs.d").join(&host);
    fs::create_dir_all(&dir).unwrap();
    fs::copy(&ca, dir.join("ca.crt")).unwrap();
    let r = fetch_json(&node, &[]);
    assert_eq!(r["missing"], 0, "{r}");
    // A stray key without its certificate is an error that names the file.
    fs::write(dir.join("client.key"), "x").unwrap();
    write_set(&node, "more", &[format!("{host}/preload/a:1")], "");
    let out = node.run(&["fetch", "--json", "more"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("client.key"), "{text}");
}

/// Bytes of the distinct blobs (configs and layers) of `layout`'s images.
fn blob_bytes(layout: &Layout) -> u64 {
    let mut seen = std::collections::BTreeMap::new();
    for i in &layout.images {
        for l in &i.layers {
            seen.insert(l.digest.clone(), l.size);
        }
        let config = layout.blob_path(&i.config_digest);
        seen.insert(i.config_digest.clone(), fs::metadata(config).unwrap().len());
    }
    seen.values().sum()
}

#[test]
fn a_link_cut_every_megabyte_still_brings_the_set_in_and_no_byte_crosses_twice() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let reg = start_registry(&node.scratch("registry"));
    // Every blob response is cut after 1 MiB, however often it is asked for again.
    let proxy = common::proxy::start_proxy(
        reg.port,
        common::proxy::Fault::CutAfter {
            bytes: 1 << 20,
            times: usize::MAX,
        },
    );
    let host = format!("127.0.0.1:{}", proxy.port);
    let lay = layout(&node, "layout", (6 << 20, 3 << 20));
    push(&lay, &format!("127.0.0.1:{}", reg.port), &[]);
    plain_http_registry(&node, &host);
    write_set(&node, "edge", &references(&lay, &host), "");
    let r = fetch_json(&node, &[]);
    assert_eq!(r["missing"], 0, "{r}");
    let size = blob_bytes(&lay);
    let crossed = proxy.body_bytes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        crossed as f64 <= size as f64 * 1.05,
        "{crossed} bytes crossed for a set of {size}"
    );
    assert!(crossed >= size, "{crossed} < {size}");
    // It was cut: several requests asked for the rest of a blob.
    // It was cut: each blob was asked for again at each MiB it reached.
    let resumed = proxy
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.to_ascii_lowercase().contains("range: bytes="))
        .count();
    let cuts: u64 = lay
        .images
        .iter()
        .flat_map(|i| i.layers.iter().map(|l| (l.digest.clone(), l.size)))
        .collect::<std::collections::BTreeMap<_, _>>()
        .values()
        .map(|s| (s - 1) >> 20)
        .sum();
    assert!(cuts >= 2, "the layers are too small to be cut: {cuts}");
    assert!(
        resumed as u64 >= cuts,
        "{resumed} resumed requests, {cuts} cuts"
    );
    assert!(partials(&node).is_empty());
}

fn wait_for_set(
    node: &Node,
    name: &str,
    secs: u64,
    what: &str,
    mut done: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let out = node.run(&["sets", "--json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if let Some(s) = v["sets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == name)
            {
                if done(s) {
                    return s.clone();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "waited {secs} s for set {name} to be {what}: {s}"
                );
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn the_daemon_fetches_over_a_cut_link_in_the_background_and_resumes_after_it_is_killed_mid_blob() {
    if !require(&[
        "skopeo",
        "docker-registry",
        "dbus-daemon",
        "systemctl",
        "busctl",
    ]) {
        return;
    }
    let (_um, node) = common::usermgr::UserManager::with_crio();
    let reg = start_registry(&node.scratch("registry"));
    // A slow link, so the daemon can be killed in the middle of the large layer, that
    // also cuts every blob response after 1.5 MiB.
    let proxy = common::proxy::start_proxy(
        reg.port,
        common::proxy::Fault::SlowCut {
            bytes_per_sec: 2 << 20,
            bytes: 3 << 19,
        },
    );
    let host = format!("127.0.0.1:{}", proxy.port);
    let lay = layout(&node, "layout", (8 << 20, 100_000));
    push(&lay, &format!("127.0.0.1:{}", reg.port), &[]);
    plain_http_registry(&node, &host);
    write_set(&node, "edge", &references(&lay, &host), "");

    let daemon = common::daemon::Daemon::start(&node);
    let big = lay.images[0].layers[0]
        .digest
        .trim_start_matches("sha256:")
        .to_string();
    let partial = node
        .state_dir()
        .join(format!("cache/blobs/sha256/{big}.partial"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while fs::metadata(&partial).map_or(0, |m| m.len()) < 1 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "no partial grew:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    daemon.kill();
    let kept = fs::metadata(&partial).unwrap().len();
    let layer_size = lay.images[0].layers[0].size;
    assert!(
        kept >= 1 << 20 && kept < layer_size,
        "{kept} of {layer_size}"
    );

    // Started again, it carries on from the partial; meanwhile the set says so.
    let daemon = common::daemon::Daemon::start(&node);
    let mut fetching = None;
    let ready = wait_for_set(&node, "edge", 90, "pinned", |s| {
        let p = condition(s, "Progressing");
        if p["reason"] == "Fetching" {
            fetching = Some(p["message"].as_str().unwrap().to_string());
        }
        condition(s, "Ready")["reason"] == "Pinned"
    });
    let fetching = fetching.unwrap_or_else(|| panic!("never saw Fetching:\n{}", daemon.log()));
    assert!(fetching.contains(" of "), "{fetching}");
    assert_eq!(condition(&ready, "Degraded")["status"], false, "{ready}");
    let size = blob_bytes(&lay);
    let crossed = proxy.body_bytes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        crossed as f64 <= size as f64 * 1.05,
        "{crossed} bytes crossed for a set of {size}"
    );
    let heads = proxy.requests.lock().unwrap().clone();
    assert!(
        heads.iter().any(|h| h.contains(&big)
            && h.to_ascii_lowercase()
                .contains(&format!("range: bytes={kept}-"))),
        "the large layer was not resumed at {kept}: {heads:?}"
    );
    assert!(pins(&node).contains(&references(&lay, &host)[1]));
    drop(daemon);
}

#[test]
fn the_daemon_says_why_a_set_cannot_be_fetched_and_fetch_goes_through_it() {
    if !require(&[
        "skopeo",
        "docker-registry",
        "htpasswd",
        "dbus-daemon",
        "systemctl",
    ]) {
        return;
    }
    let (_um, node) = common::usermgr::UserManager::with_crio();
    let reg = start_registry_with(
        &node.scratch("registry"),
        &Options {
            users: vec![("puller".into(), "s3cret".into())],
            ..Options::default()
        },
    );
    let host = format!("127.0.0.1:{}", reg.port);
    let lay = layout(&node, "layout", (40_000, 4_000));
    push(&lay, &host, &["--dest-creds", "puller:s3cret"]);
    plain_http_registry(&node, &host);
    let kubelet = node.sysroot.join("var/lib/kubelet");
    fs::create_dir_all(&kubelet).unwrap();
    let secret = |pass: &str| {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("puller:{pass}"));
        fs::write(
            kubelet.join("config.json"),
            format!("{{\"auths\":{{\"{host}\":{{\"auth\":\"{auth}\"}}}}}}"),
        )
        .unwrap();
    };
    secret("wrong");
    write_set(&node, "edge", &references(&lay, &host), "");
    let _daemon = common::daemon::Daemon::start(&node);
    let degraded = wait_for_set(&node, "edge", 30, "degraded", |s| {
        condition(s, "Degraded")["reason"] == "AuthRefused"
    });
    let msg = condition(&degraded, "Degraded")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains(&references(&lay, &host)[0]) && msg.contains("since"),
        "{msg}"
    );
    assert!(!msg.contains("wrong"), "{msg}");

    // Fixed: `longshore fetch` asks the daemon, which fetches now and answers.
    secret("s3cret");
    let r = fetch_json(&node, &["edge"]);
    assert_eq!(r["missing"], 0, "{r}");
    let set = wait_for_set(&node, "edge", 10, "pinned", |s| {
        condition(s, "Ready")["reason"] == "Pinned"
    });
    assert_eq!(condition(&set, "Degraded")["status"], false, "{set}");
}

#[test]
fn a_set_that_does_not_fit_is_refused_before_its_first_blob_with_the_numbers() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let reg = logged(&node.scratch("registry"));
    let host = format!("127.0.0.1:{}", reg.port);
    let lay = layout(&node, "layout", (200_000, 20_000));
    push(&lay, &host, &[]);
    let pushed = reg.requests().len();
    plain_http_registry(&node, &host);
    write_set(&node, "edge", &references(&lay, &host), "");
    node.write_config("60-floor.toml", "[store]\nmin_free_space = \"1000TiB\"\n");
    let out = node.run(&["fetch", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for reference in references(&lay, &host) {
        let f = &r["failures"][&reference];
        assert_eq!(f["reason"], "NoSpace", "{r}");
        let m = f["message"].as_str().unwrap();
        assert!(
            m.contains("must stay free") && m.contains("twice their compressed size"),
            "{m}"
        );
    }
    let asked: Vec<String> = reg.requests()[pushed..].to_vec();
    assert!(asked.iter().any(|u| u.contains("/manifests/")), "{asked:?}");
    assert!(
        !asked.iter().any(|u| u.contains("/blobs/")),
        "a blob before the check: {asked:?}"
    );
    assert!(partials(&node).is_empty());
    let index = node.state_dir().join("cache/index.json");
    let named = fs::read_to_string(index).unwrap_or_default();
    assert!(!named.contains("preload"), "{named}");
}

/// A fake OpenShift release image in an OCI layout under `dir`, named `release:1`: a
/// config with the `io.openshift.release` label, and one layer holding
/// `release-manifests/image-references`, an ImageStream naming `payload`. Returns the
/// layout's `oci:` reference and the manifest digest.
fn release_image(dir: &Path, payload: &[String]) -> (String, String) {
    use sha2::Digest as _;
    let sha = |b: &[u8]| format!("sha256:{}", hex(&sha2::Sha256::digest(b)));
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = sha(b);
        fs::write(blobs.join(d.trim_start_matches("sha256:")), b).unwrap();
        d
    };
    let tags: Vec<String> = payload
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(r#"{{"name":"component-{i}","from":{{"kind":"DockerImage","name":"{p}"}}}}"#)
        })
        .collect();
    let stream = format!(
        r#"{{"kind":"ImageStream","apiVersion":"image.openshift.io/v1","metadata":{{"name":"4.99.0-test"}},"spec":{{"tags":[{}]}}}}"#,
        tags.join(",")
    );
    let mut tar_bytes = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar_bytes);
        let mut h = tar::Header::new_gnu();
        h.set_size(stream.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, IMAGE_REFERENCES_PATH, stream.as_bytes())
            .unwrap();
        b.finish().unwrap();
    }
    let diff_id = sha(&tar_bytes);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar_bytes).unwrap();
    let layer = gz.finish().unwrap();
    let config = format!(
        r#"{{"architecture":"{}","os":"linux","config":{{"Labels":{{"io.openshift.release":"4.99.0-test"}}}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#,
        fixture::oci_arch()
    );
    let (cd, ld) = (put(config.as_bytes()), put(&layer));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{ld}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let md = put(manifest.as_bytes());
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"release:1"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    (format!("oci:{}:release:1", dir.display()), md)
}

const IMAGE_REFERENCES_PATH: &str = "release-manifests/image-references";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_release_named_by_its_image_expands_to_its_payload() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let reg = start_registry(&node.scratch("registry"));
    let host = format!("127.0.0.1:{}", reg.port);
    let lay = layout(&node, "layout", (30_000, 3_000));
    push(&lay, &host, &[]);
    let payload: Vec<String> = lay
        .images
        .iter()
        .map(|i| {
            format!(
                "{host}/{}@{}",
                i.reference
                    .trim_start_matches("example.com/")
                    .trim_end_matches(":1"),
                i.manifest_digest
            )
        })
        .collect();
    let (src, digest) = release_image(&node.scratch("release"), &payload);
    let st = Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false", &src])
        .arg(format!("docker://{host}/ocp/release:4.99.0-test"))
        .status()
        .unwrap();
    assert!(st.success());
    plain_http_registry(&node, &host);
    let dir = node.sysroot.join("etc/longshore/sets.d");
    fs::create_dir_all(&dir).unwrap();
    // By tag: refused unless the file allows tags.
    fs::write(
        dir.join("upgrade.toml"),
        format!("release = \"{host}/ocp/release:4.99.0-test\"\n"),
    )
    .unwrap();
    let e = node.fails(&["sets"], 1);
    assert!(e.contains("named by tag"), "{e}");
    let release = format!("{host}/ocp/release@{digest}");
    fs::write(
        dir.join("upgrade.toml"),
        format!("release = \"{release}\"\n"),
    )
    .unwrap();

    let before = set_json(&node, "upgrade");
    assert_eq!(before["images"].as_array().unwrap().len(), 1, "{before}");
    let r = fetch_json(&node, &[]);
    assert_eq!(r["missing"], 0, "{r}");
    let set = set_json(&node, "upgrade");
    let images: BTreeSet<String> = set["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["reference"].as_str().unwrap().to_string())
        .collect();
    let mut want: BTreeSet<String> = payload.iter().cloned().collect();
    want.insert(release.clone());
    assert_eq!(images, want, "the release and its payload, each once");
    assert_eq!(condition(&set, "Ready")["reason"], "Pinned", "{set}");
    let pinned = pins(&node);
    assert!(want.iter().all(|w| pinned.contains(w)), "{pinned:?}");

    // A whole upgrade bundle from the release's name: first on a machine with no cache,
    // from the registry; then on this node, from its cache alone, the registry gone.
    // A node with no registry names the release in a set file that does not fetch; the
    // bundle brings the release image, so its payload is read from the cache and the set
    // is complete and pinned.
    let imported = |tar: &Path| {
        let fresh = Node::new();
        let dir = fresh.sysroot.join("etc/longshore/sets.d");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("next.toml"),
            format!("release = \"{release}\"\nfetch = false\n"),
        )
        .unwrap();
        fresh.ok(&["import", tar.to_str().unwrap()]);
        let names: BTreeSet<String> = fresh.store_names().into_iter().collect();
        assert!(want.iter().all(|w| names.contains(w)), "{names:?}");
        let set = set_json(&fresh, "next");
        assert_eq!(set["images"].as_array().unwrap().len(), 3, "{set}");
        assert_eq!(condition(&set, "Ready")["reason"], "Pinned", "{set}");
    };
    let admin = Node::new();
    let from_registry = node.scratch("upgrade-registry.tar");
    let out = admin.ok(&[
        "bundle",
        "create",
        "--tls-verify=false",
        "--release",
        &release,
        "-o",
        from_registry.to_str().unwrap(),
    ]);
    assert!(out.contains("(3 images)"), "{out}");
    imported(&from_registry);
    drop(reg);
    let from_cache = node.scratch("upgrade-cache.tar");
    let out = node.ok(&[
        "bundle",
        "create",
        "--release",
        &release,
        "-o",
        from_cache.to_str().unwrap(),
    ]);
    assert!(out.contains("(3 images)"), "{out}");
    imported(&from_cache);
    // A cache: source the cache lacks is refused by name.
    let e = node.fails(
        &[
            "bundle",
            "create",
            "-o",
            node.scratch("none.tar").to_str().unwrap(),
            &format!("cache:{host}/preload/nothing:1"),
        ],
        1,
    );
    assert!(
        e.contains("does not hold") && e.contains("preload/nothing"),
        "{e}"
    );
    assert!(!node.scratch("none.tar").exists());
}

/// Adds to `layout` a list of images (an OCI index) holding image 0 for this node's
/// platform and image 1 for another, named `multi` in the layout. Returns the list's
/// digest.
fn add_list(layout: &Layout) -> String {
    use sha2::Digest as _;
    let other = if fixture::oci_arch() == "s390x" {
        "ppc64le"
    } else {
        "s390x"
    };
    let entry = |i: &fixture::FixtureImage, arch: &str| {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#,
            i.manifest_digest, i.manifest_size
        )
    };
    let list = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{},{}]}}"#,
        entry(&layout.images[1], other),
        entry(&layout.images[0], fixture::oci_arch()),
    );
    let digest = format!("sha256:{}", hex(&sha2::Sha256::digest(list.as_bytes())));
    fs::write(layout.blob_path(&digest), &list).unwrap();
    let index_path = layout.dir.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest,
            "size": list.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"}
        }));
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    digest
}

#[test]
fn an_image_named_by_its_list_is_stored_and_pinned_as_crio_would_pull_it() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let reg = start_registry(&node.scratch("registry"));
    let host = format!("127.0.0.1:{}", reg.port);
    let lay = layout(&node, "layout", (60_000, 30_000));
    let list = add_list(&lay);
    let st = Command::new("skopeo")
        .args(["copy", "-q", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:multi", lay.dir.display()))
        .arg(format!("docker://{host}/preload/multi:1"))
        .status()
        .unwrap();
    assert!(st.success());
    plain_http_registry(&node, &host);
    // By the list's digest, and by a tag that names the list.
    let by_list = format!("{host}/preload/multi@{list}");
    let by_tag = format!("{host}/preload/multi:1");
    write_set(&node, "multi", &[by_list.clone(), by_tag.clone()], "");
    let r = fetch_json(&node, &[]);
    assert_eq!(r["missing"], 0, "{r}");
    // Only this platform's image crossed: image 1's own layer did not.
    let own = |i: usize| lay.images[i].layers[1].size;
    let downloaded = r["downloaded"].as_u64().unwrap();
    let base = lay.images[0].layers[0].size;
    assert!(
        downloaded >= base + own(0) && downloaded < base + own(0) + own(1),
        "downloaded {downloaded}"
    );
    // The store knows the image by the list's digest under both names, as a pull by the
    // list gives it.
    let names: BTreeSet<String> = node.store_names().into_iter().collect();
    assert_eq!(
        node.inspect_digest(&by_list).as_deref(),
        Some(list.as_str())
    );
    let images: serde_json::Value = serde_json::from_slice(
        &fs::read(node.store_root().join("overlay-images/images.json")).unwrap(),
    )
    .unwrap();
    let holding = |n: &str| {
        images
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["names"].as_array().unwrap().iter().any(|x| x == n))
            .unwrap_or_else(|| panic!("{n} not stored: {names:?}"))
            .clone()
    };
    assert_eq!(holding(&by_list)["id"], holding(&by_tag)["id"]);
    assert_eq!(holding(&by_tag)["digest"], list.as_str(), "{images}");
    assert!(
        !names
            .iter()
            .any(|n| n.contains(&lay.images[0].manifest_digest)),
        "stored under the platform's digest too: {names:?}"
    );
    let set = set_json(&node, "multi");
    assert_eq!(condition(&set, "Ready")["reason"], "Pinned", "{set}");
    let pinned = pins(&node);
    assert!(
        pinned.contains(&by_list) && pinned.contains(&by_tag),
        "{pinned:?}"
    );

    // Again: nothing to fetch and nothing to copy.
    let again = fetch_json(&node, &[]);
    assert_eq!(again["downloaded"], 0, "{again}");
    assert_eq!(again["imported"], 0, "{again}");

    // The cache keeps the list and the image through a collection with no room to
    // spare, and the store comes back from it alone.
    node.write_config(
        "60-cap.toml",
        "[cache]\nmax_size = \"0\"\nkeep_imported = \"0s\"\n",
    );
    node.ok(&["cache", "gc"]);
    drop(reg);
    let _ = fs::remove_dir_all(node.store_root());
    node.ok(&["sync"]);
    assert_eq!(
        node.inspect_digest(&by_list).as_deref(),
        Some(list.as_str()),
        "{:?}",
        node.store_names()
    );
}

#[test]
fn an_image_fetched_whole_is_copied_into_the_store_while_the_rest_still_come() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let reg = start_registry(&node.scratch("registry"));
    // A slow link: the large layer of b takes seconds; a is whole at once.
    let proxy = common::proxy::start_proxy(
        reg.port,
        common::proxy::Fault::Slow {
            bytes_per_sec: 1 << 20,
        },
    );
    let host = format!("127.0.0.1:{}", proxy.port);
    let layer = |seed, size| LayerSpec { seed, size };
    let lay = fixture::write_oci_layout(
        &node.scratch("layout"),
        &[
            ImageSpec {
                reference: "example.com/preload/a:1".into(),
                layers: vec![layer(1, 20_000), layer(2, 20_000)],
            },
            ImageSpec {
                reference: "example.com/preload/b:1".into(),
                layers: vec![layer(1, 20_000), layer(3, 4 << 20)],
            },
        ],
    )
    .unwrap();
    push(&lay, &format!("127.0.0.1:{}", reg.port), &[]);
    plain_http_registry(&node, &host);
    let refs = references(&lay, &host);
    write_set(&node, "edge", &refs, "");

    let mut fetch = node.spawn(&["fetch"]);
    let big = lay.images[1].layers[1]
        .digest
        .trim_start_matches("sha256:")
        .to_string();
    let big_blob = node.state_dir().join(format!("cache/blobs/sha256/{big}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // a is in the store while b's large layer is still on its way, and nothing of the
    // set is pinned before all of it is in.
    loop {
        if node.store_names().contains(&refs[0]) {
            break;
        }
        assert!(
            fetch.try_wait().unwrap().is_none(),
            "the fetch ended before a was seen in the store"
        );
        assert!(std::time::Instant::now() < deadline, "a never came");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!big_blob.exists(), "b's large layer was already whole");
    assert!(pins(&node).is_empty(), "pinned before the set was complete");
    let out = fetch.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pinned = pins(&node);
    assert!(
        pinned.contains(&refs[0]) && pinned.contains(&refs[1]),
        "{pinned:?}"
    );
}

#[test]
fn the_proxy_variables_are_obeyed_as_containers_image_obeys_them() {
    if !require(TOOLS) {
        return;
    }
    let mut node = Node::new();
    let reg = start_registry(&node.scratch("registry"));
    let host = format!("127.0.0.1:{}", reg.port);
    let lay = layout(&node, "layout", (30_000, 3_000));
    push(&lay, &host, &[]);
    plain_http_registry(&node, &host);
    let refs = references(&lay, &host);
    let proxy = common::proxy::start_forward_proxy();
    node.env.push((
        "HTTP_PROXY".into(),
        format!("http://127.0.0.1:{}", proxy.port),
    ));
    // Every request goes through the proxy.
    write_set(&node, "a", &refs[..1], "");
    let r = fetch_json(&node, &["a"]);
    assert_eq!(r["missing"], 0, "{r}");
    let seen = proxy.requests.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|l| l.contains(&format!("http://{host}/v2/")) && l.contains("/blobs/")),
        "{seen:?}"
    );
    // NO_PROXY names the registry: the proxy hears nothing more.
    node.env.push(("NO_PROXY".into(), "127.0.0.1".into()));
    let before = proxy.requests.lock().unwrap().len();
    write_set(&node, "b", &refs[1..], "");
    let r = fetch_json(&node, &["b"]);
    assert_eq!(r["missing"], 0, "{r}");
    let seen = proxy.requests.lock().unwrap().clone();
    assert_eq!(seen.len(), before, "{:?}", &seen[before..]);
}

/// `HH:MM-HH:MM`, UTC, from `from` to `to` minutes after now.
fn window_from_now(from: u64, to: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60;
    let at = |m: u64| {
        let m = (now + m) % 1440;
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    format!("{}-{}", at(from), at(to))
}

#[test]
fn outside_the_fetch_windows_the_daemon_waits_and_fetch_runs_at_once() {
    if !require(&["skopeo", "docker-registry", "dbus-daemon", "systemctl"]) {
        return;
    }
    let (_um, node) = common::usermgr::UserManager::with_crio();
    let reg = logged(&node.scratch("registry"));
    let host = format!("127.0.0.1:{}", reg.port);
    let lay = layout(&node, "layout", (30_000, 3_000));
    push(&lay, &host, &[]);
    let pushed = reg.requests().len();
    plain_http_registry(&node, &host);
    write_set(&node, "edge", &references(&lay, &host), "");
    // The window opens in two hours.
    node.write_config(
        "60-windows.toml",
        &format!("[fetch]\nwindows = [\"{}\"]\n", window_from_now(120, 180)),
    );
    let daemon = common::daemon::Daemon::start(&node);
    let waiting = wait_for_set(&node, "edge", 30, "waiting", |s| {
        condition(s, "Progressing")["reason"] == "WaitingForWindow"
    });
    let msg = condition(&waiting, "Progressing")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("next opens in 1") || msg.contains("next opens in 2"),
        "{msg}"
    );
    assert_eq!(
        reg.requests().len(),
        pushed,
        "the registry was asked outside the window: {:?}",
        &reg.requests()[pushed..]
    );
    // An administrator's fetch runs now.
    let r = fetch_json(&node, &["edge"]);
    assert_eq!(r["missing"], 0, "{r}");
    wait_for_set(&node, "edge", 10, "pinned", |s| {
        condition(s, "Ready")["reason"] == "Pinned"
    });
    drop(daemon);
}

#[test]
fn a_busy_registry_is_asked_again_after_a_wait() {
    if !require(TOOLS) {
        return;
    }
    let node = Node::new();
    let reg = start_registry(&node.scratch("registry"));
    // The first three requests get 503: the manifests' first tries, and one more.
    let proxy = common::proxy::start_proxy(reg.port, common::proxy::Fault::BusyFirst { n: 3 });
    let host = format!("127.0.0.1:{}", proxy.port);
    let lay = layout(&node, "layout", (30_000, 3_000));
    push(&lay, &format!("127.0.0.1:{}", reg.port), &[]);
    plain_http_registry(&node, &host);
    write_set(&node, "edge", &references(&lay, &host), "");
    let r = fetch_json(&node, &[]);
    assert_eq!(r["missing"], 0, "{r}");
    let heads = proxy.requests.lock().unwrap().clone();
    let manifests = heads.iter().filter(|h| h.contains("/manifests/")).count();
    assert!(
        manifests >= 3,
        "the manifests were not asked for again: {heads:?}"
    );
}
