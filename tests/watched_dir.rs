//! What a directory watch sees of gatekeeper's Traefik-file writes. Traefik's file provider
//! watches its directory with fsnotify and re-reads the directory on every event there, and each
//! re-read starts its provider throttle (2 s); so the write must show the watch exactly one
//! event, the rename, and nothing of the temp file. Real inotify, real files.
#![cfg(target_os = "linux")]

use std::io;
use std::path::Path;

use gatekeeper::atomic_file::{TEMP_DIR, Written, write_if_changed, write_if_changed_unwatched};

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// What a directory watch with fsnotify's mask (what Traefik's file provider uses) sees of
/// `write` to `dir/gatekeeper.yml`: (name, mask) of each event.
fn watched_events(dir: &Path, write: impl FnOnce()) -> Vec<(String, u32)> {
    use std::os::unix::ffi::OsStrExt;
    let mask = libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_CREATE
        | libc::IN_ATTRIB
        | libc::IN_MODIFY
        | libc::IN_MOVE_SELF
        | libc::IN_DELETE
        | libc::IN_DELETE_SELF
        | libc::IN_CLOSE_WRITE;
    // SAFETY: plain syscalls on a descriptor this function owns and closes.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(fd >= 0, "inotify_init1: {}", io::Error::last_os_error());
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: `path` is a valid C string for the duration of the call.
    let wd = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), mask) };
    assert!(wd >= 0, "inotify_add_watch: {}", io::Error::last_os_error());
    write();
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    let mut events = Vec::new();
    let mut at = 0usize;
    let n = usize::try_from(n).unwrap_or(0);
    let header = std::mem::size_of::<libc::inotify_event>();
    while at + header <= n {
        let word = |i: usize| u32::from_ne_bytes(buf[at + i..at + i + 4].try_into().unwrap());
        let (event_mask, len) = (word(4), word(12) as usize);
        let name = &buf[at + header..at + header + len];
        let name = name.split(|b| *b == 0).next().unwrap_or_default();
        events.push((String::from_utf8_lossy(name).into_owned(), event_mask));
        at += header + len;
    }
    events
}

#[test]
fn a_watched_directory_sees_only_the_rename() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("gatekeeper.yml");
    write_if_changed_unwatched(&target, b"v0").unwrap();
    assert_eq!(names_in(dir.path()), [TEMP_DIR, "gatekeeper.yml"]);

    let events = watched_events(dir.path(), || {
        assert_eq!(
            write_if_changed_unwatched(&target, b"v1").unwrap(),
            Written::Renamed
        );
    });
    assert_eq!(events, [("gatekeeper.yml".to_string(), libc::IN_MOVED_TO)]);
    assert_eq!(std::fs::read(&target).unwrap(), b"v1");
    assert!(names_in(&dir.path().join(TEMP_DIR)).is_empty());

    // A temp file next to the target is seen being made and filled: every one of these
    // events makes Traefik re-read the directory and start its throttle.
    let events = watched_events(dir.path(), || {
        write_if_changed(&target, b"v2").unwrap();
    });
    assert!(
        events.len() > 1 && events.iter().any(|(_, m)| m & libc::IN_CREATE != 0),
        "{events:?}"
    );
}
