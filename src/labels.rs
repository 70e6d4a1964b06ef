//! `gatekeeper labels`: what a user pastes into their proxy for the loaded policy — Traefik
//! labels and file-provider snippets, and the nginx and Caddy equivalents. Pure: a policy and
//! the address the proxy reaches gatekeeper at go in, text comes out.

use std::fmt::Write as _;

use crate::policy::{Policy, SourceKind};

/// Which proxy to print for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proxy {
    /// Traefik labels and file-provider snippets
    Traefik,
    /// nginx server blocks (mirror, auth_request)
    Nginx,
    /// Caddyfile site blocks (forward_auth)
    Caddy,
}

/// The snippets for `proxies`, with gatekeeper reachable at `url` (`http://gatekeeper:5000`).
pub fn render(policy: &Policy, url: &str, proxies: &[Proxy]) -> String {
    let url = url.trim_end_matches('/');
    let mut out = String::new();
    for proxy in proxies {
        match proxy {
            Proxy::Traefik => traefik(&mut out, policy, url),
            Proxy::Nginx => nginx(&mut out, policy, url),
            Proxy::Caddy => caddy(&mut out, policy, url),
        }
    }
    out
}

fn mirrors(policy: &Policy) -> impl Iterator<Item = (&str, &[String], bool)> {
    policy.sources.iter().filter_map(|(name, s)| match &s.kind {
        SourceKind::Mirror(m) => Some((name.as_str(), m.hosts.as_slice(), m.catch_all)),
        _ => None,
    })
}

fn shares(policy: &Policy) -> impl Iterator<Item = (&str, Vec<&str>, &[String])> {
    policy.sources.iter().filter_map(|(name, s)| match &s.kind {
        SourceKind::Share(sh) => Some((
            name.as_str(),
            sh.patterns.iter().map(|p| p.regex.as_str()).collect(),
            s.unlocks.as_slice(),
        )),
        _ => None,
    })
}

fn traefik(out: &mut String, policy: &Policy, url: &str) {
    let _ = writeln!(
        out,
        "# ---- Traefik ----------------------------------------------------------"
    );
    let _ = writeln!(
        out,
        "# 1. Protected services: add the middleware to each service's router (Docker labels).\n#    Replace <router> with your router's name."
    );
    for service in policy.services.keys() {
        let _ = writeln!(
            out,
            "#    {service}:\n- \"traefik.http.routers.<router>.middlewares={}\"",
            policy.traefik.middleware_ref(service)
        );
    }
    for (name, hosts, catch_all) in mirrors(policy) {
        let what = if catch_all {
            "every request".to_string()
        } else {
            format!("Host {}", hosts.join(", "))
        };
        let _ = writeln!(
            out,
            "\n# 2. Mirror source `{name}` ({what}): mirroring exists only in the file provider.\n\
             #    Put this in a file of the watched directory and point the trusted router at it:\n\
             #    - \"traefik.http.routers.<router>.service={name}-mirrored@file\"\n\
             http:\n  services:\n    {name}-mirrored:\n      mirroring:\n        service: <the trusted service>@docker\n        \
             mirrorBody: false   # Traefik >= 3.2; before: maxBodySize: 65536\n        mirrors:\n          \
             - name: {name}-gatekeeper@file\n            percent: 100\n    {name}-gatekeeper:\n      loadBalancer:\n        \
             servers:\n          - url: {url}\n"
        );
    }
    for (name, patterns, unlocks) in shares(policy) {
        // Exactly the link paths: /share judges the path, so a deeper path sent there would be
        // refused and count as a failed check. Go's regexp reads these patterns as they are.
        let rule = patterns
            .iter()
            .map(|p| format!("PathRegexp(`{p}`)"))
            .collect::<Vec<_>>()
            .join(" || ");
        let _ = writeln!(
            out,
            "\n# 3. Share source `{name}` (unlocks {}): a router for exactly the link paths, with\n\
             #    forward-auth; everything else the app loads goes through its main router.\n\
             - \"traefik.http.routers.<share router>.rule=Host(`<app host>`) && ({rule})\"\n\
             - \"traefik.http.routers.<share router>.middlewares={name}-auth\"\n\
             - \"traefik.http.middlewares.{name}-auth.forwardauth.address={url}/share/{name}\"\n\
             #    gatekeeper takes the client from the right of X-Forwarded-For, where Traefik puts\n\
             #    the address it saw, so trusting the header lets a CDN in front of Traefik through\n\
             #    and a forged one never wins; its answers are a line of text.\n\
             - \"traefik.http.middlewares.{name}-auth.forwardauth.trustForwardHeader=true\"\n\
             - \"traefik.http.middlewares.{name}-auth.forwardauth.maxResponseBodySize={MAX_ANSWER}\"",
            unlocks.join(", "),
        );
    }
    let http = format!(
        "# providers:\n#   http:\n#     endpoint: {url}{}\n#     pollInterval: 1s\n",
        crate::http::DYNAMIC_JSON
    );
    let t = &policy.traefik;
    let _ = match t.provider() {
        "file" => writeln!(
            out,
            "\n# Traefik reads the middlewares from its file provider (traefik.yml): watch the\n\
             # DIRECTORY that holds traefik.file ({}), as Traefik's container sees it:\n\
             # providers:\n#   file:\n#     directory: <that directory>\n#     watch: true\n\
             # Or read them over HTTP instead of the file; routers then reference @http:\n{http}",
            t.file
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display()
        ),
        "redis" => writeln!(
            out,
            "\n# Traefik reads the middlewares from its Redis provider (traefik.yml); Redis must\n\
             # send keyspace notifications (notify-keyspace-events KEA) for Traefik to see changes:\n\
             # providers:\n#   redis:\n#     endpoints: [\"<host:port of traefik.redis.url>\"]\n#     rootKey: {}\n",
            t.redis.as_ref().map_or("traefik", |r| r.root_key.as_str())
        ),
        _ => writeln!(
            out,
            "\n# Traefik reads the middlewares over HTTP (traefik.yml); a 1 s poll lets a new\n\
             # grant in within about a second:\n{http}"
        ),
    };
}

/// The longest answer body gatekeeper sends to a forward-auth request, with room to spare; set
/// as Traefik's `maxResponseBodySize` so Traefik does not warn about an unlimited body.
pub const MAX_ANSWER: usize = 4096;

fn nginx(out: &mut String, policy: &Policy, url: &str) {
    let _ = writeln!(
        out,
        "# ---- nginx --------------------------------------------------------------"
    );
    for (name, hosts, _) in mirrors(policy) {
        let host = hosts.first().map_or("<host>", String::as_str);
        let _ = writeln!(
            out,
            "# Mirror source `{name}`: in the trusted site's server block (ssl_verify_client on):\n\
             location / {{\n    mirror /_gatekeeper_mirror;\n    mirror_request_body off;\n    proxy_pass <the trusted service>;\n}}\n\
             location = /_gatekeeper_mirror {{\n    internal;\n    proxy_pass {url}$request_uri;\n    proxy_pass_request_body off;\n    \
             proxy_set_header Content-Length \"\";\n    proxy_set_header Host {host};\n    proxy_set_header X-Forwarded-For $remote_addr;\n}}\n"
        );
    }
    for service in policy.services.keys() {
        let _ = writeln!(
            out,
            "# Service `{service}`: in its server block:\n\
             location / {{\n    auth_request /_gatekeeper_allow;\n    proxy_pass <the {service} service>;\n}}\n\
             location = /_gatekeeper_allow {{\n    internal;\n    proxy_pass {url}/allow/{service};\n    proxy_pass_request_body off;\n    \
             proxy_set_header Content-Length \"\";\n    proxy_set_header X-Forwarded-For $remote_addr;\n}}\n"
        );
    }
    for (name, patterns, _) in shares(policy) {
        let _ = writeln!(
            out,
            "# Share source `{name}` (paths {}): on the share locations:\n\
             auth_request /_gatekeeper_share_{name};\n\
             location = /_gatekeeper_share_{name} {{\n    internal;\n    proxy_pass {url}/share/{name};\n    proxy_pass_request_body off;\n    \
             proxy_set_header Content-Length \"\";\n    proxy_set_header X-Forwarded-For $remote_addr;\n    proxy_set_header X-Forwarded-Uri $request_uri;\n}}\n",
            patterns.join("  ")
        );
    }
}

fn caddy(out: &mut String, policy: &Policy, url: &str) {
    let _ = writeln!(
        out,
        "# ---- Caddy --------------------------------------------------------------"
    );
    let upstream = url
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    for (name, hosts, _) in mirrors(policy) {
        let host = hosts.first().map_or("<host>", String::as_str);
        let _ = writeln!(
            out,
            "# Mirror source `{name}`: Caddy cannot mirror, so the trusted site asks gatekeeper on every\n\
             # request; the request carries Host {host}, which is what gatekeeper records.\n\
             {host} {{\n    tls <cert> <key> {{\n        client_auth {{\n            mode require_and_verify\n            trusted_ca_cert_file <ca.pem>\n        }}\n    }}\n    \
             forward_auth {upstream} {{\n        uri /\n    }}\n    reverse_proxy <the trusted service>\n}}\n"
        );
    }
    for service in policy.services.keys() {
        let _ = writeln!(
            out,
            "# Service `{service}`:\n<{service} host> {{\n    forward_auth {upstream} {{\n        uri /allow/{service}\n    }}\n    reverse_proxy <the {service} service>\n}}\n"
        );
    }
    for (name, patterns, _) in shares(policy) {
        let _ = writeln!(
            out,
            "# Share source `{name}` (paths {}): inside the sharing app's site:\n\
             @{name} path_regexp {}\nforward_auth @{name} {upstream} {{\n    uri /share/{name}\n}}\n",
            patterns.join("  "),
            patterns.first().copied().unwrap_or("<regex>")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::from_yaml_str;

    #[test]
    fn every_service_and_source_gets_its_snippet() {
        let p = from_yaml_str(
            &std::fs::read_to_string("gatekeeper.example.yaml").unwrap(),
            "example",
        )
        .unwrap();
        let all = render(
            &p,
            "http://gatekeeper:5000/",
            &[Proxy::Traefik, Proxy::Nginx, Proxy::Caddy],
        );
        for needle in [
            "traefik.http.routers.<router>.middlewares=gatekeeper-immich@file",
            "traefik.http.routers.<router>.middlewares=gatekeeper-jellyfin@file",
            "home-assistant-mirrored:",
            "- url: http://gatekeeper:5000\n",
            "forwardauth.address=http://gatekeeper:5000/share/immich-share",
            "forwardauth.address=http://gatekeeper:5000/share/nextcloud-share",
            "rule=Host(`<app host>`) && (PathRegexp(`^(?:/s/[A-Za-z0-9]{15})$`))",
            "proxy_pass http://gatekeeper:5000/allow/nextcloud;",
            "proxy_set_header Host ha.example.com;",
            "proxy_pass http://gatekeeper:5000/share/immich-share;",
            "forward_auth gatekeeper:5000 {\n        uri /allow/immich",
            "ha.example.com {",
            "endpoint: http://gatekeeper:5000/traefik/dynamic.json",
            "forwardauth.trustForwardHeader=true",
            "forwardauth.maxResponseBodySize=4096",
            "pollInterval: 1s",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in\n{all}");
        }
        let only_nginx = render(&p, "http://127.0.0.1:5000", &[Proxy::Nginx]);
        assert!(!only_nginx.contains("Traefik ---") && !only_nginx.contains("Caddy ---"));
    }

    #[test]
    fn routers_reference_the_provider_that_serves_the_middlewares() {
        let policy = |traefik: &str| {
            from_yaml_str(
                &format!(
                    "{traefik}\nservices: {{ immich: {{}} }}\nsources:\n  s:\n    kind: share\n    \
                     upstream: http://immich:2283\n    path: '^/s/[a-z]+$'\n    unlocks: [immich]\n"
                ),
                "t",
            )
            .unwrap()
        };
        for (traefik, reference, provider) in [
            (
                "traefik: { file: /data/gatekeeper.yml }",
                "gatekeeper-immich@file",
                "file:",
            ),
            (
                "traefik: { file: /data/g.yml, redis: { url: redis://r:6379/0 } }",
                "gatekeeper-immich@file",
                "file:",
            ),
            (
                "traefik: { redis: { url: redis://r:6379/0 } }",
                "gatekeeper-immich@redis",
                "redis:",
            ),
            ("traefik: {}", "gatekeeper-immich@http", "http:"),
        ] {
            let p = policy(traefik);
            let text = render(&p, "http://gatekeeper:5000", &[Proxy::Traefik]);
            assert!(
                text.contains(&format!("middlewares={reference}\"")),
                "{traefik}: no {reference} in\n{text}"
            );
            assert!(
                text.contains(&format!("#   {provider}\n")),
                "{traefik}:\n{text}"
            );
            let summary = crate::cli::summary(&p);
            assert!(
                summary.contains(&format!(" {reference}\n")),
                "{traefik}: check does not name {reference}:\n{summary}"
            );
            for other in ["@file", "@redis", "@http"] {
                if !reference.ends_with(other) {
                    assert!(
                        !text.contains(&format!("gatekeeper-immich{other}")),
                        "{traefik}: {other} in\n{text}"
                    );
                }
            }
        }
    }
}
