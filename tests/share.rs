//! Share links end to end: the real binary checks links against stand-ins that behave like
//! Immich (a single-page app that answers 200 everywhere, links known only to its API) and
//! Nextcloud (404 for unknown tokens), over real sockets. A valid link grants the viewer the
//! sharing app only; hostile forwarded URIs reach nothing; guessing is throttled; an unreachable
//! upstream fails closed; a new grant is answered once the proxy can see it; the legacy endpoint
//! never contacts an unconfigured host; an acknowledged grant survives kill -9.

mod common;

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::upstream::{Answer, Mode, Request, StandIn, allow_status};
use common::*;

/// Services and sources most tests use; `@IMMICH@` and `@NEXTCLOUD@` become stand-in origins
/// (in sources appended by a test too). `timeout: 1s` keeps the fail-closed cases short.
const SHARES: &str = r#"services: { immich: {}, nextcloud: {}, jellyfin: {} }
sources:
  ha: { kind: mirror, hosts: [ha.example.com], unlocks: "*", max_ips: 10, idle_ttl: 1h }
  immich-share:
    kind: share
    upstream: @IMMICH@
    patterns:
      - path: '^/share/(?P<key>[A-Za-z0-9_-]{67})$'
        check: '/api/shared-links/me?key={key}'
      - path: '^/s/(?P<slug>[A-Za-z0-9_-]+)$'
        check: '/api/shared-links/me?slug={slug}'
    unlocks: [immich]
    max_ips: 20
    idle_ttl: 1h
    timeout: 1s
  nextcloud-share:
    kind: share
    upstream: @NEXTCLOUD@
    path: '^/s/[A-Za-z0-9]{15}$'
    unlocks: [nextcloud]
    max_ips: 20
    idle_ttl: 1h
    timeout: 1s
"#;

/// A share-link deployment: the daemon and the stand-ins around it. Fields drop in order, so
/// the daemon is killed before the stand-ins stop and the temp dir goes last.
struct World {
    daemon: Daemon,
    immich: StandIn,
    nextcloud: StandIn,
    canary: StandIn,
    setup: Setup,
}

impl World {
    /// Stand-ins knowing `key(1)`, [`SLUG`] and `token(1)`, and the daemon on [`SHARES`] with
    /// `traefik` inside the `traefik:` mapping, `top` before `services:` and `more` appended
    /// (more sources).
    fn start(traefik: &str, top: &str, more: &str) -> World {
        World::start_with(
            StandIn::immich(&[&key(1)], &[SLUG], Mode::Answer),
            StandIn::nextcloud(&[&token(1)], Mode::Answer),
            traefik,
            top,
            more,
        )
    }

    fn start_with(
        immich: StandIn,
        nextcloud: StandIn,
        traefik: &str,
        top: &str,
        more: &str,
    ) -> World {
        World::start_env(immich, nextcloud, traefik, top, more, &[])
    }

    /// As [`World::start_with`], the daemon's environment holding `env`.
    fn start_env(
        immich: StandIn,
        nextcloud: StandIn,
        traefik: &str,
        top: &str,
        more: &str,
        env: &[(&str, &str)],
    ) -> World {
        let canary = StandIn::canary();
        let body = format!("{top}{SHARES}{more}")
            .replace("@IMMICH@", &immich.origin())
            .replace("@NEXTCLOUD@", &nextcloud.origin());
        let setup = setup(traefik, &body);
        let daemon = Daemon::start(setup.dir.path(), &["--config", "gatekeeper.yaml"], env);
        World {
            daemon,
            immich,
            nextcloud,
            canary,
            setup,
        }
    }

    fn share(&self, source: &str, client: &str, uri: &str) -> Answer {
        share(self.daemon.addr, source, client, uri)
    }

    fn allowed(&self, service: &str, client: &str) -> bool {
        allow_status(self.daemon.addr, service, client) == 200
    }

    /// Networks in the state file, as `source network`.
    /// Nothing is in the state file, and every middleware lets nobody in.
    fn assert_nothing_granted(&self) {
        assert!(self.granted().is_empty(), "{:?}", self.granted());
        // The first write follows the start; under load it may come after the requests.
        let lists = self.setup.wait_lists("the Traefik file", SOON, |_| true);
        assert!(
            lists.values().all(|l| *l == strings(&[NOBODY])),
            "{lists:?}"
        );
    }

    fn granted(&self) -> Vec<String> {
        self.setup
            .state_entries()
            .into_iter()
            .map(|e| format!("{} {}", e.source, e.network))
            .collect()
    }
}

/// A temp dir whose policy has the shared preamble with `traefik` inside the `traefik:` mapping
/// (no Traefik file when it holds no `file:`), then `body`.
fn setup(traefik: &str, body: &str) -> Setup {
    let setup = Setup::new("");
    let policy = format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nstate_file: ./data/state.json\n\
         traefik: {{ {traefik} }}\n{body}"
    );
    std::fs::write(&setup.policy, policy).expect("write policy");
    setup
}

/// The Traefik file and no propagation wait: a 200 for a new grant then means "in the file".
const FILE_NO_WAIT: &str = "file: ./traefik/gatekeeper.yml, propagation_delay: 0s";

/// The forward-auth request Traefik sends to `/share/{source}` for `client` viewing `uri`.
fn share(addr: std::net::SocketAddr, source: &str, client: &str, uri: &str) -> Answer {
    Request::forward_auth(
        &format!("/share/{source}"),
        Some(client),
        Some(uri.as_bytes()),
    )
    .send(addr)
}

/// A deterministic link id of `len` characters from `alphabet`.
fn link_id(seed: u64, len: usize, alphabet: &[u8]) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            alphabet[(x % alphabet.len() as u64) as usize] as char
        })
        .collect()
}

/// An Immich share key: 67 characters of base64url.
fn key(seed: u64) -> String {
    link_id(
        seed,
        67,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    )
}

/// A Nextcloud share token: 15 letters and digits.
fn token(seed: u64) -> String {
    link_id(
        seed + 1000,
        15,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
    )
}

/// The custom slug the Immich stand-in knows.
const SLUG: &str = "summer-2024";
const NOBODY: &str = "0.0.0.0/32";

// ---------------------------------------------------------------------------------------------
// Valid and invalid links
// ---------------------------------------------------------------------------------------------

#[test]
fn immich_key_is_checked_on_the_api_and_grants_immich_only() {
    let w = World::start(FILE_NO_WAIT, "", "");
    let (good, bad) = (key(1), key(2));

    let a = w.share("immich-share", "203.0.113.20", &format!("/share/{bad}"));
    assert_eq!(a.status, 403, "unknown key: {a:?}");
    assert_eq!(
        w.immich.lines(),
        [format!("GET /api/shared-links/me?key={bad}")],
        "one check, on the API, with the key from the link"
    );
    assert!(
        !w.allowed("immich", "203.0.113.20"),
        "no grant for a bad key"
    );

    let a = w.share("immich-share", "203.0.113.10", &format!("/share/{good}"));
    assert_eq!(a.status, 200, "valid key: {a:?}");
    assert_eq!(
        w.immich.lines(),
        [
            format!("GET /api/shared-links/me?key={bad}"),
            format!("GET /api/shared-links/me?key={good}"),
        ]
    );
    assert!(w.nextcloud.hits().is_empty());

    // With propagation_delay 0s the 200 still waits for the Traefik file: read it at once.
    let lists = w.setup.lists();
    assert_eq!(lists["gatekeeper-immich"], strings(&["203.0.113.10/32"]));
    assert_eq!(lists["gatekeeper-nextcloud"], strings(&[NOBODY]));
    assert_eq!(lists["gatekeeper-jellyfin"], strings(&[NOBODY]));
    assert_eq!(w.granted(), ["immich-share 203.0.113.10/32"]);
    assert!(w.allowed("immich", "203.0.113.10"));
    assert!(!w.allowed("nextcloud", "203.0.113.10"));
    assert!(!w.allowed("jellyfin", "203.0.113.10"));

    // A viewer's burst of requests for the same link asks the upstream once (cache).
    for _ in 0..3 {
        assert_eq!(
            w.share("immich-share", "203.0.113.10", &format!("/share/{good}"))
                .status,
            200
        );
    }
    assert_eq!(w.immich.hits().len(), 2, "{:?}", w.immich.lines());
    assert_eq!(w.canary.connections(), 0);
}

#[test]
fn immich_slug_is_checked_on_the_api_by_slug() {
    let w = World::start(FILE_NO_WAIT, "", "");

    let a = w.share("immich-share", "203.0.113.21", "/s/winter-2023");
    assert_eq!(a.status, 403, "unknown slug: {a:?}");
    let a = w.share("immich-share", "203.0.113.11", &format!("/s/{SLUG}"));
    assert_eq!(a.status, 200, "known slug: {a:?}");
    assert_eq!(
        w.immich.lines(),
        [
            "GET /api/shared-links/me?slug=winter-2023".to_string(),
            format!("GET /api/shared-links/me?slug={SLUG}"),
        ]
    );
    let lists = w.setup.lists();
    assert_eq!(lists["gatekeeper-immich"], strings(&["203.0.113.11/32"]));
    assert_eq!(lists["gatekeeper-nextcloud"], strings(&[NOBODY]));
    assert_eq!(w.granted(), ["immich-share 203.0.113.11/32"]);
    assert!(w.nextcloud.hits().is_empty());
}

#[test]
fn nextcloud_token_is_checked_at_its_own_path_and_grants_nextcloud_only() {
    let w = World::start(FILE_NO_WAIT, "", "");
    let (good, bad) = (token(1), token(2));

    let a = w.share("nextcloud-share", "198.51.100.30", &format!("/s/{bad}"));
    assert_eq!(a.status, 403, "unknown token: {a:?}");
    // The default check forwards the path and the query as they are.
    let a = w.share(
        "nextcloud-share",
        "198.51.100.31",
        &format!("/s/{good}?dir=/Photos&openfile=true"),
    );
    assert_eq!(a.status, 200, "known token: {a:?}");
    assert_eq!(
        w.nextcloud.lines(),
        [
            format!("GET /s/{bad}"),
            format!("GET /s/{good}?dir=/Photos&openfile=true"),
        ]
    );
    assert!(w.immich.hits().is_empty());
    let lists = w.setup.lists();
    assert_eq!(
        lists["gatekeeper-nextcloud"],
        strings(&["198.51.100.31/32"])
    );
    assert_eq!(lists["gatekeeper-immich"], strings(&[NOBODY]));
    assert_eq!(w.granted(), ["nextcloud-share 198.51.100.31/32"]);
    assert!(w.allowed("nextcloud", "198.51.100.31"));
    assert!(!w.allowed("immich", "198.51.100.31"));
    assert!(!w.allowed("nextcloud", "198.51.100.30"));

    // A LAN viewer (the proxy's peer address, no X-Forwarded-For) may view a valid link, but an
    // address inside trusted_proxies is never granted.
    let a = Request::forward_auth(
        "/share/nextcloud-share",
        None,
        Some(format!("/s/{good}").as_bytes()),
    )
    .send(w.daemon.addr);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(w.granted(), ["nextcloud-share 198.51.100.31/32"]);
}

#[test]
fn method_head_checks_with_head() {
    let more = "  nextcloud-head:
    kind: share
    upstream: @NEXTCLOUD@
    path: '^/s/[A-Za-z0-9]{15}$'
    method: HEAD
    unlocks: [nextcloud]
    timeout: 1s
";
    let w = World::start(FILE_NO_WAIT, "", more);
    let (good, bad) = (token(1), token(3));
    assert_eq!(
        w.share("nextcloud-head", "198.51.100.40", &format!("/s/{bad}"))
            .status,
        403
    );
    assert_eq!(
        w.share("nextcloud-head", "198.51.100.41", &format!("/s/{good}"))
            .status,
        200
    );
    assert_eq!(
        w.nextcloud.lines(),
        [format!("HEAD /s/{bad}"), format!("HEAD /s/{good}")]
    );
    assert_eq!(w.granted(), ["nextcloud-head 198.51.100.41/32"]);
}

/// Why check templates exist: Immich's web app answers 200 to any path, so a source that only
/// has `path` (and so checks the forwarded path itself) takes every well-formed key as valid.
#[test]
fn plain_path_on_immich_accepts_an_unknown_key_and_the_template_form_refuses_it() {
    let more = "  immich-naive:
    kind: share
    upstream: @IMMICH@
    path: '^/share/[A-Za-z0-9_-]{67}$'
    unlocks: [immich]
    timeout: 1s
";
    let w = World::start(FILE_NO_WAIT, "", more);
    let unknown = key(77);

    let a = w.share("immich-naive", "203.0.113.60", &format!("/share/{unknown}"));
    assert_eq!(
        a.status, 200,
        "the danger: the web app's 200 makes any key look valid"
    );
    assert_eq!(w.immich.lines(), [format!("GET /share/{unknown}")]);
    assert!(
        w.allowed("immich", "203.0.113.60"),
        "and the guesser is granted"
    );

    let a = w.share("immich-share", "203.0.113.61", &format!("/share/{unknown}"));
    assert_eq!(
        a.status, 403,
        "the template asks the API, which knows: {a:?}"
    );
    assert_eq!(
        w.immich.lines()[1..],
        [format!("GET /api/shared-links/me?key={unknown}")]
    );
    assert!(!w.allowed("immich", "203.0.113.61"));
    assert_eq!(w.granted(), ["immich-naive 203.0.113.60/32"]);
}

/// `/share/{source}` judges the forwarded URI, not the client: anything deeper than a link (the
/// share page's own API calls, a reloaded `/share/<key>/photos/<id>`) is refused and counts as a
/// failed check even for a viewer already granted. So only the links themselves may be routed to
/// it (deploy/caddy/README.md); the page's further requests must pass through `/allow`.
#[test]
fn deeper_paths_are_refused_even_for_a_granted_viewer_and_count_as_failures() {
    let w = World::start(FILE_NO_WAIT, "", "");
    let k = key(1);
    let a = w.share("immich-share", "203.0.113.25", &format!("/share/{k}"));
    assert_eq!(a.status, 200, "{a:?}");
    for uri in [
        format!("/api/shared-links/me?key={k}"),
        format!("/share/{k}/photos/0f6a3c1e-8a52-4d0e-9d6c-2b8c8f1f6b11"),
        format!("/api/albums/0f6a3c1e-8a52-4d0e-9d6c-2b8c8f1f6b11?key={k}"),
        format!("/api/shared-links/me?key={k}"),
        format!("/api/server/config?key={k}"),
    ] {
        let a = w.share("immich-share", "203.0.113.25", &uri);
        assert_eq!(a.status, 403, "{uri}: {a:?}");
    }
    let a = w.share("immich-share", "203.0.113.25", &format!("/share/{k}"));
    assert_eq!(a.status, 429, "five refused URIs ban the viewer: {a:?}");
    assert_eq!(w.immich.hits().len(), 1, "{:?}", w.immich.lines());
    assert!(
        w.allowed("immich", "203.0.113.25"),
        "a ban does not revoke the grant"
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile forwarded URIs
// ---------------------------------------------------------------------------------------------

/// A source whose pattern takes anything after `/s/`: what the structural checks refuse is then
/// refused by them, not by the pattern.
const LAX: &str = "  nextcloud-lax:
    kind: share
    upstream: @NEXTCLOUD@
    path: '^/s/.+$'
    unlocks: [nextcloud]
    timeout: 1s
";

#[test]
fn hostile_forwarded_uris_get_403_and_reach_neither_the_canary_nor_the_upstream() {
    // An upstream that redirects to a second canary: redirects are never followed.
    let redirect_target = StandIn::canary();
    let redirect = StandIn::redirect(format!("{}/s/{}", redirect_target.origin(), token(1)));
    let more = format!(
        "{LAX}  redirect-share:
    kind: share
    upstream: {}
    path: '^/s/[A-Za-z0-9]{{15}}$'
    unlocks: [nextcloud]
    timeout: 1s
",
        redirect.origin()
    );
    let w = World::start(FILE_NO_WAIT, "", &more);
    let c = w.canary.addr;
    let (tok, k) = (token(1), key(1));
    let bytes = |s: String| Some(s.into_bytes());
    // Not a plain path: refused by every source, even one whose pattern would take it. Known link
    // ids make a wrongly accepted URI a 200.
    let not_paths: Vec<(&str, Option<Vec<u8>>)> = vec![
        (
            "scheme-relative URI to the canary",
            bytes(format!("//{c}/s/{tok}")),
        ),
        (
            "absolute URI of the canary",
            bytes(format!("http://{c}/s/{tok}")),
        ),
        (
            "absolute URI of the canary, Immich shape",
            bytes(format!("http://{c}/share/{k}")),
        ),
        ("userinfo-style @host", bytes(format!("@{c}/s/{tok}"))),
        ("the canary's host:port alone", bytes(c.to_string())),
        ("dot-dot traversal", bytes("/s/../../api/admin".into())),
        (
            "traversal after a valid token",
            bytes(format!("/s/{tok}/../../share/{k}")),
        ),
        ("dot segment", bytes(format!("/s/./{tok}"))),
        ("encoded slash", bytes("/s/AbCdEfG%2FhIjKlMn".into())),
        ("encoded dots", bytes("/s/%2e%2e/%2E%2E/admin".into())),
        ("encoded NUL", bytes("/s/AbCdEfGhIjKl%00".into())),
        (
            "double-encoded slash",
            bytes("/s/AbCdEfG%252FhIjKlM".into()),
        ),
        (
            "backslashes to the canary",
            bytes(format!("\\\\{c}\\s\\{tok}")),
        ),
        (
            "backslash after a token",
            bytes(format!("/s/{tok}\\..\\admin")),
        ),
        ("empty header", Some(Vec::new())),
        ("no header", None),
        ("10 kB", bytes(format!("/s/{}", "A".repeat(10 * 1024)))),
        (
            "fragment on a valid token",
            bytes(format!("/s/{tok}?x=1#frag")),
        ),
        (
            "space inside a token",
            bytes(format!("/s/{} {}", &tok[..7], &tok[8..])),
        ),
        ("tab inside a token", bytes("/s/AbCdEfG\thIjKlMn".into())),
        ("non-UTF-8 bytes", Some(b"/s/AbCdEfGhIjKlM\xff".to_vec())),
    ];
    // Plain paths that the real patterns do not take.
    let no_match: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("host after a valid token", bytes(format!("/s/{tok}@{c}"))),
        ("a path no pattern has", bytes("/api/admin/users".into())),
        (
            "a valid token under another prefix",
            bytes(format!("/evil/s/{tok}")),
        ),
        (
            "a valid token with a suffix",
            bytes(format!("/s/{tok}/download")),
        ),
    ];
    let cases = not_paths
        .iter()
        .map(|c| {
            (
                c,
                ["nextcloud-share", "immich-share", "nextcloud-lax"].as_slice(),
            )
        })
        .chain(
            no_match
                .iter()
                .map(|c| (c, ["nextcloud-share", "immich-share"].as_slice())),
        );
    let mut failures = Vec::new();
    for (i, ((name, uri), sources)) in cases.enumerate() {
        for source in sources {
            // A client per case: refused URIs count as failed checks, and this is not about bans.
            let client = format!("203.0.113.{}", 100 + i);
            let a =
                Request::forward_auth(&format!("/share/{source}"), Some(&client), uri.as_deref())
                    .send(w.daemon.addr);
            if a.status != 403 {
                failures.push(format!("{source} {name}: {} {}", a.status, a.body.trim()));
            }
        }
    }
    assert!(failures.is_empty(), "not 403:\n{}", failures.join("\n"));
    assert_eq!(w.canary.connections(), 0, "the canary was contacted");
    assert_eq!(
        w.nextcloud.lines(),
        Vec::<String>::new(),
        "refused URIs were sent upstream"
    );
    assert_eq!(w.immich.lines(), Vec::<String>::new());

    // Plain paths with hostile extras go to the configured upstream, as a path: the forwarded
    // host and the Host header do not matter, a URL in the query or path is only data.
    let unknown = token(5);
    let cases = [
        Request::forward_auth(
            "/share/nextcloud-share",
            Some("203.0.113.200"),
            Some(format!("/s/{unknown}").as_bytes()),
        )
        .replace("X-Forwarded-Host", c.to_string())
        .replace("X-Forwarded-Proto", "gopher")
        .replace("Host", c.to_string()),
        Request::forward_auth(
            "/share/nextcloud-share",
            Some("203.0.113.201"),
            Some(format!("/s/{unknown}?next=http://{c}/&host={c}").as_bytes()),
        ),
        Request::forward_auth(
            "/share/nextcloud-lax",
            Some("203.0.113.202"),
            Some(format!("/s/{tok}@{c}").as_bytes()),
        ),
    ];
    for request in &cases {
        let a = request.send(w.daemon.addr);
        assert_eq!(a.status, 403, "{request:?}: {a:?}");
    }
    assert_eq!(
        w.nextcloud.lines(),
        [
            format!("GET /s/{unknown}"),
            format!("GET /s/{unknown}?next=http://{c}/&host={c}"),
            format!("GET /s/{tok}@{c}"),
        ]
    );
    assert_eq!(w.canary.connections(), 0, "the canary was contacted");

    let a = w.share("redirect-share", "203.0.113.203", &format!("/s/{tok}"));
    assert_eq!(a.status, 403, "a redirect is not a valid link: {a:?}");
    assert_eq!(redirect.lines(), [format!("GET /s/{tok}")]);
    assert_eq!(
        redirect_target.connections(),
        0,
        "the redirect was followed"
    );

    w.assert_nothing_granted();
}

// ---------------------------------------------------------------------------------------------
// Guessing
// ---------------------------------------------------------------------------------------------

#[test]
fn forty_guesses_in_a_row_reach_the_upstream_max_failures_times_then_429() {
    let w = World::start(FILE_NO_WAIT, "", "");
    let guesses: Vec<String> = (100..140).map(token).collect();
    let statuses: Vec<u16> = guesses
        .iter()
        .map(|g| {
            w.share("nextcloud-share", "203.0.113.66", &format!("/s/{g}"))
                .status
        })
        .collect();
    let mut want = vec![403; 5];
    want.extend([429; 35]);
    assert_eq!(statuses, want, "default max_failures is 5");
    assert_eq!(
        w.nextcloud.lines(),
        guesses[..5]
            .iter()
            .map(|g| format!("GET /s/{g}"))
            .collect::<Vec<_>>(),
        "only the first 5 guesses reach Nextcloud"
    );

    // Banned means banned: even a valid link is refused without asking.
    let a = w.share(
        "nextcloud-share",
        "203.0.113.66",
        &format!("/s/{}", token(1)),
    );
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(w.nextcloud.hits().len(), 5);
    // The ban is per client and per source.
    let a = w.share(
        "nextcloud-share",
        "203.0.113.67",
        &format!("/s/{}", token(6)),
    );
    assert_eq!(a.status, 403, "another client is not banned: {a:?}");
    let a = w.share(
        "nextcloud-share",
        "203.0.113.67",
        &format!("/s/{}", token(1)),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let a = w.share(
        "immich-share",
        "203.0.113.66",
        &format!("/share/{}", key(1)),
    );
    assert_eq!(a.status, 200, "the ban is for nextcloud-share only: {a:?}");
    assert_eq!(
        w.granted(),
        [
            "immich-share 203.0.113.66/32",
            "nextcloud-share 203.0.113.67/32"
        ]
    );
}

#[test]
fn forty_concurrent_guesses_reach_the_upstream_at_most_max_failures_times() {
    // A slow Nextcloud keeps the first guesses in flight while the others arrive.
    let w = World::start_with(
        StandIn::immich(&[], &[], Mode::Answer),
        StandIn::nextcloud(&[&token(1)], Mode::Late(Duration::from_millis(300))),
        FILE_NO_WAIT,
        "",
        "",
    );
    let guesses: Vec<String> = (200..240).map(token).collect();
    let barrier = Barrier::new(guesses.len());
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let threads: Vec<_> = guesses
            .iter()
            .map(|g| {
                let barrier = &barrier;
                let addr = w.daemon.addr;
                s.spawn(move || {
                    barrier.wait();
                    share(
                        addr,
                        "nextcloud-share",
                        "2001:db8:77::1",
                        &format!("/s/{g}"),
                    )
                    .status
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let refused = statuses.iter().filter(|s| **s == 403).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(refused + throttled, 40, "only 403 and 429: {statuses:?}");
    let hits = w.nextcloud.hits();
    assert!(
        (1..=5).contains(&hits.len()),
        "{} of 40 concurrent guesses reached Nextcloud: {:?}",
        hits.len(),
        w.nextcloud.lines()
    );
    assert_eq!(refused, hits.len(), "every 403 is one upstream answer");

    // The same /64 is the same client; another client is unaffected.
    let a = share(
        w.daemon.addr,
        "nextcloud-share",
        "2001:db8:77::ffff",
        &format!("/s/{}", token(1)),
    );
    assert_eq!(a.status, 429, "{a:?}");
    let a = share(
        w.daemon.addr,
        "nextcloud-share",
        "2001:db8:78::1",
        &format!("/s/{}", token(1)),
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(w.granted(), ["nextcloud-share 2001:db8:78::/64"]);
}

#[test]
fn a_ban_ends_after_ban_and_max_failures_is_the_policys() {
    let more = "  strict-share:
    kind: share
    upstream: @NEXTCLOUD@
    path: '^/s/[A-Za-z0-9]{15}$'
    unlocks: [nextcloud]
    timeout: 1s
    max_failures: 2
    ban: 1s
";
    let w = World::start(FILE_NO_WAIT, "", more);
    let valid = format!("/s/{}", token(1));
    for guess in [token(300), token(301)] {
        let a = w.share("strict-share", "203.0.113.70", &format!("/s/{guess}"));
        assert_eq!(a.status, 403, "{a:?}");
    }
    let banned = Instant::now();
    let a = w.share("strict-share", "203.0.113.70", &valid);
    assert_eq!(
        a.status, 429,
        "max_failures: 2 bans at the second failure: {a:?}"
    );
    assert_eq!(w.nextcloud.hits().len(), 2);

    wait_for("the 1 s ban to end", SOON, || {
        match w.share("strict-share", "203.0.113.70", &valid).status {
            200 => Ok(()),
            other => Err(format!("still {other}")),
        }
    });
    let lasted = banned.elapsed();
    assert!(
        lasted >= Duration::from_millis(900),
        "the ban lasted {lasted:?}, ban is 1s"
    );
    assert_eq!(
        w.nextcloud.hits().len(),
        3,
        "nothing was asked during the ban: {:?}",
        w.nextcloud.lines()
    );
    assert_eq!(w.granted(), ["strict-share 203.0.113.70/32"]);
}

#[test]
fn checks_in_flight_per_source_are_bounded_by_max_concurrent_checks() {
    let tokens: Vec<String> = (400..406).map(token).collect();
    let known: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let w = World::start_with(
        StandIn::immich(&[], &[], Mode::Answer),
        StandIn::nextcloud(&known, Mode::Late(Duration::from_millis(200))),
        FILE_NO_WAIT,
        "",
        "  bounded-share:
    kind: share
    upstream: @NEXTCLOUD@
    path: '^/s/[A-Za-z0-9]{15}$'
    unlocks: [nextcloud]
    timeout: 2s
    max_concurrent_checks: 2
",
    );
    let barrier = Barrier::new(tokens.len());
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let threads: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let barrier = &barrier;
                let addr = w.daemon.addr;
                s.spawn(move || {
                    barrier.wait();
                    let client = format!("198.51.100.{}", 150 + i);
                    share(addr, "bounded-share", &client, &format!("/s/{t}")).status
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(statuses, [200; 6], "queued checks still complete");
    assert_eq!(w.nextcloud.hits().len(), 6);
    assert_eq!(
        w.nextcloud.max_in_flight(),
        2,
        "checks running at once on the upstream (max_concurrent_checks: 2)"
    );
    assert_eq!(w.granted().len(), 6, "{:?}", w.granted());
}

// ---------------------------------------------------------------------------------------------
// Failing closed
// ---------------------------------------------------------------------------------------------

#[test]
fn dead_or_resetting_upstream_is_503_and_grants_nothing() {
    let reset = StandIn::nextcloud(&[&token(1)], Mode::Reset);
    // An hour's timeout: a 503 within the request's own deadline (SOON, a liveness bound) can
    // only come from the refused connection or the reset, never from waiting out the timeout.
    let more = format!(
        "  dead-share:
    kind: share
    upstream: http://127.0.0.1:{}
    path: '^/s/[A-Za-z0-9]{{15}}$'
    unlocks: [nextcloud]
    timeout: 1h
  reset-share:
    kind: share
    upstream: {}
    path: '^/s/[A-Za-z0-9]{{15}}$'
    unlocks: [nextcloud]
    timeout: 1h
",
        free_port(),
        reset.origin()
    );
    let w = World::start(FILE_NO_WAIT, "", &more);
    let link = format!("/s/{}", token(1));

    // More attempts than max_failures: an outage is not the client's fault, so no 429.
    for i in 0..7 {
        let a = w.share("dead-share", "203.0.113.80", &link);
        assert_eq!(a.status, 503, "attempt {i}: {a:?}");
    }
    let a = w.share("reset-share", "203.0.113.81", &link);
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(
        reset.lines().first().map(String::as_str),
        Some(&*format!("GET {link}")),
        "the reset stand-in was asked"
    );

    assert!(!w.allowed("nextcloud", "203.0.113.80"));
    assert!(!w.allowed("nextcloud", "203.0.113.81"));
    assert!(w.granted().is_empty(), "{:?}", w.granted());
    assert_eq!(w.setup.lists()["gatekeeper-nextcloud"], strings(&[NOBODY]));
}

#[test]
fn slow_or_silent_upstream_is_503_once_the_timeout_passes() {
    // The slow stand-in answers long after the timeout and after the request's own deadline.
    let slow = StandIn::nextcloud(&[&token(1)], Mode::Late(PATIENCE));
    let silent = StandIn::nextcloud(&[&token(1)], Mode::Silent);
    let more = format!(
        "  slow-share:
    kind: share
    upstream: {}
    path: '^/s/[A-Za-z0-9]{{15}}$'
    unlocks: [nextcloud]
    timeout: 1s
  silent-share:
    kind: share
    upstream: {}
    path: '^/s/[A-Za-z0-9]{{15}}$'
    unlocks: [nextcloud]
    timeout: 1s
",
        slow.origin(),
        silent.origin()
    );
    let w = World::start(FILE_NO_WAIT, "", &more);
    let link = format!("/s/{}", token(1));
    for (source, client, stand_in) in [
        ("slow-share", "203.0.113.82", &slow),
        ("silent-share", "203.0.113.83", &silent),
    ] {
        let started = Instant::now();
        let a = w.share(source, client, &link);
        let took = started.elapsed();
        assert_eq!(a.status, 503, "{source}: {a:?}");
        // Cut off by the timeout: not before it (a lower bound), and while the upstream was
        // still working on the check (an order, not a speed).
        assert!(
            took >= Duration::from_millis(900),
            "{source}: answered after {took:?}, before the 1s timeout"
        );
        assert_eq!(
            stand_in.in_flight(),
            1,
            "{source}: the check was still unanswered upstream"
        );
        assert_eq!(stand_in.lines(), [format!("GET {link}")], "{source}");
        assert!(!w.allowed("nextcloud", client), "{source}");
    }
    assert!(w.granted().is_empty(), "{:?}", w.granted());
}

#[test]
fn untrusted_peer_gets_403_and_the_upstream_is_never_asked() {
    let w = World::start(FILE_NO_WAIT, "trusted_proxies: [10.99.0.0/16]\n", "");
    let nc = w.nextcloud.addr;
    for (name, request) in [
        (
            "immich key",
            Request::forward_auth(
                "/share/immich-share",
                Some("203.0.113.90"),
                Some(format!("/share/{}", key(1)).as_bytes()),
            ),
        ),
        (
            "nextcloud token",
            Request::forward_auth(
                "/share/nextcloud-share",
                Some("203.0.113.90"),
                Some(format!("/s/{}", token(1)).as_bytes()),
            ),
        ),
        (
            "nextcloud token, no X-Forwarded-For",
            Request::forward_auth(
                "/share/nextcloud-share",
                None,
                Some(format!("/s/{}", token(1)).as_bytes()),
            ),
        ),
        (
            "legacy endpoint",
            Request::forward_auth(
                &format!("/verify_share_request?protocol=http&container_name_port={nc}"),
                Some("203.0.113.90"),
                Some(format!("/s/{}", token(1)).as_bytes()),
            ),
        ),
    ] {
        let a = request.send(w.daemon.addr);
        assert_eq!(a.status, 403, "{name}: {a:?}");
    }
    assert!(w.immich.hits().is_empty(), "{:?}", w.immich.lines());
    assert!(w.nextcloud.hits().is_empty(), "{:?}", w.nextcloud.lines());
    w.assert_nothing_granted();
}

// ---------------------------------------------------------------------------------------------
// Propagation: a new grant is answered once the proxy can see it
// ---------------------------------------------------------------------------------------------

#[test]
fn new_grant_waits_propagation_delay_and_a_known_client_does_not() {
    // The share module logs (at debug) each wait for the proxy: a known client must cause none.
    let w = World::start_env(
        StandIn::immich(&[&key(1)], &[SLUG], Mode::Answer),
        StandIn::nextcloud(&[&token(1)], Mode::Answer),
        "file: ./traefik/gatekeeper.yml, propagation_delay: 800ms",
        "",
        "",
        &[("RUST_LOG", "info,gatekeeper::sources::share=debug")],
    );
    let addr = w.daemon.addr;
    let link = format!("/share/{}", key(1));

    // While the 200 waits for Traefik, /allow (nginx, Caddy) already admits the viewer.
    let answered = AtomicBool::new(false);
    let (took, allowed_first) = std::thread::scope(|s| {
        let poller = s.spawn(|| {
            while !answered.load(Ordering::SeqCst) {
                if allow_status(addr, "immich", "203.0.113.120") == 200 {
                    return Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        });
        let started = Instant::now();
        let a = share(addr, "immich-share", "203.0.113.120", &link);
        let done = Instant::now();
        answered.store(true, Ordering::SeqCst);
        assert_eq!(a.status, 200, "{a:?}");
        let allowed = poller.join().unwrap();
        (done - started, allowed.map(|t| t < done))
    });
    assert!(
        took >= Duration::from_millis(800),
        "a new grant answered after {took:?}, before propagation_delay"
    );
    assert_eq!(
        allowed_first,
        Some(true),
        "/allow admitted the viewer before the share answer came"
    );
    assert_eq!(
        w.setup.lists()["gatekeeper-immich"],
        strings(&["203.0.113.120/32"])
    );

    // Already allowed: answered without waiting for the proxy, for the cached link (which
    // is not checked upstream again) and for another valid one.
    assert_eq!(
        share(addr, "immich-share", "203.0.113.120", &link).status,
        200
    );
    let a = share(addr, "immich-share", "203.0.113.120", &format!("/s/{SLUG}"));
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(w.immich.hits().len(), 2, "{:?}", w.immich.lines());
    // A new client after them waits again; once its wait is in the log, so is any wait of the
    // known client's (the log keeps their order): there was only the first one. An order, not
    // a speed.
    assert_eq!(
        share(addr, "immich-share", "203.0.113.121", &link).status,
        200
    );
    let log = wait_for("the new client's wait in the log", SOON, || {
        let log = w.daemon.log();
        log.contains(&format!("{WAITING} network=203.0.113.121/32"))
            .then(|| log.clone())
            .ok_or(log)
    });
    let waits: Vec<&str> = log.lines().filter(|l| l.contains(WAITING)).collect();
    assert_eq!(waits.len(), 2, "{waits:#?}");
    assert!(waits[0].contains("network=203.0.113.120/32"), "{waits:#?}");
}

/// What the share module logs (at debug) when a grant waits for the proxy to apply it.
const WAITING: &str = "waiting until Traefik applies the grant";

#[test]
fn with_traefik_api_a_new_grant_is_answered_once_the_api_shows_it() {
    let lag = Duration::from_millis(400);
    let setup = Setup::new("");
    // The API stand-in reads the Traefik file the daemon will write, so it comes first.
    let api = StandIn::traefik_api(setup.traefik.clone(), lag);
    let immich = StandIn::immich(&[&key(1)], &[SLUG], Mode::Answer);
    let nextcloud = StandIn::nextcloud(&[&token(1)], Mode::Answer);
    let body = SHARES
        .replace("@IMMICH@", &immich.origin())
        .replace("@NEXTCLOUD@", &nextcloud.origin());
    let policy = format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nstate_file: ./data/state.json\n\
         traefik: {{ file: ./traefik/gatekeeper.yml, propagation_delay: 5s, api: {} }}\n{body}",
        api.origin()
    );
    std::fs::write(&setup.policy, policy).unwrap();
    let daemon = setup.start();

    let started = Instant::now();
    let a = share(
        daemon.addr,
        "immich-share",
        "203.0.113.130",
        &format!("/share/{}", key(1)),
    );
    let took = started.elapsed();
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        took >= lag,
        "answered after {took:?}, before the API could show the grant"
    );
    // Answered once the API showed the grant, not after propagation_delay: the last of the
    // API's answers so far (all to the daemon) is the one that showed the viewer.
    let replies = api.replies();
    assert!(
        replies.last().is_some_and(
            |(_, status, body)| *status == 200 && body.contains("\"203.0.113.130/32\"")
        ),
        "the API was not used, or not until it showed the grant: {replies:?}"
    );
    let asked = api.lines();
    assert!(
        asked.contains(&"GET /api/http/middlewares/gatekeeper-immich@file".to_string()),
        "{asked:?}"
    );
    assert!(
        asked
            .iter()
            .all(|l| l == "GET /api/http/middlewares/gatekeeper-immich@file"),
        "only the newly granted service's middleware: {asked:?}"
    );
    // What the API shows now has the viewer.
    let shown = Request::new("GET", "/api/http/middlewares/gatekeeper-immich@file").send(api.addr);
    assert_eq!(shown.status, 200, "{shown:?}");
    let shown: serde_json::Value = serde_json::from_str(&shown.body).unwrap();
    assert_eq!(
        shown["ipAllowList"]["sourceRange"],
        serde_json::json!(["203.0.113.130/32"])
    );

    // A known client does not wait for, or ask, the API.
    let before = api.hits().len();
    let a = share(
        daemon.addr,
        "immich-share",
        "203.0.113.130",
        &format!("/s/{SLUG}"),
    );
    assert_eq!(a.status, 200, "{a:?}");
    // Waiting for the API means asking it: it was not asked.
    assert_eq!(api.hits().len(), before, "{:?}", api.lines());
    drop(daemon);
}

// ---------------------------------------------------------------------------------------------
// The legacy endpoint
// ---------------------------------------------------------------------------------------------

fn legacy(addr: std::net::SocketAddr, query: &str, client: &str, uri: &str) -> Answer {
    Request::forward_auth(
        &format!("/verify_share_request{query}"),
        Some(client),
        Some(uri.as_bytes()),
    )
    .send(addr)
}

#[test]
fn legacy_verify_share_request_for_a_configured_upstream_is_that_share_source() {
    let w = World::start(FILE_NO_WAIT, "", "");
    let q = format!("?protocol=http&container_name_port={}", w.nextcloud.addr);
    let (good, bad) = (token(1), token(8));

    let a = legacy(w.daemon.addr, &q, "198.51.100.50", &format!("/s/{bad}"));
    assert_eq!(a.status, 403, "{a:?}");
    let a = legacy(w.daemon.addr, &q, "198.51.100.51", &format!("/s/{good}"));
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        w.nextcloud.lines(),
        [format!("GET /s/{bad}"), format!("GET /s/{good}")]
    );
    // Still the source's pattern: the old app forwarded anything.
    let a = legacy(w.daemon.addr, &q, "198.51.100.52", "/index.php/apps/files");
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(w.nextcloud.hits().len(), 2);

    let lists = w.setup.lists();
    assert_eq!(
        lists["gatekeeper-nextcloud"],
        strings(&["198.51.100.51/32"])
    );
    assert_eq!(lists["gatekeeper-immich"], strings(&[NOBODY]));
    assert_eq!(w.granted(), ["nextcloud-share 198.51.100.51/32"]);
    assert!(w.immich.hits().is_empty());
}

#[test]
fn legacy_verify_share_request_for_any_other_upstream_is_400_and_contacts_nothing() {
    let w = World::start(FILE_NO_WAIT, "", "");
    let (c, nc) = (w.canary.addr, w.nextcloud.addr);
    let link = format!("/s/{}", token(1));
    for (target, shown) in [
        (c.to_string(), format!("http://{c}")),
        // The same socket under another name is still not the configured origin.
        (
            format!("localhost:{}", nc.port()),
            format!("http://localhost:{}", nc.port()),
        ),
        (format!("{nc}@{c}"), format!("http://{nc}@{c}")),
        (format!("{c}/s/x"), format!("http://{c}/s/x")),
    ] {
        let a = legacy(
            w.daemon.addr,
            &format!("?protocol=http&container_name_port={target}"),
            "198.51.100.60",
            &link,
        );
        assert_eq!(a.status, 400, "{target}: {a:?}");
        for needle in ["sources.", "kind: share", "upstream", &shown] {
            assert!(
                a.body.contains(needle),
                "{target}: the body does not name {needle:?}: {}",
                a.body
            );
        }
    }
    for query in [
        format!("?protocol=https&container_name_port={nc}"),
        format!("?protocol=gopher&container_name_port={nc}"),
    ] {
        let a = legacy(w.daemon.addr, &query, "198.51.100.60", &link);
        assert_eq!(a.status, 400, "{query}: {a:?}");
    }
    assert_eq!(w.canary.connections(), 0, "the canary was contacted");
    assert!(w.nextcloud.hits().is_empty(), "{:?}", w.nextcloud.lines());
    assert!(w.immich.hits().is_empty(), "{:?}", w.immich.lines());
    assert!(w.granted().is_empty());
}

#[test]
fn legacy_verify_share_request_without_its_parameters_is_400() {
    let w = World::start(FILE_NO_WAIT, "", "");
    let nc = w.nextcloud.addr;
    let link = format!("/s/{}", token(1));
    for query in [
        String::new(),
        "?protocol=http".to_string(),
        format!("?container_name_port={nc}"),
        format!("?protocol=http&container_name={nc}"),
    ] {
        let a = legacy(w.daemon.addr, &query, "198.51.100.61", &link);
        assert_eq!(a.status, 400, "{query:?}: {a:?}");
        assert!(a.body.contains("container_name_port"), "{query:?}: {a:?}");
    }
    assert!(w.nextcloud.hits().is_empty(), "{:?}", w.nextcloud.lines());
    assert!(w.granted().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Unknown sources, durability
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_share_source_is_404_naming_it() {
    let w = World::start(FILE_NO_WAIT, "", "");
    for source in ["unknown-source", "ha"] {
        let a = w.share(source, "203.0.113.140", &format!("/s/{}", token(1)));
        assert_eq!(a.status, 404, "{source}: {a:?}");
        assert!(
            a.body.contains(&format!("`{source}`")),
            "{source}: {}",
            a.body
        );
    }
    assert!(w.nextcloud.hits().is_empty());
    assert!(w.immich.hits().is_empty());
}

#[test]
fn grant_acknowledged_by_share_survives_kill_9() {
    // No Traefik file at first: the 200 then waits for nothing but the state file.
    let immich = StandIn::immich(&[&key(1)], &[], Mode::Answer);
    let nextcloud = StandIn::nextcloud(&[], Mode::Answer);
    let body = SHARES
        .replace("@IMMICH@", &immich.origin())
        .replace("@NEXTCLOUD@", &nextcloud.origin());
    let setup = setup("propagation_delay: 0s", &body);
    let mut daemon = setup.start();
    let a = share(
        daemon.addr,
        "immich-share",
        "203.0.113.150",
        &format!("/share/{}", key(1)),
    );
    assert_eq!(a.status, 200, "{a:?}");
    daemon.kill9();
    assert_eq!(
        state_networks(&setup.state).unwrap(),
        std::collections::BTreeSet::from(["203.0.113.150/32".to_string()]),
        "the 200 came before the state file held the grant"
    );
    assert!(!setup.traefik.exists());

    // Restart with the Traefik file: the grant comes back from the state file alone.
    std::fs::write(
        &setup.policy,
        std::fs::read_to_string(&setup.policy).unwrap().replace(
            "traefik: { propagation_delay: 0s }",
            &format!("traefik: {{ {FILE_NO_WAIT} }}"),
        ),
    )
    .unwrap();
    let daemon = setup.start();
    let want = strings(&["203.0.113.150/32"]);
    setup.wait_lists("the restored grant", SOON, |l| {
        l["gatekeeper-immich"] == want
    });
    assert_eq!(allow_status(daemon.addr, "immich", "203.0.113.150"), 200);
    assert_eq!(allow_status(daemon.addr, "nextcloud", "203.0.113.150"), 403);
    // Still a known client for the restored entry's source: no new grant, no wait.
    let a = share(
        daemon.addr,
        "immich-share",
        "203.0.113.150",
        &format!("/share/{}", key(1)),
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(immich.hits().len(), 2);
}

#[test]
fn share_answers_without_a_200_while_the_state_file_cannot_be_written() {
    let w = World::start(FILE_NO_WAIT, "", "");
    wait_for("the first state file", SOON, || read_state(&w.setup.state));
    // A directory where the state file should be: every write of it fails from now on.
    std::fs::remove_file(&w.setup.state).unwrap();
    std::fs::create_dir(&w.setup.state).unwrap();

    let link = format!("/share/{}", key(1));
    let started = Instant::now();
    let answer = Request::forward_auth(
        "/share/immich-share",
        Some("203.0.113.160"),
        Some(link.as_bytes()),
    )
    // PATIENCE: a liveness bound, only a /share that never answers misses it.
    .send_within(w.daemon.addr, PATIENCE);
    let took = started.elapsed();
    // The state write failed (the daemon says so).
    w.daemon.wait_log("cannot write outputs");
    match answer {
        // Not acknowledged, since it would not survive kill -9; but answered (fail closed).
        Ok(a) => assert_ne!(a.status, 200, "{a:?}"),
        Err(e) => panic!(
            "no answer within {took:?} while the state file cannot be written ({e}): /share waits \
             for the state file without a deadline"
        ),
    }

    // Writable again: the same link is granted and acknowledged.
    std::fs::remove_dir(&w.setup.state).unwrap();
    let a = w.share("immich-share", "203.0.113.160", &link);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(w.granted(), ["immich-share 203.0.113.160/32"]);
}

/// Guard against a stand-in silently answering the wrong thing: the Immich stand-in's SPA
/// fallback and API behave as the tests above assume.
#[test]
fn stand_ins_behave_like_the_real_apps() {
    let immich = StandIn::immich(&[&key(1)], &[SLUG], Mode::Answer);
    let nextcloud = StandIn::nextcloud(&[&token(1)], Mode::Answer);
    let get = |s: &StandIn, target: &str| Request::new("GET", target).send(s.addr).status;
    assert_eq!(
        get(&immich, &format!("/api/shared-links/me?key={}", key(1))),
        200
    );
    assert_eq!(
        get(&immich, &format!("/api/shared-links/me?key={}", key(2))),
        401
    );
    assert_eq!(
        get(&immich, &format!("/api/shared-links/me?slug={SLUG}")),
        200
    );
    assert_eq!(get(&immich, "/api/shared-links/me?slug=nope"), 401);
    assert_eq!(get(&immich, &format!("/share/{}", key(2))), 200, "the SPA");
    assert_eq!(get(&immich, "/anything/at/all"), 200, "the SPA");
    assert_eq!(get(&nextcloud, &format!("/s/{}", token(1))), 200);
    assert_eq!(get(&nextcloud, &format!("/s/{}?dir=/", token(1))), 200);
    assert_eq!(get(&nextcloud, &format!("/s/{}", token(2))), 404);
    let head = Request::new("HEAD", &format!("/s/{}", token(1))).send(nextcloud.addr);
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert_eq!(
        immich.lines()[0],
        format!("GET /api/shared-links/me?key={}", key(1))
    );
    assert_eq!(key(1).len(), 67);
    assert_eq!(token(1).len(), 15);
    assert_ne!(token(1), token(2));
}
