//! fcdev: remote development clusters. One binary: the laptop CLI and `fcdev server` (control API, VM
//! orchestration and the WireGuard hub). Without the default feature `server` it is the laptop-only build: the
//! laptop commands and the tunnel, no `server`/`image` modules and none of their dependencies (axum, SQLite).

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
#[cfg(feature = "server")]
pub mod guest;
#[cfg(feature = "server")]
pub mod image;
pub mod names;
#[cfg(feature = "server")]
pub mod server;
pub mod sys;
pub mod tunnel;
