//! A real registry (the distribution registry, `docker-registry`) on loopback, with its
//! data in a test's directory: plain HTTP, or with htpasswd auth, TLS, and a request log.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running registry, stopped when dropped.
pub struct Registry {
    child: Child,
    /// Its port on 127.0.0.1 (or on its address in its namespace).
    pub port: u16,
    /// `IP:PORT` where it answers.
    pub addr: String,
    /// Its log (requests at level info), when asked for.
    pub log: Option<std::path::PathBuf>,
}

/// How a registry is set up.
#[derive(Default)]
pub struct Options {
    /// `user:password` pairs it accepts (htpasswd, bcrypt); then every request needs one.
    pub users: Vec<(String, String)>,
    /// Serve HTTPS with this certificate and key (PEM).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Log every request to `registry.log` in its directory.
    pub log: bool,
    /// Run in this network namespace, on this address's port 5000.
    pub netns: Option<(String, std::net::IpAddr)>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Its process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The request URIs its log shows (needs [`Options::log`]).
    pub fn requests(&self) -> Vec<String> {
        let text =
            fs::read_to_string(self.log.as_ref().expect("a logged registry")).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("response completed"))
            .filter_map(|l| {
                let at = l.find("http.request.uri=\"")? + "http.request.uri=\"".len();
                Some(l[at..].split('"').next()?.to_string())
            })
            .collect()
    }
}

/// A certificate authority and a server certificate it signed for `127.0.0.1` and
/// `localhost`, in `dir`: (CA certificate, server certificate, server key).
pub fn test_ca(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |n: &str| dir.join(n);
    let openssl = |args: &[&str]| {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("running openssl");
        assert!(st.success(), "openssl {args:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&[
        "-days",
        "2",
        "-subj",
        "/CN=longshore test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    openssl(&ca);
    let mut req = vec!["req"];
    req.extend_from_slice(&ec);
    req.extend_from_slice(&[
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(&req);
    fs::write(
        p("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    (p("ca.crt"), p("server.crt"), p("server.key"))
}

/// Starts a registry storing under `dir`, and waits until it answers `/v2/`.
pub fn start_registry(dir: &Path) -> Registry {
    start_registry_with(dir, &Options::default())
}

/// Starts a registry set up as `opts` says, storing under `dir`.
pub fn start_registry_with(dir: &Path, opts: &Options) -> Registry {
    let (ip, port) = match &opts.netns {
        Some((_, ip)) => (ip.to_string(), 5000),
        None => (
            "127.0.0.1".to_string(),
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        ),
    };
    let addr = format!("{ip}:{port}");
    fs::create_dir_all(dir).unwrap();
    let config = dir.join("registry.yml");
    let mut text = format!(
        "version: 0.1\nlog:\n  level: {}\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
        if opts.log { "info" } else { "error" },
        dir.join("data").display()
    );
    if let Some((cert, key)) = &opts.tls {
        text += &format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        );
    }
    if !opts.users.is_empty() {
        let htpasswd = dir.join("htpasswd");
        let _ = fs::remove_file(&htpasswd);
        for (i, (user, password)) in opts.users.iter().enumerate() {
            let mut cmd = Command::new("htpasswd");
            cmd.arg("-bB");
            if i == 0 {
                cmd.arg("-c");
            }
            let st = cmd
                .arg(&htpasswd)
                .arg(user)
                .arg(password)
                .stderr(Stdio::null())
                .status()
                .expect("running htpasswd");
            assert!(st.success(), "htpasswd");
        }
        text += &format!(
            "auth:\n  htpasswd:\n    realm: longshore-test\n    path: {}\n",
            htpasswd.display()
        );
    }
    fs::write(&config, text).unwrap();
    let log = opts.log.then(|| dir.join("registry.log"));
    let stderr = match &log {
        Some(p) => Stdio::from(fs::File::create(p).unwrap()),
        None => Stdio::null(),
    };
    let mut cmd = match &opts.netns {
        Some((ns, _)) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "docker-registry"]);
            c
        }
        None => Command::new("docker-registry"),
    };
    let child = cmd
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("starting docker-registry");
    let reg = Registry {
        child,
        port,
        addr: addr.clone(),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let answers = || {
        let Ok(mut s) = TcpStream::connect(&addr) else {
            return false;
        };
        let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        // Any answer: 200, 401 with auth, or 400 to plain HTTP on a TLS port.
        resp.starts_with("HTTP/1.")
    };
    loop {
        let up = match &opts.netns {
            Some((ns, _)) => super::netns::in_netns(ns, answers),
            None => answers(),
        };
        if up {
            return reg;
        }
        assert!(
            Instant::now() < deadline,
            "registry on port {port} did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
