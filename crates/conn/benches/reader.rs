//! `cargo bench -p tandem-conn`: the connection reader (gzip inflate and `\r\n` framing)
//! on the sample posts, for two shapes of gzip stream: flushed after every activity (one
//! compressed block, so one Huffman table, per activity) and flushed every 64 KiB. Which
//! shape an upstream produces decides most of what inflating costs.
// A benchmark measures wall-clock time on purpose.
#![allow(clippy::disallowed_types)]

use std::hint::black_box;
use std::io::Write;
use std::time::Instant;

use flate2::Compression;
use tandem_conn::reader::{Frame, LineReader};

fn stream(lines: &[&str], copies: usize, flush_every: usize) -> (Vec<u8>, usize, usize) {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
    let (mut raw, mut n, mut since) = (0, 0, 0);
    for _ in 0..copies {
        for l in lines {
            enc.write_all(l.as_bytes()).unwrap();
            enc.write_all(b"\r\n").unwrap();
            raw += l.len() + 2;
            since += l.len() + 2;
            n += 1;
            if since >= flush_every {
                enc.flush().unwrap();
                since = 0;
            }
        }
    }
    enc.flush().unwrap();
    (enc.get_ref().clone(), raw, n)
}

fn main() {
    let text = include_str!("../../../samples/native-posts.ndjson");
    let lines: Vec<&str> = text.lines().collect();
    println!(
        "tandem-conn reader benchmark (single thread, gzip level 1 stream of the sample posts)"
    );
    for (label, flush) in [("flush per activity", 1), ("flush per 64 KiB", 64 * 1024)] {
        let (gz, raw, n) = stream(&lines, 200, flush);
        let best = (0..3)
            .map(|_| {
                let mut r = LineReader::new(true, 64 * 1024, 1 << 20);
                let mut out = Vec::with_capacity(1024);
                let mut count = 0usize;
                let start = Instant::now();
                for chunk in gz.chunks(16 * 1024) {
                    r.feed_all(black_box(chunk), &mut out).unwrap();
                    count += out.iter().filter(|f| matches!(f, Frame::Line(_))).count();
                    out.clear();
                }
                assert_eq!(count, n);
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        println!(
            "{label:<20} {:>7.2} GB/s inflated  {:>6.2} µs per activity  {:>9.0} activities/s  (compressed {:.1}x)",
            raw as f64 / best / 1e9,
            best / n as f64 * 1e6,
            n as f64 / best,
            raw as f64 / gz.len() as f64
        );
    }
}
