//! Any bytes as a spool segment left by a crash: opening never panics, cuts at the first
//! bad record, and reading back gives whole records only, each once.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_core::StreamId;
use tandem_sink::Spool;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segment-00000000000000000001.spool"), data).unwrap();
    let Ok((mut spool, found)) = Spool::open(dir.path()) else {
        return;
    };
    let waiting: usize = found.waiting.values().map(Vec::len).sum();
    let mut read = 0;
    while let Ok(Some(p)) = spool.pop(|s| Some(StreamId(s.len() as u16))) {
        read += p.spooled.batch.items.len();
    }
    assert_eq!(read, waiting, "what opening counted is what reading gives back");
    assert!(std::fs::metadata(dir.path().join("segment-00000000000000000001.spool")).unwrap().len() <= data.len() as u64);
});
