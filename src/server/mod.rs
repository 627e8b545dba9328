//! The control plane: HTTP API, state, orchestration, VM backends, the hub.

pub mod backend;
pub mod images;
pub mod netns;
