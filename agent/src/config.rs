//! Reading `agent.toml`: the schema, its defaults and its validation are
//! [`vibstage_protocol::config`] (shared with the fuzz crate and with whoever writes an agent's
//! configuration); this is the file read around it.

use std::path::Path;

pub use vibstage_protocol::config::*;

/// Reads and validates `path`: a regular file of at most [`crate::fsutil::MAX_CONFIG_FILE`]
/// bytes (a mistake such as `/dev/zero` is refused, never read for ever).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = crate::fsutil::read_config_text(path, crate::fsutil::MAX_CONFIG_FILE).map_err(
        |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        },
    )?;
    Config::parse(&text, path)
}
