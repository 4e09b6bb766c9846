//! Which files a worker runs, for `restart_on_change`: the program (argv[0], found on the
//! worker's `PATH` as `execvp` would) and every later argument that names an existing
//! regular file (relative ones from the worker's `cwd`), so that for `python3 app.py` the
//! script counts as well as the interpreter. Options (`-m mod`) and arguments that name no
//! file are not followed: a module imported by the script is not watched.
//!
//! It only reads modification times; it must not decide anything about the pool.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use crate::model::UnixMs;

/// The most recently modified of the worker's program files and its mtime, in ms.
pub(super) fn newest(
    argv: &[String],
    cwd: Option<&Path>,
    env: &[(String, String)],
) -> Option<(PathBuf, UnixMs)> {
    files(argv, cwd, env)
        .into_iter()
        .filter_map(|p| mtime_ms(&p).map(|m| (p, m)))
        .max_by_key(|(_, m)| *m)
}

/// The files named by `argv` (see the module's documentation), those that exist.
fn files(argv: &[String], cwd: Option<&Path>, env: &[(String, String)]) -> Vec<PathBuf> {
    let Some((program, args)) = argv.split_first() else {
        return Vec::new();
    };
    let in_cwd = |p: &str| match cwd {
        Some(dir) => dir.join(p),
        None => PathBuf::from(p),
    };
    let mut out = Vec::new();
    if program.contains('/') {
        out.push(in_cwd(program));
    } else {
        let path = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or("/bin:/usr/bin");
        if let Some(found) = path
            .split(':')
            .map(|dir| {
                if dir.is_empty() {
                    in_cwd(program)
                } else {
                    Path::new(dir).join(program)
                }
            })
            .find(|p| p.is_file())
        {
            out.push(found);
        }
    }
    out.extend(
        args.iter()
            .filter(|a| !a.starts_with('-') && !a.is_empty())
            .map(|a| in_cwd(a))
            .filter(|p| p.is_file()),
    );
    out
}

fn mtime_ms(path: &Path) -> Option<UnixMs> {
    let m = std::fs::metadata(path).ok()?.modified().ok()?;
    let d = m.duration_since(UNIX_EPOCH).ok()?;
    UnixMs::try_from(d.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_on_path_and_the_script_argument_are_watched() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let script = dir.path().join("app.py");
        std::fs::write(&script, "print()").expect("write the script");
        let env = vec![("PATH".to_string(), "/nonexistent:/bin:/usr/bin".to_string())];
        let argv: Vec<String> = ["sh", "-u", "app.py", "not-a-file"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let found = files(&argv, Some(dir.path()), &env);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].ends_with("sh") && found[0].is_file(), "{found:?}");
        assert_eq!(found[1], script);
        let (newest, _) = newest(&argv, Some(dir.path()), &env).expect("files exist");
        // The script was written just now: newer than /bin/sh.
        assert_eq!(newest, script);
    }
}
