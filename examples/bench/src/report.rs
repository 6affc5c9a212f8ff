//! The bench's output: Markdown tables and an SVG bar chart of the proxy throughput.

use std::fmt::Write as _;
use std::path::Path;

pub struct Row(Vec<String>);

impl Row {
    pub fn new(cells: Vec<String>) -> Row {
        Row(cells)
    }
}

pub struct Section {
    title: String,
    header: Vec<String>,
    rows: Vec<Row>,
    notes: Vec<String>,
    /// (label, value) bars for the chart.
    pub chart: Vec<(String, f64)>,
}

impl Section {
    pub fn new(title: &str, header: &[&str]) -> Section {
        Section {
            title: title.into(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
            chart: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    pub fn note(&mut self, text: String) {
        self.notes.push(text);
    }
}

/// The median of a non-empty series (0 for an empty one).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

pub fn markdown(sections: &[Section], smoke: bool) -> String {
    let mut out = String::from("# llm-token-ratelimit benchmark\n\n");
    let _ = writeln!(
        out,
        "{} on {} CPU(s), loopback; medians of interleaved rounds.\n",
        if smoke {
            "Smoke run (harness check, numbers meaningless)"
        } else {
            "Full run"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for s in sections {
        let _ = writeln!(out, "## {}\n", s.title);
        let _ = writeln!(out, "| {} |", s.header.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(s.header.len()));
        for r in &s.rows {
            let _ = writeln!(out, "| {} |", r.0.join(" | "));
        }
        for n in &s.notes {
            let _ = writeln!(out, "\n{n}");
        }
        out.push('\n');
    }
    out
}

/// A horizontal bar chart, one bar per (label, value).
pub fn svg(title: &str, bars: &[(String, f64)]) -> String {
    let (width, bar_h, gap, left, top) = (760.0, 26.0, 10.0, 250.0, 40.0);
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    let height = top + bars.len() as f64 * (bar_h + gap) + 20.0;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="24" font-size="15" font-weight="bold">{}</text>
"#,
        escape(title)
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = top + i as f64 * (bar_h + gap);
        let w = (width - left - 90.0) * value / max;
        let _ = writeln!(
            out,
            r##"<text x="{x}" y="{ty}" text-anchor="end">{label}</text><rect x="{left}" y="{y}" width="{w:.1}" height="{bar_h}" fill="{fill}"/><text x="{vx:.1}" y="{ty}">{value:.0}</text>"##,
            x = left - 8.0,
            ty = y + bar_h * 0.7,
            label = escape(label),
            fill = if label.contains("plugin") {
                "#d9822b"
            } else {
                "#4a78b5"
            },
            vx = left + w + 6.0,
        );
    }
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn write(dir: &Path, markdown: &str, proxy: &Section) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.md"), markdown)?;
    std::fs::write(
        dir.join("chart.svg"),
        svg(
            "Requests per second (median), Envoy --concurrency 1",
            &proxy.chart,
        ),
    )
}
