//! The write path for changed tensors: each is coded against the same tensor of an earlier
//! version (its base), chunk by chunk, as the smallest of the plain frame and the deltas
//! [`crate::tensordelta`] knows.

use std::sync::Mutex;

use rayon::prelude::*;

use super::input::{self, Input};
use super::read::{read_into, RestoreChunk};
use super::{Chunk, Progress, Written};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::frame::{self, ChunkId};
use crate::store::{FrameRef, FrameSink, FrameSource};
use crate::tensordelta::{self, DeltaChunk, Factors, TensorJob};

/// One changed tensor of the input and its base.
#[derive(Debug, Clone)]
pub struct DeltaJob {
    /// Where the tensor lies in the input.
    pub offset: u64,
    pub len: u64,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Its chunks that need frames (input offsets; a subset of the tensor's chunks).
    pub chunks: Vec<Chunk>,
    /// The base tensor's chunks, in order.
    pub base: Vec<RestoreChunk>,
    /// A low-rank predictor of the change, if the user gave one.
    pub factors: Option<Factors>,
}

/// One frame ready to append.
struct Coded {
    id: ChunkId,
    frame: Vec<u8>,
}

/// Code the chunks of `jobs` against their bases (decoded from `source`) and append the frames
/// to `sink`. A chunk whose base is already `max_depth` deltas deep, or that has no base of its
/// place and length, is stored plain, so that restoring any version decodes at most
/// `max_depth + 1` frames per chunk. Chunks some frames need besides the bases (low-rank
/// factors) are appended too. Returns what was written: the jobs' chunks in order, then extras.
pub fn write_deltas(
    input: &dyn Input,
    jobs: &[DeltaJob],
    source: &dyn FrameSource,
    sink: &mut dyn FrameSink,
    max_depth: usize,
    progress: &dyn Progress,
) -> Result<Vec<Written>> {
    for j in jobs {
        if j.offset + j.len > input.len() {
            return Err(Error::Changed(format!(
                "{}: tensor ends at {}, past its {} bytes",
                input.name(),
                j.offset + j.len,
                input.len()
            )));
        }
        if let Some(c) = j
            .chunks
            .iter()
            .find(|c| c.offset < j.offset || c.offset + c.len > j.offset + j.len)
        {
            return Err(Error::InvalidArgument(format!(
                "chunk at {} is outside its tensor at {}..{}",
                c.offset,
                j.offset,
                j.offset + j.len
            )));
        }
    }
    let total: usize = jobs.iter().map(|j| j.chunks.len()).sum();
    sink.reserve(total);
    let check_ids = !input.unchanged_since_scan();
    let shared = Mutex::new((sink, Vec::<Written>::with_capacity(total)));
    // Each job's frames keep its place: the result is in job order whatever order they finish in.
    let placed: Vec<Result<Vec<Written>>> = jobs
        .par_iter()
        .map(|job| {
            let coded = code_job(input, job, source, max_depth, check_ids)?;
            progress.advance(job.chunks.iter().map(|c| c.len).sum())?;
            let contents: Vec<&[u8]> = coded.iter().map(|c| &c.frame[..]).collect();
            let objects = crate::sha1x16::blob_ids(&contents);
            let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
            let mut out = Vec::with_capacity(coded.len());
            for (c, object) in coded.iter().zip(&objects) {
                let info = frame::frame_info(&c.frame)?;
                let at = guard.0.append(&FrameRef {
                    chunk: &c.id,
                    object,
                    bytes: &c.frame,
                })?;
                out.push(Written {
                    id: c.id,
                    object: *object,
                    frame_len: c.frame.len() as u64,
                    planes: info.planes.into_iter().map(|p| p.0).collect(),
                    bases: info.bases,
                    at,
                });
            }
            Ok(out)
        })
        .collect();
    let mut written = Vec::with_capacity(total);
    let mut extras = Vec::new();
    for (job, w) in jobs.iter().zip(placed) {
        let mut w = w?;
        extras.extend(w.split_off(job.chunks.len()));
        written.extend(w);
    }
    input.check()?;
    written.extend(extras);
    Ok(written)
}

/// The frames of one job's chunks, in order, then its extra chunks' frames.
fn code_job(
    input: &dyn Input,
    job: &DeltaJob,
    source: &dyn FrameSource,
    max_depth: usize,
    check_ids: bool,
) -> Result<Vec<Coded>> {
    let mut scratch = Vec::new();
    let new = input::bytes(input, job.offset, job.offset + job.len, &mut scratch)?;
    if check_ids {
        for c in &job.chunks {
            let (a, b) = (
                (c.offset - job.offset) as usize,
                (c.offset - job.offset + c.len) as usize,
            );
            if frame::chunk_id(&new[a..b]) != c.id {
                return Err(Error::Changed(input.name().to_string()));
            }
        }
    }
    let base_len: u64 = job.base.iter().map(|c| c.len).sum();
    let plain = |c: &Chunk| {
        let (a, b) = (
            (c.offset - job.offset) as usize,
            (c.offset - job.offset + c.len) as usize,
        );
        Coded {
            id: c.id,
            frame: frame::encode_frame_with_id(&new[a..b], c.dtype, &c.id),
        }
    };
    if base_len != job.len {
        return Ok(job.chunks.iter().map(plain).collect());
    }
    let mut base = vec![0u8; job.len as usize];
    let depths = read_into(&job.base, source, &mut base)?;
    // The base chunk at each offset of the tensor, with its depth.
    let mut at = std::collections::HashMap::with_capacity(job.base.len());
    let mut pos = 0u64;
    for (c, d) in job.base.iter().zip(&depths) {
        at.insert(pos, (c, *d));
        pos += c.len;
    }
    let mut delta = Vec::new();
    let mut which = Vec::with_capacity(job.chunks.len());
    for c in &job.chunks {
        let off = c.offset - job.offset;
        match at.get(&off) {
            Some((b, d)) if b.len == c.len && *d < max_depth && b.id != c.id => {
                which.push(Some(delta.len()));
                delta.push(DeltaChunk {
                    offset: off,
                    len: c.len,
                    id: c.id,
                    base: b.id,
                });
            }
            _ => which.push(None),
        }
    }
    let coded = if delta.is_empty() {
        None
    } else {
        Some(tensordelta::encode_tensor(&TensorJob {
            new,
            base: &base,
            dtype: job.dtype,
            shape: &job.shape,
            chunks: &delta,
            factors: job.factors.as_ref(),
        })?)
    };
    let mut out = Vec::with_capacity(job.chunks.len() + 1);
    let (mut frames, extra) = match coded {
        Some(t) => (t.frames.into_iter().map(Some).collect::<Vec<_>>(), t.extra),
        None => (Vec::new(), Vec::new()),
    };
    for (c, w) in job.chunks.iter().zip(&which) {
        match w.and_then(|k| frames[k].take()) {
            Some(f) => out.push(Coded { id: c.id, frame: f }),
            None => out.push(plain(c)),
        }
    }
    out.extend(extra.into_iter().map(|(id, _, frame)| Coded { id, frame }));
    Ok(out)
}
