//! Content-defined chunking: FastCDC v2020 with the owner's secret gear seed, so that chunk
//! boundaries depend on a secret and a friend cannot fingerprint files by chunk lengths.

use obnam_protocol::snapshot::ChunkerParams;
use std::io::Read;

/// A chunk cut from a stream.
pub type Chunk = fastcdc::v2020::ChunkData;

/// Cuts `reader` into chunks with the given parameters and seed.
pub fn chunks<R: Read>(
    reader: R,
    params: &ChunkerParams,
    seed: u64,
) -> fastcdc::v2020::StreamCDC<R> {
    let level = match params.level {
        0 => fastcdc::v2020::Normalization::Level0,
        2 => fastcdc::v2020::Normalization::Level2,
        3 => fastcdc::v2020::Normalization::Level3,
        _ => fastcdc::v2020::Normalization::Level1,
    };
    fastcdc::v2020::StreamCDC::with_level_and_seed(
        reader,
        params.min as usize,
        params.avg as usize,
        params.max as usize,
        level,
        seed,
    )
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
        chunks(data, &ChunkerParams::V1, seed)
            .map(|c| c.unwrap().length)
            .collect()
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
        let lens: Vec<usize> = chunks(&data[..], &ChunkerParams::V1, 0x0123_4567_89ab_cdef)
            .map(|c| c.unwrap().length)
            .collect();
        assert_eq!(lens, vec![2130150, 1823925, 1729070, 2943684, 810355]);
    }
}
