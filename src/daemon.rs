//! `gatekeeper serve`: restore the state, start the background tasks, serve the proxy-facing
//! listener until shutdown, then flush.

use std::future::Future;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::gate::{self, Gate};
use crate::policy::Policy;
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

/// Run gatekeeper on bound `listeners` until `shutdown` resolves. The state file is read first:
/// one that cannot be read stops the start with an error naming it.
pub async fn run(
    policy: Policy,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let entries = gate::load_state(&policy)?;
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
    let expiry = tokio::spawn(gate.clone().run_expiry(stopped()));

    let admin_addr = listeners.admin.local_addr()?;
    if token.is_none() {
        info!("admin API is off: set admin.token_file or GATEKEEPER_ADMIN__TOKEN to turn it on");
    }
    let admin_task = tokio::spawn(server::serve(
        listeners.admin,
        admin::router(gate.clone(), token),
        stopped(),
    ));
    info!(%admin_addr, "admin listener ready");
    let addr = listeners.proxy.local_addr()?;
    info!(%addr, origin = %gate.active().policy.origin, "listening");
    server::serve(listeners.proxy, http::router(gate.clone()), shutdown).await;

    info!("shutting down: flushing state");
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    let _ = expiry.await;
    let _ = outputs.await;
    if let Some(e) = gate.output_error() {
        anyhow::bail!("the last output write failed: {e}");
    }
    Ok(())
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
