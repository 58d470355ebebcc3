//! Reads a `.vib` in one pass and checks it against its own `descriptor.xml`.
//!
//! Order of the archive: `descriptor.xml` first (required), `sig.pkcs7` (optional, kept but not
//! verified: it is the platform vendor's PKCS#7 chain, which vibstage replaces with its own
//! signed descriptor), then exactly the declared payloads, each once. While a payload streams
//! by, its stored bytes go through every declared stored checksum and, when a checksum has
//! `verify-process="gunzip"`, through a streaming gzip decoder whose output is hashed too; the
//! decoder may produce at most `size × max_ratio` bytes and never more than `max_expanded`. The
//! whole file is hashed with sha256 on the same pass.

use std::io::{self, Read, Write};

use sha1::Sha1;
use sha2::{Digest as _, Sha256, Sha512};
use vibstage_protocol::Digest;

use super::ar::{self, HEADER_LEN, MemberHeader};
use super::descriptor::{Payload, VibXml};
use super::{Limits, VibError};

/// A VIB that passed every check.
#[derive(Debug, Clone)]
pub struct Vib {
    /// What it declares about itself.
    pub xml: VibXml,
    /// The exact bytes of `descriptor.xml`.
    pub descriptor_bytes: Vec<u8>,
    /// Whether `sig.pkcs7` is present and non-empty.
    pub signed: bool,
    /// sha256 of the whole file.
    pub sha256: Digest,
    /// Length of the whole file.
    pub size: u64,
}

/// A reader that hashes and counts what passes, and refuses to pass more than a bound.
struct Counted<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::new(io::ErrorKind::FileTooLarge, "VIB too large"));
        }
        Ok(n)
    }
}

/// Fills `buf` completely, or returns how many bytes were there before the end.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// One running checksum.
enum Hasher {
    Sha256(Sha256),
    Sha1(Sha1),
    Sha512(Box<Sha512>),
}

impl Hasher {
    fn new(payload: &str, algorithm: &str) -> Result<Hasher, VibError> {
        Ok(match algorithm {
            "sha-256" | "sha256" => Hasher::Sha256(Sha256::new()),
            "sha-1" | "sha1" => Hasher::Sha1(Sha1::new()),
            "sha-512" | "sha512" => Hasher::Sha512(Box::new(Sha512::new())),
            other => {
                return Err(VibError::Unsupported {
                    name: payload.to_owned(),
                    what: "checksum type",
                    value: other.to_owned(),
                });
            }
        })
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha1(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }

    fn hex(self) -> String {
        match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha1(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

/// Where the gzip decoder writes: the gunzip hashers, with the expansion bound.
struct Expanded {
    hashers: Vec<(usize, Hasher)>,
    written: u64,
    limit: u64,
    exceeded: bool,
}

impl Write for Expanded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len() as u64;
        if self.written > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("expansion bound exceeded"));
        }
        for (_, h) in &mut self.hashers {
            h.update(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Streams one payload member's `size` bytes from `r`, checking every declared checksum.
fn check_payload(
    r: &mut impl Read,
    decl: &Payload,
    size: u64,
    limits: &Limits,
) -> Result<(), VibError> {
    if size != decl.size {
        return Err(VibError::Size {
            name: decl.name.clone(),
            declared: decl.size,
            actual: size,
        });
    }
    let mut stored = Vec::new();
    let mut gunzip = Vec::new();
    for (i, c) in decl.checksums.iter().enumerate() {
        let h = Hasher::new(&decl.name, &c.algorithm)?;
        match c.verify_process.as_deref() {
            None => stored.push((i, h)),
            Some("gunzip") => gunzip.push((i, h)),
            Some(other) => {
                return Err(VibError::Unsupported {
                    name: decl.name.clone(),
                    what: "verify-process",
                    value: other.to_owned(),
                });
            }
        }
    }
    let gunzip_error = |detail: String| VibError::Gunzip {
        name: decl.name.clone(),
        detail,
    };
    let mut decoder = (!gunzip.is_empty()).then(|| {
        flate2::write::MultiGzDecoder::new(Expanded {
            hashers: std::mem::take(&mut gunzip),
            written: 0,
            limit: size
                .saturating_mul(limits.max_ratio)
                .saturating_add(1 << 16)
                .min(limits.max_expanded),
            exceeded: false,
        })
    });
    let bomb = |e: &Expanded| {
        gunzip_error(format!(
            "decompresses to more than {} bytes ({} stored; the bound is {}x and {} bytes): refusing a decompression bomb",
            e.limit, size, limits.max_ratio, limits.max_expanded
        ))
    };
    // A gzip error is reported only after the stored checksums: bytes that differ from what
    // was declared are a checksum mismatch first, whatever they decompress to.
    let mut gzip_failure: Option<String> = None;
    let mut left = size;
    let mut buf = vec![0u8; 256 << 10];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(VibError::Ar {
                offset: 0,
                detail: format!(
                    "payload {:?} ends after {} of {size} bytes",
                    decl.name,
                    size - left
                ),
            });
        }
        for (_, h) in &mut stored {
            h.update(&buf[..n]);
        }
        if let Some(d) = decoder.as_mut()
            && let Err(e) = d.write_all(&buf[..n])
        {
            if d.get_ref().exceeded {
                return Err(bomb(d.get_ref()));
            }
            gzip_failure = Some(format!("not valid gzip data: {e}"));
            decoder = None;
        }
        left -= n as u64;
    }
    let stored: Vec<(usize, &'static str, String)> = stored
        .into_iter()
        .map(|(i, h)| (i, "stored", h.hex()))
        .collect();
    compare(decl, stored)?;
    if let Some(failure) = gzip_failure {
        return Err(gunzip_error(failure));
    }
    let mut results = Vec::new();
    if let Some(d) = decoder {
        let expanded = d
            .finish()
            .map_err(|e| gunzip_error(format!("gzip data is truncated or invalid: {e}")))?;
        if expanded.exceeded {
            return Err(bomb(&expanded));
        }
        results.extend(
            expanded
                .hashers
                .into_iter()
                .map(|(i, h)| (i, "gunzipped", h.hex())),
        );
    }
    compare(decl, results)
}

/// Compares computed checksums (index into the declared ones, which bytes, hex) with the
/// declared ones.
fn compare(decl: &Payload, results: Vec<(usize, &'static str, String)>) -> Result<(), VibError> {
    for (i, which, actual) in results {
        let c = &decl.checksums[i];
        if c.hex != actual {
            return Err(VibError::Checksum {
                name: decl.name.clone(),
                which,
                algorithm: c.algorithm.clone(),
                declared: c.hex.clone(),
                actual,
            });
        }
    }
    Ok(())
}

/// Reads a member's data into memory (bounded), and its padding byte.
fn read_small(r: &mut impl Read, h: &MemberHeader, limit: u64) -> Result<Vec<u8>, VibError> {
    if h.size > limit {
        return Err(VibError::TooLarge {
            what: format!("member {} ({} bytes)", h.name, h.size),
            limit,
        });
    }
    let mut data = vec![0u8; h.size as usize];
    let n = read_full(r, &mut data)?;
    if n < data.len() {
        return Err(VibError::Ar {
            offset: 0,
            detail: format!("member {:?} ends after {n} of {} bytes", h.name, h.size),
        });
    }
    Ok(data)
}

fn skip_padding(r: &mut impl Read, h: &MemberHeader) -> Result<(), VibError> {
    if h.size & 1 == 1 {
        let mut pad = [0u8; 1];
        read_full(r, &mut pad)?;
    }
    Ok(())
}

/// Reads a whole `.vib` from `r`, checking it against its own descriptor. Nothing is trusted
/// before it is checked; every refusal names what is wrong.
pub fn read_vib(r: impl Read, limits: &Limits) -> Result<Vib, VibError> {
    let mut r = Counted {
        inner: r,
        hasher: Sha256::new(),
        read: 0,
        limit: limits.max_vib_bytes,
    };
    let too_large = |e: io::Error| {
        if e.kind() == io::ErrorKind::FileTooLarge {
            VibError::TooLarge {
                what: "the VIB".into(),
                limit: limits.max_vib_bytes,
            }
        } else {
            VibError::Io(e)
        }
    };
    let mut magic = [0u8; 8];
    let n = read_full(&mut r, &mut magic).map_err(too_large)?;
    if n < 8 || &magic != ar::MAGIC {
        return Err(VibError::NotAr);
    }
    let mut xml: Option<(VibXml, Vec<u8>)> = None;
    let mut signed = false;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let offset = r.read;
        let mut header = [0u8; HEADER_LEN];
        let n = read_full(&mut r, &mut header).map_err(too_large)?;
        if n == 0 {
            break;
        }
        if n < HEADER_LEN {
            return Err(VibError::Ar {
                offset,
                detail: format!("truncated member header ({n} of 60 bytes)"),
            });
        }
        let h = ar::parse_header(&header, offset)?;
        if seen.contains(&h.name) {
            return Err(VibError::Duplicate { name: h.name });
        }
        if seen.len() >= limits.max_members {
            return Err(VibError::TooLarge {
                what: "the number of ar members".into(),
                limit: limits.max_members as u64,
            });
        }
        let at = |e: VibError| match e {
            VibError::Ar { detail, .. } => VibError::Ar { offset, detail },
            VibError::Io(e) => too_large(e),
            other => other,
        };
        match (&xml, h.name.as_str()) {
            (None, "descriptor.xml") => {
                let bytes = read_small(&mut r, &h, limits.max_descriptor).map_err(at)?;
                xml = Some((VibXml::parse(&bytes)?, bytes));
            }
            (None, _) => return Err(VibError::DescriptorMissing { first: h.name }),
            (Some(_), "sig.pkcs7") => {
                signed = !read_small(&mut r, &h, limits.max_signature)
                    .map_err(at)?
                    .is_empty();
            }
            (Some((d, _)), name) => {
                let Some(decl) = d.payloads.iter().find(|p| p.name == name) else {
                    return Err(VibError::Undeclared { name: h.name });
                };
                check_payload(&mut r, decl, h.size, limits).map_err(at)?;
            }
        }
        skip_padding(&mut r, &h).map_err(at)?;
        seen.push(h.name);
    }
    let Some((xml, descriptor_bytes)) = xml else {
        return Err(VibError::DescriptorMissing {
            first: String::new(),
        });
    };
    if let Some(p) = xml.payloads.iter().find(|p| !seen.contains(&p.name)) {
        return Err(VibError::PayloadMissing {
            name: p.name.clone(),
        });
    }
    Ok(Vib {
        xml,
        descriptor_bytes,
        signed,
        sha256: Digest::from_bytes(r.hasher.finalize().into()),
        size: r.read,
    })
}

/// Reads only the first member of a VIB: its `descriptor.xml`. `None` when `r` is not a real
/// VIB (not an ar archive, or its first member is something else). Used where the payloads were
/// already checked (the installer hook naming staged VIBs by their real file names).
pub fn read_descriptor(mut r: impl Read, limits: &Limits) -> Result<Option<VibXml>, VibError> {
    let mut head = [0u8; 8 + HEADER_LEN];
    let n = read_full(&mut r, &mut head)?;
    if n < head.len() || &head[..8] != ar::MAGIC {
        return Ok(None);
    }
    let Ok(h) = ar::parse_header(&head[8..], 8) else {
        return Ok(None);
    };
    if h.name != "descriptor.xml" {
        return Ok(None);
    }
    let bytes = read_small(&mut r, &h, limits.max_descriptor)?;
    VibXml::parse(&bytes).map(Some)
}
