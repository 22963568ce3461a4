//! Frames: what is stored for one chunk. A self-describing header, then one payload per byte plane.
//!
//! Format 2 (every frame written without a base):
//! ```text
//! offset  size  field
//! 0       4     magic 0x89 'T' 'S' 'F'
//! 4       1     frame format version (2)
//! 5       1     codec (1 = byte planes)
//! 6       1     dtype code (see DType)
//! 7       1     plane count P (1..=8)
//! 8       8     raw length, u64 LE
//! 16      32    BLAKE3 of the raw bytes (the chunk id)
//! 48      9*P   per plane: mode (0 raw, 1 zstd level 1, 2 rANS order 0), stored length u64 LE
//! 48+9P   ...   the plane payloads, in plane order
//! ```
//! Format 3 (a frame that refers to base chunks) inserts the base ids after the chunk id:
//! ```text
//! 48      1     base count B (1..=16)
//! 49      32*B  BLAKE3 ids of the base chunks
//! 49+32B  9*P   plane table, then the payloads, as in format 2
//! ```
//! Its codec byte names how the decoded planes (a residual of the raw length) and the bases'
//! bytes make the chunk ([`BaseCodec`] is the seam; [`crate::delta`] has the bit-level deltas).
//!
//! Format 3 with a *payload codec* (codec byte 32..=63: [`crate::sparse`], [`crate::lowrank`]):
//! the frame holds S codec-defined sections instead of planes of the raw length, each coded like
//! a plane (raw / zstd-1 / rANS, smallest), with its decoded length in the table:
//! ```text
//! 7       1     section count S (1..=16)
//! 49+32B  17*S  per section: mode, decoded length u64 LE, stored length u64 LE
//! 49+32B+17S    the section payloads, in order
//! ```
//! The decoded sections add up to at most twice the raw length plus 4 KiB (a hostile header
//! cannot make the reader allocate more than a chunk's worth).
//!
//! Codec bytes: 1 byte planes (format 2); 2 XOR, 16-19 and 21-23 zigzag differences (see
//! [`crate::delta`]); 32 sparse ([`crate::sparse`]); 33 lossless low-rank ([`crate::lowrank`]).
//!
//! Plane `j` holds byte `j` (little-endian) of every element; multi-byte floats are rotated left by
//! one bit first, so the top plane is the exponent. Decoding always re-hashes and compares.

use crate::ans;
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::cell::RefCell;

pub const MAGIC: [u8; 4] = [0x89, b'T', b'S', b'F'];
/// The format of frames without a base (rANS planes with 32 interleaved 32-bit states).
pub const VERSION: u8 = 2;
/// The format of frames with base chunk ids in their header.
pub const VERSION_BASES: u8 = 3;
pub const CODEC_PLANES: u8 = 1;
pub const HEADER_LEN: usize = 48;
/// Most base chunks one frame may name (a bound on what a hostile header can make us fetch).
pub const MAX_BASES: usize = 16;
/// Codec bytes 32..=63 are payload codecs: their frames hold sections, not planes.
pub const CODEC_PAYLOAD_MIN: u8 = 32;
pub const CODEC_PAYLOAD_MAX: u8 = 63;
/// Most sections a payload frame may have.
pub const MAX_SECTIONS: usize = 16;
/// The decoded sections of a payload frame add up to at most `2 * raw_len + SECTION_SLACK`.
pub const SECTION_SLACK: u64 = 4096;

pub type ChunkId = [u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PlaneMode {
    Raw = 0,
    Zstd = 1,
    Rans = 2,
}

/// Parsed frame header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInfo {
    pub codec: u8,
    pub dtype: DType,
    pub raw_len: u64,
    pub id: ChunkId,
    /// Base chunks the frame is decoded against (format 3; empty in format 2).
    pub bases: Vec<ChunkId>,
    /// Per plane (or section, for a payload codec): mode and stored length.
    pub planes: Vec<(PlaneMode, u64)>,
    /// Per section of a payload codec's frame: its decoded length (empty for plane frames).
    pub sections: Vec<u64>,
}

impl FrameInfo {
    pub fn version(&self) -> u8 {
        if self.bases.is_empty() {
            VERSION
        } else {
            VERSION_BASES
        }
    }

    /// Where the plane table starts.
    fn table_at(&self) -> usize {
        header_len(self.bases.len())
    }

    /// Whether the frame holds a payload codec's sections rather than planes.
    pub fn is_payload(&self) -> bool {
        is_payload_codec(self.codec)
    }

    fn entry_len(&self) -> usize {
        if self.is_payload() {
            17
        } else {
            9
        }
    }

    pub fn stored_len(&self) -> u64 {
        self.table_at() as u64
            + (self.entry_len() * self.planes.len()) as u64
            + self.planes.iter().map(|p| p.1).sum::<u64>()
    }
}

/// Whether frames of codec byte `codec` hold sections (see the module doc).
pub fn is_payload_codec(codec: u8) -> bool {
    (CODEC_PAYLOAD_MIN..=CODEC_PAYLOAD_MAX).contains(&codec)
}

/// Header length (up to the plane table) of a frame with `bases` base ids.
fn header_len(bases: usize) -> usize {
    if bases == 0 {
        HEADER_LEN
    } else {
        HEADER_LEN + 1 + 32 * bases
    }
}

/// A codec that rebuilds a chunk from a decoded residual and the chunk's bases (format 3).
pub trait BaseCodec: Sync {
    /// The codec byte of the frames it decodes (not [`CODEC_PLANES`]).
    fn code(&self) -> u8;
    /// How many bases its frames name: a frame naming another count is refused before any base
    /// is fetched (a hostile frame may name up to [`MAX_BASES`]).
    fn base_count(&self) -> usize {
        1
    }
    /// Turn `out`, which holds the decoded residual, into the chunk, given the bases' bytes.
    fn decode(&self, _bases: &[&[u8]], _out: &mut [u8]) -> Result<()> {
        Err(Error::CorruptFrame(format!(
            "codec {} has no residual form",
            self.code()
        )))
    }
    /// For a payload codec (code in [`CODEC_PAYLOAD_MIN`]..=[`CODEC_PAYLOAD_MAX`]): write the chunk into `out` from the
    /// frame's decoded sections and the bases' bytes (`dtype` is the frame's).
    fn decode_payload(
        &self,
        _sections: &[&[u8]],
        _dtype: DType,
        _bases: &[&[u8]],
        _out: &mut [u8],
    ) -> Result<()> {
        Err(Error::CorruptFrame(format!(
            "codec {} has no payload form",
            self.code()
        )))
    }
}

/// Resolves a base chunk id to the chunk's raw bytes.
pub type BaseResolver<'a> = &'a (dyn Fn(&ChunkId) -> Result<Vec<u8>> + Sync);

/// The resolver for frames that have no bases: any base is not found.
pub fn no_bases(id: &ChunkId) -> Result<Vec<u8>> {
    Err(Error::NotFound(format!("base chunk {}", hex(id))))
}

pub fn chunk_id(data: &[u8]) -> ChunkId {
    *blake3::hash(data).as_bytes()
}

/// Planes below this size are stored raw: tables and headers would eat any gain.
const MIN_CODED_PLANE: usize = 64;

/// Size of the leading sample of a plane that the codec decisions look at.
const SAMPLE: usize = 64 * 1024;

/// Leading bytes of a plane that zstd is tried on before the whole plane.
const ZSTD_PROBE: usize = 16 * 1024;

/// Elements per block in the plane split/merge loops (fixed-size inner loops vectorise).
const BLOCK: usize = 16;

thread_local! {
    /// Coded planes on encode, decoded planes on decode.
    static PLANES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// zstd contexts are expensive to create (and to zero): one per thread, reused.
    static ZSTD_C: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static ZSTD_D: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static ZSTD_OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// zstd level 1 of `src` into the thread's scratch buffer; calls `f` with the result.
fn with_zstd<R>(src: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    ZSTD_C.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(1).ok();
        }
        let Some(comp) = c.as_mut() else {
            return f(None);
        };
        ZSTD_OUT.with(|o| {
            let mut o = o.borrow_mut();
            o.clear();
            o.reserve(zstd::zstd_safe::compress_bound(src.len()));
            match comp.compress_to_buffer(src, &mut *o) {
                Ok(_) => f(Some(&o)),
                Err(_) => f(None),
            }
        })
    })
}

fn unzstd(src: &[u8], dst: &mut [u8]) -> std::result::Result<usize, String> {
    ZSTD_D.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        let dec = d.as_mut().expect("set above");
        dec.decompress_to_buffer(src, dst)
            .map_err(|e| e.to_string())
    })
}

macro_rules! split_merge {
    ($split:ident, $merge:ident, $t:ty, $k:expr) => {
        /// Split elements into `$k` planes of `n` bytes each (`planes` is `$k * n` bytes).
        fn $split<const ROT: u32>(data: &[u8], planes: &mut [u8]) {
            const K: usize = $k;
            let n = data.len() / K;
            let mut outs: [&mut [u8]; K] = split_n::<K>(&mut planes[..K * n], n);
            let whole = n / BLOCK * BLOCK;
            for (b, blk) in data[..whole * K].chunks_exact(BLOCK * K).enumerate() {
                let mut vals = [0 as $t; BLOCK];
                for (v, e) in vals.iter_mut().zip(blk.chunks_exact(K)) {
                    *v = <$t>::from_le_bytes(e.try_into().unwrap()).rotate_left(ROT);
                }
                for (j, out) in outs.iter_mut().enumerate() {
                    let o: &mut [u8; BLOCK] =
                        (&mut out[b * BLOCK..(b + 1) * BLOCK]).try_into().unwrap();
                    for i in 0..BLOCK {
                        o[i] = (vals[i] >> (8 * j)) as u8;
                    }
                }
            }
            for (i, e) in data[whole * K..n * K].chunks_exact(K).enumerate() {
                let v = <$t>::from_le_bytes(e.try_into().unwrap()).rotate_left(ROT);
                for (j, out) in outs.iter_mut().enumerate() {
                    out[whole + i] = (v >> (8 * j)) as u8;
                }
            }
        }

        /// Inverse of the split: interleave `$k` planes back into elements.
        fn $merge<const ROT: u32>(planes: &[&[u8]], out: &mut [u8]) {
            const K: usize = $k;
            let n = out.len() / K;
            let ins: [&[u8]; K] = std::array::from_fn(|j| &planes[j][..n]);
            let whole = n / BLOCK * BLOCK;
            for (b, blk) in out[..whole * K].chunks_exact_mut(BLOCK * K).enumerate() {
                let mut vals = [0 as $t; BLOCK];
                for (j, src) in ins.iter().enumerate() {
                    let s: &[u8; BLOCK] = src[b * BLOCK..(b + 1) * BLOCK].try_into().unwrap();
                    for i in 0..BLOCK {
                        vals[i] |= (s[i] as $t) << (8 * j);
                    }
                }
                for (v, e) in vals.iter().zip(blk.chunks_exact_mut(K)) {
                    e.copy_from_slice(&v.rotate_right(ROT).to_le_bytes());
                }
            }
            for (i, e) in out[whole * K..n * K].chunks_exact_mut(K).enumerate() {
                let mut v: $t = 0;
                for (j, src) in ins.iter().enumerate() {
                    v |= (src[whole + i] as $t) << (8 * j);
                }
                e.copy_from_slice(&v.rotate_right(ROT).to_le_bytes());
            }
        }
    };
}

split_merge!(split2, merge2, u16, 2);
split_merge!(split4, merge4, u32, 4);
split_merge!(split8, merge8, u64, 8);

/// 4-byte elements (fp32, int32) between element order and byte planes, 16 elements per step
/// (the portable loops above do not vectorise: ~15 instructions per element). Same results as
/// `split4` / `merge4`, which handle the tail.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    pub(super) fn ssse3() -> bool {
        is_x86_feature_detected!("ssse3")
    }

    /// Interleave 4 planes into elements, rotating each right by `rot` bits (0 or 1). SSE2 only,
    /// which every x86_64 CPU has.
    pub(super) fn merge4(planes: &[&[u8]], rot: bool, out: &mut [u8]) {
        let n = out.len() / 4;
        let ins: [&[u8]; 4] = std::array::from_fn(|j| &planes[j][..n]);
        let whole = n / 16 * 16;
        let r = rot as i32;
        for (b, blk) in out[..whole * 4].chunks_exact_mut(64).enumerate() {
            let at = b * 16;
            let src: [&[u8; 16]; 4] =
                std::array::from_fn(|j| ins[j][at..at + 16].try_into().expect("16 bytes"));
            let blk: &mut [u8; 64] = blk.try_into().expect("64 bytes");
            // SAFETY: SSE2 is part of x86_64; every load reads one of the four 16-byte arrays
            // above and every store writes 16 bytes at 0, 16, 32, 48 of the 64-byte block.
            unsafe {
                let ld = |a: &[u8; 16]| _mm_loadu_si128(a.as_ptr() as *const __m128i);
                let (a, b, c, d) = (ld(src[0]), ld(src[1]), ld(src[2]), ld(src[3]));
                let ab_lo = _mm_unpacklo_epi8(a, b);
                let ab_hi = _mm_unpackhi_epi8(a, b);
                let cd_lo = _mm_unpacklo_epi8(c, d);
                let cd_hi = _mm_unpackhi_epi8(c, d);
                let words = [
                    _mm_unpacklo_epi16(ab_lo, cd_lo),
                    _mm_unpackhi_epi16(ab_lo, cd_lo),
                    _mm_unpacklo_epi16(ab_hi, cd_hi),
                    _mm_unpackhi_epi16(ab_hi, cd_hi),
                ];
                let right = _mm_cvtsi32_si128(r);
                let left = _mm_cvtsi32_si128((32 - r) & 31);
                for (k, w) in words.into_iter().enumerate() {
                    let w = if r == 0 {
                        w
                    } else {
                        _mm_or_si128(_mm_srl_epi32(w, right), _mm_sll_epi32(w, left))
                    };
                    _mm_storeu_si128(blk.as_mut_ptr().add(16 * k) as *mut __m128i, w);
                }
            }
        }
        let tail: [&[u8]; 4] = std::array::from_fn(|j| &ins[j][whole..]);
        if rot {
            super::merge4::<1>(&tail, &mut out[whole * 4..n * 4]);
        } else {
            super::merge4::<0>(&tail, &mut out[whole * 4..n * 4]);
        }
    }

    /// Interleave 2 planes into 16-bit elements, rotating each right by `rot` bits (0 or 1).
    /// SSE2 only.
    pub(super) fn merge2(planes: &[&[u8]], rot: bool, out: &mut [u8]) {
        let n = out.len() / 2;
        let (lo, hi) = (&planes[0][..n], &planes[1][..n]);
        let whole = n / 16 * 16;
        for ((blk, a), b) in out[..whole * 2]
            .chunks_exact_mut(32)
            .zip(lo.chunks_exact(16))
            .zip(hi.chunks_exact(16))
        {
            let blk: &mut [u8; 32] = blk.try_into().expect("32 bytes");
            // SAFETY: SSE2 is part of x86_64; the loads read the two 16-byte plane slices and
            // the stores write 16 bytes at 0 and 16 of the 32-byte block.
            unsafe {
                let a = _mm_loadu_si128(a.as_ptr() as *const __m128i);
                let b = _mm_loadu_si128(b.as_ptr() as *const __m128i);
                let mut w = [_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b)];
                if rot {
                    for x in w.iter_mut() {
                        *x = _mm_or_si128(_mm_srli_epi16::<1>(*x), _mm_slli_epi16::<15>(*x));
                    }
                }
                _mm_storeu_si128(blk.as_mut_ptr() as *mut __m128i, w[0]);
                _mm_storeu_si128(blk.as_mut_ptr().add(16) as *mut __m128i, w[1]);
            }
        }
        let tail: [&[u8]; 2] = [&lo[whole..], &hi[whole..]];
        if rot {
            super::merge2::<1>(&tail, &mut out[whole * 2..n * 2]);
        } else {
            super::merge2::<0>(&tail, &mut out[whole * 2..n * 2]);
        }
    }

    /// Split elements into 4 planes, rotating each left by `rot` bits. Needs SSSE3 (checked by
    /// the caller with [`ssse3`]).
    pub(super) fn split4(data: &[u8], rot: bool, planes: &mut [u8]) {
        assert!(ssse3());
        // SAFETY: SSSE3 is present (checked above).
        unsafe { split4_ssse3(data, rot, planes) }
    }

    #[target_feature(enable = "ssse3")]
    unsafe fn split4_ssse3(data: &[u8], rot: bool, planes: &mut [u8]) {
        let n = data.len() / 4;
        let whole = n / 16 * 16;
        let r = rot as i32;
        // Within 4 elements: bytes 0 of each, then bytes 1, 2, 3.
        let group = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let left = _mm_cvtsi32_si128(r);
        let right = _mm_cvtsi32_si128((32 - r) & 31);
        {
            let outs = super::split_n::<4>(&mut planes[..4 * n], n);
            for (b, blk) in data[..whole * 4].chunks_exact(64).enumerate() {
                let blk: &[u8; 64] = blk.try_into().expect("64 bytes");
                let at = b * 16;
                // SAFETY: loads read 16 bytes at 0, 16, 32, 48 of the 64-byte block; each store
                // writes 16 bytes at `at` of a plane of n >= whole >= at + 16 bytes.
                let ld = |k: usize| _mm_loadu_si128(blk.as_ptr().add(16 * k) as *const __m128i);
                let mut v = [ld(0), ld(1), ld(2), ld(3)];
                for x in v.iter_mut() {
                    if r != 0 {
                        *x = _mm_or_si128(_mm_sll_epi32(*x, left), _mm_srl_epi32(*x, right));
                    }
                    *x = _mm_shuffle_epi8(*x, group);
                }
                // Now v[k] holds, as 32-bit lanes, plane bytes 0..3 of elements 4k..4k+3:
                // transpose the 4x4 lanes.
                let t0 = _mm_unpacklo_epi32(v[0], v[1]);
                let t1 = _mm_unpacklo_epi32(v[2], v[3]);
                let t2 = _mm_unpackhi_epi32(v[0], v[1]);
                let t3 = _mm_unpackhi_epi32(v[2], v[3]);
                let rows = [
                    _mm_unpacklo_epi64(t0, t1),
                    _mm_unpackhi_epi64(t0, t1),
                    _mm_unpacklo_epi64(t2, t3),
                    _mm_unpackhi_epi64(t2, t3),
                ];
                for (j, row) in rows.into_iter().enumerate() {
                    let dst: &mut [u8; 16] =
                        (&mut outs[j][at..at + 16]).try_into().expect("16 bytes");
                    _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, row);
                }
            }
        }
        // The tail: the portable loop on the remaining elements, into the same planes.
        let rest = n - whole;
        if rest > 0 {
            let mut tmp = vec![0u8; 4 * rest];
            if rot {
                super::split4::<1>(&data[whole * 4..n * 4], &mut tmp);
            } else {
                super::split4::<0>(&data[whole * 4..n * 4], &mut tmp);
            }
            for j in 0..4 {
                planes[j * n + whole..(j + 1) * n].copy_from_slice(&tmp[j * rest..(j + 1) * rest]);
            }
        }
    }
}

/// Cut `buf` (`K * n` bytes) into `K` consecutive slices of `n` bytes.
fn split_n<const K: usize>(buf: &mut [u8], n: usize) -> [&mut [u8]; K] {
    let mut rest = buf;
    std::array::from_fn(|_| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        head
    })
}

/// Split `data` into `p` byte planes (rotating float bit patterns first), plane `j` at
/// `planes[j * n..(j + 1) * n]`.
fn split_planes(data: &[u8], dtype: DType, p: usize, planes: &mut [u8]) {
    // The rotation is a constant in each instance, so the loops vectorise.
    match (p, dtype.rotates()) {
        (2, false) => split2::<0>(data, planes),
        (2, true) => split2::<1>(data, planes),
        #[cfg(target_arch = "x86_64")]
        (4, rot) if x86::ssse3() => x86::split4(data, rot, planes),
        (4, false) => split4::<0>(data, planes),
        (4, true) => split4::<1>(data, planes),
        (8, false) => split8::<0>(data, planes),
        (8, true) => split8::<1>(data, planes),
        _ => unreachable!("plane count is an element size"),
    }
}

fn merge_planes(planes: &[&[u8]], dtype: DType, out: &mut [u8]) {
    match (planes.len(), dtype.rotates()) {
        (1, _) => out.copy_from_slice(planes[0]),
        #[cfg(target_arch = "x86_64")]
        (2, rot) => x86::merge2(planes, rot, out),
        #[cfg(not(target_arch = "x86_64"))]
        (2, false) => merge2::<0>(planes, out),
        #[cfg(not(target_arch = "x86_64"))]
        (2, true) => merge2::<1>(planes, out),
        #[cfg(target_arch = "x86_64")]
        (4, rot) => x86::merge4(planes, rot, out),
        #[cfg(not(target_arch = "x86_64"))]
        (4, false) => merge4::<0>(planes, out),
        #[cfg(not(target_arch = "x86_64"))]
        (4, true) => merge4::<1>(planes, out),
        (8, false) => merge8::<0>(planes, out),
        (8, true) => merge8::<1>(planes, out),
        _ => unreachable!("plane count is an element size"),
    }
}

/// A plane is entropy-coded only if the estimate is below this percentage of its raw size.
const MIN_RANS_GAIN_PERCENT: usize = 98;
/// The same for the residual of a delta: its near-random planes are the bulk of a fine-tune's
/// delta, where a rANS pass that saves a few percent would cost a third of the coding and
/// decoding time.
const MIN_RANS_GAIN_PERCENT_DELTA: usize = 95;
/// How much larger than the rANS estimate zstd's output of a nearly constant plane may be and
/// still be taken (percent of the estimate): zstd decodes such a plane many times faster.
const ZSTD_SLACK_PERCENT: usize = 25;
/// The same for the residual of a bit-level delta, where it is most of what a restore decodes:
/// a 16-bit delta has one near-constant plane of two, and rANS on both halves its decode speed.
const ZSTD_SLACK_PERCENT_RESIDUAL: usize = 200;

/// Encode one plane, appending the smallest of raw, rANS and zstd-1 to `out`.
///
/// The decisions are integer-only (the same plane gives the same bytes everywhere):
/// - the leading 64 KiB sample's order-0 information content (exact fixed-point log2 of the
///   normalised frequencies) predicts what rANS would save on the whole plane; planes where that
///   is under 2% go raw (mantissa bytes: the common case);
/// - otherwise the plane is coded with a model from the sample and sixteen blocks spread over the
///   rest (see `sample_model`); its estimate decides, and the actual rANS output must still be
///   shorter than raw;
/// - zstd finds repeats an order-0 coder cannot (structured or duplicated weights). It is tried on
///   the sample's first 16 KiB first (scaled up, it must beat the best estimate for the sample)
///   and run on the whole plane only then: a larger probe costs much more than it finds.
///
/// A plane that stays raw is not copied: `out` is left as it was and the caller places the plane.
fn code_plane(
    plane: &[u8],
    out: &mut Vec<u8>,
    gain_percent: usize,
    zstd_slack_percent: usize,
) -> PlaneMode {
    let n = plane.len();
    let start = out.len();
    if n < MIN_CODED_PLANE {
        return PlaneMode::Raw;
    }
    let sample = &plane[..n.min(SAMPLE)];
    let sample_hist = ans::histogram(sample);
    let sample_rans = ans::estimate_len(&sample_hist);
    // Extrapolate the sample's stream bits to the plane (table and states are per plane).
    let sample_stream = ans::estimate_stream_bits(&sample_hist);
    let predicted = ((sample_stream as u128 * n as u128 / sample.len() as u128) >> 19) as usize;
    // A nearly constant plane (the high bytes of a delta's residual): zstd codes it about as
    // small as rANS, many times faster; rANS is still tried when zstd falls short.
    if n > sample.len() && predicted * 64 < n {
        let got = with_zstd(plane, |z| {
            z.filter(|z| z.len() <= predicted + predicted * zstd_slack_percent / 100 + 64)
                .map(|z| out.extend_from_slice(z))
                .is_some()
        });
        if got {
            return PlaneMode::Zstd;
        }
    }
    let mut mode = PlaneMode::Raw;
    let mut sample_best = sample.len();
    let mut best_len = n;
    // rANS costs a pass over the plane: only worth it where it saves at least 2% (exponent
    // planes save most of their size, random mantissa planes next to nothing).
    if predicted * 100 < n * gain_percent {
        let hist = if sample.len() == n {
            sample_hist
        } else {
            sample_model(plane, &sample_hist)
        };
        if ans::estimate_len(&hist) < n {
            ans::encode_with_hist(plane, &hist, out);
            let len = out.len() - start;
            if len < n {
                mode = PlaneMode::Rans;
                best_len = len;
                sample_best = sample_rans.min(sample.len());
            } else {
                out.truncate(start);
            }
        }
    }
    // Tried even where order-0 coding finds nothing: repeated blocks of noise are zstd's case.
    let probe = &sample[..sample.len().min(ZSTD_PROBE)];
    // A delta's planes ask zstd for the same gain as rANS (format 2: any gain).
    let zstd_percent = if gain_percent == MIN_RANS_GAIN_PERCENT {
        100
    } else {
        gain_percent
    };
    let zstd_sample_wins = with_zstd(probe, |z| {
        z.is_some_and(|z| z.len() * sample.len() * 100 < sample_best * probe.len() * zstd_percent)
    });
    if zstd_sample_wins {
        with_zstd(plane, |z| {
            if let Some(z) = z {
                if z.len() < best_len {
                    out.truncate(start);
                    out.extend_from_slice(z);
                    mode = PlaneMode::Zstd;
                }
            }
        });
    }
    if mode == PlaneMode::Raw {
        out.truncate(start);
    }
    mode
}

/// The counts a plane is coded with: its leading sample's, plus sixteen 8 KiB blocks spread over
/// the rest (a plane whose start is not like the rest is still modelled), or all of the rest
/// where that is no longer than the blocks (planes of 64-192 KiB are counted whole). Every byte
/// value in the plane's range (minimum to maximum: one pass at memory speed) that these did not
/// see gets a count of one, so every byte of the plane has a code.
///
/// It stands in for a full histogram of the plane, a pass that costs more than the model gains;
/// the spread blocks are there because real planes are not stationary (the leading sample
/// alone models them worse).
fn sample_model(plane: &[u8], sample_hist: &[u64; 256]) -> [u64; 256] {
    // Both ends in one pass (min() then max() read the plane twice).
    let (lo, hi) = plane
        .iter()
        .fold((u8::MAX, 0u8), |(lo, hi), &b| (lo.min(b), hi.max(b)));
    let (lo, hi) = (lo as usize, hi as usize);
    const SPREAD: usize = 16;
    const BLOCK_LEN: usize = 8 * 1024;
    let mut h = *sample_hist;
    let mut add = |bytes: &[u8]| {
        for (t, c) in h.iter_mut().zip(ans::histogram(bytes)) {
            *t += c;
        }
    };
    let rest = plane.len() - SAMPLE; // the caller's plane is longer than its sample
    if rest > SPREAD * BLOCK_LEN {
        for k in 0..SPREAD {
            let at = SAMPLE + rest / SPREAD * k;
            add(&plane[at..at + BLOCK_LEN]);
        }
    } else {
        add(&plane[SAMPLE..]); // no more than the blocks would be: the whole plane is counted
    }
    for c in &mut h[lo..=hi] {
        *c = (*c).max(1);
    }
    h
}

/// Encode one chunk whose BLAKE3 is already known.
pub fn encode_frame_with_id(data: &[u8], dtype: DType, id: &ChunkId) -> Vec<u8> {
    let mut out = Vec::new();
    let len = encode_frame_into(data, dtype, id, &mut out);
    out.truncate(len);
    out
}

/// Encode one chunk whose BLAKE3 is already known into `out` and return the frame's length:
/// the frame is `out[..len]`, and the rest of `out` is scratch. Reusing `out` from chunk to chunk
/// saves allocating and faulting in a frame each time; its length is kept (not cut to the frame)
/// so that the next chunk need not zero-fill it again.
///
/// The planes are split straight into the frame, where they are coded in order: a plane that
/// stays raw (the mantissa bytes, most of a float tensor) is then already in place, not copied
/// a second time.
pub fn encode_frame_into(data: &[u8], dtype: DType, id: &ChunkId, out: &mut Vec<u8>) -> usize {
    encode_based_into(data, dtype, id, CODEC_PLANES, &[], out)
}

/// Encode a format-3 frame of chunk `id` whose planes hold `residual` (the chunk's raw length),
/// which codec `codec` turns back into the chunk with the `bases`' bytes (see [`BaseCodec`]).
pub fn encode_frame_with_bases(
    residual: &[u8],
    dtype: DType,
    id: &ChunkId,
    codec: u8,
    bases: &[ChunkId],
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let len = encode_frame_with_bases_into(residual, dtype, id, codec, bases, &mut out)?;
    out.truncate(len);
    Ok(out)
}

/// [`encode_frame_with_bases`] into a reused buffer, as [`encode_frame_into`] does: the frame is
/// `out[..len]`.
pub fn encode_frame_with_bases_into(
    residual: &[u8],
    dtype: DType,
    id: &ChunkId,
    codec: u8,
    bases: &[ChunkId],
    out: &mut Vec<u8>,
) -> Result<usize> {
    if bases.is_empty() || bases.len() > MAX_BASES || codec == CODEC_PLANES {
        return Err(Error::InvalidArgument(format!(
            "a frame with bases needs 1 to {MAX_BASES} bases and a codec other than {CODEC_PLANES}"
        )));
    }
    Ok(encode_based_into(residual, dtype, id, codec, bases, out))
}

fn encode_based_into(
    data: &[u8],
    dtype: DType,
    id: &ChunkId,
    codec: u8,
    bases: &[ChunkId],
    out: &mut Vec<u8>,
) -> usize {
    let elem = dtype.size();
    let p = if elem > 1 && data.len().is_multiple_of(elem) {
        elem
    } else {
        1
    };
    let head = header_len(bases.len());
    let table = head + 9 * p;
    // Every plane is at most its raw size. What the buffer held is overwritten byte for byte
    // (header, table, planes) before it is read, so it is not cleared.
    let need = table + data.len();
    if out.len() < need {
        // A fresh zeroed allocation: its pages come zeroed from the kernel, without a memset.
        *out = vec![0; need];
    }
    let out = &mut out[..need];
    out[..4].copy_from_slice(&MAGIC);
    out[4] = if bases.is_empty() {
        VERSION
    } else {
        VERSION_BASES
    };
    out[5] = codec;
    out[6] = dtype as u8;
    out[7] = p as u8;
    out[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
    out[16..HEADER_LEN].copy_from_slice(id);
    if !bases.is_empty() {
        out[HEADER_LEN] = bases.len() as u8;
        for (k, b) in bases.iter().enumerate() {
            out[HEADER_LEN + 1 + 32 * k..HEADER_LEN + 33 + 32 * k].copy_from_slice(b);
        }
    }
    let record = |out: &mut [u8], j: usize, mode: PlaneMode, len: usize| {
        let at = head + 9 * j;
        out[at] = mode as u8;
        out[at + 1..at + 9].copy_from_slice(&(len as u64).to_le_bytes());
    };
    let n = data.len() / p;
    let (gain, slack) = if bases.is_empty() {
        (MIN_RANS_GAIN_PERCENT, ZSTD_SLACK_PERCENT)
    } else {
        (MIN_RANS_GAIN_PERCENT_DELTA, ZSTD_SLACK_PERCENT_RESIDUAL)
    };
    PLANES.with(|cell| {
        let mut coded = cell.borrow_mut();
        coded.clear();
        if p == 1 {
            let mode = code_plane(data, &mut coded, gain, slack);
            let src = if mode == PlaneMode::Raw {
                data
            } else {
                &coded[..]
            };
            out[table..table + src.len()].copy_from_slice(src);
            record(out, 0, mode, src.len());
            return table + src.len();
        }
        split_planes(data, dtype, p, &mut out[table..]);
        // Plane j is at `table + j * n`; the coded frame so far ends at `end` <= that.
        let mut end = table;
        for j in 0..p {
            let at = table + j * n;
            coded.clear();
            let mode = code_plane(&out[at..at + n], &mut coded, gain, slack);
            let len = if mode == PlaneMode::Raw {
                if end != at {
                    out.copy_within(at..at + n, end);
                }
                n
            } else {
                out[end..end + coded.len()].copy_from_slice(&coded);
                coded.len()
            };
            record(out, j, mode, len);
            end += len;
        }
        end
    })
}

/// Encode one chunk (hashes it first).
pub fn encode_frame(data: &[u8], dtype: DType) -> Vec<u8> {
    encode_frame_with_id(data, dtype, &chunk_id(data))
}

/// The codec byte of a frame from its first bytes alone (magic, format version, codec), so a
/// caller that only wants to know how a chunk is stored need not read the whole frame.
pub fn frame_codec(head: &[u8]) -> Result<u8> {
    let bad = |what: String| Error::CorruptFrame(what);
    if head.len() < 6 {
        return Err(bad(format!(
            "{} bytes, shorter than a frame's first 6",
            head.len()
        )));
    }
    if head[..4] != MAGIC {
        return Err(bad("bad magic: not a theta-store frame".into()));
    }
    match (head[4], head[5]) {
        (VERSION, CODEC_PLANES) => Ok(CODEC_PLANES),
        (VERSION, codec) => Err(bad(format!("unknown codec {codec}"))),
        (VERSION_BASES, CODEC_PLANES) => Err(bad(format!(
            "format-{VERSION_BASES} frame with codec {CODEC_PLANES}"
        ))),
        (VERSION_BASES, codec) => Ok(codec),
        (v, _) => Err(bad(format!(
            "frame format version {v} is not supported (this build reads {VERSION} and {VERSION_BASES})"
        ))),
    }
}

/// Parse and validate a frame header against the frame's length.
pub fn frame_info(frame: &[u8]) -> Result<FrameInfo> {
    let bad = |what: String| Error::CorruptFrame(what);
    if frame.len() < HEADER_LEN {
        return Err(bad(format!(
            "{} bytes, shorter than the 48-byte header",
            frame.len()
        )));
    }
    if frame[..4] != MAGIC {
        return Err(bad("bad magic: not a theta-store frame".into()));
    }
    let version = frame[4];
    if version != VERSION && version != VERSION_BASES {
        return Err(bad(format!(
            "frame format version {version} is not supported (this build reads {VERSION} and {VERSION_BASES})"
        )));
    }
    let codec = frame[5];
    let mut bases = Vec::new();
    if version == VERSION_BASES {
        let b = *frame.get(HEADER_LEN).unwrap_or(&0) as usize;
        if b == 0 || b > MAX_BASES || codec == CODEC_PLANES {
            return Err(bad(format!(
                "format-{version} frame with {b} bases and codec {codec}"
            )));
        }
        if frame.len() < header_len(b) {
            return Err(bad("base ids truncated".into()));
        }
        for k in 0..b {
            let at = HEADER_LEN + 1 + 32 * k;
            bases.push(frame[at..at + 32].try_into().expect("32 bytes"));
        }
    } else if codec != CODEC_PLANES {
        return Err(bad(format!("unknown codec {codec}")));
    }
    let head = header_len(bases.len());
    let dtype = DType::from_code(frame[6]).map_err(|e| bad(e.to_string()))?;
    if is_payload_codec(codec) {
        return section_info(frame, codec, dtype, bases, head);
    }
    let p = frame[7] as usize;
    if !(p == 1 || (p == dtype.size() && p > 1)) {
        return Err(bad(format!(
            "plane count {p} does not fit dtype {}",
            dtype.name()
        )));
    }
    let raw_len = u64::from_le_bytes(frame[8..16].try_into().unwrap());
    if raw_len % p as u64 != 0 {
        return Err(bad(format!(
            "raw length {raw_len} is not a multiple of {p} planes"
        )));
    }
    let id: ChunkId = frame[16..48].try_into().unwrap();
    let table_end = head + 9 * p;
    if frame.len() < table_end {
        return Err(bad("plane table truncated".into()));
    }
    let mut planes = Vec::with_capacity(p);
    let mut total: u64 = table_end as u64;
    for j in 0..p {
        let at = head + 9 * j;
        let mode = match frame[at] {
            0 => PlaneMode::Raw,
            1 => PlaneMode::Zstd,
            2 => PlaneMode::Rans,
            m => return Err(bad(format!("plane {j}: unknown mode {m}"))),
        };
        let len = u64::from_le_bytes(frame[at + 1..at + 9].try_into().unwrap());
        if mode == PlaneMode::Raw && len != raw_len / p as u64 {
            return Err(bad(format!(
                "plane {j}: raw plane of {len} bytes, expected {}",
                raw_len / p as u64
            )));
        }
        total = total
            .checked_add(len)
            .ok_or_else(|| bad("plane lengths overflow".into()))?;
        planes.push((mode, len));
    }
    if total != frame.len() as u64 {
        return Err(bad(format!(
            "plane lengths add up to {total} bytes but the frame has {}",
            frame.len()
        )));
    }
    Ok(FrameInfo {
        codec,
        dtype,
        raw_len,
        id,
        bases,
        planes,
        sections: Vec::new(),
    })
}

/// The rest of [`frame_info`] for a payload codec's frame (base ids already read).
fn section_info(
    frame: &[u8],
    codec: u8,
    dtype: DType,
    bases: Vec<ChunkId>,
    head: usize,
) -> Result<FrameInfo> {
    let bad = |what: String| Error::CorruptFrame(what);
    let s = frame[7] as usize;
    if s == 0 || s > MAX_SECTIONS {
        return Err(bad(format!("section count {s} is not 1..={MAX_SECTIONS}")));
    }
    let raw_len = u64::from_le_bytes(frame[8..16].try_into().unwrap());
    if raw_len > 1 << 30 {
        return Err(bad(format!(
            "raw length {raw_len} exceeds the 1 GiB chunk limit"
        )));
    }
    let id: ChunkId = frame[16..48].try_into().unwrap();
    let table_end = head + 17 * s;
    if frame.len() < table_end {
        return Err(bad("section table truncated".into()));
    }
    let mut planes = Vec::with_capacity(s);
    let mut sections = Vec::with_capacity(s);
    let mut total: u64 = table_end as u64;
    let mut decoded: u64 = 0;
    for j in 0..s {
        let at = head + 17 * j;
        let mode = match frame[at] {
            0 => PlaneMode::Raw,
            1 => PlaneMode::Zstd,
            2 => PlaneMode::Rans,
            m => return Err(bad(format!("section {j}: unknown mode {m}"))),
        };
        let dec = u64::from_le_bytes(frame[at + 1..at + 9].try_into().unwrap());
        let len = u64::from_le_bytes(frame[at + 9..at + 17].try_into().unwrap());
        if mode == PlaneMode::Raw && len != dec {
            return Err(bad(format!(
                "section {j}: raw section of {len} bytes, expected {dec}"
            )));
        }
        decoded = decoded
            .checked_add(dec)
            .ok_or_else(|| bad("section lengths overflow".into()))?;
        total = total
            .checked_add(len)
            .ok_or_else(|| bad("section lengths overflow".into()))?;
        planes.push((mode, len));
        sections.push(dec);
    }
    if decoded > 2 * raw_len + SECTION_SLACK {
        return Err(bad(format!(
            "sections decode to {decoded} bytes, too many for a chunk of {raw_len}"
        )));
    }
    if total != frame.len() as u64 {
        return Err(bad(format!(
            "section lengths add up to {total} bytes but the frame has {}",
            frame.len()
        )));
    }
    Ok(FrameInfo {
        codec,
        dtype,
        raw_len,
        id,
        bases,
        planes,
        sections,
    })
}

/// Encode a payload codec's frame of chunk `id` (`raw_len` bytes of `dtype`) from its sections
/// into `out`, each section coded like a plane; the frame is `out[..len]`.
#[allow(clippy::too_many_arguments)]
pub fn encode_payload_frame_into(
    sections: &[&[u8]],
    raw_len: u64,
    dtype: DType,
    id: &ChunkId,
    codec: u8,
    bases: &[ChunkId],
    out: &mut Vec<u8>,
) -> Result<usize> {
    if bases.is_empty()
        || bases.len() > MAX_BASES
        || !is_payload_codec(codec)
        || sections.is_empty()
        || sections.len() > MAX_SECTIONS
    {
        return Err(Error::InvalidArgument(format!(
            "a payload frame needs 1 to {MAX_BASES} bases, 1 to {MAX_SECTIONS} sections and a \
             codec in {CODEC_PAYLOAD_MIN}..={CODEC_PAYLOAD_MAX}"
        )));
    }
    let head = header_len(bases.len());
    out.clear();
    out.resize(head + 17 * sections.len(), 0);
    out[..4].copy_from_slice(&MAGIC);
    out[4] = VERSION_BASES;
    out[5] = codec;
    out[6] = dtype as u8;
    out[7] = sections.len() as u8;
    out[8..16].copy_from_slice(&raw_len.to_le_bytes());
    out[16..HEADER_LEN].copy_from_slice(id);
    out[HEADER_LEN] = bases.len() as u8;
    for (k, b) in bases.iter().enumerate() {
        out[HEADER_LEN + 1 + 32 * k..HEADER_LEN + 33 + 32 * k].copy_from_slice(b);
    }
    for (j, sec) in sections.iter().enumerate() {
        let start = out.len();
        let mode = code_plane(sec, out, MIN_RANS_GAIN_PERCENT_DELTA, ZSTD_SLACK_PERCENT);
        if mode == PlaneMode::Raw {
            out.extend_from_slice(sec);
        }
        let len = out.len() - start;
        let at = head + 17 * j;
        out[at] = mode as u8;
        out[at + 1..at + 9].copy_from_slice(&(sec.len() as u64).to_le_bytes());
        out[at + 9..at + 17].copy_from_slice(&(len as u64).to_le_bytes());
    }
    Ok(out.len())
}

/// Planes a chunk of `len` bytes of `dtype` is split into (as format 2 splits it).
pub fn plane_count(dtype: DType, len: usize) -> usize {
    let elem = dtype.size();
    if elem > 1 && len.is_multiple_of(elem) {
        elem
    } else {
        1
    }
}

/// Split `data` into [`plane_count`] byte planes as format 2 does (floats rotated left by one
/// bit), plane `j` at `planes[j * n..(j + 1) * n]`; `planes` is `data.len()` bytes.
pub fn split_into_planes(data: &[u8], dtype: DType, planes: &mut [u8]) {
    let p = plane_count(dtype, data.len());
    if p == 1 {
        planes.copy_from_slice(data);
    } else {
        split_planes(data, dtype, p, planes);
    }
}

/// Inverse of [`split_into_planes`]: `planes` has [`plane_count`] slices of `out.len() / p` bytes.
pub fn merge_from_planes(planes: &[&[u8]], dtype: DType, out: &mut [u8]) -> Result<()> {
    let p = plane_count(dtype, out.len());
    if planes.len() != p || planes.iter().any(|x| x.len() != out.len() / p) {
        return Err(Error::CorruptFrame(format!(
            "{} planes do not make {} bytes of {}",
            planes.len(),
            out.len(),
            dtype.name()
        )));
    }
    merge_planes(planes, dtype, out);
    Ok(())
}

thread_local! {
    /// Decoded sections of a payload frame.
    static SECTIONS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The codec of a format-3 frame, checked to take as many bases as the frame names.
fn codec_of<'c>(info: &FrameInfo, codecs: &[&'c dyn BaseCodec]) -> Result<&'c dyn BaseCodec> {
    let codec = *codecs
        .iter()
        .find(|c| c.code() == info.codec)
        .ok_or_else(|| Error::CorruptFrame(format!("unknown codec {}", info.codec)))?;
    if codec.base_count() != info.bases.len() {
        return Err(Error::CorruptFrame(format!(
            "codec {} decodes against {} base(s) but the frame names {}",
            info.codec,
            codec.base_count(),
            info.bases.len()
        )));
    }
    Ok(codec)
}

/// Decode the sections of a payload frame and hand them to its codec.
fn decode_sections(
    frame: &[u8],
    info: &FrameInfo,
    out: &mut [u8],
    resolve: BaseResolver,
    codecs: &[&dyn BaseCodec],
) -> Result<()> {
    if out.len() as u64 != info.raw_len {
        return Err(Error::CorruptFrame(format!(
            "frame holds {} bytes but {} were expected",
            info.raw_len,
            out.len()
        )));
    }
    let codec = codec_of(info, codecs)?;
    // Taken out of the thread-local so that a codec may decode frames itself meanwhile.
    let mut buf = SECTIONS.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let total: u64 = info.sections.iter().sum();
    buf.clear();
    buf.resize(total as usize, 0);
    let result = (|| {
        let mut pos = info.table_at() + 17 * info.planes.len();
        let mut rest = &mut buf[..];
        let mut secs: Vec<&[u8]> = Vec::with_capacity(info.planes.len());
        for (j, (&(mode, len), &dec)) in info.planes.iter().zip(&info.sections).enumerate() {
            let src = &frame[pos..pos + len as usize];
            pos += len as usize;
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(dec as usize);
            rest = tail;
            match mode {
                PlaneMode::Raw => dst.copy_from_slice(src),
                PlaneMode::Rans => ans::decode(src, dst)
                    .map_err(|e| Error::CorruptFrame(format!("section {j}: {e}")))?,
                PlaneMode::Zstd => {
                    let got = unzstd(src, dst)
                        .map_err(|e| Error::CorruptFrame(format!("section {j}: zstd: {e}")))?;
                    if got != dst.len() {
                        return Err(Error::CorruptFrame(format!(
                            "section {j}: zstd gave {got} bytes, expected {}",
                            dst.len()
                        )));
                    }
                }
            }
            secs.push(dst);
        }
        let bases = info.bases.iter().map(resolve).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[u8]> = bases.iter().map(|b| &b[..]).collect();
        codec.decode_payload(&secs, info.dtype, &refs, out)
    })();
    SECTIONS.with(|c| *c.borrow_mut() = buf);
    result
}

/// Decode a frame into `out` (which must be exactly the raw length) and verify its BLAKE3.
pub fn decode_frame_into(frame: &[u8], out: &mut [u8]) -> Result<FrameInfo> {
    decode_frame_with(frame, out, &no_bases, &[])
}

/// [`decode_frame_into`] for frames of any format: the bases of a format-3 frame are fetched
/// with `resolve` and combined by the one of `codecs` its codec byte names.
pub fn decode_frame_with(
    frame: &[u8],
    out: &mut [u8],
    resolve: BaseResolver,
    codecs: &[&dyn BaseCodec],
) -> Result<FrameInfo> {
    let info = decode_frame_unverified_with(frame, out, resolve, codecs)?;
    let got = chunk_id(out);
    if got != info.id {
        // Only on failure: name a base whose bytes are not what its id says (a corrupt base or
        // factors chunk), since the frame itself may be intact.
        for (k, b) in info.bases.iter().enumerate() {
            if let Ok(bytes) = resolve(b) {
                let h = chunk_id(&bytes);
                if h != *b {
                    return Err(Error::CorruptFrame(format!(
                        "base {k} of the frame of {}: chunk {} hashes to {}",
                        hex(&info.id),
                        hex(b),
                        hex(&h)
                    )));
                }
            }
        }
        return Err(Error::CorruptFrame(format!(
            "decoded bytes hash to {} but the frame says {}",
            hex(&got),
            hex(&info.id)
        )));
    }
    Ok(info)
}

/// Decode a frame into `out` without hashing what comes out: for a caller that verifies the
/// bytes otherwise (the smudge stream checks the whole file's BLAKE3 before git may keep it).
pub fn decode_frame_unverified(frame: &[u8], out: &mut [u8]) -> Result<FrameInfo> {
    decode_frame_unverified_with(frame, out, &no_bases, &[])
}

/// [`decode_frame_unverified`] for frames of any format (see [`decode_frame_with`]).
pub fn decode_frame_unverified_with(
    frame: &[u8],
    out: &mut [u8],
    resolve: BaseResolver,
    codecs: &[&dyn BaseCodec],
) -> Result<FrameInfo> {
    let info = frame_info(frame)?;
    if info.is_payload() {
        decode_sections(frame, &info, out, resolve, codecs)?;
        return Ok(info);
    }
    let info = decode_planes(frame, out)?;
    if info.bases.is_empty() {
        return Ok(info);
    }
    let codec = codec_of(&info, codecs)?;
    let bases = info.bases.iter().map(resolve).collect::<Result<Vec<_>>>()?;
    let refs: Vec<&[u8]> = bases.iter().map(|b| &b[..]).collect();
    codec.decode(&refs, out)?;
    Ok(info)
}

/// Decode the planes of a frame (of any format) into `out`.
fn decode_planes(frame: &[u8], out: &mut [u8]) -> Result<FrameInfo> {
    let info = frame_info(frame)?;
    if out.len() as u64 != info.raw_len {
        return Err(Error::CorruptFrame(format!(
            "frame holds {} bytes but {} were expected",
            info.raw_len,
            out.len()
        )));
    }
    let p = info.planes.len();
    let n = out.len() / p;
    let decode_plane = |j: usize, src: &[u8], dst: &mut [u8]| -> Result<()> {
        match info.planes[j].0 {
            PlaneMode::Raw => dst.copy_from_slice(src),
            PlaneMode::Rans => ans::decode(src, dst)?,
            PlaneMode::Zstd => {
                let got = unzstd(src, dst)
                    .map_err(|e| Error::CorruptFrame(format!("plane {j}: zstd: {e}")))?;
                if got != dst.len() {
                    return Err(Error::CorruptFrame(format!(
                        "plane {j}: zstd gave {got} bytes, expected {}",
                        dst.len()
                    )));
                }
            }
        }
        Ok(())
    };
    // frame_info checked that the plane lengths add up to the frame's length.
    let mut srcs: Vec<&[u8]> = Vec::with_capacity(p);
    let mut pos = info.table_at() + 9 * p;
    for &(_, len) in &info.planes {
        srcs.push(&frame[pos..pos + len as usize]);
        pos += len as usize;
    }
    if p == 1 {
        decode_plane(0, srcs[0], out)?;
    } else {
        PLANES.with(|cell| -> Result<()> {
            let mut scratch = cell.borrow_mut();
            if scratch.len() < out.len() {
                scratch.resize(out.len(), 0);
            }
            // Raw planes are merged straight from the frame; the others are decoded first.
            let mut planes: Vec<&[u8]> = Vec::with_capacity(p);
            let mut rest = &mut scratch[..out.len()];
            for (j, &src) in srcs.iter().enumerate() {
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(n);
                rest = tail;
                if info.planes[j].0 == PlaneMode::Raw {
                    planes.push(src);
                } else {
                    decode_plane(j, src, dst)?;
                    planes.push(dst);
                }
            }
            merge_planes(&planes, info.dtype, out);
            Ok(())
        })?;
    }
    Ok(info)
}

/// Decode a frame into a new buffer, verifying its BLAKE3.
pub fn decode_frame(frame: &[u8]) -> Result<(Vec<u8>, FrameInfo)> {
    let info = frame_info(frame)?;
    let len = usize::try_from(info.raw_len)
        .map_err(|_| Error::CorruptFrame("raw length too large".into()))?;
    // The header's claim is bounded by what the payload can expand to before we allocate by it:
    // a raw plane is 1:1, rANS emits at least one word per 2^18 symbols... keep it simple and cap
    // at 1 GiB per chunk (chunks are a few MiB).
    if len > 1 << 30 {
        return Err(Error::CorruptFrame(format!(
            "raw length {len} exceeds the 1 GiB chunk limit"
        )));
    }
    let mut out = vec![0u8; len];
    decode_frame_into(frame, &mut out)?;
    Ok((out, info))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_codec_reads_the_first_six_bytes_only() {
        let f = encode_frame(&[1, 2, 3, 4, 5, 6, 7, 8], DType::F32);
        assert_eq!(frame_codec(&f[..6]).unwrap(), CODEC_PLANES);
        assert!(frame_codec(&f[..5]).is_err());
        let mut bad = f[..6].to_vec();
        bad[0] = 0;
        assert!(frame_codec(&bad).is_err());
        for (version, codec) in [
            (VERSION, 2),
            (VERSION_BASES, CODEC_PLANES),
            (9, CODEC_PLANES),
        ] {
            let mut h = f[..6].to_vec();
            h[4] = version;
            h[5] = codec;
            assert!(frame_codec(&h).is_err(), "version {version} codec {codec}");
        }
        let mut h = f[..6].to_vec();
        h[4] = VERSION_BASES;
        h[5] = 2;
        assert_eq!(frame_codec(&h).unwrap(), 2);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_planes_match_portable_loops() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        for elems in (0..200).chain([1000, 4099]) {
            let data: Vec<u8> = (0..elems * 4)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            for rot in [false, true] {
                let mut want = vec![0u8; data.len()];
                let mut got = vec![0u8; data.len()];
                if rot {
                    split4::<1>(&data, &mut want);
                } else {
                    split4::<0>(&data, &mut want);
                }
                if x86::ssse3() {
                    x86::split4(&data, rot, &mut got);
                    assert_eq!(got, want, "split, {elems} elements, rot {rot}");
                }
                let planes: Vec<&[u8]> = want.chunks(elems.max(1)).collect();
                let planes = if elems == 0 {
                    vec![&want[..]; 4]
                } else {
                    planes
                };
                let mut back = vec![0u8; data.len()];
                x86::merge4(&planes, rot, &mut back);
                assert_eq!(back, data, "merge, {elems} elements, rot {rot}");
                // The same bytes as twice as many 16-bit elements.
                let mut two = vec![0u8; data.len()];
                if rot {
                    split2::<1>(&data, &mut two);
                } else {
                    split2::<0>(&data, &mut two);
                }
                let half = two.len() / 2;
                let mut back = vec![0u8; data.len()];
                x86::merge2(&[&two[..half], &two[half..]], rot, &mut back);
                assert_eq!(back, data, "merge2, {} elements, rot {rot}", 2 * elems);
            }
        }
    }

    #[test]
    fn every_dtype_round_trips() {
        let data: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for dtype in DType::ALL {
            for len in [0usize, 1, 7, 8, 64, 1000, 4096] {
                let f = encode_frame(&data[..len], dtype);
                let (out, info) = decode_frame(&f).unwrap();
                assert_eq!(out, &data[..len]);
                assert_eq!(info.dtype, dtype);
            }
        }
    }

    /// A plane is coded with a model from its sample: bytes the sample never saw (rare, or only
    /// late in the plane, between the spread blocks, at the very end) still have a code.
    #[test]
    fn bytes_the_sample_did_not_see_round_trip() {
        // Sampled in spread blocks; and counted whole past the sample.
        for n in [1 << 20, 150 << 10] {
            sample_model_codes_every_byte(n);
        }
    }

    fn sample_model_codes_every_byte(n: usize) {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut plane: Vec<u8> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Skewed: rANS pays on this plane, and zstd does not beat it.
                [7u8, 7, 7, 8, 8, 9, 10, 11][(state >> 61) as usize]
            })
            .collect();
        plane[SAMPLE + 1] = 3; // the lowest byte, just past the sample
        plane[n / 2 + 1234] = 200; // between two spread blocks
        plane[n - 1] = 201; // the highest byte, last
        for dtype in [DType::U8, DType::Bytes] {
            let f = encode_frame(&plane, dtype);
            let (out, info) = decode_frame(&f).unwrap();
            assert_eq!(out, plane);
            assert_eq!(info.planes[0].0, PlaneMode::Rans);
            assert!(f.len() < n / 2, "coded: {} of {n}", f.len());
        }
    }

    #[test]
    fn flipped_bytes_are_detected() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 13) as u8).collect();
        let f = encode_frame(&data, DType::F32);
        for at in [0, 5, 20, 50, 60, f.len() / 2, f.len() - 1] {
            let mut g = f.clone();
            g[at] ^= 0x40;
            assert!(decode_frame(&g).is_err(), "flip at {at} not detected");
        }
    }
}
