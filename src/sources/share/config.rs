//! A share source's settings, as the policy's `sources.<name>` with `kind: share` gives them
//! (read and checked by [`crate::policy`]).

use std::time::Duration;

/// A share source.
#[derive(Debug, Clone)]
pub struct Share {
    /// Origin of the sharing app (`scheme://host[:port]`), the only place checks are sent.
    pub upstream: http::Uri,
    /// Path patterns, anchored; a forwarded URI must match one before anything is sent.
    pub patterns: Vec<SharePattern>,
    /// How the upstream is asked and how hard it may be asked.
    pub(crate) check: ShareCheck,
}

impl PartialEq for Share {
    fn eq(&self, other: &Self) -> bool {
        self.upstream == other.upstream
            && self.patterns == other.patterns
            && self.check == other.check
    }
}

/// How a share source checks links upstream, and its brute-force limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShareCheck {
    /// HEAD instead of GET.
    pub(crate) head: bool,
    /// A check slower than this fails closed (503).
    pub(crate) timeout: Duration,
    /// Upstream statuses that mean "valid link".
    pub(crate) valid_status: Vec<u16>,
    /// Failed checks per client within `failure_window` before it is banned.
    pub(crate) max_failures: u32,
    /// Window in which failures are counted.
    pub(crate) failure_window: Duration,
    /// How long a client that failed too often gets 429 without the upstream being asked.
    pub(crate) ban: Duration,
    /// Upstream checks of this source in flight at once.
    pub(crate) max_concurrent_checks: usize,
    /// A valid answer is remembered this long, so one viewer's burst asks the upstream once.
    pub(crate) cache: Duration,
}

impl Default for ShareCheck {
    fn default() -> Self {
        ShareCheck {
            head: false,
            timeout: Duration::from_secs(3),
            valid_status: vec![200],
            max_failures: 5,
            failure_window: Duration::from_secs(600),
            ban: Duration::from_secs(3600),
            max_concurrent_checks: 8,
            cache: Duration::from_secs(60),
        }
    }
}

/// One accepted link shape of a share source.
#[derive(Debug, Clone)]
pub struct SharePattern {
    /// The anchored regex the forwarded path must match.
    pub regex: regex::Regex,
    /// Path and query to request on the upstream, with `{name}` for named captures; `None` checks
    /// the forwarded path and query as they are.
    pub(crate) check: Option<String>,
}

impl PartialEq for SharePattern {
    fn eq(&self, other: &Self) -> bool {
        self.regex.as_str() == other.regex.as_str() && self.check == other.check
    }
}
