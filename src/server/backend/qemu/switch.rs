//! A private Ethernet hub for the VMs of one cluster snapshot: a unix socket that qemu's `-netdev stream`
//! connects to (frames are a 4-byte big-endian length, then the frame). Every frame goes to every other
//! connected VM. No tap, no bridge, no host network: the snapshot cluster reaches only itself.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The largest frame forwarded (a 1500-byte MTU frame with headers fits many times).
const MAX_FRAME: usize = 65_536;

pub struct Switch {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    ports: Arc<Mutex<Vec<(usize, UnixStream)>>>,
}

impl Switch {
    /// Listen on `path` and forward frames in background threads until dropped.
    pub fn start(path: &Path) -> std::io::Result<Switch> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ports: Arc<Mutex<Vec<(usize, UnixStream)>>> = Arc::new(Mutex::new(Vec::new()));
        let (stop2, ports2) = (stop.clone(), ports.clone());
        std::thread::spawn(move || {
            for (id, conn) in listener.incoming().enumerate() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let Ok(writer) = conn.try_clone() else {
                    continue;
                };
                // A paused VM stops reading: never let it block the others for long.
                let _ = writer.set_write_timeout(Some(std::time::Duration::from_secs(1)));
                ports2
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((id, writer));
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

/// Read frames from one port and write each to every other port.
fn forward(id: usize, mut conn: UnixStream, ports: &Mutex<Vec<(usize, UnixStream)>>) {
    let mut len = [0u8; 4];
    let mut frame = vec![0u8; MAX_FRAME];
    loop {
        if conn.read_exact(&mut len).is_err() {
            break;
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_FRAME || conn.read_exact(&mut frame[..n]).is_err() {
            break;
        }
        let mut ports = ports.lock().unwrap_or_else(|e| e.into_inner());
        ports.retain_mut(|(other, w)| {
            *other == id || (w.write_all(&len).is_ok() && w.write_all(&frame[..n]).is_ok())
        });
    }
    let mut ports = ports.lock().unwrap_or_else(|e| e.into_inner());
    ports.retain(|(other, _)| *other != id);
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for (_, p) in self
            .ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = p.shutdown(std::net::Shutdown::Both);
        }
        // Wake the accept loop so it sees `stop`.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}
