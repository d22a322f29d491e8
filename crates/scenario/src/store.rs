//! Reading back what the file sink stored, including files still open (`.tmp`).

use std::collections::HashMap;
use std::path::Path;

use tandem_core::{ActivityId, Partition};

/// Every stored activity id, per (stream, partition), in file order (repeats included:
/// a repeat is a duplicate in the store). The layout is the file sink's own
/// ([`tandem_sink::stored_files`]).
pub fn stored_ids(dir: &Path) -> std::io::Result<HashMap<(String, Partition), Vec<ActivityId>>> {
    let mut out: HashMap<(String, Partition), Vec<ActivityId>> = HashMap::new();
    for f in tandem_sink::stored_files(dir)? {
        let ids = f.ids()?;
        out.entry((f.stream, f.partition)).or_default().extend(ids);
    }
    Ok(out)
}
