//! The outbound HTTP client, for every request gatekeeper makes itself: share-link checks,
//! Traefik API polling and notifications. No redirect is followed and no proxy is taken from the
//! environment (an upstream or a variable must not send a check elsewhere), and connecting is
//! bounded; each request sets its own timeout.

use std::time::Duration;

/// The client; one per process (its connection pool is shared).
pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("gatekeeper/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}
