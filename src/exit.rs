//! Exit codes and the error that carries one: one definition for the CLI and the daemon.
//!
//! The codes are documented in `taskd --help` and README.md; a [`Failure`] anywhere in an
//! error's chain decides the process's exit code. It knows no other module.

/// Exit codes, documented in `taskd --help` and README.md.
pub const OK: u8 = 0;
pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 2;
pub const BROKER: u8 = 3;
pub const TASK_FAILED: u8 = 4;
pub const CONFIG: u8 = 78;

/// An error that knows its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Failure::new(USAGE, message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}
