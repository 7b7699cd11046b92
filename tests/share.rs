//! Sharing the cache on one node: the endpoint serves what the cache holds whole, as a
//! registry would; the mirror drop-in makes the real skopeo (as CRI-O) pull through it,
//! keeps the mirrors other files set for the same registries, and falls through to them
//! for what the cache lacks; the peer listener answers only requests signed with the
//! cluster key.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};

use common::daemon::Daemon;
use common::fixture::{self, Layout};
use common::node::{require, Node};
use common::registry::{start_registry_with, Options};
use common::usermgr::BareBus;
use longshore::share::auth::ClusterKey;

const TOOLS: &[&str] = &["skopeo", "dbus-daemon", "unshare", "busctl"];

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node with a bus of its own for the daemon, and sharing on.
fn sharing_node(bus: &BareBus, local: u16, extra: &str) -> Node {
    let mut node = Node::new();
    node.env
        .push(("DBUS_SESSION_BUS_ADDRESS".into(), bus.address.clone()));
    node.write_config(
        "50-share.toml",
        &format!(
            "bus = \"session\"\n[crio]\nreload = false\n[share]\nenabled = true\nlocal = \"127.0.0.1:{local}\"\n{extra}"
        ),
    );
    // skopeo needs a signature policy; the node's is the machine's.
    let etc = node.sysroot.join("etc/containers");
    fs::create_dir_all(&etc).unwrap();
    fs::copy("/etc/containers/policy.json", etc.join("policy.json")).unwrap();
    node
}

/// Images named under `host` (a registry no one answers on), in a bundle.
fn bundle(node: &Node, host: &str, n: usize) -> (PathBuf, Layout) {
    let layout = fixture::write_oci_layout(
        &node.scratch("layout"),
        &fixture::small_images(&format!("{host}/share"), n),
    )
    .unwrap();
    let out = node.scratch("share.tar.zst");
    node.bundle_create(&layout, &out, &["--name", "share"]);
    (out, layout)
}

/// Runs skopeo with the node's /etc/containers in place of the machine's, in a mount
/// namespace of its own: it reads registries.conf and the drop-ins as CRI-O on the node
/// would.
fn skopeo_on(node: &Node, args: &[&str]) -> Output {
    let etc = node.sysroot.join("etc/containers");
    let script = "mount --bind \"$0\" /etc/containers && exec skopeo \"$@\"";
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", script])
        .arg(&etc)
        .args(args)
        .output()
        .unwrap()
}

fn dropin(node: &Node) -> PathBuf {
    node.sysroot
        .join("etc/containers/registries.conf.d/99-longshore-mirror.conf")
}

/// A response to a hand-made HTTP/1.1 request.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

fn wait_listening(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn hex(d: &str) -> &str {
    d.trim_start_matches("sha256:")
}

#[test]
fn a_bundles_images_are_pulled_through_the_mirror_by_digest() {
    if !require(TOOLS) {
        return;
    }
    let bus = BareBus::start();
    let port = free_port();
    let node = sharing_node(&bus, port, "");
    // The registry the images name: nothing answers there, so whatever skopeo gets came
    // through the mirror.
    let source = format!("127.0.0.1:{}", free_port());
    let (b, lay) = bundle(&node, &source, 2);
    node.ok(&["import", b.to_str().unwrap()]);

    // The import wrote the drop-in: the registries the cache holds images from, the
    // endpoint first, by digest only.
    let text = fs::read_to_string(dropin(&node)).unwrap();
    let component = source.replace(':', "_");
    assert!(
        text.contains(&format!("location = \"127.0.0.1:{port}/{component}\"")),
        "{text}"
    );
    assert!(
        text.contains("pull-from-mirror = \"digest-only\""),
        "{text}"
    );

    let daemon = Daemon::start(&node);
    wait_listening(port);
    for img in &lay.images {
        let repo = img.reference.rsplit_once(':').unwrap().0;
        let dest = node.scratch(&format!("pulled-{}", hex(&img.manifest_digest)));
        let out = skopeo_on(
            &node,
            &[
                "copy",
                "-q",
                &format!("docker://{repo}@{}", img.manifest_digest),
                &format!("dir:{}", dest.display()),
            ],
        );
        assert!(
            out.status.success(),
            "skopeo copy {repo}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.log()
        );
        // What arrived is the image, byte for byte.
        let manifest = fs::read(dest.join("manifest.json")).unwrap();
        assert_eq!(
            format!("sha256:{}", sha256_hex(&manifest)),
            img.manifest_digest
        );
        for l in &img.layers {
            assert_eq!(
                fs::read(dest.join(hex(&l.digest))).unwrap(),
                fs::read(lay.blob_path(&l.digest)).unwrap()
            );
        }
    }
    // A tag is not taken from the mirror by default: it goes to the source, which is
    // not there.
    let tagged = &lay.images[0].reference;
    let out = skopeo_on(&node, &["inspect", "--raw", &format!("docker://{tagged}")]);
    assert!(!out.status.success(), "a tag came through the mirror");

    // The status tells what was served.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let st = node.status();
    let sharing = &st["sharing"];
    assert_eq!(sharing["running"], true, "{st}");
    assert_eq!(sharing["local"], format!("127.0.0.1:{port}"), "{st}");
    let bytes = sharing["servedLocal"]["bytes"].as_u64().unwrap();
    let want: u64 = lay
        .images
        .iter()
        .flat_map(|i| i.layers.iter().map(|l| l.size))
        .sum();
    assert!(
        bytes >= want,
        "{bytes} served, the layers alone are {want}: {st}"
    );
    drop(daemon);

    // Sharing off: the next sync removes the drop-in.
    node.write_config("60-off.toml", "[share]\nenabled = false\n");
    node.ok(&["sync"]);
    assert!(!dropin(&node).exists(), "the drop-in outlived sharing");
}

fn sha256_hex(bytes: &[u8]) -> String {
    longshore::oci::digest::Digest::of(bytes).hex()
}

#[test]
fn the_endpoint_speaks_the_registry_protocol_and_the_peer_listener_wants_the_key() {
    if !require(TOOLS) {
        return;
    }
    let bus = BareBus::start();
    let (local, peer) = (free_port(), free_port());
    let node = sharing_node(
        &bus,
        local,
        &format!("peer = \"127.0.0.1:{peer}\"\nkey_file = \"/etc/longshore/cluster.key\"\n"),
    );
    let key_text = ClusterKey::generate().unwrap();
    let key_path = node.sysroot.join("etc/longshore/cluster.key");
    fs::write(&key_path, &key_text).unwrap();
    fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let key = ClusterKey::parse(&key_text).unwrap();
    let source = format!("127.0.0.1:{}", free_port());
    let (b, lay) = bundle(&node, &source, 2);
    node.ok(&["import", b.to_str().unwrap()]);
    let daemon = Daemon::start(&node);
    wait_listening(local);
    wait_listening(peer);

    let img = &lay.images[0];
    let name = format!("{}/share/img0", source.replace(':', "_"));
    let r = http(local, "GET", "/v2/", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );

    // A manifest by digest and by the tag the bundle named; no other tag.
    let by_digest = format!("/v2/{name}/manifests/{}", img.manifest_digest);
    let r = http(local, "GET", &by_digest, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.manifest_digest.as_str())
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    assert_eq!(r.body.len() as u64, img.manifest_size);
    let r = http(local, "HEAD", &by_digest, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(img.manifest_size.to_string().as_str())
    );
    assert!(r.body.is_empty());
    let r = http(local, "GET", &format!("/v2/{name}/manifests/1"), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.manifest_digest.as_str())
    );
    assert_eq!(
        http(local, "GET", &format!("/v2/{name}/manifests/latest"), &[]).status,
        404
    );
    // The same digest under a repository with no registry host names nothing.
    let r = http(
        local,
        "GET",
        &format!("/v2/share/img0/manifests/{}", img.manifest_digest),
        &[],
    );
    assert_eq!(r.status, 404);

    // A blob, whole and from a byte on; a range past its end.
    let layer = &img.layers[1];
    let want = fs::read(lay.blob_path(&layer.digest)).unwrap();
    let blob = format!("/v2/{name}/blobs/{}", layer.digest);
    let r = http(local, "GET", &blob, &[]);
    assert_eq!((r.status, &r.body), (200, &want));
    let r = http(local, "GET", &blob, &[("Range", "bytes=100-")]);
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 100-{}/{}", want.len() - 1, want.len()).as_str())
    );
    assert_eq!(r.body, want[100..]);
    let r = http(
        local,
        "GET",
        &blob,
        &[("Range", &format!("bytes={}-", want.len()))],
    );
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{}", want.len()).as_str())
    );
    // What is not there, what is not a digest, and writes.
    let absent = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        http(local, "GET", &format!("/v2/{name}/blobs/{absent}"), &[]).status,
        404
    );
    assert_eq!(
        http(
            local,
            "GET",
            &format!("/v2/{name}/blobs/sha256:..%2F..%2Fetc"),
            &[]
        )
        .status,
        404
    );
    assert_eq!(
        http(
            local,
            "GET",
            &format!("/v2/{name}/../../blobs/{}", layer.digest),
            &[]
        )
        .status,
        404
    );
    assert_eq!(
        http(local, "POST", &format!("/v2/{name}/blobs/uploads/"), &[]).status,
        405
    );
    assert_eq!(http(local, "DELETE", &blob, &[]).status, 405);

    // Without a layer, the image's manifest is not offered on loopback (its pull would
    // fail at the blob); a peer, which fetches blob by blob, still gets the rest.
    let cached = node
        .state_dir()
        .join("cache/blobs/sha256")
        .join(hex(&img.layers[0].digest));
    fs::remove_file(&cached).unwrap();
    assert_eq!(http(local, "GET", &by_digest, &[]).status, 404);
    let signed = key.sign("GET", &by_digest);
    let r = http(peer, "GET", &by_digest, &[("Authorization", &signed)]);
    assert_eq!(r.status, 200);

    // The peer listener: nothing without a valid signature.
    assert_eq!(http(peer, "GET", "/v2/", &[]).status, 401);
    assert_eq!(http(peer, "GET", &blob, &[]).status, 401);
    let stranger = ClusterKey::parse(&ClusterKey::generate().unwrap()).unwrap();
    let r = http(
        peer,
        "GET",
        &blob,
        &[("Authorization", &stranger.sign("GET", &blob))],
    );
    assert_eq!(r.status, 401);
    // A signature is for its own request: the manifest's does not open the blob.
    let r = http(peer, "GET", &blob, &[("Authorization", &signed)]);
    assert_eq!(r.status, 401);
    let r = http(
        peer,
        "GET",
        &blob,
        &[("Authorization", &key.sign("GET", &blob))],
    );
    assert_eq!((r.status, &r.body), (200, &want));

    std::thread::sleep(std::time::Duration::from_millis(2500));
    let st = node.status();
    assert_eq!(st["sharing"]["peer"], format!("127.0.0.1:{peer}"), "{st}");
    assert_eq!(st["sharing"]["servedPeer"]["refused"], 4, "{st}");
    assert!(daemon.log().contains("refused GET"), "{}", daemon.log());
}

#[test]
fn a_cluster_key_others_can_read_keeps_the_peer_listener_shut() {
    if !require(TOOLS) {
        return;
    }
    let bus = BareBus::start();
    let (local, peer) = (free_port(), free_port());
    let node = sharing_node(&bus, local, &format!("peer = \"127.0.0.1:{peer}\"\n"));
    let key_path = node.sysroot.join("etc/longshore/cluster.key");
    fs::write(&key_path, ClusterKey::generate().unwrap()).unwrap();
    fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let _daemon = Daemon::start(&node);
    wait_listening(local);
    assert!(TcpStream::connect(("127.0.0.1", peer)).is_err());
    // Nothing cached and no registries named: nothing to mirror, no drop-in.
    assert!(!dropin(&node).exists());
    let st = node.status();
    let problems = st["sharing"]["problems"].to_string();
    assert!(
        problems.contains("cluster.key") && problems.contains("0644"),
        "{st}"
    );
}

#[test]
fn the_drop_in_keeps_an_earlier_mirror_and_skopeo_falls_through_to_it() {
    if !require(&["skopeo", "dbus-daemon", "unshare", "docker-registry"]) {
        return;
    }
    let bus = BareBus::start();
    let port = free_port();
    let node = sharing_node(&bus, port, "");
    let source = format!("127.0.0.1:{}", free_port());
    let layout = fixture::write_oci_layout(
        &node.scratch("layout"),
        &fixture::small_images(&format!("{source}/share"), 2),
    )
    .unwrap();
    // A mirror an ImageDigestMirrorSet would name holds both images; the cache gets one.
    let reg = start_registry_with(
        &node.scratch("registry"),
        &Options {
            log: true,
            ..Options::default()
        },
    );
    for img in &layout.images {
        let path = img.reference.split_once('/').unwrap().1;
        let st = Command::new("skopeo")
            .args(["copy", "-q", "--dest-tls-verify=false"])
            .arg(layout.transport_ref(&img.reference))
            .arg(format!("docker://127.0.0.1:{}/mirrored/{path}", reg.port))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let idms = node
        .sysroot
        .join("etc/containers/registries.conf.d/50-idms.conf");
    fs::create_dir_all(idms.parent().unwrap()).unwrap();
    fs::write(
        &idms,
        format!(
            "[[registry]]\nprefix = \"{source}/share\"\nlocation = \"{source}/share\"\n\
             [[registry.mirror]]\nlocation = \"127.0.0.1:{}/mirrored/share\"\ninsecure = true\n\
             pull-from-mirror = \"digest-only\"\n",
            reg.port
        ),
    )
    .unwrap();
    let b = node.scratch("one.tar.zst");
    let first = &layout.images[0];
    node.ok(&[
        "bundle",
        "create",
        "-o",
        b.to_str().unwrap(),
        "--name",
        "one",
        &layout.transport_ref(&first.reference),
    ]);
    node.ok(&["import", b.to_str().unwrap()]);

    // The drop-in writes the IDMS prefix again: longshore's mirror, then the IDMS one.
    let text = fs::read_to_string(dropin(&node)).unwrap();
    let ours = text
        .find(&format!("127.0.0.1:{port}/"))
        .expect("our mirror");
    let theirs = text
        .find(&format!("127.0.0.1:{}/mirrored/share", reg.port))
        .expect("the IDMS mirror kept");
    assert!(ours < theirs, "{text}");

    let _daemon = Daemon::start(&node);
    wait_listening(port);
    let inspect = |img: &fixture::FixtureImage| {
        let repo = img.reference.rsplit_once(':').unwrap().0;
        skopeo_on(
            &node,
            &[
                "inspect",
                "--raw",
                &format!("docker://{repo}@{}", img.manifest_digest),
            ],
        )
    };
    // The image the cache holds comes from longshore: the mirror registry never hears of it.
    let out = inspect(first);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_hex(&out.stdout), hex(&first.manifest_digest));
    let asked = |d: &str| reg.requests().iter().any(|r| r.contains(hex(d)));
    assert!(!asked(&first.manifest_digest), "{:?}", reg.requests());
    // The other one is not in the cache: the pull goes on to the IDMS mirror.
    let second = &layout.images[1];
    let out = inspect(second);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_hex(&out.stdout), hex(&second.manifest_digest));
    assert!(asked(&second.manifest_digest), "{:?}", reg.requests());

    // When the IDMS file changes, the drop-in follows.
    fs::remove_file(&idms).unwrap();
    node.ok(&["sync"]);
    let text = fs::read_to_string(dropin(&node)).unwrap();
    assert!(!text.contains("mirrored"), "{text}");
}
