//! A builder of real-format ESXi content for tests and the demo (issue 14): `.vib` archives
//! (`ar`: `descriptor.xml`, `sig.pkcs7`, gzipped payloads) and offline bundles (zip:
//! `index.xml`, `vendor-index.xml`, `metadata.zip` with bulletins, VIB records, base images and
//! add-ons, and `vib20/<name>/<vendor>_<type>_<name>_<version>.vib`).
//!
//! It is written independently of the reader in `agent/src/vib/`: archives go through the `ar`
//! crate's writer and the `zip` crate's writer, XML is formatted text, and the checksums are
//! computed here. Output is deterministic (mtime 0, fixed gzip header), so the same spec always
//! gives the same bytes. The demo (`vibstagectl demo`) compiles this file too, so it uses only
//! crates the agent depends on.

use std::io::{Cursor, Write};

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// One payload: its member name, type and uncompressed contents (stored gzipped).
#[derive(Debug, Clone)]
pub struct PayloadSpec {
    /// Member name in the archive.
    pub name: String,
    /// `vgz` or `tgz`.
    pub payload_type: String,
    /// Uncompressed bytes.
    pub contents: Vec<u8>,
}

/// A VIB to build.
#[derive(Debug, Clone)]
pub struct VibBuild {
    /// Vendor code.
    pub vendor: String,
    /// `bootbank`, `locker`, …
    pub vib_type: String,
    /// VIB name.
    pub name: String,
    /// VIB version.
    pub version: String,
    /// `certified`, `accepted`, `partner`, `community`.
    pub acceptance: String,
    /// `system-requires/maintenance-mode`.
    pub maintenance_mode: bool,
    /// `live-install-allowed`.
    pub live_install: bool,
    /// `software-tags`.
    pub tags: Vec<String>,
    /// `productLineID`s of `software-platform` (`embeddedEsx`, `esxio`).
    pub platforms: Vec<String>,
    /// Payloads.
    pub payloads: Vec<PayloadSpec>,
    /// Bytes of `sig.pkcs7` (empty for an unsigned VIB).
    pub signature: Vec<u8>,
}

/// Deterministic filler bytes.
pub fn filler(seed: &str, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 32);
    let mut block: [u8; 32] = Sha256::digest(seed.as_bytes()).into();
    while out.len() < size {
        out.extend_from_slice(&block);
        block = Sha256::digest(block).into();
    }
    out.truncate(size);
    out
}

/// gzip of `data` with a fixed header (no name, mtime 0), as VIB payloads are stored.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn sha1_hex(b: &[u8]) -> String {
    hex::encode(Sha1::digest(b))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An `ar` archive of `members`, in order (the `ar` crate's common format, mtime 0, mode 644).
pub fn ar_archive(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = ar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = ar::Header::new(name.as_bytes().to_vec(), data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        b.append(&h, *data).expect("ar member");
    }
    b.into_inner().expect("ar")
}

/// A zip of `entries`, deflated, in order.
pub fn zip_archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .last_modified_time(zip::DateTime::default());
    for (name, data) in entries {
        z.start_file(*name, opts).expect("zip entry");
        z.write_all(data).expect("zip data");
    }
    z.finish().expect("zip").into_inner()
}

impl VibBuild {
    /// A partner bootbank VIB with one `vgz` payload of `size` filler bytes.
    pub fn new(vendor: &str, name: &str, version: &str, size: usize) -> VibBuild {
        VibBuild {
            vendor: vendor.into(),
            vib_type: "bootbank".into(),
            name: name.into(),
            version: version.into(),
            acceptance: "partner".into(),
            maintenance_mode: true,
            live_install: false,
            tags: vec!["driver".into()],
            platforms: vec!["embeddedEsx".into()],
            payloads: vec![PayloadSpec {
                name: name
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric())
                    .take(15)
                    .collect(),
                payload_type: "vgz".into(),
                contents: filler(&format!("{vendor}/{name}/{version}"), size),
            }],
            signature: Vec::new(),
        }
    }

    /// The VIB ID: `vendor_type_name_version`.
    pub fn id(&self) -> String {
        format!(
            "{}_{}_{}_{}",
            self.vendor, self.vib_type, self.name, self.version
        )
    }

    /// The file name bundles use.
    pub fn file_name(&self) -> String {
        format!("{}.vib", self.id())
    }

    /// The stored (gzipped) payload members.
    pub fn stored_payloads(&self) -> Vec<(String, Vec<u8>)> {
        self.payloads
            .iter()
            .map(|p| (p.name.clone(), gzip(&p.contents)))
            .collect()
    }

    /// The `<vib>` element's content before `<payloads>` (shared with the bundle's VIB records).
    fn header_xml(&self) -> String {
        let tags: String = self
            .tags
            .iter()
            .map(|t| format!("<tag>{}</tag>", esc(t)))
            .collect();
        let platforms: String = self
            .platforms
            .iter()
            .map(|p| {
                format!(
                    "<software-platform locale=\"\" version=\"8.0.0\" productLineID=\"{}\"/>",
                    esc(p)
                )
            })
            .collect();
        format!(
            "  <type>{}</type>\n  <name>{}</name>\n  <version>{}</version>\n  <vendor>{}</vendor>\n  \
             <summary>{} for tests</summary>\n  <description>built by the vibstage test builder</description>\n  \
             <release-date>2024-05-01T00:00:00.000000+00:00</release-date>\n  <urls/>\n  \
             <relationships>\n    <depends><constraint name=\"esx-version\" relation=\"&gt;=\" version=\"7.0.0\"/></depends>\n    \
             <conflicts/>\n    <replaces><constraint name=\"{}\" relation=\"&lt;&lt;\" version=\"{}\"/></replaces>\n    \
             <provides><provide name=\"{}\" version=\"{}\"/></provides>\n    <compatibleWith/>\n  </relationships>\n  \
             <software-tags>{tags}</software-tags>\n  \
             <system-requires>\n    <maintenance-mode>{}</maintenance-mode>\n    {platforms}\n  </system-requires>\n  \
             <file-list><file>opt/{}/bin/tool</file></file-list>\n  \
             <acceptance-level>{}</acceptance-level>\n  <live-install-allowed>{}</live-install-allowed>\n  \
             <live-remove-allowed>{}</live-remove-allowed>\n  <cimom-restart>false</cimom-restart>\n  \
             <stateless-ready>true</stateless-ready>\n  <overlay>false</overlay>\n",
            esc(&self.vib_type),
            esc(&self.name),
            esc(&self.version),
            esc(&self.vendor),
            esc(&self.name),
            esc(&self.name),
            esc(&self.version),
            esc(&self.name),
            esc(&self.version),
            self.maintenance_mode,
            esc(&self.name),
            esc(&self.acceptance),
            self.live_install,
            self.live_install,
        )
    }

    /// `descriptor.xml` with the checksums of the payloads as built.
    pub fn descriptor_xml(&self) -> String {
        let mut payloads = String::new();
        for (p, (_, stored)) in self.payloads.iter().zip(self.stored_payloads()) {
            payloads.push_str(&format!(
                "    <payload name=\"{}\" type=\"{}\" size=\"{}\">\n      \
                 <checksum checksum-type=\"sha-256\" verify-process=\"gunzip\">{}</checksum>\n      \
                 <checksum checksum-type=\"sha-256\">{}</checksum>\n      \
                 <checksum checksum-type=\"sha-1\" verify-process=\"gunzip\">{}</checksum>\n    </payload>\n",
                esc(&p.name),
                esc(&p.payload_type),
                stored.len(),
                sha256_hex(&p.contents),
                sha256_hex(&stored),
                sha1_hex(&p.contents),
            ));
        }
        format!(
            "<vib version=\"5.0\">\n{}  <payloads>\n{payloads}  </payloads>\n</vib>\n",
            self.header_xml()
        )
    }

    /// The `.vib` bytes: `descriptor.xml`, `sig.pkcs7`, the payloads.
    pub fn build(&self) -> Vec<u8> {
        self.build_with_descriptor(&self.descriptor_xml())
    }

    /// The `.vib` bytes with another `descriptor.xml` (for refusal cases).
    pub fn build_with_descriptor(&self, xml: &str) -> Vec<u8> {
        let stored = self.stored_payloads();
        let mut members: Vec<(&str, &[u8])> = vec![
            ("descriptor.xml", xml.as_bytes()),
            ("sig.pkcs7", &self.signature),
        ];
        for (name, data) in &stored {
            members.push((name, data));
        }
        ar_archive(&members)
    }
}

/// A component of a bundle: a bulletin with its VIBs.
#[derive(Debug, Clone)]
pub struct ComponentBuild {
    /// Component name.
    pub name: String,
    /// Component version.
    pub version: String,
    /// Its VIBs.
    pub vibs: Vec<VibBuild>,
}

/// A base image or add-on of a bundle.
#[derive(Debug, Clone)]
pub struct ReleaseBuild {
    /// Name (`nameSpec`).
    pub name: String,
    /// Version (`versionSpec`).
    pub version: String,
    /// Vendor.
    pub vendor: String,
    /// Its components as `(name, version)`.
    pub components: Vec<(String, String)>,
}

/// An offline bundle to build.
#[derive(Debug, Clone, Default)]
pub struct BundleBuild {
    /// Depot vendor name (index.xml).
    pub vendor: String,
    /// Components (one bulletin each).
    pub components: Vec<ComponentBuild>,
    /// The base image, if the bundle carries one.
    pub base_image: Option<ReleaseBuild>,
    /// Add-ons.
    pub addons: Vec<ReleaseBuild>,
}

impl BundleBuild {
    /// Every VIB with its path in the bundle.
    pub fn vib_files(&self) -> Vec<(String, &VibBuild, Vec<u8>)> {
        self.components
            .iter()
            .flat_map(|c| &c.vibs)
            .map(|v| (format!("vib20/{}/{}", v.name, v.file_name()), v, v.build()))
            .collect()
    }

    fn release_xml(tag: &str, r: &ReleaseBuild) -> String {
        let components: String = r
            .components
            .iter()
            .map(|(n, v)| format!("<component name=\"{}\" version=\"{}\"/>", esc(n), esc(v)))
            .collect();
        format!(
            "<{tag}><releaseID>{}:{}</releaseID><releaseType>{tag}</releaseType><vendor>{}</vendor>\
             <nameSpec name=\"{}\" uiString=\"{}\"/><versionSpec version=\"{}\" uiString=\"{}\"/>\
             <components>{components}</components></{tag}>",
            esc(&r.name),
            esc(&r.version),
            esc(&r.vendor),
            esc(&r.name),
            esc(&r.name),
            esc(&r.version),
            esc(&r.version)
        )
    }

    /// `metadata.zip`.
    pub fn metadata_zip(&self) -> Vec<u8> {
        let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
        let mut list = String::new();
        for c in &self.components {
            let vibs: String = c
                .vibs
                .iter()
                .map(|v| format!("<vibID>{}</vibID>", esc(&v.id())))
                .collect();
            let platforms: String = c
                .vibs
                .iter()
                .flat_map(|v| &v.platforms)
                .map(|p| {
                    format!(
                        "<softwarePlatform locale=\"\" version=\"8.*\" productLineID=\"{}\"/>",
                        esc(p)
                    )
                })
                .collect();
            let id = format!("{}-{}", c.name, c.version);
            list.push_str(&format!("<bulletin>{}</bulletin>", esc(&id)));
            entries.push((
                format!("bulletins/{id}.xml"),
                format!(
                    "<bulletin><id>{}</id><vendor>{}</vendor><summary>{}</summary><severity>general</severity>\
                     <category>enhancement</category><releaseType>extension</releaseType>\
                     <componentNameSpec uiString=\"{}\" name=\"{}\"/><componentVersionSpec uiString=\"{}\" version=\"{}\"/>\
                     <releaseDate>2024-05-01T00:00:00+00:00</releaseDate><platforms>{platforms}</platforms>\
                     <vibList>{vibs}</vibList></bulletin>",
                    esc(&id),
                    esc(&self.vendor),
                    esc(&c.name),
                    esc(&c.name),
                    esc(&c.name),
                    esc(&c.version),
                    esc(&c.version)
                )
                .into_bytes(),
            ));
        }
        for (path, v, bytes) in self.vib_files() {
            let xml = format!(
                "<vib version=\"5.0\">\n{}  <relative-path>{}</relative-path>\n  <packed-size>{}</packed-size>\n  \
                 <checksum checksum-type=\"sha-256\">{}</checksum>\n</vib>\n",
                v.header_xml(),
                esc(&path),
                bytes.len(),
                sha256_hex(&bytes)
            );
            entries.push((format!("vibs/{}.xml", v.id()), xml.into_bytes()));
        }
        if let Some(b) = &self.base_image {
            entries.push((
                format!("baseimages/{}.xml", b.version),
                Self::release_xml("baseImage", b).into_bytes(),
            ));
        }
        for a in &self.addons {
            entries.push((
                format!("addons/{}-{}.xml", a.name, a.version),
                Self::release_xml("addon", a).into_bytes(),
            ));
        }
        entries.push((
            "vmware.xml".into(),
            format!("<metadataResponse><version>3.0</version><bulletins>{list}</bulletins></metadataResponse>").into_bytes(),
        ));
        let refs: Vec<(&str, &[u8])> = entries
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        zip_archive(&refs)
    }

    /// `index.xml`.
    pub fn index_xml(&self) -> String {
        format!(
            "<vendorList><vendor><name>{}</name><code>{}</code><indexfile>vendor-index.xml</indexfile>\
             <patchUrl></patchUrl><relativePath></relativePath><content><name>VMware ESX</name>\
             <type>http://www.vmware.com/depotmanagement/esx</type></content></vendor></vendorList>",
            esc(&self.vendor),
            esc(&self.vendor.to_ascii_lowercase())
        )
    }

    /// `vendor-index.xml`.
    pub fn vendor_index_xml(&self) -> String {
        ["7.*", "8.*"]
            .iter()
            .map(|v| {
                format!(
                    "<metadata><productId>embeddedEsx</productId><version>{v}</version><locale></locale>\
                     <url>{}-metadata.zip</url><channelName>default</channelName></metadata>",
                    esc(&self.vendor)
                )
            })
            .fold("<metaList>".to_owned(), |acc, m| acc + &m)
            + "</metaList>"
    }

    /// The bundle's zip bytes.
    pub fn build(&self) -> Vec<u8> {
        let index = self.index_xml();
        let vendor_index = self.vendor_index_xml();
        let metadata = self.metadata_zip();
        let metadata_name = format!("{}-metadata.zip", self.vendor);
        let vibs = self.vib_files();
        let mut entries: Vec<(&str, &[u8])> = vec![
            ("index.xml", index.as_bytes()),
            ("vendor-index.xml", vendor_index.as_bytes()),
            (&metadata_name, &metadata),
        ];
        for (path, _, bytes) in &vibs {
            entries.push((path, bytes));
        }
        zip_archive(&entries)
    }
}
