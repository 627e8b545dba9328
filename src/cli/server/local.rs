//! `fcdev up --local`: a local `fcdev server --dev` started (or reused), logged in, with the default image built.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::api;
use crate::cli::{CliError, Context, ExitKind};
use crate::client::ApiClient;

/// The profile `--local` logs in with, unless --profile names another.
pub const LOCAL_PROFILE: &str = "local";

async fn healthy(url: &str) -> bool {
    let client = ApiClient::new(url, None);
    tokio::time::timeout(Duration::from_secs(2), client.get::<api::Health>("/health"))
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false)
}

pub async fn ensure(mut ctx: Context, port: u16, talk: bool) -> Result<Context, CliError> {
    let data_dir = crate::config::data_dir()?;
    let url = format!("http://127.0.0.1:{port}");
    if !ctx.explicit_profile {
        ctx.profile_name = LOCAL_PROFILE.to_string();
    }
    let dir = data_dir.clone();
    tokio::task::spawn_blocking(move || crate::cli::image::ensure_default_image(&dir, talk))
        .await
        .map_err(|e| CliError::new(ExitKind::Failure, e.to_string()))??;
    if healthy(&url).await {
        if talk {
            eprintln!("Using the local fcdev server at {url}.");
        }
    } else {
        start_server(&data_dir, port, talk).await?;
    }
    // Already logged in to this server with a token it accepts: keep it (no new token each time).
    if let Ok((profile, client)) = ctx.client() {
        if profile.server == url && client.get::<api::Me>("/me").await.is_ok() {
            return Ok(ctx);
        }
    }
    // Same machine, same data dir: mint a token straight in the store (SQLite WAL allows a second writer).
    let user = crate::cli::server::default_user_name();
    let dir = data_dir.clone();
    let token = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let store = crate::cli::server::open_store(&dir)?;
        match store.add_user(&user) {
            Ok((_, token)) => Ok(token),
            Err(crate::server::store::StoreError::Exists(_)) => Ok(store.issue_token(&user)?),
            Err(e) => Err(e.into()),
        }
    })
    .await
    .map_err(|e| CliError::new(ExitKind::Failure, e.to_string()))??;
    crate::cli::login::login(&ctx, &url, &token).await?;
    Ok(ctx)
}

async fn start_server(data_dir: &std::path::Path, port: u16, talk: bool) -> Result<(), CliError> {
    crate::config::create_private_dir(data_dir).map_err(|e| {
        CliError::new(
            ExitKind::Failure,
            format!("cannot create {}: {e}", data_dir.display()),
        )
    })?;
    let log_path = data_dir.join("server.log");
    // The dev server prints a login token: keep its log private.
    use std::os::unix::fs::OpenOptionsExt;
    let log = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&log_path)
        .and_then(|log| {
            // A log left by an earlier version may be readable by others.
            use std::os::unix::fs::PermissionsExt;
            log.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            Ok(log)
        })
        .map_err(|e| {
            CliError::new(
                ExitKind::Failure,
                format!("cannot write {}: {e}", log_path.display()),
            )
        })?;
    let exe =
        std::env::current_exe().map_err(|e| CliError::new(ExitKind::Failure, e.to_string()))?;
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(exe)
        .args(["server", "--dev", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| CliError::new(ExitKind::Failure, e.to_string()))?,
        )
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| CliError::new(ExitKind::Failure, format!("cannot start fcdev server: {e}")))?;
    if talk {
        eprintln!(
            "Started a local fcdev server (pid {}, log {}).",
            child.id(),
            log_path.display()
        );
    }
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if healthy(&url).await {
            std::thread::spawn(move || child.wait());
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(CliError::new(
                ExitKind::Failure,
                format!(
                    "the local fcdev server exited ({status}):\n{}",
                    tail.join("\n")
                ),
            )
            .hint(format!("the whole log is {}", log_path.display())));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(CliError::new(
        ExitKind::Unreachable,
        "the local fcdev server did not answer within 60 s",
    )
    .hint(format!("see {}", log_path.display())))
}

pub use crate::cli::status::LocalServer;

/// The pid in the data dir's pid file when that process is an fcdev server.
fn server_pid(data_dir: &std::path::Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(data_dir.join(crate::server::run::PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_fcdev = args
        .first()
        .is_some_and(|a| String::from_utf8_lossy(a).ends_with("fcdev"));
    (is_fcdev && args.contains(&&b"server"[..])).then_some(pid)
}

/// The local server of `data_dir` (blocking: reads files and takes a lock for a moment).
pub fn local_server(data_dir: &std::path::Path) -> LocalServer {
    LocalServer {
        running: crate::server::follow::server_running(data_dir),
        pid: server_pid(data_dir),
        data_dir: data_dir.to_path_buf(),
    }
}

/// How long `fcdev server stop --local` waits for the server to exit.
const STOP_WAIT: Duration = Duration::from_secs(20);

/// `fcdev server stop --local`: SIGTERM to the server of `data_dir`, then wait until it is gone. Its VMs run on
/// (they are their own processes) and the next start re-adopts them.
pub fn stop(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let local = local_server(data_dir);
    if !local.running {
        println!(
            "No local fcdev server runs on {} (start one with `fcdev up --local`).",
            data_dir.display()
        );
        return Ok(());
    }
    let Some(pid) = local.pid else {
        anyhow::bail!(
            "a server runs on {} but left no pid file (an older fcdev?): stop it with Ctrl-C where it runs, or \
             find it with `fuser {}`",
            data_dir.display(),
            data_dir.join(crate::server::follow::LOCK_FILE).display()
        );
    };
    // SAFETY: kill(2) with a pid checked above to be an fcdev server; no memory is touched.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        anyhow::bail!(
            "cannot signal the server (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
    }
    let start = Instant::now();
    while crate::server::follow::server_running(data_dir) {
        if start.elapsed() > STOP_WAIT {
            anyhow::bail!(
                "the server (pid {pid}) did not stop within {} s; see {}",
                STOP_WAIT.as_secs(),
                data_dir.join("server.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "Stopped the local fcdev server (pid {pid}). Its VMs keep running and are re-adopted when it starts again \
         (`fcdev up --local`); tunnels reconnect then. `fcdev down` removes a cluster."
    );
    Ok(())
}
