//! From network chunks to lines: gzip inflate driven by hand, then `\r\n` framing.
//!
//! Inflating the raw body ourselves (flate2 over zlib-rs) instead of through the HTTP
//! client's decoder lets the inflater write straight into the buffer that lines are then
//! sliced from: each line handed on is a `Bytes` view of that buffer, not a copy. When an
//! output buffer is mostly empty (a quiet stream delivering a line at a time), its few
//! lines are copied out instead, so that a held line never pins a large buffer.
//!
//! Rules: an empty line is a heartbeat; a line longer than the maximum is skipped and
//! counted; the partial line left when a connection ends is discarded and counted, never
//! delivered.
//!
//! Bounded: one call decodes at most [`LineReader::output_budget`] bytes (a gzip bomb
//! inflates a little at a time, each step handed on before the next); the input it did
//! not reach waits in the reader (`has_pending`, `resume`). A gzip header may not exceed
//! [`MAX_GZIP_HEADER`] bytes.

use bytes::Bytes;
use flate2::{Decompress, FlushDecompress, Status};

/// The longest gzip member header accepted (the optional name and comment fields are
/// otherwise unbounded).
pub const MAX_GZIP_HEADER: usize = 64 * 1024;

/// A framed unit of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Line(Bytes),
    Heartbeat,
}

/// The body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a gzip stream: {0}")]
    Header(String),
    #[error("corrupt deflate data: {0}")]
    Inflate(String),
}

#[derive(Debug)]
enum Stage {
    Header(Vec<u8>),
    Body,
    Trailer(usize),
}

#[derive(Debug)]
enum Decoder {
    Identity,
    Gzip {
        stage: Stage,
        inflate: Box<Decompress>,
    },
}

/// Decodes one connection's body into frames.
#[derive(Debug)]
pub struct LineReader {
    decoder: Decoder,
    buf: Vec<u8>,
    /// Bytes at the start of `buf` known to hold no `\n`.
    scanned: usize,
    chunk: usize,
    max_line: usize,
    /// Inside an oversize line: discard up to the next `\n`.
    skipping: bool,
    /// Oversize lines skipped so far.
    pub oversize: u64,
    /// Bytes produced by the decoder so far.
    pub decoded_bytes: u64,
    /// Input not decoded yet because a call's output budget was spent.
    pending: Vec<u8>,
}

impl LineReader {
    pub fn new(gzip: bool, chunk: usize, max_line: usize) -> LineReader {
        let decoder = if gzip {
            Decoder::Gzip {
                stage: Stage::Header(Vec::new()),
                inflate: Box::new(Decompress::new(false)),
            }
        } else {
            Decoder::Identity
        };
        LineReader {
            decoder,
            buf: Vec::with_capacity(chunk),
            scanned: 0,
            chunk,
            max_line,
            skipping: false,
            oversize: 0,
            decoded_bytes: 0,
            pending: Vec::new(),
        }
    }

    /// Decoded bytes one call produces at the most.
    pub fn output_budget(&self) -> usize {
        (self.chunk * 4).max(self.max_line + self.chunk)
    }

    /// Whether input waits for [`LineReader::resume`].
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Decodes one network chunk, up to the output budget; complete frames are appended
    /// to `out`. Input left over waits: call [`LineReader::resume`] while
    /// [`LineReader::has_pending`].
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Frame>) -> Result<(), DecodeError> {
        if self.has_pending() {
            self.pending.extend_from_slice(input);
            return self.resume(out);
        }
        let used = self.decode(input, out)?;
        self.pending.extend_from_slice(&input[used..]);
        Ok(())
    }

    /// Decodes all of `input`, however much it inflates to: for callers that hold the
    /// whole output anyway (tests, benchmarks).
    pub fn feed_all(&mut self, input: &[u8], out: &mut Vec<Frame>) -> Result<(), DecodeError> {
        self.feed(input, out)?;
        while self.has_pending() {
            self.resume(out)?;
        }
        Ok(())
    }

    /// Decodes the next part of what waits, up to the output budget.
    pub fn resume(&mut self, out: &mut Vec<Frame>) -> Result<(), DecodeError> {
        let input = std::mem::take(&mut self.pending);
        let used = self.decode(&input, out)?;
        self.pending = input[used..].to_vec();
        Ok(())
    }

    /// Decodes from `input` until it is used up or the output budget is spent; returns
    /// how much of it was used.
    fn decode(&mut self, whole: &[u8], out: &mut Vec<Frame>) -> Result<usize, DecodeError> {
        let budget = self.decoded_bytes + self.output_budget() as u64;
        let mut input = whole;
        while self.decoded_bytes < budget && !input.is_empty() {
            let step = match &mut self.decoder {
                Decoder::Identity => self.copy(input, out),
                Decoder::Gzip { stage, inflate } => match stage {
                    Stage::Header(_) => header(stage, input)?,
                    Stage::Trailer(left) => {
                        let n = (*left).min(input.len());
                        *left -= n;
                        if *left == 0 {
                            // Another gzip member may follow.
                            *stage = Stage::Header(Vec::new());
                            **inflate = Decompress::new(false);
                        }
                        Step::Used(n)
                    }
                    Stage::Body => self.inflate(input, out)?,
                },
            };
            match step {
                Step::Used(n) => input = &input[n..],
                // The inflater needs more input than this holds.
                Step::NeedsMore(n) => {
                    input = &input[n..];
                    break;
                }
            }
        }
        self.emit(out);
        Ok(whole.len() - input.len())
    }

    /// Plain bodies: the input as it is.
    fn copy(&mut self, input: &[u8], out: &mut Vec<Frame>) -> Step {
        self.make_room(out);
        let room = self.buf.capacity() - self.buf.len();
        let n = room.min(input.len());
        self.buf.extend_from_slice(&input[..n]);
        self.decoded_bytes += n as u64;
        Step::Used(n)
    }

    /// Inflates what fits in the buffer.
    fn inflate(&mut self, input: &[u8], out: &mut Vec<Frame>) -> Result<Step, DecodeError> {
        if self.buf.len() == self.buf.capacity() {
            self.make_room(out);
        }
        let Decoder::Gzip { stage, inflate } = &mut self.decoder else {
            return Ok(Step::NeedsMore(0));
        };
        let before_in = inflate.total_in();
        let before_out = self.buf.len();
        let status = inflate
            .decompress_vec(input, &mut self.buf, FlushDecompress::None)
            .map_err(|e| DecodeError::Inflate(e.to_string()))?;
        let used = (inflate.total_in() - before_in) as usize;
        let produced = self.buf.len() - before_out;
        self.decoded_bytes += produced as u64;
        if status == Status::StreamEnd {
            *stage = Stage::Trailer(8);
        } else if used == 0 && produced == 0 && self.buf.len() < self.buf.capacity() {
            return Ok(Step::NeedsMore(0));
        }
        Ok(Step::Used(used))
    }

    /// Makes space in `buf`: hands complete lines out, and grows the buffer for a line
    /// longer than one chunk (up to the maximum line length).
    fn make_room(&mut self, out: &mut Vec<Frame>) {
        if self.buf.len() < self.buf.capacity() {
            return;
        }
        self.emit(out);
        if self.buf.len() == self.buf.capacity() {
            self.buf.reserve(self.chunk);
        }
    }

    /// Hands out every complete line in `buf`, keeping the partial tail.
    fn emit(&mut self, out: &mut Vec<Frame>) {
        if self.skipping {
            match memchr::memchr(b'\n', &self.buf) {
                None => {
                    self.buf.clear();
                    self.scanned = 0;
                    return;
                }
                Some(nl) => {
                    self.buf.drain(..=nl);
                    self.scanned = 0;
                    self.skipping = false;
                }
            }
        }
        let Some(last) =
            memchr::memrchr(b'\n', &self.buf[self.scanned..]).map(|i| i + self.scanned)
        else {
            self.scanned = self.buf.len();
            if self.buf.len() > self.max_line {
                self.oversize += 1;
                self.skipping = true;
                self.buf.clear();
                self.scanned = 0;
            }
            return;
        };
        let end = last + 1;
        if end >= self.chunk / 4 {
            let tail = self.buf[end..].to_vec();
            let mut whole = std::mem::replace(
                &mut self.buf,
                Vec::with_capacity(self.chunk.max(tail.len() * 2)),
            );
            whole.truncate(end);
            let shared = Bytes::from(whole);
            self.oversize += split_lines(&shared, self.max_line, |s, e| shared.slice(s..e), out);
            self.buf.extend_from_slice(&tail);
        } else {
            let head = &self.buf[..end];
            self.oversize += split_lines(
                head,
                self.max_line,
                |s, e| Bytes::copy_from_slice(&head[s..e]),
                out,
            );
            self.buf.drain(..end);
        }
        self.scanned = self.buf.len();
    }

    /// The connection ended: discards the partial line, returning its length (0 if none).
    pub fn finish(&mut self) -> usize {
        let partial = self.buf.len() + usize::from(self.skipping);
        self.buf.clear();
        self.scanned = 0;
        self.skipping = false;
        partial
    }
}

/// Splits `region` (which ends with `\n`) into frames; returns how many lines were over
/// `max_line` and skipped.
fn split_lines(
    region: &[u8],
    max_line: usize,
    mut make: impl FnMut(usize, usize) -> Bytes,
    out: &mut Vec<Frame>,
) -> u64 {
    let mut start = 0;
    let mut oversize = 0;
    for nl in memchr::memchr_iter(b'\n', region) {
        let end = if nl > start && region[nl - 1] == b'\r' {
            nl - 1
        } else {
            nl
        };
        if end == start {
            out.push(Frame::Heartbeat);
        } else if end - start > max_line {
            oversize += 1;
        } else {
            out.push(Frame::Line(make(start, end)));
        }
        start = nl + 1;
    }
    oversize
}

/// What one decoding step did with the input.
enum Step {
    Used(usize),
    /// Used this much, and cannot go on without more input.
    NeedsMore(usize),
}

/// Collects a gzip member header across inputs, capped at [`MAX_GZIP_HEADER`]; once it is
/// whole, the body follows.
fn header(stage: &mut Stage, input: &[u8]) -> Result<Step, DecodeError> {
    let Stage::Header(seen) = stage else {
        return Ok(Step::Used(0));
    };
    let before = seen.len();
    seen.extend_from_slice(input);
    let too_long = seen.len() > MAX_GZIP_HEADER;
    match gzip_header_len(seen)? {
        None if too_long => Err(DecodeError::Header(format!(
            "header longer than {MAX_GZIP_HEADER} bytes"
        ))),
        None => Ok(Step::Used(input.len())),
        Some(len) => {
            *stage = Stage::Body;
            // What followed the header in this input is the body.
            Ok(Step::Used(len - before))
        }
    }
}

/// The length of a complete gzip member header at the start of `data`, or `None` if more
/// bytes are needed.
fn gzip_header_len(data: &[u8]) -> Result<Option<usize>, DecodeError> {
    if data.len() < 10 {
        if data.len() >= 2 && data[..2] != [0x1f, 0x8b] {
            return Err(DecodeError::Header("bad magic bytes".to_owned()));
        }
        return Ok(None);
    }
    if data[..2] != [0x1f, 0x8b] {
        return Err(DecodeError::Header("bad magic bytes".to_owned()));
    }
    if data[2] != 8 {
        return Err(DecodeError::Header(format!(
            "compression method {} is not deflate",
            data[2]
        )));
    }
    let flags = data[3];
    let mut at = 10;
    if flags & 0x04 != 0 {
        let Some(len) = data.get(at..at + 2) else {
            return Ok(None);
        };
        at += 2 + usize::from(u16::from_le_bytes([len[0], len[1]]));
    }
    for bit in [0x08, 0x10] {
        if flags & bit != 0 {
            match data.get(at..).and_then(|d| memchr::memchr(0, d)) {
                Some(nul) => at += nul + 1,
                None => return Ok(None),
            }
        }
    }
    if flags & 0x02 != 0 {
        at += 2;
    }
    Ok((data.len() >= at).then_some(at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn lines(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| match f {
                Frame::Line(b) => String::from_utf8(b.to_vec()).unwrap(),
                Frame::Heartbeat => "<hb>".to_owned(),
            })
            .collect()
    }

    /// A gzip bomb (megabytes of heartbeats from a few kilobytes) inflates a bounded
    /// amount per call, and every frame still comes out, in order.
    #[test]
    fn inflate_is_bounded_per_call() {
        let n = 4 * 1024 * 1024;
        let bomb = gzip(&b"\r\n".repeat(n));
        assert!(bomb.len() < 128 * 1024, "{} bytes compressed", bomb.len());
        let mut r = LineReader::new(true, 16 * 1024, 1024 * 1024);
        let budget = r.output_budget();
        let (mut out, mut total, mut calls) = (Vec::new(), 0usize, 0);
        r.feed(&bomb, &mut out).unwrap();
        loop {
            calls += 1;
            assert!(
                out.len() * 2 <= budget + 2,
                "{} frames in one call",
                out.len()
            );
            total += out.len();
            out.clear();
            if !r.has_pending() {
                break;
            }
            r.resume(&mut out).unwrap();
        }
        assert_eq!(total, n);
        assert!(calls > 4, "{calls} calls");
    }

    /// A gzip header whose name field never ends is refused once over the cap.
    #[test]
    fn endless_gzip_header_is_refused() {
        let mut header = vec![0x1f, 0x8b, 8, 0x08, 0, 0, 0, 0, 0, 0xff];
        header.extend(std::iter::repeat_n(b'a', MAX_GZIP_HEADER + 1));
        let mut r = LineReader::new(true, 16 * 1024, 1024 * 1024);
        let err = r.feed_all(&header, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, DecodeError::Header(_)), "{err}");
    }

    /// Lines split across arbitrary chunk boundaries come out whole, in order, with
    /// heartbeats recognised, for both encodings.
    #[test]
    fn frames_survive_any_chunking() {
        let mut text = Vec::new();
        let mut expect = Vec::new();
        for i in 0..300 {
            if i % 7 == 0 {
                text.extend_from_slice(b"\r\n");
                expect.push("<hb>".to_owned());
            }
            let line = format!(
                "{{\"id_str\":\"{i}\",\"t\":\"{}\"}}",
                "y".repeat(i * 13 % 3000)
            );
            text.extend_from_slice(line.as_bytes());
            text.extend_from_slice(b"\r\n");
            expect.push(line);
        }
        for gz in [false, true] {
            let body = if gz { gzip(&text) } else { text.clone() };
            for step in [1, 7, 100, 4096, body.len()] {
                let mut r = LineReader::new(gz, 4096, 1 << 20);
                let mut out = Vec::new();
                for c in body.chunks(step) {
                    r.feed_all(c, &mut out).unwrap();
                }
                assert_eq!(lines(&out), expect, "gzip={gz} step={step}");
                assert_eq!(r.finish(), 0);
            }
        }
    }

    /// An oversize line is skipped and counted; its neighbours are intact.
    #[test]
    fn oversize_lines_are_skipped() {
        let big = "x".repeat(50_000);
        let text = format!("{{\"a\":1}}\r\n{big}\r\n{{\"b\":2}}\r\n{big}{big}\r\n{{\"c\":3}}\r\n");
        for step in [10, 999, 70_000] {
            let mut r = LineReader::new(false, 2048, 10_000);
            let mut out = Vec::new();
            for c in text.as_bytes().chunks(step) {
                r.feed_all(c, &mut out).unwrap();
            }
            assert_eq!(
                lines(&out),
                ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"],
                "step={step}"
            );
            assert_eq!(r.oversize, 2);
        }
    }

    /// A partial line at disconnect is never emitted, only counted.
    #[test]
    fn partial_line_is_discarded() {
        let mut r = LineReader::new(false, 4096, 1 << 20);
        let mut out = Vec::new();
        r.feed_all(b"{\"a\":1}\r\n{\"b\":", &mut out).unwrap();
        assert_eq!(lines(&out), ["{\"a\":1}"]);
        assert_eq!(r.finish(), 5);
    }

    /// Lines from a well-filled buffer share its allocation instead of being copied.
    #[test]
    fn large_reads_are_zero_copy() {
        let mut text = Vec::new();
        for i in 0..100 {
            text.extend_from_slice(
                format!("{{\"id_str\":\"{i}\",\"pad\":\"{}\"}}\r\n", "z".repeat(500)).as_bytes(),
            );
        }
        let mut r = LineReader::new(false, 64 * 1024, 1 << 20);
        let mut out = Vec::new();
        r.feed_all(&text, &mut out).unwrap();
        let ptrs: Vec<usize> = out
            .iter()
            .map(|f| match f {
                Frame::Line(b) => b.as_ptr() as usize,
                Frame::Heartbeat => 0,
            })
            .collect();
        // Consecutive lines sit next to each other in one allocation.
        for w in ptrs.windows(2) {
            assert!(w[1] > w[0] && w[1] - w[0] < 700);
        }
    }

    /// Corrupt data and a wrong magic number are errors, not panics.
    #[test]
    fn corrupt_gzip_is_an_error() {
        let mut r = LineReader::new(true, 4096, 1 << 20);
        let mut out = Vec::new();
        assert!(matches!(
            r.feed_all(b"PK\x03\x04 not gzip", &mut out),
            Err(DecodeError::Header(_))
        ));
        // After a flush boundary, 0xff starts a block of the reserved type 3.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"{\"a\":1}\r\n").unwrap();
        enc.flush().unwrap();
        let body = enc.get_ref().clone();
        let mut r = LineReader::new(true, 4096, 1 << 20);
        r.feed_all(&body, &mut out).unwrap();
        assert_eq!(lines(&out), ["{\"a\":1}"]);
        assert!(matches!(
            r.feed_all(&[0xff; 64], &mut out),
            Err(DecodeError::Inflate(_))
        ));
    }

    /// Optional gzip header fields (name, comment, extra) are skipped.
    #[test]
    fn gzip_header_fields() {
        let mut enc = flate2::GzBuilder::new()
            .filename("stream.json")
            .comment("c")
            .extra(vec![1, 2, 3])
            .write(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"{\"a\":1}\r\n").unwrap();
        let body = enc.finish().unwrap();
        let mut r = LineReader::new(true, 4096, 1 << 20);
        let mut out = Vec::new();
        for c in body.chunks(3) {
            r.feed_all(c, &mut out).unwrap();
        }
        assert_eq!(lines(&out), ["{\"a\":1}"]);
    }
}
