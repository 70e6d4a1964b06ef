//! The mirror source end to end: the real binary, real sockets, the real Traefik file. Mirrored
//! requests grant the client, limits evict and expire, and spoofed or junk forwarding headers
//! grant nothing.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// Three services; `ha` unlocks two of them, `other` (another host) the third.
const THREE_SERVICES: &str = "\
services:
  immich: {}
  nextcloud: {}
  jellyfin: {}
sources:
  ha:
    kind: mirror
    hosts: [ha.example.com, ha2.example.com]
    unlocks: [immich, jellyfin]
    max_ips: 10
    idle_ttl: 1h
  other:
    kind: mirror
    hosts: [other.example.com]
    unlocks: [nextcloud]
    max_ips: 10
    idle_ttl: 1h
";

fn has(lists: &Lists, middleware: &str, range: &str) -> bool {
    lists
        .get(middleware)
        .is_some_and(|l| l.iter().any(|r| r == range))
}

#[test]
fn mirrored_post_with_large_body_grants_the_client_in_every_unlocked_service_only() {
    let setup = Setup::new(THREE_SERVICES);
    let daemon = setup.start();
    let before = setup.wait_lists("the first Traefik file", SOON, |_| true);
    assert_eq!(
        before["gatekeeper-immich"],
        strings(&["0.0.0.0/32"]),
        "nobody before any grant"
    );

    // 100 kB body the server must never wait for; Host with a port and mixed case.
    let body = vec![b'x'; 100_000];
    let mut post = format!(
        "POST /api/websocket?x=1 HTTP/1.1\r\nHost: HA.Example.COM:8443\r\n\
         X-Forwarded-For: 198.51.100.23\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    post.extend_from_slice(&body);
    let response = send_raw(daemon.addr, post).expect("mirrored POST");
    assert_eq!(response.status, 200, "{}", response.head);

    // A lone grant is written when made; the only other writes are the periodic flushes, 30 s
    // apart, later than SOON gives up. No bound on the machine's speed.
    let lists = setup.wait_lists("198.51.100.23 in immich and jellyfin", SOON, |l| {
        has(l, "gatekeeper-immich", "198.51.100.23/32")
            && has(l, "gatekeeper-jellyfin", "198.51.100.23/32")
    });
    assert_eq!(lists["gatekeeper-immich"], strings(&["198.51.100.23/32"]));
    assert_eq!(lists["gatekeeper-jellyfin"], strings(&["198.51.100.23/32"]));
    assert_eq!(
        lists["gatekeeper-nextcloud"],
        strings(&["0.0.0.0/32"]),
        "ha does not unlock nextcloud"
    );

    // Hosts no source claims: nothing, not even through an absolute-form URI.
    let snapshot = std::fs::read(&setup.traefik).unwrap();
    for (name, raw) in [
        (
            "unknown host",
            request(Some("evil.example.org"), &[b"203.0.113.50"]),
        ),
        (
            "suffix of a mirror host",
            request(Some("evil-ha.example.com"), &[b"203.0.113.50"]),
        ),
        (
            "mirror host as a prefix",
            request(Some("ha.example.com.evil.org"), &[b"203.0.113.50"]),
        ),
        ("no host at all", request(None, &[b"203.0.113.50"])),
        (
            "absolute-form URI wins over Host",
            b"GET http://evil.example.org/ HTTP/1.1\r\nHost: ha.example.com\r\n\
              X-Forwarded-For: 203.0.113.50\r\nConnection: close\r\n\r\n"
                .to_vec(),
        ),
    ] {
        let response = send_raw(daemon.addr, raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(response.status, 404, "{name}: {}", response.head);
    }
    assert_eq!(
        std::fs::read(&setup.traefik).unwrap(),
        snapshot,
        "a 404 changes nothing"
    );

    // A later grant through the second host of the same source is the barrier: once it is in the
    // file, anything the 404s had granted would be too.
    assert_eq!(mirror(daemon.addr, "ha2.example.com.", "203.0.113.99"), 200);
    let lists = setup.wait_lists("the barrier grant", SOON, |l| {
        has(l, "gatekeeper-immich", "203.0.113.99/32")
    });
    for (service, want) in [
        (
            "gatekeeper-immich",
            vec!["198.51.100.23/32", "203.0.113.99/32"],
        ),
        (
            "gatekeeper-jellyfin",
            vec!["198.51.100.23/32", "203.0.113.99/32"],
        ),
        ("gatekeeper-nextcloud", vec!["0.0.0.0/32"]),
    ] {
        assert_eq!(lists[service], strings(&want), "{service}");
    }
    let state: BTreeSet<String> = setup
        .state_entries()
        .into_iter()
        .map(|e| e.network)
        .collect();
    assert_eq!(
        state,
        BTreeSet::from(["198.51.100.23/32".into(), "203.0.113.99/32".into()])
    );
}

#[test]
fn lru_limit_evicts_the_least_recently_seen_not_the_first_granted() {
    let setup = Setup::new(
        "services: { immich: {} }\n\
         sources:\n  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\", max_ips: 2, idle_ttl: 1h }\n",
    );
    let daemon = setup.start();
    // Addresses ordered A < B < C: the ledger breaks ties by address, so a refresh that did
    // nothing would evict A, not B.
    let (a, b, c) = ("203.0.113.1", "203.0.113.2", "203.0.113.3");
    let immich = |want: &[&str]| {
        let want = strings(want);
        setup.wait_lists(&format!("immich = {want:?}"), SOON, move |l| {
            l["gatekeeper-immich"] == want
        })
    };

    assert_eq!(mirror(daemon.addr, "ha.example.com", a), 200);
    immich(&["203.0.113.1/32"]);
    next_millisecond();
    assert_eq!(mirror(daemon.addr, "ha.example.com", b), 200);
    immich(&["203.0.113.1/32", "203.0.113.2/32"]);
    next_millisecond();
    assert_eq!(
        mirror(daemon.addr, "ha.example.com", a),
        200,
        "A seen again"
    );
    next_millisecond();
    assert_eq!(mirror(daemon.addr, "ha.example.com", c), 200);

    immich(&["203.0.113.1/32", "203.0.113.3/32"]);
    let state = setup.state_entries();
    let networks: Vec<&str> = state.iter().map(|e| e.network.as_str()).collect();
    assert_eq!(networks, ["203.0.113.1/32", "203.0.113.3/32"], "{state:?}");
    assert_eq!(state[0].hits, 2, "A's refresh is counted: {state:?}");
    daemon.wait_log("evicted");
    assert!(
        daemon.log().contains("evicted") && daemon.log().contains("203.0.113.2/32"),
        "the eviction of B is logged:\n{}",
        daemon.log()
    );
}

/// One row of the spoofing table: the `X-Forwarded-For` values sent from 127.0.0.1 (a trusted
/// proxy by default), the status expected, and the network granted, if any.
struct Case {
    name: &'static str,
    request: Vec<u8>,
    status: Option<u16>,
    grants: Option<&'static str>,
}

fn case(name: &'static str, xff: &[&[u8]], grants: Option<&'static str>) -> Case {
    Case {
        name,
        request: request(Some("ha.example.com"), xff),
        status: Some(200),
        grants,
    }
}

#[test]
fn spoofed_and_junk_forwarding_headers_grant_nothing_but_the_real_client() {
    // Loopback and the private ranges are proxies here: the walk must step over each of them.
    let setup = Setup::new(
        "trusted_proxies: [127.0.0.0/8, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, '::1/128', 'fc00::/7']\n\
         always_allow: [198.51.100.0/28]\n\
         services: { immich: {}, jellyfin: {} }\n\
         sources:\n  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\", max_ips: 100, idle_ttl: 1h }\n",
    );
    let daemon = setup.start();

    let big = vec!["203.0.113.30"; 1500].join(", "); // ~20 kB of a valid client, repeated
    let trusted_tail = format!("203.0.113.31{}", ", 10.0.0.1".repeat(40));
    let untrusted_chain = format!(
        "{}, 203.0.113.32",
        (1..=25)
            .map(|i| format!("6.6.6.{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut nul = request(Some("ha.example.com"), &[b"203.0.113.33"]);
    let at = nul.windows(3).position(|w| w == b".33").unwrap();
    nul.insert(at, 0);
    let huge = request(Some("ha.example.com"), &[vec![b'1'; 1 << 20].as_slice()]);

    let cases = vec![
        case(
            "forged left part of the chain",
            &[b"6.6.6.6, 203.0.113.9"],
            Some("203.0.113.9/32"),
        ),
        case(
            "trusted hops on the right are skipped",
            &[b"203.0.113.10, 10.0.0.5, 172.18.0.2"],
            Some("203.0.113.10/32"),
        ),
        case(
            "IPv6 client gets its /64",
            &[b"2001:db8:abcd:12:aaaa:bbbb:cccc:dddd"],
            Some("2001:db8:abcd:12::/64"),
        ),
        case(
            "bracketed IPv6 with a port",
            &[b"[2001:db8:abcd:13::5]:443"],
            Some("2001:db8:abcd:13::/64"),
        ),
        case(
            "IPv4-mapped IPv6 is IPv4",
            &[b"::ffff:203.0.113.11"],
            Some("203.0.113.11/32"),
        ),
        case(
            "IPv4 with a port",
            &[b"203.0.113.12:4711"],
            Some("203.0.113.12/32"),
        ),
        // The zone id is dropped (it names the proxy's interface, not the client).
        case(
            "zone id is dropped",
            &[b"2001:db8:77::1%eth0"],
            Some("2001:db8:77::/64"),
        ),
        // A link-local client is never granted: its /64 is every host on a segment.
        case("link-local client", &[b"fe80::1%eth0"], None),
        case(
            "several headers form one chain",
            &[b"6.6.6.7", b"203.0.113.13"],
            Some("203.0.113.13/32"),
        ),
        case(
            "junk left of the client is never reached",
            &[b"<script>, 203.0.113.14"],
            Some("203.0.113.14/32"),
        ),
        case(
            "many untrusted hops: the rightmost wins",
            &[untrusted_chain.as_bytes()],
            Some("203.0.113.32/32"),
        ),
        case("Docker gateway as the client", &[b"172.17.0.1"], None),
        case("no X-Forwarded-For: the peer is a trusted proxy", &[], None),
        case(
            "always_allow client is never an entry",
            &[b"198.51.100.5"],
            None,
        ),
        case("unknown", &[b"unknown"], None),
        case("three octets", &[b"1.2.3"], None),
        case("markup", &[b"<script>alert(1)</script>"], None),
        case(
            "empty element right of the client",
            &[b"203.0.113.15, , 10.0.0.1"],
            None,
        ),
        case("trailing comma", &[b"203.0.113.16,"], None),
        case("port out of range", &[b"203.0.113.17:99999"], None),
        case("non-UTF-8 bytes", &[b"203.0.113.18\xff\xfe"], None),
        case("zone id with junk", &[b"fe80::2%eth0/../x"], None),
        case("20 kB header", &[big.as_bytes()], None),
        case("40 trusted hops", &[trusted_tail.as_bytes()], None),
        Case {
            name: "NUL byte in the header",
            request: nul,
            status: Some(400),
            grants: None,
        },
        Case {
            // Over hyper's buffer: refused (431) or the connection is dropped.
            name: "1 MB header",
            request: huge,
            status: None,
            grants: None,
        },
    ];
    assert!(cases.len() >= 10);

    for c in &cases {
        let result = send_raw(daemon.addr, c.request.clone());
        match (c.status, result) {
            (Some(want), Ok(r)) => assert_eq!(r.status, want, "{}: {}", c.name, r.head),
            (Some(_), Err(e)) => panic!("{}: {e}", c.name),
            (None, Ok(r)) => assert!(r.status >= 400, "{}: {}", c.name, r.head),
            (None, Err(_)) => {}
        }
        // The server keeps answering after every case.
        assert_eq!(
            mirror(daemon.addr, "ha.example.com", "172.17.0.1"),
            200,
            "after {}",
            c.name
        );
    }

    // Barrier: a good request after all the junk; once it is in the file, so is anything the
    // junk granted.
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.77"), 200);
    let lists = setup.wait_lists("the good request after the junk", SOON, |l| {
        l["gatekeeper-immich"]
            .iter()
            .any(|r| r == "203.0.113.77/32")
    });

    let mut want: BTreeSet<String> = cases
        .iter()
        .filter_map(|c| c.grants)
        .map(str::to_string)
        .collect();
    want.insert("203.0.113.77/32".into());
    let state: BTreeSet<String> = setup
        .state_entries()
        .into_iter()
        .map(|e| e.network)
        .collect();
    assert_eq!(state, want, "state file entries");
    want.insert("198.51.100.0/28".into());
    for service in ["gatekeeper-immich", "gatekeeper-jellyfin"] {
        let got: BTreeSet<String> = lists[service].iter().cloned().collect();
        assert_eq!(got, want, "{service}");
        assert!(
            !got.iter().any(|r| r.starts_with("6.6.6.")),
            "a forged address was granted: {got:?}"
        );
    }
}

#[test]
fn untrusted_peer_is_refused_whatever_its_forwarding_header_says() {
    // 127.0.0.1 is no trusted proxy here, so the test's own connections are untrusted peers.
    let setup = Setup::new(
        "trusted_proxies: [10.99.0.0/16]\n\
         services: { immich: {} }\n\
         sources:\n  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\", max_ips: 10, idle_ttl: 1h }\n",
    );
    let mut daemon = setup.start();
    for xff in [&b"203.0.113.40"[..], b"203.0.113.41, 10.99.0.1", b""] {
        let xff: &[&[u8]] = if xff.is_empty() { &[] } else { &[xff] };
        let r = send_raw(daemon.addr, request(Some("ha.example.com"), xff)).unwrap();
        assert_eq!(r.status, 403, "{xff:?}: {}", r.head);
    }
    // The shutdown flush is the barrier: whatever was recorded is on disk after it.
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{status}\n{log}");
    assert!(
        setup.state_entries().is_empty(),
        "{:?}",
        setup.state_entries()
    );
    assert_eq!(setup.lists()["gatekeeper-immich"], strings(&["0.0.0.0/32"]));
    assert!(!log.contains(": granted source="), "{log}");
}

#[test]
fn idle_ttl_expires_entries_with_no_request_arriving() {
    let setup = Setup::new(
        "services: { immich: {} }\n\
         sources:\n  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\", max_ips: 10, idle_ttl: 1s }\n",
    );
    let daemon = setup.start();
    let sent = Instant::now();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.60"), 200);
    setup.wait_lists("the grant", SOON, |l| {
        l["gatekeeper-immich"] == strings(&["203.0.113.60/32"])
    });
    assert_eq!(setup.state_entries().len(), 1);

    // No request from here on.
    // SOON only catches an entry left to a later write (the periodic flush is 30 s away) or never
    // expired; the timing asserted is the lower bound below.
    setup.wait_lists("the entry to expire from the Traefik file", SOON, |l| {
        l["gatekeeper-immich"] == strings(&["0.0.0.0/32"])
    });
    assert!(
        sent.elapsed() >= Duration::from_secs(1),
        "expired after {:?}, before its idle_ttl of 1s",
        sent.elapsed()
    );
    // The state file is written before the Traefik file.
    assert_eq!(setup.state_entries(), vec![], "state file after expiry");
    daemon.wait_log("expired");
}

/// The status of the next response on `reader` (its head only: mirror answers have no body);
/// `None` when the connection was closed (or reset) instead.
fn next_status(reader: &mut impl BufRead) -> Option<u16> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => return None,
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("no answer and no close: {e}"),
    }
    let status = line.get(9..12).and_then(|s| s.parse().ok());
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            return status;
        }
    }
}

/// A proxy may send a mirrored request's body after its headers. The answer never waits for it,
/// and a body of up to 64 KiB is then drained, so the proxy's connection stays open for its next
/// request; a larger one closes the connection, as hyper does with any unread body.
#[test]
fn a_body_sent_after_the_answer_keeps_the_connection_open_up_to_a_bound() {
    let setup = Setup::new(THREE_SERVICES);
    let daemon = setup.start();
    let post = |client: &str, len: usize| {
        format!(
            "POST / HTTP/1.1\r\nHost: ha.example.com\r\nX-Forwarded-For: {client}\r\n\
             Content-Length: {len}\r\n\r\n"
        )
    };
    let mut stream = TcpStream::connect(daemon.addr).unwrap();
    stream.set_read_timeout(Some(SOON)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for client in ["198.51.100.31", "198.51.100.32", "198.51.100.33"] {
        stream.write_all(post(client, 20_000).as_bytes()).unwrap();
        assert_eq!(
            next_status(&mut reader),
            Some(200),
            "{client}: answered first"
        );
        stream.write_all(&[b'x'; 20_000]).unwrap();
    }
    setup.wait_lists("the three clients", SOON, |l| {
        l["gatekeeper-immich"].len() == 3
    });

    stream
        .write_all(post("198.51.100.34", 100_000).as_bytes())
        .unwrap();
    assert_eq!(next_status(&mut reader), Some(200), "answered first");
    // The server may already have closed its side: the write can fail.
    let _ = stream.write_all(&[b'x'; 100_000]);
    let _ = stream.write_all(post("198.51.100.35", 0).as_bytes());
    assert_eq!(
        next_status(&mut reader),
        None,
        "closed after an undrained body"
    );
}

#[test]
fn a_trusted_proxy_as_the_client_is_warned_about_once_per_address() {
    // 10.0.0.0/8 holds a second proxy (a Docker network, say) besides the loopback tests.
    let setup = Setup::new(
        "trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\nservices:\n  immich: {}\nsources:\n  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n",
    );
    let daemon = setup.start();
    for _ in 0..3 {
        // No X-Forwarded-For: the client is the peer itself, 127.0.0.1, a trusted proxy.
        assert_eq!(
            send_raw(daemon.addr, request(Some("ha.example.com"), &[]))
                .unwrap()
                .status,
            200
        );
        assert_eq!(mirror(daemon.addr, "ha.example.com", "10.0.0.9"), 200);
    }
    let log = wait_for("two warnings in the log", SOON, || {
        let log = daemon.log();
        (log.matches("hiding client addresses").count() >= 2)
            .then(|| log.clone())
            .ok_or(log)
    });
    assert_eq!(log.matches("hiding client addresses").count(), 2, "{log}");
    assert!(
        log.contains("127.0.0.1") && log.contains("10.0.0.9"),
        "{log}"
    );
    assert!(!log.contains(": granted source="), "{log}");
}
