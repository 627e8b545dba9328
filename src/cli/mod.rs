//! Command-line definitions (clap) and the shared context of the laptop commands.

use clap::{Parser, Subcommand};

use crate::client::ApiClient;
use crate::config::{self, Profile};

pub mod completions;
pub mod doctor;
pub mod down;
pub mod errors;
pub mod exec;
#[cfg(not(feature = "server"))]
pub mod host_only;
pub mod hosts;
#[cfg(feature = "server")]
pub mod image;
pub mod images;
pub mod login;
pub mod logs;
pub mod marked;
pub mod output;
pub mod progress;
pub mod reset;
#[cfg(feature = "server")]
pub mod server;
pub mod snapshot;
pub mod ssh;
pub mod ssh_config;
pub mod status;
pub mod stop;
pub mod tunnel;
pub mod tunnel_state;
pub mod up;

pub use errors::{CliError, ExitKind};

#[derive(Debug, Parser)]
#[command(
    name = "fcdev",
    version,
    about = "Remote development clusters: your own namespace of VMs on a shared host, in seconds, reached through a userspace WireGuard tunnel",
    long_about = None,
)]
#[cfg_attr(
    feature = "server",
    command(
        after_help = "Start here:\n  fcdev up --local        a local server + the tiny cluster on this machine\n  fcdev login --server URL   use a shared host\n  fcdev tunnel            reach your VMs from this laptop"
    )
)]
#[cfg_attr(
    not(feature = "server"),
    command(after_help = host_only::AFTER_HELP)
)]
pub struct Cli {
    /// The profile (server + token) to use.
    #[arg(long, global = true, env = "FCDEV_PROFILE")]
    pub profile: Option<String>,

    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Log in to an fcdev server with a token (kept 0600 in the config dir).
    Login(login::LoginArgs),
    /// Create your cluster (or resume/repair it) and wait until every VM is ready.
    Up(up::UpArgs),
    /// Show your namespace, clusters, VMs and tunnel peers.
    Status(status::StatusArgs),
    /// List the prepared images of the server.
    Images(images::ImagesArgs),
    /// Join your namespace's network from this machine (userspace WireGuard).
    Tunnel(tunnel::TunnelArgs),
    /// Put a cluster back to its onboarding snapshot.
    Reset(reset::ResetArgs),
    /// Run a command in a VM (no tunnel needed): `fcdev exec n1 -- uptime`; exits with its exit code.
    Exec(exec::ExecArgs),
    /// Delete a cluster: VMs, disks, its snapshots and this machine's tunnel peer.
    Down(down::DownArgs),
    /// Save the cluster to disk and end its VMs (memory, processes and disks kept; the host's RAM freed).
    Stop(stop::StopArgs),
    /// Resume a stopped cluster where it was (also what `fcdev up` does to a stopped cluster).
    Start(stop::StopArgs),
    /// Named snapshots of a cluster: save, restore, list, rm.
    Snapshot(snapshot::SnapshotArgs),
    /// Print /etc/hosts lines for your VMs.
    Hosts(hosts::HostsArgs),
    /// Open an ssh session to a VM (no tunnel needed: it uses the running one or starts one in the background).
    Ssh(ssh::SshArgs),
    /// Write ssh config entries for your VMs (`ssh n1.<namespace>.fcdev`, scp, rsync, VS Code Remote-SSH).
    SshConfig(ssh_config::SshConfigArgs),
    /// Show a VM's console log (-f follows it).
    Logs(logs::LogsArgs),
    /// Check this machine's setup: server, token, versions, key files, the hub (a real handshake), TUN, ssh.
    Doctor(doctor::DoctorArgs),
    /// Build or snapshot prepared images (host side).
    #[cfg(feature = "server")]
    Image(image::ImageArgs),
    /// Run the fcdev server: control API, VM orchestration and the WireGuard hub (host side).
    #[cfg(feature = "server")]
    Server(Box<server::ServerArgs>),
    /// Absent from the laptop-only build: says so.
    #[cfg(not(feature = "server"))]
    #[command(hide = true, disable_help_flag = true)]
    Image(host_only::HostOnlyArgs),
    /// Absent from the laptop-only build: says so.
    #[cfg(not(feature = "server"))]
    #[command(hide = true, disable_help_flag = true)]
    Server(host_only::HostOnlyArgs),
    /// Print a shell completion script.
    Completions(completions::CompletionsArgs),
    /// Internal: ssh's KnownHostsCommand (a VM's host key as the server knows it).
    #[command(name = "known-hosts", hide = true)]
    KnownHosts(ssh::KnownHostsArgs),
    /// Internal: ssh's ProxyCommand through the rootless tunnel's SOCKS5 proxy.
    #[command(name = "__socks-connect", hide = true)]
    SocksConnect(ssh::SocksConnectArgs),
    /// Internal: the process behind one VM of the test backend.
    #[cfg(feature = "server")]
    #[command(name = "__test-vm", hide = true)]
    TestVm(server::TestVmArgs),
    /// Internal: the guest agent of Debian images (runs inside a VM, on its second serial port).
    #[cfg(feature = "server")]
    #[command(name = "guest-agent", hide = true)]
    GuestAgent(GuestAgentArgs),
}

/// `fcdev guest-agent [--configure KEY=VALUE…]` (see `crate::guest`).
#[cfg(feature = "server")]
#[derive(clap::Args, Debug)]
pub struct GuestAgentArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// What the laptop commands share: the config store, the chosen profile, and an API client for it.
pub struct Context {
    pub store: config::Store,
    pub profile_name: String,
    /// Whether --profile (or FCDEV_PROFILE) named the profile.
    pub explicit_profile: bool,
}

impl Context {
    pub fn new(profile: Option<String>) -> Result<Context, CliError> {
        let store = config::Store::open()?;
        let explicit_profile = profile.is_some();
        let profile_name = match profile {
            Some(p) => p,
            None => store
                .load_config()?
                .default_profile
                .unwrap_or_else(|| config::DEFAULT_PROFILE.to_string()),
        };
        Ok(Context {
            store,
            profile_name,
            explicit_profile,
        })
    }

    pub fn profile(&self) -> Result<Profile, CliError> {
        let cfg = self.store.load_config()?;
        cfg.profiles
            .get(&self.profile_name)
            .cloned()
            .ok_or_else(|| {
                CliError::new(
                ExitKind::NotLoggedIn,
                format!("not logged in (profile `{}`)", self.profile_name),
            )
            .hint(if cfg!(feature = "server") {
                "run `fcdev login --server URL`, or `fcdev up --local` for a server on this machine"
            } else {
                "run `fcdev login --server URL`"
            })
            })
    }

    /// An authenticated client for the profile.
    pub fn client(&self) -> Result<(Profile, ApiClient), CliError> {
        let profile = self.profile()?;
        let creds = self.store.load_credentials()?;
        let token = creds
            .profiles
            .get(&self.profile_name)
            .map(|c| c.token.clone())
            .ok_or_else(|| {
                CliError::new(
                    ExitKind::NotLoggedIn,
                    format!(
                        "no token for profile `{}` in {}",
                        self.profile_name,
                        self.store.credentials_path().display()
                    ),
                )
                .hint("run `fcdev login` again")
            })?;
        let client = ApiClient::new(&profile.server, Some(token));
        Ok((profile, client))
    }
}

/// Ask for a yes/no confirmation, unless `yes`; refuses without a terminal rather than hanging.
pub fn confirm(prompt: &str, yes: bool) -> Result<bool, CliError> {
    if yes {
        return Ok(true);
    }
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(CliError::new(
            ExitKind::Usage,
            "confirmation needed but there is no terminal to ask on",
        )
        .hint("pass --yes to confirm"));
    }
    dialoguer::Confirm::new()
        .with_prompt(prompt)
        .default(false)
        .interact()
        .map_err(|e| CliError::new(ExitKind::Failure, format!("cannot read the answer: {e}")))
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Login(args) => login::run(args, Context::new(cli.profile)?).await,
        Command::Up(args) => up::run(args, Context::new(cli.profile)?).await,
        Command::Status(args) => status::run(args, Context::new(cli.profile)?).await,
        Command::Images(args) => images::run(args, Context::new(cli.profile)?).await,
        Command::Tunnel(args) => tunnel::run(args, Context::new(cli.profile)?).await,
        Command::Reset(args) => reset::run(args, Context::new(cli.profile)?).await,
        Command::Exec(args) => exec::run(args, Context::new(cli.profile)?).await,
        Command::Down(args) => down::run(args, Context::new(cli.profile)?).await,
        Command::Stop(args) => stop::stop(args, Context::new(cli.profile)?).await,
        Command::Start(args) => stop::start(args, Context::new(cli.profile)?).await,
        Command::Snapshot(args) => snapshot::run(args, Context::new(cli.profile)?).await,
        Command::Hosts(args) => hosts::run(args, Context::new(cli.profile)?).await,
        Command::Ssh(args) => ssh::run(args, Context::new(cli.profile)?).await,
        Command::SshConfig(args) => ssh_config::run(args, Context::new(cli.profile)?).await,
        Command::KnownHosts(args) => ssh::known_hosts(args, Context::new(cli.profile)?).await,
        Command::Logs(args) => logs::run(args, Context::new(cli.profile)?).await,
        Command::Doctor(args) => doctor::run(args, Context::new(cli.profile)?).await,
        #[cfg(feature = "server")]
        Command::Image(args) => {
            image::run(args, &crate::config::data_dir()?).map_err(CliError::from)
        }
        #[cfg(not(feature = "server"))]
        Command::Image(_) => Err(host_only::refuse("image")),
        #[cfg(not(feature = "server"))]
        Command::Server(_) => Err(host_only::refuse("server")),
        Command::Completions(args) => completions::run(args),
        Command::SocksConnect(args) => ssh::socks_connect(args)
            .map_err(|e| CliError::new(ExitKind::Unreachable, format!("socks connect: {e}"))),
        #[cfg(feature = "server")]
        Command::Server(_) | Command::TestVm(_) | Command::GuestAgent(_) => {
            unreachable!("server commands run outside the async runtime")
        }
    }
}
