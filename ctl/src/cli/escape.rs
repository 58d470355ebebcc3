//! Text that came from a host, made safe for a terminal (issue 18, item 5).
//!
//! A host can put anything in the strings it answers with: host and task ids, steps, error
//! messages, notification codes. Printed raw, an escape sequence sets the window title or clears
//! the screen, a newline starts a fake `host-X: succeeded` line, a bidi override reorders what the
//! operator reads. Everything from a host goes through [`escape`] before it reaches stdout, stderr
//! or a progress bar: control characters (C0, DEL, C1), Unicode format characters (bidi
//! overrides, zero-width characters) and the backslash become visible escapes, so the printed
//! text is unambiguous, stays on one line and is at most a bounded number of characters long.
//! `--json` output gets the same treatment inside JSON strings ([`escape_json_text`]).

use std::fmt::Write as _;

/// Whether `c` must not reach a terminal as itself.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200B}'..='\u{200F}'   // zero-width space/joiners, LRM, RLM
            | '\u{2028}'..='\u{202E}' // line/paragraph separators, bidi embeddings and overrides
            | '\u{2060}'..='\u{2069}' // word joiner, invisible operators, bidi isolates
            | '\u{FEFF}'              // zero-width no-break space
            | '\u{FFF9}'..='\u{FFFB}' // interlinear annotations
        )
}

/// `text` with every character that could steer a terminal written as a visible escape
/// (`\x1b`, `\n`, `\u{202e}`, `\\`), cut after `max_chars` characters with a note saying how
/// much was left out.
pub fn escape(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars.saturating_mul(4)));
    for (shown, (at, c)) in text.char_indices().enumerate() {
        if shown >= max_chars {
            let _ = write!(out, "… ({} more bytes)", text.len() - at);
            return out;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe(c) && (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Serialised JSON text with the characters serde_json leaves raw but a terminal would act on
/// (DEL, C1 controls, bidi and zero-width characters) written as `\uXXXX`. They can only occur
/// inside JSON strings, so the result is the same JSON value.
pub fn escape_json_text(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if is_unsafe(c) && !matches!(c, '\n' | '\t' | '\r') {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{:04x}", unit);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible_escapes() {
        let hostile = "\x1b]0;pwned\x07\x1b[2J\nhost-X: succeeded\u{9b}31m\u{202e}txt\\";
        let shown = escape(hostile, 1000);
        assert_eq!(
            shown,
            "\\x1b]0;pwned\\x07\\x1b[2J\\nhost-X: succeeded\\x9b31m\\u{202e}txt\\\\"
        );
        assert!(!shown.chars().any(is_unsafe));
        assert_eq!(escape("esx-01 ünïcode", 100), "esx-01 ünïcode");
    }

    #[test]
    fn long_text_is_cut_with_a_note() {
        let shown = escape(&"a".repeat(5000), 10);
        assert_eq!(shown, "aaaaaaaaaa… (4990 more bytes)");
        assert_eq!(escape("abc", 3), "abc");
    }

    #[test]
    fn json_text_stays_the_same_value() {
        let value = serde_json::json!({"id": "a\u{7f}b\u{9b}c\u{202e}d\u{1b}"});
        let text = escape_json_text(&serde_json::to_string(&value).expect("json"));
        assert!(!text.chars().any(|c| is_unsafe(c) && c != '\n'), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).expect("still JSON");
        assert_eq!(back, value);
    }
}
