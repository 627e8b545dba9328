//! Per-namespace networking inside the server's network namespace: one bridge per engineer namespace
//! (`fcbr<index>`, gateway `.1/24`, proxy ARP for the tunnel peers' /32s), one tap per VM (`fct<index>v<slot>`),
//! and nftables rules so one namespace's VMs cannot reach another namespace's subnet or gateway.
//!
//! Everything is idempotent and uses the `ip` and `nft` commands (iproute2, nftables).

use std::net::Ipv4Addr;
use std::process::Command;

use crate::api::Subnet;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot run `{program}` ({package}): {source}")]
    Spawn {
        program: String,
        package: &'static str,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot write {path}: {source}")]
    Sysctl {
        path: String,
        source: std::io::Error,
    },
    #[error("interface name `{0}` is longer than 15 characters")]
    NameTooLong(String),
}

pub type NetResult<T> = Result<T, NetError>;

/// Private ranges a VM may not reach outside its own subnet.
const PRIVATE: &str = "{ 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 }";

pub fn bridge_name(index: u32) -> String {
    format!("fcbr{index}")
}

pub fn tap_name(index: u32, slot: u32) -> String {
    format!("fct{index}v{slot}")
}

fn table_name(index: u32) -> String {
    format!("fcdev_ns{index}")
}

fn check_name(name: &str) -> NetResult<()> {
    if name.len() > 15 {
        return Err(NetError::NameTooLong(name.to_string()));
    }
    Ok(())
}

fn run(
    program: &str,
    package: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> NetResult<String> {
    use std::io::Write;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(std::process::Stdio::piped());
    }
    let spawn_err = |source| NetError::Spawn {
        program: program.to_string(),
        package,
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(NetError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> NetResult<String> {
    run("ip", "iproute2", args, None)
}

fn nft(script: &str) -> NetResult<()> {
    run("nft", "nftables", &["-f", "-"], Some(script)).map(|_| ())
}

/// Whether a network interface exists in the calling thread's network namespace. (`/sys/class/net` shows the
/// namespace sysfs was mounted in, and `/proc/self/net` the main thread's, so neither works after `setns`.)
pub fn link_exists(name: &str) -> bool {
    links().iter().any(|n| n == name)
}

fn sysctl(path: &str, value: &str) -> NetResult<()> {
    std::fs::write(path, value).map_err(|source| NetError::Sysctl {
        path: path.to_string(),
        source,
    })
}

/// Create (or repair) the namespace's bridge with its gateway address, proxy ARP, forwarding and isolation rules.
pub fn ensure_bridge(index: u32, subnet: Subnet, gateway: Ipv4Addr) -> NetResult<()> {
    let br = bridge_name(index);
    check_name(&br)?;
    if !link_exists(&br) {
        // Another caller may race us; "File exists" is fine.
        if let Err(err) = ip(&["link", "add", &br, "type", "bridge"]) {
            if !link_exists(&br) {
                return Err(err);
            }
        }
    }
    // No STP delay: VMs must talk the moment their tap joins.
    let _ = ip(&[
        "link",
        "set",
        &br,
        "type",
        "bridge",
        "forward_delay",
        "0",
        "stp_state",
        "0",
    ]);
    // A fixed MAC: a bridge takes the lowest MAC of its ports otherwise, and taps are made anew with random
    // MACs at each start. A VM resumed from a snapshot or after `fcdev stop` keeps its ARP cache: a gateway MAC
    // that changed would stall it until the entry expires.
    ip(&["link", "set", &br, "address", &bridge_mac(index)])?;
    let addr = format!("{gateway}/{}", subnet.prefix);
    ip(&["addr", "replace", &addr, "dev", &br])?;
    ip(&["link", "set", &br, "up"])?;
    sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    sysctl(&format!("/proc/sys/net/ipv4/conf/{br}/proxy_arp"), "1")?;
    // A VM restored from the snapshot takes its address a moment after it resumes: ask for its MAC every 50 ms
    // instead of every second, so the readiness probe does not wait on ARP retries.
    sysctl(
        &format!("/proc/sys/net/ipv4/neigh/{br}/retrans_time_ms"),
        "50",
    )?;
    sysctl(
        &format!("/proc/sys/net/ipv4/neigh/{br}/mcast_solicit"),
        "20",
    )?;
    ensure_isolation(index, subnet)
}

/// The gateway's MAC of namespace `index` (locally administered, stable across restarts).
pub fn bridge_mac(index: u32) -> String {
    let b = index.to_be_bytes();
    format!("02:fc:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// nftables table of one namespace: traffic entering from its bridge may only go to its own subnet (among the
/// private ranges), and traffic leaving into its bridge may only come from its own subnet.
fn ensure_isolation(index: u32, subnet: Subnet) -> NetResult<()> {
    let table = table_name(index);
    let br = bridge_name(index);
    let script = format!(
        "table inet {table} {{}}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
           chain forward {{\n\
             type filter hook forward priority 0; policy accept;\n\
             iifname \"{br}\" ip daddr {PRIVATE} ip daddr != {subnet} counter drop\n\
             oifname \"{br}\" ip saddr {PRIVATE} ip saddr != {subnet} counter drop\n\
           }}\n\
           chain input {{\n\
             type filter hook input priority 0; policy accept;\n\
             iifname \"{br}\" ip daddr {PRIVATE} ip daddr != {subnet} counter drop\n\
           }}\n\
         }}\n"
    );
    nft(&script)
}

fn links() -> Vec<String> {
    std::fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, _)| n.trim().to_string())
        .collect()
}

/// Remove the namespace's bridge, any tap of its VMs left behind, and its rules (idempotent).
pub fn remove_bridge(index: u32) -> NetResult<()> {
    let prefix = format!("fct{index}v");
    for tap in links().into_iter().filter(|l| l.starts_with(&prefix)) {
        let _ = ip(&["link", "del", &tap]);
    }
    let br = bridge_name(index);
    if link_exists(&br) {
        if let Err(err) = ip(&["link", "del", &br]) {
            if link_exists(&br) {
                return Err(err);
            }
        }
    }
    let table = table_name(index);
    nft(&format!(
        "table inet {table} {{}}\ndelete table inet {table}\n"
    ))
}

/// Create the VM's tap (persistent, so qemu can open it by name) and attach it to the namespace bridge.
pub fn ensure_tap(index: u32, slot: u32) -> NetResult<String> {
    let tap = tap_name(index, slot);
    check_name(&tap)?;
    if !link_exists(&tap) {
        if let Err(err) = ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]) {
            if !link_exists(&tap) {
                return Err(err);
            }
        }
    }
    ip(&["link", "set", &tap, "master", &bridge_name(index)])?;
    ip(&["link", "set", &tap, "up"])?;
    Ok(tap)
}

/// Delete the VM's tap (idempotent).
pub fn remove_tap(index: u32, slot: u32) -> NetResult<()> {
    let tap = tap_name(index, slot);
    if link_exists(&tap) {
        if let Err(err) = ip(&["link", "del", &tap]) {
            if link_exists(&tap) {
                return Err(err);
            }
        }
    }
    Ok(())
}

/// A named network namespace (`ip netns add NAME`) that the calling thread enters; on drop the thread goes
/// back to its previous namespace and the namespace is deleted. Threads and processes started by this thread
/// afterwards live in the namespace too. Used by tests and benchmarks (and usable by `fcdev server --dev`).
pub struct ThreadNetns {
    name: String,
    original: std::fs::File,
}

fn setns_file(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a namespace fd we own.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl ThreadNetns {
    pub fn create_and_enter(name: &str) -> NetResult<ThreadNetns> {
        let sys = |path: &str| {
            let p = path.to_string();
            move |source| NetError::Sysctl { path: p, source }
        };
        let original = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(sys("/proc/thread-self/ns/net"))?;
        let _ = ip(&["netns", "del", name]);
        // `ip netns add` can fail transiently while other processes set up /run/netns: retry a little.
        let mut attempt = 0;
        loop {
            match ip(&["netns", "add", name]) {
                Ok(_) => break,
                Err(e) if attempt >= 4 => return Err(e),
                Err(_) => {
                    attempt += 1;
                    let _ = ip(&["netns", "del", name]);
                    std::thread::sleep(std::time::Duration::from_millis(100 * attempt));
                }
            }
        }
        let path = format!("/run/netns/{name}");
        let ns = std::fs::File::open(&path).map_err(sys(&path))?;
        setns_file(&ns).map_err(sys(&path))?;
        let guard = ThreadNetns {
            name: name.to_string(),
            original,
        };
        ip(&["link", "set", "lo", "up"])?;
        Ok(guard)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ThreadNetns {
    fn drop(&mut self) {
        let _ = setns_file(&self.original);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_in_ifnamsiz() {
        assert_eq!(bridge_name(7), "fcbr7");
        assert_eq!(tap_name(12, 3), "fct12v3");
        assert!(tap_name(99_999, 999).len() <= 15);
    }
}
