//! What `/healthz` reports: problems the parts report by name (the KV sink, the shared store, a
//! task that restarted), the outputs failing, and an output write that does not return.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{error, info};

/// A write of an output that takes longer than this shows on `/healthz` as stuck (a FIFO or a
/// hung network mount at the output path).
pub(crate) const STUCK_WRITE: Duration = Duration::from_secs(10);

/// The health registry, one per gate.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Problems parts reported, by part.
    problems: Mutex<BTreeMap<&'static str, String>>,
    /// The last output failure; `None` when the outputs are written.
    output_error: Mutex<Option<String>>,
    /// The output file being written now, and since when.
    writing: Mutex<Option<(PathBuf, Instant)>>,
}

impl Health {
    /// Report the health of `part` (`None`: healthy); `/healthz` lists every unhealthy part.
    /// A change is logged once.
    pub(crate) fn report(&self, part: &'static str, problem: Option<String>) {
        let mut problems = lock(&self.problems);
        match problem {
            Some(p) => {
                if problems.get(part) != Some(&p) {
                    error!(part, problem = %p, "unhealthy");
                }
                problems.insert(part, p);
            }
            None => {
                if problems.remove(part).is_some() {
                    info!(part, "healthy again");
                }
            }
        }
    }

    /// Everything unhealthy now: failing or stuck outputs and what parts reported, one line
    /// each.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .output_error()
            .map(|e| format!("outputs failing: {e}"))
            .into_iter()
            .collect();
        if let Some((path, since)) = self.stuck_write() {
            all.push(format!(
                "outputs: writing {} has not finished for {}s",
                path.display(),
                since.as_secs()
            ));
        }
        let reported = lock(&self.problems);
        all.extend(reported.iter().map(|(part, p)| format!("{part}: {p}")));
        all
    }

    /// The last output failure, if the outputs are failing now.
    pub(crate) fn output_error(&self) -> Option<String> {
        lock(&self.output_error).clone()
    }

    /// Record whether the last write of the outputs failed (`Some`: why).
    pub(crate) fn set_output_error(&self, e: Option<String>) {
        *lock(&self.output_error) = e;
    }

    /// The output being written for [`STUCK_WRITE`] or longer, and for how long.
    pub(crate) fn stuck_write(&self) -> Option<(PathBuf, Duration)> {
        let writing = lock(&self.writing);
        let (path, since) = writing.as_ref()?;
        let elapsed = since.elapsed();
        (elapsed >= STUCK_WRITE).then(|| (path.clone(), elapsed))
    }

    /// Note that `path` is being written until the returned guard is dropped.
    pub(crate) fn writing(&self, path: &Path) -> WritingGuard<'_> {
        *lock(&self.writing) = Some((path.to_path_buf(), Instant::now()));
        WritingGuard(self)
    }
}

/// A poisoned lock still holds a consistent value here (each is set in one statement).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Clears what [`Health::writing`] noted when the write returns (or panics).
pub(crate) struct WritingGuard<'a>(&'a Health);

impl Drop for WritingGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.0.writing) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_that_does_not_return_shows_on_health_until_it_does() {
        let health = Health::default();
        let guard = health.writing(Path::new("/srv/traefik/gatekeeper.yml"));
        // Just started: not stuck.
        assert!(health.problems().is_empty());
        let long_ago = Instant::now()
            .checked_sub(STUCK_WRITE + Duration::from_secs(2))
            .unwrap();
        lock(&health.writing).as_mut().unwrap().1 = long_ago;
        assert_eq!(
            health.problems(),
            vec!["outputs: writing /srv/traefik/gatekeeper.yml has not finished for 12s"]
        );
        drop(guard);
        assert!(health.problems().is_empty());
    }

    #[test]
    fn a_part_reports_until_healthy_again_and_failing_outputs_come_first() {
        let health = Health::default();
        health.report("redis", Some("unreachable".into()));
        health.set_output_error(Some("disk full".into()));
        assert_eq!(
            health.problems(),
            vec!["outputs failing: disk full", "redis: unreachable"]
        );
        health.report("redis", None);
        health.set_output_error(None);
        assert!(health.problems().is_empty());
    }
}
