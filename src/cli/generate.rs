//! `taskd generate`: the man page and shell completions, from the same clap definitions as
//! the command line itself, so they can never disagree with `--help`.

use std::path::PathBuf;

use clap::CommandFactory;

use super::{exit, Cli, Failure};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Write man pages (taskd.1 and one per subcommand, taskd-submit.1 …) into DIR.
    Man {
        /// e.g. /usr/local/share/man/man1
        dir: PathBuf,
    },
    /// Print a completion script for SHELL on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

pub fn run(args: GenerateArgs) -> anyhow::Result<u8> {
    match args.what {
        What::Man { dir } => {
            std::fs::create_dir_all(&dir).map_err(|e| {
                Failure::new(
                    exit::FAILURE,
                    format!("failed to create {}: {e}", dir.display()),
                )
            })?;
            let cmd = Cli::command();
            clap_mangen::generate_to(cmd, &dir).map_err(|e| {
                Failure::new(
                    exit::FAILURE,
                    format!("failed to write man pages to {}: {e}", dir.display()),
                )
            })?;
            println!("man pages written to {}", dir.display());
        }
        What::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "taskd", &mut std::io::stdout());
        }
    }
    Ok(exit::OK)
}
