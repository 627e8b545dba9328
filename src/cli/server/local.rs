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
