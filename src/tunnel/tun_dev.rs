//! A Linux TUN device (tun-tap, no packet info) and the `ip` commands that configure it. Shared by the hub
//! and the client's TUN mode; the rest of the code only sees `recv`/`send`/`wait_readable`.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use super::TunnelError;

pub struct TunDevice {
    iface: tun_tap::Iface,
}

impl TunDevice {
    /// Creates the device, sets its MTU and brings it up.
    pub fn create(name: &str, mtu: u32) -> Result<TunDevice, TunnelError> {
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(TunnelError::NoPrivilege("/dev/net/tun".into()));
        }
        let iface = tun_tap::Iface::without_packet_info(name, tun_tap::Mode::Tun).map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                TunnelError::NoPrivilege("CAP_NET_ADMIN to create a TUN device".into())
            } else {
                TunnelError::Io {
                    context: format!("creating TUN device {name}"),
                    source: e,
                }
            }
        })?;
        let dev = TunDevice { iface };
        ip(&[
            "link",
            "set",
            "dev",
            dev.name(),
            "mtu",
            &mtu.to_string(),
            "up",
        ])?;
        Ok(dev)
    }

    pub fn name(&self) -> &str {
        self.iface.name()
    }

    /// Reads return `WouldBlock` instead of waiting (use [`TunDevice::wait_readable`]).
    pub fn set_nonblocking(&self) -> Result<(), TunnelError> {
        let fd = self.iface.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own.
        let ok = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if ok {
            Ok(())
        } else {
            Err(TunnelError::Io {
                context: "TUN device".into(),
                source: std::io::Error::last_os_error(),
            })
        }
    }

    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.iface.recv(buf)
    }

    pub fn send(&self, packet: &[u8]) -> std::io::Result<usize> {
        self.iface.send(packet)
    }

    /// Waits until a packet can be read or `timeout` passes; true when readable.
    pub fn wait_readable(&self, timeout: Duration) -> bool {
        wait_readable(self.iface.as_raw_fd(), timeout)
    }
}

pub(crate) fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// Runs `ip ARGS…` and maps a failure to an error carrying its stderr.
pub fn ip(args: &[&str]) -> Result<(), TunnelError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(TunnelError::io("running `ip` (install iproute2)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TunnelError::IpCommand {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// True when this process may create TUN devices (root or CAP_NET_ADMIN, and /dev/net/tun exists).
pub fn can_create_tun() -> bool {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return false;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0)
}
