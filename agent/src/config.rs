//! `agent.toml` (SPEC §4): every key with its default, parsed strictly so that a typo is an error
//! that names the key and the file rather than a silently ignored setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vibstage_protocol::{AcceptanceLevel, HostId};

/// Default configuration path.
pub const DEFAULT_PATH: &str = "/etc/vibstage/agent.toml";

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or a key is unknown or has the wrong type.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key and the line.
        message: String,
    },
    /// A value is well-typed but not acceptable.
    #[error("invalid config {path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[agent]`
    pub agent: AgentSection,
    /// `[scratch]`
    pub scratch: ScratchSection,
    /// `[listen]`
    pub listen: ListenSection,
    /// `[tls]`
    pub tls: TlsSection,
    /// `[trust]`
    pub trust: TrustSection,
    /// `[depot]`
    pub depot: DepotSection,
    /// `[host]`
    pub host: HostSection,
    /// `[maintenance]`
    pub maintenance: MaintenanceSection,
    /// `[install]`
    pub install: InstallSection,
}

/// `[agent]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Host id reported in status; the hostname when absent.
    pub host_id: Option<HostId>,
    /// Lowest acceptance level the host accepts.
    pub acceptance_level: AcceptanceLevel,
    /// Agent state (root-only).
    pub state_dir: PathBuf,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            host_id: None,
            acceptance_level: AcceptanceLevel::Partner,
            state_dir: "/var/lib/vibstage".into(),
        }
    }
}

/// `[scratch]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScratchSection {
    /// Persistent staging area.
    pub path: PathBuf,
    /// Used when scratch lacks room; empty = refuse instead.
    pub volatile_path: PathBuf,
    /// Free space always left on the filesystem.
    pub reserve_bytes: u64,
    /// VIB downloads at once.
    pub concurrency: usize,
}

impl Default for ScratchSection {
    fn default() -> Self {
        Self {
            path: "/scratch/vibstage".into(),
            volatile_path: "/run/vibstage/stage".into(),
            reserve_bytes: 256 << 20,
            concurrency: 4,
        }
    }
}

/// `[listen]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    /// mTLS address; empty = off.
    pub tcp: String,
    /// Local root API socket; empty = off.
    pub socket: PathBuf,
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            tcp: "0.0.0.0:9443".into(),
            socket: "/run/vibstage/vibstaged.sock".into(),
        }
    }
}

/// `[tls]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server key (PEM).
    pub key: PathBuf,
    /// CA that client certificates must chain to.
    pub client_ca: PathBuf,
    /// Names that may change state; empty = any client of `client_ca`.
    pub operators: Vec<String>,
    /// Names that may only read.
    pub readers: Vec<String>,
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            cert: "/etc/vibstage/tls/agent.pem".into(),
            key: "/etc/vibstage/tls/agent.key".into(),
            client_ca: "/etc/vibstage/tls/controller-ca.pem".into(),
            operators: Vec::new(),
            readers: Vec::new(),
        }
    }
}

/// `[trust]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustSection {
    /// Trusted public keys.
    pub keys: Vec<TrustKeyEntry>,
    /// Distinct trusted keys that must sign each document (default 1).
    pub threshold: usize,
}

impl Default for TrustSection {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            threshold: 1,
        }
    }
}

/// Role of a trust store key in the configuration.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RoleName {
    /// May sign images.
    Image,
    /// May sign VIB descriptors.
    Vib,
}

/// `[[trust.keys]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustKeyEntry {
    /// SPKI PEM public key file.
    pub file: PathBuf,
    /// Role.
    pub role: RoleName,
    /// For `vib` keys: the highest level the key may sign (default `partner`).
    pub max_acceptance: Option<AcceptanceLevel>,
}

/// `[depot]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DepotSection {
    /// Allow plain http depots.
    pub allow_http: bool,
    /// Extra CA (PEM) for the depot's HTTPS; empty = none.
    pub ca: PathBuf,
    /// Connect and stall timeout.
    pub timeout_secs: u64,
    /// Retries per VIB after the first attempt.
    pub retries: u32,
    /// Download rate limit for the whole agent, bytes per second; 0 = unlimited.
    pub max_bytes_per_sec: u64,
}

impl Default for DepotSection {
    fn default() -> Self {
        Self {
            allow_http: false,
            ca: PathBuf::new(),
            timeout_secs: 30,
            retries: 5,
            max_bytes_per_sec: 0,
        }
    }
}

/// Lowest `depot.max_bytes_per_sec` other than 0 (64 KiB/s).
const MIN_RATE: u64 = 64 << 10;

/// `[host]`
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HostSection {
    /// The host's DPUs; when not empty, dpu VIBs are staged too.
    pub dpus: Vec<String>,
    /// Hardware vendors whose firmware can be staged.
    pub firmware_staging_vendors: Vec<String>,
}

/// `[maintenance]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceSection {
    /// Command run to enter maintenance mode; empty = only the agent's own state.
    pub enter: Vec<String>,
    /// Command run to exit.
    pub exit: Vec<String>,
    /// Limit for each command.
    pub timeout_secs: u64,
}

impl Default for MaintenanceSection {
    fn default() -> Self {
        Self {
            enter: Vec::new(),
            exit: Vec::new(),
            timeout_secs: 600,
        }
    }
}

/// `[install]`
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct InstallSection {
    /// Installer command; empty = the built-in installer.
    pub command: Vec<String>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message: message.to_owned(),
        };
        if !self.agent.state_dir.is_absolute() {
            return Err(invalid("agent.state_dir", "must be an absolute path"));
        }
        if !self.scratch.path.is_absolute() {
            return Err(invalid("scratch.path", "must be an absolute path"));
        }
        if !self.scratch.volatile_path.as_os_str().is_empty()
            && !self.scratch.volatile_path.is_absolute()
        {
            return Err(invalid(
                "scratch.volatile_path",
                "must be an absolute path or \"\"",
            ));
        }
        if self.scratch.concurrency == 0 || self.scratch.concurrency > 64 {
            return Err(invalid("scratch.concurrency", "must be between 1 and 64"));
        }
        if !self.listen.tcp.is_empty() && self.listen.tcp.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "listen.tcp",
                "must be an address such as 0.0.0.0:9443 or [::]:9443, or \"\"",
            ));
        }
        if self.depot.max_bytes_per_sec != 0 && self.depot.max_bytes_per_sec < MIN_RATE {
            // Below this a download trips the stall detector's 1 KiB/s minimum between
            // `scratch.concurrency` downloads, and nothing useful gets staged anyway.
            return Err(invalid(
                "depot.max_bytes_per_sec",
                "must be 0 (unlimited) or at least 65536",
            ));
        }
        if self.depot.timeout_secs == 0 {
            return Err(invalid("depot.timeout_secs", "must be at least 1"));
        }
        if self.trust.threshold == 0 {
            return Err(invalid("trust.threshold", "must be at least 1"));
        }
        for entry in &self.trust.keys {
            if entry.role == RoleName::Image && entry.max_acceptance.is_some() {
                return Err(invalid(
                    "trust.keys.max_acceptance",
                    "only applies to keys with role = \"vib\"",
                ));
            }
        }
        for (key, cmd) in [
            ("maintenance.enter", &self.maintenance.enter),
            ("maintenance.exit", &self.maintenance.exit),
            ("install.command", &self.install.command),
        ] {
            if cmd.first().is_some_and(|c| c.is_empty()) {
                return Err(invalid(key, "the command name must not be empty"));
            }
        }
        Ok(())
    }

    /// The volatile path, if one is configured.
    pub fn volatile_path(&self) -> Option<&Path> {
        (!self.scratch.volatile_path.as_os_str().is_empty())
            .then_some(self.scratch.volatile_path.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_spec_defaults() {
        let c = Config::parse("", Path::new("a.toml")).expect("defaults");
        assert_eq!(c.scratch.reserve_bytes, 268_435_456);
        assert_eq!(c.scratch.concurrency, 4);
        assert_eq!(c.listen.tcp, "0.0.0.0:9443");
        assert_eq!(c.depot.retries, 5);
        assert_eq!(c.agent.acceptance_level, AcceptanceLevel::Partner);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[scratch]\nconcurency = 3\n", Path::new("/etc/a.toml"))
            .expect_err("typo");
        let msg = err.to_string();
        assert!(
            msg.contains("concurency") && msg.contains("/etc/a.toml"),
            "{msg}"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[scratch]\nconcurrency = 0", "scratch.concurrency"),
            ("[listen]\ntcp = \"nope\"", "listen.tcp"),
            ("[agent]\nstate_dir = \"rel\"", "agent.state_dir"),
            ("[agent]\nacceptance_level = \"gold\"", "acceptance"),
        ] {
            let msg = Config::parse(text, Path::new("x.toml"))
                .expect_err(text)
                .to_string();
            assert!(msg.contains(key), "{msg}");
        }
    }
}
