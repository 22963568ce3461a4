//! Git object ids of many blobs at once: SHA-1 of `"blob <len>\0" + content` for each.
//!
//! One SHA-1 stream is serial even with the SHA extensions (each block depends on the one
//! before); sixteen streams in the lanes of AVX-512 registers hash more in total. An add hashes
//! every new frame twice (object id, pack checksum); the object ids are independent, so they go
//! sixteen at a time.
//!
//! Lanes run in step over full 64-byte blocks while enough of them have blocks left; the tail
//! of each stream (and everything, without AVX-512) goes through the `sha1` crate.

use sha1::{Digest, Sha1};

use crate::pack::ObjectId;

const H0: [u32; 5] = [
    0x6745_2301,
    0xEFCD_AB89,
    0x98BA_DCFE,
    0x1032_5476,
    0xC3D2_E1F0,
];

/// Below this many streams with blocks left, one stream at a time is faster.
const MIN_LANES: usize = 7;

/// One message: the object header and the content, walked block by block.
struct Stream<'a> {
    /// The first block (header + the start of the content), or the whole message if shorter.
    first: [u8; 64],
    first_len: usize,
    data: &'a [u8],
    /// Content bytes already in `first`.
    skip: usize,
    state: [u32; 5],
    /// Full blocks already compressed.
    done: usize,
}

impl<'a> Stream<'a> {
    fn new(data: &'a [u8]) -> Self {
        let header = format!("blob {}\0", data.len());
        let mut first = [0u8; 64];
        first[..header.len()].copy_from_slice(header.as_bytes());
        let skip = (64 - header.len()).min(data.len());
        first[header.len()..header.len() + skip].copy_from_slice(&data[..skip]);
        Stream {
            first,
            first_len: header.len() + skip,
            data,
            skip,
            state: H0,
            done: 0,
        }
    }

    /// Full 64-byte blocks in the message.
    fn blocks(&self) -> usize {
        (self.first_len + self.data.len() - self.skip) / 64
    }

    /// Block `k` (< `blocks()`).
    fn block(&self, k: usize) -> &[u8] {
        if k == 0 {
            &self.first
        } else {
            let at = self.skip + 64 * k - 64;
            &self.data[at..at + 64]
        }
    }

    /// The digest, compressing the blocks not done yet with the `sha1` crate.
    fn finish(self) -> ObjectId {
        let n = self.blocks();
        if self.done == 0 {
            let mut h = Sha1::new();
            h.update(&self.first[..self.first_len]);
            h.update(&self.data[self.skip..]);
            return h.finalize().into();
        }
        // Block by block, in place (the crate takes blocks as arrays: a slice of the content is
        // not one without a copy).
        let mut state = self.state;
        for k in self.done..n {
            let block = sha1::digest::generic_array::GenericArray::from_slice(self.block(k));
            sha1::compress(&mut state, std::slice::from_ref(block));
        }
        let total = (self.first_len + self.data.len() - self.skip) as u64;
        let tail = &self.data[self.skip + 64 * n - 64..];
        let mut pad = Vec::with_capacity(128);
        pad.extend_from_slice(tail);
        pad.push(0x80);
        while pad.len() % 64 != 56 {
            pad.push(0);
        }
        pad.extend_from_slice(&(total * 8).to_be_bytes());
        let blocks: Vec<_> = pad
            .chunks_exact(64)
            .map(|b| *sha1::digest::generic_array::GenericArray::from_slice(b))
            .collect();
        sha1::compress(&mut state, &blocks);
        let mut id = [0u8; 20];
        for (o, w) in id.chunks_exact_mut(4).zip(state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        id
    }
}

/// Object ids of blobs with these contents (the same as [`crate::pack::blob_id`] of each).
pub fn blob_ids(contents: &[&[u8]]) -> Vec<ObjectId> {
    let mut streams: Vec<Stream> = contents.iter().map(|d| Stream::new(d)).collect();
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        for group in streams.chunks_mut(16) {
            run_lanes(group);
        }
    }
    streams.into_iter().map(Stream::finish).collect()
}

/// Compress blocks sixteen streams at a time while at least `MIN_LANES` have blocks left.
#[cfg(target_arch = "x86_64")]
fn run_lanes(streams: &mut [Stream]) {
    loop {
        let live: Vec<usize> = (0..streams.len())
            .filter(|&i| streams[i].done < streams[i].blocks())
            .collect();
        if live.len() < MIN_LANES {
            return;
        }
        let steps = live
            .iter()
            .map(|&i| streams[i].blocks() - streams[i].done)
            .min()
            .unwrap_or(0);
        let mut state = [[0u32; 16]; 5];
        for (lane, &i) in live.iter().enumerate() {
            for (w, s) in state.iter_mut().zip(streams[i].state) {
                w[lane] = s;
            }
        }
        // The first step may hold a stream's first block (header); after it, each lane's
        // blocks lie one after another in its content. Idle lanes hash a copy of lane 0's
        // blocks, and their result is dropped.
        let first = streams[live[0]].block(streams[live[0]].done);
        let mut blocks: [&[u8]; 16] = [first; 16];
        for (lane, &i) in live.iter().enumerate() {
            blocks[lane] = streams[i].block(streams[i].done);
        }
        x86::compress16(&mut state, &blocks, 1);
        if steps > 1 {
            for (lane, &i) in live.iter().enumerate() {
                let s = &streams[i];
                let at = s.skip + 64 * s.done;
                blocks[lane] = &s.data[at..at + 64 * (steps - 1)];
            }
            for lane in live.len()..16 {
                blocks[lane] = blocks[0];
            }
            x86::compress16(&mut state, &blocks, steps - 1);
        }
        for (lane, &i) in live.iter().enumerate() {
            for (w, s) in state.iter().zip(streams[i].state.iter_mut()) {
                *s = w[lane];
            }
            streams[i].done += steps;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    /// `steps` consecutive 64-byte blocks of each of sixteen streams, lane L's at the start of
    /// `blocks[L]`; `state[w][L]` is word `w` of lane L.
    pub fn compress16(state: &mut [[u32; 16]; 5], blocks: &[&[u8]; 16], steps: usize) {
        assert!(blocks.iter().all(|b| b.len() >= 64 * steps));
        assert!(available());
        // SAFETY: the CPU has AVX-512F and BW (checked above); every lane has `64 * steps`
        // readable bytes (checked above), and the state is 5 x 16 words as the kernel expects.
        unsafe { kernel(state, blocks, steps) }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn kernel(state: &mut [[u32; 16]; 5], blocks: &[&[u8]; 16], steps: usize) {
        // Rows: lane L's block as sixteen big-endian words, byte-swapped to native.
        let swap = _mm512_broadcast_i32x4(_mm_set_epi8(
            12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3,
        ));
        let mut s = [_mm512_setzero_si512(); 5];
        for (v, words) in s.iter_mut().zip(state.iter()) {
            *v = _mm512_loadu_si512(words.as_ptr().cast());
        }
        let mut r = [_mm512_setzero_si512(); 16];
        for step in 0..steps {
            for (row, b) in r.iter_mut().zip(blocks) {
                let at = b.as_ptr().add(64 * step);
                *row = _mm512_shuffle_epi8(_mm512_loadu_si512(at.cast()), swap);
            }
            s = rounds(s, transpose(&r));
        }
        for (v, words) in s.iter().zip(state.iter_mut()) {
            _mm512_storeu_si512(words.as_mut_ptr().cast(), *v);
        }
    }

    /// Sixteen rows of sixteen words to sixteen columns: `out[j]` is word j of every lane.
    #[target_feature(enable = "avx512f")]
    fn transpose(r: &[__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for p in 0..8 {
            t[2 * p] = _mm512_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
            t[2 * p + 1] = _mm512_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
        }
        // u[4q + m]: in each 128-bit lane k, word 4k + m of rows 4q..4q+3.
        let mut u = [_mm512_setzero_si512(); 16];
        for q in 0..4 {
            let b = 4 * q;
            u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
            u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
            u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
            u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
        }
        let mut out = [_mm512_setzero_si512(); 16];
        for m in 0..4 {
            let (a, b, c, d) = (u[m], u[4 + m], u[8 + m], u[12 + m]);
            let v0 = _mm512_shuffle_i32x4::<0x44>(a, b);
            let v1 = _mm512_shuffle_i32x4::<0x44>(c, d);
            let v2 = _mm512_shuffle_i32x4::<0xEE>(a, b);
            let v3 = _mm512_shuffle_i32x4::<0xEE>(c, d);
            out[m] = _mm512_shuffle_i32x4::<0x88>(v0, v1);
            out[4 + m] = _mm512_shuffle_i32x4::<0xDD>(v0, v1);
            out[8 + m] = _mm512_shuffle_i32x4::<0x88>(v2, v3);
            out[12 + m] = _mm512_shuffle_i32x4::<0xDD>(v2, v3);
        }
        out
    }

    /// The 80 rounds on sixteen lanes, plus the feed-forward.
    #[target_feature(enable = "avx512f")]
    fn rounds(s: [__m512i; 5], mut w: [__m512i; 16]) -> [__m512i; 5] {
        let [mut a, mut b, mut c, mut d, mut e] = s;
        macro_rules! round {
            ($t:expr, $f:literal, $k:expr) => {{
                const T: usize = $t;
                if T >= 16 {
                    let x = _mm512_ternarylogic_epi32::<0x96>(
                        w[(T - 3) & 15],
                        w[(T - 8) & 15],
                        w[(T - 14) & 15],
                    );
                    w[T & 15] = _mm512_rol_epi32::<1>(_mm512_xor_si512(x, w[T & 15]));
                }
                let f = _mm512_ternarylogic_epi32::<$f>(b, c, d);
                let k = _mm512_set1_epi32($k as i32);
                let tmp = _mm512_add_epi32(
                    _mm512_add_epi32(_mm512_rol_epi32::<5>(a), f),
                    _mm512_add_epi32(_mm512_add_epi32(e, k), w[T & 15]),
                );
                e = d;
                d = c;
                c = _mm512_rol_epi32::<30>(b);
                b = a;
                a = tmp;
            }};
        }
        macro_rules! rounds4 {
            ($t:expr, $f:literal, $k:expr) => {
                round!($t, $f, $k);
                round!($t + 1, $f, $k);
                round!($t + 2, $f, $k);
                round!($t + 3, $f, $k);
            };
        }
        macro_rules! rounds20 {
            ($t:expr, $f:literal, $k:expr) => {
                rounds4!($t, $f, $k);
                rounds4!($t + 4, $f, $k);
                rounds4!($t + 8, $f, $k);
                rounds4!($t + 12, $f, $k);
                rounds4!($t + 16, $f, $k);
            };
        }
        // Choose (b ? c : d), parity, majority, parity.
        rounds20!(0, 0xCA, 0x5A82_7999u32);
        rounds20!(20, 0x96, 0x6ED9_EBA1u32);
        rounds20!(40, 0xE8, 0x8F1B_BCDCu32);
        rounds20!(60, 0x96, 0xCA62_C1D6u32);
        [
            _mm512_add_epi32(a, s[0]),
            _mm512_add_epi32(b, s[1]),
            _mm512_add_epi32(c, s[2]),
            _mm512_add_epi32(d, s[3]),
            _mm512_add_epi32(e, s[4]),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::blob_id;

    #[test]
    fn equal_to_one_at_a_time() {
        // Lengths around block and header boundaries, equal and unequal, more than 16 streams.
        let lens = [
            0usize, 1, 50, 51, 52, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 4096, 4097, 70_000,
            70_001, 70_064, 200_000, 200_000, 200_001, 199_999, 65_536, 65_535, 300_000,
        ];
        let data: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|i| (i * 31 + k * 7 + i / 253) as u8).collect())
            .collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
        let want: Vec<ObjectId> = refs.iter().map(|d| blob_id(d)).collect();
        assert_eq!(blob_ids(&refs), want);
        // Pseudo-random lengths, some equal, some near each other: lanes leave at every step.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..6 {
            let lens: Vec<usize> = (0..20 + round * 7)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    [x as usize % 300_000, 150_000 + x as usize % 640, 2 << 16][round % 3]
                })
                .collect();
            let refs: Vec<&[u8]> = lens.iter().map(|&n| &data[25][..n]).collect();
            let want: Vec<ObjectId> = refs.iter().map(|d| blob_id(d)).collect();
            assert_eq!(blob_ids(&refs), want, "lengths {lens:?}");
        }
        // Sixteen of the same length: every lane runs to the end together.
        let same: Vec<&[u8]> = (0..16).map(|k| &data[19 + k % 3][..200_000]).collect();
        let want: Vec<ObjectId> = same.iter().map(|d| blob_id(d)).collect();
        assert_eq!(blob_ids(&same), want);
    }
}
