//! The render loop: whenever the ledger changes, the state file first, then what the proxy is
//! shown ([`Gate::show`]: the HTTP provider and Traefik's KV follow it), then the Traefik file.
//! At once when idle, at most every [`MIN_WRITE_GAP`] under churn; last-seen refreshes every
//! [`STATE_FLUSH_INTERVAL`]. Anything a proxy was ever shown is already on disk: while the state
//! file cannot be written, the proxy is shown only entries it already holds (revocations and
//! expiries still go through).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use tracing::{error, info};

use crate::atomic_file::Written;
use crate::gate::{Capture, Gate};
use crate::health::STUCK_WRITE;
use crate::policy::Policy;
use crate::sinks::traefik_file;
use crate::store::{self, StoreError, StoredEntry};

/// Writes of the outputs are at least this far apart, so churn cannot turn into a write storm
/// (at most 20 writes a second), while a lone change is written at once.
pub(crate) const MIN_WRITE_GAP: Duration = Duration::from_millis(50);
/// Last-seen refreshes, which wake nothing, reach the state file this often.
pub(crate) const STATE_FLUSH_INTERVAL: Duration = Duration::from_secs(30);
/// After a failed write, try again this soon.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Write the outputs (state file, then Traefik file) whenever the ledger changes, at once when
/// idle and at most every [`MIN_WRITE_GAP`] under churn; flush last-seen refreshes every
/// [`STATE_FLUSH_INTERVAL`]; flush once more when `shutdown` resolves.
pub(crate) async fn run(gate: Gate, shutdown: impl Future<Output = ()>) {
    let mut changes = gate.watch_changes();
    // Whatever the ledger holds now was restored from the state file.
    let mut writer = OutputWriter {
        restored: gate.entry_keys(),
        ..OutputWriter::default()
    };
    tokio::pin!(shutdown);
    loop {
        changes.borrow_and_update();
        let failing;
        (writer, failing) = flush_blocking(&gate, writer).await;
        let gap = tokio::time::sleep(MIN_WRITE_GAP);
        let next = if failing {
            RETRY_AFTER
        } else {
            STATE_FLUSH_INTERVAL
        };
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() { break }
                // Coalesce: whatever else changes during the gap goes into the same write.
                tokio::select! {
                    _ = gap => {}
                    _ = &mut shutdown => break,
                }
            }
            _ = tokio::time::sleep(next) => {}
            _ = &mut shutdown => break,
        }
    }
    let (_, failing) = flush_blocking(&gate, writer).await;
    if failing && let Some(e) = gate.health().output_error() {
        error!(error = %e, "outputs could not be written at shutdown");
    }
}

/// Flush on a blocking thread: fsync can take milliseconds, which must not stall requests.
/// A write that has not returned after [`STUCK_WRITE`] is logged (and shown on `/healthz`); the
/// flush goes on waiting for it, since a blocked thread cannot be interrupted.
async fn flush_blocking(gate: &Gate, mut writer: OutputWriter) -> (OutputWriter, bool) {
    let mut flush = tokio::task::spawn_blocking({
        let gate = gate.clone();
        move || {
            let ok = writer.flush(&gate);
            (writer, !ok)
        }
    });
    let joined = tokio::select! {
        joined = &mut flush => joined,
        _ = tokio::time::sleep(STUCK_WRITE) => {
            let stuck = gate.health().stuck_write();
            if let Some((path, _)) = &stuck {
                error!(path = %path.display(), "writing an output has not finished for {}s: a FIFO or a hung mount at that path? see /healthz", STUCK_WRITE.as_secs());
            }
            let joined = flush.await;
            if let Some((path, _)) = stuck {
                info!(path = %path.display(), "the stuck output write returned");
            }
            joined
        }
    };
    match joined {
        Ok(done) => done,
        Err(e) => {
            error!(error = %e, "output flush panicked");
            (OutputWriter::default(), true)
        }
    }
}

/// Remembers what was last written, so unchanged outputs are not rewritten.
#[derive(Default)]
struct OutputWriter {
    /// Path and bytes of the last state file written (a reload may move it).
    state: Option<(PathBuf, Vec<u8>)>,
    /// Path and text of the last Traefik file written.
    traefik: Option<(PathBuf, String)>,
    /// The entries the state file held at the start (restored from it).
    restored: HashSet<(String, IpNet)>,
}

impl OutputWriter {
    /// The entries of the last state file written (read back from its bytes: only needed while
    /// writing fails, so a write does not pay for it), or of the one restored at the start.
    fn persisted(&self) -> HashSet<(String, IpNet)> {
        let written = self.state.as_ref().map(|(path, bytes)| {
            store::decode(path, bytes)
                .map(|entries| entries.into_iter().map(|e| (e.source, e.network)).collect())
        });
        match written {
            Some(Ok(entries)) => entries,
            // Bytes gatekeeper wrote itself always read back; keep the restored set if not.
            Some(Err(_)) | None => self.restored.clone(),
        }
    }

    /// Write what changed; publish the change counter as persisted once the state file holds it.
    /// Returns false when something failed (logged, reported on health, retried by the caller).
    fn flush(&mut self, gate: &Gate) -> bool {
        let active = gate.active();
        let policy = &active.policy;
        let mut errors = Vec::new();

        // State bytes, snapshot and change counter are taken together under the ledger lock
        // (snapshots are swapped under it too), so the Traefik file never shows a grant the state
        // file written just before it lacks.
        let Capture {
            state,
            snapshot,
            generation,
        } = gate.capture();
        let state = state.map(|bytes| (policy.state_file.clone(), bytes));
        let mut state_ok = true;
        if let Some(state) = state
            && self.state.as_ref() != Some(&state)
        {
            let saved = {
                let _writing = gate.health().writing(&state.0);
                store::save(&state.0, &state.1)
            };
            match saved {
                Ok(_) => {
                    gate.metrics().write("state", "ok");
                    self.state = Some(state);
                }
                Err(e) => {
                    gate.metrics().write("state", "error");
                    errors.push(e.to_string());
                    state_ok = false;
                }
            }
        }
        // What the proxy is shown: everything, once the state file holds it; while the state
        // file cannot be written, only entries it already holds, so revocations and expiries
        // still reach the proxy but a grant that would be forgotten by a crash does not.
        let (shown, shown_generation) = if state_ok {
            gate.mark_persisted(generation);
            (snapshot, generation)
        } else {
            // Every grant up to the last persisted change is in it, none after.
            (
                gate.snapshot_of(&self.persisted()),
                gate.persisted_generation(),
            )
        };
        gate.show(shown.clone(), shown_generation);
        let snapshot = shown;

        if let Some(path) = &policy.traefik.file {
            let yaml = traefik_file::render(&snapshot, &policy.traefik, &policy.origin);
            let yaml = (path.clone(), yaml);
            if self.traefik.as_ref() != Some(&yaml) {
                let wrote = {
                    let _writing = gate.health().writing(path);
                    traefik_file::write(path, &yaml.1)
                };
                match wrote {
                    Ok(done) => {
                        gate.metrics().write("traefik", "ok");
                        // The first write of this process may follow the creation of the hidden
                        // temp directory, and Traefik may watch the old file itself since its
                        // start: more than one notification, the first possibly stale.
                        let first = self.traefik.is_none();
                        self.traefik = Some(yaml);
                        let file = &gate.propagation().file;
                        let throttle = policy.traefik.throttle;
                        let now = tokio::time::Instant::now();
                        match done {
                            // The rename: one notification, complete.
                            Written::Renamed if first => {
                                file.wrote(shown_generation, now, 3, 1, throttle)
                            }
                            Written::Renamed => file.wrote(shown_generation, now, 1, 0, throttle),
                            // Truncate, then write: Traefik may read the file in between.
                            Written::InPlace => file.wrote(shown_generation, now, 2, 1, throttle),
                            Written::Unchanged => file.unchanged(shown_generation),
                        }
                    }
                    Err(e) => {
                        gate.metrics().write("traefik", "error");
                        errors.push(e.to_string());
                    }
                }
            } else {
                gate.propagation().file.unchanged(shown_generation);
            }
        }

        let was_failing = gate.health().output_error().is_some();
        if errors.is_empty() {
            if was_failing {
                info!("outputs are written again");
            }
            gate.health().set_output_error(None);
            true
        } else {
            let message = errors.join("; ");
            if !was_failing {
                error!(error = %message, "cannot write outputs; decisions are still served from memory, retrying");
            }
            gate.health().set_output_error(Some(message));
            false
        }
    }
}

/// Read the state file named by `policy`, creating the directories the outputs need. Errors name
/// the file or directory.
pub(crate) fn load_state(policy: &Policy) -> Result<Vec<StoredEntry>, StoreError> {
    ensure_parent(&policy.state_file)?;
    prepare_outputs(policy)?;
    store::load(&policy.state_file)
}

/// Create the directory of the Traefik file, if it is missing.
pub(crate) fn prepare_outputs(policy: &Policy) -> Result<(), StoreError> {
    match &policy.traefik.file {
        Some(path) => ensure_parent(path),
        None => Ok(()),
    }
}

fn ensure_parent(path: &Path) -> Result<(), StoreError> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                dir: dir.to_path_buf(),
                source,
            })?;
            info!(dir = %dir.display(), "created missing directory");
            Ok(())
        }
        _ => Ok(()),
    }
}
