//! Notifications: grants, expiries, revocations, evictions and bans POSTed to a URL (JSON, or
//! ntfy's plain text). Fire-and-forget: events go into a bounded queue that one task drains, so
//! a slow or dead receiver never delays a grant or a decision; when the queue is full, events are
//! dropped and counted in the log. Bans come in floods (one per address of an attacker), so each
//! source notifies at most one per [`BAN_INTERVAL`] and summarises the rest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::ledger::Millis;
use crate::policy::{EventKind, Notify, NotifyFormat};

/// Events waiting to be sent; beyond this they are dropped.
pub(crate) const QUEUE: usize = 256;

/// At most one ban notification per source this often; the bans in between are sent as one
/// summary when it ends.
pub(crate) const BAN_INTERVAL: Duration = Duration::from_secs(60);

/// One notifiable event.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Event {
    /// What happened.
    #[serde(serialize_with = "kind_name")]
    pub(crate) event: EventKind,
    /// The source concerned.
    pub(crate) source: String,
    /// The network concerned (for a ban: the banned client's network).
    pub(crate) network: IpNet,
    /// The certificate CN, when known.
    pub(crate) identity: Option<String>,
    /// The services the source unlocks.
    pub(crate) services: Vec<String>,
    /// When, ms since the epoch.
    pub(crate) at: Millis,
}

fn kind_name<S: serde::Serializer>(k: &EventKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}

/// Bans of one source held back during a [`BAN_INTERVAL`], sent as one message: a `throttle`
/// event whose `network` is the last of them, with `more` saying how many there were.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    #[serde(flatten)]
    last: Event,
    more: u64,
}

/// What the sending task posts.
#[derive(Debug)]
enum Message {
    Event(Event),
    Summary(Summary),
}

/// The ban notifications each source may still send, and those held back.
#[derive(Debug, Default)]
struct BanLimiter {
    windows: Mutex<HashMap<String, BanWindow>>,
}

#[derive(Debug)]
struct BanWindow {
    /// When the window closes (its summary is due).
    until: Instant,
    /// Bans held back so far, and the last of them.
    held: u64,
    last: Option<Event>,
}

impl BanLimiter {
    /// May this ban be sent now? The first of a source in a window is; the others are held.
    fn pass(&self, ban: &Event, now: Instant) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        match windows.get_mut(&ban.source) {
            Some(w) => {
                w.held += 1;
                w.last = Some(ban.clone());
                false
            }
            None => {
                windows.insert(
                    ban.source.clone(),
                    BanWindow {
                        until: now + BAN_INTERVAL,
                        held: 0,
                        last: None,
                    },
                );
                true
            }
        }
    }

    /// When the next window closes.
    fn next_due(&self) -> Option<Instant> {
        let windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        windows.values().map(|w| w.until).min()
    }

    /// Close the windows due at `now`: a summary for each that held bans back (it counts as the
    /// source's message for a new window); the others end.
    fn due(&self, now: Instant) -> Vec<Summary> {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        windows.retain(|_, w| {
            if w.until > now {
                return true;
            }
            let Some(last) = w.last.take() else {
                return false;
            };
            out.push(Summary {
                last,
                more: std::mem::take(&mut w.held),
            });
            w.until = now + BAN_INTERVAL;
            true
        });
        out
    }
}

/// The sending side; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Notifier {
    tx: mpsc::Sender<Message>,
    on: Vec<EventKind>,
    bans: Arc<BanLimiter>,
}

impl Notifier {
    /// Start the sending task for `notify`, if a runtime is there to run it (the daemon); `None`
    /// in tools that run without one.
    pub(crate) fn start(notify: &Notify) -> Option<Notifier> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let client = crate::outbound::http_client();
        let bans = Arc::new(BanLimiter::default());
        runtime.spawn(deliver(notify.clone(), client, rx, bans.clone()));
        Some(Notifier {
            tx,
            on: notify.on.clone(),
            bans,
        })
    }

    /// Queue `event` if its kind is wanted; never waits.
    pub(crate) fn send(&self, event: Event) {
        if !self.on.contains(&event.event) {
            return;
        }
        if event.event == EventKind::Throttle && !self.bans.pass(&event, Instant::now()) {
            debug!(source = %event.source, network = %event.network, "ban notification held for the summary");
            return;
        }
        if self.tx.try_send(Message::Event(event)).is_err() {
            debug!("notification queue full or closed; event dropped");
        }
    }
}

async fn deliver(
    notify: Notify,
    client: reqwest::Client,
    mut rx: mpsc::Receiver<Message>,
    bans: Arc<BanLimiter>,
) {
    let url = notify.url.to_string();
    let shown = loggable_url(&url);
    let mut failing = false;
    loop {
        // Without a window open, wake once an interval anyway: cheap, and robust to a window
        // whose first ban was dropped from a full queue.
        let wake = bans
            .next_due()
            .unwrap_or_else(|| Instant::now() + BAN_INTERVAL);
        let messages = tokio::select! {
            message = rx.recv() => match message {
                Some(m) => vec![m],
                None => break,
            },
            () = tokio::time::sleep_until(wake) => {
                bans.due(Instant::now()).into_iter().map(Message::Summary).collect()
            }
        };
        for message in messages {
            let request = match (notify.format, &message) {
                (NotifyFormat::Json, Message::Event(e)) => client.post(&url).json(e),
                (NotifyFormat::Json, Message::Summary(s)) => client.post(&url).json(s),
                (NotifyFormat::Ntfy, _) => {
                    let (title, tags, text) = match &message {
                        Message::Event(e) => ntfy_text(e),
                        Message::Summary(s) => ntfy_summary(s),
                    };
                    client
                        .post(&url)
                        .header("Title", title)
                        .header("Tags", tags)
                        .body(text)
                }
            };
            match request.timeout(notify.timeout).send().await {
                Ok(resp) if resp.status().is_success() => failing = false,
                outcome => {
                    let why = match outcome {
                        Ok(resp) => format!("status {}", resp.status()),
                        Err(e) => e.without_url().to_string(),
                    };
                    // One warning per failing stretch, not one per event.
                    if !failing {
                        warn!(url = %shown, %why, "notification failed");
                    }
                    failing = true;
                }
            }
        }
    }
}

/// `url` fit for logs: no password and no query (ntfy and webhook services take their tokens
/// in either).
fn loggable_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_password(None);
            parsed.set_query(None);
            parsed.set_fragment(None);
            parsed.to_string()
        }
        Err(_) => {
            let shown = crate::policy::without_password(url);
            shown
                .split(['?', '#'])
                .next()
                .unwrap_or_default()
                .to_string()
        }
    }
}

/// Title, tags and body of an ntfy message.
fn ntfy_text(e: &Event) -> (String, &'static str, String) {
    let who = e
        .identity
        .as_deref()
        .map_or(String::new(), |i| format!(" ({i})"));
    let (verb, tags) = match e.event {
        EventKind::Grant => ("allowed", "white_check_mark"),
        EventKind::Expire => ("expired", "hourglass"),
        EventKind::Revoke => ("revoked", "no_entry"),
        EventKind::Evict => ("evicted", "arrows_counterclockwise"),
        EventKind::Throttle => ("banned", "rotating_light"),
    };
    let title = format!("gatekeeper: {} {verb}{who}", e.network);
    let text = if e.event == EventKind::Throttle {
        format!(
            "{}{who} failed too many share checks on {} and is banned for a while",
            e.network, e.source
        )
    } else {
        format!(
            "{}{who} {verb} through {} for {}",
            e.network,
            e.source,
            e.services.join(", ")
        )
    };
    (title, tags, text)
}

/// Title, tags and body of an ntfy message summarising held-back bans.
fn ntfy_summary(s: &Summary) -> (String, &'static str, String) {
    let clients = if s.more == 1 { "client" } else { "clients" };
    let title = format!("gatekeeper: {} more {clients} banned", s.more);
    let text = format!(
        "{} more {clients} failed too many share checks on {} within {} s; banned for a while \
         (the last: {})",
        s.more,
        s.last.source,
        BAN_INTERVAL.as_secs(),
        s.last.network
    );
    (title, "rotating_light", text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_ntfy_bodies_name_everything() {
        let e = Event {
            event: EventKind::Grant,
            source: "ha".into(),
            network: "203.0.113.5/32".parse().unwrap(),
            identity: Some("alice".into()),
            services: vec!["immich".into(), "nextcloud".into()],
            at: 1_700_000_000_000,
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["event"], "grant");
        assert_eq!(json["network"], "203.0.113.5/32");
        assert_eq!(json["identity"], "alice");
        assert_eq!(json["services"][1], "nextcloud");
        let (title, _, text) = ntfy_text(&e);
        assert_eq!(title, "gatekeeper: 203.0.113.5/32 allowed (alice)");
        assert_eq!(
            text,
            "203.0.113.5/32 (alice) allowed through ha for immich, nextcloud"
        );
    }

    fn ban(source: &str, network: &str) -> Event {
        Event {
            event: EventKind::Throttle,
            source: source.into(),
            network: network.parse().unwrap(),
            identity: None,
            services: vec!["immich".into()],
            at: 1_700_000_000_000,
        }
    }

    #[test]
    fn bans_are_one_per_source_per_interval_then_a_summary() {
        let limiter = BanLimiter::default();
        let t0 = Instant::now();
        assert!(
            limiter.pass(&ban("a", "2001:db8::/64"), t0),
            "the first is sent"
        );
        assert!(limiter.pass(&ban("b", "203.0.113.1/32"), t0), "per source");
        for i in 1..=30u8 {
            let net = format!("2001:db8:0:{i}::/64");
            assert!(!limiter.pass(&ban("a", &net), t0), "held: {net}");
        }
        assert_eq!(limiter.next_due(), Some(t0 + BAN_INTERVAL));
        assert!(limiter.due(t0 + BAN_INTERVAL / 2).is_empty());

        let end = t0 + BAN_INTERVAL;
        let summaries = limiter.due(end);
        assert_eq!(summaries.len(), 1, "b held nothing: {summaries:?}");
        let s = &summaries[0];
        assert_eq!((s.last.source.as_str(), s.more), ("a", 30));
        assert_eq!(s.last.network.to_string(), "2001:db8:0:30::/64");
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["event"], "throttle");
        assert_eq!(json["more"], 30);
        assert_eq!(json["network"], "2001:db8:0:30::/64");
        let (title, _, text) = ntfy_summary(s);
        assert_eq!(title, "gatekeeper: 30 more clients banned");
        assert_eq!(
            text,
            "30 more clients failed too many share checks on a within 60 s; banned for a while \
             (the last: 2001:db8:0:30::/64)"
        );

        // The summary was a's message for a new interval; b's quiet interval ended.
        assert!(!limiter.pass(&ban("a", "2001:db8:1::/64"), end));
        assert!(limiter.pass(&ban("b", "203.0.113.2/32"), end));
        let later = limiter.due(end + BAN_INTERVAL);
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].more, 1);
        // A quiet interval closes the window: the next ban is sent at once.
        assert!(limiter.due(end + BAN_INTERVAL * 2).is_empty());
        assert!(limiter.pass(&ban("a", "2001:db8:2::/64"), end + BAN_INTERVAL * 2));
    }

    #[test]
    fn urls_are_logged_without_password_or_query() {
        assert_eq!(
            loggable_url("https://user:secret@ntfy.example/topic?auth=tok#x"),
            "https://user@ntfy.example/topic"
        );
        assert_eq!(
            loggable_url("http://127.0.0.1:9/hook"),
            "http://127.0.0.1:9/hook"
        );
        assert!(!loggable_url("http://u:p@[::1:9/x?token=t").contains("token"));
        assert!(!loggable_url("http://u:p@[::1:9/x?token=t").contains(":p@"));
    }
}
