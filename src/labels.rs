//! `gatekeeper labels`: what a user pastes into their proxy for the loaded policy — Traefik
//! labels and file-provider snippets, and the nginx and Caddy equivalents. Pure: a policy and
//! the address the proxy reaches gatekeeper at go in, text comes out.

use std::fmt::Write as _;

use crate::policy::{Policy, SourceKind, TraefikVersion};

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
pub(crate) fn render(policy: &Policy, url: &str, proxies: &[Proxy]) -> String {
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

/// A mirror source as the snippets need it.
struct Mirror<'a> {
    name: &'a str,
    hosts: &'a [String],
    catch_all: bool,
    /// The header gatekeeper reads the certificate subject from: the source's
    /// `identity_header`, else the one the deploy configs use.
    subject_header: String,
    identity_header: bool,
}

fn mirrors(policy: &Policy) -> impl Iterator<Item = Mirror<'_>> {
    policy.sources.iter().filter_map(|(name, s)| match &s.kind {
        SourceKind::Mirror(m) => Some(Mirror {
            name: name.as_str(),
            hosts: m.hosts.as_slice(),
            catch_all: m.catch_all,
            subject_header: m.identity_header.as_ref().map_or_else(
                || "X-Client-Subject".to_string(),
                |h| header_case(h.as_str()),
            ),
            identity_header: m.identity_header.is_some(),
        }),
        _ => None,
    })
}

/// `x-client-subject` → `X-Client-Subject`, as people write header names.
fn header_case(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// A share source as the snippets need it.
struct Share<'a> {
    name: &'a str,
    /// The anchored regexes (`^(?:...)$`) of its link paths.
    patterns: Vec<&'a str>,
    unlocks: &'a [String],
}

impl Share<'_> {
    /// The service whose site serves the links: the first one the source unlocks.
    fn app(&self) -> Option<&str> {
        self.unlocks.first().map(String::as_str)
    }

    /// One regex for every link path (each pattern is anchored on its own).
    fn combined(&self) -> String {
        let patterns: Vec<String> = self.patterns.iter().map(|p| uncaptured(p)).collect();
        patterns.join("|")
    }
}

fn shares(policy: &Policy) -> impl Iterator<Item = Share<'_>> {
    policy.sources.iter().filter_map(|(name, s)| match &s.kind {
        SourceKind::Share(sh) => Some(Share {
            name: name.as_str(),
            patterns: sh.patterns.iter().map(|p| p.regex.as_str()).collect(),
            unlocks: s.unlocks.as_slice(),
        }),
        _ => None,
    })
}

/// The share sources whose links live on `service`'s site.
fn shares_of<'a>(policy: &'a Policy, service: &str) -> Vec<Share<'a>> {
    shares(policy)
        .filter(|s| s.app() == Some(service))
        .collect()
}

/// A Docker label line as Docker Compose needs it: `$` is Compose's interpolation, `$$` a
/// literal `$`.
fn label(out: &mut String, text: &str) {
    let _ = writeln!(out, "- \"{}\"", text.replace('$', "$$"));
}

/// The top-level branches of `regex` (split at `|` outside groups and classes), with every
/// capturing group made non-capturing: gorilla/mux (Traefik v2) refuses capturing groups, and
/// two patterns joined into one regex may name the same group (PCRE and Go refuse that). `None`
/// when the parentheses do not balance.
fn branches_without_captures(regex: &str) -> Option<Vec<String>> {
    let mut branches = vec![String::new()];
    let (mut depth, mut class) = (0usize, 0usize);
    let mut chars = regex.chars().peekable();
    while let Some(c) = chars.next() {
        let cur = branches.last_mut().expect("one branch at least");
        match c {
            '\\' => {
                cur.push(c);
                cur.extend(chars.next());
            }
            '[' => {
                cur.push(c);
                class += 1;
                // `[]...]` and `[^]...]`: a `]` right after the opening is a literal.
                if chars.peek() == Some(&'^') {
                    cur.extend(chars.next());
                }
                if class == 1 && chars.peek() == Some(&']') {
                    cur.extend(chars.next());
                }
            }
            ']' if class > 0 => {
                cur.push(c);
                class -= 1;
            }
            '(' if class == 0 => {
                depth += 1;
                let rest = chars.clone().collect::<String>();
                if rest.starts_with("?P<") || rest.starts_with("?<") {
                    chars.by_ref().find(|&n| n == '>');
                    cur.push_str("(?:");
                } else if rest.starts_with('?') {
                    cur.push('(');
                } else {
                    cur.push_str("(?:");
                }
            }
            ')' if class == 0 => {
                depth = depth.checked_sub(1)?;
                cur.push(c);
            }
            '|' if class == 0 && depth == 0 => branches.push(String::new()),
            c => cur.push(c),
        }
    }
    (depth == 0).then_some(branches)
}

/// An anchored pattern without capturing groups, for a regex that joins several.
fn uncaptured(anchored: &str) -> String {
    branches_without_captures(anchored).map_or_else(|| anchored.to_string(), |b| b.join("|"))
}

/// A share pattern (`^(?:/share/(?P<key>...))$`) as a Traefik v2 `Path` template
/// (`/{link:share/(?:...)}`): v2 has no `PathRegexp`; its `Path` takes gorilla/mux templates,
/// whose `{name:regex}` must follow the leading `/` and may hold no capturing group. `None`
/// when a branch of the pattern does not start with a literal `/` or braces do not balance.
fn v2_path(anchored: &str) -> Option<String> {
    let inner = anchored.strip_prefix("^(?:")?.strip_suffix(")$")?;
    let inner = inner.trim_start_matches('^').trim_end_matches('$');
    let rest = branches_without_captures(inner)?
        .iter()
        .map(|b| b.strip_prefix('/').or_else(|| b.strip_prefix("\\/")))
        .collect::<Option<Vec<_>>>()?
        .join("|");
    let mut level = 0i32;
    for c in rest.chars() {
        level += match c {
            '{' => 1,
            '}' => -1,
            _ => 0,
        };
        if level < 0 {
            return None;
        }
    }
    (level == 0).then(|| format!("/{{link:{rest}}}"))
}

fn traefik(out: &mut String, policy: &Policy, url: &str) {
    let v2 = policy.traefik.version == TraefikVersion::V2;
    let _ = writeln!(
        out,
        "# ---- Traefik {} ---------------------------------------------------------\n\
         # Docker labels as a compose file takes them: `$$` is a literal `$` there (Compose\n\
         # interpolates `$`); elsewhere (docker run --label, a file provider) write a single `$`.",
        if v2 { "v2" } else { "v3" }
    );
    let _ = writeln!(
        out,
        "# 1. Protected services: add the middleware to each service's router.\n#    Replace <... router> with your router's name."
    );
    for service in policy.services.keys() {
        let _ = writeln!(out, "#    {service}:");
        label(
            out,
            &format!(
                "traefik.http.routers.<{service} router>.middlewares={}",
                policy.traefik.middleware_ref(service)
            ),
        );
    }
    for m in mirrors(policy) {
        let name = m.name;
        let what = if m.catch_all {
            "every request".to_string()
        } else {
            format!("Host {}", m.hosts.join(", "))
        };
        let body = if v2 {
            "maxBodySize: 65536   # larger requests are not mirrored (harmless)"
        } else {
            "mirrorBody: false   # Traefik >= 3.2; before: maxBodySize: 65536"
        };
        let _ = writeln!(
            out,
            "\n# 2. Mirror source `{name}` ({what}): mirroring exists only in the file provider.\n\
             #    Put this in a file of the watched directory and point the trusted router, which\n\
             #    must require client certificates, at it:\n\
             #    - \"traefik.http.routers.<router>.service={name}-mirrored@file\"\n\
             #    - \"traefik.http.routers.<router>.tls.options=<your mTLS options>@file\""
        );
        if m.identity_header {
            let _ = writeln!(
                out,
                "#    Traefik mirrors the client's own headers: let a passTLSClientCert middleware on\n\
                 #    the trusted router set the subject (identity_header:\n\
                 #    X-Forwarded-Tls-Client-Cert-Info), which it overwrites; {} is the client's.",
                m.subject_header
            );
        }
        let _ = writeln!(
            out,
            "http:\n  services:\n    {name}-mirrored:\n      mirroring:\n        service: <the trusted service>@docker\n        \
             {body}\n        mirrors:\n          \
             - name: {name}-gatekeeper@file\n            percent: 100\n    {name}-gatekeeper:\n      loadBalancer:\n        \
             servers:\n          - url: {url}\n"
        );
    }
    for share in shares(policy) {
        let name = share.name;
        // Exactly the link paths: /share judges the path, so a deeper path sent there would be
        // refused and count as a failed check. Go's regexp reads these patterns as they are.
        let rule = share
            .patterns
            .iter()
            .map(|p| {
                if v2 {
                    let template =
                        v2_path(p).unwrap_or_else(|| format!("<a v2 Path template for {p}>"));
                    format!("Path(`{template}`)")
                } else {
                    format!("PathRegexp(`{p}`)")
                }
            })
            .collect::<Vec<_>>()
            .join(" || ");
        let _ = writeln!(
            out,
            "\n# 3. Share source `{name}` (unlocks {}): a router for exactly the link paths, with\n\
             #    forward-auth; everything else the app loads goes through its main router.",
            share.unlocks.join(", "),
        );
        label(
            out,
            &format!("traefik.http.routers.<share router>.rule=Host(`<app host>`) && ({rule})"),
        );
        label(
            out,
            &format!("traefik.http.routers.<share router>.middlewares={name}-auth"),
        );
        label(
            out,
            &format!("traefik.http.middlewares.{name}-auth.forwardauth.address={url}/share/{name}"),
        );
        let _ = writeln!(
            out,
            "#    gatekeeper takes the client from the right of X-Forwarded-For, where Traefik puts\n\
             #    the address it saw, so trusting the header lets a CDN in front of Traefik through\n\
             #    and a forged one never wins; its answers are a line of text."
        );
        label(
            out,
            &format!("traefik.http.middlewares.{name}-auth.forwardauth.trustForwardHeader=true"),
        );
        let size = format!(
            "traefik.http.middlewares.{name}-auth.forwardauth.maxResponseBodySize={MAX_ANSWER}"
        );
        if v2 {
            let _ = writeln!(
                out,
                "#    Only on v2.11 releases that have it (the v2 schema does not):\n#    - \"{size}\""
            );
        } else {
            label(out, &size);
        }
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
pub(crate) const MAX_ANSWER: usize = 4096;

/// `regex` as one nginx string argument: double-quoted (a `{` or `;` would end a bare one),
/// with the two escapes nginx reads inside quotes.
fn nginx_quoted(regex: &str) -> String {
    format!("\"{}\"", regex.replace('\\', "\\\\").replace('"', "\\\""))
}

fn nginx(out: &mut String, policy: &Policy, url: &str) {
    let _ = writeln!(
        out,
        "# ---- nginx --------------------------------------------------------------\n\
         # Server blocks for inside `http {{ }}`. gatekeeper must list this nginx's address in\n\
         # trusted_proxies. gatekeeper's address is named in proxy_pass without variables, so nginx\n\
         # resolves it once at start (a variable would need a `resolver`). No request to gatekeeper\n\
         # carries the client's headers (proxy_pass_request_headers off): only those set here."
    );
    for m in mirrors(policy) {
        let name = m.name;
        let server_name = if m.hosts.is_empty() {
            "<host>".to_string()
        } else {
            m.hosts.join(" ")
        };
        let host = m.hosts.first().map_or("$host", String::as_str);
        let subject = &m.subject_header;
        let _ = writeln!(
            out,
            "\n# Mirror source `{name}`: the trusted site. Only a client certificate your CA signed\n\
             # gets in, and each request is mirrored to gatekeeper, which grants the client.\n\
             server {{\n    listen 443 ssl;\n    server_name {server_name};\n    \
             ssl_certificate <cert>;\n    ssl_certificate_key <key>;\n    \
             ssl_client_certificate <ca.pem>;\n    ssl_verify_client on;\n\n    \
             location / {{\n        mirror /_gatekeeper_mirror;\n        mirror_request_body off;\n        \
             proxy_pass <the trusted service>;\n    }}\n\n    \
             location = /_gatekeeper_mirror {{\n        internal;\n        \
             # gatekeeper decides on the Host; the path it sees is /_gatekeeper_mirror.\n        \
             proxy_pass {url};\n        proxy_pass_request_body off;\n        \
             proxy_set_header Content-Length \"\";\n        proxy_pass_request_headers off;\n        \
             proxy_set_header Host {host};\n        proxy_set_header X-Forwarded-For $remote_addr;\n        \
             # The verified certificate's subject, whatever the client sent (identity_header).\n        \
             proxy_set_header {subject} $ssl_client_s_dn;\n        \
             # A slow gatekeeper must not hold the trusted site's requests.\n        \
             proxy_connect_timeout 2s;\n        proxy_send_timeout 2s;\n        proxy_read_timeout 2s;\n    }}\n}}"
        );
    }
    for service in policy.services.keys() {
        let links = shares_of(policy, service);
        let _ = writeln!(
            out,
            "\n# Service `{service}`: only addresses gatekeeper allows for it get in.\n\
             server {{\n    listen 443 ssl;\n    server_name <{service} host>;\n    \
             ssl_certificate <cert>;\n    ssl_certificate_key <key>;\n\n    \
             location / {{\n        auth_request /_gatekeeper_allow;\n        \
             proxy_pass <the {service} service>;\n    }}"
        );
        for share in &links {
            let name = share.name;
            let _ = writeln!(
                out,
                "\n    # Share source `{name}`: exactly its link paths ask /share/{name}; a valid link\n    \
                 # grants the viewer, whose next requests pass `location /`.\n    \
                 location ~ {} {{\n        auth_request /_gatekeeper_share_{name};\n        \
                 # auth_request turns gatekeeper's 429 and 503 into 500: keep them.\n        \
                 auth_request_set $gatekeeper_status $upstream_status;\n        \
                 error_page 500 = @gatekeeper_refused;\n        \
                 proxy_pass <the {service} service>;\n    }}",
                nginx_quoted(&share.combined())
            );
        }
        let _ = writeln!(
            out,
            "\n    location = /_gatekeeper_allow {{\n        internal;\n        \
             proxy_pass {url}/allow/{service};\n        proxy_pass_request_body off;\n        \
             proxy_set_header Content-Length \"\";\n        proxy_pass_request_headers off;\n        \
             proxy_set_header X-Forwarded-For $remote_addr;\n    }}"
        );
        for share in &links {
            let name = share.name;
            let _ = writeln!(
                out,
                "\n    location = /_gatekeeper_share_{name} {{\n        internal;\n        \
                 proxy_pass {url}/share/{name};\n        proxy_pass_request_body off;\n        \
                 proxy_set_header Content-Length \"\";\n        proxy_pass_request_headers off;\n        \
                 proxy_set_header X-Forwarded-For $remote_addr;\n        \
                 proxy_set_header X-Forwarded-Uri $request_uri;\n        \
                 # gatekeeper asks the app, and may wait for Traefik to apply the grant.\n        \
                 proxy_read_timeout 15s;\n    }}"
            );
        }
        if !links.is_empty() {
            let _ = writeln!(
                out,
                "\n    location @gatekeeper_refused {{\n        \
                 if ($gatekeeper_status = 429) {{\n            return 429;\n        }}\n        \
                 if ($gatekeeper_status = 503) {{\n            return 503;\n        }}\n        \
                 return 500;\n    }}"
            );
        }
        let _ = writeln!(out, "}}");
    }
}

/// `regex` as one Caddyfile token: quoted when it holds whitespace or a quote.
fn caddy_token(regex: &str) -> String {
    if regex.contains(|c: char| c.is_whitespace() || c == '"') {
        format!("\"{}\"", regex.replace('"', "\\\""))
    } else {
        regex.to_string()
    }
}

fn caddy(out: &mut String, policy: &Policy, url: &str) {
    let _ = writeln!(
        out,
        "# ---- Caddy --------------------------------------------------------------\n\
         # Site blocks for a Caddyfile. gatekeeper must list Caddy's address in trusted_proxies.\n\
         # For certificates from ACME, drop the `tls <cert> <key>` lines (keep client_auth)."
    );
    let upstream = url
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    for m in mirrors(policy) {
        let name = m.name;
        let site = if m.hosts.is_empty() {
            "<host>".to_string()
        } else {
            m.hosts.join(", ")
        };
        let subject = &m.subject_header;
        let _ = writeln!(
            out,
            "\n# Mirror source `{name}`: Caddy cannot mirror, so the trusted site asks gatekeeper on every\n\
             # request; the question carries the site's Host, by which gatekeeper knows the source.\n\
             {site} {{\n    tls <cert> <key> {{\n        client_auth {{\n            mode require_and_verify\n            \
             trusted_ca_cert_file <ca.pem>\n        }}\n    }}\n    \
             forward_auth {upstream} {{\n        uri {{uri}}\n        \
             # The verified certificate's subject (identity_header). forward_auth passes the\n        \
             # client's headers on: this replaces any {subject} the client sent.\n        \
             header_up {subject} {{http.request.tls.client.subject}}\n    }}\n    \
             reverse_proxy <the trusted service>\n\n    \
             # gatekeeper unreachable: the site stays up; only the grant is missed.\n    \
             handle_errors {{\n        @gatekeeper_unreachable expression `{{err.status_code}} == 502`\n        \
             reverse_proxy @gatekeeper_unreachable <the trusted service>\n    }}\n}}"
        );
    }
    for service in policy.services.keys() {
        let links = shares_of(policy, service);
        let _ = writeln!(
            out,
            "\n# Service `{service}`: only addresses gatekeeper allows for it get in.\n\
             <{service} host> {{\n    tls <cert> <key>"
        );
        if links.is_empty() {
            let _ = writeln!(
                out,
                "    forward_auth {upstream} {{\n        uri /allow/{service}\n    }}\n    \
                 reverse_proxy <the {service} service>\n}}"
            );
            continue;
        }
        for share in &links {
            let name = share.name;
            let _ = writeln!(
                out,
                "\n    # Share source `{name}`: exactly its link paths ask /share/{name}; a valid link\n    \
                 # grants the viewer, whose next requests pass /allow.\n    \
                 @{name} path_regexp {}\n    handle @{name} {{\n        \
                 forward_auth {upstream} {{\n            uri /share/{name}\n        }}\n        \
                 reverse_proxy <the {service} service>\n    }}",
                caddy_token(&share.combined())
            );
        }
        let _ = writeln!(
            out,
            "    handle {{\n        forward_auth {upstream} {{\n            uri /allow/{service}\n        }}\n        \
             reverse_proxy <the {service} service>\n    }}\n}}"
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
            // Absolute: a policy test's `Jail` may have changed the working directory.
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/gatekeeper.example.yaml"
            ))
            .unwrap(),
            "example",
        )
        .unwrap();
        let all = render(
            &p,
            "http://gatekeeper:5000/",
            &[Proxy::Traefik, Proxy::Nginx, Proxy::Caddy],
        );
        for needle in [
            "traefik.http.routers.<immich router>.middlewares=gatekeeper-immich@file",
            "traefik.http.routers.<jellyfin router>.middlewares=gatekeeper-jellyfin@file",
            "home-assistant-mirrored:",
            "- url: http://gatekeeper:5000\n",
            "forwardauth.address=http://gatekeeper:5000/share/immich-share",
            "forwardauth.address=http://gatekeeper:5000/share/nextcloud-share",
            // Compose's `$$` for a literal `$`.
            "rule=Host(`<app host>`) && (PathRegexp(`^(?:/s/[A-Za-z0-9]{15})$$`))",
            "proxy_pass http://gatekeeper:5000/allow/nextcloud;",
            "proxy_set_header Host ha.example.com;",
            "proxy_pass http://gatekeeper:5000/share/immich-share;",
            "forward_auth gatekeeper:5000 {\n            uri /allow/immich",
            "proxy_pass http://gatekeeper:5000;\n",
            "proxy_set_header X-Client-Subject $ssl_client_s_dn;",
            "header_up X-Client-Subject {http.request.tls.client.subject}",
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

    #[test]
    fn v2_rules_are_mux_templates_without_capturing_groups() {
        for (pattern, template) in [
            (
                "^(?:/share/(?P<key>[A-Za-z0-9_-]{67}))$",
                Some("/{link:share/(?:[A-Za-z0-9_-]{67})}"),
            ),
            (
                "^(?:/s/[A-Za-z0-9]{15})$",
                Some("/{link:s/[A-Za-z0-9]{15}}"),
            ),
            (
                "^(?:^/(share|s)/[a-z]+$)$",
                Some("/{link:(?:share|s)/[a-z]+}"),
            ),
            ("^(?:/a/(?i)x|/b/[(|)])$", Some("/{link:a/(?i)x|b/[(|)]}")),
            // Every branch needs the leading slash that the template's `/` stands for.
            ("^(?:/a|b)$", None),
            ("^(?:.*/s/x)$", None),
        ] {
            assert_eq!(v2_path(pattern).as_deref(), template, "{pattern}");
        }
    }

    #[test]
    fn a_v2_policy_gets_no_v3_only_keys_and_labels_escape_dollars_for_compose() {
        let p = from_yaml_str(
            "traefik: { file: ./g.yml, version: 2 }\nservices: { immich: {} }\nsources:\n  \
             ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\" }\n  \
             s: { kind: share, upstream: http://immich:2283, path: '^/s/(?P<k>[a-z]+)$', unlocks: [immich] }\n",
            "t",
        )
        .unwrap();
        let text = render(&p, "http://gatekeeper:5000", &[Proxy::Traefik]);
        let code: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        for v3 in ["PathRegexp", "mirrorBody", "maxResponseBodySize"] {
            assert!(code.iter().all(|l| !l.contains(v3)), "{v3} in\n{text}");
        }
        assert!(text.contains("rule=Host(`<app host>`) && (Path(`/{link:s/(?:[a-z]+)}`))\""));
        assert!(text.contains("maxBodySize: 65536"), "{text}");
        let v3 = render(
            &from_yaml_str(
                "services: { immich: {} }\nsources:\n  s: { kind: share, upstream: http://i:1, \
                 path: '^/s/[a-z]+$', unlocks: [immich] }\n",
                "t",
            )
            .unwrap(),
            "http://gatekeeper:5000",
            &[Proxy::Traefik],
        );
        for label in v3.lines().filter(|l| l.starts_with("- \"")) {
            assert!(
                !label.replace("$$", "").contains('$'),
                "a single $ in {label}"
            );
        }
        assert!(v3.contains("PathRegexp(`^(?:/s/[a-z]+)$$`)"), "{v3}");
    }

    #[test]
    fn every_link_pattern_reaches_the_share_route() {
        let p = from_yaml_str(
            "services: { immich: {} }\nsources:\n  s:\n    kind: share\n    upstream: http://i:1\n    \
             patterns:\n      - path: '^/share/(?P<key>[a-z]+)$'\n      - path: '^/s/(?P<key>[a-z]+)$'\n    \
             unlocks: [immich]\n",
            "t",
        )
        .unwrap();
        let both = "^(?:/share/(?:[a-z]+))$|^(?:/s/(?:[a-z]+))$";
        let caddy = render(&p, "http://gatekeeper:5000", &[Proxy::Caddy]);
        assert!(
            caddy.contains(&format!("@s path_regexp {both}\n")),
            "{caddy}"
        );
        let nginx = render(&p, "http://gatekeeper:5000", &[Proxy::Nginx]);
        assert!(
            nginx.contains(&format!("location ~ \"{both}\" {{")),
            "{nginx}"
        );
    }
}
