//! The userspace WireGuard data path.

pub mod keys;
