//! What surrounds gatekeeper in a share-link deployment, as stand-ins on real sockets bound to
//! `127.0.0.1:0`: the sharing apps links are checked against (Immich, Nextcloud), a canary that
//! must never be contacted, Traefik's API, and the proxy side that sends forward-auth requests.
//!
//! Every stand-in records what it receives and behaves as the real app does where gatekeeper can
//! tell the difference: Immich's web app is a single-page app that answers 200 to every path
//! (only its API says whether a share key is known), Nextcloud answers 404 for unknown tokens.
//! A stand-in can also answer late, reset the connection or never answer. Dropping one stops its
//! threads and joins them.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::SOON;

/// How a stand-in treats a request once it has read (and recorded) it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer at once.
    Answer,
    /// Answer after this long.
    Late(Duration),
    /// Close the connection with a TCP reset instead of answering.
    Reset,
    /// Keep the connection open and never answer.
    Silent,
}

/// One request a stand-in received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
}

impl Hit {
    /// `"GET /s/abc?x=1"`, for comparing with expected requests.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.target)
    }
}

/// A stand-in's answer.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// A `Location` header, for redirects.
    pub location: Option<String>,
}

type Handler = dyn Fn(&Hit) -> Reply + Send + Sync;

struct Shared {
    hits: Mutex<Vec<Hit>>,
    /// Every answer sent (recorded before it is written), with the request it answers.
    replies: Mutex<Vec<(Hit, u16, String)>>,
    connections: AtomicUsize,
    /// Requests read and not yet answered, and the most there ever were.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    stop: AtomicBool,
    mode: Mutex<Mode>,
    handler: Box<Handler>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// A stand-in HTTP/1.1 server on an ephemeral port, one thread per connection; stopped and
/// joined on drop.
pub struct StandIn {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl StandIn {
    /// Serve `handler` on `127.0.0.1:0` in `mode`.
    pub fn start(mode: Mode, handler: impl Fn(&Hit) -> Reply + Send + Sync + 'static) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a stand-in");
        let addr = listener.local_addr().expect("stand-in address");
        let shared = Arc::new(Shared {
            hits: Mutex::new(Vec::new()),
            replies: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            mode: Mutex::new(mode),
            handler: Box::new(handler),
            workers: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    let conn_shared = shared.clone();
                    let worker = std::thread::spawn(move || serve(&conn_shared, stream));
                    shared.workers.lock().unwrap().push(worker);
                }
            })
        };
        StandIn {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Immich: `GET|HEAD /api/shared-links/me?key=K` (or `?slug=S`) is 200 with the link as JSON
    /// for a known key (slug) and 401 otherwise; every other path is the web app's HTML with 200.
    pub fn immich(keys: &[&str], slugs: &[&str], mode: Mode) -> StandIn {
        let keys: HashSet<String> = keys.iter().map(|k| k.to_string()).collect();
        let slugs: HashSet<String> = slugs.iter().map(|s| s.to_string()).collect();
        StandIn::start(mode, move |hit| {
            let (path, query) = split_target(&hit.target);
            if path != "/api/shared-links/me" {
                return Reply {
                    status: 200,
                    content_type: "text/html; charset=utf-8",
                    body: "<!doctype html><html><head><title>Immich</title></head>\
                           <body><div id=\"app\"></div><script src=\"/_app/start.js\"></script>\
                           </body></html>\n"
                        .into(),
                    location: None,
                };
            }
            let known = query_pairs(query).into_iter().find_map(|(k, v)| match k {
                "key" if keys.contains(v) => {
                    Some(json!({"id": "link-1", "key": v, "type": "ALBUM"}))
                }
                "slug" if slugs.contains(v) => {
                    Some(json!({"id": "link-2", "slug": v, "type": "ALBUM"}))
                }
                _ => None,
            });
            match known {
                Some(link) => Reply {
                    status: 200,
                    content_type: "application/json",
                    body: link.to_string(),
                    location: None,
                },
                None => Reply {
                    status: 401,
                    content_type: "application/json",
                    body: json!({"message": "Invalid share key", "error": "Unauthorized", "statusCode": 401})
                        .to_string(),
                    location: None,
                },
            }
        })
    }

    /// Nextcloud: `GET|HEAD /s/TOKEN` is the share page with 200 for a known token, whatever the
    /// query; anything else is 404.
    pub fn nextcloud(tokens: &[&str], mode: Mode) -> StandIn {
        let tokens: HashSet<String> = tokens.iter().map(|t| t.to_string()).collect();
        StandIn::start(mode, move |hit| {
            let (path, _) = split_target(&hit.target);
            let known = path.strip_prefix("/s/").is_some_and(|t| tokens.contains(t));
            Reply {
                status: if known { 200 } else { 404 },
                content_type: "text/html; charset=utf-8",
                body: if known {
                    "<!DOCTYPE html><html><head><title>Shared file - Nextcloud</title></head></html>\n"
                } else {
                    "<!DOCTYPE html><html><head><title>Not found - Nextcloud</title></head></html>\n"
                }
                .into(),
                location: None,
            }
        })
    }

    /// A listener that must never be contacted: it counts every connection, even one that sends
    /// nothing, and answers 200 to whatever arrives.
    pub fn canary() -> StandIn {
        StandIn::start(Mode::Answer, |_| Reply {
            status: 200,
            content_type: "text/plain",
            body: "canary\n".into(),
            location: None,
        })
    }

    /// An app that redirects every request to `location` (302).
    pub fn redirect(location: String) -> StandIn {
        StandIn::start(Mode::Answer, move |_| Reply {
            status: 302,
            content_type: "text/html",
            body: String::new(),
            location: Some(location.clone()),
        })
    }

    /// Traefik's API for the file provider: `GET /api/http/middlewares/{name}@file` is that
    /// middleware of the Traefik file `file` as JSON (`{"ipAllowList":{"sourceRange":[..]},..}`),
    /// 404 when the file has no such middleware. Like Traefik, which applies a file change only
    /// once events have stopped for a while, the API shows a new content of the file only after
    /// it has seen that content unchanged for `lag`.
    pub fn traefik_api(file: PathBuf, lag: Duration) -> StandIn {
        struct Seen {
            content: Option<String>,
            since: Instant,
            shown: Option<String>,
        }
        let seen = Mutex::new(Seen {
            content: None,
            since: Instant::now(),
            shown: None,
        });
        StandIn::start(Mode::Answer, move |hit| {
            let shown = {
                let mut seen = seen.lock().unwrap();
                let now = Instant::now();
                let content = std::fs::read_to_string(&file).ok();
                if content != seen.content {
                    seen.content = content;
                    seen.since = now;
                }
                if now.duration_since(seen.since) >= lag {
                    seen.shown = seen.content.clone();
                }
                seen.shown.clone()
            };
            let not_found = Reply {
                status: 404,
                content_type: "application/json",
                body: json!({"message": "middleware not found"}).to_string(),
                location: None,
            };
            let Some(name) = hit
                .target
                .strip_prefix("/api/http/middlewares/")
                .and_then(|n| n.strip_suffix("@file"))
            else {
                return not_found;
            };
            let Some(middleware) = shown
                .and_then(|yaml| yaml_to_json(&yaml).ok())
                .and_then(|v| v.pointer(&format!("/http/middlewares/{name}")).cloned())
            else {
                return not_found;
            };
            let mut body = middleware;
            let kind = if body.get("ipWhiteList").is_some() {
                "ipwhitelist"
            } else {
                "ipallowlist"
            };
            body["name"] = json!(format!("{name}@file"));
            body["provider"] = json!("file");
            body["status"] = json!("enabled");
            body["type"] = json!(kind);
            Reply {
                status: 200,
                content_type: "application/json",
                body: body.to_string(),
                location: None,
            }
        })
    }

    /// Change how requests from now on are treated.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// Every request received so far, in order.
    pub fn hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().unwrap().clone()
    }

    /// [`Hit::line`] of every request received so far.
    pub fn lines(&self) -> Vec<String> {
        self.hits().iter().map(Hit::line).collect()
    }

    /// Every answer sent so far, in order: the request, the status and the body. An answer is
    /// recorded before it goes out, so it is here by the time its receiver has it.
    pub fn replies(&self) -> Vec<(Hit, u16, String)> {
        self.shared.replies.lock().unwrap().clone()
    }

    /// Requests read and not answered (nor given up on) yet.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests this stand-in was ever working on at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Connections accepted so far, whether or not they sent anything.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// `http://127.0.0.1:PORT`, for a policy.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; the acceptor sees the flag and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let workers = std::mem::take(&mut *self.shared.workers.lock().unwrap());
        for worker in workers {
            let _ = worker.join();
        }
    }
}

/// Handle one connection: read the request head, record it, then act on the mode.
fn serve(shared: &Shared, mut stream: TcpStream) {
    let stopped = || shared.stop.load(Ordering::SeqCst);
    // Short reads so a stopping stand-in is never stuck on a silent client.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = stream.set_nodelay(true);
    // Peek rather than read: in `Reset` mode the request must still be unread when the socket is
    // closed, which is what makes the kernel send a reset instead of a clean close.
    let deadline = Instant::now() + SOON;
    let mut buf = vec![0u8; 64 * 1024];
    let head_len = loop {
        if stopped() || Instant::now() > deadline {
            return;
        }
        match stream.peek(&mut buf) {
            Ok(0) => return,
            Ok(n) => match find(&buf[..n], b"\r\n\r\n") {
                Some(end) => break end + 4,
                None if n == buf.len() => return,
                None => std::thread::sleep(Duration::from_millis(2)),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let mut words = head.lines().next().unwrap_or_default().split(' ');
    let hit = Hit {
        method: words.next().unwrap_or_default().to_string(),
        target: words.next().unwrap_or_default().to_string(),
    };
    shared.hits.lock().unwrap().push(hit.clone());
    let _working = InFlight::enter(shared);

    let mode = *shared.mode.lock().unwrap();
    match mode {
        Mode::Reset => return,
        Mode::Silent => {
            while !stopped() {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
        Mode::Late(delay) => {
            let until = Instant::now() + delay;
            while Instant::now() < until {
                if stopped() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Mode::Answer => {}
    }
    let _ = stream.read_exact(&mut buf[..head_len]);
    let reply = (shared.handler)(&hit);
    shared
        .replies
        .lock()
        .unwrap()
        .push((hit.clone(), reply.status, reply.body.clone()));
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len(),
        reply
            .location
            .as_ref()
            .map_or(String::new(), |l| format!("Location: {l}\r\n"))
    )
    .into_bytes();
    if hit.method != "HEAD" {
        out.extend_from_slice(reply.body.as_bytes());
    }
    let _ = stream.write_all(&out);
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Counts a request as in flight until dropped.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> InFlight<'a> {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Whatever",
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `/a/b?x=1` → (`/a/b`, `x=1`).
pub fn split_target(target: &str) -> (&str, &str) {
    target.split_once('?').unwrap_or((target, ""))
}

fn query_pairs(query: &str) -> Vec<(&str, &str)> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .collect()
}

/// Traefik file-provider YAML as a JSON value, read the way Traefik would (figment's YAML).
pub fn yaml_to_json(yaml: &str) -> Result<Value, String> {
    use figment::providers::{Format, Yaml};
    figment::Figment::from(Yaml::string(yaml))
        .extract()
        .map_err(|e| format!("not YAML ({e}):\n{yaml}"))
}

// ---------------------------------------------------------------------------------------------
// The proxy side: forward-auth requests as Traefik, nginx and Caddy send them
// ---------------------------------------------------------------------------------------------

/// A whole response (the server closes the connection after it).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// An HTTP/1.1 request with `Connection: close`, built header by header so a test can send any
/// bytes as a header value.
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    target: String,
    headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    /// `method target`, with `Host: gatekeeper` only.
    pub fn new(method: &str, target: &str) -> Request {
        Request {
            method: method.into(),
            target: target.into(),
            headers: vec![("Host".into(), b"gatekeeper:5000".to_vec())],
        }
    }

    /// What Traefik's forwardAuth sends to `target` for a viewer at `client` asking for `uri`
    /// on `photos.example.com`. `None` leaves the header out.
    pub fn forward_auth(target: &str, client: Option<&str>, uri: Option<&[u8]>) -> Request {
        let mut r = Request::new("GET", target)
            .header("X-Forwarded-Method", "GET")
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", "photos.example.com");
        if let Some(uri) = uri {
            r = r.header("X-Forwarded-Uri", uri);
        }
        if let Some(client) = client {
            r = r.header("X-Forwarded-For", client);
        }
        r
    }

    /// Add a header (in order; a name may repeat).
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Request {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    /// Replace every header called `name` (case-insensitive) by one with `value`.
    pub fn replace(mut self, name: &str, value: impl AsRef<[u8]>) -> Request {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.header(name, value)
    }

    /// The bytes on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        let mut r = format!("{} {} HTTP/1.1\r\n", self.method, self.target).into_bytes();
        for (name, value) in &self.headers {
            r.extend_from_slice(name.as_bytes());
            r.extend_from_slice(b": ");
            r.extend_from_slice(value);
            r.extend_from_slice(b"\r\n");
        }
        r.extend_from_slice(b"User-Agent: gatekeeper-tests\r\nConnection: close\r\n\r\n");
        r
    }

    /// Send to `addr` and read the whole answer; panics on I/O errors, naming the request.
    pub fn send(&self, addr: SocketAddr) -> Answer {
        self.try_send(addr).unwrap_or_else(|e| {
            panic!(
                "{} {} to {addr}: {e}",
                self.method,
                self.target.chars().take(200).collect::<String>()
            )
        })
    }

    /// Send to `addr` and read until the server closes the connection.
    pub fn try_send(&self, addr: SocketAddr) -> std::io::Result<Answer> {
        self.send_within(addr, SOON)
    }

    /// As [`Request::try_send`], failing when the server is silent for `timeout`.
    pub fn send_within(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<Answer> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(&self.bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
            std::io::Error::other(format!("no complete response head in {text:?}"))
        })?;
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not a status line: {head:?}")))?;
        Ok(Answer {
            status,
            head: head.to_string(),
            body: body.to_string(),
        })
    }
}

/// `/allow/{service}` for `client` (as the proxy's `X-Forwarded-For`): the status.
pub fn allow_status(addr: SocketAddr, service: &str, client: &str) -> u16 {
    Request::new("GET", &format!("/allow/{service}"))
        .header("X-Forwarded-For", client)
        .send(addr)
        .status
}
