//! Sparse delta (codec 32): the positions of the elements that changed against the base chunk,
//! and their values. For a few changed elements (a masked update, a handful of rows).
//!
//! A payload frame (see [`crate::frame`]) with one base, the base chunk, and these sections:
//! ```text
//! section  content
//! 0        value kind: 0 = new XOR base, 1 = the new values (one byte)
//! 1..=G    per changed element, its index minus the previous changed index minus one (the
//!          first: its index), as G-byte LE integers split into G byte planes (low bytes first),
//!          G = 1..=4 the fewest bytes that hold the largest gap
//! G+1..    the values of the changed elements, in order, split into K byte planes as format 2
//!          splits the dtype (floats rotated); K = the element size, or 1 when the chunk is not
//!          whole elements (then elements are bytes)
//! ```
//! Each section is coded raw, zstd-1 or rANS, whichever is smallest, as planes are.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::frame::{self, BaseCodec, ChunkId};

/// Codec byte of the sparse delta.
pub const CODEC_SPARSE: u8 = 32;

const VALUES_XOR: u8 = 0;
const VALUES_NEW: u8 = 1;

/// The sparse codec.
pub struct Sparse;

/// Element size and the dtype its values are split as, for a chunk of `len` bytes.
fn element(dtype: DType, len: usize) -> (usize, DType) {
    let k = frame::plane_count(dtype, len);
    if k == 1 {
        (1, DType::U8)
    } else {
        (k, dtype)
    }
}

fn bad(what: String) -> Error {
    Error::CorruptFrame(format!("sparse delta: {what}"))
}

/// Indices of the elements of `elem` bytes that differ between `new` and `base`, or `None` as
/// soon as there are more than `limit`.
pub fn changed(new: &[u8], base: &[u8], elem: usize, limit: usize) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    // Compare 64-byte blocks first (whole elements: sizes are powers of two up to 8): most of a
    // sparse change's blocks are equal.
    for (b, (x, y)) in new.chunks(64).zip(base.chunks(64)).enumerate() {
        if x == y {
            continue;
        }
        for (k, (u, v)) in x.chunks(elem).zip(y.chunks(elem)).enumerate() {
            if u != v {
                out.push((b * 64 / elem + k) as u32);
                if out.len() > limit {
                    return None;
                }
            }
        }
    }
    Some(out)
}

/// Encode chunk `new` (id `id`) as a sparse delta against `base` (id `base_id`) into `out`, or
/// `None` when more than `limit` elements changed. Returns the frame's length.
pub fn encode_sparse_into(
    new: &[u8],
    base: &[u8],
    base_id: &ChunkId,
    dtype: DType,
    id: &ChunkId,
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<Option<usize>> {
    if new.len() != base.len() {
        return Err(Error::InvalidArgument(format!(
            "a sparse delta needs a base of the chunk's length: {} bytes against {}",
            new.len(),
            base.len()
        )));
    }
    let (elem, vdt) = element(dtype, new.len());
    let Some(idx) = changed(new, base, elem, limit) else {
        return Ok(None);
    };
    if new.len() / elem > u32::MAX as usize {
        return Ok(None);
    }
    let n = idx.len();
    let mut gaps = vec![0u8; 4 * n];
    let mut prev: i64 = -1;
    let mut widest = 0u32;
    for (k, &e) in idx.iter().enumerate() {
        let g = (e as i64 - prev - 1) as u32;
        prev = e as i64;
        widest |= g;
        for b in 0..4 {
            gaps[b * n + k] = (g >> (8 * b)) as u8;
        }
    }
    let g_planes = (4 - widest.leading_zeros() as usize / 8).max(1);
    let mut xor = vec![0u8; n * elem];
    let mut raw = vec![0u8; n * elem];
    for (k, &e) in idx.iter().enumerate() {
        let a = e as usize * elem;
        for b in 0..elem {
            raw[k * elem + b] = new[a + b];
            xor[k * elem + b] = new[a + b] ^ base[a + b];
        }
    }
    let mut best: Option<Vec<u8>> = None;
    for (kind, vals) in [(VALUES_XOR, &xor), (VALUES_NEW, &raw)] {
        let kind = [kind];
        let mut planes = vec![0u8; vals.len()];
        frame::split_into_planes(vals, vdt, &mut planes);
        let mut secs: Vec<&[u8]> = vec![&kind];
        for b in 0..g_planes {
            secs.push(&gaps[b * n..(b + 1) * n]);
        }
        for j in 0..elem {
            secs.push(&planes[j * n..(j + 1) * n]);
        }
        let mut f = Vec::new();
        frame::encode_payload_frame_into(
            &secs,
            new.len() as u64,
            dtype,
            id,
            CODEC_SPARSE,
            &[*base_id],
            &mut f,
        )?;
        if best.as_ref().is_none_or(|b| f.len() < b.len()) {
            best = Some(f);
        }
    }
    let f = best.expect("two tries");
    let len = f.len();
    *out = f;
    Ok(Some(len))
}

impl BaseCodec for Sparse {
    fn code(&self) -> u8 {
        CODEC_SPARSE
    }

    fn decode_payload(
        &self,
        sections: &[&[u8]],
        dtype: DType,
        bases: &[&[u8]],
        out: &mut [u8],
    ) -> Result<()> {
        let [base] = bases else {
            return Err(bad(format!("one base, not {}", bases.len())));
        };
        if base.len() != out.len() {
            return Err(bad(format!(
                "a chunk of {} bytes against a base of {}",
                out.len(),
                base.len()
            )));
        }
        let (elem, vdt) = element(dtype, out.len());
        let g_planes = sections.len().wrapping_sub(1 + elem);
        if !(1..=4).contains(&g_planes) || sections[0].len() != 1 {
            return Err(bad(format!(
                "{} sections, expected {} to {}",
                sections.len(),
                2 + elem,
                5 + elem
            )));
        }
        let kind = sections[0][0];
        if kind != VALUES_XOR && kind != VALUES_NEW {
            return Err(bad(format!("unknown value kind {kind}")));
        }
        let count = sections[1].len();
        if sections[1..].iter().any(|s| s.len() != count) {
            return Err(bad("index and value planes of different lengths".into()));
        }
        let mut vals = vec![0u8; count * elem];
        frame::merge_from_planes(&sections[1 + g_planes..], vdt, &mut vals)?;
        out.copy_from_slice(base);
        let elems = (out.len() / elem) as u64;
        let mut next: u64 = 0; // the smallest index the next entry may have
        for k in 0..count {
            let g = (0..g_planes).fold(0u64, |g, b| g | (sections[1 + b][k] as u64) << (8 * b));
            let e = next
                .checked_add(g)
                .filter(|&e| e < elems)
                .ok_or_else(|| bad(format!("index past the chunk's {elems} elements")))?;
            let a = e as usize * elem;
            let v = &vals[k * elem..(k + 1) * elem];
            if kind == VALUES_XOR {
                for (o, x) in out[a..a + elem].iter_mut().zip(v) {
                    *o ^= x;
                }
            } else {
                out[a..a + elem].copy_from_slice(v);
            }
            next = e + 1;
        }
        Ok(())
    }
}
