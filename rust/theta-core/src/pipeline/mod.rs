//! Whole-file work, in three parts that share the types below:
//! - [`scan`]: cut a file (or memory buffers) into chunks and hash them;
//! - [`write`]: encode the new chunks into frames and append them to a [`FrameSink`];
//! - [`deltas`]: encode changed tensors against their bases (the previous version's tensors);
//! - [`read`]: decode frames from a [`FrameSource`] into a file, a pkt-line stream or memory.
//!
//! The bytes come from an [`Input`]: a file, mapped whole where it can be (else read with
//! positioned reads in bounded windows), or buffers already in memory. Memory stays
//! O(threads x chunk) beyond what the input itself holds.
//!
//! [`FrameSink`]: crate::store::FrameSink
//! [`FrameSource`]: crate::store::FrameSource

pub mod deltas;
pub mod input;
pub mod read;
pub mod scan;
pub mod write;

use crate::dtype::DType;
use crate::error::Result;
use crate::frame::{ChunkId, PlaneMode};
use crate::pack::ObjectId;
use crate::store::Location;

pub use deltas::{write_deltas, DeltaJob};
pub use input::{FileStamp, Input};
pub use read::{read_chunks, restore_file, stream_file, ObjectStore, RestoreChunk};
pub use scan::{scan, scan_file, Scan};
pub use write::{write_frames, write_pack};

/// A byte range of the file as the format adapter sees it.
#[derive(Debug, Clone)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
    pub dtype: DType,
    /// Chunk boundaries inside a tensor span fall on multiples of this (element or block size).
    pub align: u64,
    /// Opaque spans (skeleton, unknown data) are cut by content-defined chunking.
    pub opaque: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub len: u64,
    pub dtype: DType,
    pub id: ChunkId,
}

/// What was written for one chunk.
#[derive(Debug, Clone)]
pub struct Written {
    pub id: ChunkId,
    /// The frame's Git object id (SHA-1 of the blob).
    pub object: ObjectId,
    pub frame_len: u64,
    /// How each byte plane was stored.
    pub planes: Vec<PlaneMode>,
    /// The chunks its frame is decoded against (empty: a plain frame).
    pub bases: Vec<ChunkId>,
    /// Where the sink put the frame.
    pub at: Location,
}

/// Progress and cancellation: called with bytes done since the last call; an error stops the work.
pub trait Progress: Sync {
    fn advance(&self, bytes: u64) -> Result<()>;
}

pub struct NoProgress;
impl Progress for NoProgress {
    fn advance(&self, _bytes: u64) -> Result<()> {
        Ok(())
    }
}

/// Chunk length for a tensor span: the largest multiple of `align` not above `chunk_bytes`.
pub fn tensor_chunk_len(chunk_bytes: u64, align: u64) -> u64 {
    let align = align.max(1);
    (chunk_bytes / align).max(1) * align
}
