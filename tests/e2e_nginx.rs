//! End to end through real nginx: the templates under `deploy/nginx/templates`, filled as the
//! official image would fill them, in front of the real gatekeeper. Each flow runs on its own
//! stack (see `common::proxies`); the same flows run through Caddy in `e2e_caddy.rs`.

mod common;

use common::proxies::{self, Proxy};

const PROXY: Proxy = Proxy::Nginx;

// The flows every proxy runs (`common::proxies::flows`), one test each.
proxies::flow_tests!(PROXY);

/// Every `${VAR}` a template uses is listed in its own header and in the README, so a user
/// knows what to set; nothing else looks like an environment variable to envsubst.
#[test]
fn templates_document_every_variable() {
    let readme = std::fs::read_to_string(proxies::deploy_dir().join("nginx/README.md"))
        .expect("deploy/nginx/README.md");
    for (name, text) in proxies::nginx_templates() {
        let header: String = text
            .lines()
            .take_while(|l| l.starts_with('#') || l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let used = proxies::template_variables(&text);
        assert!(!used.is_empty(), "{name} uses no variable");
        for var in used {
            assert!(
                header.contains(&format!("#   {var} ")),
                "{name} uses ${{{var}}} but its header does not list it"
            );
            assert!(
                readme.contains(&format!("`{var}`")),
                "{name} uses ${{{var}}} but deploy/nginx/README.md does not document it"
            );
        }
    }
}
