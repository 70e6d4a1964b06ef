//! What is found at an output path: a FIFO at the Traefik file's or the state file's path is
//! refused (never waited on) with `/healthz` naming it, and removing it recovers; a symlink
//! planted where the in-place fallback writes is not followed (a regular file there is rewritten
//! in place, tests/legacy.rs); the state file is private, the Traefik file is not.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::upstream::allow_status;
use common::*;

const HA: &str = "services:\n  immich: {}\n\
                  sources:\n  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n";

/// Replace whatever is at `path` with a FIFO (named pipe).
fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Wait for `/healthz` to answer 503 naming `needles`; a writer blocked on the FIFO never
/// answers the question, so a timeout here means it hung.
fn wait_unhealthy_naming(admin: std::net::SocketAddr, needles: &[&str]) -> String {
    wait_for(
        &format!(
            "/healthz to answer 503 naming {needles:?} (a writer blocked on the FIFO never does)"
        ),
        SOON,
        || {
            let (status, body) = health(admin);
            (status == 503 && needles.iter().all(|n| body.contains(n)))
                .then(|| body.clone())
                .ok_or(format!("{status} {body}"))
        },
    )
}

#[test]
fn a_fifo_at_the_traefik_path_is_refused_and_removing_it_recovers() {
    let setup = Setup::new(HA);
    let daemon = setup.start();
    let admin = daemon.admin_addr();
    setup.wait_lists("the first Traefik file", SOON, |l| l.len() == 1);

    mkfifo(&setup.traefik);
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.7"), 200);
    let body = wait_unhealthy_naming(admin, &["traefik/gatekeeper.yml", "FIFO"]);
    assert!(body.contains("not a regular file"), "{body}");
    // Decisions keep coming from memory, and the state file holds the grant.
    assert_eq!(allow_status(daemon.addr, "immich", "198.51.100.7"), 200);
    wait_for("the grant in the state file", SOON, || {
        let networks = state_networks(&setup.state)?;
        networks
            .contains("198.51.100.7/32")
            .then_some(())
            .ok_or(format!("{networks:?}"))
    });

    std::fs::remove_file(&setup.traefik).unwrap();
    wait_health(admin, 200, SOON);
    setup.wait_lists("the grant in the Traefik file", SOON, |l| {
        l["gatekeeper-immich"] == vec!["198.51.100.7/32".to_string()]
    });
    assert!(std::fs::metadata(&setup.traefik).unwrap().is_file());
}

#[test]
fn a_fifo_at_the_state_path_is_refused_and_removing_it_recovers() {
    let setup = Setup::new(HA);
    let daemon = setup.start();
    let admin = daemon.admin_addr();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.8"), 200);
    wait_for("the first grant in the state file", SOON, || {
        let networks = state_networks(&setup.state)?;
        networks
            .contains("198.51.100.8/32")
            .then_some(())
            .ok_or(format!("{networks:?}"))
    });

    mkfifo(&setup.state);
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.9"), 200);
    let body = wait_unhealthy_naming(admin, &["data/state.json", "FIFO"]);
    assert!(body.contains("not a regular file"), "{body}");
    assert_eq!(allow_status(daemon.addr, "immich", "198.51.100.9"), 200);

    std::fs::remove_file(&setup.state).unwrap();
    wait_health(admin, 200, SOON);
    let networks = state_networks(&setup.state).unwrap();
    assert!(
        networks.contains("198.51.100.8/32") && networks.contains("198.51.100.9/32"),
        "{networks:?}"
    );
    setup.wait_lists("both grants in the Traefik file", SOON, |l| {
        l["gatekeeper-immich"].len() == 2
    });
}

#[test]
fn a_fifo_at_the_state_path_stops_the_start_naming_it() {
    let setup = Setup::new(HA);
    std::fs::create_dir_all(setup.state.parent().unwrap()).unwrap();
    mkfifo(&setup.state);
    let mut child = Command::new(BIN)
        .args(["--config", "gatekeeper.yaml"])
        .current_dir(setup.dir.path())
        .env_clear()
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gatekeeper");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > SOON {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gatekeeper hung at start on a FIFO at the state path");
        }
        std::thread::sleep(POLL);
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("data/state.json") && stderr.contains("FIFO"),
        "{stderr}"
    );
}

#[test]
fn the_state_file_is_private_and_the_traefik_file_is_not() {
    let setup = Setup::new(HA);
    let daemon = setup.start();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.10"), 200);
    wait_for("the grant in the state file", SOON, || {
        let networks = state_networks(&setup.state)?;
        networks
            .contains("198.51.100.10/32")
            .then_some(())
            .ok_or(format!("{networks:?}"))
    });
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        format!("{:o}", mode(&setup.state)),
        "600",
        "the state file holds client addresses"
    );
    // Traefik may run as another user: the Traefik file keeps the process default.
    setup.wait_lists("the grant in the Traefik file", SOON, |l| {
        l["gatekeeper-immich"] == vec!["198.51.100.10/32".to_string()]
    });
    assert_ne!(
        mode(&setup.traefik) & 0o044,
        0,
        "{:o}",
        mode(&setup.traefik)
    );
}

#[test]
fn a_group_readable_state_file_is_tightened_with_a_warning() {
    let setup = Setup::new(HA);
    std::fs::create_dir_all(setup.state.parent().unwrap()).unwrap();
    std::fs::write(&setup.state, "{\"format\":1,\"entries\":[]}\n").unwrap();
    std::fs::set_permissions(&setup.state, std::fs::Permissions::from_mode(0o644)).unwrap();
    let daemon = setup.start();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.11"), 200);
    wait_for("the grant in the state file", SOON, || {
        let networks = state_networks(&setup.state)?;
        networks
            .contains("198.51.100.11/32")
            .then_some(())
            .ok_or(format!("{networks:?}"))
    });
    let mode = std::fs::metadata(&setup.state)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let log = daemon.wait_log("was readable by others");
    assert!(log.contains("data/state.json"), "{log}");
}

/// Can this process make a private mount namespace (root, unshare(1) present)?
fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_in_place_fallback_does_not_follow_a_symlink_at_the_output() {
    if !can_unshare() {
        eprintln!("SKIPPED: `unshare -m` is not available here (needs root)");
        return;
    }
    // The Traefik file's directory is read-only to gatekeeper (a read-only container with a
    // single-file mount), so no temp file can be made and the write falls back to in place. A
    // symlink planted at the path points at a file outside that directory.
    let setup = Setup::new(HA);
    let dir = setup.traefik.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    let victim = setup.dir.path().join("victim.conf");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, &setup.traefik).unwrap();

    let script = r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@""#;
    let daemon = Daemon::start_wrapped(
        "unshare",
        &[
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            dir.to_str().unwrap(),
            BIN,
        ],
        setup.dir.path(),
        &["--config", "gatekeeper.yaml"],
        &[],
    );
    let admin = daemon.admin_addr();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.12"), 200);
    // Either the write is refused or it went through the symlink.
    let body = wait_for(
        "/healthz to answer 503, or the victim to be overwritten",
        SOON,
        || {
            let (status, body) = health(admin);
            let victim_now = std::fs::read_to_string(&victim).unwrap();
            if status == 503 || victim_now != "precious\n" {
                Ok(body)
            } else {
                Err(format!("{status} {body}"))
            }
        },
    );
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "the in-place fallback wrote through the symlink at the Traefik path"
    );
    assert!(
        body.contains("traefik/gatekeeper.yml") && body.contains("symbolic link"),
        "{body}"
    );
    assert!(
        std::fs::symlink_metadata(&setup.traefik)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}
