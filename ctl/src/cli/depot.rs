//! `vibstagectl depot add` and `depot import`: the command line over [`crate::publish::depot`]
//! and [`crate::publish::import`].

use std::io::Write;
use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use vibstage_protocol::version::Version;
use vibstage_protocol::{AcceptanceLevel, Name, VibKind, VibTarget};

use super::{CliError, Context, emit, emit_json, load_signing_key};
use crate::publish::depot::{VibSpec, add_with};
use crate::publish::import::{self, ImportedVib, Outcome};

/// Arguments of `depot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: DepotCommand,
}

/// The `depot` subcommands.
#[derive(Debug, Subcommand)]
#[non_exhaustive]
pub enum DepotCommand {
    /// Copy VIB files into the depot by digest and write their signed descriptors.
    Add(AddArgs),
    /// Import real ESXi content (.vib files, offline bundles) after checking every payload.
    Import(ImportArgs),
}

/// `--kind` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// Host software.
    Software,
    /// Hardware firmware.
    Firmware,
}

/// `--target` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    /// The host itself.
    Host,
    /// The host's DPUs.
    Dpu,
}

/// Arguments of `depot add`.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The depot directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub depot: PathBuf,
    /// Private key (PKCS#8 PEM) that signs the descriptors: a `vib` key of the trust store.
    #[arg(long, value_name = "K")]
    pub key: PathBuf,
    /// Component the VIBs belong to.
    #[arg(long, value_name = "C")]
    pub component: Name,
    /// That component's version.
    #[arg(long, value_name = "V")]
    pub component_version: String,
    /// Vendor (for firmware, the hardware vendor that hosts list in firmware_staging_vendors).
    #[arg(long, value_name = "X")]
    pub vendor: String,
    /// Acceptance level: certified, accepted, partner or community.
    #[arg(long, value_name = "L")]
    pub acceptance: AcceptanceLevel,
    /// Software or firmware.
    #[arg(long, value_enum, default_value = "software")]
    pub kind: KindArg,
    /// Installed on the host or on its DPUs.
    #[arg(long, value_enum, default_value = "host")]
    pub target: TargetArg,
    /// VIB name [default: the file name without its extension]; only with a single FILE.
    #[arg(long, value_name = "N")]
    pub name: Option<Name>,
    /// VIB version [default: the component version].
    #[arg(long, value_name = "V")]
    pub version: Option<String>,
    /// Installing these VIBs does not need maintenance mode.
    #[arg(long)]
    pub no_maintenance_mode: bool,
    /// Installing these VIBs does not need a reboot.
    #[arg(long)]
    pub no_reboot_required: bool,
    /// Rewrite the descriptor of a file already in the depot with other fields (images built
    /// from the old descriptor stop matching it).
    #[arg(long)]
    pub replace: bool,
    /// The VIB files.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
}

/// Runs `depot`.
pub fn run(args: Args, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    match args.command {
        DepotCommand::Import(a) => {
            let key = load_signing_key(&a.key)?;
            let imported = import::import(&a.depot, &key, a.max_acceptance, &a.files)?;
            report(&imported, ctx.json, out)
        }
        DepotCommand::Add(a) => {
            let key = load_signing_key(&a.key)?;
            let spec = VibSpec {
                component: a.component,
                component_version: Version(a.component_version),
                vendor: a.vendor,
                acceptance: a.acceptance,
                kind: match a.kind {
                    KindArg::Software => VibKind::Software,
                    KindArg::Firmware => VibKind::Firmware,
                },
                target: match a.target {
                    TargetArg::Host => VibTarget::Host,
                    TargetArg::Dpu => VibTarget::Dpu,
                },
                version: a.version.map(Version),
                maintenance_mode: !a.no_maintenance_mode,
                reboot_required: !a.no_reboot_required,
            };
            let added = add_with(&a.depot, &key, &spec, a.name.as_ref(), &a.files, a.replace)?;
            if ctx.json {
                let list: Vec<serde_json::Value> = added
                    .iter()
                    .map(|v| {
                        serde_json::json!({
                            "name": v.descriptor.name,
                            "sha256": v.descriptor.sha256,
                            "size": v.descriptor.size,
                            "blob": v.blob,
                            "descriptor": v.descriptor_path,
                            "already_present": v.already_present,
                        })
                    })
                    .collect();
                return emit_json(out, &serde_json::Value::Array(list));
            }
            for v in &added {
                emit(
                    out,
                    format_args!(
                        "{} {} {}",
                        v.descriptor.name, v.descriptor.sha256, v.descriptor.size
                    ),
                )?;
            }
            Ok(())
        }
    }
}

/// Arguments of `depot import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The depot directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub depot: PathBuf,
    /// Private key (PKCS#8 PEM) that signs the descriptors: a `vib` key of the trust store.
    #[arg(long, value_name = "K")]
    pub key: PathBuf,
    /// The highest acceptance level the agents trust this key for (its `max_acceptance`);
    /// VIBs declaring a higher level are refused.
    #[arg(long, value_name = "L", default_value = "partner")]
    pub max_acceptance: AcceptanceLevel,
    /// `.vib` files and offline bundles (`.zip`).
    #[arg(value_name = "FILE.vib|BUNDLE.zip", required = true)]
    pub files: Vec<PathBuf>,
}

/// Prints what [`import`] did, one line per VIB (or JSON).
pub fn report(imported: &[ImportedVib], json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    if json {
        let list: Vec<serde_json::Value> = imported
            .iter()
            .map(|v| {
                serde_json::json!({
                    "source": v.source,
                    "vib_id": v.vib_id,
                    "outcome": v.outcome.as_str(),
                    "descriptor": v.descriptor,
                })
            })
            .collect();
        return emit_json(out, &serde_json::Value::Array(list));
    }
    for v in imported {
        let d = &v.descriptor;
        emit(
            out,
            format_args!(
                "{:<18} {} {} ({}, component {} {}, {} {}, {}) sha256:{}",
                v.outcome.as_str(),
                d.name,
                d.version,
                d.vendor,
                d.component,
                d.component_version,
                d.kind.as_str(),
                d.target.as_str(),
                d.acceptance,
                d.sha256
            ),
        )?;
    }
    let new = imported
        .iter()
        .filter(|v| v.outcome != Outcome::AlreadyPresent)
        .count();
    emit(
        out,
        format_args!(
            "{} VIB(s): {new} written, {} already present",
            imported.len(),
            imported.len() - new
        ),
    )
}
