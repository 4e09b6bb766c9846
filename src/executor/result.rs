//! An attempt's result file, `$TASKD_RESULT_FILE`: created empty before the spawn, read and
//! removed once the task's process group has ended.
//!
//! Where it lives: `<root>/` (in the state directory, the daemon's, mode 0711: no one else
//! may list or change it) holds one directory per user that runs tasks, `<root>/<uid>/`
//! (that user's, 0700), and in it one file per attempt with a random name (the user's,
//! 0600). Only the daemon and the task's user can reach a task's file. For a task that runs
//! as another user, the state directory gets the search bit for others (`o+x`, never `r`):
//! that user may pass through it to its own directory, and list nothing.
//!
//! The task owns its directory, so it may put anything in its file's place. The file is
//! therefore read without trusting the path: `O_NOFOLLOW` (a symbolic link is refused,
//! never followed), `O_NONBLOCK` (a FIFO cannot hang the daemon), then `fstat` on what was
//! opened: a regular file owned by the task's user, or the attempt's result is refused. The
//! read is bounded by `max_result` (one byte more, to tell "too big"), whatever the file
//! claims its size is.
//!
//! The file is removed on a blocking thread, off the dispatch path (a create and a remove per
//! attempt are most of what a result costs a tiny task: see docs/performance.md).
//!
//! A daemon that crashed leaves files behind: [`ResultDir::reset`] empties the root at
//! start-up, before any task runs.

use std::collections::HashSet;
use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes what a previous daemon left in `root` (the result files of the attempts it
    /// was running when it died, and their users' directories). Call before any task runs.
    pub fn reset(root: &Path) -> io::Result<()> {
        match std::fs::remove_dir_all(root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
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
        if !own {
            // The task's user must pass through the state directory to reach its own.
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

/// Creates `dir` if missing (a directory, not a link to one) and gives it `mode`, whatever
/// the umask.
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
        // never follows a link). In the daemon, on a blocking thread: the removal is a
        // directory write that nothing waits for, and the dispatch thread has the next task
        // to start. (Files a stopping daemon had no time to remove go at its next start, see
        // [`ResultDir::reset`].)
        let path = std::mem::take(&mut self.path);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || {
                    let _ = std::fs::remove_file(&path);
                });
            }
            Err(_) => {
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
        ResultDir::reset(s.dir.root()).unwrap();
        assert!(!path.exists());
        ResultDir::reset(s.dir.root()).unwrap();
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
