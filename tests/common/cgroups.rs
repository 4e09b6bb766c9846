//! The cgroups a test's daemon made: found from the `containment:` line of its log, and
//! removed (their processes killed first) when a daemon the test killed could not.

use std::path::{Path, PathBuf};

/// The daemon's v2 subtree, from its log's `containment: a cgroup per task under DIR (…)`.
pub fn subtree_from_log(log: &str) -> Option<PathBuf> {
    let i = log.find("a cgroup per task under ")?;
    let rest = &log[i + "a cgroup per task under ".len()..];
    let end = rest.find(" (")?;
    Some(PathBuf::from(&rest[..end]))
}

/// Every directory of the subtree named like `v2` in each hierarchy: the v2 one, and the
/// v1 ones (memory, pids, cpu) under this process's own v1 cgroup, which the daemon it
/// started shares.
pub fn all_trees(v2: &Path) -> Vec<PathBuf> {
    let mut out = vec![v2.to_path_buf()];
    let Some(name) = v2.file_name() else {
        return out;
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for controller in ["memory", "pids", "cpu"] {
        let Some(path) = own.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let _ = p.next();
            let cs = p.next()?;
            let path = p.next()?;
            cs.split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        }) else {
            continue;
        };
        let dir = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(path.trim_start_matches('/'))
            .join(name);
        if dir.exists() {
            out.push(dir);
        }
    }
    out
}

/// Kills whatever is left in the subtree and removes it.
pub fn remove(v2: &Path) {
    for tree in all_trees(v2) {
        let children: Vec<PathBuf> = std::fs::read_dir(&tree)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        for dir in children.iter().chain(std::iter::once(&tree)) {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for dir in children.iter().chain(std::iter::once(&tree)) {
            super::poll(std::time::Duration::from_secs(5), || {
                std::fs::remove_dir(dir).is_ok() || !dir.exists()
            });
        }
    }
}
