//! A pre-encoded corpus for full-speed benchmarks.
//!
//! Compressing a stream at a few hundred thousand posts per second would take more CPU
//! than the consumer under test has, and looping one pre-compressed blob would repeat ids.
//! So each template is cut at its id holes and every literal segment is deflated once, on
//! its own, ending with a full flush (byte-aligned, no reference to earlier data). A line
//! is then the concatenation of those segments with the id written between them as a tiny
//! *stored* deflate block. The result is a valid deflate stream in which every line has a
//! fresh id, and the simulator only copies bytes. The client still inflates real
//! compressed JSON; each segment is compressed without the previous lines as context, so
//! the compression ratio (and the inflate work per byte) is slightly pessimistic.

use flate2::{Compress, Compression, FlushCompress};
use tandem_core::time::{rfc3339_ms, twitter_date, unix_ms_now};

use crate::config::Content;
use crate::encode::deflate_into;
use crate::generate::{Piece, Templates};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hole {
    Decimal,
    Hex,
}

#[derive(Debug)]
struct Item {
    /// Literal segments; `holes[i]` goes between `plain[i]` and `plain[i + 1]`.
    plain: Vec<Vec<u8>>,
    deflated: Vec<Vec<u8>>,
    holes: Vec<Hole>,
}

/// The templates of one content kind, pre-encoded.
#[derive(Debug)]
pub(crate) struct Corpus {
    items: Vec<Item>,
}

impl Corpus {
    pub(crate) fn build(content: Content) -> Corpus {
        let now = unix_ms_now();
        let items = Templates::for_content(content)
            .main
            .iter()
            .map(|t| {
                let mut plain = vec![Vec::new()];
                let mut holes = Vec::new();
                for piece in &t.pieces {
                    let seg = plain.last_mut().expect("never empty");
                    match piece {
                        Piece::Lit(b) => seg.extend_from_slice(b),
                        Piece::QuotedTwitterDate => {
                            seg.extend_from_slice(format!("\"{}\"", twitter_date(now)).as_bytes())
                        }
                        Piece::QuotedIsoDate => {
                            seg.extend_from_slice(format!("\"{}\"", rfc3339_ms(now)).as_bytes())
                        }
                        Piece::Millis => seg.extend_from_slice(now.to_string().as_bytes()),
                        Piece::Id => {
                            holes.push(Hole::Decimal);
                            plain.push(Vec::new());
                        }
                        Piece::QuotedId => {
                            seg.push(b'"');
                            holes.push(Hole::Decimal);
                            plain.push(b"\"".to_vec());
                        }
                        Piece::QuotedHex128 => {
                            seg.push(b'"');
                            holes.push(Hole::Hex);
                            plain.push(b"\"".to_vec());
                        }
                    }
                }
                plain
                    .last_mut()
                    .expect("never empty")
                    .extend_from_slice(b"\r\n");
                let deflated = plain
                    .iter()
                    .map(|seg| {
                        let mut c = Compress::new(Compression::default(), false);
                        let mut out = Vec::new();
                        deflate_into(&mut c, seg, &mut out, FlushCompress::Full);
                        out
                    })
                    .collect();
                Item {
                    plain,
                    deflated,
                    holes,
                }
            })
            .collect();
        Corpus { items }
    }

    /// Appends line `k` of the corpus with activity id `id`: deflate data when `gzip`
    /// (the caller sends the gzip header first), plain bytes otherwise.
    pub(crate) fn write_line(&self, k: u64, id: u64, gzip: bool, out: &mut Vec<u8>) {
        let item = &self.items[(k % self.items.len() as u64) as usize];
        let mut digits = [0u8; 40];
        for (i, hole) in item.holes.iter().enumerate() {
            let segs = if gzip { &item.deflated } else { &item.plain };
            out.extend_from_slice(&segs[i]);
            let text = format_id(*hole, id, &mut digits);
            if gzip {
                // A stored block: BFINAL=0, BTYPE=00, padded to the byte, LEN, NLEN, data.
                let len = text.len() as u16;
                out.push(0);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&(!len).to_le_bytes());
            }
            out.extend_from_slice(text);
        }
        let last = item.holes.len();
        out.extend_from_slice(if gzip {
            &item.deflated[last]
        } else {
            &item.plain[last]
        });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

fn format_id(hole: Hole, id: u64, buf: &mut [u8; 40]) -> &[u8] {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = match hole {
        Hole::Decimal => write!(cursor, "{id}"),
        Hole::Hex => write!(cursor, "{:032x}", u128::from(id)),
    };
    let n = cursor.position() as usize;
    &buf[..n]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::GZIP_HEADER;
    use std::io::Read;
    use tandem_core::{ActivityId, LineKind, identify, validate};

    /// Concatenated pre-encoded lines inflate to valid lines carrying the requested ids,
    /// and the plain form is identical to the inflated one.
    #[test]
    fn pre_encoded_lines_inflate_to_fresh_ids() {
        for content in [Content::Posts, Content::V2Posts] {
            let corpus = Corpus::build(content);
            let mut gz = GZIP_HEADER.to_vec();
            let mut plain = Vec::new();
            for k in 0..250u64 {
                corpus.write_line(k, 1_000_000 + k, true, &mut gz);
                corpus.write_line(k, 1_000_000 + k, false, &mut plain);
            }
            let mut inflated = Vec::new();
            // No trailer: a live stream never ends cleanly, so read what decodes.
            let mut dec = flate2::read::GzDecoder::new(&gz[..]);
            let _ = dec.read_to_end(&mut inflated);
            assert_eq!(inflated, plain);
            for (k, line) in inflated
                .split(|&b| b == b'\n')
                .filter(|l| l.len() > 1)
                .enumerate()
            {
                let line = line.strip_suffix(b"\r").unwrap();
                validate(line).unwrap();
                assert_eq!(
                    identify(line).unwrap(),
                    LineKind::Activity(ActivityId::Post(1_000_000 + k as u64))
                );
            }
        }
    }
}
