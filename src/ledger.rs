//! The ledger: per-source entries (network, first and last seen, hits, identity) kept within their
//! limits (LRU by last seen, idle TTL, maximum age), and the snapshots that give each service its
//! effective allow list. Pure: every operation takes `now`, so tests drive the clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indexmap::IndexMap;
use ipnet::IpNet;

use crate::policy::{Limits, Policy, SourceKind};

/// Milliseconds since the Unix epoch: wall-clock time, because entries outlive the process.
pub type Millis = u64;

/// The current wall-clock time in [`Millis`].
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

fn ms(d: Duration) -> Millis {
    d.as_millis().min(u64::MAX as u128) as Millis
}

/// The part of an entry a known client's request updates. Atomics, so that path needs no lock:
/// the snapshot hands out the same `Arc` the ledger holds.
#[derive(Debug, Default)]
pub struct Activity {
    last_seen: AtomicU64,
    hits: AtomicU64,
}

impl Activity {
    fn new(now: Millis, hits: u64) -> Self {
        Activity {
            last_seen: AtomicU64::new(now),
            hits: AtomicU64::new(hits),
        }
    }

    /// Record a request seen at `now`.
    pub fn touch(&self, now: Millis) {
        self.last_seen.fetch_max(now, Ordering::Relaxed);
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// When the entry was last seen.
    pub fn last_seen(&self) -> Millis {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// How many requests the entry has seen.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Catch up with what another replica saw (never goes back).
    fn raise(&self, last_seen: Millis, hits: u64) {
        self.last_seen.fetch_max(last_seen, Ordering::Relaxed);
        self.hits.fetch_max(hits, Ordering::Relaxed);
    }
}

/// One allowed network of one source.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The granted network (/32, or the IPv6 prefix).
    pub network: IpNet,
    /// When it was first granted.
    pub first_seen: Millis,
    /// Who proved trust, when the source knows (a certificate's CN).
    pub identity: Option<String>,
    /// A fixed end set by an operator's grant (`ttl`), on top of the source's limits.
    pub until: Option<Millis>,
    activity: Arc<Activity>,
}

impl Entry {
    /// When the entry was last seen.
    pub fn last_seen(&self) -> Millis {
        self.activity.last_seen()
    }

    /// How many requests the entry has seen.
    pub fn hits(&self) -> u64 {
        self.activity.hits()
    }

    /// When the entry expires under `limits`, or `None` if it never does.
    pub fn expires_at(&self, limits: &Limits) -> Option<Millis> {
        let idle = limits
            .idle_ttl
            .map(|t| self.last_seen().saturating_add(ms(t)));
        let age = limits
            .max_age
            .map(|t| self.first_seen.saturating_add(ms(t)));
        [idle, age, self.until].into_iter().flatten().min()
    }

    /// A new entry as `r` describes it.
    fn from_restore(r: Restore) -> Entry {
        Entry {
            network: r.network,
            first_seen: r.first_seen,
            identity: r.identity,
            until: r.until,
            activity: Arc::new(Activity::new(r.last_seen, r.hits)),
        }
    }

    /// The entry as the state file (or the shared store) keeps it.
    pub fn to_restore(&self) -> Restore {
        Restore {
            network: self.network,
            first_seen: self.first_seen,
            last_seen: self.last_seen(),
            hits: self.hits(),
            identity: self.identity.clone(),
            until: self.until,
        }
    }

    /// Take what the shared store says of this entry, keeping the activity handle (raised, never
    /// lowered) so lock-free refreshes in flight are not lost. Returns whether the identity
    /// changed, which can change what a snapshot shows.
    fn update(&mut self, r: Restore) -> bool {
        self.activity.raise(r.last_seen, r.hits);
        let changed = self.identity != r.identity;
        self.first_seen = r.first_seen;
        self.identity = r.identity;
        self.until = r.until;
        changed
    }

    /// LRU order: least recently seen first; ties broken so eviction is deterministic.
    fn lru_key(&self) -> (Millis, Millis, IpNet) {
        (self.last_seen(), self.first_seen, self.network)
    }
}

/// An entry as read back from the state file.
#[derive(Debug, Clone)]
pub struct Restore {
    /// The network.
    pub network: IpNet,
    /// First granted.
    pub first_seen: Millis,
    /// Last seen.
    pub last_seen: Millis,
    /// Requests seen.
    pub hits: u64,
    /// Who proved trust.
    pub identity: Option<String>,
    /// A fixed end, if an operator set one.
    pub until: Option<Millis>,
}

/// Why an entry left the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Pushed out by a newer client (LRU, `max_ips`).
    Evicted,
    /// Not seen for `idle_ttl`.
    Idle,
    /// Older than `max_age`.
    MaxAge,
    /// Removed by an operator or a policy change.
    Revoked,
}

impl Removal {
    /// The metrics label: evicted, expired or revoked.
    pub fn metric(self) -> &'static str {
        match self {
            Removal::Evicted => "evicted",
            Removal::Idle | Removal::MaxAge => "expired",
            Removal::Revoked => "revoked",
        }
    }

    /// Lower-case word for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Removal::Evicted => "evicted",
            Removal::Idle => "expired (idle)",
            Removal::MaxAge => "expired (max age)",
            Removal::Revoked => "revoked",
        }
    }
}

/// An entry that left the ledger, for logs, metrics and notifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The source it belonged to.
    pub source: String,
    /// The network.
    pub network: IpNet,
    /// Its identity, if known.
    pub identity: Option<String>,
    /// Why it left.
    pub why: Removal,
}

/// What recording a client did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The client already had an entry; it was refreshed.
    Known,
    /// The client already had an entry, now under another identity: its lists may differ.
    Reidentified,
    /// A new entry; `evicted` lists what made room for it.
    New {
        /// Entries pushed out by the limit.
        evicted: Vec<Removed>,
    },
    /// Sent to the shared store, which decides; its outcome is logged when it answers.
    Pending,
}

struct Book {
    limits: Limits,
    entries: HashMap<IpNet, Entry>,
}

impl Book {
    /// Evict least recently seen entries (never `keep`) until at most `max` remain.
    fn evict_to(&mut self, source: &str, max: usize, keep: Option<IpNet>) -> Vec<Removed> {
        let mut removed = Vec::new();
        while self.entries.len() > max {
            let victim = self
                .entries
                .values()
                .filter(|e| Some(e.network) != keep)
                .min_by_key(|e| e.lru_key())
                .map(|e| e.network);
            let Some(victim) = victim else { break };
            if let Some(e) = self.entries.remove(&victim) {
                removed.push(Removed {
                    source: source.to_string(),
                    network: e.network,
                    identity: e.identity,
                    why: Removal::Evicted,
                });
            }
        }
        removed
    }
}

/// Every source's entries, within its limits.
#[derive(Default)]
pub struct Ledger {
    books: IndexMap<String, Book>,
}

impl Ledger {
    /// An empty ledger for `policy`'s sources.
    pub fn new(policy: &Policy) -> Self {
        let mut ledger = Ledger::default();
        ledger.apply_policy(policy);
        ledger
    }

    /// Adopt a (re)loaded policy: entries of removed sources are dropped, lowered limits evict the
    /// least recently seen. Returns what was removed.
    pub fn apply_policy(&mut self, policy: &Policy) -> Vec<Removed> {
        let mut removed = Vec::new();
        let old = std::mem::take(&mut self.books);
        for (name, mut book) in old {
            if policy.sources.contains_key(&name) {
                self.books.insert(name, book);
            } else {
                removed.extend(book.entries.drain().map(|(_, e)| Removed {
                    source: name.clone(),
                    network: e.network,
                    identity: e.identity,
                    why: Removal::Revoked,
                }));
            }
        }
        for (name, source) in &policy.sources {
            let book = self.books.entry(name.clone()).or_insert_with(|| Book {
                limits: source.limits,
                entries: HashMap::new(),
            });
            book.limits = source.limits;
            removed.extend(book.evict_to(name, source.limits.max_ips, None));
        }
        // Keep policy order so snapshots and state files are deterministic.
        self.books
            .sort_by_cached_key(|name, _| policy.sources.get_index_of(name));
        removed.sort_by(|a, b| (&a.source, a.network).cmp(&(&b.source, b.network)));
        removed
    }

    /// Record that `network` proved trust through `source` at `now`. Unknown sources record
    /// nothing (`None`): the caller routed a request to a source the policy no longer has.
    pub fn record(
        &mut self,
        source: &str,
        network: IpNet,
        now: Millis,
        identity: Option<&str>,
    ) -> Option<Recorded> {
        let book = self.books.get_mut(source)?;
        if let Some(entry) = book.entries.get_mut(&network) {
            entry.activity.touch(now);
            if identity.is_some() && entry.identity.as_deref() != identity {
                entry.identity = identity.map(str::to_string);
                return Some(Recorded::Reidentified);
            }
            return Some(Recorded::Known);
        }
        book.entries.insert(
            network,
            Entry {
                network,
                first_seen: now,
                identity: identity.map(str::to_string),
                until: None,
                activity: Arc::new(Activity::new(now, 1)),
            },
        );
        let max = book.limits.max_ips;
        let evicted = book.evict_to(source, max, Some(network));
        Some(Recorded::New { evicted })
    }

    /// Set a fixed end on an entry (an operator's grant with a TTL). Returns false when there is
    /// no such entry.
    pub fn set_until(&mut self, source: &str, network: IpNet, until: Option<Millis>) -> bool {
        match self
            .books
            .get_mut(source)
            .and_then(|b| b.entries.get_mut(&network))
        {
            Some(e) => {
                e.until = until;
                true
            }
            None => false,
        }
    }

    /// Put back an entry read from the state file, as it was. Returns false for an unknown source.
    pub fn restore(&mut self, source: &str, stored: Restore) -> bool {
        let Some(book) = self.books.get_mut(source) else {
            return false;
        };
        book.entries
            .insert(stored.network, Entry::from_restore(stored));
        true
    }

    /// Add `r` to `source`, or update the entry it already has (see [`Entry`]'s update: the
    /// activity handle is kept). Returns false for an unknown source.
    pub fn upsert(&mut self, source: &str, r: Restore) -> bool {
        let Some(book) = self.books.get_mut(source) else {
            return false;
        };
        match book.entries.get_mut(&r.network) {
            Some(e) => {
                e.update(r);
            }
            None => {
                book.entries.insert(r.network, Entry::from_restore(r));
            }
        }
        true
    }

    /// Make `source`'s entries exactly `entries` (the shared store's view); entries already
    /// here are updated in place (their activity handles kept). Returns the networks added, the
    /// networks removed, and whether anything a snapshot shows changed; `None` for an unknown
    /// source.
    pub fn sync_source(
        &mut self,
        source: &str,
        entries: Vec<Restore>,
    ) -> Option<(Vec<IpNet>, Vec<IpNet>, bool)> {
        let book = self.books.get_mut(source)?;
        let mut old = std::mem::take(&mut book.entries);
        let mut added = Vec::new();
        let mut changed = false;
        for r in entries {
            let entry = match old.remove(&r.network) {
                Some(mut e) => {
                    changed |= e.update(r);
                    e
                }
                None => {
                    added.push(r.network);
                    Entry::from_restore(r)
                }
            };
            book.entries.insert(entry.network, entry);
        }
        let mut removed: Vec<IpNet> = old.into_keys().collect();
        removed.sort();
        changed |= !added.is_empty() || !removed.is_empty();
        Some((added, removed, changed))
    }

    /// Remove one entry, as `why`.
    pub fn remove(&mut self, source: &str, network: IpNet, why: Removal) -> Option<Removed> {
        let e = self.books.get_mut(source)?.entries.remove(&network)?;
        Some(Removed {
            source: source.to_string(),
            network,
            identity: e.identity,
            why,
        })
    }

    /// Enforce every source's limit after a restore; returns the evicted entries.
    pub fn enforce_limits(&mut self) -> Vec<Removed> {
        let mut removed = Vec::new();
        for (name, book) in &mut self.books {
            let max = book.limits.max_ips;
            removed.extend(book.evict_to(name, max, None));
        }
        removed
    }

    /// Remove `network` from `source`, or from every source when `source` is `None`.
    pub fn revoke(&mut self, network: IpNet, source: Option<&str>) -> Vec<Removed> {
        let mut removed = Vec::new();
        for (name, book) in &mut self.books {
            if source.is_some_and(|s| s != name) {
                continue;
            }
            if let Some(e) = book.entries.remove(&network) {
                removed.push(Removed {
                    source: name.clone(),
                    network,
                    identity: e.identity,
                    why: Removal::Revoked,
                });
            }
        }
        removed
    }

    /// Remove every entry that is due at `now` (idle, too old, or past its fixed end), then hold
    /// every source to its `max_ips` (a no-op here, where every change already does; the shared
    /// store needs it, where replicas may briefly run different limits). An entry both idle and
    /// too old is reported by the deadline it passed first, max age on a tie: when expiry runs
    /// (at once, a tick later, after a restart) must not change the reason.
    pub fn expire(&mut self, now: Millis) -> Vec<Removed> {
        let mut removed = Vec::new();
        for (name, book) in &mut self.books {
            let limits = book.limits;
            book.entries.retain(|_, e| {
                let idle_at = limits.idle_ttl.map(|t| e.last_seen().saturating_add(ms(t)));
                let aged_at = [
                    limits.max_age.map(|t| e.first_seen.saturating_add(ms(t))),
                    e.until,
                ]
                .into_iter()
                .flatten()
                .min();
                let why = match (idle_at, aged_at) {
                    (_, Some(aged)) if aged <= now && idle_at.is_none_or(|idle| aged <= idle) => {
                        Removal::MaxAge
                    }
                    (Some(idle), _) if idle <= now => Removal::Idle,
                    _ => return true,
                };
                removed.push(Removed {
                    source: name.clone(),
                    network: e.network,
                    identity: e.identity.clone(),
                    why,
                });
                false
            });
            let max = book.limits.max_ips;
            removed.extend(book.evict_to(name, max, None));
        }
        removed.sort_by(|a, b| (&a.source, a.network).cmp(&(&b.source, b.network)));
        removed
    }

    /// When the next entry is due to expire, if any ever is.
    pub fn next_due(&self) -> Option<Millis> {
        self.books
            .values()
            .flat_map(|b| b.entries.values().filter_map(|e| e.expires_at(&b.limits)))
            .min()
    }

    /// Every entry with its source, in source order then network order.
    pub fn entries(&self) -> Vec<(&str, &Entry)> {
        let mut out = Vec::new();
        for (name, book) in &self.books {
            let mut entries: Vec<&Entry> = book.entries.values().collect();
            entries.sort_by_key(|e| e.network);
            out.extend(entries.into_iter().map(|e| (name.as_str(), e)));
        }
        out
    }

    /// Is `network` an entry of `source`?
    pub fn contains(&self, source: &str, network: IpNet) -> bool {
        self.books
            .get(source)
            .is_some_and(|b| b.entries.contains_key(&network))
    }

    /// The effective allow list of every service, and the lock-free handles of live entries.
    pub fn snapshot(&self, policy: &Policy) -> Snapshot {
        self.snapshot_of(policy, |_, _| true)
    }

    /// A snapshot holding only the entries `keep` accepts (by source and network).
    pub fn snapshot_of(&self, policy: &Policy, keep: impl Fn(&str, &IpNet) -> bool) -> Snapshot {
        let mut services = Vec::with_capacity(policy.services.len());
        for (name, service) in &policy.services {
            let mut allowed: Vec<IpNet> = policy.always_allow.clone();
            allowed.extend(service.always_allow.iter().copied());
            for (source_name, source) in &policy.sources {
                if !source.unlocks.iter().any(|s| s == name) {
                    continue;
                }
                let rules = match &source.kind {
                    SourceKind::Mirror(m) if !m.identities.is_empty() => Some(&m.identities),
                    _ => None,
                };
                if let Some(book) = self.books.get(source_name) {
                    allowed.extend(
                        book.entries
                            .values()
                            .filter(|e| identity_unlocks(rules, e.identity.as_deref(), name))
                            .filter(|e| keep(source_name, &e.network))
                            .map(|e| e.network),
                    );
                }
            }
            allowed.sort();
            allowed.dedup();
            services.push(ServiceList {
                name: name.clone(),
                allowed,
            });
        }
        let live = self
            .books
            .iter()
            .map(|(name, book)| {
                let set = book
                    .entries
                    .iter()
                    .map(|(net, e)| {
                        let live = Live {
                            activity: e.activity.clone(),
                            identity: e.identity.as_deref().map(Box::from),
                        };
                        (*net, live)
                    })
                    .collect();
                (name.clone(), set)
            })
            .collect();
        Snapshot { services, live }
    }
}

/// What every sink renders and every decision is judged on: each service's effective allow list.
/// Immutable once built; a new one is swapped in whenever a list changes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Services in name order (figment reads maps sorted by key).
    pub services: Vec<ServiceList>,
    live: HashMap<String, HashMap<IpNet, Live>>,
}

/// A live entry as a snapshot sees it: enough to refresh it without the ledger's lock.
#[derive(Debug, Clone)]
pub struct Live {
    /// Shared with the ledger's entry.
    pub activity: Arc<Activity>,
    /// The entry's identity when the snapshot was taken.
    pub identity: Option<Box<str>>,
}

/// Does an entry with `identity` reach `service`? Identities with a rule reach what the rule
/// lists; every other entry reaches everything its source unlocks.
fn identity_unlocks(
    rules: Option<&std::collections::BTreeMap<String, Vec<String>>>,
    identity: Option<&str>,
    service: &str,
) -> bool {
    match (rules, identity) {
        (Some(rules), Some(cn)) => rules
            .get(cn)
            .is_none_or(|services| services.iter().any(|s| s == service)),
        _ => true,
    }
}

impl Snapshot {
    /// A snapshot holding only service lists (renderer tests, tools).
    pub fn from_services(services: Vec<ServiceList>) -> Self {
        Snapshot {
            services,
            live: HashMap::new(),
        }
    }

    /// A live entry of `source`, so a known client is refreshed without a lock.
    pub fn live(&self, source: &str, network: &IpNet) -> Option<&Live> {
        self.live.get(source)?.get(network)
    }

    /// The list of `service`, if it exists.
    pub fn service(&self, service: &str) -> Option<&ServiceList> {
        self.services.iter().find(|s| s.name == service)
    }

    /// Do the allow lists (what sinks render) differ from `other`'s?
    pub fn same_lists(&self, other: &Snapshot) -> bool {
        self.services == other.services
    }
}

/// One service's effective allow list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceList {
    /// The service name from the policy.
    pub name: String,
    /// global `always_allow` ∪ the service's `always_allow` ∪ live entries of every source that
    /// unlocks it; sorted and de-duplicated, so the same state always renders the same bytes.
    pub allowed: Vec<IpNet>,
}

impl ServiceList {
    /// Is `ip` inside one of the allowed networks?
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allowed.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::from_yaml_str;

    const MIN: Millis = 60_000;

    fn policy(extra: &str) -> Policy {
        let yaml = format!(
            "always_allow: [192.168.0.0/16]\n\
             services:\n  immich: {{}}\n  nextcloud: {{}}\n  jellyfin: {{ always_allow: [203.0.113.7] }}\n\
             sources:\n  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n    max_ips: 2\n    idle_ttl: 10m\n{extra}"
        );
        from_yaml_str(&yaml, "test").unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn lru_evicts_least_recently_seen_not_first_granted() {
        let p = policy("");
        let mut l = Ledger::new(&p);
        l.record("ha", net("1.1.1.1/32"), 1000, None);
        l.record("ha", net("2.2.2.2/32"), 2000, None);
        // The first one is seen again: now the second is the least recently seen.
        assert_eq!(
            l.record("ha", net("1.1.1.1/32"), 3000, None),
            Some(Recorded::Known)
        );
        let r = l.record("ha", net("3.3.3.3/32"), 4000, None).unwrap();
        let Recorded::New { evicted } = r else {
            panic!("expected a new entry, got {r:?}")
        };
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].network, net("2.2.2.2/32"));
        assert_eq!(evicted[0].why, Removal::Evicted);
        assert!(l.contains("ha", net("1.1.1.1/32")));
        assert!(l.contains("ha", net("3.3.3.3/32")));
        assert!(!l.contains("ha", net("2.2.2.2/32")));
    }

    #[test]
    fn the_new_entry_is_never_its_own_victim() {
        let p = policy("");
        let mut l = Ledger::new(&p);
        // Same millisecond for all three: ties must not evict the newcomer.
        l.record("ha", net("9.9.9.9/32"), 1000, None);
        l.record("ha", net("8.8.8.8/32"), 1000, None);
        l.record("ha", net("1.1.1.1/32"), 1000, None);
        assert!(l.contains("ha", net("1.1.1.1/32")));
        assert_eq!(l.entries().len(), 2);
    }

    #[test]
    fn idle_ttl_and_max_age_expire_and_next_due_follows() {
        let p = policy(
            "  share:\n    kind: share\n    upstream: http://immich:2283\n    path: '^/share/[a-z]+$'\n    unlocks: [immich]\n    max_ips: 5\n    idle_ttl: 12h\n    max_age: 30m\n",
        );
        let mut l = Ledger::new(&p);
        l.record("ha", net("1.1.1.1/32"), 0, None);
        l.record("share", net("2.2.2.2/32"), 0, None);
        assert_eq!(l.next_due(), Some(10 * MIN));
        // Seen again at 5 min: idle expiry moves to 15 min.
        l.record("ha", net("1.1.1.1/32"), 5 * MIN, None);
        assert!(l.expire(10 * MIN).is_empty());
        assert_eq!(l.next_due(), Some(15 * MIN));
        let gone = l.expire(15 * MIN);
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].network, gone[0].why),
            (net("1.1.1.1/32"), Removal::Idle)
        );
        // The share entry is kept busy but hits max_age at 30 min.
        for t in [16, 20, 25, 29] {
            l.record("share", net("2.2.2.2/32"), t * MIN, None);
        }
        let gone = l.expire(30 * MIN);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].why, Removal::MaxAge);
        assert_eq!(l.next_due(), None);
    }

    #[test]
    fn expiry_reports_the_deadline_passed_first_and_holds_max_ips() {
        let p = policy("");
        let mut l = Ledger::new(&p);
        // More entries than max_ips (2), as a replica with a higher limit may leave them in the
        // shared store: expiry evicts the least recently seen down to the limit.
        for (i, t) in [(1, 3 * MIN), (2, MIN), (3, 2 * MIN)] {
            let network = net(&format!("198.51.100.{i}/32"));
            let r = Restore {
                network,
                first_seen: 0,
                last_seen: t,
                hits: 1,
                identity: None,
                until: None,
            };
            l.restore("ha", r);
        }
        let gone = l.expire(4 * MIN);
        assert_eq!(
            gone.iter().map(|r| (r.network, r.why)).collect::<Vec<_>>(),
            vec![(net("198.51.100.2/32"), Removal::Evicted)]
        );
        // Idle at 13 min (10 min idle_ttl), past its fixed end at 15 min, looked at only at 20:
        // idle, as it would have been reported at 13.
        l.set_until("ha", net("198.51.100.1/32"), Some(15 * MIN));
        // A fixed end before the idle deadline is the reason, however late expiry runs.
        l.set_until("ha", net("198.51.100.3/32"), Some(5 * MIN));
        let gone = l.expire(20 * MIN);
        assert_eq!(
            gone.iter().map(|r| (r.network, r.why)).collect::<Vec<_>>(),
            vec![
                (net("198.51.100.1/32"), Removal::Idle),
                (net("198.51.100.3/32"), Removal::MaxAge)
            ]
        );
    }

    #[test]
    fn snapshot_is_the_union_sorted_and_deduplicated() {
        let p = policy(
            "  share:\n    kind: share\n    upstream: http://immich:2283\n    path: '^/share/[a-z]+$'\n    unlocks: [immich]\n    max_ips: 5\n",
        );
        let mut l = Ledger::new(&p);
        l.record("ha", net("9.9.9.9/32"), 0, None);
        l.record("share", net("9.9.9.9/32"), 0, None);
        l.record("share", net("2001:db8::/64"), 0, None);
        l.record("share", net("1.1.1.1/32"), 0, None);
        let s = l.snapshot(&p);
        let lists: Vec<(&str, Vec<String>)> = s
            .services
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.allowed.iter().map(|n| n.to_string()).collect(),
                )
            })
            .collect();
        assert_eq!(
            lists,
            vec![
                (
                    "immich",
                    vec![
                        "1.1.1.1/32",
                        "9.9.9.9/32",
                        "192.168.0.0/16",
                        "2001:db8::/64"
                    ]
                    .into_iter()
                    .map(String::from)
                    .collect()
                ),
                (
                    "jellyfin",
                    vec![
                        "9.9.9.9/32".to_string(),
                        "192.168.0.0/16".to_string(),
                        "203.0.113.7/32".to_string()
                    ]
                ),
                (
                    "nextcloud",
                    vec!["9.9.9.9/32".to_string(), "192.168.0.0/16".to_string()]
                ),
            ]
        );
        // The same state in another insertion order gives the same lists.
        let mut l2 = Ledger::new(&p);
        l2.record("share", net("1.1.1.1/32"), 0, None);
        l2.record("share", net("2001:db8::/64"), 0, None);
        l2.record("share", net("9.9.9.9/32"), 0, None);
        l2.record("ha", net("9.9.9.9/32"), 0, None);
        assert!(l2.snapshot(&p).same_lists(&s));
    }

    #[test]
    fn snapshot_activity_handle_refreshes_the_ledger_entry() {
        let p = policy("");
        let mut l = Ledger::new(&p);
        l.record("ha", net("1.1.1.1/32"), 0, None);
        let s = l.snapshot(&p);
        s.live("ha", &net("1.1.1.1/32"))
            .unwrap()
            .activity
            .touch(7 * MIN);
        assert_eq!(l.next_due(), Some(17 * MIN));
        assert_eq!(l.entries()[0].1.hits(), 2);
        assert!(s.live("ha", &net("2.2.2.2/32")).is_none());
    }

    #[test]
    fn policy_change_drops_removed_sources_and_lowered_limits_evict() {
        let p = policy(
            "  share:\n    kind: share\n    upstream: http://immich:2283\n    path: '^/share/[a-z]+$'\n    unlocks: [immich]\n    max_ips: 5\n",
        );
        let mut l = Ledger::new(&p);
        for (i, t) in [(1, 10), (2, 30), (3, 20)] {
            l.record("share", net(&format!("10.0.0.{i}/32")), t, None);
        }
        l.record("ha", net("1.1.1.1/32"), 0, None);
        let lowered = policy(
            "  share:\n    kind: share\n    upstream: http://immich:2283\n    path: '^/share/[a-z]+$'\n    unlocks: [immich]\n    max_ips: 1\n",
        );
        let removed = l.apply_policy(&lowered);
        assert_eq!(
            removed.iter().map(|r| r.network).collect::<Vec<_>>(),
            vec![net("10.0.0.1/32"), net("10.0.0.3/32")]
        );
        assert!(l.contains("share", net("10.0.0.2/32")));
        let removed = l.apply_policy(&policy(""));
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].why, Removal::Revoked);
        assert!(l.contains("ha", net("1.1.1.1/32")));
    }

    #[test]
    fn an_identity_rule_narrows_what_an_entry_unlocks() {
        let p = from_yaml_str(
            "services: { immich: {}, nextcloud: {} }\nsources:\n  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n    identity_header: X-Client-Subject\n    identities: { \"CN=alice\": [immich] }\n",
            "t",
        )
        .unwrap();
        let mut l = Ledger::new(&p);
        l.record("ha", net("1.1.1.1/32"), 0, Some("alice"));
        l.record("ha", net("2.2.2.2/32"), 0, Some("bob"));
        l.record("ha", net("3.3.3.3/32"), 0, None);
        let s = l.snapshot(&p);
        let list = |svc: &str| s.service(svc).unwrap().allowed.clone();
        assert_eq!(
            list("immich"),
            vec![net("1.1.1.1/32"), net("2.2.2.2/32"), net("3.3.3.3/32")]
        );
        assert_eq!(
            list("nextcloud"),
            vec![net("2.2.2.2/32"), net("3.3.3.3/32")]
        );
        assert_eq!(
            s.live("ha", &net("1.1.1.1/32"))
                .unwrap()
                .identity
                .as_deref(),
            Some("alice")
        );
    }

    #[test]
    fn revoke_narrows_by_source() {
        let p = policy(
            "  share:\n    kind: share\n    upstream: http://immich:2283\n    path: '^/share/[a-z]+$'\n    unlocks: [immich]\n",
        );
        let mut l = Ledger::new(&p);
        l.record("ha", net("1.1.1.1/32"), 0, None);
        l.record("share", net("1.1.1.1/32"), 0, None);
        assert_eq!(l.revoke(net("1.1.1.1/32"), Some("share")).len(), 1);
        assert!(l.contains("ha", net("1.1.1.1/32")));
        assert_eq!(l.revoke(net("1.1.1.1/32"), None).len(), 1);
        assert!(l.entries().is_empty());
        assert_eq!(l.record("nope", net("1.1.1.1/32"), 0, None), None);
    }
}
