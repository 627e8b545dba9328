//! Move the server into a network namespace after its public sockets are bound: the API and hub sockets keep the
//! namespace they were created in, while VMs, bridges, taps and the hub's TUN live in the new one.

use std::path::Path;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot create network namespace `{name}`: {message}")]
    Create { name: String, message: String },
    #[error("cannot enter network namespace `{name}`: {source}")]
    Enter {
        name: String,
        source: std::io::Error,
    },
}

/// Create `name` (via `ip netns add`) if missing, enter it with the calling thread, and bring `lo` up. Call before
/// any other thread exists: threads started later inherit the namespace.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let path = Path::new("/run/netns").join(name);
    if !path.exists() {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .map_err(|e| NetnsError::Create {
                name: name.into(),
                message: format!("cannot run `ip` (install iproute2): {e}"),
            })?;
        if !out.status.success() && !path.exists() {
            return Err(NetnsError::Create {
                name: name.into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    let file = std::fs::File::open(&path).map_err(|source| NetnsError::Enter {
        name: name.into(),
        source,
    })?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns(2) on an fd we own; it only changes this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Enter {
            name: name.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let _ = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    Ok(())
}
