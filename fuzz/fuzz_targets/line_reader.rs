//! Any body, in any chunking, gzip or plain: the line reader never panics, decodes a
//! bounded amount per call, and (plain bodies) hands out exactly the complete lines of the
//! input, in order, with heartbeats for empty lines.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_conn::reader::{Frame, LineReader};

fuzz_target!(|input: (bool, u8, Vec<u8>)| {
    let (gzip, cut, body) = input;
    let mut r = LineReader::new(gzip, 1024, 4096);
    let budget = r.output_budget();
    let step = usize::from(cut).max(1);
    let mut frames = Vec::new();
    for chunk in body.chunks(step) {
        let before = r.decoded_bytes;
        if r.feed(chunk, &mut frames).is_err() {
            return;
        }
        assert!(r.decoded_bytes - before <= budget as u64, "one call decoded past its budget");
        while r.has_pending() {
            let before = r.decoded_bytes;
            if r.resume(&mut frames).is_err() {
                return;
            }
            assert!(r.decoded_bytes - before <= budget as u64);
        }
    }
    if gzip {
        return;
    }
    // Plain: what came out is the complete lines of the input (\r\n or \n), short ones.
    let complete = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut want = Vec::new();
    for line in body[..complete].split(|&b| b == b'\n').take(body[..complete].iter().filter(|&&b| b == b'\n').count()) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            want.push(Frame::Heartbeat);
        } else if line.len() <= 4096 {
            want.push(Frame::Line(bytes::Bytes::copy_from_slice(line)));
        }
    }
    assert_eq!(frames, want);
});
