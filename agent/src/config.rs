//! Reading `agent.toml`: the schema, its defaults and its validation are
//! [`vibstage_protocol::config`] (shared with the fuzz crate and with whoever writes an agent's
//! configuration); this is the file read around it.

use std::path::Path;

pub use vibstage_protocol::config::*;

/// Reads and validates `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Config::parse(&text, path)
}
