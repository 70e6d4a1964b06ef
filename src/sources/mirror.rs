//! The mirror source: the proxy mirrors the trusted service's traffic (mTLS already checked) to
//! gatekeeper; a request whose Host belongs to a mirror source grants its client. The answer is
//! 200 at once and the body is never used (see `crate::http` for how it is drained): the proxy
//! discards mirror responses anyway.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode, header};
use tracing::{debug, warn};

use crate::gate::{Active, Gate};

pub(crate) mod config;

/// The request's host, lower-case, without port or trailing dot: the absolute-form URI's
/// authority when present (it wins over `Host` in HTTP/1.1), else the `Host` header.
pub(crate) fn request_host_of<'a>(
    uri: &'a http::Uri,
    headers: &'a HeaderMap,
) -> Option<Cow<'a, str>> {
    let raw = match uri.authority() {
        Some(a) => a.as_str(),
        None => headers.get(header::HOST)?.to_str().ok()?,
    };
    Some(normalise_host(raw))
}

/// `HA.Example.com:443` → `ha.example.com`; `[::1]:80` → `::1`. Borrowed when already
/// lower-case, as proxies send it: this runs on every request.
pub(crate) fn normalise_host(raw: &str) -> Cow<'_, str> {
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
pub(crate) fn source_for_host<'a>(active: &'a Active, host: Option<&str>) -> Option<&'a str> {
    host.and_then(|h| active.mirror_hosts.get(h))
        .map(String::as_str)
}

/// Longest identity kept: a CN is at most 64 characters (RFC 5280 ub-common-name).
pub(crate) const MAX_IDENTITY_LEN: usize = 64;

/// The client certificate's CN from the header the proxy passes it in, parsed exactly in the
/// format of the proxy that sends it. `None` when absent or unreadable:
/// - nginx `$ssl_client_s_dn` and Caddy's `{http.request.tls.client.subject}` (Go's
///   `pkix.Name.String`): an RFC 4514 distinguished name, `CN=alice,O=Home`, most specific RDN
///   first, with `\,`, `\+`, `\"`, `\\` and `\XX` escapes; the first CN is taken.
/// - nginx `$ssl_client_s_dn_legacy`: `/C=DE/O=Home/CN=carol`, unescaped; the CN is the last
///   component of that kind (the most specific comes last).
/// - Traefik `passTLSClientCert` info (`X-Forwarded-Tls-Client-Cert-Info`), URL-encoded:
///   `Subject="DC=..,C=..,O=..,OU=..,SN=..,CN=alice";Issuer=...`. Traefik writes the CN last and
///   escapes nothing: a subject that starts with `CN=` (only `commonName` enabled, as the docs
///   show) is the CN whole; otherwise the text after the last `,CN=`.
///
/// A DN is never percent-decoded: a `%2C` in a holder-chosen attribute must stay text.
pub(crate) fn identity(headers: &HeaderMap, header: &http::HeaderName) -> Option<String> {
    let raw = headers.get(header)?.to_str().ok()?.trim();
    let cn = if raw.contains('=') {
        if raw.starts_with('/') {
            slash_cn(raw)
        } else {
            rfc4514_cn(raw)
        }
    } else {
        // Traefik's info header: URL-encoded, so a literal `=` never appears in it.
        let decoded = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .ok()?;
        traefik_cn(&decoded)
    }?;
    let cn = cn.trim().to_string();
    let printable = cn.chars().all(|c| !c.is_control());
    (!cn.is_empty() && printable && cn.chars().count() <= MAX_IDENTITY_LEN).then_some(cn)
}

/// The first CN of an RFC 4514 (or RFC 2253) distinguished name.
fn rfc4514_cn(dn: &str) -> Option<String> {
    let bytes = dn.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // attributeType '='
        let eq = i + dn[i..].find('=')?;
        let kind = dn[i..eq].trim();
        i = eq + 1;
        // attributeValue, up to an unescaped `,` `+` (or RFC 2253's `;`)
        let mut value: Vec<u8> = Vec::new();
        if bytes.get(i) == Some(&b'"') {
            // RFC 2253 quoted value
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
            i += 1;
            while i < bytes.len() && !matches!(bytes[i], b',' | b'+' | b';') {
                i += 1;
            }
        } else {
            while i < bytes.len() && !matches!(bytes[i], b',' | b'+' | b';') {
                if bytes[i] == b'\\' {
                    let hex = dn
                        .get(i + 1..i + 3)
                        .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(byte) => {
                            value.push(byte);
                            i += 3;
                        }
                        None => {
                            value.extend(bytes.get(i + 1));
                            i += 2;
                        }
                    }
                    continue;
                }
                value.push(bytes[i]);
                i += 1;
            }
        }
        i += 1; // the separator
        if kind.eq_ignore_ascii_case("CN") || kind == "2.5.4.3" {
            // `#` starts a hex-encoded BER value: not a name a person reads.
            return String::from_utf8(value)
                .ok()
                .filter(|v| !v.starts_with('#'));
        }
    }
    None
}

/// The last CN of an OpenSSL one-line name (`/C=DE/O=Home/CN=carol`).
fn slash_cn(dn: &str) -> Option<String> {
    dn.split('/')
        .filter_map(|part| part.split_once('='))
        .filter(|(kind, _)| kind.trim().eq_ignore_ascii_case("CN"))
        .map(|(_, value)| value.to_string())
        .next_back()
}

/// The CN of the first certificate's `Subject="..."` in Traefik's decoded info header.
fn traefik_cn(info: &str) -> Option<String> {
    let start = if info.starts_with("Subject=\"") {
        0
    } else {
        info.find(";Subject=\"")? + 1
    };
    let rest = &info[start + "Subject=\"".len()..];
    // The subject ends at the quote that closes the field: before `;`, `,` (next certificate)
    // or the end.
    let end = rest
        .match_indices('"')
        .map(|(i, _)| i)
        .find(|&i| matches!(rest.as_bytes().get(i + 1), None | Some(b';') | Some(b',')))?;
    let subject = &rest[..end];
    if let Some(cn) = subject.strip_prefix("CN=") {
        return Some(cn.to_string());
    }
    subject
        .rfind(",CN=")
        .map(|i| subject[i + ",CN=".len()..].to_string())
}

/// Untrusted peers whose mirrored requests were warned about, and when.
static UNTRUSTED: PeerWarnings = PeerWarnings::new();

/// How often one untrusted peer is warned about.
const WARN_EVERY: Duration = Duration::from_secs(600);
/// Peers remembered at most: a scan from many addresses warns about the first ones only.
const MAX_WARNED_PEERS: usize = 64;

/// "Warn once per peer per interval", in bounded memory.
struct PeerWarnings(Mutex<Option<HashMap<IpAddr, Instant>>>);

impl PeerWarnings {
    const fn new() -> Self {
        PeerWarnings(Mutex::new(None))
    }

    /// True when `peer` was not warned about in the last [`WARN_EVERY`] and there is room.
    fn first_in_interval(&self, peer: IpAddr, now: Instant) -> bool {
        let mut guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = guard.get_or_insert_with(HashMap::new);
        if let Some(at) = seen.get(&peer)
            && now.saturating_duration_since(*at) < WARN_EVERY
        {
            return false;
        }
        seen.retain(|_, at| now.saturating_duration_since(*at) < WARN_EVERY);
        if seen.len() >= MAX_WARNED_PEERS {
            return false;
        }
        seen.insert(peer, now);
        true
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
            if UNTRUSTED.first_in_interval(peer, std::time::Instant::now()) {
                warn!(
                    %peer,
                    source,
                    "a mirrored request came from a peer outside trusted_proxies, so nobody is \
                     granted: if this is your proxy, add its address to trusted_proxies \
                     (warned once per peer every 10 minutes)"
                );
            } else {
                debug!(%peer, source, "mirrored request from an untrusted peer");
            }
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
            // Traefik passTLSClientCert info, URL-encoded (Traefik writes CN after O, OU)
            (
                "Subject%3D%22O%3DHome%2CCN%3Ddave%22%3BIssuer%3D%22CN%3DHome%20CA%22",
                Some("dave"),
            ),
            // not a CN: OU=XCN=... must not match
            ("OU=XCN=evil,O=Home", None),
            // An escaped comma is part of the value, never a boundary: a CA that signs
            // holder-chosen attributes must not let the holder name another CN.
            ("emailAddress=x\\,CN=bob,CN=alice", Some("alice")),
            ("OU=x\\2CCN=bob,CN=alice", Some("alice")),
            ("O=x\\+CN=bob,CN=alice", Some("alice")),
            // hex escapes and RFC 2253 quoting
            ("CN=J\\C3\\BCrgen,O=Home", Some("Jürgen")),
            ("CN=\"Doe, Jane\",O=Home", Some("Doe, Jane")),
            ("2.5.4.3=erin,O=Home", Some("erin")),
            // Multi-valued RDN
            ("UID=7+CN=frank,O=Home", Some("frank")),
            // A DN is not URL-decoded: %2C stays text
            ("emailAddress=x%2CCN%3Dbob,CN=alice", Some("alice")),
            // nginx legacy: the last CN component
            ("/O=x/CN=bob/CN=alice", Some("alice")),
            // Traefik: CN is written last; holder-chosen OU cannot add one after it
            (
                "Subject%3D%22O%3DHome%2COU%3Dx%2CCN%3Dbob%2CCN%3Dalice%22",
                Some("alice"),
            ),
            // Traefik with only commonName: the whole value, commas included
            ("Subject%3D%22CN%3DDoe%2C%20Jane%22", Some("Doe, Jane")),
            // Two certificates: the first one's subject
            (
                "Subject%3D%22CN%3Dgina%22%3BIssuer%3D%22CN%3DCA%22%2CSubject%3D%22CN%3DCA%22",
                Some("gina"),
            ),
            ("NB%3D1%3BSubject%3D%22CN%3Dhank%22", Some("hank")),
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
    fn untrusted_peers_are_warned_once_per_interval_in_bounded_memory() {
        let w = PeerWarnings::new();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(w.first_in_interval(a, t0));
        assert!(!w.first_in_interval(a, t0 + Duration::from_secs(5)));
        assert!(w.first_in_interval(a, t0 + WARN_EVERY));
        for i in 0..200u32 {
            w.first_in_interval(IpAddr::from(i.to_be_bytes()), t0 + WARN_EVERY);
        }
        let held = w.0.lock().unwrap().as_ref().map_or(0, HashMap::len);
        assert!(held <= MAX_WARNED_PEERS, "{held}");
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
