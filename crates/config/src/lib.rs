//! The TOML configuration of a tandem process: the document ([`Config`]), loading with
//! every problem reported by field (and line), credentials from the environment or files,
//! and the plan `tandem check` prints.
//!
//! Each crate owns the settings of its own stage (`tandem_conn::RetryConfig`,
//! `tandem_merge::MergeConfig`, …); this crate composes them and adds the rules that
//! span stages (the dedup window against the backfill window, paths and sinks named by
//! streams).
//!
//! # Layout
//! - [`schema`]: the document; every field's doc is the reference.
//! - [`mod@load`]: parsing, validation and credentials ([`load()`], [`Problems`]).
//! - [`mod@plan`]: the human-readable plan.

pub mod load;
pub mod plan;
pub mod schema;

pub use load::{
    Loaded, Problem, Problems, load, load_file, pair_sink, parse, resolve_auth, validate,
};
pub use plan::plan;
pub use schema::{ApiConfig, AuthConfig, Config, SinkConfig, StreamConfig};
