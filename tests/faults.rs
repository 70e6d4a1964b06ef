//! Fault injection: outputs that cannot be written, state files that cannot be used, share
//! upstreams that misbehave, and SIGTERM under churn. gatekeeper keeps deciding from memory,
//! says what is wrong, fails closed, and recovers by itself once the cause is gone.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::upstream::{Request, allow_status};
use common::*;

const HA: &str = "services:\n  immich: {}\n  nextcloud: {}\n\
                  sources:\n  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n";

#[test]
fn traefik_file_that_is_a_directory_then_repaired() {
    let setup = Setup::new(HA);
    std::fs::create_dir_all(&setup.traefik).unwrap(); // the target path is a directory
    let daemon = setup.start();
    let admin = daemon.admin_addr();
    let body = wait_health(admin, 503, SOON);
    assert!(body.contains("gatekeeper.yml"), "{body}");
    // Decisions keep coming from memory.
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.7"), 200);
    assert_eq!(allow_status(daemon.addr, "immich", "198.51.100.7"), 200);
    assert_eq!(allow_status(daemon.addr, "immich", "198.51.100.8"), 403);
    daemon.wait_log("cannot write outputs");
    // The cause goes away: the next retry writes the file and health is back.
    std::fs::remove_dir(&setup.traefik).unwrap();
    wait_health(admin, 200, SOON);
    setup.wait_lists("the grant in the repaired file", SOON, |l| {
        l["gatekeeper-immich"] == vec!["198.51.100.7/32".to_string()]
    });
    daemon.wait_log("outputs are written again");
}

#[test]
fn directory_that_vanishes_then_comes_back() {
    let setup = Setup::new(HA);
    let daemon = setup.start();
    let admin = daemon.admin_addr();
    wait_health(admin, 200, SOON);
    let dir = setup.traefik.parent().unwrap().to_path_buf();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.9"), 200);
    let body = wait_health(admin, 503, SOON);
    assert!(body.contains("traefik"), "{body}");
    assert_eq!(allow_status(daemon.addr, "nextcloud", "198.51.100.9"), 200);
    std::fs::create_dir(&dir).unwrap();
    wait_health(admin, 200, SOON);
    setup.wait_lists("the grant once the directory is back", SOON, |l| {
        l["gatekeeper-nextcloud"] == vec!["198.51.100.9/32".to_string()]
    });
}

#[test]
fn file_size_limit_is_survived_and_recovered_from() {
    // RLIMIT_FSIZE: a write past it fails with EFBIG and, unless handled, SIGXFSZ kills the
    // process. Ten entries make the outputs larger than 512 bytes; expiry shrinks them again.
    let setup = Setup::new(&format!("{HA}    idle_ttl: 2s\n"));
    let mut daemon = Daemon::start_wrapped(
        "sh",
        &["-c", "ulimit -f 1; exec \"$0\" \"$@\"", BIN],
        setup.dir.path(),
        &["--config", "gatekeeper.yaml"],
        &[],
    );
    let admin = daemon.admin_addr();
    wait_health(admin, 200, SOON);
    for i in 1..=10 {
        assert_eq!(
            mirror(daemon.addr, "ha.example.com", &format!("198.51.100.{i}")),
            200
        );
    }
    let body = wait_health(admin, 503, SOON);
    assert!(
        body.contains("File too large") || body.contains("file too large"),
        "{body}"
    );
    assert!(daemon.child_alive(), "SIGXFSZ must not kill gatekeeper");
    assert_eq!(allow_status(daemon.addr, "immich", "198.51.100.3"), 200);
    // The entries expire, the content fits again, the outputs recover with no help.
    wait_health(admin, 200, SOON);
    setup.wait_lists("every entry expired and written", SOON, |l| {
        l["gatekeeper-immich"] == vec!["0.0.0.0/32".to_string()]
    });
    let (status, _) = daemon.terminate();
    assert!(status.success());
}

#[test]
fn unusable_state_files_stop_the_start_naming_the_file() {
    for (what, content) in [
        ("future format", Some("{\"format\":99,\"entries\":[]}")),
        (
            "truncated",
            Some("{\"format\":1,\"entries\":[{\"source\":\"ha\","),
        ),
        ("empty", Some("")),
        ("unreadable (a directory)", None),
    ] {
        let setup = Setup::new(HA);
        std::fs::create_dir_all(setup.state.parent().unwrap()).unwrap();
        match content {
            Some(c) => std::fs::write(&setup.state, c).unwrap(),
            None => std::fs::create_dir(&setup.state).unwrap(),
        }
        let (status, _, stderr) = run(setup.dir.path(), &["--config", "gatekeeper.yaml"], &[]);
        assert_eq!(status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains("data/state.json"), "{what}: {stderr}");
        if let Some(c) = content {
            // Never silently replaced.
            assert_eq!(std::fs::read_to_string(&setup.state).unwrap(), c, "{what}");
        }
        assert!(
            !setup.traefik.exists(),
            "{what}: no output from unknown state"
        );
    }
}

/// A raw upstream that answers every connection with `answer` (then holds or closes it).
fn raw_upstream(answer: impl Fn(&mut TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = stream.read(&mut buf);
                answer(&mut stream);
            });
        }
    });
    addr
}

fn share_policy(upstream: SocketAddr) -> String {
    format!(
        "services:\n  nextcloud: {{}}\n\
         sources:\n  nc:\n    kind: share\n    upstream: http://{upstream}\n    path: '^/s/[A-Za-z0-9]{{15}}$'\n    unlocks: [nextcloud]\n    timeout: 1h\n    cache: 1s\n"
    )
}

/// Hold the connection open (unanswered further, unclosed) until `release` is set.
fn hold_until(release: &AtomicBool) {
    while !release.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The share check's status. The upstreams below hold their connection open and the policy's
/// timeout is an hour, so an answer within the request's own deadline (SOON, a liveness bound)
/// can only come from what the upstream sent, never from its connection closing or the timeout.
fn share(addr: SocketAddr, client: &str) -> u16 {
    Request::forward_auth("/share/nc", Some(client), Some(b"/s/AbCdEfGhIjKlMnO"))
        .send(addr)
        .status
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn garbage_from_the_upstream_fails_closed() {
    // The garbage is all the upstream sends; it then holds the connection open until the end of
    // the test, so the 503 comes from reading the garbage, not from a close or the timeout.
    let release = Arc::new(AtomicBool::new(false));
    let held = release.clone();
    let up = raw_upstream(move |s| {
        let _ = s.write_all(b"\x00\x01SSH-2.0-OpenSSH_9.2\r\nnot http at all\r\n\r\n");
        hold_until(&held);
    });
    let setup = Setup::new(&share_policy(up));
    let daemon = setup.start();
    let status = share(daemon.addr, "203.0.113.20");
    assert_eq!(status, 503, "garbage is no answer");
    assert_eq!(allow_status(daemon.addr, "nextcloud", "203.0.113.20"), 403);
    release.store(true, Ordering::SeqCst);
}

#[test]
fn a_huge_body_is_never_read_and_memory_stays_bounded() {
    // 200 with a 100 MB body that never ends (one byte is always missing, and the connection is
    // held open): only the status counts, so the check is valid without waiting for the body
    // (a check that waited would never be answered), and the body never reaches gatekeeper's
    // memory.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writer = stop.clone();
    let up = raw_upstream(move |s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 104857601\r\n\r\n");
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..100 {
            if stop_writer.load(Ordering::SeqCst) || s.write_all(&chunk).is_err() {
                return;
            }
        }
        hold_until(&stop_writer);
    });
    let setup = Setup::new(&share_policy(up));
    let daemon = setup.start();
    let before = peak_rss_kib(daemon.pid());
    for i in 1..=5 {
        let status = share(daemon.addr, &format!("203.0.113.{}", 30 + i));
        assert_eq!(status, 200);
        std::thread::sleep(Duration::from_millis(1100)); // past the 1 s cache: ask again
    }
    stop.store(true, Ordering::SeqCst);
    let after = peak_rss_kib(daemon.pid());
    assert!(
        after < 64 * 1024 && after < before + 32 * 1024,
        "peak RSS {before} kB -> {after} kB"
    );
}

#[test]
fn sigterm_during_heavy_churn_loses_no_grant() {
    let setup = Setup::new(
        "services:\n  immich: {}\nsources:\n  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n    max_ips: 50\n",
    );
    let mut daemon = setup.start();
    let addr = daemon.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for t in 0..4u32 {
        let stop = stop.clone();
        senders.push(std::thread::spawn(move || {
            let mut answered = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let client = format!("2001:db8:{t:x}:{i:x}::1");
                match send_raw(addr, request(Some("ha.example.com"), &[client.as_bytes()])) {
                    Ok(r) if r.status == 200 => {
                        answered.push((Instant::now(), format!("2001:db8:{t:x}:{i:x}::/64")))
                    }
                    _ => break, // the listener closed: shutting down
                }
            }
            answered
        }));
    }
    std::thread::sleep(Duration::from_millis(400));
    let (status, log) = daemon.terminate();
    stop.store(true, Ordering::SeqCst);
    let mut answered: Vec<(Instant, String)> = senders
        .into_iter()
        .flat_map(|s| s.join().unwrap())
        .collect();
    assert!(status.success(), "{log}");
    let total = answered.len();
    assert!(total > 50, "churn was not heavy: {total} requests");
    // The final state holds exactly the 50 most recent grants, and the Traefik file agrees.
    let state = state_networks(&setup.state).unwrap();
    assert_eq!(state.len(), 50, "{state:?}");
    let lists = setup.lists();
    let shown: std::collections::BTreeSet<String> =
        lists["gatekeeper-immich"].iter().cloned().collect();
    assert_eq!(shown, state);
    // The last 40 grants answered are all kept: each is followed by at most 39 later answers and
    // 4 requests in flight, fewer than max_ips. Nothing answered at the end was lost.
    answered.sort();
    for (_, network) in answered.iter().rev().take(40) {
        assert!(state.contains(network), "{network} missing from {state:?}");
    }
}
