//! vibstage agent library: everything behind `vibstaged`, the host daemon that runs as root. The
//! binary is a thin main over this crate. The controller (`vibstagectl`) is the `vibstage-ctl`
//! crate; nothing here depends on it.
//!
//! Data flows one way: api → tasks → stage/remediate → fetch/verify → store. Lower layers never
//! import higher ones.

pub mod agent;
pub mod api;
pub mod compliance;
pub mod config;
pub mod daemon;
pub mod daemon_args;
pub mod fetch;
pub mod fsutil;
pub mod hook;
pub mod install;
pub mod metrics;
pub mod rate;
pub mod remediate;
pub mod server;
pub mod stage;
pub mod state;
pub mod store;
pub mod tasks;
pub mod tls;
pub mod vib;
