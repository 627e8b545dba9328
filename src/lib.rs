//! fcdev: remote development clusters. One binary: the laptop CLI and `fcdev server` (control API, VM
//! orchestration and the WireGuard hub).

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod image;
pub mod names;
pub mod server;
pub mod tunnel;
