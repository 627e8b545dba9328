//! The running tunnel of a profile, and the shared background tunnel `fcdev ssh --stdio` starts.
//!
//! Every `fcdev tunnel` writes `run/tunnel-<profile>.json` in the config dir (0600: pid, mode, SOCKS5 address)
//! while it runs. One laptop key is one endpoint at the hub, so there is one tunnel per profile: ssh
//! connections (VS Code, scp, a shell) reuse the running one. When none runs, the first `ssh --stdio` starts a
//! rootless tunnel in the background (its own session, output in `run/tunnel-<profile>.log`) that later
//! connections share and that ends once no connection has been open for [`BACKGROUND_IDLE`]. A lock file
//! (`flock`) makes concurrent ProxyCommands start one, not several.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cli::{CliError, Context, ExitKind};

/// How long the background tunnel stays up with no connection open (`FCDEV_TUNNEL_IDLE_SECS` overrides it).
pub const BACKGROUND_IDLE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TunnelState {
    pub pid: u32,
    /// `tun` or `proxy`.
    pub mode: String,
    pub socks: Option<SocketAddr>,
    pub address: String,
    pub namespace: String,
    /// Started by `fcdev ssh --stdio`, ends when idle.
    pub background: bool,
}

pub fn run_dir(ctx: &Context) -> PathBuf {
    ctx.store.dir.join("run")
}

fn state_path(ctx: &Context) -> PathBuf {
    run_dir(ctx).join(format!("tunnel-{}.json", ctx.profile_name))
}

pub fn log_path(ctx: &Context) -> PathBuf {
    run_dir(ctx).join(format!("tunnel-{}.log", ctx.profile_name))
}

fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// The profile's running tunnel, if its process is alive.
pub fn read_live(ctx: &Context) -> Option<TunnelState> {
    let text = std::fs::read_to_string(state_path(ctx)).ok()?;
    let state: TunnelState = serde_json::from_str(&text).ok()?;
    alive(state.pid).then_some(state)
}

/// Written by the tunnel once it runs; the file goes when this is dropped.
pub struct Published {
    path: PathBuf,
}

impl Published {
    pub fn write(ctx: &Context, state: &TunnelState) -> Result<Published, CliError> {
        crate::config::create_private_dir(&run_dir(ctx))
            .map_err(|e| CliError::new(ExitKind::Failure, format!("config run dir: {e}")))?;
        let path = state_path(ctx);
        let text = serde_json::to_string(state)
            .map_err(|e| CliError::new(ExitKind::Failure, e.to_string()))?;
        crate::config::write_private(&path, &text, 0o600)?;
        Ok(Published { path })
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        // Only our own file: a tunnel started after us may have replaced it.
        let mine = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| serde_json::from_str::<TunnelState>(&t).ok())
            .is_some_and(|s| s.pid == std::process::id());
        if mine {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// An exclusive `flock` on the profile's tunnel lock file, held by the open file: released on drop (or when
/// the process dies).
struct Lock(#[allow(dead_code)] std::fs::File);

impl Lock {
    fn take(ctx: &Context) -> Result<Lock, CliError> {
        use std::os::fd::AsRawFd;
        crate::config::create_private_dir(&run_dir(ctx))
            .map_err(|e| CliError::new(ExitKind::Failure, format!("config run dir: {e}")))?;
        let path = run_dir(ctx).join(format!("tunnel-{}.lock", ctx.profile_name));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| CliError::new(ExitKind::Failure, format!("{}: {e}", path.display())))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(CliError::new(
                ExitKind::Failure,
                format!(
                    "locking {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                ),
            ));
        }
        Ok(Lock(file))
    }
}

/// Stop the profile's background tunnel (SIGTERM, then wait up to 3 s). Returns its pid when there was one.
pub fn stop_background(ctx: &Context) -> Option<u32> {
    let state = read_live(ctx).filter(|s| s.background)?;
    // SAFETY: sending SIGTERM to a pid read from our own 0600 state file.
    unsafe { libc::kill(state.pid as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    while alive(state.pid) && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(state.pid)
}

/// How ssh reaches the VMs from here.
pub enum Route {
    /// A TUN-mode tunnel routes the VM addresses: connect straight.
    Direct,
    /// Through a rootless tunnel's SOCKS5 proxy.
    Socks(SocketAddr),
}

/// The running tunnel of the profile, or a background one started now (and shared by later calls).
pub fn ensure(ctx: &Context) -> Result<Route, CliError> {
    let usable = |s: TunnelState| match (s.mode.as_str(), s.socks) {
        ("tun", _) => Some(Route::Direct),
        (_, Some(socks)) => Some(Route::Socks(socks)),
        _ => None,
    };
    if let Some(route) = read_live(ctx).and_then(usable) {
        return Ok(route);
    }
    let _lock = Lock::take(ctx)?;
    // Another ProxyCommand may have started it while we waited for the lock.
    if let Some(route) = read_live(ctx).and_then(usable) {
        return Ok(route);
    }
    let exe = std::env::current_exe()
        .map_err(|e| CliError::new(ExitKind::Failure, format!("own path: {e}")))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(ctx))
        .map_err(|e| CliError::new(ExitKind::Failure, format!("tunnel log: {e}")))?;
    let idle = std::env::var("FCDEV_TUNNEL_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(BACKGROUND_IDLE);
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--profile", &ctx.profile_name, "tunnel", "--mode", "proxy"])
        .args(["--socks", "127.0.0.1:0", "--background"])
        .arg("--idle-exit")
        .arg(idle.as_secs().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid in the child before exec (async-signal-safe): the tunnel outlives the ssh that started it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| CliError::new(ExitKind::Failure, format!("starting the tunnel: {e}")))?;
    let t0 = Instant::now();
    loop {
        if let Some(state) = read_live(ctx).filter(|s| s.pid == child.id()) {
            if let Some(route) = usable(state) {
                return Ok(route);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log_path(ctx)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(5)..].join("\n");
            return Err(CliError::new(
                ExitKind::Unreachable,
                format!("the background tunnel ended ({status}): {tail}"),
            )
            .hint("run `fcdev tunnel --mode proxy` to see why, or `fcdev doctor`"));
        }
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            return Err(CliError::new(
                ExitKind::Unreachable,
                "the background tunnel did not start within 15 s",
            )
            .hint(format!("its log: {}", log_path(ctx).display())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A wg-config this machine exported (`fcdev tunnel --wg-config FILE`) and the hub it names: `fcdev status`
/// says when the namespace's hub is another one now (`run/wg-config-<profile>.json`; stdout exports are not
/// recorded).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportedConfig {
    pub file: PathBuf,
    pub endpoint: String,
    pub server_public_key: String,
}

fn exported_path(ctx: &Context) -> PathBuf {
    run_dir(ctx).join(format!("wg-config-{}.json", ctx.profile_name))
}

pub fn record_export(ctx: &Context, export: &ExportedConfig) -> Result<(), CliError> {
    crate::config::create_private_dir(&run_dir(ctx))
        .map_err(|e| CliError::new(ExitKind::Failure, format!("config run dir: {e}")))?;
    let text = serde_json::to_string(export)
        .map_err(|e| CliError::new(ExitKind::Failure, e.to_string()))?;
    crate::config::write_private(&exported_path(ctx), &text, 0o600)?;
    Ok(())
}

pub fn read_export(ctx: &Context) -> Option<ExportedConfig> {
    let text = std::fs::read_to_string(exported_path(ctx)).ok()?;
    serde_json::from_str(&text).ok()
}
