//! What this machine's cgroup hierarchies offer, read without changing anything: the
//! cgroup2 and v1 mounts (`/proc/self/mountinfo`), this process's cgroup in each
//! (`/proc/self/cgroup`), where taskd could create its subtree and which limits it could
//! set there. Shared by `taskd check` (a queue limit the machine cannot apply is a config
//! error) and the executor's containment, which acts on it.

use std::path::{Path, PathBuf};

/// The controllers a queue's limits use: `memory_max`, `pids_max`, `cpu_weight`.
pub(crate) const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// One mount of a cgroup hierarchy.
pub(crate) struct Mount {
    pub(crate) point: PathBuf,
    /// The cgroup the mount shows at its root (`/` outside containers).
    root: String,
    pub(crate) v2: bool,
    /// v1: the mount options, among them the hierarchy's controllers.
    options: Vec<String>,
}

pub(crate) fn mounts() -> Vec<Mount> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next();
            let options = right.next().unwrap_or("");
            if fstype != "cgroup2" && fstype != "cgroup" {
                return None;
            }
            Some(Mount {
                point: PathBuf::from(unescape(left.get(4)?)),
                root: unescape(left.get(3)?),
                v2: fstype == "cgroup2",
                options: options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\` and three octal digits.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup in each hierarchy: `(controllers, path)`, controllers empty for v2.
pub(crate) fn own_cgroups() -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

/// The directory of cgroup `path` (as `/proc/self/cgroup` writes it) under `mount`.
fn dir_of(mount: &Mount, path: &str) -> PathBuf {
    let rel = if mount.root != "/" {
        path.strip_prefix(mount.root.as_str()).unwrap_or(path)
    } else {
        path
    };
    mount.point.join(rel.trim_start_matches('/'))
}

/// Whether `dir` is in a cgroup v2 file system.
pub(crate) fn is_cgroup2(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Whether this process may create cgroups in `dir`.
fn writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
        && nix::sys::statvfs::statvfs(dir)
            .is_ok_and(|s| !s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

/// Where taskd could put its subtree, and the limits it could set there.
pub(crate) struct Probe {
    /// The v2 cgroup taskd's subtree goes in.
    pub(crate) base: PathBuf,
    /// Controllers `base` offers (`cgroup.controllers`) of [`CONTROLLERS`].
    pub(crate) v2_offered: Vec<&'static str>,
    /// For the others: this process's own cgroup in a writable v1 hierarchy of that
    /// controller.
    pub(crate) v1: Vec<(&'static str, PathBuf)>,
}

impl Probe {
    /// Whether a limit on `controller` could be set.
    pub(crate) fn can_limit(&self, controller: &str) -> bool {
        self.v2_offered.contains(&controller) || self.v1.iter().any(|(c, _)| *c == controller)
    }
}

/// What taskd could use: under `root` (`cgroup_root`) or this process's own v2 cgroup.
/// `Err` says why no cgroup v2 hierarchy is writable.
pub(crate) fn probe(root: Option<&Path>) -> Result<Probe, String> {
    let mounts = mounts();
    let own = own_cgroups();
    let base = match root {
        Some(root) => {
            // A cgroup_root not made yet is created by the daemon in its parent.
            let existing = if root.exists() {
                root
            } else {
                root.parent().unwrap_or(root)
            };
            if !is_cgroup2(existing) {
                return Err(format!(
                    "cgroup_root {} is not in a cgroup v2 hierarchy",
                    root.display()
                ));
            }
            if !writable(existing) {
                return Err(format!("cgroup_root {} is not writable", root.display()));
            }
            root.to_path_buf()
        }
        None => {
            let Some(mount) = mounts.iter().find(|m| m.v2) else {
                return Err("no cgroup v2 hierarchy is mounted".into());
            };
            let path = own
                .iter()
                .find(|(c, _)| c.is_empty())
                .map(|(_, p)| p.as_str())
                .unwrap_or("/");
            let base = dir_of(mount, path);
            if !writable(&base) {
                return Err(format!(
                    "this process's cgroup {} is not writable (under systemd give the unit `Delegate=yes`; elsewhere set `cgroup_root` to a writable directory of a cgroup v2 hierarchy)",
                    base.display()
                ));
            }
            base
        }
    };
    let offered_text = std::fs::read_to_string(if base.exists() {
        base.join("cgroup.controllers")
    } else {
        base.parent()
            .unwrap_or(&base)
            .join("cgroup.subtree_control")
    })
    .unwrap_or_default();
    let v2_offered: Vec<&'static str> = CONTROLLERS
        .into_iter()
        .filter(|c| offered_text.split_whitespace().any(|o| o == *c))
        .collect();
    let mut v1 = Vec::new();
    for controller in CONTROLLERS {
        if v2_offered.contains(&controller) {
            continue;
        }
        let Some(mount) = mounts
            .iter()
            .find(|m| !m.v2 && m.options.iter().any(|o| o == controller))
        else {
            continue;
        };
        let path = own
            .iter()
            .find(|(c, _)| c.split(',').any(|c| c == controller))
            .map(|(_, p)| p.as_str())
            .unwrap_or("/");
        let dir = dir_of(mount, path);
        if writable(&dir) {
            v1.push((controller, dir));
        }
    }
    Ok(Probe {
        base,
        v2_offered,
        v1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone_and_other_text_is_kept() {
        assert_eq!(unescape(r"/sys/fs/cgroup/a\040b"), "/sys/fs/cgroup/a b");
        assert_eq!(unescape(r"/tmp/x\134y"), r"/tmp/x\y");
        assert_eq!(
            unescape("/tmp/é\\é"),
            "/tmp/é\\é",
            "no panic inside a character"
        );
        assert_eq!(unescape("trailing\\"), "trailing\\");
    }

    #[test]
    fn a_cgroup_path_is_found_under_its_mount_root() {
        let m = Mount {
            point: "/sys/fs/cgroup".into(),
            root: "/lxc/box".into(),
            v2: true,
            options: Vec::new(),
        };
        assert_eq!(dir_of(&m, "/lxc/box/svc"), Path::new("/sys/fs/cgroup/svc"));
        let host = Mount {
            root: "/".into(),
            ..m
        };
        assert_eq!(dir_of(&host, "/a/b"), Path::new("/sys/fs/cgroup/a/b"));
        assert_eq!(dir_of(&host, "/"), Path::new("/sys/fs/cgroup"));
    }
}
