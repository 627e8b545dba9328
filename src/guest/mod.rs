//! The guest agent of Debian images (`fcdev guest-agent`, installed as `/usr/local/sbin/fcdev-agent` by
//! `fcdev image build press`): it reads one-line requests on the second serial port (ttyS1; the host side is
//! `server/backend/qemu/agent.rs`) and answers one line each. The protocol is the one the tiny image's shell
//! agent speaks:
//!
//! - `ping [id=HEX]` → `pong`
//! - `config ip=… gw=… name=… …` → `ok NAME ok|failed` (gives the VM its identity: [`configure`])
//! - `clock UNIX id=HEX` → `ok id=HEX`
//! - `run B64(command) id=HEX` → `out RC B64(output) id=HEX`
//! - `exec B64(command) id=HEX` → `started id=HEX`, `data id=HEX SEQ B64(bytes)`…, `exit id=HEX RC`
//! - `kill id=HEX` → nothing (SIGTERM to a running exec's process group)
//!
//! The host re-sends a request until its reply comes; each id is handled once, a re-sent copy of a finished one
//! gets the same reply again, one still running is ignored. `run` and `exec` work in threads of their own.
//!
//! Why compiled and not a script: this process runs in the onboarding snapshot already, and after a restore
//! every instruction it executes is translated afresh by TCG. A Python agent spent ~0.7–1 s of guest CPU per
//! re-address (the interpreter's code, then `ip` and `ss` started as programs); this one makes a few system
//! calls. `fcdev-agent guest-agent --configure KEY=VALUE…` does the same at a cold boot (`fcdev-boot`).

mod configure;
mod dns;
mod netlink;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine;

pub use configure::configure;

const PORT: &str = "/dev/ttyS1";
const LOG: &str = "/var/log/fcdev-agent.log";
/// How many finished requests' replies are kept for re-sent copies.
const DONE_KEPT: usize = 64;

/// `fcdev guest-agent [--configure KEY=VALUE…]`.
pub fn main(args: &[String]) -> Result<(), String> {
    // It rewrites /etc/hosts, the hostname and the network: never on a machine that is not an fcdev VM (every
    // fcdev VM boots with `fcdev.*` kernel parameters).
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if !cmdline.split_whitespace().any(|w| w.starts_with("fcdev.")) {
        return Err(
            "the guest agent runs only inside an fcdev VM (no fcdev.* kernel parameter here)"
                .into(),
        );
    }
    if args.first().map(String::as_str) == Some("--configure") {
        let kv = parse(args[1..].iter().map(String::as_str));
        let boot = kv.contains_key("boot");
        configure(&kv, boot).map_err(|e| format!("configure: {e}"))?;
        println!("ok");
        return Ok(());
    }
    // The cluster's names for the proxy's nginx (see `dns`); not fatal: the rest of the agent works without it.
    if let Err(e) = dns::serve(dns::LISTEN, configure::HOSTS.into()) {
        log(&format!("name server on {}: {e}", dns::LISTEN));
    }
    let port = std::env::var("FCDEV_AGENT_PORT").unwrap_or_else(|_| PORT.into());
    Agent::open(&port)
        .map_err(|e| format!("{port}: {e}"))?
        .serve()
        .map_err(|e| format!("{port}: {e}"))
}

/// Append a line to the agent's log in the guest (what a `failed` reply points to).
pub(crate) fn log(msg: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(LOG)
    {
        let _ = writeln!(f, "{} {msg}", unix_now());
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `key=value` words into a map (words without `=` are skipped).
pub(crate) fn parse<'a>(words: impl Iterator<Item = &'a str>) -> HashMap<String, String> {
    words
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

#[derive(Default)]
struct State {
    done: VecDeque<(String, String)>,
    running: HashSet<String>,
    /// exec id → its process group
    procs: HashMap<String, i32>,
}

#[derive(Clone)]
struct Agent {
    port: Arc<Mutex<File>>,
    state: Arc<Mutex<State>>,
}

impl Agent {
    fn open(path: &str) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)?;
        raw_mode(&file)?;
        Ok(Self {
            port: Arc::new(Mutex::new(file)),
            state: Arc::new(Mutex::new(State::default())),
        })
    }

    fn send(&self, line: &str) {
        let mut data = line.as_bytes().to_vec();
        data.push(b'\n');
        if let Ok(mut port) = self.port.lock() {
            if let Err(e) = port.write_all(&data) {
                log(&format!("writing a reply: {e}"));
            }
        }
    }

    fn finish(&self, rid: &str, reply: String) {
        if let Ok(mut st) = self.state.lock() {
            st.running.remove(rid);
            if !rid.is_empty() {
                st.done.push_back((rid.to_string(), reply.clone()));
                while st.done.len() > DONE_KEPT {
                    st.done.pop_front();
                }
            }
        }
        self.send(&reply);
    }

    fn serve(&self) -> std::io::Result<()> {
        let mut reader = self.port.lock().map_err(|_| poisoned())?.try_clone()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = reader.read(&mut chunk)?;
            if n == 0 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                self.handle(text.trim());
            }
        }
    }

    fn handle(&self, line: &str) {
        let mut words = line.split_whitespace();
        let Some(verb) = words.next() else { return };
        let rest: Vec<&str> = words.collect();
        let kv = parse(rest.iter().copied());
        let rid = kv.get("id").cloned().unwrap_or_default();
        if verb == "kill" {
            self.kill(&rid);
            return;
        }
        {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            if !rid.is_empty() {
                if let Some((_, reply)) = st.done.iter().find(|(id, _)| *id == rid) {
                    let reply = reply.clone();
                    drop(st);
                    self.send(&reply);
                    return;
                }
                if !st.running.insert(rid.clone()) {
                    return;
                }
            }
        }
        match verb {
            "ping" => self.finish(&rid, "pong".into()),
            "config" => {
                let (status, old) = match configure(&kv, false) {
                    Ok(old) => ("ok", old),
                    Err(e) => {
                        log(&format!("configure failed: {e}"));
                        ("failed", None)
                    }
                };
                let name = kv.get("name").map(String::as_str).unwrap_or("");
                self.finish(&rid, format!("ok {name} {status}"));
                // After the reply: connections from the old address can never work again; destroying them
                // makes their owners reconnect now, to names resolved afresh (rsyslog to e1, Prometheus to its
                // targets).
                if let Some(old) = old {
                    let start = std::time::Instant::now();
                    match netlink::destroy_tcp_from(old) {
                        Ok(n) => {
                            let line = format!(
                                "after the reply, {n} sockets of {old} destroyed: {} us\n",
                                start.elapsed().as_micros()
                            );
                            let _ = std::fs::OpenOptions::new()
                                .append(true)
                                .open("/run/fcdev/configure.trace")
                                .and_then(|mut f| f.write_all(line.as_bytes()));
                        }
                        Err(e) => log(&format!("closing the sockets of {old}: {e}")),
                    }
                }
            }
            "clock" if !rest.is_empty() => {
                let reply = match configure::set_clock(rest[0]) {
                    Ok(()) => format!("ok id={rid}"),
                    Err(e) => format!("err {} id={rid}", e.to_string().replace('\n', " ")),
                };
                self.finish(&rid, reply);
            }
            "run" | "exec" if !rest.is_empty() => {
                let command = b64()
                    .decode(rest[0])
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok());
                let Some(command) = command else {
                    let reply = if verb == "run" {
                        format!("out 2 {} id={rid}", b64().encode("bad request"))
                    } else {
                        format!("exit id={rid} 2")
                    };
                    self.finish(&rid, reply);
                    return;
                };
                let agent = self.clone();
                let streaming = verb == "exec";
                std::thread::spawn(move || {
                    if streaming {
                        agent.exec(&rid, &command)
                    } else {
                        agent.run(&rid, &command)
                    }
                });
            }
            _ => {
                if let Ok(mut st) = self.state.lock() {
                    st.running.remove(&rid);
                }
            }
        }
    }

    /// `sh -c COMMAND` with stdout and stderr on one pipe; the child's process group is its own.
    fn spawn(command: &str) -> std::io::Result<(std::process::Child, std::io::PipeReader)> {
        let (reader, writer) = std::io::pipe()?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer)
            .process_group(0)
            .spawn()?;
        Ok((child, reader))
    }

    fn run(&self, rid: &str, command: &str) {
        let (rc, out) = match Self::spawn(command) {
            Ok((mut child, mut reader)) => {
                let mut out = Vec::new();
                let _ = reader.read_to_end(&mut out);
                (child.wait().map(exit_code).unwrap_or(127), out)
            }
            Err(e) => (127, e.to_string().into_bytes()),
        };
        self.finish(rid, format!("out {rc} {} id={rid}", b64().encode(out)));
    }

    fn exec(&self, rid: &str, command: &str) {
        let (mut child, mut reader) = match Self::spawn(command) {
            Ok(x) => x,
            Err(e) => {
                self.send(&format!("data id={rid} 0 {}", b64().encode(e.to_string())));
                self.finish(rid, format!("exit id={rid} 127"));
                return;
            }
        };
        if let Ok(mut st) = self.state.lock() {
            st.procs.insert(rid.to_string(), child.id() as i32);
        }
        self.send(&format!("started id={rid}"));
        let mut chunk = [0u8; 3072];
        let mut seq = 0u64;
        loop {
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.send(&format!(
                        "data id={rid} {seq} {}",
                        b64().encode(&chunk[..n])
                    ));
                    seq += 1;
                }
            }
        }
        let rc = child.wait().map(exit_code).unwrap_or(127);
        if let Ok(mut st) = self.state.lock() {
            st.procs.remove(rid);
        }
        self.finish(rid, format!("exit id={rid} {rc}"));
    }

    fn kill(&self, rid: &str) {
        let pgid = self
            .state
            .lock()
            .ok()
            .and_then(|st| st.procs.get(rid).copied());
        if let Some(pgid) = pgid {
            // SAFETY: kill(2) on a process group this agent started.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn poisoned() -> std::io::Error {
    std::io::Error::other("serial port lock poisoned")
}

/// Raw 8-bit mode, no echo, reads return as soon as one byte is there.
fn raw_mode(port: &File) -> std::io::Result<()> {
    let fd = port.as_raw_fd();
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open for the duration of the call.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    t.c_iflag = 0;
    t.c_oflag = 0;
    t.c_lflag = 0;
    t.c_cflag |= libc::CS8 | libc::CREAD | libc::CLOCAL;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: as above, t is initialised.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
