//! `config`: give this VM its identity (after a restore, or at a cold boot from `fcdev-boot`).
//!
//! Keys: `ip=A/P gw=G name=N ns=S role=R mac=M keys=B64 hosts=B64` (the cluster's `/etc/hosts` lines)
//! `hostkey=B64` (an OpenSSH private key the server made) `seed=HEX time=UNIX`; `-` is an empty value.

use std::collections::HashMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use base64::Engine;

use super::netlink;

const STATE: &str = "/run/fcdev"; // the address this guest has now (what a re-address replaces)
const DEV: &str = "eth0";
/// Prometheus's targets on the monitor VM (press recipe: `file_sd_configs`).
const PROMETHEUS_TARGETS: &str = "/run/fcdev/prometheus-targets.json";
/// Per-VM files live in /run (a tmpfs): after a restore, a write there is a few pages of memory, where a file
/// made on ext4 runs its inode, journal and rename code for the first time under TCG. The press image points at
/// them: /etc/hosts is a symlink to `HOSTS`, sshd's `HostKey` and `AuthorizedKeysFile` name the others.
pub const HOSTS: &str = "/run/fcdev/hosts";
const HOST_KEY: &str = "/run/fcdev/ssh_host_ed25519_key";
const AUTHORIZED_KEYS: &str = "/run/fcdev/authorized_keys";
const MACHINE_ID: &str = "/etc/machine-id";
/// RNDRESEEDCRNG: reseed the kernel's CRNG from its pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("bad {key}: `{value}`")]
    Bad { key: &'static str, value: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ConfigError {
    let what = what.into();
    move |source| ConfigError::Io { what, source }
}

fn get<'a>(kv: &'a HashMap<String, String>, key: &str) -> &'a str {
    match kv.get(key).map(String::as_str) {
        Some("-") | None => "",
        Some(v) => v,
    }
}

fn b64(kv: &HashMap<String, String>, key: &'static str) -> Result<Vec<u8>, ConfigError> {
    let v = get(kv, key);
    if v.is_empty() {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(v)
        .map_err(|_| ConfigError::Bad {
            key,
            value: v.chars().take(16).collect(),
        })
}

/// Replace a file whole (a reader sees the old file or the new one, never half).
fn write_file(path: &str, data: &[u8], mode: u32) -> Result<(), ConfigError> {
    let tmp = format!("{path}.fcdev-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(tmp.clone()))?;
    f.write_all(data).map_err(io(tmp.clone()))?;
    drop(f);
    // The umask or a left-over temp file may have given it another mode.
    set_mode(&tmp, mode)?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// chmod `path` to `mode` unless it has it already: a chmod is an inode change through ext4's journal, code
/// that a restored guest would run for the first time under TCG.
fn set_mode(path: &str, mode: u32) -> Result<(), ConfigError> {
    let now = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode();
    if now & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))?;
    }
    Ok(())
}

/// Make `path` a symlink to `target` unless it is one already (images built before the per-VM files moved to
/// /run have a file there).
fn link_to(path: &str, target: &str) -> Result<(), ConfigError> {
    if std::fs::read_link(path).is_ok_and(|t| t == std::path::Path::new(target)) {
        return Ok(());
    }
    let tmp = format!("{path}.fcdev-tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io(tmp.clone()))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Write `data` over the start of an existing file of the same length.
fn overwrite(path: &str, data: &[u8]) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(data, 0))
        .map_err(io(path))
}

/// `write_file`, unless the file already holds exactly `data` (a restored VM keeps its snapshot's role and
/// name: every write is ext4 and journal work, translated afresh under TCG after a restore).
fn write_if_changed(path: &str, data: &[u8], mode: u32) -> Result<(), ConfigError> {
    if std::fs::read(path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    write_file(path, data, mode)
}

/// Prometheus's file service discovery: `NAME:9100` for every name of a `ADDRESS NAME` map.
fn prometheus_targets(map: &[u8]) -> Vec<u8> {
    let targets: Vec<String> = String::from_utf8_lossy(map)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|name| format!("{name}:9100"))
        .collect();
    serde_json::json!([{ "targets": targets }])
        .to_string()
        .into_bytes()
}

/// How long after a restore the monitor starts scraping: a first scrape runs the node exporter's and
/// Prometheus's code for the first time under TCG (a tenth of a second of CPU per target), work that would
/// otherwise compete with the cluster's own start; every target is still up within ~10 s of the restore.
const TARGETS_DELAY: std::time::Duration = std::time::Duration::from_secs(3);
/// The latest re-address's targets win: an older one's delayed write is dropped.
static TARGETS_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn write_targets_later(targets: Vec<u8>) {
    use std::sync::atomic::Ordering;
    let generation = TARGETS_GENERATION.fetch_add(1, Ordering::SeqCst) + 1;
    std::thread::spawn(move || {
        std::thread::sleep(TARGETS_DELAY);
        if TARGETS_GENERATION.load(Ordering::SeqCst) == generation {
            if let Err(e) = write_if_changed(PROMETHEUS_TARGETS, &targets, 0o644) {
                super::log(&format!("prometheus targets: {e}"));
            }
        }
    });
}

/// Set the guest's clock (`UNIX` seconds, fractions allowed).
pub fn set_clock(unix: &str) -> Result<(), ConfigError> {
    let secs: f64 = unix.parse().map_err(|_| ConfigError::Bad {
        key: "time",
        value: unix.into(),
    })?;
    let ts = libc::timespec {
        tv_sec: secs.trunc() as libc::time_t,
        tv_nsec: (secs.fract() * 1e9) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(ConfigError::Io {
            what: "clock_settime".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Mix the host's seed into the kernel's pool and reseed the CRNG from it now: clones of one snapshot must not
/// produce the same random bytes (a write alone only mixes).
fn reseed(seed_hex: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::Bad {
        key: "seed",
        value: seed_hex.chars().take(16).collect(),
    };
    if !seed_hex.len().is_multiple_of(2) {
        return Err(bad());
    }
    let seed = (0..seed_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&seed_hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(io("/dev/urandom"))?;
    f.write_all(&seed).map_err(io("/dev/urandom"))?;
    // SAFETY: an ioctl without argument on an open /dev/urandom.
    if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), RNDRESEEDCRNG, 0) } != 0 {
        return Err(ConfigError::Io {
            what: "RNDRESEEDCRNG".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The `ssh-ed25519 AAAA…` line of an unencrypted OpenSSH private key file.
pub fn openssh_public(pem: &str) -> Option<String> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let body = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .ok()?;
    let mut pos = b"openssh-key-v1\0".len();
    let u32_at = |pos: usize| -> Option<usize> {
        Some(u32::from_be_bytes(body.get(pos..pos + 4)?.try_into().ok()?) as usize)
    };
    for _ in 0..3 {
        // cipher, kdf, kdf options
        pos += 4 + u32_at(pos)?;
    }
    pos += 4; // number of keys
    let n = u32_at(pos)?;
    let blob = body.get(pos + 4..pos + 4 + n)?;
    Some(format!(
        "ssh-ed25519 {}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    ))
}

fn parse_cidr(v: &str) -> Result<(Ipv4Addr, u8), ConfigError> {
    let bad = || ConfigError::Bad {
        key: "ip",
        value: v.into(),
    };
    let (a, p) = v.split_once('/').ok_or_else(bad)?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    Ok((a.parse().map_err(|_| bad())?, prefix))
}

fn parse_mac(v: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::Bad {
        key: "mac",
        value: v.into(),
    };
    let parts: Vec<u8> = v
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    parts.try_into().map_err(|_| bad())
}

/// Give this VM its identity. Returns the address it had before, when a re-address replaced it (its TCP
/// sockets must go: the caller destroys them once it has answered).
pub fn configure(
    kv: &HashMap<String, String>,
    boot: bool,
) -> Result<Option<Ipv4Addr>, ConfigError> {
    let mut trace = Trace::start();
    if !get(kv, "time").is_empty() {
        set_clock(get(kv, "time"))?;
    }
    if !get(kv, "seed").is_empty() {
        reseed(get(kv, "seed"))?;
    }
    trace.mark("clock, seed");
    let mut role = get(kv, "role").to_string();
    if !role.is_empty() {
        write_if_changed("/etc/fcdev-role", format!("{role}\n").as_bytes(), 0o644)?;
    } else {
        role = std::fs::read_to_string("/etc/fcdev-role")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
    }
    let name = get(kv, "name");
    if !name.is_empty() {
        write_if_changed("/etc/hostname", format!("{name}\n").as_bytes(), 0o644)?;
        // SAFETY: the pointer and length are the name's.
        if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
            return Err(ConfigError::Io {
                what: "sethostname".into(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let mut hosts = format!("127.0.0.1 localhost\n127.0.1.1 {name}\n").into_bytes();
    let map = b64(kv, "hosts")?;
    hosts.extend(&map);
    std::fs::create_dir_all(STATE).map_err(io(STATE))?;
    write_file(HOSTS, &hosts, 0o644)?;
    link_to("/etc/hosts", HOSTS)?;
    trace.mark("role, hostname, hosts");
    let mut keys = b64(kv, "keys")?;
    if !keys.is_empty() {
        keys.push(b'\n');
        write_file(AUTHORIZED_KEYS, &keys, 0o600)?;
    }
    // Unique per VM: machine id and ssh host key (clones of one snapshot must not share them). sshd reads its
    // host key for every connection (it re-executes itself per connection): no restart.
    let id_len = std::fs::metadata(MACHINE_ID).map_or(0, |m| m.len());
    if !boot || id_len == 0 {
        let id: [u8; 16] = rand::random();
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let line = format!("{hex}\n");
        if id_len == line.len() as u64 {
            // Same length: overwrite in place (no new inode, no rename on ext4). Readers see the old id or the
            // new one: 33 bytes within one page.
            overwrite(MACHINE_ID, line.as_bytes())?;
        } else {
            write_file(MACHINE_ID, line.as_bytes(), 0o444)?;
        }
    }
    trace.mark("keys, machine id");
    let pem = String::from_utf8(b64(kv, "hostkey")?).unwrap_or_default();
    if !pem.is_empty() {
        let public = openssh_public(&pem).ok_or(ConfigError::Bad {
            key: "hostkey",
            value: "not an OpenSSH ed25519 key".into(),
        })?;
        write_file(HOST_KEY, pem.as_bytes(), 0o600)?;
        write_file(
            &format!("{HOST_KEY}.pub"),
            format!("{public} root@{name}\n").as_bytes(),
            0o644,
        )?;
    } else if !std::path::Path::new(HOST_KEY).exists() {
        // A cold boot without a server-made key: make one here (a program is fine at boot).
        let _ = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f", HOST_KEY])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    trace.mark("host key");
    let old = std::fs::read_to_string(format!("{STATE}/ip"))
        .ok()
        .and_then(|s| parse_cidr(s.trim()).ok())
        .map(|(a, _)| a);
    let new = get(kv, "ip");
    let mut new_addr = None;
    if !new.is_empty() {
        let (addr, prefix) = parse_cidr(new)?;
        let mac = match get(kv, "mac") {
            "" => None,
            m => Some(parse_mac(m)?),
        };
        let gateway = match get(kv, "gw") {
            "" => None,
            g => Some(g.parse().map_err(|_| ConfigError::Bad {
                key: "gw",
                value: g.into(),
            })?),
        };
        let index = netlink::ifindex(DEV).map_err(io(DEV))?;
        netlink::readdress(&netlink::Readdress {
            index,
            mac,
            addr,
            prefix,
            gateway,
        })
        .map_err(io(format!("re-addressing {DEV}")))?;
        // Not fatal: without it, peers learn the address at their next ARP retry.
        let announced = match mac {
            Some(mac) => Ok(mac),
            None => netlink::mac_of(DEV),
        }
        .and_then(|mac| netlink::announce(index, mac, addr));
        if let Err(e) = announced {
            super::log(&format!("gratuitous ARP for {addr}: {e}"));
        }
        write_file(&format!("{STATE}/ip"), format!("{new}\n").as_bytes(), 0o644)?;
        new_addr = Some(addr);
    }
    // Every service finds the others by name per connection: the app, Prometheus's targets, rsyslog's forward
    // (its connection from the old address is destroyed after the reply) and nginx (through the agent's name
    // server, `dns`): nothing to reload.
    trace.mark("network");
    // The monitor scrapes a node exporter on every VM of the name map: after a restore, once the cluster has
    // started (`TARGETS_DELAY`), since Prometheus starts working as soon as the file appears. Not at the boot that
    // makes the onboarding snapshot: its TSDB stays empty (see the press recipe's prometheus.yml).
    if role == "monitor" && !(boot && get(kv, "snapshot") == "1") {
        let targets = prometheus_targets(&map);
        if boot {
            write_if_changed(PROMETHEUS_TARGETS, &targets, 0o644)?;
        } else {
            write_targets_later(targets);
        }
    }
    trace.mark("prometheus");
    trace.save();
    Ok(match (old, new_addr) {
        (Some(old), Some(new)) if !boot && old != new => Some(old),
        _ => None,
    })
}

/// How long each step of a configure took (guest clock), kept in `/run/fcdev/configure.trace`: where a slow
/// re-address spends its time, readable with `fcdev exec VM -- cat /run/fcdev/configure.trace`.
struct Trace {
    last: std::time::Instant,
    lines: String,
}

impl Trace {
    fn start() -> Self {
        Trace {
            last: std::time::Instant::now(),
            lines: String::new(),
        }
    }

    fn mark(&mut self, step: &str) {
        let now = std::time::Instant::now();
        self.lines += &format!("{step}: {} us\n", (now - self.last).as_micros());
        self.last = now;
    }

    fn save(&self) {
        let _ = std::fs::create_dir_all(STATE);
        let _ = std::fs::write(format!("{STATE}/configure.trace"), &self.lines);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_targets_name_every_vm_of_the_map() {
        let json = prometheus_targets(b"10.0.0.10 n1\n10.0.0.11 f1\n\n");
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"[{"targets":["n1:9100","f1:9100"]}]"#
        );
    }

    #[test]
    fn cidr_mac_and_key_parsing_refuse_bad_values() {
        assert_eq!(
            parse_cidr("10.240.0.17/24").unwrap(),
            ("10.240.0.17".parse().unwrap(), 24)
        );
        assert!(parse_cidr("10.240.0.17").is_err());
        assert!(parse_cidr("10.240.0.17/33").is_err());
        assert_eq!(parse_mac("52:54:00:f0:00:0c").unwrap()[5], 0x0c);
        assert!(parse_mac("52:54:00:f0:00").is_err());
        assert!(openssh_public("-----BEGIN-----\nnot base64\n-----END-----").is_none());
    }

    #[test]
    fn the_public_line_of_a_server_made_host_key_is_the_servers() {
        let key = crate::server::backend::qemu::hostkey::HostKey::generate();
        assert_eq!(
            openssh_public(&key.private_pem("n1")).as_deref(),
            Some(key.public_line().as_str())
        );
    }
}
