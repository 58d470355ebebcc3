//! The signed documents' payloads: VIB descriptors and images (SPEC §1, §2).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::dsse::Envelope;
use crate::types::{AcceptanceLevel, Digest, Name};
use crate::version::Version;

/// What a VIB carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VibKind {
    /// Host software.
    Software,
    /// Hardware firmware; staged only from vendors the host names.
    Firmware,
}

/// Where a VIB is installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VibTarget {
    /// The host itself.
    Host,
    /// The host's DPUs (staged onto the host only when it has DPUs).
    Dpu,
}

wire_names!(VibKind { Software => "software", Firmware => "firmware" });
wire_names!(VibTarget { Host => "host", Dpu => "dpu" });

fn yes() -> bool {
    true
}

/// The signed description of one VIB's bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VibDescriptor {
    /// VIB name, unique within an image.
    pub name: Name,
    /// VIB version.
    pub version: Version,
    /// Vendor; for firmware, the hardware vendor `host.firmware_staging_vendors` names.
    pub vendor: String,
    /// The component this VIB belongs to.
    pub component: Name,
    /// That component's version.
    pub component_version: Version,
    /// Acceptance level claimed (and bounded by the signer's `max_acceptance`).
    pub acceptance: AcceptanceLevel,
    /// Software or firmware.
    pub kind: VibKind,
    /// Host or DPU.
    pub target: VibTarget,
    /// Digest of the VIB bytes; also their name in the depot and the store.
    pub sha256: Digest,
    /// Exact length of the VIB bytes.
    pub size: u64,
    /// Whether installing it needs maintenance mode.
    #[serde(default = "yes")]
    pub maintenance_mode: bool,
    /// Whether installing it needs a reboot.
    #[serde(default = "yes")]
    pub reboot_required: bool,
}

/// One component of an image, with its VIBs' signed descriptors inline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    /// Component name, unique within an image.
    pub name: Name,
    /// Component version.
    pub version: Version,
    /// The VIB descriptor envelopes, each signed by a `vib` key.
    pub vibs: Vec<Envelope>,
}

/// The desired software of a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// Image name; rollback protection is per name.
    pub name: Name,
    /// A number that only grows between releases of the same name.
    pub serial: u64,
    /// After this instant the agent refuses the image.
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    /// Base image version.
    pub base_image: Version,
    /// Components (firmware is a component of firmware VIBs).
    pub components: Vec<Component>,
}

/// Checks a free-text field of a document: non-empty, at most `max` bytes, no control characters.
pub(crate) fn check_text(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} is empty"));
    }
    if value.len() > max {
        return Err(format!("{field} is longer than {max} bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} contains control characters"));
    }
    Ok(())
}

impl VibDescriptor {
    /// Checks the free-text fields that the type system does not.
    pub fn validate(&self) -> Result<(), String> {
        check_text("vendor", &self.vendor, 128)?;
        check_text("version", self.version.as_str(), 64)?;
        check_text("component_version", self.component_version.as_str(), 64)
    }

    /// The depot path of the VIB's bytes, relative to the depot root.
    pub fn depot_path(&self) -> String {
        format!("vibs/{}", self.sha256)
    }
}
