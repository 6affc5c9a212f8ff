//! `make bench` cannot rot: its harness runs here on a few hundred requests (no timing is
//! asserted; the numbers of a smoke run mean nothing).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::process::Command;

#[test]
fn the_bench_harness_runs_and_reports() {
    let bin = std::env::var_os("BENCH_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| testkit::repo().join("target/release/bench"));
    let out = testkit::TempDir::new("bench");
    let status = Command::new(&bin)
        .arg("--smoke")
        .arg("--out")
        .arg(&out.0)
        .status()
        .unwrap_or_else(|e| panic!("{}: {e} (run `make build`)", bin.display()));
    assert!(status.success());
    let md = std::fs::read_to_string(out.0.join("results.md")).unwrap();
    for section in [
        "## Proxy overhead",
        "| Envoy + plugin, limited |",
        "| Envoy + plugin, not matched |",
        "| Envoy + plugin, limited, SSE |",
        "## Memory",
        "## The rate-limit service alone",
        "| redis | report | 32 |",
        "## Accuracy under concurrency",
        "## Serving within the budget",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }
    // Reservations make admission exact: 10 requests of 100 tokens fit a budget of 1,000.
    assert!(
        md.contains("| \"max_tokens\" | 10 of 50 | 1000 | 0 | 0 |"),
        "{md}"
    );
    // Trimmed grants never add up past the budget; an ended stream passes it by one event.
    for (case, most) in [
        ("| `reserve.trim`: 50 concurrent", 0),
        ("| `stream_cutoff`: 1 stream", 10),
        ("| `reserve.trim`, upstream ignoring caps", 10 * 10),
    ] {
        let row = md
            .lines()
            .find(|l| l.starts_with(case))
            .unwrap_or_else(|| panic!("{case} missing:\n{md}"));
        let overshoot: u64 = row
            .trim_end_matches(" |")
            .rsplit("| ")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(overshoot <= most, "{row}");
    }
    // A refund that lands after its window does not enlarge the next one.
    let boundary = md
        .lines()
        .find(|l| l.starts_with("| \"max_tokens\", after a window boundary |"))
        .unwrap_or_else(|| panic!("boundary row missing:\n{md}"));
    assert!(boundary.ends_with("| 0 |"), "{boundary}");
    // The sustained run: every balance exact, nothing dropped or refused, on both stores.
    let sustained = md
        .split("## Sustained")
        .nth(1)
        .unwrap_or_else(|| panic!("sustained section missing:\n{md}"));
    for store in ["memory", "redis"] {
        let row = sustained
            .lines()
            .find(|l| l.starts_with(&format!("| {store} |")))
            .unwrap_or_else(|| panic!("{store} row missing:\n{sustained}"));
        assert!(row.contains("| yes | 0 | 0 |"), "{row}");
    }
    // No request failed in any proxy run (the errors and non-200 columns).
    for line in md
        .lines()
        .filter(|l| l.starts_with("| Envoy") && l.contains("×"))
    {
        assert!(line.ends_with("| 0 | 0 |"), "{line}");
    }
    let svg = std::fs::read_to_string(out.0.join("chart.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("Envoy + plugin, limited"));
}
