//! Sinks: where the effective allow lists go. Each renders a [`Snapshot`](crate::ledger::Snapshot)
//! purely (a string, or Traefik's KV pairs); writing it is a separate small step.

pub(crate) mod outputs;
pub(crate) mod traefik_apply;
pub mod traefik_file;
pub(crate) mod traefik_redis;
