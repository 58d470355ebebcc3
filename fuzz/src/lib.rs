//! cargo-fuzz targets of vibstage (issue 8): the entry functions live in `entries.rs`, which the
//! default test suite also runs over the seed corpora (`tests/tests/fuzz_smoke.rs`).
//!
//! The config parser is the protocol crate's (`vibstage_protocol::config`, shared with the
//! agent), so fuzzing it does not have to build the agent's TLS and HTTP stack (which takes
//! minutes under cargo-fuzz's flags).

mod entries;
/// The agent's reader of real VIBs and bundles (`agent/src/vib/`), compiled in the same way:
/// it depends only on the protocol crate and the format crates.
#[path = "../../agent/src/vib/mod.rs"]
#[allow(dead_code)]
pub mod vib;

pub use entries::{config, envelope, request_body, vib_reader};
