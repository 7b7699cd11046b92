//! Fetching blobs from a real registry (docker-registry on loopback) into the cache,
//! through a proxy of the test's own that cuts connections mid-blob or ignores `Range`:
//! every cut blob resumes at the byte it reached, nothing is downloaded twice, and
//! nothing wrong is ever named in the cache.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::fixture::{self, ImageSpec, LayerSpec};
use common::node::{require, Node};
use common::proxy::{start_proxy, Fault};
use common::registry::start_registry;
use longshore::cache::Cache;
use longshore::oci::digest::Digest;
use longshore::paths::HostPaths;
use longshore::registry::client::{Client, Retry};
use longshore::registry::conf::{PullSource, RegistriesConf};

/// A registry holding one image whose first layer is `size` bytes of file content;
/// returns the registry, the image and the layer's (digest, size).
fn registry_with_image(
    node: &Node,
    size: usize,
) -> (common::registry::Registry, String, Digest, u64) {
    let reg = start_registry(node.tmp.path());
    let layout = fixture::write_oci_layout(
        &node.scratch("layout"),
        &[ImageSpec {
            reference: "example.com/fetch/app:1".into(),
            layers: vec![LayerSpec { seed: 77, size }],
        }],
    )
    .unwrap();
    let img = &layout.images[0];
    let target = format!("127.0.0.1:{}/fetch/app:1", reg.port);
    let st = Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(layout.transport_ref(&img.reference))
        .arg(format!("docker://{target}"))
        .status()
        .unwrap();
    assert!(st.success(), "skopeo copy to the registry");
    let layer = &img.layers[0];
    let digest: Digest = layer.digest.parse().unwrap();
    (
        reg,
        format!("fetch/app@{}", img.manifest_digest),
        digest,
        layer.size,
    )
}

fn client(node: &Node) -> Client {
    let retry = Retry {
        attempts: 6,
        first_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
    };
    Client::new(&HostPaths::new(&node.sysroot), retry).unwrap()
}

fn source(port: u16, repo: &str) -> PullSource {
    PullSource {
        reference: format!("127.0.0.1:{port}/{repo}"),
        insecure: true,
        mirror: true,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn cache_files(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache.join("blobs/sha256"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_blob_cut_twice_resumes_at_the_byte_and_is_downloaded_once() {
    if !require(&["skopeo", "docker-registry"]) {
        return;
    }
    let node = Node::new();
    let (reg, repo, digest, size) = registry_with_image(&node, 3 << 20);
    // Cut each of the first two blob responses after 700,000 bytes.
    let proxy = start_proxy(
        reg.port,
        Fault::CutAfter {
            bytes: 700_000,
            times: 2,
        },
    );
    let cache = Cache::new(node.sysroot.join("var/lib/longshore/cache"));
    let got = rt()
        .block_on(client(&node).fetch_blob(&source(proxy.port, &repo), digest, size, &cache))
        .expect("fetch");
    assert_eq!(cache.has(&digest), Some(size));
    cache
        .check(&digest, size)
        .expect("the blob hashes to its name");
    assert_eq!(got.attempts, 3, "{got:?}");
    // Every byte crossed once: what the proxy passed on is exactly the blob.
    assert_eq!(proxy.body_bytes.load(Ordering::SeqCst), size);
    assert_eq!(got.downloaded, size);
    let heads = proxy.requests.lock().unwrap().clone();
    let ranges: Vec<String> = heads
        .iter()
        .filter(|h| h.contains("/blobs/"))
        .map(|h| {
            h.lines()
                .find(|l| l.to_ascii_lowercase().starts_with("range:"))
                .unwrap_or("none")
                .to_ascii_lowercase()
        })
        .collect();
    assert_eq!(
        ranges,
        ["none", "range: bytes=700000-", "range: bytes=1400000-"],
        "{heads:?}"
    );
    assert!(
        cache_files(cache.root())
            .iter()
            .all(|f| !f.ends_with(".partial")),
        "a partial left"
    );
}

#[test]
fn a_partial_left_by_a_stopped_daemon_is_resumed_and_a_server_ignoring_range_restarts_it() {
    if !require(&["skopeo", "docker-registry"]) {
        return;
    }
    let node = Node::new();
    let (reg, repo, digest, size) = registry_with_image(&node, 1 << 20);
    let cache = Cache::new(node.sysroot.join("var/lib/longshore/cache"));
    // A first fetch cut once, with no retry: what a daemon stopped mid-blob leaves.
    let cut = start_proxy(
        reg.port,
        Fault::CutAfter {
            bytes: 300_000,
            times: 1,
        },
    );
    let once = Client::new(
        &HostPaths::new(&node.sysroot),
        Retry {
            attempts: 1,
            ..Retry::default()
        },
    )
    .unwrap();
    let e = rt()
        .block_on(once.fetch_blob(&source(cut.port, &repo), digest, size, &cache))
        .expect_err("a cut with no retry fails");
    assert!(format!("{e:#}").contains("1 attempts"), "{e:#}");
    assert!(cache.has(&digest).is_none(), "named before it was complete");
    assert_eq!(
        cache_files(cache.root()),
        [format!("{}.partial", digest.hex())]
    );

    // A new client (the daemon started again) resumes it.
    let direct = source(reg.port, &repo);
    let got = rt()
        .block_on(client(&node).fetch_blob(&direct, digest, size, &cache))
        .expect("resume");
    assert_eq!(got.resumed_from, 300_000);
    assert_eq!(got.downloaded, size - 300_000);
    cache.check(&digest, size).expect("hashes to its name");

    // A server that answers 200 to a range request: the blob starts again, whole, and
    // is still right.
    cache.remove(&digest).unwrap();
    let cut = start_proxy(
        reg.port,
        Fault::CutAfter {
            bytes: 200_000,
            times: 1,
        },
    );
    let _ = rt().block_on(once.fetch_blob(&source(cut.port, &repo), digest, size, &cache));
    let ignoring = start_proxy(reg.port, Fault::IgnoreRange);
    let got = rt()
        .block_on(client(&node).fetch_blob(&source(ignoring.port, &repo), digest, size, &cache))
        .expect("restart");
    assert_eq!(got.resumed_from, 200_000);
    assert_eq!(got.downloaded, size, "the whole blob, once");
    cache.check(&digest, size).expect("hashes to its name");
}

#[test]
fn a_missing_blob_fails_at_once_and_leaves_nothing() {
    if !require(&["skopeo", "docker-registry"]) {
        return;
    }
    let node = Node::new();
    let (reg, repo, _, _) = registry_with_image(&node, 4096);
    let cache = Cache::new(node.sysroot.join("var/lib/longshore/cache"));
    let other = Digest::of(b"not in the registry");
    let t = std::time::Instant::now();
    let e = rt()
        .block_on(client(&node).fetch_blob(&source(reg.port, &repo), other, 10, &cache))
        .expect_err("fetched a blob the registry lacks");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("not found") && msg.contains("1 attempts"),
        "{msg}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "retried a 404");
    assert!(
        cache_files(cache.root()).is_empty(),
        "{:?}",
        cache_files(cache.root())
    );
}

#[test]
fn an_image_comes_whole_from_the_first_source_that_serves_it() {
    if !require(&["skopeo", "docker-registry"]) {
        return;
    }
    let node = Node::new();
    let (reg, repo, layer, _) = registry_with_image(&node, 200_000);
    // A mirror that is not there (nothing listens on its port), then the registry.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let etc = node.sysroot.join("etc/containers");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("registries.conf"),
        format!(
            "[[registry]]\nlocation = \"127.0.0.1:{port}\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"127.0.0.1:{dead}\"\ninsecure = true\n",
            port = reg.port
        ),
    )
    .unwrap();
    let conf = RegistriesConf::load(&HostPaths::new(&node.sysroot)).unwrap();
    let cache = Cache::new(node.sysroot.join("var/lib/longshore/cache"));
    for reference in [
        format!("127.0.0.1:{}/{repo}", reg.port),
        format!("127.0.0.1:{}/fetch/app:1", reg.port),
    ] {
        let sources = conf.pull_sources(&reference);
        assert_eq!(sources.len(), 2, "{sources:?}");
        let img = rt()
            .block_on(client(&node).fetch_image(&reference, &sources, &cache))
            .expect("fetch");
        assert_eq!(
            img.source, sources[1].reference,
            "the dead mirror was skipped"
        );
        let manifest = img.digest;
        assert!(
            repo.ends_with(&manifest.to_string()),
            "{repo} vs {manifest}"
        );
        assert!(cache.has(&manifest).is_some(), "manifest cached");
        assert!(cache.has(&layer).is_some(), "layer cached");
        let names: Vec<String> = cache
            .index()
            .unwrap()
            .iter()
            .filter_map(|e| e.name().map(str::to_string))
            .collect();
        assert_eq!(
            names,
            [format!("127.0.0.1:{}/fetch/app@{manifest}", reg.port)]
        );
    }
    // Nothing left half-written, and every blob hashes to its name.
    for f in cache_files(cache.root()) {
        assert!(!f.ends_with(".partial"), "{f}");
        let bytes = std::fs::read(cache.root().join("blobs/sha256").join(&f)).unwrap();
        assert_eq!(Digest::of(&bytes).hex(), f);
    }
}

#[test]
fn a_registry_serving_wrong_bytes_gets_nothing_named() {
    if !require(&["skopeo", "docker-registry"]) {
        return;
    }
    let node = Node::new();
    let (reg, repo, digest, size) = registry_with_image(&node, 100_000);
    let bad = start_proxy(reg.port, Fault::Corrupt { at: 1000 });
    let cache = Cache::new(node.sysroot.join("var/lib/longshore/cache"));
    let e = rt()
        .block_on(client(&node).fetch_blob(&source(bad.port, &repo), digest, size, &cache))
        .expect_err("a corrupted blob was accepted");
    let msg = format!("{e:#}");
    assert!(msg.contains("discarded"), "{msg}");
    // Each attempt started again from nothing and was thrown away whole.
    assert!(cache.has(&digest).is_none());
    assert!(
        cache_files(cache.root()).is_empty(),
        "{:?}",
        cache_files(cache.root())
    );
}
