//! The fuzz targets' committed inputs, replayed on the stable toolchain in every `cargo test`:
//! each file of `fuzz/corpus/TARGET/` (the minimized corpus) and `fuzz/regressions/TARGET/`
//! (inputs that once made a target fail) goes through the same check the target runs
//! (`taskd::fuzzing`). Fuzzing itself (new inputs, coverage-guided) is `cargo fuzz`, opt-in:
//! docs/fuzzing.md.

use std::path::{Path, PathBuf};

/// What a target runs on one input; a panic is a finding.
type Check = fn(&[u8]);

/// Every target, with its check.
const TARGETS: &[(&str, Check)] = &[
    ("config", taskd::fuzzing::config),
    ("argv_template", taskd::fuzzing::argv_template),
    ("worker_line", taskd::fuzzing::worker_line),
    ("enqueue_json", taskd::fuzzing::enqueue_json),
    ("enqueue_raw", taskd::fuzzing::enqueue_raw),
    ("celery_message", taskd::fuzzing::celery_message),
];

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_committed_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failed = Vec::new();
    for (target, check) in TARGETS {
        let corpus = inputs(&root.join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target}/ holds no input: its seeds are part of the repository"
        );
        let regressions = inputs(&root.join("regressions").join(target));
        for file in corpus.iter().chain(&regressions) {
            let data = std::fs::read(file).expect("a readable input");
            if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.push(format!("{}: {why}", file.display()));
            }
        }
        eprintln!(
            "{target}: {} corpus inputs, {} regressions",
            corpus.len(),
            regressions.len()
        );
    }
    assert!(
        failed.is_empty(),
        "inputs that fail their fuzz target's check (reproduce with \
         `cargo +nightly fuzz run TARGET FILE` in fuzz/):\n{}",
        failed.join("\n")
    );
}
