//! Strict JSON validation of one line (RFC 8259 grammar, UTF-8, a single value).
//!
//! Activity lines are mostly string bytes, so strings are skipped to their next quote or
//! backslash with `memchr2` and checked for control characters in one branch-free pass;
//! the whole line is checked as UTF-8 first. Nesting deeper than 128 levels is refused,
//! like `serde_json` does. Measured by `cargo bench -p tandem-merge`.

use crate::identity::IdentityError;

const MAX_DEPTH: usize = 128;

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

fn fail(at: usize, what: &str) -> IdentityError {
    IdentityError::InvalidJson(format!("{what} at byte {at}"))
}

impl Cursor<'_> {
    #[inline]
    fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), IdentityError> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(fail(self.i, "invalid literal"))
        }
    }

    /// At an opening quote; leaves the cursor after the closing one.
    fn string(&mut self) -> Result<(), IdentityError> {
        self.i += 1;
        loop {
            let rest = &self.b[self.i..];
            let Some(pos) = memchr::memchr2(b'"', b'\\', rest) else {
                return Err(fail(self.b.len(), "unterminated string"));
            };
            // Control characters must be escaped; no early exit, so this vectorises.
            if rest[..pos].iter().fold(false, |bad, &c| bad | (c < 0x20)) {
                return Err(fail(self.i, "control character in string"));
            }
            self.i += pos;
            if self.b[self.i] == b'"' {
                self.i += 1;
                return Ok(());
            }
            match self.b.get(self.i + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 2,
                Some(b'u') => {
                    let hex = self
                        .b
                        .get(self.i + 2..self.i + 6)
                        .ok_or_else(|| fail(self.i, "short unicode escape"))?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return Err(fail(self.i, "invalid unicode escape"));
                    }
                    self.i += 6;
                }
                _ => return Err(fail(self.i, "invalid escape")),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), IdentityError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(fail(start, "invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(fail(start, "invalid number"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(fail(start, "invalid number"));
            }
        }
        Ok(())
    }
}

/// Validates a whole line: exactly one JSON value, optionally surrounded by whitespace.
///
/// Longer than the project's 80 lines on purpose: one iterative state machine with an
/// explicit stack (no recursion, so no stack overflow on deep nesting), on the hot path of
/// every first copy (~31 % of the pipeline's CPU); splitting it per token kind measured no
/// gain and spreads the stack discipline over several functions.
pub(crate) fn json(line: &[u8]) -> Result<(), IdentityError> {
    if let Err(e) = simdutf8::compat::from_utf8(line) {
        return Err(IdentityError::InvalidUtf8(e.to_string()));
    }
    let mut c = Cursor { b: line, i: 0 };
    // true: inside an object (keys expected); false: inside an array.
    let mut stack: Vec<bool> = Vec::new();
    c.ws();
    'value: loop {
        // Parse one value; containers push and restart here for their first element.
        match c.peek() {
            Some(b'{') => {
                c.i += 1;
                c.ws();
                if c.peek() == Some(b'}') {
                    c.i += 1;
                } else {
                    if stack.len() >= MAX_DEPTH {
                        return Err(fail(c.i, "nesting too deep"));
                    }
                    stack.push(true);
                    key(&mut c)?;
                    continue 'value;
                }
            }
            Some(b'[') => {
                c.i += 1;
                c.ws();
                if c.peek() == Some(b']') {
                    c.i += 1;
                } else {
                    if stack.len() >= MAX_DEPTH {
                        return Err(fail(c.i, "nesting too deep"));
                    }
                    stack.push(false);
                    continue 'value;
                }
            }
            Some(b'"') => c.string()?,
            Some(b't') => c.literal(b"true")?,
            Some(b'f') => c.literal(b"false")?,
            Some(b'n') => c.literal(b"null")?,
            Some(b'-' | b'0'..=b'9') => c.number()?,
            Some(_) => return Err(fail(c.i, "expected a value")),
            None => return Err(fail(c.i, "expected a value, found the end")),
        }
        // After a value: a separator, a closing bracket, or the end.
        loop {
            c.ws();
            let Some(&in_object) = stack.last() else {
                return if c.i == line.len() {
                    Ok(())
                } else {
                    Err(fail(c.i, "trailing characters"))
                };
            };
            match (c.peek(), in_object) {
                (Some(b','), true) => {
                    c.i += 1;
                    c.ws();
                    key(&mut c)?;
                    continue 'value;
                }
                (Some(b','), false) => {
                    c.i += 1;
                    c.ws();
                    continue 'value;
                }
                (Some(b'}'), true) | (Some(b']'), false) => {
                    c.i += 1;
                    stack.pop();
                }
                _ => {
                    return Err(fail(
                        c.i,
                        if in_object {
                            "expected ',' or '}'"
                        } else {
                            "expected ',' or ']'"
                        },
                    ));
                }
            }
        }
    }
}

/// A key and its colon; leaves the cursor at the value.
fn key(c: &mut Cursor<'_>) -> Result<(), IdentityError> {
    if c.peek() != Some(b'"') {
        return Err(fail(c.i, "expected a key"));
    }
    c.string()?;
    c.ws();
    if c.peek() != Some(b':') {
        return Err(fail(c.i, "expected ':'"));
    }
    c.i += 1;
    c.ws();
    Ok(())
}
