//! The baseline for `scripts/bench`: a bare hyper server that answers 200 with an empty body to
//! every request, served the way gatekeeper serves its proxy-facing listener (tokio multi-thread
//! runtime, hyper 1 http1 with keep-alive, TCP_NODELAY, the same header-read timeout, request
//! bodies never read), so the ratio measures gatekeeper's own work and nothing else.
//!
//! Usage: `bare_hyper [ADDR]` (default `127.0.0.1:0`); prints `listening addr=ADDR` once bound.

use std::convert::Infallible;
use std::net::SocketAddr;

use gatekeeper::server::HEADER_READ_TIMEOUT;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// The answer to everything: what gatekeeper sends a mirror (200, no body).
async fn ok(_req: Request<Incoming>) -> Result<Response<String>, Infallible> {
    let mut response = Response::new(String::new());
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{a}: {e}"))
        })?,
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        println!("listening addr={}", listener.local_addr()?);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let conn = http.serve_connection(TokioIo::new(stream), service_fn(ok));
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    })
}
