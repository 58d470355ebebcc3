//! A small, bounded XML tree over quick-xml, for the VIB and bundle documents.
//!
//! Documents from VIBs and bundles are small (a descriptor is a few KiB), so each is read whole
//! into an [`Element`] tree: simpler to query than an event stream, and bounded here — at most
//! [`MAX_DEPTH`] levels and [`MAX_NODES`] elements, no DOCTYPE (so no entity definitions and no
//! external entities), only the five predefined entities and character references.

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

/// Deepest nesting accepted (real descriptors nest five levels).
pub const MAX_DEPTH: usize = 32;
/// Most elements accepted in one document (a descriptor's file list can hold thousands).
pub const MAX_NODES: usize = 200_000;

/// One XML element: its local name, attributes, text and children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    /// Local name (namespace prefix dropped).
    pub name: String,
    /// Attributes in document order, values unescaped.
    pub attrs: Vec<(String, String)>,
    /// The element's own text (children's text excluded), unescaped.
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<Element>,
}

impl Element {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The trimmed text of the first child named `name`.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }

    /// An attribute's value.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn start(e: &BytesStart<'_>) -> Result<Element, String> {
    let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|err| format!("bad attribute in <{name}>: {err}"))?;
        let key = String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned();
        if attrs.iter().any(|(k, _)| *k == key) {
            return Err(format!("attribute {key} given twice in <{name}>"));
        }
        let value = a
            .unescape_value()
            .map_err(|err| format!("bad value of attribute {key} in <{name}>: {err}"))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        name,
        attrs,
        ..Element::default()
    })
}

/// Parses `bytes` (UTF-8 XML) into its root element. Errors say what is wrong and where.
pub fn parse(bytes: &[u8]) -> Result<Element, String> {
    let mut reader = Reader::from_reader(bytes);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut nodes = 0usize;
    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|e| format!("malformed XML at byte {at}: {e}"))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                nodes += 1;
                if nodes > MAX_NODES {
                    return Err(format!("more than {MAX_NODES} elements"));
                }
                if root.is_some() {
                    return Err(format!("content after the root element at byte {at}"));
                }
                let el = start(e)?;
                if matches!(event, Event::Empty(_)) {
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(el),
                        None => root = Some(el),
                    }
                } else {
                    if stack.len() >= MAX_DEPTH {
                        return Err(format!("elements nested deeper than {MAX_DEPTH}"));
                    }
                    stack.push(el);
                }
            }
            Event::End(_) => {
                let Some(el) = stack.pop() else {
                    return Err(format!("unexpected end tag at byte {at}"));
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                let text = t
                    .decode()
                    .map_err(|e| format!("bad text at byte {at}: {e}"))?;
                match stack.last_mut() {
                    Some(el) => el.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(format!("text outside the root element at byte {at}")),
                }
            }
            Event::CData(t) => {
                let text = t
                    .decode()
                    .map_err(|e| format!("bad CDATA at byte {at}: {e}"))?;
                match stack.last_mut() {
                    Some(el) => el.text.push_str(&text),
                    None => return Err(format!("CDATA outside the root element at byte {at}")),
                }
            }
            Event::GeneralRef(r) => {
                let resolved = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .ok()
                        .flatten()
                        .ok_or_else(|| format!("bad character reference at byte {at}"))?
                } else {
                    let name = r.decode().map_err(|e| format!("bad entity: {e}"))?;
                    match name.as_ref() {
                        "amp" => '&',
                        "lt" => '<',
                        "gt" => '>',
                        "apos" => '\'',
                        "quot" => '"',
                        other => {
                            return Err(format!("unknown entity &{other}; at byte {at}"));
                        }
                    }
                };
                match stack.last_mut() {
                    Some(el) => el.text.push(resolved),
                    None => return Err(format!("text outside the root element at byte {at}")),
                }
            }
            Event::DocType(_) => {
                return Err("a DOCTYPE is not accepted (no entity definitions)".into());
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err("the document ends inside an element".into());
    }
    root.ok_or_else(|| "no root element".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_attributes_and_entities() {
        let root = parse(
            br#"<?xml version="1.0"?><vib version="5.0"><name>a&amp;b&#x41;</name><x k="1 &lt; 2"/></vib>"#,
        )
        .expect("parse");
        assert_eq!(root.name, "vib");
        assert_eq!(root.attr("version"), Some("5.0"));
        assert_eq!(root.child_text("name"), Some("a&bA"));
        assert_eq!(root.child("x").and_then(|x| x.attr("k")), Some("1 < 2"));
    }

    #[test]
    fn refuses_what_is_not_one_well_formed_document() {
        for bad in [
            &b""[..],
            b"<a>",
            b"<a></b>",
            b"<a/><b/>",
            b"<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>",
            b"<a>&unknown;</a>",
            b"<a x='1' x='2'/>",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert!(parse(deep.as_bytes()).is_err());
    }
}
