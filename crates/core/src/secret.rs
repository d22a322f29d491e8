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

    /// Formatting a secret never prints it.
    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }
}
