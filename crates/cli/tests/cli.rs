//! The `tandem` binary as a user runs it.

use std::process::Command;

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

const EXAMPLE: &str = include_str!("../../../deploy/tandem.toml");

/// `tandem check` on a broken configuration exits non-zero and names each problem: an
/// unknown field, a missing credential variable, zero paths, a backfill of 9 minutes.
#[test]
fn check_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    let broken = EXAMPLE
        .replace("[stream.auth]", "[stream.auth]\ntoken_type = \"basic\"")
        .replace("paths = [\"a\", \"b\"]", "paths = []")
        .replace("window_minutes = 5", "window_minutes = 9");
    std::fs::write(&path, broken).unwrap();
    let out = tandem()
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("GNIP_PASSWORD")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("stream[0].auth.token_type: unknown field"),
        "{text}"
    );
    assert!(
        text.contains("stream[0].auth.password_env: environment variable GNIP_PASSWORD is not set"),
        "{text}"
    );
    assert!(text.contains("stream[0].paths: zero paths"), "{text}");
    assert!(
        text.contains("stream[0].backfill.window_minutes: 9 minutes"),
        "{text}"
    );
    assert!(
        text.contains("line "),
        "problems carry their line where it can be found: {text}"
    );
}

/// A valid configuration prints the plan: streams, partitions, connections and paths.
#[test]
fn check_prints_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let out = tandem()
        .args(["check", "--config"])
        .arg(&path)
        .env("GNIP_PASSWORD", "x")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("partition 1 via path a: source 10.0.1.10"),
        "{text}"
    );
    assert!(text.contains("4 connections in all"), "{text}");
    assert!(!text.contains("\"x\""), "the password never shows");
}

/// `tandem run` refuses a broken configuration with exit code 2 and the problems.
#[test]
fn run_refuses_a_broken_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, EXAMPLE.replace("partitions = 2", "partitions = 0")).unwrap();
    let out = tandem()
        .args(["run", "--config"])
        .arg(&path)
        .env("GNIP_PASSWORD", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stream[0].partitions"));
}

/// Runs a 10 s `tandem demo` with `extra` arguments under `dir`; its report, once it
/// exited successfully with nothing lost or duplicated.
fn short_demo(dir: &std::path::Path, extra: &[&str]) -> String {
    let out = tandem()
        .args([
            "demo",
            "--duration",
            "10s",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("verdict: nothing lost, nothing duplicated"),
        "{text}"
    );
    text
}

/// A short demo runs end to end and reports, from the simulator's ground truth, that
/// nothing was lost or duplicated.
#[test]
fn demo_reports_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let text = short_demo(dir.path(), &[]);
    assert!(text.contains("fault: drop path a of partition 1"), "{text}");
    assert!(
        text.contains("alert firing: partition_down decahose/1"),
        "{text}"
    );
    assert!(
        text.contains("alert resolved: partition_down decahose/1"),
        "{text}"
    );
    let log = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("tandem.log");
    assert!(
        std::fs::metadata(log).unwrap().len() > 0,
        "the run logs to its directory"
    );
}

/// `tandem demo --api v2` runs the same faults against the simulator's X API v2
/// partitioned sample stream (bearer token, 20 s heartbeats), nothing lost.
#[test]
fn demo_against_x_api_v2() {
    let dir = tempfile::tempdir().unwrap();
    let text = short_demo(dir.path(), &["--api", "v2"]);
    assert!(
        text.contains("alert resolved: partition_down sample10/1"),
        "{text}"
    );
}

/// A proxy URL with a password in it: `tandem check` shows where the path goes, never
/// the password.
#[test]
fn check_never_prints_credentials_in_urls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let with_proxy = EXAMPLE.replace(
        "# proxy = \"http://egress-b.internal:3128\"",
        "proxy = \"http://egress:hunter2@egress-b.internal:3128\"",
    );
    assert!(with_proxy.contains("hunter2"));
    std::fs::write(&path, with_proxy).unwrap();
    let out = tandem()
        .args(["check", "--config"])
        .arg(&path)
        .env("GNIP_PASSWORD", "x")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("proxy http://***@egress-b.internal:3128"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

/// A sink directory that is a regular file is a configuration problem `tandem check`
/// names by field, not a start-up failure.
#[test]
fn check_names_a_sink_directory_that_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let path = dir.path().join("file-as-dir.toml");
    let text = EXAMPLE.replace(
        "dir = \"/var/lib/tandem/data\"",
        &format!("dir = \"{}\"", file.display()),
    );
    std::fs::write(&path, text).unwrap();
    let out = tandem()
        .args(["check", "--config"])
        .arg(&path)
        .env("GNIP_PASSWORD", "x")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("sinks.files.dir") && text.contains("is not a directory"),
        "{text}"
    );
}

/// A monitor port already taken stops `tandem run` with one message that names the
/// field and says the OS error once.
#[test]
fn run_names_a_taken_monitor_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = EXAMPLE
        .replace("listen = \"0.0.0.0:9464\"", &format!("listen = \"{addr}\""))
        .replace("/var/lib/tandem", &dir.path().display().to_string())
        .replace("source_address = \"10.0.1.10\"", "")
        .replace("source_address = \"10.0.2.10\"", "");
    let path = dir.path().join("taken.toml");
    std::fs::write(&path, text).unwrap();
    let out = tandem()
        .args(["run", "--config"])
        .arg(&path)
        .env("GNIP_PASSWORD", "x")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("monitor.listen {addr}")), "{err}");
    assert_eq!(err.matches("in use").count(), 1, "the OS error once: {err}");
}
