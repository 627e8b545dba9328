//! The one error type of the tunnel data path.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("key file {path}: {source}")]
    KeyFile { path: PathBuf, source: io::Error },
    #[error(
        "key file {path} has mode {mode:o}; it must be readable by its owner only (chmod 600)"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("`ip {args}` failed: {stderr}")]
    IpCommand { args: String, stderr: String },
    #[error("invalid tunnel configuration: {0}")]
    Config(String),
    #[error("TUN mode needs {0}; run as root (or with CAP_NET_ADMIN), or use --mode proxy")]
    NoPrivilege(String),
    #[error("peer {0} conflicts with an existing peer: {1}")]
    PeerConflict(i64, String),
}

impl TunnelError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> TunnelError {
        let context = context.into();
        move |source| TunnelError::Io { context, source }
    }
}
