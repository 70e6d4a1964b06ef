//! A mirror source's settings, as the policy's `sources.<name>` with `kind: mirror` gives them
//! (read and checked by [`crate::policy`]).

use std::collections::BTreeMap;

/// A mirror source.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    /// Lower-case host names, without port.
    pub(crate) hosts: Vec<String>,
    /// Legacy mode: every request no other route claims counts as mirrored.
    pub(crate) catch_all: bool,
    /// The header in which the proxy passes the client certificate's subject (nginx
    /// `$ssl_client_s_dn`, Caddy `{http.request.tls.client.subject}`, or Traefik's
    /// `X-Forwarded-Tls-Client-Cert-Info`). The proxy must overwrite it on every request.
    pub(crate) identity_header: Option<http::HeaderName>,
    /// Certificate CN → the services that certificate unlocks (a subset of `unlocks`);
    /// identities not listed unlock all of `unlocks`.
    pub(crate) identities: BTreeMap<String, Vec<String>>,
}
