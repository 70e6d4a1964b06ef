//! Notifications: grants, expiries, revocations, evictions and bans POSTed to a URL (JSON, or
//! ntfy's plain text). Fire-and-forget: events go into a bounded queue that one task drains, so
//! a slow or dead receiver never delays a grant or a decision; when the queue is full, events are
//! dropped and counted in the log.

use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::ledger::Millis;
use crate::policy::{EventKind, Notify, NotifyFormat};

/// Events waiting to be sent; beyond this they are dropped.
pub const QUEUE: usize = 256;

/// One notifiable event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// What happened.
    #[serde(serialize_with = "kind_name")]
    pub event: EventKind,
    /// The source concerned.
    pub source: String,
    /// The network concerned (for a ban: the banned client's network).
    pub network: IpNet,
    /// The certificate CN, when known.
    pub identity: Option<String>,
    /// The services the source unlocks.
    pub services: Vec<String>,
    /// When, ms since the epoch.
    pub at: Millis,
}

fn kind_name<S: serde::Serializer>(k: &EventKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}

/// The sending side; cheap to clone.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Event>,
    on: Vec<EventKind>,
}

impl Notifier {
    /// Start the sending task for `notify`, if a runtime is there to run it (the daemon); `None`
    /// in tools that run without one.
    pub fn start(notify: &Notify) -> Option<Notifier> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let client = crate::sources::share::http_client();
        runtime.spawn(deliver(notify.clone(), client, rx));
        Some(Notifier {
            tx,
            on: notify.on.clone(),
        })
    }

    /// Queue `event` if its kind is wanted; never waits.
    pub fn send(&self, event: Event) {
        if !self.on.contains(&event.event) {
            return;
        }
        if self.tx.try_send(event).is_err() {
            debug!("notification queue full or closed; event dropped");
        }
    }
}

async fn deliver(notify: Notify, client: reqwest::Client, mut rx: mpsc::Receiver<Event>) {
    let url = notify.url.to_string();
    let mut failing = false;
    while let Some(event) = rx.recv().await {
        let request = match notify.format {
            NotifyFormat::Json => client.post(&url).json(&event),
            NotifyFormat::Ntfy => {
                let (title, tags, text) = ntfy_text(&event);
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
                    warn!(url = %url, %why, "notification failed");
                }
                failing = true;
            }
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
}
