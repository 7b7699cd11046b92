//! The endpoint's HTTP/1.1: just what a registry's pull side needs, with a blob's body
//! read from the cache on a thread of its own, a few chunks ahead of the socket, in the
//! same few buffers (measured in `benches/share.rs`: as fast as docker-registry or
//! faster; `sendfile(2)` with one thread was slower on this machine's two CPUs).
//!
//! - Requests are `GET` or `HEAD` without a body; the request head (parsed by
//!   `httparse`, the parser hyper uses) is at most [`MAX_HEAD`] bytes and 64 headers,
//!   and must arrive within [`HEADER_TIMEOUT`] (also how long an idle connection is
//!   kept). Anything else is answered 400 or 405 and the connection closed.
//! - Connections are kept alive as HTTP/1.1 says (`Connection: close`, HTTP/1.0);
//!   requests sent ahead are answered in order.
//! - Every answer has a `Content-Length`; a client that stops reading for [`STALL`] is
//!   dropped.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest request head read.
pub const MAX_HEAD: usize = 16 << 10;
/// How long a client has to send a request's head (and an idle connection is kept).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may leave an answer unread before it is dropped.
pub const STALL: Duration = Duration::from_secs(60);

/// A request's head.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// The request target as sent: path and query, not decoded.
    pub target: String,
    /// Header names in lower case, with their values.
    pub headers: Vec<(String, String)>,
    /// Whether the client wants the connection kept.
    pub keep_alive: bool,
}

impl Request {
    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The query, if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The value of header `name` (lower case), when sent once or more (the first).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What an answer carries.
#[derive(Debug)]
pub enum Payload {
    /// Nothing.
    Empty,
    /// Bytes in memory.
    Bytes(Bytes),
    /// `len` bytes of a file from `start`.
    File {
        /// The file, opened.
        file: std::fs::File,
        /// Where to start.
        start: u64,
        /// How many bytes.
        len: u64,
    },
}

impl Payload {
    fn len(&self) -> u64 {
        match self {
            Payload::Empty => 0,
            Payload::Bytes(b) => b.len() as u64,
            Payload::File { len, .. } => *len,
        }
    }
}

/// An answer.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Headers besides `Content-Length` and `Connection`.
    pub headers: Vec<(&'static str, String)>,
    /// The body (not sent to a `HEAD`, but its length is).
    pub body: Payload,
}

impl Reply {
    /// An answer with `status` and `body`.
    pub fn new(status: u16, body: Payload) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body,
        }
    }

    /// Adds a header.
    pub fn set(&mut self, name: &'static str, value: impl Into<String>) {
        self.headers.push((name, value.into()));
    }

    /// The value of header `name`, when set.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

/// Reads the next request head from `stream` into `buf` (which may already hold some of
/// it, sent ahead); `Ok(None)` when the client closed the connection between requests.
pub async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> io::Result<Option<Request>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    loop {
        // Parsed as it arrives, so that what is no HTTP (a TLS hello, as containers/image
        // tries HTTPS first on an insecure mirror) is refused at once, not waited on.
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(end)) => {
                    let r = request_of(&req).ok_or_else(|| bad("malformed request line"))?;
                    buf.drain(..end);
                    return Ok(Some(r));
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(bad(&format!("malformed request: {e}"))),
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(bad("request head too large"));
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

fn request_of(req: &httparse::Request<'_, '_>) -> Option<Request> {
    let (method, target, version) = (req.method?, req.path?, req.version?);
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .filter_map(|h| {
            Some((
                h.name.to_ascii_lowercase(),
                std::str::from_utf8(h.value).ok()?.trim().to_string(),
            ))
        })
        .collect();
    let conn = headers
        .iter()
        .find(|(k, _)| k == "connection")
        .map(|(_, v)| v.to_ascii_lowercase());
    let keep_alive = match version {
        1 => !conn.as_deref().is_some_and(|c| c.contains("close")),
        _ => conn.as_deref().is_some_and(|c| c.contains("keep-alive")),
    };
    Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        keep_alive,
    })
}

/// Whether the request announces a body (which is never read: the connection is then
/// closed after the answer).
pub fn has_body(r: &Request) -> bool {
    r.header("transfer-encoding").is_some() || r.header("content-length").is_some_and(|v| v != "0")
}

/// Writes `reply` (its head only, for `HEAD`), telling `sent` of the body bytes as they
/// go; the stream is handed back for the next request.
pub async fn write_reply(
    mut stream: TcpStream,
    reply: Reply,
    head_only: bool,
    keep_alive: bool,
    sent: Sent,
) -> io::Result<TcpStream> {
    let len = reply.body.len();
    let mut head = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
    for (k, v) in &reply.headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str(&format!("content-length: {len}\r\n"));
    if !keep_alive {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    let body = if head_only {
        Payload::Empty
    } else {
        reply.body
    };
    match body {
        Payload::Empty => {
            timed(stream.write_all(head.as_bytes())).await?;
            Ok(stream)
        }
        Payload::Bytes(b) => {
            let mut all = head.into_bytes();
            all.extend_from_slice(&b);
            timed(stream.write_all(&all)).await?;
            sent(b.len() as u64);
            Ok(stream)
        }
        Payload::File { file, start, len } => {
            timed(stream.write_all(head.as_bytes())).await?;
            send_file(stream, file, start, len, sent).await
        }
    }
}

async fn timed<T>(f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(STALL, f)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// Where the bytes of a body are told as they are sent.
pub type Sent = Arc<dyn Fn(u64) + Send + Sync>;

/// Bytes read from a blob file at a time.
const CHUNK: usize = 512 << 10;
/// Chunks read ahead of the socket.
const READ_AHEAD: usize = 4;

/// Sends `len` bytes of `file` from `start`: a blocking thread reads the file a chunk at
/// a time, a few chunks ahead, while this task writes them to the socket, so reading and
/// sending go on at once.
async fn send_file(
    mut stream: TcpStream,
    file: std::fs::File,
    start: u64,
    len: u64,
    sent: Sent,
) -> io::Result<TcpStream> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Vec<u8>>>(READ_AHEAD);
    // Buffers come back once written, so the same few are filled again: no new memory
    // (and no page faults) per chunk.
    let (back, mut returned) = tokio::sync::mpsc::channel::<Vec<u8>>(READ_AHEAD + 2);
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek};
        let mut file = file;
        if let Err(e) = file.seek(io::SeekFrom::Start(start)) {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        let mut left = len;
        while left > 0 {
            let want = left.min(CHUNK as u64);
            let mut chunk = returned
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
            chunk.clear();
            let item = match (&file).take(want).read_to_end(&mut chunk) {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the blob file is shorter than it was",
                )),
                Ok(n) => {
                    left -= n as u64;
                    Ok(chunk)
                }
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            // The connection went away: stop reading.
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    let mut done = 0;
    while done < len {
        let chunk = match rx.recv().await {
            Some(c) => c?,
            None => return Err(io::ErrorKind::UnexpectedEof.into()),
        };
        timed(stream.write_all(&chunk)).await?;
        done += chunk.len() as u64;
        sent(chunk.len() as u64);
        let _ = back.try_send(chunk);
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair on loopback: (what the client writes into, the server's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn requests_come_in_pieces_and_ahead_of_their_answers() {
        let (mut c, mut s) = pair().await;
        let mut buf = Vec::new();
        c.write_all(b"GET /v2/ HT").await.unwrap();
        let reading = tokio::spawn(async move {
            let r = read_request(&mut s, &mut buf).await.unwrap().unwrap();
            let next = read_request(&mut s, &mut buf).await.unwrap().unwrap();
            let end = read_request(&mut s, &mut buf).await.unwrap();
            (r, next, end.is_none())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.write_all(b"TP/1.1\r\nHost: x\r\nRange: bytes=5-\r\n\r\nHEAD /v2/a/blobs/sha256:00?through=1 HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        drop(c);
        let (r, next, closed) = reading.await.unwrap();
        assert_eq!(
            (r.method.as_str(), r.path(), r.query()),
            ("GET", "/v2/", None)
        );
        assert_eq!(r.header("range"), Some("bytes=5-"));
        assert!(r.keep_alive);
        assert_eq!(next.method, "HEAD");
        assert_eq!(next.query(), Some("through=1"));
        assert!(!next.keep_alive, "HTTP/1.0 without keep-alive closes");
        assert!(closed);
    }

    #[tokio::test]
    async fn what_is_not_http_is_refused_at_once() {
        let (mut c, mut s) = pair().await;
        // The start of a TLS client hello: the client then waits for the server.
        c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(2), read_request(&mut s, &mut buf))
            .await
            .expect("answered at once");
        assert!(r.is_err());
        // A head that never ends is refused at its limit.
        let (mut c, mut s) = pair().await;
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        let w = tokio::spawn(async move {
            let _ = c.write_all(long.as_bytes()).await;
            c
        });
        let mut buf = Vec::new();
        let e = read_request(&mut s, &mut buf).await.unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        drop(w.await);
    }
}
