//! The coverage ledger of one stream partition: up to when the partition is known
//! complete, and the gaps that need (or got) repair. Written atomically (a temporary file
//! renamed over the old one), so a crash leaves the previous version.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_core::{ActivityId, GapState, GapView, Partition};

/// One recovery chunk: `[start_ms, end_ms)`, and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub start_ms: u64,
    pub end_ms: u64,
    pub done: bool,
    /// Why the upstream refused it for good, if it did.
    #[serde(default)]
    pub failed: Option<String>,
    /// Done because the pair's other consumer stored this interval: never requested.
    #[serde(default)]
    pub by_peer: bool,
}

/// A partition coverage gap beyond what backfill reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The uncovered interval, `[start_ms, end_ms)` in content time.
    pub start_ms: u64,
    pub end_ms: u64,
    pub state: GapState,
    /// When the gap was found (wall ms), for the repair duration.
    pub found_ms: u64,
    pub repaired_ms: Option<u64>,
    pub chunks: Vec<Chunk>,
    /// Why it cannot be repaired, when it cannot.
    #[serde(default)]
    pub reason: Option<String>,
    /// Whether the ids stored after the gap's end were added to its edge file.
    #[serde(default)]
    pub end_edge_saved: bool,
}

/// The persisted state of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionLedger {
    /// Content time (ms) up to which the partition is known complete; 0: unknown.
    pub complete_until_ms: u64,
    pub gaps: Vec<Gap>,
}

/// Ledger file path of a stream partition.
pub fn path(dir: &Path, stream: &str, partition: Partition) -> PathBuf {
    dir.join(stream).join(format!("partition-{partition}.json"))
}

impl PartitionLedger {
    /// Reads a ledger; a missing file is an empty ledger.
    pub fn load(path: &Path) -> std::io::Result<PartitionLedger> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PartitionLedger::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the ledger atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, path)
    }

    /// Gaps still waiting for repair.
    pub fn open_gaps(&self) -> impl Iterator<Item = &Gap> {
        self.gaps.iter().filter(|g| g.state == GapState::Open)
    }

    /// Forgets ended gaps found before `before_ms` (they no longer matter to anyone).
    pub fn prune(&mut self, before_ms: u64) {
        self.gaps
            .retain(|g| g.state == GapState::Open || g.found_ms >= before_ms);
    }
}

impl Gap {
    pub fn view(&self) -> GapView {
        GapView {
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            state: self.state,
            found_ms: self.found_ms,
            repaired_ms: self.repaired_ms,
            chunks_done: self.chunks.iter().filter(|c| c.done).count(),
            chunks: self.chunks.len(),
            reason: self.reason.clone(),
        }
    }
}

/// File of the ids stored around a gap's edges (post ids, one per line): they let the
/// merger recognise the copies a recovery's margins bring back, however old they are.
pub fn edge_ids_path(ledger: &Path, gap_start_ms: u64) -> PathBuf {
    let stem = ledger
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    ledger.with_file_name(format!("{stem}.gap-{gap_start_ms}.ids"))
}

/// Adds ids to an edge file (created when missing) and syncs it.
pub fn append_edge_ids(path: &Path, ids: &[ActivityId]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut text = String::with_capacity(ids.len() * 20);
    for id in ids {
        if let ActivityId::Post(n) = id {
            text.push_str(&n.to_string());
            text.push('\n');
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

/// Reads an edge file; a missing file holds no ids. A line that is not a number (a
/// torn last line after a crash) is skipped.
pub fn load_edge_ids(path: &Path) -> std::io::Result<Vec<ActivityId>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .map(ActivityId::Post)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Splits `[start_ms, end_ms)` into chunks of at most `chunk_ms`.
pub fn chunks(start_ms: u64, end_ms: u64, chunk_ms: u64) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut at = start_ms;
    while at < end_ms {
        let end = (at + chunk_ms.max(1)).min(end_ms);
        out.push(Chunk {
            start_ms: at,
            end_ms: end,
            done: false,
            failed: None,
            by_peer: false,
        });
        at = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger survives a save and a load; a missing file is an empty ledger.
    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "decahose", 2);
        assert_eq!(
            PartitionLedger::load(&p).unwrap(),
            PartitionLedger::default()
        );
        let l = PartitionLedger {
            complete_until_ms: 42,
            gaps: vec![Gap {
                start_ms: 1,
                end_ms: 9,
                state: GapState::Open,
                found_ms: 10,
                repaired_ms: None,
                chunks: chunks(1, 9, 3),
                reason: None,
                end_edge_saved: false,
            }],
        };
        l.save(&p).unwrap();
        assert_eq!(PartitionLedger::load(&p).unwrap(), l);
        assert_eq!(
            l.gaps[0]
                .chunks
                .iter()
                .map(|c| (c.start_ms, c.end_ms))
                .collect::<Vec<_>>(),
            [(1, 4), (4, 7), (7, 9)]
        );
    }
}
