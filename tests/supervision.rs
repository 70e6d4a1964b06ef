//! Nothing dies or hangs silently: a reload that removes a source while its grant is in Redis
//! leaves grants working, an output write that hangs shows on `/healthz`, and an entry expired
//! locally during a Redis outage is announced once, not again when Redis expires it.

mod common;

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::redis::Redis;
use common::upstream::allow_status;
use common::*;

const HA: &str =
    "  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n    max_ips: 10\n";
const OTHER: &str = "  other:\n    kind: mirror\n    hosts: [other.example.com]\n    unlocks: [immich]\n    max_ips: 10\n";

fn shared_policy(url: &str, sources: &str) -> String {
    format!(
        "trusted_proxies: [127.0.0.1/32]\n\
         redis: {{ url: \"{url}\", key_prefix: gk-sup }}\n\
         services:\n  immich: {{}}\n\
         sources:\n{sources}"
    )
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn a_reload_that_removes_a_source_while_its_grant_is_in_redis_leaves_grants_working() {
    let redis = Redis::start();
    let setup = Setup::new(&shared_policy(&redis.url(), &format!("{HA}{OTHER}")));
    let daemon = setup.start();
    let admin = daemon.admin_addr();
    wait_health(admin, 200, SOON);

    // Scripts wait in Redis until unpaused: the grant for `other` is sent and not answered.
    redis.cli(&["CLIENT", "PAUSE", "60000", "WRITE"]);
    assert_eq!(
        mirror(daemon.addr, "other.example.com", "198.51.100.80"),
        200
    );
    wait_for("a script waiting in Redis", SOON, || {
        let clients = redis.cli(&["CLIENT", "LIST"]);
        clients
            .lines()
            .any(|c| c.contains("flags=b") && c.contains("cmd=evalsha"))
            .then_some(())
            .ok_or(clients)
    });
    // Meanwhile the policy loses that source; then Redis answers the grant.
    std::fs::write(
        &setup.policy,
        format!("{PREAMBLE}{}", shared_policy(&redis.url(), HA)),
    )
    .unwrap();
    daemon.hangup();
    daemon.wait_log("policy reloaded");
    redis.cli(&["CLIENT", "UNPAUSE"]);

    // The shared store keeps serving: a new client of the remaining source is granted.
    wait_for(
        "a grant through the remaining source",
        Duration::from_secs(30),
        || {
            assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.81"), 200);
            match allow_status(daemon.addr, "immich", "198.51.100.81") {
                200 => Ok(()),
                s => Err(format!(
                    "/allow {s}; /healthz {:?}\n{}",
                    health(admin),
                    daemon.log()
                )),
            }
        },
    );
    assert_eq!(allow_status(daemon.addr, "immich", "198.51.100.80"), 403);
    wait_health(admin, 200, SOON);
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

#[test]
fn an_output_write_that_hangs_shows_on_healthz() {
    let setup = Setup::new(&format!("services:\n  immich: {{}}\nsources:\n{HA}"));
    let dir = setup.traefik.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    // A FIFO where the Traefik file goes: opening it for reading waits for a writer.
    let made = Command::new("mkfifo").arg(&setup.traefik).status().unwrap();
    assert!(made.success(), "mkfifo failed");
    let daemon = setup.start();
    let admin = daemon.admin_addr();

    // Either the write hangs (the watchdog reports it) or it fails at once: never green.
    let body = wait_for(
        "/healthz to report the Traefik file",
        Duration::from_secs(60),
        || {
            let (status, body) = health(admin);
            (status == 503 && body.contains("gatekeeper.yml"))
                .then(|| body.clone())
                .ok_or(format!("{status} {body}"))
        },
    );
    eprintln!("{body}");
    if body.contains("has not finished") {
        assert!(body.contains("outputs: writing"), "{body}");
        let log = daemon.wait_log("has not finished");
        assert!(log.contains("gatekeeper.yml"), "{log}");
    }

    // A writer that opens and closes the FIFO lets a hanging read end: the report goes away.
    wait_for(
        "the stuck report to go away",
        Duration::from_secs(30),
        || {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&setup.traefik);
            let (status, body) = health(admin);
            (!body.contains("has not finished"))
                .then_some(())
                .ok_or(format!("{status} {body}"))
        },
    );
}

/// A TCP relay to Redis that the test can cut (every connection dropped, new ones closed at
/// once) and restore, so Redis keeps its data while the replica cannot reach it.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(upstream: u16) -> Relay {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the relay");
        let up = Arc::new(AtomicBool::new(true));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (flag, streams) = (up.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], upstream)))
                else {
                    continue;
                };
                let mut held = streams.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, up, open }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[test]
fn an_entry_expired_during_a_redis_outage_is_announced_once() {
    let redis = Redis::start();
    let relay = Relay::start(redis.port());
    let setup = Setup::new(&shared_policy(
        &relay.url(),
        &format!("{HA}    idle_ttl: 2s\n"),
    ));
    let daemon = setup.start();
    let admin = daemon.admin_addr();
    wait_health(admin, 200, SOON);
    let client = "198.51.100.90";
    assert_eq!(mirror(daemon.addr, "ha.example.com", client), 200);
    wait_for("the grant", SOON, || {
        match allow_status(daemon.addr, "immich", client) {
            200 => Ok(()),
            s => Err(s.to_string()),
        }
    });

    // Redis keeps the entry, but the replica cannot reach it: it expires the entry locally.
    relay.cut();
    wait_for("/healthz to report the outage", SOON, || {
        let (status, body) = health(admin);
        (status == 503 && body.contains("redis"))
            .then_some(())
            .ok_or(format!("{status} {body}"))
    });
    daemon.wait_log("expired (idle)");
    let members = redis.cli(&["ZRANGE", "gk-sup:ha:seen", "0", "-1"]);
    assert_eq!(members.trim(), format!("{client}/32"));

    // Back: Redis's own expiry removes it, and the replica does not announce it again.
    relay.restore();
    wait_for("Redis to expire the entry", SOON, || {
        let members = redis.cli(&["ZRANGE", "gk-sup:ha:seen", "0", "-1"]);
        members.trim().is_empty().then_some(()).ok_or(members)
    });
    wait_health(admin, 200, SOON);
    let log = wait_for("the replica to be synced again", SOON, || {
        let log = daemon.log();
        (count(&log, "shared store reachable") >= 2)
            .then_some(log.clone())
            .ok_or(log)
    });
    assert_eq!(count(&log, "expired (idle)"), 1, "{log}");
}
