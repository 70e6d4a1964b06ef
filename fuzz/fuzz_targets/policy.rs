//! The policy loader over arbitrary YAML: never panics; every refusal lists at least one problem.
#![no_main]

use gatekeeper::policy::{PolicyError, from_yaml_str};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match from_yaml_str(text, "fuzz") {
        Ok(policy) => {
            assert!(!policy.services.is_empty() && !policy.sources.is_empty());
            for source in policy.sources.values() {
                assert!(source.limits.max_ips >= 1);
            }
        }
        Err(PolicyError::Invalid { problems, .. }) => assert!(!problems.is_empty()),
        Err(_) => {}
    }
});
