//! Content-defined chunking for opaque bytes (skeletons, unknown files): a gear rolling hash with
//! FastCDC-style normalised cut masks, so an insertion shifts only the chunks around it.

/// Chunk size bounds. `avg_bits` sets the expected size (2^avg_bits bytes).
#[derive(Debug, Clone, Copy)]
pub struct CdcParams {
    pub min: usize,
    pub avg_bits: u32,
    pub max: usize,
}

impl CdcParams {
    /// Bounds derived from the tensor chunk size: expected chunk_bytes, min 1/4, max 4x.
    pub fn for_chunk_bytes(chunk_bytes: usize) -> Self {
        let avg_bits = (usize::BITS - 1 - chunk_bytes.max(64).leading_zeros()).max(6);
        CdcParams {
            min: (1usize << avg_bits) / 4,
            avg_bits,
            max: (1usize << avg_bits) * 4,
        }
    }
}

const fn gear_table() -> [u64; 256] {
    // splitmix64 from a fixed seed: the table is part of the format (it decides chunk ids).
    let mut table = [0u64; 256];
    let mut state: u64 = 0x7468_6574_6173_746f; // "thetasto"
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
}

static GEAR: [u64; 256] = gear_table();

/// Mask of `bits` ones in the high bits (the gear hash's high bits depend on the last 64 bytes).
fn mask(bits: u32) -> u64 {
    if bits == 0 {
        0
    } else {
        (!0u64) << (64 - bits.min(63))
    }
}

/// Length of the first chunk of `data`. `data` starts at a chunk boundary; if it is shorter than
/// `max` it is taken to be the end of the stream.
pub fn next_cut(data: &[u8], p: &CdcParams) -> usize {
    let n = data.len();
    if n <= p.min {
        return n;
    }
    let end = n.min(p.max);
    let avg = (1usize << p.avg_bits).min(end);
    // Harder to cut before the expected size, easier after: sizes cluster around the average.
    let (hard, easy) = (mask(p.avg_bits + 1), mask(p.avg_bits.saturating_sub(1)));
    let mut h: u64 = 0;
    let mut i = p.min;
    while i < avg {
        h = (h << 1).wrapping_add(GEAR[data[i] as usize]);
        if h & hard == 0 {
            return i + 1;
        }
        i += 1;
    }
    while i < end {
        h = (h << 1).wrapping_add(GEAR[data[i] as usize]);
        if h & easy == 0 {
            return i + 1;
        }
        i += 1;
    }
    end
}

/// All chunk lengths of a complete buffer.
pub fn cut_all(data: &[u8], p: &CdcParams) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let len = next_cut(&data[pos..], p);
        out.push(len);
        pos += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn insertion_shifts_few_chunks() {
        let p = CdcParams::for_chunk_bytes(4096);
        let a = noise(400_000, 1);
        let mut b = a.clone();
        b.splice(100_000..100_000, noise(37, 2));
        let ca = cut_all(&a, &p);
        let cb = cut_all(&b, &p);
        assert_eq!(ca.iter().sum::<usize>(), a.len());
        let chunks = |d: &[u8], c: &[usize]| {
            let mut pos = 0;
            c.iter()
                .map(|&l| {
                    pos += l;
                    d[pos - l..pos].to_vec()
                })
                .collect::<std::collections::HashSet<_>>()
        };
        let sa = chunks(&a, &ca);
        let sb = chunks(&b, &cb);
        let shared = sa.intersection(&sb).count();
        assert!(
            shared + 3 >= sa.len(),
            "only {shared} of {} chunks shared",
            sa.len()
        );
        let avg = a.len() / ca.len();
        assert!((1024..16384).contains(&avg), "average chunk {avg}");
    }
}
