//! Building prepared images from Debian packages (`fcdev image build`) and their onboarding snapshots
//! (`fcdev image snapshot`).

pub mod build;
pub mod cpio;
pub mod press;
pub mod snapshot;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{what} is missing: {hint}")]
    Missing { what: String, hint: String },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("build step `{step}` failed (log: {log}):\n{tail}")]
    Step {
        step: String,
        log: std::path::PathBuf,
        tail: String,
    },
    #[error("unknown image recipe `{0}` (known: tiny, press)")]
    UnknownRecipe(String),
    #[error("{0}")]
    Other(String),
}

pub type BuildResult<T> = Result<T, BuildError>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let context = context.into();
    move |source| BuildError::Io { context, source }
}
