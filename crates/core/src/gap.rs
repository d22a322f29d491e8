//! Coverage gaps as the rest of the process sees them: what gap repair reports and the
//! monitor publishes in `/status`.

use serde::{Deserialize, Serialize};

/// Where a gap stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapState {
    /// Waiting for a recovery slot, or being recovered.
    Open,
    /// Every chunk came back.
    Repaired,
    /// The upstream cannot replay it (likes streams, or older than its retention).
    Unrecoverable,
}

impl GapState {
    pub fn label(self) -> &'static str {
        match self {
            GapState::Open => "open",
            GapState::Repaired => "repaired",
            GapState::Unrecoverable => "unrecoverable",
        }
    }
}

/// One partition gap beyond what backfill reaches, for status pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GapView {
    /// The uncovered interval `[start_ms, end_ms)` (content time, ms since the epoch).
    pub start_ms: u64,
    pub end_ms: u64,
    pub state: GapState,
    /// When the gap was found and, once repaired, when the last chunk came back.
    pub found_ms: u64,
    pub repaired_ms: Option<u64>,
    pub chunks_done: usize,
    pub chunks: usize,
    /// Why it cannot be repaired.
    pub reason: Option<String>,
}
