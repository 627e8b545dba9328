//! The sealing worker: a thread of its own that encrypts what smoltcp sends and hands it to the kernel as UDP
//! GSO batches, so the stack task does TCP and nothing else on the upload path. The stack fills a [`Plain`]
//! batch slot by slot (smoltcp writes each packet straight into it), passes full batches (and at the end of
//! each wake-up the partial one) over a bounded channel, and gets emptied batches back: a fixed number of
//! batches circulate, so the stack never allocates per packet and stops sending (smoltcp keeps the data in its
//! socket buffer) when the worker falls behind. The peer is shared behind a mutex: the stack still decrypts
//! what arrives (acknowledgements on an upload) and runs the timers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::Notify;

use crate::tunnel::peer::{Outcome, Peer, OVERHEAD};
use crate::tunnel::udp::{self, SendBatch, BATCH, SLOT};

/// Batches circulating between the stack and the worker (each [`BATCH`] packets of up to [`SLOT`] bytes).
const BATCHES: usize = 8;
/// A partial batch this small is sealed on the stack task itself when the worker is idle: a lone
/// acknowledgement (downloads) does not wait for a thread hand-off.
const INLINE_MAX: usize = 4;

/// Plaintext IP packets on their way to the worker, each in a fixed slot.
pub(super) struct Plain {
    buf: Vec<u8>,
    lens: Vec<usize>,
    n: usize,
}

impl Plain {
    fn new() -> Plain {
        Plain {
            buf: vec![0u8; BATCH * SLOT],
            lens: vec![0; BATCH],
            n: 0,
        }
    }

    fn get(&self, i: usize) -> Option<&[u8]> {
        self.buf.get(i * SLOT..i * SLOT + *self.lens.get(i)?)
    }
}

enum Job {
    Seal(Plain),
    /// The stack moved to a new UDP socket (rebind).
    Socket(std::net::UdpSocket),
}

pub(super) fn lock(peer: &Mutex<Peer>) -> std::sync::MutexGuard<'_, Peer> {
    peer.lock().unwrap_or_else(|e| e.into_inner())
}

/// The stack's side of the worker.
pub(super) struct Sealer {
    peer: Arc<Mutex<Peer>>,
    endpoint: SocketAddr,
    /// Our handle on the UDP socket (inline sends); the worker has its own.
    udp: std::net::UdpSocket,
    jobs: Option<mpsc::SyncSender<Job>>,
    free: mpsc::Receiver<Plain>,
    spare: Vec<Plain>,
    current: Option<Plain>,
    /// Batches at the worker (sent and not yet back).
    busy: usize,
    /// Set by the stack when it found no free batch; the worker then wakes it when one comes back.
    starved: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Inline sealing (small batches, or no free batch): one datagram at a time.
    scratch: Vec<u8>,
    out: Vec<u8>,
    submitted: bool,
}

impl Sealer {
    /// Starts the worker thread; `udp` is a handle on the stack's socket (the sealer duplicates it).
    pub(super) fn start(
        peer: Arc<Mutex<Peer>>,
        endpoint: SocketAddr,
        udp: &std::net::UdpSocket,
        wake: Arc<Notify>,
    ) -> std::io::Result<Sealer> {
        let (jobs_tx, jobs_rx) = mpsc::sync_channel(BATCHES + 1);
        let (free_tx, free_rx) = mpsc::channel();
        let starved = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            peer: peer.clone(),
            endpoint,
            udp: udp.try_clone()?,
            free: free_tx,
            starved: starved.clone(),
            wake,
        };
        let thread = std::thread::Builder::new()
            .name("fcdev-seal".into())
            .spawn(move || worker.run(jobs_rx))?;
        Ok(Sealer {
            peer,
            endpoint,
            udp: udp.try_clone()?,
            jobs: Some(jobs_tx),
            free: free_rx,
            spare: (0..BATCHES).map(|_| Plain::new()).collect(),
            current: None,
            busy: 0,
            starved,
            thread: Some(thread),
            scratch: vec![0u8; SLOT],
            out: vec![0u8; SLOT + OVERHEAD],
            submitted: false,
        })
    }

    pub(super) fn peer(&self) -> &Arc<Mutex<Peer>> {
        &self.peer
    }

    /// The stack moved to a new socket (rebind): both ends of the worker send on it from now on.
    pub(super) fn set_socket(&mut self, udp: &std::net::UdpSocket) -> std::io::Result<()> {
        let (mine, theirs) = (udp.try_clone()?, udp.try_clone()?);
        self.submit();
        self.udp = mine;
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job::Socket(theirs));
        }
        Ok(())
    }

    /// Takes back the batches the worker has finished with.
    fn reclaim(&mut self) {
        while let Ok(b) = self.free.try_recv() {
            self.busy = self.busy.saturating_sub(1);
            self.spare.push(b);
        }
    }

    /// Whether a packet can be queued now; when not, the worker wakes the stack once a batch is free again.
    pub(super) fn has_room(&mut self) -> bool {
        if self.current.as_ref().is_some_and(|c| c.n < BATCH) {
            return true;
        }
        self.submit();
        self.reclaim();
        if self.spare.is_empty() {
            self.starved.store(true, Ordering::SeqCst);
            // The worker may have returned one between the check and the flag.
            self.reclaim();
            if self.spare.is_empty() {
                return false;
            }
            self.starved.store(false, Ordering::SeqCst);
        }
        self.current = self.spare.pop();
        self.current.is_some()
    }

    /// Lets `f` write a packet of `len` bytes into the next slot and queues it. Without room (see
    /// [`Sealer::has_room`]) or for an oversized packet, the packet is sealed and sent here instead.
    pub(super) fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        if len <= SLOT && self.has_room() {
            if let Some(c) = self.current.as_mut() {
                let i = c.n;
                if let Some(slot) = c.buf.get_mut(i * SLOT..i * SLOT + len) {
                    let r = f(slot);
                    c.lens[i] = len;
                    c.n += 1;
                    if c.n == BATCH {
                        self.submit();
                    }
                    return r;
                }
            }
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        let r = f(&mut scratch[..len]);
        self.seal_here(std::iter::once(&scratch[..len]));
        self.scratch = scratch;
        r
    }

    /// Seals and sends on the stack task, datagram by datagram.
    fn seal_here<'p>(&mut self, packets: impl Iterator<Item = &'p [u8]>) {
        let mut peer = lock(&self.peer);
        for p in packets {
            if self.out.len() < p.len() + OVERHEAD {
                self.out.resize(p.len() + OVERHEAD, 0);
            }
            if let Outcome::Network(d) = peer.encapsulate(p, &mut self.out) {
                udp::send_to(&self.udp, d, self.endpoint);
            }
        }
    }

    /// Whether a batch went to the worker since the last call (the stack then refills smoltcp's buffers).
    pub(super) fn take_submitted(&mut self) -> bool {
        std::mem::take(&mut self.submitted)
    }

    /// Sends the batch being filled to the worker (a full one, or the rest at the end of a wake-up). A small
    /// one is sealed here when the worker has nothing of ours queued (so the order is kept): a lone
    /// acknowledgement does not wait for a thread hand-off.
    pub(super) fn submit(&mut self) {
        let Some(mut c) = self.current.take() else {
            return;
        };
        if c.n == 0 {
            self.current = Some(c);
            return;
        }
        self.reclaim();
        if c.n <= INLINE_MAX && self.busy == 0 {
            self.seal_here((0..c.n).filter_map(|i| c.get(i)));
            c.n = 0;
            self.current = Some(c);
            return;
        }
        self.submitted = true;
        match self.jobs.as_ref().map(|j| j.try_send(Job::Seal(c))) {
            Some(Ok(())) => self.busy += 1,
            // The worker is gone (it only ends when we drop the channel) or, impossibly, behind by more
            // batches than exist: seal here.
            Some(Err(mpsc::TrySendError::Full(Job::Seal(mut c))))
            | Some(Err(mpsc::TrySendError::Disconnected(Job::Seal(mut c)))) => {
                self.seal_here((0..c.n).filter_map(|i| c.get(i)));
                c.n = 0;
                self.spare.push(c);
            }
            _ => {}
        }
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        self.submit();
        self.jobs = None; // ends the worker's loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    peer: Arc<Mutex<Peer>>,
    endpoint: SocketAddr,
    udp: std::net::UdpSocket,
    free: mpsc::Sender<Plain>,
    starved: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Worker {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        let mut batch = SendBatch::new();
        let mut out = vec![0u8; SLOT + OVERHEAD];
        while let Ok(job) = jobs.recv() {
            match job {
                Job::Socket(udp) => self.udp = udp,
                Job::Seal(mut plain) => {
                    {
                        let mut peer = lock(&self.peer);
                        for i in 0..plain.n {
                            if let Some(p) = plain.get(i) {
                                batch.encapsulate(&mut peer, p, self.endpoint, &mut out, &self.udp);
                            }
                        }
                    }
                    batch.flush(&self.udp);
                    plain.n = 0;
                    if self.free.send(plain).is_err() {
                        return;
                    }
                    if self.starved.swap(false, Ordering::SeqCst) {
                        self.wake.notify_one();
                    }
                }
            }
        }
    }
}
