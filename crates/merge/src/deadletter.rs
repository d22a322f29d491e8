//! The dead-letter file: every line that could not be used, with why and where it came
//! from, so that nothing received is silently dropped.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tandem_core::Partition;
use tandem_core::time::unix_ms_now;

/// Appends dead letters to `<dir>/dead-letters.ndjson`, one JSON object per line; past
/// half the byte limit the file becomes `dead-letters.1.ndjson` (replacing the older one)
/// and a new one starts, so the disk holds at most about the limit.
#[derive(Debug)]
pub struct DeadLetters {
    path: PathBuf,
    max_bytes: u64,
    file: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    file: BufWriter<File>,
    len: u64,
}

/// Where a dead letter came from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub stream: &'a str,
    pub partition: Partition,
    pub path: &'a str,
    pub connection: u64,
}

impl DeadLetters {
    /// Opens the dead-letter file with the default limit (256 MiB).
    pub fn open(dir: &Path) -> std::io::Result<DeadLetters> {
        DeadLetters::with_limit(dir, 256 * 1024 * 1024)
    }

    /// Opens the dead-letter file, keeping about `max_bytes` on disk.
    pub fn with_limit(dir: &Path, max_bytes: u64) -> std::io::Result<DeadLetters> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("dead-letters.ndjson");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let len = file.metadata()?.len();
        Ok(DeadLetters {
            path,
            max_bytes,
            file: Mutex::new(Current {
                file: BufWriter::new(file),
                len,
            }),
        })
    }

    /// The older file: `dead-letters.1.ndjson`.
    pub fn older_path(&self) -> PathBuf {
        self.path.with_file_name("dead-letters.1.ndjson")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records one line. Dead letters are rare, so each is written through at once.
    pub fn record(
        &self,
        source: Source<'_>,
        reason: &str,
        detail: &str,
        line: &[u8],
    ) -> std::io::Result<()> {
        let mut record = serde_json::json!({
            "at_ms": unix_ms_now(),
            "stream": source.stream,
            "partition": source.partition,
            "path": source.path,
            "connection": source.connection,
            "reason": reason,
            "detail": detail,
        });
        match std::str::from_utf8(line) {
            Ok(text) => record["line"] = serde_json::Value::from(text),
            Err(_) => record["line_base64"] = serde_json::Value::from(base64(line)),
        }
        let mut text = serde_json::to_vec(&record)?;
        text.push(b'\n');
        let mut current = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("dead-letter lock poisoned"))?;
        if current.len + text.len() as u64 > self.max_bytes / 2 && current.len > 0 {
            self.rotate(&mut current)?;
        }
        current.file.write_all(&text)?;
        current.file.flush()?;
        current.len += text.len() as u64;
        Ok(())
    }

    /// The current file becomes the older one (replacing it); a new one starts.
    fn rotate(&self, current: &mut Current) -> std::io::Result<()> {
        current.file.flush()?;
        std::fs::rename(&self.path, self.older_path())?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        *current = Current {
            file: BufWriter::new(file),
            len: 0,
        };
        tracing::warn!(file = %self.path.display(), max_bytes = self.max_bytes, "dead-letter file rotated; the oldest dead letters were dropped from disk (all are counted)");
        Ok(())
    }
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard base64 with padding.
    #[test]
    fn base64_encodes() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"\xff\xfe"), "//4=");
    }

    /// However many lines are dead-lettered, the two files stay within the limit and
    /// hold the newest ones.
    #[test]
    fn disk_use_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 64 * 1024;
        let d = DeadLetters::with_limit(dir.path(), limit).unwrap();
        let source = Source {
            stream: "s",
            partition: 1,
            path: "a",
            connection: 1,
        };
        for i in 0..2_000 {
            d.record(source, "invalid_json", "x", format!("{{bad {i}").as_bytes())
                .unwrap();
        }
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let total = size(d.path()) + size(&d.older_path());
        assert!(total <= limit, "{total} bytes on disk");
        let newest = std::fs::read_to_string(d.path()).unwrap();
        assert!(newest.contains("{bad 1999"), "the newest is kept");
    }
}
