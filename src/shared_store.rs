//! The shared ledger on Redis (or Valkey): with `redis:` in the policy, every replica keeps its
//! entries there instead of in the state file, so several gatekeepers enforce one set of limits
//! and show every proxy the same lists.
//!
//! Redis is the authority; each replica's ledger is a copy that decisions read without waiting.
//! Per source, under `{key_prefix}:{source}:`:
//! - `seen`: sorted set, network → last seen (ms since the epoch), the LRU order;
//! - `meta`: hash, network → `{"first_seen":"…","identity":"…","until":"…"}`;
//! - `hits`: hash, network → requests seen (all replicas together);
//! - `revoked`: sorted set, network → when it was revoked (a week of tombstones);
//!
//! plus `{key_prefix}:epoch`, which changes only when Redis lost its data.
//!
//! Every change is one Lua script, so it is atomic on the server: a grant adds or refreshes the
//! entry and evicts the least recently seen until `max_ips` hold, whichever replica sends it;
//! expiry and revocation remove and report what they removed. A script that changed something
//! publishes on `{key_prefix}:changes`; every replica resyncs (reads every source in one
//! MULTI/EXEC) on such a message and every `redis.resync_every` (5 s by default) anyway.
//!
//! A new grant is applied locally only once the script has answered, so no replica ever admits
//! more than Redis holds beyond the moment its copy lags (milliseconds, the pub/sub delay). While
//! Redis cannot be reached, decisions keep coming from the last copy, new grants are refused
//! (nothing unsafe is buffered), revocations and expiries still apply locally and revocations are
//! sent once Redis is back; `/healthz` and `gatekeeper_redis_up` report it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use ipnet::IpNet;
use redis::Script;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::gate::{
    self, Active, Backend, By, Durable, Gate, Grant, GrantReply, GrantStatus, Until,
};
use crate::ledger::{Ledger, Millis, Recorded, Removal, Removed, Restore};
use crate::policy::{Policy, RedisStore};
use crate::redis_io::{StoreError, timed_for};

/// Refreshes of known clients reach Redis this often, where they count as seen (on its clock);
/// expiry runs as often.
pub(crate) const TICK: Duration = Duration::from_secs(1);
/// Connecting, and each command, may take this long before Redis counts as unreachable.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// A grant that waited longer than this for Redis is refused rather than applied late.
pub(crate) const STALE_GRANT: Duration = Duration::from_secs(3);
/// A time read from Redis (last or first seen) may be this far ahead of the replica's clock
/// (clock skew); an entry further in the future would never expire, and is not taken.
pub(crate) const MAX_AHEAD: Duration = Duration::from_secs(3600);
/// After losing Redis, the first retry comes this soon; later ones back off to 5 s.
const FIRST_RETRY: Duration = Duration::from_millis(200);
/// Grants and revocations waiting for the store, at most; more are refused (grants) at once.
const QUEUE: usize = 1024;

/// Removes `victim` from a source's keys and appends it (network, meta) to `out`.
const LUA_PRELUDE: &str = r#"
local seen, meta, hits, revoked = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local function drop(out, net, why)
  local m = redis.call('HGET', meta, net)
  if not m then
    if redis.call('ZREM', seen, net) == 0 then return end
    m = ''
  end
  redis.call('ZREM', seen, net)
  redis.call('HDEL', meta, net)
  redis.call('HDEL', hits, net)
  table.insert(out, net)
  table.insert(out, m)
  table.insert(out, why)
end
local function server_now()
  local t = redis.call('TIME')
  return string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
-- A meta value as gatekeeper writes it, or nil: anything else (another writer's, a partial
-- write) must not make a script fail, or every tick would.
local function read_meta(text)
  if not text then return nil end
  local ok, m = pcall(cjson.decode, text)
  if not ok or type(m) ~= 'table' then return nil end
  local function digits(v) return type(v) == 'string' and string.match(v, '^%d+$') ~= nil end
  if not digits(m.first_seen) then return nil end
  if m.identity ~= nil and type(m.identity) ~= 'string' then return nil end
  if m['until'] ~= nil and not digits(m['until']) then return nil end
  return m
end
-- A hits value that is not a count is reset, so HINCRBY cannot fail.
local function repair_hits(net)
  local h = redis.call('HGET', hits, net)
  if h and not string.match(h, '^%d+$') then redis.call('HSET', hits, net, 0) end
end
-- A network as text that sorts as the Rust ledger orders networks (IPv4 before IPv6, then by
-- address, then by prefix length): plain text puts 10.0.0.10/32 before 10.0.0.9/32.
local function net_order(net)
  local addr, len = string.match(net, '^(.+)/(%d+)$')
  if not addr then return '0' .. net end
  len = string.format('%03d', tonumber(len))
  local function quad(text)
    local a, b, c, d = string.match(text, '^(%d+)%.(%d+)%.(%d+)%.(%d+)$')
    if a then return tonumber(a), tonumber(b), tonumber(c), tonumber(d) end
  end
  local a, b, c, d = quad(addr)
  if a then return string.format('4%02x%02x%02x%02x', a, b, c, d) .. len end
  local head, tail = string.match(addr, '^(.*:)(%d+%.%d+%.%d+%.%d+)$')
  if head then
    a, b, c, d = quad(tail)
    addr = head .. string.format('%x:%x', a * 256 + b, c * 256 + d)
  end
  local function groups(part, into)
    for g in string.gmatch(part, '[^:]+') do
      table.insert(into, string.format('%04x', tonumber(g, 16) or 0))
    end
    return into
  end
  local at = string.find(addr, '::', 1, true)
  local left, right = addr, ''
  if at then left, right = string.sub(addr, 1, at - 1), string.sub(addr, at + 2) end
  local all, rest = groups(left, {}), groups(right, {})
  for _ = 1, 8 - #all - #rest do table.insert(all, '0000') end
  for _, g in ipairs(rest) do table.insert(all, g) end
  return '6' .. table.concat(all) .. len
end
-- The entry to evict, never `keep`: least recently seen, then first seen earliest, then the
-- lowest network; the Rust ledger's order (`lru_key`), so both backends evict the same entry.
local function lru_victim(keep)
  local two = redis.call('ZRANGE', seen, 0, 1, 'WITHSCORES')
  local score = two[2]
  if two[1] == keep then score = two[4] end
  if not score then return nil end
  local victim, first, order
  for _, net in ipairs(redis.call('ZRANGEBYSCORE', seen, score, score)) do
    if net ~= keep then
      local m = read_meta(redis.call('HGET', meta, net))
      local f, o = m and tonumber(m.first_seen) or 0, net_order(net)
      if not victim or f < first or (f == first and o < order) then
        victim, first, order = net, f, o
      end
    end
  end
  return victim
end
local function evict(out, max, keep)
  while redis.call('ZCARD', seen) > max do
    local victim = lru_victim(keep)
    if not victim then return end
    drop(out, victim, 'evicted')
  end
end
"#;

/// ARGV: network, max_ips, identity ('' none), until ('keep', 'none', or '+ms': that long from
/// now on the server's clock), channel, id, how far ahead (ms) a last-seen time may be before it
/// is replaced.
/// Returns {status, meta, now, removed…}: status is new, known or reidentified. The time is the
/// server's, so the LRU order is the order in which grants reached Redis, whatever the replicas'
/// clocks say.
const LUA_GRANT: &str = r#"
local net, max, identity, untl = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local now = server_now()
-- An unreadable meta is replaced as if the entry were new: the client proved trust just now.
local m = read_meta(redis.call('HGET', meta, net))
local status = 'new'
if m then
  status = 'known'
  if identity ~= '' and m.identity ~= identity then
    m.identity = identity
    status = 'reidentified'
  end
else
  m = {first_seen = now}
  if identity ~= '' then m.identity = identity end
end
if untl == 'none' then
  m['until'] = nil
elseif untl ~= 'keep' then
  m['until'] = string.format('%.0f', tonumber(now) + tonumber(string.sub(untl, 2)))
end
local encoded = cjson.encode(m)
redis.call('HSET', meta, net, encoded)
-- A last-seen time far ahead of the server's clock would never expire: replace it.
local score = redis.call('ZSCORE', seen, net)
if score and tonumber(score) > tonumber(now) + tonumber(ARGV[7]) then
  redis.call('ZADD', seen, now, net)
else
  redis.call('ZADD', seen, 'GT', now, net)
end
repair_hits(net)
redis.call('HINCRBY', hits, net, 1)
local out = {status, encoded, now}
evict(out, max, net)
if status ~= 'known' or #out > 3 then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return out
"#;

/// ARGV: (network, new hits)… of entries seen on this replica since its last flush. They count
/// as seen now, on the server's clock like grants: a replica's own clock, set differently, would
/// reorder the LRU or postpone (or hasten) idle expiry. Entries that are gone stay gone.
const LUA_TOUCH: &str = r#"
local now = server_now()
for i = 1, #ARGV, 2 do
  if redis.call('ZSCORE', seen, ARGV[i]) then
    redis.call('ZADD', seen, 'GT', now, ARGV[i])
    if tonumber(ARGV[i + 1]) > 0 then
      repair_hits(ARGV[i])
      redis.call('HINCRBY', hits, ARGV[i], ARGV[i + 1])
    end
  end
end
return 0
"#;

/// ARGV: channel, id, networks… Returns the removed (network, meta, why)…. Each revocation
/// leaves a tombstone for a week, so a replica re-seeding an emptied Redis from its copy cannot
/// bring back what another replica revoked.
const LUA_REVOKE: &str = r#"
local out = {}
local now = server_now()
redis.call('ZREMRANGEBYSCORE', revoked, '-inf', tonumber(now) - 7 * 86400000)
for i = 3, #ARGV do
  redis.call('ZADD', revoked, now, ARGV[i])
  drop(out, ARGV[i], 'revoked')
end
if #out > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return out
"#;

/// ARGV: channel, id, idle_ttl ms ('' none), max_age ms ('' none), max_ips. On the server's
/// clock, like grants. An entry both idle and too old is reported by the deadline it passed
/// first (max age on a tie), as by the Rust ledger: the reason must not depend on when expiry
/// happens to run.
const LUA_EXPIRE: &str = r#"
local now, idle, age, max = tonumber(server_now()), ARGV[3], ARGV[4], tonumber(ARGV[5])
local out = {}
-- When `m` is too old: first seen + max_age, or its fixed end if sooner; nil for never (or an
-- unreadable meta, left alone: replicas skip the entry; idle expiry still applies).
local function aged_at(m)
  if not m then return nil end
  local at = age ~= '' and tonumber(m.first_seen) + tonumber(age) or nil
  local untl = m['until'] and tonumber(m['until'])
  if untl and (not at or untl < at) then at = untl end
  return at
end
if idle ~= '' then
  local due = redis.call('ZRANGEBYSCORE', seen, '-inf', now - tonumber(idle), 'WITHSCORES')
  for i = 1, #due, 2 do
    local aged = aged_at(read_meta(redis.call('HGET', meta, due[i])))
    local why = 'idle'
    if aged and aged <= tonumber(due[i + 1]) + tonumber(idle) then why = 'max_age' end
    drop(out, due[i], why)
  end
end
local all = redis.call('HGETALL', meta)
for i = 1, #all, 2 do
  local aged = aged_at(read_meta(all[i + 1]))
  if aged and aged <= now then drop(out, all[i], 'max_age') end
end
evict(out, max, nil)
if #out > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return out
"#;

/// ARGV: channel, id, max_ips, then (network, last seen, hits, meta)… of a replica's copy, put
/// back after Redis came back empty (restarted without persistence, or replaced). Entries Redis
/// has, or revoked after they were last seen, are skipped; the limit holds.
const LUA_RESEED: &str = r#"
local out = {}
local added = 0
for i = 4, #ARGV, 4 do
  local net, last, n, m = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local tomb = redis.call('ZSCORE', revoked, net)
  if not redis.call('HGET', meta, net) and not (tomb and tonumber(tomb) >= tonumber(last)) then
    redis.call('HSET', meta, net, m)
    redis.call('ZADD', seen, last, net)
    redis.call('HSET', hits, net, n)
    added = added + 1
  end
end
evict(out, tonumber(ARGV[3]), nil)
if added > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return out
"#;

/// What the store stores per entry besides its network.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    first_seen: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until: Option<String>,
}

impl Meta {
    fn parse(text: &str) -> Option<Meta> {
        serde_json::from_str(text).ok()
    }
}

/// What a grant script's first word says it found.
fn grant_status(word: &str) -> Option<GrantStatus> {
    match word {
        "new" => Some(GrantStatus::New),
        "known" => Some(GrantStatus::Known),
        "reidentified" => Some(GrantStatus::Reidentified),
        _ => None,
    }
}

enum Op {
    Grant {
        source: String,
        network: IpNet,
        identity: Option<String>,
        until: Until,
        queued: Instant,
        reply: oneshot::Sender<GrantReply>,
    },
    Revoke {
        network: IpNet,
        source: Option<String>,
    },
    /// A policy reload: limits may have been lowered.
    Trim,
    /// Send refreshes, run expiry and read the store now rather than at the next tick.
    CatchUp(oneshot::Sender<Result<(), StoreError>>),
}

/// The gate's side of the shared store: a queue to the task that talks to Redis.
pub struct Handle {
    tx: mpsc::Sender<Op>,
    rx: Mutex<Option<mpsc::Receiver<Op>>>,
    up: AtomicBool,
    /// Becomes true after the first full read of the store.
    synced: watch::Sender<bool>,
    /// What the store is (for messages; no password).
    pub(crate) shown_url: String,
}

impl Handle {
    /// A handle for `store`; [`run`] serves it.
    pub(crate) fn new(store: &RedisStore) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Handle {
            tx,
            rx: Mutex::new(Some(rx)),
            up: AtomicBool::new(false),
            synced: watch::Sender::new(false),
            shown_url: crate::policy::without_password(&store.url),
        }
    }

    /// Is Redis reachable now?
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Wait until the first full read of the store (a replica that starts should not deny
    /// clients the others allow).
    pub async fn synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Ask for a grant; the receiver answers once it is in Redis and in the local copy.
    fn send_grant(
        &self,
        source: &str,
        network: IpNet,
        identity: Option<&str>,
        until: Until,
    ) -> oneshot::Receiver<GrantReply> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Grant {
            source: source.to_string(),
            network,
            identity: identity.map(str::to_string),
            until,
            queued: Instant::now(),
            reply,
        };
        if let Err(e) = self.tx.try_send(op)
            && let Op::Grant { reply, .. } = e.into_inner()
        {
            let _ = reply.send(Err(StoreError::Busy));
        }
        rx
    }

    /// Send a revocation (already applied locally); kept until Redis has it.
    fn send_revoke(&self, network: IpNet, source: Option<&str>) {
        let op = Op::Revoke {
            network,
            source: source.map(str::to_string),
        };
        if self.tx.try_send(op).is_err() {
            warn!(%network, "revocation queue full: the next resync may bring this entry back");
        }
    }

    /// Apply lowered limits of a reloaded policy in Redis too.
    fn trim(&self) {
        let _ = self.tx.try_send(Op::Trim);
    }

    /// Send this replica's refreshes, run expiry and read the whole store now instead of at the
    /// next tick; the receiver answers once done, after every operation asked for before. For
    /// tests (the conformance suite) that step through time and must see the store as it is.
    pub fn catch_up(&self) -> oneshot::Receiver<Result<(), StoreError>> {
        let (reply, rx) = oneshot::channel();
        if let Err(e) = self.tx.try_send(Op::CatchUp(reply))
            && let Op::CatchUp(reply) = e.into_inner()
        {
            let _ = reply.send(Err(StoreError::Busy));
        }
        rx
    }
}

impl Backend for Handle {
    fn grant(&self, _: &Gate, _: &Active, grant: Grant<'_>) -> Option<(Recorded, Durable)> {
        if let By::Operator { ttl, .. } = grant.by {
            let (source, network) = (grant.source, grant.network);
            info!(source, %network, ?ttl, "grant by an operator sent to the shared store");
        }
        let reply = self.send_grant(grant.source, grant.network, grant.identity, grant.until());
        Some((Recorded::Pending, Durable::Pending(reply)))
    }

    fn revoke(&self, network: IpNet, source: Option<&str>) {
        self.send_revoke(network, source);
    }

    fn reloaded(&self, removed: &[Removed]) {
        for r in removed.iter().filter(|r| r.why == Removal::Revoked) {
            self.send_revoke(r.network, Some(&r.source));
        }
        self.trim();
    }

    fn state_file(&self, _: &Ledger) -> Option<Vec<u8>> {
        None
    }

    fn up(&self) -> Option<bool> {
        Some(self.is_up())
    }
}

/// A gate whose ledger of record is the shared store `policy.redis` names, with the handle that
/// [`run`] serves; `None` when the policy has no `redis:`.
pub fn gate(policy: Policy, clock: fn() -> Millis) -> Option<(Gate, Arc<Handle>)> {
    let handle = Arc::new(Handle::new(policy.redis.as_ref()?));
    let gate = Gate::with_backend(policy, handle.clone(), clock);
    Some((gate, handle))
}

struct Keys {
    prefix: String,
    channel: String,
}

impl Keys {
    fn of(&self, source: &str) -> [String; 4] {
        ["seen", "meta", "hits", "revoked"].map(|k| format!("{}:{source}:{k}", self.prefix))
    }

    fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }
}

struct Scripts {
    grant: Script,
    touch: Script,
    revoke: Script,
    expire: Script,
    reseed: Script,
}

impl Scripts {
    fn new() -> Self {
        let with = |body: &str| Script::new(&format!("{LUA_PRELUDE}{body}"));
        Scripts {
            grant: with(LUA_GRANT),
            touch: with(LUA_TOUCH),
            revoke: with(LUA_REVOKE),
            expire: with(LUA_EXPIRE),
            reseed: with(LUA_RESEED),
        }
    }
}

/// The removals a script reported for `source`, as (network, meta, why) triples.
fn removals(source: &str, flat: &[String]) -> Vec<Removed> {
    flat.chunks_exact(3)
        .filter_map(|c| {
            let network = c[0].parse().ok()?;
            let identity = Meta::parse(&c[1]).and_then(|m| m.identity);
            let why = match c[2].as_str() {
                "idle" => Removal::Idle,
                "max_age" => Removal::MaxAge,
                "evicted" => Removal::Evicted,
                _ => Removal::Revoked,
            };
            Some(Removed {
                source: source.to_string(),
                network,
                identity,
                why,
            })
        })
        .collect()
}

/// One entry as a full read found it in Redis, not yet trusted.
struct Found<'a> {
    network: &'a str,
    /// Its score in `seen`.
    last_seen: f64,
    meta: Option<&'a str>,
    hits: Option<&'a str>,
}

impl Found<'_> {
    /// The entry, if a grant on this replica (`active`) could have made it: a network written
    /// as gatekeeper writes it, that `grantable_network` keeps as it is and no wider than a grant
    /// may be; readable meta and hits; no time more than [`MAX_AHEAD`] past `now`. `Err`: why not.
    fn check(&self, active: &Active, now: Millis) -> Result<Restore, String> {
        let network: IpNet = self
            .network
            .parse()
            .map_err(|_| "not a network".to_string())?;
        if network.to_string() != self.network || network.trunc() != network {
            return Err(format!(
                "not written as a granted network ({})",
                network.trunc()
            ));
        }
        if gate::too_wide(network, active.policy.ipv6_prefix) {
            return Err(format!(
                "wider than a grant may be (/16 for IPv4, /{} for IPv6)",
                active.policy.ipv6_prefix.min(64)
            ));
        }
        match active.client_ip.grantable_network(network) {
            Ok(n) if n == network => {}
            Ok(n) => return Err(format!("granted as {n}, not {network}")),
            Err(why) => return Err(why.to_string()),
        }
        let ahead = |t: Millis| t > now.saturating_add(MAX_AHEAD.as_millis() as Millis);
        if !self.last_seen.is_finite() || self.last_seen < 0.0 {
            return Err(format!("last seen {} is not a time", self.last_seen));
        }
        let last_seen = self.last_seen as Millis;
        if ahead(last_seen) {
            return Err(format!("last seen {last_seen} is in the future"));
        }
        let Some(meta) = self.meta.and_then(Meta::parse) else {
            return Err("its meta is missing or unreadable".to_string());
        };
        let first_seen: Millis = meta
            .first_seen
            .parse()
            .map_err(|_| format!("first seen {:?} is not a time", meta.first_seen))?;
        if ahead(first_seen) {
            return Err(format!("first seen {first_seen} is in the future"));
        }
        let until = match &meta.until {
            None => None,
            Some(u) => Some(
                u.parse()
                    .map_err(|_| format!("until {u:?} is not a time"))?,
            ),
        };
        let hits = match self.hits {
            None => 0,
            Some(h) => h
                .parse()
                .map_err(|_| format!("hits {h:?} is not a count"))?,
        };
        Ok(Restore {
            network,
            first_seen,
            last_seen,
            hits,
            identity: meta.identity,
            until,
        })
    }
}

/// [`timed_for`] with [`COMMAND_TIMEOUT`].
async fn timed<T>(
    what: &'static str,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    timed_for(what, COMMAND_TIMEOUT, f).await
}

/// The task that talks to Redis for `gate` through `handle`, until `stop` resolves.
pub async fn run(gate: Gate, handle: Arc<Handle>, stop: impl Future<Output = ()>) {
    let Some(mut ops) = handle.rx.lock().ok().and_then(|mut rx| rx.take()) else {
        return;
    };
    let Some(store) = gate.active().policy.redis.clone() else {
        return;
    };
    let keys = Keys {
        channel: format!("{}:changes", store.key_prefix),
        prefix: store.key_prefix.clone(),
    };
    let id = format!("{}-{}", std::process::id(), crate::ledger::now_millis());
    let mut worker = Worker {
        gate: gate.clone(),
        handle: handle.clone(),
        resync_every: store.resync_every,
        keys,
        id,
        scripts: Scripts::new(),
        pending_revokes: Vec::new(),
        flushed: HashMap::new(),
        epoch: None,
        skipped: HashMap::new(),
        read: HashSet::new(),
    };
    tokio::pin!(stop);
    let client = match redis::Client::open(store.url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            gate.health().report(
                "redis",
                Some(format!("cannot use {}: {e}", handle.shown_url)),
            );
            return;
        }
    };
    let mut backoff = FIRST_RETRY;
    loop {
        match worker.session(&client, &mut ops, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                // A session that had connected starts the next round of retries afresh.
                if handle.up.swap(false, Ordering::Relaxed) {
                    backoff = FIRST_RETRY;
                }
                gate.health().report(
                    "redis",
                    Some(format!(
                        "{} unreachable ({e}); deciding from the last copy, new grants refused",
                        handle.shown_url
                    )),
                );
                gate.metrics().write("redis", "error");
            }
        }
        // Until Redis answers again: refuse grants at once, keep revocations, expire locally.
        let retry = tokio::time::sleep(backoff);
        tokio::pin!(retry);
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = &mut retry => break,
                op = ops.recv() => match op {
                    Some(op) => worker.refuse(op),
                    None => return,
                },
                _ = tick.tick() => {
                    gate.expire_due();
                }
                _ = &mut stop => return,
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

struct Worker {
    gate: Gate,
    handle: Arc<Handle>,
    /// `redis.resync_every`.
    resync_every: Duration,
    keys: Keys,
    id: String,
    scripts: Scripts,
    /// Revocations Redis does not have yet.
    pending_revokes: Vec<(IpNet, Option<String>)>,
    /// Per entry, the last seen and hit count last sent to (or read from) Redis: either moving
    /// past it means requests seen here since.
    flushed: HashMap<(String, IpNet), (Millis, u64)>,
    /// The store's epoch when this replica last read it: a different or missing one means Redis
    /// lost its data.
    epoch: Option<String>,
    /// Entries of the last read that were not taken, with why (each is logged once).
    skipped: HashMap<(String, String), String>,
    /// Entries this replica has read from the store (its last full read, and its own grants
    /// since). One of them that its copy no longer holds was removed here, and logged and
    /// notified then (a reload's trim, an expiry while Redis was unreachable): when Redis removes
    /// it too, it is dropped quietly instead of reported twice.
    read: HashSet<(String, IpNet)>,
}

impl Worker {
    /// Connect, catch up, then serve operations and change messages until an error (returned)
    /// or `stop` (Ok).
    async fn session(
        &mut self,
        client: &redis::Client,
        ops: &mut mpsc::Receiver<Op>,
        stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(), StoreError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let mut con = timed(
            "connect",
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await?;
        let mut pubsub = timed("connect (pub/sub)", client.get_async_pubsub()).await?;
        timed("subscribe", pubsub.subscribe(&self.keys.channel)).await?;
        let mut messages = pubsub.into_on_message();

        // Catch up: what was revoked while away, the copy if Redis lost its data, what expired,
        // then read everything.
        self.send_revokes(&mut con).await?;
        self.check_epoch(&mut con).await?;
        self.expire(&mut con).await?;
        self.resync(&mut con).await?;
        let (gate, handle) = (self.gate.clone(), self.handle.clone());
        if !handle.up.swap(true, Ordering::Relaxed) {
            info!(store = %handle.shown_url, "shared store reachable; ledger synced");
        }
        handle.synced.send_replace(true);
        gate.health().report("redis", None);

        let mut tick = tokio::time::interval(TICK);
        let mut last_resync = Instant::now();
        loop {
            tokio::select! {
                op = ops.recv() => match op {
                    Some(op) => self.execute(&mut con, op).await?,
                    None => return Ok(()),
                },
                msg = messages.next() => {
                    if msg.is_none() {
                        return Err(StoreError::SubscriptionClosed);
                    }
                    // Several replicas may have changed things at once: one read for all. This
                    // replica's own changes are read back too: its copy has their results
                    // already, but a read is cheap and leaves nothing to reason about.
                    while let Some(Some(_)) = messages.next().now_or_never() {}
                    self.resync(&mut con).await?;
                    last_resync = Instant::now();
                }
                _ = tick.tick() => {
                    self.flush_touches(&mut con).await?;
                    self.expire(&mut con).await?;
                    if last_resync.elapsed() >= self.resync_every {
                        self.resync(&mut con).await?;
                        last_resync = Instant::now();
                    }
                }
                _ = &mut *stop => {
                    let _ = self.flush_touches(&mut con).await;
                    return Ok(());
                }
            }
        }
    }

    /// Answer an operation while Redis is unreachable. A trim needs no keeping: reconnecting
    /// runs expiry, which evicts down to the current limits.
    fn refuse(&mut self, op: Op) {
        match op {
            Op::Grant { reply, .. } => {
                let _ = reply.send(Err(StoreError::Unreachable));
            }
            Op::Revoke { network, source } => self.pending_revokes.push((network, source)),
            Op::Trim => {}
            Op::CatchUp(reply) => {
                let _ = reply.send(Err(StoreError::Unreachable));
            }
        }
    }

    async fn execute(&mut self, con: &mut MultiplexedConnection, op: Op) -> Result<(), StoreError> {
        match op {
            Op::Grant {
                source,
                network,
                identity,
                until,
                queued,
                reply,
            } => {
                let result = if queued.elapsed() > STALE_GRANT {
                    Err(StoreError::Stale)
                } else {
                    self.grant(con, &source, network, identity, until).await
                };
                let _ = reply.send(result.clone());
                // Redis failing ends the session (and starts the retries); a refusal does not.
                if let Err(
                    e @ (StoreError::Redis { .. }
                    | StoreError::Timeout { .. }
                    | StoreError::Unexpected { .. }),
                ) = result
                {
                    return Err(e);
                }
            }
            Op::Revoke { network, source } => {
                self.pending_revokes.push((network, source));
                self.send_revokes(con).await?;
            }
            Op::Trim => {
                self.expire(con).await?;
                self.resync(con).await?;
            }
            Op::CatchUp(reply) => {
                let mut done = self.flush_touches(con).await;
                if done.is_ok() {
                    done = self.expire(con).await;
                }
                if done.is_ok() {
                    done = self.resync(con).await;
                }
                let _ = reply.send(done.clone());
                done?;
            }
        }
        Ok(())
    }

    /// Make sure the store has an epoch; if it is not the one this replica saw before, Redis
    /// lost its data: put this replica's copy back (acknowledged grants are not forgotten).
    async fn check_epoch(&mut self, con: &mut MultiplexedConnection) -> Result<(), StoreError> {
        let fresh = format!("{}-{}", self.id, crate::ledger::now_millis());
        let (set, current): (bool, String) = timed(
            "epoch",
            redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(self.keys.epoch())
                .arg(&fresh)
                .arg("NX")
                .cmd("GET")
                .arg(self.keys.epoch())
                .query_async(con),
        )
        .await?;
        let lost = match &self.epoch {
            Some(seen) => *seen != current,
            None => set,
        };
        self.epoch = Some(current);
        if !lost {
            return Ok(());
        }
        let active = self.gate.active();
        let mut by_source: HashMap<String, Vec<(String, Restore)>> = HashMap::new();
        for (source, e) in self.gate.entries_restore() {
            by_source
                .entry(source.clone())
                .or_default()
                .push((source, e));
        }
        let mut total = 0;
        for (source, entries) in by_source {
            let Some(policy_source) = active.policy.sources.get(&source) else {
                continue;
            };
            let mut invocation = self.scripts.reseed.key(&self.keys.of(&source));
            invocation
                .arg(&self.keys.channel)
                .arg(&self.id)
                .arg(policy_source.limits.max_ips);
            for (_, e) in &entries {
                let meta = Meta {
                    first_seen: e.first_seen.to_string(),
                    identity: e.identity.clone(),
                    until: e.until.map(|u| u.to_string()),
                };
                invocation
                    .arg(e.network.to_string())
                    .arg(e.last_seen)
                    .arg(e.hits)
                    .arg(serde_json::to_string(&meta).unwrap_or_default());
            }
            let _: Vec<String> = timed("re-seed", invocation.invoke_async(con)).await?;
            total += entries.len();
        }
        if total > 0 {
            warn!(
                entries = total,
                "the shared store came back without its data: put this replica's copy back"
            );
        }
        Ok(())
    }

    /// Run the grant script and apply its answer to the local copy; the change counter.
    async fn grant(
        &mut self,
        con: &mut MultiplexedConnection,
        source: &str,
        network: IpNet,
        identity: Option<String>,
        until: Until,
    ) -> GrantReply {
        let active = self.gate.active();
        let Some(policy_source) = active.policy.sources.get(source) else {
            return Err(StoreError::UnknownSource(source.to_string()));
        };
        let until_arg = match until {
            Until::Keep => "keep".to_string(),
            Until::Set(None) => "none".to_string(),
            // A fixed end counts from now on the server's clock, not on this replica's.
            Until::Set(Some(ms)) => format!("+{}", ms.saturating_sub(self.gate.now())),
        };
        let out: Vec<String> = timed(
            "grant",
            self.scripts
                .grant
                .key(&self.keys.of(source))
                .arg(network.to_string())
                .arg(policy_source.limits.max_ips)
                .arg(identity.unwrap_or_default())
                .arg(until_arg)
                .arg(&self.keys.channel)
                .arg(&self.id)
                .arg(MAX_AHEAD.as_millis() as u64)
                .invoke_async(con),
        )
        .await?;
        let parsed = match out.as_slice() {
            [status, meta, seen_at, ..] => grant_status(status)
                .zip(seen_at.parse::<Millis>().ok())
                .map(|(status, seen_at)| (status, Meta::parse(meta).unwrap_or_default(), seen_at)),
            _ => None,
        };
        let Some((status, meta, seen_at)) = parsed else {
            return Err(StoreError::Unexpected {
                what: "grant",
                answer: format!("{out:?}"),
            });
        };
        self.gate.metrics().write("redis", "ok");
        let entry = Restore {
            network,
            first_seen: meta.first_seen.parse().unwrap_or(seen_at),
            last_seen: seen_at,
            hits: 1,
            identity: meta.identity,
            until: meta.until.and_then(|u| u.parse().ok()),
        };
        let evicted = self.not_removed_here(removals(source, &out[3..]));
        let key = (source.to_string(), network);
        // The grant's own time is what Redis says, not a refresh to send back.
        let sent = self.flushed.entry(key.clone()).or_insert((0, 1));
        sent.0 = sent.0.max(seen_at);
        self.read.insert(key);
        self.gate
            .shared_granted(source, entry, status, evicted)
            .ok_or_else(|| StoreError::UnknownSource(source.to_string()))
    }

    async fn send_revokes(&mut self, con: &mut MultiplexedConnection) -> Result<(), StoreError> {
        while let Some((network, only)) = self.pending_revokes.first().cloned() {
            let sources: Vec<String> = match &only {
                Some(s) => vec![s.clone()],
                None => self.gate.active().policy.sources.keys().cloned().collect(),
            };
            for source in sources {
                let out: Vec<String> = timed(
                    "revoke",
                    self.scripts
                        .revoke
                        .key(&self.keys.of(&source))
                        .arg(&self.keys.channel)
                        .arg(&self.id)
                        .arg(network.to_string())
                        .invoke_async(con),
                )
                .await?;
                // The copy here may have learnt of the entry only after the revocation was
                // asked for (it was granted on another replica a moment before): drop it now.
                let removed = removals(&source, &out);
                if !removed.is_empty() {
                    debug!(%source, %network, "revocation stored");
                    self.gate.shared_forget(removed);
                }
            }
            self.pending_revokes.remove(0);
        }
        Ok(())
    }

    /// Remove what is due in Redis (any replica may do it; the script is atomic, so each entry
    /// is removed, logged and notified once, by the replica that removed it).
    async fn expire(&mut self, con: &mut MultiplexedConnection) -> Result<(), StoreError> {
        let active = self.gate.active();
        let mut removed = Vec::new();
        for (name, source) in &active.policy.sources {
            let ms = |d: Option<Duration>| d.map_or(String::new(), |d| d.as_millis().to_string());
            let out: Vec<String> = timed(
                "expire",
                self.scripts
                    .expire
                    .key(&self.keys.of(name))
                    .arg(&self.keys.channel)
                    .arg(&self.id)
                    .arg(ms(source.limits.idle_ttl))
                    .arg(ms(source.limits.max_age))
                    .arg(source.limits.max_ips)
                    .invoke_async(con),
            )
            .await?;
            removed.extend(removals(name, &out));
        }
        let removed = self.not_removed_here(removed);
        if !removed.is_empty() {
            self.gate.shared_removed(removed);
        }
        Ok(())
    }

    /// Of removals Redis reports, those to log, count and notify here: not those this replica
    /// already removed itself (see [`Worker::read`]), which are forgotten quietly.
    fn not_removed_here(&mut self, removed: Vec<Removed>) -> Vec<Removed> {
        if removed.is_empty() {
            return removed;
        }
        let held: HashSet<(String, IpNet)> = self
            .gate
            .entries_restore()
            .into_iter()
            .map(|(source, e)| (source, e.network))
            .collect();
        let (done, removed): (Vec<Removed>, Vec<Removed>) = removed.into_iter().partition(|r| {
            let key = (r.source.clone(), r.network);
            self.read.contains(&key) && !held.contains(&key)
        });
        if !done.is_empty() {
            debug!(
                entries = done.len(),
                "removed here already, and in Redis now"
            );
            self.gate.shared_forget(done);
        }
        for r in &removed {
            self.read.remove(&(r.source.clone(), r.network));
        }
        removed
    }

    /// Send the entries seen here since the last flush, with their new hits; Redis counts them
    /// as seen now (its clock, not this replica's: see the script).
    async fn flush_touches(&mut self, con: &mut MultiplexedConnection) -> Result<(), StoreError> {
        let mut by_source: HashMap<String, Vec<(IpNet, u64)>> = HashMap::new();
        let mut seen_now = HashMap::new();
        for (source, entry) in self.gate.entries_restore() {
            let (last_seen, hits) = (entry.last_seen, entry.hits);
            let key = (source.clone(), entry.network);
            let (sent_seen, sent_hits) = self.flushed.get(&key).copied().unwrap_or((0, hits));
            if last_seen > sent_seen || hits > sent_hits {
                by_source
                    .entry(source)
                    .or_default()
                    .push((entry.network, hits.saturating_sub(sent_hits)));
            }
            seen_now.insert(key, (last_seen, hits));
        }
        for (source, touched) in by_source {
            let mut invocation = self.scripts.touch.key(&self.keys.of(&source));
            for (network, delta) in &touched {
                invocation.arg(network.to_string()).arg(*delta);
            }
            let _: i64 = timed("refresh", invocation.invoke_async(con)).await?;
        }
        self.flushed = seen_now;
        Ok(())
    }

    /// Read every source of the policy in one transaction and make the local copy equal to it.
    async fn resync(&mut self, con: &mut MultiplexedConnection) -> Result<(), StoreError> {
        let active = self.gate.active();
        let names: Vec<String> = active.policy.sources.keys().cloned().collect();
        let mut pipe = redis::pipe();
        pipe.atomic().get(self.keys.epoch());
        for name in &names {
            let [seen, meta, hits, _] = self.keys.of(name);
            pipe.zrange_withscores(seen, 0, -1)
                .hgetall(meta)
                .hgetall(hits);
        }
        let mut values: Vec<redis::Value> = timed("resync", pipe.query_async(con)).await?;
        // Redis emptied without dropping the connection (FLUSHALL, a failover to an empty
        // replica): reconnect, which puts this replica's copy back, instead of adopting nothing.
        let epoch: Option<String> = values
            .first()
            .and_then(|v| redis::from_redis_value_ref(v).ok());
        if epoch != self.epoch {
            return Err(StoreError::Lost);
        }
        type Read = (
            Vec<(String, f64)>,
            HashMap<String, String>,
            HashMap<String, String>,
        );
        let mut read: Vec<Read> = Vec::new();
        let mut rest = values.drain(1..);
        while let (Some(seen), Some(meta), Some(hits)) = (rest.next(), rest.next(), rest.next()) {
            let parse = |e: redis::ParsingError| StoreError::Unexpected {
                what: "resync",
                answer: e.to_string(),
            };
            read.push((
                redis::from_redis_value(seen).map_err(parse)?,
                redis::from_redis_value(meta).map_err(parse)?,
                redis::from_redis_value(hits).map_err(parse)?,
            ));
        }
        let now = self.gate.now();
        let mut skipped = HashMap::new();
        let mut books = Vec::new();
        for (name, (seen, meta, hits)) in names.into_iter().zip(read) {
            let mut entries = Vec::new();
            for (net, last_seen) in seen {
                let found = Found {
                    network: &net,
                    last_seen,
                    meta: meta.get(&net).map(String::as_str),
                    hits: hits.get(&net).map(String::as_str),
                };
                match found.check(&active, now) {
                    Ok(entry) => entries.push(entry),
                    Err(why) => {
                        skipped.insert((name.clone(), net), why);
                    }
                }
            }
            books.push((name, entries));
        }
        // Each bad entry is logged when first seen (or when its fault changes), not every read.
        for ((source, entry), why) in &skipped {
            if self.skipped.get(&(source.clone(), entry.clone())) != Some(why) {
                warn!(%source, %entry, %why, "ignoring an entry in Redis that this replica could not have granted");
            }
        }
        self.skipped = skipped;
        // What Redis says now is the new baseline for refreshes.
        for (name, entries) in &books {
            for e in entries {
                let key = (name.clone(), e.network);
                let local = self.flushed.get(&key).copied().unwrap_or((0, 0));
                self.flushed
                    .insert(key, (local.0.max(e.last_seen), local.1.max(e.hits)));
            }
        }
        self.read = books
            .iter()
            .flat_map(|(name, entries)| entries.iter().map(|e| (name.clone(), e.network)))
            .collect();
        self.gate.shared_sync(books);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_800_000_000_000;

    fn active() -> Active {
        let policy = crate::policy::from_yaml_str(
            "trusted_proxies: [127.0.0.1/32]\nalways_allow: [192.0.2.0/24]\nipv6_prefix: 56\n\
             services: { immich: {} }\n\
             sources:\n  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\" }\n",
            "test",
        )
        .unwrap();
        Active::new(policy)
    }

    fn check(
        network: &str,
        last_seen: Millis,
        meta: Option<&str>,
        hits: Option<&str>,
    ) -> Result<Restore, String> {
        let found = Found {
            network,
            last_seen: last_seen as f64,
            meta,
            hits,
        };
        found.check(&active(), NOW)
    }

    const META: &str =
        r#"{"first_seen":"1700000000000","identity":"alice","until":"1900000000000"}"#;

    #[test]
    fn an_entry_as_a_grant_writes_it_is_taken_whole() {
        let e = check("203.0.113.7/32", NOW - 5, Some(META), Some("12")).unwrap();
        assert_eq!(e.network.to_string(), "203.0.113.7/32");
        assert_eq!(
            (e.first_seen, e.last_seen, e.hits),
            (1_700_000_000_000, NOW - 5, 12)
        );
        assert_eq!(e.identity.as_deref(), Some("alice"));
        assert_eq!(e.until, Some(1_900_000_000_000));
        // Missing hits count as none; a little clock skew is fine.
        let e = check("2001:db8:1:2::/64", NOW + 60_000, Some(META), None).unwrap();
        assert_eq!(e.hits, 0);
        // The policy's ipv6_prefix (/56) is what mirrored clients get: it may be read back.
        assert!(check("2001:db8:1:200::/56", NOW, Some(META), None).is_ok());
    }

    #[test]
    fn entries_no_grant_could_have_made_are_refused_with_why() {
        let far = NOW + 2 * MAX_AHEAD.as_millis() as Millis;
        for (network, last_seen, meta, hits, why) in [
            ("1.0.0.0/8", NOW, Some(META), None, "wider"),
            ("2001:db8::/48", NOW, Some(META), None, "wider"),
            ("0.0.0.0/0", NOW, Some(META), None, "wider"),
            (
                "203.0.113.7/24",
                NOW,
                Some(META),
                None,
                "not written as a granted network",
            ),
            ("203.0.113.7", NOW, Some(META), None, "not a network"),
            ("127.0.0.1/32", NOW, Some(META), None, "127.0.0.1"),
            ("192.0.2.0/28", NOW, Some(META), None, "192.0.2.0/24"),
            ("203.0.113.7/32", far, Some(META), None, "last seen"),
            ("203.0.113.7/32", NOW, None, None, "meta"),
            ("203.0.113.7/32", NOW, Some("not json"), None, "meta"),
            (
                "203.0.113.7/32",
                NOW,
                Some(r#"{"first_seen":"soon"}"#),
                None,
                "first seen",
            ),
            (
                "203.0.113.7/32",
                NOW,
                Some(&format!(r#"{{"first_seen":"{far}"}}"#)),
                None,
                "first seen",
            ),
            (
                "203.0.113.7/32",
                NOW,
                Some(r#"{"first_seen":"1","until":"never"}"#),
                None,
                "until",
            ),
            ("203.0.113.7/32", NOW, Some(META), Some("lots"), "hits"),
        ] {
            let got = check(network, last_seen, meta, hits);
            let err = got.expect_err(network);
            assert!(err.contains(why), "{network}: {err}");
        }
    }

    #[test]
    fn script_removals_are_read_in_threes() {
        let flat: Vec<String> = [
            "203.0.113.1/32",
            r#"{"first_seen":"1","identity":"alice"}"#,
            "idle",
            "not a network",
            "",
            "evicted",
            "2001:db8::/64",
            "",
            "revoked",
        ]
        .map(String::from)
        .to_vec();
        let got = removals("ha", &flat);
        let removed = |network: &str, identity: Option<&str>, why| Removed {
            source: "ha".into(),
            network: network.parse().unwrap(),
            identity: identity.map(str::to_string),
            why,
        };
        assert_eq!(
            got,
            vec![
                removed("203.0.113.1/32", Some("alice"), Removal::Idle),
                removed("2001:db8::/64", None, Removal::Revoked),
            ]
        );
    }
}
