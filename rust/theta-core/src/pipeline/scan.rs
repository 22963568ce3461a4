//! The scan: cut the input into chunks along the format's spans and hash it (the file's BLAKE3
//! and every chunk's), in one pass.

use std::path::Path;

use rayon::prelude::*;

use super::input::{self, FileInput, FileStamp, Input};
use super::{tensor_chunk_len, Chunk, Progress, Span};
use crate::cdc::{self, CdcParams};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::frame::{self, ChunkId};

/// Bytes hashed per step (and read per step where the input is not in memory).
const WINDOW: u64 = 16 << 20;

#[derive(Debug)]
pub struct Scan {
    /// The file's stamp when it was scanned (none for buffers).
    pub stamp: Option<FileStamp>,
    pub size: u64,
    pub file_id: ChunkId,
    /// Chunks of each span, in order.
    pub spans: Vec<Vec<Chunk>>,
}

/// Cut opaque span `[offset, offset+len)` with CDC: on the bytes in place, or through a rolling
/// buffer where they are not in memory.
fn cdc_cuts(input: &dyn Input, offset: u64, len: u64, p: &CdcParams) -> Result<Vec<u64>> {
    let mut cuts = Vec::new();
    if len <= p.min as u64 {
        if len > 0 {
            cuts.push(len);
        }
        return Ok(cuts);
    }
    if let Some(all) = input.slice(offset, offset + len) {
        let mut pos = 0usize;
        while pos < all.len() {
            let need = p.max.min(all.len() - pos);
            let cut = cdc::next_cut(&all[pos..pos + need], p);
            cuts.push(cut as u64);
            pos += cut;
        }
        return Ok(cuts);
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_start = 0u64; // span-relative offset of buf[0]
    let mut pos = 0u64;
    while pos < len {
        let need = (p.max as u64).min(len - pos);
        if pos + need > buf_start + buf.len() as u64 {
            // Drop consumed bytes, then read enough for several chunks at once.
            let keep_from = (pos - buf_start) as usize;
            buf.drain(..keep_from);
            buf_start = pos;
            let want = (need.max(WINDOW)).min(len - pos) as usize;
            let have = buf.len();
            buf.resize(want, 0);
            input.read_into(offset + buf_start + have as u64, &mut buf[have..])?;
        }
        let rel = (pos - buf_start) as usize;
        let cut = cdc::next_cut(&buf[rel..rel + need as usize], p) as u64;
        cuts.push(cut);
        pos += cut;
    }
    Ok(cuts)
}

/// Chunk boundaries of every span (ids not yet set).
fn boundaries(input: &dyn Input, spans: &[Span], chunk_bytes: u64) -> Result<Vec<Vec<Chunk>>> {
    let name = input.name();
    let size = input.len();
    let mut pos = 0u64;
    for (i, s) in spans.iter().enumerate() {
        if s.offset != pos {
            return Err(Error::InvalidArgument(format!(
                "{name}: span {i} starts at {} but the previous one ends at {pos}",
                s.offset
            )));
        }
        pos = s
            .offset
            .checked_add(s.len)
            .ok_or_else(|| Error::InvalidArgument("span overflows".into()))?;
    }
    if pos != size {
        // A file that is no longer the size its format adapter read is one that changed.
        return Err(Error::Changed(format!(
            "{name}: spans cover {pos} bytes but it has {size}"
        )));
    }
    let params = CdcParams::for_chunk_bytes(chunk_bytes as usize);
    let mut per_span: Vec<Vec<Chunk>> = Vec::with_capacity(spans.len());
    for s in spans {
        let lens: Vec<u64> = if s.opaque {
            cdc_cuts(input, s.offset, s.len, &params)?
        } else {
            let step = tensor_chunk_len(chunk_bytes, s.align);
            let mut v = Vec::with_capacity((s.len / step + 1) as usize);
            let mut left = s.len;
            while left > 0 {
                let l = left.min(step);
                v.push(l);
                left -= l;
            }
            v
        };
        let mut off = s.offset;
        per_span.push(
            lens.into_iter()
                .map(|l| {
                    let c = Chunk {
                        offset: off,
                        len: l,
                        dtype: if s.opaque { DType::Bytes } else { s.dtype },
                        id: [0; 32],
                    };
                    off += l;
                    c
                })
                .collect(),
        );
    }
    Ok(per_span)
}

/// Cut the file at `path` into chunks and hash it.
pub fn scan_file(
    path: &Path,
    spans: &[Span],
    chunk_bytes: u64,
    progress: &dyn Progress,
) -> Result<Scan> {
    let input = FileInput::open(path)?;
    let mut scan = scan(&input, spans, chunk_bytes, progress)?;
    scan.stamp = Some(input.stamp);
    Ok(scan)
}

/// Cut `input` into chunks and hash it: its BLAKE3 and every chunk id.
///
/// Hashing goes in windows of whole chunks: the whole input's hash on one thread, chunk ids on
/// the others, while the next window is read (where the input is not in memory already).
pub fn scan(
    input: &dyn Input,
    spans: &[Span],
    chunk_bytes: u64,
    progress: &dyn Progress,
) -> Result<Scan> {
    let mut per_span = boundaries(input, spans, chunk_bytes)?;
    let mut all: Vec<&mut Chunk> = per_span.iter_mut().flatten().collect();
    let mut windows: Vec<(usize, usize, u64, u64)> = Vec::new();
    let mut i = 0;
    while i < all.len() {
        let start = all[i].offset;
        let mut j = i;
        let mut end = start;
        while j < all.len() && (j == i || end - start + all[j].len <= WINDOW) {
            end += all[j].len;
            j += 1;
        }
        windows.push((i, j, start, end));
        i = j;
    }
    let mut file_hasher = blake3::Hasher::new();
    let read = |buf: &mut Vec<u8>, w: Option<&(usize, usize, u64, u64)>| -> Result<()> {
        match w {
            Some(&(_, _, start, end)) if input.slice(start, end).is_none() => {
                input::bytes(input, start, end, buf).map(|_| ())
            }
            _ => Ok(()),
        }
    };
    let mut cur: Vec<u8> = Vec::new();
    let mut next: Vec<u8> = Vec::new();
    read(&mut cur, windows.first())?;
    let mut rest = &mut all[..];
    for (k, &(i, j, start, end)) in windows.iter().enumerate() {
        let (window, tail) = std::mem::take(&mut rest).split_at_mut(j - i);
        rest = tail;
        let data = match input.slice(start, end) {
            Some(d) => d,
            None => &cur[..(end - start) as usize],
        };
        let (got, ()) = rayon::join(
            || read(&mut next, windows.get(k + 1)),
            || {
                rayon::join(
                    || file_hasher.update(data),
                    || {
                        window.par_iter_mut().for_each(|c| {
                            let a = (c.offset - start) as usize;
                            c.id = frame::chunk_id(&data[a..a + c.len as usize]);
                        })
                    },
                );
            },
        );
        got?;
        input.release(start, end);
        std::mem::swap(&mut cur, &mut next);
        progress.advance(end - start)?;
    }
    input.check()?;
    Ok(Scan {
        stamp: None,
        size: input.len(),
        file_id: *file_hasher.finalize().as_bytes(),
        spans: per_span,
    })
}
