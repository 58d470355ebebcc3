//! Offline bundles (depot zips): `index.xml` → `vendor-index.xml` → `metadata.zip`, and the
//! VIBs under `vib20/`.
//!
//! [`Bundle::open`] checks the zip (entry names, duplicates, entry count, expansion bounds) and
//! reads the metadata: bulletins (`bulletins/*.xml`: `componentNameSpec`/`componentVersionSpec`
//! and the `vibList` of VIB IDs), VIB records (`vibs/*.xml`: `relative-path`, `packed-size` and
//! the sha-256 of the whole `.vib`), base images (`baseimages/*.xml`) and add-ons
//! (`addons/*.xml`), each with a `nameSpec`/`versionSpec` and a `components` list.
//! [`Bundle::read_vib`] then streams one VIB entry through [`read_vib`] and checks it against the
//! metadata's size and checksum too.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Seek, SeekFrom};

use super::reader::{Vib, read_vib};
use super::xml::{self, Element};
use super::{Limits, VibError, check_entry_path};

/// A component a bulletin, base image or add-on names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ComponentRef {
    /// Component name.
    pub name: String,
    /// Component version.
    pub version: String,
}

/// A bulletin: one component version and its VIBs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bulletin {
    /// Bulletin id.
    pub id: String,
    /// The component it delivers (the bulletin id and its VIB's version before 7.0).
    pub component: Option<ComponentRef>,
    /// `productLineID`s of its platforms (`embeddedEsx`, `esxio`).
    pub platforms: Vec<String>,
    /// VIB IDs (`vendor_type_name_version`).
    pub vibs: Vec<String>,
}

/// A base image or an add-on: a named, versioned list of components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Name (the add-on's name; `ESXi` for a base image without one).
    pub name: String,
    /// Version.
    pub version: String,
    /// Vendor.
    pub vendor: String,
    /// Components it consists of.
    pub components: Vec<ComponentRef>,
}

/// What `metadata.zip` says about one VIB file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VibRecord {
    /// The VIB ID.
    pub id: String,
    /// Path of the `.vib` in the bundle.
    pub path: String,
    /// Declared size of the `.vib`, if any.
    pub size: Option<u64>,
    /// Declared sha-256 of the `.vib`, if any.
    pub sha256: Option<String>,
}

/// An opened offline bundle.
#[derive(Debug)]
pub struct Bundle<R> {
    zip: zip::ZipArchive<R>,
    limits: Limits,
    /// Bulletins in the metadata.
    pub bulletins: Vec<Bulletin>,
    /// Base images in the metadata (7.0 and later).
    pub base_images: Vec<Release>,
    /// Add-ons in the metadata (7.0 and later).
    pub addons: Vec<Release>,
    /// VIB records of the metadata, by path.
    pub records: BTreeMap<String, VibRecord>,
    /// Paths of the `.vib` entries under `vib20/`, in zip order.
    pub vib_paths: Vec<String>,
}

fn bad(detail: impl Into<String>) -> VibError {
    VibError::Bundle(detail.into())
}

/// The entry count the zip's end-of-central-directory record declares. The zip crate keys
/// entries by name, so a duplicate name shows as fewer entries than declared.
fn declared_entries<R: Read + Seek>(r: &mut R) -> Result<u64, VibError> {
    let len = r.seek(SeekFrom::End(0))?;
    let tail = len.min(22 + 65_535);
    r.seek(SeekFrom::Start(len - tail))?;
    let mut buf = vec![0u8; tail as usize];
    r.read_exact(&mut buf)?;
    r.seek(SeekFrom::Start(0))?;
    let at = (0..buf.len().saturating_sub(21))
        .rev()
        .find(|&i| buf[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or_else(|| bad("not a zip file (no end of central directory)"))?;
    let count = u16::from_le_bytes([buf[at + 10], buf[at + 11]]);
    if count == 0xffff {
        return Err(VibError::TooLarge {
            what: "the number of zip entries".into(),
            limit: 0xfffe,
        });
    }
    Ok(u64::from(count))
}

/// Opens a zip with its names, duplicates and count checked.
fn open_zip<R: Read + Seek>(
    mut r: R,
    what: &str,
    limits: &Limits,
) -> Result<zip::ZipArchive<R>, VibError> {
    let declared = declared_entries(&mut r).map_err(|e| match e {
        VibError::Bundle(d) => bad(format!("{what}: {d}")),
        other => other,
    })?;
    if declared > limits.max_entries as u64 {
        return Err(VibError::TooLarge {
            what: format!("the number of entries of {what} ({declared})"),
            limit: limits.max_entries as u64,
        });
    }
    let mut zip = zip::ZipArchive::new(r).map_err(|e| bad(format!("{what}: {e}")))?;
    if zip.len() as u64 != declared {
        return Err(VibError::Duplicate {
            name: format!(
                "{what} declares {declared} entries but has {} distinct names",
                zip.len()
            ),
        });
    }
    for i in 0..zip.len() {
        let entry = zip
            .by_index_raw(i)
            .map_err(|e| bad(format!("{what}: entry {i}: {e}")))?;
        check_entry_path(entry.name())?;
    }
    Ok(zip)
}

/// Reads a small entry whole, bounded in expansion ratio and to `max` bytes.
fn read_entry<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    limits: &Limits,
    max: u64,
) -> Result<Vec<u8>, VibError> {
    let entry = zip.by_name(name).map_err(|e| bad(format!("{name}: {e}")))?;
    let bound = entry
        .compressed_size()
        .saturating_mul(limits.max_ratio)
        .saturating_add(1 << 16)
        .min(max);
    let mut out = Vec::new();
    entry
        .take(bound + 1)
        .read_to_end(&mut out)
        .map_err(|e| bad(format!("{name}: {e}")))?;
    if out.len() as u64 > bound {
        return Err(VibError::TooLarge {
            what: format!("{name} expanded (a decompression bomb?)"),
            limit: bound,
        });
    }
    Ok(out)
}

fn parse_xml(name: &str, bytes: &[u8]) -> Result<Element, VibError> {
    xml::parse(bytes).map_err(|e| bad(format!("{name}: {e}")))
}

/// `<nameSpec name=…>`/`<versionSpec version=…>` as `(name, version)`.
fn spec(el: &Element, spec: &str, attr: &str) -> Option<String> {
    el.child(spec)
        .and_then(|s| {
            s.attr(attr)
                .map(str::to_owned)
                .or_else(|| Some(s.text.trim().to_owned()))
        })
        .filter(|s| !s.is_empty())
}

fn release(name: &str, el: &Element, default_name: &str) -> Result<Release, VibError> {
    let version =
        spec(el, "versionSpec", "version").ok_or_else(|| bad(format!("{name}: no versionSpec")))?;
    let components = el
        .child("components")
        .into_iter()
        .flat_map(|c| c.children_named("component"))
        .map(|c| match (c.attr("name"), c.attr("version")) {
            (Some(n), Some(v)) => Ok(ComponentRef {
                name: n.to_owned(),
                version: v.to_owned(),
            }),
            _ => Err(bad(format!("{name}: a component without name or version"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Release {
        name: spec(el, "nameSpec", "name").unwrap_or_else(|| default_name.to_owned()),
        version,
        vendor: el.child_text("vendor").unwrap_or_default().to_owned(),
        components,
    })
}

impl<R: Read + Seek> Bundle<R> {
    /// Opens and checks an offline bundle and reads its metadata.
    pub fn open(r: R, limits: &Limits) -> Result<Bundle<R>, VibError> {
        let mut zip = open_zip(r, "the bundle", limits)?;
        let names: Vec<String> = zip.file_names().map(str::to_owned).collect();
        if !names.iter().any(|n| n == "index.xml") {
            return Err(bad("index.xml is missing"));
        }
        let index = parse_xml(
            "index.xml",
            &read_entry(&mut zip, "index.xml", limits, limits.max_xml)?,
        )?;
        let mut vendor_indexes = Vec::new();
        for v in index.children_named("vendor") {
            let file = v
                .child_text("indexfile")
                .ok_or_else(|| bad("index.xml: a vendor without indexfile"))?;
            let rel = v.child_text("relativePath").unwrap_or_default();
            let path = format!(
                "{}{file}",
                if rel.is_empty() {
                    String::new()
                } else {
                    format!("{}/", rel.trim_end_matches('/'))
                }
            );
            check_entry_path(&path)?;
            vendor_indexes.push(path);
        }
        if vendor_indexes.is_empty() {
            return Err(bad("index.xml names no vendor index"));
        }
        let mut metadata_paths: Vec<String> = Vec::new();
        for vi in &vendor_indexes {
            if !names.contains(vi) {
                return Err(bad(format!("{vi} (named by index.xml) is missing")));
            }
            let doc = parse_xml(vi, &read_entry(&mut zip, vi, limits, limits.max_xml)?)?;
            let dir = vi
                .rsplit_once('/')
                .map(|(d, _)| format!("{d}/"))
                .unwrap_or_default();
            for m in doc.children_named("metadata") {
                let url = m
                    .child_text("url")
                    .ok_or_else(|| bad(format!("{vi}: a metadata entry without url")))?;
                let path = format!("{dir}{url}");
                check_entry_path(&path)?;
                if !metadata_paths.contains(&path) {
                    metadata_paths.push(path);
                }
            }
        }
        if metadata_paths.is_empty() {
            return Err(bad("the vendor index names no metadata.zip"));
        }
        let mut bundle = Bundle {
            zip,
            limits: *limits,
            bulletins: Vec::new(),
            base_images: Vec::new(),
            addons: Vec::new(),
            records: BTreeMap::new(),
            vib_paths: names
                .iter()
                .filter(|n| n.starts_with("vib20/") && n.ends_with(".vib"))
                .cloned()
                .collect(),
        };
        for path in &metadata_paths {
            if !names.contains(path) {
                return Err(bad(format!(
                    "{path} (named by the vendor index) is missing"
                )));
            }
            let bytes = read_entry(&mut bundle.zip, path, limits, limits.max_metadata)?;
            bundle.read_metadata(path, bytes)?;
        }
        if bundle.vib_paths.is_empty() {
            return Err(bad("the bundle holds no vib20/…/*.vib"));
        }
        Ok(bundle)
    }

    fn read_metadata(&mut self, path: &str, bytes: Vec<u8>) -> Result<(), VibError> {
        let limits = self.limits;
        let mut meta = open_zip(Cursor::new(bytes), path, &limits)?;
        let names: Vec<String> = meta.file_names().map(str::to_owned).collect();
        for name in names.iter().filter(|n| n.ends_with(".xml")) {
            let folder = name.split('/').next().unwrap_or_default();
            if !matches!(folder, "bulletins" | "vibs" | "baseimages" | "addons") {
                continue;
            }
            let what = format!("{path}!{name}");
            let el = parse_xml(
                &what,
                &read_entry(&mut meta, name, &limits, limits.max_xml)?,
            )?;
            match folder {
                "bulletins" => self.bulletins.push(Bulletin {
                    id: el
                        .child_text("id")
                        .ok_or_else(|| bad(format!("{what}: no id")))?
                        .to_owned(),
                    component: match (
                        spec(&el, "componentNameSpec", "name"),
                        spec(&el, "componentVersionSpec", "version"),
                    ) {
                        (Some(name), Some(version)) => Some(ComponentRef { name, version }),
                        _ => None,
                    },
                    platforms: el
                        .child("platforms")
                        .into_iter()
                        .flat_map(|p| p.children.iter())
                        .filter_map(|p| p.attr("productLineID").map(str::to_owned))
                        .collect(),
                    vibs: el
                        .child("vibList")
                        .into_iter()
                        .flat_map(|l| l.children_named("vibID"))
                        .map(|v| v.text.trim().to_owned())
                        .collect(),
                }),
                "vibs" => {
                    let Some(rel) = el.child_text("relative-path") else {
                        continue;
                    };
                    check_entry_path(rel)?;
                    let id = format!(
                        "{}_{}_{}_{}",
                        el.child_text("vendor").unwrap_or_default(),
                        el.child_text("type").unwrap_or_default(),
                        el.child_text("name").unwrap_or_default(),
                        el.child_text("version").unwrap_or_default()
                    );
                    let size = match el.child_text("packed-size") {
                        Some(s) => Some(s.parse::<u64>().map_err(|_| {
                            bad(format!("{what}: packed-size {s:?} is not a number"))
                        })?),
                        None => None,
                    };
                    let sha256 = el
                        .children_named("checksum")
                        .find(|c| {
                            c.attr("checksum-type") == Some("sha-256")
                                && c.attr("verify-process").is_none()
                        })
                        .map(|c| c.text.trim().to_ascii_lowercase());
                    self.records.insert(
                        rel.to_owned(),
                        VibRecord {
                            id,
                            path: rel.to_owned(),
                            size,
                            sha256,
                        },
                    );
                }
                "baseimages" => self.base_images.push(release(&what, &el, "ESXi")?),
                _ => self.addons.push(release(&what, &el, "addon")?),
            }
        }
        Ok(())
    }

    /// Streams the VIB at `path` through [`read_vib`] and checks it against the metadata's
    /// record of it (size, sha-256, VIB ID).
    pub fn read_vib(&mut self, path: &str) -> Result<Vib, VibError> {
        let entry = self
            .zip
            .by_name(path)
            .map_err(|e| bad(format!("{path}: {e}")))?;
        let bound = entry
            .compressed_size()
            .saturating_mul(self.limits.max_ratio)
            .saturating_add(1 << 16);
        let mut limits = self.limits;
        limits.max_vib_bytes = limits.max_vib_bytes.min(bound);
        let vib = read_vib(entry, &limits)?;
        if let Some(rec) = self.records.get(path) {
            if rec.size.is_some_and(|s| s != vib.size) {
                return Err(bad(format!(
                    "{path} is {} bytes, the metadata says {}",
                    vib.size,
                    rec.size.unwrap_or_default()
                )));
            }
            if rec
                .sha256
                .as_ref()
                .is_some_and(|h| *h != vib.sha256.to_hex())
            {
                return Err(bad(format!(
                    "{path} has sha-256 {}, the metadata says {}",
                    vib.sha256,
                    rec.sha256.as_deref().unwrap_or_default()
                )));
            }
            if rec.id != vib.xml.id() {
                return Err(bad(format!(
                    "{path} is VIB {}, the metadata says {}",
                    vib.xml.id(),
                    rec.id
                )));
            }
        }
        Ok(vib)
    }

    /// Opens the entry at `path` to read its bytes as stored in the bundle.
    pub fn entry(&mut self, path: &str) -> Result<zip::read::ZipFile<'_, R>, VibError> {
        self.zip
            .by_name(path)
            .map_err(|e| bad(format!("{path}: {e}")))
    }

    /// The component a VIB belongs to, from the bulletins: the one component bulletin that
    /// lists it (a pre-7.0 bulletin names its bulletin id instead). `None` when no bulletin
    /// lists it; an error when two components claim it.
    pub fn component_of(
        &self,
        vib_id: &str,
    ) -> Result<Option<(ComponentRef, Vec<String>)>, VibError> {
        let listing: Vec<&Bulletin> = self
            .bulletins
            .iter()
            .filter(|b| b.vibs.iter().any(|v| v == vib_id))
            .collect();
        let components: Vec<&Bulletin> = listing
            .iter()
            .copied()
            .filter(|b| b.component.is_some())
            .collect();
        if let [one] = components.as_slice() {
            return Ok(one.component.clone().map(|c| (c, one.platforms.clone())));
        }
        if components.len() > 1 {
            return Err(bad(format!(
                "VIB {vib_id} is listed by several components: {}",
                components
                    .iter()
                    .map(|b| b.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(None)
    }
}
