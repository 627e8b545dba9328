//! The userspace WireGuard data path, shared by both ends: the hub on the server, TUN or rootless (smoltcp)
//! on the laptop.

/// MTU of every tunnel interface (the hub's TUN, the client's TUN, rootless mode's smoltcp device and the
/// `wg-quick` file): room for the 80 bytes of IPv6+UDP+WireGuard headers (60 over IPv4) in a 1500-byte path,
/// the same default as `wg-quick`.
pub const MTU: u32 = 1420;

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
