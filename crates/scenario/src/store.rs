//! Reading back what the file sink stored, including files still open (`.tmp`).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tandem_core::{ActivityId, LineKind, Partition, identify};

/// Every stored activity id, per (stream, partition), in file order (repeats included:
/// a repeat is a duplicate in the store).
pub fn stored_ids(dir: &Path) -> std::io::Result<HashMap<(String, Partition), Vec<ActivityId>>> {
    let mut out: HashMap<(String, Partition), Vec<ActivityId>> = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let path = e?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if !name.contains(".ndjson") {
                continue;
            }
            let Some(partition) = path
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("partition-"))
                .and_then(|n| n.parse::<Partition>().ok())
            else {
                continue;
            };
            let stream = path
                .parent()
                .and_then(Path::parent)
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let raw = std::fs::read(&path)?;
            let data = if name.contains(".gz") {
                let mut d = Vec::new();
                let _ = flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut d);
                d
            } else {
                raw
            };
            let ids = out.entry((stream, partition)).or_default();
            for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                if let Ok(LineKind::Activity(id)) = identify(line) {
                    ids.push(id);
                }
            }
        }
    }
    Ok(out)
}
