//! Named crash points for durability tests: with the `crash-points` feature (enabled only
//! by test builds), `point("name")` aborts the process when `TANDEM_CRASH_AT` names it,
//! as abruptly as `kill -9` (no destructor runs, no buffer is flushed). `name@N` aborts at
//! the N-th time the point is reached. Without the feature a point compiles to nothing.

/// A place where a test may kill the process.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// A place where a test may kill the process.
#[cfg(feature = "crash-points")]
pub fn point(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static AT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        let spec = std::env::var("TANDEM_CRASH_AT").ok()?;
        match spec.split_once('@') {
            Some((n, k)) => Some((n.to_owned(), k.parse().unwrap_or(1))),
            None => Some((spec, 1)),
        }
    });
    if let Some((target, nth)) = at
        && target == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 >= *nth
    {
        eprintln!("tandem: crash point {name} reached; aborting");
        std::process::abort();
    }
}
