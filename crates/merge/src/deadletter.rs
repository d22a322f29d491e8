//! The dead-letter file: every line that could not be used, with why and where it came
//! from, so that nothing received is silently dropped.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tandem_core::Partition;
use tandem_core::time::unix_ms_now;

/// Appends dead letters to `<dir>/dead-letters.ndjson`, one JSON object per line.
#[derive(Debug)]
pub struct DeadLetters {
    path: PathBuf,
    file: Mutex<BufWriter<File>>,
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
    pub fn open(dir: &Path) -> std::io::Result<DeadLetters> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("dead-letters.ndjson");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(DeadLetters {
            path,
            file: Mutex::new(BufWriter::new(file)),
        })
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
        let mut file = self.file.lock().expect("dead-letter lock");
        serde_json::to_writer(&mut *file, &record)?;
        file.write_all(b"\n")?;
        file.flush()
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
}
