//! vibstage controller library: everything behind `vibstagectl`, the tool of the controller, the
//! depot owner and the local root user (SPEC §3). The binary is a thin main over this crate.
//!
//! Nothing here runs as root on a host: the daemon is the `vibstage` crate, which depends on
//! nothing of this one. This crate uses the daemon's library only for what both sides must do the
//! same way (PEM loading, atomic writes, hashing a file, the VIB reader, `vibstaged`'s arguments
//! for its man page).

pub mod cli;
pub mod client;
pub mod depot_server;
pub mod error;
pub mod files;
pub mod pki;
pub mod publish;
