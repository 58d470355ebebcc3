//! Version strings compared as SPEC §2 says: segment by segment, split on `.` and `-`, numeric
//! segments as numbers, others as text.

use std::cmp::Ordering;
use std::fmt;

/// A version string with the SPEC's ordering. Any non-empty string is a version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Version(String);

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Segment<'a> {
    // Numbers sort before text when the two kinds meet at the same position.
    Num(u128),
    Text(&'a str),
}

fn segments(v: &str) -> impl Iterator<Item = Segment<'_>> {
    v.split(['.', '-']).map(|s| match s.parse::<u128>() {
        Ok(n) if s.bytes().all(|b| b.is_ascii_digit()) => Segment::Num(n),
        _ => Segment::Text(s),
    })
}

impl From<String> for Version {
    fn from(text: String) -> Self {
        Version(text)
    }
}

impl Version {
    /// The version as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        // A longer version whose common prefix is equal is the newer one: 8.0.2 < 8.0.2.1.
        segments(&self.0)
            .cmp(segments(&other.0))
            .then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Version {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::from(s)
    }

    #[test]
    fn numeric_segments_compare_as_numbers() {
        assert!(v("8.0.10") > v("8.0.9"));
        assert!(v("8.0.2-0.20") > v("8.0.2-0.3"));
        assert!(v("8.0.2-0.20") < v("8.0.3-0.1"));
        assert!(v("8.0.2") < v("8.0.2.1"));
        assert_eq!(v("8.0.2").cmp(&v("8.0.2")), Ordering::Equal);
    }

    #[test]
    fn text_segments_compare_as_text() {
        assert!(v("1.0-beta") < v("1.0-rc"));
        assert!(v("1.0-1") < v("1.0-a"));
    }
}
