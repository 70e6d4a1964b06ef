//! The proxy-facing router: mirrored requests (claimed by their Host before any route), share
//! forward-auth, allow decisions, the Traefik HTTP provider and the legacy share endpoint. Only
//! peers inside `trusted_proxies` are believed.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use http::{HeaderMap, StatusCode, header};

use crate::client_ip::Refusal;
use crate::gate::Gate;
use crate::metrics::Endpoint;
use crate::policy::SourceKind;
use crate::sinks::traefik_file;
use crate::sources::{mirror, share};

/// The router for the proxy-facing listener. Requests must carry `ConnectInfo<SocketAddr>`
/// (see [`crate::server::serve`]).
pub fn router(gate: Gate) -> Router {
    Router::new()
        .route("/share/{source}", any(share_check))
        .route("/allow/{service}", any(allow))
        .route("/traefik/dynamic.json", get(dynamic_json))
        .route("/verify_share_request", any(legacy_verify))
        .fallback(unclaimed)
        .layer(middleware::from_fn_with_state(gate.clone(), mirrored))
        .with_state(gate)
}

type Peer = ConnectInfo<SocketAddr>;

fn peer(req: &Request) -> Option<SocketAddr> {
    req.extensions().get::<Peer>().map(|c| c.0)
}

/// A request whose Host belongs to a mirror source is that source's, whatever its path: answer
/// before any route sees it, and without reading the body. Every request is counted here.
async fn mirrored(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    let active = gate.active();
    if !active.mirror_hosts.is_empty() {
        let host = mirror::request_host_of(req.uri(), req.headers());
        if let Some(source) = mirror::source_for_host(&active, host.as_deref()) {
            let status = match peer(&req) {
                Some(peer) => mirror::record(&gate, &active, source, peer.ip(), req.headers()),
                None => StatusCode::FORBIDDEN,
            };
            gate.metrics().request(Endpoint::Mirror, status.as_u16());
            return status.into_response();
        }
    }
    let endpoint = endpoint_of(req.uri().path(), active.catch_all.is_some());
    let response = next.run(req).await;
    gate.metrics().request(endpoint, response.status().as_u16());
    response
}

/// Which endpoint a path not claimed by Host is, for request counts.
fn endpoint_of(path: &str, catch_all: bool) -> Endpoint {
    if path.starts_with("/share/") {
        Endpoint::Share
    } else if path.starts_with("/allow/") {
        Endpoint::Allow
    } else if path == "/traefik/dynamic.json" {
        Endpoint::DynamicJson
    } else if path == "/verify_share_request" {
        Endpoint::LegacyVerify
    } else if catch_all {
        Endpoint::Mirror
    } else {
        Endpoint::Other
    }
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

/// 404 naming what was asked for (printable and bounded, since anyone may ask), without listing
/// the policy's other names.
fn not_in_policy(what: &str, name: &str) -> Response {
    let shown: String = name
        .chars()
        .filter(char::is_ascii_graphic)
        .take(64)
        .collect();
    (
        StatusCode::NOT_FOUND,
        format!("no {what} `{shown}` in the policy\n"),
    )
        .into_response()
}

/// `/share/{source}`: forward-auth for a share link (the URI in `X-Forwarded-Uri`).
async fn share_check(
    State(gate): State<Gate>,
    ConnectInfo(peer): Peer,
    Path(source): Path<String>,
    headers: HeaderMap,
) -> Response {
    let active = gate.active();
    if !active.shares.contains_key(&source) {
        return not_in_policy("share source", &source);
    }
    share::forward_auth(&gate, &active, &source, peer.ip(), &headers)
        .await
        .into_response()
}

/// `/allow/{service}`: 200 when the client is on the service's allow list, 403 otherwise. Judged
/// on the same snapshot the file is rendered from, without a lock.
async fn allow(
    State(gate): State<Gate>,
    ConnectInfo(peer): Peer,
    Path(service): Path<String>,
    headers: HeaderMap,
) -> Response {
    let snapshot = gate.snapshot();
    let Some(list) = snapshot.service(&service) else {
        return not_in_policy("service", &service);
    };
    let active = gate.active();
    let client = match active
        .client_ip
        .resolve(peer.ip(), headers.get_all("x-forwarded-for"))
    {
        Ok(ip) => ip,
        // The address the proxy saw is itself in the trusted ranges (a LAN client, or a proxy
        // hiding addresses): judge it like Traefik's ipAllowList would, by the list alone. It
        // can pass only through always_allow, never through a grant.
        Err(Refusal::ClientIsTrustedProxy(ip)) => ip,
        Err(_) => return (StatusCode::FORBIDDEN, "forbidden\n").into_response(),
    };
    if list.allows(client) {
        (StatusCode::OK, "allowed\n").into_response()
    } else {
        (StatusCode::FORBIDDEN, "forbidden\n").into_response()
    }
}

/// `/traefik/dynamic.json`: the file's configuration as JSON for Traefik's HTTP provider; for
/// trusted peers only (it lists who is allowed).
async fn dynamic_json(State(gate): State<Gate>, ConnectInfo(peer): Peer) -> Response {
    let active = gate.active();
    if !active.client_ip.is_trusted(peer.ip()) {
        return (StatusCode::FORBIDDEN, "forbidden\n").into_response();
    }
    // The same content as the file: what the state file holds, never more.
    let json = traefik_file::render_json(&gate.shown(), &active.policy.traefik);
    (
        [(header::CONTENT_TYPE, "application/json")],
        json.to_string(),
    )
        .into_response()
}

/// The old app's `/verify_share_request?protocol=..&container_name_port=..`: handled as the
/// share source whose upstream is that origin. Any other origin is refused with 400 and the
/// policy key to add; an unconfigured host is never contacted.
async fn legacy_verify(
    State(gate): State<Gate>,
    ConnectInfo(peer): Peer,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let (Some(protocol), Some(target)) = (query.get("protocol"), query.get("container_name_port"))
    else {
        return (
            StatusCode::BAD_REQUEST,
            "verify_share_request needs ?protocol=http&container_name_port=host:port\n",
        )
            .into_response();
    };
    let active = gate.active();
    let wanted: Option<String> = format!("{protocol}://{target}")
        .parse::<http::Uri>()
        .ok()
        .filter(|u| u.path() == "/" || u.path().is_empty())
        .map(|u| share::origin_of(&u));
    let source = wanted.as_ref().and_then(|wanted| {
        active
            .policy
            .sources
            .iter()
            .find_map(|(name, s)| match &s.kind {
                SourceKind::Share(sh) if &share::origin_of(&sh.upstream) == wanted => {
                    Some(name.clone())
                }
                _ => None,
            })
    });
    let Some(source) = source else {
        let shown: String = format!("{protocol}://{target}")
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(200)
            .collect();
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "no share source has upstream `{shown}`; add one to the policy: \
                 sources.<name>: {{ kind: share, upstream: \"{shown}\", path: '<regex of the share links>', unlocks: [<service>] }} \
                 (in legacy mode: GATEKEEPER_SOURCES__<NAME>__KIND=share, ..__UPSTREAM, ..__PATH, ..__UNLOCKS)\n"
            ),
        )
            .into_response();
    };
    share::forward_auth(&gate, &active, &source, peer.ip(), &headers)
        .await
        .into_response()
}
