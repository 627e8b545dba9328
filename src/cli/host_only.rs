//! The laptop-only build (`--no-default-features`): `fcdev server`, `fcdev image` and `fcdev up --local` are not
//! in it. Their names stay as hidden commands that say so, rather than clap's "unrecognized subcommand".

use crate::cli::{CliError, ExitKind};

/// The end of `fcdev --help` in this build.
pub const AFTER_HELP: &str = "Start here:\n  fcdev login --server URL   use a shared host\n  fcdev up                create your cluster\n  fcdev tunnel            reach your VMs from this laptop\n\nThis is the laptop-only build: `fcdev server`, `fcdev image` and `fcdev up --local`\nneed the full build (`cargo install fcdev`, default features).";

/// Whatever followed `fcdev server` or `fcdev image` (ignored: the command is refused).
#[derive(Debug, clap::Args)]
pub struct HostOnlyArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<String>,
}

/// The usage error (exit code 2) for a host command in the laptop-only build.
pub fn refuse(command: &str) -> CliError {
    CliError::new(
        ExitKind::Usage,
        format!("`fcdev {command}` needs the full build of fcdev; this one is laptop-only (built without the `server` feature)"),
    )
    .hint("install the full build: `cargo install fcdev` (default features), or `cargo build --release` in the source tree")
}
