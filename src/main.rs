//! The `taskd` binary: parse the command line, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = taskd::cli::Cli::parse();
    let code = taskd::cli::run(cli);
    ExitCode::from(code)
}
