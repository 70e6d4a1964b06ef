//! When Traefik applies what the sinks wrote, so a share link's 200 can wait exactly until the
//! viewer's next request passes, and no longer.
//!
//! # The model
//!
//! Traefik's providers (file, HTTP, Redis KV) send a message for every change notification they
//! see, and Traefik's provider aggregator throttles each provider on its own: it passes a message
//! on, then sleeps `providersThrottleDuration` (2 s by default); messages arriving meanwhile
//! replace one another in a one-slot ring, and the last one is passed on when the sleep ends
//! (`maybeThrottledProvide` in `pkg/provider/aggregator/aggregator.go`, Traefik 3.7). So a change
//! that finds the provider idle is applied at once, and one that finds it sleeping is applied
//! when the sleep ends, together with everything else that came in between. [`Throttle`] replays
//! exactly this for the notifications gatekeeper causes:
//!
//! - file provider: one notification per write, the rename into the watched directory (the temp
//!   file lives in a subdirectory Traefik does not watch, see [`crate::atomic_file`]); an
//!   in-place rewrite (single-file mount) is two, the first of which may read a partial file;
//! - Redis KV provider: one per key set or deleted, each read after the atomic script;
//! - HTTP provider: one per fetch whose body differs from the previous fetch (Traefik hashes the
//!   body and ignores an unchanged one), seen by gatekeeper itself per Traefik address.
//!
//! What it cannot see: other writers of the same provider (another file in the watched
//! directory, another gatekeeper replica writing the same KV), which may keep Traefik's throttle
//! busy for longer. With `traefik.api` set, gatekeeper asks Traefik instead of predicting.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Traefik's throttle for one provider, replayed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Throttle {
    /// When the aggregator wakes from its sleep after the last message it passed on.
    free_at: Option<Instant>,
    /// A message waits in the ring for `free_at`.
    pending: bool,
}

/// How long the messages of one burst of notifications may take to reach Traefik's throttle
/// after the first: Traefik's provider reads the whole configuration for each notification (the
/// Redis KV provider lists every key twice), so the last message of a burst of keyspace events
/// comes tens of milliseconds after the first, more on a busy host. A throttle that wakes in
/// between passes the first on and takes the last as a new change, which keeps it busy for
/// another period; the model assumes the worst within this window.
pub(crate) const BURST_SPREAD: Duration = Duration::from_millis(250);

impl Throttle {
    /// A burst of `count` notifications starting at `at`: the first at `at`, the others up to
    /// [`BURST_SPREAD`] later. The written content is complete in every message from index
    /// `complete_from` on (0 for an atomic write). Returns when Traefik passes on the first
    /// complete message, that is, starts applying the change.
    pub(crate) fn notify(
        &mut self,
        at: Instant,
        count: usize,
        complete_from: usize,
        period: Duration,
    ) -> Instant {
        let mut applied = None;
        for i in 0..count.max(1) {
            // Without a throttle there is nothing for a late message to straddle.
            let at = if i == 0 || period.is_zero() {
                at
            } else {
                at + BURST_SPREAD.min(period)
            };
            self.advance(at, period);
            let sent = match self.free_at {
                Some(free) if self.pending || free > at => {
                    self.pending = true;
                    free
                }
                _ => {
                    self.free_at = Some(at + period);
                    at
                }
            };
            if i >= complete_from && applied.is_none() {
                applied = Some(sent);
            }
        }
        applied.unwrap_or(at)
    }

    /// Let time pass up to `now`: a waiting message is passed on when the sleep ends, which
    /// starts another sleep.
    fn advance(&mut self, now: Instant, period: Duration) {
        if let Some(free) = self.free_at
            && self.pending
            && free <= now
        {
            self.pending = false;
            self.free_at = Some(free + period);
        }
    }
}

/// How many write records each provider keeps for share answers that are still waiting.
const KEEP: usize = 256;

/// One provider as gatekeeper feeds it: the throttle, and when each change counter reached it.
#[derive(Debug)]
pub(crate) struct Provider {
    state: Mutex<ProviderState>,
    /// The highest change counter whose content this provider was given (written, or already
    /// there).
    covered: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct ProviderState {
    throttle: Throttle,
    /// (change counter, when Traefik starts applying it), oldest first.
    writes: VecDeque<(u64, Instant)>,
}

impl ProviderState {
    /// Remember when Traefik starts applying change `generation`, keeping the last [`KEEP`].
    fn record(&mut self, generation: u64, applied: Instant) {
        self.writes.push_back((generation, applied));
        if self.writes.len() > KEEP {
            self.writes.pop_front();
        }
    }
}

impl Default for Provider {
    fn default() -> Self {
        Provider {
            state: Mutex::default(),
            covered: watch::Sender::new(0),
        }
    }
}

impl Provider {
    fn state(&self) -> std::sync::MutexGuard<'_, ProviderState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Content up to change `generation` reached Traefik as a burst of notifications (see
    /// [`Throttle::notify`]).
    pub(crate) fn wrote(
        &self,
        generation: u64,
        at: Instant,
        count: usize,
        complete_from: usize,
        period: Duration,
    ) {
        let mut state = self.state();
        let applied = state.throttle.notify(at, count, complete_from, period);
        state.record(generation, applied);
        drop(state);
        self.cover(generation);
    }

    /// Several bursts that together carry change `generation` (a KV sync writes one middleware
    /// per script); `bursts` are (time, notifications), all complete. The change is applied with
    /// the last burst.
    pub(crate) fn wrote_bursts(
        &self,
        generation: u64,
        bursts: &[(Instant, usize)],
        period: Duration,
    ) {
        let mut state = self.state();
        let mut applied = None;
        for &(at, count) in bursts {
            applied = Some(state.throttle.notify(at, count, 0, period));
        }
        if let Some(applied) = applied {
            state.record(generation, applied);
        }
        drop(state);
        self.cover(generation);
    }

    /// The provider already held what change `generation` shows: nothing was written.
    pub(crate) fn unchanged(&self, generation: u64) {
        self.cover(generation);
    }

    fn cover(&self, generation: u64) {
        self.covered.send_if_modified(|g| {
            let newer = generation > *g;
            if newer {
                *g = generation;
            }
            newer
        });
    }

    /// Wait until content up to `generation` was given to Traefik, then return when Traefik
    /// starts applying it: the first write that carried it, or, when none was needed, the last
    /// write before (which may still be waiting in the throttle).
    pub(crate) async fn applied(&self, generation: u64) -> Option<Instant> {
        let mut rx = self.covered.subscribe();
        // The sender lives in `self`.
        let _ = rx.wait_for(|g| *g >= generation).await;
        let state = self.state();
        state
            .writes
            .iter()
            .find(|(g, _)| *g >= generation)
            .or_else(|| state.writes.back())
            .map(|(_, at)| *at)
    }
}

/// An address that stopped fetching `/traefik/dynamic.json` is forgotten after this long.
const FORGET_READER_AFTER: Duration = Duration::from_secs(600);

/// The Traefik instances reading the HTTP provider endpoint, by address.
#[derive(Debug, Default)]
pub(crate) struct HttpReaders {
    readers: Mutex<HashMap<IpAddr, Reader>>,
}

#[derive(Debug)]
struct Reader {
    /// Hash of the last body it fetched (Traefik ignores a fetch with the same body).
    body: u64,
    last_fetch: Instant,
    /// The time between its last two fetches: Traefik's `pollInterval`.
    interval: Option<Duration>,
    provider: std::sync::Arc<Provider>,
}

impl Reader {
    /// A reader polls: it fetched at least twice, and not more than three of its intervals
    /// ago. A one-off fetch (an operator's curl) is never waited for, and a Traefik that
    /// stopped polling no longer is after three missed polls.
    fn polling(&self, now: Instant) -> bool {
        self.interval.is_some_and(|i| {
            now.saturating_duration_since(self.last_fetch) < 3 * i + Duration::from_secs(1)
        })
    }
}

impl HttpReaders {
    /// `peer` fetched a body (hash `body`) showing changes up to `generation` at `at`.
    pub(crate) fn fetched(
        &self,
        peer: IpAddr,
        body: u64,
        generation: u64,
        at: Instant,
        period: Duration,
    ) {
        let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        readers.retain(|_, r| at.saturating_duration_since(r.last_fetch) < FORGET_READER_AFTER);
        let reader = readers.entry(peer).or_insert_with(|| Reader {
            body: !body,
            last_fetch: at,
            interval: None,
            provider: Default::default(),
        });
        if at > reader.last_fetch {
            reader.interval = Some(at - reader.last_fetch);
        }
        reader.last_fetch = at;
        if reader.body == body {
            reader.provider.unchanged(generation);
        } else {
            reader.body = body;
            reader.provider.wrote(generation, at, 1, 0, period);
        }
    }

    /// The Traefik instances polling the endpoint now, each with its provider record.
    pub(crate) fn active(&self, now: Instant) -> Vec<(IpAddr, std::sync::Arc<Provider>)> {
        let readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        readers
            .iter()
            .filter(|(_, r)| r.polling(now))
            .map(|(ip, r)| (*ip, r.provider.clone()))
            .collect()
    }
}

/// Everything gatekeeper knows about Traefik's providers; one per daemon.
#[derive(Debug, Default)]
pub(crate) struct Propagation {
    /// The file provider reading `traefik.file`.
    pub(crate) file: Provider,
    /// The Redis KV provider reading `traefik.redis`.
    pub(crate) kv: Provider,
    /// The HTTP provider instances reading `/traefik/dynamic.json`.
    pub(crate) http: HttpReaders,
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn an_idle_provider_applies_at_once_and_the_next_change_waits_for_the_throttle() {
        let t0 = Instant::now();
        let mut th = Throttle::default();
        assert_eq!(th.notify(t0, 1, 0, T), t0);
        // Within the sleep: applied when it ends.
        assert_eq!(th.notify(t0 + ms(300), 1, 0, T), t0 + T);
        // Coalesced with the one before.
        assert_eq!(th.notify(t0 + ms(900), 1, 0, T), t0 + T);
        // Passing the waiting message on started another sleep, to t0 + 2T.
        assert_eq!(th.notify(t0 + ms(2500), 1, 0, T), t0 + 2 * T);
        // Long after: idle again.
        assert_eq!(th.notify(t0 + ms(9000), 1, 0, T), t0 + ms(9000));
    }

    #[test]
    fn a_lone_change_leaves_the_provider_idle_after_one_period() {
        let t0 = Instant::now();
        let mut th = Throttle::default();
        th.notify(t0, 1, 0, T);
        assert_eq!(th.notify(t0 + ms(2100), 1, 0, T), t0 + ms(2100));
    }

    #[test]
    fn a_burst_keeps_the_provider_busy_for_two_periods() {
        // A KV write of three keys: the first notification is applied at once, the other two wait
        // in the ring and are passed on (unchanged) after one period, starting a second sleep.
        let t0 = Instant::now();
        let mut th = Throttle::default();
        assert_eq!(th.notify(t0, 3, 0, T), t0);
        assert_eq!(th.notify(t0 + ms(2500), 1, 0, T), t0 + 2 * T);
    }

    #[test]
    fn a_burst_that_straddles_the_end_of_a_sleep_starts_another_one() {
        // Seen with Traefik 3.7's Redis provider: a change pending when the throttle wakes is
        // passed on, and the rest of the next write's keyspace events, read after the wake, are
        // a new change that keeps the provider busy for one more period.
        let t0 = Instant::now();
        let mut th = Throttle::default();
        // Busy until t0 + T (a lone change at t0).
        assert_eq!(th.notify(t0, 1, 0, T), t0);
        // Three keys written 20 ms before the throttle wakes: applied when it wakes...
        assert_eq!(th.notify(t0 + T - ms(20), 3, 0, T), t0 + T);
        // ...and the last notifications, read after the wake, keep it busy until t0 + 3T.
        assert_eq!(th.notify(t0 + ms(4700), 1, 0, T), t0 + 3 * T);
        // A burst well inside a sleep coalesces whole: no extra period.
        let mut th = Throttle::default();
        th.notify(t0, 1, 0, T);
        assert_eq!(th.notify(t0 + ms(500), 3, 0, T), t0 + T);
        assert_eq!(th.notify(t0 + ms(4100), 1, 0, T), t0 + ms(4100));
    }

    #[test]
    fn an_in_place_rewrite_is_complete_only_in_its_second_message() {
        let t0 = Instant::now();
        let mut th = Throttle::default();
        // The first message may read a truncated file; the complete one waits a period.
        assert_eq!(th.notify(t0, 2, 1, T), t0 + T);
    }

    #[test]
    fn throttle_zero_applies_everything_at_once() {
        let t0 = Instant::now();
        let mut th = Throttle::default();
        for i in 0..5 {
            assert_eq!(th.notify(t0 + ms(i), 3, 0, Duration::ZERO), t0 + ms(i));
        }
    }

    #[tokio::test]
    async fn a_provider_answers_with_the_write_that_carried_the_change() {
        let p = Provider::default();
        let t0 = Instant::now();
        p.wrote(3, t0, 1, 0, T);
        p.wrote(5, t0 + ms(100), 1, 0, T);
        assert_eq!(p.applied(2).await, Some(t0));
        assert_eq!(p.applied(4).await, Some(t0 + T));
        // Nothing to write for change 6: the last write decides.
        p.unchanged(6);
        assert_eq!(p.applied(6).await, Some(t0 + T));
        // A change not given to Traefik yet is waited for.
        let waiting = p.applied(7);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(ms(20), &mut waiting).await.is_err(),
            "answered before change 7 was written"
        );
        p.wrote(7, t0 + ms(3000), 1, 0, T);
        assert_eq!(waiting.await, Some(t0 + ms(4000)));
    }

    #[tokio::test]
    async fn kv_bursts_are_applied_with_the_last_script() {
        let p = Provider::default();
        let t0 = Instant::now();
        // Two middlewares, one script each: the second script's keys reach Traefik a period later.
        p.wrote_bursts(1, &[(t0, 1), (t0 + ms(5), 2)], T);
        assert_eq!(p.applied(1).await, Some(t0 + T));
    }

    #[test]
    fn http_readers_count_changed_bodies_only_and_are_forgotten() {
        let readers = HttpReaders::default();
        let t0 = Instant::now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let c: IpAddr = "127.0.0.3".parse().unwrap();
        // A single fetch is not a poller.
        readers.fetched(c, 10, 1, t0, T);
        readers.fetched(a, 10, 1, t0, T);
        readers.fetched(b, 10, 1, t0 + ms(500), T);
        // The same body a second later: Traefik ignores it, the throttle stays as it was.
        readers.fetched(a, 10, 1, t0 + ms(1000), T);
        readers.fetched(b, 10, 1, t0 + ms(1500), T);
        // A changed body 2.1 s after the first: a is idle again (nothing happened since).
        readers.fetched(a, 11, 2, t0 + ms(2100), T);
        let active = readers.active(t0 + ms(2200));
        assert_eq!(active.len(), 2);
        let provider_a = &active.iter().find(|(ip, _)| *ip == a).unwrap().1;
        let state = provider_a.state();
        assert_eq!(
            state.writes.iter().map(|w| w.1).collect::<Vec<_>>(),
            [t0, t0 + ms(2100)]
        );
        drop(state);
        // b polls every second too, a every 1.1 s; three missed polls and they are not waited for.
        assert_eq!(readers.active(t0 + ms(5000)).len(), 2);
        assert!(readers.active(t0 + ms(7000)).is_empty());
    }
}
