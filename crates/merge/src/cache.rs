//! The time-bounded dedup cache: generations of plain hash sets.
//!
//! The window is split into `G - 1` spans; ids go into the current generation, a new
//! generation starts when the current one is a span old, and the oldest is dropped when
//! there are more than `G`. An id inserted at time `t` into a generation that started at
//! `s <= t < s + span` is dropped only when the generation `G` places younger starts,
//! which is at least `s + G * span > t + (G - 1) * span = t + window`: every id is
//! remembered for at least the window, at most one span longer. Expiry costs nothing per
//! id (a whole set is dropped at once), and memory is that of a hash set of integers:
//! about 15 bytes per 64-bit id on average (hashbrown, 1 control byte per slot, load
//! between 7/16 and 7/8), measured by `cargo bench -p tandem-merge`.
//!
//! A hard cap bounds memory. A generation also closes when it holds `cap / G` ids, so at
//! the cap the oldest generation, dropped early, is only a `G`-th of the ids: the newest
//! ids are always kept, and copies that arrive close together are still caught. The ids
//! dropped before their window ended are counted as evicted early, since a late copy of
//! one of them would pass.

use std::collections::VecDeque;
use std::hash::Hash;
use std::time::Duration;

use hashbrown::HashSet;
use tandem_core::DedupKey;
use tokio::time::Instant;

#[derive(Debug)]
struct Generation<K> {
    started: Instant,
    ids: HashSet<K>,
}

/// A set whose members are forgotten one generation at a time.
#[derive(Debug)]
pub struct GenerationalSet<K> {
    gens: VecDeque<Generation<K>>,
    span: Duration,
    window: Duration,
    max_gens: usize,
    cap: usize,
    len: usize,
    evicted_early: u64,
}

impl<K: Hash + Eq + Copy> GenerationalSet<K> {
    pub fn new(window: Duration, generations: usize, cap: usize, now: Instant) -> Self {
        let generations = generations.max(2);
        let span = window / (generations as u32 - 1);
        let mut gens = VecDeque::with_capacity(generations + 1);
        gens.push_back(Generation {
            started: now,
            ids: HashSet::new(),
        });
        GenerationalSet {
            gens,
            span: span.max(Duration::from_millis(1)),
            window,
            max_gens: generations,
            cap: cap.max(1),
            len: 0,
            evicted_early: 0,
        }
    }

    /// Starts a new generation when the current one is a span old or holds its share of
    /// the cap, then drops what no longer fits.
    fn rotate(&mut self, now: Instant) {
        let current = self.gens.back().expect("always one generation");
        let share = (self.cap / self.max_gens).max(1);
        if now.duration_since(current.started) < self.span && current.ids.len() < share {
            return;
        }
        // Size the new generation like the last one, so it does not rehash while growing.
        let expect = current.ids.len();
        self.gens.push_back(Generation {
            started: now,
            ids: HashSet::with_capacity(expect + expect / 8),
        });
        self.trim(now);
    }

    /// Drops the oldest generations while there are more than `G` or more ids than the
    /// cap; a generation whose successor started less than a window ago still held ids
    /// inside their window, which are counted as evicted early.
    fn trim(&mut self, now: Instant) {
        while self.gens.len() > self.max_gens || (self.len > self.cap && self.gens.len() > 1) {
            let old = self.gens.pop_front().expect("more than one generation");
            self.len -= old.ids.len();
            let successor = self.gens.front().expect("one generation left").started;
            if now.duration_since(successor) < self.window {
                self.evicted_early += old.ids.len() as u64;
            }
        }
    }

    /// Whether `key` was remembered (newest generation first: copies arrive close
    /// together).
    pub fn contains(&self, key: &K) -> bool {
        self.gens.iter().rev().any(|g| g.ids.contains(key))
    }

    /// Remembers `key` from `now`; returns false if it was already remembered.
    pub fn insert(&mut self, key: K, now: Instant) -> bool {
        if self.contains(&key) {
            return false;
        }
        self.insert_absent(key, now);
        true
    }

    /// Remembers `key` from `now` when the caller has just seen `contains` say no (the hot
    /// path: a first copy costs one probe per generation, then one insert). Rotating
    /// only adds an empty generation and drops old ones, so the key is still absent.
    pub fn insert_absent(&mut self, key: K, now: Instant) {
        self.rotate(now);
        let added = self
            .gens
            .back_mut()
            .expect("always one generation")
            .ids
            .insert(key);
        debug_assert!(added, "insert_absent of a remembered key");
        self.len += usize::from(added);
        self.trim(now);
    }

    /// Remembers `key` as if it had been inserted at `at` (restart rebuild): it goes into
    /// the current generation, which only lengthens how long it is kept.
    pub fn remember(&mut self, key: K, now: Instant) {
        self.insert(key, now);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every remembered key, newest generation first.
    pub fn iter(&self) -> impl Iterator<Item = &K> {
        self.gens.iter().rev().flat_map(|g| g.ids.iter())
    }

    /// Ids forgotten before their window ended.
    pub fn evicted_early(&self) -> u64 {
        self.evicted_early
    }

    /// How far back the remembered ids reach: normally between the window and one span
    /// more; less after early evictions.
    pub fn horizon(&self, now: Instant) -> Duration {
        now.duration_since(self.gens.front().expect("always one generation").started)
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Bytes of hash-set storage (slots and control bytes), for the memory report.
    pub fn allocated_bytes(&self) -> usize {
        self.gens
            .iter()
            .map(|g| g.ids.capacity() * std::mem::size_of::<K>() + g.ids.capacity() + 16)
            .sum()
    }
}

/// The dedup cache of one partition: exact 64-bit keys for posts, 128-bit keys otherwise.
#[derive(Debug)]
pub struct DedupCache {
    narrow: GenerationalSet<u64>,
    wide: GenerationalSet<u128>,
}

impl DedupCache {
    pub fn new(window: Duration, generations: usize, cap: usize, now: Instant) -> DedupCache {
        DedupCache {
            narrow: GenerationalSet::new(window, generations, cap, now),
            wide: GenerationalSet::new(window, generations, cap, now),
        }
    }

    pub fn contains(&self, key: &DedupKey) -> bool {
        match key {
            DedupKey::Narrow(k) => self.narrow.contains(k),
            DedupKey::Wide(k) => self.wide.contains(k),
        }
    }

    /// Returns false if the key was already remembered.
    pub fn insert(&mut self, key: DedupKey, now: Instant) -> bool {
        match key {
            DedupKey::Narrow(k) => self.narrow.insert(k, now),
            DedupKey::Wide(k) => self.wide.insert(k, now),
        }
    }

    /// Remembers a key `contains` has just said is absent (see
    /// [`GenerationalSet::insert_absent`]).
    pub fn insert_absent(&mut self, key: DedupKey, now: Instant) {
        match key {
            DedupKey::Narrow(k) => self.narrow.insert_absent(k, now),
            DedupKey::Wide(k) => self.wide.insert_absent(k, now),
        }
    }

    pub fn len(&self) -> usize {
        self.narrow.len() + self.wide.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn evicted_early(&self) -> u64 {
        self.narrow.evicted_early() + self.wide.evicted_early()
    }

    /// The shorter horizon of the two sets that hold ids.
    pub fn horizon(&self, now: Instant) -> Duration {
        match (self.narrow.is_empty(), self.wide.is_empty()) {
            (false, true) | (true, true) => self.narrow.horizon(now),
            (true, false) => self.wide.horizon(now),
            (false, false) => self.narrow.horizon(now).min(self.wide.horizon(now)),
        }
    }

    pub fn window(&self) -> Duration {
        self.narrow.window()
    }

    /// Post ids (the only keys that carry their creation time) created at or after
    /// `since_ms`: the edge of a gap, read while it is still remembered.
    pub fn posts_since(&self, since_ms: u64) -> Vec<tandem_core::ActivityId> {
        self.narrow
            .iter()
            .filter(|&&id| tandem_core::ids::snowflake_unix_ms(id) >= since_ms)
            .map(|&id| tandem_core::ActivityId::Post(id))
            .collect()
    }

    /// Bytes of hash-set storage of both key widths.
    pub fn allocated_bytes(&self) -> usize {
        self.narrow.allocated_bytes() + self.wide.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    /// Every id is remembered for at least the window and forgotten within one more span.
    #[tokio::test(start_paused = true)]
    async fn remembered_for_the_window_then_forgotten() {
        let window = 15 * MIN;
        let mut s = GenerationalSet::new(window, 4, 1_000_000, Instant::now());
        let mut inserted = Vec::new();
        // One id per 10 s over an hour, checking the window guarantee as time passes.
        for i in 0..360u64 {
            let now = Instant::now();
            assert!(s.insert(i, now));
            inserted.push((i, now));
            for &(id, at) in &inserted {
                let age = now.duration_since(at);
                if age <= window {
                    assert!(s.contains(&id), "id {id} forgotten after {age:?}");
                }
                if age > window + window / 3 + Duration::from_secs(10) {
                    assert!(!s.contains(&id), "id {id} kept for {age:?}");
                }
            }
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        assert_eq!(s.evicted_early(), 0);
        // About 20 minutes of ids at most (window + one span): 120 ids, give or take one.
        assert!(s.len() <= 121, "{}", s.len());
    }

    /// A repeated id is rejected while remembered.
    #[tokio::test(start_paused = true)]
    async fn first_insert_wins() {
        let mut s = GenerationalSet::new(MIN, 4, 100, Instant::now());
        assert!(s.insert(7u64, Instant::now()));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!s.insert(7, Instant::now()));
        assert_eq!(s.len(), 1);
    }

    /// The cap bounds memory; ids dropped early are counted, and the horizon shrinks.
    #[tokio::test(start_paused = true)]
    async fn cap_evicts_early_and_counts() {
        let mut s = GenerationalSet::new(15 * MIN, 4, 1_000, Instant::now());
        for i in 0..5_000u64 {
            s.insert(i, Instant::now());
            if i % 500 == 0 {
                tokio::time::advance(Duration::from_secs(30)).await;
            }
        }
        assert!(s.len() <= 1_000);
        assert!(s.evicted_early() >= 4_000);
        assert!(s.horizon(Instant::now()) < 15 * MIN);
    }

    /// At the cap only the oldest share goes: ids inserted a moment ago (copies arriving
    /// close together) are still remembered, however fast ids come in.
    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_newest_ids_are_kept() {
        let mut s = GenerationalSet::new(15 * MIN, 4, 1_000, Instant::now());
        for i in 0..10_000u64 {
            assert!(s.insert(i, Instant::now()));
            // The newest three quarters of the cap are always there.
            let keep = (i + 1).min(750);
            if i % 97 != 0 {
                continue;
            }
            assert!(
                (i + 1 - keep..=i).all(|k| s.contains(&k)),
                "after inserting {i}"
            );
        }
        assert!(s.len() <= 1_000);
        assert_eq!(s.evicted_early(), 10_000 - s.len() as u64);
    }

    /// Ids dropped after their window ended are not counted as early.
    #[tokio::test(start_paused = true)]
    async fn expiry_by_time_is_not_early() {
        let mut s = GenerationalSet::new(MIN, 4, 1_000_000, Instant::now());
        for i in 0..100u64 {
            s.insert(i, Instant::now());
            tokio::time::advance(Duration::from_secs(5)).await;
        }
        assert!(s.len() < 100);
        assert_eq!(s.evicted_early(), 0);
    }

    /// Posts and other identities are kept apart, each exact.
    #[tokio::test(start_paused = true)]
    async fn narrow_and_wide_keys() {
        let mut c = DedupCache::new(MIN, 4, 100, Instant::now());
        assert!(c.insert(DedupKey::Narrow(1), Instant::now()));
        assert!(c.insert(DedupKey::Wide(1), Instant::now()));
        assert!(!c.insert(DedupKey::Wide(1), Instant::now()));
        assert!(c.contains(&DedupKey::Narrow(1)));
        assert_eq!(c.len(), 2);
    }
}
