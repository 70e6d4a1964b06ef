//! The command line (clap derive; the doc comments are the `--help`), the commands that need
//! no running daemon (`check`, `render`, `labels`), and the operator commands that ask a running
//! one through its admin API (`list`, `grant`, `revoke`, `health`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand, ValueEnum};

use crate::admin::{self, EntriesJson, EntryJson, ErrorJson, GrantJson, RevokedJson};
use crate::gate::Gate;
use crate::policy::{self, Location, Policy, PolicyError, SourceKind, TraefikVersion};
use crate::sinks::traefik_file;
use crate::spans::{ago_or_in, short_duration};
use crate::store;

/// Allow-list, per service and for a limited time, the public IP of clients that proved trust on
/// another service, in Traefik, nginx or Caddy.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Policy file [default: $GATEKEEPER_CONFIG, else ./gatekeeper.yaml; without one, the legacy
    /// variables MAX_IP_LEN / DEFAULT_SOURCE_RANGE are used]
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,

    /// Log format (the level is set with RUST_LOG, default info)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What to do [default: serve]
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default)
    Serve,
    /// Validate the policy: print every problem, or what each router must reference
    Check,
    /// Print the Traefik file for the current state (policy plus state file)
    Render,
    /// Print what to paste into the proxy: Traefik labels and file snippets, nginx, Caddy
    Labels {
        /// How the proxy reaches gatekeeper [default: http://gatekeeper:<listen port>]
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// Only this proxy (repeatable) [default: all]
        #[arg(long, value_enum)]
        proxy: Vec<crate::labels::Proxy>,
    },
    /// List who is allowed, through which source, until when (asks the running daemon)
    List {
        /// Print the admin API's JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Allow an address now through a source, as if it had proved trust there (asks the running
    /// daemon)
    Grant {
        /// An address or network: 203.0.113.5, 203.0.113.0/24, 2001:db8::/64 (an IPv6 address
        /// means its ipv6_prefix network)
        address: String,
        /// The source whose services and limits apply
        #[arg(long, value_name = "NAME")]
        source: String,
        /// End the grant after this long at the latest (90s, 12h, 7d); the source's idle_ttl and
        /// max_age still apply
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Remove an address from every source, or from one (asks the running daemon)
    Revoke {
        /// The address or network, as `list` shows it or as given to `grant`
        address: String,
        /// Only from this source
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
    },
    /// Exit 0 when the running daemon is healthy, 1 with the reason otherwise (for a container
    /// HEALTHCHECK)
    Health,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines
    Text,
    /// One JSON object per line
    Json,
}

impl Cli {
    /// Where the policy is, from `--config` or the environment.
    pub fn location(&self, env: &BTreeMap<String, String>) -> Location {
        Location::resolve(self.config.clone(), env)
    }
}

/// `gatekeeper check`: the summary a user acts on, or every problem. Errors are returned for
/// the caller to print; the exit status is theirs to choose.
pub fn check(location: &Location, env: &BTreeMap<String, String>) -> Result<String, PolicyError> {
    let policy = policy::load(location, env)?;
    let mut out = summary(&policy);
    if policy.legacy {
        // Legacy mode exists for swapping the image; this is the way out of it.
        let _ = write!(
            out,
            "\nequivalent policy file (save it as gatekeeper.yaml and remove MAX_IP_LEN / \
             DEFAULT_SOURCE_RANGE to move on; replace `idle_ttl: never` by a duration):\n\n{}",
            policy::legacy_yaml(env).unwrap_or_default()
        );
    }
    Ok(out)
}

/// The human summary of a valid policy.
pub(crate) fn summary(policy: &Policy) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy {} is valid{}",
        policy.origin,
        if policy.legacy { " (legacy mode)" } else { "" }
    );
    let kind = match policy.traefik.version {
        TraefikVersion::V2 => "ipWhiteList",
        TraefikVersion::V3 => "ipAllowList",
    };
    for w in &policy.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let _ = writeln!(
        out,
        "\nservices: reference the middleware on each service's routers"
    );
    for (name, service) in &policy.services {
        let _ = write!(out, "  {name:<16} {}", policy.traefik.middleware_ref(name));
        if !service.always_allow.is_empty() {
            let _ = write!(out, "  (always allows {})", join(&service.always_allow));
        }
        out.push('\n');
    }
    let _ = writeln!(out, "\nsources:");
    for (name, source) in &policy.sources {
        let what = match &source.kind {
            SourceKind::Mirror(m) if m.catch_all => "mirror, every unclaimed request".to_string(),
            SourceKind::Mirror(m) => format!("mirror, hosts {}", m.hosts.join(", ")),
            SourceKind::Share(s) => format!("share, upstream {}", s.upstream),
        };
        let l = &source.limits;
        let _ = write!(
            out,
            "  {name:<16} {what}\n  {:<16} unlocks {}; max_ips {}, idle_ttl {}",
            "",
            source.unlocks.join(", "),
            l.max_ips,
            l.idle_ttl.map_or("never".to_string(), short_duration)
        );
        if let Some(age) = l.max_age {
            let _ = write!(out, ", max_age {}", short_duration(age));
        }
        out.push('\n');
    }
    let _ = writeln!(out, "\noutputs:");
    match &policy.traefik.file {
        Some(f) => {
            let _ = writeln!(out, "  traefik file     {} ({kind})", f.display());
        }
        None => {
            let _ = writeln!(out, "  traefik file     none (traefik.file is not set)");
        }
    }
    let _ = writeln!(
        out,
        "  traefik HTTP     {} on the listener ({kind}, provider `http`)",
        crate::http::DYNAMIC_JSON
    );
    if let Some(kv) = &policy.traefik.redis {
        let _ = writeln!(
            out,
            "  traefik KV       {} under {}/http/middlewares ({kind})",
            policy::without_password(&kv.url),
            kv.root_key
        );
    }
    match &policy.redis {
        Some(r) => {
            let _ = writeln!(
                out,
                "  shared ledger    {} under {}: (the state file is not used)",
                policy::without_password(&r.url),
                r.key_prefix
            );
        }
        None => {
            let _ = writeln!(out, "  state file       {}", policy.state_file.display());
        }
    }
    if !policy.always_allow.is_empty() {
        let _ = writeln!(
            out,
            "\nalways allowed for every service: {}",
            join(&policy.always_allow)
        );
    }
    if !policy.never_grant.is_empty() {
        let _ = writeln!(
            out,
            "never granted (each stands for many clients): {}",
            join(&policy.never_grant)
        );
    }
    let _ = writeln!(out, "trusted proxies: {}", join(&policy.trusted_proxies));
    out
}

/// `gatekeeper labels`: the proxy snippets for the loaded policy.
pub fn labels(
    location: &Location,
    env: &BTreeMap<String, String>,
    url: Option<&str>,
    proxies: &[crate::labels::Proxy],
) -> Result<String, PolicyError> {
    use crate::labels::Proxy;
    let policy = policy::load(location, env)?;
    let url = url.map_or_else(
        || format!("http://gatekeeper:{}", policy.listen.port()),
        str::to_string,
    );
    let proxies = if proxies.is_empty() {
        &[Proxy::Traefik, Proxy::Nginx, Proxy::Caddy][..]
    } else {
        proxies
    };
    Ok(crate::labels::render(&policy, &url, proxies))
}

/// `gatekeeper render`: the Traefik file for the policy and the state file as they are now.
/// Reads only; entries that could not be restored are listed in the second value.
pub fn render(
    location: &Location,
    env: &BTreeMap<String, String>,
) -> anyhow::Result<(String, Vec<String>)> {
    let policy = policy::load(location, env)?;
    if let Some(r) = &policy.redis {
        anyhow::bail!(
            "the ledger of {} is in Redis ({}), not in a state file: ask a running gatekeeper \
             (`gatekeeper list`, or GET /traefik/dynamic.json on its listener)",
            location.path.display(),
            policy::without_password(&r.url)
        );
    }
    let entries = store::load(&policy.state_file)?;
    let (gate, restored) = Gate::new(policy, entries);
    let active = gate.active();
    let yaml = traefik_file::render(
        &gate.snapshot(),
        &active.policy.traefik,
        &active.policy.origin,
    );
    Ok((yaml, restored.dropped))
}

fn join(nets: &[ipnet::IpNet]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Operator commands: the admin API of a running daemon
// ---------------------------------------------------------------------------------------------

/// How long `health` waits for an answer (a container HEALTHCHECK must not hang).
pub(crate) const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the other operator commands wait (a grant waits for the state file).
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(15);

/// Why an operator command failed; every message is meant to be read as is.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The policy (for `admin.listen` and the token) is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The token file cannot be read.
    #[error(transparent)]
    Token(#[from] admin::TokenError),
    /// Nothing listens at the admin address.
    #[error("gatekeeper is not running at {0} (admin.listen)")]
    NotRunning(SocketAddr),
    /// The daemon did not answer in time.
    #[error("gatekeeper at {addr} did not answer within {}", short_duration(*after))]
    Timeout {
        /// The admin address.
        addr: SocketAddr,
        /// How long it was given.
        after: Duration,
    },
    /// Any other transport failure.
    #[error("cannot talk to gatekeeper at {addr}: {message}")]
    Transport {
        /// The admin address.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// The daemon asks for a token and this command has none.
    #[error(
        "gatekeeper at {0} needs the admin token: set admin.token_file or \
         GATEKEEPER_ADMIN__TOKEN for this command as for the daemon"
    )]
    NoToken(SocketAddr),
    /// The daemon refused the token.
    #[error(
        "gatekeeper at {0} refused the admin token: admin.token_file or \
         GATEKEEPER_ADMIN__TOKEN differ from the daemon's"
    )]
    WrongToken(SocketAddr),
    /// The API answered with an error (its message).
    #[error("{0}")]
    Api(String),
    /// `/healthz` answered with something other than 200.
    #[error("unhealthy: {0}")]
    Unhealthy(String),
}

/// A connection to the admin API of the daemon that `--config` describes.
#[derive(Debug)]
pub(crate) struct AdminClient {
    addr: SocketAddr,
    base: url::Url,
    token: Option<String>,
    http: reqwest::Client,
    timeout: Duration,
}

/// Where to connect for a listen address: an unspecified one (`0.0.0.0`, `::`) listens on
/// loopback too.
pub(crate) fn connect_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

impl AdminClient {
    /// A client for the admin listener of the policy at `location`; with its token unless
    /// `with_token` is false (`health` needs none, so an unreadable token file cannot fail it).
    pub(crate) fn from_policy(
        location: &Location,
        env: &BTreeMap<String, String>,
        with_token: bool,
        timeout: Duration,
    ) -> Result<AdminClient, ClientError> {
        let policy = policy::load(location, env)?;
        let token = if with_token {
            admin::load_token(&policy)?
        } else {
            None
        };
        let addr = connect_addr(policy.admin.listen);
        let base =
            url::Url::parse(&format!("http://{addr}/")).map_err(|e| ClientError::Transport {
                addr,
                message: e.to_string(),
            })?;
        let http = reqwest::Client::builder()
            // The admin listener is local: an HTTP_PROXY of the environment must not reroute it.
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|e| ClientError::Transport {
                addr,
                message: e.to_string(),
            })?;
        Ok(AdminClient {
            addr,
            base,
            token,
            http,
            timeout,
        })
    }

    fn url(&self, segments: &[&str]) -> url::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            // Each segment is percent-encoded, so `2001:db8::/64` stays one segment.
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        req.send().await.map_err(|e| self.transport(e))
    }

    fn transport(&self, e: reqwest::Error) -> ClientError {
        if e.is_timeout() {
            ClientError::Timeout {
                addr: self.addr,
                after: self.timeout,
            }
        } else if e.is_connect() {
            ClientError::NotRunning(self.addr)
        } else {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                let _ = write!(message, ": {s}");
                source = s.source();
            }
            ClientError::Transport {
                addr: self.addr,
                message,
            }
        }
    }

    /// The body of a successful answer, or the API's error as a [`ClientError`].
    async fn body(&self, res: reqwest::Response) -> Result<String, ClientError> {
        let status = res.status();
        let text = res.text().await.map_err(|e| self.transport(e))?;
        if status.is_success() {
            return Ok(text);
        }
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(match self.token {
                None => ClientError::NoToken(self.addr),
                Some(_) => ClientError::WrongToken(self.addr),
            });
        }
        let message = serde_json::from_str::<ErrorJson>(&text)
            .map(|e| e.error)
            .unwrap_or_else(|_| {
                format!(
                    "gatekeeper at {} answered {status}: {}",
                    self.addr,
                    text.trim()
                )
            });
        Err(ClientError::Api(message))
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, text: &str) -> Result<T, ClientError> {
        serde_json::from_str(text).map_err(|e| ClientError::Transport {
            addr: self.addr,
            message: format!("unexpected answer ({e}): {text}"),
        })
    }

    /// `GET /api/v1/entries`: the raw JSON and the entries.
    pub(crate) async fn entries(&self) -> Result<(String, Vec<EntryJson>), ClientError> {
        let res = self
            .send(self.http.get(self.url(&["api", "v1", "entries"])))
            .await?;
        let text = self.body(res).await?;
        let list: EntriesJson = self.decode(&text)?;
        Ok((text, list.entries))
    }

    /// `POST /api/v1/entries`: the entry as granted.
    pub(crate) async fn grant(&self, grant: &GrantJson) -> Result<EntryJson, ClientError> {
        let req = self
            .http
            .post(self.url(&["api", "v1", "entries"]))
            .json(grant);
        let text = self.body(self.send(req).await?).await?;
        self.decode(&text)
    }

    /// `DELETE /api/v1/entries/{address}?source=`: what was removed.
    pub(crate) async fn revoke(
        &self,
        address: &str,
        source: Option<&str>,
    ) -> Result<RevokedJson, ClientError> {
        let mut url = self.url(&["api", "v1", "entries", address]);
        if let Some(s) = source {
            url.query_pairs_mut().append_pair("source", s);
        }
        let text = self.body(self.send(self.http.delete(url)).await?).await?;
        self.decode(&text)
    }

    /// `GET /healthz`: its body when 200, [`ClientError::Unhealthy`] with the reason otherwise.
    pub(crate) async fn health(&self) -> Result<String, ClientError> {
        let res = self.send(self.http.get(self.url(&["healthz"]))).await?;
        let status = res.status();
        let text = res.text().await.map_err(|e| self.transport(e))?;
        let text = text.trim().to_string();
        if status == reqwest::StatusCode::OK {
            Ok(text)
        } else if text.is_empty() {
            Err(ClientError::Unhealthy(format!(
                "/healthz answered {status}"
            )))
        } else {
            Err(ClientError::Unhealthy(text))
        }
    }
}

/// Run an operator command (`list`, `grant`, `revoke`, `health`) against the daemon of the policy
/// at `location`; returns what to print. Other commands are not operator commands: `None`.
pub async fn operate(
    command: &Command,
    location: &Location,
    env: &BTreeMap<String, String>,
) -> Option<Result<String, ClientError>> {
    let client = |with_token, timeout| AdminClient::from_policy(location, env, with_token, timeout);
    Some(match command {
        Command::List { json } => {
            async {
                let (raw, entries) = client(true, API_TIMEOUT)?.entries().await?;
                Ok(if *json {
                    format!("{}\n", raw.trim_end())
                } else {
                    entries_table(&entries, SystemTime::now())
                })
            }
            .await
        }
        Command::Grant {
            address,
            source,
            ttl,
        } => {
            async {
                let grant = GrantJson {
                    source: source.clone(),
                    address: address.clone(),
                    ttl: ttl.clone(),
                };
                let entry = client(true, API_TIMEOUT)?.grant(&grant).await?;
                let until = match &entry.expires {
                    Some(t) => format!("until {t} ({})", relative(t, SystemTime::now())),
                    None => "until revoked".to_string(),
                };
                Ok(format!(
                    "granted {} through {}, {until}\n",
                    entry.network, entry.source
                ))
            }
            .await
        }
        Command::Revoke { address, source } => {
            async {
                let revoked = client(true, API_TIMEOUT)?
                    .revoke(address, source.as_deref())
                    .await?;
                let mut out = String::new();
                for r in revoked.removed {
                    let _ = writeln!(out, "revoked {} from {}", r.network, r.source);
                }
                Ok(out)
            }
            .await
        }
        Command::Health => {
            async {
                let body = client(false, HEALTH_TIMEOUT)?.health().await?;
                Ok(format!("{body}\n"))
            }
            .await
        }
        _ => return None,
    })
}

/// `in 6d 23h`, `12s ago`, from an RFC 3339 time of the API (as is when it does not parse).
fn relative(rfc3339: &str, now: SystemTime) -> String {
    let Ok(at) = humantime::parse_rfc3339(rfc3339) else {
        return rfc3339.to_string();
    };
    ago_or_in(at.duration_since(now).map_err(|e| e.duration()))
}

/// The aligned table `gatekeeper list` prints.
pub(crate) fn entries_table(entries: &[EntryJson], now: SystemTime) -> String {
    if entries.is_empty() {
        return "no entries\n".to_string();
    }
    let mut rows = vec![[
        "SOURCE".to_string(),
        "NETWORK".to_string(),
        "IDENTITY".to_string(),
        "LAST SEEN".to_string(),
        "EXPIRES".to_string(),
    ]];
    for e in entries {
        rows.push([
            e.source.clone(),
            e.network.clone(),
            e.identity.clone().unwrap_or_else(|| "-".to_string()),
            relative(&e.last_seen, now),
            e.expires
                .as_deref()
                .map_or_else(|| "never".to_string(), |t| relative(t, now)),
        ]);
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod operator_tests {
    use super::*;

    #[test]
    fn unspecified_listen_addresses_are_reached_on_loopback() {
        let a = |s: &str| connect_addr(s.parse().unwrap()).to_string();
        assert_eq!(a("0.0.0.0:5001"), "127.0.0.1:5001");
        assert_eq!(a("[::]:5001"), "[::1]:5001");
        assert_eq!(a("10.0.0.2:5001"), "10.0.0.2:5001");
    }

    #[test]
    fn entries_table_reads_relative_times() {
        let now = humantime::parse_rfc3339("2025-01-01T12:00:00Z").unwrap();
        let entry = |source: &str, network: &str, expires: Option<&str>| EntryJson {
            source: source.into(),
            network: network.into(),
            identity: None,
            first_seen: "2025-01-01T11:00:00Z".into(),
            last_seen: "2025-01-01T11:59:18Z".into(),
            expires: expires.map(Into::into),
            hits: 1,
        };
        let table = entries_table(
            &[
                entry(
                    "home-assistant",
                    "203.0.113.5/32",
                    Some("2025-01-08T11:59:18Z"),
                ),
                entry("ha", "2001:db8::/64", None),
            ],
            now,
        );
        assert_eq!(
            table,
            "\
SOURCE          NETWORK         IDENTITY  LAST SEEN  EXPIRES
home-assistant  203.0.113.5/32  -         42s ago    in 6d 23h
ha              2001:db8::/64   -         42s ago    never
"
        );
    }
}
