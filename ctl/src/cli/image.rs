//! `vibstagectl image create` and `image verify`: the command line over [`crate::publish::image`].

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;
use time::{Duration, OffsetDateTime};
use vibstage_protocol::version::Version;
use vibstage_protocol::{AcceptanceLevel, Name};

use super::{CliError, Context, emit, emit_json, load_signing_key, load_verifying_key};
use crate::publish::image::*;
use crate::publish::import;

/// Arguments of `image`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: ImageCommand,
}

/// The `image` subcommands.
#[derive(Debug, Subcommand)]
#[non_exhaustive]
pub enum ImageCommand {
    /// Write a signed images/NAME.json from the depot's descriptors.
    Create(CreateArgs),
    /// Verify an image as an agent with these keys would.
    Verify(VerifyArgs),
}

/// Arguments of `image create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The depot directory; its descriptors/ are read and images/NAME.json is written.
    #[arg(long, value_name = "DIR")]
    pub depot: PathBuf,
    /// Private key (PKCS#8 PEM) that signs the image: an `image` key of the trust store.
    #[arg(long, value_name = "K")]
    pub key: PathBuf,
    /// Image name.
    #[arg(long, value_name = "N")]
    pub name: Name,
    /// Serial: must not go down between releases of the same name.
    #[arg(long, value_name = "S")]
    pub serial: u64,
    /// Expiry time, RFC 3339 [default: 30 days from now].
    #[arg(long, value_name = "T", value_parser = parse_rfc3339)]
    pub expires: Option<OffsetDateTime>,
    /// Base image version [default with --from-bundle: the bundle's base image].
    #[arg(long, value_name = "V", required_unless_present = "from_bundle")]
    pub base_image: Option<String>,
    /// A component and its version, C=V; repeatable (added to, or overriding, what
    /// --from-bundle gives).
    #[arg(
        long = "component",
        value_name = "C=V",
        required_unless_present = "from_bundle"
    )]
    pub components: Vec<ComponentRef>,
    /// Take the base image and components from an offline bundle's metadata (its base image
    /// and add-ons; without a base image, its bulletins' components). Import it first with
    /// `depot import`.
    #[arg(long, value_name = "BUNDLE.zip")]
    pub from_bundle: Option<PathBuf>,
    /// With --from-bundle: only this add-on of the bundle (repeatable) [default: all].
    #[arg(long = "addon", value_name = "NAME", requires = "from_bundle")]
    pub addons: Vec<String>,
    /// Public key (SPKI PEM) that must have signed every descriptor the image carries;
    /// repeatable. Without it the descriptors are not verified (a warning says so).
    #[arg(long = "vib-key", value_name = "PUB")]
    pub vib_keys: Vec<PathBuf>,
}

/// Arguments of `image verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Public key (SPKI PEM) trusted to sign images; repeatable.
    #[arg(long = "image-key", value_name = "PUB", required = true)]
    pub image_keys: Vec<PathBuf>,
    /// Public key (SPKI PEM) trusted to sign VIB descriptors up to certified; repeatable.
    #[arg(long = "vib-key", value_name = "PUB", required = true)]
    pub vib_keys: Vec<PathBuf>,
    /// The host acceptance level to check against.
    #[arg(long, value_name = "L", default_value = "partner")]
    pub acceptance: AcceptanceLevel,
    /// The image file (a DSSE envelope).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

fn print_verified(v: &Verified, out: &mut dyn Write) -> Result<(), CliError> {
    let image = &v.image.image;
    emit(
        out,
        format_args!("verified image {} serial {}", image.name, image.serial),
    )?;
    emit(out, format_args!("  digest:     {}", v.image.digest))?;
    emit(
        out,
        format_args!("  expires:    {}", rfc3339(image.expires)),
    )?;
    emit(out, format_args!("  base image: {}", image.base_image))?;
    emit(
        out,
        format_args!("  acceptance: {} or higher", v.acceptance),
    )?;
    emit(out, format_args!("  signed by:  {}", join_ids(&v.signers)))?;
    for c in &image.components {
        emit(out, format_args!("  component {} {}", c.name, c.version))?;
        for vib in v
            .image
            .vibs
            .iter()
            .filter(|vib| vib.descriptor.component == c.name)
        {
            let d = &vib.descriptor;
            emit(
                out,
                format_args!(
                    "    {} {} {} {} {} {} sha256:{} vendor {} signed by {}",
                    d.name,
                    d.version,
                    d.kind.as_str(),
                    d.target.as_str(),
                    d.acceptance,
                    d.size,
                    d.sha256,
                    d.vendor,
                    join_ids(&vib.signers)
                ),
            )?;
        }
    }
    Ok(())
}

/// Runs `image`.
pub fn run(args: Args, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    match args.command {
        ImageCommand::Create(a) => {
            let key = load_signing_key(&a.key)?;
            let now = OffsetDateTime::now_utc();
            let default_expiry = (now + Duration::days(DEFAULT_LIFETIME_DAYS))
                .replace_nanosecond(0)
                .unwrap_or(now + Duration::days(DEFAULT_LIFETIME_DAYS));
            let (mut base_image, mut components) = (a.base_image, Vec::new());
            if let Some(bundle) = &a.from_bundle {
                let (base, parts) = import::image_parts(bundle, &a.addons)?;
                base_image = base_image.or(base);
                for (name, version) in parts {
                    components.push(
                        format!("{name}={version}")
                            .parse::<ComponentRef>()
                            .map_err(|e| CliError::Usage(format!("{}: {e}", bundle.display())))?,
                    );
                }
            }
            for c in a.components {
                match components.iter_mut().find(|o| o.name == c.name) {
                    Some(o) => *o = c,
                    None => components.push(c),
                }
            }
            let base_image = base_image.ok_or_else(|| {
                CliError::Usage(
                    "the bundle carries no base image; give its version with --base-image".into(),
                )
            })?;
            let spec = ImageSpec {
                name: a.name,
                serial: a.serial,
                expires: a.expires.unwrap_or(default_expiry),
                base_image: Version(base_image),
                components,
            };
            let vib_keys = a
                .vib_keys
                .iter()
                .map(|p| load_verifying_key(p))
                .collect::<Result<Vec<_>, _>>()?;
            let created = create(&a.depot, &key, &spec, &vib_keys, now, &mut |w| {
                eprintln!("warning: {w}")
            })?;
            if ctx.json {
                return emit_json(
                    out,
                    &serde_json::json!({
                        "image": created.path,
                        "name": created.image.name,
                        "serial": created.image.serial,
                        "expires": rfc3339(created.image.expires),
                        "digest": created.digest,
                    }),
                );
            }
            emit(out, created.digest)
        }
        ImageCommand::Verify(a) => {
            let image_keys = a
                .image_keys
                .iter()
                .map(|p| load_verifying_key(p))
                .collect::<Result<Vec<_>, _>>()?;
            let vib_keys = a
                .vib_keys
                .iter()
                .map(|p| load_verifying_key(p))
                .collect::<Result<Vec<_>, _>>()?;
            let labels: Vec<String> = a
                .image_keys
                .iter()
                .map(|p| format!("{} (given as --image-key)", p.display()))
                .chain(
                    a.vib_keys
                        .iter()
                        .map(|p| format!("{} (given as --vib-key)", p.display())),
                )
                .collect();
            let verified = verify_labelled(
                &a.file,
                &image_keys,
                &vib_keys,
                &labels,
                a.acceptance,
                OffsetDateTime::now_utc(),
            )?;
            if ctx.json {
                emit_json(out, &verified_json(&verified))
            } else {
                print_verified(&verified, out)
            }
        }
    }
}
