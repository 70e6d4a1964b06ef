//! The crash-safe file writer shared by the Traefik sink and the state file: write a temp file
//! on the same filesystem, fsync it, rename it over the target, fsync the directory; fall back to
//! rewriting in place where a Docker single-file bind mount makes the rename impossible.
//!
//! Decisions worth knowing:
//! - The temp file is `.<name>.gatekeeper-tmp-<pid>`: hidden, and with no
//!   `.yml`/`.yaml`/`.toml`/`.json` suffix, so a Traefik file provider never loads a half-written
//!   file. For a file in a directory Traefik watches ([`write_if_changed_unwatched`]) it lives in
//!   the subdirectory [`TEMP_DIR`]: Traefik watches the directory itself, not its
//!   subdirectories, so creating and filling the temp file wakes nothing, and the rename into
//!   the directory is the one change Traefik sees. Every event in the watched directory makes
//!   Traefik re-read it and starts its 2 s provider throttle, so a temp file next to the target
//!   delayed every real change by that throttle.
//! - Temp files left by a crash (kill -9 between create and rename) are swept before every
//!   write; in a container the pid is often 1 on every start, so the sweep cannot tell "ours" by
//!   pid and relies on a process-wide write lock instead.
//! - Missing parent directories are *not* created: a typo in a path should fail with an error
//!   naming the directory, not silently write somewhere Traefik is not watching.
//! - An existing target keeps its permission bits (an operator's `chmod 640` survives); a new
//!   file gets the process default (0666 minus umask). Owner and group cannot be kept without
//!   privileges. A symlink at the target is replaced by a regular file. A private file
//!   ([`write_private_if_changed`], the state file) is made 0600 and never keeps group or world
//!   bits: it holds client addresses and identities.
//! - The target is opened (to compare, or to rewrite in place) with `O_NONBLOCK | O_NOFOLLOW`
//!   and checked with `fstat` to be a regular file: opening a FIFO planted at the path would
//!   block the writer forever. A FIFO, socket, device or directory there is refused with
//!   [`WriteError::NotAFile`], never replaced. A symlink counts as changed content for the
//!   compare (the rename replaces it), and the in-place rewrite refuses it: writing through it
//!   would change whatever file it points at.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Replaced atomically: readers saw the old content or the new one, never a mix.
    Renamed,
    /// Rewritten in place (truncate, write, fsync) because the rename was impossible, typically
    /// a Docker single-file bind mount; a reader may briefly have seen a partial file.
    InPlace,
    /// The file already held these bytes and was not touched.
    Unchanged,
}

/// Why a write failed; each message names the path and the step that failed.
///
/// The underlying `io::Error` is part of the message (lowercased) rather than returned by
/// `source()`, so a `{:#}` chain does not print it twice; [`WriteError::io_error`] gives it back.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The path ends in `..` or `/`, so there is no file name to write.
    #[error("cannot write {}: the path does not name a file", .path.display())]
    NoFileName {
        /// The path as given.
        path: PathBuf,
    },
    /// The directory that should hold the file cannot be listed (missing, not a directory, ...).
    #[error("cannot use directory {}: {}", .dir.display(), lower(.error))]
    Directory {
        /// The parent directory of the target.
        dir: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// The current content could not be read for comparison.
    #[error("cannot read {}: {}", .path.display(), lower(.error))]
    Read {
        /// The target.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// The temp file could not be created.
    #[error("cannot create temp file {}: {}", .path.display(), lower(.error))]
    CreateTemp {
        /// The temp file.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// The temp file could not be written, given the target's permissions, or synced.
    #[error("cannot write temp file {}: {}", .path.display(), lower(.error))]
    WriteTemp {
        /// The temp file.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// The temp file could not be renamed over the target (and in-place was not an option).
    #[error("cannot rename {} to {}: {}", .from.display(), .to.display(), lower(.error))]
    Rename {
        /// The temp file (already removed again).
        from: PathBuf,
        /// The target.
        to: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// The rename happened but the directory could not be synced, so it may not survive a crash.
    #[error("cannot sync directory {}: {}", .dir.display(), lower(.error))]
    SyncDirectory {
        /// The parent directory of the target.
        dir: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// The in-place fallback failed too.
    #[error(
        "cannot rewrite {} in place (tried because {}): {}",
        .path.display(), lower(.reason), lower(.error)
    )]
    InPlace {
        /// The target.
        path: PathBuf,
        /// Why the atomic path was abandoned (the rename or temp-file error).
        reason: io::Error,
        /// What the OS said to the in-place write, or what was found instead of a regular file.
        error: io::Error,
    },
    /// Something other than a regular file is at the path (a FIFO, socket, device, directory):
    /// it is neither waited on nor replaced.
    #[error(
        "cannot write {}: it is {what}, not a regular file; remove it, or point the output elsewhere",
        .path.display()
    )]
    NotAFile {
        /// The target.
        path: PathBuf,
        /// What is there instead.
        what: FileKind,
    },
}

/// What is at a path when it is not a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A symbolic link (only where it is not followed).
    Symlink,
    /// A FIFO (named pipe): opening it for reading or writing waits for the other end.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A directory.
    Directory,
    /// Anything else.
    Other,
}

impl FileKind {
    fn of(file_type: fs::FileType) -> Self {
        if file_type.is_symlink() {
            FileKind::Symlink
        } else if file_type.is_fifo() {
            FileKind::Fifo
        } else if file_type.is_socket() {
            FileKind::Socket
        } else if file_type.is_char_device() {
            FileKind::CharDevice
        } else if file_type.is_block_device() {
            FileKind::BlockDevice
        } else if file_type.is_dir() {
            FileKind::Directory
        } else {
            FileKind::Other
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Symlink => "a symbolic link",
            FileKind::Fifo => "a FIFO (named pipe)",
            FileKind::Socket => "a socket",
            FileKind::CharDevice => "a character device",
            FileKind::BlockDevice => "a block device",
            FileKind::Directory => "a directory",
            FileKind::Other => "a special file",
        })
    }
}

/// What looking for a regular file at a path found.
#[derive(Debug)]
pub(crate) enum Found<T> {
    /// The regular file (or what was read from it).
    File(T),
    /// Nothing is there.
    Missing,
    /// Something else is there.
    Not(FileKind),
}

/// Opens the regular file at `path` with `options`, never blocking: `O_NONBLOCK` makes opening
/// a FIFO return at once (or fail with ENXIO), and `fstat` then tells what was opened. With
/// `follow` false a symlink at `path` is reported, not opened (`O_NOFOLLOW`).
fn open_regular(path: &Path, options: &mut OpenOptions, follow: bool) -> io::Result<Found<File>> {
    let mut flags = libc::O_NONBLOCK;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    match options.custom_flags(flags).open(path) {
        Ok(file) => {
            let file_type = file.metadata()?.file_type();
            Ok(if file_type.is_file() {
                // O_NONBLOCK changes nothing for a regular file's reads and writes.
                Found::File(file)
            } else {
                Found::Not(FileKind::of(file_type))
            })
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Found::Missing),
        // ELOOP from O_NOFOLLOW, ENXIO from a FIFO without a reader or a socket: say what is
        // there rather than what the OS said about it.
        Err(error) => match fs::symlink_metadata(path) {
            Ok(meta) if !meta.is_file() && (!follow || !meta.file_type().is_symlink()) => {
                Ok(Found::Not(FileKind::of(meta.file_type())))
            }
            _ => Err(error),
        },
    }
}

/// Reads the regular file at `path`, following a symlink but never blocking (a FIFO, socket,
/// device or directory there is reported, not read): for files gatekeeper reads at startup.
pub(crate) fn read_regular(path: &Path) -> io::Result<Found<Vec<u8>>> {
    Ok(
        match open_regular(path, OpenOptions::new().read(true), true)? {
            Found::File(mut file) => {
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes)?;
                Found::File(bytes)
            }
            Found::Missing => Found::Missing,
            Found::Not(what) => Found::Not(what),
        },
    )
}

impl WriteError {
    /// The OS error behind this failure, if there is one.
    #[cfg(test)]
    pub(crate) fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::NoFileName { .. } => None,
            Self::Directory { error, .. }
            | Self::Read { error, .. }
            | Self::CreateTemp { error, .. }
            | Self::WriteTemp { error, .. }
            | Self::Rename { error, .. }
            | Self::SyncDirectory { error, .. }
            | Self::InPlace { error, .. } => Some(error),
            Self::NotAFile { .. } => None,
        }
    }
}

/// OS messages start with a capital ("Permission denied"); ours are lowercase throughout.
fn lower(error: &io::Error) -> String {
    let text = error.to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// Serialises every write in the process. Writes are rare and small, and holding this makes
/// two things safe: the stale-temp sweep cannot delete a temp file another thread is still
/// writing, and [`write_if_changed`]'s compare-then-write cannot interleave with another write.
static WRITE_LOCK: Mutex<()> = Mutex::new(());

/// Targets already warned about, so the in-place warning is logged once per process per path.
static WARNED_IN_PLACE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Private targets already warned about for being readable by others, likewise.
static WARNED_OPEN_MODE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn lock() -> MutexGuard<'static, ()> {
    // The guarded value is `()`: a panic in another writer leaves nothing inconsistent.
    WRITE_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The subdirectory of a watched directory that holds the temp files, created on first use.
pub const TEMP_DIR: &str = ".gatekeeper-tmp";

/// Where the temp file of a write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TempPlace {
    /// Next to the target.
    Beside,
    /// In [`TEMP_DIR`] inside the target's directory, where a directory watch does not see it;
    /// next to the target when that subdirectory cannot be made.
    Unwatched,
}

/// Who may read a file written here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// A new file gets the process default; an existing one keeps its bits.
    Default,
    /// Only the owner: a new file is 0600, an existing one loses its group and world bits.
    Private,
}

/// Writes `bytes` to `path` unless the file already holds exactly these bytes, in which case it
/// is not touched at all (no new inode, no mtime change, no Traefik reload).
pub fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<Written, WriteError> {
    write_if_changed_in(path, bytes, TempPlace::Beside, Access::Default)
}

/// [`write_if_changed`] for a file in a directory that Traefik (or another watcher) watches: the
/// temp file is made in [`TEMP_DIR`], so the rename is the only change the watcher sees.
pub fn write_if_changed_unwatched(path: &Path, bytes: &[u8]) -> Result<Written, WriteError> {
    write_if_changed_in(path, bytes, TempPlace::Unwatched, Access::Default)
}

/// [`write_if_changed`] for a file only its owner may read (the state file): created 0600, and an
/// existing file readable or writable by others is tightened, with a warning once per path.
pub(crate) fn write_private_if_changed(path: &Path, bytes: &[u8]) -> Result<Written, WriteError> {
    write_if_changed_in(path, bytes, TempPlace::Beside, Access::Private)
}

fn write_if_changed_in(
    path: &Path,
    bytes: &[u8],
    place: TempPlace,
    access: Access,
) -> Result<Written, WriteError> {
    let _guard = lock();
    let read_error = |error| WriteError::Read {
        path: path.to_owned(),
        error,
    };
    // A symlink is not followed: the rename replaces it whatever it points at.
    let current = match open_regular(path, OpenOptions::new().read(true), false) {
        Ok(Found::File(mut file)) => {
            let mut current = Vec::new();
            file.read_to_end(&mut current).map_err(read_error)?;
            Some(current)
        }
        Ok(Found::Missing | Found::Not(FileKind::Symlink)) => None,
        Ok(Found::Not(what)) => {
            return Err(WriteError::NotAFile {
                path: path.to_owned(),
                what,
            });
        }
        Err(error) => return Err(read_error(error)),
    };
    match current {
        Some(current) if current == bytes && !needs_tightening(path, access) => {
            // A temp file left by a kill -9 goes now, not only at the next change.
            let (dir, name) = split(path)?;
            let prefix = temp_prefix(&name);
            sweep_stale_temps(&dir, &prefix)?;
            let hidden = dir.join(TEMP_DIR);
            if place == TempPlace::Unwatched && hidden.is_dir() {
                sweep_stale_temps(&hidden, &prefix)?;
            }
            return Ok(Written::Unchanged);
        }
        _ => {}
    }
    write_locked(path, bytes, place, access)
}

/// Whether `path` is a private file that others may read or write: rewritten even when its
/// content is unchanged, so an existing state file is tightened at once.
fn needs_tightening(path: &Path, access: Access) -> bool {
    access == Access::Private
        && fs::metadata(path).is_ok_and(|meta| meta.permissions().mode() & 0o077 != 0)
}

/// Replaces `path` with `bytes` crash-safely: temp file in the same directory, fsync, rename,
/// fsync of the directory. Falls back to an in-place rewrite (with a one-time warning) where a
/// single-file bind mount makes that impossible; see [`Written`].
#[cfg(test)]
pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<Written, WriteError> {
    let _guard = lock();
    write_locked(path, bytes, TempPlace::Beside, Access::Default)
}

fn write_locked(
    path: &Path,
    bytes: &[u8],
    place: TempPlace,
    access: Access,
) -> Result<Written, WriteError> {
    let (dir, name) = split(path)?;
    let prefix = temp_prefix(&name);
    sweep_stale_temps(&dir, &prefix)?;
    let temp_dir = match place {
        TempPlace::Beside => dir.clone(),
        TempPlace::Unwatched => match unwatched_temp_dir(&dir) {
            Some(hidden) => {
                sweep_stale_temps(&hidden, &prefix)?;
                hidden
            }
            None => dir.clone(),
        },
    };

    let mut temp_name = prefix;
    temp_name.push(std::process::id().to_string());
    let temp = temp_dir.join(temp_name);

    let new_mode = match access {
        Access::Default => 0o666,
        // Never readable by others, not even between create and chmod.
        Access::Private => 0o600,
    };
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(new_mode)
        .open(&temp)
    {
        Ok(file) => file,
        // A read-only container filesystem with the target bind-mounted writable on its own
        // (`read_only: true` plus a single-file mount) never gets as far as the rename.
        Err(error) if temp_refusal_allows_in_place(&error) && path.is_file() => {
            return in_place_fallback(path, bytes, error, access);
        }
        Err(error) => return Err(WriteError::CreateTemp { path: temp, error }),
    };
    if let Err(error) = fill_temp(&mut file, path, bytes, access) {
        drop(file);
        remove_quietly(&temp);
        return Err(WriteError::WriteTemp { path: temp, error });
    }
    drop(file);

    match fs::rename(&temp, path) {
        Ok(()) => {
            sync_dir(&dir).map_err(|error| WriteError::SyncDirectory { dir, error })?;
            Ok(Written::Renamed)
        }
        Err(error) => {
            remove_quietly(&temp);
            if rename_failure_allows_in_place(&error) {
                in_place_fallback(path, bytes, error, access)
            } else {
                Err(WriteError::Rename {
                    from: temp,
                    to: path.to_owned(),
                    error,
                })
            }
        }
    }
}

/// The directory holding `path` and its file name. A bare file name lives in `.`.
fn split(path: &Path) -> Result<(PathBuf, OsString), WriteError> {
    let name = path.file_name().ok_or_else(|| WriteError::NoFileName {
        path: path.to_owned(),
    })?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_owned()))
}

/// [`TEMP_DIR`] in `dir`, made (0700) if missing; `None` when it cannot be had (a read-only
/// directory, a file of that name), and the temp file then goes next to the target, as before.
fn unwatched_temp_dir(dir: &Path) -> Option<PathBuf> {
    let hidden = dir.join(TEMP_DIR);
    if hidden.is_dir() {
        return Some(hidden);
    }
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match builder.create(&hidden) {
        Ok(()) => Some(hidden),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists && hidden.is_dir() => {
            Some(hidden)
        }
        Err(error) => {
            tracing::debug!(dir = %hidden.display(), %error, "no hidden temp directory; the temp file goes next to the target");
            None
        }
    }
}

/// `.<name>.gatekeeper-tmp-`: hidden, and never ending in an extension Traefik loads.
fn temp_prefix(name: &std::ffi::OsStr) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".gatekeeper-tmp-");
    prefix
}

/// Removes temp files of this target left by an interrupted write. Listing the directory is
/// also where a missing or unreadable directory is reported, naming it.
fn sweep_stale_temps(dir: &Path, prefix: &std::ffi::OsStr) -> Result<(), WriteError> {
    let entries = fs::read_dir(dir).map_err(|error| WriteError::Directory {
        dir: dir.to_owned(),
        error,
    })?;
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(prefix.as_encoded_bytes())
        {
            continue;
        }
        let stale = entry.path();
        match fs::remove_file(&stale) {
            Ok(()) => tracing::info!(
                path = %stale.display(),
                "removed a temp file left by an interrupted write"
            ),
            // Creating the temp file will then fail with an error naming it.
            Err(error) => tracing::warn!(
                path = %stale.display(),
                %error,
                "cannot remove a temp file left by an interrupted write"
            ),
        }
    }
    Ok(())
}

/// Gives the temp file the target's permission bits (without group and world bits for a
/// private file), writes it and makes it durable.
fn fill_temp(file: &mut File, target: &Path, bytes: &[u8], access: Access) -> io::Result<()> {
    if let Ok(meta) = fs::metadata(target) {
        let mode = kept_mode(target, meta.permissions().mode(), access);
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    file.write_all(bytes)?;
    file.sync_all()
}

/// The permission bits a rewrite of `target`, now `mode`, gets: the same, or for a private file
/// the same without group and world bits, with a warning (once per path) when that changes them.
fn kept_mode(target: &Path, mode: u32, access: Access) -> u32 {
    let mode = mode & 0o7777;
    if access == Access::Default || mode & 0o077 == 0 {
        return mode;
    }
    let private = mode & !0o077;
    let first = WARNED_OPEN_MODE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(target.to_owned());
    if first {
        tracing::warn!(
            path = %target.display(),
            was = %format!("{mode:04o}"),
            now = %format!("{private:04o}"),
            "the file was readable by others; it holds client addresses and identities, so it is \
             now written for its owner only"
        );
    }
    private
}

/// Makes the rename itself durable: without this a crash can bring back the old file.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Directories cannot be opened for syncing here; the rename is as durable as the OS makes it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// Whether a failed rename means "this target cannot be replaced, only rewritten": EBUSY is what
/// renaming onto a Docker single-file bind mount (a mount point) gives, and EXDEV what some
/// overlay and bind-mount combinations give.
fn rename_failure_allows_in_place(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ResourceBusy | io::ErrorKind::CrossesDevices
    )
}

/// Whether failing to create the temp file may still leave the target itself writable: the
/// directory is read-only or not ours while the file is a writable mount of its own.
fn temp_refusal_allows_in_place(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
    )
}

fn in_place_fallback(
    path: &Path,
    bytes: &[u8],
    reason: io::Error,
    access: Access,
) -> Result<Written, WriteError> {
    if first_in_place_for(path) {
        tracing::warn!(
            path = %path.display(),
            reason = %reason,
            "cannot replace the file atomically, so it is rewritten in place and a reader may \
             see it half-written; mount its directory into the container instead of the single \
             file"
        );
    }
    match rewrite_in_place(path, bytes, access) {
        Ok(()) => Ok(Written::InPlace),
        Err(error) => Err(WriteError::InPlace {
            path: path.to_owned(),
            reason,
            error,
        }),
    }
}

/// True the first time it is asked about `path` in this process.
fn first_in_place_for(path: &Path) -> bool {
    let mut warned = WARNED_IN_PLACE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    warned.insert(path.to_owned())
}

/// Truncates the existing file and writes `bytes` into the same inode, which is all a bind
/// mount allows. It must already exist: a bind-mounted file always does, and creating it here
/// would hide a wrong path. It must be a regular file, and a symlink there is not followed: the
/// file it points at is not gatekeeper's to write.
fn rewrite_in_place(path: &Path, bytes: &[u8], access: Access) -> io::Result<()> {
    let mut file = match open_regular(path, OpenOptions::new().write(true), false)? {
        Found::File(file) => file,
        Found::Missing => return Err(io::Error::from(io::ErrorKind::NotFound)),
        Found::Not(FileKind::Symlink) => {
            return Err(io::Error::other(
                "it is a symbolic link, which gatekeeper does not follow",
            ));
        }
        Found::Not(what) => {
            return Err(io::Error::other(format!(
                "it is {what}, not a regular file"
            )));
        }
    };
    let mode = file.metadata()?.permissions().mode();
    let kept = kept_mode(path, mode, access);
    if kept != mode & 0o7777 {
        // Best effort: a bind-mounted file may belong to someone else.
        if let Err(error) = file.set_permissions(fs::Permissions::from_mode(kept)) {
            tracing::warn!(path = %path.display(), %error, "cannot make the file private");
        }
    }
    // Truncated only once it is known to be a regular file (O_TRUNC would act at open).
    file.set_len(0)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn remove_quietly(path: &Path) {
    if let Err(error) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), %error, "cannot remove temp file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn creates_then_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("gatekeeper.yml");

        assert_eq!(write(&target, b"first\n").unwrap(), Written::Renamed);
        assert_eq!(fs::read(&target).unwrap(), b"first\n");
        assert_eq!(write(&target, b"second\n").unwrap(), Written::Renamed);
        assert_eq!(fs::read(&target).unwrap(), b"second\n");
        assert_eq!(names_in(dir.path()), ["gatekeeper.yml"]);
    }

    #[test]
    fn unwatched_writes_fall_back_to_beside_without_their_directory() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the hidden directory would go.
        fs::write(dir.path().join(TEMP_DIR), b"in the way").unwrap();
        let target = dir.path().join("gatekeeper.yml");
        assert_eq!(
            write_if_changed_unwatched(&target, b"x").unwrap(),
            Written::Renamed
        );
        assert_eq!(fs::read(&target).unwrap(), b"x");
        assert_eq!(names_in(dir.path()), [TEMP_DIR, "gatekeeper.yml"]);
    }

    #[test]
    fn stale_temps_in_the_hidden_directory_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("gatekeeper.yml");
        write_if_changed_unwatched(&target, b"old").unwrap();
        let stale = dir
            .path()
            .join(TEMP_DIR)
            .join(".gatekeeper.yml.gatekeeper-tmp-1");
        fs::write(&stale, b"half").unwrap();
        // Swept even when nothing needs writing.
        assert_eq!(
            write_if_changed_unwatched(&target, b"old").unwrap(),
            Written::Unchanged
        );
        assert!(!stale.exists());
    }

    #[test]
    fn write_if_changed_writes_new_and_changed_content() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state.json");

        assert_eq!(write_if_changed(&target, b"{}").unwrap(), Written::Renamed);
        assert_eq!(
            write_if_changed(&target, b"{\"a\":1}").unwrap(),
            Written::Renamed
        );
        assert_eq!(fs::read(&target).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn unchanged_content_is_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("gatekeeper.yml");
        write(&target, b"same\n").unwrap();
        let before = fs::metadata(&target).unwrap();

        assert_eq!(
            write_if_changed(&target, b"same\n").unwrap(),
            Written::Unchanged
        );

        let after = fs::metadata(&target).unwrap();
        assert_eq!(before.modified().unwrap(), after.modified().unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            // A rename would have brought a new inode.
            assert_eq!(before.ino(), after.ino());
        }
    }

    #[test]
    fn no_temp_files_are_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("gatekeeper.yml");
        for i in 0..5 {
            write_if_changed(&target, format!("v{i}").as_bytes()).unwrap();
        }
        assert_eq!(names_in(dir.path()), ["gatekeeper.yml"]);
    }

    #[test]
    fn failed_rename_removes_the_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory cannot be replaced by a file.
        let target = dir.path().join("taken");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"x").unwrap();

        let error = write(&target, b"content").unwrap_err();

        assert!(matches!(error, WriteError::Rename { .. }), "{error:?}");
        assert!(error.to_string().starts_with("cannot rename "), "{error}");
        assert_eq!(names_in(dir.path()), ["taken"]);
    }

    #[test]
    fn missing_directory_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-there");
        let target = missing.join("gatekeeper.yml");

        let error = write(&target, b"x").unwrap_err();

        match &error {
            WriteError::Directory { dir, error } => {
                assert_eq!(dir, &missing);
                assert_eq!(error.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected a directory error, got {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("cannot use directory {}: ", missing.display())),
            "{message}"
        );
        // Lowercase throughout, as the OS text is folded.
        assert!(message.contains(": no such file"), "{message}");
        assert!(!missing.exists(), "the directory must not be created");
        assert!(error.io_error().is_some());
    }

    #[test]
    fn write_if_changed_reports_a_missing_directory_too() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("not-there/state.json");
        let error = write_if_changed(&target, b"x").unwrap_err();
        assert!(matches!(error, WriteError::Directory { .. }), "{error:?}");
    }

    #[test]
    fn path_without_file_name_is_rejected() {
        let error = write(Path::new("/"), b"x").unwrap_err();
        assert!(matches!(error, WriteError::NoFileName { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            "cannot write /: the path does not name a file"
        );
        assert!(error.io_error().is_none());
    }

    #[test]
    fn stale_temp_files_from_a_crash_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("gatekeeper.yml");
        fs::write(&target, b"old").unwrap();
        // A kill -9 between create and rename; the pid may well equal ours (pid 1 in containers).
        let stale = dir.path().join(".gatekeeper.yml.gatekeeper-tmp-12345");
        let stale_same_pid = dir.path().join(format!(
            ".gatekeeper.yml.gatekeeper-tmp-{}",
            std::process::id()
        ));
        fs::write(&stale, b"half").unwrap();
        fs::write(&stale_same_pid, b"half").unwrap();
        // Another file's temp and look-alikes are none of this write's business.
        let other = dir.path().join(".state.json.gatekeeper-tmp-1");
        fs::write(&other, b"other").unwrap();
        fs::write(dir.path().join("gatekeeper.yml.bak"), b"keep").unwrap();

        assert_eq!(write(&target, b"new").unwrap(), Written::Renamed);

        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(
            names_in(dir.path()),
            [
                ".state.json.gatekeeper-tmp-1",
                "gatekeeper.yml",
                "gatekeeper.yml.bak"
            ]
        );
    }

    #[test]
    fn temp_names_are_hidden_and_never_loaded_by_traefik() {
        let prefix = temp_prefix(std::ffi::OsStr::new("gatekeeper.yml"));
        assert_eq!(prefix, ".gatekeeper.yml.gatekeeper-tmp-");
        let mut name = prefix;
        name.push("1");
        let name = name.to_string_lossy().into_owned();
        assert!(name.starts_with('.'));
        for extension in [".yml", ".yaml", ".toml", ".json"] {
            assert!(!name.ends_with(extension), "{name}");
        }
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        let (dir, name) = split(Path::new("gatekeeper.yml")).unwrap();
        assert_eq!(dir, Path::new("."));
        assert_eq!(name, "gatekeeper.yml");
        let (dir, _) = split(Path::new("/data/traefik/gatekeeper.yml")).unwrap();
        assert_eq!(dir, Path::new("/data/traefik"));
    }

    #[cfg(unix)]
    #[test]
    fn existing_permissions_are_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("gatekeeper.yml");
        fs::write(&target, b"old").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).unwrap();

        assert_eq!(write(&target, b"new").unwrap(), Written::Renamed);

        let mode = fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn busy_and_cross_device_renames_fall_back_to_in_place() {
        // EBUSY (16): renaming onto a single-file bind mount; EXDEV (18): across mounts.
        #[cfg(target_os = "linux")]
        for raw in [16, 18] {
            let error = io::Error::from_raw_os_error(raw);
            assert!(rename_failure_allows_in_place(&error), "{error}");
        }
        assert!(rename_failure_allows_in_place(&io::Error::from(
            io::ErrorKind::ResourceBusy
        )));
        assert!(rename_failure_allows_in_place(&io::Error::from(
            io::ErrorKind::CrossesDevices
        )));
    }

    #[test]
    fn other_rename_failures_do_not_fall_back() {
        for kind in [
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::NotFound,
            io::ErrorKind::IsADirectory,
            io::ErrorKind::StorageFull,
        ] {
            assert!(!rename_failure_allows_in_place(&io::Error::from(kind)));
        }
        #[cfg(target_os = "linux")]
        for raw in [1, 2, 13, 21, 28, 39] {
            let error = io::Error::from_raw_os_error(raw);
            assert!(!rename_failure_allows_in_place(&error), "{error}");
        }
    }

    #[test]
    fn only_permission_problems_with_the_temp_file_fall_back() {
        assert!(temp_refusal_allows_in_place(&io::Error::from(
            io::ErrorKind::PermissionDenied
        )));
        assert!(temp_refusal_allows_in_place(&io::Error::from(
            io::ErrorKind::ReadOnlyFilesystem
        )));
        assert!(!temp_refusal_allows_in_place(&io::Error::from(
            io::ErrorKind::StorageFull
        )));
        assert!(!temp_refusal_allows_in_place(&io::Error::from(
            io::ErrorKind::AlreadyExists
        )));
    }

    #[test]
    fn in_place_rewrite_truncates_and_keeps_the_inode() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dynamic-whitelist.yml");
        fs::write(&target, b"a much longer old content\n").unwrap();
        let before = fs::metadata(&target).unwrap();

        rewrite_in_place(&target, b"short\n", Access::Default).unwrap();

        assert_eq!(fs::read(&target).unwrap(), b"short\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let after = fs::metadata(&target).unwrap();
            assert_eq!(
                before.ino(),
                after.ino(),
                "a bind mount needs the same inode"
            );
        }
        #[cfg(not(unix))]
        let _ = before;
        assert_eq!(names_in(dir.path()), ["dynamic-whitelist.yml"]);
    }

    #[test]
    fn in_place_fallback_reports_written_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dynamic-whitelist.yml");
        fs::write(&target, b"old").unwrap();

        let written = in_place_fallback(
            &target,
            b"new",
            io::Error::from(io::ErrorKind::ResourceBusy),
            Access::Default,
        );

        assert_eq!(written.unwrap(), Written::InPlace);
        assert_eq!(fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn in_place_never_creates_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("absent.yml");

        let error = in_place_fallback(
            &target,
            b"x",
            io::Error::from_raw_os_error(16),
            Access::Default,
        )
        .unwrap_err();

        assert!(matches!(error, WriteError::InPlace { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("cannot rewrite {} in place", target.display())),
            "{message}"
        );
        assert!(!target.exists());
    }

    #[cfg(unix)]
    #[test]
    fn read_only_directory_with_a_writable_file_is_rewritten_in_place() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dynamic-whitelist.yml");
        fs::write(&target, b"old").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o555)).unwrap();
        // Root ignores directory permissions, so there is nothing to observe.
        let probe = dir.path().join("probe");
        let privileged = fs::write(&probe, b"").is_ok();

        let written = write(&target, b"new");

        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let expected = if privileged {
            Written::Renamed
        } else {
            Written::InPlace
        };
        assert_eq!(written.unwrap(), expected);
        assert_eq!(fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn the_in_place_warning_is_given_once_per_path() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("a.yml");
        let second = dir.path().join("b.yml");
        assert!(first_in_place_for(&first));
        assert!(!first_in_place_for(&first));
        assert!(first_in_place_for(&second));
    }

    #[cfg(unix)]
    #[test]
    fn messages_are_lowercase() {
        let error = WriteError::CreateTemp {
            path: PathBuf::from("/x/.y.gatekeeper-tmp-1"),
            error: io::Error::from_raw_os_error(13),
        };
        let message = error.to_string();
        assert!(
            message
                .starts_with("cannot create temp file /x/.y.gatekeeper-tmp-1: permission denied"),
            "{message}"
        );
    }

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("run mkfifo");
        assert!(status.success());
    }

    /// Runs `f` on a thread and waits for it; a FIFO open that blocks is failed with a message and
    /// unblocked (by opening the other end) so the write lock is released for the other tests.
    fn without_blocking_on<T: Send + 'static>(
        fifo: &Path,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(value) => value,
            Err(_) => {
                let _ = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(fifo);
                let _ = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(fifo);
                panic!("the write blocked on the FIFO at {}", fifo.display());
            }
        }
    }

    #[test]
    fn a_fifo_at_the_target_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("gatekeeper.yml");
        mkfifo(&target);
        let path = target.clone();
        let error = without_blocking_on(&target, move || {
            write_if_changed_unwatched(&path, b"x").unwrap_err()
        });
        match &error {
            WriteError::NotAFile { path, what } => {
                assert_eq!(path, &target);
                assert_eq!(*what, FileKind::Fifo);
            }
            other => panic!("expected NotAFile, got {other:?}"),
        }
        assert_eq!(
            error.to_string(),
            format!(
                "cannot write {}: it is a FIFO (named pipe), not a regular file; remove it, or \
                 point the output elsewhere",
                target.display()
            )
        );
        assert!(error.io_error().is_none());
        // Left as it was, and no temp file behind.
        assert!(fs::symlink_metadata(&target).unwrap().file_type().is_fifo());
        assert_eq!(names_in(dir.path()), ["gatekeeper.yml"]);
    }

    #[test]
    fn the_in_place_rewrite_refuses_a_fifo_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dynamic-whitelist.yml");
        mkfifo(&target);
        let path = target.clone();
        let error = without_blocking_on(&target, move || {
            in_place_fallback(
                &path,
                b"x",
                io::Error::from_raw_os_error(16),
                Access::Default,
            )
            .unwrap_err()
        });
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("cannot rewrite {} in place", target.display()))
                && message.ends_with("it is a FIFO (named pipe), not a regular file"),
            "{message}"
        );
    }

    #[test]
    fn other_special_files_are_refused_naming_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("taken");
        fs::create_dir(&target).unwrap();
        let error = write_if_changed(&target, b"x").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("it is a directory, not a regular file"),
            "{error}"
        );
        let socket = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let error = write_if_changed(&socket, b"x").unwrap_err();
        assert!(
            matches!(
                error,
                WriteError::NotAFile {
                    what: FileKind::Socket,
                    ..
                }
            ),
            "{error:?}"
        );
        let error = write_if_changed(Path::new("/dev/null"), b"x").unwrap_err();
        assert!(error.to_string().contains("a character device"), "{error}");
    }

    #[test]
    fn the_in_place_rewrite_does_not_follow_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.conf");
        fs::write(&victim, b"precious\n").unwrap();
        let target = dir.path().join("dynamic-whitelist.yml");
        std::os::unix::fs::symlink(&victim, &target).unwrap();

        let error = in_place_fallback(
            &target,
            b"x",
            io::Error::from_raw_os_error(16),
            Access::Default,
        )
        .unwrap_err();

        assert_eq!(fs::read(&victim).unwrap(), b"precious\n");
        assert!(
            fs::symlink_metadata(&target)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("cannot rewrite {} in place", target.display()))
                && message.ends_with("it is a symbolic link, which gatekeeper does not follow"),
            "{message}"
        );
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_by_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere.yml");
        fs::write(&elsewhere, b"same").unwrap();
        let target = dir.path().join("gatekeeper.yml");
        std::os::unix::fs::symlink(&elsewhere, &target).unwrap();

        // Even with the content it points at: the link is not read through.
        assert_eq!(
            write_if_changed(&target, b"same").unwrap(),
            Written::Renamed
        );

        assert!(fs::symlink_metadata(&target).unwrap().is_file());
        assert_eq!(fs::read(&target).unwrap(), b"same");
        assert_eq!(fs::read(&elsewhere).unwrap(), b"same");
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_private_file_is_created_for_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("state.json");
        let shared = dir.path().join("gatekeeper.yml");
        assert_eq!(
            write_private_if_changed(&private, b"{}").unwrap(),
            Written::Renamed
        );
        write_if_changed(&shared, b"x").unwrap();
        assert_eq!(mode_of(&private), 0o600);
        // The process default (0666 minus the umask, which owner-writable at least keeps).
        assert_eq!(mode_of(&shared) & 0o600, 0o600);
    }

    #[test]
    fn an_existing_private_file_loses_group_and_world_bits() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state.json");
        fs::write(&target, b"{}").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();

        // Unchanged content is rewritten too: the tightening must not wait for the next grant.
        assert_eq!(
            write_private_if_changed(&target, b"{}").unwrap(),
            Written::Renamed
        );
        assert_eq!(mode_of(&target), 0o600);
        assert_eq!(
            write_private_if_changed(&target, b"{}").unwrap(),
            Written::Unchanged
        );
        // An owner-only choice is kept.
        fs::set_permissions(&target, fs::Permissions::from_mode(0o400)).unwrap();
        write_private_if_changed(&target, b"{\"a\":1}").unwrap();
        assert_eq!(mode_of(&target), 0o400);

        assert_eq!(kept_mode(&target, 0o100640, Access::Private), 0o600);
        assert_eq!(kept_mode(&target, 0o100640, Access::Default), 0o640);
    }

    #[test]
    fn the_in_place_rewrite_of_a_private_file_tightens_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state.json");
        fs::write(&target, b"old").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o666)).unwrap();
        rewrite_in_place(&target, b"new", Access::Private).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(mode_of(&target), 0o600);
    }

    #[test]
    fn read_regular_follows_links_and_reports_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state.json");
        fs::write(&file, b"{}").unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let fifo = dir.path().join("fifo.json");
        mkfifo(&fifo);

        assert!(matches!(read_regular(&link).unwrap(), Found::File(b) if b == b"{}"));
        assert!(matches!(
            read_regular(&dir.path().join("absent")).unwrap(),
            Found::Missing
        ));
        let path = fifo.clone();
        let found = without_blocking_on(&fifo, move || read_regular(&path).unwrap());
        assert!(matches!(found, Found::Not(FileKind::Fifo)), "{found:?}");
        assert!(matches!(
            read_regular(dir.path()).unwrap(),
            Found::Not(FileKind::Directory)
        ));
    }
}
