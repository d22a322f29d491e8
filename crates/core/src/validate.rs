//! Strict JSON validation of one line (RFC 8259 grammar, UTF-8, a single value).
//!
//! Activity lines are mostly string bytes, so strings are crossed eight bytes at a step to
//! their next quote, backslash or control character (SWAR, inline); the whole line is
//! checked as UTF-8 first, and the open containers are a bit stack (no allocation). Nesting deeper than 128 levels is refused,
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

/// Eight copies of a byte.
const fn splat(b: u8) -> u64 {
    u64::from_ne_bytes([b; 8])
}

const LOW7: u64 = splat(0x7f);
const HIGH: u64 = splat(0x80);

/// The high bit of every zero byte of `v`, exactly (no carry crosses a byte).
#[inline]
fn zero_bytes(v: u64) -> u64 {
    !(((v & LOW7) + LOW7) | v) & HIGH
}

/// The first position at or after `i` holding a byte a string cannot pass over: a quote,
/// a backslash or a control character; `b.len()` if there is none. Most bytes of a post
/// are string bytes crossed here, eight at a step (SWAR): inline, with none of the set-up
/// of a library search per string (SSE2 blocks of 16 measured no faster on posts).
#[inline]
fn special_from(b: &[u8], mut i: usize) -> usize {
    while let Some(chunk) = b.get(i..).and_then(<[u8]>::first_chunk::<8>) {
        let v = u64::from_le_bytes(*chunk);
        let hits = zero_bytes(v ^ splat(b'"'))
            | zero_bytes(v ^ splat(b'\\'))
            | zero_bytes(v & splat(0xe0));
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            return i;
        }
        i += 1;
    }
    i
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
    #[inline]
    fn string(&mut self) -> Result<(), IdentityError> {
        self.i += 1;
        loop {
            self.i = special_from(self.b, self.i);
            match self.b.get(self.i) {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => self.escape()?,
                Some(_) => return Err(fail(self.i, "control character in string")),
                None => return Err(fail(self.b.len(), "unterminated string")),
            }
        }
    }

    /// At a backslash inside a string; leaves the cursor after the escape.
    fn escape(&mut self) -> Result<(), IdentityError> {
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
        Ok(())
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

/// The open containers, innermost last, one bit each (set: an object); no allocation.
#[derive(Default)]
struct Stack {
    bits: u128,
    len: usize,
}

impl Stack {
    fn len(&self) -> usize {
        self.len
    }

    /// Opens a container; the caller keeps `len` below [`MAX_DEPTH`] (128 bits).
    fn push(&mut self, in_object: bool) {
        self.bits = (self.bits << 1) | u128::from(in_object);
        self.len += 1;
    }

    fn pop(&mut self) {
        self.bits >>= 1;
        self.len -= 1;
    }

    /// Whether the innermost container is an object; `None` at the top level.
    fn last(&self) -> Option<bool> {
        (self.len > 0).then_some(self.bits & 1 == 1)
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
    let mut stack = Stack::default();
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
            let Some(in_object) = stack.last() else {
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// What a strict parser says: UTF-8, then `serde_json`'s grammar.
    fn reference(line: &[u8]) -> bool {
        std::str::from_utf8(line).is_ok()
            && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok()
    }

    fn samples() -> Vec<Vec<u8>> {
        let text = include_str!("../../../samples/native-posts.ndjson");
        text.lines()
            .take(20)
            .map(|l| l.as_bytes().to_vec())
            .collect()
    }

    /// Bytes that change the grammar when put anywhere.
    const SHARP: &[u8] = b"\"{}[],:0-.eE+tfnu\\/ \t\n\x01\x1f\x7f\xc3\xa9";

    #[test]
    fn samples_and_edges_agree_with_serde_json() {
        for line in samples() {
            assert!(super::json(&line).is_ok());
        }
        for case in [
            &b"\"abcdefghijklmnop\x01\""[..],
            b"\"abcdefghijklmnopq\"",
            b"\"abcdefg\\\"hijklmnopq\"",
            b"\"0123456789abcdef\\u00e9\"",
            b"\"0123456789abcdef\\u00g9\"",
            b"[\"a\",\"\\\\\",1e5,-0.5,true,null,{}]",
            b"{\"a\":[[[[]]]]}",
            b"{\"a\" : 01}",
            b"[1,]",
            b"\"\xff\"",
        ] {
            assert_eq!(super::json(case).is_ok(), reference(case), "{case:?}");
        }
        let deep = |n| format!("{}{}", "[".repeat(n), "]".repeat(n));
        // An empty innermost container opens no level of the stack.
        assert!(super::json(deep(129).as_bytes()).is_ok());
        assert!(super::json(deep(130).as_bytes()).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        /// A post with a few bytes inserted, deleted or replaced, or cut short: accepted
        /// exactly when a strict parser accepts it.
        #[test]
        fn mutated_posts_agree_with_serde_json(
            which in 0usize..20,
            edits in prop::collection::vec((0.0f64..1.0, 0u8..4, 0usize..SHARP.len()), 1..4),
        ) {
            let mut line = samples()[which].clone();
            for (at, op, b) in edits {
                let i = ((line.len() as f64) * at) as usize;
                match op {
                    0 => line.insert(i, SHARP[b]),
                    1 if i < line.len() => { line.remove(i); }
                    2 if i < line.len() => line[i] = SHARP[b],
                    _ => line.truncate(i),
                }
            }
            prop_assert_eq!(super::json(&line).is_ok(), reference(&line), "{:?}", String::from_utf8_lossy(&line));
        }
    }
}
