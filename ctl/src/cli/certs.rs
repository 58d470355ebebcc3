//! `vibstagectl certs init --dir DIR --host NAME... [--client-name N]`: development TLS material.
//!
//! Writes into DIR a CA (`ca.pem`, `ca.key`), a server certificate per host (`<name>.pem`,
//! `<name>.key`) and a controller client certificate (`client.pem`, `client.key`; CN and DNS SAN
//! `controller` unless `--client-name` says otherwise). DIR then serves both as the controller's
//! `--tls-dir` and as the source of each host's `tls.cert`, `tls.key` and `tls.client_ca`.
//!
//! Nothing is overwritten: running it again with more hosts reuses the CA on disk and only adds
//! what is missing, so adding a host to a fleet does not invalidate the others' certificates.
//! Private keys are 0600, certificates 0644. See [`crate::pki`] for the certificates' contents.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use time::OffsetDateTime;
use vibstage_protocol::HostId;

use super::{
    CliError, Context, Existing, emit, emit_json, ensure_dir, read_config_text, write_file,
};
use crate::pki::{self, DevCa, IssuedCert, Validity};

/// Arguments of `certs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// The `certs` subcommands.
#[derive(Debug, Subcommand)]
#[non_exhaustive]
pub enum CertsCommand {
    /// Create a development CA, a server certificate per host and a controller client certificate.
    Init(InitArgs),
}

/// Arguments of `certs init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Host name or IP address to make a server certificate for; repeatable.
    #[arg(long = "host", id = "host", value_name = "NAME", required = true, num_args = 1..)]
    pub hosts: Vec<String>,
    /// Name (CN and DNS SAN) of the controller client certificate.
    #[arg(long, value_name = "NAME", default_value = "controller")]
    pub client_name: String,
    /// Lifetime of the new certificates in days, counting the hour they are backdated by.
    #[arg(long, value_name = "DAYS", default_value_t = pki::DEFAULT_VALIDITY_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
}

/// File names in DIR that a host name may not take.
const RESERVED: [&str; 2] = ["ca", "client"];

/// One certificate/key pair of the result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairOutcome {
    /// Host, client or CA name.
    pub name: String,
    /// The certificate file.
    pub cert: PathBuf,
    /// The private key file.
    pub key: PathBuf,
    /// False when both files were already there and were kept.
    pub created: bool,
}

/// What `certs init` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitOutcome {
    /// The CA pair.
    pub ca: PairOutcome,
    /// One pair per host, in argument order.
    pub hosts: Vec<PairOutcome>,
    /// The controller client pair.
    pub client: PairOutcome,
}

/// Checks a host or client name: an IP address, or a hostname-like label that is safe as a file
/// name and as a DNS SAN.
fn check_name(flag: &str, name: &str) -> Result<(), CliError> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    name.parse::<HostId>()
        .map(drop)
        .map_err(|e| CliError::Usage(format!("{flag}: {e}")))
}

/// The files of one pair, and whether both exist already. Exactly one existing is an error: the
/// operator must decide which half is wrong.
fn pair_paths(dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf, bool), CliError> {
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    match (
        cert.symlink_metadata().is_ok(),
        key.symlink_metadata().is_ok(),
    ) {
        (true, true) => Ok((cert, key, true)),
        (false, false) => Ok((cert, key, false)),
        (true, false) | (false, true) => Err(CliError::Usage(format!(
            "only one of {} and {} exists; remove it or supply the other",
            cert.display(),
            key.display()
        ))),
    }
}

/// Writes a new pair, key first; never leaves a lone key behind.
fn write_pair(cert: &Path, key: &Path, issued: &IssuedCert) -> Result<(), CliError> {
    write_file(key, issued.key_pem.as_bytes(), 0o600, Existing::Refuse)?;
    if let Err(e) = write_file(cert, issued.cert_pem.as_bytes(), 0o644, Existing::Refuse) {
        let _ = fs::remove_file(key);
        return Err(e);
    }
    Ok(())
}

fn pki_failed(e: pki::PkiError) -> CliError {
    CliError::Failed {
        code: vibstage_protocol::ErrorCode::Internal,
        message: e.to_string(),
    }
}

/// Creates whatever of the CA, host and client pairs is missing in `dir`, new ones valid for
/// `validity`.
pub fn init(
    dir: &Path,
    hosts: &[String],
    client_name: &str,
    validity: Validity,
) -> Result<InitOutcome, CliError> {
    check_name("--client-name", client_name)?;
    let mut unique: Vec<&str> = Vec::new();
    for host in hosts {
        check_name("--host", host)?;
        if RESERVED.contains(&host.as_str()) {
            return Err(CliError::Usage(format!(
                "--host {host}: the name is reserved for {host}.pem in the certificate directory"
            )));
        }
        if !unique.contains(&host.as_str()) {
            unique.push(host);
        }
    }
    ensure_dir(dir, 0o755)?;

    let (ca_cert, ca_key, ca_exists) = pair_paths(dir, "ca")?;
    let ca = if ca_exists {
        let cert_pem = read_config_text("CA certificate", &ca_cert)?;
        let key_pem = read_config_text("CA key", &ca_key)?;
        DevCa::from_pem(&cert_pem, &key_pem).map_err(|e| CliError::config("CA", &ca_cert, e))?
    } else {
        let ca = DevCa::generate(validity).map_err(pki_failed)?;
        let issued = IssuedCert {
            cert_pem: ca.cert_pem().to_owned(),
            key_pem: ca.key_pem(),
        };
        write_pair(&ca_cert, &ca_key, &issued)?;
        ca
    };
    let ca_outcome = PairOutcome {
        name: ca.name().to_owned(),
        cert: ca_cert,
        key: ca_key,
        created: !ca_exists,
    };

    let mut host_outcomes = Vec::new();
    for host in unique {
        let (cert, key, exists) = pair_paths(dir, host)?;
        if !exists {
            let issued = pki::issue_server(&ca, host, validity.not_before, validity.not_after)
                .map_err(pki_failed)?;
            write_pair(&cert, &key, &issued)?;
        }
        host_outcomes.push(PairOutcome {
            name: host.to_owned(),
            cert,
            key,
            created: !exists,
        });
    }

    let (cert, key, exists) = pair_paths(dir, "client")?;
    if !exists {
        let issued = pki::issue_client(&ca, client_name, validity.not_before, validity.not_after)
            .map_err(pki_failed)?;
        write_pair(&cert, &key, &issued)?;
    }
    // A kept client certificate keeps its own name, whatever --client-name says now.
    let name = if exists {
        fs::read_to_string(&cert)
            .ok()
            .and_then(|pem| pki::common_name(&pem))
            .unwrap_or_else(|| client_name.to_owned())
    } else {
        client_name.to_owned()
    };
    let client = PairOutcome {
        name,
        cert,
        key,
        created: !exists,
    };
    Ok(InitOutcome {
        ca: ca_outcome,
        hosts: host_outcomes,
        client,
    })
}

/// Runs `certs`.
pub fn run(args: Args, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    match args.command {
        CertsCommand::Init(init_args) => {
            let outcome = init(
                &init_args.dir,
                &init_args.hosts,
                &init_args.client_name,
                Validity::lasting(OffsetDateTime::now_utc(), init_args.days),
            )?;
            if ctx.json {
                let value = serde_json::to_value(&outcome)
                    .map_err(|e| CliError::io("write", "standard output", e.into()))?;
                return emit_json(out, &value);
            }
            let line = |what: &str, pair: &PairOutcome| {
                format!(
                    "{} {what} {} ({}, key {})",
                    if pair.created { "created" } else { "kept   " },
                    pair.name,
                    pair.cert.display(),
                    pair.key.display()
                )
            };
            emit(out, line("CA", &outcome.ca))?;
            for host in &outcome.hosts {
                emit(out, line("server", host))?;
            }
            if !outcome.client.created && outcome.client.name != init_args.client_name {
                eprintln!(
                    "warning: {} already exists (name {}) and was kept; remove it to get one for {}",
                    outcome.client.cert.display(),
                    outcome.client.name,
                    init_args.client_name
                );
            }
            emit(out, line("client", &outcome.client))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn init_writes_everything_then_only_adds_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Validity::standard(OffsetDateTime::now_utc());
        let first = init(dir.path(), &["esx1".into()], "controller", now).expect("init");
        assert!(first.ca.created && first.hosts[0].created && first.client.created);
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&first.ca.key), 0o600);
        assert_eq!(mode(&first.ca.cert), 0o644);
        assert_eq!(mode(&dir.path().join("esx1.key")), 0o600);
        let ca_before = fs::read(&first.ca.cert).expect("read");

        let second = init(
            dir.path(),
            &["esx1".into(), "10.0.0.2".into()],
            "controller",
            now,
        )
        .expect("again");
        assert!(!second.ca.created && !second.hosts[0].created && second.hosts[1].created);
        assert_eq!(second.ca.name, first.ca.name);
        assert_eq!(fs::read(&first.ca.cert).expect("read"), ca_before);
    }

    #[test]
    fn refuses_unsafe_and_reserved_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Validity::standard(OffsetDateTime::now_utc());
        for bad in ["../x", "a/b", "ca", "client", "-x", "esx1:9443"] {
            let e = init(dir.path(), &[bad.into()], "controller", now).expect_err(bad);
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
        }
        assert!(init(dir.path(), &["esx1".into()], "a b", now).is_err());
        assert!(init(dir.path(), &["::1".into()], "controller", now).is_ok());
    }
}
