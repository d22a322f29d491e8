//! Property tests of the disk spool's damage handling: a segment cut short or with a
//! flipped byte anywhere gives back exactly the whole, intact records before the damage
//! (and every other segment), in order, once each, never a panic; and opening is
//! idempotent.
//!
//! Each case writes a few segments (one per spool session: a reopened spool starts a new
//! segment on its first push), damages one of them, reopens and pops everything.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use tandem_core::{ActivityId, PathId, StreamId, Unique, UniqueBatch};
use tandem_sink::Spool;
use tandem_sink::spool::{Found, Popped};
use tokio::time::Instant;

/// The configured stream; any other name is a stream no longer configured.
const STREAM: &str = "d";

fn index(s: &str) -> Option<StreamId> {
    (s == STREAM).then_some(StreamId(0))
}

/// One item as written and as expected back: seq, id, line, path.
type Item = (u64, ActivityId, Bytes, u8);

/// One record: one pushed batch, as written and as expected back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    stream: String,
    partition: u32,
    items: Vec<Item>,
}

impl Rec {
    fn batch(&self) -> UniqueBatch {
        UniqueBatch {
            stream: index(&self.stream).unwrap_or(StreamId(u16::MAX)),
            partition: self.partition,
            items: self
                .items
                .iter()
                .map(|(seq, id, line, path)| Unique {
                    seq: *seq,
                    id: *id,
                    line: line.clone(),
                    path: PathId(*path),
                    received: Instant::now(),
                })
                .collect(),
        }
    }
}

/// A record read back: which segment it came from, and what it holds.
fn read_back(p: &Popped) -> Result<(u64, Rec), TestCaseError> {
    let b = &p.spooled.batch;
    prop_assert!(
        p.renumber,
        "a record of an earlier run must be marked for renumbering"
    );
    prop_assert_eq!(
        b.stream,
        index(&p.spooled.stream).unwrap_or(StreamId(u16::MAX)),
        "stream name mapped wrongly"
    );
    Ok((
        p.segment,
        Rec {
            stream: p.spooled.stream.clone(),
            partition: b.partition,
            items: b
                .items
                .iter()
                .map(|u| (u.seq, u.id, u.line.clone(), u.path.0))
                .collect(),
        },
    ))
}

/// Line bytes, with newlines, carriage returns, NULs and non-UTF-8 bytes made common.
fn line() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(
        prop_oneof![
            4 => any::<u8>(),
            1 => Just(b'\n'),
            1 => Just(b'\r'),
            1 => Just(0u8),
            1 => Just(0xffu8),
            1 => Just(0xc3u8),
        ],
        0..16,
    )
    .prop_map(Bytes::from)
}

/// A record without ids (they are given afterwards, so that each is unique).
fn rec() -> impl Strategy<Value = Rec> {
    (
        prop_oneof![4 => Just(STREAM.to_owned()), 1 => Just("gone".to_owned())],
        prop_oneof![Just(0u32), Just(7u32), any::<u32>()],
        prop::collection::vec((any::<u64>(), line(), any::<u8>()), 0..3),
    )
        .prop_map(|(stream, partition, items)| Rec {
            stream,
            partition,
            items: items
                .into_iter()
                .map(|(seq, line, path)| (seq, ActivityId::Post(0), line, path))
                .collect(),
        })
}

/// Segments of records, every id unique (`base` + a counter, so all id widths occur).
fn segments() -> impl Strategy<Value = Vec<Vec<Rec>>> {
    (
        prop::collection::vec(prop::collection::vec(rec(), 1..=3), 1..=3),
        any::<u64>(),
    )
        .prop_map(|(mut segs, base)| {
            let items = segs.iter_mut().flatten().flat_map(|r| r.items.iter_mut());
            for (n, item) in (0u64..).zip(items) {
                item.1 = ActivityId::Post(base.wrapping_add(n));
            }
            segs
        })
}

/// What was written: each segment file's name, bytes and record bounds (start, end).
#[derive(Debug)]
struct Layout {
    files: Vec<(String, u64, Vec<u8>)>,
    bounds: Vec<Vec<(usize, usize)>>,
}

/// Writes each segment in a spool session of its own (push, sync, drop) and reads back
/// the files. The record bounds are taken from the length fields, and checked against
/// the number of batches pushed.
fn write(dir: &Path, segs: &[Vec<Rec>]) -> Result<Layout, TestCaseError> {
    for seg in segs {
        let (mut spool, _) = Spool::open(dir)?;
        for r in seg {
            spool.push(&r.stream, &r.batch())?;
        }
        spool.sync()?;
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?
            .file_name()
            .into_string()
            .map_err(|n| TestCaseError::fail(format!("file name not UTF-8: {n:?}")))?;
        let n = name
            .strip_prefix("segment-")
            .and_then(|n| n.strip_suffix(".spool"))
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| TestCaseError::fail(format!("unexpected file {name}")))?;
        let bytes = fs::read(dir.join(&name))?;
        files.push((name, n, bytes));
    }
    files.sort();
    prop_assert_eq!(files.len(), segs.len(), "one segment file per session");
    let mut bounds = Vec::new();
    for ((name, _, bytes), seg) in files.iter().zip(segs) {
        let mut b = Vec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            prop_assert!(at + 8 <= bytes.len(), "{}: torn header as written", name);
            let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            let end = at + 8 + len as usize;
            prop_assert!(end <= bytes.len(), "{}: torn record as written", name);
            b.push((at, end));
            at = end;
        }
        prop_assert_eq!(b.len(), seg.len(), "{}: one record per push", name);
        bounds.push(b);
    }
    Ok(Layout { files, bounds })
}

/// Puts every segment back as written, except `chosen`, which gets `damaged`.
fn restore(dir: &Path, layout: &Layout, chosen: usize, damaged: &[u8]) -> std::io::Result<()> {
    for (i, (name, _, bytes)) in layout.files.iter().enumerate() {
        fs::write(dir.join(name), if i == chosen { damaged } else { bytes })?;
    }
    Ok(())
}

/// What a reopened spool must give back when segment `chosen` keeps its first `keep`
/// records: every record of the other segments and those, in segment order, each tagged
/// with its segment's number.
fn expected(segs: &[Vec<Rec>], layout: &Layout, chosen: usize, keep: usize) -> Vec<(u64, Rec)> {
    segs.iter()
        .zip(&layout.files)
        .enumerate()
        .flat_map(|(i, (seg, (_, n, _)))| {
            let seg = if i == chosen { &seg[..keep] } else { &seg[..] };
            seg.iter().map(|r| (*n, r.clone()))
        })
        .collect()
}

fn waiting_of(recs: &[(u64, Rec)]) -> HashMap<(String, u32), Vec<ActivityId>> {
    let mut w: HashMap<(String, u32), Vec<ActivityId>> = HashMap::new();
    for (_, r) in recs {
        w.entry((r.stream.clone(), r.partition))
            .or_default()
            .extend(r.items.iter().map(|i| i.1));
    }
    w
}

/// Records read back, each with the number of its segment.
type Read = Vec<(u64, Rec)>;

/// Opens the spool and pops everything (never more pops than records written, so a
/// record given twice or a loop is caught).
fn open_and_drain(dir: &Path, most: usize) -> Result<(Found, u64, Read), TestCaseError> {
    let (mut spool, found) = Spool::open(dir)?;
    let len = spool.len();
    let mut got = Vec::new();
    while let Some(p) = spool.pop(index)? {
        got.push(read_back(&p)?);
        prop_assert!(
            got.len() <= most,
            "more records popped than were written: {:?}",
            got
        );
    }
    prop_assert!(
        spool.pop(index)?.is_none(),
        "pop after the end gave a record"
    );
    prop_assert_eq!(spool.len(), 0, "len after reading everything");
    Ok((found, len, got))
}

/// Reopens after segment `chosen` was damaged and checks what comes back: the records
/// before its first `keep` ones' end and all other segments, the cut counted (`cut_bytes`
/// bytes, one record if any), the file cut to its good length, nothing else touched.
fn check(
    dir: &Path,
    segs: &[Vec<Rec>],
    layout: &Layout,
    chosen: usize,
    keep: usize,
    cut_bytes: u64,
    what: &str,
) -> Result<Vec<(u64, Rec)>, TestCaseError> {
    let want = expected(segs, layout, chosen, keep);
    let most = segs.iter().map(Vec::len).sum();
    let (found, len, got) = open_and_drain(dir, most)?;
    prop_assert_eq!(&got, &want, "{}: records read back", what);
    prop_assert_eq!(
        found.cut_records,
        u64::from(cut_bytes > 0),
        "{}: cut_records",
        what
    );
    prop_assert_eq!(found.cut_bytes, cut_bytes, "{}: cut_bytes", what);
    prop_assert_eq!(&found.waiting, &waiting_of(&want), "{}: waiting ids", what);
    let items: usize = want.iter().map(|(_, r)| r.items.len()).sum();
    prop_assert_eq!(len, items as u64, "{}: len after open", what);
    // The damaged file is cut to its whole records; the others are untouched; opening
    // and reading neither adds nor deletes a file.
    prop_assert_eq!(
        fs::read_dir(dir)?.count(),
        layout.files.len(),
        "{}: files",
        what
    );
    for (i, (name, _, bytes)) in layout.files.iter().enumerate() {
        let now = fs::read(dir.join(name))?;
        let good = if i == chosen {
            layout.bounds[i][..keep].last().map_or(0, |b| b.1)
        } else {
            bytes.len()
        };
        prop_assert_eq!(now.len(), good, "{}: {} length after open", what, name);
        prop_assert!(
            now[..] == bytes[..good],
            "{}: {} bytes changed by open",
            what,
            name
        );
    }
    Ok(got)
}

/// How a segment is damaged in the idempotence property.
#[derive(Debug, Clone)]
enum Damage {
    None,
    Truncate(Index),
    Flip(Index, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        1 => Just(Damage::None),
        2 => any::<Index>().prop_map(Damage::Truncate),
        2 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Damage::Flip(i, x)),
    ]
}

/// Offsets at which to flip a byte: all of them in a small file, else a sample that always
/// includes each record's header.
fn flip_offsets(bounds: &[(usize, usize)], len: usize, sample: &[Index]) -> Vec<usize> {
    if len <= 2048 {
        return (0..len).collect();
    }
    let mut at: Vec<usize> = bounds.iter().flat_map(|b| b.0..b.0 + 8).collect();
    at.extend(sample.iter().map(|i| i.index(len)));
    at.sort_unstable();
    at.dedup();
    at
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A segment cut at every byte offset gives back exactly its whole records before the cut (and all other segments), in order, once each.
    #[test]
    fn truncated_at_every_offset_keeps_the_whole_records_before_the_cut(
        segs in segments(),
        chosen in any::<Index>(),
    ) {
        let dir = tempfile::tempdir()?;
        let layout = write(dir.path(), &segs)?;
        let chosen = chosen.index(segs.len());
        let bytes = &layout.files[chosen].2;
        let bounds = &layout.bounds[chosen];
        for cut in 0..=bytes.len() {
            restore(dir.path(), &layout, chosen, &bytes[..cut])?;
            let keep = bounds.iter().take_while(|b| b.1 <= cut).count();
            let good = bounds[..keep].last().map_or(0, |b| b.1);
            check(
                dir.path(),
                &segs,
                &layout,
                chosen,
                keep,
                (cut - good) as u64,
                &format!("segment {chosen} cut at {cut} of {}", bytes.len()),
            )?;
        }
    }

    /// A byte flipped anywhere in a segment (length, checksum or payload) drops its record and the rest of that segment, and nothing else.
    #[test]
    fn flipped_byte_drops_its_record_and_the_rest_of_its_segment(
        segs in segments(),
        chosen in any::<Index>(),
        xor in 1u8..=255,
        sample in prop::collection::vec(any::<Index>(), 256),
    ) {
        let dir = tempfile::tempdir()?;
        let layout = write(dir.path(), &segs)?;
        let chosen = chosen.index(segs.len());
        let bytes = &layout.files[chosen].2;
        let bounds = &layout.bounds[chosen];
        for at in flip_offsets(bounds, bytes.len(), &sample) {
            // A different non-zero mask per offset.
            let x = ((usize::from(xor) + at) % 255 + 1) as u8;
            let mut damaged = bytes.clone();
            damaged[at] ^= x;
            restore(dir.path(), &layout, chosen, &damaged)?;
            let keep = bounds.iter().take_while(|b| b.1 <= at).count();
            let start = bounds[keep].0;
            let field = match at - start {
                0..4 => "length",
                4..8 => "checksum",
                _ => "payload",
            };
            check(
                dir.path(),
                &segs,
                &layout,
                chosen,
                keep,
                (bytes.len() - start) as u64,
                &format!(
                    "segment {chosen}: byte {at} of {} ({field} of record {keep}) ^ {x:#04x}",
                    bytes.len()
                ),
            )?;
        }
    }

    /// Opening again after a first open cut a damaged segment gives back the same records and cuts nothing more; opening and reading delete nothing.
    #[test]
    fn opening_again_gives_back_the_same_records(
        segs in segments(),
        chosen in any::<Index>(),
        damage in damage(),
    ) {
        let dir = tempfile::tempdir()?;
        let layout = write(dir.path(), &segs)?;
        let chosen = chosen.index(segs.len());
        let bytes = &layout.files[chosen].2;
        let bounds = &layout.bounds[chosen];
        let (damaged, keep, cut_bytes) = match &damage {
            Damage::None => (bytes.clone(), bounds.len(), 0),
            Damage::Truncate(i) => {
                let cut = i.index(bytes.len() + 1);
                let keep = bounds.iter().take_while(|b| b.1 <= cut).count();
                let good = bounds[..keep].last().map_or(0, |b| b.1);
                (bytes[..cut].to_vec(), keep, cut - good)
            }
            Damage::Flip(i, x) => {
                let at = i.index(bytes.len());
                let mut d = bytes.clone();
                d[at] ^= x;
                let keep = bounds.iter().take_while(|b| b.1 <= at).count();
                (d, keep, bytes.len() - bounds[keep].0)
            }
        };
        restore(dir.path(), &layout, chosen, &damaged)?;
        let what = format!("{damage:?} of segment {chosen}");
        let first = check(dir.path(), &segs, &layout, chosen, keep, cut_bytes as u64, &what)?;
        let first_found = Spool::open(dir.path())?.1;
        // Nothing more to cut, the same ids waiting, the same records, the same files.
        for round in 2..=3 {
            let what = format!("{what}, open #{round}");
            let again = check(dir.path(), &segs, &layout, chosen, keep, 0, &what)?;
            prop_assert_eq!(&again, &first, "{}: records differ from the first open", what);
            let found = Spool::open(dir.path())?.1;
            prop_assert_eq!(&found.waiting, &first_found.waiting, "{}: waiting", what);
        }
    }
}
