//! One changed tensor coded against the same tensor in an earlier version: the seam between the
//! write path (which finds the bases and appends frames) and the delta codecs (which pick, per
//! chunk, the smallest of the plain frame and the deltas they know).
//!
//! Per chunk: plain, XOR, zigzag difference ([`crate::delta`]) or sparse ([`crate::sparse`]).
//! A chunk over 256 KiB is decided on two 32 KiB samples (the planes' order-0 information
//! content ranks plain / XOR / difference; sparse is coded in full when the samples show few
//! changes) and only the winner is coded in full. Per tensor: a float matrix whose change looks
//! low-rank (or with user factors) also tries [`crate::lowrank`] at a few ranks, and keeps it
//! when factors + frames cost less than the frames without.

use crate::ans;
use rayon::prelude::*;

use crate::delta;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::frame::{self, ChunkId};
use crate::lowrank;
use crate::sparse;
use std::cell::RefCell;

/// One chunk of the tensor: where it is in the tensor, and its id and its base's id.
#[derive(Debug, Clone)]
pub struct DeltaChunk {
    /// Byte offset in the tensor (a multiple of the element size).
    pub offset: u64,
    pub len: u64,
    pub id: ChunkId,
    /// The base tensor's chunk at the same place (same offset and length).
    pub base: ChunkId,
}

/// A low-rank predictor the user supplies (a LoRA adapter: `delta ~= u @ v`).
#[derive(Debug, Clone)]
pub struct Factors {
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
    /// `rows x rank`, row-major.
    pub u: Vec<f32>,
    /// `rank x cols`, row-major.
    pub v: Vec<f32>,
}

/// What to code: the whole new tensor and the whole base tensor (equal lengths), and the chunks
/// of the new tensor that need frames (not necessarily all of them).
pub struct TensorJob<'a> {
    pub new: &'a [u8],
    pub base: &'a [u8],
    pub dtype: DType,
    pub shape: &'a [u64],
    pub chunks: &'a [DeltaChunk],
    pub factors: Option<&'a Factors>,
}

/// The frames chosen for a tensor.
pub struct TensorDelta {
    /// Per chunk of the job, in order: its frame (plain or delta, whichever is smallest).
    pub frames: Vec<Vec<u8>>,
    /// A chunk that some frames name as a base beside the tensor's own chunks (the factors of a
    /// low-rank delta): its id, raw bytes and plain frame. The caller stores it like any chunk.
    pub extra: Vec<(ChunkId, Vec<u8>, Vec<u8>)>,
}

/// Code the job's chunks, each as the smallest frame; a tensor whose change is low-rank (or with
/// user factors) may code its chunks against a factors chunk, returned in `extra`.
pub fn encode_tensor(job: &TensorJob) -> Result<TensorDelta> {
    if job.new.len() != job.base.len() {
        return Err(Error::InvalidArgument(format!(
            "a tensor of {} bytes against a base of {}",
            job.new.len(),
            job.base.len()
        )));
    }
    for c in job.chunks {
        let b = c.offset.checked_add(c.len);
        if b.is_none_or(|b| b > job.new.len() as u64) {
            return Err(Error::InvalidArgument(format!(
                "chunk at {}+{} is past the tensor's {} bytes",
                c.offset,
                c.len,
                job.new.len()
            )));
        }
    }
    let frames = job
        .chunks
        .par_iter()
        .map(|c| {
            let (a, b) = (c.offset as usize, (c.offset + c.len) as usize);
            encode_chunk(&job.new[a..b], &job.base[a..b], &c.base, job.dtype, &c.id)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut best = TensorDelta {
        frames,
        extra: Vec::new(),
    };
    if let Some(lr) = lowrank::encode_tensor_lowrank(job, &best.frames)? {
        best = lr;
    }
    Ok(best)
}

/// Chunks up to this size try every candidate in full; larger ones pick from samples.
const SMALL_CHUNK: usize = 256 * 1024;
/// Size and count of the samples a large chunk's codec is picked on.
const SAMPLE: usize = 32 * 1024;
const SAMPLES: usize = 2;

/// Which frame a chunk gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    Plain,
    Bits(delta::Delta),
    Sparse,
}

/// The smallest frame of one chunk against its base chunk: plain, XOR, difference or sparse.
/// A large chunk is decided on a few samples and coded in full only with the winner.
pub fn encode_chunk(
    new: &[u8],
    base: &[u8],
    base_id: &ChunkId,
    dtype: DType,
    id: &ChunkId,
) -> Result<Vec<u8>> {
    let elem = frame::plane_count(dtype, new.len());
    let elems = new.len() / elem.max(1);
    // Sparse pays while a changed element costs less than about a quarter of the chunk's share.
    let sparse_limit = elems / 4;
    let candidates = [
        Choice::Plain,
        Choice::Bits(delta::Delta::Xor),
        Choice::Bits(delta::Delta::Diff),
    ];
    SCRATCH.with(|cell| {
        let mut out = cell.borrow_mut();
        choose(
            new,
            base,
            base_id,
            dtype,
            id,
            elem,
            sparse_limit,
            &candidates,
            &mut out,
        )
    })
}

thread_local! {
    /// The frame being coded (kept from chunk to chunk: a fresh buffer costs page faults).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static SAMPLE_NEW: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static SAMPLE_BASE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[allow(clippy::too_many_arguments)]
fn choose(
    new: &[u8],
    base: &[u8],
    base_id: &ChunkId,
    dtype: DType,
    id: &ChunkId,
    elem: usize,
    sparse_limit: usize,
    candidates: &[Choice],
    out: &mut Vec<u8>,
) -> Result<Vec<u8>> {
    if new.len() <= SMALL_CHUNK {
        let mut best: Option<Vec<u8>> = None;
        for &c in candidates.iter().chain(&[Choice::Sparse]) {
            if let Some(len) = encode_as(c, new, base, base_id, dtype, id, sparse_limit, out)? {
                if best.as_ref().is_none_or(|b| len < b.len()) {
                    best = Some(out[..len].to_vec());
                }
            }
        }
        return Ok(best.expect("the plain frame always codes"));
    }
    // Samples spread over the chunk, element-aligned (SAMPLE is a multiple of every size).
    let step = (new.len() - SAMPLE) / (SAMPLES - 1) / 8 * 8;
    let at: Vec<usize> = (0..SAMPLES).map(|k| k * step).collect();
    let pick = |src: &[u8], dst: &mut Vec<u8>| {
        dst.clear();
        for &a in &at {
            dst.extend_from_slice(&src[a..a + SAMPLE]);
        }
    };
    let mut sn = SAMPLE_NEW.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let mut sb = SAMPLE_BASE.with(|c| std::mem::take(&mut *c.borrow_mut()));
    pick(new, &mut sn);
    pick(base, &mut sb);
    let scored = score_samples(&sn, &sb, dtype, elem, candidates, out);
    SAMPLE_NEW.with(|c| *c.borrow_mut() = sn);
    SAMPLE_BASE.with(|c| *c.borrow_mut() = sb);
    let (mut scores, few_changed) = scored?;
    let scale = (SAMPLES * SAMPLE) as f64 / new.len() as f64;
    if few_changed {
        // Few changed in the samples: sparse is tried in full (it stops once too many changed).
        let sparse = Choice::Sparse;
        if let Some(len) = encode_as(sparse, new, base, base_id, dtype, id, sparse_limit, out)? {
            let scaled = (len as f64 * scale) as usize;
            if scores.iter().all(|s| s.0 >= scaled) {
                return Ok(out[..len].to_vec());
            }
            scores.push((scaled, sparse));
        }
    }
    let winner = scores.iter().min_by_key(|s| s.0).expect("candidates").1;
    let len = encode_as(winner, new, base, base_id, dtype, id, sparse_limit, out)?
        .expect("plain and bit-level deltas always code");
    Ok(out[..len].to_vec())
}

/// The candidates' estimated frame sizes on the samples (order-0 information content of each
/// plane: the coders are run only on the winner), and whether few of the samples' elements
/// changed.
#[allow(clippy::too_many_arguments)]
fn score_samples(
    sn: &[u8],
    sb: &[u8],
    dtype: DType,
    elem: usize,
    candidates: &[Choice],
    out: &mut Vec<u8>,
) -> Result<(Vec<(usize, Choice)>, bool)> {
    let few = sparse::changed(sn, sb, elem, sn.len() / elem / 4).is_some();
    let mut resid = vec![0u8; sn.len()];
    let mut scores = Vec::new();
    for &c in candidates {
        let data: &[u8] = match c {
            Choice::Plain => sn,
            Choice::Bits(delta::Delta::Xor) => {
                for ((r, a), b) in resid.iter_mut().zip(sn).zip(sb) {
                    *r = a ^ b;
                }
                &resid
            }
            Choice::Bits(delta::Delta::Diff) => {
                delta::zigzag_residual(dtype, sn, sb, &mut resid);
                &resid
            }
            Choice::Sparse => continue,
        };
        scores.push((estimate(data, dtype, out), c));
    }
    Ok((scores, few))
}

/// Estimated coded size of `data`'s byte planes (each at most raw).
fn estimate(data: &[u8], dtype: DType, planes: &mut Vec<u8>) -> usize {
    planes.resize(data.len(), 0);
    frame::split_into_planes(data, dtype, &mut planes[..data.len()]);
    let p = frame::plane_count(dtype, data.len());
    let n = data.len() / p;
    (0..p)
        .map(|j| ans::estimate_len(&ans::histogram(&planes[j * n..(j + 1) * n])).min(n))
        .sum()
}

#[allow(clippy::too_many_arguments)]
fn encode_as(
    c: Choice,
    new: &[u8],
    base: &[u8],
    base_id: &ChunkId,
    dtype: DType,
    id: &ChunkId,
    sparse_limit: usize,
    out: &mut Vec<u8>,
) -> Result<Option<usize>> {
    Ok(match c {
        Choice::Plain => Some(frame::encode_frame_into(new, dtype, id, out)),
        Choice::Bits(kind) => Some(delta::encode_delta_with(
            kind, new, base, base_id, dtype, id, out,
        )?),
        Choice::Sparse => {
            sparse::encode_sparse_into(new, base, base_id, dtype, id, sparse_limit, out)?
        }
    })
}

/// Every codec a frame with bases may use, for the read path.
pub fn codecs() -> &'static [&'static dyn frame::BaseCodec] {
    static ALL: [&dyn frame::BaseCodec; 10] = [
        delta::CODECS[0],
        delta::CODECS[1],
        delta::CODECS[2],
        delta::CODECS[3],
        delta::CODECS[4],
        delta::CODECS[5],
        delta::CODECS[6],
        delta::CODECS[7],
        &sparse::Sparse,
        &lowrank::LowRank,
    ];
    &ALL
}

/// The kind of delta a frame's codec byte names: "plain", "xor", "diff", "sparse", "low-rank"
/// (or "unknown").
pub fn codec_kind(codec: u8) -> &'static str {
    match codec {
        frame::CODEC_PLANES => "plain",
        delta::CODEC_XOR => "xor",
        16..=19 | 21..=23 => "diff",
        sparse::CODEC_SPARSE => "sparse",
        lowrank::CODEC_LOWRANK => "low-rank",
        _ => "unknown",
    }
}
