//! `make soak`, scaled down: a hundred thousand requests per store through Envoy + plugin +
//! service, with a memory store far smaller than the number of reports (the size at which
//! remembered report ids used to fill it and stop all accounting). Every balance must be exact,
//! nothing dropped, and the stores bounded by the users, not the requests; with the spend ledger
//! in a real PostgreSQL, `/v1/spend` equals what was served for each of 100 users and 10 models.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::process::Command;

#[test]
fn tens_of_thousands_of_reports_are_charged_exactly_on_a_small_store() {
    let bin = std::env::var_os("BENCH_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| testkit::repo().join("target/release/bench"));
    let out = Command::new(&bin)
        .args(["--soak", "--requests", "100000", "--max-counters", "1000"])
        .args(["--users", "100", "--connections", "16"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run `make build`)", bin.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With the spend ledger, its per-user and per-model totals must match too (10 models).
    for store in ["memory", "redis", "redis + ledger"] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {store} | 100000 |")))
            .unwrap_or_else(|| panic!("{store}: not every request was served:\n{text}"));
        assert!(row.contains("| yes | 0 | 0 |"), "{row}");
        // Counters (memory) or keys (Redis): the 100 users' counters and a few per plugin VM.
        let keys: u64 = row.split('|').nth(8).unwrap().trim().parse().unwrap();
        assert!((100..=110).contains(&keys), "{row}");
    }
}
