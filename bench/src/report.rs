//! The table: one row per measure, with the vibstage figure, the baseline measured in the same
//! run, their ratio, the target and whether it is met. Also the few statistics used
//! (medians, percentiles) and the number formats.

use std::fmt::Write as _;

/// Whether a row meets its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Met {
    /// Target met.
    Yes,
    /// Target missed.
    No,
    /// A limit measured for context; no target.
    Info,
}

impl Met {
    /// `yes` when `ok`, else `NO`.
    pub fn from(ok: bool) -> Met {
        if ok { Met::Yes } else { Met::No }
    }

    fn as_str(self) -> &'static str {
        match self {
            Met::Yes => "yes",
            Met::No => "**NO**",
            Met::Info => "",
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    /// `P1`..`P6`.
    pub figure: &'static str,
    /// What is measured.
    pub measure: String,
    /// vibstage's figure.
    pub vibstage: String,
    /// The baseline's figure (or `-`).
    pub baseline: String,
    /// The ratio the target is about (or `-`).
    pub ratio: String,
    /// The target (or `-`).
    pub target: String,
    /// Met?
    pub met: Met,
}

impl Row {
    /// A row; `ratio` and `target` may be empty.
    pub fn new(
        figure: &'static str,
        measure: impl Into<String>,
        vibstage: impl Into<String>,
        baseline: impl Into<String>,
        ratio: impl Into<String>,
        target: impl Into<String>,
        met: Met,
    ) -> Self {
        let dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
        Row {
            figure,
            measure: measure.into(),
            vibstage: dash(vibstage.into()),
            baseline: dash(baseline.into()),
            ratio: dash(ratio.into()),
            target: dash(target.into()),
            met,
        }
    }
}

/// The rows as a Markdown table (readable as plain text too).
pub fn table(rows: &[Row]) -> String {
    let header = [
        "figure", "measure", "vibstage", "baseline", "ratio", "target", "met?",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.figure.to_owned(),
                r.measure.clone(),
                r.vibstage.clone(),
                r.baseline.clone(),
                r.ratio.clone(),
                r.target.clone(),
                r.met.as_str().to_owned(),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[String]| {
        out.push('|');
        for (c, w) in row.iter().zip(width) {
            let _ = write!(out, " {c:<w$} |");
        }
        out.push('\n');
    };
    line(&mut out, &header.map(str::to_owned));
    out.push('|');
    for w in width {
        let _ = write!(out, "{}|", "-".repeat(w + 2));
    }
    out.push('\n');
    for row in &cells {
        line(&mut out, row);
    }
    out
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0–100, nearest rank) of sorted `values`; 0 for none.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `1.234 s`, or `12.3 ms` below a second.
pub fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// `123.4 MiB`.
pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
}

/// `123 MiB/s` for `bytes` in `secs`.
pub fn rate(bytes: f64, secs: f64) -> String {
    format!("{:.0} MiB/s", bytes / (1u64 << 20) as f64 / secs.max(1e-9))
}

/// `0.62×`.
pub fn ratio(r: f64) -> String {
    format!("{r:.2}×")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&[Row::new("P1", "x", "1", "", "", "", Met::Info)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{t}");
        assert!(lines[2].contains("| -"), "{t}");
    }
}
