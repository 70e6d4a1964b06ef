//! The mirror source: the proxy mirrors the trusted service's traffic (mTLS already checked) to
//! gatekeeper; a request whose Host belongs to a mirror source grants its client. The answer is
//! 200 at once and the body is never read: the proxy discards mirror responses anyway.

use std::net::IpAddr;

use http::{HeaderMap, StatusCode, header};
use tracing::debug;

use crate::gate::{Active, Gate};

/// The request's host, lower-case, without port or trailing dot: the absolute-form URI's
/// authority when present (it wins over `Host` in HTTP/1.1), else the `Host` header.
pub fn request_host_of(uri: &http::Uri, headers: &HeaderMap) -> Option<String> {
    let raw = match uri.authority() {
        Some(a) => a.as_str(),
        None => headers.get(header::HOST)?.to_str().ok()?,
    };
    Some(normalise_host(raw))
}

/// `HA.Example.com:443` → `ha.example.com`; `[::1]:80` → `::1`.
pub fn normalise_host(raw: &str) -> String {
    let raw = raw.trim();
    // Credentials in an authority (`user@host`) are never part of the host.
    let raw = raw.rsplit_once('@').map_or(raw, |(_, h)| h);
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        raw.split_once(':').map_or(raw, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The mirror source that claims a request with this host, if any.
pub fn source_for_host<'a>(active: &'a Active, host: Option<&str>) -> Option<&'a str> {
    host.and_then(|h| active.mirror_hosts.get(h))
        .map(String::as_str)
}

/// Grant the client of a mirrored request. 200 for a trusted peer whatever the client turned out
/// to be (the proxy discards the answer); 403 for anyone else, who is told nothing more.
pub fn record(
    gate: &Gate,
    active: &Active,
    source: &str,
    peer: IpAddr,
    headers: &HeaderMap,
) -> StatusCode {
    let xff = headers.get_all("x-forwarded-for");
    match active.client_ip.network_to_grant(peer, xff) {
        Ok(network) => {
            gate.record(source, network, None);
            StatusCode::OK
        }
        Err(crate::client_ip::Refusal::UntrustedPeer(_)) => {
            debug!(%peer, source, "mirrored request from an untrusted peer");
            StatusCode::FORBIDDEN
        }
        Err(why) => {
            debug!(%peer, source, %why, "mirrored request grants nothing");
            StatusCode::OK
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalised() {
        for (raw, want) in [
            ("ha.example.com", "ha.example.com"),
            ("HA.Example.COM:8443", "ha.example.com"),
            ("ha.example.com.", "ha.example.com"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("user@ha.example.com:1", "ha.example.com"),
            (" ha.example.com ", "ha.example.com"),
        ] {
            assert_eq!(normalise_host(raw), want, "{raw}");
        }
    }
}
