//! What a queue runs: exactly one of `command` (argv with `{field}` placeholders), `shell`
//! and `worker` (long-lived workers), and the worker settings, which only `worker` takes.
//! The keys are `keys::PROGRAM` and `keys::WORKER`.

use std::time::Duration;

use super::{keys, with_article, Cx, Entry};
use crate::config::{ArgTemplate, Program, WorkerProgram};

impl Cx<'_> {
    /// Exactly one of `command`, `shell` and `worker`; the worker settings only with `worker`.
    pub(super) fn program(&mut self, queue: &Entry, found: &[Entry]) -> Option<Program> {
        let mut chosen: Option<&Entry> = None;
        let mut worker_keys: Vec<&Entry> = Vec::new();
        let mut ok = true;
        for e in found {
            if keys::is_worker_setting(e.name) {
                worker_keys.push(e);
                continue;
            }
            if let Some(first) = chosen {
                self.error(
                    e.key_span(),
                    &e.path,
                    format!(
                        "a queue runs one of `command`, `shell` or `worker`, but queue `{}` sets both `{}` and `{}`",
                        queue.name, first.name, e.name
                    ),
                    Some(format!("remove `{}` or `{}`", first.name, e.name)),
                );
                ok = false;
            } else {
                chosen = Some(e);
            }
        }
        let Some(e) = chosen else {
            self.error(
                queue.value_span(),
                &queue.path,
                format!(
                    "queue `{}` has nothing to run: it needs `command`, `shell` or `worker`",
                    queue.name
                ),
                Some(
                    "add `command = [\"/path/to/program\", \"{field}\"]`, `shell = \"...\"` or `worker = [\"/path/to/worker\"]`"
                        .into(),
                ),
            );
            return None;
        };
        if e.name != "worker" {
            for w in &worker_keys {
                self.error(
                    w.key_span(),
                    &w.path,
                    format!(
                        "`{}` applies to long-lived workers, but queue `{}` runs `{}`",
                        w.name, queue.name, e.name
                    ),
                    Some(format!(
                        "remove `{}`, or replace `{}` with `worker = [\"/path/to/worker\"]`",
                        w.name, e.name
                    )),
                );
                ok = false;
            }
        }
        let program = match e.name {
            "command" => self.command(e),
            "shell" => self.shell(e),
            _ => self.worker(e, &worker_keys),
        };
        if ok {
            program
        } else {
            None
        }
    }

    /// `worker = [argv]` and its settings.
    fn worker(&mut self, entry: &Entry, settings: &[&Entry]) -> Option<Program> {
        let example = "write an argv list such as `worker = [\"python3\", \"/srv/app/worker.py\"]`";
        let Some(array) = entry.item.as_array() else {
            self.wrong_type(entry, "an array of strings", example.into());
            return None;
        };
        let mut argv = Vec::new();
        let mut ok = true;
        if array.is_empty() {
            self.error(
                entry.value_span(),
                &entry.path,
                "worker is empty: it needs at least the program to run",
                Some(example.into()),
            );
            ok = false;
        }
        for (i, v) in array.iter().enumerate() {
            let key = format!("{}[{i}]", entry.path);
            let problem = match v.as_str() {
                None => Some((
                    format!(
                        "worker elements must be strings, found {}",
                        with_article(v.type_name())
                    ),
                    "put the element in quotes",
                )),
                Some(s) if s.contains('\0') => Some((
                    "a worker element cannot contain a NUL byte".to_string(),
                    "remove the \\u0000",
                )),
                Some(s) if i == 0 && s.trim().is_empty() => Some((
                    "the program name (the first element of worker) is empty".to_string(),
                    "put the program's path first, such as \"/usr/local/bin/my-worker\"",
                )),
                Some(s) => {
                    argv.push(s.to_string());
                    None
                }
            };
            if let Some((message, fix)) = problem {
                self.error(v.span(), &key, message, Some(fix.into()));
                ok = false;
            }
        }
        let mut w = WorkerProgram::new(argv);
        for setting in settings {
            let key = keys::find(keys::WORKER, setting.name)
                .expect("the entries handed here are worker settings");
            ok &= (key.read)(self, setting, &mut w);
        }
        ok.then_some(Program::Worker(w))
    }

    fn command(&mut self, entry: &Entry) -> Option<Program> {
        let example = "write an argv list such as `command = [\"/usr/local/bin/make-thumb\", \"--size\", \"{size}\"]`";
        let Some(array) = entry.item.as_array() else {
            let fix = if entry.item.is_str() {
                format!("{example}, or use `shell = \"...\"` to run a shell command line")
            } else {
                example.to_string()
            };
            self.wrong_type(entry, "an array of strings", fix);
            return None;
        };
        if array.is_empty() {
            self.error(
                entry.value_span(),
                &entry.path,
                "command is empty: it needs at least the program to run",
                Some(example.into()),
            );
            return None;
        }
        let mut argv = Vec::new();
        let mut ok = true;
        for (i, v) in array.iter().enumerate() {
            let key = format!("{}[{i}]", entry.path);
            let Some(s) = v.as_str() else {
                self.error(
                    v.span(),
                    &key,
                    format!(
                        "command elements must be strings, found {}",
                        with_article(v.type_name())
                    ),
                    Some("put the element in quotes".into()),
                );
                ok = false;
                continue;
            };
            if s.contains('\0') {
                self.error(
                    v.span(),
                    &key,
                    "a command element cannot contain a NUL byte",
                    Some("remove the \\u0000".into()),
                );
                ok = false;
                continue;
            }
            if i == 0 && s.trim().is_empty() {
                self.error(
                    v.span(),
                    &key,
                    "the program name (the first element of command) is empty",
                    Some(
                        "put the program's path first, such as \"/usr/local/bin/make-thumb\""
                            .into(),
                    ),
                );
                ok = false;
                continue;
            }
            match ArgTemplate::parse(s) {
                Ok(t) if i == 0 && !t.is_literal() => {
                    // The payload must never choose which program runs.
                    self.error(
                        v.span(),
                        &key,
                        "the program name (the first element of command) cannot hold a `{field}` placeholder: a payload must not choose the program",
                        Some("name the program literally; pass payload fields as later arguments".into()),
                    );
                    ok = false;
                }
                Ok(t) => argv.push(t),
                Err(why) => {
                    self.error(
                        v.span(),
                        &key,
                        why,
                        Some("write `{field}` with a payload field name, and `{{` / `}}` for literal braces".into()),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(Program::Command(argv))
    }

    fn shell(&mut self, entry: &Entry) -> Option<Program> {
        let s = self.string(entry, "\"/opt/reports/build.sh \\\"$TASKD_ARG_month\\\"\"")?;
        if s.trim().is_empty() {
            self.error(
                entry.value_span(),
                &entry.path,
                "shell is empty",
                Some(
                    "write the command line for /bin/sh -c, such as `shell = \"/opt/app/run.sh\"`"
                        .into(),
                ),
            );
            return None;
        }
        if s.contains('\0') {
            self.error(
                entry.value_span(),
                &entry.path,
                "shell cannot contain a NUL byte",
                Some("remove the \\u0000".into()),
            );
            return None;
        }
        Some(Program::Shell(s.to_string()))
    }

    /// `start_secs`: a duration, where zero is allowed: a worker is then RUNNING as soon as
    /// it is ready.
    pub(in crate::config) fn start_secs(&mut self, entry: &Entry) -> Option<Duration> {
        let zero = entry
            .item
            .as_str()
            .is_some_and(|t| humantime::parse_duration(t.trim()).is_ok_and(|d| d.is_zero()));
        if zero {
            return Some(Duration::ZERO);
        }
        self.duration(entry)
    }
}
