//! Response body encoding: gzip as a live stream needs it (a sync flush after every write,
//! so the client can inflate what it has), or identity for v2 clients that do not ask for
//! gzip.

use flate2::{Compress, Compression, Crc, FlushCompress};

/// The fixed gzip member header: deflate, no flags, no mtime, unknown OS.
pub(crate) const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

#[derive(Debug)]
pub(crate) enum Encoder {
    Gzip {
        deflate: Box<Compress>,
        crc: Crc,
        header_sent: bool,
    },
    Identity,
}

impl Encoder {
    pub(crate) fn gzip() -> Encoder {
        Encoder::Gzip {
            deflate: Box::new(Compress::new(Compression::fast(), false)),
            crc: Crc::new(),
            header_sent: false,
        }
    }

    pub(crate) fn is_gzip(&self) -> bool {
        matches!(self, Encoder::Gzip { .. })
    }

    /// Appends the encoding of `plain` to `out`, flushed so that it can be decoded now.
    pub(crate) fn encode(&mut self, plain: &[u8], out: &mut Vec<u8>) {
        match self {
            Encoder::Identity => out.extend_from_slice(plain),
            Encoder::Gzip {
                deflate,
                crc,
                header_sent,
            } => {
                if !*header_sent {
                    out.extend_from_slice(&GZIP_HEADER);
                    *header_sent = true;
                }
                crc.update(plain);
                deflate_into(deflate, plain, out, FlushCompress::Sync);
            }
        }
    }

    /// Appends the gzip header only (for bodies whose deflate data is pre-encoded).
    pub(crate) fn header(&mut self, out: &mut Vec<u8>) {
        if let Encoder::Gzip { header_sent, .. } = self
            && !*header_sent
        {
            out.extend_from_slice(&GZIP_HEADER);
            *header_sent = true;
        }
    }

    /// Ends the stream properly: final deflate block and the gzip trailer.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        if let Encoder::Gzip {
            deflate,
            crc,
            header_sent,
        } = self
        {
            if !*header_sent {
                out.extend_from_slice(&GZIP_HEADER);
                *header_sent = true;
            }
            deflate_into(deflate, &[], out, FlushCompress::Finish);
            out.extend_from_slice(&crc.sum().to_le_bytes());
            out.extend_from_slice(&crc.amount().to_le_bytes());
        }
    }
}

/// Runs the compressor over all of `input`, growing `out` until the flush is complete.
pub(crate) fn deflate_into(
    deflate: &mut Compress,
    input: &[u8],
    out: &mut Vec<u8>,
    flush: FlushCompress,
) {
    let start_in = deflate.total_in();
    loop {
        out.reserve(input.len() / 2 + 128);
        let consumed = (deflate.total_in() - start_in) as usize;
        let status = deflate
            .compress_vec(&input[consumed..], out, flush)
            .expect("deflate of in-memory data cannot fail");
        let all_in = (deflate.total_in() - start_in) as usize == input.len();
        // Output that stopped short of the capacity means the flush completed.
        let finished = match flush {
            FlushCompress::Finish => matches!(status, flate2::Status::StreamEnd),
            _ => all_in && out.len() < out.capacity(),
        };
        if finished {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A stream of flushed writes and a finish decodes with a standard gzip reader.
    #[test]
    fn gzip_stream_decodes() {
        let mut enc = Encoder::gzip();
        let mut out = Vec::new();
        let mut expect = Vec::new();
        for i in 0..200 {
            let line = format!(
                "{{\"id_str\":\"{i}\",\"pad\":\"{}\"}}\r\n",
                "x".repeat(i * 7)
            );
            enc.encode(line.as_bytes(), &mut out);
            expect.extend_from_slice(line.as_bytes());
        }
        enc.encode(b"\r\n", &mut out);
        expect.extend_from_slice(b"\r\n");
        enc.finish(&mut out);
        let mut got = Vec::new();
        flate2::read::GzDecoder::new(&out[..])
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, expect);
    }
}
