//! The signed content of the demo: an offline bundle of real-format VIBs imported into a depot
//! (host software, DPU software, firmware of the vendor the demo host lists), and the image
//! that names them.

use std::fs;
use std::path::Path;

use indicatif::HumanBytes;
use time::OffsetDateTime;
use vibstage_protocol::version::Version;
use vibstage_protocol::{AcceptanceLevel, Envelope};

use super::{BIOS, Demo, ESXI, Failure, IMAGE, at, cli_failure, name};
use crate::cli::CliError;
use crate::publish::image::{ComponentRef, CreatedImage, ImageSpec};

/// The tests' builder of real-format VIBs and offline bundles (`tests/src/vibs.rs`), compiled
/// in so the demo shows the real thing: `ar` archives with `descriptor.xml` and gzipped payloads,
/// in a zip with `index.xml`, `vendor-index.xml` and `metadata.zip`.
#[path = "../../../../tests/src/vibs.rs"]
#[allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]
mod builder;

impl Demo<'_> {
    /// Builds an offline bundle of real-format VIBs and imports it into the depot with
    /// `depot import`; returns the story line.
    pub(super) fn make_depot(&self, depot: &Path, vendor_key: &Path) -> Result<String, Failure> {
        let step = "depot";
        let key = crate::cli::load_signing_key(vendor_key).map_err(cli_failure(step))?;
        let source = self.path(&["vib-files"]);
        crate::cli::ensure_dir(&source, 0o755).map_err(cli_failure(step))?;
        let vib = |vendor: &str, name: &str, version: &str, size: usize| {
            builder::VibBuild::new(vendor, name, version, size)
        };
        let mut esxio = vib("acme", "esxio-base", ESXI.1, 768 << 10);
        esxio.platforms = vec!["esxio".into()];
        let mut bios = vib(BIOS.2, "bios", BIOS.1, 256 << 10);
        bios.tags = vec!["firmware".into()];
        let bundle = builder::BundleBuild {
            vendor: "acme".into(),
            components: vec![
                builder::ComponentBuild {
                    name: ESXI.0.into(),
                    version: ESXI.1.into(),
                    vibs: vec![
                        vib("acme", "esx-base", ESXI.1, 2 << 20),
                        vib("acme", "esx-ui", ESXI.1, 512 << 10),
                        esxio,
                    ],
                },
                builder::ComponentBuild {
                    name: BIOS.0.into(),
                    version: BIOS.1.into(),
                    vibs: vec![bios],
                },
            ],
            base_image: Some(builder::ReleaseBuild {
                name: ESXI.0.into(),
                version: ESXI.1.into(),
                vendor: "acme".into(),
                components: vec![(ESXI.0.into(), ESXI.1.into())],
            }),
            addons: vec![builder::ReleaseBuild {
                name: format!("{}-addon", BIOS.2),
                version: BIOS.1.into(),
                vendor: BIOS.2.into(),
                components: vec![(BIOS.0.into(), BIOS.1.into())],
            }],
        };
        let path = source.join("acme-offline-bundle.zip");
        let bytes = bundle.build();
        fs::write(&path, &bytes)
            .map_err(|e| CliError::io("write", &path, e))
            .map_err(cli_failure(step))?;
        let imported = crate::publish::import::import(
            depot,
            &key,
            AcceptanceLevel::Partner,
            std::slice::from_ref(&path),
        )
        .map_err(cli_failure(step))?;
        let total: u64 = imported.iter().map(|v| v.descriptor.size).sum();
        Ok(format!(
            "an offline bundle {} ({}) of {} real-format VIBs imported into depot/ with \
             `depot import`, every payload checked, descriptors signed by the vendor key: \
             esx-base, esx-ui ({ESXI0}), esxio-base ({ESXI0} for DPUs), bios ({BIOS0} firmware by {BIOS2})",
            self.rel(&path),
            HumanBytes(total),
            imported.len(),
            ESXI0 = ESXI.0,
            BIOS0 = BIOS.0,
            BIOS2 = BIOS.2,
        ))
    }

    /// Signs the image of the demo into the depot with the image key, after checking every
    /// descriptor against the vendor key; tells the step.
    pub(super) fn make_image(
        &mut self,
        depot_dir: &Path,
        image_key: &Path,
        vendor_key: &Path,
    ) -> Result<(CreatedImage, Envelope), Failure> {
        let image_signer = crate::cli::load_signing_key(image_key).map_err(cli_failure("image"))?;
        let vib_key = crate::cli::load_signing_key(vendor_key)
            .map_err(cli_failure("image"))?
            .verifying_key();
        let spec = ImageSpec {
            name: name("image", IMAGE)?,
            serial: 1,
            expires: OffsetDateTime::now_utc() + time::Duration::days(30),
            base_image: Version(ESXI.1.to_owned()),
            components: vec![
                ComponentRef {
                    name: name("image", ESXI.0)?,
                    version: Version(ESXI.1.to_owned()),
                },
                ComponentRef {
                    name: name("image", BIOS.0)?,
                    version: Version(BIOS.1.to_owned()),
                },
            ],
        };
        let created = crate::publish::image::create(
            depot_dir,
            &image_signer,
            &spec,
            &[vib_key],
            OffsetDateTime::now_utc(),
            &mut |w| eprintln!("warning: {w}"),
        )
        .map_err(cli_failure("image"))?;
        let envelope: Envelope = fs::read(&created.path)
            .map_err(at("image"))
            .and_then(|b| serde_json::from_slice(&b).map_err(at("image")))?;
        self.tell(
            "image",
            format_args!(
                "{IMAGE} serial 1 ({}…) = {ESXI0} {ESXI1} + {BIOS0} {BIOS1}, signed by the image \
                     key in {}",
                created
                    .digest
                    .to_string()
                    .chars()
                    .take(19)
                    .collect::<String>(),
                self.rel(&created.path),
                ESXI0 = ESXI.0,
                ESXI1 = ESXI.1,
                BIOS0 = BIOS.0,
                BIOS1 = BIOS.1,
            ),
        )?;
        Ok((created, envelope))
    }
}
