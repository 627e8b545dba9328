//! `fcdev completions SHELL`: print a completion script (the committed copies live in completions/).

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::{Cli, CliError};

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: Shell,
}

/// The completion script for one shell.
pub fn script(shell: Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "fcdev", &mut out);
    out
}

/// The file name a shell's script is committed under in completions/.
pub fn file_name(shell: Shell) -> &'static str {
    match shell {
        Shell::Bash => "fcdev.bash",
        Shell::Zsh => "_fcdev",
        Shell::Fish => "fcdev.fish",
        Shell::Elvish => "fcdev.elv",
        Shell::PowerShell => "_fcdev.ps1",
        _ => "fcdev.completion",
    }
}

pub fn run(args: CompletionsArgs) -> Result<(), CliError> {
    use std::io::Write;
    std::io::stdout()
        .write_all(&script(args.shell))
        .map_err(|e| CliError::new(crate::cli::ExitKind::Failure, e.to_string()))
}
