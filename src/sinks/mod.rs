//! Sinks: where the effective allow lists go. Each renders a pure string from a
//! [`Snapshot`](crate::ledger::Snapshot); writing it is a separate small step.

pub mod traefik_file;
