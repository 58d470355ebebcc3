//! cargo-fuzz targets of vibstage (issue 8): the entry functions live in `entries.rs`, which the
//! default test suite also runs over the seed corpora (`tests/tests/fuzz_smoke.rs`).
//!
//! `agent_config` is the agent's own `agent/src/config.rs`, compiled into this crate. It depends
//! only on serde, toml and the protocol crate, so fuzzing the config parser does not have to
//! build the agent's TLS and HTTP stack (which takes minutes under cargo-fuzz's flags).

#[path = "../../agent/src/config.rs"]
#[allow(dead_code, missing_docs)]
mod agent_config;
mod entries;
/// The agent's reader of real VIBs and bundles (`agent/src/vib/`), compiled in the same way:
/// it depends only on the protocol crate and the format crates.
#[path = "../../agent/src/vib/mod.rs"]
#[allow(dead_code)]
pub mod vib;

pub use entries::{config, envelope, request_body, vib_reader};
