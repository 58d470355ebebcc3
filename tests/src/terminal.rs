//! `vibstagectl` on a terminal: `script(1)` gives it a pseudo-terminal of 120 columns, and the
//! capture is turned back into the lines a person would have seen go by.

use std::path::Path;
use std::process::Command;

use crate::vibstagectl;

/// Runs `vibstagectl ARGS` in `dir` through `script(1)` so that it sees a terminal of 120 columns; returns
/// everything written to it, raw (escape sequences included).
pub fn through_a_terminal(dir: &Path, args: &[String]) -> (Option<i32>, String) {
    let quoted: Vec<String> = std::iter::once(vibstagectl().display().to_string())
        .chain(args.iter().cloned())
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let inner = format!("stty cols 120 rows 40; {}", quoted.join(" "));
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &inner, "/dev/null"])
        .current_dir(dir)
        .output()
        .expect("run script(1)");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The text of a terminal capture without escape sequences; carriage returns become newlines,
/// so every redraw of a bar is a line of its own.
pub fn screen_lines(raw: &str) -> Vec<String> {
    let mut text = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\r' => text.push('\n'),
            c => text.push(c),
        }
    }
    // indicatif fills each bar line to the width and lets the terminal wrap it: cut the lines
    // at the 120 columns of the capture's terminal.
    let chars: Vec<Vec<char>> = text.lines().map(|l| l.chars().collect()).collect();
    chars
        .iter()
        .flat_map(|l| l.chunks(120).map(|c| c.iter().collect::<String>()))
        .map(|l| l.trim_end().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}
