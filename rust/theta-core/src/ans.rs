//! Static order-0 rANS entropy coder for byte planes.
//!
//! zstd level 1 leaves about a tenth on the table on float exponent planes because its LZ stage
//! spends bits on short matches; a plain order-0 coder gets within a fraction of a percent of the
//! entropy and decodes fast (README "Figures").
//!
//! Layout: a 32-byte bitmap of the symbols present, one u16 LE frequency per present symbol
//! (they sum to 2^14), then the stream: 32 interleaved 32-bit states (u32 LE), then 16-bit
//! renormalisation words (u16 LE) in decode order. Symbol `i` belongs to state `i % 32`. States
//! live in `[2^16, 2^32)`; a state below 2^16 after decoding a symbol pulls in one word. Every
//! state ends (after the last symbol) at exactly 2^16, which the decoder checks along with having
//! consumed every word.
//!
//! 32 states rather than 4: four AVX2 vectors of eight lanes decode (and encode) independent
//! chains, so the gathers' latency overlaps; 32-bit states with 16-bit words cost +0.05% on an
//! fp32 exponent plane against 64-bit states with 32-bit words. The portable loops produce the
//! same bytes and read the same streams, one state at a time.
//!
//! The encoder divides by multiplying with a precomputed reciprocal (see [`EncSym::quotient`]);
//! it gives exactly the quotient of the division, so the stream is the one a textbook rANS
//! encoder writes. Everything is integer arithmetic: same input, same bytes, on every
//! machine.

use crate::error::{Error, Result};
use std::cell::RefCell;

pub const SCALE_BITS: u32 = 14;
const M: u32 = 1 << SCALE_BITS;
/// Lower bound of a state; states live in `[L, 2^32)` and renormalise by 16-bit words.
const L: u32 = 1 << 16;
/// Interleaved states: 32 independent dependency chains, four AVX2 vectors of eight.
pub const WAYS: usize = 32;

/// Byte histogram, with eight sub-tables so consecutive equal bytes do not serialise on one
/// counter.
pub fn histogram(data: &[u8]) -> [u64; 256] {
    let mut h = [[0u32; 256]; 8];
    let mut total = [0u64; 256];
    // u32 sub-counters are flushed before they can overflow.
    for block in data.chunks(1 << 30) {
        let mut octs = block.chunks_exact(8);
        for q in &mut octs {
            let v = u64::from_le_bytes(q.try_into().unwrap());
            h[0][(v & 0xff) as usize] += 1;
            h[1][((v >> 8) & 0xff) as usize] += 1;
            h[2][((v >> 16) & 0xff) as usize] += 1;
            h[3][((v >> 24) & 0xff) as usize] += 1;
            h[4][((v >> 32) & 0xff) as usize] += 1;
            h[5][((v >> 40) & 0xff) as usize] += 1;
            h[6][((v >> 48) & 0xff) as usize] += 1;
            h[7][(v >> 56) as usize] += 1;
        }
        for &b in octs.remainder() {
            h[0][b as usize] += 1;
        }
        for (s, t) in total.iter_mut().enumerate() {
            *t += h.iter().map(|sub| sub[s] as u64).sum::<u64>();
        }
        h = [[0u32; 256]; 8];
    }
    total
}

/// Quantise a histogram to frequencies summing to 2^14, every present symbol at least 1.
/// Integer-only, so the result (and so the encoded bytes) is the same on every machine.
pub fn normalize(hist: &[u64; 256]) -> [u32; 256] {
    let total: u64 = hist.iter().sum();
    let mut freq = [0u32; 256];
    if total == 0 {
        return freq;
    }
    let mut sum: i64 = 0;
    for (f, &h) in freq.iter_mut().zip(hist.iter()) {
        if h > 0 {
            *f = ((h as u128 * M as u128 / total as u128) as u32).max(1);
            sum += *f as i64;
        }
    }
    let mut diff = M as i64 - sum;
    let largest = |freq: &[u32; 256]| {
        let mut best = 0;
        for s in 1..256 {
            if freq[s] > freq[best] {
                best = s;
            }
        }
        best
    };
    if diff > 0 {
        let s = largest(&freq);
        freq[s] += diff as u32;
    }
    while diff < 0 {
        let s = largest(&freq);
        let take = ((-diff) as u32).min(freq[s] - 1);
        freq[s] -= take;
        diff += take as i64;
    }
    freq
}

fn cumulative(freq: &[u32; 256]) -> [u32; 257] {
    let mut cum = [0u32; 257];
    for s in 0..256 {
        cum[s + 1] = cum[s] + freq[s];
    }
    cum
}

/// Size in bytes of the serialised table for `freq`.
fn table_len(freq: &[u32; 256]) -> usize {
    32 + 2 * freq.iter().filter(|&&f| f > 0).count()
}

/// `log2(x)` for `1 <= x <= 2^14` in 1/2^16 bit units, exact to the last unit and computed with
/// integers only (bit-by-bit squaring), so size estimates are the same on every machine.
fn log2_fixed(x: u32) -> u64 {
    debug_assert!((1..=M).contains(&x));
    let int = 31 - x.leading_zeros();
    // Mantissa in [1, 2) as Q1.31.
    let mut m: u64 = (x as u64) << (31 - int);
    let mut frac: u64 = 0;
    for bit in (0..16).rev() {
        m = (m * m) >> 31;
        if m >= 1 << 32 {
            m >>= 1;
            frac |= 1 << bit;
        }
    }
    ((int as u64) << 16) | frac
}

/// Estimated size in bytes of [`encode_with_hist`]'s output for a plane with histogram `hist`
/// (within a few bytes: the stream carries the exact information content of the normalised
/// model, plus the final states; a final state takes 4 bytes but holds on average 8 bits of the
/// information, as `log2(x / L)` is close to uniform over [0, 16)).
pub fn estimate_len(hist: &[u64; 256]) -> usize {
    let freq = normalize(hist);
    table_len(&freq) + (estimate_stream_bits(hist) >> 19) as usize + 3 * WAYS
}

/// Information content of the symbols counted in `hist` under their normalised model, in 1/2^16
/// bit units (what the renormalisation words carry).
pub fn estimate_stream_bits(hist: &[u64; 256]) -> u64 {
    let freq = normalize(hist);
    let mut bits: u64 = 0;
    for s in 0..256 {
        if hist[s] > 0 {
            let cost = ((SCALE_BITS as u64) << 16) - log2_fixed(freq[s]);
            bits += hist[s] * cost;
        }
    }
    bits
}

/// Encoder view of one symbol: renormalisation bound and reciprocal of its frequency.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct EncSym {
    /// The state before encoding must be below this (2^(32 - SCALE_BITS) * freq) so the result
    /// stays below 2^32.
    x_max: u32,
    /// With `shift = ceil(log2(freq))`: `ceil(2^(32 + shift) / freq) - 2^32` (0 for a power of
    /// two, which includes freq = 1).
    rcp: u32,
    /// `cum`, the start of the symbol's slot range.
    bias: u32,
    /// `M - freq`.
    cmpl_freq: u32,
    shift: u32,
}

impl EncSym {
    fn new(start: u32, freq: u32) -> Self {
        debug_assert!((1..M).contains(&freq));
        let shift = 32 - (freq - 1).leading_zeros();
        let rcp = ((1u64 << (32 + shift)).div_ceil(freq as u64) - (1 << 32)) as u32;
        EncSym {
            x_max: (1 << (32 - SCALE_BITS)) * freq,
            rcp,
            bias: start,
            cmpl_freq: M - freq,
            shift,
        }
    }

    /// `floor(y / freq)` for `y < x_max`, by multiplication: with `r = rcp + 2^32`,
    /// `y * r / 2^(32 + shift)` exceeds `y / freq` by less than `y / 2^(32 + shift) < 2^-14`,
    /// less than the distance from `y / freq` to the next integer (at least `1 / freq`).
    #[inline(always)]
    fn quotient(&self, y: u32) -> u32 {
        let t = (y as u64 * self.rcp as u64) >> 32;
        ((y as u64 + t) >> self.shift) as u32
    }

    /// The state after encoding this symbol from a renormalised state `y`: `y / freq * M +
    /// y % freq + cum` = `y + cum + q * (M - freq)`. Every partial sum is below the result, and
    /// the result is below 2^32.
    #[inline(always)]
    fn apply(&self, y: u32) -> u32 {
        y + self.bias + self.quotient(y) * self.cmpl_freq
    }
}

#[inline(always)]
fn put(x: &mut u32, s: &EncSym, words: &mut [u16], pos: &mut usize) {
    // Branch-free renormalisation: always store the low half, keep it only if needed.
    let flush = *x >= s.x_max;
    words[*pos - 1] = *x as u16;
    *pos -= flush as usize;
    // A shift by 0 or 16 rather than a select: the compiler turns the select into a branch.
    let y = *x >> ((flush as u32) << 4);
    *x = s.apply(y);
}

/// Words of scratch below the encoder's first kept word (the AVX2 loop stores 8 at a time).
const ENC_SLACK: usize = 8;

/// Encode whole groups of [`WAYS`] symbols (backwards) with the portable loop.
fn encode_groups_scalar(
    sym: &[EncSym; 256],
    data: &[u8],
    x: &mut [u32; WAYS],
    words: &mut [u16],
    pos: &mut usize,
) {
    for g in data.chunks_exact(WAYS).rev() {
        let g: &[u8; WAYS] = g.try_into().unwrap();
        for j in (0..WAYS).rev() {
            put(&mut x[j], &sym[g[j] as usize], words, pos);
        }
    }
}

thread_local! {
    static ENC_WORDS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Encode `data` and append table + stream to `out`.
pub fn encode(data: &[u8], out: &mut Vec<u8>) {
    let hist = histogram(data);
    encode_with_hist(data, &hist, out)
}

/// Encode `data`, whose byte histogram is `hist`, and append table + stream to `out`.
pub fn encode_with_hist(data: &[u8], hist: &[u64; 256], out: &mut Vec<u8>) {
    encode_impl(data, hist, out, true)
}

/// `simd: false` forces the portable loop (the tests check both paths write the same bytes).
fn encode_impl(data: &[u8], hist: &[u64; 256], out: &mut Vec<u8>, simd: bool) {
    let freq = normalize(hist);
    let cum = cumulative(&freq);
    let start = out.len();
    let mut bitmap = [0u8; 32];
    for s in 0..256 {
        if freq[s] > 0 {
            bitmap[s / 8] |= 1 << (s % 8);
        }
    }
    out.extend_from_slice(&bitmap);
    for &f in freq.iter().filter(|&&f| f > 0) {
        // f <= 2^14 fits u16.
        out.extend_from_slice(&(f as u16).to_le_bytes());
    }
    debug_assert_eq!(out.len() - start, table_len(&freq));

    let mut x = [L; WAYS];
    if freq.contains(&M) || data.is_empty() {
        // One symbol (or none): encoding leaves the states at L and writes no word.
        for &xj in &x {
            out.extend_from_slice(&xj.to_le_bytes());
        }
        return;
    }
    let mut sym = [EncSym::default(); 256];
    for s in 0..256 {
        if freq[s] > 0 {
            sym[s] = EncSym::new(cum[s], freq[s]);
        }
    }
    ENC_WORDS.with(|cell| {
        let mut words = cell.borrow_mut();
        // At most one word per symbol, plus room for the SIMD loop's 8-word stores below the
        // first kept word.
        let cap = data.len() + ENC_SLACK;
        if words.len() < cap {
            words.resize(cap, 0);
        }
        let words = &mut words[..cap];
        let mut pos = cap;
        let n = data.len();
        let mut i = n;
        // Tail first (encoding runs backwards), so the main loop sees whole groups.
        while !i.is_multiple_of(WAYS) {
            i -= 1;
            put(&mut x[i % WAYS], &sym[data[i] as usize], words, &mut pos);
        }
        let head = &data[..i];
        #[cfg(target_arch = "x86_64")]
        let simd = simd && x86::available();
        #[cfg(not(target_arch = "x86_64"))]
        let simd = {
            let _ = simd;
            false
        };
        if simd {
            #[cfg(target_arch = "x86_64")]
            {
                pos = x86::encode_groups_avx2(&sym, head, &mut x, words, pos);
            }
        } else {
            encode_groups_scalar(&sym, head, &mut x, words, &mut pos);
        }
        let kept = &words[pos..];
        out.reserve(4 * WAYS + 2 * kept.len());
        for &xj in &x {
            out.extend_from_slice(&xj.to_le_bytes());
        }
        let at = out.len();
        out.resize(at + 2 * kept.len(), 0);
        for (b, w) in out[at..].chunks_exact_mut(2).zip(kept) {
            b.copy_from_slice(&w.to_le_bytes());
        }
    });
}

/// Decoder tables: the symbol of every slot (plus 3 padding bytes, so a 4-byte read at any slot
/// stays inside) and per symbol `freq | cum << 16`.
struct DecTables {
    lut: Vec<u8>,
    tab: [u32; 256],
    /// Per slot `freq | (slot - cum) << 16` of its symbol (for the SIMD loop, whose state update
    /// then waits for one table read rather than two in a row); empty when not built.
    slots: Vec<u32>,
}

thread_local! {
    /// Decoder scratch: tables and the stream's words (followed by zero padding).
    static DEC_SCRATCH: RefCell<(Vec<u8>, Vec<u16>, Vec<u32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Zero words after the stream's words in the decoder's scratch copy: the SIMD loop checks
/// `k <= nwords` once per group of [`WAYS`] symbols, then reads up to `WAYS + 8` words from there.
const PAD_WORDS: usize = WAYS + 16;

/// One decoding step of one state (the reference semantics; the SIMD loops match it exactly).
#[inline(always)]
fn step(t: &DecTables, x: &mut u32, words: &[u16], k: &mut usize) -> u8 {
    let slot = *x & (M - 1);
    let s = t.lut[slot as usize];
    let e = t.tab[s as usize];
    let y = (e & 0xffff) * (*x >> SCALE_BITS) + slot - (e >> 16);
    if y < L {
        *x = (y << 16) | words[*k] as u32;
        *k += 1;
    } else {
        *x = y;
    }
    s
}

/// Decode whole groups of [`WAYS`] symbols with the portable loop. Returns the number of words
/// consumed (more than `nwords` if the stream ran out; then the caller reports corruption).
fn decode_groups_scalar(
    t: &DecTables,
    words: &[u16],
    nwords: usize,
    x: &mut [u32; WAYS],
    mut k: usize,
    out: &mut [u8],
) -> usize {
    for g in out.chunks_exact_mut(WAYS) {
        if k > nwords {
            break;
        }
        for (j, b) in g.iter_mut().enumerate() {
            *b = step(t, &mut x[j], words, &mut k);
        }
    }
    k
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    //! AVX2 decoder: the 32 states as four vectors of eight lanes. Lane `j` of vector `v` is
    //! state `8v + j`; the states that need a word take consecutive words in state order, which
    //! is what the scalar loop does one state at a time.
    use super::{DecTables, EncSym, ENC_SLACK, L, M, PAD_WORDS, SCALE_BITS, WAYS};
    use std::arch::x86_64::*;

    const _: () = assert!(WAYS == 32);

    /// For each 8-bit mask of lanes that take a word: the index, among the words loaded, of the
    /// word each lane takes (lanes that take none get 0, which the blend then drops).
    static EXPAND: [[u32; 8]; 256] = {
        let mut t = [[0u32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let mut n = 0;
            let mut j = 0;
            while j < 8 {
                if m & (1 << j) != 0 {
                    t[m][j] = n;
                    n += 1;
                }
                j += 1;
            }
            m += 1;
        }
        t
    };

    /// For each 8-bit mask of lanes that flush a word: which lane each of the 8 output slots
    /// takes so that the flushed lanes end up in the top slots, in lane order.
    static COMPRESS_HI: [[u32; 8]; 256] = {
        let mut t = [[0u32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let cnt = (m as u32).count_ones() as usize;
            let mut n = 8 - cnt;
            let mut j = 0;
            while j < 8 {
                if m & (1 << j) != 0 {
                    t[m][n] = j as u32;
                    n += 1;
                }
                j += 1;
            }
            m += 1;
        }
        t
    };

    /// Same contract as `encode_groups_scalar`, returning the new `pos`. Callers check
    /// [`available`] first.
    pub(super) fn encode_groups_avx2(
        sym: &[EncSym; 256],
        data: &[u8],
        x: &mut [u32; WAYS],
        words: &mut [u16],
        pos: usize,
    ) -> usize {
        assert!(available());
        // Every symbol flushes at most one word, and each 8-word store ends at the current pos.
        assert!(
            data.len().is_multiple_of(WAYS) && pos <= words.len() && pos >= data.len() + ENC_SLACK
        );
        let mut rcp = [0u32; 256];
        let mut packed = [0u32; 256];
        for s in 0..256 {
            let e = &sym[s];
            // bias < 2^14, cmpl_freq < 2^14, shift <= 14.
            rcp[s] = e.rcp;
            packed[s] = e.bias | (e.cmpl_freq << 14) | (e.shift << 28);
        }
        // SAFETY: AVX2 is present (checked above).
        unsafe { enc_groups(&rcp, &packed, data, x, words, pos) }
    }

    #[target_feature(enable = "avx2,popcnt")]
    unsafe fn enc_groups(
        rcp: &[u32; 256],
        packed: &[u32; 256],
        data: &[u8],
        xs: &mut [u32; WAYS],
        words: &mut [u16],
        mut pos: usize,
    ) -> usize {
        let m14 = _mm256_set1_epi32((M - 1) as i32);
        let m4 = _mm256_set1_epi32(0xf);
        let big = _mm256_set1_epi32((M << (32 - SCALE_BITS)) as i32);
        let sixteen = _mm256_set1_epi32(16);
        // Low 16 bits of each 32-bit lane, packed into the low 8 bytes of each 128-bit lane.
        let low_halves = _mm256_setr_epi8(
            0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, //
            0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
        );
        let rp = rcp.as_ptr() as *const i32;
        let pp = packed.as_ptr() as *const i32;
        let wp = words.as_mut_ptr();
        // SAFETY (all loads and stores below):
        // - gathers read index s <= 255 (a zero-extended byte) of 256-entry tables;
        // - each 8-byte load of symbols lies inside its 32-byte group of `data`;
        // - pos starts >= data.len() + ENC_SLACK and drops by at most one per symbol, so each
        //   16-byte store of words at pos - 8 stays inside `words` (pos <= words.len());
        // - `COMPRESS_HI[m]` with m < 256.
        let mut v = load_states(xs);
        for g in data.chunks_exact(WAYS).rev() {
            for i in (0..4).rev() {
                let x = v[i];
                let s =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(g.as_ptr().add(8 * i) as *const __m128i));
                let r = _mm256_i32gather_epi32::<4>(rp, s);
                let e = _mm256_i32gather_epi32::<4>(pp, s);
                let bias = _mm256_and_si256(e, m14);
                let cmpl = _mm256_and_si256(_mm256_srli_epi32::<14>(e), m14);
                let shift = _mm256_and_si256(_mm256_srli_epi32::<28>(e), m4);
                // x_max = freq << 18 = (M - cmpl) << 18.
                let x_max =
                    _mm256_sub_epi32(big, _mm256_slli_epi32::<{ 32 - SCALE_BITS as i32 }>(cmpl));
                let flush = _mm256_cmpeq_epi32(_mm256_max_epu32(x, x_max), x);
                let m = _mm256_movemask_ps(_mm256_castsi256_ps(flush)) as usize;
                let idx = _mm256_loadu_si256(COMPRESS_HI[m].as_ptr() as *const __m256i);
                let c = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(x, idx), low_halves);
                let c = _mm256_permute4x64_epi64::<0b1000>(c);
                debug_assert!(pos >= 8);
                _mm_storeu_si128(wp.add(pos - 8) as *mut __m128i, _mm256_castsi256_si128(c));
                pos -= m.count_ones() as usize;
                let y = _mm256_srlv_epi32(x, _mm256_and_si256(flush, sixteen));
                // t = (y * rcp) >> 32, lane by lane.
                let even = _mm256_srli_epi64::<32>(_mm256_mul_epu32(y, r));
                let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(y), _mm256_srli_epi64::<32>(r));
                let t = _mm256_blend_epi32::<0b1010_1010>(even, odd);
                // y + t < 2^(18 + shift) <= 2^32 (see `EncSym::quotient`).
                let q = _mm256_srlv_epi32(_mm256_add_epi32(y, t), shift);
                v[i] = _mm256_add_epi32(_mm256_add_epi32(y, bias), _mm256_mullo_epi32(q, cmpl));
            }
        }
        store_states(xs, v);
        pos
    }

    /// The 32 states as four vectors of eight lanes (lane j of vector v is state 8v + j).
    #[target_feature(enable = "avx2")]
    unsafe fn load_states(xs: &[u32; WAYS]) -> [__m256i; 4] {
        // SAFETY: four unaligned 32-byte loads at offsets 0, 8, 16, 24 of 32 u32.
        unsafe {
            let p = xs.as_ptr() as *const __m256i;
            [
                _mm256_loadu_si256(p),
                _mm256_loadu_si256(p.add(1)),
                _mm256_loadu_si256(p.add(2)),
                _mm256_loadu_si256(p.add(3)),
            ]
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn store_states(xs: &mut [u32; WAYS], v: [__m256i; 4]) {
        // SAFETY: four unaligned 32-byte stores at offsets 0, 8, 16, 24 of 32 u32.
        unsafe {
            let p = xs.as_mut_ptr() as *mut __m256i;
            for (k, x) in v.into_iter().enumerate() {
                _mm256_storeu_si256(p.add(k), x);
            }
        }
    }

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2")
    }

    /// Same contract as `decode_groups_scalar`. Callers check [`available`] first.
    pub(super) fn decode_groups_avx2(
        t: &DecTables,
        words: &[u16],
        nwords: usize,
        x: &mut [u32; WAYS],
        k: usize,
        out: &mut [u8],
    ) -> usize {
        assert!(available());
        // The bounds the loop relies on.
        assert!(t.lut.len() >= M as usize + 3);
        assert!(t.slots.len() >= M as usize);
        assert!(words.len() >= nwords + PAD_WORDS);
        // SAFETY: AVX2 is present (checked above).
        unsafe { groups(t, words, nwords, x, k, out) }
    }

    #[target_feature(enable = "avx2,popcnt")]
    unsafe fn groups(
        t: &DecTables,
        words: &[u16],
        nwords: usize,
        xs: &mut [u32; WAYS],
        mut k: usize,
        out: &mut [u8],
    ) -> usize {
        let slot_mask = _mm256_set1_epi32((M - 1) as i32);
        let byte_mask = _mm256_set1_epi32(0xff);
        let low16 = _mm256_set1_epi32(0xffff);
        let zero = _mm256_setzero_si256();
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let lut = t.lut.as_ptr() as *const i32;
        let tab = t.slots.as_ptr() as *const i32;
        let wp = words.as_ptr();
        // SAFETY (all loads and stores below):
        // - gathers from `lut` read 4 bytes at slot < 2^14 and lut.len() >= 2^14 + 3; gathers
        //   from `tab` (the per-slot table) read index slot < 2^14 of a table of 2^14 entries;
        // - a group starts with k <= nwords and takes at most 8 words per vector, so each 16-byte
        //   load of words reads indices below k + 24 + 8 <= nwords + PAD_WORDS <= words.len();
        // - `EXPAND[m]` with m < 256; each output group is exactly 32 bytes.
        let mut v = load_states(xs);
        for g in out.chunks_exact_mut(WAYS) {
            if k > nwords {
                break;
            }
            let mut sy = [zero; 4];
            for i in 0..4 {
                let x = v[i];
                let slot = _mm256_and_si256(x, slot_mask);
                let e = _mm256_i32gather_epi32::<4>(tab, slot);
                let s = _mm256_and_si256(_mm256_i32gather_epi32::<1>(lut, slot), byte_mask);
                let f = _mm256_and_si256(e, low16);
                let b = _mm256_srli_epi32::<16>(e);
                let y = _mm256_add_epi32(
                    _mm256_mullo_epi32(f, _mm256_srli_epi32::<{ SCALE_BITS as i32 }>(x)),
                    b,
                );
                // y < L = 2^16 exactly where the high half is zero.
                const _: () = assert!(L == 1 << 16);
                let need = _mm256_cmpeq_epi32(_mm256_srli_epi32::<16>(y), zero);
                let m = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize;
                debug_assert!(k + 8 <= words.len());
                let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(wp.add(k) as *const __m128i));
                let idx = _mm256_loadu_si256(EXPAND[m].as_ptr() as *const __m256i);
                let w = _mm256_permutevar8x32_epi32(w, idx);
                let r = _mm256_or_si256(_mm256_slli_epi32::<16>(y), w);
                v[i] = _mm256_blendv_epi8(y, r, need);
                k += m.count_ones() as usize;
                sy[i] = s;
            }
            // Symbols are bytes: pack 4 x 8 lanes to 32 bytes, then undo the per-128-bit-lane
            // interleaving of the packs.
            let a = _mm256_packus_epi32(sy[0], sy[1]);
            let b = _mm256_packus_epi32(sy[2], sy[3]);
            let p = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, b), order);
            _mm256_storeu_si256(g.as_mut_ptr() as *mut __m256i, p);
        }
        store_states(xs, v);
        k
    }
}

/// Decode exactly `out.len()` symbols from `src` (as written by [`encode`]).
/// Every read is bounds-checked and the final states must be the initial ones, so a corrupt or
/// hostile stream gives an error, never a panic.
pub fn decode(src: &[u8], out: &mut [u8]) -> Result<()> {
    decode_impl(src, out, true)
}

fn decode_impl(src: &[u8], out: &mut [u8], simd: bool) -> Result<()> {
    let bad = |what: &str| Error::CorruptFrame(format!("rANS plane: {what}"));
    if src.len() < 32 {
        return Err(bad("table truncated"));
    }
    let bitmap = &src[..32];
    let mut freq = [0u32; 256];
    let mut pos = 32;
    for s in 0..256 {
        if bitmap[s / 8] & (1 << (s % 8)) != 0 {
            let b = src
                .get(pos..pos + 2)
                .ok_or_else(|| bad("table truncated"))?;
            freq[s] = u16::from_le_bytes([b[0], b[1]]) as u32;
            if freq[s] == 0 {
                return Err(bad("zero frequency for a present symbol"));
            }
            pos += 2;
        }
    }
    let total = freq.iter().map(|&f| f as u64).sum::<u64>();
    // No symbol present only for an empty plane.
    if total != M as u64 && !(total == 0 && out.is_empty()) {
        return Err(bad("frequencies do not sum to 2^14"));
    }
    let cum = cumulative(&freq);
    let stream = &src[pos..];
    if stream.len() < 4 * WAYS || !stream.len().is_multiple_of(2) {
        return Err(bad("stream is not the states and a whole number of words"));
    }
    let (states, body) = stream.split_at(4 * WAYS);
    let nwords = body.len() / 2;
    let mut x = [0u32; WAYS];
    for (xj, b) in x.iter_mut().zip(states.chunks_exact(4)) {
        *xj = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if *xj < L {
            return Err(bad("initial state out of range"));
        }
    }
    let mut k = 0;
    if let Some(s) = freq.iter().position(|&f| f == M) {
        // One symbol: the states never move and no word is read.
        out.fill(s as u8);
    } else if !out.is_empty() {
        // freq < 2^14 and cum < 2^14: both fit 16 bits.
        let mut tab = [0u32; 256];
        for s in 0..256 {
            tab[s] = freq[s] | (cum[s] << 16);
        }
        DEC_SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let (lut, words, slots) = &mut *scratch;
            lut.clear();
            lut.resize(M as usize + 3, 0);
            for s in 0..256 {
                lut[cum[s] as usize..cum[s + 1] as usize].fill(s as u8);
            }
            #[cfg(target_arch = "x86_64")]
            let use_simd = simd && x86::available();
            #[cfg(not(target_arch = "x86_64"))]
            let use_simd = {
                let _ = simd;
                false
            };
            slots.clear();
            if use_simd {
                slots.resize(M as usize, 0);
                for s in 0..256 {
                    let (c, f) = (cum[s] as usize, freq[s]);
                    for (b, e) in slots[c..c + f as usize].iter_mut().enumerate() {
                        *e = f | (b as u32) << 16;
                    }
                }
            }
            let t = DecTables {
                lut: std::mem::take(lut),
                tab,
                slots: std::mem::take(slots),
            };
            // The words, then zeros: reads past the stream (only on a corrupt one) see zeros and
            // the final check fails.
            words.clear();
            words.extend(
                body.chunks_exact(2)
                    .map(|w| u16::from_le_bytes([w[0], w[1]])),
            );
            words.resize(nwords + PAD_WORDS, 0);
            let whole = out.len() / WAYS * WAYS;
            let (head, tail) = out.split_at_mut(whole);
            k = if use_simd {
                #[cfg(target_arch = "x86_64")]
                {
                    x86::decode_groups_avx2(&t, words, nwords, &mut x, k, head)
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!()
            } else {
                decode_groups_scalar(&t, words, nwords, &mut x, k, head)
            };
            if k <= nwords {
                for (j, b) in tail.iter_mut().enumerate() {
                    *b = step(&t, &mut x[j], words, &mut k);
                }
            }
            *lut = t.lut;
            *slots = t.slots;
        });
    }
    if k != nwords || x.iter().any(|&xj| xj != L) {
        return Err(bad("stream does not end where the data does"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round trip through every encoder and decoder path; they must agree byte for byte.
    fn round_trip(data: &[u8]) -> usize {
        let mut enc = Vec::new();
        encode(data, &mut enc);
        let mut portable = Vec::new();
        encode_impl(data, &histogram(data), &mut portable, false);
        assert!(enc == portable, "SIMD and portable encoders differ");
        for simd in [true, false] {
            let mut out = vec![0u8; data.len()];
            decode_impl(&enc, &mut out, simd).unwrap();
            assert_eq!(out, data);
        }
        enc.len()
    }

    fn lcg(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        }
    }

    #[test]
    fn all_short_lengths() {
        let mut rnd = lcg(7);
        for n in 0..100 {
            let uniform: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
            round_trip(&uniform);
            let skewed: Vec<u8> = (0..n)
                .map(|_| (rnd() as u32).trailing_zeros() as u8)
                .collect();
            round_trip(&skewed);
            round_trip(&vec![200u8; n]);
        }
    }

    #[test]
    fn empty_plane() {
        let mut enc = Vec::new();
        encode(&[], &mut enc);
        assert_eq!(enc.len(), 32 + 4 * WAYS);
        assert!(decode(&enc, &mut []).is_ok());
        assert!(decode(&enc, &mut [0u8; 1]).is_err());
    }

    #[test]
    fn single_symbol_writes_no_words() {
        for n in [1, 31, 32, 33, 1000, 100_000] {
            let size = round_trip(&vec![42u8; n]);
            assert_eq!(size, 32 + 2 + 4 * WAYS);
        }
    }

    #[test]
    fn extreme_skew_and_rare_symbols() {
        // One symbol almost always, a few with frequency 1 (their reciprocal is special).
        let mut rnd = lcg(3);
        for n in [1000, 4097, 100_003] {
            let data: Vec<u8> = (0..n)
                .map(|_| {
                    let r = rnd() % 100_000;
                    if r < 3 {
                        r as u8 + 1
                    } else {
                        0
                    }
                })
                .collect();
            round_trip(&data);
        }
        // All 256 symbols, most of them at the minimum frequency.
        let mut data: Vec<u8> = (0..=255).collect();
        data.extend(std::iter::repeat_n(9u8, 300_000));
        let mut rnd = lcg(4);
        for _ in 0..50_000 {
            let i = rnd() as usize % data.len();
            data[i] = rnd() as u8;
        }
        round_trip(&data);
    }

    #[test]
    fn long_random_planes_match_across_paths() {
        let mut rnd = lcg(11);
        for alphabet in [2u64, 3, 17, 256] {
            let data: Vec<u8> = (0..200_001).map(|_| (rnd() % alphabet) as u8).collect();
            round_trip(&data);
        }
    }

    #[test]
    fn hostile_streams_never_panic() {
        let mut rnd = lcg(21);
        let data: Vec<u8> = (0..5000).map(|_| (rnd() % 23) as u8).collect();
        let mut enc = Vec::new();
        encode(&data, &mut enc);
        let table = 32 + 2 * 23;
        for trial in 0..2000 {
            let mut bad = enc.clone();
            match trial % 4 {
                // Flip a byte in the states or the words.
                0 | 1 => {
                    let i = table + rnd() as usize % (bad.len() - table);
                    bad[i] ^= 1 + (rnd() % 255) as u8;
                }
                // Random words after a valid table.
                2 => {
                    for b in &mut bad[table..] {
                        *b = rnd() as u8;
                    }
                }
                // Truncate or extend by whole words.
                _ => {
                    let cut = 2 * (1 + rnd() as usize % 50);
                    if trial % 8 == 3 {
                        bad.truncate(bad.len() - cut);
                    } else {
                        bad.extend(std::iter::repeat_n(0xffu8, cut));
                    }
                }
            }
            for simd in [true, false] {
                let mut out = vec![0u8; data.len()];
                // Corrupt input may decode to something (only if the final check passes by
                // chance) but must never panic, and both paths must agree.
                let r = decode_impl(&bad, &mut out, simd).is_ok();
                let mut out2 = vec![0u8; data.len()];
                assert_eq!(r, decode_impl(&bad, &mut out2, !simd).is_ok());
                if trial % 4 == 3 {
                    assert!(!r, "length change accepted");
                }
            }
        }
        // Wholly random input, all lengths.
        for len in 0..600 {
            let junk: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            let mut out = vec![0u8; 777];
            let _ = decode(&junk, &mut out);
        }
    }

    #[test]
    fn single_symbol_and_tails() {
        for n in 1..40 {
            round_trip(&vec![7u8; n]);
            round_trip(&(0..n as u8).collect::<Vec<_>>());
        }
    }

    #[test]
    fn reciprocal_matches_division() {
        let mut state = 99u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state
        };
        for freq in 1..M {
            let start = (M - freq) / 2;
            let s = EncSym::new(start, freq);
            // After renormalisation the encoder's state is below x_max (and above 0).
            let lo = 1;
            let hi = s.x_max - 1;
            let mut xs = vec![
                lo,
                lo + 1,
                hi,
                hi - 1,
                hi / freq * freq,
                hi / freq * freq - 1,
            ];
            for _ in 0..64 {
                xs.push(lo + (rnd() % (hi - lo + 1) as u64) as u32);
            }
            for x in xs {
                assert_eq!(s.quotient(x), x / freq, "freq {freq} x {x}");
                let slow = (x / freq) as u64 * M as u64 + (x % freq + start) as u64;
                assert_eq!(s.apply(x) as u64, slow, "freq {freq} x {x}");
            }
        }
    }

    #[test]
    fn log2_is_exact() {
        assert_eq!(log2_fixed(1), 0);
        assert_eq!(log2_fixed(2), 1 << 16);
        assert_eq!(log2_fixed(M), 14 << 16);
        // log2(3) = 1.5849625...; * 65536 = 103872.9...
        assert_eq!(log2_fixed(3), 103872);
    }

    #[test]
    fn estimate_is_close() {
        let mut state = 5u64;
        let data: Vec<u8> = (0..300_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((state >> 33) as u32).trailing_zeros() * 7 % 256) as u8
            })
            .collect();
        let est = estimate_len(&histogram(&data));
        let got = round_trip(&data);
        assert!(
            est.abs_diff(got) <= WAYS / 2,
            "estimate {est}, actual {got}"
        );
    }

    #[test]
    fn skewed_distribution_compresses_near_entropy() {
        // Geometric-like distribution: p(k) ~ 2^-(k+1).
        let mut state = 12345u64;
        let data: Vec<u8> = (0..200_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as u32).trailing_zeros().min(20) as u8
            })
            .collect();
        let size = round_trip(&data);
        // Entropy is 2 bits/symbol: 50_000 bytes.
        assert!(size < 51_000, "size {size}");
    }

    #[test]
    fn corrupt_streams_error() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 7) as u8).collect();
        let mut enc = Vec::new();
        encode(&data, &mut enc);
        let mut out = vec![0u8; data.len()];
        assert!(decode(&enc[..enc.len() - 4], &mut out).is_err());
        assert!(decode(&enc[..10], &mut out).is_err());
        let mut longer = vec![0u8; data.len() + 1];
        assert!(decode(&enc, &mut longer).is_err());
    }
}
