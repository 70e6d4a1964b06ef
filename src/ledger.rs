//! The ledger: per-source entries (network, first and last seen, hits, identity) kept within their
//! limits (LRU by last seen, idle TTL, maximum age), and the snapshots that give each service its
//! effective allow list. Pure: every operation takes `now`, so tests drive the clock.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
pub(crate) struct Activity {
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
    pub(crate) fn touch(&self, now: Millis) {
        self.last_seen.fetch_max(now, Ordering::Relaxed);
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// When the entry was last seen.
    pub(crate) fn last_seen(&self) -> Millis {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// How many requests the entry has seen.
    pub(crate) fn hits(&self) -> u64 {
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
    pub(crate) first_seen: Millis,
    /// Who proved trust, when the source knows (a certificate's CN).
    pub identity: Option<String>,
    /// A fixed end set by an operator's grant (`ttl`), on top of the source's limits.
    pub(crate) until: Option<Millis>,
    activity: Arc<Activity>,
    /// The `last_seen` this entry is filed under in its book's LRU index (see [`Book`]).
    lru_seen: Millis,
}

impl Entry {
    /// When the entry was last seen.
    pub(crate) fn last_seen(&self) -> Millis {
        self.activity.last_seen()
    }

    /// How many requests the entry has seen.
    pub(crate) fn hits(&self) -> u64 {
        self.activity.hits()
    }

    /// When the entry expires under `limits`, or `None` if it never does.
    pub(crate) fn expires_at(&self, limits: &Limits) -> Option<Millis> {
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
            lru_seen: r.last_seen,
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
}

/// An entry as read back from the state file.
#[derive(Debug, Clone)]
pub struct Restore {
    /// The network.
    pub(crate) network: IpNet,
    /// First granted.
    pub(crate) first_seen: Millis,
    /// Last seen.
    pub(crate) last_seen: Millis,
    /// Requests seen.
    pub(crate) hits: u64,
    /// Who proved trust.
    pub(crate) identity: Option<String>,
    /// A fixed end, if an operator set one.
    pub(crate) until: Option<Millis>,
}

/// Why an entry left the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
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
    pub(crate) fn metric(self) -> &'static str {
        match self {
            Removal::Evicted => "evicted",
            Removal::Idle | Removal::MaxAge => "expired",
            Removal::Revoked => "revoked",
        }
    }

    /// Lower-case word for logs.
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) source: String,
    /// The network.
    pub(crate) network: IpNet,
    /// Its identity, if known.
    pub(crate) identity: Option<String>,
    /// Why it left.
    pub(crate) why: Removal,
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

/// An LRU key: least recently seen first; ties broken by first seen, then network, so eviction
/// is deterministic.
type LruKey = (Millis, Millis, IpNet);

/// One source's entries and the indexes that keep its limits without scanning them: the LRU
/// order (which is also the idle-expiry order, idle TTL being one per source) and the fixed
/// deadlines (max age, an operator's fixed end), each a `BTreeSet` beside the entry map.
///
/// `last_seen` moves without the lock (the snapshot's [`Live`] handles touch the same
/// [`Activity`]), so an LRU key may be older than its entry: it is filed under the `last_seen`
/// it had when indexed (`Entry::lru_seen`). Since `last_seen` never goes back, a stale key sorts
/// too early, never too late; [`Book::lru_first`] re-files the front key until it is current,
/// which then is the true minimum. One touch costs at most one re-file: amortised O(log n).
struct Book {
    limits: Limits,
    /// By network, so the state file is written in order without a sort.
    entries: BTreeMap<IpNet, Entry>,
    lru: BTreeSet<LruKey>,
    /// (max age or fixed end, whichever is first; network) for entries that have one.
    deadlines: BTreeSet<(Millis, IpNet)>,
}

impl Book {
    fn new(limits: Limits) -> Self {
        Book {
            limits,
            entries: BTreeMap::new(),
            lru: BTreeSet::new(),
            deadlines: BTreeSet::new(),
        }
    }

    /// The deadline `e` has whatever its activity: max age or its fixed end, whichever is first.
    fn deadline(limits: &Limits, e: &Entry) -> Option<Millis> {
        let aged = limits.max_age.map(|t| e.first_seen.saturating_add(ms(t)));
        [aged, e.until].into_iter().flatten().min()
    }

    /// File `e` in the indexes under its current keys.
    fn index(&mut self, e: &mut Entry) {
        e.lru_seen = e.last_seen();
        self.lru.insert((e.lru_seen, e.first_seen, e.network));
        if let Some(at) = Book::deadline(&self.limits, e) {
            self.deadlines.insert((at, e.network));
        }
    }

    /// Take `e` out of the indexes; call before changing what its keys are made of.
    fn unindex(&mut self, e: &Entry) {
        self.lru.remove(&(e.lru_seen, e.first_seen, e.network));
        if let Some(at) = Book::deadline(&self.limits, e) {
            self.deadlines.remove(&(at, e.network));
        }
    }

    /// Add `e` (replacing an entry for the same network) to the book and to `lists`.
    fn insert(&mut self, source: &str, lists: &mut Lists, mut e: Entry) {
        self.take(source, lists, e.network);
        self.index(&mut e);
        lists.show(source, &e);
        self.entries.insert(e.network, e);
    }

    /// Remove the entry for `network` from the book and from `lists`.
    fn take(&mut self, source: &str, lists: &mut Lists, network: IpNet) -> Option<Entry> {
        let e = self.entries.remove(&network)?;
        self.unindex(&e);
        lists.hide(source, &e);
        Some(e)
    }

    /// Change the entry for `network` with `change`, keeping the indexes and `lists` in step.
    /// Returns what `change` returned, or `None` when there is no such entry.
    fn change<T>(
        &mut self,
        source: &str,
        lists: &mut Lists,
        network: IpNet,
        change: impl FnOnce(&mut Entry) -> T,
    ) -> Option<T> {
        let mut e = self.entries.remove(&network)?;
        self.unindex(&e);
        let identity = e.identity.clone();
        let out = change(&mut e);
        if e.identity != identity {
            let old = Entry {
                identity,
                ..e.clone()
            };
            lists.hide(source, &old);
            lists.show(source, &e);
        }
        self.index(&mut e);
        self.entries.insert(network, e);
        Some(out)
    }

    /// New limits: the deadline index depends on `max_age`.
    fn set_limits(&mut self, limits: Limits) {
        let refile = limits.max_age != self.limits.max_age;
        self.limits = limits;
        if refile {
            self.deadlines = self
                .entries
                .values()
                .filter_map(|e| Some((Book::deadline(&self.limits, e)?, e.network)))
                .collect();
        }
    }

    /// The least recently seen entry other than `skip`, after re-filing stale keys in front.
    fn lru_first(&mut self, skip: Option<IpNet>) -> Option<IpNet> {
        let mut skipped = None;
        let found = loop {
            let Some(key) = self.lru.pop_first() else {
                break None;
            };
            let (seen, first_seen, network) = key;
            let Some(e) = self.entries.get_mut(&network) else {
                continue; // cannot happen: every key has its entry; drop it rather than loop
            };
            let current = e.last_seen();
            if current > seen {
                e.lru_seen = current;
                self.lru.insert((current, first_seen, network));
            } else if Some(network) == skip {
                skipped = Some(key);
            } else {
                self.lru.insert(key);
                break Some(network);
            }
        };
        if let Some(key) = skipped {
            self.lru.insert(key);
        }
        found
    }

    /// Evict least recently seen entries (never `keep`) until at most `max` remain.
    fn evict_to(
        &mut self,
        source: &str,
        lists: &mut Lists,
        max: usize,
        keep: Option<IpNet>,
    ) -> Vec<Removed> {
        let mut removed = Vec::new();
        while self.entries.len() > max {
            let Some(victim) = self.lru_first(keep) else {
                break;
            };
            if let Some(e) = self.take(source, lists, victim) {
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

    /// Why `e` is due at `now`, if it is. An entry both idle and too old is reported by the
    /// deadline it passed first, max age on a tie: when expiry runs (at once, a tick later,
    /// after a restart) must not change the reason.
    fn due(&self, e: &Entry, now: Millis) -> Option<Removal> {
        let idle_at = self
            .limits
            .idle_ttl
            .map(|t| e.last_seen().saturating_add(ms(t)));
        match (idle_at, Book::deadline(&self.limits, e)) {
            (_, Some(aged)) if aged <= now && idle_at.is_none_or(|idle| aged <= idle) => {
                Some(Removal::MaxAge)
            }
            (Some(idle), _) if idle <= now => Some(Removal::Idle),
            _ => None,
        }
    }

    /// Remove every entry due at `now`: from the front of the deadline index, then from the
    /// front of the LRU index (the least recently seen is the first to be idle).
    fn expire(&mut self, source: &str, lists: &mut Lists, now: Millis) -> Vec<Removed> {
        let mut removed = Vec::new();
        loop {
            let network = match (self.deadlines.first(), self.limits.idle_ttl) {
                (Some(&(at, network)), _) if at <= now => network,
                (_, Some(ttl)) => match self.lru_first(None) {
                    Some(n) if self.entries[&n].last_seen().saturating_add(ms(ttl)) <= now => n,
                    _ => break,
                },
                _ => break,
            };
            let Some(why) = self.due(&self.entries[&network], now) else {
                break; // cannot happen: both indexes said it is due
            };
            if let Some(e) = self.take(source, lists, network) {
                removed.push(Removed {
                    source: source.to_string(),
                    network,
                    identity: e.identity,
                    why,
                });
            }
        }
        removed
    }

    /// When the first entry is due, if any ever is.
    fn next_due(&mut self) -> Option<Millis> {
        let aged = self.deadlines.first().map(|&(at, _)| at);
        let idle = match self.limits.idle_ttl {
            Some(t) => self
                .lru_first(None)
                .map(|n| self.entries[&n].last_seen().saturating_add(ms(t))),
            None => None,
        };
        [aged, idle].into_iter().flatten().min()
    }
}

/// Every source's entries, within their limits, and the allow lists they make.
#[derive(Default)]
pub struct Ledger {
    books: IndexMap<String, Book>,
    /// Kept in step with every change, so a snapshot is a clone, not a rebuild.
    lists: Lists,
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
    pub(crate) fn apply_policy(&mut self, policy: &Policy) -> Vec<Removed> {
        let mut removed = Vec::new();
        let old = std::mem::take(&mut self.books);
        for (name, book) in old {
            if policy.sources.contains_key(&name) {
                self.books.insert(name, book);
            } else {
                removed.extend(book.entries.into_values().map(|e| Removed {
                    source: name.clone(),
                    network: e.network,
                    identity: e.identity,
                    why: Removal::Revoked,
                }));
            }
        }
        // What unlocks what may have changed: the lists are built again (a reload is rare).
        self.lists = Lists::build(policy, &self.books, |_, _| true);
        for (name, source) in &policy.sources {
            let book = self
                .books
                .entry(name.clone())
                .or_insert_with(|| Book::new(source.limits));
            book.set_limits(source.limits);
            removed.extend(book.evict_to(name, &mut self.lists, source.limits.max_ips, None));
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
        if let Some(entry) = book.entries.get(&network) {
            entry.activity.touch(now);
            if identity.is_some() && entry.identity.as_deref() != identity {
                book.change(source, &mut self.lists, network, |e| {
                    e.identity = identity.map(str::to_string);
                });
                return Some(Recorded::Reidentified);
            }
            return Some(Recorded::Known);
        }
        let entry = Entry::from_restore(Restore {
            network,
            first_seen: now,
            last_seen: now,
            hits: 1,
            identity: identity.map(str::to_string),
            until: None,
        });
        book.insert(source, &mut self.lists, entry);
        let max = book.limits.max_ips;
        let evicted = book.evict_to(source, &mut self.lists, max, Some(network));
        Some(Recorded::New { evicted })
    }

    /// Set a fixed end on an entry (an operator's grant with a TTL). Returns false when there is
    /// no such entry.
    pub(crate) fn set_until(
        &mut self,
        source: &str,
        network: IpNet,
        until: Option<Millis>,
    ) -> bool {
        self.books
            .get_mut(source)
            .and_then(|b| b.change(source, &mut self.lists, network, |e| e.until = until))
            .is_some()
    }

    /// Put back an entry read from the state file, as it was. Returns false for an unknown source.
    pub fn restore(&mut self, source: &str, stored: Restore) -> bool {
        let Some(book) = self.books.get_mut(source) else {
            return false;
        };
        book.insert(source, &mut self.lists, Entry::from_restore(stored));
        true
    }

    /// Add `r` to `source`, or update the entry it already has (see [`Entry`]'s update: the
    /// activity handle is kept). Returns false for an unknown source.
    pub(crate) fn upsert(&mut self, source: &str, r: Restore) -> bool {
        let Some(book) = self.books.get_mut(source) else {
            return false;
        };
        if book.entries.contains_key(&r.network) {
            book.change(source, &mut self.lists, r.network, |e| e.update(r));
        } else {
            book.insert(source, &mut self.lists, Entry::from_restore(r));
        }
        true
    }

    /// Make `source`'s entries exactly `entries` (the shared store's view); entries already
    /// here are updated in place (their activity handles kept). Returns the networks added, the
    /// networks removed, and whether anything a snapshot shows changed; `None` for an unknown
    /// source.
    pub(crate) fn sync_source(
        &mut self,
        source: &str,
        entries: Vec<Restore>,
    ) -> Option<(Vec<IpNet>, Vec<IpNet>, bool)> {
        let book = self.books.get_mut(source)?;
        let mut gone: HashSet<IpNet> = book.entries.keys().copied().collect();
        let mut added = Vec::new();
        let mut changed = false;
        for r in entries {
            let network = r.network;
            if gone.remove(&network) {
                changed |= book
                    .change(source, &mut self.lists, network, |e| e.update(r))
                    .unwrap_or(false);
            } else if !book.entries.contains_key(&network) {
                added.push(network);
                book.insert(source, &mut self.lists, Entry::from_restore(r));
            } else {
                // The same network twice in `entries`: the later one wins, as it did.
                book.change(source, &mut self.lists, network, |e| e.update(r));
            }
        }
        let mut removed: Vec<IpNet> = gone.into_iter().collect();
        removed.sort();
        for network in &removed {
            book.take(source, &mut self.lists, *network);
        }
        changed |= !added.is_empty() || !removed.is_empty();
        Some((added, removed, changed))
    }

    /// Remove one entry, as `why`.
    pub(crate) fn remove(&mut self, source: &str, network: IpNet, why: Removal) -> Option<Removed> {
        let e = self
            .books
            .get_mut(source)?
            .take(source, &mut self.lists, network)?;
        Some(Removed {
            source: source.to_string(),
            network,
            identity: e.identity,
            why,
        })
    }

    /// Enforce every source's limit after a restore; returns the evicted entries.
    pub(crate) fn enforce_limits(&mut self) -> Vec<Removed> {
        let mut removed = Vec::new();
        for (name, book) in &mut self.books {
            let max = book.limits.max_ips;
            removed.extend(book.evict_to(name, &mut self.lists, max, None));
        }
        removed
    }

    /// Remove `network` from `source`, or from every source when `source` is `None`.
    pub(crate) fn revoke(&mut self, network: IpNet, source: Option<&str>) -> Vec<Removed> {
        let mut removed = Vec::new();
        for (name, book) in &mut self.books {
            if source.is_some_and(|s| s != name) {
                continue;
            }
            if let Some(e) = book.take(name, &mut self.lists, network) {
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
    pub(crate) fn expire(&mut self, now: Millis) -> Vec<Removed> {
        let mut removed = Vec::new();
        for (name, book) in &mut self.books {
            removed.extend(book.expire(name, &mut self.lists, now));
            let max = book.limits.max_ips;
            removed.extend(book.evict_to(name, &mut self.lists, max, None));
        }
        removed.sort_by(|a, b| (&a.source, a.network).cmp(&(&b.source, b.network)));
        removed
    }

    /// When the next entry is due to expire, if any ever is. Takes `&mut self` to re-file the
    /// LRU keys that lock-free refreshes left stale (see [`Book`]).
    pub(crate) fn next_due(&mut self) -> Option<Millis> {
        self.books.values_mut().filter_map(Book::next_due).min()
    }

    /// Every entry with its source, in source order then network order.
    pub(crate) fn entries(&self) -> Vec<(&str, &Entry)> {
        let mut out = Vec::new();
        for (name, book) in &self.books {
            out.extend(book.entries.values().map(|e| (name.as_str(), e)));
        }
        out
    }

    /// Is `network` an entry of `source`?
    #[cfg(test)]
    pub(crate) fn contains(&self, source: &str, network: IpNet) -> bool {
        self.books
            .get(source)
            .is_some_and(|b| b.entries.contains_key(&network))
    }

    /// The effective allow list of every service, and the lock-free handles of live entries: a
    /// clone of the lists kept in step with every change (O(1)); built afresh only when `policy`
    /// wires sources to services differently from the policy last applied.
    pub fn snapshot(&self, policy: &Policy) -> Snapshot {
        if self.lists.wiring.matches(policy) {
            self.lists.snapshot.clone()
        } else {
            self.snapshot_of(policy, |_, _| true)
        }
    }

    /// A snapshot holding only the entries `keep` accepts (by source and network), built from
    /// every entry.
    pub(crate) fn snapshot_of(
        &self,
        policy: &Policy,
        keep: impl Fn(&str, &IpNet) -> bool,
    ) -> Snapshot {
        Lists::build(policy, &self.books, keep).snapshot
    }
}

/// A mirror source's identity rules: identity → the services it reaches.
type Rules = BTreeMap<String, Vec<String>>;

/// How a policy wires entries to lists: the always-allowed ranges, and which services each
/// source's entries reach (narrowed by identity rules).
#[derive(Debug, Default)]
struct Wiring {
    always_allow: Vec<IpNet>,
    /// Name and own `always_allow` of each service, in policy order.
    services: Vec<(String, Vec<IpNet>)>,
    /// For each source: the indexes of the services it unlocks, and its identity rules.
    sources: HashMap<String, (Vec<usize>, Option<Rules>)>,
    /// For each service, the first service whose list is the same whatever the entries (the
    /// same `always_allow`, reached by the same entries): only that one is changed, the others
    /// share it. Usually every service is one list (`unlocks: "*"`).
    same_as: Vec<usize>,
}

impl Wiring {
    /// The services an entry of `source` with `identity` reaches, by index.
    fn reach<'a>(
        &'a self,
        source: &str,
        identity: Option<&'a str>,
    ) -> impl Iterator<Item = usize> + 'a {
        let (unlocks, rules) = match self.sources.get(source) {
            Some((unlocks, rules)) => (unlocks.as_slice(), rules.as_ref()),
            None => (&[][..], None),
        };
        unlocks
            .iter()
            .copied()
            .filter(move |&i| identity_unlocks(rules, identity, &self.services[i].0))
    }

    /// Does `policy` wire entries as this does? Compared in place: it runs on every change.
    fn matches(&self, policy: &Policy) -> bool {
        self.always_allow == policy.always_allow
            && self.services.len() == policy.services.len()
            && self
                .services
                .iter()
                .zip(&policy.services)
                .all(|((name, own), (n, s))| name == n && *own == s.always_allow)
            && self.sources.len() == policy.sources.len()
            && policy.sources.iter().all(|(name, source)| {
                self.sources.get(name).is_some_and(|(unlocks, rules)| {
                    let services = policy.services.keys().enumerate();
                    let mut wanted = services
                        .filter(|(_, service)| source.unlocks.iter().any(|s| s == *service))
                        .map(|(i, _)| i);
                    let same_unlocks = unlocks.iter().copied().eq(&mut wanted);
                    let same_rules = match &source.kind {
                        SourceKind::Mirror(m) if !m.identities.is_empty() => {
                            rules.as_ref() == Some(&m.identities)
                        }
                        _ => rules.is_none(),
                    };
                    same_unlocks && same_rules
                })
            })
    }

    fn of(policy: &Policy) -> Self {
        let sources: HashMap<String, (Vec<usize>, Option<Rules>)> = policy
            .sources
            .iter()
            .map(|(name, source)| {
                let unlocks = policy
                    .services
                    .keys()
                    .enumerate()
                    .filter(|(_, service)| source.unlocks.iter().any(|s| s == *service))
                    .map(|(i, _)| i)
                    .collect();
                let rules = match &source.kind {
                    SourceKind::Mirror(m) if !m.identities.is_empty() => Some(m.identities.clone()),
                    _ => None,
                };
                (name.clone(), (unlocks, rules))
            })
            .collect();
        let services: Vec<(String, Vec<IpNet>)> = policy
            .services
            .iter()
            .map(|(name, s)| (name.clone(), s.always_allow.clone()))
            .collect();
        let alike = |i: usize, j: usize| {
            let (a, b) = (&services[i].0, &services[j].0);
            services[i].1 == services[j].1
                && sources.values().all(|(unlocks, rules)| {
                    let lists = rules.iter().flat_map(|r| r.values());
                    unlocks.contains(&i) == unlocks.contains(&j)
                        && lists.into_iter().all(|l| l.contains(a) == l.contains(b))
                })
        };
        let same_as = (0..services.len())
            .map(|i| (0..i).find(|&j| alike(i, j)).unwrap_or(i))
            .collect();
        Wiring {
            always_allow: policy.always_allow.clone(),
            services,
            sources,
            same_as,
        }
    }
}

/// The snapshot as it stands, and the wiring it follows; changed entry by entry.
#[derive(Default)]
struct Lists {
    wiring: Wiring,
    snapshot: Snapshot,
}

impl Lists {
    /// Lists for `policy` holding the entries of `books` that `keep` accepts.
    fn build(
        policy: &Policy,
        books: &IndexMap<String, Book>,
        keep: impl Fn(&str, &IpNet) -> bool,
    ) -> Self {
        let wiring = Wiring::of(policy);
        let services = wiring
            .services
            .iter()
            .map(|(name, own)| ServiceList {
                name: name.clone(),
                allowed: wiring.always_allow.iter().chain(own).copied().collect(),
            })
            .collect();
        let mut lists = Lists {
            wiring,
            snapshot: Snapshot {
                services,
                live: HashMap::new(),
            },
        };
        for (source, book) in books {
            for e in book.entries.values() {
                if keep(source, &e.network) {
                    lists.show(source, e);
                } else {
                    // Left out of the lists, but still refreshed without the lock.
                    lists.show_live(source, e);
                }
            }
        }
        lists
    }

    /// Add `e` of `source` to the lists it reaches and to the live handles.
    fn show(&mut self, source: &str, e: &Entry) {
        for i in self.wiring.reach(source, e.identity.as_deref()) {
            if self.wiring.same_as[i] == i {
                self.snapshot.services[i].allowed.add(e.network);
            }
        }
        self.share_alike();
        self.show_live(source, e);
    }

    /// Services whose lists are always the same share one (an O(1) clone).
    fn share_alike(&mut self) {
        for (i, &j) in self.wiring.same_as.iter().enumerate() {
            if i != j {
                self.snapshot.services[i].allowed = self.snapshot.services[j].allowed.clone();
            }
        }
    }

    /// Add `e` of `source` to the live handles only.
    fn show_live(&mut self, source: &str, e: &Entry) {
        // Behind an `Arc`: copying a node of the persistent map then copies pointers only.
        let live = Arc::new(Live {
            activity: e.activity.clone(),
            identity: e.identity.as_deref().map(Box::from),
        });
        match self.snapshot.live.get_mut(source) {
            Some(set) => {
                set.insert(e.network, live);
            }
            None => {
                let set = imbl::HashMap::unit(e.network, live);
                self.snapshot.live.insert(source.to_string(), set);
            }
        }
    }

    /// Take `e` of `source` out of what [`Lists::show`] added it to.
    fn hide(&mut self, source: &str, e: &Entry) {
        for i in self.wiring.reach(source, e.identity.as_deref()) {
            if self.wiring.same_as[i] == i {
                self.snapshot.services[i].allowed.remove(e.network);
            }
        }
        self.share_alike();
        if let Some(set) = self.snapshot.live.get_mut(source) {
            set.remove(&e.network);
        }
    }
}

/// What every sink renders and every decision is judged on: each service's effective allow list.
/// Immutable once built; a new one is swapped in whenever a list changes. Its collections are
/// persistent (shared structure), so the ledger hands out a clone per change at O(1) cost.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Services in name order (figment reads maps sorted by key).
    pub(crate) services: Vec<ServiceList>,
    live: HashMap<String, imbl::HashMap<IpNet, Arc<Live>>>,
}

/// A live entry as a snapshot sees it: enough to refresh it without the ledger's lock.
#[derive(Debug, Clone)]
pub struct Live {
    /// Shared with the ledger's entry.
    pub(crate) activity: Arc<Activity>,
    /// The entry's identity when the snapshot was taken.
    pub(crate) identity: Option<Box<str>>,
}

/// Does an entry with `identity` reach `service`? Identities with a rule reach what the rule
/// lists; every other entry reaches everything its source unlocks.
fn identity_unlocks(rules: Option<&Rules>, identity: Option<&str>, service: &str) -> bool {
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
        self.live.get(source)?.get(network).map(|l| &**l)
    }

    /// The list of `service`, if it exists.
    pub fn service(&self, service: &str) -> Option<&ServiceList> {
        self.services.iter().find(|s| s.name == service)
    }

    /// Do the allow lists (what sinks render) differ from `other`'s?
    #[cfg(test)]
    pub(crate) fn same_lists(&self, other: &Snapshot) -> bool {
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
    pub allowed: Networks,
}

impl ServiceList {
    /// Is `ip` inside one of the allowed networks?
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allowed.contains_addr(ip)
    }
}

/// A sorted, de-duplicated set of networks, each counted once per reason it is there (an
/// `always_allow` line, an entry of a source), so removing one reason keeps the others'. A
/// persistent B-tree: a clone is O(1), an addition or removal O(log n).
///
/// It also counts its networks by prefix length, so a decision looks up the address masked to
/// each length present (usually two or three) instead of scanning every network, and allocates
/// nothing.
#[derive(Debug, Clone, Default)]
pub struct Networks {
    map: imbl::OrdMap<IpNet, u32>,
    /// IPv4 networks per prefix length (0..=32).
    v4: PrefixCounts<33>,
    /// IPv6 networks per prefix length (0..=128).
    v6: PrefixCounts<129>,
    /// Networks with host bits set (never made by gatekeeper, which keeps networks truncated);
    /// while there is one, a decision scans.
    untruncated: u32,
}

/// How many networks of each prefix length.
#[derive(Debug, Clone)]
struct PrefixCounts<const N: usize>([u32; N]);

impl<const N: usize> Default for PrefixCounts<N> {
    fn default() -> Self {
        PrefixCounts([0; N])
    }
}

impl Networks {
    /// The networks in order.
    pub fn iter(&self) -> impl Iterator<Item = &IpNet> {
        self.map.keys()
    }

    /// Is `ip` inside one of the networks?
    pub(crate) fn contains_addr(&self, ip: std::net::IpAddr) -> bool {
        if self.untruncated > 0 {
            return self.iter().any(|n| n.contains(&ip));
        }
        match ip {
            std::net::IpAddr::V4(a) => (0..=32u8).rev().any(|len| {
                self.v4.0[len as usize] > 0
                    && ipnet::Ipv4Net::new(a, len)
                        .is_ok_and(|n| self.map.contains_key(&IpNet::V4(n.trunc())))
            }),
            std::net::IpAddr::V6(a) => (0..=128u8).rev().any(|len| {
                self.v6.0[len as usize] > 0
                    && ipnet::Ipv6Net::new(a, len)
                        .is_ok_and(|n| self.map.contains_key(&IpNet::V6(n.trunc())))
            }),
        }
    }

    /// Count `network` in (`add`) or out of the per-length counts.
    fn count(&mut self, network: IpNet, add: bool) {
        let slot = match network {
            IpNet::V4(_) => &mut self.v4.0[network.prefix_len() as usize],
            IpNet::V6(_) => &mut self.v6.0[network.prefix_len() as usize],
        };
        let untruncated = network != network.trunc();
        if add {
            *slot += 1;
            self.untruncated += u32::from(untruncated);
        } else {
            *slot -= 1;
            self.untruncated -= u32::from(untruncated);
        }
    }

    /// How many networks.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Is it empty?
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Is `network` (exactly) one of them?
    #[cfg(test)]
    pub(crate) fn contains(&self, network: &IpNet) -> bool {
        self.map.contains_key(network)
    }

    /// One more reason for `network` to be there.
    fn add(&mut self, network: IpNet) {
        match self.map.get_mut(&network) {
            Some(n) => *n += 1,
            None => {
                self.map.insert(network, 1);
                self.count(network, true);
            }
        }
    }

    /// One reason fewer; the network goes with its last.
    fn remove(&mut self, network: IpNet) {
        match self.map.get_mut(&network) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.map.remove(&network);
                self.count(network, false);
            }
            None => {}
        }
    }
}

/// The same networks, however often each is counted.
impl PartialEq for Networks {
    fn eq(&self, other: &Self) -> bool {
        self.map.ptr_eq(&other.map) || (self.len() == other.len() && self.iter().eq(other.iter()))
    }
}

impl Eq for Networks {}

/// The same networks as `other`, in the same (sorted) order.
impl PartialEq<Vec<IpNet>> for Networks {
    fn eq(&self, other: &Vec<IpNet>) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl FromIterator<IpNet> for Networks {
    fn from_iter<I: IntoIterator<Item = IpNet>>(networks: I) -> Self {
        let mut out = Networks::default();
        for network in networks {
            out.add(network);
        }
        out
    }
}

impl From<Vec<IpNet>> for Networks {
    fn from(networks: Vec<IpNet>) -> Self {
        networks.into_iter().collect()
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

    /// A decision looks up the address per prefix length present; it must agree with scanning
    /// every network, for overlapping ranges of both families, after removals, and with a
    /// network that has host bits set (which makes it scan).
    #[test]
    fn a_decision_by_prefix_lookups_agrees_with_a_scan() {
        let scan = |l: &Networks, ip: std::net::IpAddr| l.iter().any(|n| n.contains(&ip));
        let probes: Vec<std::net::IpAddr> = [
            "10.1.2.3",
            "10.1.2.4",
            "10.9.9.9",
            "192.168.7.7",
            "203.0.113.7",
            "8.8.8.8",
            "2001:db8::1",
            "2001:db8:0:1::1",
            "2001:db8:1::5",
            "::1",
            "fe80::1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let mut l: Networks = [
            "10.1.2.3/32",
            "10.1.0.0/16",
            "192.168.0.0/16",
            "2001:db8::/64",
            "2001:db8::/32",
            "::1/128",
        ]
        .iter()
        .map(|n| net(n))
        .collect();
        let check = |l: &Networks| {
            for ip in &probes {
                assert_eq!(l.contains_addr(*ip), scan(l, *ip), "{ip} in {:?}", l.map);
            }
        };
        check(&l);
        assert!(l.contains_addr("10.1.9.9".parse().unwrap()));
        l.remove(net("10.1.0.0/16"));
        check(&l);
        assert!(!l.contains_addr("10.1.9.9".parse().unwrap()));
        assert!(l.contains_addr("10.1.2.3".parse().unwrap()));
        l.remove(net("2001:db8::/32"));
        check(&l);
        assert!(!l.contains_addr("2001:db8:1::5".parse().unwrap()));
        l.add(IpNet::V4("8.8.8.8/8".parse().unwrap()));
        assert_eq!(l.untruncated, 1);
        check(&l);
        assert!(l.contains_addr("8.1.1.1".parse().unwrap()));
        l.remove(IpNet::V4("8.8.8.8/8".parse().unwrap()));
        assert_eq!(l.untruncated, 0);
        l.add(net("0.0.0.0/0"));
        check(&l);
        assert!(l.contains_addr("8.8.8.8".parse().unwrap()));
        assert!(!l.contains_addr("fe80::1".parse().unwrap()));
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

    #[test]
    fn a_lock_free_touch_moves_an_entry_back_in_lru_order() {
        let p = policy("");
        let mut l = Ledger::new(&p);
        l.record("ha", net("1.1.1.1/32"), 1000, None);
        l.record("ha", net("2.2.2.2/32"), 2000, None);
        // Touched through a snapshot's handle, as the hot path does, without the ledger's
        // lock: the LRU index still files 1.1.1.1 under 1000.
        let s = l.snapshot(&p);
        s.live("ha", &net("1.1.1.1/32"))
            .unwrap()
            .activity
            .touch(3000);
        let Some(Recorded::New { evicted }) = l.record("ha", net("3.3.3.3/32"), 4000, None) else {
            panic!("expected a new entry")
        };
        assert_eq!(evicted[0].network, net("2.2.2.2/32"));
        // Touched again, twice: the next victim is 3.3.3.3, seen at 4000.
        let s = l.snapshot(&p);
        let one = &s.live("ha", &net("1.1.1.1/32")).unwrap().activity;
        one.touch(5000);
        one.touch(6000);
        let Some(Recorded::New { evicted }) = l.record("ha", net("4.4.4.4/32"), 7000, None) else {
            panic!("expected a new entry")
        };
        assert_eq!(evicted[0].network, net("3.3.3.3/32"));
        // Idle expiry follows the touches too: 1.1.1.1 is idle at 16 000, 4.4.4.4 at 17 000.
        assert_eq!(l.next_due(), Some(6000 + 10 * MIN));
        let gone = l.expire(6000 + 10 * MIN);
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].network, gone[0].why),
            (net("1.1.1.1/32"), Removal::Idle)
        );
        assert_eq!(l.next_due(), Some(7000 + 10 * MIN));
    }

    #[test]
    fn lru_ties_go_to_first_seen_then_network() {
        let p = policy("");
        let restore = |l: &mut Ledger, ip: &str, first_seen, last_seen| {
            l.restore(
                "ha",
                Restore {
                    network: net(ip),
                    first_seen,
                    last_seen,
                    hits: 1,
                    identity: None,
                    until: None,
                },
            );
        };
        let mut l = Ledger::new(&p);
        // Same last seen: the one first seen earlier goes, whatever its network.
        restore(&mut l, "9.9.9.9/32", 100, 500);
        restore(&mut l, "1.1.1.1/32", 200, 500);
        restore(&mut l, "5.5.5.5/32", 300, 600);
        let gone = l.enforce_limits();
        assert_eq!(
            gone.iter().map(|r| r.network).collect::<Vec<_>>(),
            [net("9.9.9.9/32")]
        );
        // Same last and first seen: the lower network goes.
        let mut l = Ledger::new(&p);
        restore(&mut l, "9.9.9.9/32", 100, 500);
        restore(&mut l, "1.1.1.1/32", 100, 500);
        restore(&mut l, "5.5.5.5/32", 100, 500);
        let gone = l.enforce_limits();
        assert_eq!(
            gone.iter().map(|r| r.network).collect::<Vec<_>>(),
            [net("1.1.1.1/32")]
        );
    }

    #[test]
    fn eviction_after_a_restore_uses_the_restored_keys_only() {
        let p = policy("");
        let mut l = Ledger::new(&p);
        let r = |ip: &str, last_seen| Restore {
            network: net(ip),
            first_seen: 0,
            last_seen,
            hits: 1,
            identity: None,
            until: None,
        };
        l.restore("ha", r("1.1.1.1/32", 100));
        l.restore("ha", r("2.2.2.2/32", 200));
        l.restore("ha", r("3.3.3.3/32", 300));
        // Restored again, later: its old key (100) must not linger in the index.
        l.restore("ha", r("1.1.1.1/32", 400));
        let gone = l.enforce_limits();
        assert_eq!(
            gone.iter().map(|r| r.network).collect::<Vec<_>>(),
            [net("2.2.2.2/32")]
        );
        let Some(Recorded::New { evicted }) = l.record("ha", net("4.4.4.4/32"), 500, None) else {
            panic!("expected a new entry")
        };
        assert_eq!(evicted[0].network, net("3.3.3.3/32"));
        assert_eq!(l.entries().len(), 2);
        // An upsert that moves first seen re-files the entry under its new key.
        l.upsert(
            "ha",
            Restore {
                first_seen: 450,
                ..r("1.1.1.1/32", 400)
            },
        );
        l.set_until("ha", net("4.4.4.4/32"), Some(1000));
        assert_eq!(l.next_due(), Some(1000));
        let gone = l.expire(1000);
        assert_eq!(
            gone.iter().map(|r| (r.network, r.why)).collect::<Vec<_>>(),
            [(net("4.4.4.4/32"), Removal::MaxAge)]
        );
        assert_eq!(l.next_due(), Some(400 + 10 * MIN));
    }

    #[test]
    fn a_snapshot_for_another_wiring_is_built_for_it() {
        let p = policy("");
        let mut l = Ledger::new(&p);
        l.record("ha", net("1.1.1.1/32"), 0, None);
        assert!(l.lists.wiring.matches(&p));
        assert!(l.lists.wiring.matches(&policy("")));
        // The same source, but it no longer unlocks nextcloud.
        let narrower = from_yaml_str(
            "always_allow: [192.168.0.0/16]\n\
             services:\n  immich: {}\n  nextcloud: {}\n  jellyfin: { always_allow: [203.0.113.7] }\n\
             sources:\n  ha: { kind: mirror, hosts: [ha.example.com], unlocks: [immich, jellyfin], max_ips: 2, idle_ttl: 10m }\n",
            "t",
        )
        .unwrap();
        assert!(!l.lists.wiring.matches(&narrower));
        let s = l.snapshot(&narrower);
        assert_eq!(
            s.service("nextcloud").unwrap().allowed,
            vec![net("192.168.0.0/16")]
        );
        assert!(
            s.service("immich")
                .unwrap()
                .allowed
                .contains(&net("1.1.1.1/32"))
        );
        assert!(s.live("ha", &net("1.1.1.1/32")).is_some());
    }

    /// A small deterministic generator, so the mixed-operations test needs no crate.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn indexes_and_kept_lists_agree_with_a_full_scan_under_mixed_operations() {
        let yaml = "always_allow: [192.168.0.0/16]\n\
             services: { immich: {}, nextcloud: {}, photos: {}, jellyfin: { always_allow: [10.0.0.3/32] } }\n\
             sources:\n  \
               ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\", max_ips: 6, idle_ttl: 10m, max_age: 30m, identity_header: X-Subject, identities: { alice: [immich] } }\n  \
               share: { kind: share, upstream: \"http://immich:2283\", path: \"^/s/[a-z]+$\", unlocks: [immich, jellyfin], max_ips: 4, idle_ttl: 5m }\n";
        let p = from_yaml_str(yaml, "t").unwrap();
        let mut l = Ledger::new(&p);
        // nextcloud and photos are reached by the same entries: one list, shared.
        assert_eq!(l.lists.wiring.same_as, [0, 1, 2, 2]);
        let mut rng = Lcg(15);
        let sources = ["ha", "share"];
        let identities = [None, Some("alice"), Some("bob")];
        let mut now: Millis = 0;
        for step in 0..5000 {
            now += rng.below(20_000);
            let source = sources[rng.below(2) as usize];
            let network = net(&format!("10.0.0.{}/32", rng.below(12)));
            let identity = identities[rng.below(3) as usize];
            match rng.below(10) {
                0..=3 => {
                    // The victim a full scan picks: least (last seen, first seen, network).
                    let full = l.entries().iter().filter(|(s, _)| *s == source).count()
                        >= p.sources[source].limits.max_ips;
                    let expected = l
                        .entries()
                        .into_iter()
                        .filter(|(s, _)| *s == source)
                        .map(|(_, e)| (e.last_seen(), e.first_seen, e.network))
                        .min()
                        .map(|k| k.2);
                    let known = l.contains(source, network);
                    match l.record(source, network, now, identity) {
                        Some(Recorded::New { evicted }) => {
                            assert!(!known);
                            let got: Vec<IpNet> = evicted.iter().map(|r| r.network).collect();
                            let want: Vec<IpNet> = expected.filter(|_| full).into_iter().collect();
                            assert_eq!(got, want, "step {step}");
                        }
                        other => assert!(known, "step {step}: {other:?}"),
                    }
                }
                4 | 5 => {
                    // A lock-free touch through the current snapshot.
                    if let Some(live) = l.snapshot(&p).live(source, &network) {
                        live.activity.touch(now);
                    }
                }
                6 => {
                    let until = (rng.below(2) == 0).then(|| now + rng.below(600_000));
                    l.set_until(source, network, until);
                }
                7 => {
                    let first_seen = now.saturating_sub(rng.below(600_000));
                    l.upsert(
                        source,
                        Restore {
                            network,
                            first_seen,
                            last_seen: now,
                            hits: 1,
                            identity: identity.map(String::from),
                            until: None,
                        },
                    );
                    l.enforce_limits();
                }
                8 => {
                    l.revoke(network, (rng.below(2) == 0).then_some(source));
                }
                _ => {
                    // Expiry removes exactly what a full scan finds due, for the same reason.
                    let limits = |s: &str| p.sources[s].limits;
                    let mut due: Vec<(String, IpNet)> = l
                        .entries()
                        .into_iter()
                        .filter(|(s, e)| e.expires_at(&limits(s)).is_some_and(|at| at <= now))
                        .map(|(s, e)| (s.to_string(), e.network))
                        .collect();
                    due.sort();
                    let next = l
                        .entries()
                        .into_iter()
                        .filter_map(|(s, e)| e.expires_at(&limits(s)))
                        .min();
                    assert_eq!(l.next_due(), next, "step {step}");
                    let gone: Vec<(String, IpNet)> = l
                        .expire(now)
                        .into_iter()
                        .map(|r| (r.source, r.network))
                        .collect();
                    assert_eq!(gone, due, "step {step}");
                }
            }
            let kept = l.snapshot(&p);
            let built = l.snapshot_of(&p, |_, _| true);
            assert!(
                kept.same_lists(&built),
                "step {step}: {kept:?} != {built:?}"
            );
            for (s, e) in l.entries() {
                let live = kept
                    .live(s, &e.network)
                    .expect("every entry has a live handle");
                assert_eq!(live.identity.as_deref(), e.identity.as_deref());
            }
            let live_count: usize = kept.live.values().map(|m| m.len()).sum();
            assert_eq!(live_count, l.entries().len(), "step {step}");
        }
    }
}
