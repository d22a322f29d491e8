//! The coverage ledger never passes an activity that was received but is not stored.
//!
//! A deterministic model of one partition, built on the real [`PartitionLiveness`],
//! [`Tally`] (with its [`tandem_core::Lanes`]) and [`CoverageGate`], and driven by
//! proptest-generated schedules:
//!
//! - the upstream publishes activities `0, 1, 2, ...` at content times `1000, 1010, ...`
//!   (content time = `1000 + 10 * id`, so ids are unique and times strictly increase);
//! - two paths (lanes 0 and 1; lane 2, recovery, stays unused) each deliver the upstream
//!   in order from where they (re)connected, in batches of 1 to 3 lines;
//! - the merger's channel is ONE FIFO shared by both paths; the merger gives a new id the
//!   next sequence number and drops a known id as a duplicate;
//! - the sink holds numbered activities until the store acknowledges them, in any order;
//!   `stored_through` is the contiguous watermark;
//! - the repairer samples `complete_until()` into the gate and moves the ledger by what
//!   the gate lets through;
//! - a restart forgets everything not stored; the store (the set of stored ids) and the
//!   ledger outlive it.
//!
//! Each stage's action is split into the operations production performs one after the
//! other on shared state (a connection: channel send, `lanes.hand`, `note_activity`; the
//! merger: classify, store `numbered`, `lanes.classify`, send to the sink; the repairer:
//! read `complete_until`, `gate.sample`, `gate.advance`), and a schedule interleaves the
//! stages operation by operation, the way threads can.
//!
//! Invariant, after every operation: every activity a path handed to the merger (in any
//! process lifetime) whose content time is `<=` the ledger is stored. The model also
//! checks the stronger "no hole" form: every activity the upstream published at or
//! before the ledger is stored, delivered or not (a reconnect without backfill skips what
//! was published meanwhile; the liveness must not count that as covered).

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tandem_conn::PartitionLiveness;
use tandem_core::Tally;
use tandem_repair::CoverageGate;
use tokio::time::Instant;

const PATHS: usize = 2;
/// Merger inputs: the two paths and recovery (unused here).
const LANES: usize = 3;

/// Where the first run's paths connect: now, before the first activity (1000).
const FIRST_CONNECT_MS: u64 = 995;

/// Content time of activity `id`.
fn content_ms(id: u64) -> u64 {
    1_000 + 10 * id
}

/// The first activity whose content time is at or after `ms`.
fn first_at_or_after(ms: u64) -> u64 {
    ms.saturating_sub(1_000).div_ceil(10)
}

/// One entry of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Path `path` continues its delivery in progress, or (live, idle) sends its next `k`
    /// activities as one batch.
    Deliver { path: usize, k: u64 },
    /// Path `path` continues its delivery in progress, or its connection ends.
    Down { path: usize },
    /// Path `path` continues its delivery in progress, or (down) reconnects: from the
    /// partition's `complete_until()` (a backfill), or from now (no backfill).
    Up { path: usize, backfill: bool },
    /// The upstream publishes `n` activities nobody has delivered yet.
    Publish { n: u64 },
    /// The merger continues its batch in progress, or takes the next batch off the channel.
    Merge,
    /// The store acknowledges the held sequence numbers `seq` whose bit `seq % 64` is set.
    Ack { mask: u64 },
    /// The repairer continues its tick in progress, or starts one.
    Tick,
    /// The process dies and starts again.
    Restart,
}

#[derive(Debug)]
struct Batch {
    path: usize,
    ids: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeliveryOp {
    Hand,
    Note,
}

/// A batch sent on the channel, not yet handed and noted.
#[derive(Debug)]
struct Delivering {
    lines: u64,
    latest_ms: u64,
    next: DeliveryOp,
}

#[derive(Debug, Default)]
struct Conn {
    live: bool,
    /// The next activity this connection delivers.
    cursor: u64,
    delivering: Option<Delivering>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MergeOp {
    StoreNumbered,
    Classify,
    Send,
}

/// A batch the merger took off the channel and classified, with the rest of its work.
#[derive(Debug)]
struct Merging {
    path: usize,
    lines: u64,
    /// First copies: (sequence number, id).
    out: Vec<(u64, u64)>,
    next: MergeOp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ticking {
    /// `complete_until()` was read.
    Sample(u64),
    /// The sample was taken; the gate is to be advanced.
    Advance,
}

/// What one process lifetime holds in memory.
#[derive(Debug)]
struct Process {
    liveness: PartitionLiveness,
    tally: Tally,
    gate: CoverageGate,
    channel: VecDeque<Batch>,
    conns: [Conn; PATHS],
    /// The merger's dedup memory: ids numbered in this lifetime, and those stored.
    known: BTreeSet<u64>,
    /// The merger's highest sequence number given out.
    next_seq: u64,
    merging: Option<Merging>,
    /// Numbered activities the sink holds, not yet acknowledged: seq -> id.
    held: BTreeMap<u64, u64>,
    /// Acknowledged sequence numbers above the contiguous watermark.
    acked_above: BTreeSet<u64>,
    /// The contiguous watermark of acknowledgements.
    through: u64,
    ticking: Option<Ticking>,
}

/// Counts of what a schedule exercised, for the non-vacuity check.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    ledger_moves: u64,
    moves_after_restart: u64,
    restarts: u64,
    duplicates: u64,
    out_of_order_acks: u64,
}

#[derive(Debug)]
struct World {
    /// Activities the upstream has published: ids `0..published`.
    published: u64,
    /// Every activity a path handed to the merger, in any lifetime.
    delivered: BTreeSet<u64>,
    /// The store: outlives the process.
    stored: BTreeSet<u64>,
    /// The coverage ledger (content ms): outlives the process.
    ledger: u64,
    /// Ids `0..verified` are known stored (stored and the ledger only grow).
    verified: u64,
    process: Process,
    stats: Stats,
}

impl Process {
    /// A process that knows the partition complete up to `complete_ms` (0: no history),
    /// whose merger remembers `known` (the ids in the store).
    fn new(complete_ms: u64, known: BTreeSet<u64>) -> Process {
        Process {
            liveness: PartitionLiveness::new(PATHS)
                .with_complete_until((complete_ms > 0).then_some(complete_ms)),
            tally: Tally::with_lanes(LANES),
            gate: CoverageGate::default(),
            channel: VecDeque::new(),
            conns: Default::default(),
            known,
            next_seq: 0,
            merging: None,
            held: BTreeMap::new(),
            acked_above: BTreeSet::new(),
            through: 0,
            ticking: None,
        }
    }
}

impl World {
    /// A first run without history: both paths connect now.
    fn new() -> World {
        let mut w = World {
            published: 0,
            delivered: BTreeSet::new(),
            stored: BTreeSet::new(),
            ledger: 0,
            verified: 0,
            process: Process::new(0, BTreeSet::new()),
            stats: Stats::default(),
        };
        for path in 0..PATHS {
            w.connect(path, FIRST_CONNECT_MS);
        }
        w
    }

    /// Now, as a content time: after the last published activity, before the next.
    fn now_ms(&self) -> u64 {
        content_ms(self.published) - 5
    }

    /// Path `path` becomes live, delivering from content time `from_ms`.
    fn connect(&mut self, path: usize, from_ms: u64) {
        let c = &mut self.process.conns[path];
        c.live = true;
        c.cursor = first_at_or_after(from_ms);
        self.process.liveness.set_live(path, from_ms);
    }

    /// Performs one operation of the schedule.
    fn apply(&mut self, step: Step) {
        match step {
            Step::Deliver { path, .. } | Step::Down { path } | Step::Up { path, .. }
                if self.process.conns[path].delivering.is_some() =>
            {
                self.continue_delivery(path)
            }
            Step::Deliver { path, k } => {
                let c = &mut self.process.conns[path];
                if !c.live {
                    return;
                }
                let ids: Vec<u64> = (c.cursor..c.cursor + k).collect();
                c.cursor += k;
                self.published = self.published.max(c.cursor);
                c.delivering = Some(Delivering {
                    lines: k,
                    latest_ms: content_ms(c.cursor - 1),
                    next: DeliveryOp::Hand,
                });
                // The channel send comes first...
                self.delivered.extend(ids.iter().copied());
                self.process.channel.push_back(Batch { path, ids });
            }
            Step::Down { path } => {
                if self.process.conns[path].live {
                    self.process.conns[path].live = false;
                    self.process.liveness.set_down(path);
                }
            }
            Step::Up { path, backfill } => {
                if self.process.conns[path].live {
                    return;
                }
                let complete = self.process.liveness.complete_until();
                // Nothing known yet: there is nothing to backfill from.
                let from = if backfill && complete > 0 {
                    complete
                } else {
                    self.now_ms()
                };
                self.connect(path, from);
            }
            Step::Publish { n } => self.published += n,
            Step::Merge => self.merge(),
            Step::Ack { mask } => self.ack(mask),
            Step::Tick => self.tick(),
            Step::Restart => self.restart(),
        }
    }

    /// ...then the lane is handed, then the activity noted (production's order).
    fn continue_delivery(&mut self, path: usize) {
        let p = &mut self.process;
        let d = p.conns[path].delivering.as_mut().expect("a delivery");
        match d.next {
            DeliveryOp::Hand => {
                p.tally.lanes.hand(path, d.lines);
                d.next = DeliveryOp::Note;
            }
            DeliveryOp::Note => {
                p.liveness
                    .note_activity(path, Instant::now(), Some(d.latest_ms));
                p.conns[path].delivering = None;
            }
        }
    }

    fn merge(&mut self) {
        let p = &mut self.process;
        let Some(m) = p.merging.as_mut() else {
            // Classify the next batch: a new id gets the next sequence number.
            let Some(batch) = p.channel.pop_front() else {
                return;
            };
            let mut out = Vec::new();
            for id in &batch.ids {
                if p.known.insert(*id) {
                    p.next_seq += 1;
                    out.push((p.next_seq, *id));
                } else {
                    self.stats.duplicates += 1;
                }
            }
            p.merging = Some(Merging {
                path: batch.path,
                lines: batch.ids.len() as u64,
                out,
                next: MergeOp::StoreNumbered,
            });
            return;
        };
        // Numbers first, then the lane, then the sink (production's order).
        match m.next {
            MergeOp::StoreNumbered => {
                p.tally.numbered.store(p.next_seq, Ordering::SeqCst);
                m.next = MergeOp::Classify;
            }
            MergeOp::Classify => {
                p.tally.lanes.classify(m.path, m.lines);
                m.next = MergeOp::Send;
            }
            MergeOp::Send => {
                p.held.extend(m.out.iter().copied());
                p.merging = None;
            }
        }
    }

    fn ack(&mut self, mask: u64) {
        let p = &mut self.process;
        let acked: Vec<u64> = p
            .held
            .keys()
            .copied()
            .filter(|seq| mask & (1 << (seq % 64)) != 0)
            .collect();
        for seq in acked {
            let id = p.held.remove(&seq).expect("held");
            self.stored.insert(id);
            if seq != p.through + 1 {
                self.stats.out_of_order_acks += 1;
            }
            p.acked_above.insert(seq);
        }
        while p.acked_above.remove(&(p.through + 1)) {
            p.through += 1;
        }
        p.tally.stored_through.store(p.through, Ordering::SeqCst);
    }

    /// `complete_until()`, then the sample (its ticket), then the gate (production's order).
    fn tick(&mut self) {
        let p = &mut self.process;
        match p.ticking {
            None => p.ticking = Some(Ticking::Sample(p.liveness.complete_until())),
            Some(Ticking::Sample(complete)) => {
                p.gate.sample(complete, &p.tally);
                p.ticking = Some(Ticking::Advance);
            }
            Some(Ticking::Advance) => {
                if let Some(t) = p.gate.advance(&p.tally)
                    && t > self.ledger
                {
                    self.ledger = t;
                    self.stats.ledger_moves += 1;
                    if self.stats.restarts > 0 {
                        self.stats.moves_after_restart += 1;
                    }
                }
                p.ticking = None;
            }
        }
    }

    /// Everything not stored is forgotten; the paths replay from the ledger.
    ///
    /// A ledger that never moved replays from where the first run started. (Production
    /// has no hint then and connects at now, so what the first run received but did not
    /// store before its first ledger write is not replayed.)
    fn restart(&mut self) {
        self.stats.restarts += 1;
        let from = if self.ledger > 0 {
            self.ledger
        } else {
            FIRST_CONNECT_MS
        };
        self.process = Process::new(from, self.stored.clone());
        for path in 0..PATHS {
            self.connect(path, from);
        }
    }

    /// Checks the invariant; `Err` names the activity that breaks it.
    fn check(&mut self) -> Result<(), String> {
        let behind = first_at_or_after(self.ledger + 1);
        while self.verified < behind {
            let id = self.verified;
            if !self.stored.contains(&id) {
                let what = if self.delivered.contains(&id) {
                    "received but not stored"
                } else {
                    "never received (a hole)"
                };
                return Err(format!(
                    "ledger {} passed activity {id} (content {}), {what}",
                    self.ledger,
                    content_ms(id)
                ));
            }
            self.verified += 1;
        }
        Ok(())
    }

    /// Applies `step` until the stage it drives is idle again (for hand-made schedules).
    fn finish(&mut self, step: Step) {
        loop {
            self.apply(step);
            let busy = match step {
                Step::Deliver { path, .. } | Step::Down { path } | Step::Up { path, .. } => {
                    self.process.conns[path].delivering.is_some()
                }
                Step::Merge => self.process.merging.is_some(),
                Step::Tick => self.process.ticking.is_some(),
                _ => false,
            };
            if !busy {
                return;
            }
        }
    }
}

fn step() -> impl Strategy<Value = Step> {
    let path = 0..PATHS;
    prop_oneof![
        12 => (path.clone(), 1..=3u64).prop_map(|(path, k)| Step::Deliver { path, k }),
        2 => path.clone().prop_map(|path| Step::Down { path }),
        3 => (path, any::<bool>()).prop_map(|(path, backfill)| Step::Up { path, backfill }),
        2 => (1..=3u64).prop_map(|n| Step::Publish { n }),
        12 => Just(Step::Merge),
        4 => any::<u64>().prop_map(|mask| Step::Ack { mask }),
        3 => Just(Step::Ack { mask: u64::MAX }),
        10 => Just(Step::Tick),
        1 => Just(Step::Restart),
    ]
}

/// Runs a schedule, checking the invariant after every operation.
fn run(schedule: &[Step]) -> Result<Stats, String> {
    let mut w = World::new();
    for (i, &s) in schedule.iter().enumerate() {
        w.apply(s);
        w.check()
            .map_err(|e| format!("after step {i} ({s:?}): {e}"))?;
    }
    Ok(w.stats)
}

/// Random interleavings of delivery, merging, out-of-order acknowledgement, ticks,
/// reconnects with and without backfill, and restarts never move the ledger past an
/// activity that is not stored.
#[test]
fn ledger_never_passes_an_unstored_activity() {
    // 256 cases unless PROPTEST_CASES says otherwise; no regression files.
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let (cases, moved, moved_after_restart) = (Cell::new(0u64), Cell::new(0u64), Cell::new(0u64));
    let total = Cell::new(Stats::default());
    let result = runner.run(&proptest::collection::vec(step(), 1..300), |schedule| {
        let stats = run(&schedule).map_err(TestCaseError::fail)?;
        cases.set(cases.get() + 1);
        moved.set(moved.get() + u64::from(stats.ledger_moves > 0));
        moved_after_restart
            .set(moved_after_restart.get() + u64::from(stats.moves_after_restart > 0));
        let mut t = total.get();
        t.ledger_moves += stats.ledger_moves;
        t.moves_after_restart += stats.moves_after_restart;
        t.restarts += stats.restarts;
        t.duplicates += stats.duplicates;
        t.out_of_order_acks += stats.out_of_order_acks;
        total.set(t);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (cases, moved, moved_after_restart) = (cases.get(), moved.get(), moved_after_restart.get());
    eprintln!(
        "{cases} cases: the ledger moved in {moved}, after a restart in {moved_after_restart}; totals {:?}",
        total.get()
    );
    // Not vacuous: the ledger moves in most schedules, also after restarts, and the
    // schedules do produce duplicates and out-of-order acknowledgements.
    if cases < 64 {
        return;
    }
    assert!(
        moved * 10 >= cases * 6,
        "the ledger moved in only {moved} of {cases} cases"
    );
    assert!(
        moved_after_restart * 10 >= cases,
        "the ledger moved after a restart in only {moved_after_restart} of {cases} cases"
    );
    let t = total.get();
    assert!(t.duplicates > 0 && t.out_of_order_acks > 0, "{t:?}");
}

/// A hand-made schedule, with the ledger after each tick.
#[test]
fn ledger_follows_the_stored_watermark_step_by_step() {
    let mut w = World::new();
    let tick = |w: &mut World, expected: u64| {
        w.finish(Step::Tick);
        w.check().unwrap();
        assert_eq!(w.ledger, expected);
    };
    // Both paths connected at 995 (now, no history): the partition is complete up to 995.
    assert_eq!(w.process.liveness.complete_until(), 995);

    // Path 0 delivers activities 0 and 1 (1000, 1010): complete up to 1010.
    w.finish(Step::Deliver { path: 0, k: 2 });
    assert_eq!(w.process.liveness.complete_until(), 1_010);
    // The sample 1010 waits for the merger to classify path 0's two lines.
    tick(&mut w, 0);
    // The merger numbers them 1 and 2; the sink holds them.
    w.finish(Step::Merge);
    assert_eq!(w.process.tally.numbered.load(Ordering::SeqCst), 2);
    // Path 1 delivers 0, 1 (duplicates) and 2 (1020): complete up to 1020.
    w.finish(Step::Deliver { path: 1, k: 3 });
    assert_eq!(w.process.liveness.complete_until(), 1_020);
    // Sample 1010 now waits for seq 2; sample 1020 for path 1's three lines.
    tick(&mut w, 0);
    // The store acknowledges seq 2 before seq 1: the watermark stays at 0.
    w.finish(Step::Ack { mask: 1 << 2 });
    assert_eq!(w.process.tally.stored_through.load(Ordering::SeqCst), 0);
    tick(&mut w, 0);
    // Seq 1 too: everything up to 2 is stored, and with it all of 1010's lines.
    w.finish(Step::Ack { mask: 1 << 1 });
    assert_eq!(w.process.tally.stored_through.load(Ordering::SeqCst), 2);
    tick(&mut w, 1_010);
    // The merger drops 0 and 1 as duplicates and numbers 2 as seq 3: 1020 waits for it.
    w.finish(Step::Merge);
    assert_eq!(w.process.tally.numbered.load(Ordering::SeqCst), 3);
    tick(&mut w, 1_010);
    w.finish(Step::Ack { mask: u64::MAX });
    tick(&mut w, 1_020);

    // Path 0 delivers 3 (1030), numbered 4 but never stored: the process dies.
    w.finish(Step::Deliver { path: 0, k: 1 });
    w.finish(Step::Merge);
    tick(&mut w, 1_020);
    w.finish(Step::Restart);
    // The new process knows it is complete up to the ledger; both paths replay from it.
    assert_eq!(w.process.liveness.complete_until(), 1_020);
    // Path 0 replays 2 (stored: a duplicate) and 3 (1030) again.
    w.finish(Step::Deliver { path: 0, k: 2 });
    assert_eq!(w.process.liveness.complete_until(), 1_030);
    tick(&mut w, 1_020);
    w.finish(Step::Merge);
    assert_eq!(w.process.tally.numbered.load(Ordering::SeqCst), 1);
    tick(&mut w, 1_020);
    w.finish(Step::Ack { mask: u64::MAX });
    tick(&mut w, 1_030);
    assert!(w.stored.contains(&3));
}
