//! Grants survive the daemon: kill -9 right after a grant was acknowledged, SIGTERM, a clean
//! restart; and a state file that cannot be read stops the start without being touched.

mod common;

use std::collections::BTreeSet;

use common::*;

const POLICY: &str = "\
services: { immich: {}, nextcloud: {} }
sources:
  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\", max_ips: 10, idle_ttl: 1h }
";

fn immich_has(setup: &Setup, what: &str, want: &[&str]) -> Lists {
    let want = strings(want);
    setup.wait_lists(what, SOON, move |l| l["gatekeeper-immich"] == want)
}

#[test]
fn kill_9_right_after_an_acknowledged_grant_keeps_it_across_the_restart() {
    let setup = Setup::new(POLICY);
    let mut daemon = setup.start();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.5"), 200);
    // Acknowledged: Traefik can see it. Kill at once.
    setup.wait_lists("the grant in the Traefik file", SOON, |l| {
        l["gatekeeper-immich"].iter().any(|r| r == "203.0.113.5/32")
    });
    daemon.kill9();

    assert_eq!(
        state_networks(&setup.state).unwrap(),
        BTreeSet::from(["203.0.113.5/32".to_string()]),
        "the state file is written before the Traefik file"
    );
    // Without its Traefik file, the restarted daemon can only rebuild the grant from the state.
    std::fs::remove_file(&setup.traefik).unwrap();
    let daemon = setup.start();
    assert!(
        daemon.log().contains("state restored entries=1"),
        "{}",
        daemon.log()
    );
    let lists = immich_has(&setup, "the restored grant", &["203.0.113.5/32"]);
    assert_eq!(lists["gatekeeper-nextcloud"], strings(&["203.0.113.5/32"]));
}

#[test]
fn sigterm_exits_0_and_flushes_refreshes_to_the_state_file() {
    let setup = Setup::new(POLICY);
    let mut daemon = setup.start();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.6"), 200);
    assert_eq!(mirror(daemon.addr, "ha.example.com", "2001:db8:6::1"), 200);
    immich_has(
        &setup,
        "both grants",
        &["203.0.113.6/32", "2001:db8:6::/64"],
    );
    // Refreshes of a known client wake no write; only the shutdown flush can record them.
    for _ in 0..2 {
        assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.6"), 200);
    }

    let (status, log) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    let entries = setup.state_entries();
    let got: Vec<(&str, u64)> = entries
        .iter()
        .map(|e| (e.network.as_str(), e.hits))
        .collect();
    assert_eq!(
        got,
        [("203.0.113.6/32", 3), ("2001:db8:6::/64", 1)],
        "{entries:?}"
    );
    assert!(entries.iter().all(|e| e.source == "ha"));
}

#[test]
fn clean_restart_restores_every_grant() {
    let setup = Setup::new(POLICY);
    let mut daemon = setup.start();
    for client in ["203.0.113.7", "198.51.100.7"] {
        assert_eq!(mirror(daemon.addr, "ha.example.com", client), 200);
    }
    immich_has(
        &setup,
        "both grants",
        &["198.51.100.7/32", "203.0.113.7/32"],
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");

    std::fs::remove_file(&setup.traefik).unwrap();
    let daemon = setup.start();
    assert!(
        daemon.log().contains("state restored entries=2"),
        "{}",
        daemon.log()
    );
    immich_has(
        &setup,
        "the restored grants",
        &["198.51.100.7/32", "203.0.113.7/32"],
    );
    // Restored entries are live ones: a new grant adds to them.
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.8"), 200);
    immich_has(
        &setup,
        "three grants",
        &["198.51.100.7/32", "203.0.113.7/32", "203.0.113.8/32"],
    );
}

#[test]
fn corrupt_state_file_stops_the_start_and_is_left_untouched() {
    let setup = Setup::new(POLICY);
    std::fs::create_dir_all(setup.state.parent().unwrap()).unwrap();
    let corrupt = b"{\"format\":1,\"entries\":[";
    std::fs::write(&setup.state, corrupt).unwrap();

    let (status, _, stderr) = run(setup.dir.path(), &["--config", "gatekeeper.yaml"], &[]);

    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("data/state.json"),
        "the message names the file:\n{stderr}"
    );
    assert!(stderr.contains("not valid gatekeeper state"), "{stderr}");
    assert_eq!(
        std::fs::read(&setup.state).unwrap(),
        corrupt,
        "the state file was changed"
    );
    assert_eq!(names_in(setup.state.parent().unwrap()), ["state.json"]);
    assert!(
        !setup.traefik.exists(),
        "no Traefik file from a refused start"
    );
}
