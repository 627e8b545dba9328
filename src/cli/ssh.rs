//! `fcdev ssh VM [-- COMMAND]`: ssh into a VM through the tunnel, with this laptop's own fcdev ssh key.
//!
//! The key pair (`keys/<profile>_ssh`, ed25519, made with ssh-keygen) is created by `fcdev up`, which sends the
//! public half to the server; the VMs get it at boot or restore. With the tunnel in TUN mode the VM's address is
//! routed and ssh connects straight; in rootless mode ssh goes through the tunnel's SOCKS5 proxy
//! (`fcdev __socks-connect` as the ProxyCommand).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::api;
use crate::cli::{tunnel_state, CliError, Context, ExitKind};

#[derive(Debug, clap::Args)]
pub struct SshArgs {
    /// The VM: its name (n1) or host name (n1.<namespace>.fcdev, as in the config `fcdev ssh-config` writes).
    pub vm: String,
    /// The cluster (default: the profile's cluster, or the one the host name names).
    #[arg(long)]
    pub name: Option<String>,
    /// The user in the VM.
    #[arg(short, long, default_value = "root")]
    pub user: String,
    /// Relay one connection to the VM's ssh port on stdin/stdout (ssh's ProxyCommand; what `fcdev ssh-config`
    /// writes). Uses the running tunnel, or starts a shared background one that ends when idle.
    #[arg(long)]
    pub stdio: bool,
    /// The VM's port (with --stdio).
    #[arg(long, default_value_t = 22)]
    pub port: u16,
    /// A command to run instead of a shell (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Hidden: ssh's KnownHostsCommand (`fcdev known-hosts %H`): prints the VM's host key as the server knows it.
#[derive(Debug, clap::Args)]
pub struct KnownHostsArgs {
    /// The host as ssh names it: `n1.<namespace>.fcdev` or `[n1.<namespace>.fcdev]:PORT`.
    pub host: String,
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

/// The VM `name` names: a VM of `cluster` (short name) or the VM whose host name it is, in any of my clusters.
pub async fn find_vm(
    client: &crate::client::ApiClient,
    name: &str,
    cluster: &str,
    explicit_cluster: bool,
) -> Result<api::Vm, CliError> {
    let host = name.trim_end_matches('.');
    let mut clusters = Vec::new();
    if host.ends_with(".fcdev") && !explicit_cluster {
        let all: Vec<api::Cluster> = client.get("/clusters").await?;
        for c in all {
            clusters.push(
                client
                    .get::<api::Cluster>(&format!("/clusters/{}", c.name))
                    .await?,
            );
        }
    } else {
        clusters.push(client.get(&format!("/clusters/{cluster}")).await?);
    }
    let found = clusters
        .iter()
        .flat_map(|c| c.vms.iter())
        .find(|v| v.name == host || v.hostname == host);
    if let Some(vm) = found {
        return Ok(vm.clone());
    }
    let known: Vec<&str> = clusters
        .iter()
        .flat_map(|c| c.vms.iter())
        .map(|v| {
            if host.contains('.') {
                v.hostname.as_str()
            } else {
                v.name.as_str()
            }
        })
        .collect();
    Err(CliError::new(
        ExitKind::NotFound,
        format!(
            "no VM `{host}` in {}",
            if host.contains('.') {
                "your clusters".to_string()
            } else {
                format!("cluster `{cluster}`")
            }
        ),
    )
    .hint(if known.is_empty() {
        "no VMs there: run `fcdev up`".to_string()
    } else {
        format!("its VMs are: {}", known.join(", "))
    }))
}

/// ssh options that make ssh check the VM's host key against the server's record (`fcdev known-hosts`), never
/// against ~/.ssh/known_hosts: a reset gives a VM a new key without a warning, a wrong key is refused.
pub fn host_key_options(exe: &str) -> Vec<String> {
    vec![
        format!("KnownHostsCommand={exe} known-hosts %H"),
        "UserKnownHostsFile=/dev/null".into(),
        "GlobalKnownHostsFile=/dev/null".into(),
        "StrictHostKeyChecking=yes".into(),
        "CheckHostIP=no".into(),
    ]
}

/// This fcdev, as ssh should run it from a config or an option: quoted, with the config dir when it is not the
/// default one (`FCDEV_CONFIG_DIR`) and the profile.
pub fn self_command(ctx: &Context) -> Result<String, CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::new(ExitKind::Failure, format!("own path: {e}")))?;
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut cmd = String::new();
    if std::env::var_os("FCDEV_CONFIG_DIR").is_some() {
        cmd.push_str(&format!(
            "/usr/bin/env {} ",
            quote(&format!("FCDEV_CONFIG_DIR={}", ctx.store.dir.display()))
        ));
    }
    cmd.push_str(&quote(&exe.display().to_string()));
    cmd.push_str(&format!(" --profile {}", ctx.profile_name));
    Ok(cmd)
}

pub async fn run(args: SshArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let cluster_name = args.name.clone().unwrap_or(profile.cluster);
    let vm = find_vm(&client, &args.vm, &cluster_name, args.name.is_some()).await?;
    let address: std::net::Ipv4Addr = vm
        .address
        .parse()
        .map_err(|_| CliError::new(ExitKind::Failure, format!("bad VM address {}", vm.address)))?;
    if args.stdio {
        return stdio(&ctx, address, args.port).await;
    }
    let key = key_path(&ctx);
    if !key.is_file() {
        return Err(CliError::new(ExitKind::Failure, format!("no fcdev ssh key at {}", key.display()))
            .hint("install openssh-client (ssh-keygen) and run `fcdev up` again: it creates the key and gives it to the VMs"));
    }
    let me = self_command(&ctx)?;
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-i")
        .arg(&key)
        .args(["-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"]);
    if vm.host_key.is_some() {
        for o in host_key_options(&me) {
            cmd.arg("-o").arg(o);
        }
    } else {
        // A booted VM made its own host key: the server cannot vouch for it.
        eprintln!(
            "note: {} was booted, not restored from its snapshot: its host key is not checked",
            vm.hostname
        );
        cmd.args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ]);
    }
    // The tunnel (running, or started in the background) carries the connection: ssh --stdio as ProxyCommand.
    // ssh runs it through a shell, so the quoted path works.
    cmd.arg("-o")
        .arg(format!("ProxyCommand={me} ssh --stdio %h --port %p"));
    cmd.arg(format!("{}@{}", args.user, vm.hostname));
    cmd.args(&args.command);
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(
        CliError::new(ExitKind::Failure, format!("cannot run ssh: {err}"))
            .hint("install an ssh client (Debian: openssh-client)"),
    )
}

/// `fcdev known-hosts HOST`: the known_hosts line of the VM named HOST, from the server. Prints nothing (and
/// says why on stderr) when the server has no key for it: ssh then refuses the host.
pub async fn known_hosts(args: KnownHostsArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let host = args.host.trim();
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.split_once("]:"))
        .map(|(h, _)| h)
        .unwrap_or(host);
    let vm = find_vm(&client, bare, &profile.cluster, false).await?;
    match vm.host_key {
        Some(key) => println!("{host} {key}"),
        None => eprintln!(
            "fcdev: {} was booted, not restored: the server has no host key for it (`fcdev reset` restores it)",
            vm.hostname
        ),
    }
    Ok(())
}

/// `ssh --stdio`: one connection to `address:port` relayed on stdin/stdout, straight when a TUN-mode tunnel
/// routes the address, else through the tunnel's SOCKS5 proxy (a shared background tunnel when none runs).
async fn stdio(ctx: &Context, address: std::net::Ipv4Addr, port: u16) -> Result<(), CliError> {
    let unreachable = |e: std::io::Error| {
        CliError::new(
            ExitKind::Unreachable,
            format!("cannot reach {address}:{port}: {e}"),
        )
        .hint("`fcdev doctor` checks the server and the hub")
    };
    let stream = if routed_via_fcdev_tun(address) {
        TcpStream::connect_timeout(&SocketAddr::from((address, port)), Duration::from_secs(10))
            .map_err(unreachable)?
    } else {
        let socks = match tunnel_state::ensure(ctx)? {
            tunnel_state::Route::Socks(s) => s,
            tunnel_state::Route::Direct => {
                return Err(CliError::new(
                    ExitKind::Unreachable,
                    format!("the TUN-mode tunnel does not route {address}"),
                )
                .hint("restart `fcdev tunnel`: the cluster's addresses may have changed"))
            }
        };
        socks5_open(socks, &address.to_string(), port).map_err(unreachable)?
    };
    tokio::task::spawn_blocking(move || relay(stream))
        .await
        .map_err(|e| CliError::new(ExitKind::Failure, e.to_string()))?
        .map_err(|e| CliError::new(ExitKind::Failure, format!("relay: {e}")))
}

/// Whether the kernel routes `addr` through an fcdev TUN device (`fcdev tunnel --mode tun`), read from
/// /proc/net/route (Linux); false elsewhere.
#[cfg(not(target_os = "linux"))]
pub fn routed_via_fcdev_tun(_addr: std::net::Ipv4Addr) -> bool {
    false
}

/// Whether the kernel routes `addr` through an fcdev TUN device (`fcdev tunnel --mode tun`), read from
/// /proc/net/route.
#[cfg(target_os = "linux")]
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
    relay(socks5_open(args.socks, &args.host, args.port)?)
}

/// A TCP connection to `host:port` through the SOCKS5 proxy at `socks` (names resolved by the proxy).
pub fn socks5_open(socks: SocketAddr, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(socks)?;
    stream.write_all(&[5, 1, 0])?;
    let mut reply = [0u8; 2];
    stream.read_exact(&mut reply)?;
    if reply != [5, 0] {
        return Err(std::io::Error::other(
            "the SOCKS5 proxy refused the greeting",
        ));
    }
    let mut req = vec![5, 1, 0];
    match host.parse::<std::net::Ipv4Addr>() {
        Ok(v4) => {
            req.push(1);
            req.extend_from_slice(&v4.octets());
        }
        Err(_) => {
            let bytes = host.as_bytes();
            let len = u8::try_from(bytes.len())
                .map_err(|_| std::io::Error::other("host name too long"))?;
            req.push(3);
            req.push(len);
            req.extend_from_slice(bytes);
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
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
    Ok(stream)
}

/// Relay stdin to `stream` and `stream` to stdout until the remote side closes.
fn relay(stream: TcpStream) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut upstream = stream.try_clone()?;
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut upstream);
        let _ = upstream.shutdown(std::net::Shutdown::Write);
    });
    // Rust's stdout is line-buffered: relay with an explicit flush after every read, or ssh waits forever for
    // the bytes after the last newline.
    let mut stream = stream;
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
