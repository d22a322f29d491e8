//! A pre-encoded corpus for full-speed benchmarks.
//!
//! Compressing at a few hundred thousand posts per second would take more CPU than the
//! consumer under test has. So at start each partition's activities (fresh, unique ids)
//! are rendered from the templates and compressed once, continuously, as a server would:
//! gzip level 1 with a sync flush every 64 KiB of input, so later lines refer back to
//! earlier ones and a Huffman table serves many lines. Every connection of the partition
//! then streams the same chunks (shared `Bytes`, no copy), and the simulator's own CPU
//! stays small. The cost is memory: about 700 bytes per activity.

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};
use tandem_core::time::unix_ms_now;

use crate::config::Content;
use crate::encode::deflate_into;
use crate::generate::Templates;

/// Input bytes between two sync flushes.
const FLUSH_EVERY: usize = 64 * 1024;

/// The pre-encoded activities of every partition of one stream.
#[derive(Debug)]
pub(crate) struct Corpus {
    /// Per partition (index 0 is partition 1): raw deflate chunks, each ending with a
    /// sync flush; activity `k` of partition `p` has id `base + k * partitions + p - 1`.
    deflated: Vec<Vec<Bytes>>,
    templates: Templates,
    base: u64,
    partitions: u64,
    per_partition: u64,
    created_ms: u64,
    /// Activities per second per connection; `None`: full speed.
    rate_per_sec: Option<f64>,
}

impl Corpus {
    /// Renders and compresses `per_partition` activities for each partition, one thread
    /// per partition.
    pub(crate) fn build(
        content: Content,
        partitions: u32,
        per_partition: u64,
        base: u64,
        rate_per_sec: Option<f64>,
    ) -> Corpus {
        let templates = Templates::for_content(content);
        let created_ms = unix_ms_now();
        let partitions = u64::from(partitions.max(1));
        let deflated = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..partitions)
                .map(|p| {
                    let templates = &templates;
                    scope.spawn(move || {
                        let mut deflate = Compress::new(Compression::fast(), false);
                        let mut plain = Vec::with_capacity(FLUSH_EVERY + 8 * 1024);
                        let mut chunks = Vec::new();
                        for k in 0..per_partition {
                            render(
                                templates,
                                k,
                                base + k * partitions + p,
                                created_ms,
                                &mut plain,
                            );
                            if plain.len() >= FLUSH_EVERY || k + 1 == per_partition {
                                let mut out = Vec::with_capacity(plain.len() / 4);
                                deflate_into(&mut deflate, &plain, &mut out, FlushCompress::Sync);
                                chunks.push(Bytes::from(out));
                                plain.clear();
                            }
                        }
                        chunks
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("corpus worker"))
                .collect()
        });
        Corpus {
            deflated,
            templates,
            base,
            partitions,
            per_partition,
            created_ms,
            rate_per_sec,
        }
    }

    /// The compressed chunks of a partition (numbered from 1).
    pub(crate) fn chunks(&self, partition: u32) -> &[Bytes] {
        self.deflated
            .get(partition as usize - 1)
            .map_or(&[], Vec::as_slice)
    }

    /// Appends activities `from..to` of a partition, uncompressed (for clients that do not
    /// take gzip).
    pub(crate) fn plain(&self, partition: u32, from: u64, to: u64, out: &mut Vec<u8>) {
        let p = u64::from(partition - 1);
        for k in from..to.min(self.per_partition) {
            render(
                &self.templates,
                k,
                self.base + k * self.partitions + p,
                self.created_ms,
                out,
            );
        }
    }

    pub(crate) fn per_partition(&self) -> u64 {
        self.per_partition
    }

    /// When activity `k` is due on a connection that started at `start` (the offered
    /// rate), or `None` at full speed.
    pub(crate) fn due(&self, start: tokio::time::Instant, k: u64) -> Option<tokio::time::Instant> {
        self.rate_per_sec
            .map(|rate| start + std::time::Duration::from_secs_f64(k as f64 / rate))
    }
}

fn render(templates: &Templates, k: u64, id: u64, created_ms: u64, out: &mut Vec<u8>) {
    let t = &templates.main[(k % templates.main.len() as u64) as usize];
    t.render(u128::from(id), created_ms, out);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::GZIP_HEADER;
    use std::io::Read;
    use tandem_core::{ActivityId, LineKind, identify, validate};

    /// At a rate, activity `k` is due `k / rate` seconds after the connection started;
    /// without one, never waited for.
    #[test]
    fn activities_fall_due_at_the_rate() {
        let start = tokio::time::Instant::now();
        let paced = Corpus::build(Content::Posts, 1, 20, 1, Some(100.0));
        assert_eq!(paced.due(start, 0), Some(start));
        assert_eq!(
            paced.due(start, 150),
            Some(start + std::time::Duration::from_millis(1_500))
        );
        assert_eq!(
            Corpus::build(Content::Posts, 1, 20, 1, None).due(start, 150),
            None
        );
    }

    /// The chunks inflate, as one gzip stream, to exactly the plain lines, each with a fresh id.
    #[test]
    fn chunks_inflate_to_the_plain_lines() {
        for content in [Content::Posts, Content::V2Posts] {
            let corpus = Corpus::build(content, 2, 300, 1_000_000, None);
            for partition in [1u32, 2] {
                let mut gz = GZIP_HEADER.to_vec();
                for c in corpus.chunks(partition) {
                    gz.extend_from_slice(c);
                }
                let mut inflated = Vec::new();
                // No trailer: a live stream never ends cleanly, so read what decodes.
                let _ = flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut inflated);
                let mut plain = Vec::new();
                corpus.plain(partition, 0, 300, &mut plain);
                assert_eq!(inflated, plain);
                let lines: Vec<&[u8]> = plain
                    .split(|&b| b == b'\n')
                    .filter(|l| l.len() > 1)
                    .collect();
                assert_eq!(lines.len(), 300);
                for (k, line) in lines.iter().enumerate() {
                    let line = line.strip_suffix(b"\r").unwrap();
                    validate(line).unwrap();
                    let want = 1_000_000 + k as u64 * 2 + u64::from(partition - 1);
                    assert_eq!(
                        identify(line).unwrap(),
                        LineKind::Activity(ActivityId::Post(want))
                    );
                }
            }
        }
    }
}
