//! Live reload: on SIGHUP and when the policy file changes, a valid policy is applied with the
//! state kept (lowered limits evict the least recently seen, removed sources lose their entries);
//! an invalid one is logged with every problem and the running policy stays in force.

mod common;

use common::*;

fn policy(max_ips: u32, extra: &str) -> String {
    format!(
        "services:\n  immich: {{}}\n  nextcloud: {{}}\n\
         sources:\n  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n    max_ips: {max_ips}\n{extra}"
    )
}

fn write_policy(setup: &Setup, body: &str) {
    std::fs::write(&setup.policy, format!("{PREAMBLE}{body}")).unwrap();
}

fn immich(lists: &Lists) -> Vec<String> {
    lists["gatekeeper-immich"].clone()
}

#[test]
fn sighup_with_a_lowered_max_ips_evicts_the_least_recently_seen() {
    let setup = Setup::new(&policy(3, ""));
    let daemon = setup.start();
    for client in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        assert_eq!(mirror(daemon.addr, "ha.example.com", client), 200);
        next_millisecond();
    }
    // .1 is seen again: .2 is now the least recently seen, then .3.
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.1"), 200);
    setup.wait_lists("three grants", SOON, |l| immich(l).len() == 3);

    write_policy(&setup, &policy(1, ""));
    daemon.hangup();
    let lists = setup.wait_lists("max_ips 1 applied", SOON, |l| immich(l).len() == 1);
    assert_eq!(immich(&lists), vec!["198.51.100.1/32"]);
    assert_eq!(lists["gatekeeper-nextcloud"], vec!["198.51.100.1/32"]);
    wait_for("the reload in the log", SOON, || {
        let log = daemon.log();
        (log.contains("policy reloaded") && log.contains("removed=2"))
            .then_some(())
            .ok_or(log)
    });
    // The state file agrees, and the daemon keeps granting under the new limit.
    let state = state_networks(&setup.state).unwrap();
    assert_eq!(
        state.into_iter().collect::<Vec<_>>(),
        vec!["198.51.100.1/32"]
    );
    next_millisecond();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.9"), 200);
    setup.wait_lists("the newcomer replaces the only entry", SOON, |l| {
        immich(l) == vec!["198.51.100.9/32".to_string()]
    });
}

#[test]
fn an_invalid_policy_is_refused_and_the_running_one_kept() {
    let setup = Setup::new(&policy(2, ""));
    let daemon = setup.start();
    for client in ["198.51.100.1", "198.51.100.2"] {
        assert_eq!(mirror(daemon.addr, "ha.example.com", client), 200);
        next_millisecond();
    }
    setup.wait_lists("two grants", SOON, |l| immich(l).len() == 2);

    // Two problems at once; both must be reported, and nothing applied.
    write_policy(&setup, &policy(0, "    colour: blue\n"));
    daemon.hangup();
    // The refusal is one multi-line entry: wait for its problem lines, not only its first line.
    let log = wait_for("the refusal with both problems in the log", SOON, || {
        let log = daemon.log();
        (log.contains("policy not reloaded")
            && log.contains("sources.ha.max_ips")
            && log.contains("sources.ha.colour"))
        .then(|| log.clone())
        .ok_or(log)
    });
    assert!(!log.contains("policy reloaded"), "{log}");

    // Still max_ips 2: a third client evicts one, it does not make three, nor zero.
    next_millisecond();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.3"), 200);
    let lists = setup.wait_lists("the old limit still applies", SOON, |l| {
        immich(l).contains(&"198.51.100.3/32".to_string())
    });
    assert_eq!(
        immich(&lists),
        vec!["198.51.100.2/32".to_string(), "198.51.100.3/32".to_string()]
    );
}

#[test]
fn a_changed_file_is_picked_up_without_a_signal_and_removed_sources_lose_their_entries() {
    let share = "  nc:\n    kind: share\n    upstream: http://127.0.0.1:9\n    path: '^/s/[A-Za-z0-9]{15}$'\n    unlocks: [nextcloud]\n";
    let setup = Setup::new(&policy(3, share));
    let daemon = setup.start();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.1"), 200);
    setup.wait_lists("a grant", SOON, |l| immich(l).len() == 1);

    // Replace the mirror source by another one with another host: its entry must go, and the
    // new host must be claimed.
    let other = "services:\n  immich: {}\n  nextcloud: {}\n\
                 sources:\n  phone:\n    kind: mirror\n    hosts: [ha2.example.com]\n    unlocks: [immich]\n";
    write_policy(&setup, other);
    setup.wait_lists("the removed source's entry gone", SOON, |l| {
        immich(l) == vec!["0.0.0.0/32".to_string()]
    });
    wait_for("the reload's reason in the log", SOON, || {
        let log = daemon.log();
        log.contains("the policy file changed")
            .then_some(())
            .ok_or(log)
    });
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.2"), 404);
    assert_eq!(mirror(daemon.addr, "ha2.example.com", "198.51.100.2"), 200);
    let lists = setup.wait_lists("the new source grants", SOON, |l| {
        immich(l) == vec!["198.51.100.2/32".to_string()]
    });
    assert_eq!(lists["gatekeeper-nextcloud"], vec!["0.0.0.0/32"]);
}
