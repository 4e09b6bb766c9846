//! The crate's layers point one way. Every `crate::…` path in `src/` (a `use`, a path in
//! code, a `use crate::{a, b}` group; comments are skipped) is an edge from the top-level
//! module of its file to the top-level module it names. Each module has an allow-list of
//! what it may see (docs/architecture.md, "Modules", says why); an edge outside it, a
//! module without a list, or a cycle between top-level modules fails with the file, the
//! line and the rule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What each top-level module may name. An entry `a::b` allows only paths under `a::b`
/// (e.g. the `workers.json` reader, not the rest of `worker`).
const ALLOWED: &[(&str, &[&str])] = &[
    // Shared types: nothing below them.
    ("model", &[]),
    ("exit", &[]),
    ("notify", &[]),
    // A request carries who sent it (the socket peer's uid), for the audit trail.
    ("control", &["audit"]),
    // The doubling delay of every wait-and-retry loop: arithmetic only.
    ("backoff", &[]),
    // What the machine's cgroup hierarchies offer, read-only: for `taskd check` and the
    // executor's containment alike.
    ("cgroupfs", &[]),
    // The audit trail's records and how a caller is identified: plain data over the model
    // (the broker stores the records, callers build them).
    ("audit", &["model"]),
    // Slot arithmetic of schedules (cron, every, zones): pure, below the config.
    ("slots", &["model"]),
    ("config", &["model", "slots", "cgroupfs"]),
    ("submission", &["model", "config"]),
    ("broker", &["model", "config", "backoff", "audit"]),
    ("metrics", &["model", "broker"]),
    // The JSON shapes the API and the CLI share: records of the model, the broker's rows
    // and nodes, and a worker's `workers.json` record (the reader, not the rest of `worker`).
    // A schedule's view shows its config (spec, zone) and its next slot.
    (
        "view",
        &[
            "model",
            "broker",
            "worker::status",
            "audit",
            "config",
            "slots",
        ],
    ),
    // Why a task is not running: read from the broker, the config, the view it answers
    // with, and the `workers.json` records the caller hands in.
    (
        "why",
        &["model", "config", "broker", "view", "worker::status"],
    ),
    // Processes, never brokers, configs or retries.
    ("executor", &["model", "backoff", "cgroupfs"]),
    // Long-lived workers: processes fed over a pipe, handed a built spec; they report an
    // executor outcome and never see the broker or the supervisor.
    ("worker", &["model", "config", "executor", "backoff"]),
    // Following output: the live rings of the executor (not the rest of it), the broker for
    // the task around them, the event shapes, the control socket's request it answers.
    (
        "follow",
        &[
            "model",
            "broker",
            "executor::live",
            "view",
            "control",
            "backoff",
        ],
    ),
    (
        "supervisor",
        &[
            "model", "config", "broker", "executor", "worker", "metrics", "backoff",
            // A schedule's task sees its slot in RFC 3339 (`TASKD_SLOT`).
            "slots",
        ],
    ),
    // Clients of the broker: the model, the config and the broker trait; never the
    // supervisor or the executor.
    (
        "api",
        &[
            "model",
            "config",
            "broker",
            "metrics",
            "submission",
            "worker::status",
            "view",
            // Requests only the daemon carries out (restart), as `taskd restart` sends them.
            "control",
            // Who made each change, for the audit trail.
            "audit",
            // The output streams: sessions over the daemon's live rings and the broker.
            "follow",
            "executor::live",
            // `GET /api/v1/tasks/{id}/why`.
            "why",
        ],
    ),
    // The schedules at run time: the broker's records, the config's schedules, slot
    // arithmetic; never the supervisor (a slot's task is enqueued like any other).
    (
        "scheduler",
        &["model", "config", "broker", "metrics", "slots", "backoff"],
    ),
    // The Celery bridge: messages of a Celery broker made tasks through the broker trait (as
    // a submit would: `submission`), results written when the daemon says a task ended.
    (
        "celery",
        &[
            "model",
            "config",
            "broker",
            "metrics",
            "submission",
            "backoff",
        ],
    ),
    (
        "daemon",
        &[
            "celery",
            "scheduler",
            "model",
            "config",
            "broker",
            "executor",
            "supervisor",
            "api",
            "metrics",
            "control",
            "notify",
            "exit",
            "backoff",
            "audit",
            "follow",
        ],
    ),
    (
        "cli",
        &[
            "model",
            "config",
            "broker",
            "submission",
            "exit",
            "control",
            "daemon",
            "worker::status",
            "backoff",
            "view",
            "audit",
            // `taskd logs` follows a task through the broker itself when no daemon answers.
            "follow",
            // Slot times shown as RFC 3339 (`show`, `schedules`).
            "slots",
            // `taskd why`.
            "why",
            // `taskd show`: a Celery task's name and id, read from its payload.
            "celery",
        ],
    ),
];

struct Edge {
    file: PathBuf,
    line: usize,
    from: String,
    /// The path after `crate::`, as written (`broker::Lease`).
    path: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/x.rs` and `src/x/**` are `x`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("under src/");
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The file's text with comments blanked out (line breaks kept, so lines still count).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '/' if chars.peek() == Some(&'/') => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                for n in chars.by_ref() {
                    if n == '\n' {
                        out.push('\n');
                    }
                    if last == '*' && n == '/' {
                        break;
                    }
                    last = n;
                }
            }
            // A char literal such as '"' must not open a string.
            '\'' => {
                out.push(c);
                let ahead: String = chars.clone().take(3).collect();
                if ahead.starts_with("\"'") || ahead.starts_with("\\\"'") {
                    let n = if ahead.starts_with('\\') { 3 } else { 2 };
                    for _ in 0..n {
                        out.extend(chars.next());
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths a `{…}` group after `crate::` names, each as written (`a::b`), with the byte
/// offset of the group's end.
fn group_paths(text: &str, open: usize) -> (Vec<(usize, String)>, usize) {
    let mut depth = 0;
    let mut items = Vec::new();
    let mut start = open + 1;
    for (i, c) in text[open..].char_indices() {
        let at = open + i;
        match c {
            '{' => depth += 1,
            '}' | ',' if depth == 1 => {
                let item = text[start..at].trim();
                let name: String = item
                    .chars()
                    .take_while(|c| is_ident(*c) || *c == ':')
                    .collect();
                let name = name.trim_end_matches(':').to_string();
                if !name.is_empty() {
                    let offset = start + text[start..at].find(&name[..]).unwrap_or(0);
                    items.push((offset, name));
                }
                start = at + 1;
                if c == '}' {
                    return (items, at);
                }
            }
            '}' => depth -= 1,
            _ => {}
        }
    }
    (items, text.len())
}

fn edges(src: &Path) -> Vec<Edge> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let Some(from) = module_of(src, &file) else {
            continue;
        };
        let text = strip_comments(&std::fs::read_to_string(&file).expect("readable"));
        let line_of = |offset: usize| text[..offset].matches('\n').count() + 1;
        let mut at = 0;
        while let Some(i) = text[at..].find("crate::") {
            let begin = at + i;
            at = begin + "crate::".len();
            // `$crate::` in a macro, or an identifier that ends in "crate".
            if begin > 0 && text[..begin].ends_with(|c: char| is_ident(c) || c == '$') {
                continue;
            }
            if text[at..].starts_with('{') {
                let (items, end) = group_paths(&text, at);
                for (offset, path) in items {
                    out.push(Edge {
                        file: file.clone(),
                        line: line_of(offset),
                        from: from.clone(),
                        path,
                    });
                }
                at = end;
                continue;
            }
            let path: String = text[at..]
                .chars()
                .take_while(|c| is_ident(*c) || *c == ':')
                .collect();
            let path = path.trim_end_matches(':').to_string();
            if !path.is_empty() {
                out.push(Edge {
                    file: file.clone(),
                    line: line_of(begin),
                    from: from.clone(),
                    path,
                });
            }
        }
    }
    out
}

fn top(path: &str) -> &str {
    path.split("::").next().unwrap_or(path)
}

fn allows(rule: &str, path: &str) -> bool {
    path == rule || path.starts_with(&format!("{rule}::"))
}

#[test]
fn modules_import_only_what_their_layer_allows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let all = edges(&src);
    assert!(
        all.iter()
            .any(|e| e.from == "supervisor" && top(&e.path) == "broker"),
        "the scan found no `crate::broker` path in src/supervisor: it reads nothing"
    );
    let mut problems = Vec::new();
    let mut modules = BTreeSet::new();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for f in &files {
        if let Some(m) = module_of(&src, f) {
            modules.insert(m);
        }
    }
    for m in &modules {
        if !allowed.contains_key(m.as_str()) {
            problems.push(format!(
                "src/{m}: a top-level module without an entry in ALLOWED (tests/layering.rs): \
                 add one naming what it may import, and its row in docs/architecture.md"
            ));
        }
    }
    for e in &all {
        let to = top(&e.path);
        if to == e.from {
            continue;
        }
        let Some(rules) = allowed.get(e.from.as_str()) else {
            continue;
        };
        if !rules.iter().any(|r| allows(r, &e.path)) {
            problems.push(format!(
                "{}:{}: `{}` uses `crate::{}`, but {} may see only [{}] (tests/layering.rs, \
                 docs/architecture.md); move the item to a module both may use, or pass it in",
                e.file.strip_prefix(root).unwrap_or(&e.file).display(),
                e.line,
                e.from,
                e.path,
                e.from,
                rules.join(", ")
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "layering rules broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn top_level_modules_form_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in edges(&src) {
        let to = top(&e.path).to_string();
        if to != e.from {
            graph.entry(e.from).or_default().insert(to);
        }
    }
    // Depth-first search; a node met again while on the stack closes a cycle.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(cycle) = visit(n, &graph, &mut Vec::new(), &mut done) {
            panic!(
                "import cycle between top-level modules: {} (each arrow is a `crate::` path; \
                 move what both need below both)",
                cycle.join(" → ")
            );
        }
    }
}

#[test]
fn the_scanner_reads_groups_paths_and_skips_comments() {
    let text = strip_comments(
        "use crate::{a::B, c, d::{e, f}};\n// crate::hidden\nlet x = crate::g::h(\"//\");\n/* crate::no */ '\"'; crate::i",
    );
    assert!(!text.contains("hidden") && !text.contains("no */"));
    let open = text.find('{').expect("a group");
    let (items, _) = group_paths(&text, open);
    let names: Vec<&str> = items.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["a::B", "c", "d"]);
    assert!(text.contains("crate::g::h") && text.contains("crate::i"));
}

/// The parameters of `text`'s functions (`fn name<…>(a: A, b: B)`), each with its line, its
/// name and its type.
fn parameters(text: &str) -> Vec<(usize, String, String)> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(pos) = text[at..].find("fn ") {
        let start = at + pos;
        at = start + 3;
        if start > 0 && is_ident(bytes[start - 1] as char) {
            continue;
        }
        // The name, then generics up to the parameter list's `(`.
        let mut cursor = at;
        let mut angle = 0i32;
        while cursor < bytes.len() {
            match bytes[cursor] {
                b'<' => angle += 1,
                b'>' => angle -= 1,
                b'(' if angle == 0 => break,
                b'{' | b';' => break,
                _ => {}
            }
            cursor += 1;
        }
        if cursor >= bytes.len() || bytes[cursor] != b'(' {
            continue;
        }
        let open = cursor;
        let mut depth = 0i32;
        let mut piece_start = open + 1;
        let mut pieces = Vec::new();
        for (offset, byte) in bytes[open..].iter().enumerate() {
            let here = open + offset;
            match byte {
                b'(' | b'[' | b'{' | b'<' => depth += 1,
                b')' | b']' | b'}' | b'>'
                    if !(*byte == b'>' && here > 0 && bytes[here - 1] == b'-') =>
                {
                    depth -= 1;
                    if depth == 0 {
                        pieces.push((piece_start, here));
                        break;
                    }
                }
                b',' if depth == 1 => {
                    pieces.push((piece_start, here));
                    piece_start = here + 1;
                }
                _ => {}
            }
        }
        for (from, to) in pieces {
            let piece = &text[from..to];
            let Some((pattern, ty)) = piece.split_once(':') else {
                continue;
            };
            let name = pattern.trim().trim_start_matches("mut ").trim();
            let line = text[..from].matches('\n').count() + 1;
            found.push((line, name.to_string(), ty.trim().to_string()));
        }
    }
    found
}

/// A one-letter parameter name says nothing at the call site's other end: `decide(q, c, o)`
/// made a reader look up each type. Closures and local bindings are left to judgement
/// (`|e| …` for an error is plain); a function's parameters are its documentation.
#[test]
fn function_parameters_are_named_for_what_they_are() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for file in &files {
        let text = strip_comments(&std::fs::read_to_string(file).expect("a readable source file"));
        for (line, name, ty) in parameters(&text) {
            // `fmt(&self, f: &mut Formatter)` is how the standard library spells it.
            let formatter = name == "f" && ty.contains("Formatter");
            if name.chars().count() == 1 && name != "_" && !formatter {
                bad.push(format!(
                    "{}:{line}: parameter `{name}`: name it for what it is",
                    file.strip_prefix(&src).expect("under src/").display()
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "one-letter parameter names:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_parameter_reader_finds_what_it_must() {
    let text = "fn decide<T: Into<u8>>(q: &str, mut count: usize, f: impl Fn(u8) -> u8) -> u8 {}\n\
                let g = |e| e;\nfn none() {}\nimpl X { pub fn m(&self, o: Vec<(u8, u8)>) {} }";
    let names: Vec<String> = parameters(text)
        .into_iter()
        .map(|(_, name, _)| name)
        .collect();
    assert_eq!(names, ["q", "count", "f", "o"]);
}
