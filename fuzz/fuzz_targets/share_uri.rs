//! The share-URI matcher and check-URL builder over arbitrary forwarded URIs. Invariant: a built
//! URL always has exactly the configured upstream's origin, carries no credentials, and exists
//! only for a path one of the source's patterns matches.
#![no_main]

use gatekeeper::policy::{SourceKind, from_yaml_str};
use gatekeeper::sources::share::{check_url, origin_of};
use libfuzzer_sys::fuzz_target;

const POLICY: &str = concat!(
    "services: { immich: {} }\n",
    "sources:\n",
    "  immich:\n",
    "    kind: share\n",
    "    upstream: http://immich_server:2283\n",
    "    unlocks: [immich]\n",
    "    patterns:\n",
    "      - { path: '^/share/(?P<key>[A-Za-z0-9_-]{67})$', check: '/api/shared-links/me?key={key}' }\n",
    "      - { path: '^/s/(?P<slug>[^/]+)$', check: '/api/shared-links/me?slug={slug}' }\n",
    "  lax:\n",
    "    kind: share\n",
    "    upstream: https://[2001:db8::1]:8443\n",
    "    unlocks: [immich]\n",
    "    path: '^/s/.+$'\n",
);

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = std::str::from_utf8(data) else {
        return;
    };
    static POLICY_ONCE: std::sync::OnceLock<gatekeeper::policy::Policy> =
        std::sync::OnceLock::new();
    let policy = POLICY_ONCE
        .get_or_init(|| from_yaml_str(POLICY, "fuzz").expect("the fuzz policy is valid"));
    for source in policy.sources.values() {
        let SourceKind::Share(share) = &source.kind else {
            continue;
        };
        if let Ok(url) = check_url(share, uri) {
            let origin = origin_of(&share.upstream);
            let built = format!(
                "{}://{}:{}",
                url.scheme(),
                match url.host() {
                    Some(url::Host::Ipv6(a)) => format!("[{a}]"),
                    Some(h) => h.to_string(),
                    None => String::new(),
                },
                url.port_or_known_default().unwrap_or(0)
            );
            assert_eq!(built, origin, "check url {url} for uri {uri:?}");
            assert!(url.username().is_empty() && url.password().is_none());
            let path = uri.split('?').next().unwrap_or(uri);
            assert!(
                share.patterns.iter().any(|p| p.regex.is_match(path)),
                "{uri:?} matched no pattern yet built {url}"
            );
        }
    }
});
