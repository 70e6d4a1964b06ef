//! The state file: the ledger as versioned JSON, so grants survive restarts and kill -9. Written
//! through [`atomic_file`](crate::atomic_file) for its owner only (0600: it holds client
//! addresses and identities); a file that cannot be read is never silently replaced, and
//! something other than a regular file at its path (a FIFO) is refused, never waited on.

use std::io;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::atomic_file::{self, FileKind, Found, WriteError, Written};
use crate::ledger::{Ledger, Millis, Restore};

/// The format this build writes and reads; a newer one is refused rather than misread.
pub(crate) const FORMAT: u32 = 1;

/// The state file's content.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    /// Format version ([`FORMAT`]).
    format: u32,
    /// Every entry, by source then network.
    entries: Vec<StoredEntry>,
}

/// One ledger entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredEntry {
    /// The source that granted it.
    pub source: String,
    /// The granted network.
    pub network: IpNet,
    /// First granted, ms since the epoch.
    pub first_seen: Millis,
    /// Last seen, ms since the epoch.
    pub last_seen: Millis,
    /// Requests seen.
    pub hits: u64,
    /// Who proved trust, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// A fixed end set by an operator's grant, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Millis>,
}

impl StoredEntry {
    /// The entry `r` of `source`, as the file keeps it (the tests compare the encoder with it).
    #[cfg(test)]
    pub(crate) fn new(source: &str, r: Restore) -> Self {
        StoredEntry {
            source: source.to_string(),
            network: r.network,
            first_seen: r.first_seen,
            last_seen: r.last_seen,
            hits: r.hits,
            identity: r.identity,
            until: r.until,
        }
    }

    /// The entry to put back into the ledger.
    pub(crate) fn to_restore(&self) -> Restore {
        Restore {
            network: self.network,
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            hits: self.hits,
            identity: self.identity.clone(),
            until: self.until,
        }
    }
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists but cannot be read.
    #[error("cannot read state file {}: {source}; fix its permissions or point state_file elsewhere", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Something other than a regular file is at the path.
    #[error(
        "state file {} is {what}, not a regular file; remove it, or point state_file elsewhere",
        path.display()
    )]
    NotAFile {
        /// The state file.
        path: PathBuf,
        /// What is there instead.
        what: FileKind,
    },
    /// A directory the outputs need could not be created.
    #[error("cannot create directory {}: {source}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is not valid state.
    #[error(
        "state file {} is not valid gatekeeper state ({message}); it was left untouched: repair it, \
         or move it aside (mv {0} {0}.bad) to start with no grants",
        path.display()
    )]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// Written by a newer gatekeeper.
    #[error(
        "state file {} has format {found}, newer than this gatekeeper understands ({FORMAT}); \
         run the newer gatekeeper, or move the file aside to start with no grants",
        path.display()
    )]
    FutureFormat {
        /// The state file.
        path: PathBuf,
        /// The format found.
        found: u32,
    },
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// Read the state file. A missing file is a first start (no entries); anything else that is not
/// valid state is an error that names the file and what to do.
pub fn load(path: &Path) -> Result<Vec<StoredEntry>, StoreError> {
    let bytes = match atomic_file::read_regular(path) {
        Ok(Found::File(b)) => b,
        Ok(Found::Missing) => return Ok(Vec::new()),
        Ok(Found::Not(what)) => {
            return Err(StoreError::NotAFile {
                path: path.to_path_buf(),
                what,
            });
        }
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    decode(path, &bytes)
}

pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<Vec<StoredEntry>, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(corrupt("the file is empty".into()));
    }
    // Read the version first, so a future format is named as such instead of as corruption.
    #[derive(Deserialize)]
    struct Version {
        format: Option<u32>,
    }
    let version: Version = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    match version.format {
        None => return Err(corrupt("no `format` field".into())),
        Some(found) if found > FORMAT => {
            return Err(StoreError::FutureFormat {
                path: path.to_path_buf(),
                found,
            });
        }
        Some(_) => {}
    }
    let file: StateFile = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    Ok(file.entries)
}

/// The ledger as state-file bytes: deterministic, one entry per line for people reading it.
pub fn encode(ledger: &Ledger) -> Vec<u8> {
    let entries = ledger.entries();
    let mut out = format!("{{\"format\":{FORMAT},\"entries\":[").into_bytes();
    for (i, (source, e)) in entries.iter().enumerate() {
        out.extend_from_slice(if i == 0 { b"\n  " } else { b",\n  " });
        let stored = StoredRef {
            source,
            network: e.network,
            first_seen: e.first_seen,
            last_seen: e.last_seen(),
            hits: e.hits(),
            identity: e.identity.as_deref(),
            until: e.until,
        };
        // Serialising a plain struct of strings and numbers into memory cannot fail.
        let _ = serde_json::to_writer(&mut out, &stored);
    }
    out.extend_from_slice(if entries.is_empty() {
        b"]}\n"
    } else {
        b"\n]}\n"
    });
    out
}

/// A [`StoredEntry`] borrowed from the ledger, serialised to the same bytes: the state file is
/// written under the ledger's lock, so without a copy of every entry.
#[derive(Serialize)]
struct StoredRef<'a> {
    source: &'a str,
    network: IpNet,
    first_seen: Millis,
    last_seen: Millis,
    hits: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    until: Option<Millis>,
}

/// Write the state file atomically (temp file, fsync, rename), skipping identical content; it is
/// created 0600, and an existing one readable by others is tightened (with a warning).
pub fn save(path: &Path, bytes: &[u8]) -> Result<Written, StoreError> {
    Ok(atomic_file::write_private_if_changed(path, bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::from_yaml_str;

    fn ledger() -> Ledger {
        let p = from_yaml_str(
            "services: { immich: {} }\nsources:\n  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\" }\n",
            "test",
        )
        .unwrap();
        let mut l = Ledger::new(&p);
        l.record("ha", "203.0.113.9/32".parse().unwrap(), 1000, Some("alice"));
        l.record("ha", "2001:db8::/64".parse().unwrap(), 2000, None);
        l.record("ha", "2001:db8::/64".parse().unwrap(), 3000, None);
        l
    }

    #[test]
    fn round_trips_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        save(&path, &encode(&ledger())).unwrap();
        let entries = load(&path).unwrap();
        assert_eq!(
            entries,
            vec![
                StoredEntry {
                    source: "ha".into(),
                    network: "203.0.113.9/32".parse().unwrap(),
                    first_seen: 1000,
                    last_seen: 1000,
                    hits: 1,
                    identity: Some("alice".into()),
                    until: None,
                },
                StoredEntry {
                    source: "ha".into(),
                    network: "2001:db8::/64".parse().unwrap(),
                    first_seen: 2000,
                    last_seen: 3000,
                    hits: 2,
                    identity: None,
                    until: None,
                },
            ]
        );
    }

    #[test]
    fn missing_file_is_a_first_start() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(&dir.path().join("nope.json")).unwrap().is_empty());
    }

    #[test]
    fn bad_files_are_errors_that_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let cases: [(&str, &str); 5] = [
            ("", "is empty"),
            ("{\"format\":1,\"entries\":[{\"source\":\"ha\"", "EOF"),
            ("{\"entries\":[]}", "no `format`"),
            (
                "{\"format\":1,\"entries\":[{\"source\":\"ha\",\"network\":\"nonsense\",\"first_seen\":1,\"last_seen\":1,\"hits\":1}]}",
                "invalid IP",
            ),
            ("{\"format\":99,\"entries\":[]}", "format 99, newer"),
        ];
        for (content, expected) in cases {
            std::fs::write(&path, content).unwrap();
            let err = load(&path).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains(expected), "{content:?} gave {err}");
            // Never touched: the operator decides what to do with it.
            assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
        }
    }

    #[test]
    fn the_state_file_is_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        save(&path, &encode(&ledger())).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    #[test]
    fn a_fifo_is_refused_naming_it_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let fifo = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(load(&fifo).map(|_| ()).unwrap_err().to_string());
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("load blocked on a FIFO at the state path");
        assert_eq!(
            err,
            format!(
                "state file {} is a FIFO (named pipe), not a regular file; remove it, or point \
                 state_file elsewhere",
                path.display()
            )
        );
    }

    #[test]
    fn entries_are_encoded_as_stored_entries_are() {
        let mut l = ledger();
        let network = "2001:db8::/64".parse().unwrap();
        l.record("ha", network, 5, Some("CN=\"q\""));
        l.set_until("ha", network, Some(99));
        let text = String::from_utf8(encode(&l)).unwrap();
        for (source, e) in l.entries() {
            let line = serde_json::to_string(&StoredEntry::new(source, e.to_restore())).unwrap();
            assert!(
                text.contains(&format!("\n  {line}")),
                "{line} not in {text}"
            );
        }
    }

    #[test]
    fn encoding_is_deterministic() {
        assert_eq!(encode(&ledger()), encode(&ledger()));
        assert!(
            String::from_utf8(encode(&ledger()))
                .unwrap()
                .starts_with("{\"format\":1")
        );
    }
}
