//! The `ar` container of a `.vib`: the global header and the 60-byte member headers.
//!
//! Common (System V / GNU) format: `!<arch>\n`, then per member a header of name (16 bytes,
//! space-padded, GNU's trailing `/` allowed), mtime, uid, gid, mode, decimal size (10 bytes) and
//! "`\n", then the data, padded with `\n` to an even length. VIB member names are short, so the
//! long-name tables (GNU `//`, BSD `#1/`) and symbol tables are refused rather than interpreted.

use super::{VibError, check_member_name};

/// The archive's first eight bytes.
pub const MAGIC: &[u8; 8] = b"!<arch>\n";
/// Size of a member header.
pub const HEADER_LEN: usize = 60;

/// One member header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHeader {
    /// The member name, checked by [`check_member_name`].
    pub name: String,
    /// Data bytes (without the padding byte).
    pub size: u64,
}

impl MemberHeader {
    /// Data plus the padding byte that keeps members at even offsets.
    pub fn padded_size(&self) -> u64 {
        self.size + (self.size & 1)
    }
}

/// Parses the header found at byte `offset` of the archive.
pub fn parse_header(h: &[u8], offset: u64) -> Result<MemberHeader, VibError> {
    let bad = |detail: String| VibError::Ar { offset, detail };
    if h.len() != HEADER_LEN {
        return Err(bad(format!("member header is {} bytes, not 60", h.len())));
    }
    if &h[58..60] != b"`\n" {
        return Err(bad("member header does not end with \"`\\n\"".into()));
    }
    let raw = std::str::from_utf8(&h[..16])
        .map_err(|_| bad("member name is not ASCII".into()))?
        .trim_end_matches(' ');
    if raw.starts_with('/') || raw.starts_with("#1/") {
        return Err(bad(format!(
            "member {raw:?}: symbol and long-name tables are not used by VIBs"
        )));
    }
    let name = raw.strip_suffix('/').unwrap_or(raw);
    check_member_name(name)?;
    let size_text = std::str::from_utf8(&h[48..58])
        .map_err(|_| bad("member size is not ASCII".into()))?
        .trim_end_matches(' ');
    if size_text.is_empty() || !size_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(format!(
            "member {name:?} has a size that is not a decimal number: {size_text:?}"
        )));
    }
    let size = size_text
        .parse::<u64>()
        .map_err(|_| bad(format!("member {name:?} size out of range")))?;
    Ok(MemberHeader {
        name: name.to_owned(),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, size: &str) -> Vec<u8> {
        format!("{name:<16}{:<12}{:<6}{:<6}{:<8}{size:<10}`\n", 0, 0, 0, 644).into_bytes()
    }

    #[test]
    fn parses_gnu_and_plain_names() {
        let h = parse_header(&header("descriptor.xml/", "123"), 8).expect("header");
        assert_eq!(h.name, "descriptor.xml");
        assert_eq!(h.size, 123);
        assert_eq!(h.padded_size(), 124);
        assert_eq!(
            parse_header(&header("sig.pkcs7", "0"), 8)
                .expect("header")
                .name,
            "sig.pkcs7"
        );
    }

    #[test]
    fn refuses_bad_headers() {
        assert!(parse_header(&header("../etc/passwd", "1"), 8).is_err());
        assert!(parse_header(&header("//", "1"), 8).is_err());
        assert!(parse_header(&header("#1/20", "1"), 8).is_err());
        assert!(parse_header(&header("x", "-1"), 8).is_err());
        assert!(parse_header(&header("x", "99999999999"), 8).is_err());
        let mut h = header("x", "1");
        h[59] = b'x';
        assert!(parse_header(&h, 8).is_err());
    }
}
