//! `agent.toml` (SPEC §4): every key with its default, parsed strictly so that a typo is an error
//! that names the key and the file rather than a silently ignored setting.
//!
//! The schema lives here, with the protocol, because both sides use it: the agent reads it (its
//! `config::load` is the only I/O), the fuzz crate parses it, and whoever starts an agent (the
//! demo, the end-to-end tests, the bench) builds one with [`Config::local`] and writes
//! [`Config::to_toml`] instead of formatting TOML by hand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::{AcceptanceLevel, HostId};
use serde::{Deserialize, Serialize};

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
        /// The underlying error: what the OS or library said, kept as `source()`.
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
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
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
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RoleName {
    /// May sign images.
    Image,
    /// May sign VIB descriptors.
    Vib,
}

/// `[[trust.keys]]`
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HostSection {
    /// The host's DPUs; when not empty, dpu VIBs are staged too.
    pub dpus: Vec<String>,
    /// Hardware vendors whose firmware can be staged.
    pub firmware_staging_vendors: Vec<String>,
}

/// `[maintenance]`
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct InstallSection {
    /// Installer command; empty = the built-in installer.
    pub command: Vec<String>,
}

impl Config {
    /// The dotted keys that differ between the running configuration (`self`) and `new` and that
    /// SIGHUP does not apply (everything but the trust store, `[depot]`, the allow-lists and,
    /// while the mTLS listener runs, the TLS files): they need a restart.
    pub fn restart_needed(&self, new: &Config, tls_listening: bool) -> Vec<&'static str> {
        fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
            format!("{a:?}") != format!("{b:?}")
        }
        let mut keys = Vec::new();
        let mut check = |key: &'static str, changed: bool| {
            if changed {
                keys.push(key);
            }
        };
        let (a, b) = (self, new);
        check("agent.host_id", differs(&a.agent.host_id, &b.agent.host_id));
        check(
            "agent.acceptance_level",
            differs(&a.agent.acceptance_level, &b.agent.acceptance_level),
        );
        check("agent.state_dir", a.agent.state_dir != b.agent.state_dir);
        check("scratch.path", a.scratch.path != b.scratch.path);
        check(
            "scratch.volatile_path",
            a.scratch.volatile_path != b.scratch.volatile_path,
        );
        check(
            "scratch.reserve_bytes",
            a.scratch.reserve_bytes != b.scratch.reserve_bytes,
        );
        check(
            "scratch.concurrency",
            a.scratch.concurrency != b.scratch.concurrency,
        );
        check("listen.tcp", a.listen.tcp != b.listen.tcp);
        check("listen.socket", a.listen.socket != b.listen.socket);
        if !tls_listening {
            check("tls.cert", a.tls.cert != b.tls.cert);
            check("tls.key", a.tls.key != b.tls.key);
            check("tls.client_ca", a.tls.client_ca != b.tls.client_ca);
        }
        check("host.dpus", a.host.dpus != b.host.dpus);
        check(
            "host.firmware_staging_vendors",
            a.host.firmware_staging_vendors != b.host.firmware_staging_vendors,
        );
        check(
            "maintenance.enter",
            a.maintenance.enter != b.maintenance.enter,
        );
        check("maintenance.exit", a.maintenance.exit != b.maintenance.exit);
        check(
            "maintenance.timeout_secs",
            a.maintenance.timeout_secs != b.maintenance.timeout_secs,
        );
        check("install.command", a.install.command != b.install.command);
        keys
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
        if !self.scratch.volatile_path.as_os_str().is_empty()
            && (self.scratch.volatile_path.starts_with(&self.scratch.path)
                || self.scratch.path.starts_with(&self.scratch.volatile_path))
        {
            // Each is a store with its own lock: one inside the other locks itself out.
            return Err(invalid(
                "scratch.volatile_path",
                "must be outside scratch.path (and scratch.path outside it)",
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
        for (role, name) in [(RoleName::Image, "image"), (RoleName::Vib, "vib")] {
            let keys = self.trust.keys.iter().filter(|k| k.role == role).count();
            if keys > 0 && keys < self.trust.threshold {
                // Every document needs `threshold` distinct keys of its role: with fewer, no
                // image (or descriptor) could ever be accepted.
                return Err(invalid(
                    "trust.threshold",
                    &format!(
                        "is {} but only {keys} key(s) have role = \"{name}\": nothing could be accepted",
                        self.trust.threshold
                    ),
                ));
            }
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

    /// An agent whose every file lives under `home` (`state/`, `scratch/`, `volatile/`,
    /// `api.sock`) and which trusts `image_key` for images and `vib_key` for VIB descriptors up
    /// to `partner`: the one starting point of the demo, the end-to-end tests and the bench,
    /// which then set what they need (listener, TLS files, depot CA, limits).
    pub fn local(host_id: HostId, home: &Path, image_key: &Path, vib_key: &Path) -> Config {
        let mut config = Config::default();
        config.agent.host_id = Some(host_id);
        config.agent.state_dir = home.join("state");
        config.scratch.path = home.join("scratch");
        config.scratch.volatile_path = home.join("volatile");
        config.listen.socket = home.join("api.sock");
        config.trust.keys = vec![
            TrustKeyEntry {
                file: image_key.to_owned(),
                role: RoleName::Image,
                max_acceptance: None,
            },
            TrustKeyEntry {
                file: vib_key.to_owned(),
                role: RoleName::Vib,
                max_acceptance: Some(AcceptanceLevel::Partner),
            },
        ];
        config
    }

    /// The configuration as `agent.toml` text, every key written out (so a reader of a generated
    /// file sees every setting in force). Fails only on a path that is not UTF-8.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
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

    /// Every dotted key `Config` accepts, from a default configuration with one trust key and a
    /// host id (so that lists of tables and optional keys show their fields).
    fn every_key() -> Vec<String> {
        fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        if prefix.contains('.') || !v.is_object() {
                            out.push(key.clone());
                        }
                        walk(&key, v, out);
                    }
                }
                serde_json::Value::Array(items) => {
                    for item in items.iter().filter(|i| i.is_object()) {
                        walk(prefix, item, out);
                    }
                }
                _ => {}
            }
        }
        let mut config = Config::default();
        config.agent.host_id = Some("esx-01".parse().expect("host id"));
        config.trust.keys.push(TrustKeyEntry {
            file: "/k.pub".into(),
            role: RoleName::Vib,
            max_acceptance: Some(AcceptanceLevel::Partner),
        });
        let mut keys = Vec::new();
        walk("", &serde_json::to_value(&config).expect("json"), &mut keys);
        keys.sort();
        keys.dedup();
        keys
    }

    fn repo_file(path: &str) -> String {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
        std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
    }

    /// Issue 17, item 5: the project carries its own reference; a key added to `Config` without
    /// a line in docs/config.md fails here.
    #[test]
    fn every_key_is_documented_in_docs_config_md() {
        let doc = repo_file("docs/config.md");
        let keys = every_key();
        assert!(
            keys.contains(&"trust.keys.max_acceptance".to_owned()),
            "{keys:?}"
        );
        assert!(keys.contains(&"agent.host_id".to_owned()), "{keys:?}");
        for key in &keys {
            assert!(
                doc.contains(&format!("| `{key}` |")),
                "{key} has no row in docs/config.md"
            );
        }
        // And the reference documents nothing the agent would refuse.
        for line in doc.lines().filter(|l| l.starts_with("| `")) {
            let key = line.split('`').nth(1).unwrap_or_default();
            if !key.contains('.')
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
            {
                continue; // a path in FILES, not a key
            }
            assert!(
                keys.iter().any(|k| k == key),
                "docs/config.md documents {key}, which Config does not accept"
            );
        }
    }

    /// The shipped packaging/agent.toml is valid as it stands, and names every key: with its
    /// commented-out examples uncommented it is still valid and holds every key `Config` accepts.
    #[test]
    fn packaging_agent_toml_names_every_key() {
        let shipped = repo_file("packaging/agent.toml");
        Config::parse(&shipped, Path::new("packaging/agent.toml")).expect("valid as shipped");
        let uncommented: String = shipped
            .lines()
            .map(|l| {
                let body = l.strip_prefix("# ").unwrap_or(l);
                let assignment = body.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                });
                let header = body.starts_with('[') && body.ends_with(']');
                if l.starts_with("# ") && (assignment || header) {
                    body.to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let full =
            Config::parse(&uncommented, Path::new("uncommented")).expect("valid uncommented");
        assert!(full.agent.host_id.is_some());
        let value: toml::Value = toml::from_str(&uncommented).expect("toml");
        let mut present = Vec::new();
        let json = serde_json::to_value(&value).expect("json");
        fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        out.push(key.clone());
                        walk(&key, v, out);
                    }
                }
                serde_json::Value::Array(items) => {
                    for item in items {
                        walk(prefix, item, out);
                    }
                }
                _ => {}
            }
        }
        walk("", &json, &mut present);
        for key in every_key() {
            assert!(
                present.contains(&key),
                "packaging/agent.toml does not name {key}"
            );
        }
    }

    /// The one writer of agent.toml (demo, end-to-end tests, bench): what it writes parses back
    /// to the same configuration.
    #[test]
    fn a_local_agent_round_trips_through_to_toml() {
        let home = Path::new("/tmp/we\"ird\\home");
        let mut config = Config::local(
            "esx-01".parse().expect("host id"),
            home,
            &home.join("image.pub"),
            &home.join("vendor.pub"),
        );
        config.listen.tcp = "127.0.0.1:9443".into();
        config.host.dpus = vec!["dpu0".into()];
        let text = config.to_toml().expect("toml");
        let back = Config::parse(&text, Path::new("agent.toml")).expect("parses");
        assert_eq!(format!("{back:?}"), format!("{config:?}"));
    }

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
