//! `fcdev tunnel`: register this machine's public key as a peer of my namespace and run the WireGuard tunnel
//! (TUN mode with privileges, else a rootless SOCKS5 proxy and `-L` forwards), with a live status line.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;

use serde::Serialize;

use crate::api::{CreatePeer, PeerConfig};
use crate::cli::{tunnel_state, CliError, Context, ExitKind};
use crate::tunnel::{Client, ClientOptions, ClientStats, Forward, Mode, PrivateKey, TunnelError};

#[derive(Debug, clap::Args)]
pub struct TunnelArgs {
    /// tun (a TUN device; needs root or CAP_NET_ADMIN), proxy (rootless: SOCKS5 + forwards) or auto.
    #[arg(long, default_value = "auto", value_parser = parse_mode)]
    pub mode: Mode,
    /// Where the SOCKS5 proxy listens (proxy mode). It resolves `<vm>.<namespace>.fcdev` itself.
    #[arg(long, default_value = "127.0.0.1:1080")]
    pub socks: SocketAddr,
    /// Also run an HTTP proxy here (proxy mode; implies it under `--mode auto`): CONNECT and plain http:// requests,
    /// names resolved like the SOCKS5 proxy's, e.g. `HTTPS_PROXY=http://127.0.0.1:8888`.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Forward a local port to a VM (proxy mode): LOCALPORT:VM:PORT, e.g. -L 8080:n1:80. Repeatable.
    #[arg(short = 'L', long = "forward", value_parser = parse_forward)]
    pub forwards: Vec<Forward>,
    /// The TUN device's name (TUN mode).
    #[arg(long, default_value = "fcdev0")]
    pub tun_name: String,
    /// This machine's peer name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Status as JSON lines on stdout instead of a status line.
    #[arg(long)]
    pub json: bool,
    /// Write a wg-quick configuration for stock WireGuard clients to FILE (0600; stdout without FILE) instead of
    /// running the tunnel. It holds this machine's private key (never sent to the server) and the same address as
    /// `fcdev tunnel`: use one or the other at a time. Calling it again gives the same key and address.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub wg_config: Option<std::path::PathBuf>,
    /// Stop the background tunnel `fcdev ssh` started for this profile (it also ends by itself when idle).
    #[arg(long, conflicts_with = "wg_config")]
    pub stop: bool,
    /// Internal: this is the shared background tunnel of `fcdev ssh --stdio`.
    #[arg(long, hide = true)]
    pub background: bool,
    /// Internal: end once no local connection has been open for SECS (proxy mode).
    #[arg(long, hide = true, value_name = "SECS")]
    pub idle_exit: Option<u64>,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse().map_err(|e: TunnelError| e.to_string())
}

fn parse_forward(s: &str) -> Result<Forward, String> {
    s.parse().map_err(|e: TunnelError| e.to_string())
}

impl From<TunnelError> for CliError {
    fn from(e: TunnelError) -> Self {
        let hint = matches!(e, TunnelError::NoPrivilege(_))
            .then_some("run with sudo, or `fcdev tunnel --mode proxy` (no privileges needed)");
        let err = CliError::new(ExitKind::Failure, e.to_string());
        match hint {
            Some(h) => err.hint(h),
            None => err,
        }
    }
}

/// The registration request: the public key only, never the private key.
pub fn peer_request(name: &str, key: &PrivateKey) -> CreatePeer {
    CreatePeer {
        name: name.to_string(),
        public_key: key.public_key().to_base64(),
    }
}

/// A DNS label from the host name (peer names end up in names and listings).
pub fn default_peer_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
        .to_ascii_lowercase();
    let label: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let label = label.trim_matches('-').to_string();
    if crate::names::is_dns_label(&label) {
        label
    } else {
        "laptop".into()
    }
}

/// Registers this machine (idempotent: the same key keeps its address) and returns its tunnel config.
pub async fn register(
    ctx: &Context,
    name: Option<&str>,
) -> Result<(PrivateKey, PeerConfig), CliError> {
    let (_, client) = ctx.client()?;
    ctx.store.ensure_keys_dir()?;
    let key = PrivateKey::load_or_generate(&ctx.store.key_path(&ctx.profile_name))?;
    let name = name.map(str::to_string).unwrap_or_else(default_peer_name);
    let config: PeerConfig = client.post("/peers", &peer_request(&name, &key)).await?;
    Ok((key, config))
}

#[derive(Serialize)]
struct StatusLine {
    mode: &'static str,
    address: String,
    handshake_age_secs: Option<u64>,
    rx_bytes: u64,
    tx_bytes: u64,
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Tun => "tun",
        Mode::Proxy => "proxy",
        Mode::Auto => "auto",
    }
}

/// `--wg-config [FILE]`: register (idempotent) and write the wg-quick file.
async fn write_wg_config(
    ctx: &Context,
    name: Option<&str>,
    file: &std::path::Path,
) -> Result<(), CliError> {
    let (key, config) = register(ctx, name).await?;
    let text = crate::tunnel::wg_quick::render(&key, &config, &ctx.profile_name);
    if file == std::path::Path::new("-") {
        print!("{text}");
        return Ok(());
    }
    crate::config::write_private(file, &text, 0o600)?;
    let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    tunnel_state::record_export(
        ctx,
        &tunnel_state::ExportedConfig {
            file: file.clone(),
            endpoint: config.endpoint.clone(),
            server_public_key: config.server_public_key.clone(),
        },
    )?;
    eprintln!(
        "Wrote {} (0600): this machine is {} in namespace {}. Load it with `sudo wg-quick up {}` (the file name \
         is the interface name: at most 15 characters before .conf) or import it into the WireGuard app.",
        file.display(),
        config.address,
        config.namespace,
        file.display()
    );
    Ok(())
}

pub async fn run(args: TunnelArgs, ctx: Context) -> Result<(), CliError> {
    if let Some(file) = &args.wg_config {
        return write_wg_config(&ctx, args.name.as_deref(), file).await;
    }
    if args.stop {
        match tunnel_state::stop_background(&ctx) {
            Some(pid) => eprintln!("Stopped the background tunnel (pid {pid})."),
            None => eprintln!(
                "No background tunnel runs for profile `{}`.",
                ctx.profile_name
            ),
        }
        return Ok(());
    }
    // One key is one endpoint at the hub: one tunnel per profile. A background one (started by `fcdev ssh`)
    // gives way to the one asked for here; another foreground one is left alone.
    if let Some(running) = tunnel_state::read_live(&ctx) {
        if !running.background || args.background {
            return Err(CliError::new(
                ExitKind::Conflict,
                format!(
                    "a tunnel for profile `{}` already runs (pid {}, {} mode)",
                    ctx.profile_name, running.pid, running.mode
                ),
            )
            .hint("use it (ssh and curl through it work), or stop it first: two tunnels with one key fight over one endpoint at the hub"));
        }
        if let Some(pid) = tunnel_state::stop_background(&ctx) {
            eprintln!(
                "Stopped the background tunnel of `fcdev ssh` (pid {pid}); this one takes over."
            );
        }
    }
    let (key, config) = register(&ctx, args.name.as_deref()).await?;
    let address = config.address.clone();
    let mut opts = ClientOptions::new(key, config.clone());
    opts.mode =
        match (args.mode, args.http) {
            (Mode::Tun, Some(_)) => return Err(CliError::new(
                ExitKind::Usage,
                "--http runs in proxy mode, not with --mode tun",
            )
            .hint(
                "drop --http (in TUN mode programs reach the VMs directly), or use --mode proxy",
            )),
            (Mode::Auto, Some(_)) => Mode::Proxy,
            (mode, _) => mode,
        };
    opts.socks = Some(args.socks);
    opts.http = args.http;
    opts.forwards = args.forwards.clone();
    opts.tun_name = args.tun_name.clone();
    opts.idle_exit = args.idle_exit.map(std::time::Duration::from_secs);
    let json = args.json;
    let background = args.background;
    // The running tunnel's record, removed when this function returns.
    let published: std::cell::RefCell<Option<tunnel_state::Published>> = Default::default();
    let published_ref = &published;
    // TUN mode: the VM names in the hosts file while the tunnel runs.
    let hosts_block: std::cell::RefCell<Option<crate::cli::hosts::HostsBlock>> = Default::default();
    let hosts_ref = &hosts_block;
    let state_ctx = &ctx;
    let forwards = args.forwards.clone();
    let tty = std::io::stderr().is_terminal();
    let name = args.name.clone();
    let mut first = true;
    crate::tunnel::client::run(
        opts,
        move |client: &Client, s: &ClientStats| {
            if first {
                first = false;
                let state = tunnel_state::TunnelState {
                    pid: std::process::id(),
                    mode: mode_name(client.mode()).to_string(),
                    socks: client.socks_addr(),
                    address: config.address.clone(),
                    namespace: config.namespace.clone(),
                    background,
                };
                match tunnel_state::Published::write(state_ctx, &state) {
                    Ok(p) => *published_ref.borrow_mut() = Some(p),
                    Err(e) => tracing::warn!("cannot record the running tunnel: {}", e.message),
                }
                let mut names = None;
                if client.mode() == Mode::Tun {
                    names = Some(name_service(
                        client,
                        &config,
                        &state_ctx.profile_name,
                        hosts_ref,
                    ));
                }
                if !json && !background {
                    describe(client, &config, &forwards, names.as_deref());
                }
            }
            let line = StatusLine {
                mode: mode_name(s.mode),
                address: address.clone(),
                handshake_age_secs: s.handshake_age.map(|d| d.as_secs()),
                rx_bytes: s.rx_bytes,
                tx_bytes: s.tx_bytes,
            };
            if json {
                if let Ok(l) = serde_json::to_string(&line) {
                    println!("{l}");
                }
            } else if tty {
                let hs = line
                    .handshake_age_secs
                    .map(|a| format!("handshake {a}s ago"))
                    .unwrap_or_else(|| "no handshake yet".into());
                eprint!(
                    "\r\x1b[2K{} · {hs} · rx {} · tx {}",
                    line.mode,
                    human(line.rx_bytes),
                    human(line.tx_bytes)
                );
                let _ = std::io::stderr().flush();
            }
        },
        || async {
            // The hub stopped answering: the namespace may live on another host now (its cluster re-created
            // there by `fcdev up`). Registering again is idempotent and answers the current hub.
            match register(state_ctx, name.as_deref()).await {
                Ok((_, fresh)) => Some(fresh),
                Err(e) => {
                    tracing::warn!(
                        "cannot ask the server for the tunnel's config again: {}",
                        e.message
                    );
                    None
                }
            }
        },
    )
    .await?;
    if tty && !json {
        eprintln!();
    }
    Ok(())
}

/// TUN mode: the VM names resolve on this machine while the tunnel runs. A DNS responder on the tunnel's own
/// address answers them; where systemd-resolved runs, the TUN link gets it for `~<namespace>.fcdev`, otherwise
/// a marked block of /etc/hosts holds them (removed when the tunnel ends). Returns how, for the user.
fn name_service(
    client: &Client,
    config: &PeerConfig,
    profile: &str,
    hosts_block: &std::cell::RefCell<Option<crate::cli::hosts::HostsBlock>>,
) -> String {
    let domain = format!("{}.{}", config.namespace, crate::names::DNS_SUFFIX);
    let dns = crate::tunnel::plan::Plan::from_config(config)
        .map_err(|e| e.to_string())
        .and_then(|plan| {
            let addr = std::net::SocketAddr::from((plan.address, 53));
            crate::tunnel::dns::serve(addr, std::sync::Arc::new(plan)).map_err(|e| e.to_string())
        });
    let resolvectl = |args: &[&str]| {
        std::process::Command::new("resolvectl")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let resolved = std::path::Path::new("/run/systemd/resolve").is_dir();
    if let (Ok(dns), true, Some(dev)) = (&dns, resolved, client.device_name()) {
        let ip = dns.ip().to_string();
        if resolvectl(&["dns", &dev, &ip]) && resolvectl(&["domain", &dev, &format!("~{domain}")]) {
            return format!(
                "names: *.{domain} resolved by systemd-resolved through the tunnel's DNS on {dns}"
            );
        }
    }
    let hosts = match crate::cli::hosts::HostsBlock::install(profile, &config.hosts) {
        Ok(b) => {
            let line = format!("names: in {} until the tunnel ends", b.path().display());
            *hosts_block.borrow_mut() = Some(b);
            line
        }
        Err(e) => format!(
            "names: cannot add them to {}: {e} (`fcdev hosts` prints the lines)",
            crate::cli::hosts::hosts_file().display()
        ),
    };
    match dns {
        Ok(dns) => format!("{hosts}; DNS for *.{domain} on {dns}"),
        Err(_) => hosts,
    }
}

fn describe(client: &Client, config: &PeerConfig, forwards: &[Forward], names: Option<&str>) {
    println!(
        "Tunnel up ({} mode): this machine is {} in namespace {} (Ctrl-C to stop)",
        mode_name(client.mode()),
        config.address,
        config.namespace
    );
    if let Some(dev) = client.device_name() {
        println!("  {dev}: routes {}", config.allowed_ips.join(", "));
        for h in &config.hosts {
            println!("  {}  {}", h.address, h.name);
        }
        match names {
            Some(n) => println!("  ({n})"),
            None => println!("  (add these lines to /etc/hosts to use the names)"),
        }
    }
    if let Some(socks) = client.socks_addr() {
        println!(
            "  SOCKS5 proxy on {socks}: curl --socks5-hostname {socks} http://<vm>.{}.fcdev/",
            config.namespace
        );
        for h in &config.hosts {
            println!("    {}  {}", h.name, h.address);
        }
    }
    if let Some(http) = client.http_addr() {
        println!(
            "  HTTP proxy on {http}: curl -x http://{http} http://<vm>.{}.fcdev/ (HTTPS_PROXY=http://{http} for CONNECT)",
            config.namespace
        );
    }
    for (addr, f) in client.forward_addrs().iter().zip(forwards) {
        println!("  forward {addr} -> {}:{}", f.host, f.port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_never_carries_the_private_key() {
        let key = PrivateKey::generate();
        let body = serde_json::to_string(&peer_request("laptop", &key)).unwrap();
        assert!(!body.contains(&key.to_base64()), "{body}");
        assert!(body.contains(&key.public_key().to_base64()));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let fields: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(fields, ["name", "public_key"]);
    }

    #[test]
    fn peer_name_is_a_dns_label() {
        assert!(crate::names::is_dns_label(&default_peer_name()));
    }
}
