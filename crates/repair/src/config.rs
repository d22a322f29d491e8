//! Gap repair settings. Field docs are the configuration reference.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tandem_conn::ApiKind;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepairConfig {
    /// Directory of the coverage ledger (one small JSON file per stream partition).
    #[serde(default = "default_dir")]
    pub ledger_dir: PathBuf,
    /// Recovery requests cover at most this long each (1 hour is what the upstream
    /// handles best; 2 hours at most).
    #[serde(default = "default_chunk_secs")]
    pub chunk_secs: u64,
    /// Margin added on each side of a recovered interval, so that nothing at its edges is
    /// missed; the copies it brings are removed with the ids stored around the edges.
    #[serde(default = "default_margin_secs")]
    pub margin_secs: u64,
    /// How far back the upstream's recovery reaches; older parts of a gap are reported
    /// unrecoverable. Absent: the API's (5 days for Gnip volume streams, 24 hours for X
    /// API v2).
    #[serde(default)]
    pub retention_secs: Option<u64>,
    /// Recovery jobs running at once per account (the upstream allows 2).
    #[serde(default = "default_jobs")]
    pub max_jobs_per_account: usize,
    /// How often the ledger is written.
    #[serde(default = "default_flush_ms")]
    pub ledger_flush_ms: u64,
}

fn default_dir() -> PathBuf {
    PathBuf::from("./tandem-data/ledger")
}
fn default_chunk_secs() -> u64 {
    3_600
}
fn default_margin_secs() -> u64 {
    30
}
fn default_jobs() -> usize {
    2
}
fn default_flush_ms() -> u64 {
    1_000
}

impl Default for RepairConfig {
    fn default() -> Self {
        RepairConfig {
            ledger_dir: default_dir(),
            chunk_secs: default_chunk_secs(),
            margin_secs: default_margin_secs(),
            retention_secs: None,
            max_jobs_per_account: default_jobs(),
            ledger_flush_ms: default_flush_ms(),
        }
    }
}

impl RepairConfig {
    /// The recovery retention in effect on a stream of `api`.
    pub fn retention_secs(&self, api: ApiKind) -> u64 {
        self.retention_secs
            .unwrap_or_else(|| api.recovery_retention_secs())
    }

    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.chunk_secs == 0 {
            out.push(("chunk_secs", "must be positive".to_owned()));
        }
        if self.chunk_secs > 7_200 {
            out.push((
                "chunk_secs",
                format!(
                    "{} s: the upstream recommends at most 2 hours",
                    self.chunk_secs
                ),
            ));
        }
        if self.max_jobs_per_account == 0 {
            out.push(("max_jobs_per_account", "must be positive".to_owned()));
        }
        if self.retention_secs == Some(0) {
            out.push(("retention_secs", "must be positive".to_owned()));
        }
        out
    }
}
