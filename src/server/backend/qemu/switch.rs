//! A private Ethernet hub for the VMs of one cluster snapshot: a unix socket that qemu's `-netdev stream`
//! connects to (frames are a 4-byte big-endian length, then the frame). Every frame goes to every other
//! connected VM. No tap, no bridge, no host network: the snapshot cluster reaches only itself.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// The largest frame forwarded (a 1500-byte MTU frame with headers fits many times).
const MAX_FRAME: usize = 65_536;

pub struct Switch {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    ports: Ports,
}

/// The connected VMs: each one's queue of frames to deliver, and its socket (to shut it down).
type Ports = Arc<Mutex<Vec<Port>>>;

struct Port {
    id: usize,
    queue: SyncSender<Arc<Vec<u8>>>,
    conn: UnixStream,
}

/// Frames queued for one VM; when a VM does not read (still booting, or paused), what does not fit is dropped,
/// as a congested switch does. A VM is never disconnected for being slow: under TCG a guest's NIC can be
/// silent for seconds while it boots (a VM that was dropped then never heard its neighbours again).
const PORT_QUEUE: usize = 512;

impl Switch {
    /// Listen on `path` and forward frames in background threads until dropped.
    pub fn start(path: &Path) -> std::io::Result<Switch> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ports: Ports = Arc::new(Mutex::new(Vec::new()));
        let (stop2, ports2) = (stop.clone(), ports.clone());
        std::thread::spawn(move || {
            for (id, conn) in listener.incoming().enumerate() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (Ok(writer), Ok(handle)) = (conn.try_clone(), conn.try_clone()) else {
                    continue;
                };
                let (queue, frames) = sync_channel::<Arc<Vec<u8>>>(PORT_QUEUE);
                ports2.lock().unwrap_or_else(|e| e.into_inner()).push(Port {
                    id,
                    queue,
                    conn: handle,
                });
                std::thread::spawn(move || deliver(writer, frames));
                let ports3 = ports2.clone();
                std::thread::spawn(move || forward(id, conn, &ports3));
            }
        });
        Ok(Switch {
            path: path.to_path_buf(),
            stop,
            ports,
        })
    }
}

/// Write one VM's queued frames (length-prefixed, whole) until its connection ends.
fn deliver(mut conn: UnixStream, frames: Receiver<Arc<Vec<u8>>>) {
    for frame in frames {
        if conn.write_all(&frame).is_err() {
            break;
        }
    }
}

/// Read frames from one port and queue each for every other port.
fn forward(id: usize, mut conn: UnixStream, ports: &Mutex<Vec<Port>>) {
    let mut len = [0u8; 4];
    loop {
        if conn.read_exact(&mut len).is_err() {
            break;
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_FRAME {
            break;
        }
        let mut frame = vec![0u8; 4 + n];
        frame[..4].copy_from_slice(&len);
        if conn.read_exact(&mut frame[4..]).is_err() {
            break;
        }
        let frame = Arc::new(frame);
        let mut ports = ports.lock().unwrap_or_else(|e| e.into_inner());
        ports.retain(|p| {
            p.id == id
                || !matches!(
                    p.queue.try_send(frame.clone()),
                    Err(TrySendError::Disconnected(_))
                )
        });
    }
    let mut ports = ports.lock().unwrap_or_else(|e| e.into_inner());
    ports.retain(|p| p.id != id);
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for p in self
            .ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = p.conn.shutdown(std::net::Shutdown::Both);
        }
        // Wake the accept loop so it sees `stop`.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn send(conn: &mut UnixStream, payload: &[u8]) {
        conn.write_all(&(payload.len() as u32).to_be_bytes())
            .expect("len");
        conn.write_all(payload).expect("frame");
    }

    fn recv(conn: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        conn.read_exact(&mut len).expect("len");
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        conn.read_exact(&mut frame).expect("frame");
        frame
    }

    /// A VM that reads nothing for a while (booting under TCG) misses frames but stays connected: it hears
    /// what is sent after. (The switch used to drop a port whose write blocked for a second: that VM never
    /// heard its neighbours again and the snapshot's checks timed out.)
    #[test]
    fn a_port_that_stops_reading_is_kept_and_hears_later_frames() {
        let dir = std::env::temp_dir().join(format!("fcdev-switch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("switch.sock");
        let switch = Switch::start(&path).expect("switch");
        let mut a = UnixStream::connect(&path).expect("a");
        let mut b = UnixStream::connect(&path).expect("b");
        let t0 = Instant::now();
        while switch.ports.lock().map(|p| p.len()).unwrap_or(0) < 2 {
            assert!(t0.elapsed() < Duration::from_secs(5), "ports connected");
            std::thread::sleep(Duration::from_millis(10));
        }
        // b does not read: far more than its socket buffer and its queue.
        for _ in 0..4000 {
            send(&mut a, &[0u8; 1400]);
        }
        std::thread::sleep(Duration::from_millis(1500));
        // b reads again; a keeps saying "late" (as ARP retries do) until b hears it.
        b.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let reader = std::thread::spawn(move || {
            let mut missed = 0;
            while recv(&mut b) != b"late" {
                missed += 1;
            }
            missed
        });
        let t0 = Instant::now();
        while !reader.is_finished() && t0.elapsed() < Duration::from_secs(8) {
            send(&mut a, b"late");
            std::thread::sleep(Duration::from_millis(50));
        }
        let before_late = reader.join().expect("b heard the late frame");
        assert!(
            before_late < 4000,
            "frames were dropped while b did not read ({before_late} delivered)"
        );
        drop(switch);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
