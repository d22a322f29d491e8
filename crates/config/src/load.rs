//! Loading: TOML syntax, the schema (collecting every unknown or mistyped field, not just
//! the first), the rules across fields, and credentials from the environment or files.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_path_to_error::Segment;
use tandem_conn::Auth;
use tandem_conn::config::InvalidSetting;
use tandem_core::{Secret, SecretSource};

use crate::schema::{ApiConfig, AuthConfig, Config, StreamConfig};

/// One problem: the field that causes it, what is wrong, and the line when it can be
/// found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
    pub line: Option<usize>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// Every problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A configuration ready to run: checked, with its credentials resolved.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// Credentials per stream, in stream order.
    pub auth: Vec<Auth>,
    /// Tokens of sinks that name one (`token_env` or `token_file`), by sink name.
    pub sink_tokens: BTreeMap<String, Secret>,
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        field: field.into(),
        message: message.into(),
        line: None,
    }
}

/// Reads and checks a configuration file, resolving credentials from the process
/// environment.
pub fn load_file(path: &Path) -> Result<Loaded, Problems> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Problems(vec![problem(
            path.display().to_string(),
            format!("cannot read: {e}"),
        )])
    })?;
    load(&text, &|name| std::env::var(name).ok())
}

/// Parses, checks and resolves credentials (`env` looks up environment variables).
pub fn load(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Loaded, Problems> {
    let (config, mut problems) = parse_lenient(text);
    let Some(config) = config else {
        locate(text, &mut problems);
        return Err(Problems(problems));
    };
    problems.extend(validate(&config));
    let mut auth = Vec::new();
    for (i, s) in config.streams.iter().enumerate() {
        match resolve_auth(s, &format!("stream[{i}].auth"), env) {
            Ok(a) => auth.push(a),
            Err(p) => problems.extend(p),
        }
    }
    let sink_tokens = resolve_sink_tokens(&config, env, &mut problems);
    locate(text, &mut problems);
    if problems.is_empty() {
        Ok(Loaded {
            config,
            auth,
            sink_tokens,
        })
    } else {
        Err(Problems(problems))
    }
}

/// The tokens of the sinks that name one (`token_env` or `token_file`), by sink name.
fn resolve_sink_tokens(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, Secret> {
    let mut sink_tokens = BTreeMap::new();
    for (name, sink) in &config.sinks {
        let (env_name, file) = sink.token_sources();
        if env_name.is_none() && file.is_none() {
            continue;
        }
        let (env_name, file) = (env_name.map(str::to_owned), file.map(Path::to_path_buf));
        let at = format!("sinks.{name}");
        let (env_field, file_field, what) = sink.credential_fields();
        let token = NamedSecret {
            env_field,
            env_name: &env_name,
            file_field,
            file: &file,
            what,
        }
        .resolve(&at, env)
        .and_then(|source| {
            source
                .read()
                .map_err(|message| problem(format!("{at}.{file_field}"), message))
        });
        match token {
            Ok(token) => {
                sink_tokens.insert(name.clone(), token);
            }
            Err(p) => problems.push(p),
        }
    }
    sink_tokens
}

/// Gives each problem that has no line yet the line of its field, where it can be found.
fn locate(text: &str, problems: &mut [Problem]) {
    for p in problems.iter_mut().filter(|p| p.line.is_none()) {
        p.line = find_line(text, &p.field);
    }
}

/// Syntax and schema, strictly: any problem is an error.
pub fn parse(text: &str) -> Result<Config, Problems> {
    match parse_lenient(text) {
        (Some(config), problems) if problems.is_empty() => Ok(config),
        (_, problems) => Err(Problems(problems)),
    }
}

/// Syntax and schema. Unknown and mistyped fields are all collected: each one found is
/// removed and parsing resumes, so the rest of the document can still be checked.
fn parse_lenient(text: &str) -> (Option<Config>, Vec<Problem>) {
    let mut table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
            return (
                None,
                vec![Problem {
                    field: "(syntax)".into(),
                    message: e.message().trim().to_owned(),
                    line,
                }],
            );
        }
    };
    let mut problems = Vec::new();
    for _ in 0..100 {
        let value = toml::Value::Table(table.clone());
        let err = match serde_path_to_error::deserialize::<_, Config>(value) {
            Ok(config) => return (Some(config), problems),
            Err(e) => e,
        };
        let mut segments: Vec<Seg> = err.path().iter().filter_map(Seg::from).collect();
        let full = err.inner().to_string();
        // toml appends "in `table`" on a line of its own; the path says that already.
        let message = full
            .lines()
            .next()
            .unwrap_or_default()
            .trim_end_matches(',')
            .to_owned();
        let unknown = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned);
        if let Some(name) = &unknown
            && !matches!(segments.last(), Some(Seg::Key(k)) if k == name)
        {
            segments.push(Seg::Key(name.clone()));
        }
        let field = render(&segments);
        let message = match &unknown {
            Some(name) => format!(
                "unknown field `{name}`{}",
                message
                    .split_once(", expected")
                    .map(|(_, e)| format!(" (expected{e})"))
                    .unwrap_or_default()
            ),
            None => message,
        };
        let removed = !segments.is_empty() && remove(&mut table, &segments);
        problems.push(problem(
            if field.is_empty() {
                "(document)".to_owned()
            } else {
                field
            },
            message,
        ));
        if !removed {
            break;
        }
    }
    (None, problems)
}

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    fn from(s: &Segment) -> Option<Seg> {
        match s {
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        }
    }
}

fn render(segments: &[Seg]) -> String {
    let mut out = String::new();
    for s in segments {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn remove(table: &mut toml::Table, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut cur: &mut toml::Value = match parents.first() {
        None => return matches!(last, Seg::Key(k) if table.remove(k).is_some()),
        Some(Seg::Key(k)) => match table.get_mut(k) {
            Some(v) => v,
            None => return false,
        },
        Some(Seg::Index(_)) => return false,
    };
    for seg in &parents[1..] {
        cur = match (seg, cur) {
            (Seg::Key(k), toml::Value::Table(t)) => match t.get_mut(k) {
                Some(v) => v,
                None => return false,
            },
            (Seg::Index(i), toml::Value::Array(a)) => match a.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, cur) {
        (Seg::Key(k), toml::Value::Table(t)) => t.remove(k).is_some(),
        _ => false,
    }
}

/// The line of `field`'s last key when the key appears on exactly one line (or under the
/// matching `[[table]]` occurrence).
fn find_line(text: &str, field: &str) -> Option<usize> {
    let key = field.rsplit(['.', ']']).next()?.trim_start_matches('[');
    if key.is_empty() || key.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|(i, _)| i + 1)
        .collect();
    if hits.len() == 1 {
        return hits.first().copied();
    }
    // `stream[1].…`: the hit after the second `[[stream]]` header.
    let (array, index) = field
        .split_once('[')
        .and_then(|(a, rest)| Some((a, rest.split(']').next()?.parse::<usize>().ok()?)))?;
    let header = format!("[[{array}]]");
    let start = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == header)
        .nth(index)?
        .0
        + 1;
    let next = text
        .lines()
        .enumerate()
        .skip(start)
        .find(|(_, l)| l.trim() == header)
        .map_or(usize::MAX, |(i, _)| i + 1);
    hits.into_iter().find(|&h| h > start && h < next)
}

/// The rules across fields.
pub fn validate(c: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    if c.streams.is_empty() {
        out.push(problem("stream", "no streams: add at least one [[stream]]"));
    }
    validate_paths(c, &mut out);
    let path_names: HashSet<&str> = c.paths.iter().map(|p| p.name.as_str()).collect();
    let mut names = HashSet::new();
    for (i, s) in c.streams.iter().enumerate() {
        let at = format!("stream[{i}]");
        validate_stream_name(s, &at, &mut names, &mut out);
        validate_stream_url(s, "url", &s.url, &at, &mut out);
        validate_plain_http(c, s, "url", &s.url, &at, &mut out);
        validate_recovery_url(c, s, &at, &mut out);
        validate_partitions(s, &at, &mut out);
        validate_stream_paths(s, &at, &path_names, &mut out);
        if !c.sinks.contains_key(&s.sink) {
            out.push(problem(
                format!("{at}.sink"),
                format!("no [sinks.{}]", s.sink),
            ));
        }
        validate_stream_settings(s, &at, &mut out);
        if let Some(ca) = &s.ca_file
            && !ca.exists()
        {
            out.push(problem(
                format!("{at}.ca_file"),
                format!("{} does not exist", ca.display()),
            ));
        }
    }
    validate_sections(c, &mut out);
    out
}

/// Adds each `(field, message)` a section reports, its field under `prefix`.
fn nest(
    out: &mut Vec<Problem>,
    prefix: &str,
    found: impl IntoIterator<Item = (&'static str, String)>,
) {
    for (field, message) in found {
        out.push(problem(format!("{prefix}.{field}"), message));
    }
}

/// The `(field, message)` pairs of a connection setting's problems.
fn settings(found: Vec<InvalidSetting>) -> impl Iterator<Item = (&'static str, String)> {
    found.into_iter().map(|p| (p.field, p.message))
}

/// Each `[[path]]`: a unique name and, when it has one, an http(s) proxy.
fn validate_paths(c: &Config, out: &mut Vec<Problem>) {
    let mut seen = HashSet::new();
    for (i, p) in c.paths.iter().enumerate() {
        if !seen.insert(p.name.as_str()) {
            out.push(problem(
                format!("path[{i}].name"),
                format!("path {:?} is defined twice", p.name),
            ));
        }
        if let Some(proxy) = &p.proxy
            && !(proxy.starts_with("http://") || proxy.starts_with("https://"))
        {
            out.push(problem(
                format!("path[{i}].proxy"),
                format!("{proxy:?} is not an http(s) proxy URL"),
            ));
        }
    }
}

/// A stream's name: usable as a label, directory and subject part, and not taken by an
/// earlier stream (`names` holds the names seen so far).
fn validate_stream_name<'a>(
    s: &'a StreamConfig,
    at: &str,
    names: &mut HashSet<&'a str>,
    out: &mut Vec<Problem>,
) {
    if !is_plain_name(&s.name) {
        out.push(problem(
            format!("{at}.name"),
            format!("{:?}: use letters, digits, '-' and '_'", s.name),
        ));
    }
    if !names.insert(s.name.as_str()) {
        out.push(problem(
            format!("{at}.name"),
            format!("stream {:?} is defined twice", s.name),
        ));
    }
}

/// A stream's URL (`field`): https, or plain http where the stream allows it.
fn validate_stream_url(s: &StreamConfig, field: &str, url: &str, at: &str, out: &mut Vec<Problem>) {
    match url.split_once("://") {
        Some(("https", _)) => {}
        Some(("http", _)) if s.allow_plain_http => {}
        Some(("http", _)) => out.push(problem(
            format!("{at}.{field}"),
            "plain http: set allow_plain_http = true (test peers only) or use https",
        )),
        _ => out.push(problem(
            format!("{at}.{field}"),
            format!("{url:?} is not an http(s) URL"),
        )),
    }
    if url.matches('?').count() > 1 {
        out.push(problem(
            format!("{at}.{field}"),
            "more than one '?': join query parameters with '&'",
        ));
    }
    if url.contains('#') {
        out.push(problem(
            format!("{at}.{field}"),
            "a '#' fragment would swallow the parameters tandem adds: remove it",
        ));
    }
    let query = url.split_once('?').map_or("", |(_, q)| q);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if TANDEM_PARAMETERS.contains(&key) {
            out.push(problem(
                format!("{at}.{field}"),
                format!("the URL sets {key:?}, which tandem sets on each request: remove it"),
            ));
        }
    }
}

/// The query parameters tandem sets on each request (partition, backfill, recovery range).
const TANDEM_PARAMETERS: [&str; 7] = [
    "partition",
    "backfillMinutes",
    "backfill_minutes",
    "startTime",
    "endTime",
    "start_time",
    "end_time",
];

/// The recovery endpoint: required where the API serves recovery on its own host (Gnip,
/// except likes streams, which have no recovery), checked like the live URL.
fn validate_recovery_url(c: &Config, s: &StreamConfig, at: &str, out: &mut Vec<Problem>) {
    match &s.recovery_url {
        Some(url) => {
            validate_stream_url(s, "recovery_url", url, at, out);
            validate_plain_http(c, s, "recovery_url", url, at, out);
            if s.api == ApiConfig::Gnip && url == &s.url {
                out.push(problem(
                    format!("{at}.recovery_url"),
                    "the live URL: Gnip serves recovery on its own host and path (see your account's recovery endpoint)",
                ));
            }
        }
        None if s.api == ApiConfig::Gnip && !s.likes => out.push(problem(
            format!("{at}.recovery_url"),
            "missing: Gnip serves recovery on its own endpoint, e.g. https://stream-data-api.x.com/stream/powertrack/accounts/<account>/publishers/twitter/powertrack.json",
        )),
        None => {}
    }
}

/// Plain HTTP carries the credentials in clear: only to a peer on this host (a test
/// peer), so the URL's host and every path's pinned address must be loopback.
fn validate_plain_http(
    c: &Config,
    s: &StreamConfig,
    field: &str,
    url: &str,
    at: &str,
    out: &mut Vec<Problem>,
) {
    let Some(rest) = url.strip_prefix("http://") else {
        return;
    };
    if !s.allow_plain_http {
        return;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let loopback = |h: &str| {
        h.eq_ignore_ascii_case("localhost")
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    if !loopback(host) {
        out.push(problem(
            format!("{at}.allow_plain_http"),
            format!("plain http only reaches a test peer on this host (loopback), not {host:?} ({field}): use https"),
        ));
    }
    // Pinned addresses apply to the live URL's host.
    for name in s.paths.iter().filter(|_| field == "url") {
        if let Some(ip) = c
            .paths
            .iter()
            .find(|p| &p.name == name)
            .and_then(|p| p.resolve_ip)
            && !ip.is_loopback()
        {
            out.push(problem(
                format!("{at}.allow_plain_http"),
                format!("plain http only reaches a test peer on this host, but path {name} pins {ip}: use https"),
            ));
        }
    }
}

/// A stream's partitions: at least one, the chosen ones among them, and always
/// partitioned for Gnip.
fn validate_partitions(s: &StreamConfig, at: &str, out: &mut Vec<Problem>) {
    if s.partitions == 0 {
        out.push(problem(format!("{at}.partitions"), "must be at least 1"));
    }
    if let Some(only) = &s.only_partitions {
        for p in only {
            if *p == 0 || *p > s.partitions {
                out.push(problem(
                    format!("{at}.only_partitions"),
                    format!("partition {p} is not between 1 and {}", s.partitions),
                ));
            }
        }
    }
    if s.api == ApiConfig::Gnip && !s.partitioned {
        out.push(problem(
            format!("{at}.partitioned"),
            "Gnip streams always take a partition",
        ));
    }
}

/// The paths a stream's connections use: at least one, each defined, none twice, at
/// most 255.
fn validate_stream_paths(
    s: &StreamConfig,
    at: &str,
    path_names: &HashSet<&str>,
    out: &mut Vec<Problem>,
) {
    let field = format!("{at}.paths");
    if s.paths.is_empty() {
        out.push(problem(
            &field,
            "zero paths: each partition needs at least one connection (two for redundancy)",
        ));
    }
    let mut used = HashSet::new();
    for p in &s.paths {
        if !path_names.contains(p.as_str()) {
            out.push(problem(&field, format!("no [[path]] named {p:?}")));
        }
        if !used.insert(p) {
            out.push(problem(
                &field,
                format!(
                    "path {p:?} is listed twice: two connections of a partition must not share a path"
                ),
            ));
        }
    }
    if s.paths.len() > 255 {
        out.push(problem(&field, "at most 255 paths"));
    }
}

/// The connection settings of a stream, each checked by the crate that owns it.
fn validate_stream_settings(s: &StreamConfig, at: &str, out: &mut Vec<Problem>) {
    nest(
        out,
        &format!("{at}.retry"),
        settings(s.retry.problems(s.backfill.minute_ms)),
    );
    nest(
        out,
        &format!("{at}.liveness"),
        settings(s.liveness.problems(s.api.kind())),
    );
    nest(
        out,
        &format!("{at}.backfill"),
        settings(s.backfill.problems()),
    );
    nest(out, &format!("{at}.budget"), settings(s.budget.problems()));
    nest(out, &format!("{at}.read"), settings(s.read.problems()));
}

/// The shared sections: sinks, merge (with the dedup window against the streams'
/// backfill), monitor, delivery and repair.
/// A name that may become part of a file path, a metric label and a subject: letters,
/// digits, `-` and `_` only (no `/`, no `..`).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
}

fn validate_sections(c: &Config, out: &mut Vec<Problem>) {
    for (name, sink) in &c.sinks {
        // The name becomes the sink's spool directory and a metric label.
        if !is_plain_name(name) {
            out.push(problem(
                format!("sinks.{name}"),
                format!("{name:?}: a sink name uses letters, digits, '-' and '_'"),
            ));
        }
        nest(
            out,
            &format!("sinks.{name}"),
            sink.problems(c.merge.dedup_window_secs),
        );
    }
    nest(out, "merge", c.merge.problems());
    out.extend(dedup_window_problem(c));
    nest(out, "monitor", c.monitor.problems());
    nest(out, "delivery", c.delivery.problems());
    nest(out, "repair", c.repair.problems());
    if let Some(pair) = &c.pair {
        nest(out, "pair", pair.problems());
        if let Err(message) = pair_sink(c) {
            out.push(problem("pair.sink", message));
        }
    }
}

/// The NATS sink whose connection the pair's coordination uses: `pair.sink`, or the only
/// NATS sink there is.
pub fn pair_sink(c: &Config) -> Result<String, String> {
    let nats: Vec<&String> = (c.sinks.iter())
        .filter(|(_, s)| s.kind() == "nats")
        .map(|(name, _)| name)
        .collect();
    match c.pair.as_ref().and_then(|p| p.sink.as_ref()) {
        Some(name) if nats.contains(&name) => Ok(name.clone()),
        Some(name) => Err(format!(
            "{name:?} is not a NATS sink: the pair coordinates through the NATS cluster it shares"
        )),
        None => match nats[..] {
            [one] => Ok(one.clone()),
            [] => Err(
                "a pair coordinates through NATS: add a [sinks.<name>] of kind \"nats\"".to_owned(),
            ),
            _ => Err("several NATS sinks: name the one whose connection the pair uses".to_owned()),
        },
    }
}

/// Invariant 1 (DESIGN.md): the dedup window must outlast a backfill plus the delays
/// and skew around it; twice the longest backfill window leaves that margin.
fn dedup_window_problem(c: &Config) -> Option<Problem> {
    let max_backfill_ms = c
        .streams
        .iter()
        .map(|s| s.backfill.window_minutes * s.backfill.minute_ms)
        .max()
        .unwrap_or(0);
    let window_ms = c.merge.dedup_window_secs * 1000;
    (max_backfill_ms > 0 && window_ms < 2 * max_backfill_ms).then(|| {
        problem(
            "merge.dedup_window_secs",
            format!(
                "{} s is too short for a backfill window of {} s: it must exceed the backfill window plus reconnect delays and path skew (at least {} s)",
                c.merge.dedup_window_secs,
                max_backfill_ms / 1000,
                2 * max_backfill_ms / 1000
            ),
        )
    })
}

/// Resolves a stream's credentials from the environment or files.
pub fn resolve_auth(
    s: &StreamConfig,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Auth, Vec<Problem>> {
    match s.api {
        ApiConfig::Gnip => basic_auth(&s.auth, at, env),
        ApiConfig::XV2 => bearer_auth(&s.auth, at, env),
    }
}

/// Gnip: a user name and a password, no bearer token.
fn basic_auth(
    a: &AuthConfig,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Auth, Vec<Problem>> {
    let mut problems = Vec::new();
    let user = a.username.clone().filter(|u| !u.is_empty());
    if user.is_none() {
        problems.push(problem(
            format!("{at}.username"),
            "Gnip streams use Basic auth: set the account user name",
        ));
    }
    if a.bearer_token_env.is_some() || a.bearer_token_file.is_some() {
        problems.push(problem(
            format!("{at}.bearer_token_env"),
            "Gnip streams use Basic auth, not a bearer token",
        ));
    }
    let password = NamedSecret {
        env_field: "password_env",
        env_name: &a.password_env,
        file_field: "password_file",
        file: &a.password_file,
        what: "Basic-auth password",
    }
    .resolve(at, env);
    match (user, password) {
        (Some(username), Ok(password)) if problems.is_empty() => {
            Ok(Auth::Basic { username, password })
        }
        (_, p) => {
            problems.extend(p.err());
            Err(problems)
        }
    }
}

/// X API v2: a bearer token, no Basic-auth settings.
fn bearer_auth(
    a: &AuthConfig,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Auth, Vec<Problem>> {
    let token = NamedSecret {
        env_field: "bearer_token_env",
        env_name: &a.bearer_token_env,
        file_field: "bearer_token_file",
        file: &a.bearer_token_file,
        what: "bearer token",
    }
    .resolve(at, env);
    let mut problems = Vec::new();
    if a.username.is_some() || a.password_env.is_some() || a.password_file.is_some() {
        problems.push(problem(
            format!("{at}.username"),
            "X API v2 streams use a bearer token, not Basic auth",
        ));
    }
    match token {
        Ok(t) if problems.is_empty() => Ok(Auth::Bearer(t)),
        t => {
            problems.extend(t.err());
            Err(problems)
        }
    }
}

/// The two places one secret may be named: an environment variable or a file (exactly
/// one of them).
struct NamedSecret<'a> {
    env_field: &'static str,
    env_name: &'a Option<String>,
    file_field: &'static str,
    file: &'a Option<PathBuf>,
    /// What the secret is, for the message when neither place is named.
    what: &'static str,
}

impl NamedSecret<'_> {
    /// Reads the secret from the one place named, to check it is there; `at` is the table
    /// holding the fields. A file stays the source: it is read again before each request.
    fn resolve(
        &self,
        at: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<SecretSource, Problem> {
        let (env_field, file_field) = (self.env_field, self.file_field);
        match (self.env_name, self.file) {
            (Some(_), Some(_)) => Err(problem(
                format!("{at}.{env_field}"),
                format!("set either {env_field} or {file_field}, not both"),
            )),
            (None, None) => Err(problem(
                format!("{at}.{env_field}"),
                format!(
                    "missing: name the environment variable ({env_field}) or the file ({file_field}) that holds the {}",
                    self.what
                ),
            )),
            (Some(var), None) => secret_from_env(var, env)
                .map(SecretSource::Value)
                .map_err(|message| problem(format!("{at}.{env_field}"), message)),
            (None, Some(path)) => secret_from_file(path)
                .map(|_| SecretSource::File(path.to_owned()))
                .map_err(|message| problem(format!("{at}.{file_field}"), message)),
        }
    }
}

/// A secret from the environment variable `var`: set and not empty.
fn secret_from_env(var: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, String> {
    match env(var) {
        Some(v) if !v.is_empty() => Ok(Secret::new(v)),
        Some(_) => Err(format!("environment variable {var} is empty")),
        None => Err(format!("environment variable {var} is not set")),
    }
}

/// A secret from a file, without its trailing line ending: readable and not empty.
fn secret_from_file(path: &Path) -> Result<Secret, String> {
    tandem_core::secret::secret_from_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../deploy/tandem.toml");

    /// The example with its stream routed to a NATS sink `js` that has `settings`.
    fn with_nats_sink(settings: &str) -> String {
        format!(
            "{}\n[sinks.js]\nkind = \"nats\"\nurl = \"tls://nats:4222\"\n{settings}\n",
            EXAMPLE.replace("sink = \"files\"", "sink = \"js\"")
        )
    }

    fn env(name: &str) -> Option<String> {
        match name {
            "GNIP_PASSWORD" => Some("pw".to_owned()),
            "NATS_TOKEN" => Some("token-from-env".to_owned()),
            _ => None,
        }
    }

    /// A sink token from a file (a systemd credential, a mounted Secret) loses its line
    /// ending and never prints; from the environment it works as before.
    #[test]
    fn sink_token_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nats-token");
        std::fs::write(&file, "planted-file-token\n").unwrap();
        let text = with_nats_sink(&format!("token_file = {:?}", file.display().to_string()));
        let loaded = load(&text, &env).unwrap_or_else(|p| panic!("{p}"));
        assert_eq!(loaded.sink_tokens["js"].expose(), "planted-file-token");
        assert!(!format!("{loaded:?}").contains("planted-file-token"));
        let loaded = load(&with_nats_sink("token_env = \"NATS_TOKEN\""), &env).unwrap();
        assert_eq!(loaded.sink_tokens["js"].expose(), "token-from-env");
        let loaded = load(&with_nats_sink(""), &env).unwrap();
        assert!(loaded.sink_tokens.is_empty(), "no token named, none sent");
    }

    /// Both sources, an unreadable file or an empty one: each a problem naming the field.
    #[test]
    fn sink_token_problems_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nats-token");
        std::fs::write(&file, "x").unwrap();
        let both = with_nats_sink(&format!(
            "token_env = \"NATS_TOKEN\"\ntoken_file = {:?}",
            file.display().to_string()
        ));
        let p = load(&both, &env).unwrap_err();
        assert_eq!(p.0.len(), 1, "{p}");
        assert_eq!(p.0[0].field, "sinks.js.token_env");
        assert!(
            p.0[0].message.contains("token_env") && p.0[0].message.contains("token_file"),
            "{p}"
        );
        let missing = with_nats_sink(&format!(
            "token_file = {:?}",
            dir.path().join("absent").display().to_string()
        ));
        let p = load(&missing, &env).unwrap_err();
        assert_eq!(p.0[0].field, "sinks.js.token_file");
        assert!(p.0[0].message.contains("cannot read"), "{p}");
        std::fs::write(&file, "\n").unwrap();
        let empty = with_nats_sink(&format!("token_file = {:?}", file.display().to_string()));
        let p = load(&empty, &env).unwrap_err();
        assert!(p.0[0].message.contains("is empty"), "{p}");
        let unset = with_nats_sink("token_env = \"NOT_SET\"");
        let p = load(&unset, &env).unwrap_err();
        assert_eq!(p.0[0].field, "sinks.js.token_env");
    }

    /// TLS files that cannot be read, or a certificate without its key, are problems of
    /// `check`, named `sinks.<name>.<field>`, with the line of the field.
    #[test]
    fn sink_tls_problems_name_the_field() {
        let text = with_nats_sink(
            "tls_ca_file = \"/nonexistent/ca.crt\"\ntls_cert_file = \"/nonexistent/client.crt\"",
        );
        let p = load(&text, &env).unwrap_err();
        let fields: Vec<&str> = p.0.iter().map(|p| p.field.as_str()).collect();
        for field in [
            "sinks.js.tls_ca_file",
            "sinks.js.tls_cert_file",
            "sinks.js.tls_key_file",
        ] {
            assert!(fields.contains(&field), "{field}: {p}");
        }
        let ca =
            p.0.iter()
                .find(|p| p.field == "sinks.js.tls_ca_file")
                .unwrap();
        assert!(ca.message.contains("/nonexistent/ca.crt"), "{p}");
        assert!(ca.line.is_some(), "{p}");
    }
}
