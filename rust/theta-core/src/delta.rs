//! Bit-level deltas: a chunk coded against the same tensor's chunk in an earlier version.
//!
//! The residual (as long as the chunk) is coded exactly like a format-2 chunk's bytes (byte
//! planes, raw / zstd-1 / rANS per plane, smallest wins) inside a format-3 frame with one base:
//! the base chunk's id. Codec bytes:
//! ```text
//! codec  residual                                         element  planes
//! 2      new XOR base, byte for byte                      any      as format 2 for the dtype
//! 16     zigzag(new - base), wrapping, unsigned elements   1 byte   1
//! 17                                                      2 bytes  2, not rotated
//! 18                                                      4 bytes  4, not rotated
//! 19                                                      8 bytes  8, not rotated
//! 21     the same, for float dtypes (F16, BF16)           2 bytes  2, not rotated
//! 22                                   (F32)              4 bytes  4, not rotated
//! 23                                   (F64)              8 bytes  8, not rotated
//! ```
//! XOR is element-size independent and its planes are split as the dtype's format-2 planes are
//! (floats rotated left by one bit, so the top plane holds the exponent's changes). The difference
//! is taken on the bit patterns as stored (not rotated), where a small change of a float is a
//! small integer; zigzag maps it so that small +/- differences have zero high bytes. Codecs 21-23
//! store the residual rotated right by one bit, which the frame's float rotation undoes, so their
//! planes are the zigzag bytes themselves. A chunk whose length is not a whole number of elements
//! has one plane and uses codec 16.
//!
//! Decoding fetches the base, rebuilds the chunk and checks its BLAKE3 against the frame's id, as
//! for every frame: a wrong base or a corrupt residual is an error, never wrong bytes.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::frame::{self, BaseCodec, ChunkId};
use std::cell::RefCell;

/// Codec byte of the XOR delta.
pub const CODEC_XOR: u8 = 2;
/// Codec byte of the zigzag integer difference of 1-byte elements (add log2 of the element size).
pub const CODEC_DIFF: u8 = 16;
/// Codec byte of the zigzag difference of 2-byte floats (add log2 of the element size minus 1).
pub const CODEC_DIFF_FLOAT: u8 = 21;

/// Which bit-level delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    Xor,
    Diff,
}

/// The XOR codec.
pub struct Xor;

/// The zigzag integer difference of `elem`-byte elements; `rot` for float dtypes (see the module
/// doc: the residual is stored rotated right by one bit).
pub struct Diff {
    pub elem: usize,
    pub rot: bool,
}

/// Every bit-level delta codec, for [`frame::decode_frame_with`].
pub const CODECS: [&dyn BaseCodec; 8] = [
    &Xor,
    &Diff {
        elem: 1,
        rot: false,
    },
    &Diff {
        elem: 2,
        rot: false,
    },
    &Diff {
        elem: 4,
        rot: false,
    },
    &Diff {
        elem: 8,
        rot: false,
    },
    &Diff { elem: 2, rot: true },
    &Diff { elem: 4, rot: true },
    &Diff { elem: 8, rot: true },
];

fn one_base<'a>(bases: &[&'a [u8]], out: &[u8]) -> Result<&'a [u8]> {
    let [base] = bases else {
        return Err(Error::CorruptFrame(format!(
            "a bit-level delta has one base, not {}",
            bases.len()
        )));
    };
    if base.len() != out.len() {
        return Err(Error::CorruptFrame(format!(
            "delta of {} bytes against a base of {}",
            out.len(),
            base.len()
        )));
    }
    Ok(base)
}

impl BaseCodec for Xor {
    fn code(&self) -> u8 {
        CODEC_XOR
    }
    fn decode(&self, bases: &[&[u8]], out: &mut [u8]) -> Result<()> {
        let base = one_base(bases, out)?;
        xor_into(out, base);
        Ok(())
    }
}

impl BaseCodec for Diff {
    fn code(&self) -> u8 {
        let log = self.elem.trailing_zeros() as u8;
        if self.rot {
            CODEC_DIFF_FLOAT + log - 1
        } else {
            CODEC_DIFF + log
        }
    }
    fn decode(&self, bases: &[&[u8]], out: &mut [u8]) -> Result<()> {
        let base = one_base(bases, out)?;
        if !out.len().is_multiple_of(self.elem) {
            return Err(Error::CorruptFrame(format!(
                "delta of {} bytes is not whole {}-byte elements",
                out.len(),
                self.elem
            )));
        }
        match (self.elem, self.rot) {
            (1, _) => undiff1(out, base),
            (2, false) => undiff2::<false>(out, base),
            (2, true) => undiff2::<true>(out, base),
            (4, false) => undiff4::<false>(out, base),
            (4, true) => undiff4::<true>(out, base),
            (8, false) => undiff8::<false>(out, base),
            (8, true) => undiff8::<true>(out, base),
            _ => return Err(Error::CorruptFrame("delta element size".into())),
        }
        Ok(())
    }
}

/// `acc ^= other`, byte for byte (in words, so that it vectorises).
fn xor_into(acc: &mut [u8], other: &[u8]) {
    let mut a = acc.chunks_exact_mut(8);
    let mut b = other.chunks_exact(8);
    for (x, y) in (&mut a).zip(&mut b) {
        let v = u64::from_le_bytes((&*x).try_into().unwrap())
            ^ u64::from_le_bytes(y.try_into().unwrap());
        x.copy_from_slice(&v.to_le_bytes());
    }
    for (x, y) in a.into_remainder().iter_mut().zip(b.remainder()) {
        *x ^= y;
    }
}

macro_rules! diff_undiff {
    ($diff:ident, $undiff:ident, $u:ty, $i:ty) => {
        /// `out = zigzag(new - base)` per element, rotated right by one bit if `ROT`.
        fn $diff<const ROT: bool>(new: &[u8], base: &[u8], out: &mut [u8]) {
            const K: usize = std::mem::size_of::<$u>();
            for ((o, n), b) in out
                .chunks_exact_mut(K)
                .zip(new.chunks_exact(K))
                .zip(base.chunks_exact(K))
            {
                let d = <$u>::from_le_bytes(n.try_into().unwrap())
                    .wrapping_sub(<$u>::from_le_bytes(b.try_into().unwrap()));
                let z = (d << 1) ^ (((d as $i) >> (<$u>::BITS - 1)) as $u);
                let z = if ROT { z.rotate_right(1) } else { z };
                o.copy_from_slice(&z.to_le_bytes());
            }
        }

        /// Inverse of the diff: `out` holds the residual and becomes the chunk.
        fn $undiff<const ROT: bool>(out: &mut [u8], base: &[u8]) {
            const K: usize = std::mem::size_of::<$u>();
            for (o, b) in out.chunks_exact_mut(K).zip(base.chunks_exact(K)) {
                let z = <$u>::from_le_bytes((&*o).try_into().unwrap());
                let z = if ROT { z.rotate_left(1) } else { z };
                let d = (z >> 1) ^ (z & 1).wrapping_neg();
                let v = <$u>::from_le_bytes(b.try_into().unwrap()).wrapping_add(d);
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    };
}

diff_undiff!(diff1_, undiff1_, u8, i8);
diff_undiff!(diff2, undiff2, u16, i16);
diff_undiff!(diff4, undiff4, u32, i32);
diff_undiff!(diff8, undiff8, u64, i64);

fn diff1(new: &[u8], base: &[u8], out: &mut [u8]) {
    diff1_::<false>(new, base, out)
}

fn undiff1(out: &mut [u8], base: &[u8]) {
    undiff1_::<false>(out, base)
}

/// `out = zigzag(new - base)` per element of `dtype` (whole elements of 2, 4 or 8 bytes),
/// rotated right by one bit for floats: the residual of codecs 17-19 and 21-23.
pub(crate) fn zigzag_residual(dtype: DType, new: &[u8], base: &[u8], out: &mut [u8]) {
    match (dtype.size(), dtype.rotates()) {
        (2, false) => diff2::<false>(new, base, out),
        (2, true) => diff2::<true>(new, base, out),
        (4, false) => diff4::<false>(new, base, out),
        (4, true) => diff4::<true>(new, base, out),
        (8, false) => diff8::<false>(new, base, out),
        (8, true) => diff8::<true>(new, base, out),
        _ => diff1(new, base, out),
    }
}

/// The diff codec a chunk of `len` bytes of `dtype` uses (the frame's plane count decides).
pub(crate) fn diff_codec(dtype: DType, len: usize) -> Diff {
    let elem = dtype.size();
    if elem > 1 && len.is_multiple_of(elem) {
        Diff {
            elem,
            rot: dtype.rotates(),
        }
    } else {
        Diff {
            elem: 1,
            rot: false,
        }
    }
}

thread_local! {
    /// The residual being coded.
    static RESIDUAL: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encode chunk `new` (BLAKE3 `id`) as the delta `kind` against `base` (BLAKE3 `base_id`) into
/// `out`; returns the frame's length (the frame is `out[..len]`).
pub fn encode_delta_with(
    kind: Delta,
    new: &[u8],
    base: &[u8],
    base_id: &ChunkId,
    dtype: DType,
    id: &ChunkId,
    out: &mut Vec<u8>,
) -> Result<usize> {
    if new.len() != base.len() {
        return Err(Error::InvalidArgument(format!(
            "a delta needs a base of the chunk's length: {} bytes against {}",
            new.len(),
            base.len()
        )));
    }
    RESIDUAL.with(|r| {
        let mut r = r.borrow_mut();
        // Every byte is written below, so what the buffer held need not be cleared.
        r.resize(new.len(), 0);
        let r = &mut r[..new.len()];
        let code = match kind {
            Delta::Xor => {
                r.copy_from_slice(new);
                xor_into(r, base);
                CODEC_XOR
            }
            Delta::Diff => {
                let c = diff_codec(dtype, new.len());
                match (c.elem, c.rot) {
                    (2, false) => diff2::<false>(new, base, r),
                    (2, true) => diff2::<true>(new, base, r),
                    (4, false) => diff4::<false>(new, base, r),
                    (4, true) => diff4::<true>(new, base, r),
                    (8, false) => diff8::<false>(new, base, r),
                    (8, true) => diff8::<true>(new, base, r),
                    _ => diff1(new, base, r),
                }
                c.code()
            }
        };
        frame::encode_frame_with_bases_into(r, dtype, id, code, &[*base_id], out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_bytes_are_distinct_and_as_documented() {
        let codes: Vec<u8> = CODECS.iter().map(|c| c.code()).collect();
        assert_eq!(codes, [2, 16, 17, 18, 19, 21, 22, 23]);
    }

    #[test]
    fn zigzag_maps_small_differences_to_small_numbers() {
        let base = 1000u32.to_le_bytes();
        for (new, want) in [(1000u32, 0u32), (1001, 2), (999, 1), (1002, 4), (998, 3)] {
            let mut r = [0u8; 4];
            diff4::<false>(&new.to_le_bytes(), &base, &mut r);
            assert_eq!(u32::from_le_bytes(r), want, "{new}");
            undiff4::<false>(&mut r, &base);
            assert_eq!(u32::from_le_bytes(r), new);
        }
    }
}
