//! Loading: TOML syntax, the schema (collecting every unknown or mistyped field, not just
//! the first), the rules across fields, and credentials from the environment or files.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde_path_to_error::Segment;
use tandem_conn::Auth;
use tandem_core::Secret;

use crate::schema::{ApiConfig, Config, StreamConfig};

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
    /// Tokens of sinks that name one (`token_env`), by sink name.
    pub sink_tokens: std::collections::BTreeMap<String, Secret>,
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
        for p in &mut problems {
            if p.line.is_none() {
                p.line = find_line(text, &p.field);
            }
        }
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
    let mut sink_tokens = std::collections::BTreeMap::new();
    for (name, sink) in &config.sinks {
        if let Some(var) = sink.token_env() {
            match env(var) {
                Some(v) if !v.is_empty() => {
                    sink_tokens.insert(name.clone(), Secret::new(v));
                }
                _ => problems.push(problem(
                    format!("sinks.{name}.token_env"),
                    format!("environment variable {var} is not set"),
                )),
            }
        }
    }
    for p in &mut problems {
        if p.line.is_none() {
            p.line = find_line(text, &p.field);
        }
    }
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
    let path_names: HashSet<&str> = c.paths.iter().map(|p| p.name.as_str()).collect();
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
    let mut names = HashSet::new();
    let mut max_backfill_ms = 0;
    for (i, s) in c.streams.iter().enumerate() {
        let at = |f: &str| format!("stream[{i}].{f}");
        if s.name.is_empty()
            || !s
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            out.push(problem(
                at("name"),
                format!("{:?}: use letters, digits, '-' and '_'", s.name),
            ));
        }
        if !names.insert(s.name.as_str()) {
            out.push(problem(
                at("name"),
                format!("stream {:?} is defined twice", s.name),
            ));
        }
        match s.url.split_once("://") {
            Some(("https", _)) => {}
            Some(("http", _)) if s.allow_plain_http => {}
            Some(("http", _)) => out.push(problem(
                at("url"),
                "plain http: set allow_plain_http = true (test peers only) or use https",
            )),
            _ => out.push(problem(
                at("url"),
                format!("{:?} is not an http(s) URL", s.url),
            )),
        }
        if s.partitions == 0 {
            out.push(problem(at("partitions"), "must be at least 1"));
        }
        if let Some(only) = &s.only_partitions {
            for p in only {
                if *p == 0 || *p > s.partitions {
                    out.push(problem(
                        at("only_partitions"),
                        format!("partition {p} is not between 1 and {}", s.partitions),
                    ));
                }
            }
        }
        if s.api == ApiConfig::Gnip && !s.partitioned {
            out.push(problem(
                at("partitioned"),
                "Gnip streams always take a partition",
            ));
        }
        if s.paths.is_empty() {
            out.push(problem(
                at("paths"),
                "zero paths: each partition needs at least one connection (two for redundancy)",
            ));
        }
        let mut used = HashSet::new();
        for p in &s.paths {
            if !path_names.contains(p.as_str()) {
                out.push(problem(at("paths"), format!("no [[path]] named {p:?}")));
            }
            if !used.insert(p) {
                out.push(problem(at("paths"), format!("path {p:?} is listed twice: two connections of a partition must not share a path")));
            }
        }
        if s.paths.len() > 255 {
            out.push(problem(at("paths"), "at most 255 paths"));
        }
        if !c.sinks.contains_key(&s.sink) {
            out.push(problem(at("sink"), format!("no [sinks.{}]", s.sink)));
        }
        for p in s.retry.problems(s.backfill.minute_ms) {
            out.push(problem(at(&format!("retry.{}", p.field)), p.message));
        }
        for p in s.liveness.problems(s.api == ApiConfig::Gnip) {
            out.push(problem(at(&format!("liveness.{}", p.field)), p.message));
        }
        for p in s.backfill.problems() {
            out.push(problem(at(&format!("backfill.{}", p.field)), p.message));
        }
        for p in s.budget.problems() {
            out.push(problem(at(&format!("budget.{}", p.field)), p.message));
        }
        for p in s.read.problems() {
            out.push(problem(at(&format!("read.{}", p.field)), p.message));
        }
        if let Some(ca) = &s.ca_file
            && !ca.exists()
        {
            out.push(problem(
                at("ca_file"),
                format!("{} does not exist", ca.display()),
            ));
        }
        max_backfill_ms = max_backfill_ms.max(s.backfill.window_minutes * s.backfill.minute_ms);
    }
    for (name, sink) in &c.sinks {
        let problems = sink.problems(c.merge.dedup_window_secs);
        for (field, message) in problems {
            out.push(problem(format!("sinks.{name}.{field}"), message));
        }
    }
    for (field, message) in c.merge.problems() {
        out.push(problem(format!("merge.{field}"), message));
    }
    // Invariant 1 (DESIGN.md): the dedup window must outlast a backfill plus the delays
    // and skew around it; twice the backfill window leaves that margin.
    let window_ms = c.merge.dedup_window_secs * 1000;
    if max_backfill_ms > 0 && window_ms < 2 * max_backfill_ms {
        out.push(problem(
            "merge.dedup_window_secs",
            format!(
                "{} s is too short for a backfill window of {} s: it must exceed the backfill window plus reconnect delays and path skew (at least {} s)",
                c.merge.dedup_window_secs,
                max_backfill_ms / 1000,
                2 * max_backfill_ms / 1000
            ),
        ));
    }
    for (field, message) in c.monitor.problems() {
        out.push(problem(format!("monitor.{field}"), message));
    }
    for (field, message) in c.delivery.problems() {
        out.push(problem(format!("delivery.{field}"), message));
    }
    for (field, message) in c.repair.problems() {
        out.push(problem(format!("repair.{field}"), message));
    }
    out
}

/// Resolves a stream's credentials from the environment or files.
pub fn resolve_auth(
    s: &StreamConfig,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Auth, Vec<Problem>> {
    let a = &s.auth;
    let secret = |env_field: &str,
                  env_name: &Option<String>,
                  file_field: &str,
                  file: &Option<std::path::PathBuf>,
                  what: &str|
     -> Result<Secret, Problem> {
        match (env_name, file) {
            (Some(_), Some(_)) => Err(problem(
                format!("{at}.{env_field}"),
                format!("set either {env_field} or {file_field}, not both"),
            )),
            (None, None) => Err(problem(
                format!("{at}.{env_field}"),
                format!(
                    "missing: name the environment variable ({env_field}) or the file ({file_field}) that holds the {what}"
                ),
            )),
            (Some(var), None) => match env(var) {
                Some(v) if !v.is_empty() => Ok(Secret::new(v)),
                Some(_) => Err(problem(
                    format!("{at}.{env_field}"),
                    format!("environment variable {var} is empty"),
                )),
                None => Err(problem(
                    format!("{at}.{env_field}"),
                    format!("environment variable {var} is not set"),
                )),
            },
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(v) if !v.trim_end_matches(['\n', '\r']).is_empty() => {
                    Ok(Secret::new(v.trim_end_matches(['\n', '\r'])))
                }
                Ok(_) => Err(problem(
                    format!("{at}.{file_field}"),
                    format!("{} is empty", path.display()),
                )),
                Err(e) => Err(problem(
                    format!("{at}.{file_field}"),
                    format!("cannot read {}: {e}", path.display()),
                )),
            },
        }
    };
    match s.api {
        ApiConfig::Gnip => {
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
            let password = secret(
                "password_env",
                &a.password_env,
                "password_file",
                &a.password_file,
                "Basic-auth password",
            );
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
        ApiConfig::XV2 => {
            let token = secret(
                "bearer_token_env",
                &a.bearer_token_env,
                "bearer_token_file",
                &a.bearer_token_file,
                "bearer token",
            );
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
    }
}
