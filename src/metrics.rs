//! Counters for `/metrics`, kept in a `prometheus-client` registry and written in the Prometheus
//! text format (0.0.4). Events on slow paths (grants, removals, share checks, writes) go into
//! labelled families; requests, on the hot path, into a fixed table of atomics that is read at
//! scrape time, as are the gauges (entries per source and service, from the ledger), so those
//! can never drift.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::server::{Class, ConnectionCounts};

/// The `Content-Type` of what [`Metrics::render`] writes: the Prometheus text format 0.0.4,
/// whose counters are declared under their `_total` names (OpenMetrics would declare them
/// without the suffix and end in `# EOF`).
pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Proxy-facing endpoints, for request counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
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

/// A gauge of a count.
type Level = Gauge<u64, AtomicU64>;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BySource {
    source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ByReason {
    source: String,
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ByOutcome {
    source: String,
    outcome: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ByOutput {
    output: String,
    result: String,
}

/// Every counter gatekeeper keeps.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// The families below, registered once with their names and help.
    registry: Registry,
    grants: Family<BySource, Counter>,
    removals: Family<ByReason, Counter>,
    share_checks: Family<ByOutcome, Counter>,
    throttled: Family<BySource, Counter>,
    writes: Family<ByOutput, Counter>,
    /// Records in each share source's throttle table, as last seen.
    throttle_records: Family<BySource, Level>,
    /// Plain atomics rather than a family: a family hashes its labels under a lock, too much for
    /// every proxied request.
    requests: [[AtomicU64; STATUSES.len() + 1]; ENDPOINTS.len()],
    /// Open and refused connections, counted by the accept loops.
    pub(crate) connections: Arc<ConnectionCounts>,
}

impl Default for Metrics {
    fn default() -> Self {
        let (grants, removals, share_checks) = Default::default();
        let (throttled, writes, throttle_records) = Default::default();
        // The registry appends `_total` to counters and a full stop to help texts.
        let mut registry = Registry::default();
        registry.register(
            "gatekeeper_grants",
            "New entries granted, by source",
            Family::clone(&grants),
        );
        registry.register(
            "gatekeeper_removals",
            "Entries removed, by source and reason (evicted, expired, revoked)",
            Family::clone(&removals),
        );
        registry.register(
            "gatekeeper_share_checks",
            "Share link checks, by source and outcome",
            Family::clone(&share_checks),
        );
        registry.register(
            "gatekeeper_throttled_clients",
            "Clients banned for too many failed share checks, by source",
            Family::clone(&throttled),
        );
        registry.register(
            "gatekeeper_output_writes",
            "Output writes, by output (state, traefik, traefik_redis, redis) and result (ok, error)",
            Family::clone(&writes),
        );
        registry.register(
            "gatekeeper_share_throttle_records",
            "Clients tracked for share-check throttling (failures, bans, checks in flight), by source",
            Family::clone(&throttle_records),
        );
        Metrics {
            registry,
            grants,
            removals,
            share_checks,
            throttled,
            writes,
            throttle_records,
            requests: Default::default(),
            connections: Arc::default(),
        }
    }
}

impl Metrics {
    /// A request to `endpoint` answered with `status`.
    pub(crate) fn request(&self, endpoint: Endpoint, status: u16) {
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
    pub(crate) fn grant(&self, source: &str) {
        let labels = BySource {
            source: source.to_string(),
        };
        self.grants.get_or_create(&labels).inc();
    }

    /// An entry of `source` left: `reason` is evicted, expired or revoked.
    pub(crate) fn removal(&self, source: &str, reason: &str) {
        let labels = ByReason {
            source: source.to_string(),
            reason: reason.to_string(),
        };
        self.removals.get_or_create(&labels).inc();
    }

    /// A share check of `source` ended with `outcome` (valid, invalid, refused, throttled,
    /// unreachable).
    pub(crate) fn share_check(&self, source: &str, outcome: &str) {
        let labels = ByOutcome {
            source: source.to_string(),
            outcome: outcome.to_string(),
        };
        self.share_checks.get_or_create(&labels).inc();
    }

    /// A client of `source` was banned for too many failed checks.
    pub(crate) fn throttled(&self, source: &str) {
        let labels = BySource {
            source: source.to_string(),
        };
        self.throttled.get_or_create(&labels).inc();
    }

    /// `source`'s throttle table holds `records` clients now.
    pub(crate) fn throttle_records(&self, source: &str, records: usize) {
        let labels = BySource {
            source: source.to_string(),
        };
        self.throttle_records
            .get_or_create(&labels)
            .set(records as u64);
    }

    /// An output (`state`, `traefik`) was written (`ok`) or failed (`error`).
    pub(crate) fn write(&self, output: &str, result: &str) {
        let labels = ByOutput {
            output: output.to_string(),
            result: result.to_string(),
        };
        self.writes.get_or_create(&labels).inc();
    }

    /// The Prometheus text exposition (see [`CONTENT_TYPE`]) of every counter, plus the given
    /// gauges. `redis_up`: whether the shared store answers, when there is one.
    pub(crate) fn render(
        &self,
        entries_by_source: &[(String, usize)],
        allowed_by_service: &[(String, usize)],
        redis_up: Option<bool>,
    ) -> String {
        let mut requests = Vec::new();
        for (row, (_, endpoint)) in self.requests.iter().zip(ENDPOINTS) {
            for (s, counter) in row.iter().enumerate() {
                let n = counter.load(Ordering::Relaxed);
                // A status never answered is not shown.
                if n == 0 {
                    continue;
                }
                let status = STATUSES.get(s).map_or("other".to_string(), u16::to_string);
                requests.push((vec![endpoint.to_string(), status], n));
            }
        }
        let classes = [Class::Trusted, Class::Untrusted, Class::Admin];
        let by_class = |count: fn(&ConnectionCounts, Class) -> u64| {
            classes
                .iter()
                .map(|c| (vec![c.as_str().to_string()], count(&self.connections, *c)))
                .collect()
        };
        let counts = |values: &[(String, usize)]| {
            values
                .iter()
                .map(|(v, n)| (vec![v.clone()], *n as u64))
                .collect()
        };
        let mut scrape = Registry::default();
        for family in [
            Scraped {
                name: "gatekeeper_requests",
                help: "Proxy-facing requests, by endpoint and status.",
                kind: MetricType::Counter,
                labels: &["endpoint", "status"],
                samples: requests,
            },
            Scraped {
                name: "gatekeeper_connections_open",
                help: "Open connections, by class of peer (trusted proxy, untrusted, admin).",
                kind: MetricType::Gauge,
                labels: &["class"],
                samples: by_class(ConnectionCounts::open),
            },
            Scraped {
                name: "gatekeeper_connections_refused",
                help: "Connections closed at once because their class's budget was full.",
                kind: MetricType::Counter,
                labels: &["class"],
                samples: by_class(ConnectionCounts::refused),
            },
            Scraped {
                name: "gatekeeper_entries",
                help: "Current entries, by source.",
                kind: MetricType::Gauge,
                labels: &["source"],
                samples: counts(entries_by_source),
            },
            Scraped {
                name: "gatekeeper_allowed_networks",
                help: "Networks on each service's effective allow list (always_allow included).",
                kind: MetricType::Gauge,
                labels: &["service"],
                samples: counts(allowed_by_service),
            },
        ] {
            scrape.register_collector(Box::new(family));
        }
        if let Some(up) = redis_up {
            scrape.register_collector(Box::new(Scraped {
                name: "gatekeeper_redis_up",
                help: "Whether the shared store (Redis) answered last time.",
                kind: MetricType::Gauge,
                labels: &[],
                samples: vec![(Vec::new(), u64::from(up))],
            }));
        }
        let mut out = String::new();
        for registry in [&self.registry, &scrape] {
            prometheus_text::encode(&mut out, registry).expect("writing to a String cannot fail");
        }
        out
    }
}

/// A family read at scrape time. Unlike a [`Family`], it keeps the order it is given (the
/// policy's, which readers of `/metrics` may rely on) and is declared even when empty.
#[derive(Debug)]
struct Scraped {
    /// Without `_total`: the encoder appends it to counters.
    name: &'static str,
    /// With its full stop: the registry adds one only to what is registered with it.
    help: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
    /// Each sample's label values (in the order of `labels`) and its value.
    samples: Vec<(Vec<String>, u64)>,
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(self.name, self.help, None, self.kind)?;
        for (values, n) in &self.samples {
            let labels: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            let sample = family.encode_family(&labels)?;
            match self.kind {
                MetricType::Counter => ConstCounter::new(*n).encode(sample)?,
                _ => ConstGauge::new(*n).encode(sample)?,
            }
        }
        Ok(())
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
        m.grant("a\"b\\c\nd");
        let text = m.render(&[("ha".into(), 1)], &[("immich".into(), 3)], Some(true));
        for line in [
            "gatekeeper_grants_total{source=\"ha\"} 2",
            "gatekeeper_removals_total{source=\"ha\",reason=\"expired\"} 1",
            "gatekeeper_share_checks_total{source=\"immich-share\",outcome=\"valid\"} 1",
            "gatekeeper_requests_total{endpoint=\"allow\",status=\"403\"} 2",
            "gatekeeper_requests_total{endpoint=\"mirror\",status=\"other\"} 1",
            "gatekeeper_entries{source=\"ha\"} 1",
            "gatekeeper_share_throttle_records{source=\"immich-share\"} 3",
            "gatekeeper_allowed_networks{service=\"immich\"} 3",
            "gatekeeper_connections_open{class=\"admin\"} 0",
            "gatekeeper_connections_refused_total{class=\"trusted\"} 0",
            "gatekeeper_redis_up 1",
            "# TYPE gatekeeper_grants_total counter",
            "# HELP gatekeeper_grants_total New entries granted, by source.",
            "# TYPE gatekeeper_requests_total counter",
            "# TYPE gatekeeper_entries gauge",
            // Label values are names from the policy: escaped as the text format requires.
            "gatekeeper_grants_total{source=\"a\\\"b\\\\c\\nd\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Prometheus text 0.0.4, not OpenMetrics: every sample under a family declared by its
        // own name, and no `# EOF`.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap();
            assert!(declared.contains(&name), "{name} undeclared in\n{text}");
        }
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains(".."), "{text}");
    }

    #[test]
    fn gauges_keep_the_order_they_are_given() {
        // The policy's order: tests/docker.rs compares the `gatekeeper_entries` lines in it.
        let m = Metrics::default();
        let sources = [
            ("zz".to_string(), 1),
            ("aa".to_string(), 0),
            ("mm".to_string(), 2),
        ];
        let text = m.render(&sources, &[], None);
        let shown: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("gatekeeper_entries{source=\""))
            .collect();
        assert_eq!(shown, ["zz\"} 1", "aa\"} 0", "mm\"} 2"], "{text}");
    }

    #[test]
    fn shows_the_shared_store_only_when_there_is_one() {
        let m = Metrics::default();
        let text = m.render(&[], &[], None);
        assert!(!text.contains("gatekeeper_redis_up"), "{text}");
        let text = m.render(&[], &[], Some(false));
        assert!(text.lines().any(|l| l == "gatekeeper_redis_up 0"), "{text}");
    }
}
