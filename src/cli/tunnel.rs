//! `fcdev tunnel` (placeholder until the tunnel work lands).

use crate::cli::{CliError, Context, ExitKind};

#[derive(Debug, clap::Args)]
pub struct TunnelArgs {}

pub async fn run(_args: TunnelArgs, _ctx: Context) -> Result<(), CliError> {
    Err(CliError::new(
        ExitKind::Failure,
        "the tunnel is not available in this build",
    ))
}
