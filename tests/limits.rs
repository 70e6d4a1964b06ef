//! Connection budgets and request-head limits on the proxy-facing listener: strangers get a small
//! budget, little patience and one request per connection; the trusted proxy keeps being served
//! while they hold every slot they can. On the admin listener each peer gets a share of the budget
//! and a few slots are kept for the HEALTHCHECK's loopback address. Attackers connect from
//! 127.0.0.2 and up (loopback, so the test needs no network), the policy trusts only 127.0.0.1.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::upstream::{Request, allow_status};
use common::*;

const POLICY: &str = "trusted_proxies: [127.0.0.1/32]\n\
                      services:\n  immich: {}\n\
                      sources:\n  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n";

/// The server's budget for untrusted peers (src/server.rs, UNTRUSTED_CONNECTIONS).
const UNTRUSTED_BUDGET: usize = 128;
/// The admin listener's budget (src/server.rs, ADMIN_CONNECTIONS).
const ADMIN_BUDGET: usize = 64;
/// One peer's share of it (src/server.rs, ADMIN_CONNECTIONS_PER_PEER).
const ADMIN_SHARE: usize = 16;

/// A connection to `addr` from the loopback address `from`.
fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    common::connect_from(IpAddr::V4(from), addr)
        .unwrap_or_else(|e| panic!("connect from {from} to {addr}: {e}"))
}

/// Is `stream` still open on the server's side (neither EOF nor reset waiting to be read)?
/// Looks without waiting.
fn still_open(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    let open = matches!(stream.peek(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock);
    stream.set_nonblocking(false).unwrap();
    open
}

/// Read until the server closes; returns what it sent and how long it took to close.
fn read_to_close(mut stream: TcpStream) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading after {:?}: {e}", start.elapsed()),
        }
    }
    (got, start.elapsed())
}

fn metric(admin: SocketAddr, line_start: &str) -> u64 {
    let body = Request::new("GET", "/metrics").send(admin).body;
    body.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{line_start}` in /metrics:\n{body}"))
}

#[test]
fn strangers_filling_their_budget_do_not_starve_the_proxy() {
    let setup = Setup::new(POLICY);
    let daemon = setup.start();
    let admin = daemon.admin_addr();

    // The trusted proxy opens an idle connection first: it has the long header timeout (10 s).
    let proxy_idle = connect_from(Ipv4Addr::new(127, 0, 0, 1), daemon.addr);
    // Strangers hold every untrusted slot with idle connections.
    let idle: Vec<TcpStream> = (0..UNTRUSTED_BUDGET)
        .map(|_| connect_from(Ipv4Addr::new(127, 0, 0, 2), daemon.addr))
        .collect();
    wait_for("every idle stranger to be counted", SOON, || {
        let open = metric(admin, "gatekeeper_connections_open{class=\"untrusted\"}");
        (open == UNTRUSTED_BUDGET as u64)
            .then_some(())
            .ok_or(open.to_string())
    });

    // One more stranger is closed, before anything is read: refused, not queued (a queued
    // connection would be served, 403, once the idle strangers' slots free up).
    let mut extra = connect_from(Ipv4Addr::new(127, 0, 0, 3), daemon.addr);
    let _ = extra.write_all(&request(Some("ha.example.com"), &[]));
    let (answer, took) = read_to_close(extra);
    assert!(
        answer.is_empty(),
        "an over-budget stranger got {:?} after {took:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        metric(
            admin,
            "gatekeeper_connections_refused_total{class=\"untrusted\"}"
        ) >= 1
    );
    // Logged from gatekeeper's logging thread: it may reach the log a moment later.
    wait_for("the budget warning in the log", SOON, || {
        let log = daemon.log();
        log.contains("connection budget full")
            .then_some(())
            .ok_or(log)
    });

    // The trusted proxy is still served, and its grant decides.
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.7"), 200);
    assert_eq!(allow_status(daemon.addr, "immich", "198.51.100.7"), 200);

    // A stranger that sends nothing is dropped after the short header timeout (3 s), while the
    // proxy's idle connection, opened earlier, is still open (its timeout is 10 s): an order,
    // not a speed. That frees the budget: a new stranger is answered (403: not a trusted proxy)
    // again.
    let (_, took) = read_to_close(idle.into_iter().next().unwrap());
    assert!(
        still_open(&proxy_idle),
        "the proxy's idle connection, opened before the stranger's, was closed first (the \
         stranger was kept {took:?})"
    );
    drop(proxy_idle);
    wait_for("a stranger to be answered again", SOON, || {
        let s = connect_from(Ipv4Addr::new(127, 0, 0, 3), daemon.addr);
        let mut w = s.try_clone().unwrap();
        let _ = w.write_all(b"GET /allow/immich HTTP/1.1\r\nHost: x\r\n\r\n");
        let (answer, _) = read_to_close(s);
        let text = String::from_utf8_lossy(&answer).into_owned();
        text.starts_with("HTTP/1.1 403").then_some(()).ok_or(text)
    });
}

#[test]
fn a_stranger_gets_one_request_per_connection_and_little_patience() {
    let setup = Setup::new(POLICY);
    let daemon = setup.start();

    // Two pipelined requests: one answer, then the connection is closed.
    let s = connect_from(Ipv4Addr::new(127, 0, 0, 2), daemon.addr);
    let mut w = s.try_clone().unwrap();
    w.write_all(
        b"GET /allow/immich HTTP/1.1\r\nHost: x\r\n\r\nGET /allow/immich HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    let (answer, _) = read_to_close(s);
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );

    // Headers sent a byte at a time never finish: dropped after 3 s, not the proxy's 10 s. The
    // proxy starts the same drip first; the stranger is cut while the proxy's connection is
    // still open (an order, not a speed), and not before its 3 s (a lower bound).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drip = |from: Ipv4Addr| {
        let s = connect_from(from, daemon.addr);
        let mut w = s.try_clone().unwrap();
        w.write_all(b"GET / HTTP/1.1\r\nHost: ha.example.com\r\nX-Slow: ")
            .unwrap();
        let stop = stop.clone();
        let dripper = std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && w.write_all(b"a").is_ok() {
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        (s, dripper)
    };
    let (proxy, proxy_dripper) = drip(Ipv4Addr::new(127, 0, 0, 1));
    let (s, dripper) = drip(Ipv4Addr::new(127, 0, 0, 2));
    let (_, took) = read_to_close(s);
    assert!(
        took >= Duration::from_secs(2),
        "slow headers of a stranger were cut after {took:?}, before the 3 s header timeout"
    );
    assert!(
        still_open(&proxy),
        "the proxy's slow headers, started first, were cut before the stranger's (after {took:?})"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(proxy);
    dripper.join().unwrap();
    proxy_dripper.join().unwrap();

    // The trusted proxy keeps its connection open between requests.
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 1), daemon.addr);
    for client in ["198.51.100.1", "198.51.100.2"] {
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: ha.example.com\r\nX-Forwarded-For: {client}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
}

#[test]
fn oversized_request_heads_are_refused_with_431() {
    let setup = Setup::new(POLICY);
    let daemon = setup.start();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: ha.example.com\r\nX-Forwarded-For: 198.51.100.9\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = send_raw(daemon.addr, big.into_bytes()).expect("an answer to a 64 KiB head");
    assert_eq!(answer.status, 431, "{}", answer.head);
    // Nothing was granted from it, and a head under the limit (24 KiB of cookies) still works.
    assert_eq!(allow_status(daemon.addr, "immich", "198.51.100.9"), 403);
    let fine = format!(
        "GET / HTTP/1.1\r\nHost: ha.example.com\r\nX-Forwarded-For: 198.51.100.9\r\nCookie: {}\r\nConnection: close\r\n\r\n",
        "c".repeat(24 * 1024)
    );
    assert_eq!(
        send_raw(daemon.addr, fine.into_bytes()).unwrap().status,
        200
    );
    assert_eq!(allow_status(daemon.addr, "immich", "198.51.100.9"), 200);
}

/// `gatekeeper health` (the container HEALTHCHECK) against the daemon's admin listener.
fn health_cli(setup: &Setup, admin: SocketAddr) -> (std::process::ExitStatus, String, String) {
    let listen = admin.to_string();
    run(
        setup.dir.path(),
        &["health", "--config", "gatekeeper.yaml"],
        &[("GATEKEEPER_ADMIN__LISTEN", listen.as_str())],
    )
}

/// Did the server close `stream` (EOF or reset) rather than keep it open? Waits at most `within`.
fn closed_by_server(stream: &TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    match (&*stream).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
    }
}

#[test]
fn one_peer_holding_idle_admin_connections_does_not_lock_out_health() {
    let setup = Setup::new(POLICY);
    let daemon = setup.start();
    let admin = daemon.admin_addr();

    // One address opens as many idle connections as the whole admin budget. The kernel queues
    // them before the `health` connection below, so the server has judged every one of them
    // before it sees that one.
    let idle: Vec<TcpStream> = (0..ADMIN_BUDGET)
        .map(|_| connect_from(Ipv4Addr::new(127, 0, 0, 2), admin))
        .collect();

    let (status, stdout, stderr) = health_cli(&setup, admin);
    assert!(
        status.success() && stdout == "ok\n",
        "`gatekeeper health` failed while 127.0.0.2 held {ADMIN_BUDGET} idle admin connections: \
         {status}: {stdout}{stderr}"
    );

    // That peer kept its share; the rest of its connections were closed at once.
    let refused = metric(
        admin,
        "gatekeeper_connections_refused_total{class=\"admin\"}",
    );
    assert_eq!(refused, (ADMIN_BUDGET - ADMIN_SHARE) as u64);
    let kept: Vec<TcpStream> = idle
        .into_iter()
        .filter(|s| !closed_by_server(s, Duration::from_millis(200)))
        .collect();
    assert_eq!(
        kept.len(),
        ADMIN_SHARE,
        "connections of 127.0.0.2 left open"
    );
    wait_for("the per-peer warning in the log", SOON, || {
        let log = daemon.log();
        log.contains("holds its share").then_some(()).ok_or(log)
    });

    // Idle admin connections are dropped after the header timeout (10 s), freeing the share.
    for s in &kept {
        assert!(
            closed_by_server(s, Duration::from_secs(60)),
            "an idle admin connection was kept open"
        );
    }
    wait_for(
        "127.0.0.2 to be answered on the admin listener again",
        SOON,
        || {
            let s = connect_from(Ipv4Addr::new(127, 0, 0, 2), admin);
            let mut w = s.try_clone().unwrap();
            let _ = w.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let (answer, _) = read_to_close(s);
            let text = String::from_utf8_lossy(&answer).into_owned();
            text.starts_with("HTTP/1.1 200").then_some(()).ok_or(text)
        },
    );
}

#[test]
fn peers_filling_the_admin_budget_together_leave_room_for_the_healthcheck() {
    let setup = Setup::new(POLICY);
    let daemon = setup.start();
    let admin = daemon.admin_addr();

    // Four addresses, each within its share, ask for the whole budget together.
    let _idle: Vec<TcpStream> = (2..2 + (ADMIN_BUDGET / ADMIN_SHARE) as u8)
        .flat_map(|last| (0..ADMIN_SHARE).map(move |_| last))
        .map(|last| connect_from(Ipv4Addr::new(127, 0, 0, last), admin))
        .collect();

    // The HEALTHCHECK connects from 127.0.0.1, for which a few slots are kept.
    let (status, stdout, stderr) = health_cli(&setup, admin);
    assert!(
        status.success() && stdout == "ok\n",
        "`gatekeeper health` failed while four peers held the admin budget: \
         {status}: {stdout}{stderr}"
    );
    assert!(
        metric(
            admin,
            "gatekeeper_connections_refused_total{class=\"admin\"}"
        ) >= 1
    );
}
