//! Loading the documented example and broken configurations.

use tandem_config::*;

const EXAMPLE: &str = include_str!("../../../deploy/tandem.toml");

fn env_with_password(name: &str) -> Option<String> {
    (name == "GNIP_PASSWORD").then(|| "pw".to_owned())
}

/// The example Decahose deployment loads, and survives a serialize/parse round trip.
#[test]
fn example_round_trips() {
    let loaded = load(EXAMPLE, &env_with_password).unwrap_or_else(|p| panic!("{p}"));
    let c = &loaded.config;
    assert_eq!(c.streams[0].name, "decahose");
    assert_eq!(c.streams[0].partitions, 2);
    assert_eq!(c.paths.len(), 2);
    assert!(matches!(loaded.auth[0], tandem_conn::Auth::Basic { .. }));
    let text = toml::to_string(c).unwrap();
    let again = load(&text, &env_with_password).unwrap_or_else(|p| panic!("{p}\n{text}"));
    assert_eq!(toml::to_string(&again.config).unwrap(), text);
    let plan = plan(&loaded);
    assert!(
        plan.contains("partition 2 via path b: source 10.0.2.10"),
        "{plan}"
    );
    assert!(plan.contains("4 connections in all"), "{plan}");
}

/// A broken configuration names every problem with its field (and line where found).
#[test]
fn every_problem_is_named() {
    let broken = EXAMPLE
        .replace("jitter = true", "jitter = true\nretry_foreever = 1")
        .replace("paths = [\"a\", \"b\"]", "paths = []")
        .replace("window_minutes = 5", "window_minutes = 9");
    let problems = load(&broken, &|_| None).unwrap_err();
    let text = problems.to_string();
    let fields: Vec<&str> = problems.0.iter().map(|p| p.field.as_str()).collect();
    assert!(fields.contains(&"stream[0].retry.retry_foreever"), "{text}");
    let unknown = problems
        .0
        .iter()
        .find(|p| p.field == "stream[0].retry.retry_foreever")
        .unwrap();
    assert!(unknown.message.contains("unknown field"), "{text}");
    assert_eq!(
        unknown.line,
        Some(
            broken
                .lines()
                .position(|l| l.starts_with("retry_foreever"))
                .unwrap()
                + 1
        )
    );
    assert!(fields.contains(&"stream[0].paths"), "{text}");
    assert!(text.contains("zero paths"), "{text}");
    assert!(
        fields.contains(&"stream[0].backfill.window_minutes"),
        "{text}"
    );
    assert!(text.contains("9 minutes"), "{text}");
    assert!(fields.contains(&"stream[0].auth.password_env"), "{text}");
    assert!(text.contains("GNIP_PASSWORD is not set"), "{text}");
}

/// Several unknown fields in different places are all reported, not just the first.
#[test]
fn unknown_fields_are_all_collected() {
    let broken = EXAMPLE
        .replace("[merge]", "[merge]\nbogus = 1")
        .replace("kind = \"file\"", "kind = \"file\"\ncolour = \"red\"");
    let problems = load(&broken, &env_with_password).unwrap_err();
    let fields: Vec<&str> = problems.0.iter().map(|p| p.field.as_str()).collect();
    assert!(fields.contains(&"merge.bogus"), "{problems}");
    assert!(
        fields
            .iter()
            .any(|f| f.starts_with("sinks.files") && f.ends_with("colour")),
        "{problems}"
    );
}

/// Secrets come from a file or the environment and never appear in debug output.
#[test]
fn secrets_from_files_never_print() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "hunter2\n").unwrap();
    let text = EXAMPLE.replace(
        "password_env = \"GNIP_PASSWORD\"",
        &format!("password_file = {:?}", file.display().to_string()),
    );
    let loaded = load(&text, &|_| None).unwrap_or_else(|p| panic!("{p}"));
    let tandem_conn::Auth::Basic { password, .. } = &loaded.auth[0] else {
        panic!()
    };
    assert_eq!(password.read().unwrap().expose(), "hunter2");
    assert!(!format!("{loaded:?}").contains("hunter2"));
    // The file stays the source: a rotated password is what the next request sends.
    std::fs::write(&file, "rotated\n").unwrap();
    assert_eq!(password.read().unwrap().expose(), "rotated");
}

/// Syntax errors give the line.
#[test]
fn syntax_errors_have_lines() {
    let problems = load("[[stream]]\nname = \"x\"\nurl = \n", &|_| None).unwrap_err();
    assert_eq!(problems.0[0].line, Some(3), "{problems}");
}

/// The dedup window must outlast the backfill window.
#[test]
fn dedup_window_must_exceed_backfill() {
    let short = EXAMPLE.replace("dedup_window_secs = 900", "dedup_window_secs = 300");
    let problems = load(&short, &env_with_password).unwrap_err();
    assert_eq!(problems.0[0].field, "merge.dedup_window_secs");
    assert!(problems.0[0].message.contains("backfill"), "{problems}");
}

/// docs/config.md is generated from the field docs; it must match the code.
#[test]
fn reference_is_up_to_date() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/config-reference"
    );
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("--check")
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sink name that would leave the spool directory (`..`, `/`) is refused by name.
#[test]
fn sink_names_cannot_escape_the_spool_directory() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/tandem.toml"
    ))
    .unwrap()
    .replace("[sinks.files]", "[sinks.\"../../etc\"]")
    .replace("sink = \"files\"", "sink = \"../../etc\"");
    let err = tandem_config::load(&text, &|_| Some("x".to_owned())).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("sinks.../../etc") && text.contains("a sink name uses letters"),
        "{text}"
    );
}

/// Plain HTTP is a test peer's transport: refused, by field, for a host that is not
/// loopback, even with `allow_plain_http`; accepted for 127.0.0.1.
#[test]
fn plain_http_only_to_loopback() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/tandem.toml"
    ))
    .unwrap();
    let https =
        "https://gnip-stream.x.com/stream/sample10/accounts/ACME/publishers/twitter/prod.json";
    assert!(example.contains(https));
    let remote = example
        .replace(https, "http://gnip-stream.x.com/stream/prod.json")
        .replace("[stream.auth]", "allow_plain_http = true\n\n[stream.auth]");
    let err = tandem_config::load(&remote, &|_| Some("x".to_owned())).unwrap_err();
    assert!(
        err.to_string().contains("stream[0].allow_plain_http")
            && err.to_string().contains("gnip-stream.x.com"),
        "{err}"
    );
    let local = remote.replace("http://gnip-stream.x.com/", "http://127.0.0.1:8080/");
    if let Err(e) = tandem_config::load(&local, &|_| Some("x".to_owned())) {
        assert!(!e.to_string().contains("allow_plain_http"), "{e}");
    }
}
