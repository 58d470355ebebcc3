//! `descriptor.xml`: what a VIB declares about itself (`<vib version="5.0">`).
//!
//! Read: `type`, `name`, `version`, `vendor`, `summary`, `release-date`, `relationships`
//! (depends, conflicts, replaces, provides), `system-requires` (`maintenance-mode`, software
//! and hardware platforms), `software-tags`, `acceptance-level`, `live-install-allowed`,
//! `live-remove-allowed` and `payloads`. Other elements (file list, URLs, …) are ignored.
//! The four identity fields and the acceptance level are required; so is at least one
//! `sha-256` checksum of each payload's stored bytes, so that every payload is bound.

use vibstage_protocol::AcceptanceLevel;

use super::VibError;
use super::xml::{self, Element};

/// A declared checksum of a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    /// `sha-256`, `sha-1` or `sha-512` (anything else is refused when checked).
    pub algorithm: String,
    /// `None` for the bytes as stored; `Some("gunzip")` for the decompressed bytes.
    pub verify_process: Option<String>,
    /// Lowercase hex.
    pub hex: String,
}

/// One `<payload>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// Member name in the ar archive.
    pub name: String,
    /// `tgz`, `vgz`, `boot`, …
    pub payload_type: String,
    /// Size of the member as stored.
    pub size: u64,
    /// Declared checksums.
    pub checksums: Vec<Checksum>,
}

/// The parts of `descriptor.xml` that vibstage uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VibXml {
    /// `bootbank`, `locker`, …
    pub vib_type: String,
    /// VIB name.
    pub name: String,
    /// VIB version.
    pub version: String,
    /// Vendor code.
    pub vendor: String,
    /// One-line summary.
    pub summary: String,
    /// Release date as written.
    pub release_date: String,
    /// Declared acceptance level.
    pub acceptance: AcceptanceLevel,
    /// Installing needs maintenance mode (`system-requires/maintenance-mode`, its `install`
    /// attribute when present); true when not declared.
    pub maintenance_mode: bool,
    /// Can be installed without a reboot.
    pub live_install_allowed: bool,
    /// Can be removed without a reboot.
    pub live_remove_allowed: bool,
    /// `software-tags/tag` values (`driver`, `firmware`, …).
    pub software_tags: Vec<String>,
    /// `productLineID`s of `system-requires/software-platform` (`embeddedEsx`, `esxio`, …).
    pub platforms: Vec<String>,
    /// `system-requires/hwplatform` as `vendor model`.
    pub hardware: Vec<String>,
    /// `depends` constraints as `name relation version`.
    pub depends: Vec<String>,
    /// `conflicts` constraints.
    pub conflicts: Vec<String>,
    /// `replaces` constraints.
    pub replaces: Vec<String>,
    /// `provides` entries.
    pub provides: Vec<String>,
    /// Declared payloads, in order.
    pub payloads: Vec<Payload>,
}

impl VibXml {
    /// The VIB ID bundles use: `vendor_type_name_version`.
    pub fn id(&self) -> String {
        format!(
            "{}_{}_{}_{}",
            self.vendor, self.vib_type, self.name, self.version
        )
    }

    /// The file name bundles store it under: `vendor_type_name_version.vib`.
    pub fn file_name(&self) -> String {
        format!("{}.vib", self.id())
    }

    /// Parses `descriptor.xml` bytes.
    pub fn parse(bytes: &[u8]) -> Result<VibXml, VibError> {
        let root = xml::parse(bytes).map_err(VibError::Descriptor)?;
        from_element(&root)
    }
}

/// Maps the acceptance levels VIBs declare (and the names esxcli shows) to SPEC's levels.
pub fn parse_acceptance(text: &str) -> Option<AcceptanceLevel> {
    match text.trim().to_ascii_lowercase().as_str() {
        "certified" | "vmwarecertified" | "vmware_certified" => Some(AcceptanceLevel::Certified),
        "accepted" | "vmwareaccepted" | "vmware_accepted" => Some(AcceptanceLevel::Accepted),
        "partner" | "partnersupported" | "partner_supported" => Some(AcceptanceLevel::Partner),
        "community" | "communitysupported" | "community_supported" => {
            Some(AcceptanceLevel::Community)
        }
        _ => None,
    }
}

fn parse_bool(what: &str, text: &str) -> Result<bool, VibError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(VibError::Descriptor(format!(
            "<{what}> is {other:?}, not true or false"
        ))),
    }
}

fn required<'a>(root: &'a Element, name: &str) -> Result<&'a str, VibError> {
    match root.child_text(name) {
        Some(t) if !t.is_empty() => Ok(t),
        Some(_) => Err(VibError::Descriptor(format!("<{name}> is empty"))),
        None => Err(VibError::Descriptor(format!("<{name}> is missing"))),
    }
}

fn constraints(rel: Option<&Element>, group: &str) -> Vec<String> {
    rel.and_then(|r| r.child(group))
        .map(|g| {
            g.children
                .iter()
                .map(|c| {
                    [c.attr("name"), c.attr("relation"), c.attr("version")]
                        .into_iter()
                        .flatten()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn from_element(root: &Element) -> Result<VibXml, VibError> {
    if root.name != "vib" {
        return Err(VibError::Descriptor(format!(
            "the root element is <{}>, not <vib>",
            root.name
        )));
    }
    let acceptance_text = required(root, "acceptance-level")?;
    let acceptance = parse_acceptance(acceptance_text).ok_or_else(|| {
        VibError::Descriptor(format!(
            "<acceptance-level> {acceptance_text:?} is not certified, accepted, partner or community"
        ))
    })?;
    let requires = root.child("system-requires");
    let maintenance_mode = match requires.and_then(|r| r.child("maintenance-mode")) {
        None => true,
        Some(m) => match m.attr("install") {
            Some(install) => parse_bool("maintenance-mode install", install)?,
            None if m.text.trim().is_empty() => true,
            None => parse_bool("maintenance-mode", &m.text)?,
        },
    };
    let flag = |name: &str| -> Result<bool, VibError> {
        root.child_text(name)
            .map_or(Ok(false), |t| parse_bool(name, t))
    };
    let mut payloads: Vec<Payload> = Vec::new();
    for p in root
        .child("payloads")
        .into_iter()
        .flat_map(|p| p.children_named("payload"))
    {
        let name = p
            .attr("name")
            .ok_or_else(|| VibError::Descriptor("a <payload> has no name".into()))?
            .to_owned();
        super::check_member_name(&name)?;
        if payloads.iter().any(|o| o.name == name) {
            return Err(VibError::Descriptor(format!(
                "payload {name:?} is declared twice"
            )));
        }
        let size_text = p
            .attr("size")
            .ok_or_else(|| VibError::Descriptor(format!("payload {name:?} declares no size")))?;
        let size = size_text.trim().parse::<u64>().map_err(|_| {
            VibError::Descriptor(format!("payload {name:?} has size {size_text:?}"))
        })?;
        let mut checksums = Vec::new();
        for c in p.children_named("checksum") {
            let algorithm = c
                .attr("checksum-type")
                .ok_or_else(|| {
                    VibError::Descriptor(format!("a checksum of payload {name:?} has no type"))
                })?
                .to_ascii_lowercase();
            let hex = c.text.trim().to_ascii_lowercase();
            if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(VibError::Descriptor(format!(
                    "the {algorithm} checksum of payload {name:?} is not hex: {:?}",
                    c.text.trim().chars().take(80).collect::<String>()
                )));
            }
            checksums.push(Checksum {
                algorithm,
                verify_process: c.attr("verify-process").map(str::to_owned),
                hex,
            });
        }
        if !checksums
            .iter()
            .any(|c| c.algorithm == "sha-256" && c.verify_process.is_none())
        {
            return Err(VibError::Descriptor(format!(
                "payload {name:?} declares no sha-256 checksum of its stored bytes"
            )));
        }
        payloads.push(Payload {
            name,
            payload_type: p.attr("type").unwrap_or_default().to_owned(),
            size,
            checksums,
        });
    }
    let relationships = root.child("relationships");
    Ok(VibXml {
        vib_type: required(root, "type")?.to_owned(),
        name: required(root, "name")?.to_owned(),
        version: required(root, "version")?.to_owned(),
        vendor: required(root, "vendor")?.to_owned(),
        summary: root.child_text("summary").unwrap_or_default().to_owned(),
        release_date: root
            .child_text("release-date")
            .unwrap_or_default()
            .to_owned(),
        acceptance,
        maintenance_mode,
        live_install_allowed: flag("live-install-allowed")?,
        live_remove_allowed: flag("live-remove-allowed")?,
        software_tags: root
            .child("software-tags")
            .into_iter()
            .flat_map(|t| t.children_named("tag"))
            .map(|t| t.text.trim().to_owned())
            .collect(),
        platforms: requires
            .into_iter()
            .flat_map(|r| r.children_named("software-platform"))
            .filter_map(|p| p.attr("productLineID").map(str::to_owned))
            .collect(),
        hardware: requires
            .into_iter()
            .flat_map(|r| r.children_named("hwplatform"))
            .map(|h| {
                format!(
                    "{} {}",
                    h.attr("vendor").unwrap_or_default(),
                    h.attr("model").unwrap_or_default()
                )
                .trim()
                .to_owned()
            })
            .collect(),
        depends: constraints(relationships, "depends"),
        conflicts: constraints(relationships, "conflicts"),
        replaces: constraints(relationships, "replaces"),
        provides: constraints(relationships, "provides"),
        payloads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"<vib version="5.0">
  <type>bootbank</type><name>nut-client</name><version>2.8.0-1</version><vendor>acme</vendor>
  <summary>UPS client</summary><release-date>2024-01-02T03:04:05</release-date>
  <relationships><depends><constraint name="esx-version" relation="&gt;=" version="7.0.0"/></depends>
    <conflicts/><replaces><constraint name="nut-client" relation="&lt;&lt;" version="2.8.0-1"/></replaces>
    <provides><provide name="nut-client" version="2.8.0-1"/></provides></relationships>
  <software-tags><tag>service</tag></software-tags>
  <system-requires><maintenance-mode install="false">true</maintenance-mode>
    <software-platform locale="" version="8.0.0" productLineID="embeddedEsx"/></system-requires>
  <acceptance-level>community</acceptance-level>
  <live-install-allowed>true</live-install-allowed><live-remove-allowed>false</live-remove-allowed>
  <payloads><payload name="payload1" type="vgz" size="10">
    <checksum checksum-type="sha-256">AB</checksum>
    <checksum checksum-type="sha-256" verify-process="gunzip">cd</checksum></payload></payloads>
</vib>"#;

    #[test]
    fn reads_what_a_vib_declares() {
        let d = VibXml::parse(SAMPLE.as_bytes()).expect("parse");
        assert_eq!(d.id(), "acme_bootbank_nut-client_2.8.0-1");
        assert_eq!(d.acceptance, AcceptanceLevel::Community);
        assert!(!d.maintenance_mode);
        assert!(d.live_install_allowed && !d.live_remove_allowed);
        assert_eq!(d.depends, ["esx-version >= 7.0.0"]);
        assert_eq!(d.replaces, ["nut-client << 2.8.0-1"]);
        assert_eq!(d.provides, ["nut-client 2.8.0-1"]);
        assert_eq!(d.platforms, ["embeddedEsx"]);
        assert_eq!(d.payloads[0].size, 10);
        assert_eq!(d.payloads[0].checksums[0].hex, "ab");
        assert_eq!(
            d.payloads[0].checksums[1].verify_process.as_deref(),
            Some("gunzip")
        );
    }

    #[test]
    fn refuses_incomplete_descriptors() {
        for (from, to) in [
            ("<name>nut-client</name>", ""),
            ("community", "trusted"),
            ("<vib version", "<biv version"),
            (r#"size="10""#, r#"size="ten""#),
            (
                r#"checksum-type="sha-256">AB"#,
                r#"checksum-type="sha-256" verify-process="gunzip">AB"#,
            ),
            (r#"name="payload1""#, r#"name="../x""#),
        ] {
            let text = SAMPLE.replace(from, to);
            assert!(VibXml::parse(text.as_bytes()).is_err(), "{from} -> {to}");
        }
    }
}
