//! Trust sources: inputs that turn requests into grants.

pub mod mirror;
pub mod share;
