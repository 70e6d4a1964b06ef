//! gatekeeper allow-lists, per service and for a limited time, the public IP of a client that
//! proved trust on another service, and writes the lists where a reverse proxy reads them.
//!
//! # Layout
//!
//! The module tree follows the data: trust **sources** turn requests into grants, the **ledger**
//! keeps them within their limits, and **sinks** render the effective allow lists.
//!
//! - [`policy`]: the policy file (figment: YAML, then `GATEKEEPER_*` variables) or the legacy
//!   environment, validated into a [`policy::Policy`] with every problem reported at once.
//! - [`client_ip`]: who the client is: the trusted-proxy walk of `X-Forwarded-For`,
//!   normalisation, IPv6 prefixes, and the addresses that must never be granted.
//! - [`sources`]: inputs that turn requests into grants (`mirror`, `share` with its runtime
//!   state in `share::state`: throttle, link cache, checks in flight).
//! - [`ledger`]: entries per source with LRU limit, idle TTL and maximum age; snapshots of the
//!   effective allow list of every service. Pure: the clock is passed in.
//! - [`metrics`]: counters and gauges for `/metrics`.
//! - [`notify`]: fire-and-forget notifications of grants, expiries, revocations and bans.
//! - [`outbound`]: the one HTTP client for requests gatekeeper makes (checks, Traefik's API,
//!   notifications): no redirects, no proxy from the environment.
//! - [`store`]: the state file that keeps the ledger across restarts.
//! - [`sinks`]: the render loop (`outputs`: state file first, then what the proxy is shown, then
//!   the Traefik file) and the renderers that follow what is shown (`traefik_file`, Traefik's KV
//!   layout in `traefik_redis` with its writer task; the HTTP provider's JSON is rendered by
//!   [`http`] on request), and when Traefik applied it (`traefik_apply`).
//! - [`gate`]: the runtime handle tying policy, ledger copy and snapshot together, with the
//!   local expiry task. Where the ledger of record lives is its [`gate::Backend`]:
//!   [`gate::LocalBackend`] (the state file) or the shared store; the gate never asks which.
//! - [`health`]: what `/healthz` reports (parts' problems, failing or stuck output writes).
//! - [`shared_store`]: the backend shared by several replicas on Redis/Valkey (`redis:`): atomic
//!   Lua scripts for grants, refreshes, expiry and revocation, pub/sub and resync.
//! - [`redis_io`]: talking to Redis (the shared store, Traefik's KV): errors and time limits.
//! - [`admin`]: the admin listener: health, metrics, entries API, status page.
//! - [`http`]: the proxy-facing listener: its hot paths, then its router; [`server`]: the accept
//!   loop that serves it, with connection budgets by class of peer.
//! - [`daemon`]: `serve`: restore, start the background tasks, serve, flush at shutdown.
//! - [`labels`]: the snippets `gatekeeper labels` prints for Traefik, nginx and Caddy.
//! - [`cli`]: the command line, `check` and `render`; `main.rs` only dispatches.
//! - [`spans`]: durations as people read them (`12h`, `5m 10s`, `in 6d 23h`), for `check`,
//!   `list` and the status page alike.
//!
//! `tests/module_graph.rs` reads the imports: no modules import each other in a circle.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub(crate) mod admin;
pub mod atomic_file;
pub mod cli;
pub mod client_ip;
pub mod daemon;
pub mod gate;
pub(crate) mod health;
pub(crate) mod http;
pub(crate) mod labels;
pub mod ledger;
pub(crate) mod metrics;
pub(crate) mod notify;
pub(crate) mod outbound;
pub mod policy;
pub(crate) mod redis_io;
pub mod server;
pub mod shared_store;
pub mod sinks;
pub mod sources;
pub(crate) mod spans;
pub mod store;
