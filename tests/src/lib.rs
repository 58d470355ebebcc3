//! Test support for vibstage's end-to-end tests.
//!
//! The integration tests in `tests/tests/` exercise vibstage the way an operator
//! would: they start the real `vibstaged` and `vibstagectl` binaries as processes
//! (see [`bin()`]), talk to them over real TLS with certificates from a throw-away
//! PKI ([`TestPki`]), and let the agent download from a real HTTPS depot
//! ([`Depot`]) that serves a depot directory from disk and can be told to fail
//! in the ways real networks and servers fail ([`Fault`]). Each test works in its
//! own temporary directory.
//!
//! This library only provides the harness; it holds no tests of vibstage itself.

pub mod agent;
pub mod bin;
pub mod depot;
pub mod fake_agent;
pub mod fault_case;
pub mod hostile;
pub mod invariants;
pub mod lazyfs;
pub mod model;
pub mod nginx;
pub mod pki;
pub mod terminal;
pub mod vibs;

pub use agent::{AgentOptions, AgentProc, Reply, VibFile, World};
pub use bin::{bin, vibstagectl, vibstaged};
pub use depot::{ANY_PATH, Depot, Fault, RequestLog};
pub use fake_agent::{Answer, FakeAgent, Seen};
pub use lazyfs::LazyFs;
pub use pki::TestPki;
