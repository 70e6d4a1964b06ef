//! The runtime state of a share source, kept across requests (and across reloads that leave the
//! source's settings unchanged): failed checks per client and bans, recently valid links, and the
//! bound on checks in flight. Bounded in memory whatever clients send.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::Semaphore;
use tracing::warn;

use super::config::ShareCheck;
use crate::ledger::Millis;

/// Clients tracked per source for throttling (about 100 bytes each); past this, the least
/// recently active are forgotten, bans last (see [`Throttle`]).
pub(crate) const MAX_TRACKED_CLIENTS: usize = 65_536;
/// Cached valid links per source.
pub(crate) const MAX_CACHED_LINKS: usize = 4096;

/// The network a client is throttled by: the network it would be granted (its /32, its IPv6
/// prefix: an attacker rotating addresses inside one /64 is one client; an address inside a
/// NAT64 or Teredo prefix as itself, since that /64 is other people).
pub(crate) fn throttle_key(client: IpAddr, ipv6_prefix: u8) -> IpNet {
    crate::client_ip::client_network(client, ipv6_prefix)
}

/// The network a flooding client's neighbours are tracked by together once
/// [`MAX_CLIENTS_PER_GROUP`] of them are tracked one by one: an IPv4 /24 or an IPv6 /48, one
/// site or one hosting customer; a translated client (NAT64, Teredo: its last 32 bits are an
/// IPv4 address) by the /120 that stands for an IPv4 /24. Wider keys (an `ipv6_prefix` of /48
/// or less) are their own group.
pub(crate) fn throttle_group(key: IpNet) -> IpNet {
    let translated = key.prefix_len() == 128
        && crate::client_ip::client_network(key.addr(), 64).prefix_len() == 128;
    let prefix = match key {
        IpNet::V4(_) => 24,
        IpNet::V6(_) if translated => 120,
        IpNet::V6(_) => 48,
    };
    if key.prefix_len() <= prefix {
        key
    } else {
        IpNet::new(key.addr(), prefix).map_or(key, |n| n.trunc())
    }
}

/// Clients of one group tracked one by one; past this, a newcomer of the group is tracked as the
/// whole group (one failure budget, one ban), so one /48 cannot fill the table.
pub(crate) const MAX_CLIENTS_PER_GROUP: u32 = 64;
/// Checks one client (one throttle key) may have in flight, waiting for a slot or for the
/// upstream. A viewer opens a link once; more at once is a script holding check slots.
pub(crate) const MAX_CHECKS_PER_CLIENT: u32 = 2;
/// How often records that no longer matter (no failure in the window, no ban, nothing in
/// flight) are dropped.
const SWEEP_EVERY: Millis = 60_000;

#[derive(Debug, Default, Clone)]
struct ClientRecord {
    failures: Vec<Millis>,
    in_flight: u32,
    banned_until: Option<Millis>,
    /// Last admission or outcome, for forgetting the least recently active first.
    last: Millis,
}

impl ClientRecord {
    fn banned(&self, now: Millis) -> bool {
        self.banned_until.is_some_and(|b| b > now)
    }

    /// Nothing to remember: no failure within `window`, no ban, nothing in flight.
    fn stale(&self, window: Millis, now: Millis) -> bool {
        self.in_flight == 0 && !self.banned(now) && !self.failures.iter().any(|t| t + window > now)
    }
}

/// Answer of [`Throttle::admit`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Go ahead; report the outcome with [`Throttle::finish`] under this key: the client's own,
    /// or its group's (see [`throttle_group`]) when the group floods.
    Admitted(IpNet),
    /// Banned (the client or its group) or at the failure limit: answer 429 without asking the
    /// upstream.
    Throttled,
    /// [`MAX_CHECKS_PER_CLIENT`] checks of this client are in flight: answer 429 without asking.
    Busy,
}

/// Failed checks per client, and bans. Checks in flight count against the limit, so a burst
/// of concurrent guesses cannot get more than `max_failures` of them to the upstream.
///
/// Memory is bounded without locking anyone out: a group (IPv4 /24, IPv6 /48) tracks at most
/// [`MAX_CLIENTS_PER_GROUP`] clients one by one and its further clients as one; a full table
/// forgets the least recently active clients that are neither banned nor checking, and only
/// when every record is a ban, the bans that end soonest.
#[derive(Debug)]
pub(crate) struct Throttle {
    table: Mutex<Table>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Table {
    clients: HashMap<IpNet, ClientRecord>,
    /// Clients tracked one by one, per group (a group's own record is not counted).
    per_group: HashMap<IpNet, u32>,
    next_sweep: Millis,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::with_capacity(MAX_TRACKED_CLIENTS)
    }
}

impl Throttle {
    /// A throttle tracking at most about `capacity` clients.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Throttle {
            table: Mutex::new(Table::default()),
            capacity: capacity.max(1),
        }
    }

    /// Clients tracked now.
    pub(crate) fn len(&self) -> usize {
        self.lock().clients.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// May `client` (its [`throttle_key`]) make another check at `now`?
    pub(crate) fn admit(&self, client: IpNet, limits: &ShareCheck, now: Millis) -> Admission {
        let window = ms(limits.failure_window);
        let mut t = self.lock();
        if now >= t.next_sweep {
            t.sweep(window, now);
            t.next_sweep = now + SWEEP_EVERY;
        }
        let group = throttle_group(client);
        if group != client && t.clients.get(&group).is_some_and(|g| g.banned(now)) {
            return Admission::Throttled;
        }
        let key = if group == client || t.clients.contains_key(&client) {
            client
        } else if t.clients.contains_key(&group)
            || t.per_group.get(&group).copied().unwrap_or(0) >= MAX_CLIENTS_PER_GROUP
        {
            group
        } else {
            client
        };
        if !t.clients.contains_key(&key) {
            if key != client {
                warn!(network = %group, clients = MAX_CLIENTS_PER_GROUP, "one network floods share checks; tracking its further clients as one");
            }
            t.make_room(self.capacity, window, now);
            t.insert(key);
        }
        let Some(r) = t.clients.get_mut(&key) else {
            return Admission::Throttled;
        };
        r.last = now;
        if r.banned(now) {
            return Admission::Throttled;
        }
        r.banned_until = None;
        r.failures.retain(|t| t + window > now);
        if r.failures.len() as u64 + u64::from(r.in_flight) >= u64::from(limits.max_failures) {
            return Admission::Throttled;
        }
        if r.in_flight >= MAX_CHECKS_PER_CLIENT {
            // A viewer never gets here; a script holding check slots, or guessing in parallel,
            // does: it counts as a failed check, so pressing on ends in a ban.
            r.failures.push(now);
            return Admission::Busy;
        }
        r.in_flight += 1;
        Admission::Admitted(key)
    }

    /// Report an admitted check's outcome under the key [`Throttle::admit`] gave: `failed`
    /// counts towards the ban. Returns true when this failure started a ban.
    pub(crate) fn finish(
        &self,
        key: IpNet,
        failed: bool,
        limits: &ShareCheck,
        now: Millis,
    ) -> bool {
        let mut t = self.lock();
        let Some(r) = t.clients.get_mut(&key) else {
            return false;
        };
        r.in_flight = r.in_flight.saturating_sub(1);
        r.last = now;
        if !failed {
            if r.failures.is_empty() && r.in_flight == 0 && r.banned_until.is_none() {
                t.remove(key);
            }
            return false;
        }
        r.failures.push(now);
        if r.failures.len() as u64 >= u64::from(limits.max_failures) {
            r.banned_until = Some(now + ms(limits.ban));
            r.failures.clear();
            return true;
        }
        false
    }
}

impl Table {
    fn insert(&mut self, key: IpNet) {
        let group = throttle_group(key);
        if group != key {
            *self.per_group.entry(group).or_default() += 1;
        }
        self.clients.insert(key, ClientRecord::default());
    }

    fn remove(&mut self, key: IpNet) {
        let group = throttle_group(key);
        if self.clients.remove(&key).is_some() && group != key {
            if let Some(n) = self.per_group.get_mut(&group) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_group.remove(&group);
                }
            }
        }
    }

    fn recount(&mut self) {
        self.per_group.clear();
        for key in self.clients.keys() {
            let group = throttle_group(*key);
            if group != *key {
                *self.per_group.entry(group).or_default() += 1;
            }
        }
    }

    fn sweep(&mut self, window: Millis, now: Millis) {
        let before = self.clients.len();
        self.clients.retain(|_, r| !r.stale(window, now));
        if self.clients.len() != before {
            self.recount();
        }
    }

    /// Make room for one more record. Evicts an eighth of the table at a time, so a flood of
    /// newcomers costs one pass per eighth, not one per request.
    fn make_room(&mut self, capacity: usize, window: Millis, now: Millis) {
        if self.clients.len() < capacity {
            return;
        }
        self.sweep(window, now);
        let target = capacity - (capacity / 8).max(1);
        if self.clients.len() <= target {
            return;
        }
        // The least recently active that are neither banned nor checking: forgetting one costs
        // at most its failures so far.
        let mut idle: Vec<(Millis, IpNet)> = self
            .clients
            .iter()
            .filter(|(_, r)| r.in_flight == 0 && !r.banned(now))
            .map(|(k, r)| (r.last, *k))
            .collect();
        idle.sort_unstable();
        let excess = self.clients.len() - target;
        let forgotten = idle.len().min(excess);
        for (_, key) in idle.into_iter().take(excess) {
            self.clients.remove(&key);
        }
        // Only bans left (many distinct attackers): forget those that end soonest rather than
        // refuse every new viewer; each costs at most `max_failures` more guesses.
        let mut unbanned = 0;
        if self.clients.len() > target {
            let mut bans: Vec<(Millis, IpNet)> = self
                .clients
                .iter()
                .filter(|(_, r)| r.in_flight == 0)
                .map(|(k, r)| (r.banned_until.unwrap_or(0), *k))
                .collect();
            bans.sort_unstable();
            let excess = self.clients.len() - target;
            unbanned = bans.len().min(excess);
            for (_, key) in bans.into_iter().take(excess) {
                self.clients.remove(&key);
            }
        }
        self.recount();
        warn!(
            forgotten,
            unbanned,
            tracked = self.clients.len(),
            "share throttle table full; forgot the least recently active clients"
        );
    }
}

pub(super) fn ms(d: Duration) -> Millis {
    d.as_millis().min(u64::MAX as u128) as Millis
}

/// Valid links, remembered for `cache` so a viewer's burst asks the upstream once.
#[derive(Debug, Default)]
pub(crate) struct LinkCache {
    valid_until: Mutex<HashMap<String, Millis>>,
}

impl LinkCache {
    /// Is `url` known valid at `now`?
    pub(crate) fn is_valid(&self, url: &str, now: Millis) -> bool {
        let cache = self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        cache.get(url).is_some_and(|t| *t > now)
    }

    /// Remember `url` as valid until `now + ttl`.
    pub(crate) fn insert(&self, url: String, ttl: Duration, now: Millis) {
        if ttl.is_zero() {
            return;
        }
        let mut cache = self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED_LINKS {
            cache.retain(|_, t| *t > now);
            if cache.len() >= MAX_CACHED_LINKS {
                cache.clear();
            }
        }
        cache.insert(url, now + ms(ttl));
    }
}

/// Per-source runtime state of a share source.
#[derive(Debug)]
pub(crate) struct ShareState {
    /// Failure counting and bans.
    pub(crate) throttle: Throttle,
    /// Recently valid links.
    pub(crate) cache: LinkCache,
    /// Bounds the checks in flight.
    pub(crate) in_flight: Semaphore,
}

impl ShareState {
    /// Fresh state for a source with these limits.
    pub(crate) fn new(check: &ShareCheck) -> Self {
        ShareState {
            throttle: Throttle::default(),
            cache: LinkCache::default(),
            in_flight: Semaphore::new(check.max_concurrent_checks),
        }
    }
}
