//! The runtime handle: the policy in force, the gate's copy of the ledger behind a mutex, the
//! current snapshot behind an atomic pointer, and the [`Backend`] that holds the ledger of
//! record (the state file, or the shared store on Redis).
//!
//! Reads (decisions, a known client's refresh) load the snapshot and take no lock. Changes lock
//! the ledger briefly, swap in a new snapshot and bump a change counter that wakes the render
//! loop ([`crate::sinks::outputs`]), which shows the proxy only what the state file holds.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::client_ip::ClientIp;
use crate::health::Health;
use crate::ledger::{Ledger, Millis, Recorded, Removal, Removed, Restore, Snapshot, now_millis};
use crate::metrics::Metrics;
use crate::notify::{Event, Notifier};
use crate::policy::EventKind;
use crate::policy::Policy;
use crate::redis_io::StoreError as SharedError;
use crate::sinks::traefik_apply::Propagation;
use crate::sources::share::state::ShareState;
use crate::store::{self, StoredEntry};

/// The policy in force with what is derived from it; swapped as one piece.
#[derive(Debug)]
pub struct Active {
    /// The policy.
    pub(crate) policy: Policy,
    /// The client-address rules derived from it.
    pub(crate) client_ip: ClientIp,
    /// Mirror host → source name.
    pub(crate) mirror_hosts: HashMap<String, String>,
    /// The legacy catch-all mirror source, if any.
    pub(crate) catch_all: Option<String>,
    /// Runtime state (throttle, cache, concurrency) of each share source.
    pub(crate) shares: HashMap<String, Arc<ShareState>>,
    /// Where notifications go, when the policy asks for them.
    pub(crate) notifier: Option<Notifier>,
}

impl Active {
    /// Derive everything the request paths need from `policy`.
    pub(crate) fn new(policy: Policy) -> Self {
        let client_ip = ClientIp::new(
            policy.trusted_proxies.clone(),
            policy.all_always_allow(),
            policy.ipv6_prefix,
        )
        .with_never_grant(policy.never_grant.clone());
        let mut mirror_hosts = HashMap::new();
        for (name, source) in &policy.sources {
            if let crate::policy::SourceKind::Mirror(m) = &source.kind {
                for h in &m.hosts {
                    mirror_hosts.insert(h.clone(), name.clone());
                }
            }
        }
        let catch_all = policy.catch_all_mirror().map(str::to_string);
        let shares = policy
            .sources
            .iter()
            .filter_map(|(name, s)| match &s.kind {
                crate::policy::SourceKind::Share(share) => {
                    Some((name.clone(), Arc::new(ShareState::new(&share.check))))
                }
                _ => None,
            })
            .collect();
        let notifier = policy.notify.as_ref().and_then(Notifier::start);
        Active {
            policy,
            client_ip,
            mirror_hosts,
            catch_all,
            shares,
            notifier,
        }
    }
}

/// A cheap-to-clone handle on the running gatekeeper.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    active: ArcSwap<Active>,
    ledger: Mutex<Ledger>,
    snapshot: ArcSwap<Snapshot>,
    /// Bumped on every ledger change; the flusher and the expiry task watch it.
    changes: watch::Sender<u64>,
    /// The highest change counter known to be in the state file.
    persisted: watch::Sender<u64>,
    /// What the proxy is shown (Traefik file, HTTP provider): only what the state file holds,
    /// with the change counter up to which every grant is in it.
    shown: ArcSwap<(Arc<Snapshot>, u64)>,
    /// When Traefik applies what the sinks wrote (share answers wait for it).
    propagation: Propagation,
    /// Bumped each time `shown` is swapped; other sinks (Traefik's KV) watch it.
    shown_changes: watch::Sender<u64>,
    /// What `/healthz` reports.
    health: Health,
    /// Where the ledger of record is: here (the state file), or the shared store on Redis
    /// (fixed until a restart).
    backend: Arc<dyn Backend>,
    /// Client for share checks and Traefik API polls.
    http: reqwest::Client,
    /// Counters for `/metrics`.
    metrics: Metrics,
    clock: fn() -> Millis,
}

/// How to learn that a grant is durable (in the state file, or in the shared store).
#[derive(Debug)]
pub enum Durable {
    /// Durable once the state file holds this change.
    Change(u64),
    /// Durable when the ledger of record answers (the shared store).
    Pending(tokio::sync::oneshot::Receiver<GrantReply>),
}

/// What the ledger of record did with a grant, once applied to the gate's copy: its change
/// counter, or why nothing was granted.
pub(crate) type GrantReply = Result<u64, SharedError>;

/// What a grant script found: the entry is new, was there, or was there under another identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GrantStatus {
    /// A new entry.
    New,
    /// Refreshed.
    Known,
    /// Refreshed, with another identity (its lists may differ).
    Reidentified,
}

/// How a grant's fixed end changes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Until {
    /// Leave it (a client's request).
    Keep,
    /// Set it (an operator's grant; `None` clears it).
    Set(Option<Millis>),
}

/// Who asks for a grant.
#[derive(Debug, Clone, Copy)]
pub(crate) enum By {
    /// A client that proved trust (its request).
    Client,
    /// An operator (the admin API), for at most `ttl` when given: the entry ends at `until`.
    Operator {
        /// As asked for, for the log.
        ttl: Option<Duration>,
        /// The fixed end it sets (`None` clears it).
        until: Option<Millis>,
    },
}

/// A grant to make in the ledger of record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grant<'a> {
    /// The source it is granted through.
    pub(crate) source: &'a str,
    /// The network granted (already checked grantable).
    pub(crate) network: IpNet,
    /// Who proved trust (a certificate's name), if known.
    pub(crate) identity: Option<&'a str>,
    /// A client or an operator.
    pub(crate) by: By,
}

impl Grant<'_> {
    /// How the grant changes the entry's fixed end.
    pub(crate) fn until(&self) -> Until {
        match self.by {
            By::Client => Until::Keep,
            By::Operator { until, .. } => Until::Set(until),
        }
    }
}

/// Where the ledger of record lives: in this process and its state file ([`LocalBackend`]), or
/// in the shared store on Redis (`shared_store::Handle`). The gate keeps a copy that decisions
/// read without waiting and hands every change that must reach the record to its backend; it
/// never asks which one it has.
pub(crate) trait Backend: Send + Sync {
    /// Make `grant` (a new client, a known one under another identity, an operator's grant) in
    /// the record. `None`: the policy has no such source.
    fn grant(&self, gate: &Gate, active: &Active, grant: Grant<'_>) -> Option<(Recorded, Durable)>;
    /// The gate revoked `network` (from `source`, or every source) in its copy: revoke it in the
    /// record too.
    fn revoke(&self, network: IpNet, source: Option<&str>);
    /// A reloaded policy removed `removed` from the copy (and may have lowered limits): make
    /// the record follow.
    fn reloaded(&self, removed: &[Removed]);
    /// The state file's bytes for `ledger`, when the state file is the record.
    fn state_file(&self, ledger: &Ledger) -> Option<Vec<u8>>;
    /// Can the record be reached now? `None`: it is in this process.
    fn up(&self) -> Option<bool>;
}

/// The ledger of record is the gate's own, kept in the state file.
#[derive(Debug, Default)]
pub(crate) struct LocalBackend;

impl Backend for LocalBackend {
    fn grant(&self, gate: &Gate, active: &Active, grant: Grant<'_>) -> Option<(Recorded, Durable)> {
        gate.grant_here(active, grant)
    }

    fn revoke(&self, _: IpNet, _: Option<&str>) {}

    fn reloaded(&self, _: &[Removed]) {}

    fn state_file(&self, ledger: &Ledger) -> Option<Vec<u8>> {
        Some(store::encode(ledger))
    }

    fn up(&self) -> Option<bool> {
        None
    }
}

/// Why an operator's grant was refused.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The policy has no such source.
    #[error("no source `{0}` in the policy")]
    UnknownSource(String),
    /// The address may never be granted.
    #[error("{0}")]
    NotGrantable(crate::client_ip::Refusal),
    /// A network so wide it would open a service to a large part of the internet.
    #[error("{0} is too wide to grant (at most /16 for IPv4, /64 for IPv6)")]
    TooWide(IpNet),
}

/// Is `network` wider than any grant: wider than a /16 for IPv4 or a /64 for IPv6 (the rule of
/// [`Gate::grant`]), unless it is an IPv6 network of the policy's `ipv6_prefix`, which a
/// mirrored client is granted?
pub(crate) fn too_wide(network: IpNet, ipv6_prefix: u8) -> bool {
    let beyond_operator = wider_than_an_operator_grant(network);
    let client_prefix = matches!(network, IpNet::V6(_)) && network.prefix_len() >= ipv6_prefix;
    beyond_operator && !client_prefix
}

/// Wider than an operator may grant: a /16 for IPv4, a /64 for IPv6.
fn wider_than_an_operator_grant(network: IpNet) -> bool {
    network.prefix_len() < network.max_prefix_len() / 2
}

/// What restoring the state file did, for the startup log.
#[derive(Debug, Default)]
pub struct Restored {
    /// Entries back in the ledger.
    pub(crate) kept: usize,
    /// Entries dropped, with why (unknown source, expired, over the limit, no longer grantable).
    pub dropped: Vec<String>,
}

impl Gate {
    /// A gate for `policy`, with `entries` restored from the state file. Entries that can no longer
    /// be held are dropped and reported, never silently.
    pub fn new(policy: Policy, entries: Vec<StoredEntry>) -> (Gate, Restored) {
        Self::with_clock(policy, entries, now_millis)
    }

    /// As [`Gate::new`] with another clock (tests).
    pub fn with_clock(
        policy: Policy,
        entries: Vec<StoredEntry>,
        clock: fn() -> Millis,
    ) -> (Gate, Restored) {
        Self::build(policy, entries, Arc::new(LocalBackend), clock)
    }

    /// A gate whose ledger of record is `backend`, elsewhere (the shared store): its copy starts
    /// empty and the backend fills it.
    pub(crate) fn with_backend(
        policy: Policy,
        backend: Arc<dyn Backend>,
        clock: fn() -> Millis,
    ) -> Gate {
        Self::build(policy, Vec::new(), backend, clock).0
    }

    fn build(
        policy: Policy,
        entries: Vec<StoredEntry>,
        backend: Arc<dyn Backend>,
        clock: fn() -> Millis,
    ) -> (Gate, Restored) {
        let active = Active::new(policy);
        let mut ledger = Ledger::new(&active.policy);
        let mut restored = Restored::default();
        for e in entries {
            let net = e.network;
            if !active.policy.sources.contains_key(&e.source) {
                restored.dropped.push(format!(
                    "{net} of source `{}`: the policy no longer has that source",
                    e.source
                ));
                continue;
            }
            // The policy may have grown its trusted, never_grant or always_allow ranges since. An
            // older version may have stored an IPv4 range in its mapped form (`::ffff:a.b.c.d/n`):
            // it is restored as the IPv4 range it is.
            let network = match active.client_ip.grantable_network(net) {
                Ok(network) => network,
                Err(why) => {
                    restored
                        .dropped
                        .push(format!("{net} of source `{}`: {why}", e.source));
                    continue;
                }
            };
            let mut entry = e.to_restore();
            entry.network = network;
            ledger.restore(&e.source, entry);
        }
        let removed = ledger
            .expire(clock())
            .into_iter()
            .chain(ledger.enforce_limits());
        for r in removed {
            restored.dropped.push(format!(
                "{} of source `{}`: {}",
                r.network,
                r.source,
                r.why.as_str()
            ));
        }
        restored.kept = ledger.entries().len();
        let snapshot = Arc::new(ledger.snapshot(&active.policy));
        let gate = Gate {
            inner: Arc::new(Inner {
                active: ArcSwap::from_pointee(active),
                ledger: Mutex::new(ledger),
                // Restored entries came from the state file: they may be shown at once.
                shown: ArcSwap::from_pointee((snapshot.clone(), 0)),
                propagation: Propagation::default(),
                snapshot: ArcSwap::new(snapshot),
                shown_changes: watch::Sender::new(0),
                health: Health::default(),
                backend,
                changes: watch::Sender::new(0),
                persisted: watch::Sender::new(0),
                http: crate::outbound::http_client(),
                metrics: Metrics::default(),
                clock,
            }),
        };
        (gate, restored)
    }

    /// The policy in force.
    pub fn active(&self) -> Arc<Active> {
        self.inner.active.load_full()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
    }

    /// What the proxy is shown: the snapshot of the last Traefik file, which never holds a grant
    /// the state file lacks. Decisions (`/allow`) use [`Gate::snapshot`] instead.
    pub(crate) fn shown(&self) -> Arc<Snapshot> {
        self.inner.shown.load().0.clone()
    }

    /// [`Gate::shown`] with the change counter up to which every grant is in it.
    pub(crate) fn shown_with_generation(&self) -> (Arc<Snapshot>, u64) {
        let shown = self.inner.shown.load();
        (shown.0.clone(), shown.1)
    }

    /// The change counter: every change to the ledger so far is numbered at most this.
    pub(crate) fn generation(&self) -> u64 {
        *self.inner.changes.borrow()
    }

    /// What gatekeeper knows of when Traefik applies what the sinks wrote.
    pub(crate) fn propagation(&self) -> &Propagation {
        &self.inner.propagation
    }

    /// Wakes whenever what the proxy is shown ([`Gate::shown`]) was swapped, for sinks that
    /// render it elsewhere.
    pub(crate) fn watch_shown(&self) -> watch::Receiver<u64> {
        self.inner.shown_changes.subscribe()
    }

    /// What `/healthz` reports.
    pub(crate) fn health(&self) -> &Health {
        &self.inner.health
    }

    /// Wakes on every change to the ledger (the render loop, the expiry task).
    pub(crate) fn watch_changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Every entry of the ledger, as (source, network).
    pub(crate) fn entry_keys(&self) -> HashSet<(String, IpNet)> {
        keys(&self.ledger())
    }

    /// What the render loop writes, taken together under the ledger's lock (snapshots are
    /// swapped under it too), so the Traefik file never shows a grant the state file written
    /// just before it lacks.
    pub(crate) fn capture(&self) -> Capture {
        let ledger = self.ledger();
        Capture {
            // With a shared store there is no state file: entries reach the local ledger only
            // once Redis holds them.
            state: self.inner.backend.state_file(&ledger),
            snapshot: self.snapshot(),
            generation: *self.inner.changes.borrow(),
        }
    }

    /// The state file holds every change up to `generation`.
    pub(crate) fn mark_persisted(&self, generation: u64) {
        publish_at_least(&self.inner.persisted, generation);
    }

    /// Every change up to this one is in the state file.
    pub(crate) fn persisted_generation(&self) -> u64 {
        *self.inner.persisted.borrow()
    }

    /// A snapshot of the entries `keep` holds only (what the state file holds, while it cannot
    /// be written).
    pub(crate) fn snapshot_of(&self, keep: &HashSet<(String, IpNet)>) -> Arc<Snapshot> {
        let active = self.active();
        let ledger = self.ledger();
        Arc::new(ledger.snapshot_of(&active.policy, |source, network| {
            keep.contains(&(source.to_string(), *network))
        }))
    }

    /// Show the proxy `snapshot`, which holds every grant up to change `generation`: the sinks
    /// that follow [`Gate::watch_shown`] render it.
    pub(crate) fn show(&self, snapshot: Arc<Snapshot>, generation: u64) {
        self.inner.shown.store(Arc::new((snapshot, generation)));
        self.inner.shown_changes.send_modify(|n| *n += 1);
    }

    /// The current time on the gate's clock.
    pub(crate) fn now(&self) -> Millis {
        (self.inner.clock)()
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A panic while holding the lock cannot leave the ledger half-changed in a way that
        // matters more than stopping would; keep serving.
        self.inner
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Record that `network` proved trust through `source`. A known client is refreshed without
    /// a lock; a new one is granted (evicting as the limit requires). Returns the change counter
    /// that makes the grant durable, for [`Gate::persisted`], and what happened; `None` when the
    /// policy has no such source.
    pub fn record(
        &self,
        source: &str,
        network: IpNet,
        identity: Option<&str>,
    ) -> Option<(Recorded, Durable)> {
        let now = self.now();
        // A known client whose identity did not change is refreshed without the lock.
        if let Some(live) = self.inner.snapshot.load().live(source, &network)
            && (identity.is_none() || live.identity.as_deref() == identity)
        {
            live.activity.touch(now);
            return Some((
                Recorded::Known,
                Durable::Change(*self.inner.changes.borrow()),
            ));
        }
        let active = self.active();
        active.policy.sources.get(source)?;
        let grant = Grant {
            source,
            network,
            identity,
            by: By::Client,
        };
        self.inner.backend.grant(self, &active, grant)
    }

    /// Make `grant` in the gate's own ledger ([`LocalBackend`]): logged, counted and notified.
    fn grant_here(&self, active: &Active, grant: Grant<'_>) -> Option<(Recorded, Durable)> {
        let Grant {
            source,
            network,
            identity,
            by,
        } = grant;
        let mut ledger = self.ledger();
        let recorded = ledger.record(source, network, self.now(), identity)?;
        let generation = match by {
            By::Client => match &recorded {
                Recorded::Pending => unreachable!("the local ledger answers at once"),
                Recorded::Known => *self.inner.changes.borrow(),
                Recorded::Reidentified => {
                    let generation = self.publish(&active.policy, &ledger);
                    drop(ledger);
                    info!(source, %network, identity, "identity changed");
                    generation
                }
                Recorded::New { evicted } => {
                    let generation = self.publish(&active.policy, &ledger);
                    drop(ledger);
                    self.granted(active, source, network, identity);
                    self.removed(active, evicted);
                    generation
                }
            },
            By::Operator { ttl, until } => {
                ledger.set_until(source, network, until);
                let generation = self.publish(&active.policy, &ledger);
                drop(ledger);
                if let Recorded::New { evicted } = &recorded {
                    let services = &active.policy.sources[source].unlocks;
                    info!(source, %network, ?services, ?ttl, "granted by an operator");
                    self.inner.metrics.grant(source);
                    self.notify(active, EventKind::Grant, source, network, None);
                    self.removed(active, evicted);
                }
                generation
            }
        };
        Some((recorded, Durable::Change(generation)))
    }

    /// Adopt a reloaded policy, keeping the state: entries of removed sources are dropped,
    /// lowered limits evict the least recently seen, entries the new policy forbids (now inside
    /// trusted_proxies, never_grant or always_allow) are revoked, and outputs are re-rendered.
    /// Throttle state and bans of share sources whose settings did not change are kept.
    pub fn reload(&self, policy: Policy) -> Vec<Removed> {
        let old = self.active();
        let mut active = Active::new(policy);
        let kept: Vec<String> = active
            .shares
            .keys()
            .filter(|name| {
                old.policy.sources.get(*name).map(|s| &s.kind)
                    == active.policy.sources.get(*name).map(|s| &s.kind)
            })
            .cloned()
            .collect();
        for name in kept {
            if let Some(state) = old.shares.get(&name) {
                active.shares.insert(name, state.clone());
            }
        }
        for (key, before, after) in [
            (
                "listen",
                old.policy.listen.to_string(),
                active.policy.listen.to_string(),
            ),
            (
                "admin.listen",
                old.policy.admin.listen.to_string(),
                active.policy.admin.listen.to_string(),
            ),
            (
                "redis",
                format!("{:?}", old.policy.redis),
                format!("{:?}", active.policy.redis),
            ),
            (
                "admin token",
                format!(
                    "{:?}{:?}",
                    old.policy.admin.token, old.policy.admin.token_file
                ),
                format!(
                    "{:?}{:?}",
                    active.policy.admin.token, active.policy.admin.token_file
                ),
            ),
        ] {
            if before != after {
                warn!(
                    key,
                    "changed in the policy; it takes effect at the next restart"
                );
            }
        }
        let active = Arc::new(active);
        let mut ledger = self.ledger();
        let mut removed = ledger.apply_policy(&active.policy);
        let forbidden: Vec<(String, IpNet)> = ledger
            .entries()
            .into_iter()
            .filter(|(_, e)| active.client_ip.grantable_network(e.network).is_err())
            .map(|(source, e)| (source.to_string(), e.network))
            .collect();
        for (source, network) in forbidden {
            removed.extend(ledger.revoke(network, Some(&source)));
        }
        self.inner.active.store(active.clone());
        self.publish(&active.policy, &ledger);
        drop(ledger);
        self.inner.backend.reloaded(&removed);
        self.removed(&active, &removed);
        removed
    }

    /// An operator's grant: `network` through `source`, ending after `ttl` at the latest when
    /// given (the source's limits still apply). Returns the change counter to wait on with
    /// [`Gate::persisted`] before acknowledging.
    pub fn grant(
        &self,
        source: &str,
        network: IpNet,
        ttl: Option<Duration>,
    ) -> Result<Durable, GrantError> {
        let active = self.active();
        if !active.policy.sources.contains_key(source) {
            return Err(GrantError::UnknownSource(source.to_string()));
        }
        // `::ffff:203.0.0.0/104` is the IPv4 /8 it stands for: judge (and keep) that.
        let network = crate::client_ip::normalise_network(network);
        if wider_than_an_operator_grant(network) {
            return Err(GrantError::TooWide(network));
        }
        let network = active
            .client_ip
            .grantable_network(network)
            .map_err(GrantError::NotGrantable)?;
        let until = ttl.map(|t| self.now().saturating_add(t.as_millis() as Millis));
        let grant = Grant {
            source,
            network,
            identity: None,
            by: By::Operator { ttl, until },
        };
        let (_, durable) = self
            .inner
            .backend
            .grant(self, &active, grant)
            .ok_or_else(|| GrantError::UnknownSource(source.to_string()))?;
        Ok(durable)
    }

    /// Revoke `network` from `source` (every source when `None`).
    pub fn revoke(&self, network: IpNet, source: Option<&str>) -> Vec<Removed> {
        let active = self.active();
        let mut ledger = self.ledger();
        let removed = ledger.revoke(network, source);
        if !removed.is_empty() {
            self.publish(&active.policy, &ledger);
        }
        drop(ledger);
        self.inner.backend.revoke(network, source);
        self.removed(&active, &removed);
        removed
    }

    /// Remove the entries that are due now.
    pub fn expire_due(&self) -> Vec<Removed> {
        let active = self.active();
        let mut ledger = self.ledger();
        let removed = ledger.expire(self.now());
        if !removed.is_empty() {
            self.publish(&active.policy, &ledger);
        }
        drop(ledger);
        self.removed(&active, &removed);
        removed
    }

    /// Send a notification of `kind`, if the policy asks for them. Never waits.
    pub(crate) fn notify(
        &self,
        active: &Active,
        kind: EventKind,
        source: &str,
        network: IpNet,
        identity: Option<&str>,
    ) {
        if let Some(n) = &active.notifier {
            n.send(Event {
                event: kind,
                source: source.to_string(),
                network,
                identity: identity.map(str::to_string),
                services: active
                    .policy
                    .sources
                    .get(source)
                    .map(|s| s.unlocks.clone())
                    .unwrap_or_default(),
                at: self.now(),
            });
        }
    }

    /// Log, count and notify entries that left, each once.
    fn removed(&self, active: &Active, removed: &[Removed]) {
        let policy = &active.policy;
        for r in removed {
            let kind = match r.why {
                Removal::Evicted => EventKind::Evict,
                Removal::Idle | Removal::MaxAge => EventKind::Expire,
                Removal::Revoked => EventKind::Revoke,
            };
            self.notify(active, kind, &r.source, r.network, r.identity.as_deref());
            let services = policy.sources.get(&r.source).map(|s| &s.unlocks);
            info!(
                source = %r.source,
                network = %r.network,
                identity = r.identity.as_deref(),
                ?services,
                "{}",
                r.why.as_str()
            );
            self.inner.metrics.removal(&r.source, r.why.metric());
        }
    }

    /// Swap in a snapshot of `ledger` and bump the change counter; called with the lock held so
    /// snapshots are swapped in the order their changes happened.
    fn publish(&self, policy: &Policy, ledger: &Ledger) -> u64 {
        self.inner.snapshot.store(Arc::new(ledger.snapshot(policy)));
        let mut generation = 0;
        self.inner.changes.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        generation
    }

    /// Wait until a grant is durable: in the state file, or in the shared store and the local
    /// copy. Returns the grant's change counter (what the proxy is shown follows it), or why
    /// the grant was not made (the shared store refused or could not be reached).
    pub async fn persisted(&self, durable: Durable) -> GrantReply {
        match durable {
            Durable::Change(generation) => {
                let mut rx = self.inner.persisted.subscribe();
                // The sender lives as long as the gate, which `self` keeps alive.
                let _ = rx.wait_for(|g| *g >= generation).await;
                Ok(generation)
            }
            Durable::Pending(reply) => reply.await.unwrap_or(Err(SharedError::Stopped)),
        }
    }

    /// Can the ledger of record be reached now? `None`: it is this process's own.
    pub(crate) fn backend_up(&self) -> Option<bool> {
        self.inner.backend.up()
    }

    /// A grant the shared store made, with what it evicted, applied to the local copy; logged,
    /// counted and notified here, once, by the replica that asked for it. Returns the change
    /// counter, or `None` when a reload removed the source while Redis was asked (the entry
    /// stays under the removed source's keys in Redis, which no replica reads).
    pub(crate) fn shared_granted(
        &self,
        source: &str,
        entry: Restore,
        status: GrantStatus,
        evicted: Vec<Removed>,
    ) -> Option<u64> {
        let active = self.active();
        if !active.policy.sources.contains_key(source) {
            return None;
        }
        let network = entry.network;
        let identity = entry.identity.clone();
        let mut ledger = self.ledger();
        ledger.upsert(source, entry);
        let removed = remove_all(&mut ledger, evicted);
        let generation = self.publish(&active.policy, &ledger);
        drop(ledger);
        match status {
            GrantStatus::New => self.granted(&active, source, network, identity.as_deref()),
            GrantStatus::Reidentified => info!(source, %network, identity, "identity changed"),
            GrantStatus::Known => {}
        }
        self.removed(&active, &removed);
        Some(generation)
    }

    /// Log, count and notify a new grant, once, on the replica that made it.
    fn granted(&self, active: &Active, source: &str, network: IpNet, identity: Option<&str>) {
        let services = active.policy.sources.get(source).map(|s| &s.unlocks);
        info!(source, %network, identity, ?services, "granted");
        self.inner.metrics.grant(source);
        self.notify(active, EventKind::Grant, source, network, identity);
    }

    /// Entries the shared store removed (expired, evicted) at this replica's request: applied
    /// locally, logged, counted and notified.
    pub(crate) fn shared_removed(&self, removed: Vec<Removed>) {
        let active = self.active();
        let mut ledger = self.ledger();
        let removed = remove_all(&mut ledger, removed);
        self.publish(&active.policy, &ledger);
        drop(ledger);
        self.removed(&active, &removed);
    }

    /// Drop entries from the local copy without logging them again (a revocation already logged
    /// when it was asked for, now confirmed by the shared store).
    pub(crate) fn shared_forget(&self, removed: Vec<Removed>) {
        let active = self.active();
        let mut ledger = self.ledger();
        let mut changed = false;
        for r in removed {
            changed |= ledger.remove(&r.source, r.network, r.why).is_some();
        }
        if changed {
            self.publish(&active.policy, &ledger);
        }
    }

    /// Make the local copy equal to the shared store's `books` (source → entries). Changes made
    /// by other replicas are logged at debug level only: the replica that made them logged them.
    pub(crate) fn shared_sync(&self, books: Vec<(String, Vec<Restore>)>) {
        let active = self.active();
        let mut ledger = self.ledger();
        let mut changed = false;
        for (source, entries) in books {
            // Entries this replica's policy never grants (its trusted, never_grant or always_allow
            // ranges) stay out of its lists.
            let entries = entries
                .into_iter()
                .filter(|e| active.client_ip.grantable_network(e.network).is_ok())
                .collect();
            if let Some((added, removed, c)) = ledger.sync_source(&source, entries) {
                changed |= c;
                for network in added {
                    tracing::debug!(%source, %network, "granted by another replica");
                }
                for network in removed {
                    tracing::debug!(%source, %network, "removed by another replica");
                }
            }
        }
        if changed {
            self.publish(&active.policy, &ledger);
        }
    }

    /// Every entry as the state file would keep it: for re-seeding an emptied shared store, and
    /// the refreshes (last seen, hits) sent to it.
    pub(crate) fn entries_restore(&self) -> Vec<(String, Restore)> {
        self.ledger()
            .entries()
            .into_iter()
            .map(|(s, e)| (s.to_string(), e.to_restore()))
            .collect()
    }

    /// The counters for `/metrics`.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The HTTP client for upstream checks.
    pub(crate) fn http_client(&self) -> &reqwest::Client {
        &self.inner.http
    }

    /// Expire entries when they are due, with no request needed, until `shutdown` resolves.
    pub(crate) async fn run_expiry(self, shutdown: impl Future<Output = ()>) {
        let mut changes = self.watch_changes();
        tokio::pin!(shutdown);
        loop {
            let due = self.ledger().next_due();
            // Sleep until the next entry is due, but wake at least once a minute so a jump of the
            // wall clock is noticed, and on every change since a new entry may be due sooner.
            let wait = match due {
                Some(due) => Duration::from_millis(due.saturating_sub(self.now()))
                    .min(Duration::from_secs(60)),
                None => Duration::from_secs(60),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                r = changes.changed() => if r.is_err() { return },
                _ = &mut shutdown => return,
            }
            self.expire_due();
        }
    }
}

/// Remove what the shared store removed from the local copy too; an entry the copy did not have
/// yet is still reported as the store described it.
fn remove_all(ledger: &mut Ledger, removed: Vec<Removed>) -> Vec<Removed> {
    removed
        .into_iter()
        .map(|r| ledger.remove(&r.source, r.network, r.why).unwrap_or(r))
        .collect()
}

/// What [`Gate::capture`] took.
pub(crate) struct Capture {
    /// The state file's bytes, when the state file is the ledger of record.
    pub(crate) state: Option<Vec<u8>>,
    /// The snapshot of the same moment.
    pub(crate) snapshot: Arc<Snapshot>,
    /// The change counter of the same moment.
    pub(crate) generation: u64,
}

fn keys(ledger: &Ledger) -> HashSet<(String, IpNet)> {
    ledger
        .entries()
        .into_iter()
        .map(|(source, e)| (source.to_string(), e.network))
        .collect()
}

fn publish_at_least(tx: &watch::Sender<u64>, generation: u64) {
    tx.send_if_modified(|g| {
        let newer = generation > *g;
        if newer {
            *g = generation;
        }
        newer
    });
}

impl Gate {
    /// Every entry with its source and when it expires under that source's limits (`None`:
    /// never), in source order then network order; for the admin API and the status page.
    pub fn entries(&self) -> Vec<(String, crate::ledger::Entry, Option<Millis>)> {
        let active = self.active();
        let ledger = self.ledger();
        ledger
            .entries()
            .into_iter()
            .map(|(source, e)| {
                let limits = active.policy.sources.get(source).map(|s| &s.limits);
                let expires = limits.and_then(|l| e.expires_at(l));
                (source.to_string(), e.clone(), expires)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// Where this thread's paused tokio clock started (each test has its own runtime).
        static STARTED: Cell<Option<tokio::time::Instant>> = const { Cell::new(None) };
    }

    const T0: Millis = 1_800_000_000_000;

    /// The gate's clock in these tests: tokio's, which a test with `start_paused` moves only
    /// when every task waits, straight to the next timer.
    fn paused_clock() -> Millis {
        let started = STARTED.with(Cell::get).expect("the test set STARTED");
        T0 + started.elapsed().as_millis() as Millis
    }

    fn mirror_policy(limits: &str) -> Policy {
        crate::policy::from_yaml_str(
            &format!(
                "services: {{ immich: {{}} }}\nsources:\n  ha: {{ kind: mirror, hosts: [ha.example.com], unlocks: \"*\", {limits} }}\n"
            ),
            "test",
        )
        .unwrap()
    }

    fn listed(gate: &Gate) -> Vec<String> {
        gate.entries()
            .iter()
            .map(|(_, e, _)| e.network.to_string())
            .collect()
    }

    /// The expiry task with the clock passed in: an hour of idle TTL and maximum age in paused
    /// time, no real sleep; the task wakes when an entry is due, not on a fixed tick.
    #[tokio::test(start_paused = true)]
    async fn the_expiry_task_removes_entries_when_due_on_the_clock_passed_in() {
        STARTED.with(|s| s.set(Some(tokio::time::Instant::now())));
        let (gate, _) = Gate::with_clock(
            mirror_policy("idle_ttl: 10m, max_age: 25m"),
            Vec::new(),
            paused_clock,
        );
        let (a, b): (IpNet, IpNet) = (
            "203.0.113.5/32".parse().unwrap(),
            "203.0.113.6/32".parse().unwrap(),
        );
        gate.record("ha", a, None).unwrap();
        gate.record("ha", b, None).unwrap();
        let task = tokio::spawn(gate.clone().run_expiry(std::future::pending()));
        let minutes = |m: u64| tokio::time::sleep(Duration::from_secs(60 * m));

        minutes(9).await;
        assert_eq!(listed(&gate), ["203.0.113.5/32", "203.0.113.6/32"]);
        // `a` is seen again at 9 min: idle until 19 min; `b` is idle at 10 min.
        gate.record("ha", a, None).unwrap();
        minutes(2).await;
        assert_eq!(
            listed(&gate),
            ["203.0.113.5/32"],
            "b idle since 0, due at 10 min"
        );
        minutes(7).await;
        gate.record("ha", a, None).unwrap();
        // Seen at 18 min, so idle only at 28; too old at 25 min however active.
        minutes(6).await;
        assert_eq!(
            listed(&gate),
            ["203.0.113.5/32"],
            "24 min: neither idle nor too old"
        );
        minutes(2).await;
        assert!(listed(&gate).is_empty(), "26 min: older than max_age");
        task.abort();
    }

    #[test]
    fn grants_are_at_most_a_16_or_a_64_or_the_clients_ipv6_prefix() {
        let wide = |n: &str, prefix| too_wide(n.parse().unwrap(), prefix);
        assert!(!wide("198.51.0.0/16", 64));
        assert!(wide("198.0.0.0/15", 64));
        assert!(!wide("2001:db8::/64", 64));
        assert!(wide("2001:db8::/63", 64));
        assert!(!wide("2001:db8::/48", 48));
        assert!(wide("2001:db8::/47", 48));
        // ipv6_prefix never widens IPv4.
        assert!(wide("10.0.0.0/8", 8));
    }
}
