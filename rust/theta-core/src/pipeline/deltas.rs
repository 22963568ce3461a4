//! The write path for changed tensors: each is coded against the same tensor of an earlier
//! version (its base), chunk by chunk, as the smallest of the plain frame and the deltas
//! [`crate::tensordelta`] knows.

use std::collections::HashMap;
use std::sync::Mutex;

use rayon::prelude::*;

use super::input::{self, Input};
use super::read::{read_into, RestoreChunk};
use super::{Chunk, Progress, Written};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::frame::{self, ChunkId};
use crate::lowrank;
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
    let sink = Mutex::new(sink);
    // Append frames and say what was written, in the order given.
    let append = |coded: &[Coded]| -> Result<Vec<Written>> {
        let contents: Vec<&[u8]> = coded.iter().map(|c| &c.frame[..]).collect();
        let objects = crate::sha1x16::blob_ids(&contents);
        let mut guard = sink.lock().unwrap_or_else(|p| p.into_inner());
        coded
            .iter()
            .zip(&objects)
            .map(|(c, object)| {
                let info = frame::frame_info(&c.frame)?;
                let at = guard.append(&FrameRef {
                    chunk: &c.id,
                    object,
                    bytes: &c.frame,
                })?;
                Ok(Written {
                    id: c.id,
                    object: *object,
                    frame_len: c.frame.len() as u64,
                    planes: info.planes.into_iter().map(|p| p.0).collect(),
                    bases: info.bases,
                    at,
                })
            })
            .collect()
    };
    // Each job's frames keep their place: the result is in job order whatever order they finish in.
    let placed: Vec<Result<(Vec<Written>, Vec<Written>)>> = jobs
        .par_iter()
        .map(|job| {
            let whole = job.factors.is_some()
                || lowrank::whole_tensor(job.dtype, &job.shape, job.len as usize);
            let done = if whole {
                let (coded, extra) = code_whole(input, job, source, max_depth, check_ids)?;
                (append(&coded)?, append(&extra)?)
            } else {
                (
                    code_by_chunk(input, job, source, max_depth, check_ids, &append)?,
                    Vec::new(),
                )
            };
            progress.advance(job.chunks.iter().map(|c| c.len).sum())?;
            Ok(done)
        })
        .collect();
    let mut written = Vec::with_capacity(total);
    let mut extras = Vec::new();
    for w in placed {
        let (w, e) = w?;
        written.extend(w);
        extras.extend(e);
    }
    input.check()?;
    written.extend(extras);
    Ok(written)
}

/// The base tensor's chunks by their offset in the tensor.
fn base_at(job: &DeltaJob) -> HashMap<u64, &RestoreChunk> {
    let mut at = HashMap::with_capacity(job.base.len());
    let mut pos = 0u64;
    for c in &job.base {
        at.insert(pos, c);
        pos += c.len;
    }
    at
}

/// A tensor that needs no whole-tensor view (no factors to find): each chunk is coded against
/// its base chunk alone, in parallel, and appended at once, so memory stays a few chunks per
/// thread whatever the tensor's size.
fn code_by_chunk(
    input: &dyn Input,
    job: &DeltaJob,
    source: &dyn FrameSource,
    max_depth: usize,
    check_ids: bool,
    append: &(dyn Fn(&[Coded]) -> Result<Vec<Written>> + Sync),
) -> Result<Vec<Written>> {
    let at = base_at(job);
    let written: Vec<Result<Written>> = job
        .chunks
        .par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(scratch, base), c| {
                let new = input::bytes(input, c.offset, c.offset + c.len, scratch)?;
                if check_ids && frame::chunk_id(new) != c.id {
                    return Err(Error::Changed(input.name().to_string()));
                }
                let mut frame = None;
                if let Some(b) = at.get(&(c.offset - job.offset)) {
                    if b.len == c.len && b.id != c.id {
                        base.resize(c.len as usize, 0);
                        let depth = read_into(std::slice::from_ref(*b), source, base)?[0];
                        if depth < max_depth {
                            frame =
                                Some(tensordelta::encode_chunk(new, base, &b.id, c.dtype, &c.id)?);
                        }
                    }
                }
                let frame =
                    frame.unwrap_or_else(|| frame::encode_frame_with_id(new, c.dtype, &c.id));
                let mut w = append(&[Coded { id: c.id, frame }])?;
                input.release(c.offset, c.offset + c.len);
                Ok(w.remove(0))
            },
        )
        .collect();
    written.into_iter().collect()
}

/// A tensor whose change may be low-rank: the whole base tensor is decoded and the tensor coded
/// at once. Returns the frames of the job's chunks, in order, and those of its extra chunks.
fn code_whole(
    input: &dyn Input,
    job: &DeltaJob,
    source: &dyn FrameSource,
    max_depth: usize,
    check_ids: bool,
) -> Result<(Vec<Coded>, Vec<Coded>)> {
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
        return Ok((job.chunks.iter().map(plain).collect(), Vec::new()));
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
    let extra = extra
        .into_iter()
        .map(|(id, _, frame)| Coded { id, frame })
        .collect();
    input.release(job.offset, job.offset + job.len);
    Ok((out, extra))
}
