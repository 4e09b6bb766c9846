//! Running a task as another user: the lookup, in the daemon before the fork (the switch
//! itself happens in the child, see [`super::setup`]).

use std::ffi::CString;
use std::path::PathBuf;

use nix::unistd::{getgrouplist, Gid, Group, Uid, User};

use super::ExecError;

/// Who a task runs as, resolved before the fork so the child only makes system calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSpec {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary group included.
    pub groups: Vec<u32>,
    pub name: String,
    pub home: PathBuf,
}

impl UserSpec {
    /// Resolves `user` (a name, or a numeric uid) and optionally `group` (a name or a numeric
    /// gid; default: the user's primary group), with the user's supplementary groups.
    pub fn lookup(user: &str, group: Option<&str>) -> Result<UserSpec, ExecError> {
        let lookup_err = |what: String| move |source| ExecError::Lookup { what, source };
        let found = match User::from_name(user).map_err(lookup_err(format!("user {user}")))? {
            Some(u) => Some(u),
            None => match user.parse::<u32>() {
                Ok(uid) => User::from_uid(Uid::from_raw(uid))
                    .map_err(lookup_err(format!("user {user}")))?,
                Err(_) => None,
            },
        };
        let u = found.ok_or_else(|| ExecError::UnknownUser(user.to_string()))?;

        let gid = match group {
            None => u.gid,
            Some(g) => {
                let found = match Group::from_name(g).map_err(lookup_err(format!("group {g}")))? {
                    Some(grp) => Some(grp),
                    None => match g.parse::<u32>() {
                        Ok(gid) => Group::from_gid(Gid::from_raw(gid))
                            .map_err(lookup_err(format!("group {g}")))?,
                        Err(_) => None,
                    },
                };
                found
                    .ok_or_else(|| ExecError::UnknownGroup(g.to_string()))?
                    .gid
            }
        };

        let cname =
            CString::new(u.name.as_str()).map_err(|_| ExecError::UnknownUser(user.to_string()))?;
        let groups = getgrouplist(&cname, gid)
            .map_err(lookup_err(format!("the groups of user {}", u.name)))?;

        Ok(UserSpec {
            uid: u.uid.as_raw(),
            gid: gid.as_raw(),
            groups: groups.into_iter().map(Gid::as_raw).collect(),
            name: u.name,
            home: u.dir,
        })
    }

    /// True when the daemon already runs as exactly this uid and gid, so there is nothing
    /// to drop (and a non-root daemon could not call setgroups anyway).
    pub(crate) fn is_current(&self) -> bool {
        nix::unistd::geteuid().as_raw() == self.uid && nix::unistd::getegid().as_raw() == self.gid
    }
}
