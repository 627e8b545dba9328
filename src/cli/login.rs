//! `fcdev login`: check a token against the server and keep it (0600) for a profile.

use std::io::{IsTerminal, Read};

use crate::api;
use crate::cli::{CliError, Context, ExitKind};
use crate::client::ApiClient;
use crate::config::{self, Profile, ProfileCredentials};

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The fcdev server's API URL, e.g. http://host:7070.
    #[arg(long, env = "FCDEV_SERVER")]
    pub server: String,
    /// Read the token from standard input instead of a hidden prompt.
    #[arg(long)]
    pub token_stdin: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: LoginArgs, ctx: Context) -> Result<(), CliError> {
    let token = if args.token_stdin {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| {
            CliError::new(
                ExitKind::Failure,
                format!("cannot read the token from stdin: {e}"),
            )
        })?;
        s.trim().to_string()
    } else {
        if !std::io::stdin().is_terminal() {
            return Err(
                CliError::new(ExitKind::Usage, "no terminal to ask for the token on")
                    .hint("pipe it in with --token-stdin"),
            );
        }
        dialoguer::Password::new()
            .with_prompt("Token (from `fcdev server user add NAME`)")
            .interact()
            .map_err(|e| CliError::new(ExitKind::Failure, format!("cannot read the token: {e}")))?
    };
    if token.is_empty() {
        return Err(CliError::new(ExitKind::Usage, "the token is empty"));
    }
    login(&ctx, &args.server, &token).await.map(|me| {
        if args.json {
            crate::cli::output::print_json(&me);
        } else {
            println!(
                "Logged in to {} as {} (profile `{}`).",
                args.server.trim_end_matches('/'),
                me.user,
                ctx.profile_name
            );
            println!("Next: fcdev up");
        }
    })
}

/// Check the token with `GET /v1/me`, then save profile + credentials. Shared with `fcdev up --local`.
pub async fn login(ctx: &Context, server: &str, token: &str) -> Result<api::Me, CliError> {
    let server = server.trim_end_matches('/').to_string();
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        return Err(
            CliError::new(ExitKind::Usage, format!("`{server}` is not an http(s) URL"))
                .hint("for example: fcdev login --server http://127.0.0.1:7070"),
        );
    }
    let client = ApiClient::new(&server, Some(token.to_string()));
    let me: api::Me = client.get("/me").await?;
    let mut cfg = ctx.store.load_config()?;
    let previous = cfg.profiles.get(&ctx.profile_name).cloned();
    cfg.profiles.insert(
        ctx.profile_name.clone(),
        Profile {
            server,
            image: previous
                .as_ref()
                .map(|p| p.image.clone())
                .unwrap_or_else(|| config::DEFAULT_IMAGE.to_string()),
            cluster: previous
                .map(|p| p.cluster)
                .unwrap_or_else(|| config::DEFAULT_CLUSTER.to_string()),
        },
    );
    if cfg.default_profile.is_none() {
        cfg.default_profile = Some(ctx.profile_name.clone());
    }
    let mut creds = ctx.store.load_credentials()?;
    creds.profiles.insert(
        ctx.profile_name.clone(),
        ProfileCredentials {
            token: token.to_string(),
        },
    );
    ctx.store.save_credentials(&creds)?;
    ctx.store.save_config(&cfg)?;
    Ok(me)
}
