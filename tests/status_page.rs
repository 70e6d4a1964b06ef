//! The status page in a real browser: headless Chromium (Debian `chromium`) loads `/` from the
//! real binary and its DOM shows every service with who is allowed and through which source; a
//! phone-sized screenshot is saved as `target/status-page.png` for people to look at.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const TOKEN: &str = "status-page-test-token";
/// One browser run; a cold start of Chromium takes a second or two.
const BROWSER_DEADLINE: Duration = Duration::from_secs(20);

const POLICY: &str = r#"always_allow: [198.51.100.0/24]
services: { immich: {}, nextcloud: {}, jellyfin: { always_allow: [192.0.2.7/32] } }
sources:
  home-assistant: { kind: mirror, hosts: [ha.example.com], unlocks: "*", max_ips: 4, idle_ttl: 7d }
  nextcloud-share:
    kind: share
    upstream: http://127.0.0.1:9
    path: '^/s/[A-Za-z0-9]{15}$'
    unlocks: [nextcloud]
    max_ips: 20
    idle_ttl: 12h
    max_age: 48h
"#;

/// Grant through the admin API; panics unless it answers 201.
fn grant(admin: SocketAddr, source: &str, address: &str) {
    let body = format!(r#"{{"source":"{source}","address":"{address}","ttl":"2h"}}"#);
    let request = format!(
        "POST /api/v1/entries HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = send_raw(admin, request.into_bytes()).unwrap();
    assert_eq!(r.status, 201, "{}", r.head);
}

/// Run Chromium headless on `url` with `extra` arguments; its stdout. Killed at the deadline.
fn chromium(profile: &Path, extra: &[&str], url: &str) -> String {
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {CHROMIUM}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = std::time::Instant::now() + BROWSER_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium {extra:?} did not finish within {BROWSER_DEADLINE:?}:\n{}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(POLL);
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.success(),
        "chromium {extra:?} failed ({status}):\n{err}"
    );
    out
}

/// The part of `dom` from the element with `id` to the end of its section.
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element with id {id} in the DOM:\n{dom}"));
    let len = dom[start..]
        .find("</section>")
        .unwrap_or_else(|| panic!("section {id} is not closed:\n{dom}"));
    &dom[start..start + len]
}

#[test]
fn status_page_shows_every_service_and_entry_in_chromium() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the status page is tested in a real browser; install it with \
         `apt-get install -y chromium`"
    );
    let setup = Setup::new(POLICY);
    let daemon = Daemon::start(
        setup.dir.path(),
        &["--config", "gatekeeper.yaml"],
        &[("GATEKEEPER_ADMIN__TOKEN", TOKEN)],
    );
    let admin = daemon.admin_addr();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.5"), 200);
    grant(admin, "home-assistant", "2001:db8:5::1");
    grant(admin, "nextcloud-share", "203.0.113.77");

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{admin}/");
    let dom = chromium(profile.path(), &["--dump-dom"], &url);
    assert!(dom.contains("<title>gatekeeper status</title>"), "{dom}");

    // Who is allowed where, and through which source.
    let mirror_nets = ["203.0.113.5/32", "2001:db8:5::/64"];
    for service in ["immich", "nextcloud", "jellyfin"] {
        let s = section(&dom, &format!("service-{service}"));
        assert!(s.contains(&format!(">{service}<")), "{s}");
        for net in mirror_nets {
            assert!(s.contains(net), "{net} missing for {service}:\n{s}");
        }
        assert!(s.contains(">home-assistant<"), "{s}");
        assert!(
            s.contains("198.51.100.0/24"),
            "always_allow missing for {service}:\n{s}"
        );
    }
    let nextcloud = section(&dom, "service-nextcloud");
    assert!(nextcloud.contains("203.0.113.77/32"), "{nextcloud}");
    assert!(nextcloud.contains(">nextcloud-share<"), "{nextcloud}");
    assert!(!section(&dom, "service-immich").contains("203.0.113.77/32"));
    assert!(section(&dom, "service-jellyfin").contains("192.0.2.7/32"));
    // Every source with its use against its limit and its timings.
    let ha = section(&dom, "source-home-assistant");
    assert!(ha.contains("2 / 4") && ha.contains("7d"), "{ha}");
    let share = section(&dom, "source-nextcloud-share");
    assert!(
        share.contains("1 / 20") && share.contains("12h") && share.contains("2d"),
        "{share}"
    );

    // A phone-sized screenshot for people to look at.
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).unwrap();
    let png = target.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        profile.path(),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=412,915",
        ],
        &url,
    );
    let bytes =
        std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        bytes.len() > 5 * 1024,
        "screenshot is only {} bytes: an empty page?",
        bytes.len()
    );
}
