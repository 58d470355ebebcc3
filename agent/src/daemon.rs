//! `vibstaged`: loads the configuration, recovers the stores, serves the API on both listeners,
//! and handles signals (SIGTERM/SIGINT stop, SIGHUP reloads) and systemd notification.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use vibstage_protocol::dsse::verifying_key_from_pem;
use vibstage_protocol::{AcceptanceLevel, KeyRole, TrustStore, TrustedKey};

use crate::agent::{Agent, Parts};
use crate::api::{self, Access, ApiState};
use crate::config::{self, Config, ConfigError, RoleName};
use crate::fetch::{FetchConfig, Fetcher};
use crate::fsutil;
use crate::metrics::Metrics;
use crate::server::{self, Listener, TlsConfig};
use crate::stage::Stager;
use crate::state::StateFile;
use crate::store::Store;
use crate::store::Stores;
use crate::tasks::Tasks;

/// Partial downloads untouched for this long are removed at start.
const MAX_PARTIAL_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration (or a file it names) is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Anything else, with context.
    #[error("{0}")]
    Runtime(String),
}

impl DaemonError {
    fn runtime(context: &str, e: impl std::fmt::Display) -> Self {
        DaemonError::Runtime(format!("{context}: {e}"))
    }
}

/// Loads the trust store the configuration names.
pub fn load_trust(config: &Config, path: &Path) -> Result<TrustStore, ConfigError> {
    let mut keys = Vec::new();
    for entry in &config.trust.keys {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: "trust.keys.file",
            message,
        };
        let pem = fsutil::read_config_text(&entry.file, 64 << 10)
            .map_err(|e| invalid(format!("{}: {e}", entry.file.display())))?;
        let key = verifying_key_from_pem(&pem)
            .map_err(|e| invalid(format!("{}: {e}", entry.file.display())))?;
        let role = match entry.role {
            RoleName::Image => KeyRole::Image,
            RoleName::Vib => KeyRole::Vib {
                max_acceptance: entry.max_acceptance.unwrap_or(AcceptanceLevel::Partner),
            },
        };
        keys.push(TrustedKey::new(key, role).with_label(entry.file.display().to_string()));
    }
    Ok(TrustStore::new(keys).with_threshold(config.trust.threshold))
}

fn tls_config(config: &Config, path: &Path) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    crate::tls::server_config(&config.tls.cert, &config.tls.key, &config.tls.client_ca).map_err(
        |e| ConfigError::Invalid {
            path: path.to_owned(),
            key: "tls",
            message: e.to_string(),
        },
    )
}

/// Validates a configuration the way start-up would, without starting (`--check-config`).
pub fn check_config(path: &Path) -> Result<Config, ConfigError> {
    let config = config::load(path)?;
    load_trust(&config, path)?;
    if !config.listen.tcp.is_empty() {
        tls_config(&config, path)?;
    }
    if !config.depot.ca.as_os_str().is_empty() {
        fsutil::read_config_file(&config.depot.ca, fsutil::MAX_CONFIG_FILE).map_err(|e| {
            ConfigError::Invalid {
                path: path.to_owned(),
                key: "depot.ca",
                message: format!("{}: {e}", config.depot.ca.display()),
            }
        })?;
    }
    Ok(config)
}

fn host_id(config: &Config) -> String {
    config
        .agent
        .host_id
        .as_ref()
        .map(|h| h.to_string())
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "localhost".into())
}

fn open_store(key: &str, path: &Path, scrub: bool) -> Result<Store, DaemonError> {
    let (store, fixed) = Store::open(path).map_err(|e| match e {
        // The usual cause is a second agent on this machine left at the defaults: say which
        // key to change (issue 17, item 7).
        crate::store::StoreError::Locked { .. } => DaemonError::Runtime(format!(
            "cannot open the staging store: {e}; {key} is in use by another agent: give this \
             agent its own {key}{}",
            if key == "scratch.volatile_path" {
                " (or \"\" for none)"
            } else {
                ""
            }
        )),
        e => DaemonError::runtime("cannot open the staging store", e),
    })?;
    for f in fixed {
        tracing::warn!(fix = %f, "tightened permissions");
    }
    let rec = store
        .recover(scrub, MAX_PARTIAL_AGE)
        .map_err(|e| DaemonError::runtime("cannot recover the staging store", e))?;
    tracing::info!(
        store = %path.display(),
        partials = rec.partials_kept,
        strays = rec.strays_removed.len(),
        removed = rec.blobs_removed.len(),
        quarantined = rec.records_quarantined.len(),
        "store recovered"
    );
    for f in rec.fixed {
        tracing::warn!(fix = %f, "tightened permissions");
    }
    for digest in &rec.blobs_removed {
        tracing::warn!(blob = %digest, store = %path.display(), "removed a blob whose bytes were wrong");
    }
    Ok(store)
}

fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| DaemonError::runtime(&format!("cannot create {}", parent.display()), e))?;
        // Nobody else may swap the socket for something else between bind and use, nor put
        // something in its place before start: its own directory may not be writable by
        // others even with the sticky bit (the parents above it may, like /tmp).
        fsutil::check_ancestors(parent)
            .map_err(|e| DaemonError::runtime("cannot use listen.socket", e))?;
        use std::os::unix::fs::MetadataExt as _;
        if let Ok(meta) = std::fs::metadata(parent)
            && meta.mode() & 0o022 != 0
        {
            return Err(DaemonError::Runtime(format!(
                "cannot use listen.socket: its directory {} is writable by group or others (mode {:o}); make it 0755 or stricter",
                parent.display(),
                meta.mode() & 0o7777
            )));
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        } else {
            return Err(DaemonError::Runtime(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )));
        }
    }
    // Bind with a restrictive umask so the socket is never reachable by others, even briefly.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener
        .map_err(|e| DaemonError::runtime(&format!("cannot listen on {}", path.display()), e))?;
    // The umask made it 0600; check rather than chmod, which would follow a symlink.
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() && m.mode() & 0o177 == 0 => Ok(listener),
        Ok(m) => Err(DaemonError::Runtime(format!(
            "{} is not the agent's private socket after bind (mode {:o})",
            path.display(),
            m.mode() & 0o7777
        ))),
        Err(e) => Err(DaemonError::runtime(
            &format!("cannot stat {}", path.display()),
            e,
        )),
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config_path: PathBuf, scrub: bool) -> Result<(), DaemonError> {
    let config = check_config(&config_path)?;
    let mut fixed = Vec::new();
    fsutil::ensure_private_dir(&config.agent.state_dir, &mut fixed)
        .map_err(|e| DaemonError::runtime("cannot prepare agent.state_dir", e))?;
    let persistent = open_store("scratch.path", &config.scratch.path, scrub)?;
    let volatile = config
        .volatile_path()
        .map(|p| open_store("scratch.volatile_path", p, scrub))
        .transpose()?;
    let stores = Arc::new(Stores {
        persistent,
        volatile,
        reserve_bytes: config.scratch.reserve_bytes,
    });
    let metrics = Metrics::default();
    let fetcher = build_fetcher(&config, &metrics)?;
    let stager = Stager::new(stores, fetcher, config.scratch.concurrency);
    let state_file = StateFile::new(&config.agent.state_dir);
    let (mut state, warning) = state_file
        .load()
        .map_err(|e| DaemonError::runtime("cannot load agent state", e))?;
    if let Some(w) = warning {
        tracing::error!("{w}");
    }
    // The built-in installer's bank is the truth about what is installed.
    match crate::install::read_current_bank(&config.agent.state_dir) {
        Ok(Some(bank)) if state.installed.as_ref() != Some(&bank) => {
            tracing::warn!(image = %bank.image.digest, "installed image taken from bootbank/current");
            state.installed = Some(bank);
            state_file
                .save(&state)
                .map_err(|e| DaemonError::runtime("cannot save agent state", e))?;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot read bootbank/current; keeping the recorded installed image")
        }
    }
    // Rollback protection is rebuilt from disk too: whatever is staged or installed was accepted.
    let mut accepted: Vec<vibstage_protocol::api::ImageRef> = Vec::new();
    for (store, _) in stager.stores().all() {
        let records = store
            .records(&mut Vec::new())
            .map_err(|e| DaemonError::runtime("cannot read staged image records", e))?;
        accepted.extend(records.into_iter().map(|r| r.image));
    }
    accepted.extend(state.installed.as_ref().map(|i| i.image.clone()));
    if state.remember_serials(&accepted) {
        tracing::warn!("rollback serials raised to those of staged and installed images");
        state_file
            .save(&state)
            .map_err(|e| DaemonError::runtime("cannot save agent state", e))?;
    }
    // Staged content of the installed image is left over from a remediation killed between
    // its install and its clean-up: remove it, as that remediation would have.
    if let Some(installed) = &state.installed {
        let removed = stager
            .stores()
            .remove(&installed.image.digest)
            .map_err(|e| DaemonError::runtime("cannot remove staged content", e))?;
        if removed {
            tracing::info!(image = %installed.image.digest, "removed the installed image's staged content");
        }
    }
    let (tasks, interrupted, warning) = Tasks::load(&config.agent.state_dir)
        .map_err(|e| DaemonError::runtime("cannot load the task list", e))?;
    if let Some(w) = warning {
        tracing::error!("{w}");
    }
    let trust = load_trust(&config, &config_path)?;
    let access = Arc::new(RwLock::new(Access {
        operators: config.tls.operators.clone(),
        readers: config.tls.readers.clone(),
    }));
    let agent = Agent::new(Parts {
        host_id: host_id(&config),
        config: config.clone(),
        trust,
        stager,
        state,
        tasks,
        metrics,
        describe: api::detail_of,
    });
    let app = api::router(ApiState {
        agent: agent.clone(),
        access: access.clone(),
    });

    // Before any listener serves: a request arriving at start-up must see the resumed task as
    // running (and join it or get `busy`), never start a second lifecycle operation beside it.
    agent.resume_interrupted(interrupted);

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let mut tls: Option<TlsConfig> = None;
    if !config.listen.tcp.is_empty() {
        let cfg: TlsConfig = Arc::new(RwLock::new(tls_config(&config, &config_path)?));
        let listener = tokio::net::TcpListener::bind(&config.listen.tcp)
            .await
            .map_err(|e| {
                DaemonError::runtime(&format!("cannot listen on {}", config.listen.tcp), e)
            })?;
        tracing::info!(addr = %config.listen.tcp, "serving mTLS API");
        servers.spawn(server::serve(
            Listener::Tcp(listener, cfg.clone(), agent.metrics().handshakes.clone()),
            app.clone(),
            shutdown_rx.clone(),
        ));
        tls = Some(cfg);
    }
    if !config.listen.socket.as_os_str().is_empty() {
        let listener = bind_socket(&config.listen.socket)?;
        tracing::info!(socket = %config.listen.socket.display(), "serving local API");
        servers.spawn(server::serve(
            Listener::Unix(listener),
            app.clone(),
            shutdown_rx.clone(),
        ));
    }

    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| DaemonError::runtime("cannot install signal handlers", e))?;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
    tracing::info!(host = %agent.status().map(|s| s.host_id).unwrap_or_default(), "vibstaged ready");

    while let Some(signal) = signals.next().await {
        match signal {
            SIGHUP => reload(&config_path, &agent, &access, tls.as_ref()),
            _ => {
                tracing::info!(signal, "stopping");
                break;
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = shutdown_tx.send(true);
    agent.stop_jobs().await;
    let drain = async { while servers.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(7), drain)
        .await
        .is_err()
    {
        tracing::warn!("connections still open at shutdown; closing them");
    }
    if !config.listen.socket.as_os_str().is_empty() {
        let _ = std::fs::remove_file(&config.listen.socket);
    }
    tracing::info!("stopped");
    Ok(())
}

/// The depot client of `[depot]` (SPEC §4): at start, and again on SIGHUP.
fn build_fetcher(config: &Config, metrics: &Metrics) -> Result<Fetcher, DaemonError> {
    let ca_pem = if config.depot.ca.as_os_str().is_empty() {
        None
    } else {
        Some(
            fsutil::read_config_file(&config.depot.ca, fsutil::MAX_CONFIG_FILE).map_err(|e| {
                DaemonError::runtime(
                    &format!("cannot read depot.ca {}", config.depot.ca.display()),
                    e,
                )
            })?,
        )
    };
    Fetcher::new(
        FetchConfig {
            allow_http: config.depot.allow_http,
            ca_pem,
            timeout: Duration::from_secs(config.depot.timeout_secs),
            retries: config.depot.retries,
            max_bytes_per_sec: config.depot.max_bytes_per_sec,
        },
        metrics.fetch.clone(),
    )
    .map_err(|e| DaemonError::runtime("cannot build the depot client", e))
}

/// SIGHUP: re-reads the configuration and replaces the trust store, the TLS certificates, the
/// allow-lists and the depot client (`[depot]`, `depot.ca` re-read). Anything broken is reported
/// and the old setting kept; keys that changed but only take effect at start are named in a
/// warning, so the log never claims more than was applied (issue 17, item 6).
fn reload(path: &Path, agent: &Agent, access: &RwLock<Access>, tls: Option<&TlsConfig>) {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
            return;
        }
    };
    match load_trust(&config, path) {
        Ok(trust) => {
            agent.set_trust(trust);
            tracing::info!(keys = config.trust.keys.len(), "trust store reloaded");
        }
        Err(e) => tracing::error!(error = %e, "trust store not reloaded; keeping the old one"),
    }
    if let Some(tls) = tls {
        match tls_config(&config, path) {
            Ok(new) => {
                *tls.write().unwrap_or_else(|p| p.into_inner()) = new;
                tracing::info!("TLS certificates reloaded");
            }
            Err(e) => tracing::error!(error = %e, "TLS not reloaded; keeping the old certificates"),
        }
    }
    match build_fetcher(&config, agent.metrics()) {
        Ok(fetcher) => {
            agent.stager().set_fetcher(fetcher);
            tracing::info!(
                ca = %config.depot.ca.display(),
                "depot settings reloaded (depot.allow_http, depot.ca, depot.timeout_secs, depot.retries, depot.max_bytes_per_sec)"
            );
        }
        Err(e) => tracing::error!(error = %e, "depot settings not reloaded; keeping the old ones"),
    }
    let restart = agent.config().restart_needed(&config, tls.is_some());
    if !restart.is_empty() {
        tracing::warn!(
            keys = %restart.join(", "),
            "changed keys that only take effect after a restart (systemctl restart vibstaged): {}",
            restart.join(", ")
        );
    }
    *access.write().unwrap_or_else(|p| p.into_inner()) = Access {
        operators: config.tls.operators,
        readers: config.tls.readers,
    };
    tracing::info!("allow-lists reloaded");
}
