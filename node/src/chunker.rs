//! Content-defined chunking: FastCDC v2020 with the owner's secret gear seed, so that chunk
//! boundaries depend on a secret and a friend cannot fingerprint files by chunk lengths.

use obnam_protocol::snapshot::ChunkerParams;
use std::borrow::Cow;
use std::io::Read;

/// Cuts streams into chunks with FastCDC v2020 (the same cut points as
/// `fastcdc::v2020::StreamCDC`, which the golden test freezes), reusing one buffer and one set
/// of gear tables for every file of a backup. Making a `StreamCDC` per file would allocate and
/// zero a buffer of the largest chunk size (4 MiB) and derive the seeded tables again each time,
/// which dominated the cost of backing up small files.
pub struct Chunker {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    gear: Cow<'static, [u64]>,
    gear_ls: Cow<'static, [u64]>,
    /// Holds `buf[start..end]`, the bytes read but not yet cut; twice the largest chunk, so
    /// that the remainder is moved to the front at most once per largest chunk.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl Chunker {
    /// A chunker for `params` (which [`supported`] must accept) and the owner's gear seed.
    pub fn new(params: &ChunkerParams, seed: u64) -> Self {
        let level = match params.level {
            0 => fastcdc::v2020::Normalization::Level0,
            2 => fastcdc::v2020::Normalization::Level2,
            3 => fastcdc::v2020::Normalization::Level3,
            _ => fastcdc::v2020::Normalization::Level1,
        };
        let avg = params.avg as usize;
        let (mask_s, mask_l) = fastcdc::v2020::select_masks(avg, level);
        let (gear, gear_ls) = fastcdc::v2020::get_gear_with_seed(seed);
        let max = params.max as usize;
        Self {
            min: params.min as usize,
            avg,
            max,
            mask_s,
            mask_l,
            gear,
            gear_ls,
            buf: vec![0; 2 * max],
            start: 0,
            end: 0,
            eof: false,
        }
    }

    /// Starts a new stream: forgets whatever is left of the previous one.
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.eof = false;
    }

    /// The next chunk of `reader` (which must be the same reader since the last
    /// [`Chunker::reset`]), or `None` at its end.
    ///
    /// # Errors
    /// A read error of `reader`.
    pub fn next_chunk(&mut self, reader: &mut impl Read) -> Option<std::io::Result<&[u8]>> {
        // A cut needs the largest chunk's worth of bytes, unless the stream ends sooner.
        if !self.eof && self.end - self.start < self.max {
            if self.buf.len() - self.start < self.max {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            while !self.eof && self.end < self.buf.len() {
                match reader.read(&mut self.buf[self.end..]) {
                    Ok(0) => self.eof = true,
                    Ok(n) => self.end += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Some(Err(e)),
                }
            }
        }
        if self.start == self.end {
            return None;
        }
        let (_, len) = fastcdc::v2020::cut_gear(
            &self.buf[self.start..self.end],
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        if len == 0 {
            return None;
        }
        let chunk = &self.buf[self.start..self.start + len];
        self.start += len;
        Some(Ok(chunk))
    }

    /// The lengths of the chunks of an in-memory buffer (for tests and tools).
    pub fn lengths(&mut self, mut data: &[u8]) -> Vec<usize> {
        self.reset();
        let mut out = Vec::new();
        while let Some(Ok(c)) = self.next_chunk(&mut data) {
            out.push(c.len());
        }
        out
    }
}

/// Whether this build can cut chunks with `params`.
pub fn supported(params: &ChunkerParams) -> bool {
    params.version == 1
        && params.min >= 64
        && params.min <= params.avg
        && params.avg <= params.max
        && params.max as usize <= crate::seal::MAX_CHUNK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(data: &[u8], seed: u64) -> Vec<usize> {
        Chunker::new(&ChunkerParams::V1, seed).lengths(data)
    }

    #[test]
    fn the_same_cut_points_as_stream_cdc_whatever_the_reads() {
        let mut data = vec![0u8; 11 * 1024 * 1024 + 12345];
        let mut x: u64 = 7;
        for b in data.iter_mut() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
        // Runs of zeros make maximum-size chunks.
        data[3_000_000..8_000_000].fill(0);
        for p in [ChunkerParams::V1, ChunkerParams::DEFAULT] {
            assert!(supported(&p));
            same_cuts_as_stream_cdc(&data, &p);
        }
    }

    fn same_cuts_as_stream_cdc(data: &[u8], p: &ChunkerParams) {
        let seed = 42;
        let expected: Vec<usize> = fastcdc::v2020::StreamCDC::with_level_and_seed(
            data,
            p.min as usize,
            p.avg as usize,
            p.max as usize,
            fastcdc::v2020::Normalization::Level1,
            seed,
        )
        .map(|c| c.unwrap().length)
        .collect();
        let mut chunker = Chunker::new(p, seed);
        assert_eq!(chunker.lengths(data), expected);
        assert!(expected.iter().all(|&l| l <= p.max as usize));
        // A reader that returns odd-sized short reads gives the same chunks and bytes.
        struct Dribble<'a>(&'a [u8], usize);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.1 = self.1 % 70_001 + 9_973;
                let n = self.1.min(buf.len()).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        chunker.reset();
        let mut r = Dribble(data, 0);
        let mut got = Vec::new();
        while let Some(c) = chunker.next_chunk(&mut r) {
            got.extend_from_slice(c.unwrap());
        }
        assert_eq!(got, data);
        assert_eq!(chunker.lengths(b"short"), vec![5]);
        assert!(chunker.lengths(b"").is_empty());
    }

    #[test]
    fn boundaries_depend_on_the_seed_and_cover_the_input() {
        let mut data = vec![0u8; 12 * 1024 * 1024];
        let mut x: u64 = 1;
        for b in data.iter_mut() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
        let a = cut(&data, 1);
        let b = cut(&data, 2);
        assert_eq!(a.iter().sum::<usize>(), data.len());
        assert_eq!(b.iter().sum::<usize>(), data.len());
        assert_ne!(a, b, "another seed must cut elsewhere");
        assert!(a.iter().all(|&l| l <= 4 * 1024 * 1024));
        assert!(a[..a.len() - 1].iter().all(|&l| l >= 256 * 1024));
        assert!(cut(b"", 1).is_empty());
    }
}

#[cfg(test)]
mod golden {
    use super::*;

    /// Freezes chunk boundaries: changing them would make every later backup store everything again.
    #[test]
    fn golden_cut_points() {
        let mut data = vec![0u8; 9 * 1024 * 1024];
        let mut x: u32 = 12345;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let lens = Chunker::new(&ChunkerParams::V1, 0x0123_4567_89ab_cdef).lengths(&data);
        assert_eq!(lens, vec![2130150, 1823925, 1729070, 2943684, 810355]);
    }
}
