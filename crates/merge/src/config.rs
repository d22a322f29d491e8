//! Merger settings. Field docs are the configuration reference.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How duplicates are removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// How long an activity id is remembered, in seconds. Must exceed the backfill window
    /// plus reconnect delays plus the skew between paths (see `DEDUP-WINDOW.md`).
    #[serde(default = "default_window_secs")]
    pub dedup_window_secs: u64,
    /// Hard cap on remembered ids per partition. Past it, the oldest ids are forgotten
    /// early: counted, and alerted on, because the duplicate guarantee weakens.
    #[serde(default = "default_max_ids")]
    pub max_ids_per_partition: usize,
    /// Generations the window is split into: ids live between `window` and
    /// `window * generations / (generations - 1)`; more generations cost lookups.
    #[serde(default = "default_generations")]
    pub generations: usize,
    /// Directory of the dead-letter file (`dead-letters.ndjson`).
    #[serde(default = "default_dead_letter_dir")]
    pub dead_letter_dir: PathBuf,
    /// The dead letters kept on disk at the most, in bytes: past half of it the file is
    /// renamed to `dead-letters.1.ndjson` (replacing the one before), so two files hold
    /// the most recent ones. Every dead letter is counted whether or not it is kept.
    #[serde(default = "default_max_dead_letter_bytes")]
    pub max_dead_letter_bytes: u64,
    /// One id in this many is followed to measure the lead/lag between paths.
    #[serde(default = "default_lag_sample_every")]
    pub lag_sample_every: u64,
    /// Unique activities per batch handed to the sink.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
}

fn default_window_secs() -> u64 {
    900
}
fn default_max_ids() -> usize {
    50_000_000
}
fn default_generations() -> usize {
    4
}
fn default_dead_letter_dir() -> PathBuf {
    PathBuf::from("./tandem-data/dead-letters")
}
fn default_max_dead_letter_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_lag_sample_every() -> u64 {
    64
}
fn default_batch() -> usize {
    1024
}

impl Default for MergeConfig {
    fn default() -> Self {
        MergeConfig {
            dedup_window_secs: default_window_secs(),
            max_ids_per_partition: default_max_ids(),
            generations: default_generations(),
            dead_letter_dir: default_dead_letter_dir(),
            max_dead_letter_bytes: default_max_dead_letter_bytes(),
            lag_sample_every: default_lag_sample_every(),
            max_batch: default_batch(),
        }
    }
}

impl MergeConfig {
    /// Every problem, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.dedup_window_secs == 0 {
            out.push(("dedup_window_secs", "must be positive".to_owned()));
        }
        if self.generations < 2 {
            out.push(("generations", "must be at least 2".to_owned()));
        }
        if self.max_dead_letter_bytes < 64 * 1024 {
            out.push(("max_dead_letter_bytes", "must be at least 65536".to_owned()));
        }
        if self.max_ids_per_partition < 1_000 {
            out.push(("max_ids_per_partition", "must be at least 1000".to_owned()));
        }
        if self.lag_sample_every == 0 {
            out.push(("lag_sample_every", "must be positive".to_owned()));
        }
        if self.max_batch == 0 {
            out.push(("max_batch", "must be positive".to_owned()));
        }
        out
    }
}
