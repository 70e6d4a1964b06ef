//! The mirror source: the proxy mirrors the trusted service's traffic (mTLS already checked) to
//! gatekeeper; a request whose Host belongs to a mirror source grants its client. The answer is
//! 200 at once and the body is never used (see `crate::http` for how it is drained): the proxy
//! discards mirror responses anyway.

use std::borrow::Cow;
use std::net::IpAddr;

use http::{HeaderMap, StatusCode, header};
use tracing::debug;

use crate::gate::{Active, Gate};

/// The request's host, lower-case, without port or trailing dot: the absolute-form URI's
/// authority when present (it wins over `Host` in HTTP/1.1), else the `Host` header.
pub fn request_host_of<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<Cow<'a, str>> {
    let raw = match uri.authority() {
        Some(a) => a.as_str(),
        None => headers.get(header::HOST)?.to_str().ok()?,
    };
    Some(normalise_host(raw))
}

/// `HA.Example.com:443` → `ha.example.com`; `[::1]:80` → `::1`. Borrowed when already
/// lower-case, as proxies send it: this runs on every request.
pub fn normalise_host(raw: &str) -> Cow<'_, str> {
    let raw = raw.trim();
    // Credentials in an authority (`user@host`) are never part of the host.
    let raw = raw.rsplit_once('@').map_or(raw, |(_, h)| h);
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        raw.split_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// The mirror source that claims a request with this host, if any.
pub fn source_for_host<'a>(active: &'a Active, host: Option<&str>) -> Option<&'a str> {
    host.and_then(|h| active.mirror_hosts.get(h))
        .map(String::as_str)
}

/// Longest identity kept: a CN is at most 64 characters (RFC 5280 ub-common-name).
pub const MAX_IDENTITY_LEN: usize = 64;

/// The client certificate's CN from the header the proxy passes it in: a DN (`CN=alice,O=Home`
/// from nginx or Caddy, `/O=Home/CN=alice` from older nginx) or Traefik's URL-encoded info
/// header (`Subject="CN=alice,O=Home";Issuer=...`). `None` when absent or unreadable.
pub fn identity(headers: &HeaderMap, header: &http::HeaderName) -> Option<String> {
    let raw = headers.get(header)?.to_str().ok()?;
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?;
    // Traefik: take the first certificate's Subject; elsewhere the value is the DN itself.
    let dn = match decoded.find("Subject=\"") {
        Some(i) => decoded[i + 9..].split('"').next()?,
        None => decoded.as_ref(),
    };
    common_name(dn)
}

/// The CN of a distinguished name, unescaping `\,`; separators `,`, `/`, `+`, `;`.
fn common_name(dn: &str) -> Option<String> {
    let mut rest = dn;
    loop {
        let i = rest.find("CN=")?;
        let at_start = i == 0 || matches!(rest.as_bytes()[i - 1], b',' | b'/' | b'+' | b';' | b' ');
        rest = &rest[i + 3..];
        if !at_start {
            continue;
        }
        let mut cn = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cn.extend(chars.next()),
                ',' | '/' | '+' | ';' | '"' => break,
                c => cn.push(c),
            }
        }
        let cn = cn.trim().to_string();
        let printable = cn.chars().all(|c| !c.is_control());
        return (!cn.is_empty() && printable && cn.chars().count() <= MAX_IDENTITY_LEN)
            .then_some(cn);
    }
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
            let who = match active.policy.sources.get(source).map(|s| &s.kind) {
                Some(crate::policy::SourceKind::Mirror(m)) => m
                    .identity_header
                    .as_ref()
                    .and_then(|h| identity(headers, h)),
                _ => None,
            };
            gate.record(source, network, who.as_deref());
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
    fn identities_from_every_proxys_header() {
        let h = http::HeaderName::from_static("x-client-subject");
        let cases = [
            // nginx $ssl_client_s_dn (RFC 2253) and Caddy's subject
            ("CN=alice,O=Home,C=DE", Some("alice")),
            ("O=Home,CN=bob", Some("bob")),
            // nginx $ssl_client_s_dn_legacy
            ("/C=DE/O=Home/CN=carol", Some("carol")),
            ("CN=Doe\\, Jane,O=Home", Some("Doe, Jane")),
            // Traefik passTLSClientCert info, URL-encoded
            (
                "Subject%3D%22CN%3Ddave%2CO%3DHome%22%3BIssuer%3D%22CN%3DHome%20CA%22",
                Some("dave"),
            ),
            // not a CN: OU=XCN=... must not match
            ("OU=XCN=evil,O=Home", None),
            ("O=Home", None),
            ("", None),
        ];
        for (value, want) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(&h, http::HeaderValue::from_str(value).unwrap());
            assert_eq!(identity(&headers, &h).as_deref(), want, "{value}");
        }
        let mut long = HeaderMap::new();
        long.insert(
            &h,
            http::HeaderValue::from_str(&format!("CN={}", "a".repeat(65))).unwrap(),
        );
        assert_eq!(identity(&long, &h), None);
        assert_eq!(identity(&HeaderMap::new(), &h), None);
    }

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
