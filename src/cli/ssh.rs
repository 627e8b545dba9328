//! `fcdev ssh VM [-- COMMAND]`: ssh into a VM through the tunnel, with this laptop's own fcdev ssh key.
//!
//! The key pair (`keys/<profile>_ssh`, ed25519, made with ssh-keygen) is created by `fcdev up`, which sends the
//! public half to the server; the VMs get it at boot or restore. With the tunnel in TUN mode the VM's address is
//! routed and ssh connects straight; in rootless mode ssh goes through the tunnel's SOCKS5 proxy
//! (`fcdev __socks-connect` as the ProxyCommand).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::api;
use crate::cli::{CliError, Context, ExitKind};

#[derive(Debug, clap::Args)]
pub struct SshArgs {
    /// The VM, e.g. n1.
    pub vm: String,
    /// The cluster (default: the profile's cluster).
    #[arg(long)]
    pub name: Option<String>,
    /// The user in the VM.
    #[arg(short, long, default_value = "root")]
    pub user: String,
    /// The SOCKS5 proxy of a rootless `fcdev tunnel`, used when the VM is not routed here.
    #[arg(long, default_value = "127.0.0.1:1080")]
    pub socks: SocketAddr,
    /// A command to run instead of a shell (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// The private half of this laptop's fcdev ssh key pair (`keys/<profile>_ssh`).
pub fn key_path(ctx: &Context) -> PathBuf {
    ctx.store
        .keys_dir()
        .join(format!("{}_ssh", ctx.profile_name))
}

/// This laptop's fcdev ssh public key, created with ssh-keygen when missing. None when ssh-keygen is not installed.
pub fn ensure_key(ctx: &Context) -> Option<String> {
    // Also tightens a keys folder an earlier version created 0755.
    let _ = ctx.store.ensure_keys_dir();
    let path = key_path(ctx);
    let public = path.with_extension("pub");
    let read = || {
        std::fs::read_to_string(&public)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    if let Some(key) = read() {
        return Some(key);
    }
    // One `fcdev up` generates, concurrent ones wait for it (a lock file; a stale one is ignored after 5 s), so
    // nobody reads half a key or pairs the wrong halves.
    ctx.store.ensure_keys_dir().ok()?;
    let lock = path.with_extension("lock");
    for _ in 0..100 {
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock);
        if created.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        if let Some(key) = read() {
            return Some(key);
        }
    }
    let _ = std::fs::remove_file(&path);
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "fcdev", "-f"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_file(&lock);
    status.ok().filter(|s| s.success())?;
    read()
}

pub async fn run(args: SshArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let cluster_name = args.name.clone().unwrap_or(profile.cluster);
    let cluster: api::Cluster = client.get(&format!("/clusters/{cluster_name}")).await?;
    let vm = cluster
        .vms
        .iter()
        .find(|v| v.name == args.vm)
        .ok_or_else(|| {
            CliError::new(
                ExitKind::NotFound,
                format!("no VM `{}` in cluster `{cluster_name}`", args.vm),
            )
            .hint(format!(
                "its VMs are: {}",
                cluster
                    .vms
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let key = key_path(&ctx);
    if !key.is_file() {
        return Err(CliError::new(ExitKind::Failure, format!("no fcdev ssh key at {}", key.display()))
            .hint("install openssh-client (ssh-keygen) and run `fcdev up` again: it creates the key and gives it to the VMs"));
    }
    let address: std::net::Ipv4Addr = vm
        .address
        .parse()
        .map_err(|_| CliError::new(ExitKind::Failure, format!("bad VM address {}", vm.address)))?;
    // Go straight only when a TUN-mode tunnel routes the address here; never probe by sending to it (without the
    // tunnel that packet would leave for the real network).
    let direct = routed_via_fcdev_tun(address);
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-i")
        .arg(&key)
        .args(["-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]);
    if !direct {
        if TcpStream::connect_timeout(&args.socks, Duration::from_millis(500)).is_err() {
            return Err(CliError::new(
                ExitKind::Unreachable,
                format!("{} ({}) is not reachable from here", vm.hostname, vm.address),
            )
            .hint("start the tunnel first: `fcdev tunnel` (TUN mode, as root) or `fcdev tunnel --mode proxy`"));
        }
        let exe =
            std::env::current_exe().map_err(|e| CliError::new(ExitKind::Failure, e.to_string()))?;
        // ssh runs the ProxyCommand through a shell: quote the path.
        let quoted = format!("'{}'", exe.display().to_string().replace('\'', "'\\''"));
        cmd.arg("-o").arg(format!(
            "ProxyCommand={quoted} __socks-connect {} %h %p",
            args.socks
        ));
    }
    cmd.arg(format!("{}@{}", args.user, vm.address));
    cmd.args(&args.command);
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(
        CliError::new(ExitKind::Failure, format!("cannot run ssh: {err}"))
            .hint("install an ssh client (Debian: openssh-client)"),
    )
}

/// Whether the kernel routes `addr` through an fcdev TUN device (`fcdev tunnel --mode tun`), read from
/// /proc/net/route (Linux); false elsewhere.
pub fn routed_via_fcdev_tun(addr: std::net::Ipv4Addr) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/route") else {
        return false;
    };
    let target = u32::from(addr);
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || !f[0].starts_with("fcdev") {
            return false;
        }
        // The kernel prints the network-order words as native-endian hex.
        let (Ok(dest), Ok(mask)) = (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16))
        else {
            return false;
        };
        let (dest, mask) = (
            u32::from_be_bytes(dest.to_ne_bytes()),
            u32::from_be_bytes(mask.to_ne_bytes()),
        );
        mask != 0 && target & mask == dest & mask
    })
}

/// Hidden: connect through a SOCKS5 proxy and relay stdin/stdout (ssh's ProxyCommand).
#[derive(Debug, clap::Args)]
pub struct SocksConnectArgs {
    pub socks: SocketAddr,
    pub host: String,
    pub port: u16,
}

pub fn socks_connect(args: SocksConnectArgs) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(args.socks)?;
    stream.write_all(&[5, 1, 0])?;
    let mut reply = [0u8; 2];
    stream.read_exact(&mut reply)?;
    if reply != [5, 0] {
        return Err(std::io::Error::other(
            "the SOCKS5 proxy refused the greeting",
        ));
    }
    let mut req = vec![5, 1, 0];
    match (args.host.as_str(), args.port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(SocketAddr::V4(v4)) if args.host.parse::<std::net::Ipv4Addr>().is_ok() => {
            req.push(1);
            req.extend_from_slice(&v4.ip().octets());
        }
        _ => {
            let host = args.host.as_bytes();
            let len = u8::try_from(host.len())
                .map_err(|_| std::io::Error::other("host name too long"))?;
            req.push(3);
            req.push(len);
            req.extend_from_slice(host);
        }
    }
    req.extend_from_slice(&args.port.to_be_bytes());
    stream.write_all(&req)?;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head)?;
    if head[1] != 0 {
        return Err(std::io::Error::other(format!(
            "the SOCKS5 proxy could not connect (reply {})",
            head[1]
        )));
    }
    let skip = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut l = [0u8; 1];
            stream.read_exact(&mut l)?;
            usize::from(l[0]) + 2
        }
        _ => return Err(std::io::Error::other("bad SOCKS5 reply")),
    };
    let mut rest = vec![0u8; skip];
    stream.read_exact(&mut rest)?;
    let mut upstream = stream.try_clone()?;
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut upstream);
        let _ = upstream.shutdown(std::net::Shutdown::Write);
    });
    // Rust's stdout is line-buffered: relay with an explicit flush after every read, or ssh waits forever for
    // the bytes after the last newline.
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
    drop(up);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_fcdev_route_means_not_direct() {
        // This machine's root namespace has no fcdev TUN device during unit tests.
        assert!(!super::routed_via_fcdev_tun("10.240.0.10".parse().unwrap()));
    }
}
