//! Talking to Redis, for the shared store and for Traefik's KV alike: why a call failed, and a
//! time limit on every call (a server that accepts connections but never answers must not stall
//! anything).

use std::time::Duration;

/// Why the shared store did not do something (its first variants also say why a call to
/// Traefik's KV failed). Cloned to every waiter of a failed grant.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A command failed (connection refused or dropped, a script error).
    #[error("{what}: {message}")]
    Redis {
        /// The step: connect, grant, resync…
        what: &'static str,
        /// Redis's (or the client's) words.
        message: String,
    },
    /// A command got no answer in time.
    #[error("{what}: no answer within {after:?}")]
    Timeout {
        /// The step.
        what: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// An answer gatekeeper's own script should never give.
    #[error("{what}: unexpected answer {answer}")]
    Unexpected {
        /// The step.
        what: &'static str,
        /// The answer, as read.
        answer: String,
    },
    /// Redis could not be reached when the grant was asked for; nothing was kept.
    #[error("the shared store (Redis) is unreachable")]
    Unreachable,
    /// More grants wait for Redis than the queue holds.
    #[error("too many grants waiting for Redis")]
    Busy,
    /// The grant waited longer than [`STALE_GRANT`](crate::shared_store::STALE_GRANT) and was dropped rather than applied late.
    #[error("waited too long for the shared store")]
    Stale,
    /// The policy (reloaded meanwhile) has no such source.
    #[error("no source `{0}` in the policy")]
    UnknownSource(String),
    /// Redis was emptied while connected (its epoch changed).
    #[error("the shared store lost its data (its epoch changed)")]
    Lost,
    /// The subscription to change messages ended.
    #[error("pub/sub connection closed")]
    SubscriptionClosed,
    /// The task that talks to Redis is gone (shutdown).
    #[error("the shared store task stopped")]
    Stopped,
}

/// Run a call to Redis (this store, or Traefik's KV) for at most `after`, naming the step `what`
/// when it fails: a server that accepts connections but never answers must not stall anything.
pub(crate) async fn timed_for<T>(
    what: &'static str,
    after: Duration,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(after, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::Redis {
            what,
            message: e.to_string(),
        }),
        Err(_) => Err(StoreError::Timeout { what, after }),
    }
}
