//! The userspace WireGuard data path (placeholder).
