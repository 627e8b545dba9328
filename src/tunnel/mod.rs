//! The userspace WireGuard data path, shared by both ends: the hub on the server, TUN or rootless (smoltcp)
//! on the laptop.

pub mod client;
pub mod dns;
pub mod error;
pub mod http_proxy;
pub mod hub;
pub mod keys;
pub mod packet;
pub mod peer;
pub mod plan;
pub mod probe;
pub mod rootless;
pub mod tun_dev;
pub mod tun_mode;
pub mod udp;
pub mod wg_quick;

pub use client::{Client, ClientOptions, ClientStats, Mode};
pub use error::TunnelError;
pub use hub::{Hub, HubConfig, HubPeer, HubPeerStats};
pub use keys::{PrivateKey, PublicKey};
pub use rootless::Forward;
