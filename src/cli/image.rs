//! `fcdev image build|snapshot` (placeholder until the VM work lands).

use std::path::Path;

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Image name.
    pub name: String,
}

pub fn run(_args: ImageArgs) -> anyhow::Result<()> {
    anyhow::bail!("image building is not available in this build")
}

/// Make sure the default image exists under `data_dir/images` (used by `fcdev up --local`).
pub fn ensure_default_image(_data_dir: &Path, _progress: bool) -> anyhow::Result<()> {
    Ok(())
}
