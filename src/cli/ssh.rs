//! `fcdev ssh` (placeholder until the tunnel work lands).

use crate::cli::{CliError, Context, ExitKind};

#[derive(Debug, clap::Args)]
pub struct SshArgs {
    /// The VM, e.g. n1.
    pub vm: String,
}

pub async fn run(_args: SshArgs, _ctx: Context) -> Result<(), CliError> {
    Err(CliError::new(
        ExitKind::Failure,
        "ssh is not available in this build",
    ))
}
