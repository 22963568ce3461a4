//! The write path: encode chunks into frames on every core and append them, in chunk order, to
//! one [`FrameSink`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::input::{self, FileInput, FileStamp, Input};
use super::{Chunk, Progress, Written};
use crate::error::{Error, Result};
use crate::frame;
use crate::store::{FrameRef, FrameSink, PackSink};

/// Frames whose Git object ids are hashed together (one per AVX-512 lane).
const ID_BATCH: usize = 16;

/// The sink and what was written, shared by the workers.
struct Shared<'s> {
    sink: &'s mut dyn FrameSink,
    /// Per chunk, in input order.
    out: Vec<Option<Written>>,
    error: Option<Error>,
}

/// Encode `chunks` of `input` into frames and append them to `sink`.
///
/// Workers take batches of sixteen chunks in turn, encode them, hash the sixteen frames' Git
/// object ids at once, then append the batch to the one sink. Batches go in as they are done,
/// not in chunk order: a worker never waits for a slower one (on a busy machine that wait cost
/// more than the sink's lock). Memory: one batch of frames per worker.
///
/// An input that changed since the scan is an error, never a wrong frame: a file's stamp is
/// compared before and after (a write changes ctime); bytes not known to be those scanned are
/// hashed again as they are read. On error the sink may hold some frames: the caller aborts it.
/// Returns what was written, in input order.
pub fn write_frames(
    input: &dyn Input,
    chunks: &[Chunk],
    sink: &mut dyn FrameSink,
    progress: &dyn Progress,
) -> Result<Vec<Written>> {
    if chunks.is_empty() {
        return Ok(Vec::new());
    }
    let end = chunks.iter().map(|c| c.offset + c.len).max().unwrap_or(0);
    if end > input.len() {
        return Err(Error::Changed(format!(
            "{}: chunk ends at {end}, past its {} bytes",
            input.name(),
            input.len()
        )));
    }
    sink.reserve(chunks.len());
    let batches: Vec<&[Chunk]> = chunks.chunks(ID_BATCH).collect();
    let workers = rayon::current_num_threads().clamp(1, batches.len());
    let taken = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let shared = Mutex::new(Shared {
        sink,
        out: vec![None; chunks.len()],
        error: None,
    });
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
    let fail = |e: Error| {
        failed.store(true, Ordering::SeqCst);
        lock().error.get_or_insert(e);
    };
    let check_ids = !input.unchanged_since_scan();
    let work = || {
        let mut raw = Vec::new();
        let mut frames: Vec<Vec<u8>> = (0..ID_BATCH).map(|_| Vec::new()).collect();
        let mut lens = Vec::with_capacity(ID_BATCH);
        loop {
            let k = taken.fetch_add(1, Ordering::SeqCst);
            if k >= batches.len() || failed.load(Ordering::SeqCst) {
                return;
            }
            let batch = batches[k];
            lens.clear();
            // Frame buffers keep their length from chunk to chunk: a small chunk between two
            // large ones would otherwise cost a zero-fill of the next large one.
            let encoded = batch.iter().zip(frames.iter_mut()).try_for_each(|(c, f)| {
                let data = input::bytes(input, c.offset, c.offset + c.len, &mut raw)?;
                if check_ids && frame::chunk_id(data) != c.id {
                    return Err(Error::Changed(input.name().to_string()));
                }
                lens.push(frame::encode_frame_into(data, c.dtype, &c.id, f));
                input.release(c.offset, c.offset + c.len);
                progress.advance(c.len)
            });
            if let Err(e) = encoded {
                return fail(e);
            }
            let contents: Vec<&[u8]> = frames.iter().zip(&lens).map(|(f, &n)| &f[..n]).collect();
            let objects = crate::sha1x16::blob_ids(&contents);
            let mut t = lock();
            if t.error.is_some() {
                return;
            }
            for (j, ((c, f), object)) in batch.iter().zip(&contents).zip(&objects).enumerate() {
                let appended = frame::frame_info(f).and_then(|info| {
                    let at = t.sink.append(&FrameRef {
                        chunk: &c.id,
                        object,
                        bytes: f,
                    })?;
                    Ok(Written {
                        id: c.id,
                        object: *object,
                        frame_len: f.len() as u64,
                        planes: info.planes.into_iter().map(|p| p.0).collect(),
                        bases: info.bases,
                        at,
                    })
                });
                match appended {
                    Ok(w) => t.out[k * ID_BATCH + j] = Some(w),
                    Err(e) => {
                        failed.store(true, Ordering::SeqCst);
                        t.error.get_or_insert(e);
                        return;
                    }
                }
            }
        }
    };
    rayon::scope(|s| {
        for _ in 0..workers {
            s.spawn(|_| work());
        }
    });
    let t = shared.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = t.error {
        return Err(e);
    }
    input.check()?;
    Ok(t.out.into_iter().flatten().collect())
}

/// Encode the given chunks of the file at `path` into one new pack in `pack_dir` (fsynced, then
/// renamed into place). `stamp`: the file's stamp when it was scanned. Returns the pack's name
/// and path (none if there were no chunks) and what was written, in input order.
#[allow(clippy::type_complexity)]
pub fn write_pack(
    path: &Path,
    chunks: &[Chunk],
    pack_dir: &Path,
    stamp: Option<FileStamp>,
    progress: &dyn Progress,
) -> Result<(Option<(String, std::path::PathBuf)>, Vec<Written>)> {
    if chunks.is_empty() {
        return Ok((None, Vec::new()));
    }
    let input = FileInput::open_scanned(path, stamp)?;
    let mut sink = PackSink::new(pack_dir, 0);
    let written = write_frames(&input, chunks, &mut sink, progress)?;
    let pack = sink.finish()?.map(|(name, path, _)| (name, path));
    Ok((pack, written))
}
