//! Notifications: events reach the configured URL in the chosen format, and a dead or hanging
//! receiver never delays a grant.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;

use common::*;

/// A receiver that records each request (head and body) and answers 200, or never answers.
struct Receiver {
    addr: SocketAddr,
    requests: mpsc::Receiver<(String, String)>,
}

fn receiver(answer: bool) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, requests) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            if tx
                .send((head, String::from_utf8_lossy(&body).into_owned()))
                .is_err()
            {
                return;
            }
            if answer {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            } else {
                held.push(stream); // never answered, never closed
            }
        }
    });
    Receiver { addr, requests }
}

fn body(notify: &str) -> String {
    body_with_ttl(notify, "1s")
}

fn body_with_ttl(notify: &str, idle_ttl: &str) -> String {
    format!(
        "services:\n  immich: {{}}\nsources:\n  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n    idle_ttl: {idle_ttl}\n{notify}"
    )
}

#[test]
fn grants_and_expiries_are_posted_as_json() {
    let r = receiver(true);
    let setup = Setup::new(&body(&format!(
        "notify: {{ url: \"http://{}/hook\", format: json, on: [grant, expire] }}\n",
        r.addr
    )));
    let daemon = setup.start();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.5"), 200);
    let (head, json) = r.requests.recv_timeout(SOON).expect("a grant notification");
    assert!(head.starts_with("POST /hook "), "{head}");
    let grant: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(grant["event"], "grant");
    assert_eq!(grant["source"], "ha");
    assert_eq!(grant["network"], "198.51.100.5/32");
    assert_eq!(grant["services"], serde_json::json!(["immich"]));
    // idle_ttl 1s: the expiry follows with no request.
    let (_, json) = r
        .requests
        .recv_timeout(SOON)
        .expect("an expiry notification");
    let expire: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(expire["event"], "expire");
    assert_eq!(expire["network"], "198.51.100.5/32");
    drop(daemon);
}

#[test]
fn ntfy_format_has_a_title_and_plain_text_and_unwanted_events_are_not_sent() {
    let r = receiver(true);
    let setup = Setup::new(&body(&format!(
        "notify: {{ url: \"http://{}/gatekeeper\", format: ntfy, on: [expire] }}\n",
        r.addr
    )));
    let daemon = setup.start();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.6"), 200);
    let (head, text) = r
        .requests
        .recv_timeout(SOON)
        .expect("an expiry notification");
    // The grant was not wanted (on: [expire]): the first message is the expiry.
    assert!(
        head.to_ascii_lowercase()
            .contains("title: gatekeeper: 198.51.100.6/32 expired"),
        "{head}"
    );
    assert_eq!(text, "198.51.100.6/32 expired through ha for immich");
    drop(daemon);
}

#[test]
fn a_hanging_or_dead_receiver_never_delays_a_grant() {
    for hanging in [true, false] {
        // The hanging receiver reads each notification and never answers nor closes; with an
        // hour's timeout, gatekeeper is still waiting on the first one until the end of the test.
        let r = hanging.then(|| receiver(false));
        let url = match &r {
            Some(r) => format!("http://{}/", r.addr),
            // Nothing listens on the discard port of loopback.
            None => "http://127.0.0.1:9/".to_string(),
        };
        let setup = Setup::new(&body_with_ttl(
            &format!("notify: {{ url: \"{url}\", timeout: 1h }}\n"),
            "1h",
        ));
        let daemon = setup.start();
        for i in 1..=20u8 {
            // Answered at all (the request's own deadline, SOON, is a liveness bound): a grant
            // that waited for the receiver would wait the hour.
            assert_eq!(
                mirror(daemon.addr, "ha.example.com", &format!("198.51.100.{i}")),
                200,
                "{url}"
            );
            if i == 1
                && let Some(r) = &r
            {
                // The first notification is now held by the receiver, unanswered; the grants
                // below are answered while it is (an order, not a speed).
                let (head, _) = r
                    .requests
                    .recv_timeout(SOON)
                    .expect("the first grant's notification, held");
                assert!(head.starts_with("POST / "), "{head}");
            }
        }
        setup.wait_lists("grants written despite the receiver", SOON, |l| {
            l["gatekeeper-immich"].len() == 10
        });
        if !hanging {
            // The dead receiver was tried (and failed) while the grants were answered.
            daemon.wait_log("notification failed");
        }
    }
}

/// A share source whose every failed check bans (nothing is sent upstream for a URI that is
/// not a link), beside the mirror source of [`body`], notifying to `url`.
fn share_body(url: &str) -> String {
    body_with_ttl(
        &format!(
            "  guarded-share:\n    kind: share\n    upstream: http://127.0.0.1:9\n    \
             path: '^/s/[A-Za-z0-9]{{15}}$'\n    unlocks: [immich]\n    max_failures: 1\n\
             notify: {{ url: \"{url}\", format: json, on: [grant, throttle] }}\n"
        ),
        "1h",
    )
}

#[test]
fn ban_notifications_are_at_most_one_per_source_per_minute() {
    let r = receiver(true);
    let setup = Setup::new(&share_body(&format!("http://{}/hook", r.addr)));
    let daemon = setup.start();
    // Twenty clients (twenty /64s of one /48) banned at once...
    for i in 1..=20u16 {
        let a = common::upstream::Request::forward_auth(
            "/share/guarded-share",
            Some(&format!("2001:db8:9:{i:x}::1")),
            Some(b"/s/not-a-link"),
        )
        .send(daemon.addr);
        assert_eq!(a.status, 403, "{a:?}");
    }
    // ...then a grant: notifications are sent in order, so once the grant's arrives, every ban
    // notification queued before it has arrived too.
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.9"), 200);
    let mut throttles = Vec::new();
    loop {
        let (_, json) = r
            .requests
            .recv_timeout(SOON)
            .expect("the grant notification");
        let event: serde_json::Value = serde_json::from_str(&json).unwrap();
        match event["event"].as_str() {
            Some("grant") => break,
            Some("throttle") => throttles.push(event),
            other => panic!("unexpected {other:?}: {event}"),
        }
    }
    assert_eq!(
        throttles.len(),
        1,
        "one ban notification, the rest summarised later: {throttles:?}"
    );
    assert_eq!(throttles[0]["source"], "guarded-share");
    assert_eq!(throttles[0]["network"], "2001:db8:9:1::/64");
    drop(daemon);
}

#[test]
fn notification_urls_are_logged_without_password_or_query() {
    // Nothing listens there: the failure is logged, with the URL.
    let setup = Setup::new(&body_with_ttl(
        "notify: { url: \"http://gk:s3cret-pass@127.0.0.1:9/hook?auth=t0ken-in-query\" }\n",
        "1h",
    ));
    let daemon = setup.start();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.10"), 200);
    let log = daemon.wait_log("notification failed");
    let line = log
        .lines()
        .find(|l| l.contains("notification failed"))
        .unwrap();
    assert!(line.contains("127.0.0.1:9/hook"), "names where: {line}");
    assert!(!log.contains("s3cret-pass"), "password logged:\n{log}");
    assert!(!log.contains("t0ken-in-query"), "query logged:\n{log}");
}
