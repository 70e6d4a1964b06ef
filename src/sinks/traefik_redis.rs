//! The Traefik KV sink: the same middlewares as [`traefik_file`], written to Redis (or Valkey) in
//! the key layout of Traefik's KV providers, so several Traefik instances reading one Redis see
//! exactly the file sink's lists.
//!
//! # Layout
//!
//! Traefik's KV configuration reference (<https://doc.traefik.io/traefik/reference/dynamic-configuration/kv/>,
//! generated into `docs/content/reference/dynamic-configuration/kv-ref.md` of traefik/traefik)
//! lists, for a middleware `M` under the default root key `traefik`:
//!
//! ```text
//! traefik/http/middlewares/M/ipAllowList/sourceRange/0          (one key per list item, from 0)
//! traefik/http/middlewares/M/ipAllowList/ipStrategy/depth
//! traefik/http/middlewares/M/ipAllowList/ipStrategy/excludedIPs/0
//! traefik/http/middlewares/M/ipAllowList/ipStrategy/ipv6Subnet
//! ```
//!
//! and the same keys under `ipWhiteList` for Traefik 2. Every value is a plain string.
//!
//! # Writing
//!
//! A list is a run of numbered keys, so a list that shrinks leaves stale indices behind unless
//! they are deleted, and Traefik could read a half-written middleware between two commands. Each
//! middleware is therefore replaced in one atomic step, a Lua script that finds the keys it no
//! longer has (SCAN on the server, inside the script), deletes them and sets the new ones; a SCAN
//! before a MULTI/EXEC would let another replica's longer list slip in between. Only
//! [`Gate::shown`] is rendered, which never holds a grant that is not durable yet.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use tracing::{debug, info, warn};

use crate::gate::Gate;
use crate::ledger::Snapshot;
use crate::policy::{Traefik, TraefikRedis};
use crate::redis_io::{StoreError, timed_for};
use crate::sinks::outputs::{MIN_WRITE_GAP, RETRY_AFTER};
use crate::sinks::traefik_file;

/// The name this sink reports its health under (`/healthz`) and logs with.
pub(crate) const PART: &str = "traefik.redis";
/// Traefik's default `rootKey`, used when the policy has no `traefik.redis`.
pub(crate) const DEFAULT_ROOT_KEY: &str = "traefik";
/// Longest one exchange with Redis (a connect, a command, a transaction) may take: a server that
/// accepts connections but never answers must not stall the sink.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(3);
/// While nothing changes, Redis is pinged this often, so an outage shows on `/healthz` (and the
/// keys are rewritten once it is back) even when no list changes meanwhile.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);
/// This often, every middleware is read back and repaired if someone else changed its keys.
pub(crate) const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// One middleware's keys with their values, in Traefik's KV layout.
pub(crate) type Pairs = Vec<(String, String)>;

/// The writes of one sync: when each was done and how many keys it set or deleted.
type Bursts = Vec<(tokio::time::Instant, usize)>;

/// Traefik's KV layout of exactly the middlewares [`traefik_file::render`] writes, by middleware
/// name. A service nobody may reach gets the file sink's [`traefik_file::DENY_ALL_SENTINEL`].
pub(crate) fn kv(snapshot: &Snapshot, traefik: &Traefik) -> BTreeMap<String, Pairs> {
    let root = root_key(traefik);
    traefik_file::middlewares(snapshot, traefik)
        .into_iter()
        .map(|m| {
            let base = format!("{}{}", middleware_base(root, &m.name), m.kind);
            let mut pairs: Pairs = m
                .source_range
                .iter()
                .enumerate()
                .map(|(i, range)| (format!("{base}/sourceRange/{i}"), range.clone()))
                .collect();
            if let Some(strategy) = &m.ip_strategy {
                if let Some(depth) = strategy.depth {
                    pairs.push((format!("{base}/ipStrategy/depth"), depth.to_string()));
                }
                for (i, ip) in strategy.excluded_ips.iter().enumerate() {
                    pairs.push((format!("{base}/ipStrategy/excludedIPs/{i}"), ip.clone()));
                }
                if let Some(subnet) = strategy.ipv6_subnet {
                    pairs.push((format!("{base}/ipStrategy/ipv6Subnet"), subnet.to_string()));
                }
            }
            (m.name, pairs)
        })
        .collect()
}

fn root_key(traefik: &Traefik) -> &str {
    traefik
        .redis
        .as_ref()
        .map_or(DEFAULT_ROOT_KEY, |r| r.root_key.as_str())
}

/// `{root}/http/middlewares/{name}/`: every key of that middleware starts with it.
fn middleware_base(root: &str, name: &str) -> String {
    format!("{root}/http/middlewares/{name}/")
}

/// `text` as a literal in a SCAN MATCH pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Run `call` under [`TIMEOUT`], naming what it was on failure.
async fn timed<T>(
    what: &'static str,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    timed_for(what, TIMEOUT, call).await
}

/// Every key matching `pattern`.
async fn scan(
    conn: &mut MultiplexedConnection,
    pattern: &str,
) -> Result<BTreeSet<String>, StoreError> {
    let mut keys = BTreeSet::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = timed(
            "SCAN",
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn),
        )
        .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// ARGV: a SCAN pattern for the middleware's keys, its key prefix, then (key, value)… Deletes
/// every key under the prefix that is not in the new set and sets the new ones, atomically.
/// Returns how many keys were deleted.
static REPLACE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local wanted = {}
for i = 3, #ARGV, 2 do wanted[ARGV[i]] = true end
local stale = {}
local cursor = '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    if string.sub(key, 1, #ARGV[2]) == ARGV[2] and not wanted[key] then
      table.insert(stale, key)
    end
  end
until cursor == '0'
for _, key in ipairs(stale) do redis.call('DEL', key) end
for i = 3, #ARGV, 2 do redis.call('SET', ARGV[i], ARGV[i + 1]) end
return #stale
"#,
    )
});

/// Make middleware `name` hold exactly `pairs`: read what it holds, and unless that is already
/// it, delete the stale keys and set the new ones in one atomic script. Returns how many keys it
/// set or deleted (each a keyspace notification Traefik reacts to), `None` when it wrote nothing.
async fn write_middleware(
    conn: &mut MultiplexedConnection,
    root: &str,
    name: &str,
    pairs: &Pairs,
) -> Result<Option<usize>, StoreError> {
    let base = middleware_base(root, name);
    let existing = scan(conn, &format!("{}*", glob_escape(&base))).await?;
    let wanted: BTreeSet<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    if existing
        .iter()
        .map(String::as_str)
        .eq(wanted.iter().copied())
        && !pairs.is_empty()
    {
        let mut mget = redis::cmd("MGET");
        for (key, _) in pairs {
            mget.arg(key);
        }
        let values: Vec<Option<String>> = timed("MGET", mget.query_async(conn)).await?;
        let same = values
            .iter()
            .zip(pairs)
            .all(|(held, (_, want))| held.as_deref() == Some(want.as_str()));
        if same {
            return Ok(None);
        }
    }
    // The replacement itself is one script, which finds the keys to delete on the server in the
    // same atomic step: with a SCAN before a MULTI/EXEC, another replica writing the same
    // middleware in between could leave an index of its longer list behind (a stale address that
    // Traefik would keep allowing until the next repair).
    let mut replace = REPLACE.prepare_invoke();
    replace.arg(format!("{}*", glob_escape(&base))).arg(&base);
    for (key, value) in pairs {
        replace.arg(key).arg(value);
    }
    let stale: usize = timed("replace", replace.invoke_async(conn)).await?;
    debug!(
        middleware = name,
        keys = pairs.len(),
        stale,
        "written to traefik.redis"
    );
    Ok(Some(stale + pairs.len()))
}

/// Delete every middleware whose name starts with `prefix` and is not in `keep`. With an empty
/// prefix nothing is gatekeeper's for sure, so nothing is deleted. Returns how many went.
async fn sweep(
    conn: &mut MultiplexedConnection,
    root: &str,
    prefix: &str,
    keep: &BTreeMap<String, Pairs>,
) -> Result<(usize, usize), StoreError> {
    if prefix.is_empty() {
        return Ok((0, 0));
    }
    let base = format!("{root}/http/middlewares/");
    let keys = scan(
        conn,
        &format!("{}{}*", glob_escape(&base), glob_escape(prefix)),
    )
    .await?;
    let mut orphans: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for key in &keys {
        let Some(rest) = key.strip_prefix(&base) else {
            continue;
        };
        let name = rest.split('/').next().unwrap_or(rest);
        if name.starts_with(prefix) && !keep.contains_key(name) {
            orphans.entry(name).or_default().push(key);
        }
    }
    if orphans.is_empty() {
        return Ok((0, 0));
    }
    let doomed: Vec<&String> = orphans.values().flatten().copied().collect();
    // One DEL is atomic: Traefik never sees half of a removed middleware.
    timed(
        "DEL",
        redis::cmd("DEL").arg(&doomed).query_async::<()>(conn),
    )
    .await?;
    for name in orphans.keys() {
        info!(
            middleware = name,
            "removed from traefik.redis: no longer in the policy"
        );
    }
    Ok((orphans.len(), doomed.len()))
}

/// The connection to one configured Redis and what it is known to hold.
struct Writer {
    config: TraefikRedis,
    /// The URL without its password, for logs and health.
    shown_url: String,
    conn: Option<MultiplexedConnection>,
    /// Middleware → the pairs Redis was last seen or made to hold. Cleared whenever that may no
    /// longer be true (a new connection: Redis may have restarted empty; a resync).
    known: BTreeMap<String, Pairs>,
    /// Look for middlewares under the prefix that the policy no longer has.
    sweep: bool,
}

impl Writer {
    fn new(config: TraefikRedis) -> Writer {
        Writer {
            shown_url: crate::policy::without_password(&config.url),
            config,
            conn: None,
            known: BTreeMap::new(),
            sweep: true,
        }
    }

    /// Does Redis hold exactly `desired`, as far as this writer knows?
    fn holds(&self, desired: &BTreeMap<String, Pairs>) -> bool {
        self.conn.is_some() && !self.sweep && self.known == *desired
    }

    /// Read everything back at the next sync.
    fn forget(&mut self) {
        self.known.clear();
        self.sweep = true;
    }

    async fn connection(&mut self) -> Result<&mut MultiplexedConnection, StoreError> {
        if self.conn.is_none() {
            let client = Client::open(self.config.url.as_str()).map_err(|e| StoreError::Redis {
                what: "url",
                message: e.to_string(),
            })?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT));
            let conn = timed(
                "connect",
                client.get_multiplexed_async_connection_with_config(&config),
            )
            .await?;
            info!(url = %self.shown_url, "connected to traefik.redis");
            self.forget();
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected just above"))
    }

    /// Bring Redis in line with `snapshot`; returns the writes, each as (when it was done, how
    /// many keys it set or deleted), one per middleware written or sweep made. On an error the
    /// connection is dropped and everything is checked again next time.
    async fn sync(&mut self, snapshot: &Snapshot, traefik: &Traefik) -> Result<Bursts, StoreError> {
        let result = self.try_sync(snapshot, traefik).await;
        if result.is_err() {
            self.conn = None;
            self.forget();
        }
        result
    }

    async fn try_sync(
        &mut self,
        snapshot: &Snapshot,
        traefik: &Traefik,
    ) -> Result<Bursts, StoreError> {
        let desired = kv(snapshot, traefik);
        let root = self.config.root_key.clone();
        self.connection().await?;
        let mut bursts = Vec::new();
        for (name, pairs) in &desired {
            if self.known.get(name) == Some(pairs) {
                continue;
            }
            let conn = self.conn.as_mut().expect("connected above");
            if let Some(keys) = write_middleware(conn, &root, name, pairs).await? {
                bursts.push((tokio::time::Instant::now(), keys));
            }
            self.known.insert(name.clone(), pairs.clone());
        }
        let gone = self.known.len() != desired.len();
        if gone {
            // A service left the policy (or the prefix changed): look under the prefix.
            self.known.retain(|name, _| desired.contains_key(name));
            self.sweep = true;
        }
        let conn = self.conn.as_mut().expect("connected above");
        if self.sweep {
            let (gone, keys) = sweep(conn, &root, &traefik.middleware_prefix, &desired).await?;
            if gone > 0 {
                bursts.push((tokio::time::Instant::now(), keys));
            }
            self.sweep = false;
        } else if bursts.is_empty() {
            // Nothing to write: still find out whether Redis is there.
            timed("PING", redis::cmd("PING").query_async::<()>(conn)).await?;
        }
        Ok(bursts)
    }
}

/// Keep Redis in line with what the proxy is shown while the policy has `traefik.redis`: on
/// start, after every change (coalesced, at most one sync per [`MIN_WRITE_GAP`]), after a reload
/// (a new URL or root key starts over), and every [`CHECK_EVERY`] to notice an outage. Failures
/// are reported on `/healthz` under [`PART`] and retried every [`RETRY_AFTER`]; once Redis answers
/// again everything is checked and rewritten. Returns when `stop` resolves, after one last sync of
/// what the outputs' final flush shows, if Redis lacks it.
pub(crate) async fn run(gate: Gate, stop: impl Future<Output = ()>) {
    let mut shown = gate.watch_shown();
    // The ledger as the sink starts (read from the shared store or the state file) reaches what
    // the proxy is shown only once the outputs task has swapped it in. Writing before that would
    // replace the lists in Redis with older, emptier ones and lock out everybody in them until
    // the next write (seen with two replicas restarting: 403 for two seconds).
    let floor = gate.generation();
    let mut writer: Option<Writer> = None;
    let mut resynced = Instant::now();
    tokio::pin!(stop);
    loop {
        shown.borrow_and_update();
        let active = gate.active();
        let wait = match &active.policy.traefik.redis {
            None => {
                if let Some(old) = writer.take() {
                    info!(url = %old.shown_url, "traefik.redis left the policy: no longer written");
                    gate.health().report(PART, None);
                }
                CHECK_EVERY
            }
            Some(config) => {
                let w = match &mut writer {
                    Some(w) if w.config == *config => w,
                    _ => {
                        let fresh = Writer::new(config.clone());
                        if let Some(old) = &writer {
                            info!(from = %old.shown_url, to = %fresh.shown_url, root_key = %config.root_key, "traefik.redis changed");
                        }
                        writer.insert(fresh)
                    }
                };
                if resynced.elapsed() >= RESYNC_EVERY {
                    w.forget();
                    resynced = Instant::now();
                }
                let (snapshot, generation) = gate.shown_with_generation();
                if generation < floor {
                    // `shown.changed()` below wakes the sink when it is swapped in.
                    debug!(
                        generation,
                        floor, "traefik.redis waits for the ledger it started with"
                    );
                    tokio::select! {
                        r = shown.changed() => if r.is_err() { break },
                        _ = &mut stop => break,
                    }
                    continue;
                }
                let result = tokio::select! {
                    r = w.sync(&snapshot, &active.policy.traefik) => r,
                    _ = &mut stop => break,
                };
                match result {
                    Ok(bursts) => {
                        if !bursts.is_empty() {
                            gate.metrics().write("traefik_redis", "ok");
                        }
                        gate.propagation().kv.wrote_bursts(
                            generation,
                            &bursts,
                            active.policy.traefik.throttle,
                        );
                        gate.health().report(PART, None);
                        CHECK_EVERY
                    }
                    Err(e) => {
                        gate.metrics().write("traefik_redis", "error");
                        gate.health()
                            .report(PART, Some(format!("cannot write to {}: {e}", w.shown_url)));
                        RETRY_AFTER
                    }
                }
            }
        };
        tokio::select! {
            r = shown.changed() => {
                if r.is_err() { break }
                // Coalesce: whatever else changes during the gap goes into the same sync.
                tokio::select! {
                    _ = tokio::time::sleep(MIN_WRITE_GAP) => {}
                    _ = &mut stop => break,
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => break,
        }
    }
    // A revocation in the last moments must not stay in Redis while gatekeeper is down. The
    // outputs' own last flush follows the same stop and swaps what is shown once more: wait until
    // nothing has been swapped for a moment, then write what is shown if Redis lacks it.
    let Some(w) = writer.as_mut() else { return };
    let last = tokio::time::timeout(TIMEOUT, async {
        while let Ok(Ok(())) = tokio::time::timeout(2 * MIN_WRITE_GAP, shown.changed()).await {}
        let active = gate.active();
        let snapshot = gate.shown();
        if active.policy.traefik.redis.as_ref() != Some(&w.config)
            || w.holds(&kv(&snapshot, &active.policy.traefik))
        {
            return Ok(Vec::new());
        }
        w.sync(&snapshot, &active.policy.traefik).await
    })
    .await;
    let why = match last {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {}s", TIMEOUT.as_secs()),
    };
    warn!(url = %w.shown_url, error = %why, "the last changes could not be written to traefik.redis at shutdown");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{IpStrategy, TraefikVersion};
    use crate::sinks::traefik_file::tests::service;

    fn traefik(version: TraefikVersion, ip_strategy: Option<IpStrategy>) -> Traefik {
        Traefik {
            file: None,
            version,
            middleware_prefix: "gatekeeper-".into(),
            ip_strategy,
            api: None,
            throttle: Duration::ZERO,
            settle: Duration::ZERO,
            propagation_delay: None,
            redis: Some(TraefikRedis {
                url: "redis://127.0.0.1:6379/0".into(),
                root_key: "traefik".into(),
            }),
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot::from_services(vec![
            service("immich", &["10.0.0.0/8", "203.0.113.7/32", "2001:db8::/64"]),
            service("nextcloud", &[]),
        ])
    }

    fn strategy() -> IpStrategy {
        IpStrategy {
            depth: Some(1),
            excluded_ips: vec![
                "172.16.0.0/12".parse().unwrap(),
                "fc00::/7".parse().unwrap(),
            ],
            ipv6_subnet: Some(64),
        }
    }

    fn pairs(items: &[(&str, &str)]) -> Pairs {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn version_3_with_every_ip_strategy_field() {
        let kv = kv(&snapshot(), &traefik(TraefikVersion::V3, Some(strategy())));
        let m = "traefik/http/middlewares/gatekeeper-immich/ipAllowList";
        let strategy = [
            ("ipStrategy/depth", "1"),
            ("ipStrategy/excludedIPs/0", "172.16.0.0/12"),
            ("ipStrategy/excludedIPs/1", "fc00::/7"),
            ("ipStrategy/ipv6Subnet", "64"),
        ];
        let mut immich = vec![
            ("sourceRange/0", "10.0.0.0/8"),
            ("sourceRange/1", "203.0.113.7/32"),
            ("sourceRange/2", "2001:db8::/64"),
        ];
        immich.extend(strategy);
        let expected: Vec<(String, &str)> = immich
            .iter()
            .map(|(k, v)| (format!("{m}/{k}"), *v))
            .collect();
        let expected: Vec<(&str, &str)> = expected.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(kv["gatekeeper-immich"], pairs(&expected));
        assert_eq!(
            kv.keys().collect::<Vec<_>>(),
            ["gatekeeper-immich", "gatekeeper-nextcloud"]
        );
    }

    #[test]
    fn nobody_allowed_gives_the_file_sinks_sentinel() {
        let kv = kv(&snapshot(), &traefik(TraefikVersion::V3, None));
        assert_eq!(
            kv["gatekeeper-nextcloud"],
            pairs(&[(
                "traefik/http/middlewares/gatekeeper-nextcloud/ipAllowList/sourceRange/0",
                traefik_file::DENY_ALL_SENTINEL
            )])
        );
    }

    #[test]
    fn version_2_uses_ip_white_list_without_ipv6_subnet() {
        let only_depth = IpStrategy {
            depth: Some(0),
            ..Default::default()
        };
        for (strategy, depth) in [(strategy(), "1"), (only_depth, "0")] {
            let kv = kv(&snapshot(), &traefik(TraefikVersion::V2, Some(strategy)));
            for (key, _) in kv.values().flatten() {
                assert!(key.contains("/ipWhiteList/"), "{key}");
                assert!(!key.contains("ipv6Subnet"), "{key}");
            }
            let depth_key =
                "traefik/http/middlewares/gatekeeper-nextcloud/ipWhiteList/ipStrategy/depth";
            assert!(
                kv["gatekeeper-nextcloud"].contains(&(depth_key.to_string(), depth.to_string())),
                "{kv:?}"
            );
        }
    }

    #[test]
    fn no_ip_strategy_gives_only_source_range_and_the_root_key_is_used() {
        let mut traefik = traefik(TraefikVersion::V3, None);
        traefik.redis.as_mut().unwrap().root_key = "edge/traefik".into();
        let kv = kv(&snapshot(), &traefik);
        for (key, _) in kv.values().flatten() {
            assert!(
                key.starts_with("edge/traefik/http/middlewares/gatekeeper-"),
                "{key}"
            );
            assert!(key.contains("/ipAllowList/sourceRange/"), "{key}");
        }
        traefik.redis = None;
        let kv = super::kv(&snapshot(), &traefik);
        assert!(
            kv["gatekeeper-immich"][0]
                .0
                .starts_with("traefik/http/middlewares/")
        );
    }

    #[test]
    fn source_ranges_equal_the_http_providers_lists() {
        for version in [TraefikVersion::V2, TraefikVersion::V3] {
            let traefik = traefik(version, Some(strategy()));
            let json = traefik_file::render_json(&snapshot(), &traefik);
            let kv = kv(&snapshot(), &traefik);
            let middlewares = json["http"]["middlewares"].as_object().unwrap();
            assert_eq!(middlewares.len(), kv.len());
            for (name, body) in middlewares {
                let (kind, body) = body.as_object().unwrap().iter().next().unwrap();
                let from_json: Vec<&str> = body["sourceRange"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                let marker = format!("/{kind}/sourceRange/");
                let from_kv: Vec<&str> = kv[name]
                    .iter()
                    .filter(|(k, _)| k.contains(&marker))
                    .map(|(_, v)| v.as_str())
                    .collect();
                assert_eq!(from_json, from_kv, "{name}");
            }
        }
    }

    #[test]
    fn glob_patterns_take_names_literally() {
        assert_eq!(glob_escape("traefik/a-b_c"), "traefik/a-b_c");
        assert_eq!(glob_escape(r"a*b?[c]\"), r"a\*b\?\[c\]\\");
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            crate::policy::without_password("redis://:s3cret@redis:6379/0"),
            "redis://redis:6379/0"
        );
        assert_eq!(
            crate::policy::without_password("rediss://user:s3cret@redis:6380/1"),
            "rediss://user@redis:6380/1"
        );
        assert_eq!(
            crate::policy::without_password("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
    }
}
