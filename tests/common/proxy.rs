//! A one-request-per-connection HTTP proxy of the tests' own in front of a registry,
//! that cuts blob responses, drops `Range`, or flips a byte, and counts what it passed.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to the blob responses it forwards.
#[derive(Clone, Copy)]
pub enum Fault {
    /// Cut the connection after this many body bytes of each of the first `n` blob
    /// responses.
    CutAfter { bytes: u64, times: usize },
    /// Drop the request's `Range` header, so the registry answers 200 with everything.
    IgnoreRange,
    /// Flip one byte of every blob body, at this offset.
    Corrupt { at: u64 },
    /// Cut whichever connection is passing blob bytes each time this many more have
    /// crossed the proxy in all: a link that drops every N bytes.
    CutLinkEvery { bytes: u64 },
    /// Pass blob bodies on at this many bytes per second: a slow link, whose sender
    /// has little in flight when the receiver goes away.
    Slow { bytes_per_sec: u64 },
    /// A slow link that also cuts every blob response after this many bytes.
    SlowCut { bytes_per_sec: u64, bytes: u64 },
    /// Answer `503 Service Unavailable` to the first `n` requests: a busy registry.
    BusyFirst { n: usize },
}

/// A one-request-per-connection HTTP proxy in front of the registry.
pub struct Proxy {
    pub port: u16,
    /// Request heads it saw.
    pub requests: Arc<Mutex<Vec<String>>>,
    /// Blob body bytes it passed on to the client.
    pub body_bytes: Arc<AtomicU64>,
}

pub fn start_proxy(upstream: u16, fault: Fault) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let body_bytes = Arc::new(AtomicU64::new(0));
    let cuts = Arc::new(AtomicUsize::new(0));
    let (reqs, bodies) = (requests.clone(), body_bytes.clone());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let (reqs, bodies, cuts) = (reqs.clone(), bodies.clone(), cuts.clone());
            std::thread::spawn(move || serve(client, upstream, fault, &reqs, &bodies, &cuts));
        }
    });
    Proxy {
        port,
        requests,
        body_bytes,
    }
}

fn serve(
    client: TcpStream,
    upstream: u16,
    fault: Fault,
    reqs: &Mutex<Vec<String>>,
    bodies: &AtomicU64,
    cuts: &AtomicUsize,
) {
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    reqs.lock().unwrap().push(head.clone());
    if let Fault::BusyFirst { n } = fault {
        if cuts.fetch_add(1, Ordering::SeqCst) < n {
            let mut c = client;
            let _ = c.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        }
    }
    let is_blob = head.starts_with("GET ") && head.contains("/blobs/sha256:");
    // One request per connection: the client opens a new one for the next.
    let mut forwarded: String = head
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .filter(|l| {
            !(matches!(fault, Fault::IgnoreRange) && l.to_ascii_lowercase().starts_with("range:"))
        })
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\r\n"))
        .collect();
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
    up.write_all(forwarded.as_bytes()).unwrap();
    let mut up_reader = BufReader::new(up);
    // The response head, then the body.
    let mut out = client;
    let mut resp_head = Vec::new();
    loop {
        let mut line = Vec::new();
        if up_reader.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
            break;
        }
        resp_head.extend_from_slice(&line);
        if line == b"\r\n" {
            break;
        }
    }
    if out.write_all(&resp_head).is_err() {
        return;
    }
    let limit = match fault {
        Fault::CutAfter { bytes, times }
            if is_blob && cuts.fetch_add(1, Ordering::SeqCst) < times =>
        {
            Some(bytes)
        }
        Fault::SlowCut { bytes, .. } if is_blob => Some(bytes),
        _ => None,
    };
    let mut sent = 0u64;
    let mut buf = [0u8; 8192];
    loop {
        let n = match up_reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let n = match limit {
            Some(l) if sent + n as u64 > l => (l - sent) as usize,
            _ => n,
        };
        if let (Fault::CutLinkEvery { bytes: every }, true) = (fault, is_blob) {
            // The link's running total decides where it drops: at the next multiple.
            let before = bodies.fetch_add(n as u64, Ordering::SeqCst);
            let boundary = (before / every + 1) * every;
            if before + n as u64 >= boundary {
                let keep = (boundary - before) as usize;
                bodies.fetch_sub((n - keep) as u64, Ordering::SeqCst);
                let _ = out.write_all(&buf[..keep]);
                let _ = out.flush();
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
            if out.write_all(&buf[..n]).is_err() {
                return;
            }
            continue;
        }
        if let Fault::Corrupt { at } = fault {
            if is_blob && (sent..sent + n as u64).contains(&at) {
                buf[(at - sent) as usize] ^= 0xff;
            }
        }
        if out.write_all(&buf[..n]).is_err() {
            return;
        }
        sent += n as u64;
        if is_blob {
            bodies.fetch_add(n as u64, Ordering::SeqCst);
            if let Fault::Slow { bytes_per_sec } | Fault::SlowCut { bytes_per_sec, .. } = fault {
                std::thread::sleep(Duration::from_secs_f64(n as f64 / bytes_per_sec as f64));
            }
        }
        if limit.is_some_and(|l| sent >= l) {
            // Cut mid-blob: the client sees the connection end early.
            let _ = out.flush();
            let _ = out.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// A forward HTTP proxy, as `HTTP_PROXY` names one: it takes requests in absolute form
/// (`GET http://host:port/path HTTP/1.1`), one per connection, passes them on to that
/// host, and records each request line it forwarded.
pub struct ForwardProxy {
    pub port: u16,
    /// The request lines it forwarded.
    pub requests: Arc<Mutex<Vec<String>>>,
}

pub fn start_forward_proxy() -> ForwardProxy {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let reqs = requests.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let reqs = reqs.clone();
            std::thread::spawn(move || forward(client, &reqs));
        }
    });
    ForwardProxy { port, requests }
}

fn forward(client: TcpStream, reqs: &Mutex<Vec<String>>) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(20)));
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).unwrap_or(0) == 0 {
        return;
    }
    // GET http://127.0.0.1:5000/v2/ HTTP/1.1
    let mut parts = first.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let Some(rest) = target.strip_prefix("http://") else {
        let mut c = client;
        let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    reqs.lock().unwrap().push(first.trim_end().to_string());
    let mut head = format!("{method} {path} {version}\r\n");
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("proxy-") {
            continue;
        }
        head.push_str(&line);
    }
    head.push_str("Connection: close\r\n\r\n");
    let Ok(mut up) = TcpStream::connect(authority) else {
        return;
    };
    if up.write_all(head.as_bytes()).is_err() {
        return;
    }
    let mut out = client;
    let _ = std::io::copy(&mut up, &mut out);
}
