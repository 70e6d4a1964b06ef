//! Who the client is: the TCP peer, the trusted-proxy walk of `X-Forwarded-For`, address
//! normalisation, IPv6 prefixes, and the networks that must never be granted.
//!
//! The walk relies on one fact: everything at and right of the first address appended by a
//! trusted proxy was written by trusted proxies, and everything left of it was written by the
//! client. So the chain is read right to left, trusted hops are skipped, and the first address
//! that is not a trusted proxy is the client. Anything the walk cannot read stops it: stepping
//! over it would reach the part of the header the client wrote.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;
use tracing::{debug, warn};

/// Upper bound on the bytes of all `X-Forwarded-For` values of one request together.
const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Upper bound on the elements walked; no real deployment chains this many trusted proxies.
const MAX_HOPS: usize = 32;
/// Characters of a malformed element kept in a [`Refusal::Malformed`].
const MAX_ELEMENT_CHARS: usize = 64;
/// Addresses remembered for the once-per-address warning, so the set cannot grow unbounded.
const MAX_WARNED: usize = 1024;

/// Why a request yields no client address, or no network that may be granted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// The TCP peer is not a trusted proxy, so nothing it says is believed.
    #[error("peer {0} is not a trusted proxy")]
    UntrustedPeer(IpAddr),
    /// An `X-Forwarded-For` element that is not an address (truncated, lossy UTF-8).
    #[error("malformed x-forwarded-for element {0:?}")]
    Malformed(String),
    /// The walk went past [`MAX_HOPS`] trusted hops; holds the header's element count.
    #[error("x-forwarded-for has {0} elements and the last {max} are all trusted proxies", max = MAX_HOPS)]
    TooManyHops(usize),
    /// The `X-Forwarded-For` values together exceed [`MAX_HEADER_BYTES`]; holds their length.
    #[error("x-forwarded-for is {0} bytes, over the limit of {max}", max = MAX_HEADER_BYTES)]
    HeaderTooLong(usize),
    /// The client is itself a trusted proxy: a proxy in front is hiding client addresses.
    #[error("client {0} is a trusted proxy")]
    ClientIsTrustedProxy(IpAddr),
    /// The client cannot be a host behind a proxy (link-local, unspecified, multicast,
    /// broadcast): granting it would open the service to a whole local segment.
    #[error("client {0} is not a routable address")]
    NotRoutable(IpAddr),
    /// The network to grant overlaps this `always_allow` range.
    #[error("client network overlaps always_allow range {0}")]
    AlwaysAllowed(IpNet),
    /// The network to grant overlaps this `never_grant` range: an address that stands for many
    /// clients (a Docker network's gateway, a NAT or VPN exit in front of the proxy).
    #[error(
        "network overlaps never_grant range {0}, whose addresses stand for many clients: \
         nothing inside it is granted (if the range is one client after all, remove it from \
         never_grant)"
    )]
    NeverGrant(IpNet),
    /// An operator's IPv6 network holds every IPv4-mapped address (`::ffff:0:0/96`), which is
    /// how a dual-stack socket sees every IPv4 client: it is no IPv4 range.
    #[error(
        "network {0} holds every ipv4-mapped address (::ffff:0.0.0.0/96), that is every ipv4 \
         client: write an ipv4 range as ipv4 (::ffff:a.b.c.d/n, n at least 96, is \
         a.b.c.d/(n-96))"
    )]
    MappedTooWide(IpNet),
    /// An operator's network inside an IPv6 translation prefix (NAT64, Teredo) where each
    /// address stands for another IPv4 host: wider than an IPv4 /16 of them, it would grant
    /// other people.
    #[error(
        "network {network} covers more than an ipv4 /16 of the {kind} prefix {prefix}, where \
         every address is another ipv4 host: grant the client's own address (/128) or at most \
         a /112 there (its last 32 bits are the ipv4 address)"
    )]
    TranslatedTooWide {
        /// The network that was asked for.
        network: IpNet,
        /// `nat64` or `teredo`.
        kind: &'static str,
        /// The translation prefix it overlaps.
        prefix: IpNet,
    },
    /// The client's network (an IPv6 prefix) overlaps a trusted proxy range that does not
    /// contain the client address itself.
    #[error("client network {network} overlaps trusted proxy range {proxy}")]
    NetworkHoldsTrustedProxy {
        /// The network that would have been granted.
        network: IpNet,
        /// The trusted proxy range it overlaps.
        proxy: IpNet,
    },
}

/// Maps `::ffff:a.b.c.d` to `a.b.c.d`, so that a dual-stack socket and an IPv4 socket see the
/// same client, and IPv4 ranges match it.
pub(crate) fn normalise(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Maps an IPv4-mapped network `::ffff:a.b.c.d/n` with `n >= 96` to `a.b.c.d/(n-96)`, as
/// [`normalise`] does for addresses, so that it is judged, stored and rendered as the IPv4
/// range it stands for; clears host bits. Any other network is returned as is.
pub(crate) fn normalise_network(network: IpNet) -> IpNet {
    let network = network.trunc();
    match network {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(network, IpNet::V4),
            None => network,
        },
        _ => network,
    }
}

/// `::ffff:0:0/96`, where a dual-stack socket puts IPv4 clients.
const MAPPED: Ipv6Net = match Ipv6Net::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96) {
    Ok(net) => net,
    Err(_) => panic!("valid prefix"),
};

/// An IPv6 prefix whose addresses each stand for one IPv4 host, so that a /64 of it holds many
/// unrelated clients. The IPv4 address is the last 32 bits, XORed with `xor`.
struct Translation {
    kind: &'static str,
    prefix: Ipv6Net,
    xor: u32,
}

const fn translation(kind: &'static str, prefix: Ipv6Addr, len: u8, xor: u32) -> Translation {
    let prefix = match Ipv6Net::new(prefix, len) {
        Ok(net) => net,
        Err(_) => panic!("valid prefix"),
    };
    Translation { kind, prefix, xor }
}

const TRANSLATIONS: [Translation; 3] = [
    // RFC 6052's well-known prefix: the IPv4 address is the last 32 bits.
    translation(
        "nat64",
        Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0),
        96,
        0,
    ),
    // RFC 8215's local-use prefix: where the IPv4 address sits depends on the length the
    // operator chose; the last 32 bits are the common /96 layout.
    translation(
        "nat64",
        Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0),
        48,
        0,
    ),
    // RFC 4380: the client's public IPv4 address is the last 32 bits inverted (bits 32..64
    // are the Teredo server's, which says nothing about the client).
    translation(
        "teredo",
        Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
        32,
        u32::MAX,
    ),
];

impl Translation {
    /// The translation prefix `ip` is inside, with the IPv4 address it stands for.
    fn of(ip: Ipv6Addr) -> Option<(&'static Translation, Ipv4Addr)> {
        TRANSLATIONS
            .iter()
            .find(|t| t.prefix.contains(&ip))
            .map(|t| (t, t.embedded(ip)))
    }

    fn embedded(&self, ip: Ipv6Addr) -> Ipv4Addr {
        // Truncation keeps the last 32 bits, which is the point.
        Ipv4Addr::from(u128::from(ip) as u32 ^ self.xor)
    }
}

/// Resolves client addresses from requests and turns them into networks that may be granted.
#[derive(Debug)]
pub struct ClientIp {
    trusted: Vec<IpNet>,
    always_allow: Vec<IpNet>,
    /// Addresses that stand for many clients: refused like `always_allow`, but not believed
    /// like `trusted_proxies`.
    never_grant: Vec<IpNet>,
    ipv6_prefix: u8,
    /// Clients already reported as a trusted proxy or inside `never_grant`, so a
    /// misconfiguration warns once per address instead of once per request.
    warned: Mutex<HashSet<IpAddr>>,
}

impl ClientIp {
    /// Builds a resolver from the trusted proxy ranges, every `always_allow` range (global plus
    /// every service's) and the prefix length granted to IPv6 clients (clamped to 128).
    pub fn new(trusted_proxies: Vec<IpNet>, always_allow: Vec<IpNet>, ipv6_prefix: u8) -> Self {
        // A range written IPv4-mapped must match the IPv4 clients it stands for.
        let normalised = |ranges: Vec<IpNet>| ranges.into_iter().map(normalise_network).collect();
        Self {
            trusted: normalised(trusted_proxies),
            always_allow: normalised(always_allow),
            never_grant: Vec::new(),
            ipv6_prefix: ipv6_prefix.min(128),
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// The same resolver, refusing every network that overlaps one of the `never_grant` ranges.
    pub(crate) fn with_never_grant(mut self, never_grant: Vec<IpNet>) -> Self {
        self.never_grant = never_grant.into_iter().map(normalise_network).collect();
        self
    }

    /// Is this peer (normalised) inside a trusted proxy range?
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = normalise(ip);
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client address, or why there is none. `xff` is every `X-Forwarded-For` header value
    /// in the order received; several values are read as one comma-separated list.
    ///
    /// Empty elements (`a, , b`, a trailing comma, an empty header) are refused as
    /// [`Refusal::Malformed`] rather than skipped: right of the client they can only come from
    /// a trusted proxy that did not know its peer, and skipping them would take the next
    /// address to the left, which the client may have forged.
    pub(crate) fn resolve<'a>(
        &self,
        peer: IpAddr,
        xff: impl IntoIterator<Item = &'a http::HeaderValue>,
    ) -> Result<IpAddr, Refusal> {
        let peer = normalise(peer);
        if !self.is_trusted(peer) {
            return Err(Refusal::UntrustedPeer(peer));
        }

        // Lengths are known without reading the bytes, so count them all for the message but
        // keep only what fits the limit.
        let mut values = Vec::new();
        let mut total = 0usize;
        for value in xff {
            total = total.saturating_add(value.len());
            if total <= MAX_HEADER_BYTES {
                values.push(value.as_bytes());
            }
        }
        if total > MAX_HEADER_BYTES {
            return Err(Refusal::HeaderTooLong(total));
        }

        // With no header the peer is the client, and it is a trusted proxy.
        let mut last_trusted = peer;
        let mut walked = 0usize;
        for value in values.iter().rev() {
            for element in value.rsplit(|&b| b == b',') {
                walked += 1;
                if walked > MAX_HOPS {
                    return Err(Refusal::TooManyHops(count_elements(&values)));
                }
                let ip = normalise(parse_element(element)?);
                if !self.is_trusted(ip) {
                    return Ok(ip);
                }
                last_trusted = ip;
            }
        }
        Err(Refusal::ClientIsTrustedProxy(last_trusted))
    }

    /// The network to grant for a resolved client: IPv4 as a /32, IPv6 as its `ipv6_prefix`
    /// network. Refused when it overlaps (either contains the other) a trusted proxy range, a
    /// `never_grant` range or an `always_allow` range: granting those would open the proxy's
    /// whole traffic, let in everyone behind a shared address, or add nothing but an entry that
    /// hides the static one.
    ///
    /// A client inside a translation prefix (NAT64, Teredo) is one IPv4 host among everyone
    /// sharing its /64: it is granted its address alone, and refused as the IPv4 address it
    /// embeds would be.
    ///
    /// A `never_grant` refusal is a deployment problem (a proxy in front hides client
    /// addresses), so it is warned about once per client address.
    pub(crate) fn grantable(&self, client: IpAddr) -> Result<IpNet, Refusal> {
        let client = normalise(client);
        let result = self.client_grantable(client);
        if let Err(Refusal::NeverGrant(range)) = &result {
            self.warn_never_grant(client, *range);
        }
        result
    }

    /// The once-per-address warning for a client refused by `never_grant`. An IPv6 client is
    /// remembered by its network, since phones rotate addresses inside it.
    fn warn_never_grant(&self, client: IpAddr, range: IpNet) {
        let network = client_network(client, self.ipv6_prefix);
        if !self.first_warning(network.network()) {
            return;
        }
        // A translated client is refused for the IPv4 address it embeds.
        let judged = match client {
            IpAddr::V6(v6) => Translation::of(v6).map_or(client, |(_, v4)| IpAddr::V4(v4)),
            IpAddr::V4(_) => client,
        };
        if range.contains(&judged) {
            warn!(
                %client,
                %range,
                "client {judged} is inside never_grant range {range}: it stands for many clients \
                 (a proxy in front is hiding their addresses, as Docker's userland proxy does for \
                 connections from the Docker host and for IPv6 clients of an IPv4-only network); \
                 nothing is granted. To grant those clients, let them reach the proxy with their \
                 own addresses (run the proxy with network_mode: host, or give its network IPv6)"
            );
        } else {
            warn!(
                %client,
                %network,
                %range,
                "client {client} would be granted {network}, which overlaps never_grant range \
                 {range}: that range stands for many clients, so nothing is granted (if {range} \
                 is one client after all, remove it from never_grant)"
            );
        }
    }

    /// [`grantable`](Self::grantable) without the warning.
    fn client_grantable(&self, client: IpAddr) -> Result<IpNet, Refusal> {
        if !routable(client) {
            return Err(Refusal::NotRoutable(client));
        }
        if let IpAddr::V6(v6) = client
            && let Some((_, v4)) = Translation::of(v6)
        {
            self.client_grantable(IpAddr::V4(v4))?;
        }
        self.check_network(client_network(client, self.ipv6_prefix), client)
    }

    /// Could `network` (an operator's grant) be granted? The same rules as for a client: it
    /// must not overlap a trusted proxy range, a `never_grant` range or an `always_allow` range,
    /// nor be link-local.
    /// Returns it normalised ([`normalise_network`]): an IPv4-mapped network is judged as the
    /// IPv4 range it stands for. Inside a translation prefix the network may span at most an
    /// IPv4 /16 (a /112), and the IPv4 range it embeds is judged as an IPv4 grant.
    pub(crate) fn grantable_network(&self, network: IpNet) -> Result<IpNet, Refusal> {
        let network = normalise_network(network);
        if let IpNet::V6(v6) = network {
            if v6.prefix_len() < MAPPED.prefix_len() && v6.contains(&MAPPED) {
                return Err(Refusal::MappedTooWide(network));
            }
            if let Some(t) = TRANSLATIONS.iter().find(|t| overlaps6(&v6, &t.prefix)) {
                let embedded = v6
                    .prefix_len()
                    .checked_sub(96)
                    .filter(|len| *len >= 16 && t.prefix.contains(&v6.network()))
                    .and_then(|len| Ipv4Net::new(t.embedded(v6.network()), len).ok());
                let Some(embedded) = embedded else {
                    return Err(Refusal::TranslatedTooWide {
                        network,
                        kind: t.kind,
                        prefix: IpNet::V6(t.prefix),
                    });
                };
                self.grantable_network(IpNet::V4(embedded.trunc()))?;
            }
        }
        let first = normalise(network.network());
        if !routable(first) {
            return Err(Refusal::NotRoutable(first));
        }
        self.check_network(network, first)
    }

    fn check_network(&self, network: IpNet, client: IpAddr) -> Result<IpNet, Refusal> {
        if let Some(proxy) = self.trusted.iter().find(|r| overlaps(&network, r)) {
            return Err(if proxy.contains(&client) {
                Refusal::ClientIsTrustedProxy(client)
            } else {
                Refusal::NetworkHoldsTrustedProxy {
                    network,
                    proxy: *proxy,
                }
            });
        }
        // Before always_allow: a shared address that is also always allowed is the worse
        // problem, and this refusal is the one that warns.
        if let Some(range) = self.never_grant.iter().find(|r| overlaps(&network, r)) {
            return Err(Refusal::NeverGrant(*range));
        }
        if let Some(range) = self.always_allow.iter().find(|r| overlaps(&network, r)) {
            return Err(Refusal::AlwaysAllowed(*range));
        }
        Ok(network)
    }

    /// [`resolve`](Self::resolve) then [`grantable`](Self::grantable). A trusted proxy showing
    /// up as the client is a deployment problem, so it is warned about once per address (as
    /// `grantable` does for a client inside `never_grant`); every other refusal may be hostile
    /// input and is logged at debug level only.
    pub fn network_to_grant<'a>(
        &self,
        peer: IpAddr,
        xff: impl IntoIterator<Item = &'a http::HeaderValue>,
    ) -> Result<IpNet, Refusal> {
        let result = self
            .resolve(peer, xff)
            .and_then(|client| self.grantable(client));
        match &result {
            Ok(_) => {}
            Err(Refusal::ClientIsTrustedProxy(proxy)) if self.first_warning(*proxy) => {
                warn!(
                    %peer,
                    %proxy,
                    "a trusted proxy arrived as the client: the proxy in front is hiding client \
                     addresses (Docker's userland proxy does this for connections from the Docker \
                     host and for IPv6 clients of an IPv4-only network; run the proxy with \
                     network_mode: host, or list the address in never_grant rather than \
                     trusted_proxies); nothing is granted"
                );
            }
            Err(refusal) => debug!(%peer, %refusal, "no network to grant"),
        }
        result
    }

    /// Records `client` as warned about; true the first time, while there is room to remember.
    fn first_warning(&self, client: IpAddr) -> bool {
        // A poisoned set is still a valid set; losing a warning beats panicking on a request.
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        warned.len() < MAX_WARNED && warned.insert(client)
    }

    /// How many addresses have been warned about (a test hook).
    #[cfg(test)]
    pub(crate) fn warned_count(&self) -> usize {
        self.warned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The network a (normalised) client address stands for: IPv4 as a /32, IPv6 as its
/// `ipv6_prefix` network (clamped to 128), since phones rotate addresses inside it; an address
/// inside a translation prefix (NAT64, Teredo) as itself, since its /64 is other people.
pub(crate) fn client_network(client: IpAddr, ipv6_prefix: u8) -> IpNet {
    let prefix = match client {
        IpAddr::V4(_) => 32,
        IpAddr::V6(v6) if Translation::of(v6).is_some() => 128,
        IpAddr::V6(_) => ipv6_prefix.min(128),
    };
    // Cannot fail with the prefix clamped; the host network is the safe fallback.
    IpNet::new(client, prefix)
        .map(|net| net.trunc())
        .unwrap_or_else(|_| IpNet::from(client))
}

/// Either network contains the other's network address.
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn overlaps6(a: &Ipv6Net, b: &Ipv6Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Elements in all values, for the [`Refusal::TooManyHops`] message.
fn count_elements(values: &[&[u8]]) -> usize {
    values
        .iter()
        .map(|v| v.iter().filter(|&&b| b == b',').count() + 1)
        .sum()
}

/// Could `ip` be the address of a client behind a proxy? Link-local addresses (a /64 of
/// `fe80::` is every host on a segment) and the special addresses never are. Loopback is left to
/// `trusted_proxies`, which holds it by default; a deployment that trusts only its proxy's own
/// loopback address may have local clients on others.
fn routable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_link_local() || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast() || v6.is_unicast_link_local()),
    }
}

/// One element: `1.2.3.4`, `1.2.3.4:8080`, `::1`, `fe80::1%eth0`, `[2001:db8::1]` or
/// `[2001:db8::1]:443`, surrounded by optional whitespace.
fn parse_element(raw: &[u8]) -> Result<IpAddr, Refusal> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|text| parse_address(text.trim()))
        .ok_or_else(|| {
            let text = String::from_utf8_lossy(raw);
            Refusal::Malformed(text.trim().chars().take(MAX_ELEMENT_CHARS).collect())
        })
}

fn parse_address(text: &str) -> Option<IpAddr> {
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !after.is_empty() {
            parse_port(after.strip_prefix(':')?)?;
        }
        return parse_ipv6_with_zone(inside).map(IpAddr::V6);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    // A single colon can only be IPv4 with a port; IPv6 with a port needs brackets.
    if let Some((host, port)) = text.split_once(':') {
        if !port.contains(':') {
            parse_port(port)?;
            return host.parse::<Ipv4Addr>().ok().map(IpAddr::V4);
        }
    }
    parse_ipv6_with_zone(text).map(IpAddr::V6)
}

/// An IPv6 address with an optional zone id, which is dropped: it names an interface of the
/// proxy's host and says nothing about who the client is.
fn parse_ipv6_with_zone(text: &str) -> Option<Ipv6Addr> {
    let addr = match text.split_once('%') {
        Some((addr, zone)) => {
            let zone_ok = !zone.is_empty()
                && zone
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            zone_ok.then_some(addr)?
        }
        None => text,
    };
    addr.parse().ok()
}

/// A decimal port; obfuscated ports (`_abc`) and out-of-range numbers are refused.
fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const TRUSTED: &[&str] = &[
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::1/128",
        "fc00::/7",
        // A proxy with a public IPv6 address, to test a client /64 that contains it.
        "2001:db8:1::1/128",
    ];
    const ALWAYS_ALLOW: &[&str] = &["203.0.113.7/32", "2001:db8:5::7/128"];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn resolver(ipv6_prefix: u8) -> ClientIp {
        ClientIp::new(
            TRUSTED.iter().map(|s| net(s)).collect(),
            ALWAYS_ALLOW.iter().map(|s| net(s)).collect(),
            ipv6_prefix,
        )
    }

    fn headers(values: &[&[u8]]) -> Vec<HeaderValue> {
        values
            .iter()
            .map(|v| HeaderValue::from_bytes(v).unwrap())
            .collect()
    }

    /// `count` copies of `hop`, comma separated.
    fn chain(prefix: &str, hop: &str, count: usize) -> Vec<u8> {
        let mut parts = vec![prefix.to_owned()];
        parts.extend(std::iter::repeat_n(hop.to_owned(), count));
        parts.retain(|p| !p.is_empty());
        parts.join(", ").into_bytes()
    }

    struct Case {
        name: &'static str,
        peer: &'static str,
        xff: Vec<Vec<u8>>,
        ipv6_prefix: u8,
        want: Result<IpNet, Refusal>,
    }

    fn case(
        name: &'static str,
        peer: &'static str,
        xff: &[&[u8]],
        want: Result<IpNet, Refusal>,
    ) -> Case {
        Case {
            name,
            peer,
            xff: xff.iter().map(|v| v.to_vec()).collect(),
            ipv6_prefix: 64,
            want,
        }
    }

    fn malformed(s: &str) -> Result<IpNet, Refusal> {
        Err(Refusal::Malformed(s.to_owned()))
    }

    fn cases() -> Vec<Case> {
        use Refusal::*;
        let client = Ok(net("203.0.113.9/32"));
        vec![
            case(
                "untrusted peer with a forged header",
                "198.51.100.20",
                &[b"203.0.113.9"],
                Err(UntrustedPeer(ip("198.51.100.20"))),
            ),
            case(
                "untrusted mapped peer is normalised in the refusal",
                "::ffff:198.51.100.20",
                &[],
                Err(UntrustedPeer(ip("198.51.100.20"))),
            ),
            case(
                "forged left part of the chain",
                "10.0.0.2",
                &[b"6.6.6.6, 203.0.113.9"],
                client.clone(),
            ),
            case(
                "several trusted hops on the right",
                "127.0.0.1",
                &[b"203.0.113.9, 192.168.1.1, fd00::3, 10.1.2.3"],
                client.clone(),
            ),
            case(
                "ipv6 client gets its /64",
                "10.0.0.2",
                &[b"2001:db8:abcd:1234:aaaa:bbbb:cccc:dddd"],
                Ok(net("2001:db8:abcd:1234::/64")),
            ),
            Case {
                ipv6_prefix: 56,
                ..case(
                    "ipv6 client gets its /56 with a different prefix",
                    "10.0.0.2",
                    &[b"2001:db8:abcd:1234:aaaa:bbbb:cccc:dddd"],
                    Ok(net("2001:db8:abcd:1200::/56")),
                )
            },
            Case {
                ipv6_prefix: 128,
                ..case(
                    "ipv6 prefix 128 grants the address alone",
                    "10.0.0.2",
                    &[b"2001:db8:abcd::9"],
                    Ok(net("2001:db8:abcd::9/128")),
                )
            },
            case(
                "mapped ipv4 peer",
                "::ffff:10.0.0.2",
                &[b"203.0.113.9"],
                client.clone(),
            ),
            case(
                "mapped ipv4 in the header",
                "10.0.0.2",
                &[b"::ffff:203.0.113.9"],
                client.clone(),
            ),
            case(
                "mapped trusted hop is skipped",
                "10.0.0.2",
                &[b"203.0.113.9, ::ffff:192.168.0.1"],
                client.clone(),
            ),
            case(
                "docker gateway without a header",
                "172.17.0.1",
                &[],
                Err(ClientIsTrustedProxy(ip("172.17.0.1"))),
            ),
            case(
                "docker gateway as the only hop",
                "10.0.0.2",
                &[b"172.17.0.1"],
                Err(ClientIsTrustedProxy(ip("172.17.0.1"))),
            ),
            case(
                "ipv6 loopback all the way",
                "::1",
                &[b"::1"],
                Err(ClientIsTrustedProxy(ip("::1"))),
            ),
            case(
                "zone id is dropped",
                "10.0.0.2",
                &[b"2001:db8:abcd::1%eth0"],
                Ok(net("2001:db8:abcd::/64")),
            ),
            case(
                "zone id inside brackets with a port",
                "10.0.0.2",
                &[b"[2001:db8:abcd::1%eth0]:443"],
                Ok(net("2001:db8:abcd::/64")),
            ),
            case(
                "link-local client (its /64 is a whole segment)",
                "10.0.0.2",
                &[b"fe80::1%eth0"],
                Err(NotRoutable(ip("fe80::1"))),
            ),
            case(
                "link-local ipv4 client",
                "10.0.0.2",
                &[b"169.254.7.7"],
                Err(NotRoutable(ip("169.254.7.7"))),
            ),
            case(
                "multicast client",
                "10.0.0.2",
                &[b"ff02::1"],
                Err(NotRoutable(ip("ff02::1"))),
            ),
            case(
                "unspecified client",
                "10.0.0.2",
                &[b"0.0.0.0"],
                Err(NotRoutable(ip("0.0.0.0"))),
            ),
            case(
                "empty zone id",
                "10.0.0.2",
                &[b"2001:db8:abcd::1%"],
                malformed("2001:db8:abcd::1%"),
            ),
            case(
                "zone id on ipv4",
                "10.0.0.2",
                &[b"203.0.113.9%eth0"],
                malformed("203.0.113.9%eth0"),
            ),
            case(
                "garbage at the right is not skipped",
                "10.0.0.2",
                &[b"203.0.113.9, unknown"],
                malformed("unknown"),
            ),
            case(
                "obfuscated identifier between client and trusted hop",
                "10.0.0.2",
                &[b"203.0.113.9, _hidden, 10.0.0.3"],
                malformed("_hidden"),
            ),
            case(
                "garbage left of the client is never read",
                "10.0.0.2",
                &[b"garbage, \xff, 203.0.113.9"],
                client.clone(),
            ),
            case(
                "bracketed ipv6 with a port",
                "10.0.0.2",
                &[b"[2001:db8:abcd::1]:443"],
                Ok(net("2001:db8:abcd::/64")),
            ),
            case(
                "bracketed ipv6 without a port",
                "10.0.0.2",
                &[b" [2001:db8:abcd::1] "],
                Ok(net("2001:db8:abcd::/64")),
            ),
            case(
                "bracketed ipv4",
                "10.0.0.2",
                &[b"[203.0.113.9]"],
                malformed("[203.0.113.9]"),
            ),
            case(
                "ipv4 with a port",
                "10.0.0.2",
                &[b"203.0.113.9:8080"],
                client.clone(),
            ),
            case(
                "ipv4 with an obfuscated port",
                "10.0.0.2",
                &[b"203.0.113.9:_p1"],
                malformed("203.0.113.9:_p1"),
            ),
            case(
                "ipv4 with a port out of range",
                "10.0.0.2",
                &[b"203.0.113.9:65536"],
                malformed("203.0.113.9:65536"),
            ),
            case(
                "ipv4 with leading zeros is ambiguous",
                "10.0.0.2",
                &[b"010.0.0.1"],
                malformed("010.0.0.1"),
            ),
            case(
                "non-utf-8 bytes",
                "10.0.0.2",
                &[b"203.0.113.9, 1.2.3.\xff\xfe"],
                malformed("1.2.3.\u{FFFD}\u{FFFD}"),
            ),
            case(
                "multiple headers are one list, in order",
                "10.0.0.2",
                &[b"6.6.6.6, 203.0.113.9", b"10.0.0.1"],
                client.clone(),
            ),
            case(
                "multiple headers: the last one's client wins",
                "10.0.0.2",
                &[b"6.6.6.6", b"203.0.113.9"],
                client.clone(),
            ),
            case(
                "trailing comma is an unknown hop",
                "10.0.0.2",
                &[b"203.0.113.9,"],
                malformed(""),
            ),
            case(
                "empty header is an unknown hop",
                "10.0.0.2",
                &[b"203.0.113.9", b""],
                malformed(""),
            ),
            case(
                "always_allow address",
                "10.0.0.2",
                &[b"203.0.113.7"],
                Err(AlwaysAllowed(net("203.0.113.7/32"))),
            ),
            case(
                "ipv6 /64 containing an always_allow /128",
                "10.0.0.2",
                &[b"2001:db8:5::1"],
                Err(AlwaysAllowed(net("2001:db8:5::7/128"))),
            ),
            case(
                "ipv6 /64 containing a trusted /128 proxy",
                "10.0.0.2",
                &[b"2001:db8:1::99"],
                Err(NetworkHoldsTrustedProxy {
                    network: net("2001:db8:1::/64"),
                    proxy: net("2001:db8:1::1/128"),
                }),
            ),
            case(
                "nat64 client is granted its address alone",
                "10.0.0.2",
                &[b"64:ff9b::cb00:7109"],
                Ok(net("64:ff9b::cb00:7109/128")),
            ),
            case(
                "nat64 client embedding a trusted proxy",
                "10.0.0.2",
                &[b"64:ff9b::10.9.8.7"],
                Err(ClientIsTrustedProxy(ip("10.9.8.7"))),
            ),
            case(
                "teredo client is granted its address alone",
                "10.0.0.2",
                &[b"[2001:0:4136:e378:8000:63bf:3fff:fdd2]:443"],
                Ok(net("2001:0:4136:e378:8000:63bf:3fff:fdd2/128")),
            ),
            case(
                "teredo client embedding an always_allow address",
                "10.0.0.2",
                &[b"2001:0:4136:e378:8000:63bf:34ff:8ef8"],
                Err(AlwaysAllowed(net("203.0.113.7/32"))),
            ),
            case(
                "malformed element is truncated",
                "10.0.0.2",
                &[&[b'x'; 100]],
                malformed(&"x".repeat(MAX_ELEMENT_CHARS)),
            ),
            Case {
                xff: vec![vec![b'1'; MAX_HEADER_BYTES + 1]],
                ..case(
                    "oversize header",
                    "10.0.0.2",
                    &[],
                    Err(HeaderTooLong(MAX_HEADER_BYTES + 1)),
                )
            },
            Case {
                xff: vec![vec![b'1'; 5000], vec![b'2'; 5000]],
                ..case(
                    "oversize over several headers",
                    "10.0.0.2",
                    &[],
                    Err(HeaderTooLong(10_000)),
                )
            },
            Case {
                xff: vec![chain("203.0.113.9", "10.0.0.1", MAX_HOPS - 1)],
                ..case(
                    "client at the last hop walked",
                    "10.0.0.2",
                    &[],
                    client.clone(),
                )
            },
            Case {
                xff: vec![chain("203.0.113.9", "10.0.0.1", MAX_HOPS)],
                ..case(
                    "client beyond the last hop walked",
                    "10.0.0.2",
                    &[],
                    Err(TooManyHops(MAX_HOPS + 1)),
                )
            },
            Case {
                xff: vec![chain("", "10.0.0.1", 100)],
                ..case(
                    "too many trusted hops",
                    "10.0.0.2",
                    &[],
                    Err(TooManyHops(100)),
                )
            },
        ]
    }

    #[test]
    fn table() {
        let cases = cases();
        assert!(cases.len() >= 14);
        for c in cases {
            let resolver = resolver(c.ipv6_prefix);
            let values = c
                .xff
                .iter()
                .map(|v| HeaderValue::from_bytes(v).unwrap())
                .collect::<Vec<_>>();
            let got = resolver.network_to_grant(ip(c.peer), &values);
            assert_eq!(got, c.want, "{}", c.name);
        }
    }

    #[test]
    fn resolve_returns_the_client_address() {
        let values = headers(&[b"6.6.6.6, [2001:db8:abcd::5]:443, 10.0.0.1"]);
        assert_eq!(
            resolver(64).resolve(ip("127.0.0.1"), &values),
            Ok(ip("2001:db8:abcd::5"))
        );
    }

    #[test]
    fn grantable_refuses_trusted_and_always_allowed_clients() {
        let r = resolver(64);
        assert_eq!(
            r.grantable(ip("10.9.8.7")),
            Err(Refusal::ClientIsTrustedProxy(ip("10.9.8.7")))
        );
        assert_eq!(
            r.grantable(ip("::ffff:10.9.8.7")),
            Err(Refusal::ClientIsTrustedProxy(ip("10.9.8.7")))
        );
        assert_eq!(
            r.grantable(ip("203.0.113.7")),
            Err(Refusal::AlwaysAllowed(net("203.0.113.7/32")))
        );
        assert_eq!(r.grantable(ip("203.0.113.8")), Ok(net("203.0.113.8/32")));
    }

    #[test]
    fn an_operators_network_is_checked_whole() {
        let r = resolver(64);
        assert_eq!(
            r.grantable_network(net("198.51.100.0/24")),
            Ok(net("198.51.100.0/24"))
        );
        // Its first address is public, but the /4 holds 10.0.0.0/8.
        assert!(matches!(
            r.grantable_network(net("0.0.0.0/4")),
            Err(Refusal::NotRoutable(_)) | Err(Refusal::NetworkHoldsTrustedProxy { .. })
        ));
        assert!(matches!(
            r.grantable_network(net("8.0.0.0/6")),
            Err(Refusal::NetworkHoldsTrustedProxy { .. })
        ));
        assert!(r.grantable_network(net("fe80::/64")).is_err());
        // The always_allow address 203.0.113.7 is inside this /24.
        assert_eq!(
            r.grantable_network(net("203.0.113.0/24")),
            Err(Refusal::AlwaysAllowed(net("203.0.113.7/32")))
        );
    }

    #[test]
    fn a_wide_ipv6_prefix_cannot_cover_a_trusted_range() {
        // A /0 grant would contain every trusted range; the first one found is named.
        let r = resolver(0);
        assert_eq!(
            r.grantable(ip("2001:db8:abcd::1")),
            Err(Refusal::NetworkHoldsTrustedProxy {
                network: net("::/0"),
                proxy: net("::1/128"),
            })
        );
        assert_eq!(ClientIp::new(vec![], vec![], 200).ipv6_prefix, 128);
    }

    #[test]
    fn odd_input_never_panics() {
        let r = resolver(64);
        let odd: &[&[u8]] = &[
            b"",
            b",",
            b",,,,",
            b"[",
            b"]",
            b"[]",
            b"[]:",
            b"[::1",
            b"[::1]:",
            b"[::1]x",
            b":",
            b"::",
            b":::",
            b"%",
            b"::1%",
            b"1.2.3.4:",
            b"1.2.3.4::",
            b"\t",
            b"\x80",
            b"\"1.2.3.4\"",
            b"for=1.2.3.4",
            b"99999999999999999999",
        ];
        for value in odd {
            let values = headers(&[value]);
            let _ = r.network_to_grant(ip("10.0.0.2"), &values);
        }
        for byte in 0u8..=255 {
            if let Ok(value) = HeaderValue::from_bytes(&[b'1', byte, b':', byte]) {
                let _ = r.network_to_grant(ip("10.0.0.2"), [&value]);
            }
        }
    }

    #[test]
    fn translated_clients_are_granted_their_address_alone() {
        // Every NAT64 client of a translator, or Teredo client of a relay, shares one /64.
        for prefix in [64, 56, 128] {
            let r = resolver(prefix);
            for client in [
                "64:ff9b::cb00:7109",
                "64:ff9b::203.0.113.10",
                "64:ff9b:1:2::cb00:7109",
                "64:ff9b:1:ffff:ffff:ffff:cb00:7109",
                // RFC 4380's example: server 65.54.227.120, client 192.0.2.45 port 40000.
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            ] {
                assert_eq!(
                    r.grantable(ip(client)),
                    Ok(IpNet::from(ip(client))),
                    "{client} with ipv6_prefix {prefix}"
                );
            }
        }
        // Next to the prefixes, clients still get their /64.
        let r = resolver(64);
        assert_eq!(
            r.grantable(ip("64:ff9b:0:0:1::cb00:7109")),
            Ok(net("64:ff9b::/64"))
        );
        assert_eq!(r.grantable(ip("2001:1::cb00:7109")), Ok(net("2001:1::/64")));
    }

    #[test]
    fn client_network_is_the_one_address_to_network_rule() {
        for (client, prefix, want) in [
            ("203.0.113.9", 64, "203.0.113.9/32"),
            ("2001:db8:abcd:1234::5", 64, "2001:db8:abcd:1234::/64"),
            ("2001:db8:abcd:1234::5", 200, "2001:db8:abcd:1234::5/128"),
            ("64:ff9b::cb00:7109", 56, "64:ff9b::cb00:7109/128"),
            ("64:ff9b:1:2::cb00:7109", 64, "64:ff9b:1:2::cb00:7109/128"),
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                64,
                "2001:0:4136:e378:8000:63bf:3fff:fdd2/128",
            ),
        ] {
            assert_eq!(client_network(ip(client), prefix), net(want), "{client}");
        }
    }

    #[test]
    fn the_ipv4_address_a_translated_client_embeds_is_judged() {
        use Refusal::*;
        let r = resolver(64);
        for (client, want) in [
            ("64:ff9b::10.9.8.7", ClientIsTrustedProxy(ip("10.9.8.7"))),
            ("64:ff9b::127.0.0.1", ClientIsTrustedProxy(ip("127.0.0.1"))),
            ("64:ff9b::cb00:7107", AlwaysAllowed(net("203.0.113.7/32"))),
            ("64:ff9b::169.254.7.7", NotRoutable(ip("169.254.7.7"))),
            ("64:ff9b::", NotRoutable(ip("0.0.0.0"))),
            ("64:ff9b:1::a09:807", ClientIsTrustedProxy(ip("10.9.8.7"))),
            (
                "64:ff9b:1:abcd::cb00:7107",
                AlwaysAllowed(net("203.0.113.7/32")),
            ),
            // Teredo: the client's address is the last 32 bits inverted.
            (
                "2001:0:4136:e378:8000:63bf:f5f6:f7f8",
                ClientIsTrustedProxy(ip("10.9.8.7")),
            ),
            (
                "2001:0:4136:e378:8000:63bf:34ff:8ef8",
                AlwaysAllowed(net("203.0.113.7/32")),
            ),
            (
                "2001:0:4136:e378:8000:63bf:ffff:ffff",
                NotRoutable(ip("0.0.0.0")),
            ),
        ] {
            assert_eq!(r.grantable(ip(client)), Err(want), "{client}");
        }
        // The server address inside a Teredo address is not the client's: a trusted one is fine.
        assert_eq!(
            r.grantable(ip("2001:0:a09:807:8000:63bf:3fff:fdd2")),
            Ok(net("2001:0:a09:807:8000:63bf:3fff:fdd2/128"))
        );
    }

    #[test]
    fn an_operators_mapped_network_is_judged_as_ipv4() {
        let r = resolver(64);
        for (mapped, want) in [
            ("::ffff:198.51.100.0/120", "198.51.100.0/24"),
            ("::ffff:198.51.100.9/128", "198.51.100.9/32"),
            ("::ffff:198.51.100.9/120", "198.51.100.0/24"),
            ("::ffff:198.51.0.0/112", "198.51.0.0/16"),
        ] {
            assert_eq!(r.grantable_network(net(mapped)), Ok(net(want)), "{mapped}");
        }
        // The always_allow address 203.0.113.7 and the trusted 10.0.0.0/8, written mapped.
        assert_eq!(
            r.grantable_network(net("::ffff:203.0.113.0/120")),
            Err(Refusal::AlwaysAllowed(net("203.0.113.7/32")))
        );
        assert_eq!(
            r.grantable_network(net("::ffff:10.1.0.0/112")),
            Err(Refusal::ClientIsTrustedProxy(ip("10.1.0.0")))
        );
        assert_eq!(
            r.grantable_network(net("::ffff:169.254.0.0/112")),
            Err(Refusal::NotRoutable(ip("169.254.0.0")))
        );
        // Wider than /96 it is not an IPv4 range but every IPv4 client and more.
        for wide in ["::fffe:0:0/95", "::ffc0:0:0/90", "::/80"] {
            let refusal = r.grantable_network(net(wide)).expect_err(wide).to_string();
            for part in [wide, "::ffff:0.0.0.0/96", "ipv4"] {
                assert!(refusal.contains(part), "{wide}: {refusal}");
            }
        }
    }

    #[test]
    fn an_operators_translated_network_stays_within_one_ipv4_range() {
        let r = resolver(64);
        for ok in [
            "64:ff9b::c633:6407/128",
            "64:ff9b::c633:6400/120",
            "64:ff9b::c633:0/112",
            "64:ff9b:1:2::c633:6400/120",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2/128",
            // Teredo clients 192.0.2.0/24 behind one server and port.
            "2001:0:4136:e378:8000:63bf:3fff:fd00/120",
        ] {
            assert_eq!(r.grantable_network(net(ok)), Ok(net(ok)), "{ok}");
        }
        // Covers more than an IPv4 /16 of translated clients: other people.
        for (wide, prefix) in [
            ("64:ff9b::c600:0/104", "64:ff9b::/96"),
            ("64:ff9b::/96", "64:ff9b::/96"),
            ("64:ff9b::/64", "64:ff9b::/96"),
            ("64:ff9b::/32", "64:ff9b::/96"),
            ("64:ff9b:1::/48", "64:ff9b:1::/48"),
            ("64:ff9b:1:2::/64", "64:ff9b:1::/48"),
            ("2001::/32", "2001::/32"),
            ("2001:0:4136:e378::/64", "2001::/32"),
            ("2001:0:4136:e378:8000:63bf::/96", "2001::/32"),
        ] {
            let refusal = r.grantable_network(net(wide)).expect_err(wide).to_string();
            for part in [wide, prefix, "/112", "/128"] {
                assert!(refusal.contains(part), "{wide}: {refusal}");
            }
        }
        // The IPv4 range it embeds is judged as an IPv4 grant.
        assert_eq!(
            r.grantable_network(net("64:ff9b::a00:0/120")),
            Err(Refusal::ClientIsTrustedProxy(ip("10.0.0.0")))
        );
        assert_eq!(
            r.grantable_network(net("64:ff9b::cb00:7100/120")),
            Err(Refusal::AlwaysAllowed(net("203.0.113.7/32")))
        );
        assert_eq!(
            r.grantable_network(net("2001:0:4136:e378:8000:63bf:34ff:8e00/120")),
            Err(Refusal::AlwaysAllowed(net("203.0.113.7/32")))
        );
    }

    #[test]
    fn policy_ranges_written_mapped_match_ipv4() {
        let r = ClientIp::new(
            vec![net("::ffff:10.0.0.0/104")],
            vec![net("::ffff:203.0.113.7/128")],
            64,
        );
        assert!(r.is_trusted(ip("10.1.2.3")));
        assert_eq!(
            r.grantable(ip("203.0.113.7")),
            Err(Refusal::AlwaysAllowed(net("203.0.113.7/32")))
        );
    }

    #[test]
    fn trusted_proxy_as_client_is_remembered_once_per_address() {
        // The warning's text is checked against the real binary's log (tests/mirror.rs): a log
        // capture inside this multi-threaded test binary races with tracing's global callsite
        // cache.
        let r = resolver(64);
        for _ in 0..3 {
            let _ = r.network_to_grant(ip("172.17.0.1"), []);
            let _ = r.network_to_grant(ip("10.0.0.2"), &headers(&[b"10.0.0.9"]));
            // Other refusals are not warnings.
            let _ = r.network_to_grant(ip("198.51.100.1"), []);
            let _ = r.network_to_grant(ip("10.0.0.2"), &headers(&[b"unknown"]));
        }
        assert_eq!(r.warned_count(), 2);
    }

    /// The shipped compose layout: the proxy at 172.30.0.2, the network's gateway (where Docker's
    /// userland proxy connects from) in never_grant, with an IPv6 gateway and a mapped range.
    fn docker_resolver(ipv6_prefix: u8) -> ClientIp {
        ClientIp::new(
            vec![net("172.30.0.2/32")],
            vec![net("192.168.1.0/24")],
            ipv6_prefix,
        )
        .with_never_grant(vec![
            net("172.30.0.1/32"),
            net("2001:db8:7::1/128"),
            net("::ffff:100.64.0.0/106"),
        ])
    }

    #[test]
    fn a_client_inside_never_grant_is_refused_naming_the_range_and_the_key() {
        let r = docker_resolver(64);
        let proxy = ip("172.30.0.2");
        let got = r.network_to_grant(proxy, &headers(&[b"203.0.113.9, 172.30.0.1"]));
        assert_eq!(got, Err(Refusal::NeverGrant(net("172.30.0.1/32"))));
        let text = got.unwrap_err().to_string();
        assert!(text.contains("never_grant range 172.30.0.1/32"), "{text}");
        // However it is written, and through the share path (`grantable`) too.
        for client in ["172.30.0.1", "::ffff:172.30.0.1", "64:ff9b::172.30.0.1"] {
            assert_eq!(
                r.grantable(ip(client)),
                Err(Refusal::NeverGrant(net("172.30.0.1/32"))),
                "{client}"
            );
        }
        // A range written mapped matches the IPv4 clients it stands for.
        assert_eq!(
            r.grantable(ip("100.64.7.7")),
            Err(Refusal::NeverGrant(net("100.64.0.0/10")))
        );
        // Its neighbours are clients like any other.
        for (client, want) in [
            ("172.30.0.3", "172.30.0.3/32"),
            ("203.0.113.9", "203.0.113.9/32"),
            ("100.128.0.1", "100.128.0.1/32"),
        ] {
            assert_eq!(
                r.network_to_grant(proxy, &headers(&[client.as_bytes()])),
                Ok(net(want)),
                "{client}"
            );
        }
    }

    #[test]
    fn an_ipv6_network_overlapping_never_grant_is_refused() {
        let r = docker_resolver(64);
        let proxy = ip("172.30.0.2");
        // The client's /64 holds the never_grant /128.
        assert_eq!(
            r.network_to_grant(proxy, &headers(&[b"2001:db8:7::abcd"])),
            Err(Refusal::NeverGrant(net("2001:db8:7::1/128")))
        );
        assert_eq!(
            r.network_to_grant(proxy, &headers(&[b"2001:db8:8::abcd"])),
            Ok(net("2001:db8:8::/64"))
        );
        // Granted its address alone, the same client overlaps nothing.
        assert_eq!(
            docker_resolver(128).grantable(ip("2001:db8:7::abcd")),
            Ok(net("2001:db8:7::abcd/128"))
        );
        // An operator's network is refused when it overlaps, either way round.
        for (network, range) in [
            ("172.30.0.0/31", "172.30.0.1/32"),
            ("172.30.0.1/32", "172.30.0.1/32"),
            ("2001:db8:7::/64", "2001:db8:7::1/128"),
            ("100.64.1.0/24", "100.64.0.0/10"),
            ("::ffff:100.64.1.0/120", "100.64.0.0/10"),
        ] {
            assert_eq!(
                r.grantable_network(net(network)),
                Err(Refusal::NeverGrant(net(range))),
                "{network}"
            );
        }
        assert_eq!(
            r.grantable_network(net("172.30.0.4/30")),
            Ok(net("172.30.0.4/30"))
        );
    }

    #[test]
    fn a_never_grant_peer_is_not_trusted() {
        let r = docker_resolver(64);
        let gateway = ip("172.30.0.1");
        assert!(!r.is_trusted(gateway));
        // A local user connecting from the gateway cannot have a forged address granted.
        assert_eq!(
            r.network_to_grant(gateway, &headers(&[b"203.0.113.9"])),
            Err(Refusal::UntrustedPeer(gateway))
        );
        assert_eq!(
            r.resolve(gateway, &headers(&[b"203.0.113.9"])),
            Err(Refusal::UntrustedPeer(gateway))
        );
    }

    #[test]
    fn a_never_grant_client_is_remembered_once_per_address() {
        let r = docker_resolver(64);
        let proxy = ip("172.30.0.2");
        for _ in 0..3 {
            let _ = r.network_to_grant(proxy, &headers(&[b"172.30.0.1"]));
            let _ = r.grantable(ip("172.30.0.1"));
            // Rotating addresses of one /64 are one client.
            let _ = r.network_to_grant(proxy, &headers(&[b"2001:db8:7::a"]));
            let _ = r.network_to_grant(proxy, &headers(&[b"2001:db8:7::b"]));
            // Other refusals are not warnings.
            let _ = r.network_to_grant(proxy, &headers(&[b"192.168.1.5"]));
            let _ = r.network_to_grant(ip("172.30.0.1"), &headers(&[b"203.0.113.9"]));
        }
        assert_eq!(r.warned_count(), 2);
    }

    #[test]
    fn warned_addresses_are_capped() {
        let r = resolver(64);
        for i in 0..(MAX_WARNED as u32 + 10) {
            let proxy = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let _ = r.network_to_grant(proxy, []);
        }
        assert_eq!(r.warned_count(), MAX_WARNED);
    }
}
