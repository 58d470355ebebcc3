//! The signed content of the demo: generated VIB files in a depot (host software, DPU
//! software, firmware of the vendor the demo host lists), and the image that names them.

use std::fs;
use std::path::Path;

use indicatif::HumanBytes;
use time::OffsetDateTime;
use vibstage_protocol::version::Version;
use vibstage_protocol::{AcceptanceLevel, Envelope, VibKind, VibTarget};

use super::{BIOS, Demo, ESXI, Failure, IMAGE, at, cli_failure, name};
use crate::cli::CliError;
use crate::cli::depot::VibSpec;
use crate::cli::image::{ComponentRef, CreatedImage, ImageSpec};

impl Demo<'_> {
    /// Generates the VIB files and adds them to the depot; returns the story line.
    pub(super) fn make_depot(&self, depot: &Path, vendor_key: &Path) -> Result<String, Failure> {
        let step = "depot";
        let key = crate::cli::load_signing_key(vendor_key).map_err(cli_failure(step))?;
        let source = self.path(&["vib-files"]);
        crate::cli::ensure_dir(&source, 0o755).map_err(cli_failure(step))?;
        let spec =
            |component: (&str, &str), vendor: &str, kind, target| -> Result<VibSpec, Failure> {
                Ok(VibSpec {
                    component: name(step, component.0)?,
                    component_version: Version(component.1.to_owned()),
                    vendor: vendor.to_owned(),
                    acceptance: AcceptanceLevel::Partner,
                    kind,
                    target,
                    version: None,
                    maintenance_mode: true,
                    reboot_required: true,
                })
            };
        let groups = [
            (
                spec(ESXI, "acme", VibKind::Software, VibTarget::Host)?,
                vec![("esx-base", 2 << 20), ("esx-ui", 512 << 10)],
            ),
            (
                spec(ESXI, "acme", VibKind::Software, VibTarget::Dpu)?,
                vec![("esxio-base", 768 << 10)],
            ),
            (
                spec((BIOS.0, BIOS.1), BIOS.2, VibKind::Firmware, VibTarget::Host)?,
                vec![("bios", 256 << 10)],
            ),
        ];
        let mut total = 0u64;
        let mut count = 0;
        for (spec, files) in &groups {
            let mut paths = Vec::new();
            for (vib, size) in files {
                let path = source.join(format!("{vib}.vib"));
                let mut bytes = vec![0u8; *size];
                getrandom::fill(&mut bytes).map_err(at(step))?;
                fs::write(&path, &bytes)
                    .map_err(|e| CliError::io("write", &path, e))
                    .map_err(cli_failure(step))?;
                total += *size as u64;
                count += 1;
                paths.push(path);
            }
            crate::cli::depot::add(depot, &key, spec, None, &paths).map_err(cli_failure(step))?;
        }
        Ok(format!(
            "{count} generated VIBs ({}) signed by the vendor key in depot/: esx-base, esx-ui \
             ({ESXI0}), esxio-base ({ESXI0} for DPUs), bios ({BIOS0} firmware by {BIOS2})",
            HumanBytes(total),
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
        let created = crate::cli::image::create(
            depot_dir,
            &image_signer,
            &spec,
            &[vib_key],
            OffsetDateTime::now_utc(),
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
