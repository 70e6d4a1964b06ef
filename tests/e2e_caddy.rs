//! End to end through real Caddy: `deploy/caddy/Caddyfile` as it is, its `{$VAR}` placeholders
//! set through the environment, in front of the real gatekeeper. Each flow runs on its own stack
//! (see `common::proxies`); the same flows run through nginx in `e2e_nginx.rs`.

mod common;

use std::process::Command;

use common::proxies::{self, INSTALL_HINT, Proxy};

const PROXY: Proxy = Proxy::Caddy;

// The flows every proxy runs (`common::proxies::flows`), one test each.
proxies::flow_tests!(PROXY);

/// Every `{$VAR}` the Caddyfile reads is listed in its header and in the README.
#[test]
fn caddyfile_documents_every_variable() {
    let text = std::fs::read_to_string(proxies::caddyfile()).expect("deploy/caddy/Caddyfile");
    let readme = std::fs::read_to_string(proxies::deploy_dir().join("caddy/README.md"))
        .expect("deploy/caddy/README.md");
    let header: String = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let used = proxies::caddy_variables(&text);
    assert!(used.contains("GATEKEEPER"), "{used:?}");
    for var in used {
        assert!(
            header.contains(&format!(" {var} ")) || header.contains(&format!(" {var},")),
            "the Caddyfile reads {{${var}}} but its header does not list it"
        );
        assert!(
            readme.contains(&format!("`{var}`")),
            "the Caddyfile reads {{${var}}} but deploy/caddy/README.md does not document it"
        );
    }
}

/// The Caddyfile is as `caddy fmt` writes it.
#[test]
fn caddyfile_is_formatted() {
    let caddy = proxies::tool("caddy", INSTALL_HINT);
    let out = Command::new(caddy)
        .arg("fmt")
        .arg(proxies::caddyfile())
        .output()
        .expect("run caddy fmt");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(proxies::caddyfile()).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        text,
        "run `caddy fmt --overwrite deploy/caddy/Caddyfile`"
    );
}
