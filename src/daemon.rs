//! `gatekeeper serve`: restore the state, start the background tasks, serve the proxy-facing
//! listener until shutdown, then flush.

use std::future::Future;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::gate::{self, Gate};
use crate::policy::{self, Location, Policy};
use crate::{admin, http, server};

/// The bound listeners: the proxy-facing one and the admin one.
pub struct Listeners {
    /// `listen`.
    pub proxy: TcpListener,
    /// `admin.listen`.
    pub admin: TcpListener,
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
pub struct PolicySource {
    /// The policy file (or the default path, in legacy mode).
    pub location: Location,
    /// The environment it was loaded with.
    pub env: BTreeMap<String, String>,
}

/// How often the policy file is compared with the running policy's text.
pub const POLICY_POLL: Duration = Duration::from_secs(2);

/// Run gatekeeper on bound `listeners` until `shutdown` resolves. The state file is read first:
/// one that cannot be read stops the start with an error naming it. The policy is reloaded from
/// `source` on SIGHUP and when its file changes.
pub async fn run(
    policy: Policy,
    listeners: Listeners,
    source: PolicySource,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    survive_file_size_limit();
    // With a shared store the ledger lives in Redis; the state file is neither read nor written.
    let entries = if policy.redis.is_some() {
        gate::prepare_outputs(&policy)?;
        Vec::new()
    } else {
        gate::load_state(&policy)?
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
    let (gate, restored) = Gate::new(policy, entries);
    for why in &restored.dropped {
        warn!("state entry not restored: {why}");
    }
    info!(entries = restored.kept, "state restored");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let outputs = tokio::spawn(gate.clone().run_outputs(stopped()));
    // The shared store's task expires entries (in Redis, or locally while it is unreachable).
    let expiry = match gate.shared() {
        None => tokio::spawn(gate.clone().run_expiry(stopped())),
        Some(_) => tokio::spawn(crate::shared_store::run(gate.clone(), stopped())),
    };
    if let Some(shared) = gate.shared() {
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
    let reloader = tokio::spawn(watch_policy(gate.clone(), source, stopped()));
    let kv_sink = tokio::spawn(crate::sinks::traefik_redis::run(gate.clone(), stopped()));

    let admin_addr = listeners.admin.local_addr()?;
    if token.is_none() {
        info!("admin API is off: set admin.token_file or GATEKEEPER_ADMIN__TOKEN to turn it on");
    }
    let counts = gate.metrics().connections.clone();
    let admin_task = tokio::spawn(server::serve(
        listeners.admin,
        admin::router(gate.clone(), token),
        server::Budget::new(|_| server::Class::Admin, counts.clone()),
        stopped(),
    ));
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
    if let Some(e) = gate.output_error() {
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
fn survive_file_size_limit() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::from_raw(libc::SIGXFSZ)) {
            Ok(mut s) => {
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        warn!("a write went past the file-size limit (SIGXFSZ)");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "cannot handle SIGXFSZ; a file-size limit would end gatekeeper")
            }
        }
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
