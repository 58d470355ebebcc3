//! The agent's check of a real VIB while it downloads: does it name itself as its signed
//! vibstage descriptor does?
//!
//! A [`PrefixCheck`] is fed the blob's bytes in order as they arrive. It keeps at most the first
//! ar member (`descriptor.xml`, bounded by [`super::Limits::max_descriptor`]); once that member
//! is complete it parses it, compares name, version, vendor and acceptance level with the
//! expected [`VibIdentity`], and from then on ignores the bytes. A blob that does not start with
//! `!<arch>\n`, or an ar archive whose first member is not `descriptor.xml` (a `.deb`, say), is
//! opaque: nothing is buffered or checked, as before issue 14. No payload is hashed here: the
//! payload checksums were checked at import and the whole file is bound by the signed sha256,
//! which the store checks on the same pass it always made.

use vibstage_protocol::AcceptanceLevel;

use super::ar::{self, HEADER_LEN};
use super::descriptor::VibXml;
use super::{Limits, VibError};

/// What the signed vibstage descriptor says the VIB is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VibIdentity {
    /// VIB name.
    pub name: String,
    /// VIB version.
    pub version: String,
    /// Vendor.
    pub vendor: String,
    /// Acceptance level.
    pub acceptance: AcceptanceLevel,
}

impl VibIdentity {
    /// The identity a real VIB's descriptor declares.
    pub fn of(xml: &VibXml) -> VibIdentity {
        VibIdentity {
            name: xml.name.clone(),
            version: xml.version.clone(),
            vendor: xml.vendor.clone(),
            acceptance: xml.acceptance,
        }
    }
}

impl std::fmt::Display for VibIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} by {} ({})",
            self.name, self.version, self.vendor, self.acceptance
        )
    }
}

/// Where a [`PrefixCheck`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Still reading the prefix.
    Pending,
    /// Not a real VIB: opaque bytes, nothing checked.
    Opaque,
    /// A real VIB naming the expected identity.
    Matches,
}

/// The incremental check; see the module documentation.
#[derive(Debug, Clone)]
pub struct PrefixCheck {
    expected: VibIdentity,
    max_descriptor: u64,
    buf: Vec<u8>,
    /// Bytes fed so far (the stream offset).
    fed: u64,
    /// How many bytes the prefix needs: the ar header, then the whole first member.
    need: usize,
    verdict: Verdict,
}

impl PrefixCheck {
    /// A check expecting `expected`.
    pub fn new(expected: VibIdentity, limits: &Limits) -> PrefixCheck {
        PrefixCheck {
            expected,
            max_descriptor: limits.max_descriptor,
            buf: Vec::new(),
            fed: 0,
            need: ar::MAGIC.len() + HEADER_LEN,
            verdict: Verdict::Pending,
        }
    }

    /// The identity it expects.
    pub fn expected(&self) -> &VibIdentity {
        &self.expected
    }

    /// Bytes fed so far.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// Counts `n` bytes as seen without looking at them: for bytes past the prefix once the
    /// verdict is in (a resumed download whose header was re-read from disk).
    pub fn skip(&mut self, n: u64) {
        if self.verdict != Verdict::Pending {
            self.fed += n;
        }
    }

    /// Where the check stands.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Feeds the next bytes of the blob. Refuses as soon as the VIB names another identity or
    /// its first member is malformed.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Verdict, VibError> {
        self.fed += bytes.len() as u64;
        if self.verdict != Verdict::Pending {
            return Ok(self.verdict);
        }
        let mut rest = bytes;
        while self.verdict == Verdict::Pending && !rest.is_empty() {
            let take = (self.need - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            self.step()?;
        }
        Ok(self.verdict)
    }

    fn step(&mut self) -> Result<(), VibError> {
        let magic = ar::MAGIC.len();
        let upto = self.buf.len().min(magic);
        if self.buf[..upto] != ar::MAGIC[..upto] {
            return self.opaque();
        }
        if self.buf.len() < self.need {
            return Ok(());
        }
        if self.need == magic + HEADER_LEN {
            let Ok(h) = ar::parse_header(&self.buf[magic..], magic as u64) else {
                // Not a member header a VIB would have: not a VIB.
                return self.opaque();
            };
            if h.name != "descriptor.xml" {
                return self.opaque();
            }
            if h.size > self.max_descriptor {
                return Err(VibError::TooLarge {
                    what: format!("descriptor.xml ({} bytes)", h.size),
                    limit: self.max_descriptor,
                });
            }
            self.need += h.size as usize;
            if self.buf.len() < self.need {
                return Ok(());
            }
        }
        let xml = VibXml::parse(&self.buf[magic + HEADER_LEN..self.need])?;
        let found = VibIdentity::of(&xml);
        self.buf = Vec::new();
        if found != self.expected {
            return Err(VibError::Descriptor(format!(
                "the VIB's own descriptor.xml names {found}, but its signed vibstage descriptor names {}",
                self.expected
            )));
        }
        self.verdict = Verdict::Matches;
        Ok(())
    }

    fn opaque(&mut self) -> Result<(), VibError> {
        self.buf = Vec::new();
        self.verdict = Verdict::Opaque;
        Ok(())
    }

    /// At the end of the blob: a real VIB must have shown its whole descriptor by then.
    pub fn finish(&mut self) -> Result<Verdict, VibError> {
        if self.verdict == Verdict::Pending {
            if self.need > ar::MAGIC.len() + HEADER_LEN {
                return Err(VibError::Ar {
                    offset: self.fed,
                    detail: "the blob ends inside descriptor.xml".into(),
                });
            }
            self.opaque()?;
        }
        Ok(self.verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vib(name: &str) -> Vec<u8> {
        let xml = format!(
            "<vib version=\"5.0\"><type>bootbank</type><name>{name}</name><version>1.0</version>\
             <vendor>acme</vendor><acceptance-level>partner</acceptance-level></vib>"
        );
        let mut v = ar::MAGIC.to_vec();
        v.extend(
            format!(
                "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                "descriptor.xml",
                0,
                0,
                0,
                644,
                xml.len()
            )
            .bytes(),
        );
        v.extend(xml.bytes());
        v.extend(b"\nrest of the archive");
        v
    }

    fn expected(name: &str) -> VibIdentity {
        VibIdentity {
            name: name.into(),
            version: "1.0".into(),
            vendor: "acme".into(),
            acceptance: AcceptanceLevel::Partner,
        }
    }

    #[test]
    fn checks_byte_by_byte_and_in_one_chunk() {
        let bytes = vib("foo");
        let mut one = PrefixCheck::new(expected("foo"), &Limits::default());
        assert_eq!(one.feed(&bytes).expect("feed"), Verdict::Matches);
        let mut each = PrefixCheck::new(expected("foo"), &Limits::default());
        for b in &bytes {
            each.feed(std::slice::from_ref(b)).expect("feed");
        }
        assert_eq!(each.finish().expect("finish"), Verdict::Matches);
        let mut other = PrefixCheck::new(expected("bar"), &Limits::default());
        let e = other.feed(&bytes).expect_err("names disagree");
        assert!(e.to_string().contains("names foo 1.0 by acme"), "{e}");
    }

    #[test]
    fn other_blobs_are_opaque() {
        let mut c = PrefixCheck::new(expected("x"), &Limits::default());
        assert_eq!(c.feed(b"just bytes").expect("feed"), Verdict::Opaque);
        let mut deb = PrefixCheck::new(expected("x"), &Limits::default());
        let mut bytes = ar::MAGIC.to_vec();
        bytes.extend(
            format!(
                "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                "debian-binary", 0, 0, 0, 644, 4
            )
            .bytes(),
        );
        assert_eq!(deb.feed(&bytes).expect("feed"), Verdict::Opaque);
        let mut short = PrefixCheck::new(expected("x"), &Limits::default());
        short.feed(b"!<ar").expect("feed");
        assert_eq!(short.finish().expect("finish"), Verdict::Opaque);
        let mut cut = PrefixCheck::new(expected("foo"), &Limits::default());
        cut.feed(&vib("foo")[..100]).expect("feed");
        assert!(cut.finish().is_err());
    }
}
