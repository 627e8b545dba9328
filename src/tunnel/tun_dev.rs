//! A Linux TUN device (tun-tap, no packet info) and the `ip` commands that configure it. Shared by the hub
//! and the client's TUN mode; the rest of the code only sees `recv`/`send`/`wait_readable`.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use tun_rs::{DeviceBuilder, GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::TunnelError;

/// A TUN device with Linux offloads (IFF_VNET_HDR, TSO/GRO through tun-rs): one read can return a whole
/// 64 KB TCP burst, split here into MTU-sized packets, and one write can carry many coalesced packets.
pub struct TunDevice {
    dev: SyncDevice,
    name: String,
}

impl TunDevice {
    /// Creates the device, sets its MTU and brings it up.
    pub fn create(name: &str, mtu: u32) -> Result<TunDevice, TunnelError> {
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(TunnelError::NoPrivilege("/dev/net/tun".into()));
        }
        let mtu16 = u16::try_from(mtu).unwrap_or(super::MTU as u16);
        let dev = DeviceBuilder::new()
            .name(name)
            .mtu(mtu16)
            .offload(true)
            .build_sync()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    TunnelError::NoPrivilege("CAP_NET_ADMIN to create a TUN device".into())
                } else {
                    TunnelError::Io {
                        context: format!("creating TUN device {name}"),
                        source: e,
                    }
                }
            })?;
        let name = dev.name().unwrap_or_else(|_| name.to_string());
        let dev = TunDevice { dev, name };
        tracing::info!("TUN device {}: offload {}", dev.name, dev.offload());
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
        &self.name
    }

    /// True when the kernel accepted the offloads (else packets come and go one per syscall).
    pub fn offload(&self) -> bool {
        self.dev.tcp_gso()
    }

    /// Reads return `WouldBlock` instead of waiting (use [`TunDevice::wait_readable`]).
    pub fn set_nonblocking(&self) -> Result<(), TunnelError> {
        self.dev
            .set_nonblocking(true)
            .map_err(TunnelError::io("TUN device"))
    }

    /// Waits until a packet can be read or `timeout` passes; true when readable.
    pub fn wait_readable(&self, timeout: Duration) -> bool {
        wait_readable(self.dev.as_raw_fd(), timeout)
    }
}

/// Packets of one TUN read (a GSO burst split into MTU-sized packets), in reused buffers.
pub struct TunReader {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    n: usize,
}

impl Default for TunReader {
    fn default() -> Self {
        Self::new()
    }
}

impl TunReader {
    pub fn new() -> TunReader {
        TunReader {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65535],
            bufs: vec![vec![0u8; 65535]; IDEAL_BATCH_SIZE],
            sizes: vec![0; IDEAL_BATCH_SIZE],
            n: 0,
        }
    }

    /// One read from the device; returns how many packets it gave.
    pub fn read(&mut self, dev: &TunDevice) -> std::io::Result<usize> {
        self.n = 0;
        self.n = dev
            .dev
            .recv_multiple(&mut self.original, &mut self.bufs, &mut self.sizes, 0)?;
        Ok(self.n)
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn get(&self, i: usize) -> Option<&[u8]> {
        if i >= self.n {
            return None;
        }
        self.bufs.get(i)?.get(..*self.sizes.get(i)?)
    }
}

/// Packets collected for one batched write (coalesced by GRO where they belong to one TCP flow).
pub struct TunWriter {
    bufs: Vec<Vec<u8>>,
    n: usize,
    gro: GROTable,
}

impl Default for TunWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl TunWriter {
    pub fn new() -> TunWriter {
        TunWriter {
            bufs: Vec::new(),
            n: 0,
            gro: GROTable::default(),
        }
    }

    pub fn push(&mut self, packet: &[u8]) {
        if self.n == self.bufs.len() {
            self.bufs
                .push(Vec::with_capacity(VIRTIO_NET_HDR_LEN + 2048));
        }
        if let Some(b) = self.bufs.get_mut(self.n) {
            b.clear();
            b.resize(VIRTIO_NET_HDR_LEN, 0);
            b.extend_from_slice(packet);
            self.n += 1;
        }
    }

    pub fn is_full(&self) -> bool {
        self.n >= IDEAL_BATCH_SIZE
    }

    /// Writes what was pushed; a failed write drops the batch (like a full queue).
    pub fn flush(&mut self, dev: &TunDevice) {
        let n = std::mem::take(&mut self.n);
        if n == 0 {
            return;
        }
        if let Some(bufs) = self.bufs.get_mut(..n) {
            if let Err(e) = dev
                .dev
                .send_multiple(&mut self.gro, bufs, VIRTIO_NET_HDR_LEN)
            {
                tracing::debug!("TUN write of {n} packets: {e}");
            }
        }
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
