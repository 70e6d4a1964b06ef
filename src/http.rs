//! The proxy-facing router: mirrored requests (claimed by their Host before any route), and the
//! routes later issues add. Only peers inside `trusted_proxies` are believed.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::gate::Gate;
use crate::sources::mirror;

/// The router for the proxy-facing listener. Requests must carry `ConnectInfo<SocketAddr>`
/// (see [`crate::server::serve`]).
pub fn router(gate: Gate) -> Router {
    Router::new()
        .fallback(unclaimed)
        .layer(middleware::from_fn_with_state(gate.clone(), mirrored))
        .with_state(gate)
}

fn peer(req: &Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// A request whose Host belongs to a mirror source is that source's, whatever its path: answer
/// before any route sees it, and without reading the body.
async fn mirrored(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    let active = gate.active();
    if !active.mirror_hosts.is_empty() {
        let (parts, body) = req.into_parts();
        let host = mirror::request_host(&parts);
        if let Some(source) = mirror::source_for_host(&active, host.as_deref()) {
            let Some(peer) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
                return StatusCode::FORBIDDEN.into_response();
            };
            return mirror::record(&gate, &active, source, peer.0.ip(), &parts.headers)
                .into_response();
        }
        return next.run(Request::from_parts(parts, body)).await;
    }
    next.run(req).await
}

/// Nothing else claimed the request: legacy mode counts it as mirrored, otherwise 404.
async fn unclaimed(State(gate): State<Gate>, req: Request) -> Response {
    let active = gate.active();
    match (&active.catch_all, peer(&req)) {
        (Some(source), Some(peer)) => {
            mirror::record(&gate, &active, source, peer.ip(), req.headers()).into_response()
        }
        _ => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}
