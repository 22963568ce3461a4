//! Lossless low-rank delta (codec 33): a chunk coded as `base + U @ V` (the factors live in their
//! own chunk, shared by the tensor's chunks) plus an exact integer residual.
//!
//! The tensor is viewed as a matrix: rows = shape[0], cols = the product of the other dims.
//! A *factors chunk*'s raw bytes:
//! ```text
//! offset  size          field
//! 0       4             magic "TSLR"
//! 4       4             version (1), u32 LE
//! 8       4             rows, u32 LE
//! 12      4             cols, u32 LE
//! 16      4             rank r, u32 LE
//! 20      4*rows*r      U, f32 LE, row-major (rows x r)
//! ..      4*r*cols      V, f32 LE, row-major (r x cols)
//! ```
//! The reconstruction of element `e = i * cols + j` is the same bits on every machine:
//! `p = 0.0f64; for k in 0..r { p += (U[i,k] as f64) * (V[k,j] as f64) }` (no fused multiply-add),
//! then F32: `base + (p as f32)` in f32; F16/BF16: `(base as f32) + (p as f32)` in f32, rounded
//! to the dtype to nearest-even; F64: `base + p`. A NaN result is the positive quiet NaN.
//!
//! The frame is a payload frame (see [`crate::frame`]) with two bases, the base chunk and the
//! factors chunk, and sections: 0 = the chunk's first element's index in the matrix (u64 LE);
//! 1..=K = the byte planes (as format 2 splits the dtype) of `zigzag(bits(new) - bits(recon))`
//! stored rotated right by one bit, exactly as [`crate::delta`]'s float differences are.
//!
//! The factors come from the user (a LoRA adapter) or from a randomized SVD of `new - base`,
//! computed in plain f64 loops in a fixed order (no BLAS): the same factors whatever the number
//! of threads. The rank is chosen by the total encoded size (factors + residual frames).

use crate::delta;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::frame::{self, BaseCodec, ChunkId};
use crate::tensordelta::{Factors, TensorDelta, TensorJob};
use rayon::prelude::*;
use std::cell::RefCell;

/// Codec byte of the low-rank delta.
pub const CODEC_LOWRANK: u8 = 33;
pub const FACTORS_MAGIC: [u8; 4] = *b"TSLR";
pub const FACTORS_VERSION: u32 = 1;
const FACTORS_HEADER: usize = 20;
/// Largest factors chunk written or read: the read path takes no larger base beside a chunk's
/// own, so a hostile frame cannot make it allocate more (factors are smaller than their tensor).
pub const MAX_FACTORS_BYTES: u64 = 256 << 20;

/// Matrices smaller than this (elements) are not worth factors.
const MIN_ELEMS: usize = 4096;
/// The SVD materialises the delta in f64: larger tensors are left to the bit-level deltas.
const MAX_SVD_ELEMS: usize = 8 << 20;
/// Most ranks the automatic search considers, and its oversampling.
const MAX_RANK: usize = 32;
const OVERSAMPLE: usize = 8;
/// The quick test: a sketch of this many columns on at most this many rows must capture at
/// least this share of the delta's energy for a full SVD to be worth it.
const TEST_RANK: usize = 8;
const TEST_ROWS: usize = 256;
const TEST_ENERGY: f64 = 0.5;
/// Time the automatic rank search may spend trying ranks after the first.
const RANK_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);
/// Seed of the test matrices (fixed: the same factors on every run).
const SEED: u64 = 0x7e7a_5eed_0f5a_1d00;

/// The low-rank codec.
pub struct LowRank;

fn bad(what: String) -> Error {
    Error::CorruptFrame(format!("low-rank delta: {what}"))
}

/// The matrix view of a tensor (rows = shape[0], cols = the rest), if it is a float matrix
/// large enough for factors.
pub fn matrix_view(dtype: DType, shape: &[u64], len: usize) -> Option<(usize, usize)> {
    if !dtype.rotates() || shape.len() < 2 {
        return None;
    }
    let rows = usize::try_from(shape[0]).ok()?;
    let cols = shape[1..]
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(usize::try_from(d).ok()?))?;
    let n = rows.checked_mul(cols)?;
    let wide = rows.max(cols) > u32::MAX as usize;
    if wide || rows < 2 || cols < 2 || n < MIN_ELEMS || n.checked_mul(dtype.size())? != len {
        return None;
    }
    Some((rows, cols))
}

/// Whether a changed tensor is looked at whole for factors (a float matrix the automatic search
/// takes on); any other is coded chunk by chunk.
pub fn whole_tensor(dtype: DType, shape: &[u64], len: usize) -> bool {
    matrix_view(dtype, shape, len).is_some_and(|(r, c)| r * c <= MAX_SVD_ELEMS)
}

/// The raw bytes of a factors chunk.
pub fn factors_bytes(f: &Factors) -> Vec<u8> {
    let mut out = Vec::with_capacity(FACTORS_HEADER + 4 * (f.u.len() + f.v.len()));
    out.extend_from_slice(&FACTORS_MAGIC);
    out.extend_from_slice(&FACTORS_VERSION.to_le_bytes());
    for x in [f.rows, f.cols, f.rank] {
        out.extend_from_slice(&(x as u32).to_le_bytes());
    }
    for x in f.u.iter().chain(&f.v) {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// A factors chunk's header, checked against its length.
#[derive(Debug, Clone, Copy)]
pub struct FactorsView<'a> {
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
    /// U's bytes (rows x rank f32 LE) and V's (rank x cols).
    pub u: &'a [u8],
    pub v: &'a [u8],
}

/// Parse a factors chunk's raw bytes (every length checked: errors, never panics).
pub fn parse_factors(raw: &[u8]) -> Result<FactorsView<'_>> {
    let e = |what: &str| bad(format!("factors chunk: {what}"));
    if raw.len() < FACTORS_HEADER || raw[..4] != FACTORS_MAGIC {
        return Err(e("bad magic or truncated header"));
    }
    let word = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap());
    if word(4) != FACTORS_VERSION {
        return Err(e(&format!("version {} is not supported", word(4))));
    }
    let (rows, cols, rank) = (word(8) as usize, word(12) as usize, word(16) as usize);
    let nu = rows
        .checked_mul(rank)
        .ok_or_else(|| e("U's size overflows"))?;
    let nv = cols
        .checked_mul(rank)
        .ok_or_else(|| e("V's size overflows"))?;
    let want = nu
        .checked_add(nv)
        .and_then(|n| n.checked_mul(4))
        .and_then(|n| n.checked_add(FACTORS_HEADER))
        .ok_or_else(|| e("size overflows"))?;
    if raw.len() != want {
        return Err(e(&format!(
            "{} bytes, but {rows}x{cols} at rank {rank} needs {want}",
            raw.len()
        )));
    }
    let (u, v) = raw[FACTORS_HEADER..].split_at(4 * nu);
    Ok(FactorsView {
        rows,
        cols,
        rank,
        u,
        v,
    })
}

impl FactorsView<'_> {
    /// The factors as owned f32 matrices.
    pub fn to_factors(&self) -> Factors {
        Factors {
            rows: self.rows,
            cols: self.cols,
            rank: self.rank,
            u: f32s(self.u),
            v: f32s(self.v),
        }
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

// ---- element conversions (exact, integer-only rounding) ----

/// f16 bits to f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else if exp == 0 {
        if man == 0 {
            sign
        } else {
            // Subnormal: value = man * 2^-24, exact in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            sign | v.to_bits()
        }
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// f32 to f16 bits, rounded to nearest-even; NaN becomes the positive quiet NaN 0x7e00.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return if man != 0 { 0x7e00 } else { sign | 0x7c00 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    let round = |full: u32, shift: u32| -> u32 {
        if shift >= 32 {
            return 0;
        }
        let q = full >> shift;
        let rem = full & ((1u32 << shift) - 1);
        let half = 1u32 << (shift - 1);
        if rem > half || (rem == half && q & 1 == 1) {
            q + 1
        } else {
            q
        }
    };
    if e <= 0 {
        // Subnormal (or zero) in f16: units of 2^-24; exp 0 in f32 is far below (rounds to 0).
        if exp == 0 {
            return sign;
        }
        let full = man | 0x80_0000;
        let shift = (126 - exp) as u32; // >= 14
        return sign | round(full, shift) as u16;
    }
    // A carry out of the mantissa moves into the exponent (up to infinity), as it should.
    let m = round(man, 13);
    sign | (((e as u32) << 10) + m) as u16
}

/// f32 to bf16 bits, rounded to nearest-even; NaN becomes the positive quiet NaN 0x7fc0.
pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The value of element `k` of `bytes` as f64 (for the SVD; non-finite values count as 0).
fn value(dtype: DType, bytes: &[u8], k: usize) -> f64 {
    let v = match dtype {
        DType::F32 => f32::from_le_bytes(bytes[4 * k..4 * k + 4].try_into().unwrap()) as f64,
        DType::F64 => f64::from_le_bytes(bytes[8 * k..8 * k + 8].try_into().unwrap()),
        DType::F16 => f16_to_f32(u16::from_le_bytes([bytes[2 * k], bytes[2 * k + 1]])) as f64,
        DType::BF16 => {
            f32::from_bits((u16::from_le_bytes([bytes[2 * k], bytes[2 * k + 1]]) as u32) << 16)
                as f64
        }
        _ => 0.0,
    };
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

// ---- the reconstruction ----

/// Write `recon = base + U @ V` (see the module doc) for the `base.len() / size` elements of
/// `dtype` starting at element `first` of the matrix into `out` (as long as `base`).
pub fn reconstruct(
    base: &[u8],
    dtype: DType,
    first: u64,
    f: &FactorsView,
    out: &mut [u8],
) -> Result<()> {
    let size = dtype.size();
    if !dtype.rotates() || base.len() != out.len() || !base.len().is_multiple_of(size) {
        return Err(bad(format!(
            "{} bytes of {} are not a float chunk",
            base.len(),
            dtype.name()
        )));
    }
    let n = (base.len() / size) as u64;
    let total = (f.rows as u64) * (f.cols as u64);
    if first.checked_add(n).is_none_or(|end| end > total) {
        return Err(bad(format!(
            "elements {first}+{n} are past the {}x{} matrix",
            f.rows, f.cols
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let (cols, r) = (f.cols, f.rank);
    let first = first as usize;
    let n = n as usize;
    let (i0, i1) = (first / cols, (first + n - 1) / cols);
    let u = f64s(&f.u[4 * i0 * r..4 * (i1 + 1) * r]);
    let v = f64s(f.v);
    let k = Kernel {
        dtype,
        first,
        n,
        i0,
        u: &u,
        v: &v,
        cols,
        r,
    };
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        #[allow(unsafe_code)]
        // SAFETY: AVX2 is present (checked above); wider vectors of the same IEEE operations in
        // the same order give the same bits, and they double the kernel's speed.
        unsafe {
            rows_avx2(&k, base, out)
        };
        return Ok(());
    }
    rows(&k, base, out);
    Ok(())
}

/// What [`rows`] needs beside the chunk's bytes.
struct Kernel<'a> {
    dtype: DType,
    first: usize,
    n: usize,
    i0: usize,
    u: &'a [f64],
    v: &'a [f64],
    cols: usize,
    r: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn rows_avx2(k: &Kernel, base: &[u8], out: &mut [u8]) {
    rows(k, base, out)
}

/// [`rows`] compiled for the baseline CPU (what CPUs without AVX2 run).
#[cfg(test)]
fn rows_portable(k: &Kernel, base: &[u8], out: &mut [u8]) {
    rows(k, base, out)
}

/// The reconstruction of the chunk, a row segment at a time.
#[inline(always)]
fn rows(k: &Kernel, base: &[u8], out: &mut [u8]) {
    let Kernel {
        dtype,
        first,
        n,
        i0,
        u,
        v,
        cols,
        r,
    } = *k;
    let size = dtype.size();
    let mut p = [0f64; JB];
    let mut e = first;
    while e < first + n {
        let (i, j0) = (e / cols, e % cols);
        let len = (cols - j0).min(first + n - e);
        let ui = &u[(i - i0) * r..(i - i0 + 1) * r];
        let at = (e - first) * size;
        let (b, o) = (&base[at..at + len * size], &mut out[at..at + len * size]);
        for (t, (bs, os)) in b.chunks(JB * size).zip(o.chunks_mut(JB * size)).enumerate() {
            let j = j0 + t * JB;
            let w = bs.len() / size;
            if w == JB {
                row_block(ui, v, cols, j, &mut p);
            } else {
                let p = &mut p[..w];
                p.fill(0.0);
                for (k, &uk) in ui.iter().enumerate() {
                    for (a, &x) in p.iter_mut().zip(&v[k * cols + j..k * cols + j + w]) {
                        *a += uk * x;
                    }
                }
            }
            combine(dtype, bs, &p[..w], os);
        }
        e += len;
    }
}

/// Columns of a row whose sums are held in registers across the rank loop.
const JB: usize = 32;

/// `p[t] = sum over k in order of u[k] * v[k, j + t]`, from +0.0, for a whole block of columns.
#[inline(always)]
fn row_block(u: &[f64], v: &[f64], cols: usize, j: usize, p: &mut [f64; JB]) {
    let mut acc = [0f64; JB];
    for (k, &uk) in u.iter().enumerate() {
        let vk: &[f64; JB] = v[k * cols + j..k * cols + j + JB].try_into().unwrap();
        for t in 0..JB {
            acc[t] += uk * vk[t];
        }
    }
    *p = acc;
}

fn f64s(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect()
}

/// `out = base + p` element by element, in the dtype's arithmetic (see the module doc).
#[inline(always)]
fn combine(dtype: DType, base: &[u8], p: &[f64], out: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for ((o, b), &p) in out.chunks_exact_mut(4).zip(base.chunks_exact(4)).zip(p) {
                let s = f32::from_le_bytes(b.try_into().unwrap()) + p as f32;
                let bits = if s.is_nan() { 0x7fc0_0000 } else { s.to_bits() };
                o.copy_from_slice(&bits.to_le_bytes());
            }
        }
        DType::F64 => {
            for ((o, b), &p) in out.chunks_exact_mut(8).zip(base.chunks_exact(8)).zip(p) {
                let s = f64::from_le_bytes(b.try_into().unwrap()) + p;
                let bits = if s.is_nan() {
                    0x7ff8_0000_0000_0000
                } else {
                    s.to_bits()
                };
                o.copy_from_slice(&bits.to_le_bytes());
            }
        }
        DType::F16 => {
            for ((o, b), &p) in out.chunks_exact_mut(2).zip(base.chunks_exact(2)).zip(p) {
                let s = f16_to_f32(u16::from_le_bytes([b[0], b[1]])) + p as f32;
                o.copy_from_slice(&f32_to_f16(s).to_le_bytes());
            }
        }
        DType::BF16 => {
            for ((o, b), &p) in out.chunks_exact_mut(2).zip(base.chunks_exact(2)).zip(p) {
                let s = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) + p as f32;
                o.copy_from_slice(&f32_to_bf16(s).to_le_bytes());
            }
        }
        _ => unreachable!("checked by the caller: a float dtype"),
    }
}

// ---- frames ----

thread_local! {
    static RECON: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static RESID: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encode chunk `new` (id `id`, its first element at `first` in the matrix) against `base`
/// (id `base_id`) and the factors chunk `factors` (id `factors_id`) into `out`; returns the
/// frame's length.
#[allow(clippy::too_many_arguments)]
pub fn encode_lowrank_into(
    new: &[u8],
    base: &[u8],
    base_id: &ChunkId,
    dtype: DType,
    id: &ChunkId,
    first: u64,
    factors: &[u8],
    factors_id: &ChunkId,
    out: &mut Vec<u8>,
) -> Result<usize> {
    let f = parse_factors(factors).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    if new.len() != base.len() {
        return Err(Error::InvalidArgument(format!(
            "a low-rank delta needs a base of the chunk's length: {} bytes against {}",
            new.len(),
            base.len()
        )));
    }
    RECON.with(|rc| {
        RESID.with(|rs| {
            let (mut recon, mut resid) = (rc.borrow_mut(), rs.borrow_mut());
            recon.resize(new.len(), 0);
            resid.resize(2 * new.len(), 0);
            reconstruct(base, dtype, first, &f, &mut recon[..new.len()])
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            let (res, planes) = resid.split_at_mut(new.len());
            delta::zigzag_residual(dtype, new, &recon[..new.len()], res);
            frame::split_into_planes(res, dtype, planes);
            let p = frame::plane_count(dtype, new.len());
            let params = first.to_le_bytes();
            let mut secs: Vec<&[u8]> = vec![&params];
            let m = new.len() / p;
            for j in 0..p {
                secs.push(&planes[j * m..(j + 1) * m]);
            }
            frame::encode_payload_frame_into(
                &secs,
                new.len() as u64,
                dtype,
                id,
                CODEC_LOWRANK,
                &[*base_id, *factors_id],
                out,
            )
        })
    })
}

impl BaseCodec for LowRank {
    fn code(&self) -> u8 {
        CODEC_LOWRANK
    }
    fn base_count(&self) -> usize {
        2
    }

    fn decode_payload(
        &self,
        sections: &[&[u8]],
        dtype: DType,
        bases: &[&[u8]],
        out: &mut [u8],
    ) -> Result<()> {
        let [base, factors] = bases else {
            return Err(bad(format!("two bases, not {}", bases.len())));
        };
        if base.len() != out.len() {
            return Err(bad(format!(
                "a chunk of {} bytes against a base of {}",
                out.len(),
                base.len()
            )));
        }
        if !dtype.rotates() || !out.len().is_multiple_of(dtype.size()) {
            return Err(bad(format!(
                "{} bytes of {} are not a float chunk",
                out.len(),
                dtype.name()
            )));
        }
        let p = frame::plane_count(dtype, out.len());
        if sections.len() != 1 + p || sections[0].len() != 8 {
            return Err(bad(format!(
                "{} sections (the first of {} bytes), expected {} (the first of 8)",
                sections.len(),
                sections.first().map_or(0, |s| s.len()),
                1 + p
            )));
        }
        let first = u64::from_le_bytes(sections[0].try_into().unwrap());
        let f = parse_factors(factors)?;
        frame::merge_from_planes(&sections[1..], dtype, out)?;
        let mut recon = RECON.with(|rc| std::mem::take(&mut *rc.borrow_mut()));
        recon.resize(out.len(), 0);
        let r = reconstruct(base, dtype, first, &f, &mut recon[..out.len()])
            .and_then(|()| delta::diff_codec(dtype, out.len()).decode(&[&recon[..out.len()]], out));
        RECON.with(|rc| *rc.borrow_mut() = recon);
        r
    }
}

// ---- the randomized SVD (plain f64, fixed order) ----

/// splitmix64.
fn next(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A `n x l` test matrix of near-Gaussian entries (sum of four uniforms: exact arithmetic, the
/// same on every machine).
fn test_matrix(n: usize, l: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n * l)
        .map(|_| {
            (0..4)
                .map(|_| (next(&mut s) >> 11) as f64 / (1u64 << 53) as f64)
                .sum::<f64>()
                - 2.0
        })
        .collect()
}

/// `y = d @ x` (`d` rows x cols, `x` cols x l, both row-major); each output summed over j in order.
fn mul(d: &[f64], rows: usize, cols: usize, x: &[f64], l: usize) -> Vec<f64> {
    let mut y = vec![0f64; rows * l];
    y.par_chunks_mut(l).enumerate().for_each(|(i, yr)| {
        let dr = &d[i * cols..(i + 1) * cols];
        for (j, &dij) in dr.iter().enumerate() {
            let xr = &x[j * l..(j + 1) * l];
            for (a, &b) in yr.iter_mut().zip(xr) {
                *a += dij * b;
            }
        }
    });
    y
}

/// `z = d^T @ y` (`y` rows x l): cols x l; each output summed over i in order.
fn mul_t(d: &[f64], rows: usize, cols: usize, y: &[f64], l: usize) -> Vec<f64> {
    const BLOCK: usize = 32;
    let mut z = vec![0f64; cols * l];
    z.par_chunks_mut(BLOCK * l).enumerate().for_each(|(b, zb)| {
        let j0 = b * BLOCK;
        let nj = zb.len() / l;
        for i in 0..rows {
            let yr = &y[i * l..(i + 1) * l];
            let dr = &d[i * cols + j0..i * cols + j0 + nj];
            for (jj, &dij) in dr.iter().enumerate() {
                for (a, &b) in zb[jj * l..(jj + 1) * l].iter_mut().zip(yr) {
                    *a += dij * b;
                }
            }
        }
    });
    z
}

/// Orthonormal columns spanning `y`'s (n x l, row-major), by modified Gram-Schmidt done twice;
/// a column with nothing left becomes zero.
fn orthonormalize(y: &[f64], n: usize, l: usize) -> Vec<f64> {
    let mut c: Vec<Vec<f64>> = (0..l)
        .map(|t| (0..n).map(|i| y[i * l + t]).collect())
        .collect();
    for t in 0..l {
        let norm0 = c[t].iter().map(|x| x * x).sum::<f64>().sqrt();
        for _ in 0..2 {
            for s in 0..t {
                let (done, rest) = c.split_at_mut(t);
                let q = &done[s];
                let r: f64 = q.iter().zip(&rest[0]).map(|(a, b)| a * b).sum();
                for (x, a) in rest[0].iter_mut().zip(q) {
                    *x -= r * a;
                }
            }
        }
        let norm = c[t].iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-10 * norm0 && norm > 0.0 {
            for x in c[t].iter_mut() {
                *x /= norm;
            }
        } else {
            c[t].fill(0.0);
        }
    }
    let mut q = vec![0f64; n * l];
    for (t, col) in c.iter().enumerate() {
        for (i, &x) in col.iter().enumerate() {
            q[i * l + t] = x;
        }
    }
    q
}

/// Eigen-decomposition of a symmetric `l x l` matrix by cyclic Jacobi: eigenvalues descending
/// and the eigenvectors as the columns of the returned row-major matrix.
fn jacobi(mut a: Vec<f64>, l: usize) -> (Vec<f64>, Vec<f64>) {
    let mut w = vec![0f64; l * l];
    for i in 0..l {
        w[i * l + i] = 1.0;
    }
    for _sweep in 0..60 {
        let off: f64 = (0..l)
            .flat_map(|i| (0..l).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * l + j] * a[i * l + j])
            .sum();
        let diag: f64 = (0..l).map(|i| a[i * l + i] * a[i * l + i]).sum();
        if off <= 1e-30 * diag || off == 0.0 {
            break;
        }
        for p in 0..l {
            for q in p + 1..l {
                let apq = a[p * l + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * l + q] - a[p * l + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..l {
                    let (akp, akq) = (a[k * l + p], a[k * l + q]);
                    a[k * l + p] = c * akp - s * akq;
                    a[k * l + q] = s * akp + c * akq;
                }
                for k in 0..l {
                    let (apk, aqk) = (a[p * l + k], a[q * l + k]);
                    a[p * l + k] = c * apk - s * aqk;
                    a[q * l + k] = s * apk + c * aqk;
                }
                for k in 0..l {
                    let (wkp, wkq) = (w[k * l + p], w[k * l + q]);
                    w[k * l + p] = c * wkp - s * wkq;
                    w[k * l + q] = s * wkp + c * wkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..l).collect();
    order.sort_by(|&x, &y| a[y * l + y].total_cmp(&a[x * l + x]).then(x.cmp(&y)));
    let vals = order.iter().map(|&k| a[k * l + k].max(0.0)).collect();
    let mut vecs = vec![0f64; l * l];
    for (c, &k) in order.iter().enumerate() {
        for i in 0..l {
            vecs[i * l + c] = w[i * l + k];
        }
    }
    (vals, vecs)
}

/// `new - base` as a row-major f64 matrix (non-finite values as 0).
fn delta_matrix(new: &[u8], base: &[u8], dtype: DType, rows: usize, cols: usize) -> Vec<f64> {
    let mut d = vec![0f64; rows * cols];
    d.par_chunks_mut(cols).enumerate().for_each(|(i, dr)| {
        for (j, x) in dr.iter_mut().enumerate() {
            let k = i * cols + j;
            let v = value(dtype, new, k) - value(dtype, base, k);
            *x = if v.is_finite() { v } else { 0.0 };
        }
    });
    d
}

/// A truncated SVD of `d`: the sketch's orthonormal basis `q` (rows x l), `z = d^T q` (cols x l),
/// and the singular values (descending) with the right rotation `w` (l x l) of the sketch.
struct Sketch {
    l: usize,
    q: Vec<f64>,
    sigma: Vec<f64>,
    w: Vec<f64>,
}

fn sketch(d: &[f64], rows: usize, cols: usize, l: usize, power: usize) -> Sketch {
    let omega = test_matrix(cols, l, SEED);
    let mut q = orthonormalize(&mul(d, rows, cols, &omega, l), rows, l);
    for _ in 0..power {
        let z = orthonormalize(&mul_t(d, rows, cols, &q, l), cols, l);
        q = orthonormalize(&mul(d, rows, cols, &z, l), rows, l);
    }
    let z = mul_t(d, rows, cols, &q, l);
    // B B^T with B = z^T: (l x l), summed over columns in order.
    let mut m = vec![0f64; l * l];
    for a in 0..l {
        for b in a..l {
            let s: f64 = (0..cols).map(|j| z[j * l + a] * z[j * l + b]).sum();
            m[a * l + b] = s;
            m[b * l + a] = s;
        }
    }
    let (vals, w) = jacobi(m, l);
    Sketch {
        l,
        q,
        sigma: vals.iter().map(|v| v.sqrt()).collect(),
        w,
    }
}

/// The rank-`r` factors of a sketch: U = Q W_r (rounded to f32), V = U^T D (from the rounded U).
fn factors_of(s: &Sketch, d: &[f64], rows: usize, cols: usize, r: usize) -> Factors {
    let l = s.l;
    let mut u = vec![0f32; rows * r];
    for i in 0..rows {
        for k in 0..r {
            let x: f64 = (0..l).map(|t| s.q[i * l + t] * s.w[t * l + k]).sum();
            u[i * r + k] = x as f32;
        }
    }
    let v = if r == 0 {
        Vec::new()
    } else {
        let u64s: Vec<f64> = u.iter().map(|&x| x as f64).collect();
        let z = mul_t(d, rows, cols, &u64s, r);
        let mut v = vec![0f32; r * cols];
        for j in 0..cols {
            for k in 0..r {
                v[k * cols + j] = z[j * r + k] as f32;
            }
        }
        v
    };
    Factors {
        rows,
        cols,
        rank: r,
        u,
        v,
    }
}

/// Whether a sketch of a few rows of the delta says it is dominated by a few directions.
fn looks_low_rank(new: &[u8], base: &[u8], dtype: DType, rows: usize, cols: usize) -> bool {
    let take = rows.min(TEST_ROWS);
    let mut d = vec![0f64; take * cols];
    for (t, dr) in d.chunks_mut(cols).enumerate() {
        let i = t * rows / take;
        for (j, x) in dr.iter_mut().enumerate() {
            let k = i * cols + j;
            *x = value(dtype, new, k) - value(dtype, base, k);
        }
    }
    let total: f64 = d.iter().map(|x| x * x).sum();
    if total == 0.0 || !total.is_finite() {
        return false;
    }
    let l = TEST_RANK.min(take).min(cols);
    let omega = test_matrix(cols, l, SEED ^ 1);
    let q = orthonormalize(&mul(&d, take, cols, &omega, l), take, l);
    let z = mul_t(&d, take, cols, &q, l);
    let captured: f64 = z.iter().map(|x| x * x).sum();
    captured >= TEST_ENERGY * total
}

/// Ranks worth trying from a spectrum: where it falls most (the noise floor), and around it.
fn candidate_ranks(sigma: &[f64], max: usize) -> Vec<usize> {
    let max = max.min(sigma.len());
    if max == 0 || sigma[0] == 0.0 {
        return Vec::new();
    }
    let mut best = (1usize, 0f64);
    for r in 1..=max {
        let next = sigma.get(r).copied().unwrap_or(0.0);
        let ratio = sigma[r - 1] / next.max(sigma[0] * 1e-12);
        if ratio > best.1 {
            best = (r, ratio);
        }
    }
    let r = best.0;
    let mut out = vec![r];
    for c in [r / 2, (r * 2).min(max)] {
        if c >= 1 && !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// The low-rank coding of a job's tensor, if it is smaller than `plain` (its chunks' frames
/// without factors): each chunk keeps the smaller of its frame and its low-rank frame.
pub(crate) fn encode_tensor_lowrank(
    job: &TensorJob,
    plain: &[Vec<u8>],
) -> Result<Option<TensorDelta>> {
    let Some((rows, cols)) = matrix_view(job.dtype, job.shape, job.new.len()) else {
        if let Some(f) = job.factors {
            return Err(Error::InvalidArgument(format!(
                "factors {}x{} given for a tensor of shape {:?} that is not a float matrix",
                f.rows, f.cols, job.shape
            )));
        }
        return Ok(None);
    };
    if job.chunks.is_empty() {
        return Ok(None);
    }
    let candidates: Vec<Factors> = match job.factors {
        Some(f) => {
            if f.rows != rows
                || f.cols != cols
                || f.u.len() != rows * f.rank
                || f.v.len() != f.rank * cols
            {
                return Err(Error::InvalidArgument(format!(
                    "factors {}x{} at rank {} do not fit the {rows}x{cols} matrix",
                    f.rows, f.cols, f.rank
                )));
            }
            vec![f.clone()]
        }
        None => {
            if rows * cols > MAX_SVD_ELEMS
                || !looks_low_rank(job.new, job.base, job.dtype, rows, cols)
            {
                return Ok(None);
            }
            let d = delta_matrix(job.new, job.base, job.dtype, rows, cols);
            let l = (MAX_RANK + OVERSAMPLE).min(rows).min(cols);
            let s = sketch(&d, rows, cols, l, 1);
            candidate_ranks(&s.sigma, l.saturating_sub(OVERSAMPLE).max(1))
                .into_iter()
                .map(|r| factors_of(&s, &d, rows, cols, r))
                .collect()
        }
    };
    let size = job.dtype.size() as u64;
    let plain_total: usize = plain.iter().map(|f| f.len()).sum();
    let mut best: Option<(usize, TensorDelta)> = None;
    let started = std::time::Instant::now();
    for f in candidates {
        // The ranks are tried best guess first: past the budget, what was found is kept.
        if best.is_some() && started.elapsed() > RANK_BUDGET {
            break;
        }
        let raw = factors_bytes(&f);
        if raw.len() as u64 > MAX_FACTORS_BYTES {
            continue; // the reader would refuse it: the bit-level deltas code the tensor instead
        }
        let fid = frame::chunk_id(&raw);
        let fframe = frame::encode_frame_with_id(&raw, DType::F32, &fid);
        let coded = job
            .chunks
            .par_iter()
            .zip(plain)
            .map(|(c, p)| -> Result<Vec<u8>> {
                let (a, b) = (c.offset as usize, (c.offset + c.len) as usize);
                if !c.offset.is_multiple_of(size) {
                    return Ok(p.clone());
                }
                let mut out = Vec::new();
                let len = encode_lowrank_into(
                    &job.new[a..b],
                    &job.base[a..b],
                    &c.base,
                    job.dtype,
                    &c.id,
                    c.offset / size,
                    &raw,
                    &fid,
                    &mut out,
                )?;
                out.truncate(len);
                Ok(if len < p.len() { out } else { p.clone() })
            })
            .collect::<Result<Vec<_>>>()?;
        let uses = coded
            .iter()
            .any(|f| frame::frame_info(f).is_ok_and(|i| i.codec == CODEC_LOWRANK));
        if !uses {
            continue;
        }
        let total = fframe.len() + coded.iter().map(|f| f.len()).sum::<usize>();
        if total < plain_total && best.as_ref().is_none_or(|b| total < b.0) {
            best = Some((
                total,
                TensorDelta {
                    frames: coded,
                    extra: vec![(fid, raw, fframe)],
                },
            ));
        }
    }
    Ok(best.map(|b| b.1))
}

// ---- lossy ----

/// How many factors a lossy low-rank version keeps.
#[derive(Debug, Clone, Copy)]
pub enum LossyTarget {
    Rank(usize),
    /// The smallest rank whose relative error (Frobenius, of the delta) is at most this.
    Rtol(f64),
}

/// A lossy low-rank version of a tensor.
pub struct Lossy {
    /// The factors chunk's raw bytes.
    pub factors: Vec<u8>,
    /// `base + U @ V` as the dtype's bytes: coding it with these factors leaves a zero residual.
    pub recon: Vec<u8>,
    /// `||recon - new|| / ||new - base||` (Frobenius; 0 when the tensor did not change).
    pub rel_err: f64,
    pub rank: usize,
}

/// Factors of rank (or relative error) `target` for the change from `base` to `new` (a float
/// matrix of `shape`), with the reconstruction they give.
pub fn lossy_lowrank(
    new: &[u8],
    base: &[u8],
    dtype: DType,
    shape: &[u64],
    target: LossyTarget,
) -> Result<Lossy> {
    if new.len() != base.len() {
        return Err(Error::InvalidArgument(format!(
            "a tensor of {} bytes against a base of {}",
            new.len(),
            base.len()
        )));
    }
    let (rows, cols) = view_any(dtype, shape, new.len())?;
    let d = delta_matrix(new, base, dtype, rows, cols);
    let norm2: f64 = d.iter().map(|x| x * x).sum();
    let full = rows.min(cols);
    let f = if norm2 == 0.0 {
        factors_of_zero(rows, cols)
    } else {
        match target {
            LossyTarget::Rank(r) => {
                let r = r.min(full);
                let l = (r + OVERSAMPLE).min(full);
                let s = sketch(&d, rows, cols, l, 2);
                factors_of(&s, &d, rows, cols, r)
            }
            LossyTarget::Rtol(tol) => {
                if tol.is_nan() || tol < 0.0 {
                    return Err(Error::InvalidArgument(format!("rtol {tol} is not >= 0")));
                }
                // The sketch grows until the error is reached, up to a rank of 256 (the small
                // eigenproblem is cubic in the sketch's width): past it, rank 256 and its error.
                let cap = full.min(256 + OVERSAMPLE);
                let mut l = (64 + OVERSAMPLE).min(cap);
                loop {
                    let s = sketch(&d, rows, cols, l, 2);
                    let keep = if l == full { l } else { l - OVERSAMPLE };
                    let mut left = norm2;
                    let mut r = keep;
                    for (k, sg) in s.sigma[..keep].iter().enumerate() {
                        if left <= tol * tol * norm2 {
                            r = k;
                            break;
                        }
                        left -= sg * sg;
                    }
                    if left <= tol * tol * norm2 || l == cap {
                        break factors_of(&s, &d, rows, cols, r);
                    }
                    l = (2 * l).min(cap);
                }
            }
        }
    };
    let raw = factors_bytes(&f);
    if raw.len() as u64 > MAX_FACTORS_BYTES {
        return Err(Error::InvalidArgument(format!(
            "factors of {} bytes exceed the {MAX_FACTORS_BYTES}-byte limit",
            raw.len()
        )));
    }
    let view = parse_factors(&raw)?;
    let mut recon = vec![0u8; new.len()];
    reconstruct(base, dtype, 0, &view, &mut recon)?;
    let n = new.len() / dtype.size();
    let err2: f64 = (0..n)
        .map(|k| {
            let e = value(dtype, &recon, k) - value(dtype, new, k);
            e * e
        })
        .sum();
    let rel_err = if norm2 == 0.0 {
        0.0
    } else {
        (err2 / norm2).sqrt()
    };
    Ok(Lossy {
        factors: raw,
        recon,
        rel_err,
        rank: f.rank,
    })
}

fn factors_of_zero(rows: usize, cols: usize) -> Factors {
    Factors {
        rows,
        cols,
        rank: 0,
        u: Vec::new(),
        v: Vec::new(),
    }
}

/// The matrix view of any float tensor of 2 or more dims (no size floor), or an error.
fn view_any(dtype: DType, shape: &[u64], len: usize) -> Result<(usize, usize)> {
    let rows = shape.first().copied().unwrap_or(0) as usize;
    let cols = shape
        .iter()
        .skip(1)
        .try_fold(1usize, |a, &x| a.checked_mul(x as usize));
    match cols {
        Some(cols)
            if dtype.rotates()
                && shape.len() >= 2
                && rows.max(cols) <= u32::MAX as usize
                && rows.checked_mul(cols).and_then(|n| n.checked_mul(dtype.size()))
                    == Some(len) =>
        {
            Ok((rows, cols))
        }
        _ => Err(Error::InvalidArgument(format!(
            "a low-rank version needs a float matrix (2+ dims) of the data's length: shape {shape:?} of {} over {len} bytes",
            dtype.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversions_round_to_nearest_even() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if x.is_nan() {
                assert_eq!(f32_to_f16(x), 0x7e00);
            } else {
                assert_eq!(f32_to_f16(x), h, "{h:#x}");
            }
        }
        // Halfway between 1.0 and the next f16 rounds to even (1.0); just above rounds up.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11) + 2f32.powi(-20)), 0x3c01);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(65519.0), 0x7bff);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0);
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.5), 1);
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(f32_to_bf16(f32::NAN), 0x7fc0);
    }

    /// The portable kernel and the one the CPU dispatch picks give the same bits, on whole
    /// column blocks and on the ragged ends of rows.
    #[test]
    fn kernel_paths_agree() {
        let mut s = 7u64;
        for (rows, cols, rank) in [(5usize, 77usize, 3usize), (3, 32, 8), (4, 100, 1)] {
            let mut rnd = || f32::from_bits(0x3c00_0000 | (next(&mut s) as u32 & 0x03ff_ffff));
            let mut sign = 0u32;
            let mut signed = |x: f32| {
                sign += 1;
                if sign.is_multiple_of(3) {
                    -x
                } else {
                    x
                }
            };
            let f = Factors {
                rows,
                cols,
                rank,
                u: (0..rows * rank).map(|_| signed(rnd())).collect(),
                v: (0..rank * cols).map(|_| signed(rnd())).collect(),
            };
            let raw = factors_bytes(&f);
            let view = parse_factors(&raw).unwrap();
            for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
                let size = dtype.size();
                let base: Vec<u8> = (0..rows * cols * size)
                    .map(|_| next(&mut s) as u8 & 0x3b)
                    .collect();
                for first in [0, 1, cols - 1, cols + 5] {
                    let n = rows * cols - first - 2;
                    let b = &base[..n * size];
                    let mut got = vec![0u8; b.len()];
                    reconstruct(b, dtype, first as u64, &view, &mut got).unwrap();
                    let (u, v) = (f64s(view.u), f64s(view.v));
                    let k = Kernel {
                        dtype,
                        first,
                        n,
                        i0: 0,
                        u: &u,
                        v: &v,
                        cols,
                        r: rank,
                    };
                    let mut want = vec![0u8; b.len()];
                    rows_portable(&k, b, &mut want);
                    assert_eq!(
                        got,
                        want,
                        "{rows}x{cols} r{rank} {} from {first}",
                        dtype.name()
                    );
                }
            }
        }
    }
}
