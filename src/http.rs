//! The proxy-facing listener: mirrored requests (claimed by their Host before any route), share
//! forward-auth, allow decisions, the Traefik HTTP provider and the legacy share endpoint. Only
//! peers inside `trusted_proxies` are believed.
//!
//! The two hot paths, mirrored requests (claimed by Host, or by a catch-all source such as legacy
//! mode's) and `/allow/{service}`, are answered by [`Proxy`] straight from hyper's request;
//! everything else goes through the axum [`router`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::routing::{any, get};
use http::{HeaderMap, StatusCode, Uri, header};
use hyper::body::{Body as _, Incoming};

use crate::client_ip::Refusal;
use crate::gate::{Active, Gate};
use crate::metrics::Endpoint;
use crate::policy::SourceKind;
use crate::sinks::traefik_file;
use crate::sources::{mirror, share};

/// Where Traefik's HTTP provider reads the lists (`providers.http.endpoint`).
pub(crate) const DYNAMIC_JSON: &str = "/traefik/dynamic.json";

/// The router for the proxy-facing listener, every endpoint included. Requests must carry
/// `ConnectInfo<SocketAddr>` (see [`crate::server::serve`]). The daemon serves it behind
/// [`Proxy`], which answers the hot paths before it.
pub(crate) fn router(gate: Gate) -> Router {
    // `endpoint_of` must name every path of these routes: a path it calls a mirror is answered
    // by a catch-all source before the router (see `claim_unrouted`).
    Router::new()
        .route("/share/{source}", any(share_check))
        .route("/allow/{service}", any(allow))
        .route(DYNAMIC_JSON, get(dynamic_json))
        .route("/verify_share_request", any(legacy_verify))
        .fallback(unclaimed)
        .layer(middleware::from_fn_with_state(gate.clone(), mirrored))
        .with_state(gate)
}

/// The proxy-facing service of one connection. Mirrored requests and `/allow/{service}` (every
/// request of the trusted service, or of every client in legacy mode; every request to every
/// protected service behind nginx or Caddy) are answered here, as [`router`] would answer them,
/// but without its per-request boxing, extraction and `ConnectInfo` extension, which cost about a
/// fifth of gatekeeper's throughput (see the README's Performance section). Anything else goes to
/// the router.
#[derive(Clone)]
pub(crate) struct Proxy {
    gate: Gate,
    router: Router,
    peer: SocketAddr,
}

/// Makes the [`Proxy`] of each connection, for [`crate::server::serve_connections`].
pub(crate) fn proxy(gate: Gate) -> impl FnMut(SocketAddr) -> Proxy + Send + 'static {
    let router = router(gate.clone());
    move |peer| Proxy {
        gate: gate.clone(),
        router: router.clone(),
        peer,
    }
}

impl hyper::service::Service<http::Request<Incoming>> for Proxy {
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, mut req: http::Request<Incoming>) -> Answer {
        if let Some(response) = self.hot_path(&req) {
            drain(req.into_body());
            return Answer::Ready(Some(response));
        }
        req.extensions_mut().insert(ConnectInfo(self.peer));
        Answer::Routed(tower::Service::call(&mut self.router.clone(), req))
    }
}

impl Proxy {
    /// The answer to a mirrored request or an allow decision; `None` leaves the request to the
    /// router (which also judges the `/allow/` paths that are not one plain segment).
    fn hot_path(&self, req: &http::Request<Incoming>) -> Option<Response> {
        let active = self.gate.active();
        let (uri, headers) = (req.uri(), req.headers());
        if let Some(response) = claim_mirrored(&self.gate, &active, uri, headers, Some(self.peer)) {
            return Some(response);
        }
        if let Some(service) = allow_service(uri.path()) {
            let response = allow_answer(&self.gate, &active, self.peer, &service, headers);
            self.gate
                .metrics()
                .request(Endpoint::Allow, response.status().as_u16());
            return Some(response);
        }
        claim_unrouted(&self.gate, &active, uri.path(), self.peer, headers)
    }
}

/// In a policy with a catch-all mirror source (legacy mode), a request whose path no route of
/// [`router`] can match is that source's: answered, recorded and counted as the router's
/// [`unclaimed`] fallback would. `None` for the paths of a route, even those the route will turn
/// down (a nested `/share/a/b`, a `POST` of the JSON): the router judges them as before.
fn claim_unrouted(
    gate: &Gate,
    active: &Active,
    path: &str,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Option<Response> {
    let source = active.catch_all.as_deref()?;
    if endpoint_of(path, true) != Endpoint::Mirror {
        return None;
    }
    let status = mirror::record(gate, active, source, peer.ip(), headers);
    gate.metrics().request(Endpoint::Mirror, status.as_u16());
    Some(status.into_response())
}

/// Bodies up to this size are left to hyper, which drains by itself a body already in its buffer
/// (sent with the headers, as proxies send small ones). Spawning a drain for each of them cost
/// the mirror path an eighth of its throughput (see the README's Performance section).
const BUFFERED_BODY: u64 = 4 * 1024;
/// Larger bodies answered without being read are drained up to this size (Traefik's suggested
/// mirror `maxBodySize`)...
const DRAIN_LIMIT: u64 = 64 * 1024;
/// ... within this time; past either, the connection is closed instead.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Read and discard, after the answer, the body of a request answered without it, so that the
/// proxy's connection stays open for its next request: hyper closes a keep-alive connection when
/// an unread body is not already in its buffer (one sent after the headers, or larger than one
/// read). Bounded by [`DRAIN_LIMIT`] and [`DRAIN_TIME`]; nothing is kept.
fn drain(mut body: Incoming) {
    let size = body.size_hint();
    if body.is_end_stream()
        || size.upper().is_some_and(|n| n <= BUFFERED_BODY)
        || size.lower() > DRAIN_LIMIT
    {
        return;
    }
    tokio::spawn(async move {
        let mut read = 0u64;
        let discard = std::future::poll_fn(|cx| {
            loop {
                match ready!(Pin::new(&mut body).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        read += frame.data_ref().map_or(0, |d| d.len() as u64);
                        if read > DRAIN_LIMIT {
                            return Poll::Ready(());
                        }
                    }
                    _ => return Poll::Ready(()),
                }
            }
        });
        let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
    });
}

/// `{service}` of `/allow/{service}`, percent-decoded as the router's `Path` does; `None` for
/// other paths and for those the router should judge (empty, nested, not UTF-8 once decoded).
fn allow_service(path: &str) -> Option<Cow<'_, str>> {
    let segment = path.strip_prefix("/allow/")?;
    if segment.is_empty() || segment.contains('/') {
        return None;
    }
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()
}

/// The future of a [`Proxy`] answer: already made (hot paths), or the router's.
pub(crate) enum Answer {
    /// Answered without the router; taken when polled.
    Ready(Option<Response>),
    /// The router's answer.
    Routed(RouteFuture<Infallible>),
}

impl Future for Answer {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Answer::Ready(response) => Poll::Ready(Ok(response
                .take()
                .expect("an answer is polled once it is ready"))),
            Answer::Routed(future) => Pin::new(future).poll(cx),
        }
    }
}

type Peer = ConnectInfo<SocketAddr>;

fn peer(req: &Request) -> Option<SocketAddr> {
    req.extensions().get::<Peer>().map(|c| c.0)
}

/// Claims mirrored requests before any route sees them, and counts every request.
async fn mirrored(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    let active = gate.active();
    if let Some(response) = claim_mirrored(&gate, &active, req.uri(), req.headers(), peer(&req)) {
        return response;
    }
    let endpoint = endpoint_of(req.uri().path(), active.catch_all.is_some());
    let response = next.run(req).await;
    gate.metrics().request(endpoint, response.status().as_u16());
    response
}

/// A request whose Host belongs to a mirror source is that source's, whatever its path: its
/// answer (counted), given at once and without reading the body; `None` when no source claims it.
fn claim_mirrored(
    gate: &Gate,
    active: &Active,
    uri: &Uri,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Option<Response> {
    if active.mirror_hosts.is_empty() {
        return None;
    }
    let host = mirror::request_host_of(uri, headers);
    let source = mirror::source_for_host(active, host.as_deref())?;
    let status = match peer {
        Some(peer) => mirror::record(gate, active, source, peer.ip(), headers),
        None => StatusCode::FORBIDDEN,
    };
    gate.metrics().request(Endpoint::Mirror, status.as_u16());
    Some(status.into_response())
}

/// Which endpoint a path not claimed by Host is, for request counts.
fn endpoint_of(path: &str, catch_all: bool) -> Endpoint {
    if path.starts_with("/share/") {
        Endpoint::Share
    } else if path.starts_with("/allow/") {
        Endpoint::Allow
    } else if path == DYNAMIC_JSON {
        Endpoint::DynamicJson
    } else if path == "/verify_share_request" {
        Endpoint::LegacyVerify
    } else if catch_all {
        Endpoint::Mirror
    } else {
        Endpoint::Other
    }
}

/// Nothing else claimed the request: legacy mode counts it as mirrored, otherwise 404. (In the
/// daemon, [`Proxy`] answers a catch-all source's requests before the router; those that reach
/// this are on a route's path, such as `/share/a/b`.)
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

/// `/allow/{service}` through the router (see [`allow_answer`]).
async fn allow(
    State(gate): State<Gate>,
    ConnectInfo(peer): Peer,
    Path(service): Path<String>,
    headers: HeaderMap,
) -> Response {
    allow_answer(&gate, &gate.active(), peer, &service, &headers)
}

/// `/allow/{service}`: 200 when the client is on the service's allow list, 403 otherwise, 404 for
/// an unknown service. Judged on the same snapshot the file is rendered from, without a lock.
fn allow_answer(
    gate: &Gate,
    active: &Active,
    peer: SocketAddr,
    service: &str,
    headers: &HeaderMap,
) -> Response {
    let snapshot = gate.snapshot();
    let Some(list) = snapshot.service(service) else {
        return not_in_policy("service", service);
    };
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
    let (shown, generation) = gate.shown_with_generation();
    let body = traefik_file::render_json(&shown, &active.policy.traefik).to_string();
    // Traefik applies a fetched body only when it differs from its previous one; share answers
    // wait for the fetch that carries their grant.
    let hash = {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut hasher = DefaultHasher::new();
        body.hash(&mut hasher);
        hasher.finish()
    };
    gate.propagation().http.fetched(
        peer.ip(),
        hash,
        generation,
        tokio::time::Instant::now(),
        active.policy.traefik.throttle,
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    /// A catch-all source takes, before the router, every path that [`endpoint_of`] calls a
    /// mirror: none of them may be one a route takes. Asked of the router of a policy without a
    /// catch-all, whose fallback alone answers "not found".
    #[tokio::test]
    async fn no_route_takes_a_path_the_catch_all_claims() {
        let policy = crate::policy::from_yaml_str(
            "services: { immich: {} }\nsources:\n  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\" }\n",
            "test",
        )
        .unwrap();
        let router = router(Gate::new(policy, Vec::new()).0);
        let paths = [
            "/",
            "/x/y?z=1",
            "/share",
            "/share/",
            "/share/photos",
            "/share/a/b",
            "/allow",
            "/allow/",
            "/allow/immich",
            "/allow/a/b",
            "/%61llow/immich",
            "/ALLOW/immich",
            "//allow/immich",
            "/traefik",
            DYNAMIC_JSON,
            "/traefik/dynamic.json/",
            "/verify_share_request",
            "/verify_share_request/",
            "/verify_share_requests",
        ];
        let mut routed = 0;
        for path in paths {
            for method in ["GET", "POST"] {
                let mut req = http::Request::builder()
                    .method(method)
                    .uri(path)
                    .body(Body::empty())
                    .unwrap();
                let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
                req.extensions_mut().insert(ConnectInfo(peer));
                let res = router.clone().oneshot(req).await.unwrap();
                let status = res.status();
                let body = axum::body::to_bytes(res.into_body(), 1 << 16)
                    .await
                    .unwrap();
                let fallback = status == StatusCode::NOT_FOUND && body == "not found\n";
                let uri: Uri = path.parse().unwrap();
                if endpoint_of(uri.path(), true) == Endpoint::Mirror {
                    assert!(fallback, "{method} {path}: {status} {body:?}");
                }
                routed += usize::from(!fallback);
            }
        }
        // The routes are there to be missed: each of the four answered some of these.
        assert!(routed >= 8, "{routed}");
    }
}
