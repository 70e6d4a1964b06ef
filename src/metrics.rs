//! Counters for `/metrics` (Prometheus text format). Events on slow paths (grants, removals,
//! share checks, writes) go into small labelled maps; requests, on the hot path, into a fixed
//! table of atomics. Gauges (entries per source and service) are read from the ledger at scrape
//! time, so they can never drift.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::server::{Class, ConnectionCounts};

/// Proxy-facing endpoints, for request counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// A mirrored request (by Host, or legacy catch-all).
    Mirror,
    /// `/share/{source}`.
    Share,
    /// `/allow/{service}`.
    Allow,
    /// `/traefik/dynamic.json`.
    DynamicJson,
    /// `/verify_share_request`.
    LegacyVerify,
    /// Anything else.
    Other,
}

const ENDPOINTS: [(Endpoint, &str); 6] = [
    (Endpoint::Mirror, "mirror"),
    (Endpoint::Share, "share"),
    (Endpoint::Allow, "allow"),
    (Endpoint::DynamicJson, "dynamic_json"),
    (Endpoint::LegacyVerify, "verify_share_request"),
    (Endpoint::Other, "other"),
];

/// The statuses gatekeeper answers with; anything else is counted as `other`.
const STATUSES: [u16; 9] = [200, 400, 401, 403, 404, 429, 431, 500, 503];

type Labelled = Mutex<BTreeMap<Vec<String>, u64>>;

/// Every counter gatekeeper keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[AtomicU64; STATUSES.len() + 1]; ENDPOINTS.len()],
    grants: Labelled,
    removals: Labelled,
    share_checks: Labelled,
    throttled: Labelled,
    writes: Labelled,
    /// Records in each share source's throttle table, as last seen (a gauge).
    throttle_records: Mutex<BTreeMap<String, u64>>,
    /// Open and refused connections, counted by the accept loops.
    pub connections: Arc<ConnectionCounts>,
}

fn bump(map: &Labelled, labels: &[&str]) {
    let mut m = map.lock().unwrap_or_else(PoisonError::into_inner);
    // A label set seen before is found without allocating its key (every grant and eviction
    // under churn comes here); the maps hold a few entries per source.
    let known = m
        .iter_mut()
        .find(|(key, _)| key.len() == labels.len() && key.iter().zip(labels).all(|(k, l)| k == l));
    match known {
        Some((_, n)) => *n += 1,
        None => {
            m.insert(labels.iter().map(|s| s.to_string()).collect(), 1);
        }
    }
}

impl Metrics {
    /// A request to `endpoint` answered with `status`.
    pub fn request(&self, endpoint: Endpoint, status: u16) {
        let e = ENDPOINTS
            .iter()
            .position(|(e, _)| *e == endpoint)
            .unwrap_or(5);
        let s = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        self.requests[e][s].fetch_add(1, Ordering::Relaxed);
    }

    /// A new entry for `source`.
    pub fn grant(&self, source: &str) {
        bump(&self.grants, &[source]);
    }

    /// An entry of `source` left: `reason` is evicted, expired or revoked.
    pub fn removal(&self, source: &str, reason: &str) {
        bump(&self.removals, &[source, reason]);
    }

    /// A share check of `source` ended with `outcome` (valid, invalid, refused, throttled,
    /// unreachable).
    pub fn share_check(&self, source: &str, outcome: &str) {
        bump(&self.share_checks, &[source, outcome]);
    }

    /// A client of `source` was banned for too many failed checks.
    pub fn throttled(&self, source: &str) {
        bump(&self.throttled, &[source]);
    }

    /// `source`'s throttle table holds `records` clients now.
    pub fn throttle_records(&self, source: &str, records: usize) {
        let mut m = self
            .throttle_records
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match m.get_mut(source) {
            Some(n) => *n = records as u64,
            None => {
                m.insert(source.to_string(), records as u64);
            }
        }
    }

    /// An output (`state`, `traefik`) was written (`ok`) or failed (`error`).
    pub fn write(&self, output: &str, result: &str) {
        bump(&self.writes, &[output, result]);
    }

    /// The Prometheus text exposition of every counter, plus the given gauges.
    /// `redis_up`: whether the shared store answers, when there is one.
    pub fn render(
        &self,
        entries_by_source: &[(String, usize)],
        allowed_by_service: &[(String, usize)],
        redis_up: Option<bool>,
    ) -> String {
        let mut out = String::new();
        family(
            &mut out,
            "gatekeeper_grants_total",
            "New entries granted, by source.",
            &["source"],
            &self.grants,
        );
        family(
            &mut out,
            "gatekeeper_removals_total",
            "Entries removed, by source and reason (evicted, expired, revoked).",
            &["source", "reason"],
            &self.removals,
        );
        family(
            &mut out,
            "gatekeeper_share_checks_total",
            "Share link checks, by source and outcome.",
            &["source", "outcome"],
            &self.share_checks,
        );
        family(
            &mut out,
            "gatekeeper_throttled_clients_total",
            "Clients banned for too many failed share checks, by source.",
            &["source"],
            &self.throttled,
        );
        family(
            &mut out,
            "gatekeeper_output_writes_total",
            "Output writes, by output (state, traefik, traefik_redis, redis) and result (ok, error).",
            &["output", "result"],
            &self.writes,
        );
        let throttle_records: Vec<(String, u64)> = self
            .throttle_records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(s, n)| (s.clone(), *n))
            .collect();
        series(
            &mut out,
            "gatekeeper_share_throttle_records",
            "gauge",
            "Clients tracked for share-check throttling (failures, bans, checks in flight), by source.",
            "source",
            &throttle_records,
        );
        let _ = writeln!(
            out,
            "# HELP gatekeeper_requests_total Proxy-facing requests, by endpoint and status.\n# TYPE gatekeeper_requests_total counter"
        );
        for (e, (_, endpoint)) in ENDPOINTS.iter().enumerate() {
            for (s, counter) in self.requests[e].iter().enumerate() {
                let n = counter.load(Ordering::Relaxed);
                if n == 0 {
                    continue;
                }
                let status = STATUSES.get(s).map_or("other".to_string(), u16::to_string);
                let _ = writeln!(
                    out,
                    "gatekeeper_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let classes = [Class::Trusted, Class::Untrusted, Class::Admin];
        let by_class = |count: fn(&ConnectionCounts, Class) -> u64| {
            classes.map(|c| (c.as_str().to_string(), count(&self.connections, c)))
        };
        series(
            &mut out,
            "gatekeeper_connections_open",
            "gauge",
            "Open connections, by class of peer (trusted proxy, untrusted, admin).",
            "class",
            &by_class(ConnectionCounts::open),
        );
        series(
            &mut out,
            "gatekeeper_connections_refused_total",
            "counter",
            "Connections closed at once because their class's budget was full.",
            "class",
            &by_class(ConnectionCounts::refused),
        );
        let count = |values: &[(String, usize)]| -> Vec<(String, u64)> {
            values.iter().map(|(v, n)| (v.clone(), *n as u64)).collect()
        };
        series(
            &mut out,
            "gatekeeper_entries",
            "gauge",
            "Current entries, by source.",
            "source",
            &count(entries_by_source),
        );
        series(
            &mut out,
            "gatekeeper_allowed_networks",
            "gauge",
            "Networks on each service's effective allow list (always_allow included).",
            "service",
            &count(allowed_by_service),
        );
        if let Some(up) = redis_up {
            let _ = writeln!(
                out,
                "# HELP gatekeeper_redis_up Whether the shared store (Redis) answered last time.\n\
                 # TYPE gatekeeper_redis_up gauge\ngatekeeper_redis_up {}",
                u8::from(up)
            );
        }
        out
    }
}

/// Label values are user-chosen names: escape what the text format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, help: &str, labels: &[&str], map: &Labelled) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    let map = map.lock().unwrap_or_else(PoisonError::into_inner);
    for (values, n) in map.iter() {
        let pairs: Vec<String> = labels
            .iter()
            .zip(values)
            .map(|(l, v)| format!("{l}=\"{}\"", escape(v)))
            .collect();
        let _ = writeln!(out, "{name}{{{}}} {n}", pairs.join(","));
    }
}

/// A family with one label: `kind` is `gauge` or `counter`.
fn series(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    values: &[(String, u64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (v, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {n}", escape(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges_in_text_format() {
        let m = Metrics::default();
        m.grant("ha");
        m.grant("ha");
        m.removal("ha", "expired");
        m.share_check("immich-share", "valid");
        m.request(Endpoint::Allow, 403);
        m.request(Endpoint::Allow, 403);
        m.request(Endpoint::Mirror, 299);
        m.throttle_records("immich-share", 7);
        m.throttle_records("immich-share", 3);
        let text = m.render(&[("ha".into(), 1)], &[("immich".into(), 3)], None);
        for line in [
            "gatekeeper_grants_total{source=\"ha\"} 2",
            "gatekeeper_removals_total{source=\"ha\",reason=\"expired\"} 1",
            "gatekeeper_share_checks_total{source=\"immich-share\",outcome=\"valid\"} 1",
            "gatekeeper_requests_total{endpoint=\"allow\",status=\"403\"} 2",
            "gatekeeper_requests_total{endpoint=\"mirror\",status=\"other\"} 1",
            "gatekeeper_entries{source=\"ha\"} 1",
            "gatekeeper_share_throttle_records{source=\"immich-share\"} 3",
            "gatekeeper_allowed_networks{service=\"immich\"} 3",
            "# TYPE gatekeeper_grants_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
