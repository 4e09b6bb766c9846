//! An attempt's result file, `$TASKD_RESULT_FILE`: created empty before the spawn, read and
//! removed once the task's process group has ended.
//!
//! Where it lives: `<root>/` (the daemon's, mode 0711: no one else may list or change it)
//! holds one directory per user that runs tasks, `<root>/<uid>/` (that user's, 0700), and in
//! it one file per attempt with a random name (the user's, 0600). Only the daemon and the
//! task's user can reach a task's file.
//!
//! The root is on a tmpfs where there is one: `/dev/shm/taskd-results-<random>`, made by
//! [`ResultDir::prepare`] at start-up (`mkdir` fails on a name that exists: no one else's
//! directory is taken over; `/dev/shm`'s sticky bit keeps others from removing or renaming
//! it), with the link `<state_dir>/results` naming it. A file made and removed there costs a
//! fraction of what it costs on a disk's file system, where creating an inode is the bulk of
//! a result file's cost to a short task (see docs/performance.md, "Result files"). Where no
//! tmpfs is at hand, or the state directory is one already, the root is
//! `<state_dir>/results` itself; a task that runs as another user then gets the search bit
//! on the state directory (`o+x`, never `r`): it may pass through to its own directory, and
//! list nothing.
//!
//! The task owns its directory, so it may put anything in its file's place. The file is
//! therefore read without trusting the path: `O_NOFOLLOW` (a symbolic link is refused,
//! never followed), `O_NONBLOCK` (a FIFO cannot hang the daemon), then `fstat` on what was
//! opened: a regular file owned by the task's user, or the attempt's result is refused. The
//! read is bounded by `max_result` (one byte more, to tell "too big"), whatever the file
//! claims its size is.
//!
//! On a tmpfs the file is removed where it was read, on the dispatch thread: there an
//! `unlink` costs a few microseconds, less than handing it to another thread (a wake-up and
//! two context switches). On a disk's file system the removal is a directory write, and it
//! goes to a blocking thread, off the dispatch path (a create and a remove per attempt are
//! most of what a result costs a tiny task: see docs/performance.md).
//!
//! A daemon that crashed leaves files behind: [`ResultDir::reset`] removes the root (the
//! link's target too) at start-up, before any task runs; a daemon that stops removes it
//! ([`ResultDir::remove`]).

use std::collections::HashSet;
use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use nix::unistd::{Gid, Uid};

use super::setup::host;
use super::UserSpec;

/// The directory of result files (`<state_dir>/results`) and the per-user directories made
/// in it so far.
#[derive(Debug)]
pub struct ResultDir {
    root: PathBuf,
    /// Users whose directory exists (made by this daemon since its start).
    made: Mutex<HashSet<u32>>,
    /// Whether the root is on a tmpfs, where a file is removed in place ([`ResultFile`]'s
    /// drop); learnt once the root exists.
    tmpfs: OnceLock<bool>,
}

/// What a task returned, as the executor found it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Returned {
    /// No result: an empty (or missing) file, no `result` in a worker's answer, or `null`.
    #[default]
    Nothing,
    /// A JSON value (never `null`).
    Value(serde_json::Value),
    /// More than `max_result` bytes: at least this many.
    TooBig { bytes: u64 },
    /// The result file was not what taskd made (a symbolic link, a FIFO, another user's
    /// file) or could not be read: why.
    Unreadable(String),
}

impl Returned {
    /// A result file's content: valid JSON is that JSON; other content is a JSON string of
    /// the text (invalid UTF-8 replaced by U+FFFD) without its trailing newlines, as `$(…)`
    /// takes a command's output; nothing (or only newlines) is no result.
    pub fn from_file_bytes(bytes: &[u8]) -> Returned {
        if bytes.is_empty() {
            return Returned::Nothing;
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) {
            return Returned::of(Some(v));
        }
        let mut end = bytes.len();
        while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        if end == 0 {
            return Returned::Nothing;
        }
        Returned::Value(serde_json::Value::String(
            String::from_utf8_lossy(&bytes[..end]).into_owned(),
        ))
    }

    /// A worker's `result`, bounded by `max` bytes of compact JSON.
    pub fn from_answer(value: Option<serde_json::Value>, max: u64) -> Returned {
        match Returned::of(value) {
            Returned::Value(v) => {
                let bytes = serde_json::to_string(&v).map_or(0, |s| s.len()) as u64;
                if bytes > max {
                    Returned::TooBig { bytes }
                } else {
                    Returned::Value(v)
                }
            }
            other => other,
        }
    }

    /// `null` is no result.
    fn of(value: Option<serde_json::Value>) -> Returned {
        match value {
            None | Some(serde_json::Value::Null) => Returned::Nothing,
            Some(v) => Returned::Value(v),
        }
    }
}

/// Where an attempt's result file goes, and how big it may be. Part of a [`super::Spec`].
#[derive(Clone, Debug)]
pub struct ResultSpec {
    pub dir: Arc<ResultDir>,
    /// `max_result`.
    pub max_bytes: u64,
}

impl ResultDir {
    pub fn new(root: PathBuf) -> Arc<ResultDir> {
        Arc::new(ResultDir {
            root,
            made: Mutex::new(HashSet::new()),
            tmpfs: OnceLock::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The root of the result files of the daemon whose state directory is `state_dir`:
    /// the tmpfs directory `<state_dir>/results` links to (see [`ResultDir::prepare`]), or
    /// `<state_dir>/results` itself.
    pub fn at(state_dir: &Path) -> Arc<ResultDir> {
        let link = state_dir.join(RESULTS);
        ResultDir::new(linked_root(&link).unwrap_or(link))
    }

    /// At start-up, after [`ResultDir::reset`]: puts the root on a tmpfs when the state
    /// directory is not on one and `/dev/shm` is (a fresh directory there, named by the link
    /// `<state_dir>/results`); otherwise the root is `<state_dir>/results`, made on first
    /// use. Returns the root. Any failure leaves the root in the state directory, which
    /// works everywhere, only slower.
    pub fn prepare(state_dir: &Path) -> PathBuf {
        prepare_in(state_dir, Path::new(SHM))
    }

    /// Removes what a previous daemon of `state_dir` left (the result files of the attempts
    /// it was running when it died, and their users' directories): `<state_dir>/results`,
    /// and the tmpfs directory it links to. Call before any task runs.
    pub fn reset(state_dir: &Path) -> io::Result<()> {
        reset_in(state_dir, Path::new(SHM))
    }

    /// A stopping daemon's clean-up, once no task runs: [`ResultDir::reset`], so that the
    /// tmpfs keeps nothing of a state directory that may be removed next.
    pub fn remove(state_dir: &Path) {
        if let Err(e) = ResultDir::reset(state_dir) {
            tracing::warn!(error = %e, "could not remove the result files' directory");
        }
    }

    /// The directory of `uid`'s result files, made (with the root) on first use.
    fn user_dir(&self, uid: u32, gid: u32) -> io::Result<PathBuf> {
        let dir = self.root.join(uid.to_string());
        if self.made.lock().expect("not poisoned").contains(&uid) {
            return Ok(dir);
        }
        let own = uid == host().euid;
        make_dir(&self.root, 0o711)?;
        self.tmpfs.get_or_init(|| on_tmpfs(&self.root));
        if !own && self.root.file_name() == Some(RESULTS.as_ref()) {
            // The task's user must pass through the state directory to reach its own (a
            // root on the tmpfs is reached through the world-searchable `/dev/shm`).
            if let Some(state_dir) = self.root.parent() {
                let mode = std::fs::metadata(state_dir)?.mode() & 0o7777;
                if mode & 0o001 == 0 {
                    std::fs::set_permissions(state_dir, Permissions::from_mode(mode | 0o001))?;
                }
            }
        }
        make_dir(&dir, 0o700)?;
        if !own {
            // Nobody but the daemon can write in the root: this path is the directory just
            // made (or checked), not something put in its place.
            nix::unistd::chown(&dir, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
        }
        self.made.lock().expect("not poisoned").insert(uid);
        Ok(dir)
    }

    /// Forget the directories made: they were removed under the daemon.
    fn forget(&self) {
        self.made.lock().expect("not poisoned").clear();
    }
}

/// The name of the result files' directory (or of the link to it) in the state directory.
const RESULTS: &str = "results";
/// Where a tmpfs is found on most Linux systems, writable by every user (sticky).
const SHM: &str = "/dev/shm";
/// The prefix of a result root's name in [`SHM`].
const SHM_PREFIX: &str = "taskd-results-";

/// [`ResultDir::prepare`] with the tmpfs at `base`.
fn prepare_in(state_dir: &Path, base: &Path) -> PathBuf {
    let link = state_dir.join(RESULTS);
    match make_shm_root(state_dir, base) {
        Ok(Some(root)) => match std::os::unix::fs::symlink(&root, &link) {
            Ok(()) => root,
            Err(e) => {
                tracing::debug!(error = %e, link = %link.display(), "result files stay in the state directory");
                let _ = std::fs::remove_dir(&root);
                link
            }
        },
        Ok(None) => link,
        Err(e) => {
            tracing::debug!(error = %e, "result files stay in the state directory: no tmpfs directory could be made");
            link
        }
    }
}

/// [`ResultDir::reset`] with the tmpfs at `base`.
fn reset_in(state_dir: &Path, base: &Path) -> io::Result<()> {
    let link = state_dir.join(RESULTS);
    if let Some(root) = linked_root_in(&link, base) {
        gone(std::fs::remove_dir_all(&root))?;
    }
    // The link itself (remove_dir_all never follows it), or a directory of result files.
    gone(std::fs::remove_dir_all(&link))
}

/// NotFound is done.
fn gone(removed: io::Result<()>) -> io::Result<()> {
    match removed {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn on_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false)
}

/// What `link` names, when it is a link to a result root in `base` ([`SHM`]) that belongs
/// to this daemon's user: a link to anything else is never followed (the clean-up would
/// remove what it points at).
fn linked_root(link: &Path) -> Option<PathBuf> {
    linked_root_in(link, Path::new(SHM))
}

fn linked_root_in(link: &Path, base: &Path) -> Option<PathBuf> {
    let target = std::fs::read_link(link).ok()?;
    let name = target.file_name()?.to_str()?;
    if target.parent()? != base || !name.starts_with(SHM_PREFIX) {
        return None;
    }
    let m = std::fs::symlink_metadata(&target).ok()?;
    (m.is_dir() && m.uid() == host().euid).then_some(target)
}

/// A fresh root in `base` when `state_dir` is not on a tmpfs and `base` is one: `None`
/// when the state directory is the better place.
fn make_shm_root(state_dir: &Path, base: &Path) -> io::Result<Option<PathBuf>> {
    if on_tmpfs(state_dir) || !on_tmpfs(base) {
        return Ok(None);
    }
    for _ in 0..4 {
        let root = base.join(format!("{SHM_PREFIX}{:016x}", rand::random::<u64>()));
        // Never an existing directory: one someone else made could be theirs to change.
        match DirBuilder::new().mode(0o711).create(&root) {
            Ok(()) => {
                std::fs::set_permissions(&root, Permissions::from_mode(0o711))?;
                return Ok(Some(root));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "no free name for a directory in {}",
        base.display()
    )))
}

/// Creates `dir` if missing (a directory of this daemon's user, not a link to one) and
/// gives it `mode`, whatever the umask.
fn make_dir(dir: &Path, mode: u32) -> io::Result<()> {
    match DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if m.uid() != host().euid {
        // A root in a shared directory, removed under the daemon and made again by another
        // user: not a place for results.
        return Err(io::Error::other(format!(
            "{} belongs to another user (uid {})",
            dir.display(),
            m.uid()
        )));
    }
    if m.mode() & 0o7777 != mode {
        std::fs::set_permissions(dir, Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// One attempt's result file, removed when read ([`ResultFile::take`]) or dropped.
pub(crate) struct ResultFile {
    path: PathBuf,
    uid: u32,
    max: u64,
    /// Removed in place when dropped (its directory is on a tmpfs), not on a blocking thread.
    cheap_removal: bool,
}

impl ResultFile {
    /// Creates the empty file for an attempt that runs as `user` (the daemon's user when
    /// `None`): mode 0600, owned by that user.
    pub(crate) fn create(spec: &ResultSpec, user: Option<&UserSpec>) -> io::Result<ResultFile> {
        let h = host();
        let (uid, gid) = user.map_or((h.euid, h.egid), |u| (u.uid, u.gid));
        let mut tries = 0;
        loop {
            tries += 1;
            let dir = spec.dir.user_dir(uid, gid)?;
            let path = dir.join(format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            ));
            let opened = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path);
            match opened {
                Ok(file) => {
                    if uid != h.euid {
                        nix::unistd::fchown(
                            std::os::fd::AsRawFd::as_raw_fd(&file),
                            Some(Uid::from_raw(uid)),
                            Some(Gid::from_raw(gid)),
                        )?;
                    }
                    // Whatever the umask took away: the user reads and writes it. Checked
                    // first: a change of mode is an inode write, for nothing with the usual
                    // umask (it leaves 0600 alone).
                    if file.metadata()?.mode() & 0o7777 != 0o600 {
                        file.set_permissions(Permissions::from_mode(0o600))?;
                    }
                    return Ok(ResultFile {
                        path,
                        uid,
                        max: spec.max_bytes,
                        cheap_removal: spec.dir.tmpfs.get() == Some(&true),
                    });
                }
                // A name the task's user put there first: take another.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 4 => {}
                // The directories were removed under the daemon: make them again.
                Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 4 => spec.dir.forget(),
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// What the attempt returned; the file is removed. While the daemon (EMFILE) or the
    /// system (ENFILE) is out of descriptors the file is not opened: it waits and tries
    /// again, as a start does, rather than lose a task's result to a passing shortage.
    pub(crate) async fn take(self) -> Returned {
        let mut delay = crate::backoff::Doubling::new(
            std::time::Duration::from_millis(5),
            std::time::Duration::from_millis(500),
        );
        // At most about a minute: a shortage that lasts longer is reported as the error.
        for _ in 0..128 {
            match read_result(&self.path, self.uid, self.max) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    tokio::time::sleep(delay.next_delay()).await;
                }
                Err(e) => {
                    return Returned::Unreadable(format!(
                        "the result file could not be opened: {e}"
                    ))
                }
                Ok(r) => return r,
            }
        }
        Returned::Unreadable(
            "the result file could not be opened: the daemon stayed out of file descriptors".into(),
        )
        // Dropped here: removed.
    }
}

impl Drop for ResultFile {
    fn drop(&mut self) {
        // Whatever is at the path now (the file, or what the task put in its place: unlink
        // never follows a link). On a tmpfs here and now: a few microseconds, less than a
        // hand-over to another thread. Elsewhere, in the daemon, on a blocking thread: the
        // removal is a directory write on a disk that nothing waits for, and the dispatch
        // thread has the next task to start. (Files a stopping daemon had no time to remove
        // go at its next start, see [`ResultDir::reset`].)
        let path = std::mem::take(&mut self.path);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if !self.cheap_removal => {
                rt.spawn_blocking(move || {
                    let _ = std::fs::remove_file(&path);
                });
            }
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Reads the result file at `path`, which must be a regular file owned by `uid`, up to
/// `max` bytes. `Err`: it could not be opened (the caller tells a shortage of descriptors
/// from the rest).
fn read_result(path: &Path, uid: u32, max: u64) -> io::Result<Returned> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        // The task removed it: it returned nothing.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Returned::Nothing),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(Returned::Unreadable(
                "the result file was replaced by a symbolic link, which taskd does not follow"
                    .into(),
            ))
        }
        Err(e) => return Err(e),
    };
    Ok(read_file(file, uid, max))
}

/// The opened result file's content, checked.
fn read_file(file: std::fs::File, uid: u32, max: u64) -> Returned {
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Returned::Unreadable(format!("the result file could not be read: {e}")),
    };
    if !meta.file_type().is_file() {
        return Returned::Unreadable(format!(
            "the result file was replaced by {}; taskd reads only a regular file",
            kind_of(&meta.file_type())
        ));
    }
    if meta.uid() != uid {
        return Returned::Unreadable(format!(
            "the result file was replaced by a file of another user (uid {}); taskd reads only the task user's own",
            meta.uid()
        ));
    }
    if meta.len() > max {
        return Returned::TooBig { bytes: meta.len() };
    }
    if meta.len() == 0 {
        // Nothing written (most tasks): not read, which would also update its access time,
        // an inode write for a file about to be removed.
        return Returned::Nothing;
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    if let Err(e) = file.take(max.saturating_add(1)).read_to_end(&mut buf) {
        return Returned::Unreadable(format!("the result file could not be read: {e}"));
    }
    if buf.len() as u64 > max {
        return Returned::TooBig {
            bytes: buf.len() as u64,
        };
    }
    Returned::from_file_bytes(&buf)
}

fn kind_of(file_type: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device"
    } else {
        "something that is not a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// [`ResultFile::take`], waited for, on a runtime that outlives the test (its blocking
    /// threads remove the file afterwards: see [`gone_soon`]).
    fn take(file: ResultFile) -> Returned {
        static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        RT.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime")
        })
        .block_on(file.take())
    }

    /// Whether nothing is left at `path` within a few seconds.
    fn gone_soon(path: &Path) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::symlink_metadata(path).is_ok() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    fn spec(dir: &Path, max: u64) -> ResultSpec {
        ResultSpec {
            dir: ResultDir::new(dir.join("results")),
            max_bytes: max,
        }
    }

    fn returned(content: &[u8], max: u64) -> Returned {
        let tmp = tempfile::tempdir().unwrap();
        let f = ResultFile::create(&spec(tmp.path(), max), None).unwrap();
        std::fs::write(f.path(), content).unwrap();
        take(f)
    }

    #[test]
    fn content_becomes_json_text_or_nothing() {
        assert_eq!(
            returned(b"{\"b\": [1, 2.50], \"a\": null}\n", 100),
            Returned::Value(serde_json::from_str(r#"{"a":null,"b":[1,2.50]}"#).unwrap()),
            "JSON as written (numbers keep their text), whitespace aside"
        );
        assert_eq!(returned(b"42", 100), Returned::Value(json!(42)));
        assert_eq!(
            returned(b"12345678901234567890123", 100),
            Returned::Value(serde_json::from_str("12345678901234567890123").unwrap()),
            "big numbers keep their digits"
        );
        assert_eq!(
            returned(b"hello world\n\n", 100),
            Returned::Value(json!("hello world")),
            "text without its trailing newlines"
        );
        assert_eq!(
            returned(b"line 1\nline 2", 100),
            Returned::Value(json!("line 1\nline 2"))
        );
        assert_eq!(
            returned(b"caf\xe9 \xff!", 100),
            Returned::Value(json!("caf\u{fffd} \u{fffd}!")),
            "invalid UTF-8 is replaced"
        );
        assert_eq!(returned(b"", 100), Returned::Nothing);
        assert_eq!(returned(b"\n", 100), Returned::Nothing);
        assert_eq!(
            returned(b"null", 100),
            Returned::Nothing,
            "null is no result"
        );
    }

    #[test]
    fn a_result_over_the_limit_is_too_big() {
        assert_eq!(
            returned(&[b'x'; 10], 10),
            Returned::Value(json!("xxxxxxxxxx"))
        );
        assert_eq!(returned(&[b'x'; 11], 10), Returned::TooBig { bytes: 11 });
        assert_eq!(returned(b"1", 0), Returned::TooBig { bytes: 1 });
    }

    #[test]
    fn the_file_is_private_and_removed_after_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let s = spec(tmp.path(), 100);
        let f = ResultFile::create(&s, None).unwrap();
        let path = f.path().to_path_buf();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&tmp.path().join("results")), 0o711);
        assert_eq!(std::fs::read(&path).unwrap(), b"", "created empty");
        let g = ResultFile::create(&s, None).unwrap();
        assert_ne!(g.path(), path, "each attempt has a file of its own");
        assert_eq!(take(f), Returned::Nothing);
        assert!(gone_soon(&path), "removed once read");
        let other = g.path().to_path_buf();
        drop(g);
        assert!(!other.exists(), "removed when dropped unread");
    }

    #[test]
    fn a_file_swapped_for_something_else_is_refused_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, "\"the daemon's secret\"").unwrap();
        let s = spec(tmp.path(), 100);

        let f = ResultFile::create(&s, None).unwrap();
        std::fs::remove_file(f.path()).unwrap();
        std::os::unix::fs::symlink(&secret, f.path()).unwrap();
        let path = f.path().to_path_buf();
        match take(f) {
            Returned::Unreadable(why) => assert!(why.contains("symbolic link"), "{why}"),
            other => panic!("a symlink was followed: {other:?}"),
        }
        assert!(gone_soon(&path), "the link is removed");
        assert!(secret.exists(), "its target is left alone");

        let f = ResultFile::create(&s, None).unwrap();
        std::fs::remove_file(f.path()).unwrap();
        nix::unistd::mkfifo(f.path(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        match take(f) {
            Returned::Unreadable(why) => assert!(why.contains("FIFO"), "{why}"),
            other => panic!("{other:?}"),
        }

        let f = ResultFile::create(&s, None).unwrap();
        std::fs::remove_file(f.path()).unwrap();
        std::fs::create_dir(f.path()).unwrap();
        match take(f) {
            Returned::Unreadable(why) => assert!(why.contains("directory"), "{why}"),
            other => panic!("{other:?}"),
        }

        let f = ResultFile::create(&s, None).unwrap();
        std::fs::remove_file(f.path()).unwrap();
        assert_eq!(take(f), Returned::Nothing, "a removed file is no result");
    }

    #[test]
    fn reset_removes_what_a_crashed_daemon_left() {
        let tmp = tempfile::tempdir().unwrap();
        let s = spec(tmp.path(), 100);
        let f = ResultFile::create(&s, None).unwrap();
        let path = f.path().to_path_buf();
        std::mem::forget(f);
        assert!(path.exists());
        ResultDir::reset(tmp.path()).unwrap();
        assert!(!path.exists());
        assert!(!tmp.path().join("results").exists());
        ResultDir::reset(tmp.path()).unwrap();
    }

    /// A tmpfs to stand for `/dev/shm`: a directory in it (a visible skip without one).
    fn shm_base() -> Option<tempfile::TempDir> {
        if !on_tmpfs(Path::new(SHM)) {
            eprintln!("SKIPPED test: {SHM} is not a tmpfs here (result roots stay in the state directory)");
            return None;
        }
        Some(tempfile::tempdir_in(SHM).unwrap())
    }

    #[test]
    fn the_root_goes_on_the_tmpfs_behind_a_link_and_reset_removes_both() {
        let Some(base) = shm_base() else { return };
        let state = tempfile::tempdir().unwrap();
        if on_tmpfs(state.path()) {
            eprintln!("SKIPPED test: the temporary directory is a tmpfs already");
            return;
        }
        let root = prepare_in(state.path(), base.path());
        assert_eq!(root.parent(), Some(base.path()), "{}", root.display());
        let link = state.path().join("results");
        assert_eq!(std::fs::read_link(&link).unwrap(), root);
        assert_eq!(linked_root_in(&link, base.path()), Some(root.clone()));
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&root), 0o711);

        let s = ResultSpec {
            dir: ResultDir::new(root.clone()),
            max_bytes: 100,
        };
        let f = ResultFile::create(&s, None).unwrap();
        assert!(f.path().starts_with(&root));
        assert!(on_tmpfs(f.path().parent().unwrap()));
        assert_eq!(mode(f.path()), 0o600);
        assert_eq!(mode(f.path().parent().unwrap()), 0o700);
        std::fs::write(f.path(), "[1, 2]").unwrap();
        assert_eq!(take(f), Returned::Value(json!([1, 2])));

        // A crash: a file left behind, found again through the link.
        let left = ResultFile::create(&s, None).unwrap();
        let path = left.path().to_path_buf();
        std::mem::forget(left);
        reset_in(state.path(), base.path()).unwrap();
        assert!(
            !path.exists() && !root.exists(),
            "the tmpfs directory is removed"
        );
        assert!(std::fs::symlink_metadata(&link).is_err(), "and the link");
        let again = prepare_in(state.path(), base.path());
        assert_ne!(again, root, "a fresh name each start");
        reset_in(state.path(), base.path()).unwrap();
        assert_eq!(std::fs::read_dir(base.path()).unwrap().count(), 0);
    }

    #[test]
    fn on_a_tmpfs_the_file_is_removed_in_place_and_elsewhere_off_the_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let _inside = rt.enter();
        if let Some(base) = shm_base() {
            let s = ResultSpec {
                dir: ResultDir::new(base.path().join("root")),
                max_bytes: 100,
            };
            let f = ResultFile::create(&s, None).unwrap();
            assert!(f.cheap_removal, "{} is on a tmpfs", base.path().display());
            let path = f.path().to_path_buf();
            drop(f);
            assert!(
                std::fs::symlink_metadata(&path).is_err(),
                "removed by the drop itself, inside the runtime"
            );
        }
        let disk = tempfile::tempdir().unwrap();
        if on_tmpfs(disk.path()) {
            eprintln!("SKIPPED part: the temporary directory is a tmpfs");
            return;
        }
        let f = ResultFile::create(&spec(disk.path(), 100), None).unwrap();
        assert!(
            !f.cheap_removal,
            "not on a tmpfs: handed to a blocking thread"
        );
        let path = f.path().to_path_buf();
        drop(f);
        // The current-thread runtime runs its blocking pool on threads of its own.
        assert!(gone_soon(&path), "removed by a blocking thread");
    }

    #[test]
    fn a_link_to_anything_else_is_never_followed_nor_its_target_removed() {
        let Some(base) = shm_base() else { return };
        let state = tempfile::tempdir().unwrap();
        let link = state.path().join("results");
        // A directory elsewhere, and one in the base without the prefix.
        for target in [state.path().join("precious"), base.path().join("precious")] {
            std::fs::create_dir(&target).unwrap();
            std::fs::write(target.join("keep"), "x").unwrap();
            std::os::unix::fs::symlink(&target, &link).unwrap();
            assert_eq!(linked_root_in(&link, base.path()), None);
            reset_in(state.path(), base.path()).unwrap();
            assert!(
                target.join("keep").exists(),
                "{} left alone",
                target.display()
            );
            assert!(std::fs::symlink_metadata(&link).is_err(), "the link goes");
        }
    }

    #[test]
    fn a_root_of_another_user_is_refused() {
        // Made again under a name another user took meanwhile: not used.
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("taken");
        std::fs::create_dir(&root).unwrap();
        if host().euid != 0 {
            eprintln!("SKIPPED test: needs root to give a directory to another user");
            return;
        }
        nix::unistd::chown(&root, Some(Uid::from_raw(65534)), None).unwrap();
        let s = ResultSpec {
            dir: ResultDir::new(root.clone()),
            max_bytes: 100,
        };
        let e = ResultFile::create(&s, None).err().expect("refused");
        assert!(e.to_string().contains("belongs to another user"), "{e}");
    }

    #[test]
    fn a_workers_answer_is_bounded_as_compact_json() {
        let v = json!({"a": "xxxx"});
        let len = v.to_string().len() as u64;
        assert_eq!(
            Returned::from_answer(Some(v.clone()), len),
            Returned::Value(v.clone())
        );
        assert_eq!(
            Returned::from_answer(Some(v), len - 1),
            Returned::TooBig { bytes: len }
        );
        assert_eq!(Returned::from_answer(None, 10), Returned::Nothing);
        assert_eq!(
            Returned::from_answer(Some(serde_json::Value::Null), 10),
            Returned::Nothing
        );
    }
}
