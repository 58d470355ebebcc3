//! Publishing signed content, as a library the command line (and the demo, the tests and the
//! bench) calls: VIB files into a depot with their signed descriptors ([`depot`]), real ESXi
//! `.vib` files and offline bundles ([`import`]), signed images built from a depot's descriptors
//! and their offline verification ([`image`]).

pub mod depot;
pub mod image;
pub mod import;
