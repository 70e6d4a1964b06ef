//! `gatekeeper serve`: restore the state, start the background tasks, serve the proxy-facing
//! listener until shutdown, then flush.

use std::future::Future;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::gate::{self, Gate};
use crate::policy::Policy;
use crate::{http, server};

/// Run gatekeeper on a bound `listener` until `shutdown` resolves. The state file is read first:
/// one that cannot be read stops the start with an error naming it.
pub async fn run(
    policy: Policy,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let entries = gate::load_state(&policy)?;
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

    let addr = listener.local_addr()?;
    info!(%addr, origin = %gate.active().policy.origin, "listening");
    server::serve(listener, http::router(gate.clone()), shutdown).await;

    info!("shutting down: flushing state");
    let _ = stop_tx.send(true);
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
