//! The guest agent: a shell loop in the tiny image's init reading one-line commands on the second serial port
//! (ttyS1), which qemu exposes as a unix socket in the VM's run dir. It is how a VM restored from the shared
//! onboarding snapshot learns its own address, MAC, name and ssh keys, and how tests run a command in a guest.
//!
//! Protocol (one line each way, fields are `key=value` without spaces, binary values in base64):
//! - `ping` → `pong`
//! - `config ip=A/P gw=G name=N ns=S role=R mac=M keys=B64 hosts=B64 time=UNIX seed=HEX id=HEX` → `ok N …`
//!   (`hosts`: /etc/hosts lines of the cluster's VMs; the guest also flushes its neighbour table, so the
//!   snapshot network's MACs are forgotten; `time`: the host's clock, set in the guest; Debian images also
//!   reseed the kernel RNG from the seed and install `hostkey`, an ssh host key the server made; the tiny
//!   image installs the same key from `dbkey`, in dropbear's format)
//! - `run B64(command) id=HEX` → `out RC B64(output) id=HEX`
//! - `exec B64(command) id=HEX` → `started id=HEX`, `data id=HEX SEQ B64(bytes)`… as output comes, then
//!   `exit id=HEX RC`; `kill id=HEX` stops it (SIGTERM to its process group)
//! - `clock UNIX id=HEX` → `ok id=HEX` (sets the guest's clock, `date -u -s @UNIX`: after a VM resumed from a
//!   named snapshot or a stop, its clock is where it was when it was saved)
//!
//! Every request carries an `id`; the host re-sends it until the reply comes (a line can be lost or cut on the
//! serial port under load) and the agent handles each id once, answering a re-sent copy from its cache.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("guest agent socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("guest agent did not answer `{command}` within {secs:.1} s")]
    Timeout { command: String, secs: f64 },
    #[error("guest agent i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("guest agent: bad reply `{0}`")]
    BadReply(String),
}

/// One ssh host key in the two file formats guests use.
#[derive(Debug, Clone)]
pub struct GuestHostKey {
    pub openssh_pem: String,
    pub dropbear: Vec<u8>,
}

/// What a guest must be told after a restore.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub ip_cidr: String,
    pub gateway: String,
    pub name: String,
    pub namespace: String,
    pub role: String,
    pub mac: String,
    pub ssh_keys: Vec<String>,
    /// `/etc/hosts` lines for the cluster's VMs (`ADDRESS NAME…`).
    pub hosts: Vec<String>,
    /// The VM's new ssh host key, made by the server: `hostkey=B64` (an OpenSSH private key file: Debian
    /// images install it for sshd) and `dbkey=B64` (the same key in dropbear's format: the tiny image).
    pub host_key: Option<GuestHostKey>,
}

impl GuestConfig {
    /// The hosts lines, base64 (`-` when none).
    pub fn hosts_b64(&self) -> String {
        if self.hosts.is_empty() {
            return "-".into();
        }
        let text: String = self.hosts.iter().map(|l| format!("{l}\n")).collect();
        base64::engine::general_purpose::STANDARD.encode(text)
    }
}

impl GuestConfig {
    pub fn to_line(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        let keys = b64.encode(self.ssh_keys.join("\n"));
        let seed: [u8; 32] = rand::random();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let host_key = match &self.host_key {
            Some(k) => format!(
                " hostkey={} dbkey={}",
                b64.encode(&k.openssh_pem),
                b64.encode(&k.dropbear)
            ),
            None => String::new(),
        };
        format!(
            "config ip={} gw={} name={} ns={} role={} mac={} keys={} hosts={}{host_key} time={now} seed={} id={}",
            self.ip_cidr,
            self.gateway,
            self.name,
            self.namespace,
            if self.role.is_empty() {
                "-"
            } else {
                &self.role
            },
            self.mac,
            if keys.is_empty() {
                "-".to_string()
            } else {
                keys
            },
            self.hosts_b64(),
            hex::encode(seed),
            request_id()
        )
    }
}

/// A fresh request id: the agent handles a request once and answers a re-sent copy (same id) from its cache.
fn request_id() -> String {
    hex::encode(rand::random::<[u8; 6]>())
}

/// Send `line` and wait for a reply line that `expect` accepts; when `resend` is set, the line is sent again
/// at that interval until a reply comes (for idempotent commands sent while the guest may still be booting).
pub fn request(
    socket: &Path,
    line: &str,
    expect: &dyn Fn(&str) -> bool,
    timeout: Duration,
    resend: Option<Duration>,
) -> Result<String, AgentError> {
    let start = Instant::now();
    let command = line.split_whitespace().next().unwrap_or("").to_string();
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(source) => {
                if start.elapsed() >= timeout {
                    return Err(AgentError::Connect {
                        path: socket.display().to_string(),
                        source,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let mut writer = stream.try_clone()?;
    let poll = resend
        .unwrap_or(Duration::from_millis(200))
        .min(Duration::from_millis(200));
    stream.set_read_timeout(Some(poll))?;
    let mut reader = BufReader::new(stream);
    let send = |w: &mut UnixStream| -> std::io::Result<()> {
        w.write_all(format!("\n{line}\n").as_bytes())?;
        w.flush()
    };
    send(&mut writer)?;
    let mut last_send = Instant::now();
    let mut buf = Vec::new();
    loop {
        if start.elapsed() >= timeout {
            return Err(AgentError::Timeout {
                command,
                secs: timeout.as_secs_f64(),
            });
        }
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => return Err(AgentError::BadReply("agent socket closed".into())),
            Ok(_) if buf.ends_with(b"\n") => {
                let text = String::from_utf8_lossy(&buf).trim().to_string();
                buf.clear();
                if expect(&text) {
                    return Ok(text);
                }
            }
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(every) = resend {
            if last_send.elapsed() >= every {
                send(&mut writer)?;
                last_send = Instant::now();
            }
        }
    }
}

/// Wait until the guest agent answers (the guest finished booting its services).
pub fn ping(socket: &Path, timeout: Duration) -> Result<(), AgentError> {
    request(
        socket,
        "ping",
        &|l: &str| l.starts_with("pong"),
        timeout,
        Some(Duration::from_millis(500)),
    )
    .map(|_| ())
}

/// Tell a restored guest who it is; returns when the guest confirmed.
pub fn configure(socket: &Path, cfg: &GuestConfig, timeout: Duration) -> Result<(), AgentError> {
    let expect = format!("ok {}", cfg.name);
    let reply = request(
        socket,
        &cfg.to_line(),
        &|l: &str| l.starts_with(&expect),
        timeout,
        Some(Duration::from_millis(1500)),
    )?;
    // `ok NAME failed`: the guest could not apply it (its agent's log says why).
    if reply.split_whitespace().nth(2) == Some("failed") {
        return Err(AgentError::BadReply(format!(
            "{reply} (see /var/log/fcdev-agent.log in the guest)"
        )));
    }
    Ok(())
}

/// Set the guest's clock to the host's (after a resume from a saved state); returns when the guest confirmed.
pub fn set_clock(socket: &Path, timeout: Duration) -> Result<(), AgentError> {
    let id = request_id();
    let expect = format!("ok id={id}");
    // Re-sent copies carry the time of the first send: the agent handles the id once.
    let line = format!("clock {} id={id}", unix_now());
    request(
        socket,
        &line,
        &|l: &str| l == expect,
        timeout,
        Some(Duration::from_millis(1000)),
    )
    .map(|_| ())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Run a shell command in the guest; returns (exit code, combined output). The request is re-sent every 2 s
/// until its reply comes (a line lost or cut on the serial port under load); the agent runs it once.
pub fn run(socket: &Path, command: &str, timeout: Duration) -> Result<(i32, String), AgentError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let id = request_id();
    let line = format!("run {} id={id}", b64.encode(command));
    let reply = request(
        socket,
        &line,
        &|l: &str| l.starts_with("out ") && l.ends_with(&format!(" id={id}")),
        timeout,
        Some(Duration::from_secs(2)),
    )?;
    parse_run_reply(&reply, &id)
}

/// How long a guest agent may take to start an `exec`.
const EXEC_START: Duration = Duration::from_secs(15);

/// Run a command in the guest and hand its output (stdout and stderr together) to `out` as it comes; returns
/// its exit code. `out` returning false (nobody reads any more) stops the command (SIGTERM to its process
/// group). The request is re-sent until the guest says it started; `limit` bounds the whole run.
pub fn exec(
    socket: &Path,
    command: &str,
    out: &mut dyn FnMut(&[u8]) -> bool,
    limit: Duration,
) -> Result<i32, AgentError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let id = request_id();
    let line = format!("exec {} id={id}", b64.encode(command));
    let start = Instant::now();
    let stream = UnixStream::connect(socket).map_err(|source| AgentError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let mut writer = stream.try_clone()?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut reader = BufReader::new(stream);
    writer.write_all(format!("\n{line}\n").as_bytes())?;
    let (mut started, mut last_send, mut next_seq) = (false, Instant::now(), 0u64);
    let tag = format!("id={id}");
    let mut buf = Vec::new();
    loop {
        if start.elapsed() >= limit {
            let _ = writer.write_all(format!("\nkill {tag}\n").as_bytes());
            return Err(AgentError::Timeout {
                command: "exec".into(),
                secs: limit.as_secs_f64(),
            });
        }
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => return Err(AgentError::BadReply("agent socket closed".into())),
            Ok(_) if buf.ends_with(b"\n") => {
                let text = String::from_utf8_lossy(&buf).trim().to_string();
                buf.clear();
                let words: Vec<&str> = text.split_whitespace().collect();
                if words.get(1) != Some(&tag.as_str()) {
                    continue;
                }
                started = true;
                match words[0] {
                    "data" => {
                        let seq: u64 = words.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
                        let bytes = b64
                            .decode(words.get(3).unwrap_or(&""))
                            .map_err(|_| AgentError::BadReply(text.clone()))?;
                        if seq != next_seq {
                            // A line lost on the serial port: say so in the output rather than hide it.
                            let _ = out(b"\n[fcdev: output lost on the serial line]\n");
                        }
                        next_seq = seq + 1;
                        if !out(&bytes) {
                            let _ = writer.write_all(format!("\nkill {tag}\n").as_bytes());
                            return Ok(130);
                        }
                    }
                    "exit" => {
                        return words
                            .get(2)
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(|| AgentError::BadReply(text.clone()))
                    }
                    _ => {}
                }
            }
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e.into()),
        }
        if !started && start.elapsed() >= EXEC_START {
            // An agent that never says `started` does not know the verb (an image built before it).
            return Err(AgentError::Timeout {
                command: "exec (the guest agent never started it: an image built before `exec` needs `fcdev image build` again)".into(),
                secs: EXEC_START.as_secs_f64(),
            });
        }
        if !started && last_send.elapsed() >= Duration::from_secs(2) {
            writer.write_all(format!("\n{line}\n").as_bytes())?;
            last_send = Instant::now();
        }
    }
}

/// `out RC [B64] id=ID` → (RC, output); a reply to another request is an error.
fn parse_run_reply(reply: &str, id: &str) -> Result<(i32, String), AgentError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let bad = || AgentError::BadReply(reply.to_string());
    let words: Vec<&str> = reply.split_whitespace().collect();
    let rc: i32 = words.get(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let (out, reply_id) = match words.len() {
        3 => ("", words[2]),
        4 => (words[2], words[3]),
        _ => return Err(bad()),
    };
    if reply_id != format!("id={id}") {
        return Err(bad());
    }
    let bytes = b64.decode(out).map_err(|_| bad())?;
    Ok((rc, String::from_utf8_lossy(&bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_replies_are_matched_by_id() {
        assert_eq!(
            parse_run_reply("out 3 aGk= id=ab12", "ab12").expect("reply"),
            (3, "hi".to_string())
        );
        assert_eq!(
            parse_run_reply("out 0 id=ab12", "ab12").expect("empty output"),
            (0, String::new())
        );
        assert!(parse_run_reply("out 0 aGk= id=ffff", "ab12").is_err());
        assert!(parse_run_reply("out x aGk= id=ab12", "ab12").is_err());
    }
}
