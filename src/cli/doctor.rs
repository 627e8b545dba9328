//! `fcdev doctor [--json]`: checks what the daily loop needs, each with a one-line verdict and the fix: the
//! server, the token, version skew, the laptop's private files, a real WireGuard handshake with the hub, TUN
//! privileges, ssh. Exits non-zero when something is broken (warnings do not count).

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::api;
use crate::cli::{CliError, Context, ExitKind};
use crate::client::ApiClient;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// Works, with a limit worth knowing (no TUN privileges, another minor version).
    Warn,
    /// Broken: the exit status is non-zero.
    Fail,
    /// Not checked because something it needs is broken.
    Skip,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub verdict: Verdict,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: &'static str, verdict: Verdict, message: impl Into<String>) -> Check {
    Check {
        check: name,
        verdict,
        message: message.into(),
        fix: None,
    }
}

impl Check {
    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    profile: &'a str,
    checks: &'a [Check],
}

/// The version check: another major version is broken, another minor one a warning.
pub fn version_check(server: &str) -> Check {
    let ours = env!("CARGO_PKG_VERSION");
    let (smaj, smin) = api::minor_version(server);
    let (omaj, omin) = api::minor_version(ours);
    if smaj != omaj {
        check(
            "version",
            Verdict::Fail,
            format!("this fcdev is {ours}, the server runs {server}: another major version"),
        )
        .fix("install the server's version of fcdev on this machine")
    } else if smin != omin {
        check(
            "version",
            Verdict::Warn,
            format!("this fcdev is {ours}, the server runs {server}: another minor version"),
        )
        .fix("install the server's version of fcdev on this machine")
    } else {
        check(
            "version",
            Verdict::Ok,
            format!("this fcdev is {ours}, the server {server}"),
        )
    }
}

/// A private file or folder: none of group's or others' bits.
fn mode_check(name: &'static str, path: &Path, what: &str, want: u32) -> Check {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 == 0 {
                check(
                    name,
                    Verdict::Ok,
                    format!("the {what} {} is private ({mode:o})", path.display()),
                )
            } else {
                check(
                    name,
                    Verdict::Fail,
                    format!(
                        "the {what} {} has mode {mode:o}: others can read it",
                        path.display()
                    ),
                )
                .fix(format!("chmod {want:o} {}", path.display()))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => check(
            name,
            Verdict::Ok,
            format!("no {what} yet ({})", path.display()),
        ),
        Err(e) => check(
            name,
            Verdict::Fail,
            format!("cannot read {}: {e}", path.display()),
        ),
    }
}

fn which(tool: &str) -> bool {
    crate::sys::which(tool).is_some()
}

/// The handshake age under which a running tunnel of this machine counts as proof that the hub answers (a probe
/// would take the peer's endpoint away from it for a few seconds).
const FRESH_HANDSHAKE_SECS: u64 = 150;

async fn hub_check(ctx: &Context, client: &ApiClient) -> Check {
    let path = ctx.store.key_path(&ctx.profile_name);
    if !path.exists() {
        return check(
            "hub",
            Verdict::Skip,
            format!("no tunnel key yet ({})", path.display()),
        )
        .fix("run `fcdev tunnel` once (it makes the key), then `fcdev doctor` again");
    }
    let key = match crate::tunnel::PrivateKey::load(&path) {
        Ok(k) => k,
        Err(e) => {
            return check(
                "hub",
                Verdict::Skip,
                format!("the tunnel key is unusable: {e}"),
            )
            .fix("fix the key file first (see `keys` above)")
        }
    };
    let public = key.public_key().to_base64();
    let peers: Vec<api::Peer> = match client.get("/peers").await {
        Ok(p) => p,
        Err(e) => return check("hub", Verdict::Fail, format!("cannot list peers: {e}")),
    };
    let mine = peers.iter().find(|p| p.public_key == public);
    if let Some(age) = mine.and_then(|p| p.handshake_age_secs) {
        if age < FRESH_HANDSHAKE_SECS {
            return check(
                "hub",
                Verdict::Ok,
                format!("a tunnel of this machine is connected (handshake {age} s ago)"),
            );
        }
    }
    // Registration is idempotent: the same key keeps its peer, address and (passed back) name.
    let name = mine
        .map(|p| p.name.clone())
        .unwrap_or_else(crate::cli::tunnel::default_peer_name);
    let config: api::PeerConfig = match client
        .post("/peers", &crate::cli::tunnel::peer_request(&name, &key))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            return check(
                "hub",
                Verdict::Fail,
                format!("cannot register the peer: {e}"),
            )
        }
    };
    let plan = match crate::tunnel::plan::Plan::from_config(&config) {
        Ok(p) => p,
        Err(e) => return check(
            "hub",
            Verdict::Fail,
            format!("the server's tunnel config is unusable: {e}"),
        )
        .fix(
            "the operator sets `fcdev server --hub-endpoint HOST:PORT` to an address laptops reach",
        ),
    };
    match crate::tunnel::probe::handshake(&key, &plan, Duration::from_secs(5)).await {
        Ok(took) => check(
            "hub",
            Verdict::Ok,
            format!(
                "WireGuard handshake with the hub at {} (UDP) in {} ms",
                plan.endpoint,
                took.as_millis()
            ),
        ),
        Err(e) => check("hub", Verdict::Fail, e.to_string()).fix(format!(
            "let UDP to {} through (firewall, VPN); the operator sets `--hub-endpoint` to an address this machine reaches",
            plan.endpoint
        )),
    }
}

async fn run_checks(ctx: &Context) -> Vec<Check> {
    let mut checks = Vec::new();
    let profile = match ctx.profile() {
        Ok(p) => p,
        Err(e) => {
            checks.push(
                check("login", Verdict::Fail, e.message.clone())
                    .fix(e.hint.clone().unwrap_or_default()),
            );
            return checks;
        }
    };
    // The server, without the token first.
    let anonymous = ApiClient::new(&profile.server, None);
    let health = match tokio::time::timeout(
        Duration::from_secs(10),
        anonymous.get::<api::Health>("/health"),
    )
    .await
    {
        Ok(Ok(h)) => {
            checks.push(check(
                "server",
                Verdict::Ok,
                format!(
                    "{} answers (backend {}, accelerator {})",
                    profile.server, h.backend, h.accelerator
                ),
            ));
            Some(h)
        }
        Ok(Err(e)) => {
            checks.push(
                check("server", Verdict::Fail, e.to_string()).fix(
                    "start it (`fcdev up --local` on this machine, or ask the operator), or fix the URL with `fcdev login --server URL`",
                ),
            );
            None
        }
        Err(_) => {
            checks.push(
                check(
                    "server",
                    Verdict::Fail,
                    format!("{} did not answer within 10 s", profile.server),
                )
                .fix("check the URL (`fcdev login --server URL`) and the network"),
            );
            None
        }
    };
    let token_ok = match &health {
        None => {
            checks.push(check(
                "version",
                Verdict::Skip,
                "the server is not reachable",
            ));
            checks.push(check("token", Verdict::Skip, "the server is not reachable"));
            None
        }
        Some(h) => {
            checks.push(version_check(&h.version));
            match ctx.client() {
                Err(e) => {
                    checks.push(
                        check("token", Verdict::Fail, e.message.clone())
                            .fix(e.hint.clone().unwrap_or_default()),
                    );
                    None
                }
                Ok((_, client)) => match client.get::<api::Me>("/me").await {
                    Ok(me) => {
                        checks.push(check(
                            "token",
                            Verdict::Ok,
                            format!("valid: you are `{}`", me.user),
                        ));
                        Some(client)
                    }
                    Err(e) => {
                        checks.push(check("token", Verdict::Fail, e.to_string()).fix(format!(
                            "log in again: `fcdev login --server {}` with a fresh token (`fcdev server user token NAME` on the host)",
                            profile.server
                        )));
                        None
                    }
                },
            }
        }
    };
    // This machine's private files.
    let store = &ctx.store;
    let files = [
        mode_check(
            "credentials",
            &store.credentials_path(),
            "token file",
            0o600,
        ),
        mode_check("keys", &store.keys_dir(), "keys folder", 0o700),
        mode_check(
            "keys",
            &store.key_path(&ctx.profile_name),
            "WireGuard key",
            0o600,
        ),
        mode_check("keys", &crate::cli::ssh::key_path(ctx), "ssh key", 0o600),
    ];
    checks.extend(files);
    match &token_ok {
        Some(client) => checks.push(hub_check(ctx, client).await),
        None => checks.push(check(
            "hub",
            Verdict::Skip,
            "needs a reachable server and a valid token",
        )),
    }
    checks.push(if crate::tunnel::tun_dev::can_create_tun() {
        check(
            "tun",
            Verdict::Ok,
            "TUN mode available (root or CAP_NET_ADMIN, /dev/net/tun)",
        )
    } else {
        check(
            "tun",
            Verdict::Warn,
            "no TUN privileges: `fcdev tunnel` runs rootless (SOCKS5 on 127.0.0.1:1080, -L forwards)",
        )
        .fix("for TUN mode: `sudo fcdev tunnel` (or CAP_NET_ADMIN and /dev/net/tun)")
    });
    let missing: Vec<&str> = ["ssh", "ssh-keygen"]
        .into_iter()
        .filter(|t| !which(t))
        .collect();
    checks.push(if missing.is_empty() {
        check("ssh", Verdict::Ok, "ssh and ssh-keygen are installed")
    } else {
        check(
            "ssh",
            Verdict::Fail,
            format!(
                "{} not installed: `fcdev ssh` cannot work",
                missing.join(" and ")
            ),
        )
        .fix("install OpenSSH's client (Debian: apt install openssh-client)")
    });
    if token_ok.is_some() {
        checks.push(ssh_config_check(ctx).await);
    }
    checks
}

/// Whether ~/.ssh/config holds the profile's block as `fcdev ssh-config` would write it now.
async fn ssh_config_check(ctx: &Context) -> Check {
    let file = match crate::cli::ssh_config::default_file() {
        Ok(f) => f,
        Err(e) => return check("ssh-config", Verdict::Skip, e.message),
    };
    match crate::cli::ssh_config::is_current(ctx, &file).await {
        Ok(Some(true)) => check(
            "ssh-config",
            Verdict::Ok,
            format!(
                "{} has every VM (`ssh <vm>.<namespace>.fcdev`)",
                file.display()
            ),
        ),
        Ok(Some(false)) => check(
            "ssh-config",
            Verdict::Warn,
            format!(
                "the fcdev block of {} is out of date (clusters or VMs changed)",
                file.display()
            ),
        )
        .fix("`fcdev ssh-config`"),
        Ok(None) => check(
            "ssh-config",
            Verdict::Warn,
            format!(
                "no fcdev block in {}: ssh, scp and IDEs do not know your VMs",
                file.display()
            ),
        )
        .fix("`fcdev ssh-config` (`fcdev ssh VM` works without it)"),
        Err(e) => check("ssh-config", Verdict::Skip, e.message),
    }
}

pub async fn run(args: DoctorArgs, ctx: Context) -> Result<(), CliError> {
    // The version check reports skew itself.
    crate::client::quiet_version_warning();
    let checks = run_checks(&ctx).await;
    let broken: Vec<&str> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.check)
        .collect();
    if args.json {
        crate::cli::output::print_json(&Report {
            ok: broken.is_empty(),
            profile: &ctx.profile_name,
            checks: &checks,
        });
    } else {
        let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
        for c in &checks {
            let tag = match c.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
                Verdict::Skip => "skip",
            };
            println!("{tag}  {:<width$}  {}", c.check, c.message);
            if let Some(fix) = c.fix.as_deref().filter(|f| !f.is_empty()) {
                if c.verdict != Verdict::Ok {
                    println!("      {:<width$}  fix: {fix}", "");
                }
            }
        }
    }
    if broken.is_empty() {
        return Ok(());
    }
    let mut names = broken.clone();
    names.dedup();
    Err(CliError::new(
        ExitKind::Failure,
        format!("broken: {}", names.join(", ")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_skew_levels() {
        let ours = env!("CARGO_PKG_VERSION");
        assert_eq!(version_check(ours).verdict, Verdict::Ok);
        let (maj, min) = api::minor_version(ours);
        let other_minor = format!("{maj}.{}.0", min.parse::<u32>().unwrap() + 1);
        assert_eq!(version_check(&other_minor).verdict, Verdict::Warn);
        let other_major = format!("{}.0.0", maj.parse::<u32>().unwrap() + 1);
        assert_eq!(version_check(&other_major).verdict, Verdict::Fail);
    }
}
