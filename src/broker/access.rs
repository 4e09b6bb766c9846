//! Why this process cannot use an embedded store, when the cause is file permissions: a
//! producer running as another user than the daemon (a web app) otherwise only hears
//! SQLite's "unable to open database file".
//!
//! It only inspects the file system (access(2), stat); it never changes a mode or an owner.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::{access, AccessFlags, Gid, Group, Uid, User};

/// The first of the store's directory, its database and the database's `-wal` and `-shm`
/// files that this process may not use, explained; `None` when permissions are not the
/// problem (or this process is root, which access(2) always lets through).
pub(crate) fn problem(db: &Path) -> Option<String> {
    let dir = db.parent()?;
    if access(dir, AccessFlags::X_OK).is_err() {
        return Some(explain(dir, "enter"));
    }
    let mut files = vec![db.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        files.push(PathBuf::from(name));
    }
    for f in files {
        if f.exists() {
            if access(&f, AccessFlags::R_OK | AccessFlags::W_OK).is_err() {
                return Some(explain(&f, "read and write"));
            }
        } else if access(dir, AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
            // SQLite creates the missing file next to the database.
            return Some(explain(dir, "create files in"));
        }
    }
    None
}

fn explain(path: &Path, need: &str) -> String {
    let me = user_name(Uid::current().as_raw());
    let what = match std::fs::metadata(path) {
        Ok(m) => format!(
            "owner {}:{}, mode {:04o}",
            user_name(m.uid()),
            group_name(m.gid()),
            m.mode() & 0o7777
        ),
        Err(_) => "its directory cannot be entered".to_string(),
    };
    format!(
        "permission denied on {} ({what}): user {me} may not {need} it. Enqueue through the \
         daemon's HTTP API instead, which needs no access to the store (`taskd submit \
         --server http://127.0.0.1:7070 QUEUE PAYLOAD`), or make {me} a member of the group \
         named by `state_group` in [taskd] (see docs/systemd.md, \"Enqueueing from local \
         apps\")",
        path.display()
    )
}

fn user_name(uid: u32) -> String {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid {uid}"))
}

fn group_name(gid: u32) -> String {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| format!("gid {gid}"))
}
