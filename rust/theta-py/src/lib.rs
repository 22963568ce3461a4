//! `theta_store._native`: thin bindings over theta-core. Conversions, GIL release, error mapping;
//! nothing clever lives here.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyMemoryView};

use theta_core::frame::{self, ChunkId};
use theta_core::pack::{self, ObjectId};
use theta_core::pipeline::{self, Chunk, ObjectStore, Progress, RestoreChunk, Source, Span};
use theta_core::{DType, Error};

pyo3::import_exception!(theta_store.errors, CorruptObject);

/// Below this many bytes releasing the GIL costs more than it saves.
const GIL_MINSIZE: usize = 2048;

/// Map a core error onto the Python hierarchy (errors.py). Exhaustive on purpose.
fn to_py(e: Error) -> PyErr {
    match e {
        Error::Io { path, source } => match source.raw_os_error() {
            Some(code) => PyOSError::new_err((code, source.to_string(), path)),
            None => PyOSError::new_err(format!("{path}: {source}")),
        },
        Error::CorruptFrame(_) | Error::CorruptPack { .. } => CorruptObject::new_err(e.to_string()),
        Error::InvalidArgument(msg) => PyValueError::new_err(msg),
        Error::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err("interrupted"),
    }
}

/// Borrow a contiguous buffer as bytes.
fn with_bytes<R>(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    f: impl FnOnce(Python<'_>, &[u8]) -> R,
) -> PyResult<R> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(f(py, b.as_bytes()));
    }
    // Typed buffers (numpy float arrays...) are viewed as bytes through memoryview.cast("B"),
    // which also refuses non-contiguous input.
    let buf = match PyBuffer::<u8>::get(obj) {
        Ok(b) => b,
        Err(_) => {
            let mv = PyMemoryView::from(obj)?;
            let flat = mv.call_method1("cast", ("B",)).map_err(|_| {
                PyValueError::new_err(
                    "buffer must be C-contiguous (call numpy.ascontiguousarray first)",
                )
            })?;
            PyBuffer::<u8>::get(&flat)?
        }
    };
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "buffer must be C-contiguous (call numpy.ascontiguousarray first)",
        ));
    }
    let len = buf.len_bytes();
    // SAFETY: the buffer is C-contiguous, of `len` bytes, and kept alive by `buf` for the whole
    // call. As in blake3-py, a caller mutating it from another thread concurrently gets garbage
    // hashes, not memory unsafety.
    #[allow(unsafe_code)]
    let slice = unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, len) };
    Ok(f(py, slice))
}

fn dtype(name: &str) -> PyResult<DType> {
    DType::from_name(name)
        .ok_or_else(|| PyValueError::new_err(format!("unknown codec dtype {name:?}")))
}

fn id32(b: &[u8], what: &str) -> PyResult<ChunkId> {
    b.try_into()
        .map_err(|_| PyValueError::new_err(format!("{what} must be 32 bytes")))
}

fn id20(b: &[u8], what: &str) -> PyResult<ObjectId> {
    b.try_into()
        .map_err(|_| PyValueError::new_err(format!("{what} must be 20 bytes")))
}

/// Hash a buffer with `f`, releasing the GIL unless the buffer is small.
fn hash_buffer<'py, const N: usize>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    f: fn(&[u8]) -> [u8; N],
) -> PyResult<Bound<'py, PyBytes>> {
    let id = with_bytes(py, data, |py, d| {
        if d.len() < GIL_MINSIZE {
            f(d)
        } else {
            py.detach(|| f(d))
        }
    })?;
    Ok(PyBytes::new(py, &id))
}

/// BLAKE3-256 of a buffer (the chunk id).
#[pyfunction]
fn chunk_id<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    hash_buffer(py, data, frame::chunk_id)
}

/// Git blob id (SHA-1 of "blob <len>\0" + data).
#[pyfunction]
fn blob_id<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    hash_buffer(py, data, pack::blob_id)
}

/// Encode one chunk as a frame.
#[pyfunction]
fn encode_frame<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    dtype_name: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let dt = dtype(dtype_name)?;
    let f = with_bytes(py, data, |py, d| py.detach(|| frame::encode_frame(d, dt)))?;
    Ok(PyBytes::new(py, &f))
}

/// Decode a frame, verifying its BLAKE3.
#[pyfunction]
fn decode_frame<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let raw = with_bytes(py, data, |py, d| py.detach(|| frame::decode_frame(d)))?.map_err(to_py)?;
    Ok(PyBytes::new(py, &raw.0))
}

fn mode_name(m: &frame::PlaneMode) -> &'static str {
    match m {
        frame::PlaneMode::Raw => "raw",
        frame::PlaneMode::Zstd => "zstd",
        frame::PlaneMode::Rans => "rans",
    }
}

/// Parse a frame header: codec, dtype, raw_len, id, planes [(mode, stored_len)].
#[pyfunction]
fn frame_info<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let info = with_bytes(py, data, |_, d| frame::frame_info(d))?.map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("codec", info.codec)?;
    d.set_item("dtype", info.dtype.name())?;
    d.set_item("raw_len", info.raw_len)?;
    d.set_item("id", PyBytes::new(py, &info.id))?;
    let modes: Vec<(&str, u64)> = info
        .planes
        .iter()
        .map(|(m, l)| (mode_name(m), *l))
        .collect();
    d.set_item("planes", modes)?;
    d.set_item("stored_len", info.stored_len())?;
    Ok(d)
}

/// Holds the first Python exception raised by a callback while the GIL was released.
#[derive(Default)]
struct ErrorSlot(Mutex<Option<PyErr>>);

impl ErrorSlot {
    fn keep(&self, e: PyErr) -> Error {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        Error::Interrupted
    }
    fn finish<T>(self, r: Result<T, Error>) -> PyResult<T> {
        let kept = self.0.into_inner().unwrap_or_else(|p| p.into_inner());
        match (r, kept) {
            (Ok(v), _) => Ok(v),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(to_py(e)),
        }
    }
}

/// Calls a Python progress callback (if any) and polls for Ctrl-C.
struct PyProgress<'a> {
    callback: Option<&'a Py<PyAny>>,
    errors: &'a ErrorSlot,
}

impl Progress for PyProgress<'_> {
    fn advance(&self, bytes: u64) -> Result<(), Error> {
        Python::attach(|py| {
            py.check_signals().map_err(|e| self.errors.keep(e))?;
            if let Some(cb) = self.callback {
                cb.call1(py, (bytes,)).map_err(|e| self.errors.keep(e))?;
            }
            Ok(())
        })
    }
}

struct PyStore<'a> {
    read: &'a Py<PyAny>,
    errors: &'a ErrorSlot,
}

impl ObjectStore for PyStore<'_> {
    fn read(&self, object: &ObjectId) -> Result<Vec<u8>, Error> {
        Python::attach(|py| {
            let r = self
                .read
                .call1(py, (PyBytes::new(py, object),))
                .map_err(|e| self.errors.keep(e))?;
            r.extract::<Vec<u8>>(py).map_err(|e| self.errors.keep(e))
        })
    }
}

/// (dev, ino, size, mtime_ns, ctime_ns) of a scanned file.
type Stamp = (u64, u64, u64, i128, i128);

type ChunkTuple<'py> = (u64, u64, Bound<'py, PyBytes>, Bound<'py, PyBytes>);

/// Cut a file into chunks and hash it.
///
/// spans: [(offset, length, dtype, align, opaque)] tiling the file. Returns
/// (size, file_blake3, [[(offset, length, dtype, chunk_id)] per span]).
#[pyfunction]
#[pyo3(signature = (path, spans, chunk_bytes, progress=None))]
#[allow(clippy::type_complexity)]
fn scan_file<'py>(
    py: Python<'py>,
    path: PathBuf,
    spans: Vec<(u64, u64, String, u64, bool)>,
    chunk_bytes: u64,
    progress: Option<Py<PyAny>>,
) -> PyResult<(
    u64,
    Bound<'py, PyBytes>,
    Vec<Vec<(u64, u64, String, Bound<'py, PyBytes>)>>,
    Stamp,
)> {
    if chunk_bytes < 64 {
        return Err(PyValueError::new_err("chunk_bytes must be at least 64"));
    }
    let spans: Vec<Span> = spans
        .into_iter()
        .map(|(offset, len, dt, align, opaque)| {
            Ok(Span {
                offset,
                len,
                dtype: if opaque {
                    DType::Bytes
                } else {
                    DType::from_name(&dt).unwrap_or(DType::Bytes)
                },
                align: align.max(1),
                opaque,
            })
        })
        .collect::<PyResult<_>>()?;
    let errors = ErrorSlot::default();
    let r = {
        let p = PyProgress {
            callback: progress.as_ref(),
            errors: &errors,
        };
        py.detach(|| pipeline::scan_file(&path, &spans, chunk_bytes, &p))
    };
    let scan = errors.finish(r)?;
    let out = scan
        .spans
        .iter()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    (
                        c.offset,
                        c.len,
                        c.dtype.name().to_string(),
                        PyBytes::new(py, &c.id),
                    )
                })
                .collect()
        })
        .collect();
    let st = scan.stamp;
    Ok((
        scan.size,
        PyBytes::new(py, &scan.file_id),
        out,
        (st.dev, st.ino, st.size, st.mtime_ns, st.ctime_ns),
    ))
}

/// Write small objects ([(kind, data)], kind "blob", "tree" or "commit") as one pack into
/// pack_dir (fsynced, atomically renamed). Returns the pack's name.
#[pyfunction]
fn write_objects(
    py: Python<'_>,
    objects: Vec<(String, Vec<u8>)>,
    pack_dir: PathBuf,
) -> PyResult<String> {
    let objects: Vec<(pack::Kind, Vec<u8>)> = objects
        .into_iter()
        .map(|(k, d)| {
            pack::Kind::from_name(&k)
                .map(|k| (k, d))
                .ok_or_else(|| PyValueError::new_err(format!("unknown object kind {k:?}")))
        })
        .collect::<PyResult<_>>()?;
    let r = py.detach(|| -> theta_core::Result<String> {
        let count = u32::try_from(objects.len())
            .map_err(|_| Error::InvalidArgument("too many objects for one pack".into()))?;
        let mut w = pack::PackWriter::create(&pack_dir, count)?;
        for (k, d) in &objects {
            if let Err(e) = w.append_stored(&pack::StoredEntry::new(*k, d)) {
                w.abort();
                return Err(e);
            }
        }
        w.finish().map(|(name, _)| name)
    });
    r.map_err(to_py)
}

/// Encode the given chunks of a file and write them as packs (one per worker) into pack_dir.
///
/// chunks: [(offset, length, dtype, chunk_id)]. Returns ([pack names],
/// [(chunk_id, object_id, frame_len, "mode+mode+...")]).
#[pyfunction]
#[pyo3(signature = (path, chunks, pack_dir, stamp=None, progress=None))]
#[allow(clippy::type_complexity)]
fn write_pack<'py>(
    py: Python<'py>,
    path: PathBuf,
    chunks: Vec<(u64, u64, String, Vec<u8>)>,
    pack_dir: PathBuf,
    stamp: Option<Stamp>,
    progress: Option<Py<PyAny>>,
) -> PyResult<(
    Vec<String>,
    Vec<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, u64, String)>,
)> {
    let chunks: Vec<Chunk> = chunks
        .into_iter()
        .map(|(offset, len, dt, id)| {
            Ok(Chunk {
                offset,
                len,
                dtype: dtype(&dt)?,
                id: id32(&id, "chunk id")?,
            })
        })
        .collect::<PyResult<_>>()?;
    let errors = ErrorSlot::default();
    let r = {
        let p = PyProgress {
            callback: progress.as_ref(),
            errors: &errors,
        };
        let stamp = stamp.map(|(dev, ino, size, mtime_ns, ctime_ns)| pipeline::FileStamp {
            dev,
            ino,
            size,
            mtime_ns,
            ctime_ns,
        });
        py.detach(|| pipeline::write_pack(&path, &chunks, &pack_dir, stamp, &p))
    };
    let (name, written) = errors.finish(r)?;
    Ok((
        name,
        written
            .iter()
            .map(|w| {
                let planes: Vec<&str> = w.planes.iter().map(mode_name).collect();
                (
                    PyBytes::new(py, &w.id),
                    PyBytes::new(py, &w.object),
                    w.frame_len,
                    planes.join("+"),
                )
            })
            .collect(),
    ))
}

fn restore_chunks(chunks: Vec<ChunkTuple<'_>>) -> PyResult<Vec<RestoreChunk>> {
    chunks
        .into_iter()
        .map(|(len, location, id, object)| {
            // location: pack number << 48 | offset, or u64::MAX for "ask the object store".
            let source = if location == u64::MAX {
                Source::Object
            } else {
                Source::Pack {
                    pack: (location >> 48) as usize,
                    offset: location & ((1 << 48) - 1),
                }
            };
            Ok(RestoreChunk {
                len,
                id: id32(id.as_bytes(), "chunk id")?,
                object: id20(object.as_bytes(), "object id")?,
                source,
            })
        })
        .collect()
}

/// What restore_file, send_file and read_chunks share: convert the chunk tuples, then run `job`
/// without the GIL, with the object store and progress callbacks behind it; a Python error
/// raised by a callback wins over the error it caused.
fn with_chunks<T: Send>(
    py: Python<'_>,
    chunks: Vec<ChunkTuple<'_>>,
    packs: &[PathBuf],
    read_object: &Py<PyAny>,
    progress: Option<&Py<PyAny>>,
    job: impl FnOnce(&[RestoreChunk], &[&Path], &PyStore, &PyProgress) -> Result<T, Error> + Send,
) -> PyResult<T> {
    let chunks = restore_chunks(chunks)?;
    let errors = ErrorSlot::default();
    let r = {
        let store = PyStore {
            read: read_object,
            errors: &errors,
        };
        let p = PyProgress {
            callback: progress,
            errors: &errors,
        };
        let packs: Vec<&Path> = packs.iter().map(|p| p.as_path()).collect();
        py.detach(|| job(&chunks, &packs, &store, &p))
    };
    errors.finish(r)
}

/// Rebuild a file from frames into out_path (fsynced; the caller renames it into place).
///
/// chunks: [(length, location, chunk_id, object_id)] in file order, where location is
/// (pack_number << 48 | offset) or 2**64-1 to ask read_object(object_id) -> bytes.
#[pyfunction]
#[pyo3(signature = (out_path, chunks, packs, size, file_id, read_object, progress=None))]
#[allow(clippy::too_many_arguments)]
fn restore_file(
    py: Python<'_>,
    out_path: PathBuf,
    chunks: Vec<ChunkTuple<'_>>,
    packs: Vec<PathBuf>,
    size: u64,
    file_id: Vec<u8>,
    read_object: Py<PyAny>,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let file_id = id32(&file_id, "file id")?;
    with_chunks(
        py,
        chunks,
        &packs,
        &read_object,
        progress.as_ref(),
        |chunks, packs, store, p| {
            pipeline::restore_file(&out_path, chunks, packs, size, &file_id, store, p)
        },
    )
}

/// Smudge: decode a checkpoint's chunks and send them as pkt-line content packets to the file
/// `out_path` (the filter's stdout, e.g. "/dev/fd/1"), verifying chunks and the file's BLAKE3.
/// The caller writes the flush packet and the status.
#[pyfunction]
fn send_file(
    py: Python<'_>,
    out_path: PathBuf,
    chunks: Vec<ChunkTuple<'_>>,
    packs: Vec<PathBuf>,
    size: u64,
    file_id: Vec<u8>,
    read_object: Py<PyAny>,
) -> PyResult<()> {
    let file_id = id32(&file_id, "file id")?;
    with_chunks(
        py,
        chunks,
        &packs,
        &read_object,
        None,
        |chunks, packs, store, _| {
            // Unbuffered: stream_file hands whole chunks to the kernel with vectored writes (a
            // buffer in between would copy the tail of every partial write).
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&out_path)
                .map_err(|e| Error::io(out_path.display().to_string(), e))?;
            pipeline::stream_file(&mut f, chunks, packs, size, &file_id, store)
        },
    )
}

/// Clean: read pkt-line content packets up to the flush packet from `in_path` (the filter's
/// stdin, e.g. "/dev/fd/0"), hashing them; with `compare`, compared with the work-tree file
/// `worktree` and copied to a file in `spill_dir` from the first difference on. Returns
/// (length, blake3, first head_max bytes, spill path or None).
#[pyfunction]
#[pyo3(signature = (in_path, worktree, spill_dir, head_max=1025, compare=true))]
#[allow(clippy::type_complexity)]
fn receive_content<'py>(
    py: Python<'py>,
    in_path: PathBuf,
    worktree: Option<PathBuf>,
    spill_dir: Option<PathBuf>,
    head_max: usize,
    compare: bool,
) -> PyResult<(
    u64,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Option<PathBuf>,
)> {
    let r = py
        .detach(|| {
            let keep = if compare {
                theta_core::pktline::Keep::Compare
            } else {
                theta_core::pktline::Keep::HashOnly
            };
            theta_core::pktline::receive(
                &in_path,
                worktree.as_deref(),
                spill_dir.as_deref(),
                head_max,
                keep,
            )
        })
        .map_err(to_py)?;
    Ok((
        r.len,
        PyBytes::new(py, &r.blake3),
        PyBytes::new(py, &r.head),
        r.spill,
    ))
}

/// Decode chunks to bytes (same chunk tuples as restore_file).
#[pyfunction]
fn read_chunks<'py>(
    py: Python<'py>,
    chunks: Vec<ChunkTuple<'py>>,
    packs: Vec<PathBuf>,
    read_object: Py<PyAny>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let raw = with_chunks(
        py,
        chunks,
        &packs,
        &read_object,
        None,
        |chunks, packs, store, _| pipeline::read_chunks(chunks, packs, store),
    )?;
    Ok(raw.iter().map(|b| PyBytes::new(py, b)).collect())
}

/// Incremental BLAKE3 (for streams: the filter process hashes what git sends as it arrives).
#[pyclass(name = "Hasher")]
struct PyHasher(blake3::Hasher);

#[pymethods]
impl PyHasher {
    #[new]
    fn new() -> Self {
        PyHasher(blake3::Hasher::new())
    }

    fn update(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let h = &mut self.0;
        with_bytes(py, data, |py, d| {
            if d.len() < GIL_MINSIZE {
                h.update(d);
            } else {
                py.detach(|| {
                    h.update(d);
                });
            }
        })
    }

    fn digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.0.finalize().as_bytes())
    }
}

/// Tensor chunk length for a chunk size and alignment (the Python side plans with it).
#[pyfunction]
fn tensor_chunk_len(chunk_bytes: u64, align: u64) -> u64 {
    pipeline::tensor_chunk_len(chunk_bytes, align)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("FRAME_VERSION", frame::VERSION)?;
    m.add_function(wrap_pyfunction!(chunk_id, m)?)?;
    m.add_function(wrap_pyfunction!(blob_id, m)?)?;
    m.add_function(wrap_pyfunction!(encode_frame, m)?)?;
    m.add_function(wrap_pyfunction!(decode_frame, m)?)?;
    m.add_function(wrap_pyfunction!(frame_info, m)?)?;
    m.add_function(wrap_pyfunction!(scan_file, m)?)?;
    m.add_function(wrap_pyfunction!(write_pack, m)?)?;
    m.add_function(wrap_pyfunction!(restore_file, m)?)?;
    m.add_function(wrap_pyfunction!(read_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(send_file, m)?)?;
    m.add_function(wrap_pyfunction!(receive_content, m)?)?;
    m.add_function(wrap_pyfunction!(write_objects, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_chunk_len, m)?)?;
    m.add_class::<PyHasher>()?;
    Ok(())
}
