//! Credentials that never show up in logs, metrics or debug output.

use std::fmt;

/// A secret value (password, token). `Debug` and `Display` print `***`; the value is only
/// reachable through [`Secret::expose`], which makes every use easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a secret is held: a value read once (an environment variable cannot change under
/// a running process), or a file read again each time the secret is needed, so that a
/// rotated password or token (a rewritten file, a remounted Kubernetes Secret, a new
/// systemd credential) heals without a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Value(Secret),
    File(std::path::PathBuf),
}

impl SecretSource {
    /// The secret as it is now. The error names the file and what is wrong with it, never
    /// its content.
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            SecretSource::Value(s) => Ok(s.clone()),
            SecretSource::File(path) => secret_from_file(path),
        }
    }
}

/// A secret from a file, without its trailing line ending: readable and not empty.
pub fn secret_from_file(path: &std::path::Path) -> Result<Secret, String> {
    match std::fs::read_to_string(path) {
        Ok(v) if !v.trim_end_matches(['\n', '\r']).is_empty() => {
            Ok(Secret::new(v.trim_end_matches(['\n', '\r'])))
        }
        Ok(_) => Err(format!("{} is empty", path.display())),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// A URL as it may be printed: any `user:password@` (or `token@`) it carries is replaced by
/// `***@`, in every server of a comma-separated list. Text without credentials comes back
/// as it was.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let (scheme, rest) = match one.find("://") {
                Some(i) => one.split_at(i + 3),
                None => ("", one),
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}***{}", &rest[at..]),
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Credentials in URLs never print; the rest of the URL stays readable.
    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("nats://user:hunter2@nats-a:4222,tls://tok@nats-b:4222"),
            "nats://***@nats-a:4222,tls://***@nats-b:4222"
        );
        assert_eq!(
            redact_url("http://me:pw@proxy:3128/path?q=a@b"),
            "http://***@proxy:3128/path?q=a@b"
        );
        assert_eq!(redact_url("https://host/x@y"), "https://host/x@y");
        assert_eq!(redact_url("nats://nats:4222"), "nats://nats:4222");
    }

    /// A file source is read again each time: a rewritten file is the new secret.
    #[test]
    fn file_source_follows_rotation() {
        let dir = std::env::temp_dir().join(format!("tandem-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let source = SecretSource::File(path.clone());
        assert!(source.read().unwrap_err().contains("cannot read"));
        std::fs::write(&path, "first\n").unwrap();
        assert_eq!(source.read().unwrap().expose(), "first");
        std::fs::write(&path, "second").unwrap();
        assert_eq!(source.read().unwrap().expose(), "second");
        std::fs::write(&path, "\n").unwrap();
        assert!(source.read().unwrap_err().contains("empty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Formatting a secret never prints it.
    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }
}
