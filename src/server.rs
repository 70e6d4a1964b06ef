//! The accept loop: serves a router (or a service made per connection) on a bound listener until
//! a shutdown future resolves, and hands each request its peer address (as `ConnectInfo` for a
//! router).
//!
//! Hostile load is met here, before any request is parsed. Connections are counted against a
//! budget by who opened them: peers inside `trusted_proxies` (the proxy, which carries every real
//! request) get a large one; anyone else (who can only ever be told 403) a small one, a short
//! header timeout and no keep-alive. A connection over its budget is closed at once, so thousands
//! of idle or slow strangers cannot starve the proxy. Request heads are limited to
//! [`MAX_HEAD_BYTES`] (hyper answers 431 past it) and bodies are never buffered.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tracing::{debug, warn};

/// A trusted peer that has not sent a request's headers after this long is dropped (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The same for anyone else: a stranger gets one request and little patience.
pub const UNTRUSTED_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Open connections from trusted peers (the proxy's pool, nginx/Caddy subrequests).
pub const TRUSTED_CONNECTIONS: usize = 1024;
/// Open connections from everyone else together.
pub const UNTRUSTED_CONNECTIONS: usize = 128;
/// Open connections to the admin listener.
pub const ADMIN_CONNECTIONS: usize = 64;
/// The read buffer of a connection stops growing here: once it holds this much without a
/// complete request head, hyper answers 431. (A head that completes within the read crossing the
/// mark is still parsed, so heads up to about 56 KiB can pass; memory stays bounded either way.)
/// nginx's default limit is 32 KiB too (4 × 8 KiB).
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Headers per request, at most (hyper's default, stated here).
pub const MAX_HEADERS: usize = 100;
/// At shutdown, requests in flight get this long to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `app` on `listener` until `shutdown` resolves, then let requests in flight finish (at
/// most [`DRAIN_TIMEOUT`]). Each request carries its peer address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    budget: Budget,
    shutdown: impl Future<Output = ()>,
) {
    let connection = move |peer: SocketAddr| {
        TowerToHyperService::new(app.clone().map_request(
            move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req
            },
        ))
    };
    serve_connections(listener, connection, budget, shutdown).await;
}

/// Who a connection counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A peer inside `trusted_proxies` on the proxy-facing listener.
    Trusted,
    /// Anyone else on the proxy-facing listener.
    Untrusted,
    /// The admin listener.
    Admin,
}

impl Class {
    /// The label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Trusted => "trusted",
            Class::Untrusted => "untrusted",
            Class::Admin => "admin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Open and refused connections by class, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    open: [AtomicU64; 3],
    refused: [AtomicU64; 3],
}

impl ConnectionCounts {
    /// Connections of `class` open now.
    pub fn open(&self, class: Class) -> u64 {
        self.open[class.index()].load(Ordering::Relaxed)
    }

    /// Connections of `class` closed at once because its budget was full, since the start.
    pub fn refused(&self, class: Class) -> u64 {
        self.refused[class.index()].load(Ordering::Relaxed)
    }
}

/// The connection budgets of one listener and how a peer is classed.
#[derive(Clone)]
pub struct Budget {
    classify: Arc<dyn Fn(IpAddr) -> Class + Send + Sync>,
    slots: Arc<[Arc<Semaphore>; 3]>,
    counts: Arc<ConnectionCounts>,
}

impl Budget {
    /// Budgets of [`TRUSTED_CONNECTIONS`], [`UNTRUSTED_CONNECTIONS`] and [`ADMIN_CONNECTIONS`];
    /// `classify` is asked for each new connection (it may follow a reloaded policy).
    pub fn new(
        classify: impl Fn(IpAddr) -> Class + Send + Sync + 'static,
        counts: Arc<ConnectionCounts>,
    ) -> Self {
        let sizes = [
            TRUSTED_CONNECTIONS,
            UNTRUSTED_CONNECTIONS,
            ADMIN_CONNECTIONS,
        ];
        Budget {
            classify: Arc::new(classify),
            slots: Arc::new(sizes.map(|n| Arc::new(Semaphore::new(n)))),
            counts,
        }
    }
}

/// Rate-limits the "budget full" warning to one per class every few seconds.
struct Refusals {
    last_warned: [Option<Instant>; 3],
}

impl Refusals {
    const EVERY: Duration = Duration::from_secs(10);

    fn note(&mut self, class: Class, peer: SocketAddr, counts: &ConnectionCounts) {
        let refused = counts.refused[class.index()].fetch_add(1, Ordering::Relaxed) + 1;
        let last = &mut self.last_warned[class.index()];
        if last.is_none_or(|t| t.elapsed() >= Self::EVERY) {
            *last = Some(Instant::now());
            warn!(
                class = class.as_str(),
                %peer,
                refused_so_far = refused,
                "connection budget full: closing new connections of this class"
            );
        }
    }
}

/// As [`serve`], with the service of each connection made from its peer address by
/// `connection`: the proxy-facing listener's [`crate::http::Proxy`] answers its hot paths from
/// that, without a per-request extension.
pub async fn serve_connections<S>(
    listener: TcpListener,
    mut connection: impl FnMut(SocketAddr) -> S,
    budget: Budget,
    shutdown: impl Future<Output = ()>,
) where
    S: hyper::service::Service<http::Request<Incoming>, Response = Response> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = |header_timeout, keep_alive| {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(keep_alive)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS);
        http
    };
    let patient = builder(HEADER_READ_TIMEOUT, true);
    let wary = builder(UNTRUSTED_HEADER_READ_TIMEOUT, false);
    let mut refusals = Refusals {
        last_warned: [None; 3],
    };
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let class = (budget.classify)(peer.ip());
        let Ok(slot) = budget.slots[class.index()].clone().try_acquire_owned() else {
            // Closed before a byte is read: the cheapest answer there is.
            drop(stream);
            refusals.note(class, peer, &budget.counts);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let http = if class == Class::Untrusted {
            &wary
        } else {
            &patient
        };
        let conn = http.serve_connection(TokioIo::new(stream), connection(peer));
        let conn = graceful.watch(conn);
        let counts = budget.counts.clone();
        counts.open[class.index()].fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            counts.open[class.index()].fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {}
    }
}
