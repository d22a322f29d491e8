//! `cargo bench -p tandem-merge`: id extraction speed on the real sample posts, and the
//! dedup cache's speed and memory at 5 million ids, side by side with moka.
//!
//! Targets (issue 5): extraction ≥ 1.5 M lines/s per core; dedup ≥ 5 M ops/s and
//! ≤ 24 bytes per remembered id at 5 M ids.
// A benchmark measures wall-clock time on purpose.
#![allow(clippy::disallowed_types)]
// Measuring memory needs a counting global allocator, and `GlobalAlloc` is an unsafe
// trait. The wrapper below only forwards to the system allocator and adds up sizes.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tandem_core::identify;
use tandem_merge::GenerationalSet;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds the contract; the
// counter is only arithmetic on sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const IDS: u64 = 5_000_000;

/// Snowflake-like ids: increasing time, a worker and a sequence in the low bits.
fn ids() -> impl Iterator<Item = u64> {
    let mut rng = fastrand::Rng::with_seed(7);
    let base = tandem_core::ids::snowflake(1_700_000_000_000, 0, 0);
    (0..IDS).map(move |i| base + (i << 10) + rng.u64(..1024))
}

fn extraction() {
    let text = include_str!("../../../samples/native-posts.ndjson");
    let lines: Vec<&[u8]> = text.lines().map(str::as_bytes).collect();
    let bytes: usize = lines.iter().map(|l| l.len()).sum();
    let rounds = 20_000;
    let start = Instant::now();
    let mut found = 0usize;
    for _ in 0..rounds {
        for l in &lines {
            found += usize::from(black_box(identify(black_box(l))).is_ok());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = (rounds * lines.len()) as f64;
    assert_eq!(found, rounds * lines.len());
    println!(
        "id extraction     {:>8.2} M lines/s per core  ({:.2} µs per {:.1} KB post; target ≥ 1.5 M/s)",
        n / secs / 1e6,
        secs / n * 1e6,
        bytes as f64 / lines.len() as f64 / 1000.0
    );
    let start = Instant::now();
    let rounds = 5_000;
    for _ in 0..rounds {
        for l in &lines {
            black_box(tandem_core::validate(black_box(l)).is_ok());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "full validation   {:>8.2} M lines/s per core  (JSON grammar and UTF-8; run on first copies only)",
        (rounds * lines.len()) as f64 / secs / 1e6
    );
    // The cost is structural (hundreds of small tokens per post), not strings or
    // UTF-8: sonic-rs's strict path and simd-json measured the same on this machine.
    let ascii = format!("{{\"text\":\"{}\"}}", "x".repeat(4_700));
    let start = Instant::now();
    for _ in 0..rounds * 100 {
        black_box(tandem_core::validate(black_box(ascii.as_bytes())).is_ok());
    }
    println!(
        "  (one 4.7 KB string: {:.2} M lines/s)",
        (rounds * 100) as f64 / start.elapsed().as_secs_f64() / 1e6
    );
}

/// Best of three timings of `f`, in seconds.
fn best(mut f: impl FnMut() -> f64) -> f64 {
    (0..3).map(|_| f()).fold(f64::INFINITY, f64::min)
}

fn generational() {
    let now = tokio::time::Instant::now();
    let before = LIVE.load(Ordering::Relaxed);
    let mut set = GenerationalSet::new(Duration::from_secs(900), 4, 50_000_000, now);
    let start = Instant::now();
    for id in ids() {
        set.insert(black_box(id), now);
    }
    let fill = start.elapsed().as_secs_f64();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    // The merger's work on a full cache: each activity arrives twice (two paths); the
    // first copy is a miss and an insert, the second a hit. One operation per copy.
    let fresh: Vec<u64> = ids()
        .map(|id| id ^ 0x4000_0000_0000_0000)
        .take(1_000_000)
        .collect();
    let mut round = 0u64;
    let secs = best(|| {
        round += 1;
        let start = Instant::now();
        for &id in &fresh {
            let id = id ^ (round << 56);
            if !set.contains(black_box(&id)) {
                set.insert(id, now);
            }
            black_box(set.contains(black_box(&id)));
        }
        start.elapsed().as_secs_f64()
    });
    println!(
        "generational set  {:>8.2} M ops/s on a full cache  {:>5.1} bytes/id at {} M ids  (filled at {:.2} M/s; targets ≥ 5 M ops/s, ≤ 24 B/id)",
        2.0 * fresh.len() as f64 / secs / 1e6,
        bytes as f64 / IDS as f64,
        IDS / 1_000_000,
        IDS as f64 / fill / 1e6
    );
}

fn moka() {
    let before = LIVE.load(Ordering::Relaxed);
    let cache: moka::sync::Cache<u64, ()> = moka::sync::Cache::builder()
        .max_capacity(IDS * 2)
        .time_to_live(Duration::from_secs(900))
        .build();
    let start = Instant::now();
    for id in ids() {
        // entry().or_insert_with(): get-then-insert would let duplicates through under
        // concurrency.
        cache.entry(black_box(id)).or_insert_with(|| ());
    }
    cache.run_pending_tasks();
    let fill = start.elapsed().as_secs_f64();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let fresh: Vec<u64> = ids()
        .map(|id| id ^ 0x4000_0000_0000_0000)
        .take(300_000)
        .collect();
    let mut round = 0u64;
    let secs = best(|| {
        round += 1;
        let start = Instant::now();
        for &id in &fresh {
            let id = id ^ (round << 56);
            black_box(cache.entry(id).or_insert_with(|| ()).is_fresh());
            black_box(cache.contains_key(&id));
        }
        start.elapsed().as_secs_f64()
    });
    println!(
        "moka (TTL cache)  {:>8.2} M ops/s on a full cache  {:>5.1} bytes/id at {} M ids  (filled at {:.2} M/s)",
        2.0 * fresh.len() as f64 / secs / 1e6,
        bytes as f64 / IDS as f64,
        IDS / 1_000_000,
        IDS as f64 / fill / 1e6
    );
}

fn main() {
    // `cargo bench` passes `--bench`; filters are not supported here.
    println!("tandem-merge benchmark (single thread)");
    extraction();
    generational();
    moka();
}
