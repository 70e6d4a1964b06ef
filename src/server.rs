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
//!
//! The admin listener has one small budget that every peer shares, so it is also split by peer:
//! one address (an IPv6 /64) holds at most [`ADMIN_CONNECTIONS_PER_PEER`], and
//! [`ADMIN_LOOPBACK_RESERVE`] slots are left to 127.0.0.1 and ::1, where the container
//! HEALTHCHECK (`gatekeeper health`) comes from. Idle connections hold a slot only until the
//! header timeout, which hyper also applies between keep-alive requests.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;
use tracing::{debug, warn};

/// A trusted peer that has not sent a request's headers after this long is dropped (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The same for anyone else: a stranger gets one request and little patience.
pub(crate) const UNTRUSTED_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Open connections from trusted peers (the proxy's pool, nginx/Caddy subrequests).
pub(crate) const TRUSTED_CONNECTIONS: usize = 1024;
/// Open connections from everyone else together.
pub(crate) const UNTRUSTED_CONNECTIONS: usize = 128;
/// Open connections to the admin listener.
pub(crate) const ADMIN_CONNECTIONS: usize = 64;
/// Open admin connections from one peer address (one IPv6 /64), at most: one address holding
/// idle connections cannot lock out the others.
pub(crate) const ADMIN_CONNECTIONS_PER_PEER: usize = 16;
/// Admin connections (out of [`ADMIN_CONNECTIONS`]) that only 127.0.0.1 and ::1 may use, so the
/// container HEALTHCHECK gets in while other peers, each within its share, hold the rest.
pub(crate) const ADMIN_LOOPBACK_RESERVE: usize = 8;
/// The read buffer of a connection stops growing here: once it holds this much without a
/// complete request head, hyper answers 431. (A head that completes within the read crossing the
/// mark is still parsed, so heads up to about 56 KiB can pass; memory stays bounded either way.)
/// nginx's default limit is 32 KiB too (4 × 8 KiB).
pub(crate) const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Headers per request, at most (hyper's default, stated here).
pub(crate) const MAX_HEADERS: usize = 100;
/// At shutdown, requests in flight get this long to finish.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `app` on `listener` until `shutdown` resolves, then let requests in flight finish (at
/// most [`DRAIN_TIMEOUT`]). Each request carries its peer address as `ConnectInfo<SocketAddr>`.
pub(crate) async fn serve(
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
pub(crate) enum Class {
    /// A peer inside `trusted_proxies` on the proxy-facing listener.
    Trusted,
    /// Anyone else on the proxy-facing listener.
    Untrusted,
    /// The admin listener.
    Admin,
}

impl Class {
    /// The label in metrics and logs.
    pub(crate) fn as_str(self) -> &'static str {
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
pub(crate) struct ConnectionCounts {
    open: [AtomicU64; 3],
    refused: [AtomicU64; 3],
}

impl ConnectionCounts {
    /// Connections of `class` open now.
    pub(crate) fn open(&self, class: Class) -> u64 {
        self.open[class.index()].load(Ordering::Relaxed)
    }

    /// Connections of `class` closed at once because its budget was full, since the start.
    pub(crate) fn refused(&self, class: Class) -> u64 {
        self.refused[class.index()].load(Ordering::Relaxed)
    }
}

/// The connection budgets of one listener and how a peer is classed.
#[derive(Clone)]
pub(crate) struct Budget {
    classify: Arc<dyn Fn(IpAddr) -> Class + Send + Sync>,
    slots: Arc<[Arc<Semaphore>; 3]>,
    /// The admin slots kept for the host's own loopback addresses.
    loopback_reserve: Arc<Semaphore>,
    /// Admin connections open per peer.
    admin_peers: Arc<PeerShares>,
    counts: Arc<ConnectionCounts>,
}

impl Budget {
    /// Budgets of [`TRUSTED_CONNECTIONS`], [`UNTRUSTED_CONNECTIONS`] and [`ADMIN_CONNECTIONS`]
    /// (split by peer, see [`ADMIN_CONNECTIONS_PER_PEER`] and [`ADMIN_LOOPBACK_RESERVE`]);
    /// `classify` is asked for each new connection (it may follow a reloaded policy).
    pub(crate) fn new(
        classify: impl Fn(IpAddr) -> Class + Send + Sync + 'static,
        counts: Arc<ConnectionCounts>,
    ) -> Self {
        let sizes = [
            TRUSTED_CONNECTIONS,
            UNTRUSTED_CONNECTIONS,
            ADMIN_CONNECTIONS - ADMIN_LOOPBACK_RESERVE,
        ];
        Budget {
            classify: Arc::new(classify),
            slots: Arc::new(sizes.map(|n| Arc::new(Semaphore::new(n)))),
            loopback_reserve: Arc::new(Semaphore::new(ADMIN_LOOPBACK_RESERVE)),
            admin_peers: Arc::new(PeerShares::new(ADMIN_CONNECTIONS_PER_PEER)),
            counts,
        }
    }

    /// A slot for a new connection of `class` from `ip`, held until the connection ends, or why
    /// there is none.
    fn admit(&self, class: Class, ip: IpAddr) -> Result<Admission, Refusal> {
        let share = if class == Class::Admin {
            Some(PeerShares::take(&self.admin_peers, peer_key(ip)).ok_or(Refusal::PeerShare)?)
        } else {
            None
        };
        let slot = match self.slots[class.index()].clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) if class == Class::Admin && keeps_reserve(ip) => self
                .loopback_reserve
                .clone()
                .try_acquire_owned()
                .map_err(|_| Refusal::Full)?,
            Err(_) => return Err(Refusal::Full),
        };
        Ok(Admission {
            _slot: slot,
            _share: share,
        })
    }
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Its class's budget is full.
    Full,
    /// Its peer holds its whole share of the class's budget.
    PeerShare,
}

/// What a connection holds while it is open; dropping it gives everything back.
struct Admission {
    _slot: OwnedSemaphorePermit,
    _share: Option<PeerShare>,
}

/// Connections open per peer, each peer capped at `share`.
#[derive(Debug)]
struct PeerShares {
    share: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PeerShares {
    fn new(share: usize) -> Self {
        PeerShares {
            share,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Counts only: a panic elsewhere cannot leave them half-updated.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One more connection for `key`, unless it already holds its share.
    fn take(shares: &Arc<Self>, key: IpAddr) -> Option<PeerShare> {
        let mut open = shares.lock();
        let held = open.entry(key).or_insert(0);
        if *held >= shares.share {
            return None;
        }
        *held += 1;
        Some(PeerShare {
            shares: shares.clone(),
            key,
        })
    }
}

/// One connection's part of its peer's share.
#[derive(Debug)]
struct PeerShare {
    shares: Arc<PeerShares>,
    key: IpAddr,
}

impl Drop for PeerShare {
    fn drop(&mut self) {
        let mut open = self.shares.lock();
        if let Some(held) = open.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                // The map holds only peers with connections open.
                open.remove(&self.key);
            }
        }
    }
}

/// Whom a peer's connections count as: its address, IPv4-mapped IPv6 as IPv4, and IPv6 by its
/// /64, which one host or phone can fill with addresses.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) if !v6.is_loopback() => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        ip => ip,
    }
}

/// Whether `ip` may use the admin slots kept for the HEALTHCHECK: the address a connection to
/// this host's loopback comes from (127.0.0.1, or ::1), not the rest of 127.0.0.0/8.
fn keeps_reserve(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST,
    }
}

/// Rate-limits the "budget full" and "peer holds its share" warnings to one each per class
/// every few seconds.
struct Refusals {
    last_warned: [[Option<Instant>; 3]; 2],
}

impl Refusals {
    const EVERY: Duration = Duration::from_secs(10);

    fn note(&mut self, class: Class, why: Refusal, peer: SocketAddr, counts: &ConnectionCounts) {
        let refused = counts.refused[class.index()].fetch_add(1, Ordering::Relaxed) + 1;
        let last = &mut self.last_warned[why as usize][class.index()];
        if last.is_none_or(|t| t.elapsed() >= Self::EVERY) {
            *last = Some(Instant::now());
            match why {
                Refusal::Full => warn!(
                    class = class.as_str(),
                    %peer,
                    refused_so_far = refused,
                    "connection budget full: closing new connections of this class"
                ),
                Refusal::PeerShare => warn!(
                    class = class.as_str(),
                    %peer,
                    share = ADMIN_CONNECTIONS_PER_PEER,
                    refused_so_far = refused,
                    "this peer holds its share of the connection budget: closing its new connections"
                ),
            }
        }
    }
}

/// As [`serve`], with the service of each connection made from its peer address by
/// `connection`: the proxy-facing listener's [`crate::http::Proxy`] answers its hot paths from
/// that, without a per-request extension.
pub(crate) async fn serve_connections<S>(
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
        last_warned: [[None; 3]; 2],
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
        let slot = match budget.admit(class, peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                // Closed before a byte is read: the cheapest answer there is.
                drop(stream);
                refusals.note(class, why, peer, &budget.counts);
                continue;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn admin_budget() -> Budget {
        Budget::new(|_| Class::Admin, Arc::new(ConnectionCounts::default()))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Admit `n` connections of `class` from `from`; panics naming the first refusal.
    fn hold(budget: &Budget, class: Class, from: &str, n: usize) -> Vec<Admission> {
        (0..n)
            .map(|i| {
                budget
                    .admit(class, ip(from))
                    .unwrap_or_else(|why| panic!("connection {i} from {from}: {why:?}"))
            })
            .collect()
    }

    #[test]
    fn one_admin_peer_holds_at_most_its_share() {
        let budget = admin_budget();
        let held = hold(
            &budget,
            Class::Admin,
            "192.0.2.1",
            ADMIN_CONNECTIONS_PER_PEER,
        );
        assert_eq!(
            budget.admit(Class::Admin, ip("192.0.2.1")).err(),
            Some(Refusal::PeerShare)
        );
        // Anyone else still gets in, and a closed connection gives its part of the share back.
        let _other = hold(&budget, Class::Admin, "192.0.2.2", 1);
        drop(held);
        let _again = hold(
            &budget,
            Class::Admin,
            "192.0.2.1",
            ADMIN_CONNECTIONS_PER_PEER,
        );
        assert!(budget.admin_peers.lock().len() == 2);
    }

    #[test]
    fn peers_within_their_shares_leave_the_reserve_to_loopback() {
        let budget = admin_budget();
        let shared = ADMIN_CONNECTIONS - ADMIN_LOOPBACK_RESERVE;
        let mut held = Vec::new();
        for peer in 1..=shared / ADMIN_CONNECTIONS_PER_PEER {
            let from = format!("192.0.2.{peer}");
            held.extend(hold(
                &budget,
                Class::Admin,
                &from,
                ADMIN_CONNECTIONS_PER_PEER,
            ));
        }
        held.extend(hold(
            &budget,
            Class::Admin,
            "192.0.2.100",
            shared % ADMIN_CONNECTIONS_PER_PEER,
        ));
        // The shared slots are gone, for 127.0.0.2 as for anyone but the HEALTHCHECK's address.
        for other in ["192.0.2.101", "127.0.0.2", "::ffff:192.0.2.102"] {
            assert_eq!(
                budget.admit(Class::Admin, ip(other)).err(),
                Some(Refusal::Full),
                "{other}"
            );
        }
        let half = ADMIN_LOOPBACK_RESERVE / 2;
        let _v4 = hold(&budget, Class::Admin, "127.0.0.1", half);
        let _v6 = hold(&budget, Class::Admin, "::1", ADMIN_LOOPBACK_RESERVE - half);
        assert_eq!(
            budget.admit(Class::Admin, ip("::ffff:127.0.0.1")).err(),
            Some(Refusal::Full)
        );
    }

    #[test]
    fn an_ipv6_peer_is_its_64_and_a_mapped_address_its_ipv4() {
        assert_eq!(peer_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(peer_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(peer_key(ip("::1")), ip("::1"));
        assert_eq!(peer_key(ip("192.0.2.7")), ip("192.0.2.7"));

        let budget = admin_budget();
        let _held = hold(
            &budget,
            Class::Admin,
            "2001:db8::1",
            ADMIN_CONNECTIONS_PER_PEER,
        );
        assert_eq!(
            budget.admit(Class::Admin, ip("2001:db8::ffff")).err(),
            Some(Refusal::PeerShare)
        );
        let _next = hold(&budget, Class::Admin, "2001:db8:0:1::1", 1);
    }

    #[test]
    fn only_the_loopback_addresses_keep_the_reserve() {
        for yes in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            assert!(keeps_reserve(ip(yes)), "{yes}");
        }
        for no in ["127.0.0.2", "10.0.0.1", "::2", "2001:db8::1"] {
            assert!(!keeps_reserve(ip(no)), "{no}");
        }
    }

    #[test]
    fn the_proxy_listener_has_no_share_per_peer() {
        let budget = Budget::new(|_| Class::Trusted, Arc::new(ConnectionCounts::default()));
        let _proxy = hold(&budget, Class::Trusted, "10.0.0.2", TRUSTED_CONNECTIONS);
        assert_eq!(
            budget.admit(Class::Trusted, ip("10.0.0.2")).err(),
            Some(Refusal::Full)
        );
        let _strangers = hold(
            &budget,
            Class::Untrusted,
            "192.0.2.1",
            UNTRUSTED_CONNECTIONS,
        );
        assert!(budget.admin_peers.lock().is_empty());
    }
}
