//! The userspace WireGuard data path, shared by both ends: the hub on the server, TUN or rootless (smoltcp)
//! on the laptop.

pub mod error;
pub mod hub;
pub mod keys;
pub mod packet;
pub mod peer;
pub mod tun_dev;

pub use error::TunnelError;
pub use hub::{Hub, HubConfig, HubPeer, HubPeerStats};
pub use keys::{PrivateKey, PublicKey};
