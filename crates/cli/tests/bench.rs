//! `tandem bench` end to end with small numbers: the report has every figure the README's
//! tables quote (the inflate floor, the ratios, the store's own ceiling, the fixed-rate
//! latency percentiles, the dedup window's memory), and each run stored what it was sent.
//! No figure is judged: these machines are shared, and the bench is for reading.

use std::path::Path;
use std::process::Command;

fn bench(work: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "--log",
            "error",
            "bench",
            "--xdk",
            "false",
            "--jetstream",
            "false",
        ])
        .arg("--work-dir")
        .arg(work)
        .args(args)
        .output()
        .expect("tandem bench runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tandem bench failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The numbers of a report row, after its label.
fn figures(report: &str, label: &str) -> Vec<String> {
    let row = report
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} row in\n{report}"));
    row[label.len()..]
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn number(s: &str) -> f64 {
    s.trim_end_matches('%')
        .parse()
        .unwrap_or_else(|_| panic!("{s:?} is not a number"))
}

#[test]
fn full_speed_report_has_the_floor_ratios_and_the_disk() {
    let work = tempfile::tempdir().expect("temp dir");
    let report = bench(
        work.path(),
        &["--activities", "3000", "--sinks", "null,file"],
    );
    assert!(report.contains("full speed"), "{report}");
    let floor = report
        .lines()
        .find_map(|l| l.strip_prefix("inflate floor: "))
        .unwrap_or_else(|| panic!("no floor in\n{report}"));
    assert!(number(floor.split_whitespace().next().unwrap_or("")) > 0.0);
    for label in ["null sink", "file sink"] {
        // raw/s, unique/s, store%, CPU-µs/raw, floor×, xdk÷, p50, p99, RSS, "MB", B/id, sim CPU
        let f = figures(&report, label);
        assert_eq!(f.len(), 12, "{label}: {f:?}");
        assert!(number(&f[0]) > 0.0 && number(&f[1]) > 0.0, "{label}: {f:?}");
        assert!(
            number(&f[4]) > 0.0,
            "{label}: the ratio to the floor: {f:?}"
        );
        assert!(number(&f[8]) > 0.0, "{label}: peak RSS: {f:?}");
        assert!(number(&f[10]) > 0.0, "{label}: bytes per id: {f:?}");
    }
    assert_eq!(figures(&report, "null sink")[2], "-");
    assert!(number(&figures(&report, "file sink")[2]) > 0.0, "{report}");
    assert!(report.contains("note: disk alone"), "{report}");
    assert!(
        report.contains(
            "note: dedup window: 15 minutes of Decahose at its peak (14000 posts/s) is 12.6 M ids"
        ),
        "{report}"
    );
}

#[test]
fn fixed_rate_report_has_latency_percentiles() {
    let work = tempfile::tempdir().expect("temp dir");
    let report = bench(
        work.path(),
        &["--activities", "2000", "--sinks", "null", "--rate", "4000"],
    );
    assert!(
        report.contains("offered 4000 raw/s (1000 per connection)"),
        "{report}"
    );
    // raw/s, CPU-µs/raw, floor×, then p50 / p99 / p999 to hand-off and to acknowledgement
    let f = figures(&report, "null sink");
    assert_eq!(f.len(), 15, "{f:?}");
    let handoff = [number(&f[3]), number(&f[5]), number(&f[7])];
    let acked = [number(&f[8]), number(&f[10]), number(&f[12])];
    assert!(handoff[0] > 0.0 && acked[0] > 0.0, "{f:?}");
    assert!(
        handoff.windows(2).all(|w| w[0] <= w[1]) && acked.windows(2).all(|w| w[0] <= w[1]),
        "percentiles in order: {f:?}"
    );
    assert!(acked[0] >= handoff[0], "acknowledged after handed: {f:?}");
}
