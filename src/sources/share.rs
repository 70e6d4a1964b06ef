//! The share source: forward-auth for share links. The forwarded URI must match one of the
//! source's anchored patterns before anything is sent; the check goes only to the policy's
//! upstream origin; failed checks are counted per client and throttled; checks in flight are
//! bounded; a valid answer is cached briefly.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use ipnet::IpNet;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tracing::{debug, info, warn};

use crate::client_ip::Refusal;
use crate::gate::{Active, Gate};
use crate::sinks::traefik_apply::Provider;
use config::{Share, ShareCheck};

pub mod config;
pub(crate) mod state;

use state::{Admission, throttle_key};

/// Forwarded URIs longer than this are refused: no share link is this long.
pub(crate) const MAX_URI_LEN: usize = 2048;

/// Why a forwarded URI is refused before anything is sent upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkRefusal {
    /// No `X-Forwarded-Uri` header, or an empty one.
    #[error("no forwarded uri")]
    Missing,
    /// Longer than [`MAX_URI_LEN`].
    #[error("forwarded uri is {0} bytes, over {MAX_URI_LEN}")]
    TooLong(usize),
    /// Not an origin-form path (`//host`, `http://host`, `@host`, backslashes, controls, ...).
    #[error("forwarded uri is not a plain path: {0}")]
    NotAPath(&'static str),
    /// The path matches none of the source's patterns.
    #[error("path matches no pattern of the source")]
    NoMatch,
    /// The built URL would leave the upstream's origin (never expected; checked anyway).
    #[error("check url {0} leaves the upstream origin")]
    OffOrigin(String),
}

/// The URL to check a forwarded URI against: the upstream origin plus the matched pattern's
/// check template (captures percent-encoded) or, without a template, the forwarded path and query.
pub fn check_url(share: &Share, forwarded_uri: &str) -> Result<reqwest::Url, LinkRefusal> {
    let uri = forwarded_uri;
    if uri.is_empty() {
        return Err(LinkRefusal::Missing);
    }
    if uri.len() > MAX_URI_LEN {
        return Err(LinkRefusal::TooLong(uri.len()));
    }
    if !uri.starts_with('/') {
        return Err(LinkRefusal::NotAPath("does not start with /"));
    }
    if uri.starts_with("//") {
        return Err(LinkRefusal::NotAPath("starts with // (another host)"));
    }
    if let Some(c) = uri
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '\\' | '#'))
    {
        return Err(LinkRefusal::NotAPath(match c {
            '\\' => "holds a backslash",
            '#' => "holds a fragment",
            _ => "holds whitespace, control or non-ASCII characters",
        }));
    }
    let path = uri.split_once('?').map_or(uri, |(p, _)| p);
    // Whatever a pattern allows, these never reach an upstream: they re-route on servers that
    // decode before routing.
    let lower = path.to_ascii_lowercase();
    if path.split('/').any(|seg| seg == ".." || seg == ".")
        || ["%2e", "%2f", "%5c", "%00", "%25"]
            .iter()
            .any(|bad| lower.contains(bad))
    {
        return Err(LinkRefusal::NotAPath(
            "holds dot segments or encoded separators",
        ));
    }
    let mut path_and_query = None;
    for pattern in &share.patterns {
        let Some(caps) = pattern.regex.captures(path) else {
            continue;
        };
        path_and_query = Some(match &pattern.check {
            None => uri.to_string(),
            Some(template) => fill(template, |name| caps.name(name).map_or("", |m| m.as_str())),
        });
        break;
    }
    let Some(path_and_query) = path_and_query else {
        return Err(LinkRefusal::NoMatch);
    };
    let origin = origin_of(&share.upstream);
    let url = reqwest::Url::parse(&format!("{origin}{path_and_query}"))
        .map_err(|_| LinkRefusal::OffOrigin(format!("{origin}{path_and_query}")))?;
    // The invariant every other check serves: the request goes to the configured origin only.
    if origin_of_url(&url) != origin || !url.username().is_empty() || url.password().is_some() {
        return Err(LinkRefusal::OffOrigin(url.to_string()));
    }
    Ok(url)
}

/// `scheme://host:port` of a policy upstream, the port made explicit.
pub fn origin_of(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    format!("{scheme}://{host}:{port}")
}

fn origin_of_url(url: &reqwest::Url) -> String {
    let host = match url.host() {
        Some(url::Host::Ipv6(a)) => format!("[{a}]"),
        Some(h) => h.to_string().to_ascii_lowercase(),
        None => String::new(),
    };
    format!(
        "{}://{}:{}",
        url.scheme(),
        host,
        url.port_or_known_default().unwrap_or(0)
    )
}

/// Replace `{name}` in `template` by the percent-encoded value of capture `name`.
fn fill<'a>(template: &str, value: impl Fn(&str) -> &'a str) -> String {
    let mut out = String::with_capacity(template.len() + 80);
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                out.extend(utf8_percent_encode(value(&after[..end]), CAPTURE));
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// What a capture keeps as it is: letters, digits and `-_.~` (RFC 3986's unreserved). Everything
/// else is encoded (`/`, `?`, `&`, `#`, `%`, every non-ASCII byte), so a capture can only add data
/// to the check, never structure.
const CAPTURE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// What the upstream said about a link.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A status in `valid_status`.
    Valid,
    /// Any other status.
    Invalid(u16),
    /// No answer within the timeout, or no connection: fail closed.
    Unreachable(String),
}

/// Ask the upstream about `url`. The body is never read: only the status matters, and an
/// upstream answering 100 MB must not cost memory.
pub(crate) async fn ask(
    client: &reqwest::Client,
    url: reqwest::Url,
    check: &ShareCheck,
) -> Verdict {
    let method = if check.head {
        reqwest::Method::HEAD
    } else {
        reqwest::Method::GET
    };
    let request = client.request(method, url).timeout(check.timeout).send();
    match tokio::time::timeout(check.timeout, request).await {
        Err(_) => Verdict::Unreachable(format!("no answer within {:?}", check.timeout)),
        Ok(Err(e)) => Verdict::Unreachable(error_chain(&e.without_url())),
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            debug!(status, "share check answered");
            if check.valid_status.contains(&status) {
                Verdict::Valid
            } else {
                Verdict::Invalid(status)
            }
        }
    }
}

/// "error sending request: connection refused": the error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The forward-auth flow
// ---------------------------------------------------------------------------------------------

/// Longest a valid link waits for its grant to reach the state file before answering 503.
pub(crate) const MAX_PERSIST_WAIT: Duration = Duration::from_secs(5);

/// Longest a new grant waits for the proxy to apply it. Traefik's HTTP provider may need its
/// `pollInterval` (5 s by default) plus its throttle (2 s); Traefik's forward-auth client waits
/// 30 s for an answer.
pub(crate) const MAX_PROPAGATION_WAIT: Duration = Duration::from_secs(10);

/// The answer to a forward-auth share check, with a short reason for the body.
pub(crate) type Answer = (StatusCode, &'static str);

/// Check the share link in `X-Forwarded-Uri` for `source` and grant the client when it is valid:
/// 200 (granted and persisted, and visible to the proxy when new), 403 invalid, 429 throttled,
/// 503 upstream unreachable (fail closed). An untrusted peer gets 403 and nothing is sent.
pub(crate) async fn forward_auth(
    gate: &Gate,
    active: &Arc<Active>,
    source: &str,
    peer: IpAddr,
    headers: &HeaderMap,
) -> Answer {
    let (Some(state), Some(crate::policy::SourceKind::Share(share))) = (
        active.shares.get(source),
        active.policy.sources.get(source).map(|s| &s.kind),
    ) else {
        return (StatusCode::NOT_FOUND, "no such share source\n");
    };
    let limits = &share.check;
    let client = match active
        .client_ip
        .resolve(peer, headers.get_all("x-forwarded-for"))
    {
        Ok(ip) => ip,
        // A client inside the trusted ranges (a LAN viewer) may still view the link; it is
        // never granted (see below).
        Err(Refusal::ClientIsTrustedProxy(ip)) => ip,
        Err(why) => {
            debug!(%peer, source, %why, "share check refused");
            gate.metrics().share_check(source, "refused");
            return (StatusCode::FORBIDDEN, "forbidden\n");
        }
    };
    let admission = state.throttle.admit(
        throttle_key(client, active.policy.ipv6_prefix),
        limits,
        gate.now(),
    );
    gate.metrics()
        .throttle_records(source, state.throttle.len());
    let key = match admission {
        Admission::Admitted(key) => key,
        Admission::Throttled => {
            debug!(%client, source, "share check throttled");
            gate.metrics().share_check(source, "throttled");
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed share checks\n",
            );
        }
        // 429, not 503: this client is being limited; the upstream is fine for everyone else.
        Admission::Busy => {
            debug!(%client, source, "share check refused: this client's checks are in flight");
            gate.metrics().share_check(source, "busy");
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "too many share checks in flight\n",
            );
        }
    };
    let uri = headers
        .get("x-forwarded-uri")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let url = match check_url(share, uri) {
        Ok(url) => url,
        Err(why) => {
            finish(gate, active, key, true, source);
            gate.metrics().share_check(source, "refused");
            debug!(%client, source, %why, "share link refused before any check");
            return (StatusCode::FORBIDDEN, "not a share link\n");
        }
    };
    let verdict = if state.cache.is_valid(url.as_str(), gate.now()) {
        Verdict::Valid
    } else {
        let permit = tokio::time::timeout(limits.timeout, state.in_flight.acquire()).await;
        match permit {
            Ok(Ok(_permit)) => {
                let cache_key = url.to_string();
                let v = ask(gate.http_client(), url, limits).await;
                if v == Verdict::Valid {
                    state.cache.insert(cache_key, limits.cache, gate.now());
                }
                v
            }
            _ => Verdict::Unreachable("too many checks in flight".into()),
        }
    };
    match verdict {
        Verdict::Valid => {
            finish(gate, active, key, false, source);
            gate.metrics().share_check(source, "valid");
        }
        Verdict::Invalid(status) => {
            finish(gate, active, key, true, source);
            gate.metrics().share_check(source, "invalid");
            debug!(%client, source, status, "share link invalid");
            return (StatusCode::FORBIDDEN, "invalid share link\n");
        }
        Verdict::Unreachable(why) => {
            // Not the client's fault: it does not count towards a ban.
            state.throttle.finish(key, false, limits, gate.now());
            gate.metrics().share_check(source, "unreachable");
            warn!(source, upstream = %share.upstream, %why, "share upstream unreachable; failing closed");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "share upstream unreachable\n",
            );
        }
    }

    let Ok(network) = active.client_ip.grantable(client) else {
        // Valid link from an address that is never granted (LAN, the proxy): let it view.
        return (StatusCode::OK, "valid\n");
    };
    let unlocks = &active.policy.sources[source].unlocks;
    let snapshot = gate.snapshot();
    let newly: Vec<String> = unlocks
        .iter()
        .filter(|s| !snapshot.service(s).is_some_and(|l| l.allows(client)))
        .cloned()
        .collect();
    drop(snapshot);
    let Some((_, durable)) = gate.record(source, network, None) else {
        return (StatusCode::NOT_FOUND, "no such share source\n");
    };
    // Acknowledge only what survives a crash; a state file that cannot be written (or a shared
    // store that cannot be reached) means no 200.
    let generation = match tokio::time::timeout(MAX_PERSIST_WAIT, gate.persisted(durable)).await {
        Ok(Ok(generation)) => generation,
        Ok(Err(why)) => {
            warn!(source, %network, %why, "the grant was not stored; answering 503 (see /healthz)");
            return (StatusCode::SERVICE_UNAVAILABLE, "grant not persisted\n");
        }
        Err(_) => {
            warn!(source, %network, "the grant is not on disk; answering 503 (see /healthz)");
            return (StatusCode::SERVICE_UNAVAILABLE, "grant not persisted\n");
        }
    };
    if !newly.is_empty() {
        propagate(gate, active, network, &newly, generation).await;
    }
    (StatusCode::OK, "granted\n")
}

/// Report a check's outcome to the throttle; a failure that starts a ban is logged, counted and
/// notified.
fn finish(gate: &Gate, active: &Active, key: IpNet, failed: bool, source: &str) {
    let (Some(state), Some(crate::policy::SourceKind::Share(share))) = (
        active.shares.get(source),
        active.policy.sources.get(source).map(|s| &s.kind),
    ) else {
        return;
    };
    let limits = &share.check;
    let banned = state.throttle.finish(key, failed, limits, gate.now());
    gate.metrics()
        .throttle_records(source, state.throttle.len());
    if banned {
        info!(client = %key, source, ban = ?limits.ban, "throttled: too many failed share checks");
        gate.metrics().throttled(source);
        gate.notify(
            active,
            crate::policy::EventKind::Throttle,
            source,
            key,
            None,
        );
    }
}

/// Let the proxy apply a new grant before answering, so the viewer's next request passes, for
/// every Traefik provider that serves the lists: the file provider (`traefik.file`), the Redis KV
/// provider (`traefik.redis`) and each Traefik polling `/traefik/dynamic.json`. In order:
/// - `traefik.api`: ask Traefik until every new middleware of every such provider lists the
///   network;
/// - `traefik.propagation_delay`: the explicit override, that long after the outputs hold it;
/// - otherwise predict it (see [`crate::sinks::traefik_apply`]): when each provider was given the
///   change and when its throttle lets it through, plus `traefik.settle`.
///
/// Never longer than [`MAX_PROPAGATION_WAIT`]; with nginx or Caddy deciding through `/allow`,
/// nothing is waited for.
async fn propagate(
    gate: &Gate,
    active: &Active,
    network: IpNet,
    services: &[String],
    generation: u64,
) {
    let traefik = &active.policy.traefik;
    let deadline = tokio::time::Instant::now() + MAX_PROPAGATION_WAIT;
    let propagation = gate.propagation();
    let mut providers: Vec<(&'static str, &Provider)> = Vec::new();
    if traefik.file.is_some() {
        providers.push(("file", &propagation.file));
    }
    if traefik.redis.is_some() {
        providers.push(("redis", &propagation.kv));
    }
    let readers = propagation.http.active(tokio::time::Instant::now());
    for (_, reader) in &readers {
        providers.push(("http", reader));
    }
    if providers.is_empty() {
        return;
    }

    if let Some(api) = &traefik.api {
        let mut names: Vec<&str> = providers.iter().map(|(name, _)| *name).collect();
        names.dedup();
        confirm_with_api(gate, api, traefik, network, services, &names, deadline).await;
        return;
    }

    let mut ready = tokio::time::Instant::now();
    for (name, provider) in &providers {
        match tokio::time::timeout_at(deadline, provider.applied(generation)).await {
            Ok(Some(applied)) => ready = ready.max(applied + traefik.settle),
            Ok(None) => {}
            Err(_) => {
                warn!(%network, provider = name, "the grant did not reach Traefik's {name} provider in time; answering anyway");
                return;
            }
        }
    }
    if let Some(delay) = traefik.propagation_delay {
        // Every output holds the grant now; the override replaces the prediction.
        ready = tokio::time::Instant::now() + delay;
    }
    debug!(
        %network,
        generation,
        wait_ms = ready.saturating_duration_since(tokio::time::Instant::now()).as_millis() as u64,
        "waiting until Traefik applies the grant"
    );
    tokio::time::sleep_until(ready.min(deadline)).await;
}

/// Poll Traefik's API until each of `services`' middlewares, under each of `providers`, lists
/// `network`, or `deadline` passes.
async fn confirm_with_api(
    gate: &Gate,
    api: &http::Uri,
    traefik: &crate::policy::Traefik,
    network: IpNet,
    services: &[String],
    providers: &[&str],
    deadline: tokio::time::Instant,
) {
    let origin = origin_of(api);
    let wanted = network.to_string();
    let mut pending: Vec<String> = services
        .iter()
        .flat_map(|s| {
            let name = traefik.middleware_name(s);
            providers.iter().map(move |p| format!("{name}@{p}"))
        })
        .collect();
    loop {
        let mut still = Vec::new();
        for name in pending {
            let url = format!("{origin}/api/http/middlewares/{name}");
            if !middleware_lists(gate.http_client(), &url, &wanted).await {
                still.push(name);
            }
        }
        pending = still;
        if pending.is_empty() {
            return;
        }
        if tokio::time::Instant::now() + API_POLL > deadline {
            warn!(%network, middlewares = ?pending, "Traefik's API does not show the grant yet; answering anyway");
            return;
        }
        tokio::time::sleep(API_POLL).await;
    }
}

/// How often Traefik's API is asked while a share answer waits for it.
const API_POLL: Duration = Duration::from_millis(25);

/// Does the middleware at `url` (Traefik API) list `network` in its source range?
async fn middleware_lists(client: &reqwest::Client, url: &str, network: &str) -> bool {
    let Ok(resp) = client.get(url).timeout(Duration::from_secs(1)).send().await else {
        return false;
    };
    let Ok(body) = resp.json::<serde_json::Value>().await else {
        return false;
    };
    ["ipAllowList", "ipWhiteList"].iter().any(|kind| {
        body[kind]["sourceRange"]
            .as_array()
            .is_some_and(|r| r.iter().any(|v| v.as_str() == Some(network)))
    })
}

#[cfg(test)]
mod tests {
    use super::state::*;
    use super::*;
    use crate::ledger::Millis;
    use crate::policy::{SourceKind, from_yaml_str};

    #[test]
    fn captures_are_encoded_but_for_letters_digits_and_unreserved_marks() {
        // What the hand-written encoder did before the crate replaced it: compared on every ASCII
        // character and the inputs below, then kept as these answers.
        let encoded = |v: &str| fill("{v}", |_| v);
        for b in 0u8..=127 {
            let c = char::from(b);
            let want = if c.is_ascii_alphanumeric() || "-_.~".contains(c) {
                c.to_string()
            } else {
                format!("%{b:02X}")
            };
            assert_eq!(encoded(&c.to_string()), want, "{c:?}");
        }
        for (input, want) in [
            ("", ""),
            ("AbCdEfG-hIj_KlMn.~", "AbCdEfG-hIj_KlMn.~"),
            (
                "../../admin?x=1&y=2#frag",
                "..%2F..%2Fadmin%3Fx%3D1%26y%3D2%23frag",
            ),
            ("a/b\\c%2F%zz%", "a%2Fb%5Cc%252F%25zz%25"),
            ("sp ace+plus\t\r\n\0", "sp%20ace%2Bplus%09%0D%0A%00"),
            (
                "\"'<>`{}|^[]@!$()*,;:=",
                "%22%27%3C%3E%60%7B%7D%7C%5E%5B%5D%40%21%24%28%29%2A%2C%3B%3A%3D",
            ),
            ("é€😀\u{7f}\u{80}", "%C3%A9%E2%82%AC%F0%9F%98%80%7F%C2%80"),
            ("\u{ffff}\u{10ffff}", "%EF%BF%BF%F4%8F%BF%BF"),
        ] {
            assert_eq!(encoded(input), want, "{input:?}");
        }
    }

    fn share(patterns: &str) -> Share {
        let yaml = format!(
            "services: {{ immich: {{}} }}\nsources:\n  s:\n    kind: share\n    upstream: http://immich:2283\n    unlocks: [immich]\n{patterns}"
        );
        match from_yaml_str(&yaml, "t").unwrap().sources["s"].kind.clone() {
            SourceKind::Share(s) => s,
            _ => unreachable!(),
        }
    }

    fn immich() -> Share {
        share(
            "    patterns:\n\
             \x20     - { path: '^/share/(?P<key>[A-Za-z0-9_-]{67})$', check: '/api/shared-links/me?key={key}' }\n\
             \x20     - { path: '^/s/(?P<slug>[A-Za-z0-9_-]+)$', check: '/api/shared-links/me?slug={slug}' }\n",
        )
    }

    fn nextcloud() -> Share {
        share("    path: '^/s/[A-Za-z0-9]{15}$'\n")
    }

    #[test]
    fn real_app_links_become_checks_on_the_upstream() {
        let key = "A".repeat(60) + "b-_c9Zz";
        assert_eq!(
            check_url(&immich(), &format!("/share/{key}"))
                .unwrap()
                .as_str(),
            format!("http://immich:2283/api/shared-links/me?key={key}")
        );
        assert_eq!(
            check_url(&immich(), "/s/my-holiday").unwrap().as_str(),
            "http://immich:2283/api/shared-links/me?slug=my-holiday"
        );
        // The default check forwards the path and query as they are.
        assert_eq!(
            check_url(&nextcloud(), "/s/AbCdEfGhIjKlMnO?dir=/x")
                .unwrap()
                .as_str(),
            "http://immich:2283/s/AbCdEfGhIjKlMnO?dir=/x"
        );
    }

    #[test]
    fn hostile_uris_never_leave_the_upstream_or_skip_the_pattern() {
        let key = "k".repeat(67);
        let cases: Vec<(String, LinkRefusal)> = vec![
            ("".into(), LinkRefusal::Missing),
            (
                "//evil.example/s/AbCdEfGhIjKlMnO".into(),
                LinkRefusal::NotAPath("starts with // (another host)"),
            ),
            (
                "http://evil.example/s/AbCdEfGhIjKlMnO".into(),
                LinkRefusal::NotAPath("does not start with /"),
            ),
            (
                "@evil.example/s/AbCdEfGhIjKlMnO".into(),
                LinkRefusal::NotAPath("does not start with /"),
            ),
            (
                "/s/../admin".into(),
                LinkRefusal::NotAPath("holds dot segments or encoded separators"),
            ),
            (
                "/s/%2e%2e/admin".into(),
                LinkRefusal::NotAPath("holds dot segments or encoded separators"),
            ),
            (
                "/s/AbCdEfG%2FhIjKlMn".into(),
                LinkRefusal::NotAPath("holds dot segments or encoded separators"),
            ),
            (
                "/s\\..\\admin".into(),
                LinkRefusal::NotAPath("holds a backslash"),
            ),
            (
                "/s/AbCdEfGhIjKlMnO#x".into(),
                LinkRefusal::NotAPath("holds a fragment"),
            ),
            (
                "/s/AbCdEf hIjKlMnO".into(),
                LinkRefusal::NotAPath("holds whitespace, control or non-ASCII characters"),
            ),
            (
                "/s/AbCdEfGhIjKlMn\u{e9}".into(),
                LinkRefusal::NotAPath("holds whitespace, control or non-ASCII characters"),
            ),
            (
                format!("/s/{}", "a".repeat(MAX_URI_LEN)),
                LinkRefusal::TooLong(MAX_URI_LEN + 3),
            ),
            ("/s/short".into(), LinkRefusal::NoMatch),
            ("/x/s/AbCdEfGhIjKlMnO".into(), LinkRefusal::NoMatch),
            (
                "/s/AbCdEfGhIjKlMnO/../../admin".into(),
                LinkRefusal::NotAPath("holds dot segments or encoded separators"),
            ),
            (format!("/share/{key}/extra"), LinkRefusal::NoMatch),
        ];
        for (uri, want) in cases {
            let nc = check_url(&nextcloud(), &uri);
            let im = check_url(&immich(), &uri);
            assert_eq!(nc, Err(want.clone()), "nextcloud {uri:?}");
            // Immich's patterns differ, so only the structural refusals are identical.
            if want != LinkRefusal::NoMatch {
                assert_eq!(im, Err(want), "immich {uri:?}");
            } else {
                assert!(
                    im.is_err() || im.as_ref().unwrap().host_str() == Some("immich"),
                    "{uri:?}"
                );
            }
        }
    }

    #[test]
    fn captures_cannot_add_structure_to_the_check() {
        // A pattern lax enough to capture separators still cannot steer the check.
        let lax = share(
            "    patterns:\n      - { path: '^/s/(?P<slug>[^/]+)$', check: '/api/shared-links/me?slug={slug}' }\n",
        );
        let url = check_url(&lax, "/s/x&admin=1;@evil.example:1").unwrap();
        assert_eq!(url.host_str(), Some("immich"));
        assert_eq!(url.port(), Some(2283));
        assert_eq!(
            url.query(),
            Some("slug=x%26admin%3D1%3B%40evil.example%3A1")
        );
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn throttle_counts_in_flight_and_bans() {
        let limits = ShareCheck {
            max_failures: 3,
            ..ShareCheck::default()
        };
        let t = Throttle::default();
        let c = net("203.0.113.9/32");
        // Two concurrent guesses are admitted; a third is refused and counts as a failure.
        for _ in 0..2 {
            assert_eq!(t.admit(c, &limits, 0), Admission::Admitted(c));
        }
        assert_eq!(t.admit(c, &limits, 0), Admission::Busy);
        assert!(!t.finish(c, true, &limits, 1));
        // Two failures and one in flight: another guess could pass max_failures, so it is not sent.
        assert_eq!(t.admit(c, &limits, 1), Admission::Throttled);
        assert!(t.finish(c, true, &limits, 3), "the third failure bans");
        let ban_ends = 3 + ms(limits.ban);
        assert_eq!(t.admit(c, &limits, ban_ends - 1), Admission::Throttled);
        assert_eq!(t.admit(c, &limits, ban_ends), Admission::Admitted(c));
        // Other clients are not affected; successes do not count.
        let other = net("203.0.113.10/32");
        for i in 0..10 {
            assert_eq!(t.admit(other, &limits, i), Admission::Admitted(other));
            assert!(!t.finish(other, false, &limits, i));
        }
    }

    #[test]
    fn checks_in_flight_are_capped_per_client_and_not_per_neighbour() {
        let limits = ShareCheck::default(); // max_failures: 5
        let t = Throttle::default();
        let c = throttle_key("2001:db8:5:6::1".parse().unwrap(), 64);
        let same = throttle_key("2001:db8:5:6::2".parse().unwrap(), 64);
        let neighbour = throttle_key("2001:db8:5:7::1".parse().unwrap(), 64);
        assert_eq!(t.admit(c, &limits, 0), Admission::Admitted(c));
        assert_eq!(t.admit(same, &limits, 0), Admission::Admitted(c));
        assert_eq!(t.admit(c, &limits, 0), Admission::Busy);
        assert_eq!(
            t.admit(neighbour, &limits, 0),
            Admission::Admitted(neighbour)
        );
        // A check that ends (a timeout is not a failure) frees its place.
        assert!(!t.finish(c, false, &limits, 1));
        assert_eq!(t.admit(c, &limits, 1), Admission::Admitted(c));
        // Pressing on counts: three refused and two in flight reach max_failures.
        assert_eq!(t.admit(c, &limits, 2), Admission::Busy);
        assert_eq!(t.admit(c, &limits, 2), Admission::Busy);
        assert_eq!(t.admit(c, &limits, 2), Admission::Throttled);
        assert!(!t.finish(c, true, &limits, 3));
        assert!(
            t.finish(c, true, &limits, 3),
            "three refused, two failed: banned"
        );
    }

    #[test]
    fn failures_outside_the_window_are_forgotten() {
        let limits = ShareCheck {
            max_failures: 2,
            failure_window: Duration::from_secs(10),
            ..ShareCheck::default()
        };
        let t = Throttle::default();
        let c = net("203.0.113.9/32");
        assert_eq!(t.admit(c, &limits, 0), Admission::Admitted(c));
        t.finish(c, true, &limits, 0);
        assert_eq!(t.admit(c, &limits, 10_000), Admission::Admitted(c));
        assert!(
            !t.finish(c, true, &limits, 10_000),
            "the first failure has aged out"
        );
        // Records that no longer matter are swept, at most once a minute.
        assert_eq!(t.len(), 1);
        let other = net("203.0.113.10/32");
        assert_eq!(t.admit(other, &limits, 80_000), Admission::Admitted(other));
        assert_eq!(t.len(), 1, "only the newcomer is left");
    }

    #[test]
    fn a_flooding_48_is_tracked_as_one_client_after_64_of_its_64s() {
        let limits = ShareCheck {
            max_failures: 2,
            ..ShareCheck::default()
        };
        let t = Throttle::default();
        let sub = |i: u32| throttle_key(format!("2001:db8:1:{i:x}::1").parse().unwrap(), 64);
        for i in 0..MAX_CLIENTS_PER_GROUP {
            assert_eq!(t.admit(sub(i), &limits, 1), Admission::Admitted(sub(i)));
            t.finish(sub(i), true, &limits, 1);
        }
        let group = net("2001:db8:1::/48");
        assert_eq!(throttle_group(sub(7)), group);
        for i in 100..102 {
            assert_eq!(t.admit(sub(i), &limits, 2), Admission::Admitted(group));
            assert_eq!(t.finish(group, true, &limits, 2), i == 101, "{i}");
        }
        // The group is banned: its new clients and those tracked alone alike.
        for i in [0, 5, 500, 0xffff] {
            assert_eq!(t.admit(sub(i), &limits, 3), Admission::Throttled, "{i}");
        }
        assert_eq!(t.len(), MAX_CLIENTS_PER_GROUP as usize + 1);
        // Another /48, and IPv4, are not affected.
        let other = throttle_key("2001:db8:2::1".parse().unwrap(), 64);
        assert_eq!(t.admit(other, &limits, 3), Admission::Admitted(other));
        let v4 = net("198.51.100.7/32");
        assert_eq!(t.admit(v4, &limits, 3), Admission::Admitted(v4));
        // A prefix of /48 or wider is its own group.
        let wide = throttle_key("2001:db8:3::1".parse().unwrap(), 48);
        assert_eq!(throttle_group(wide), wide);
        assert_eq!(t.admit(wide, &limits, 3), Admission::Admitted(wide));
    }

    #[test]
    fn a_full_table_forgets_the_least_recently_active_and_keeps_bans() {
        let limits = ShareCheck {
            max_failures: 2,
            ..ShareCheck::default()
        };
        let t = Throttle::with_capacity(16);
        // One address in each of many /24s and /48s: no group floods.
        let v4 = |i: u32| net(&format!("10.{}.{}.1/32", i / 256, i % 256));
        let banned: Vec<IpNet> = (0..4).map(v4).collect();
        for c in &banned {
            for _ in 0..2 {
                assert_eq!(t.admit(*c, &limits, 1), Admission::Admitted(*c));
                t.finish(*c, true, &limits, 1);
            }
        }
        for i in 4..1000 {
            let c = if i % 2 == 0 {
                v4(i)
            } else {
                throttle_key(format!("2001:db8:{i:x}::1").parse().unwrap(), 64)
            };
            let now = 10 + Millis::from(i);
            assert_eq!(t.admit(c, &limits, now), Admission::Admitted(c), "{i}");
            t.finish(c, true, &limits, now);
            assert!(t.len() <= 16, "{} tracked", t.len());
        }
        for c in &banned {
            assert_eq!(t.admit(*c, &limits, 2000), Admission::Throttled, "{c}");
        }
        // The most recent failure is still remembered: one more bans.
        let last = v4(998);
        assert_eq!(t.admit(last, &limits, 2000), Admission::Admitted(last));
        assert!(t.finish(last, true, &limits, 2000));
    }

    #[test]
    fn a_table_full_of_bans_forgets_those_ending_soonest_rather_than_lock_out_newcomers() {
        let limits = ShareCheck {
            max_failures: 1,
            ..ShareCheck::default()
        };
        let t = Throttle::with_capacity(8);
        let v4 = |i: u32| net(&format!("10.{i}.0.1/32"));
        for i in 0..8 {
            assert_eq!(
                t.admit(v4(i), &limits, i.into()),
                Admission::Admitted(v4(i))
            );
            assert!(t.finish(v4(i), true, &limits, i.into()));
        }
        let newcomer = net("198.51.100.7/32");
        assert_eq!(
            t.admit(newcomer, &limits, 10),
            Admission::Admitted(newcomer)
        );
        assert!(t.len() <= 8);
        assert_eq!(
            t.admit(v4(0), &limits, 11),
            Admission::Admitted(v4(0)),
            "ended soonest"
        );
        assert_eq!(t.admit(v4(7), &limits, 11), Admission::Throttled, "kept");
    }

    #[test]
    fn ipv6_clients_are_throttled_by_prefix() {
        let a = throttle_key("2001:db8:1:2::5".parse().unwrap(), 64);
        let b = throttle_key("2001:db8:1:2:ffff::1".parse().unwrap(), 64);
        assert_eq!(a, b);
        assert_eq!(
            throttle_key("203.0.113.9".parse().unwrap(), 64).prefix_len(),
            32
        );
    }

    #[test]
    fn translated_clients_are_throttled_by_their_address_and_grouped_by_their_ipv4_24() {
        // 64:ff9b::/96 (NAT64) holds every IPv4 client of the translator: one ban must not
        // cover them all, and their flood groups like the IPv4 /24s they stand for.
        let a = throttle_key("64:ff9b::c633:6407".parse().unwrap(), 64);
        let b = throttle_key("64:ff9b::c633:6408".parse().unwrap(), 64);
        assert_eq!(a, net("64:ff9b::c633:6407/128"));
        assert_ne!(a, b);
        assert_eq!(throttle_group(a), net("64:ff9b::c633:6400/120"));
        assert_eq!(throttle_group(a), throttle_group(b));
        let teredo = throttle_key("2001:0:4136:e378:8000:63bf:3fff:fdd2".parse().unwrap(), 64);
        assert_eq!(teredo.prefix_len(), 128);
        assert_eq!(throttle_group(teredo).prefix_len(), 120);
    }

    #[test]
    fn cache_expires() {
        let c = LinkCache::default();
        c.insert("u".into(), Duration::from_secs(60), 0);
        assert!(c.is_valid("u", 59_999));
        assert!(!c.is_valid("u", 60_000));
        assert!(!c.is_valid("v", 0));
    }
}
