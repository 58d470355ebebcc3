//! vibstage agent library: everything behind `vibstaged` (the host daemon) and `vibstagectl`
//! (the controller and admin tool). The binaries are thin mains over this crate.
//!
//! Data flows one way: api → tasks → stage/remediate → fetch/verify → store. Lower layers never
//! import higher ones.

pub mod agent;
pub mod api;
pub mod cli;
pub mod client;
pub mod compliance;
pub mod config;
pub mod daemon;
pub mod daemon_args;
pub mod depot_server;
pub mod fetch;
pub mod fsutil;
pub mod metrics;
pub mod pki;
pub mod rate;
pub mod remediate;
pub mod server;
pub mod stage;
pub mod state;
pub mod store;
pub mod tasks;
pub mod tls;
pub mod vib;
