//! The policy: what is protected, which sources prove trust, what they unlock and within which
//! limits. Loaded with figment (YAML file, then `GATEKEEPER_*` variables) or built from the legacy
//! environment, then validated into a [`Policy`] with every problem reported at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Yaml};
use figment::value::Value;
use indexmap::IndexMap;
use ipnet::IpNet;
use serde::Deserialize;

/// A validated policy. Every field has been checked; nothing here can fail at run time.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Where the policy came from, for messages: a file path or "legacy environment".
    pub origin: String,
    /// Proxy-facing listener: mirrored traffic, forward-auth, HTTP provider.
    pub(crate) listen: SocketAddr,
    /// Admin listener settings.
    pub(crate) admin: Admin,
    /// Where the ledger is kept across restarts.
    pub state_file: PathBuf,
    /// Peers whose forwarding headers are believed; never granted themselves.
    pub trusted_proxies: Vec<IpNet>,
    /// Prefix length granted to an IPv6 client (phones rotate addresses inside their /64).
    pub ipv6_prefix: u8,
    /// The Traefik outputs.
    pub traefik: Traefik,
    /// Ranges allowed for every service, always; never granted as entries.
    pub always_allow: Vec<IpNet>,
    /// Addresses that stand for many clients (a Docker network's gateway, a NAT or VPN exit in
    /// front of the proxy): never granted, nor overlapped by a grant. Not trusted either: unlike
    /// `trusted_proxies`, their `X-Forwarded-For` is not believed.
    pub(crate) never_grant: Vec<IpNet>,
    /// Protected services by name, in name order (figment reads maps sorted by key).
    pub services: IndexMap<String, Service>,
    /// Trust sources by name, in name order.
    pub sources: IndexMap<String, Source>,
    /// Where to send notifications of grants, expiries, revocations and bans.
    pub(crate) notify: Option<Notify>,
    /// The shared ledger on Redis/Valkey; the state file is used when absent.
    pub(crate) redis: Option<RedisStore>,
    /// True when built from `MAX_IP_LEN` / `DEFAULT_SOURCE_RANGE` instead of a policy file.
    pub(crate) legacy: bool,
    /// What is valid but dangerous (an `always_allow` range overlapping `trusted_proxies`,
    /// legacy mode's wide trust): printed by `check`, logged at start and on reload.
    pub warnings: Vec<Problem>,
}

/// Notification settings (`notify:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Notify {
    /// Where events are POSTed.
    pub(crate) url: http::Uri,
    /// Body format.
    pub(crate) format: NotifyFormat,
    /// Which events are sent.
    pub(crate) on: Vec<EventKind>,
    /// A notification slower than this is dropped.
    pub(crate) timeout: Duration,
}

/// How a notification is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotifyFormat {
    /// One JSON object.
    Json,
    /// Plain text with ntfy's `Title` and `Tags` headers.
    Ntfy,
}

/// The events that can be notified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum EventKind {
    /// A new entry.
    Grant,
    /// An entry expired (idle, max age, or an operator's TTL).
    Expire,
    /// An entry was revoked (operator, or a policy change).
    Revoke,
    /// An entry was pushed out by the `max_ips` limit.
    Evict,
    /// A client was banned for failed share checks.
    Throttle,
}

impl EventKind {
    /// The name used in the policy and in notifications.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventKind::Grant => "grant",
            EventKind::Expire => "expire",
            EventKind::Revoke => "revoke",
            EventKind::Evict => "evict",
            EventKind::Throttle => "throttle",
        }
    }

    const ALL: [EventKind; 5] = [
        EventKind::Grant,
        EventKind::Expire,
        EventKind::Revoke,
        EventKind::Evict,
        EventKind::Throttle,
    ];
}

/// Admin listener settings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Admin {
    /// Address of the admin listener.
    pub(crate) listen: SocketAddr,
    /// File holding the bearer token of the admin API.
    pub(crate) token_file: Option<PathBuf>,
    /// The token itself (from `GATEKEEPER_ADMIN__TOKEN`); wins over `token_file`.
    pub(crate) token: Option<String>,
}

/// Traefik output settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Traefik {
    /// File written for Traefik's file provider; no file output when absent.
    pub(crate) file: Option<PathBuf>,
    /// Which middleware kind to render.
    pub(crate) version: TraefikVersion,
    /// Middleware name = prefix + service name.
    pub(crate) middleware_prefix: String,
    /// Passed through to Traefik's `ipStrategy`.
    pub ip_strategy: Option<IpStrategy>,
    /// Traefik's API (`http://traefik:8080`): after a new share grant, poll it until the address
    /// is in the middleware of every provider that serves it, instead of predicting when Traefik
    /// applies the change.
    pub(crate) api: Option<http::Uri>,
    /// Traefik's `providersThrottleDuration`: a provider's first change is applied at once, the
    /// ones that follow within this time are coalesced and applied when it has passed.
    pub(crate) throttle: Duration,
    /// How long Traefik takes to build and switch to a configuration its throttle let through;
    /// added to the predicted moment before a share link's 200.
    pub(crate) settle: Duration,
    /// An explicit override: after a new share grant is written, wait exactly this long instead
    /// of predicting when Traefik applies it.
    pub(crate) propagation_delay: Option<Duration>,
    /// Traefik's KV (Redis) provider output; none when absent.
    pub(crate) redis: Option<TraefikRedis>,
}

/// `redis:` — the ledger lives in Redis (or Valkey) instead of the state file, shared by every
/// gatekeeper that names the same server and prefix.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RedisStore {
    /// `redis://[user:password@]host:port/db` (or `rediss://`).
    pub(crate) url: String,
    /// Every key gatekeeper uses starts with this and `:`.
    pub(crate) key_prefix: String,
    /// How often every replica reads the whole shared ledger, on top of change messages.
    pub(crate) resync_every: Duration,
}

/// `redis.resync_every` when the policy sets none.
pub(crate) const DEFAULT_RESYNC_EVERY: Duration = Duration::from_secs(5);

/// `traefik.redis:` — write each middleware in Traefik's KV layout.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TraefikRedis {
    /// `redis://host:port/db`, as Traefik's Redis provider reads it.
    pub(crate) url: String,
    /// Traefik's `rootKey` (default `traefik`).
    pub(crate) root_key: String,
}

/// `url` fit for logs and `/healthz`: without its password.
pub(crate) fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only fails for URLs that cannot have credentials, which this one has.
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Ok(_) => url.to_string(),
        Err(_) => match url.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://…@{host}"),
                None => url.to_string(),
            },
            None => "(unparsable url)".to_string(),
        },
    }
}

/// `url` fit for messages: without its password, query and fragment (which may hold tokens, as
/// ntfy's `?auth=` does).
pub(crate) fn shown_url(url: &str) -> String {
    let head = url.split(['?', '#']).next().unwrap_or(url);
    let mut shown = without_password(head);
    if head.len() < url.len() {
        shown.push_str("?…");
    }
    shown
}

/// A Redis URL gatekeeper can use: `redis://` or `rediss://` with a host. The error names the
/// value; credentials are not echoed.
pub(crate) fn parse_redis_url(url: &str) -> Result<String, String> {
    match url::Url::parse(url) {
        Ok(u)
            if matches!(u.scheme(), "redis" | "rediss")
                && u.host_str().is_some_and(|h| !h.is_empty()) =>
        {
            Ok(url.to_string())
        }
        _ => Err(format!(
            "`{}` is not a Redis URL (expected redis://host:6379/0 or rediss://…)",
            without_password(url)
        )),
    }
}

/// Default `traefik.throttle`: Traefik's own default `providersThrottleDuration`.
pub(crate) const DEFAULT_TRAEFIK_THROTTLE: Duration = Duration::from_secs(2);
/// Default `traefik.settle`.
pub(crate) const DEFAULT_TRAEFIK_SETTLE: Duration = Duration::from_millis(250);

impl Traefik {
    /// The middleware name Traefik routers reference for `service` (without `@provider`).
    pub(crate) fn middleware_name(&self, service: &str) -> String {
        format!("{}{}", self.middleware_prefix, service)
    }

    /// The Traefik provider routers should take the middlewares from: the file provider when
    /// gatekeeper writes a file, else the Redis KV provider when it writes there, else the HTTP
    /// provider (which reads `/traefik/dynamic.json`, always served).
    pub(crate) fn provider(&self) -> &'static str {
        if self.file.is_some() {
            "file"
        } else if self.redis.is_some() {
            "redis"
        } else {
            "http"
        }
    }

    /// What a router's `middlewares` names for `service`: `gatekeeper-immich@file`.
    pub(crate) fn middleware_ref(&self, service: &str) -> String {
        format!("{}@{}", self.middleware_name(service), self.provider())
    }
}

/// Traefik major version, which decides the middleware's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TraefikVersion {
    /// `ipWhiteList` (Traefik 2).
    V2,
    /// `ipAllowList` (Traefik 3).
    V3,
}

/// Traefik's `ipStrategy`: how Traefik itself picks the client address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpStrategy {
    /// `depth`: take the n-th address from the right of `X-Forwarded-For`.
    pub depth: Option<u32>,
    /// `excludedIPs`: skip these addresses when walking `X-Forwarded-For`.
    pub excluded_ips: Vec<IpNet>,
    /// `ipv6Subnet` (Traefik ≥ 3.1): compare IPv6 clients by this prefix.
    pub ipv6_subnet: Option<u8>,
}

/// A protected service.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Service {
    /// Ranges always allowed for this service only.
    pub(crate) always_allow: Vec<IpNet>,
}

/// A way to prove trust, and what it unlocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// How trust is proven.
    pub kind: SourceKind,
    /// Names of the services this source unlocks (`"*"` already expanded).
    pub(crate) unlocks: Vec<String>,
    /// Limits on the entries this source keeps.
    pub limits: Limits,
}

/// Limits on one source's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// At most this many entries; the least recently seen is evicted first.
    pub max_ips: usize,
    /// An entry not seen for this long expires; `None` only in legacy mode (the old app never
    /// expired anything).
    pub(crate) idle_ttl: Option<Duration>,
    /// An entry expires this long after it was first granted, however active.
    pub(crate) max_age: Option<Duration>,
}

/// The kinds of trust source.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    /// Traffic of a trusted service mirrored by the proxy, recognised by its Host.
    Mirror(Mirror),
    /// Share links checked against the sharing app (forward-auth).
    Share(Share),
}

pub(crate) use crate::sources::mirror::config::Mirror;
pub(crate) use crate::sources::share::config::{Share, ShareCheck, SharePattern};

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Default policy path when neither `--config` nor `GATEKEEPER_CONFIG` names one.
pub(crate) const DEFAULT_PATH: &str = "./gatekeeper.yaml";

/// Trusted proxies when a policy file names none: loopback only. Trusting a whole private range
/// by default would let any container or LAN host have any address granted; a proxy elsewhere
/// must be named (`trusted_proxies: [172.30.0.2/32]`).
pub(crate) const DEFAULT_TRUSTED_PROXIES: &[&str] = &["127.0.0.0/8", "::1/128"];

/// Trusted proxies in legacy mode (no policy file): loopback and every private range, as the old
/// image believed any peer; kept for drop-in compatibility, with a warning at start.
pub(crate) const LEGACY_TRUSTED_PROXIES: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
];

/// Where to read the policy from.
#[derive(Debug, Clone)]
pub struct Location {
    /// The policy file.
    pub(crate) path: PathBuf,
    /// True when the user named the file (`--config` or `GATEKEEPER_CONFIG`): then a missing file
    /// is an error, never a silent switch to legacy mode.
    pub(crate) explicit: bool,
}

impl Location {
    /// `--config`, else `GATEKEEPER_CONFIG`, else [`DEFAULT_PATH`].
    pub(crate) fn resolve(flag: Option<PathBuf>, env: &BTreeMap<String, String>) -> Location {
        match flag.or_else(|| env.get("GATEKEEPER_CONFIG").map(PathBuf::from)) {
            Some(path) => Location {
                path,
                explicit: true,
            },
            None => Location {
                path: PathBuf::from(DEFAULT_PATH),
                explicit: false,
            },
        }
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The named file does not exist.
    #[error(
        "policy file {} does not exist (named by {})",
        path.display(),
        if *explicit { "--config or GATEKEEPER_CONFIG" } else { "default" }
    )]
    Missing {
        /// The path looked at.
        path: PathBuf,
        /// Whether the user named it.
        explicit: bool,
    },
    /// No policy file and no legacy variables either.
    #[error(
        "no policy file at {} and no legacy variables (MAX_IP_LEN, MAX_ALLOWED_IPS, DEFAULT_SOURCE_RANGE); \
         write a policy (see gatekeeper.example.yaml) or pass --config",
        path.display()
    )]
    Nothing {
        /// The default path looked at.
        path: PathBuf,
    },
    /// The policy has problems (YAML syntax, shape, types or values); all of them are listed.
    #[error("{}", Problems { origin, problems })]
    Invalid {
        /// File path or "legacy environment".
        origin: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

/// One thing wrong with a policy: the key (`sources.immich-share.path`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the offending key.
    pub key: String,
    /// What is wrong, naming the value.
    pub message: String,
    /// Where the value came from when not the file itself (an environment variable).
    pub from: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)?;
        if let Some(from) = &self.from {
            write!(f, " (set by {from})")?;
        }
        Ok(())
    }
}

struct Problems<'a> {
    origin: &'a str,
    problems: &'a [Problem],
}

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "policy {} has {n} problem{}:",
            self.origin,
            if n == 1 { "" } else { "s" }
        )?;
        for p in self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// Load the policy: the file at `location` (then `GATEKEEPER_*` variables from `env`), or, when
/// there is no file and `location` was not named explicitly, the legacy variables.
pub fn load(location: &Location, env: &BTreeMap<String, String>) -> Result<Policy, PolicyError> {
    if location.path.is_file() {
        let origin = location.path.display().to_string();
        let figment = Figment::from(Yaml::file_exact(&location.path)).merge(env_provider());
        return from_figment(&figment, origin, None).map(|p| with_raw_token(p, env));
    }
    if location.explicit || location.path.exists() {
        return Err(PolicyError::Missing {
            path: location.path.clone(),
            explicit: location.explicit,
        });
    }
    match legacy_yaml(env) {
        Some(yaml) => {
            let figment = Figment::from(Yaml::string(&yaml)).merge(env_provider());
            from_figment(&figment, LEGACY_ORIGIN.to_string(), Some(env))
                .map(|p| with_raw_token(p, env))
        }
        None => Err(PolicyError::Nothing {
            path: location.path.clone(),
        }),
    }
}

/// The admin token exactly as `GATEKEEPER_ADMIN__TOKEN` holds it: figment reads a variable of
/// digits as a number, which would drop leading zeros or, past 2^128, digits.
fn with_raw_token(mut policy: Policy, env: &BTreeMap<String, String>) -> Policy {
    let raw = env
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("GATEKEEPER_ADMIN__TOKEN"))
        .map(|(_, v)| v);
    if let Some(token) = raw.filter(|t| !t.trim().is_empty()) {
        policy.admin.token = Some(token.clone());
    }
    policy
}

/// Origin named in messages for a policy built from the legacy variables.
pub(crate) const LEGACY_ORIGIN: &str = "legacy environment (MAX_IP_LEN, DEFAULT_SOURCE_RANGE)";

/// Parse and validate a policy from YAML text, without environment variables (tests, tools).
pub fn from_yaml_str(yaml: &str, origin: &str) -> Result<Policy, PolicyError> {
    from_figment(&Figment::from(Yaml::string(yaml)), origin.to_string(), None)
}

fn env_provider() -> Env {
    // GATEKEEPER_CONFIG names the file; it is not a policy key.
    Env::prefixed("GATEKEEPER_").split("__").ignore(&["config"])
}

/// `legacy_env` is the environment the policy was built from, in legacy mode.
fn from_figment(
    figment: &Figment,
    origin: String,
    legacy_env: Option<&BTreeMap<String, String>>,
) -> Result<Policy, PolicyError> {
    let legacy = legacy_env.is_some();
    // Scalars are typed during validation; what fails here is the shape itself (`admin: 5`).
    let raw: RawPolicy = figment.extract().map_err(|errors| PolicyError::Invalid {
        origin: origin.clone(),
        problems: errors
            .into_iter()
            .map(|e| {
                let key = e.path.join(".");
                let from = e
                    .metadata
                    .as_ref()
                    .filter(|m| m.name.contains("environment"))
                    .map(|_| env_variable(&key));
                Problem {
                    key: if key.is_empty() {
                        "(top level)".into()
                    } else {
                        key
                    },
                    message: user_words(&e.kind.to_string()),
                    from,
                }
            })
            .collect(),
    })?;
    let mut problems = Vec::new();
    let mut policy = raw.validate(&origin, legacy, &mut problems);
    let warnings = policy.iter_mut().flat_map(|p| p.warnings.iter_mut());
    for p in problems.iter_mut().chain(warnings) {
        p.from = env_origin(figment, &p.key)
            .or_else(|| legacy_env.and_then(|env| legacy_origin(&p.key, env)));
    }
    match policy {
        Some(policy) if problems.is_empty() => Ok(policy),
        _ => Err(PolicyError::Invalid { origin, problems }),
    }
}

/// Name the environment variable a value came from, when it did.
fn env_origin(figment: &Figment, key: &str) -> Option<String> {
    // Strip list indices (`always_allow[2]`): figment tracks metadata per key, not per element.
    let base: String = key.split('[').next().unwrap_or(key).to_string();
    let metadata = figment.find_metadata(&base)?;
    if !metadata.name.contains("environment") {
        return None;
    }
    Some(env_variable(&base))
}

/// serde names the Rust type it expected; name the shape as a user writes it instead.
fn user_words(message: &str) -> String {
    const SHAPES: &[(&str, &str)] = &[
        ("struct RawPolicy", "a mapping (the policy)"),
        ("struct RawAdmin", "a mapping (admin settings)"),
        ("struct RawTraefik", "a mapping (traefik settings)"),
        ("struct RawIpStrategy", "a mapping (ip_strategy settings)"),
        ("struct RawService", "a mapping (service settings)"),
        ("struct RawSource", "a mapping (source settings)"),
        ("struct RawPattern", "a mapping (path, check)"),
    ];
    SHAPES
        .iter()
        .fold(message.to_string(), |m, (from, to)| m.replace(from, to))
}

/// The `GATEKEEPER_*` variable that sets `key`: figment lower-cases names and turns `__` into
/// `.`; undo that.
fn env_variable(key: &str) -> String {
    format!(
        "environment variable GATEKEEPER_{}",
        key.to_ascii_uppercase().replace('.', "__")
    )
}

/// The legacy variable behind a key of the policy built from it.
fn legacy_origin(key: &str, env: &BTreeMap<String, String>) -> Option<String> {
    let var = if key.starts_with("always_allow") {
        "DEFAULT_SOURCE_RANGE"
    } else if key == format!("sources.{LEGACY_SOURCE}.max_ips") {
        if env.contains_key("MAX_IP_LEN") {
            "MAX_IP_LEN"
        } else {
            "MAX_ALLOWED_IPS"
        }
    } else {
        return None;
    };
    Some(format!("environment variable {var}"))
}

// ---------------------------------------------------------------------------------------------
// Legacy environment
// ---------------------------------------------------------------------------------------------

/// Name of the one service legacy mode protects; also its middleware name (no prefix), so routers
/// labelled `dynamic-whitelist@file` keep working when the image is swapped.
pub(crate) const LEGACY_SERVICE: &str = "dynamic-whitelist";
/// Name of legacy mode's one mirror source.
pub(crate) const LEGACY_SOURCE: &str = "legacy-mirror";
/// The old image's working directory held the output file; legacy installs bind-mount it there.
pub(crate) const LEGACY_FILE: &str = "./dynamic-whitelist.yml";
/// The old app's limit when `MAX_IP_LEN` was not set.
pub(crate) const LEGACY_DEFAULT_MAX_IPS: &str = "10";

/// Is any legacy variable set?
pub(crate) fn is_legacy_env(env: &BTreeMap<String, String>) -> bool {
    ["MAX_IP_LEN", "MAX_ALLOWED_IPS", "DEFAULT_SOURCE_RANGE"]
        .iter()
        .any(|k| env.contains_key(*k))
}

/// The policy the legacy variables describe, as YAML, so it goes through the same validation as a
/// file (and `gatekeeper check` can print it as a starting point for a policy file).
pub(crate) fn legacy_yaml(env: &BTreeMap<String, String>) -> Option<String> {
    if !is_legacy_env(env) {
        return None;
    }
    let max_ips = env
        .get("MAX_IP_LEN")
        .or_else(|| env.get("MAX_ALLOWED_IPS"))
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .unwrap_or(LEGACY_DEFAULT_MAX_IPS);
    // The old app split on commas and crashed on an empty value; accept commas and whitespace and
    // treat empty or absent as "no ranges".
    let ranges: Vec<String> = env
        .get("DEFAULT_SOURCE_RANGE")
        .map(|s| {
            s.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|r| !r.is_empty())
                .map(quote)
                .collect()
        })
        .unwrap_or_default();
    // A number that does not parse is passed on quoted so validation names it; a number is
    // passed as a number.
    let max_ips = if max_ips.parse::<u64>().is_ok() {
        max_ips.to_string()
    } else {
        quote(max_ips)
    };
    Some(format!(
        "# Built from the legacy environment variables; save as gatekeeper.yaml to move on.\n\
         listen: 0.0.0.0:5000\n\
         state_file: ./data/state.json\n\
         traefik:\n  file: {file}\n  version: 3\n  middleware_prefix: \"\"\n\
         always_allow: [{ranges}]\n\
         # addresses that stand for many clients (the Docker network's gateway): never granted\n\
         never_grant: []\n\
         services:\n  {service}: {{}}\n\
         sources:\n  {source}:\n    kind: mirror\n    catch_all: true\n    unlocks: \"*\"\n    max_ips: {max_ips}\n    idle_ttl: never\n",
        file = LEGACY_FILE,
        ranges = ranges.join(", "),
        service = LEGACY_SERVICE,
        source = LEGACY_SOURCE,
    ))
}

/// What is valid but opens too much: an `always_allow` range that overlaps a trusted proxy range
/// (when the proxy hides client addresses, every client arrives as the proxy, which is then
/// always allowed: everything opens to everyone), and legacy mode's trust in every private range.
fn trust_warnings(
    trusted: &[IpNet],
    trusted_default: bool,
    legacy: bool,
    always_allow: &[IpNet],
    never_grant: &[IpNet],
    services: &IndexMap<String, Service>,
) -> Vec<Problem> {
    let trusted_key = |i: usize| {
        if trusted_default {
            "trusted_proxies (default)".to_string()
        } else {
            format!("trusted_proxies[{i}]")
        }
    };
    let ranges = always_allow
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("always_allow[{i}]"), r))
        .chain(services.iter().flat_map(|(name, s)| {
            s.always_allow
                .iter()
                .enumerate()
                .map(move |(i, r)| (format!("services.{name}.always_allow[{i}]"), r))
        }));
    let mut warnings = Vec::new();
    for (key, range) in ranges {
        for (i, proxy) in trusted.iter().enumerate() {
            if range.contains(proxy) || proxy.contains(range) {
                warnings.push(Problem {
                    key: key.clone(),
                    message: format!(
                        "`{range}` overlaps {} `{proxy}`: if the proxy hides client addresses \
                         (Docker's userland proxy, rootless Docker or Podman port forwarding), every \
                         client arrives from the proxy's address, which this range always allows, \
                         so every service opens to everyone; trust only the proxy's own address \
                         and always allow only networks no proxy is in",
                        trusted_key(i)
                    ),
                    from: None,
                });
            }
        }
        for (i, hidden) in never_grant.iter().enumerate() {
            if range.contains(hidden) || hidden.contains(range) {
                warnings.push(Problem {
                    key: key.clone(),
                    message: format!(
                        "`{range}` overlaps never_grant[{i}] `{hidden}`: those addresses stand for \
                         many clients (a proxy hiding their addresses), and this range always \
                         allows them, so every client that arrives that way gets in; always allow \
                         only networks that are yours"
                    ),
                    from: None,
                });
            }
        }
    }
    if legacy && trusted_default {
        warnings.push(Problem {
            key: "trusted_proxies (legacy default)".to_string(),
            message: "legacy mode believes X-Forwarded-For from loopback and every private \
                      range, as the old image did: any container or LAN host can have any address \
                      granted; write a policy file with trusted_proxies set to your proxy's \
                      address (`gatekeeper check` prints one to start from)"
                .to_string(),
            from: None,
        });
    }
    warnings
}

/// A YAML double-quoted scalar (JSON escaping is valid YAML).
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

// ---------------------------------------------------------------------------------------------
// Raw shape (serde) and validation
// ---------------------------------------------------------------------------------------------

// Unknown keys are collected through `#[serde(flatten)]` instead of `deny_unknown_fields`, and
// scalars are read as figment `Value`s and typed during validation, so a typo or a wrong type is
// reported together with every other problem instead of hiding them.
type Unknown = BTreeMap<String, Value>;
type Field = Option<Value>;

#[derive(Debug, Deserialize)]
struct RawPolicy {
    listen: Field,
    #[serde(default)]
    admin: RawAdmin,
    state_file: Field,
    trusted_proxies: Field,
    ipv6_prefix: Field,
    #[serde(default)]
    traefik: RawTraefik,
    always_allow: Field,
    never_grant: Field,
    #[serde(default)]
    services: IndexMap<String, Option<RawService>>,
    #[serde(default)]
    sources: IndexMap<String, RawSource>,
    notify: Option<RawNotify>,
    redis: Option<RawRedis>,
    #[serde(flatten)]
    unknown: Unknown,
}

/// `redis:` and `traefik.redis:` share a shape: a URL and a prefix (`key_prefix`, `root_key`).
#[derive(Debug, Default, Deserialize)]
struct RawRedis {
    url: Field,
    key_prefix: Field,
    root_key: Field,
    resync_every: Field,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
struct RawNotify {
    url: Field,
    format: Field,
    on: Field,
    timeout: Field,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
struct RawAdmin {
    listen: Field,
    token_file: Field,
    token: Field,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
struct RawTraefik {
    file: Field,
    version: Field,
    middleware_prefix: Field,
    ip_strategy: Option<RawIpStrategy>,
    api: Field,
    throttle: Field,
    settle: Field,
    propagation_delay: Field,
    redis: Option<RawRedis>,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
struct RawIpStrategy {
    depth: Field,
    excluded_ips: Field,
    ipv6_subnet: Field,
    #[serde(flatten)]
    unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
struct RawService {
    always_allow: Field,
    #[serde(flatten)]
    unknown: Unknown,
}

/// A source as written: the keys every source has, and the rest, which its kind reads
/// ([`RawMirror`], [`RawShare`]). Each key is declared once, as a field of one of these structs;
/// the lists of keys (for "unknown key" and "only share sources have this key") are read from
/// the structs themselves.
#[derive(Debug, Deserialize)]
struct RawSource {
    #[serde(flatten)]
    common: RawCommon,
    #[serde(flatten)]
    rest: Unknown,
}

/// The keys every source has.
#[derive(Debug, Deserialize)]
struct RawCommon {
    kind: Field,
    unlocks: Field,
    max_ips: Field,
    idle_ttl: Field,
    max_age: Field,
}

/// The keys of a mirror source.
#[derive(Debug, Default, Deserialize)]
struct RawMirror {
    hosts: Field,
    catch_all: Field,
    identity_header: Field,
    identities: Field,
}

/// The keys of a share source.
#[derive(Debug, Default, Deserialize)]
struct RawShare {
    upstream: Field,
    path: Field,
    patterns: Field,
    method: Field,
    timeout: Field,
    valid_status: Field,
    max_failures: Field,
    failure_window: Field,
    ban: Field,
    max_concurrent_checks: Field,
    cache: Field,
}

#[derive(Debug, Deserialize)]
struct RawPattern {
    path: Field,
    check: Field,
    #[serde(flatten)]
    unknown: Unknown,
}

/// The keys of a raw struct, in declaration order, read from its `Deserialize`.
fn keys_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    serde_aux::serde_introspection::serde_introspect::<T>()
}

/// Default `max_ips` of a source that sets none.
pub(crate) const DEFAULT_MAX_IPS: usize = 10;
/// Default `idle_ttl` of a source that sets none.
pub(crate) const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Collects problems with their key paths, and types raw values.
struct Checker<'a> {
    problems: &'a mut Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
            from: None,
        });
    }

    fn unknown(&mut self, at: &str, unknown: &Unknown, known: &[&str]) {
        for key in unknown.keys() {
            let path = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            self.problem(
                path,
                format!(
                    "unknown key `{key}` (expected one of: {})",
                    known.join(", ")
                ),
            );
        }
    }

    fn wrong_type(&mut self, key: &str, expected: &str, v: &Value) {
        self.problem(key, format!("expected {expected}, found {}", v.to_actual()));
    }

    /// A secret given as text or as digits (a token from an environment variable of digits is
    /// read as a number); never echoed in a problem.
    fn secret(&mut self, key: &str, v: &Field) -> Option<String> {
        match v.as_ref()? {
            Value::String(_, s) => Some(s.clone()),
            Value::Char(_, c) => Some(c.to_string()),
            Value::Num(_, n) if n.to_u128().is_some() => n.to_u128().map(|n| n.to_string()),
            other => {
                let shape = match other {
                    Value::Bool(..) => "true or false",
                    Value::Num(..) => "a number that is not a whole number",
                    Value::Dict(..) => "a mapping",
                    Value::Array(..) => "a list",
                    _ => "no value",
                };
                self.problem(
                    key,
                    format!("expected text, found {shape} (the value is not shown: it is a secret); quote it"),
                );
                None
            }
        }
    }

    /// A text value; numbers are refused (a listen address or a duration needs its unit).
    fn text(&mut self, key: &str, v: &Field) -> Option<String> {
        match v.as_ref()? {
            Value::String(_, s) => Some(s.clone()),
            Value::Char(_, c) => Some(c.to_string()),
            other => {
                self.wrong_type(key, "text", other);
                None
            }
        }
    }

    /// A whole number within `min..=max`; text holding one is accepted (environment variables).
    fn number(&mut self, key: &str, v: &Field, min: u64, max: u64) -> Option<u64> {
        let v = v.as_ref()?;
        let n = match v {
            Value::Num(_, n) => n.to_u128().and_then(|n| u64::try_from(n).ok()),
            Value::String(_, s) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.problem(
                    key,
                    format!(
                        "`{}` is not a whole number between {min} and {max}",
                        value_text(v)
                    ),
                );
                None
            }
        }
    }

    fn flag(&mut self, key: &str, v: &Field) -> Option<bool> {
        match v.as_ref()? {
            Value::Bool(_, b) => Some(*b),
            Value::String(_, s) if s == "true" || s == "false" => Some(s == "true"),
            other => {
                self.wrong_type(key, "true or false", other);
                None
            }
        }
    }

    /// A list of texts; a single text counts as a list of one (`GATEKEEPER_ALWAYS_ALLOW=...`).
    fn texts(&mut self, key: &str, v: &Field) -> Option<Vec<String>> {
        match v.as_ref()? {
            Value::Array(_, items) => Some(
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| self.text(&format!("{key}[{i}]"), &Some(item.clone())))
                    .collect(),
            ),
            Value::String(_, s) => Some(vec![s.clone()]),
            other => {
                self.wrong_type(key, "a list", other);
                None
            }
        }
    }

    fn cidrs(&mut self, key: &str, v: &Field) -> Option<Vec<IpNet>> {
        let values = self.texts(key, v)?;
        let mut nets = Vec::new();
        for (i, v) in values.iter().enumerate() {
            match parse_cidr(v) {
                Ok(net) => nets.push(net),
                Err(e) => self.problem(format!("{key}[{i}]"), e),
            }
        }
        Some(nets)
    }

    fn socket(&mut self, key: &str, v: &Field, default: &str) -> Option<SocketAddr> {
        let value = match v {
            None => default.to_string(),
            Some(_) => self.text(key, v)?,
        };
        match value.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(
                    key,
                    format!("`{value}` is not a listen address (expected ip:port, e.g. {default})"),
                );
                None
            }
        }
    }

    fn duration(&mut self, key: &str, v: &Field) -> Option<Duration> {
        if let Some(Value::Num(_, n)) = v {
            self.problem(
                key,
                format!(
                    "`{}` has no unit (write e.g. {}s, 12h, 7d)",
                    value_text(&Value::from(*n)),
                    value_text(&Value::from(*n))
                ),
            );
            return None;
        }
        let value = self.text(key, v)?;
        match parse_duration(&value) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(key, e);
                None
            }
        }
    }

    fn path(&mut self, key: &str, v: &Field) -> Option<PathBuf> {
        self.text(key, v).map(PathBuf::from)
    }
}

/// Parse `10.0.0.0/8`, `2001:db8::/32` or a bare address (taken as /32 or /128). Host bits are
/// cleared (`10.1.2.3/8` → `10.0.0.0/8`), which is what Traefik does too.
pub(crate) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = t.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "`{s}` is not a CIDR range (expected e.g. 10.0.0.0/8 or 2001:db8::/32)"
    ))
}

/// Parse `90s`, `12h`, `7d`, `1h30m`, `500ms`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("`{s}` is zero; a duration must be positive")),
        Err(_) => Err(format!(
            "`{s}` is not a duration (expected e.g. 90s, 12h, 7d)"
        )),
    }
}

/// Service, source and prefix names end up in Traefik middleware names and URLs: keep them to
/// characters that are safe in both (Traefik reserves `@` for providers).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

impl RawPolicy {
    fn validate(self, origin: &str, legacy: bool, problems: &mut Vec<Problem>) -> Option<Policy> {
        let mut c = Checker { problems };
        c.unknown(
            "",
            &self.unknown,
            &[
                "listen",
                "admin",
                "state_file",
                "trusted_proxies",
                "ipv6_prefix",
                "traefik",
                "always_allow",
                "never_grant",
                "services",
                "sources",
                "notify",
                "redis",
            ],
        );
        c.unknown(
            "admin",
            &self.admin.unknown,
            &["listen", "token_file", "token"],
        );
        let t = &self.traefik;
        c.unknown(
            "traefik",
            &t.unknown,
            &[
                "file",
                "version",
                "middleware_prefix",
                "ip_strategy",
                "api",
                "throttle",
                "settle",
                "propagation_delay",
                "redis",
            ],
        );

        let listen = c.socket("listen", &self.listen, "0.0.0.0:5000");
        let admin_listen = c.socket("admin.listen", &self.admin.listen, "127.0.0.1:5001");
        if let (Some(a), Some(b)) = (listen, admin_listen)
            && a.port() == b.port()
            && a.port() != 0
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        {
            c.problem("admin.listen", format!("`{b}` collides with listen `{a}`"));
        }
        let trusted_default = self.trusted_proxies.is_none();
        let trusted_proxies = match self.trusted_proxies {
            None if legacy => LEGACY_TRUSTED_PROXIES
                .iter()
                .filter_map(|s| parse_cidr(s).ok())
                .collect(),
            None => DEFAULT_TRUSTED_PROXIES
                .iter()
                .filter_map(|s| parse_cidr(s).ok())
                .collect(),
            v => c.cidrs("trusted_proxies", &v).unwrap_or_default(),
        };
        let ipv6_prefix = c
            .number("ipv6_prefix", &self.ipv6_prefix, 1, 128)
            .unwrap_or(64) as u8;
        let always_allow = c
            .cidrs("always_allow", &self.always_allow)
            .unwrap_or_default();
        let never_grant = c
            .cidrs("never_grant", &self.never_grant)
            .unwrap_or_default();

        let version = match &t.version {
            None => TraefikVersion::V3,
            Some(v) => match value_text(v).trim() {
                "2" => TraefikVersion::V2,
                "3" => TraefikVersion::V3,
                other => {
                    c.problem(
                        "traefik.version",
                        format!("`{other}` is not a supported Traefik version (2 or 3)"),
                    );
                    TraefikVersion::V3
                }
            },
        };
        let middleware_prefix = match &t.middleware_prefix {
            None => "gatekeeper-".to_string(),
            v => c.text("traefik.middleware_prefix", v).unwrap_or_default(),
        };
        if !middleware_prefix.is_empty() && !valid_name(&middleware_prefix) {
            c.problem(
                "traefik.middleware_prefix",
                format!(
                    "`{middleware_prefix}` may hold only letters, digits, `-` and `_` (it becomes part of a Traefik middleware name)"
                ),
            );
        }
        let ip_strategy = t.ip_strategy.as_ref().map(|s| {
            c.unknown(
                "traefik.ip_strategy",
                &s.unknown,
                &["depth", "excluded_ips", "ipv6_subnet"],
            );
            let depth = c
                .number("traefik.ip_strategy.depth", &s.depth, 0, 1024)
                .map(|n| n as u32);
            let excluded_ips = c
                .cidrs("traefik.ip_strategy.excluded_ips", &s.excluded_ips)
                .unwrap_or_default();
            let ipv6_subnet = c
                .number("traefik.ip_strategy.ipv6_subnet", &s.ipv6_subnet, 1, 128)
                .map(|n| n as u8);
            if ipv6_subnet.is_some() && version == TraefikVersion::V2 {
                c.problem(
                    "traefik.ip_strategy.ipv6_subnet",
                    "Traefik 2 has no ipv6Subnet; remove it or set traefik.version: 3",
                );
            }
            IpStrategy {
                depth,
                excluded_ips,
                ipv6_subnet,
            }
        });
        let api = c
            .text("traefik.api", &t.api)
            .and_then(|u| match parse_upstream(&u) {
                Ok(uri) => Some(uri),
                Err(e) => {
                    c.problem("traefik.api", e);
                    None
                }
            });
        // Zero is allowed for these: with nginx or Caddy deciding through /allow there is
        // nothing to wait for, and a Traefik may run with `providersThrottleDuration: 0`.
        let mut zero_or_duration = |key: &str, v: &Field| match v {
            None => None,
            Some(Value::Num(_, n)) if n.to_u128() == Some(0) => Some(Duration::ZERO),
            Some(Value::String(_, s)) if s.trim() == "0s" || s.trim() == "0" => {
                Some(Duration::ZERO)
            }
            v => c.duration(key, v),
        };
        let throttle =
            zero_or_duration("traefik.throttle", &t.throttle).unwrap_or(DEFAULT_TRAEFIK_THROTTLE);
        let settle =
            zero_or_duration("traefik.settle", &t.settle).unwrap_or(DEFAULT_TRAEFIK_SETTLE);
        let propagation_delay = zero_or_duration("traefik.propagation_delay", &t.propagation_delay);
        let file = c.path("traefik.file", &t.file);
        let traefik_redis = t.redis.as_ref().and_then(|r| {
            let (url, root_key) = r.validate("traefik.redis", "root_key", "traefik", &mut c)?;
            Some(TraefikRedis { url, root_key })
        });
        let redis = self.redis.as_ref().and_then(|r| {
            let resync_every = match &r.resync_every {
                None => DEFAULT_RESYNC_EVERY,
                v => match c.duration("redis.resync_every", v) {
                    Some(d) if d < Duration::from_secs(1) => {
                        c.problem(
                            "redis.resync_every",
                            "must be at least 1s (change messages bring changes sooner)",
                        );
                        DEFAULT_RESYNC_EVERY
                    }
                    d => d.unwrap_or(DEFAULT_RESYNC_EVERY),
                },
            };
            let (url, key_prefix) = r.validate("redis", "key_prefix", "gatekeeper", &mut c)?;
            Some(RedisStore {
                url,
                key_prefix,
                resync_every,
            })
        });
        if legacy && redis.is_some() {
            c.problem(
                "redis",
                "needs a policy file (legacy mode keeps its state in a file)",
            );
        }

        let mut services = IndexMap::new();
        if self.services.is_empty() {
            c.problem(
                "services",
                "no service is defined; nothing would be protected",
            );
        }
        for (name, raw) in self.services {
            let key = format!("services.{name}");
            if !valid_name(&name) {
                c.problem(
                    &key,
                    format!("service name `{name}` may hold only letters, digits, `-` and `_`"),
                );
            }
            let raw = raw.unwrap_or_default();
            c.unknown(&key, &raw.unknown, &["always_allow"]);
            let always_allow = c
                .cidrs(&format!("{key}.always_allow"), &raw.always_allow)
                .unwrap_or_default();
            services.insert(name, Service { always_allow });
        }

        let mut sources = IndexMap::new();
        let mut host_owner: BTreeMap<String, String> = BTreeMap::new();
        for (name, raw) in self.sources {
            let key = format!("sources.{name}");
            if !valid_name(&name) {
                c.problem(
                    &key,
                    format!("source name `{name}` may hold only letters, digits, `-` and `_`"),
                );
            }
            if let Some(source) =
                raw.validate(&key, &name, &services, legacy, &mut host_owner, &mut c)
            {
                sources.insert(name, source);
            }
        }
        if sources.is_empty() {
            c.problem(
                "sources",
                "no source is defined; nobody could ever be granted",
            );
        }

        let notify = self.notify.as_ref().and_then(|n| n.validate(&mut c));
        let state_file = c
            .path("state_file", &self.state_file)
            .unwrap_or_else(|| PathBuf::from("./data/state.json"));
        let token_file = c.path("admin.token_file", &self.admin.token_file);
        let token = c
            .secret("admin.token", &self.admin.token)
            .filter(|t| !t.trim().is_empty());

        let warnings = trust_warnings(
            &trusted_proxies,
            trusted_default,
            legacy,
            &always_allow,
            &never_grant,
            &services,
        );
        Some(Policy {
            origin: origin.to_string(),
            listen: listen?,
            admin: Admin {
                listen: admin_listen?,
                token_file,
                token,
            },
            state_file,
            trusted_proxies,
            ipv6_prefix,
            traefik: Traefik {
                file,
                version,
                middleware_prefix,
                ip_strategy,
                api,
                throttle,
                settle,
                propagation_delay,
                redis: traefik_redis,
            },
            always_allow,
            never_grant,
            services,
            sources,
            notify,
            redis,
            legacy,
            warnings,
        })
    }
}

impl RawRedis {
    /// The URL and the prefix (named `prefix_key`, `default` when absent) of `key`.
    fn validate(
        &self,
        key: &str,
        prefix_key: &str,
        default: &str,
        c: &mut Checker<'_>,
    ) -> Option<(String, String)> {
        let resync = prefix_key == "key_prefix";
        let known: &[&str] = if resync {
            &["url", prefix_key, "resync_every"]
        } else {
            &["url", prefix_key]
        };
        c.unknown(key, &self.unknown, known);
        if !resync && self.resync_every.is_some() {
            c.problem(
                format!("{key}.resync_every"),
                "only `redis:` (the shared ledger) has this key",
            );
        }
        let (ours, other) = if prefix_key == "key_prefix" {
            (&self.key_prefix, &self.root_key)
        } else {
            (&self.root_key, &self.key_prefix)
        };
        if other.is_some() {
            let wrong = if prefix_key == "key_prefix" {
                "root_key"
            } else {
                "key_prefix"
            };
            c.problem(
                format!("{key}.{wrong}"),
                format!("unknown key (did you mean `{prefix_key}`?)"),
            );
        }
        let url_key = format!("{key}.url");
        let url = match c.text(&url_key, &self.url) {
            None => {
                if self.url.is_none() {
                    c.problem(&url_key, "missing: the server, e.g. redis://redis:6379/0");
                }
                None
            }
            Some(u) => match parse_redis_url(u.trim()) {
                Ok(u) => Some(u),
                Err(e) => {
                    c.problem(&url_key, e);
                    None
                }
            },
        };
        let prefix_field = format!("{key}.{prefix_key}");
        let prefix = match ours {
            None => default.to_string(),
            v => c.text(&prefix_field, v).unwrap_or_default(),
        };
        let prefix_ok = !prefix.is_empty()
            && prefix
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | '/' | ':'))
            && !prefix.starts_with('/')
            && !prefix.ends_with('/')
            && !prefix.ends_with(':');
        if !prefix_ok {
            c.problem(
                &prefix_field,
                format!("`{prefix}` must be non-empty letters, digits, `-`, `_`, `.`, `/` or `:` (not ending in `/` or `:`)"),
            );
        }
        Some((url?, prefix))
    }
}

impl RawNotify {
    fn validate(&self, c: &mut Checker<'_>) -> Option<Notify> {
        c.unknown("notify", &self.unknown, &["url", "format", "on", "timeout"]);
        let url = match c.text("notify.url", &self.url) {
            None => {
                if self.url.is_none() {
                    c.problem("notify.url", "missing: where to POST notifications");
                }
                None
            }
            Some(u) => match u.parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.authority().is_some() =>
                {
                    Some(uri)
                }
                _ => {
                    c.problem(
                        "notify.url",
                        format!("`{}` is not an http(s) URL", shown_url(&u)),
                    );
                    None
                }
            },
        };
        let format = match c.text("notify.format", &self.format).as_deref() {
            None | Some("json") => NotifyFormat::Json,
            Some("ntfy") => NotifyFormat::Ntfy,
            Some(other) => {
                c.problem(
                    "notify.format",
                    format!("`{other}` is not a notification format (json or ntfy)"),
                );
                NotifyFormat::Json
            }
        };
        let on = match c.texts("notify.on", &self.on) {
            None => EventKind::ALL.to_vec(),
            Some(names) => {
                let mut on = Vec::new();
                for (i, n) in names.iter().enumerate() {
                    match EventKind::ALL.iter().find(|k| k.as_str() == n) {
                        Some(k) => on.push(*k),
                        None => c.problem(
                            format!("notify.on[{i}]"),
                            format!(
                                "`{n}` is not an event (grant, expire, revoke, evict, throttle)"
                            ),
                        ),
                    }
                }
                on
            }
        };
        let timeout = c
            .duration("notify.timeout", &self.timeout)
            .unwrap_or(Duration::from_secs(5));
        Some(Notify {
            url: url?,
            format,
            on,
            timeout,
        })
    }
}

impl RawSource {
    fn validate(
        self,
        key: &str,
        name: &str,
        services: &IndexMap<String, Service>,
        legacy: bool,
        host_owner: &mut BTreeMap<String, String>,
        c: &mut Checker<'_>,
    ) -> Option<Source> {
        let (common_keys, mirror_keys, share_keys) = (
            keys_of::<RawCommon>(),
            keys_of::<RawMirror>(),
            keys_of::<RawShare>(),
        );
        let known: Vec<&str> = [common_keys, mirror_keys, share_keys].concat();
        let unknown: Unknown = self
            .rest
            .iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        c.unknown(key, &unknown, &known);
        let RawCommon {
            kind,
            unlocks,
            max_ips,
            idle_ttl,
            max_age,
        } = &self.common;

        let unlocks = match unlocks {
            None => {
                c.problem(
                    format!("{key}.unlocks"),
                    "missing: name the services this source unlocks, or \"*\"",
                );
                Vec::new()
            }
            Some(Value::String(_, s)) if s == "*" => services.keys().cloned().collect(),
            v => c.texts(&format!("{key}.unlocks"), v).unwrap_or_default(),
        };
        for (i, svc) in unlocks.iter().enumerate() {
            if svc == "*" {
                c.problem(
                    format!("{key}.unlocks[{i}]"),
                    "\"*\" must stand alone (unlocks: \"*\"), not inside a list",
                );
            } else if !services.contains_key(svc) {
                c.problem(
                    format!("{key}.unlocks[{i}]"),
                    format!(
                        "service `{svc}` does not exist (services: {})",
                        services.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }

        let max_ips = match max_ips {
            Some(Value::Num(_, n)) if n.to_u128() == Some(0) => {
                c.problem(
                    format!("{key}.max_ips"),
                    "`0` would grant nobody; it must be at least 1",
                );
                DEFAULT_MAX_IPS
            }
            v => c
                .number(&format!("{key}.max_ips"), v, 1, 1_000_000)
                .map_or(DEFAULT_MAX_IPS, |n| n as usize),
        };
        // `never` exists for legacy mode, whose old app never expired anything; a policy file must
        // bound every grant in time.
        let idle_ttl = match idle_ttl {
            None => Some(DEFAULT_IDLE_TTL),
            Some(Value::String(_, s)) if s == "never" && legacy => None,
            v => c.duration(&format!("{key}.idle_ttl"), v),
        };
        let max_age = c.duration(&format!("{key}.max_age"), max_age);

        let kind = match c.text(&format!("{key}.kind"), kind).as_deref() {
            Some("mirror") => {
                for field in self.keys_set(share_keys) {
                    c.problem(format!("{key}.{field}"), "only share sources have this key");
                }
                self.part::<RawMirror>(key, mirror_keys, c)
                    .mirror(key, name, &unlocks, host_owner, c)
            }
            Some("share") => {
                for field in self.keys_set(mirror_keys) {
                    c.problem(
                        format!("{key}.{field}"),
                        "only mirror sources have this key",
                    );
                }
                self.part::<RawShare>(key, share_keys, c).share(key, c)?
            }
            Some(other) => {
                c.problem(
                    format!("{key}.kind"),
                    format!("`{other}` is not a source kind (mirror or share)"),
                );
                return None;
            }
            None => {
                if kind.is_none() {
                    c.problem(format!("{key}.kind"), "missing: mirror or share");
                }
                return None;
            }
        };
        Some(Source {
            kind,
            unlocks,
            limits: Limits {
                max_ips,
                idle_ttl,
                max_age,
            },
        })
    }

    /// Which of `keys` this source sets.
    fn keys_set(&self, keys: &[&'static str]) -> Vec<&'static str> {
        keys.iter()
            .copied()
            .filter(|k| self.rest.contains_key(*k))
            .collect()
    }

    /// The keys of its kind (`keys`), read into that kind's raw struct `T`.
    fn part<T: serde::de::DeserializeOwned + Default>(
        &self,
        key: &str,
        keys: &[&str],
        c: &mut Checker<'_>,
    ) -> T {
        let dict: figment::value::Dict = self
            .rest
            .iter()
            .filter(|(k, _)| keys.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Value::from(dict).deserialize().unwrap_or_else(|e| {
            c.problem(key, user_words(&e.to_string()));
            T::default()
        })
    }
}

impl RawMirror {
    fn mirror(
        &self,
        key: &str,
        name: &str,
        unlocks: &[String],
        host_owner: &mut BTreeMap<String, String>,
        c: &mut Checker<'_>,
    ) -> SourceKind {
        let identity_header = c
            .text(&format!("{key}.identity_header"), &self.identity_header)
            .and_then(
                |h| match http::HeaderName::from_bytes(h.trim().as_bytes()) {
                    Ok(name) => Some(name),
                    Err(_) => {
                        c.problem(
                            format!("{key}.identity_header"),
                            format!("`{h}` is not a header name"),
                        );
                        None
                    }
                },
            );
        let mut identities = BTreeMap::new();
        match &self.identities {
            None => {}
            Some(Value::Dict(_, rules)) => {
                if identity_header.is_none() {
                    c.problem(
                        format!("{key}.identities"),
                        "needs identity_header: the header in which the proxy passes the certificate subject",
                    );
                }
                for (subject, services) in rules {
                    let rkey = format!("{key}.identities.{subject}");
                    let cn = subject.trim().strip_prefix("CN=").unwrap_or(subject.trim());
                    if cn.is_empty() {
                        c.problem(&rkey, "an empty CN matches nobody");
                        continue;
                    }
                    let list = c.texts(&rkey, &Some(services.clone())).unwrap_or_default();
                    for (i, svc) in list.iter().enumerate() {
                        if !unlocks.contains(svc) {
                            c.problem(
                                format!("{rkey}[{i}]"),
                                format!(
                                    "`{svc}` is not unlocked by this source (unlocks: {}); an identity can only narrow what its source unlocks",
                                    unlocks.join(", ")
                                ),
                            );
                        }
                    }
                    identities.insert(cn.to_string(), list);
                }
            }
            Some(other) => c.wrong_type(
                &format!("{key}.identities"),
                "a mapping of certificate subjects to service lists",
                other,
            ),
        }
        let catch_all = c
            .flag(&format!("{key}.catch_all"), &self.catch_all)
            .unwrap_or(false);
        let mut hosts = Vec::new();
        let mut claimed_elsewhere = false;
        let raw_hosts = c
            .texts(&format!("{key}.hosts"), &self.hosts)
            .unwrap_or_default();
        for (i, h) in raw_hosts.into_iter().enumerate() {
            let host = h.trim().to_ascii_lowercase();
            if !valid_host(&host) {
                c.problem(
                    format!("{key}.hosts[{i}]"),
                    format!("`{h}` is not a host name (no scheme, port or path)"),
                );
                continue;
            }
            if let Some(other) = host_owner.get(&host) {
                if other != name {
                    claimed_elsewhere = true;
                    c.problem(
                        format!("{key}.hosts[{i}]"),
                        format!("host `{host}` is already claimed by source `{other}`"),
                    );
                }
                continue;
            }
            host_owner.insert(host.clone(), name.to_string());
            hosts.push(host);
        }
        if hosts.is_empty() && !catch_all && !claimed_elsewhere {
            c.problem(
                format!("{key}.hosts"),
                "a mirror source needs at least one host (the Host of the mirrored requests)",
            );
        }
        SourceKind::Mirror(Mirror {
            hosts,
            catch_all,
            identity_header,
            identities,
        })
    }
}

impl RawShare {
    fn share(&self, key: &str, c: &mut Checker<'_>) -> Option<SourceKind> {
        let upstream = match c.text(&format!("{key}.upstream"), &self.upstream) {
            None => {
                if self.upstream.is_none() {
                    c.problem(
                        format!("{key}.upstream"),
                        "missing: a share source needs the origin of the sharing app, e.g. http://immich_server:2283",
                    );
                }
                None
            }
            Some(u) => match parse_upstream(&u) {
                Ok(uri) => Some(uri),
                Err(e) => {
                    c.problem(format!("{key}.upstream"), e);
                    None
                }
            },
        };
        let check = self.share_check(key, c);
        let mut raw_patterns: Vec<(String, Option<String>, String)> = Vec::new();
        if let Some(p) = c.text(&format!("{key}.path"), &self.path) {
            raw_patterns.push((p, None, format!("{key}.path")));
        }
        let listed: Vec<RawPattern> = match &self.patterns {
            None => Vec::new(),
            Some(v) => v.deserialize().unwrap_or_else(|e| {
                c.problem(format!("{key}.patterns"), user_words(&e.to_string()));
                Vec::new()
            }),
        };
        for (i, p) in listed.iter().enumerate() {
            let pkey = format!("{key}.patterns[{i}]");
            c.unknown(&pkey, &p.unknown, &["path", "check"]);
            let check = c.text(&format!("{pkey}.check"), &p.check);
            match c.text(&format!("{pkey}.path"), &p.path) {
                Some(path) => raw_patterns.push((path, check, format!("{pkey}.path"))),
                None if p.path.is_none() => c.problem(
                    format!("{pkey}.path"),
                    "missing: a pattern needs a path regex",
                ),
                None => {}
            }
        }
        if raw_patterns.is_empty() && self.path.is_none() && self.patterns.is_none() {
            c.problem(
                format!("{key}.path"),
                "missing: a share source needs `path` (a regex of its link paths) or `patterns`",
            );
        }
        let mut patterns = Vec::new();
        for (path, check, pkey) in raw_patterns {
            match compile_pattern(&path, check.as_deref()) {
                Ok(p) => patterns.push(p),
                Err(e) => c.problem(pkey, e),
            }
        }
        Some(SourceKind::Share(Share {
            upstream: upstream?,
            patterns,
            check,
        }))
    }

    fn share_check(&self, key: &str, c: &mut Checker<'_>) -> ShareCheck {
        let d = ShareCheck::default();
        let method = c.text(&format!("{key}.method"), &self.method);
        let head = match method.as_deref().map(str::to_ascii_uppercase).as_deref() {
            None | Some("GET") => false,
            Some("HEAD") => true,
            Some(_) => {
                c.problem(
                    format!("{key}.method"),
                    format!(
                        "`{}` is not a check method (GET or HEAD)",
                        method.unwrap_or_default()
                    ),
                );
                false
            }
        };
        let valid_status: Vec<u16> = match &self.valid_status {
            None => d.valid_status,
            Some(Value::Array(_, items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    c.number(
                        &format!("{key}.valid_status[{i}]"),
                        &Some(v.clone()),
                        100,
                        599,
                    )
                    .map(|n| n as u16)
                })
                .collect(),
            v => c
                .number(&format!("{key}.valid_status"), v, 100, 599)
                .map(|n| vec![n as u16])
                .unwrap_or_default(),
        };
        if valid_status.is_empty() {
            c.problem(
                format!("{key}.valid_status"),
                "empty: no answer could ever be valid",
            );
        }
        for (i, s) in valid_status.iter().enumerate() {
            if !(200..300).contains(s) {
                c.problem(
                    format!("{key}.valid_status[{i}]"),
                    format!(
                        "`{s}` is not a 2xx status; an error or redirect must never count as a valid link"
                    ),
                );
            }
        }
        let max_failures = c
            .number(
                &format!("{key}.max_failures"),
                &self.max_failures,
                1,
                1_000_000,
            )
            .map_or(d.max_failures, |n| n as u32);
        let max_concurrent_checks = c
            .number(
                &format!("{key}.max_concurrent_checks"),
                &self.max_concurrent_checks,
                1,
                10_000,
            )
            .map_or(d.max_concurrent_checks, |n| n as usize);
        let mut dur = |name: &str, v: &Field, default: Duration| {
            c.duration(&format!("{key}.{name}"), v).unwrap_or(default)
        };
        ShareCheck {
            head,
            timeout: dur("timeout", &self.timeout, d.timeout),
            valid_status,
            max_failures,
            failure_window: dur("failure_window", &self.failure_window, d.failure_window),
            ban: dur("ban", &self.ban, d.ban),
            max_concurrent_checks,
            cache: dur("cache", &self.cache, d.cache),
        }
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(_, s) => s.clone(),
        Value::Char(_, c) => c.to_string(),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => match (n.to_u128(), n.to_i128(), n.to_f64()) {
            (Some(u), _, _) => u.to_string(),
            (_, Some(i), _) => i.to_string(),
            (_, _, Some(f)) => f.to_string(),
            _ => format!("{n:?}"),
        },
        other => other.to_actual().to_string(),
    }
}

/// An upstream is an origin only: scheme http or https, a host, an optional port, nothing else.
fn parse_upstream(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|_| format!("`{s}` is not a URL (expected e.g. http://immich_server:2283)"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{s}` must start with http:// or https://")),
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("`{s}` has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(format!("`{s}` must not contain credentials"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "`{s}` must be an origin only (scheme, host, port): no path or query"
        ));
    }
    Ok(uri)
}

fn compile_pattern(path: &str, check: Option<&str>) -> Result<SharePattern, String> {
    // Anchor whatever the user wrote: an unanchored pattern would let `/evil/share/<key>` match.
    regex::Regex::new(path).map_err(|e| {
        let detail = e.to_string();
        let reason = detail.lines().last().unwrap_or(&detail).trim().to_string();
        format!("regex `{path}` does not compile: {reason}")
    })?;
    let anchored = format!(
        "^(?:{})$",
        path.trim_start_matches('^').trim_end_matches('$')
    );
    let regex = regex::Regex::new(&anchored)
        .map_err(|e| format!("regex `{path}` does not compile once anchored: {e}"))?;
    if let Some(check) = check {
        if !check.starts_with('/') {
            return Err(format!(
                "check `{check}` must be a path on the upstream, starting with `/`"
            ));
        }
        let names: Vec<&str> = regex.capture_names().flatten().collect();
        for placeholder in placeholders(check) {
            if !names.contains(&placeholder) {
                return Err(format!(
                    "check `{check}` uses `{{{placeholder}}}`, which regex `{path}` does not capture (named captures: {})",
                    names.join(", ")
                ));
            }
        }
    }
    Ok(SharePattern {
        regex,
        check: check.map(str::to_string),
    })
}

/// The `{name}` placeholders of a check template.
pub(crate) fn placeholders(template: &str) -> impl Iterator<Item = &str> {
    template
        .split('{')
        .skip(1)
        .filter_map(|s| s.split_once('}').map(|(name, _)| name))
}

impl Policy {
    /// Every range that may never be granted as an entry: `always_allow` of the policy and of
    /// every service (they are allowed anyway, and an entry there would only hide the fact).
    pub fn all_always_allow(&self) -> Vec<IpNet> {
        let mut v = self.always_allow.clone();
        for s in self.services.values() {
            v.extend(s.always_allow.iter().copied());
        }
        v
    }

    /// The legacy catch-all mirror source, if any.
    pub(crate) fn catch_all_mirror(&self) -> Option<&str> {
        self.sources.iter().find_map(|(name, s)| match &s.kind {
            SourceKind::Mirror(m) if m.catch_all => Some(name.as_str()),
            _ => None,
        })
    }
}

#[cfg(test)]
// figment::Jail's closures return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;
    use std::path::Path;

    const MINIMAL: &str = "services: { immich: {} }\nsources:\n  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\" }\n";

    fn env() -> BTreeMap<String, String> {
        std::env::vars().collect()
    }

    /// A file of the repository, by an absolute path: a `Jail` in a test running alongside
    /// changes the working directory.
    fn repo_file(path: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn problems(yaml: &str) -> Vec<String> {
        match from_yaml_str(yaml, "test.yaml") {
            Err(PolicyError::Invalid { problems, .. }) => {
                problems.iter().map(|p| p.to_string()).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn the_design_example_is_valid_with_its_defaults() {
        let p = from_yaml_str(&repo_file("gatekeeper.example.yaml"), "example").unwrap();
        assert_eq!(p.traefik.version, TraefikVersion::V3);
        assert_eq!(p.traefik.middleware_name("immich"), "gatekeeper-immich");
        assert_eq!(p.traefik.ip_strategy.as_ref().unwrap().depth, Some(0));
        let ha = &p.sources["home-assistant"];
        assert_eq!(ha.unlocks, vec!["immich", "jellyfin", "nextcloud"]);
        assert_eq!(ha.limits.idle_ttl, Some(Duration::from_secs(7 * 86_400)));
        let share = &p.sources["immich-share"];
        assert_eq!(share.limits.max_age, Some(Duration::from_secs(48 * 3600)));
        let SourceKind::Share(s) = &share.kind else {
            panic!("immich-share is a share source")
        };
        assert!(
            s.patterns[0]
                .regex
                .is_match(&format!("/share/{}", "a".repeat(67)))
        );
        // Anchored even though the pattern is matched inside a longer path.
        assert!(
            !s.patterns[0]
                .regex
                .is_match(&format!("/x/share/{}", "a".repeat(67)))
        );
        assert_eq!(
            p.services["jellyfin"].always_allow,
            vec!["203.0.113.7/32".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn defaults_of_a_minimal_policy() {
        let p = from_yaml_str(MINIMAL, "min").unwrap();
        assert_eq!(p.listen, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(p.admin.listen, "127.0.0.1:5001".parse().unwrap());
        assert_eq!(p.ipv6_prefix, 64);
        assert_eq!(p.trusted_proxies.len(), DEFAULT_TRUSTED_PROXIES.len());
        assert_eq!(p.sources["ha"].limits.max_ips, DEFAULT_MAX_IPS);
        assert_eq!(p.sources["ha"].limits.idle_ttl, Some(DEFAULT_IDLE_TTL));
        assert!(p.traefik.file.is_none());
    }

    #[test]
    fn redis_settings_with_defaults_and_their_problems() {
        let p = from_yaml_str(
            &format!("redis: {{ url: redis://redis:6379/0 }}\ntraefik: {{ redis: {{ url: \"rediss://u:pw@kv:6380/1\" }} }}\n{MINIMAL}"),
            "t",
        )
        .unwrap();
        let r = p.redis.unwrap();
        assert_eq!(
            (r.url.as_str(), r.key_prefix.as_str()),
            ("redis://redis:6379/0", "gatekeeper")
        );
        assert_eq!(r.resync_every, DEFAULT_RESYNC_EVERY);
        let t = p.traefik.redis.unwrap();
        assert_eq!(
            (t.url.as_str(), t.root_key.as_str()),
            ("rediss://u:pw@kv:6380/1", "traefik")
        );
        assert!(from_yaml_str(MINIMAL, "t").unwrap().redis.is_none());

        let got = problems(&format!(
            "redis: {{ url: \"http://u:secret@redis\", key_prefix: \"a b\", root_key: x }}\n\
             traefik: {{ redis: {{ key_prefix: y }} }}\n{MINIMAL}"
        ));
        let text = got.join("\n");
        assert!(
            text.contains("redis.url: `http://u@redis/` is not a Redis URL"),
            "{text}"
        );
        assert!(!text.contains("secret"), "a password was echoed: {text}");
        assert!(text.contains("redis.key_prefix: `a b` must be"), "{text}");
        assert!(
            text.contains("redis.root_key: unknown key (did you mean `key_prefix`?)"),
            "{text}"
        );
        assert!(text.contains("traefik.redis.url: missing"), "{text}");
        assert!(
            text.contains("traefik.redis.key_prefix: unknown key (did you mean `root_key`?)"),
            "{text}"
        );

        let hourly = from_yaml_str(
            &format!("redis: {{ url: redis://r, resync_every: 1h }}\n{MINIMAL}"),
            "t",
        )
        .unwrap();
        assert_eq!(
            hourly.redis.unwrap().resync_every,
            Duration::from_secs(3600)
        );
        let got = problems(&format!(
            "redis: {{ url: redis://r, resync_every: 500ms }}\n\
             traefik: {{ redis: {{ url: redis://kv, resync_every: 1h }} }}\n{MINIMAL}"
        ));
        assert_eq!(
            got,
            [
                "traefik.redis.resync_every: only `redis:` (the shared ledger) has this key",
                "redis.resync_every: must be at least 1s (change messages bring changes sooner)",
            ]
        );
    }

    /// The source keys are declared once, as fields of the raw structs: the lists in the
    /// problems come from them, and a wrongly typed key of a kind is reported with the rest.
    #[test]
    fn source_keys_come_from_their_structs_and_every_problem_is_reported() {
        let got = problems(
            "services: { s: {} }\nsources:\n\
             \x20 a: { kind: mirror, hosts: [x.example.com], unlocks: '*', upstream: 'http://x:1', bogus: 1 }\n\
             \x20 b: { kind: share, upstream: 'http://u:1', patterns: 5, unlocks: '*', identities: {} }\n",
        );
        assert_eq!(
            keys_of::<RawCommon>(),
            ["kind", "unlocks", "max_ips", "idle_ttl", "max_age"]
        );
        assert_eq!(
            keys_of::<RawMirror>(),
            ["hosts", "catch_all", "identity_header", "identities"]
        );
        assert!(keys_of::<RawShare>().starts_with(&["upstream", "path", "patterns"]));
        let known = [
            keys_of::<RawCommon>(),
            keys_of::<RawMirror>(),
            keys_of::<RawShare>(),
        ]
        .concat()
        .join(", ");
        assert_eq!(
            got,
            [
                format!("sources.a.bogus: unknown key `bogus` (expected one of: {known})"),
                "sources.a.upstream: only share sources have this key".to_string(),
                "sources.b.identities: only mirror sources have this key".to_string(),
                "sources.b.patterns: invalid type: found unsigned int `5`, expected a sequence"
                    .to_string(),
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let got = problems(
            "listen: nowhere\nadmin: { listen: 127.0.0.1:5001, tokn: x }\ncolour: blue\n\
             trusted_proxies: [10.0.0.0/33]\ntraefik: { version: 4, middleware_prefix: 'a b' }\n\
             services:\n  immich: {}\n  'bad name': {}\n\
             sources:\n\
             \x20 a: { kind: mirror, hosts: [ha.example.com], unlocks: [immich, photos], max_ips: 0, idle_ttl: soon }\n\
             \x20 b: { kind: mirror, hosts: [HA.example.com], unlocks: '*' }\n\
             \x20 c: { kind: share, unlocks: [immich] }\n\
             \x20 d: { kind: share, upstream: 'http://x:1/path', path: '(', unlocks: [immich] }\n\
             \x20 e: { kind: carrier-pigeon, unlocks: [immich] }\n",
        );
        let expected = [
            "listen: `nowhere` is not a listen address",
            "admin.tokn: unknown key `tokn`",
            "colour: unknown key `colour`",
            "trusted_proxies[0]: `10.0.0.0/33` is not a CIDR range",
            "traefik.version: `4` is not a supported Traefik version",
            "traefik.middleware_prefix: `a b` may hold only",
            "services.bad name: service name `bad name`",
            "sources.a.unlocks[1]: service `photos` does not exist",
            "sources.a.max_ips: `0` would grant nobody",
            "sources.a.idle_ttl: `soon` is not a duration",
            "sources.b.hosts[0]: host `ha.example.com` is already claimed by source `a`",
            "sources.c.upstream: missing",
            "sources.c.path: missing",
            "sources.d.upstream: `http://x:1/path` must be an origin only",
            "sources.d.path: regex `(` does not compile",
            "sources.e.kind: `carrier-pigeon` is not a source kind",
        ];
        for e in expected {
            assert!(
                got.iter().any(|g| g.starts_with(e)),
                "missing {e:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), expected.len(), "{got:#?}");
    }

    #[test]
    fn share_patterns_and_check_templates() {
        let ok = "services: { immich: {} }\nsources:\n  s:\n    kind: share\n    upstream: http://immich:2283\n    unlocks: [immich]\n    patterns:\n\
                  \x20     - { path: '^/share/(?P<key>[A-Za-z0-9_-]{67})$', check: '/api/shared-links/me?key={key}' }\n\
                  \x20     - { path: '^/s/(?P<slug>[A-Za-z0-9_-]+)$', check: '/api/shared-links/me?slug={slug}' }\n";
        let p = from_yaml_str(ok, "t").unwrap();
        let SourceKind::Share(s) = &p.sources["s"].kind else {
            panic!()
        };
        assert_eq!(s.patterns.len(), 2);
        assert_eq!(s.upstream.authority().unwrap().as_str(), "immich:2283");
        let bad = ok.replace("?slug={slug}", "?slug={nope}");
        assert!(problems(&bad)[0].contains("uses `{nope}`, which regex"));
        for upstream in ["ftp://x", "http://u:p@x:1", "http://x?q=1", "x:1"] {
            let yaml = ok.replace("http://immich:2283", upstream);
            let got = problems(&yaml);
            assert!(
                got[0].starts_with("sources.s.upstream"),
                "{upstream}: {got:?}"
            );
        }
    }

    #[test]
    fn durations_cidrs_and_names() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("0s").unwrap_err().contains("positive"));
        assert!(parse_duration("7").is_err());
        assert_eq!(
            parse_cidr("203.0.113.7"),
            Ok("203.0.113.7/32".parse().unwrap())
        );
        assert_eq!(parse_cidr("10.1.2.3/8"), Ok("10.0.0.0/8".parse().unwrap()));
        assert_eq!(
            parse_cidr("2001:db8::1"),
            Ok("2001:db8::1/128".parse().unwrap())
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("").is_err());
        // `never` is for legacy mode only: a policy file must bound grants in time.
        let got = problems(&MINIMAL.replace("unlocks: \"*\"", "unlocks: \"*\", idle_ttl: never"));
        assert!(
            got[0].starts_with("sources.ha.idle_ttl: `never`"),
            "{got:?}"
        );
    }

    #[test]
    fn file_then_environment_layering() {
        Jail::expect_with(|jail| {
            jail.create_file("gk.yaml", MINIMAL)?;
            jail.set_env("GATEKEEPER_SOURCES__HA__MAX_IPS", "3");
            jail.set_env("GATEKEEPER_LISTEN", "127.0.0.1:7000");
            jail.set_env("GATEKEEPER_ADMIN__TOKEN", "s3cret");
            jail.set_env("GATEKEEPER_CONFIG", "gk.yaml");
            let location = Location::resolve(None, &env());
            assert!(location.explicit);
            let p = load(&location, &env()).unwrap();
            assert_eq!(p.sources["ha"].limits.max_ips, 3);
            assert_eq!(p.listen, "127.0.0.1:7000".parse().unwrap());
            assert_eq!(p.admin.token.as_deref(), Some("s3cret"));

            jail.set_env("GATEKEEPER_SOURCES__HA__MAX_IPS", "lots");
            let err = load(&location, &env()).unwrap_err().to_string();
            assert!(
                err.contains("set by environment variable GATEKEEPER_SOURCES__HA__MAX_IPS"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_policy_file_trusts_only_loopback_by_default() {
        let p = from_yaml_str(MINIMAL, "t").unwrap();
        let trusted: Vec<String> = p.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(trusted, ["127.0.0.0/8", "::1/128"]);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn legacy_mode_keeps_the_wide_trust_and_warns() {
        Jail::expect_with(|jail| {
            jail.set_env("MAX_IP_LEN", "3");
            let p = load(&Location::resolve(None, &env()), &env()).unwrap();
            assert!(p.legacy);
            assert_eq!(p.trusted_proxies.len(), LEGACY_TRUSTED_PROXIES.len());
            let text: Vec<String> = p.warnings.iter().map(|w| w.to_string()).collect();
            assert!(
                text.iter()
                    .any(|w| w.contains("legacy mode believes X-Forwarded-For")
                        && w.contains("trusted_proxies")),
                "{text:?}"
            );
            Ok(())
        });
    }

    #[test]
    fn always_allow_overlapping_never_grant_is_warned_naming_both_keys() {
        let p = from_yaml_str(
            &format!(
                "never_grant: [172.30.0.1/32]\n\
                 always_allow: [172.30.0.0/24, 192.168.0.0/16]\n{MINIMAL}"
            ),
            "t",
        )
        .unwrap();
        let text: Vec<String> = p.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(text.len(), 1, "{text:?}");
        assert!(
            text[0].starts_with(
                "always_allow[0]: `172.30.0.0/24` overlaps never_grant[0] `172.30.0.1/32`: "
            ),
            "{text:?}"
        );
    }

    #[test]
    fn always_allow_overlapping_trusted_proxies_is_warned_naming_both_keys() {
        let p = from_yaml_str(
            &format!(
                "trusted_proxies: [127.0.0.1/32, 172.16.0.0/12]\n\
                 always_allow: [192.168.1.0/24, 172.18.0.0/16]\n{MINIMAL}\
                 \x20 other: {{ kind: mirror, hosts: [o.test], unlocks: '*' }}\n"
            )
            .replace(
                "services: { immich: {} }",
                "services: { immich: { always_allow: [127.0.0.0/8] } }",
            ),
            "t",
        )
        .unwrap();
        let text: Vec<String> = p.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text[0].starts_with(
                "always_allow[1]: `172.18.0.0/16` overlaps trusted_proxies[1] `172.16.0.0/12`: "
            ),
            "{text:?}"
        );
        assert!(
            text[1].starts_with(
                "services.immich.always_allow[0]: `127.0.0.0/8` overlaps trusted_proxies[0] `127.0.0.1/32`"
            ),
            "{text:?}"
        );
        // The default trust is named as such.
        let p = from_yaml_str(&format!("always_allow: [127.0.0.5/32]\n{MINIMAL}"), "t").unwrap();
        assert!(
            p.warnings[0]
                .to_string()
                .contains("overlaps trusted_proxies (default) `127.0.0.0/8`"),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn never_grant_is_read_like_always_allow() {
        let p = from_yaml_str(MINIMAL, "t").unwrap();
        assert!(p.never_grant.is_empty());
        let p = from_yaml_str(
            &format!("never_grant: [172.30.0.1, \"2001:db8:7::1/64\"]\n{MINIMAL}"),
            "t",
        )
        .unwrap();
        let ranges: Vec<String> = p.never_grant.iter().map(|n| n.to_string()).collect();
        assert_eq!(ranges, ["172.30.0.1/32", "2001:db8:7::/64"]);
        // Not trusted: the default trust stays loopback only.
        assert!(
            !p.trusted_proxies
                .iter()
                .any(|t| t.contains(&p.never_grant[0]))
        );
        // A single range is a list of one.
        let p = from_yaml_str(&format!("never_grant: 172.30.0.1/32\n{MINIMAL}"), "t").unwrap();
        assert_eq!(p.never_grant, vec![parse_cidr("172.30.0.1/32").unwrap()]);
    }

    #[test]
    fn never_grant_errors_name_each_bad_element_with_the_rest() {
        let got = problems(&format!(
            "never_grant: [172.30.0.1/32, bogus, 10.0.0.0/33]\n\
             always_allow: [nope]\n\
             never_grants: [172.30.0.1/32]\n{MINIMAL}"
        ));
        for want in [
            "never_grant[1]: `bogus` is not a CIDR range",
            "never_grant[2]: `10.0.0.0/33`",
            "always_allow[0]: `nope` is not a CIDR range",
            "never_grants: unknown key `never_grants`",
        ] {
            assert!(got.iter().any(|p| p.starts_with(want)), "{want}: {got:?}");
        }
        assert_eq!(got.len(), 4, "{got:?}");
        let got = problems(&format!(
            "never_grant: {{ gateway: 172.30.0.1 }}\n{MINIMAL}"
        ));
        assert!(
            got.iter()
                .any(|p| p.starts_with("never_grant: expected a list")),
            "{got:?}"
        );
    }

    #[test]
    fn never_grant_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.create_file("gk.yaml", MINIMAL)?;
            let location = Location::resolve(Some("gk.yaml".into()), &env());
            jail.set_env("GATEKEEPER_NEVER_GRANT", "[172.30.0.1/32, fd00:30::1]");
            let p = load(&location, &env()).unwrap();
            let ranges: Vec<String> = p.never_grant.iter().map(|n| n.to_string()).collect();
            assert_eq!(ranges, ["172.30.0.1/32", "fd00:30::1/128"]);

            jail.set_env("GATEKEEPER_NEVER_GRANT", "172.30.0.1");
            let p = load(&location, &env()).unwrap();
            assert_eq!(p.never_grant, vec![parse_cidr("172.30.0.1/32").unwrap()]);

            jail.set_env("GATEKEEPER_NEVER_GRANT", "[172.30.0.1/32, bogus]");
            let err = load(&location, &env()).unwrap_err().to_string();
            assert!(
                err.contains("never_grant[1]: `bogus` is not a CIDR range")
                    && err.contains("set by environment variable GATEKEEPER_NEVER_GRANT"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn every_shipped_policy_is_valid_without_warnings() {
        for path in [
            "gatekeeper.example.yaml",
            "deploy/gatekeeper.yaml",
            "deploy/gatekeeper.ha.yaml",
        ] {
            let p = from_yaml_str(&repo_file(path), path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(p.warnings.is_empty(), "{path}: {:?}", p.warnings);
        }
    }

    #[test]
    fn an_admin_token_of_digits_is_kept_exactly_and_never_echoed() {
        Jail::expect_with(|jail| {
            jail.create_file("gatekeeper.yaml", MINIMAL)?;
            let location = Location::resolve(Some("gatekeeper.yaml".into()), &env());
            // Leading zeros and more digits than any integer holds.
            let digits = "000123456789012345678901234567890123456789";
            jail.set_env("GATEKEEPER_ADMIN__TOKEN", digits);
            let p = load(&location, &env()).unwrap();
            assert_eq!(p.admin.token.as_deref(), Some(digits));
            Ok(())
        });
        let p = from_yaml_str(&format!("admin: {{ token: 98765 }}\n{MINIMAL}"), "t").unwrap();
        assert_eq!(p.admin.token.as_deref(), Some("98765"));
        let text = problems(&format!("admin: {{ token: 1.5e300 }}\n{MINIMAL}")).join("\n");
        assert!(text.contains("admin.token: expected text"), "{text}");
        assert!(!text.contains("1.5") && !text.contains("e300"), "{text}");
    }

    #[test]
    fn a_bad_notify_url_is_shown_without_its_secrets() {
        let text = problems(&format!(
            "notify: {{ url: 'ftp://u:hunter2@h/x?token=hunter3' }}\n{MINIMAL}"
        ))
        .join("\n");
        assert!(
            text.contains("notify.url: `ftp://u@h/x?…` is not an http(s) URL"),
            "{text}"
        );
        assert!(!text.contains("hunter"), "{text}");
    }

    #[test]
    fn a_named_file_that_is_missing_is_an_error_not_legacy_mode() {
        Jail::expect_with(|jail| {
            jail.set_env("MAX_IP_LEN", "3");
            let named = Location::resolve(Some("nope.yaml".into()), &env());
            assert!(matches!(
                load(&named, &env()),
                Err(PolicyError::Missing { explicit: true, .. })
            ));
            // Not named: the legacy variables take over.
            let p = load(&Location::resolve(None, &env()), &env()).unwrap();
            assert!(p.legacy);
            Ok(())
        });
    }

    #[test]
    fn legacy_variables_build_the_old_behaviour() {
        Jail::expect_with(|jail| {
            jail.set_env("MAX_IP_LEN", " 3 ");
            jail.set_env("DEFAULT_SOURCE_RANGE", "10.0.0.0/8, 192.168.1.0/24,,");
            let p = load(&Location::resolve(None, &env()), &env()).unwrap();
            assert!(p.legacy);
            assert_eq!(
                p.traefik.middleware_name(LEGACY_SERVICE),
                "dynamic-whitelist"
            );
            assert_eq!(p.traefik.file.as_deref(), Some(Path::new(LEGACY_FILE)));
            assert_eq!(p.always_allow.len(), 2);
            assert!(p.never_grant.is_empty());
            assert!(
                legacy_yaml(&env()).unwrap().contains("\nnever_grant: []\n"),
                "the equivalent policy file shows the key"
            );
            let src = &p.sources[LEGACY_SOURCE];
            assert_eq!(src.limits.max_ips, 3);
            assert_eq!(src.limits.idle_ttl, None);
            assert_eq!(p.catch_all_mirror(), Some(LEGACY_SOURCE));

            // The old app crashed on an empty range list; MAX_ALLOWED_IPS is the other old name.
            jail.clear_env();
            jail.set_env("DEFAULT_SOURCE_RANGE", "");
            jail.set_env("MAX_ALLOWED_IPS", "5");
            let p = load(&Location::resolve(None, &env()), &env()).unwrap();
            assert!(p.always_allow.is_empty());
            assert_eq!(p.sources[LEGACY_SOURCE].limits.max_ips, 5);

            jail.set_env("MAX_ALLOWED_IPS", "five");
            let err = load(&Location::resolve(None, &env()), &env())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`five`")
                    && err.contains("set by environment variable MAX_ALLOWED_IPS"),
                "{err}"
            );
            jail.set_env("MAX_ALLOWED_IPS", "5");
            jail.set_env("DEFAULT_SOURCE_RANGE", "10.0.0.0/8,bogus");
            let err = load(&Location::resolve(None, &env()), &env())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("always_allow[1]: `bogus` is not a CIDR range")
                    && err.contains("set by environment variable DEFAULT_SOURCE_RANGE"),
                "{err}"
            );
            Ok(())
        });
    }
}
