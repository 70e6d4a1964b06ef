//! The admin listener: `/healthz`, `/metrics`, the entries API (bearer token) and the status
//! page. Separate from the proxy-facing listener so it can stay on loopback.
//!
//! Only the API needs the token: health, metrics and the status page are read-only and are what
//! a container runtime, Prometheus and a phone on the LAN read. They do show client addresses,
//! which is why `admin.listen` must stay private (loopback by default).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get};
use http::{StatusCode, header};
use ipnet::IpNet;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tracing::{debug, error, info};

use crate::gate::{Gate, GrantError};
use crate::ledger::{Entry, Millis};
use crate::policy::{self, Policy, SourceKind};
use crate::spans::{ago_or_in, short_duration};

/// Longest a grant waits for the state file before it is answered: an acknowledged grant must
/// survive kill -9, so without the write there is no 201.
const PERSIST_TIMEOUT: Duration = Duration::from_secs(5);

/// Shared state of the admin routes.
#[derive(Clone)]
pub(crate) struct Admin {
    gate: Gate,
    /// The API's bearer token; `None` turns the API off.
    token: Option<String>,
}

/// Why the admin token could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// `admin.token_file` cannot be read.
    #[error("cannot read admin.token_file {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is empty.
    #[error("admin.token_file {} is empty", path.display())]
    Empty {
        /// The file.
        path: std::path::PathBuf,
    },
}

/// The admin token: `admin.token` (`GATEKEEPER_ADMIN__TOKEN`) wins over `admin.token_file`;
/// neither means the API is off.
pub(crate) fn load_token(policy: &Policy) -> Result<Option<String>, TokenError> {
    if let Some(t) = &policy.admin.token {
        return Ok(Some(t.clone()));
    }
    let Some(path) = &policy.admin.token_file else {
        return Ok(None);
    };
    read_token(path).map(Some)
}

fn read_token(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(token)
}

/// The admin router: health, metrics and the status page open; the entries API behind the
/// bearer token (or off, without one).
pub(crate) fn router(gate: Gate, token: Option<String>) -> Router {
    let admin = Admin { gate, token };
    let api = Router::new()
        .route("/api/v1/entries", get(list).post(grant))
        .route("/api/v1/entries/{address}", delete(revoke))
        // An unencoded CIDR (`/api/v1/entries/203.0.113.5/32`) is two path segments.
        .route("/api/v1/entries/{address}/{prefix}", delete(revoke_cidr))
        .route_layer(middleware::from_fn_with_state(admin.clone(), bearer));
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(admin)
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// What the API answers instead of a result. The message is the whole body (`{"error": ..}`):
/// it names the bad value, never an internal detail.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// No bearer token, or not the configured one.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// No token is configured, so the API is off.
    #[error("the admin API is off: set admin.token_file or GATEKEEPER_ADMIN__TOKEN")]
    Off,
    /// A bad value in the request.
    #[error("{0}")]
    BadRequest(String),
    /// Nothing matched.
    #[error("{0}")]
    NotFound(String),
    /// Granted, but already gone again (expired or evicted) when the answer was made.
    #[error("{0}")]
    Gone(String),
    /// The grant is in memory but not yet in the state file.
    #[error("the grant is not on disk yet (the state file cannot be written); see /healthz")]
    NotPersisted,
    /// The shared store did not take the grant.
    #[error("the grant was not stored: {0}; see /healthz")]
    NotStored(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Off => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Gone(_) => StatusCode::CONFLICT,
            ApiError::NotPersisted | ApiError::NotStored(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The body of every API error.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorJson {
    /// What went wrong, in words.
    pub(crate) error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            error!(error = %self, "admin API request failed");
        }
        let body = axum::Json(ErrorJson {
            error: self.to_string(),
        });
        if let ApiError::Unauthorized = self {
            return (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
        }
        (status, body).into_response()
    }
}

// ---------------------------------------------------------------------------------------------
// The bearer token
// ---------------------------------------------------------------------------------------------

/// Let a request with the configured token through; 401 otherwise, 403 when the API is off.
async fn bearer(State(admin): State<Admin>, req: Request, next: Next) -> Response {
    let Some(token) = &admin.token else {
        return ApiError::Off.into_response();
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match given {
        Some(given) if same_token(given.as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => {
            debug!(
                path = req.uri().path(),
                "admin API request without a valid token"
            );
            ApiError::Unauthorized.into_response()
        }
    }
}

/// Compare in time that depends on the lengths only, so the token cannot be guessed byte by byte
/// from response times.
fn same_token(given: &[u8], token: &[u8]) -> bool {
    // Unequal lengths answer false at once: only the length can leak, never a matching prefix.
    given.ct_eq(token).into()
}

// ---------------------------------------------------------------------------------------------
// The entries API
// ---------------------------------------------------------------------------------------------

/// One entry as the API shows it. Times are RFC 3339 (UTC, seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EntryJson {
    /// The source that granted it.
    pub(crate) source: String,
    /// The allowed network.
    pub(crate) network: String,
    /// Who proved trust, when the source knows.
    pub(crate) identity: Option<String>,
    /// When it was first granted.
    pub(crate) first_seen: String,
    /// When it was last seen.
    pub(crate) last_seen: String,
    /// When it expires, or `null` for never.
    pub(crate) expires: Option<String>,
    /// Requests seen.
    pub(crate) hits: u64,
}

/// `GET /api/v1/entries`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EntriesJson {
    /// Every entry, in source order then network order.
    pub(crate) entries: Vec<EntryJson>,
}

/// An entry that a `DELETE` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RemovedJson {
    /// The source it belonged to.
    pub(crate) source: String,
    /// The network.
    pub(crate) network: String,
    /// Its identity, if known.
    pub(crate) identity: Option<String>,
}

/// `DELETE /api/v1/entries/{address}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RevokedJson {
    /// What was removed (at least one entry).
    pub(crate) removed: Vec<RemovedJson>,
}

/// `POST /api/v1/entries`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantJson {
    /// The source to grant through.
    pub(crate) source: String,
    /// An address or CIDR network.
    pub(crate) address: String,
    /// End the grant after this long at the latest (`1h`, `7d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ttl: Option<String>,
}

/// RFC 3339 in UTC to the second, as the API and the status page show times.
pub(crate) fn rfc3339(at: Millis) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at)).to_string()
}

fn entry_json(source: &str, e: &Entry, expires: Option<Millis>) -> EntryJson {
    EntryJson {
        source: source.to_string(),
        network: e.network.to_string(),
        identity: e.identity.clone(),
        first_seen: rfc3339(e.first_seen),
        last_seen: rfc3339(e.last_seen()),
        expires: expires.map(rfc3339),
        hits: e.hits(),
    }
}

/// An address as an operator writes it: a CIDR network (host bits cleared), an IPv4 address as
/// its /32, an IPv6 address as its `ipv6_prefix` network (what a client with that address is
/// granted, since phones rotate addresses inside it).
pub(crate) fn parse_address(s: &str, ipv6_prefix: u8) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(ip) = t.parse::<IpAddr>() {
        // The network a client at this address is granted: its /64 (ipv6_prefix), its /32, or
        // exactly the address inside a NAT64 or Teredo prefix.
        return Ok(crate::client_ip::client_network(
            ip.to_canonical(),
            ipv6_prefix,
        ));
    }
    if t.contains('/')
        && let Ok(net) = policy::parse_cidr(t)
    {
        // `::ffff:a.b.c.d/n` is the IPv4 range it maps, judged and shown as such.
        return Ok(crate::client_ip::normalise_network(net));
    }
    Err(format!(
        "address `{s}` is not an IP address or CIDR network (expected e.g. 203.0.113.5, \
         203.0.113.0/24 or 2001:db8::/64)"
    ))
}

fn unknown_source(policy: &Policy, source: &str) -> ApiError {
    let known: Vec<&str> = policy.sources.keys().map(String::as_str).collect();
    ApiError::BadRequest(format!(
        "no source `{source}` in the policy (sources: {})",
        known.join(", ")
    ))
}

/// `GET /api/v1/entries`.
async fn list(State(admin): State<Admin>) -> axum::Json<EntriesJson> {
    let entries = admin
        .gate
        .entries()
        .iter()
        .map(|(source, e, expires)| entry_json(source, e, *expires))
        .collect();
    axum::Json(EntriesJson { entries })
}

/// `POST /api/v1/entries`: grant, wait until the state file holds the grant, answer 201 with
/// the entry.
async fn grant(State(admin): State<Admin>, body: Bytes) -> Result<Response, ApiError> {
    let req: GrantJson = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "bad request body ({e}); expected {{\"source\": \"NAME\", \"address\": \"203.0.113.5\", \"ttl\": \"1h\"}} with ttl optional"
        ))
    })?;
    let active = admin.gate.active();
    let policy = &active.policy;
    let network = parse_address(&req.address, policy.ipv6_prefix).map_err(ApiError::BadRequest)?;
    let ttl = req
        .ttl
        .as_deref()
        .map(|t| policy::parse_duration(t).map_err(|e| ApiError::BadRequest(format!("ttl: {e}"))))
        .transpose()?;
    let durable = admin
        .gate
        .grant(&req.source, network, ttl)
        .map_err(|e| match e {
            GrantError::UnknownSource(s) => unknown_source(policy, &s),
            GrantError::NotGrantable(why) => {
                ApiError::BadRequest(format!("cannot grant {network}: {why}"))
            }
            e @ GrantError::TooWide(_) => ApiError::BadRequest(e.to_string()),
        })?;
    match tokio::time::timeout(PERSIST_TIMEOUT, admin.gate.persisted(durable)).await {
        Ok(Ok(_)) => {}
        Ok(Err(why)) => return Err(ApiError::NotStored(why.to_string())),
        Err(_) => return Err(ApiError::NotPersisted),
    }
    info!(source = %req.source, %network, ttl = req.ttl.as_deref(), "admin API grant");
    let entry = admin
        .gate
        .entries()
        .into_iter()
        .find(|(s, e, _)| *s == req.source && e.network == network)
        .ok_or_else(|| {
            // A ttl shorter than the write, or newer grants (on this or another replica) that
            // pushed it out under max_ips before this answer.
            ApiError::Gone(format!(
                "{network} was granted but is no longer listed: it expired, or newer grants \
                 evicted it (max_ips of `{}`)",
                req.source
            ))
        })?;
    let json = entry_json(&entry.0, &entry.1, entry.2);
    Ok((StatusCode::CREATED, axum::Json(json)).into_response())
}

/// `DELETE /api/v1/entries/{address}?source=NAME`.
async fn revoke(
    State(admin): State<Admin>,
    UrlPath(address): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<axum::Json<RevokedJson>, ApiError> {
    revoke_address(&admin, &address, query.get("source").map(String::as_str))
}

/// `DELETE /api/v1/entries/{address}/{prefix}`: a CIDR with its slash unencoded.
async fn revoke_cidr(
    State(admin): State<Admin>,
    UrlPath((address, prefix)): UrlPath<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<axum::Json<RevokedJson>, ApiError> {
    let address = format!("{address}/{prefix}");
    revoke_address(&admin, &address, query.get("source").map(String::as_str))
}

fn revoke_address(
    admin: &Admin,
    address: &str,
    source: Option<&str>,
) -> Result<axum::Json<RevokedJson>, ApiError> {
    let active = admin.gate.active();
    let policy = &active.policy;
    let network = parse_address(address, policy.ipv6_prefix).map_err(ApiError::BadRequest)?;
    let source = source.filter(|s| !s.is_empty());
    if let Some(s) = source
        && !policy.sources.contains_key(s)
    {
        return Err(unknown_source(policy, s));
    }
    let removed = admin.gate.revoke(network, source);
    if removed.is_empty() {
        return Err(ApiError::NotFound(match source {
            Some(s) => format!("{network} is not an entry of source `{s}`"),
            None => format!("{network} is not an entry of any source"),
        }));
    }
    info!(%network, source, removed = removed.len(), "admin API revoke");
    let removed = removed
        .into_iter()
        .map(|r| RemovedJson {
            source: r.source,
            network: r.network.to_string(),
            identity: r.identity,
        })
        .collect();
    Ok(axum::Json(RevokedJson { removed }))
}

// ---------------------------------------------------------------------------------------------
// Health and metrics
// ---------------------------------------------------------------------------------------------

/// 200 `ok`, or 503 with one line per problem (failing outputs, an unreachable shared store).
async fn healthz(State(admin): State<Admin>) -> Response {
    let problems = admin.gate.health().problems();
    if problems.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", problems.join("\n")),
        )
            .into_response()
    }
}

/// Prometheus text format; the gauges are counted from the ledger and snapshot now.
async fn metrics(State(admin): State<Admin>) -> Response {
    let active = admin.gate.active();
    let entries = admin.gate.entries();
    let by_source: Vec<(String, usize)> = active
        .policy
        .sources
        .keys()
        .map(|name| {
            let n = entries.iter().filter(|(s, _, _)| s == name).count();
            (name.clone(), n)
        })
        .collect();
    let by_service: Vec<(String, usize)> = admin
        .gate
        .snapshot()
        .services
        .iter()
        .map(|s| (s.name.clone(), s.allowed.len()))
        .collect();
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        admin
            .gate
            .metrics()
            .render(&by_source, &by_service, admin.gate.backend_up()),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// The status page
// ---------------------------------------------------------------------------------------------

/// `/`: who is allowed where, and how full each source is. Read-only, no script.
async fn status_page(State(admin): State<Admin>) -> Response {
    let active = admin.gate.active();
    let problems = admin.gate.health().problems();
    let page = render_status(
        &active.policy,
        &admin.gate.entries(),
        (!problems.is_empty())
            .then(|| problems.join("; "))
            .as_deref(),
        admin.gate.now(),
    );
    ([(header::CACHE_CONTROL, "no-store")], Html(page)).into_response()
}

/// A `<time>` reading "5m ago" or "in 6d 23h", with the exact time as its tooltip.
fn time_tag(at: Millis, now: Millis) -> Markup {
    let text = ago_or_in(if at <= now {
        Err(Duration::from_millis(now - at))
    } else {
        Ok(Duration::from_millis(at - now))
    });
    let exact = rfc3339(at);
    html! { time datetime=(exact) title=(exact) { (text) } }
}

fn duration_text(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_string(), short_duration)
}

const STYLE: &str = "\
:root{color-scheme:light dark;--bg:#f4f5f7;--card:#fff;--fg:#1b1d21;--muted:#646a73;\
--line:#e2e5e9;--accent:#2563eb;--ok:#15803d;--bad:#b91c1c;--warn:#d97706;--chip:#eef2ff}\
@media (prefers-color-scheme:dark){:root{--bg:#111318;--card:#1b1e25;--fg:#e8eaed;\
--muted:#9aa0a8;--line:#2b2f38;--accent:#7aa2ff;--ok:#4ade80;--bad:#f87171;--warn:#fbbf24;--chip:#232a3d}}\
*{box-sizing:border-box}\
body{margin:0;background:var(--bg);color:var(--fg);\
font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}\
header,main{max-width:760px;margin:0 auto;padding:0 14px}\
header{padding-top:18px}\
h1{font-size:1.35rem;margin:0 0 2px}\
h2{font-size:.8rem;text-transform:uppercase;letter-spacing:.06em;color:var(--muted);\
margin:22px 2px 8px}\
h3{font-size:1.05rem;margin:0;display:flex;justify-content:space-between;gap:8px;\
align-items:baseline;flex-wrap:wrap}\
.meta{color:var(--muted);font-size:.85rem;margin:0}\
.health{margin:10px 0 0;padding:8px 12px;border-radius:10px;font-size:.9rem;font-weight:600}\
.health.ok{color:var(--ok);background:color-mix(in srgb,var(--ok) 12%,transparent)}\
.health.bad{color:var(--bad);background:color-mix(in srgb,var(--bad) 12%,transparent)}\
.card{background:var(--card);border:1px solid var(--line);border-radius:14px;\
padding:12px 14px;margin:0 0 10px}\
.count{font-size:.8rem;font-weight:500;color:var(--muted)}\
ul{list-style:none;margin:8px 0 0;padding:0}\
li{padding:8px 0;border-top:1px solid var(--line)}\
li:first-child{border-top:0}\
.net{font:600 .95rem ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;\
overflow-wrap:anywhere}\
.chip{display:inline-block;font-size:.75rem;padding:1px 8px;border-radius:999px;\
background:var(--chip);color:var(--accent);margin-left:6px;vertical-align:1px}\
.sub{color:var(--muted);font-size:.82rem;margin-top:2px}\
.who{color:var(--fg);font-weight:500}\
.empty{color:var(--muted);font-style:italic;margin:8px 0 0}\
.static{margin:10px 0 0;padding-top:8px;border-top:1px dashed var(--line);color:var(--muted);\
font-size:.82rem}\
.static code{font-size:.8rem;color:var(--fg)}\
.bar{height:6px;border-radius:3px;background:var(--line);overflow:hidden;margin:8px 0 6px}\
.bar span{display:block;height:100%;background:var(--accent)}\
.bar.full span{background:var(--warn)}\
dl{display:grid;grid-template-columns:auto 1fr;gap:2px 12px;margin:6px 0 0;font-size:.85rem}\
dt{color:var(--muted)}dd{margin:0;overflow-wrap:anywhere}\
footer{max-width:760px;margin:0 auto;padding:8px 16px 28px;color:var(--muted);font-size:.78rem}";

/// The status page for `policy` and its `entries` (source, entry, expiry) at `now`. maud escapes
/// every value spliced in: source, service and identity names come from the policy and from
/// clients.
pub(crate) fn render_status(
    policy: &Policy,
    entries: &[(String, Entry, Option<Millis>)],
    problem: Option<&str>,
    now: Millis,
) -> String {
    let at = rfc3339(now);
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="robots" content="noindex";
                title { "gatekeeper status" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    h1 { "gatekeeper" }
                    p.meta {
                        (policy.services.len()) " services · " (policy.sources.len()) " sources · "
                        (entries.len()) " entries · as of "
                        time datetime=(at) { (at.replace('T', " ").replace('Z', " UTC")) }
                    }
                    @match problem {
                        None => p.health.ok { "✓ healthy: outputs written" },
                        Some(why) => p.health.bad { "✗ " (why) },
                    }
                }
                main {
                    h2 { "Services" }
                    @for (name, service) in &policy.services {
                        (service_card(policy, name, service, entries, now))
                    }
                    h2 { "Sources" }
                    @for (name, source) in &policy.sources {
                        (source_card(name, source, entries))
                    }
                }
                footer {
                    "policy " (policy.origin) " · read-only; change entries with "
                    code { "gatekeeper grant" } " and " code { "gatekeeper revoke" }
                }
            }
        }
    };
    page.into_string()
}

/// Who is allowed through to `name`, by which source, and what is always allowed.
fn service_card(
    policy: &Policy,
    name: &str,
    service: &policy::Service,
    entries: &[(String, Entry, Option<Millis>)],
    now: Millis,
) -> Markup {
    let unlocking: Vec<&str> = policy
        .sources
        .iter()
        .filter(|(_, s)| s.unlocks.iter().any(|u| u == name))
        .map(|(n, _)| n.as_str())
        .collect();
    let mut allowed: Vec<&(String, Entry, Option<Millis>)> = entries
        .iter()
        .filter(|(s, _, _)| unlocking.contains(&s.as_str()))
        .collect();
    allowed.sort_by(|a, b| (a.1.network, &a.0).cmp(&(b.1.network, &b.0)));
    let statics: Vec<String> = policy
        .always_allow
        .iter()
        .chain(&service.always_allow)
        .map(ToString::to_string)
        .collect();
    html! {
        section.card id={ "service-" (name) } {
            h3 { span { (name) } span.count { (allowed.len()) " allowed" } }
            @if allowed.is_empty() {
                p.empty { "nobody is allowed through a source" }
            } @else {
                ul {
                    @for (source, entry, expires) in allowed {
                        li {
                            span.net { (entry.network) }
                            span.chip { (source) }
                            div.sub {
                                @if let Some(id) = &entry.identity {
                                    span.who { (id) } " · "
                                }
                                "since " (time_tag(entry.first_seen, now))
                                " · seen " (time_tag(entry.last_seen(), now))
                                " · until "
                                @match expires {
                                    Some(t) => (time_tag(*t, now)),
                                    None => "revoked",
                                }
                            }
                        }
                    }
                }
            }
            @if !statics.is_empty() {
                p.static {
                    "always allowed: "
                    @for (i, net) in statics.iter().enumerate() {
                        @if i > 0 { ", " }
                        code { (net) }
                    }
                }
            }
            @if unlocking.is_empty() {
                p.static { "no source unlocks this service" }
            }
        }
    }
}

/// A source: what it watches, how full it is against `max_ips`, and its timings.
fn source_card(
    name: &str,
    source: &policy::Source,
    entries: &[(String, Entry, Option<Millis>)],
) -> Markup {
    let used = entries.iter().filter(|(s, _, _)| s == name).count();
    let max = source.limits.max_ips;
    let pct = (used * 100).checked_div(max).map_or(100, |p| p.min(100));
    let (kind, what, detail) = match &source.kind {
        SourceKind::Mirror(m) if m.catch_all => {
            ("mirror", "hosts", "every unclaimed request".into())
        }
        SourceKind::Mirror(m) => ("mirror", "hosts", m.hosts.join(", ")),
        SourceKind::Share(s) => ("share", "upstream", s.upstream.to_string()),
    };
    html! {
        section.card id={ "source-" (name) } {
            h3 {
                span { (name) span.chip { (kind) } }
                span.count { (used) " / " (max) }
            }
            div.bar.full[used >= max] { span style={ "width:" (pct) "%" } {} }
            dl {
                dt { (what) } dd { (detail) }
                dt { "unlocks" } dd { (source.unlocks.join(", ")) }
                dt { "idle_ttl" } dd { (duration_text(source.limits.idle_ttl)) }
                dt { "max_age" } dd { (duration_text(source.limits.max_age)) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    const POLICY: &str = "\
always_allow: [198.51.100.0/24]
services: { immich: {}, jellyfin: { always_allow: [203.0.113.7] } }
sources:
  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\", max_ips: 2, idle_ttl: 1h }
";

    fn gate() -> Gate {
        let policy = crate::policy::from_yaml_str(POLICY, "test").unwrap();
        Gate::new(policy, Vec::new()).0
    }

    async fn call(app: &Router, req: http::Request<Body>) -> (StatusCode, http::HeaderMap, String) {
        let res = app.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (
            parts.status,
            parts.headers,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    fn get(path: &str, token: Option<&str>) -> http::Request<Body> {
        let mut b = http::Request::get(path);
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"s3cret", b"s3cret"));
        assert!(!same_token(b"s3cres", b"s3cret"));
        assert!(!same_token(b"s3cre", b"s3cret"));
        assert!(!same_token(b"", b"s3cret"));
    }

    #[test]
    fn addresses_become_the_networks_a_client_would_get() {
        let net = |s: &str| parse_address(s, 64).unwrap().to_string();
        assert_eq!(net("203.0.113.5"), "203.0.113.5/32");
        assert_eq!(net("203.0.113.5/24"), "203.0.113.0/24");
        assert_eq!(net("2001:db8:0:1:2:3:4:5"), "2001:db8:0:1::/64");
        assert_eq!(net("2001:db8::/64"), "2001:db8::/64");
        assert_eq!(net("::ffff:203.0.113.5"), "203.0.113.5/32");
        let err = parse_address("nope", 64).unwrap_err();
        assert!(err.contains("`nope`"), "{err}");
        assert!(parse_address("1.2.3.4/33", 64).is_err());
    }

    #[test]
    fn status_page_escapes_hostile_names_everywhere() {
        const HOSTILE: &str = "<script>alert(\"x\" & 'y')</script>";
        const ESCAPED: &str = "&lt;script&gt;alert(&quot;x&quot; &amp; 'y')&lt;/script&gt;";
        let mut policy = crate::policy::from_yaml_str(POLICY, "test").unwrap();
        // Validation keeps names to [A-Za-z0-9_-]; the page does not rely on it. A service, a
        // source and what it unlocks, the policy's origin, an identity and a problem, hostile.
        let gate = Gate::new(policy.clone(), Vec::new()).0;
        gate.record("ha", "203.0.113.5/32".parse().unwrap(), Some(HOSTILE));
        let service = policy.services.shift_remove("immich").unwrap();
        policy.services.insert(HOSTILE.into(), service);
        let mut source = policy.sources.shift_remove("ha").unwrap();
        source.unlocks = vec![HOSTILE.into(), "jellyfin".into()];
        policy.sources.insert(HOSTILE.into(), source);
        policy.origin = HOSTILE.into();
        let entries: Vec<_> = gate
            .entries()
            .into_iter()
            .map(|(_, e, expires)| (HOSTILE.to_string(), e, expires))
            .collect();
        let html = render_status(&policy, &entries, Some(HOSTILE), gate.now());
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("\"x\""), "{html}");
        // The service's id and heading; the source's chip and the identity in both services'
        // cards; the source's id, heading and unlocks; the problem; the footer's origin.
        assert_eq!(html.matches(ESCAPED).count(), 11, "{html}");
        assert!(
            html.contains(&format!("id=\"service-{ESCAPED}\"")),
            "{html}"
        );
        assert!(html.contains(&format!("id=\"source-{ESCAPED}\"")), "{html}");
        assert!(html.contains(&format!("<span class=\"who\">{ESCAPED}</span>")));
    }

    #[tokio::test]
    async fn api_is_off_without_a_token_and_closed_without_the_right_one() {
        let off = router(gate(), None);
        let (status, _, body) = call(&off, get("/api/v1/entries", Some("x"))).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("admin API is off"), "{body}");

        let on = router(gate(), Some("s3cret".into()));
        for token in [None, Some("wrong!"), Some("s3cre")] {
            let (status, headers, _) = call(&on, get("/api/v1/entries", token)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
            assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        }
        let (status, _, body) = call(&on, get("/api/v1/entries", Some("s3cret"))).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "{\"entries\":[]}")
        );
        // Health, metrics and the page need no token.
        for path in ["/healthz", "/metrics", "/"] {
            assert_eq!(call(&on, get(path, None)).await.0, StatusCode::OK, "{path}");
        }
    }

    #[tokio::test]
    async fn bad_grants_name_the_bad_value() {
        let gate = gate();
        let app = router(gate.clone(), Some("t".into()));
        for (body, needle) in [
            (r#"{"source":"ha","address":"nope"}"#, "`nope`"),
            (r#"{"source":"hass","address":"203.0.113.5"}"#, "`hass`"),
            (
                r#"{"source":"ha","address":"198.51.100.5"}"#,
                "198.51.100.0/24",
            ),
            (r#"{"source":"ha","address":"127.0.0.1"}"#, "trusted proxy"),
            (r#"{"source":"ha","address":"203.0.0.0/8"}"#, "too wide"),
            (
                r#"{"source":"ha","address":"203.0.113.5","ttl":"soon"}"#,
                "`soon`",
            ),
            (r#"{"source":"ha"}"#, "address"),
        ] {
            let req = http::Request::post("/api/v1/entries")
                .header(header::AUTHORIZATION, "Bearer t")
                .body(Body::from(body))
                .unwrap();
            let (status, _, text) = call(&app, req).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
            let err: ErrorJson = serde_json::from_str(&text).unwrap();
            assert!(err.error.contains(needle), "{body}: {}", err.error);
        }
        assert!(gate.entries().is_empty());
    }

    #[test]
    fn status_page_escapes_and_lists_entries_per_service() {
        let policy = crate::policy::from_yaml_str(POLICY, "test <file>").unwrap();
        let gate = Gate::new(policy.clone(), Vec::new()).0;
        gate.record(
            "ha",
            "203.0.113.5/32".parse().unwrap(),
            Some("<script>x</script>"),
        );
        let html = render_status(&policy, &gate.entries(), None, gate.now());
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(html.contains("test &lt;file&gt;"));
        for service in ["immich", "jellyfin"] {
            let start = html.find(&format!("id=\"service-{service}\"")).unwrap();
            let section = &html[start..start + html[start..].find("</section>").unwrap()];
            assert!(section.contains("203.0.113.5/32"), "{section}");
            assert!(section.contains(">ha<"), "{section}");
        }
        assert!(html.contains("<code>203.0.113.7/32</code>"));
        assert!(html.contains("1 / 2"));
    }
}
