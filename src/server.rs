//! The accept loop: serves a router (or a service made per connection) on a bound listener until
//! a shutdown future resolves, with header-read timeouts, and hands each request its peer
//! address (as `ConnectInfo` for a router).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tracing::{debug, warn};

/// A client that has not sent its headers after this long is dropped (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// At shutdown, requests in flight get this long to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `app` on `listener` until `shutdown` resolves, then let requests in flight finish (at
/// most [`DRAIN_TIMEOUT`]). Each request carries its peer address as `ConnectInfo<SocketAddr>`.
pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) {
    let connection = move |peer: SocketAddr| {
        TowerToHyperService::new(app.clone().map_request(
            move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req
            },
        ))
    };
    serve_connections(listener, connection, shutdown).await;
}

/// As [`serve`], with the service of each connection made from its peer address by
/// `connection`: the proxy-facing listener's [`crate::http::Proxy`] answers its hot paths from
/// that, without a per-request extension.
pub async fn serve_connections<S>(
    listener: TcpListener,
    mut connection: impl FnMut(SocketAddr) -> S,
    shutdown: impl Future<Output = ()>,
) where
    S: hyper::service::Service<http::Request<Incoming>, Response = Response> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
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
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(stream), connection(peer));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {}
    }
}
