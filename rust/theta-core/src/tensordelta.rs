//! One changed tensor coded against the same tensor in an earlier version: the seam between the
//! write path (which finds the bases and appends frames) and the delta codecs (which pick, per
//! chunk, the smallest of the plain frame and the deltas they know).

use crate::delta;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::frame::{self, ChunkId};

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

/// Code the job's chunks, each as the smallest frame.
pub fn encode_tensor(job: &TensorJob) -> Result<TensorDelta> {
    if job.new.len() != job.base.len() {
        return Err(Error::InvalidArgument(format!(
            "a tensor of {} bytes against a base of {}",
            job.new.len(),
            job.base.len()
        )));
    }
    let mut frames = Vec::with_capacity(job.chunks.len());
    for c in job.chunks {
        let (a, b) = (c.offset as usize, (c.offset + c.len) as usize);
        if b > job.new.len() {
            return Err(Error::InvalidArgument(format!(
                "chunk at {a}..{b} is past the tensor's {} bytes",
                job.new.len()
            )));
        }
        let mut out = Vec::new();
        let plain = frame::encode_frame_into(&job.new[a..b], job.dtype, &c.id, &mut out);
        let len = delta::encode_delta_into(
            &job.new[a..b],
            &job.base[a..b],
            &c.base,
            job.dtype,
            &c.id,
            plain,
            &mut out,
        )?
        .unwrap_or_else(|| frame::encode_frame_into(&job.new[a..b], job.dtype, &c.id, &mut out));
        out.truncate(len);
        frames.push(out);
    }
    Ok(TensorDelta {
        frames,
        extra: Vec::new(),
    })
}

/// Every codec a frame with bases may use, for the read path.
pub fn codecs() -> &'static [&'static dyn frame::BaseCodec] {
    &delta::CODECS
}
