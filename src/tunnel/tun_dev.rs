//! The TUN device of the hub and of the client's TUN mode, through tun-rs: its address, MTU and up state
//! are set with tun-rs's own calls (ioctls on Linux, the utun calls on macOS, where tun-rs also adds the
//! route of the address's subnet), never with the `ip` command. On Linux the device has offloads
//! (IFF_VNET_HDR, TSO/GRO): one read can return a whole 64 KB TCP burst, split here into MTU-sized packets,
//! and one write can carry many coalesced packets; elsewhere a read or write is one packet. The rest of the
//! code only sees [`TunReader`], [`TunWriter`] and `wait_readable`.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use tun_rs::{DeviceBuilder, SyncDevice};
#[cfg(target_os = "linux")]
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::TunnelError;

/// Packets per read or write batch elsewhere than Linux (no offloads: one packet per syscall).
#[cfg(not(target_os = "linux"))]
const IDEAL_BATCH_SIZE: usize = 64;

/// A TUN device, up, with its MTU and (for a client) its address.
pub struct TunDevice {
    dev: std::sync::Arc<SyncDevice>,
    name: String,
}

impl TunDevice {
    /// Creates the device with `mtu`, gives it `address` (the address and the prefix length of the subnet
    /// behind it: the system then routes that subnet to the device) and brings it up. On macOS the name
    /// must be `utunN`; another name lets the system choose one ([`TunDevice::name`] tells which).
    pub fn create(
        name: &str,
        mtu: u32,
        address: Option<(Ipv4Addr, u8)>,
    ) -> Result<TunDevice, TunnelError> {
        #[cfg(target_os = "linux")]
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(TunnelError::NoPrivilege("/dev/net/tun".into()));
        }
        let mtu16 = u16::try_from(mtu).unwrap_or(super::MTU as u16);
        let mut builder = DeviceBuilder::new().mtu(mtu16);
        if cfg!(not(target_os = "macos")) || name.starts_with("utun") {
            builder = builder.name(name);
        }
        if let Some((addr, prefix)) = address {
            builder = builder.ipv4(addr, prefix, None);
        }
        #[cfg(target_os = "linux")]
        {
            builder = builder.offload(true);
        }
        let dev = builder.build_sync().map_err(|e| {
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
        let dev = TunDevice {
            dev: std::sync::Arc::new(dev),
            name,
        };
        tracing::info!("TUN device {}: offload {}", dev.name, dev.offload());
        Ok(dev)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when the kernel accepted the offloads (else packets come and go one per syscall).
    #[cfg(target_os = "linux")]
    pub fn offload(&self) -> bool {
        self.dev.tcp_gso()
    }

    #[cfg(not(target_os = "linux"))]
    pub fn offload(&self) -> bool {
        false
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

/// Packets of one TUN read (on Linux a GSO burst split into MTU-sized packets), in reused buffers.
pub struct TunReader {
    #[cfg(target_os = "linux")]
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
    #[cfg(target_os = "linux")]
    pub fn new() -> TunReader {
        TunReader {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65535],
            bufs: vec![vec![0u8; 65535]; IDEAL_BATCH_SIZE],
            sizes: vec![0; IDEAL_BATCH_SIZE],
            n: 0,
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn new() -> TunReader {
        TunReader {
            bufs: vec![vec![0u8; 65535]],
            sizes: vec![0],
            n: 0,
        }
    }

    /// One read from the device; returns how many packets it gave.
    #[cfg(target_os = "linux")]
    pub fn read(&mut self, dev: &TunDevice) -> std::io::Result<usize> {
        self.n = 0;
        self.n = dev
            .dev
            .recv_multiple(&mut self.original, &mut self.bufs, &mut self.sizes, 0)?;
        Ok(self.n)
    }

    /// One read from the device: one packet.
    #[cfg(not(target_os = "linux"))]
    pub fn read(&mut self, dev: &TunDevice) -> std::io::Result<usize> {
        self.n = 0;
        self.sizes[0] = dev.dev.recv(&mut self.bufs[0])?;
        self.n = 1;
        Ok(1)
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

/// Packets collected for one batched write (on Linux coalesced by GRO where they belong to one TCP flow).
struct Batch {
    bufs: Vec<Vec<u8>>,
    n: usize,
}

/// Room in front of each packet a write needs (the virtio header of Linux's offloads).
#[cfg(target_os = "linux")]
const HEADROOM: usize = VIRTIO_NET_HDR_LEN;
#[cfg(not(target_os = "linux"))]
const HEADROOM: usize = 0;

/// Capacity of each write buffer. tun-rs's GRO coalesces a flow's packets into the buffer of its first one
/// and only when that buffer's capacity already holds the result (`InsufficientCap` otherwise): with room for
/// one packet nothing was ever coalesced and every packet was a write of its own, running the receiving TCP
/// stack once per 1420 bytes. Room for a 64 KB super-packet, as wireguard-go's buffers.
#[cfg(target_os = "linux")]
const WRITE_ROOM: usize = 2 * HEADROOM + 65535;
#[cfg(not(target_os = "linux"))]
const WRITE_ROOM: usize = 2048;

/// [`WRITE_ROOM`], or `FCDEV_TUN_WRITE_ROOM` (bytes; benchmarks: memory against writes per packet).
fn write_room() -> usize {
    static ROOM: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROOM.get_or_init(|| {
        std::env::var("FCDEV_TUN_WRITE_ROOM")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n >= 2048)
            .unwrap_or(WRITE_ROOM)
    })
}

/// Batches a threaded writer keeps queued for its thread (each up to a few hundred packets).
const QUEUED: usize = 4;

impl Batch {
    fn new() -> Batch {
        Batch {
            bufs: Vec::new(),
            n: 0,
        }
    }

    fn push(&mut self, packet: &[u8]) {
        if self.n == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(write_room()));
        }
        if let Some(b) = self.bufs.get_mut(self.n) {
            b.clear();
            b.resize(HEADROOM, 0);
            b.extend_from_slice(packet);
            self.n += 1;
        }
    }

    #[cfg(target_os = "linux")]
    fn write(&mut self, dev: &SyncDevice, gro: &mut GROTable) {
        let n = std::mem::take(&mut self.n);
        if n == 0 {
            return;
        }
        if let Some(bufs) = self.bufs.get_mut(..n) {
            if let Err(e) = dev.send_multiple(gro, bufs, VIRTIO_NET_HDR_LEN) {
                tracing::debug!("TUN write of {n} packets: {e}");
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn write(&mut self, dev: &SyncDevice, _: &mut GROTable) {
        let n = std::mem::take(&mut self.n);
        for b in self.bufs.iter().take(n) {
            if let Err(e) = dev.send(b) {
                tracing::debug!("TUN write: {e}");
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
#[derive(Default)]
struct GROTable;

/// Packets on their way into the TUN device, written in batches. [`TunWriter::new`] writes on the caller's
/// thread when it flushes; [`TunDevice::writer`] gives one that hands each batch to a thread of its own, so the
/// thread that decrypts goes back to the socket while the kernel takes the previous batch (a write into the
/// TUN runs the receiving TCP stack in the writer's context: the larger half of a receive, measured).
pub struct TunWriter {
    batch: Batch,
    gro: GROTable,
    thread: Option<WriterThread>,
}

/// The writing thread of a threaded [`TunWriter`]: batches go to it and come back empty, in order.
struct WriterThread {
    jobs: Option<std::sync::mpsc::SyncSender<Batch>>,
    free: std::sync::mpsc::Receiver<Batch>,
    /// Batches in existence besides the one being filled.
    made: usize,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Default for TunWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl TunDevice {
    /// A writer for this device whose batches are written on a thread of its own (see [`TunWriter`]); a
    /// plain writer when the thread cannot be started.
    pub fn writer(&self) -> TunWriter {
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<Batch>(QUEUED);
        let (free_tx, free_rx) = std::sync::mpsc::channel();
        let dev = self.dev.clone();
        let spawned = std::thread::Builder::new()
            .name("fcdev-tun-write".into())
            .spawn(move || {
                let mut gro = GROTable::default();
                while let Ok(mut batch) = jobs_rx.recv() {
                    batch.write(&dev, &mut gro);
                    if free_tx.send(batch).is_err() {
                        return;
                    }
                }
            });
        let mut w = TunWriter::new();
        match spawned {
            Ok(handle) => {
                w.thread = Some(WriterThread {
                    jobs: Some(jobs_tx),
                    free: free_rx,
                    made: 0,
                    handle: Some(handle),
                })
            }
            Err(e) => tracing::warn!("TUN writer thread: {e}; writing inline"),
        }
        w
    }
}

impl TunWriter {
    pub fn new() -> TunWriter {
        TunWriter {
            batch: Batch::new(),
            gro: GROTable::default(),
            thread: None,
        }
    }

    pub fn push(&mut self, packet: &[u8]) {
        self.batch.push(packet);
    }

    pub fn is_full(&self) -> bool {
        self.batch.n >= IDEAL_BATCH_SIZE
    }

    /// Writes what was pushed: here, or (threaded) by handing the batch to the writing thread, which only
    /// waits when [`QUEUED`] batches are already ahead of it.
    pub fn flush(&mut self, dev: &TunDevice) {
        if self.batch.n == 0 {
            return;
        }
        if let Some(t) = self.thread.as_mut() {
            let next = match t.free.try_recv() {
                Ok(b) => Some(b),
                Err(_) if t.made < QUEUED + 1 => {
                    t.made += 1;
                    Some(Batch::new())
                }
                Err(_) => t.free.recv().ok(),
            };
            if let (Some(next), Some(jobs)) = (next, t.jobs.as_ref()) {
                let full = std::mem::replace(&mut self.batch, next);
                match jobs.send(full) {
                    Ok(()) => return,
                    // The thread is gone: write here from now on.
                    Err(std::sync::mpsc::SendError(full)) => {
                        self.batch = full;
                        self.thread = None;
                    }
                }
            } else {
                self.thread = None;
            }
        }
        self.batch.write(&dev.dev, &mut self.gro);
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        self.jobs = None; // ends the thread's loop once it has written what is queued
        if let Some(h) = self.handle.take() {
            let _ = h.join();
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

/// Runs `ip ARGS…` and maps a failure to an error carrying its stderr. Only the hub uses it (its per-peer
/// routes; the hub runs on a Linux host); the client's TUN setup goes through tun-rs.
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
#[cfg(target_os = "linux")]
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

/// True when this process may create TUN devices (a utun needs root).
#[cfg(not(target_os = "linux"))]
pub fn can_create_tun() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The Internet checksum of `data` on top of `acc`.
    fn internet_sum(data: &[u8], mut acc: u32) -> u16 {
        for c in data.chunks(2) {
            acc += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
        }
        while acc > 0xffff {
            acc = (acc >> 16) + (acc & 0xffff);
        }
        !(acc as u16)
    }

    /// One full-sized TCP segment of a bulk transfer (ACK only, valid checksums), as the hub decrypts them.
    fn segment(seq: u32, len: usize) -> Vec<u8> {
        let total = 40 + len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 240, 1, 2]);
        p[16..20].copy_from_slice(&[10, 240, 1, 10]);
        let ip = internet_sum(&p[..20], 0);
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&1u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x10;
        p[34..36].copy_from_slice(&1024u16.to_be_bytes());
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let pseudo = internet_sum(&p[12..20], 0);
        let acc = u32::from(!pseudo) + 6 + (total - 20) as u32;
        let tcp = internet_sum(&p[20..], acc);
        p[36..38].copy_from_slice(&tcp.to_be_bytes());
        p
    }

    /// A write batch's buffers have room for tun-rs's GRO to coalesce a flow (it never grows a buffer).
    #[test]
    fn a_write_batch_coalesces_one_flow_into_one_super_packet() {
        let mut batch = Batch::new();
        for i in 0..16u32 {
            batch.push(&segment(1000 + i * 1380, 1380));
        }
        let mut to_write = Vec::new();
        tun_rs::handle_gro(
            &mut batch.bufs[..batch.n],
            HEADROOM,
            &mut Default::default(),
            &mut Default::default(),
            false,
            &mut to_write,
        )
        .unwrap();
        assert_eq!(to_write, vec![0], "16 segments of one flow, one write");
        assert_eq!(batch.bufs[0].len(), HEADROOM + 40 + 16 * 1380);
    }
}
