//! The control plane: HTTP API, state, orchestration, VM backends, the hub.

pub mod agent;
pub mod alloc;
pub mod backend;
pub mod console;
pub mod control;
pub mod exec_relay;
pub mod follow;
pub mod http;
pub mod hub;
pub mod hub_control;
pub mod idle;
pub mod images;
pub mod netns;
pub mod netns_enter;
pub mod orchestrator;
pub mod run;
pub mod service;
pub mod store;
