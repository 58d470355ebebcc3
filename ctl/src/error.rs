//! Why `vibstagectl` or a publishing step failed, and the exit code each failure maps to (SPEC §3):
//! the one mapping to exit codes, at the edge of the controller.

use std::io;
use std::path::PathBuf;

use vibstage_protocol::ErrorCode;

/// Why `vibstagectl` failed. Each variant maps to one exit code in [`CliError::exit_code`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The command line asks for something impossible (exit 2).
    #[error("{0}")]
    Usage(String),
    /// An input the operator named (key, certificate, directory) cannot be used (exit 2).
    #[error("failed to read {what} {}: {detail}", path.display())]
    Config {
        /// What the file is, for the message ("key", "CA certificate", …).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        detail: String,
    },
    /// The operator interrupted the command with Ctrl-C (exit 130, as shells report SIGINT).
    #[error("interrupted")]
    Interrupted,
    /// The operation was attempted and refused or failed, with a SPEC error code (exit 1).
    #[error("{code}: {message}")]
    Failed {
        /// The SPEC §5 error code.
        code: ErrorCode,
        /// What failed, naming the document or file.
        message: String,
    },
    /// The operation ran and failed (or timed out) on some hosts; each host's line said why
    /// (exit 1).
    #[error("{0}")]
    OnHosts(String),
    /// Reading or writing a file failed while doing the work (exit 1).
    #[error("failed to {action} {}: {}", path.display(), io_message(source))]
    Io {
        /// What was being done ("write", "create directory", …).
        action: &'static str,
        /// On which file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A host could not be reached or refused us (exit 3).
    #[error("{target}: {message}")]
    Unreachable {
        /// The host or socket.
        target: String,
        /// What happened.
        message: String,
    },
}

impl CliError {
    /// The process exit code for this error (SPEC §3).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Config { .. } => 2,
            CliError::Failed { .. } | CliError::Io { .. } | CliError::OnHosts(_) => 1,
            CliError::Unreachable { .. } => 3,
            CliError::Interrupted => 130,
        }
    }

    /// An [`CliError::Io`] on `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        CliError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// A [`CliError::Config`] on `path`.
    pub fn config(what: &'static str, path: impl Into<PathBuf>, detail: impl ToString) -> Self {
        CliError::Config {
            what,
            path: path.into(),
            detail: detail.to_string(),
        }
    }
}

/// An I/O error's message without Rust's " (os error N)" suffix, for operator-facing text.
pub fn io_message(e: &io::Error) -> String {
    vibstage_protocol::error::without_os_error(e.to_string())
}
