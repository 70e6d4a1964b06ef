//! One rulebook, two backends: every case of one table runs against the local ledger (the state
//! file) and against the shared one (`redis:`, a real redis-server), and both must end with the
//! same entries, the same allow lists and the same removals, each reported once with the same
//! reason.
//!
//! Both runners drive the library in-process through [`Gate`], as the daemon does. The local
//! runner owns the clock (a thread-local one: no sleeps at all), and runs expiry before each step
//! as the expiry task would have by then. Redis keeps time on its own clock, so the Redis runner
//! steps through real time (cases last a few seconds; they run in parallel, each under its own key
//! prefix), asks the replica to catch up before each step (send refreshes, expire, read back), and
//! gives its replicas a clock [`REPLICA_SKEW`] behind the server's: the rules must not depend on
//! a replica's clock. Removals are read from the log lines every removal produces
//! (`Gate::removed`), which is also how an operator sees them.

mod common;

use std::cell::Cell;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatekeeper::gate::{Durable, Gate};
use gatekeeper::ledger::{Ledger, Millis, now_millis};
use gatekeeper::policy::{Policy, from_yaml_str};
use gatekeeper::shared_store::{self, Handle};
use gatekeeper::store::{self, StoredEntry};
use ipnet::IpNet;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

use common::redis::Redis;

/// How far behind the server's clock the Redis runner's replicas run.
const REPLICA_SKEW: Millis = 90_000;
/// Where the local runner's clock starts.
const T0: Millis = 1_800_000_000_000;

/// One case: a policy, entries stored before it starts, steps, and every removal expected.
struct Case {
    name: &'static str,
    /// Lines under `sources.ha` (its limits), then any other source.
    policy: &'static str,
    /// Entries already stored (the state file, or Redis) when the case starts.
    stored: Vec<Stored>,
    steps: Vec<Step>,
    /// Every removal over the case, as `source network reason`, in any order.
    removed: &'static [&'static str],
}

/// An entry as a backend stores it, its times in ms relative to the start of the case.
struct Stored {
    source: &'static str,
    network: &'static str,
    first_seen: i64,
    last_seen: i64,
}

/// What happens, at `at` ms from the start of the case.
enum Step {
    /// A client proves trust through a source (with an identity, for mirror sources that read
    /// one): a new entry, or a refresh of a known one.
    Seen {
        at: Millis,
        source: &'static str,
        network: &'static str,
        identity: Option<&'static str>,
    },
    /// An operator's grant with a fixed end `ttl` ms later.
    Grant {
        at: Millis,
        source: &'static str,
        network: &'static str,
        ttl: Millis,
    },
    /// An operator's revocation, from one source or (`None`) from all.
    Revoke {
        at: Millis,
        network: &'static str,
        source: Option<&'static str>,
    },
    /// The policy is reloaded with these lines in place of the case's.
    Reload { at: Millis, policy: &'static str },
    /// gatekeeper restarts: from the state file, or as a new replica reading Redis.
    Restart { at: Millis },
    /// Redis only (the local backend has one copy, its state file): a second replica reads the
    /// store, then loses it (a network partition).
    CopyLeaves { at: Millis },
    /// Redis only: the store loses its data (restarted without persistence); the first replica
    /// puts its copy back.
    StoreLost { at: Millis },
    /// Redis only: the second replica reaches the store again, with its copy from before.
    CopyReturns { at: Millis },
    /// Exactly these entries, as `source network [identity]`.
    Entries {
        at: Millis,
        entries: &'static [&'static str],
    },
    /// `service`'s allow list is exactly these networks.
    Allowed {
        at: Millis,
        service: &'static str,
        allowed: &'static [&'static str],
    },
}

impl Step {
    fn at(&self) -> Millis {
        match self {
            Step::Seen { at, .. }
            | Step::Grant { at, .. }
            | Step::Revoke { at, .. }
            | Step::Reload { at, .. }
            | Step::Restart { at }
            | Step::CopyLeaves { at }
            | Step::StoreLost { at }
            | Step::CopyReturns { at }
            | Step::Entries { at, .. }
            | Step::Allowed { at, .. } => *at,
        }
    }
}

fn seen(at: Millis, network: &'static str) -> Step {
    Step::Seen {
        at,
        source: "ha",
        network,
        identity: None,
    }
}

fn seen_as(at: Millis, network: &'static str, identity: &'static str) -> Step {
    Step::Seen {
        at,
        source: "ha",
        network,
        identity: Some(identity),
    }
}

fn entries(at: Millis, entries: &'static [&'static str]) -> Step {
    Step::Entries { at, entries }
}

fn stored(network: &'static str, first_seen: i64, last_seen: i64) -> Stored {
    Stored {
        source: "ha",
        network,
        first_seen,
        last_seen,
    }
}

/// The table. Times are at least half a second from any deadline, so the Redis runner (real
/// time) decides the same way on a loaded machine.
fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "lru_evicts_the_least_recently_seen_and_a_refresh_counts",
            policy: "    max_ips: 2\n    idle_ttl: 1h\n",
            stored: vec![],
            steps: vec![
                seen(0, "198.51.100.1/32"),
                seen(500, "198.51.100.2/32"),
                // Seen again: now the second is the least recently seen.
                seen(1000, "198.51.100.1/32"),
                seen(1500, "198.51.100.3/32"),
                entries(2000, &["ha 198.51.100.1/32", "ha 198.51.100.3/32"]),
            ],
            removed: &["ha 198.51.100.2/32 evicted"],
        },
        Case {
            // Equal last seen: the earlier first seen goes first, then the lower network (by
            // address, not by text: 10.0.0.9 before 10.0.0.10).
            name: "lru_ties_are_broken_by_first_seen_then_network",
            policy: "    max_ips: 3\n    idle_ttl: 1h\n",
            stored: vec![
                stored("10.0.0.10/32", -3000, -1000),
                stored("10.0.0.9/32", -3000, -1000),
                stored("10.0.0.3/32", -2000, -1000),
            ],
            steps: vec![
                seen(0, "198.51.100.1/32"),
                entries(
                    500,
                    &["ha 10.0.0.10/32", "ha 10.0.0.3/32", "ha 198.51.100.1/32"],
                ),
                seen(1000, "198.51.100.2/32"),
                entries(
                    1500,
                    &["ha 10.0.0.3/32", "ha 198.51.100.1/32", "ha 198.51.100.2/32"],
                ),
            ],
            removed: &["ha 10.0.0.10/32 evicted", "ha 10.0.0.9/32 evicted"],
        },
        Case {
            name: "lru_ties_between_ipv6_networks_follow_the_address",
            policy: "    max_ips: 3\n    idle_ttl: 1h\n",
            stored: vec![
                stored("2001:db8:0:10::/64", -3000, -1000),
                stored("2001:db8::/64", -3000, -1000),
                stored("2001:db8:0:9::/64", -3000, -1000),
            ],
            steps: vec![
                seen(0, "198.51.100.1/32"),
                seen(500, "198.51.100.2/32"),
                entries(
                    1000,
                    &[
                        "ha 198.51.100.1/32",
                        "ha 198.51.100.2/32",
                        "ha 2001:db8:0:10::/64",
                    ],
                ),
            ],
            removed: &["ha 2001:db8:0:9::/64 evicted", "ha 2001:db8::/64 evicted"],
        },
        Case {
            name: "idle_ttl_expires_what_is_not_seen_and_a_refresh_postpones_it",
            policy: "    max_ips: 10\n    idle_ttl: 2s\n",
            stored: vec![],
            steps: vec![
                seen(0, "198.51.100.1/32"),
                seen(0, "198.51.100.2/32"),
                seen(1000, "198.51.100.1/32"),
                entries(1500, &["ha 198.51.100.1/32", "ha 198.51.100.2/32"]),
                entries(2500, &["ha 198.51.100.1/32"]),
                entries(3500, &[]),
            ],
            removed: &[
                "ha 198.51.100.1/32 expired (idle)",
                "ha 198.51.100.2/32 expired (idle)",
            ],
        },
        Case {
            name: "max_age_expires_an_entry_however_active",
            policy: "    max_ips: 10\n    idle_ttl: 1h\n    max_age: 2s\n",
            stored: vec![],
            steps: vec![
                seen(0, "198.51.100.1/32"),
                seen(1000, "198.51.100.1/32"),
                entries(1500, &["ha 198.51.100.1/32"]),
                entries(2500, &[]),
            ],
            removed: &["ha 198.51.100.1/32 expired (max age)"],
        },
        Case {
            // Both deadlines at once: the hard limit is the reason.
            name: "an_entry_idle_and_too_old_at_the_same_moment_expired_by_max_age",
            policy: "    max_ips: 10\n    idle_ttl: 2s\n    max_age: 2s\n",
            stored: vec![],
            steps: vec![
                seen(0, "198.51.100.1/32"),
                entries(1500, &["ha 198.51.100.1/32"]),
                entries(2500, &[]),
            ],
            removed: &["ha 198.51.100.1/32 expired (max age)"],
        },
        Case {
            // Idle at 1 s, too old at 3 s, and nothing looks before 3.5 s: the reason is the
            // deadline that passed first, whenever expiry happens to run.
            name: "an_entry_idle_before_it_was_too_old_expired_idle_when_expiry_runs_late",
            policy: "    max_ips: 10\n    idle_ttl: 1s\n    max_age: 3s\n",
            stored: vec![],
            steps: vec![seen(0, "198.51.100.1/32"), entries(3500, &[])],
            removed: &["ha 198.51.100.1/32 expired (idle)"],
        },
        Case {
            // An operator's grant for 2 s: refreshes do not extend it, a restart keeps it, and it
            // is reported as expired by age.
            name: "a_fixed_end_holds_across_refreshes_and_restarts",
            policy: "    max_ips: 10\n    idle_ttl: 1h\n",
            stored: vec![],
            steps: vec![
                Step::Grant {
                    at: 0,
                    source: "ha",
                    network: "198.51.100.1/32",
                    ttl: 2000,
                },
                seen(0, "198.51.100.2/32"),
                seen(700, "198.51.100.1/32"),
                Step::Restart { at: 1000 },
                entries(1500, &["ha 198.51.100.1/32", "ha 198.51.100.2/32"]),
                entries(2500, &["ha 198.51.100.2/32"]),
            ],
            removed: &["ha 198.51.100.1/32 expired (max age)"],
        },
        Case {
            name: "a_lowered_max_ips_trims_the_least_recently_seen_once",
            policy: "    max_ips: 4\n    idle_ttl: 1h\n",
            stored: vec![],
            steps: vec![
                seen(0, "198.51.100.1/32"),
                seen(300, "198.51.100.2/32"),
                seen(600, "198.51.100.3/32"),
                seen(900, "198.51.100.4/32"),
                seen(1200, "198.51.100.1/32"),
                Step::Reload {
                    at: 1500,
                    policy: "    max_ips: 2\n    idle_ttl: 1h\n",
                },
                entries(2000, &["ha 198.51.100.1/32", "ha 198.51.100.4/32"]),
                // The next grant evicts under the new limit.
                seen(2500, "198.51.100.5/32"),
                entries(3000, &["ha 198.51.100.1/32", "ha 198.51.100.5/32"]),
            ],
            removed: &[
                "ha 198.51.100.2/32 evicted",
                "ha 198.51.100.3/32 evicted",
                "ha 198.51.100.4/32 evicted",
            ],
        },
        Case {
            // A revocation removes from one source or all; the entry stays gone across a restart;
            // it is not a ban: proving trust again grants again.
            name: "revocation_removes_and_stays_removed",
            policy: "    max_ips: 10\n    idle_ttl: 1h\n  \
                     vpn:\n    kind: mirror\n    hosts: [vpn.example.com]\n    unlocks: [immich]\n    max_ips: 10\n    idle_ttl: 1h\n",
            stored: vec![],
            steps: vec![
                seen(0, "198.51.100.1/32"),
                seen(0, "198.51.100.2/32"),
                Step::Seen {
                    at: 0,
                    source: "vpn",
                    network: "198.51.100.1/32",
                    identity: None,
                },
                Step::Seen {
                    at: 0,
                    source: "vpn",
                    network: "198.51.100.2/32",
                    identity: None,
                },
                Step::Revoke {
                    at: 300,
                    network: "198.51.100.1/32",
                    source: None,
                },
                Step::Revoke {
                    at: 300,
                    network: "198.51.100.2/32",
                    source: Some("vpn"),
                },
                entries(600, &["ha 198.51.100.2/32"]),
                Step::Restart { at: 900 },
                entries(1200, &["ha 198.51.100.2/32"]),
                seen(1500, "198.51.100.1/32"),
                entries(1800, &["ha 198.51.100.1/32", "ha 198.51.100.2/32"]),
            ],
            removed: &[
                "ha 198.51.100.1/32 revoked",
                "vpn 198.51.100.1/32 revoked",
                "vpn 198.51.100.2/32 revoked",
            ],
        },
        Case {
            // Redis: a replica cut off from the store comes back after the store lost its data and
            // was refilled; its stale copy must not bring back what was revoked meanwhile (the
            // tombstone). Locally there is one copy, so only the revocation happens.
            name: "a_revoked_entry_stays_gone_when_a_stale_copy_comes_back",
            policy: "    max_ips: 10\n    idle_ttl: 1h\n",
            stored: vec![],
            steps: vec![
                seen(0, "198.51.100.1/32"),
                seen(0, "198.51.100.2/32"),
                Step::CopyLeaves { at: 300 },
                Step::StoreLost { at: 600 },
                Step::Revoke {
                    at: 900,
                    network: "198.51.100.1/32",
                    source: None,
                },
                Step::CopyReturns { at: 1200 },
                entries(1500, &["ha 198.51.100.2/32"]),
            ],
            removed: &["ha 198.51.100.1/32 revoked"],
        },
        Case {
            // An identity rule narrows what an entry unlocks; a proof under another identity
            // re-identifies the entry; a refresh with no identity keeps the one it has.
            name: "identities_narrow_what_an_entry_unlocks_and_follow_the_last_proof",
            policy: "    max_ips: 10\n    idle_ttl: 1h\n    identity_header: X-Client-Subject\n    \
                     identities: { \"CN=alice\": [immich] }\n",
            stored: vec![],
            steps: vec![
                seen_as(0, "198.51.100.1/32", "alice"),
                seen_as(0, "198.51.100.2/32", "bob"),
                Step::Allowed {
                    at: 300,
                    service: "immich",
                    allowed: &["198.51.100.1/32", "198.51.100.2/32"],
                },
                Step::Allowed {
                    at: 300,
                    service: "nextcloud",
                    allowed: &["198.51.100.2/32"],
                },
                seen_as(600, "198.51.100.2/32", "alice"),
                seen(900, "198.51.100.2/32"),
                Step::Allowed {
                    at: 1200,
                    service: "nextcloud",
                    allowed: &[],
                },
                entries(
                    1200,
                    &["ha 198.51.100.1/32 alice", "ha 198.51.100.2/32 alice"],
                ),
            ],
            removed: &[],
        },
    ]
}

fn net(s: &str) -> IpNet {
    s.parse()
        .unwrap_or_else(|e| panic!("{s} in the table: {e}"))
}

fn policy(case_lines: &str, top: &str) -> Policy {
    let yaml = format!(
        "trusted_proxies: [127.0.0.1/32]\n{top}\
         services: {{ immich: {{}}, nextcloud: {{}} }}\n\
         sources:\n  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n{case_lines}"
    );
    from_yaml_str(&yaml, "conformance").unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

thread_local! {
    /// The local runner's clock (each case runs on its own thread).
    static CLOCK: Cell<Millis> = const { Cell::new(T0) };
}

fn local_clock() -> Millis {
    CLOCK.with(Cell::get)
}

fn skewed_clock() -> Millis {
    now_millis() - REPLICA_SKEW
}

/// Collects every removal logged on this thread, as `source network reason`.
#[derive(Clone, Default)]
struct Removals(Arc<Mutex<Vec<String>>>);

const REASONS: [&str; 4] = ["evicted", "expired (idle)", "expired (max age)", "revoked"];

#[derive(Default)]
struct Fields {
    message: String,
    source: String,
    network: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = text,
            "source" => self.source = text,
            "network" => self.network = text,
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &format_args!("{value}"));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Removals {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        if REASONS.contains(&f.message.as_str()) {
            let line = format!("{} {} {}", f.source, f.network, f.message);
            self.0.lock().unwrap().push(line);
        }
    }
}

/// A replica on Redis: its gate and the task that talks to the store.
struct Replica {
    gate: Gate,
    handle: Arc<Handle>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Replica {
    async fn start(policy: Policy) -> Replica {
        let (gate, handle) = shared_store::gate(policy, skewed_clock).expect("redis in the policy");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(shared_store::run(
            gate.clone(),
            handle.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        tokio::time::timeout(Duration::from_secs(10), handle.synced())
            .await
            .expect("the replica never read the store");
        Replica {
            gate,
            handle,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }

    /// Wait until the replica has sent its refreshes, run expiry and read the store, retrying
    /// while it reconnects.
    async fn catch_up(&self) {
        let mut last = String::new();
        for _ in 0..200 {
            match self.handle.catch_up().await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "the store task stopped".to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the replica did not catch up with the store: {last}");
    }
}

enum Backend<'a> {
    Local {
        dir: tempfile::TempDir,
    },
    Redis {
        redis: &'a Redis,
        prefix: String,
        user: String,
        base: Millis,
        replica: Option<Replica>,
        /// The second replica of [`Step::CopyLeaves`].
        stale: Option<Replica>,
    },
}

struct Runner<'a> {
    case: &'a Case,
    backend: Backend<'a>,
    gate: Gate,
    /// The case's policy lines in force (a reload replaces them).
    lines: &'static str,
}

impl Runner<'_> {
    fn top(&self) -> String {
        match &self.backend {
            Backend::Local { dir } => {
                format!("state_file: {}\n", dir.path().join("state.json").display())
            }
            Backend::Redis { redis, prefix, .. } => {
                format!(
                    "redis: {{ url: \"{}\", key_prefix: {prefix} }}\n",
                    redis.url()
                )
            }
        }
    }

    fn policy(&self) -> Policy {
        policy(self.lines, &self.top())
    }

    /// Move to `at`: whatever is due by then has expired.
    async fn advance(&mut self, at: Millis) {
        match &self.backend {
            Backend::Local { .. } => {
                CLOCK.with(|c| c.set(T0 + at));
                self.gate.expire_due();
            }
            Backend::Redis { base, replica, .. } => {
                let target = base + at;
                let now = now_millis();
                if target > now {
                    tokio::time::sleep(Duration::from_millis(target - now)).await;
                }
                replica.as_ref().expect("a replica").catch_up().await;
            }
        }
    }

    async fn durable(&self, what: &str, durable: Durable) {
        if let Durable::Pending(_) = durable {
            self.gate
                .persisted(durable)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }

    async fn step(&mut self, step: &Step) {
        self.advance(step.at()).await;
        match step {
            Step::Seen {
                source,
                network,
                identity,
                ..
            } => {
                let (_, durable) = self
                    .gate
                    .record(source, net(network), *identity)
                    .expect("a source of the policy");
                self.durable(&format!("{network} seen"), durable).await;
                // A replica sends refreshes at its next tick, where they count as seen (on the
                // server's clock): a second late at most. Send them now, so a refresh counts
                // at the time of its step.
                if let Backend::Redis {
                    replica: Some(r), ..
                } = &self.backend
                {
                    r.catch_up().await;
                }
            }
            Step::Grant {
                source,
                network,
                ttl,
                ..
            } => {
                let durable = self
                    .gate
                    .grant(source, net(network), Some(Duration::from_millis(*ttl)))
                    .unwrap_or_else(|e| panic!("grant of {network}: {e}"));
                self.durable(&format!("grant of {network}"), durable).await;
            }
            Step::Revoke {
                network, source, ..
            } => {
                self.gate.revoke(net(network), *source);
            }
            Step::Reload { policy, .. } => {
                self.lines = policy;
                self.gate.reload(self.policy());
            }
            Step::Restart { .. } => self.restart().await,
            Step::CopyLeaves { .. } => self.copy_leaves().await,
            Step::StoreLost { .. } => self.store_lost().await,
            Step::CopyReturns { .. } => self.copy_returns().await,
            Step::Entries { at, entries } => {
                let mut want: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
                want.sort();
                let mut gates = vec![("", &self.gate)];
                if let Backend::Redis {
                    stale: Some(stale), ..
                } = &self.backend
                {
                    gates.push((" (the second replica)", &stale.gate));
                }
                for (which, gate) in gates {
                    assert_eq!(
                        listed(gate),
                        want,
                        "{}: entries at {at} ms{which}",
                        self.case.name
                    );
                }
            }
            Step::Allowed {
                at,
                service,
                allowed,
            } => {
                let got: Vec<String> = self
                    .gate
                    .snapshot()
                    .service(service)
                    .expect("a service of the policy")
                    .allowed
                    .iter()
                    .map(|n| n.to_string())
                    .collect();
                assert_eq!(got, *allowed, "{}: {service} at {at} ms", self.case.name);
            }
        }
    }

    async fn restart(&mut self) {
        let policy = self.policy();
        match &mut self.backend {
            Backend::Local { .. } => {
                // Through the state file, as kill and start would.
                let path = policy.state_file.clone();
                let mut ledger = Ledger::new(&policy);
                for (source, entry, _) in self.gate.entries() {
                    ledger.restore(&source, entry.to_restore());
                }
                store::save(&path, &store::encode(&ledger)).expect("state file written");
                let entries = store::load(&path).expect("state file read");
                let (gate, restored) = Gate::with_clock(policy, entries, local_clock);
                assert!(restored.dropped.is_empty(), "{:?}", restored.dropped);
                self.gate = gate;
            }
            Backend::Redis { replica, .. } => {
                if let Some(old) = replica.take() {
                    old.stop().await;
                }
                let new = Replica::start(policy).await;
                new.catch_up().await;
                self.gate = new.gate.clone();
                *replica = Some(new);
            }
        }
    }

    async fn copy_leaves(&mut self) {
        let policy_lines = self.lines;
        let Backend::Redis {
            redis,
            prefix,
            user,
            stale,
            ..
        } = &mut self.backend
        else {
            return;
        };
        redis.cli(&["ACL", "SETUSER", user, "on", ">secret", "~*", "&*", "+@all"]);
        let url = redis
            .url()
            .replace("redis://", &format!("redis://{user}:secret@"));
        let top = format!("redis: {{ url: \"{url}\", key_prefix: {prefix} }}\n");
        let copy = Replica::start(policy(policy_lines, &top)).await;
        copy.catch_up().await;
        // Cut off: refused at every reconnection until `CopyReturns`.
        redis.cli(&["ACL", "SETUSER", user, "off"]);
        redis.cli(&["CLIENT", "KILL", "USER", user]);
        *stale = Some(copy);
    }

    async fn store_lost(&mut self) {
        let Backend::Redis {
            redis,
            prefix,
            replica,
            ..
        } = &self.backend
        else {
            return;
        };
        for key in redis.cli(&["KEYS", &format!("{prefix}:*")]).lines() {
            if !key.is_empty() {
                redis.cli(&["DEL", key]);
            }
        }
        // The replica notices at its next read, reconnects and puts its copy back.
        replica.as_ref().expect("a replica").catch_up().await;
    }

    async fn copy_returns(&mut self) {
        let Backend::Redis {
            redis,
            user,
            stale,
            replica,
            ..
        } = &self.backend
        else {
            return;
        };
        redis.cli(&["ACL", "SETUSER", user, "on"]);
        stale.as_ref().expect("CopyLeaves first").catch_up().await;
        replica.as_ref().expect("a replica").catch_up().await;
    }

    async fn finish(self) {
        if let Backend::Redis { replica, stale, .. } = self.backend {
            for r in [replica, stale].into_iter().flatten() {
                r.stop().await;
            }
        }
    }
}

/// A gate's entries as `source network [identity]`, sorted as text.
fn listed(gate: &Gate) -> Vec<String> {
    let mut listed: Vec<String> = gate
        .entries()
        .into_iter()
        .map(|(source, e, _)| match &e.identity {
            Some(id) => format!("{source} {} {id}", e.network),
            None => format!("{source} {}", e.network),
        })
        .collect();
    listed.sort();
    listed
}

async fn run_case(case: &Case, mut backend: Backend<'_>, removals: Removals) {
    let gate = match &mut backend {
        Backend::Local { dir } => {
            let top = format!("state_file: {}\n", dir.path().join("state.json").display());
            let stored = case
                .stored
                .iter()
                .map(|s| StoredEntry {
                    source: s.source.to_string(),
                    network: net(s.network),
                    first_seen: T0.saturating_add_signed(s.first_seen),
                    last_seen: T0.saturating_add_signed(s.last_seen),
                    hits: 1,
                    identity: None,
                    until: None,
                })
                .collect();
            let (gate, restored) = Gate::with_clock(policy(case.policy, &top), stored, local_clock);
            assert!(restored.dropped.is_empty(), "{:?}", restored.dropped);
            gate
        }
        Backend::Redis {
            redis,
            prefix,
            base,
            replica,
            ..
        } => {
            let top = format!(
                "redis: {{ url: \"{}\", key_prefix: {prefix} }}\n",
                redis.url()
            );
            let started = Replica::start(policy(case.policy, &top)).await;
            *base = now_millis();
            // Stored as a grant stores it; the first catch-up reads them.
            for s in &case.stored {
                let keys = |k: &str| format!("{prefix}:{}:{k}", s.source);
                let at = |offset: i64| base.saturating_add_signed(offset).to_string();
                redis.cli(&["ZADD", &keys("seen"), &at(s.last_seen), s.network]);
                let meta = format!(r#"{{"first_seen":"{}"}}"#, at(s.first_seen));
                redis.cli(&["HSET", &keys("meta"), s.network, &meta]);
                redis.cli(&["HSET", &keys("hits"), s.network, "1"]);
            }
            let gate = started.gate.clone();
            *replica = Some(started);
            gate
        }
    };
    let mut runner = Runner {
        case,
        backend,
        gate,
        lines: case.policy,
    };
    for step in &case.steps {
        runner.step(step).await;
    }
    let end = case.steps.last().map_or(0, Step::at);
    runner.advance(end).await;
    runner.finish().await;
    let mut got = removals.0.lock().unwrap().clone();
    got.sort();
    let mut want: Vec<String> = case.removed.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want, "{}: removals", case.name);
}

/// Run every case, each on its own thread with its own runtime and log capture; panic naming
/// every case that failed.
fn run_all<'a>(backend: impl Fn(usize) -> Backend<'a> + Sync) {
    let cases = cases();
    let failed: Vec<String> = std::thread::scope(|s| {
        let threads: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let backend = &backend;
                let thread = std::thread::Builder::new().name(case.name.to_string());
                let handle = thread
                    .spawn_scoped(s, move || {
                        let removals = Removals::default();
                        let subscriber = tracing_subscriber::registry().with(removals.clone());
                        let _guard = tracing::subscriber::set_default(subscriber);
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("runtime")
                            .block_on(run_case(case, backend(i), removals));
                    })
                    .expect("thread");
                (case.name, handle)
            })
            .collect();
        threads
            .into_iter()
            .filter_map(|(name, h)| h.join().err().map(|_| name.to_string()))
            .collect()
    });
    assert!(failed.is_empty(), "failed cases (see above): {failed:#?}");
}

#[test]
fn every_case_on_the_local_backend() {
    run_all(|_| Backend::Local {
        dir: tempfile::tempdir().expect("temp dir"),
    });
}

#[test]
fn every_case_on_the_redis_backend() {
    let redis = Redis::start();
    run_all(|i| Backend::Redis {
        redis: &redis,
        prefix: format!("conf{i}"),
        user: format!("stale{i}"),
        base: 0,
        replica: None,
        stale: None,
    });
}
