//! The laptop end: picks TUN or rootless mode, starts it from a `PeerConfig`, exposes live stats, and (with
//! [`run`]) serves until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use crate::api::PeerConfig;

use super::keys::PrivateKey;
use super::peer::PeerStats;
use super::plan::Plan;
use super::rootless::{Forward, RootlessClient};
use super::tun_dev::can_create_tun;
use super::tun_mode::TunClient;
use super::TunnelError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// TUN when this process may create one, else proxy.
    #[default]
    Auto,
    Tun,
    Proxy,
}

impl std::str::FromStr for Mode {
    type Err = TunnelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Mode::Auto),
            "tun" => Ok(Mode::Tun),
            "proxy" | "rootless" => Ok(Mode::Proxy),
            _ => Err(TunnelError::Config(format!(
                "mode `{s}`: want tun, proxy or auto"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub private_key: PrivateKey,
    pub config: PeerConfig,
    pub mode: Mode,
    /// TUN device name (TUN mode).
    pub tun_name: String,
    /// Local UDP address (default 0.0.0.0:0).
    pub bind: SocketAddr,
    /// SOCKS5 listen address (proxy mode); None = no proxy.
    pub socks: Option<SocketAddr>,
    /// HTTP proxy listen address (proxy mode); None = none.
    pub http: Option<SocketAddr>,
    /// `-L` forwards (proxy mode).
    pub forwards: Vec<Forward>,
    /// Proxy mode: end the tunnel once no local connection has been open for this long (the shared background
    /// tunnel `fcdev ssh --stdio` starts).
    pub idle_exit: Option<Duration>,
}

impl ClientOptions {
    pub fn new(private_key: PrivateKey, config: PeerConfig) -> ClientOptions {
        ClientOptions {
            private_key,
            config,
            mode: Mode::Auto,
            tun_name: "fcdev0".into(),
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            socks: Some(SocketAddr::from(([127, 0, 0, 1], 1080))),
            http: None,
            forwards: Vec::new(),
            idle_exit: None,
        }
    }
}

/// Live state for a status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    pub mode: Mode,
    pub handshake_age: Option<Duration>,
    /// How long our handshakes have gone unanswered (None: none waits).
    pub handshake_unanswered: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

pub enum Client {
    Tun(TunClient),
    Proxy(RootlessClient),
}

impl Client {
    pub async fn start(opts: ClientOptions) -> Result<Client, TunnelError> {
        let plan = Plan::from_config(&opts.config)?;
        let mode = match opts.mode {
            Mode::Auto if can_create_tun() => Mode::Tun,
            Mode::Auto => Mode::Proxy,
            m => m,
        };
        match mode {
            Mode::Tun => Ok(Client::Tun(TunClient::start(
                &opts.private_key,
                plan,
                &opts.tun_name,
                opts.bind,
            )?)),
            _ => Ok(Client::Proxy(
                RootlessClient::start(
                    &opts.private_key,
                    plan,
                    opts.bind,
                    opts.socks,
                    opts.http,
                    &opts.forwards,
                )
                .await?,
            )),
        }
    }

    pub fn mode(&self) -> Mode {
        match self {
            Client::Tun(_) => Mode::Tun,
            Client::Proxy(_) => Mode::Proxy,
        }
    }

    pub fn stats(&self) -> ClientStats {
        let s: PeerStats = match self {
            Client::Tun(c) => c.stats(),
            Client::Proxy(c) => c.stats(),
        };
        ClientStats {
            mode: self.mode(),
            handshake_age: s.handshake_age,
            handshake_unanswered: s.handshake_unanswered,
            rx_bytes: s.rx_bytes,
            tx_bytes: s.tx_bytes,
        }
    }

    /// Proxy mode: where the SOCKS5 proxy listens.
    pub fn socks_addr(&self) -> Option<SocketAddr> {
        match self {
            Client::Proxy(c) => c.socks_addr(),
            Client::Tun(_) => None,
        }
    }

    /// Proxy mode: where the HTTP proxy listens.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        match self {
            Client::Proxy(c) => c.http_addr(),
            Client::Tun(_) => None,
        }
    }

    /// Proxy mode: the bound local addresses of the `-L` forwards, in order.
    pub fn forward_addrs(&self) -> Vec<SocketAddr> {
        match self {
            Client::Proxy(c) => c.forward_addrs().to_vec(),
            Client::Tun(_) => Vec::new(),
        }
    }

    /// TUN mode: the device name.
    pub fn device_name(&self) -> Option<String> {
        match self {
            Client::Tun(c) => Some(c.device_name().to_string()),
            Client::Proxy(_) => None,
        }
    }

    /// Moves to a new local UDP socket (roaming); the hub follows.
    pub async fn rebind(&self, bind: SocketAddr) -> Result<(), TunnelError> {
        match self {
            Client::Tun(c) => c.rebind(bind),
            Client::Proxy(c) => c.rebind(bind).await,
        }
    }

    pub async fn shutdown(self) {
        match self {
            Client::Tun(c) => {
                let _ = tokio::task::spawn_blocking(move || c.shutdown()).await;
            }
            Client::Proxy(c) => c.shutdown().await,
        }
    }
}

/// Handshakes unanswered this long make [`run`] ask for the peer config again (at most this often): the hub may
/// have moved (a control plane re-created the namespace on another host).
pub const FOLLOW_AFTER: Duration = Duration::from_secs(10);

/// Whether a fresh peer config names another hub (endpoint or key) than the running one.
pub fn hub_changed(running: &PeerConfig, fresh: &PeerConfig) -> bool {
    running.endpoint != fresh.endpoint || running.server_public_key != fresh.server_public_key
}

/// Starts the tunnel and serves until Ctrl-C or SIGTERM, calling `status` about once a second. While its
/// handshakes go unanswered ([`FOLLOW_AFTER`]), it asks `refetch` for the peer config again; when that names
/// another hub (the namespace moved to another host), the tunnel starts again towards it, in the same mode
/// with the same key and address.
pub async fn run<F, Fut>(
    mut opts: ClientOptions,
    mut status: impl FnMut(&Client, &ClientStats),
    mut refetch: F,
) -> Result<(), TunnelError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<PeerConfig>>,
{
    let idle_exit = opts.idle_exit;
    let mut client = Client::start(opts.clone()).await?;
    opts.mode = client.mode();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(TunnelError::io("installing SIGTERM handler"))?;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut asked: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = every.tick() => {
                let stats = client.stats();
                status(&client, &stats);
                if let (Some(limit), Client::Proxy(p)) = (idle_exit, &client) {
                    if p.idle_for() >= limit {
                        tracing::info!("no connection for {limit:?}: the tunnel ends");
                        break;
                    }
                }
                let stuck = stats.handshake_unanswered.is_some_and(|d| d >= FOLLOW_AFTER);
                if stuck && asked.is_none_or(|t| t.elapsed() >= FOLLOW_AFTER) {
                    asked = Some(tokio::time::Instant::now());
                    let Some(fresh) = refetch().await else { continue };
                    if !hub_changed(&opts.config, &fresh) {
                        continue;
                    }
                    eprintln!(
                        "\nThe namespace's hub moved ({} -> {}): the tunnel follows.",
                        opts.config.endpoint, fresh.endpoint
                    );
                    client.shutdown().await;
                    opts.config = fresh;
                    client = Client::start(opts.clone()).await?;
                    asked = None;
                }
            }
        }
    }
    client.shutdown().await;
    Ok(())
}
