//! Share links under abuse, end to end against the real binary: a flood of failing checks from
//! one IPv6 /48 neither grows the throttle table without bound nor locks out new viewers, and a
//! client cannot hold more than its share of the upstream checks with checks that never end.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::upstream::{Mode, Request, StandIn};
use common::*;

/// One Nextcloud-like share source on `upstream`, with `extra` lines in the source.
fn policy(upstream: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nstate_file: ./data/state.json\n\
         traefik: {{ file: ./traefik/gatekeeper.yml, propagation_delay: 0s }}\n\
         services: {{ nextcloud: {{}} }}\n\
         sources:\n  nextcloud-share:\n    kind: share\n    upstream: {upstream}\n\
         \x20   path: '^/s/[A-Za-z0-9]{{15}}$'\n    unlocks: [nextcloud]\n    max_ips: 20\n\
         \x20   idle_ttl: 1h\n{extra}"
    )
}

fn start(policy: &str) -> (Setup, Daemon) {
    let setup = Setup::new("");
    std::fs::write(&setup.policy, policy).expect("write policy");
    let daemon = setup.start();
    (setup, daemon)
}

/// A Nextcloud share token: 15 letters and digits.
fn token(seed: u64) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x = (seed + 1000).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..15)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            alphabet[(x % alphabet.len() as u64) as usize] as char
        })
        .collect()
}

/// The forward-auth request the proxy sends for `client` viewing `uri`; its status.
fn share(addr: SocketAddr, client: &str, uri: &str) -> u16 {
    Request::forward_auth("/share/nextcloud-share", Some(client), Some(uri.as_bytes()))
        .send(addr)
        .status
}

/// The value of gauge `name` for `source` on `/metrics`, if shown.
fn gauge(admin: SocketAddr, name: &str, source: &str) -> Option<u64> {
    let r = http(admin, "GET", "/metrics", &[], "");
    assert_eq!(r.status, 200, "{r:?}");
    let prefix = format!("{name}{{source=\"{source}\"}} ");
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().expect("a number"))
}

/// A keep-alive connection from the proxy, as Traefik keeps one to its forward-auth address:
/// a flood is many requests, not many connections.
struct ProxyConnection {
    addr: SocketAddr,
    reader: Option<BufReader<TcpStream>>,
}

impl ProxyConnection {
    fn new(addr: SocketAddr) -> ProxyConnection {
        ProxyConnection { addr, reader: None }
    }

    /// The status of a share check for `client` viewing `uri`; reconnects when the server
    /// closed the connection in between.
    fn share(&mut self, client: &str, uri: &str) -> u16 {
        for _ in 0..3 {
            if let Some(status) = self.try_share(client, uri) {
                return status;
            }
            self.reader = None;
        }
        panic!("no answer for {client} {uri}");
    }

    fn try_share(&mut self, client: &str, uri: &str) -> Option<u16> {
        if self.reader.is_none() {
            let stream = TcpStream::connect(self.addr).expect("connect");
            stream.set_read_timeout(Some(SOON)).unwrap();
            stream.set_nodelay(true).unwrap();
            self.reader = Some(BufReader::new(stream));
        }
        let reader = self.reader.as_mut()?;
        let request = format!(
            "GET /share/nextcloud-share HTTP/1.1\r\nHost: gatekeeper:5000\r\n\
             X-Forwarded-Method: GET\r\nX-Forwarded-Proto: https\r\n\
             X-Forwarded-Host: cloud.example.com\r\nX-Forwarded-Uri: {uri}\r\n\
             X-Forwarded-For: {client}\r\n\r\n"
        );
        reader.get_mut().write_all(request.as_bytes()).ok()?;
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let status = line.get(9..12)?.parse().ok()?;
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).ok()? == 0 {
                return None;
            }
            if header == "\r\n" {
                break;
            }
            if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().ok()?;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        Some(status)
    }
}

#[test]
fn a_flood_from_one_48_keeps_the_throttle_table_small_and_new_viewers_get_in() {
    let nextcloud = StandIn::nextcloud(&[&token(1)], Mode::Answer);
    let (setup, daemon) = start(&policy(&nextcloud.origin(), "    timeout: 5s\n"));
    let valid = format!("/s/{}", token(1));

    // One /64 of the flooding /48 guesses until it is banned.
    for guess in 0..5 {
        assert_eq!(
            share(
                daemon.addr,
                "2001:db8:1::1",
                &format!("/s/{}", token(100 + guess))
            ),
            403
        );
    }
    assert_eq!(share(daemon.addr, "2001:db8:1::1", &valid), 429, "banned");

    // Then every other /64 of that /48 fails once ("not a share link" is a failed check too),
    // over four keep-alive connections: 65535 distinct clients as today's table counts them.
    std::thread::scope(|s| {
        for part in 0..4u32 {
            let addr = daemon.addr;
            s.spawn(move || {
                let mut conn = ProxyConnection::new(addr);
                for subnet in (1..=0xffffu32).filter(|n| n % 4 == part) {
                    let status = conn.share(&format!("2001:db8:1:{subnet:x}::1"), "/s/short");
                    assert!(
                        status == 403 || status == 429,
                        "2001:db8:1:{subnet:x}::1: {status}"
                    );
                }
            });
        }
    });
    assert!(
        nextcloud.hits().len() == 5,
        "the flood never reached Nextcloud: {:?}",
        nextcloud.lines().len()
    );

    // New viewers from other networks, with a valid link, get in.
    assert_eq!(share(daemon.addr, "198.51.100.7", &valid), 200);
    assert_eq!(share(daemon.addr, "2001:db8:2::1", &valid), 200);
    // The ban from before the flood holds, and the flooding /48 is now one client, banned.
    assert_eq!(share(daemon.addr, "2001:db8:1::1", &valid), 429);
    assert_eq!(share(daemon.addr, "2001:db8:1:abcd::7", &valid), 429);
    // Memory stays bounded: the table holds a few dozen records, not one per /64.
    let admin = daemon.admin_addr();
    let tracked = gauge(
        admin,
        "gatekeeper_share_throttle_records",
        "nextcloud-share",
    );
    assert!(
        tracked.is_some_and(|n| n <= 100),
        "records tracked after the flood: {tracked:?}"
    );
    let mut granted: Vec<String> = setup
        .state_entries()
        .into_iter()
        .map(|e| e.network)
        .collect();
    granted.sort();
    assert_eq!(granted, ["198.51.100.7/32", "2001:db8:2::/64"]);
}

#[test]
fn a_client_holds_at_most_two_checks_and_the_third_is_429_without_the_upstream() {
    // An upstream that never answers holds every check until gatekeeper's timeout (1 min).
    let silent = StandIn::nextcloud(&[], Mode::Silent);
    let (_setup, daemon) = start(&policy(&silent.origin(), "    timeout: 60s\n"));
    let link = format!("/s/{}", token(1));
    let addr = daemon.addr;

    // Two checks of one client hang on the upstream...
    let hanging: Vec<_> = (0..2)
        .map(|_| {
            let link = link.clone();
            std::thread::spawn(move || {
                Request::forward_auth(
                    "/share/nextcloud-share",
                    Some("2001:db8:5:6::1"),
                    Some(link.as_bytes()),
                )
                .send_within(addr, Duration::from_secs(120))
            })
        })
        .collect();
    wait_for(
        "two checks in flight on the upstream",
        SOON,
        || match silent.hits().len() {
            2 => Ok(()),
            n => Err(format!("{n} hits")),
        },
    );
    // ...a third from the same client (another address of its /64) is refused at once.
    let third = Request::forward_auth(
        "/share/nextcloud-share",
        Some("2001:db8:5:6::2"),
        Some(link.as_bytes()),
    )
    .send_within(addr, SOON);
    match third {
        Ok(a) => assert_eq!(a.status, 429, "{a:?}"),
        Err(e) => panic!("the third check was not answered at once: {e}"),
    }
    assert_eq!(
        silent.hits().len(),
        2,
        "the third never reached the upstream"
    );

    // Another client still gets a check slot.
    let other = std::thread::spawn(move || {
        Request::forward_auth(
            "/share/nextcloud-share",
            Some("203.0.113.9"),
            Some(format!("/s/{}", token(2)).as_bytes()),
        )
        .send_within(addr, Duration::from_secs(120))
    });
    wait_for(
        "another client's check on the upstream",
        SOON,
        || match silent.hits().len() {
            3 => Ok(()),
            n => Err(format!("{n} hits")),
        },
    );
    drop(daemon);
    for h in hanging {
        let _ = h.join();
    }
    let _ = other.join();
}
