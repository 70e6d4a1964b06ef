//! The command line (clap derive; the doc comments are the `--help`) and the commands that need
//! no running daemon: `check` and `render`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::gate::Gate;
use crate::policy::{self, Location, Policy, PolicyError, SourceKind, TraefikVersion};
use crate::sinks::traefik_file;
use crate::store;

/// Allow-list, per service and for a limited time, the public IP of clients that proved trust on
/// another service, in Traefik, nginx or Caddy.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Policy file [default: $GATEKEEPER_CONFIG, else ./gatekeeper.yaml; without one, the legacy
    /// variables MAX_IP_LEN / DEFAULT_SOURCE_RANGE are used]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

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
pub fn summary(policy: &Policy) -> String {
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
    let _ = writeln!(
        out,
        "\nservices: reference the middleware on each service's routers"
    );
    for (name, service) in &policy.services {
        let _ = write!(
            out,
            "  {name:<16} {}@file",
            policy.traefik.middleware_name(name)
        );
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
    let _ = writeln!(out, "  state file       {}", policy.state_file.display());
    if !policy.always_allow.is_empty() {
        let _ = writeln!(
            out,
            "\nalways allowed for every service: {}",
            join(&policy.always_allow)
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

/// `90s`, `12h`, `7d`: the largest unit that divides the duration.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 || s == 0 {
        return format!("{}ms", d.as_millis());
    }
    for (unit, secs) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s % secs == 0 {
            return format!("{}{unit}", s / secs);
        }
    }
    format!("{s}s")
}
