//! `gatekeeper serve`: restore the state, start the background tasks, serve the proxy-facing
//! listener until shutdown, then flush.

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::gate::Gate;
use crate::ledger::now_millis;
use crate::policy::{self, Location, Policy};
use crate::{admin, http, server, shared_store};

/// The bound listeners: the proxy-facing one and the admin one.
pub struct Listeners {
    /// `listen`.
    pub(crate) proxy: TcpListener,
    /// `admin.listen`.
    pub(crate) admin: TcpListener,
}

impl Listeners {
    /// Bind both addresses of `policy`, naming the key of one that cannot be bound.
    pub async fn bind(policy: &Policy) -> anyhow::Result<Listeners> {
        let proxy = TcpListener::bind(policy.listen)
            .await
            .with_context(|| format!("cannot listen on {} (listen)", policy.listen))?;
        let admin = TcpListener::bind(policy.admin.listen)
            .await
            .with_context(|| format!("cannot listen on {} (admin.listen)", policy.admin.listen))?;
        Ok(Listeners { proxy, admin })
    }
}

/// Where the running policy came from, so it can be loaded again.
#[derive(Clone)]
pub struct PolicySource {
    /// The policy file (or the default path, in legacy mode).
    pub location: Location,
    /// The environment it was loaded with.
    pub env: BTreeMap<String, String>,
}

/// How often the policy file is compared with the running policy's text.
pub(crate) const POLICY_POLL: Duration = Duration::from_secs(2);

/// Run gatekeeper on bound `listeners` until `shutdown` resolves. The state file is read first:
/// one that cannot be read stops the start with an error naming it. The policy is reloaded from
/// `source` on SIGHUP and when its file changes.
pub async fn run(
    policy: Policy,
    listeners: Listeners,
    source: PolicySource,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // With a shared store the ledger lives in Redis; the state file is neither read nor written.
    let entries = if policy.redis.is_some() {
        crate::sinks::outputs::prepare_outputs(&policy)?;
        None
    } else {
        Some(crate::sinks::outputs::load_state(&policy)?)
    };
    let token = admin::load_token(&policy)?;
    if policy.legacy {
        warn!(
            middleware = crate::policy::LEGACY_SERVICE,
            file = crate::policy::LEGACY_FILE,
            "legacy mode: no policy file, so the policy was built from MAX_IP_LEN / DEFAULT_SOURCE_RANGE; \
             run `gatekeeper check` to print the equivalent policy file and move to it"
        );
    }
    let (gate, shared) = match entries {
        Some(entries) => {
            let (gate, restored) = Gate::new(policy, entries);
            for why in &restored.dropped {
                warn!("state entry not restored: {why}");
            }
            info!(entries = restored.kept, "state restored");
            (gate, None)
        }
        None => {
            let (gate, handle) = shared_store::gate(policy, now_millis)
                .ok_or_else(|| anyhow::anyhow!("the policy has no redis: section"))?;
            (gate, Some(handle))
        }
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let supervisor = Supervisor::new(gate.clone(), stop_tx.subscribe());
    survive_file_size_limit(&supervisor);
    // Restart or stop, per task: a task whose state can be rebuilt from the gate is restarted;
    // one that holds what cannot (the writer's view of the disk, the shared store's queue and
    // pending revocations, a bound listener) stops gatekeeper, which starts afresh from the
    // state file or the shared store.
    let outputs = {
        let (gate, stopped) = (gate.clone(), stopped.clone());
        supervisor.spawn("outputs task", OnFailure::Stop, move || {
            crate::sinks::outputs::run(gate.clone(), stopped())
        })
    };
    // The shared store's task expires entries (in Redis, or locally while it is unreachable).
    let expiry = match &shared {
        None => {
            let (gate, stopped) = (gate.clone(), stopped.clone());
            supervisor.spawn("expiry task", OnFailure::Restart, move || {
                gate.clone().run_expiry(stopped())
            })
        }
        Some(handle) => {
            let (gate, handle, stopped) = (gate.clone(), handle.clone(), stopped.clone());
            supervisor.spawn("shared store task", OnFailure::Stop, move || {
                shared_store::run(gate.clone(), handle.clone(), stopped())
            })
        }
    };
    if let Some(shared) = &shared {
        let url = &shared.shown_url;
        if tokio::time::timeout(Duration::from_secs(3), shared.synced())
            .await
            .is_ok()
        {
            info!(store = %url, entries = gate.entries().len(), "ledger read from the shared store");
        } else {
            warn!(store = %url, "shared store not reachable yet: starting with an empty ledger (nobody is allowed until it is)");
        }
    }
    let reloader = {
        let (gate, stopped) = (gate.clone(), stopped.clone());
        supervisor.spawn("policy reload task", OnFailure::Restart, move || {
            watch_policy(gate.clone(), source.clone(), stopped())
        })
    };
    let kv_sink = {
        let (gate, stopped) = (gate.clone(), stopped.clone());
        supervisor.spawn("traefik.redis task", OnFailure::Restart, move || {
            crate::sinks::traefik_redis::run(gate.clone(), stopped())
        })
    };

    let admin_addr = listeners.admin.local_addr()?;
    if token.is_none() {
        info!("admin API is off: set admin.token_file or GATEKEEPER_ADMIN__TOKEN to turn it on");
    }
    let counts = gate.metrics().connections.clone();
    let admin_task = {
        let mut serve = Some(server::serve(
            listeners.admin,
            admin::router(gate.clone(), token),
            server::Budget::new(|_| server::Class::Admin, counts.clone()),
            stopped(),
        ));
        // Stopped on failure, so never started twice.
        supervisor.spawn("admin listener", OnFailure::Stop, move || {
            let serve = serve.take();
            async move {
                if let Some(serve) = serve {
                    serve.await;
                }
            }
        })
    };
    info!(%admin_addr, "admin listener ready");
    let addr = listeners.proxy.local_addr()?;
    info!(%addr, origin = %gate.active().policy.origin, "listening");
    let trusted = {
        let gate = gate.clone();
        move |ip| {
            if gate.active().client_ip.is_trusted(ip) {
                server::Class::Trusted
            } else {
                server::Class::Untrusted
            }
        }
    };
    // A task that failed for good stops gatekeeper like a signal, then makes it exit non-zero.
    let mut failed = supervisor.failed();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = failed.wait_for(Option::is_some) => {}
        }
    };
    server::serve_connections(
        listeners.proxy,
        http::proxy(gate.clone()),
        server::Budget::new(trusted, counts),
        shutdown,
    )
    .await;

    info!("shutting down: flushing state");
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    let _ = reloader.await;
    let _ = expiry.await;
    let _ = outputs.await;
    let _ = kv_sink.await;
    if let Some(why) = supervisor.failed().borrow().clone() {
        anyhow::bail!("{why}");
    }
    if let Some(e) = gate.health().output_error() {
        anyhow::bail!("the last output write failed: {e}");
    }
    Ok(())
}

/// Reload the policy on SIGHUP and whenever its file's content changes, until `stop`. An invalid
/// policy is logged with every problem and the running one is kept.
async fn watch_policy(gate: Gate, source: PolicySource, stop: impl Future<Output = ()>) {
    let path = source.location.path.clone();
    let read = || std::fs::read(&path).ok();
    let mut seen = read();
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(POLICY_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let why = tokio::select! {
            _ = hangup => "SIGHUP",
            _ = tick.tick() => {
                let now = read();
                if now == seen { continue }
                seen = now;
                "the policy file changed"
            }
            _ = &mut stop => return,
        };
        match policy::load(&source.location, &source.env) {
            Ok(policy) => {
                for w in &policy.warnings {
                    warn!(key = %w.key, from = w.from.as_deref(), "{}", w.message);
                }
                let removed = gate.reload(policy);
                info!(why, removed = removed.len(), "policy reloaded");
            }
            Err(e) => error!(why, "policy not reloaded, the running one is kept: {e}"),
        }
    }
}

/// A write past the file-size limit (RLIMIT_FSIZE) raises SIGXFSZ, whose default action ends the
/// process. Listening for it replaces that action, so the write fails with EFBIG instead and is
/// reported and retried like any other output failure.
fn survive_file_size_limit(supervisor: &Supervisor) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::from_raw(libc::SIGXFSZ)) {
            Ok(s) => {
                let mut s = Some(s);
                supervisor.spawn("SIGXFSZ handler", OnFailure::Restart, move || {
                    // Registered once: the handler stays installed for the process's life, so
                    // a restart only needs a new stream.
                    let mut s = s
                        .take()
                        .or_else(|| signal(SignalKind::from_raw(libc::SIGXFSZ)).ok());
                    async move {
                        let Some(s) = s.as_mut() else {
                            return std::future::pending().await;
                        };
                        while s.recv().await.is_some() {
                            warn!("a write went past the file-size limit (SIGXFSZ)");
                        }
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "cannot handle SIGXFSZ; a file-size limit would end gatekeeper")
            }
        }
    }
    #[cfg(not(unix))]
    let _ = supervisor;
}

/// What happens when a background task panics, or returns before shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnFailure {
    /// Start it again after a moment; a task that fails more than [`MAX_RESTARTS`] times within
    /// [`RESTART_WINDOW`] stops gatekeeper instead.
    Restart,
    /// Stop gatekeeper, which exits non-zero naming the task.
    Stop,
}

/// How many restarts within [`RESTART_WINDOW`] a task gets before gatekeeper stops.
pub(crate) const MAX_RESTARTS: usize = 3;
/// See [`MAX_RESTARTS`].
pub(crate) const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// A failed task is restarted this long after it failed.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Runs the long-lived background tasks so that none dies silently: a failure is logged and
/// shown on `/healthz` under the task's name, then the task is restarted or gatekeeper stops
/// (see [`OnFailure`]). A short-lived task (a connection, a body drain) is not supervised: its
/// panic ends only that request.
#[derive(Clone)]
pub(crate) struct Supervisor {
    gate: crate::gate::Gate,
    /// True once shutdown began: a task that returns then is done, not failed.
    stopping: watch::Receiver<bool>,
    /// Why gatekeeper must stop, once a task failed for good.
    failed: watch::Sender<Option<String>>,
    restart_delay: Duration,
}

impl Supervisor {
    /// A supervisor reporting to `gate`'s health; `stopping` turns true at shutdown.
    pub(crate) fn new(gate: crate::gate::Gate, stopping: watch::Receiver<bool>) -> Self {
        Supervisor {
            gate,
            stopping,
            failed: watch::Sender::new(None),
            restart_delay: RESTART_DELAY,
        }
    }

    /// Becomes `Some(why)` when a task failed and gatekeeper must stop.
    pub(crate) fn failed(&self) -> watch::Receiver<Option<String>> {
        self.failed.subscribe()
    }

    /// Run the task `start` makes, named `name` in logs and on `/healthz`, until shutdown;
    /// `start` is called again for each restart. The handle resolves when the task is done.
    pub(crate) fn spawn<F, Fut>(
        &self,
        name: &'static str,
        on_failure: OnFailure,
        mut start: F,
    ) -> JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            let mut failures: Vec<Instant> = Vec::new();
            loop {
                let outcome = tokio::spawn(start()).await;
                let stopping = *this.stopping.borrow();
                let why = match outcome {
                    Ok(()) if stopping => return,
                    Ok(()) => "ended before shutdown".to_string(),
                    Err(e) if e.is_panic() => format!("panicked: {}", panic_text(e.into_panic())),
                    Err(e) => format!("failed: {e}"),
                };
                let now = Instant::now();
                failures.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
                failures.push(now);
                if on_failure == OnFailure::Restart && failures.len() <= MAX_RESTARTS && !stopping {
                    error!(task = name, "{why}; restarting it");
                    this.gate
                        .health()
                        .report(name, Some(format!("{why}; restarting")));
                    let mut stop = this.stopping.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(this.restart_delay) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    this.gate.health().report(name, None);
                    continue;
                }
                error!(task = name, "{why}; gatekeeper stops");
                this.gate
                    .health()
                    .report(name, Some(format!("{why}; gatekeeper is stopping")));
                this.failed.send_if_modified(|f| {
                    let first = f.is_none();
                    if first {
                        *f = Some(format!("{name} {why}"));
                    }
                    first
                });
                return;
            }
        })
    }
}

/// The message a panic was raised with.
fn panic_text(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_string(), |s| s.to_string()),
    }
}

/// Resolves on ctrl-c or SIGTERM (what `docker stop` and systemd send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => info!("ctrl-c received"),
        _ = term => info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::gate::Gate;

    type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn gate() -> Gate {
        let policy = crate::policy::from_yaml_str(
            "services: { immich: {} }\nsources:\n  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\" }\n",
            "test",
        )
        .unwrap();
        Gate::new(policy, Vec::new()).0
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never saw {what}");
    }

    /// A task that panics on its first `fails` runs, then waits for `stop`; and its run count.
    fn flaky(
        fails: usize,
        stop: watch::Receiver<bool>,
    ) -> (Arc<AtomicUsize>, impl FnMut() -> Task + Send + 'static) {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let start = move || {
            let run = counted.fetch_add(1, Ordering::SeqCst);
            let mut stop = stop.clone();
            Box::pin(async move {
                if run < fails {
                    panic!("run {run} fails");
                }
                let _ = stop.wait_for(|s| *s).await;
            }) as Task
        };
        (runs, start)
    }

    #[tokio::test]
    async fn a_restartable_task_that_panics_is_restarted_and_health_says_so_meanwhile() {
        let gate = gate();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut supervisor = Supervisor::new(gate.clone(), stop_rx.clone());
        supervisor.restart_delay = Duration::from_millis(300);
        let (runs, start) = flaky(1, stop_rx);
        let task = supervisor.spawn("test task", OnFailure::Restart, start);
        until("the failure on /healthz", || {
            gate.health().problems()
                == vec!["test task: panicked: run 0 fails; restarting".to_string()]
        })
        .await;
        until("the second run, healthy", || {
            runs.load(Ordering::SeqCst) == 2 && gate.health().problems().is_empty()
        })
        .await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert!(supervisor.failed().borrow().is_none());
    }

    #[tokio::test]
    async fn a_task_that_must_not_restart_stops_gatekeeper_and_health_is_never_green() {
        let gate = gate();
        let (_stop_tx, stop_rx) = watch::channel(false);
        let supervisor = Supervisor::new(gate.clone(), stop_rx.clone());
        let (runs, start) = flaky(1, stop_rx);
        supervisor
            .spawn("test task", OnFailure::Stop, start)
            .await
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(
            supervisor.failed().borrow().as_deref(),
            Some("test task panicked: run 0 fails")
        );
        assert_eq!(
            gate.health().problems(),
            vec!["test task: panicked: run 0 fails; gatekeeper is stopping"]
        );
    }

    #[tokio::test]
    async fn a_task_that_keeps_failing_stops_gatekeeper_and_one_that_returns_early_fails_too() {
        let gate = gate();
        let (_stop_tx, stop_rx) = watch::channel(false);
        let mut supervisor = Supervisor::new(gate.clone(), stop_rx.clone());
        supervisor.restart_delay = Duration::from_millis(1);
        let (runs, start) = flaky(usize::MAX, stop_rx);
        supervisor
            .spawn("test task", OnFailure::Restart, start)
            .await
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), MAX_RESTARTS + 1);
        assert!(supervisor.failed().borrow().is_some());

        let (_stop_tx, stop_rx) = watch::channel(false);
        let supervisor = Supervisor::new(gate.clone(), stop_rx);
        supervisor
            .spawn("early task", OnFailure::Stop, || async {})
            .await
            .unwrap();
        assert_eq!(
            supervisor.failed().borrow().as_deref(),
            Some("early task ended before shutdown")
        );
    }

    #[tokio::test]
    async fn a_task_that_returns_at_shutdown_is_done() {
        let gate = gate();
        let (stop_tx, stop_rx) = watch::channel(false);
        let supervisor = Supervisor::new(gate.clone(), stop_rx.clone());
        let (runs, start) = flaky(0, stop_rx);
        let task = supervisor.spawn("test task", OnFailure::Stop, start);
        until("the task running", || runs.load(Ordering::SeqCst) == 1).await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert!(supervisor.failed().borrow().is_none());
        assert!(gate.health().problems().is_empty());
    }
}
