//! Small operating-system helpers shared by the laptop commands and the server.

use std::path::PathBuf;

/// The first `name` on PATH, then in the usual system dirs (sbin too: a user's PATH often lacks them).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
