//! The read path: decode the frames of a version from a [`FrameSource`] into a file, a pkt-line
//! stream (the smudge side of the filter process) or memory.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use super::Progress;
use crate::error::{Error, Result};
use crate::frame::{self, hex, BaseCodec, ChunkId};
use crate::lowrank::MAX_FACTORS_BYTES;
use crate::pack::ObjectId;
use crate::store::{FrameSource, Location};
use crate::tensordelta::codecs;

pub use crate::store::ObjectStore;

/// One chunk of a version, as the read path wants it.
#[derive(Debug, Clone)]
pub struct RestoreChunk {
    pub len: u64,
    pub id: ChunkId,
    pub object: ObjectId,
    /// Where its frame is, if known; else it is asked for by id.
    pub at: Option<Location>,
}

thread_local! {
    /// Frame bytes read from a pack (reused: a fresh 2 MiB buffer per chunk costs page faults).
    static FRAME: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether a decoded chunk is hashed and compared with its id.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verify {
    Chunk,
    /// The caller checks the whole file's BLAKE3 before anything it wrote may be used.
    ByFile,
}

/// Bases of bases are followed this deep at most (a bound against cycles in hostile frames).
const MAX_BASE_DEPTH: usize = 8;

/// Largest chunk a frame may claim (chunks are a few MiB): bounds what a header can allocate.
const MAX_CHUNK: u64 = 1 << 30;

/// The raw bytes of base chunk `id`, decoded (bases of its own included) and verified, and its
/// chain depth (0: a frame without bases).
fn base(
    source: &dyn FrameSource,
    codecs: &[&dyn BaseCodec],
    id: &ChunkId,
    level: usize,
    max_len: u64,
) -> Result<(Vec<u8>, usize)> {
    if level > MAX_BASE_DEPTH {
        return Err(Error::CorruptFrame(format!(
            "base chunk {}: bases nest deeper than {MAX_BASE_DEPTH}",
            hex(id)
        )));
    }
    let f = source.read_by_id(id, None)?;
    let info = frame::frame_info(&f)?;
    if info.id != *id || info.raw_len > max_len {
        return Err(Error::CorruptFrame(format!(
            "base chunk {}: its frame holds chunk {} of {} bytes (at most {max_len} expected)",
            hex(id),
            hex(&info.id),
            info.raw_len
        )));
    }
    let mut out = vec![0u8; info.raw_len as usize];
    let (_, depth) = decode_counting(&f, &mut out, source, codecs, level, Verify::Chunk)?;
    Ok((out, depth))
}

/// Decode `frame` into `out`, its bases from `source` at nesting `level`; returns the header and
/// the frame's chain depth (0 without bases, else one more than its deepest base).
fn decode_counting(
    frame: &[u8],
    out: &mut [u8],
    source: &dyn FrameSource,
    codecs: &[&dyn BaseCodec],
    level: usize,
    verify: Verify,
) -> Result<(frame::FrameInfo, usize)> {
    let deepest = AtomicUsize::new(0);
    // A frame's first base is the chunk's own earlier version (as long as the chunk); any other
    // is a low-rank factors chunk. Bounded before a byte is allocated for a base's claim.
    let first = frame::frame_info(frame)?.bases.first().copied();
    let chunk_len = out.len() as u64;
    let resolve = |b: &ChunkId| {
        let max_len = if Some(*b) == first {
            chunk_len
        } else {
            MAX_FACTORS_BYTES
        };
        let (raw, d) = base(source, codecs, b, level + 1, max_len)?;
        deepest.fetch_max(d + 1, Ordering::Relaxed);
        Ok(raw)
    };
    let info = match verify {
        Verify::Chunk => frame::decode_frame_with(frame, out, &resolve, codecs),
        Verify::ByFile => frame::decode_frame_unverified_with(frame, out, &resolve, codecs),
    }?;
    Ok((info, deepest.into_inner()))
}

/// Decode one chunk's frame into `out` (its exact length), checking it is the chunk wanted.
/// Returns the chunk's chain depth (0: stored without bases).
fn decode_chunk(
    c: &RestoreChunk,
    source: &dyn FrameSource,
    codecs: &[&dyn BaseCodec],
    out: &mut [u8],
    verify: Verify,
) -> Result<usize> {
    let max = c.len * 2 + 4096;
    FRAME.with(|cell| {
        let mut buf = cell.borrow_mut();
        let in_place = match c.at {
            Some(at) => source.read_at(at, max, &mut buf)?,
            None => false,
        };
        let fetched;
        let frame: &[u8] = if in_place {
            &buf
        } else {
            fetched = source.read_by_id(&c.id, Some(&c.object))?;
            &fetched
        };
        let (info, depth) =
            decode_counting(frame, out, source, codecs, 1, verify).map_err(|e| match e {
                Error::CorruptFrame(m) => {
                    Error::CorruptFrame(format!("object {}: {m}", hex(&c.object)))
                }
                e => e,
            })?;
        if info.id != c.id {
            return Err(Error::CorruptFrame(format!(
                "object {} holds chunk {} but the manifest wants {}",
                hex(&c.object),
                hex(&info.id),
                hex(&c.id)
            )));
        }
        Ok(depth)
    })
}

/// The whole file's BLAKE3 is the one check of a restore or a smudge stream: every byte passes
/// it before the file may be used. Only when it fails are the chunks decoded again, each hashed,
/// to name the one at fault.
fn check_file_id(
    got: &ChunkId,
    want: &ChunkId,
    chunks: &[RestoreChunk],
    source: &dyn FrameSource,
) -> Result<()> {
    if got == want {
        return Ok(());
    }
    chunks.par_iter().try_for_each_init(Vec::new, |buf, c| {
        buf.resize(c.len as usize, 0);
        decode_chunk(c, source, codecs(), buf, Verify::Chunk).map(|_| ())
    })?;
    Err(Error::CorruptFrame(format!(
        "restored file hashes to {} but the manifest says {}",
        hex(got),
        hex(want)
    )))
}

/// The chunks of a manifest must add up to the file's size.
fn check_total(chunks: &[RestoreChunk], size: u64) -> Result<()> {
    let total: u64 = chunks.iter().map(|c| c.len).sum();
    if total != size {
        return Err(Error::CorruptFrame(format!(
            "manifest chunks add up to {total} bytes but the file should have {size}"
        )));
    }
    Ok(())
}

/// BLAKE3 of a whole file, read back in windows and hashed on all cores.
fn hash_file(file: &File, name: &str, size: u64) -> Result<ChunkId> {
    const WINDOW: u64 = 16 << 20;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; WINDOW.min(size) as usize];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(WINDOW) as usize;
        file.read_exact_at(&mut buf[..n], pos)
            .map_err(|e| Error::io(name, e))?;
        hasher.update_rayon(&buf[..n]);
        pos += n as u64;
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Decode the frames of `chunks` (one after the other, they make the file) into `out_path`,
/// verifying the total size and the file's BLAKE3, then fsync.
///
/// Workers decode chunks and write them at their offsets in parallel (page-cache writes are
/// copy-bound: one writer thread would be the bottleneck); the file's BLAKE3 is then computed by
/// reading it back on all cores while the fsync runs. That one hash covers every byte (the
/// caller renames the file into place only after it passed), so the chunks are not hashed on
/// the way; on a mismatch they are, to name the damaged one.
pub fn restore_file(
    out_path: &Path,
    chunks: &[RestoreChunk],
    size: u64,
    file_id: &ChunkId,
    source: &dyn FrameSource,
    progress: &dyn Progress,
) -> Result<()> {
    let out_name = out_path.display().to_string();
    check_total(chunks, size)?;
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out_path)
        .map_err(|e| Error::io(&out_name, e))?;
    out.set_len(size).map_err(|e| Error::io(&out_name, e))?;
    let mut offsets = Vec::with_capacity(chunks.len());
    let mut pos = 0u64;
    for c in chunks {
        offsets.push(pos);
        pos += c.len;
    }
    // Writeback starts while chunks are still being decoded: the final fsync waits for the tail.
    let mut flusher = crate::pack::Flusher::start(&out);
    let written =
        chunks
            .par_iter()
            .zip(offsets.par_iter())
            .try_for_each_init(Vec::new, |buf, (c, &off)| {
                buf.resize(c.len as usize, 0);
                decode_chunk(c, source, codecs(), buf, Verify::ByFile)?;
                out.write_all_at(buf, off)
                    .map_err(|e| Error::io(&out_name, e))?;
                flusher.wrote(c.len);
                progress.advance(c.len)
            });
    let flushed = flusher.stop().map_err(|e| Error::io(&out_name, e));
    written?;
    flushed?;
    let (synced, got) = rayon::join(
        || out.sync_all().map_err(|e| Error::io(&out_name, e)),
        || hash_file(&out, &out_name, size),
    );
    synced?;
    let got = got?;
    check_file_id(&got, file_id, chunks, source)
}

/// Decode `chunks` in order and send them as pkt-line content packets to `out` (the smudge side
/// of the filter process), verifying the file's BLAKE3 over everything sent. git keeps nothing
/// before the final status, so that one check covers every byte; hashing each chunk too would
/// be a second pass over the same bytes, CPU that git's reading competes for. Batches of about
/// 32 MiB are decoded in parallel while the previous batch is written.
pub fn stream_file(
    out: &mut (dyn std::io::Write + Send),
    chunks: &[RestoreChunk],
    size: u64,
    file_id: &ChunkId,
    source: &dyn FrameSource,
) -> Result<()> {
    const BATCH: u64 = 32 << 20;
    check_total(chunks, size)?;
    let mut groups: Vec<&[RestoreChunk]> = Vec::new();
    let mut i = 0;
    while i < chunks.len() {
        let (mut j, mut bytes) = (i, 0);
        while j < chunks.len() && (j == i || bytes + chunks[j].len <= BATCH) {
            bytes += chunks[j].len;
            j += 1;
        }
        groups.push(&chunks[i..j]);
        i = j;
    }
    // Chunk buffers circulate (a fresh buffer per chunk costs page faults on every byte).
    let pool: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
    let take = |len: u64| -> Vec<u8> {
        let mut b = pool
            .lock()
            .map(|mut p| p.pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        // Old bytes may stay: the decoder overwrites every byte of the chunk.
        b.resize(len as usize, 0);
        b
    };
    let decode = |g: &[RestoreChunk]| -> Result<Vec<Vec<u8>>> {
        g.par_iter()
            .map(|c| {
                let mut raw = take(c.len);
                decode_chunk(c, source, codecs(), &mut raw, Verify::ByFile)?;
                Ok(raw)
            })
            .collect()
    };
    let mut hasher = blake3::Hasher::new();
    let mut pending: Option<Vec<Vec<u8>>> = None;
    for g in groups.iter().map(Some).chain(std::iter::once(None)) {
        let (sent, next) = rayon::join(
            || -> Result<()> {
                for raw in pending.take().unwrap_or_default() {
                    hasher.update(&raw);
                    crate::pktline::send(out, &raw)
                        .map_err(|e| Error::io("git (filter output)", e))?;
                    if let Ok(mut p) = pool.lock() {
                        p.push(raw);
                    }
                }
                Ok(())
            },
            || g.map(|g| decode(g)).transpose(),
        );
        sent?;
        pending = next?;
    }
    let got = *hasher.finalize().as_bytes();
    check_file_id(&got, file_id, chunks, source)
}

/// Decode chunks to memory (for lazy tensor reads), in parallel, verifying every id.
pub fn read_chunks(chunks: &[RestoreChunk], source: &dyn FrameSource) -> Result<Vec<Vec<u8>>> {
    read_chunks_with(chunks, source, codecs())
}

/// [`read_chunks`] with codecs for frames that refer to base chunks (format 3).
pub fn read_chunks_with(
    chunks: &[RestoreChunk],
    source: &dyn FrameSource,
    codecs: &[&dyn BaseCodec],
) -> Result<Vec<Vec<u8>>> {
    chunks
        .par_iter()
        .map(|c| {
            if c.len > MAX_CHUNK {
                return Err(Error::CorruptFrame(format!(
                    "chunk {} of {} bytes exceeds the 1 GiB chunk limit",
                    hex(&c.id),
                    c.len
                )));
            }
            let mut raw = vec![0u8; c.len as usize];
            decode_chunk(c, source, codecs, &mut raw, Verify::Chunk)?;
            Ok(raw)
        })
        .collect()
}

/// Decode `chunks` one after the other into `out` (their total length), verifying each id, in
/// parallel; returns each chunk's chain depth. The write path reads a delta's base tensor so.
pub fn read_into(
    chunks: &[RestoreChunk],
    source: &dyn FrameSource,
    out: &mut [u8],
) -> Result<Vec<usize>> {
    let total: u64 = chunks.iter().map(|c| c.len).sum();
    if total != out.len() as u64 {
        return Err(Error::InvalidArgument(format!(
            "{total} bytes of chunks into a buffer of {}",
            out.len()
        )));
    }
    let mut parts = Vec::with_capacity(chunks.len());
    let mut rest = out;
    for c in chunks {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(c.len as usize);
        parts.push(head);
        rest = tail;
    }
    chunks
        .par_iter()
        .zip(parts.into_par_iter())
        .map(|(c, part)| decode_chunk(c, source, codecs(), part, Verify::Chunk))
        .collect()
}
