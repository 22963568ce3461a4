//! `theta_store._native`: thin bindings over theta-core. Conversions, GIL release, error mapping;
//! nothing clever lives here.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyMemoryView};

use theta_core::frame::{self, ChunkId};
use theta_core::pack::{self, ObjectId};
use theta_core::pipeline::input::{Buffers, FileInput, Input};
use theta_core::pipeline::{self, read, Chunk, Progress, RestoreChunk, Span, Written};
use theta_core::reflate;
use theta_core::sha1x16;
use theta_core::store::{FrameRef, FrameSink, GitPacks, Location, ObjectStore, PackSink};
use theta_core::{DType, Error};

pyo3::import_exception!(theta_store.errors, CorruptObject);
pyo3::import_exception!(theta_store.errors, ObjectNotFound);
pyo3::import_exception!(theta_store.errors, FileChanged);
pyo3::import_exception!(theta_store.errors, ProtocolError);
pyo3::import_exception!(theta_store.errors, InvalidArgument);

/// Below this many bytes releasing the GIL costs more than it saves.
const GIL_MINSIZE: usize = 2048;

/// Map a core error onto its Python exception (errors.py): one variant, one exception.
fn to_py(e: Error) -> PyErr {
    let text = e.to_string();
    match e {
        Error::Io { path, source } => match source.raw_os_error() {
            Some(code) => PyOSError::new_err((code, source.to_string(), path)),
            None => PyOSError::new_err(text),
        },
        Error::CorruptFrame(_) | Error::CorruptPack { .. } => CorruptObject::new_err(text),
        Error::NotFound(_) => ObjectNotFound::new_err(text),
        Error::Changed(_) => FileChanged::new_err(text),
        Error::Protocol(_) => ProtocolError::new_err(text),
        Error::InvalidArgument(msg) => InvalidArgument::new_err(msg),
        Error::Interrupted => PyKeyboardInterrupt::new_err("interrupted"),
    }
}

/// Raise the Python exception a core error maps to (tests of the mapping).
#[pyfunction]
fn _raise_core_error(kind: &str) -> PyResult<()> {
    let e = match kind {
        "io" => Error::io("some/path", std::io::Error::from_raw_os_error(2)), // ENOENT
        "corrupt" => Error::CorruptFrame("a test".into()),
        "corrupt_pack" => Error::CorruptPack {
            path: "p.pack".into(),
            offset: 12,
            what: "a test".into(),
        },
        "not_found" => Error::NotFound("a test".into()),
        "changed" => Error::Changed("some/path".into()),
        "protocol" => Error::Protocol("a test".into()),
        "invalid_argument" => Error::InvalidArgument("a test".into()),
        "interrupted" => Error::Interrupted,
        _ => return Err(PyValueError::new_err(format!("no core error {kind:?}"))),
    };
    Err(to_py(e))
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

/// Buffers held for the length of a call (the buffer protocol pins their memory).
struct Held(Vec<PyBuffer<u8>>);

impl Held {
    fn new(objs: &[Bound<'_, PyAny>]) -> PyResult<Self> {
        let not_contiguous =
            || PyValueError::new_err("buffers must be C-contiguous (numpy.ascontiguousarray)");
        objs.iter()
            .map(|o| {
                let buf = match PyBuffer::<u8>::get(o) {
                    Ok(b) => b,
                    Err(_) => {
                        let flat = PyMemoryView::from(o)?
                            .call_method1("cast", ("B",))
                            .map_err(|_| not_contiguous())?;
                        PyBuffer::<u8>::get(&flat)?
                    }
                };
                if buf.is_c_contiguous() {
                    Ok(buf)
                } else {
                    Err(not_contiguous())
                }
            })
            .collect::<PyResult<_>>()
            .map(Held)
    }

    fn slices(&self) -> Vec<&[u8]> {
        // SAFETY: as in `input`: C-contiguous, len_bytes() long, pinned by `self`.
        #[allow(unsafe_code)]
        self.0
            .iter()
            .map(|b| unsafe { std::slice::from_raw_parts(b.buf_ptr() as *const u8, b.len_bytes()) })
            .collect()
    }

    fn input(&self) -> Buffers<'_> {
        // A caller changing a buffer meanwhile makes the write path refuse the chunk (Buffers
        // are re-hashed), not read out of bounds.
        Buffers::new("buffers", self.slices())
    }
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
    d.set_item("version", info.version())?;
    d.set_item("codec", info.codec)?;
    d.set_item("kind", theta_core::tensordelta::codec_kind(info.codec))?;
    let bases: Vec<Bound<'py, PyBytes>> = info.bases.iter().map(|b| PyBytes::new(py, b)).collect();
    d.set_item("bases", bases)?;
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

type ScanResult<'py> = (
    u64,
    Bound<'py, PyBytes>,
    Vec<Vec<(u64, u64, String, Bound<'py, PyBytes>)>>,
    Option<Stamp>,
);

fn to_spans(spans: Vec<(u64, u64, String, u64, bool)>) -> Vec<Span> {
    spans
        .into_iter()
        .map(|(offset, len, dt, align, opaque)| Span {
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
        .collect()
}

/// Run a scan without the GIL and convert what it found.
fn run_scan<'py>(
    py: Python<'py>,
    chunk_bytes: u64,
    progress: Option<Py<PyAny>>,
    job: impl FnOnce(&dyn Progress) -> Result<pipeline::Scan, Error> + Send,
) -> PyResult<ScanResult<'py>> {
    if chunk_bytes < 64 {
        return Err(InvalidArgument::new_err("chunk_bytes must be at least 64"));
    }
    let errors = ErrorSlot::default();
    let r = {
        let p = PyProgress {
            callback: progress.as_ref(),
            errors: &errors,
        };
        py.detach(|| job(&p))
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
    Ok((
        scan.size,
        PyBytes::new(py, &scan.file_id),
        out,
        scan.stamp
            .map(|st| (st.dev, st.ino, st.size, st.mtime_ns, st.ctime_ns)),
    ))
}

/// Cut a file into chunks and hash it.
///
/// spans: [(offset, length, dtype, align, opaque)] tiling the file. Returns
/// (size, file_blake3, [[(offset, length, dtype, chunk_id)] per span], stamp).
#[pyfunction]
#[pyo3(signature = (path, spans, chunk_bytes, progress=None))]
fn scan_file<'py>(
    py: Python<'py>,
    path: PathBuf,
    spans: Vec<(u64, u64, String, u64, bool)>,
    chunk_bytes: u64,
    progress: Option<Py<PyAny>>,
) -> PyResult<ScanResult<'py>> {
    let spans = to_spans(spans);
    run_scan(py, chunk_bytes, progress, |p| {
        pipeline::scan_file(&path, &spans, chunk_bytes, p)
    })
}

/// scan_file over buffers in memory laid end to end (the stamp is None).
#[pyfunction]
#[pyo3(signature = (buffers, spans, chunk_bytes, progress=None))]
fn scan_buffers<'py>(
    py: Python<'py>,
    buffers: Vec<Bound<'py, PyAny>>,
    spans: Vec<(u64, u64, String, u64, bool)>,
    chunk_bytes: u64,
    progress: Option<Py<PyAny>>,
) -> PyResult<ScanResult<'py>> {
    let spans = to_spans(spans);
    let held = Held::new(&buffers)?;
    let input = held.input();
    run_scan(py, chunk_bytes, progress, |p| {
        pipeline::scan(&input, &spans, chunk_bytes, p)
    })
}

fn object_kinds(objects: Vec<(String, Vec<u8>)>) -> PyResult<Vec<(pack::Kind, Vec<u8>)>> {
    objects
        .into_iter()
        .map(|(k, d)| {
            pack::Kind::from_name(&k)
                .map(|k| (k, d))
                .ok_or_else(|| InvalidArgument::new_err(format!("unknown object kind {k:?}")))
        })
        .collect()
}

/// Write small objects ([(kind, data)], kind "blob", "tree" or "commit") as one pack into
/// pack_dir (fsynced, atomically renamed). Returns the pack's name.
#[pyfunction]
fn write_objects(
    py: Python<'_>,
    objects: Vec<(String, Vec<u8>)>,
    pack_dir: PathBuf,
) -> PyResult<String> {
    let objects = object_kinds(objects)?;
    let r = py.detach(|| -> theta_core::Result<String> {
        let count = u32::try_from(objects.len())
            .map_err(|_| Error::InvalidArgument("too many objects for one pack".into()))?;
        let mut w = pack::PackWriter::create(&pack_dir, count)?;
        for (k, d) in &objects {
            w.append_stored(&pack::StoredEntry::new(*k, d))?;
        }
        w.finish().map(|(name, _)| name)
    });
    r.map_err(to_py)
}

/// One frame written: its chunk, Git object, length, plane modes, and byte offset in its pack.
#[pyclass(frozen, get_all, module = "theta_store._native")]
struct WrittenFrame {
    chunk_id: Py<PyBytes>,
    object_id: Py<PyBytes>,
    frame_len: u64,
    planes: String,
    offset: u64,
    /// The chunk ids its frame is decoded against (empty: a plain frame).
    bases: Vec<Py<PyBytes>>,
}

#[pymethods]
impl WrittenFrame {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "WrittenFrame(chunk_id={}, frame_len={}, planes={:?}, offset={})",
            frame::hex(self.chunk_id.as_bytes(py)),
            self.frame_len,
            self.planes,
            self.offset
        )
    }
}

fn written_frames(py: Python<'_>, written: &[Written]) -> Vec<WrittenFrame> {
    written
        .iter()
        .map(|w| {
            let planes: Vec<&str> = w.planes.iter().map(mode_name).collect();
            WrittenFrame {
                chunk_id: PyBytes::new(py, &w.id).unbind(),
                object_id: PyBytes::new(py, &w.object).unbind(),
                frame_len: w.frame_len,
                planes: planes.join("+"),
                offset: w.at.offset,
                bases: w
                    .bases
                    .iter()
                    .map(|b| PyBytes::new(py, b).unbind())
                    .collect(),
            }
        })
        .collect()
}

fn to_chunks(chunks: Vec<(u64, u64, String, Vec<u8>)>) -> PyResult<Vec<Chunk>> {
    chunks
        .into_iter()
        .map(|(offset, len, dt, id)| {
            Ok(Chunk {
                offset,
                len,
                dtype: dtype(&dt)?,
                id: id32(&id, "chunk id")?,
            })
        })
        .collect()
}

/// A delta job as Python hands it over (see `PackBuilder.write_deltas`).
type DeltaJobTuple<'py> = (
    u64,
    u64,
    String,
    Vec<u64>,
    Vec<(u64, u64, String, Vec<u8>)>,
    Vec<ChunkTuple<'py>>,
    Option<(usize, usize, usize, Vec<u8>, Vec<u8>)>,
);

fn f32s(b: &[u8], n: usize, what: &str) -> PyResult<Vec<f32>> {
    if b.len() != n * 4 {
        return Err(InvalidArgument::new_err(format!(
            "{what}: {} bytes, expected {} float32 values",
            b.len(),
            n
        )));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

fn to_jobs(jobs: Vec<DeltaJobTuple<'_>>) -> PyResult<Vec<pipeline::DeltaJob>> {
    jobs.into_iter()
        .map(|(offset, len, dt, shape, chunks, base, factors)| {
            let factors = match factors {
                None => None,
                Some((rows, cols, rank, u, v)) => Some(theta_core::tensordelta::Factors {
                    rows,
                    cols,
                    rank,
                    u: f32s(&u, rows * rank, "factor U")?,
                    v: f32s(&v, rank * cols, "factor V")?,
                }),
            };
            Ok(pipeline::DeltaJob {
                offset,
                len,
                dtype: dtype(&dt)?,
                shape,
                chunks: to_chunks(chunks)?,
                base: restore_chunks(base)?,
                factors,
            })
        })
        .collect()
}

fn to_stamp(stamp: Option<Stamp>) -> Option<pipeline::FileStamp> {
    stamp.map(|(dev, ino, size, mtime_ns, ctime_ns)| pipeline::FileStamp {
        dev,
        ino,
        size,
        mtime_ns,
        ctime_ns,
    })
}

/// One Git pack being written by an add: the new chunks' frames, then the version's objects,
/// then `finish` (index, fsync, rename). A builder dropped or aborted unfinished leaves nothing.
#[pyclass(frozen, module = "theta_store._native")]
struct PackBuilder {
    sink: Mutex<Option<PackSink>>,
    recounted: Mutex<bool>,
}

impl PackBuilder {
    /// The sink, if no other thread is using it and it is not finished.
    fn with_sink<T>(&self, f: impl FnOnce(&mut PackSink) -> PyResult<T>) -> PyResult<T> {
        let mut guard = self
            .sink
            .try_lock()
            .map_err(|_| InvalidArgument::new_err("the PackBuilder is in use by another thread"))?;
        let sink = guard
            .as_mut()
            .ok_or_else(|| InvalidArgument::new_err("the PackBuilder is finished"))?;
        f(sink)
    }

    fn write(
        &self,
        py: Python<'_>,
        input: &dyn Input,
        chunks: &[Chunk],
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<WrittenFrame>> {
        let written = self.with_sink(|sink| {
            let errors = ErrorSlot::default();
            let r = {
                let p = PyProgress {
                    callback: progress.as_ref(),
                    errors: &errors,
                };
                py.detach(|| pipeline::write_frames(input, chunks, sink, &p))
            };
            errors.finish(r)
        });
        if written.is_err() {
            self.abort(); // a pack with part of an input in it is of no use
        }
        Ok(written_frames(py, &written?))
    }
}

#[pymethods]
impl PackBuilder {
    /// A pack in pack_dir; `objects`: how many objects will follow the frames (the pack's
    /// header is then right the first time; any other number costs a second pass at finish).
    #[new]
    #[pyo3(signature = (pack_dir, objects=0))]
    fn new(pack_dir: PathBuf, objects: u32) -> Self {
        PackBuilder {
            sink: Mutex::new(Some(PackSink::new(&pack_dir, objects))),
            recounted: Mutex::new(false),
        }
    }

    /// Encode chunks [(offset, length, dtype, chunk_id)] of the file at `path` into frames.
    /// `stamp`: the file's stamp from its scan (a file changed since is refused).
    #[pyo3(signature = (path, chunks, stamp=None, progress=None))]
    fn write_file(
        &self,
        py: Python<'_>,
        path: PathBuf,
        chunks: Vec<(u64, u64, String, Vec<u8>)>,
        stamp: Option<Stamp>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<WrittenFrame>> {
        let chunks = to_chunks(chunks)?;
        let input = py
            .detach(|| FileInput::open_scanned(&path, to_stamp(stamp)))
            .map_err(to_py)?;
        self.write(py, &input, &chunks, progress)
    }

    /// Encode chunks of `buffers` laid end to end (as scan_buffers saw them) into frames.
    #[pyo3(signature = (buffers, chunks, progress=None))]
    fn write_buffers(
        &self,
        py: Python<'_>,
        buffers: Vec<Bound<'_, PyAny>>,
        chunks: Vec<(u64, u64, String, Vec<u8>)>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<WrittenFrame>> {
        let chunks = to_chunks(chunks)?;
        let held = Held::new(&buffers)?;
        let input = held.input();
        self.write(py, &input, &chunks, progress)
    }

    /// Encode changed tensors against their bases into frames (see `pipeline::write_deltas`).
    ///
    /// jobs: [(offset, length, dtype, shape, chunks, base_chunks, factors)] where chunks are
    /// (offset, length, dtype, chunk_id) of the input as for write_file, base_chunks the base
    /// tensor's chunks as restore_file takes them, and factors None or (rows, cols, rank, u, v)
    /// with u, v float32 bytes. The input is the file at `path` (with its scan's `stamp`) or
    /// `buffers`. `bases`: more chunks the bases' frames may name (their own bases).
    #[pyo3(signature = (jobs, packs, read_object, bases=Vec::new(), max_depth=1, path=None, stamp=None, buffers=None, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn write_deltas(
        &self,
        py: Python<'_>,
        jobs: Vec<DeltaJobTuple<'_>>,
        packs: Vec<PathBuf>,
        read_object: Py<PyAny>,
        bases: Vec<ChunkTuple<'_>>,
        max_depth: usize,
        path: Option<PathBuf>,
        stamp: Option<Stamp>,
        buffers: Option<Vec<Bound<'_, PyAny>>>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<WrittenFrame>> {
        let jobs = to_jobs(jobs)?;
        let known = restore_chunks(bases)?;
        let held;
        let file;
        let input: &dyn Input = match (&path, buffers) {
            (Some(p), None) => {
                file = py
                    .detach(|| FileInput::open_scanned(p, to_stamp(stamp)))
                    .map_err(to_py)?;
                &file
            }
            (None, Some(b)) => {
                held = Held::new(&b)?;
                &held.input()
            }
            _ => {
                return Err(InvalidArgument::new_err(
                    "write_deltas needs a path or buffers",
                ))
            }
        };
        let written = self.with_sink(|sink| {
            let errors = ErrorSlot::default();
            let r = {
                let store = PyStore {
                    read: &read_object,
                    errors: &errors,
                };
                let p = PyProgress {
                    callback: progress.as_ref(),
                    errors: &errors,
                };
                let packs: Vec<&Path> = packs.iter().map(|p| p.as_path()).collect();
                py.detach(|| {
                    let mut source = GitPacks::open(&packs, &store)?;
                    source.know(
                        jobs.iter()
                            .flat_map(|j| &j.base)
                            .chain(&known)
                            .map(|c| (c.id, c.object, c.at)),
                    );
                    pipeline::write_deltas(input, &jobs, &source, sink, max_depth, &p)
                })
            };
            errors.finish(r)
        });
        if written.is_err() {
            self.abort();
        }
        Ok(written_frames(py, &written?))
    }

    /// Append frames that were encoded elsewhere (fetched from a chunk store) as stored blobs,
    /// their Git ids computed sixteen at once. Returns [(object id, offset in the pack)].
    fn add_frames<'py>(
        &self,
        py: Python<'py>,
        frames: Vec<Bound<'py, PyAny>>,
    ) -> PyResult<Vec<(Bound<'py, PyBytes>, u64)>> {
        let held = Held::new(&frames)?;
        let placed = self.with_sink(|sink| {
            py.detach(|| {
                let slices = held.slices();
                let ids = sha1x16::blob_ids(&slices);
                let zero: ChunkId = [0; 32];
                slices
                    .iter()
                    .zip(&ids)
                    .map(|(bytes, object)| {
                        let at = sink.append(&FrameRef {
                            chunk: &zero,
                            object,
                            bytes,
                        })?;
                        Ok((*object, at.offset))
                    })
                    .collect::<Result<Vec<_>, Error>>()
            })
            .map_err(to_py)
        })?;
        Ok(placed
            .into_iter()
            .map(|(o, at)| (PyBytes::new(py, &o), at))
            .collect())
    }

    /// Append small objects [(kind, data)] ("blob", "tree", "commit") after the frames.
    fn add_objects(&self, py: Python<'_>, objects: Vec<(String, Vec<u8>)>) -> PyResult<()> {
        let objects = object_kinds(objects)?;
        self.with_sink(|sink| {
            py.detach(|| {
                objects
                    .iter()
                    .try_for_each(|(k, d)| sink.add_object(*k, d).map(|_| ()))
            })
            .map_err(to_py)
        })
    }

    /// Objects in the pack so far.
    fn count(&self) -> PyResult<usize> {
        self.with_sink(|sink| Ok(sink.count()))
    }

    /// Write the index, fsync, rename into place. Returns the pack's path (None: nothing was
    /// added, no pack). On error nothing is left behind.
    fn finish(&self, py: Python<'_>) -> PyResult<Option<PathBuf>> {
        let sink = self
            .sink
            .try_lock()
            .map_err(|_| InvalidArgument::new_err("the PackBuilder is in use by another thread"))?
            .take()
            .ok_or_else(|| InvalidArgument::new_err("the PackBuilder is finished"))?;
        let done = py.detach(|| sink.finish()).map_err(to_py)?;
        if let Some((_, _, recounted)) = &done {
            *self.recounted.lock().unwrap_or_else(|p| p.into_inner()) = *recounted;
        }
        Ok(done.map(|(_, path, _)| path))
    }

    /// Drop what was written (a finished pack stays).
    fn abort(&self) {
        if let Ok(mut g) = self.sink.try_lock() {
            if let Some(s) = g.take() {
                s.abort();
            }
        }
    }

    /// Whether finish found another object count than announced (and hashed the pack again).
    #[getter]
    fn recounted(&self) -> bool {
        *self.recounted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Leaving the block without finish aborts.
    fn __exit__(
        &self,
        _t: Option<Bound<'_, PyAny>>,
        _v: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) {
        self.abort();
    }
}

/// Encode the given chunks of a file into one new pack in pack_dir.
///
/// chunks: [(offset, length, dtype, chunk_id)]. Returns (the pack's path, or None if there were
/// no chunks; [WrittenFrame], in input order).
#[pyfunction]
#[pyo3(signature = (path, chunks, pack_dir, stamp=None, progress=None))]
fn write_pack(
    py: Python<'_>,
    path: PathBuf,
    chunks: Vec<(u64, u64, String, Vec<u8>)>,
    pack_dir: PathBuf,
    stamp: Option<Stamp>,
    progress: Option<Py<PyAny>>,
) -> PyResult<(Option<PathBuf>, Vec<WrittenFrame>)> {
    let b = PackBuilder::new(pack_dir, 0);
    let written = b.write_file(py, path, chunks, stamp, progress)?;
    Ok((b.finish(py)?, written))
}

fn restore_chunks(chunks: Vec<ChunkTuple<'_>>) -> PyResult<Vec<RestoreChunk>> {
    chunks
        .into_iter()
        .map(|(len, location, id, object)| {
            // location: pack number << 48 | offset, or u64::MAX for "ask the object store".
            let at = (location != u64::MAX).then_some(Location {
                pack: (location >> 48) as u32,
                offset: location & ((1 << 48) - 1),
            });
            Ok(RestoreChunk {
                len,
                id: id32(id.as_bytes(), "chunk id")?,
                object: id20(object.as_bytes(), "object id")?,
                at,
            })
        })
        .collect()
}

/// What restore_file, send_file and read_chunks share: convert the chunk tuples, then run `job`
/// without the GIL, on the packs with the object store behind them; a Python error raised by a
/// callback wins over the error it caused.
#[allow(clippy::too_many_arguments)]
fn with_chunks<T: Send>(
    py: Python<'_>,
    chunks: Vec<ChunkTuple<'_>>,
    known: Vec<ChunkTuple<'_>>,
    packs: &[PathBuf],
    read_object: &Py<PyAny>,
    progress: Option<&Py<PyAny>>,
    job: impl FnOnce(&[RestoreChunk], &GitPacks, &PyProgress) -> Result<T, Error> + Send,
) -> PyResult<T> {
    let chunks = restore_chunks(chunks)?;
    let known = restore_chunks(known)?;
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
        py.detach(|| {
            let mut source = GitPacks::open(&packs, &store)?;
            // Any chunk of the version may be a base of another; so may the extra ones.
            source.know(chunks.iter().chain(&known).map(|c| (c.id, c.object, c.at)));
            job(&chunks, &source, &p)
        })
    };
    errors.finish(r)
}

/// Rebuild a file from frames into out_path (fsynced; the caller renames it into place).
///
/// chunks: [(length, location, chunk_id, object_id)] in file order, where location is
/// (pack_number << 48 | offset) or 2**64-1 to ask read_object(object_id) -> bytes.
#[pyfunction]
#[pyo3(signature = (out_path, chunks, packs, size, file_id, read_object, progress=None, bases=Vec::new()))]
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
    bases: Vec<ChunkTuple<'_>>,
) -> PyResult<()> {
    let file_id = id32(&file_id, "file id")?;
    with_chunks(
        py,
        chunks,
        bases,
        &packs,
        &read_object,
        progress.as_ref(),
        |chunks, source, p| read::restore_file(&out_path, chunks, size, &file_id, source, p),
    )
}

/// Smudge: decode a checkpoint's chunks and send them as pkt-line content packets to the file
/// `out_path` (the filter's stdout, e.g. "/dev/fd/1"), verifying the file's BLAKE3.
/// The caller writes the flush packet and the status.
#[pyfunction]
#[pyo3(signature = (out_path, chunks, packs, size, file_id, read_object, bases=Vec::new()))]
#[allow(clippy::too_many_arguments)]
fn send_file(
    py: Python<'_>,
    out_path: PathBuf,
    chunks: Vec<ChunkTuple<'_>>,
    packs: Vec<PathBuf>,
    size: u64,
    file_id: Vec<u8>,
    read_object: Py<PyAny>,
    bases: Vec<ChunkTuple<'_>>,
) -> PyResult<()> {
    let file_id = id32(&file_id, "file id")?;
    with_chunks(
        py,
        chunks,
        bases,
        &packs,
        &read_object,
        None,
        |chunks, source, _| {
            // Unbuffered: stream_file hands whole chunks to the kernel with vectored writes (a
            // buffer in between would copy the tail of every partial write).
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&out_path)
                .map_err(|e| Error::io(out_path.display().to_string(), e))?;
            read::stream_file(&mut f, chunks, size, &file_id, source)
        },
    )
}

/// A deflated member as `expand_file` and `reflate_file` take it:
/// (packed offset, packed length, plain offset, plain length, CRC-32).
type MemberTuple = (u64, u64, u64, u64, u32);
/// Deflate parameters: (level, wbits, memLevel, strategy).
type ParamsTuple = (i32, i32, i32, i32);

fn member(t: MemberTuple) -> reflate::Member {
    reflate::Member {
        packed_offset: t.0,
        packed_len: t.1,
        plain_offset: t.2,
        plain_len: t.3,
        crc32: t.4,
    }
}

/// Write the expanded file of `src` (the deflated `members`, sorted, inflated in place) to
/// `dst`; per member (the deflate parameters that reproduce it exactly with the pinned zlib,
/// "", BLAKE3 of its compressed bytes) or (None, why it is kept compressed, ...). `known`:
/// [(BLAKE3 of compressed bytes, parameters)] verified at an earlier add, taken as they are.
#[pyfunction]
#[pyo3(signature = (src, dst, members, known=Vec::new()))]
#[allow(clippy::type_complexity)]
fn expand_file<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: PathBuf,
    members: Vec<MemberTuple>,
    known: Vec<(Vec<u8>, ParamsTuple)>,
) -> PyResult<Vec<(Option<ParamsTuple>, String, Bound<'py, PyBytes>)>> {
    let members: Vec<reflate::Member> = members.into_iter().map(member).collect();
    let known = known
        .into_iter()
        .map(|(id, p)| Ok((id32(&id, "packed id")?, params(p))))
        .collect::<PyResult<std::collections::HashMap<_, _>>>()?;
    let out = py
        .detach(|| reflate::expand_file(&src, &dst, &members, &known))
        .map_err(to_py)?;
    Ok(out
        .into_iter()
        .map(|(o, id)| {
            let id = PyBytes::new(py, &id);
            match o {
                reflate::Outcome::Reproduced(p) => (
                    Some((p.level, p.wbits, p.mem_level, p.strategy)),
                    String::new(),
                    id,
                ),
                reflate::Outcome::Kept(why) => (None, why, id),
            }
        })
        .collect())
}

fn params(p: ParamsTuple) -> reflate::Params {
    reflate::Params {
        level: p.0,
        wbits: p.1,
        mem_level: p.2,
        strategy: p.3,
    }
}

/// Rebuild a file (`size` bytes, BLAKE3 `file_id`) at `dst` from its expanded form `src`: each
/// member deflated back with its parameters, CRC-32 and size checked, fsynced.
#[pyfunction]
#[pyo3(signature = (src, dst, members, size, file_id, progress=None))]
fn reflate_file(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    members: Vec<(MemberTuple, ParamsTuple)>,
    size: u64,
    file_id: Vec<u8>,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let file_id = id32(&file_id, "file id")?;
    let members: Vec<(reflate::Member, reflate::Params)> = members
        .into_iter()
        .map(|(m, p)| (member(m), params(p)))
        .collect();
    let errors = ErrorSlot(Mutex::new(None));
    let p = PyProgress {
        callback: progress.as_ref(),
        errors: &errors,
    };
    let r = py.detach(|| reflate::reflate_file(&src, &dst, &members, size, &file_id, &p));
    errors.finish(r)
}

/// Send the file `src` as pkt-line content packets to `out_path` (the filter's stdout).
#[pyfunction]
fn send_path(py: Python<'_>, out_path: PathBuf, src: PathBuf) -> PyResult<()> {
    py.detach(|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&out_path)
            .map_err(|e| Error::io(out_path.display().to_string(), e))?;
        reflate::send_path(&mut f, &src)
    })
    .map_err(to_py)
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

/// The blobs at these offsets of one pack, as stored (a frame's bytes, undecoded), by positioned
/// reads: [(offset, max_len)] -> bytes, or None where the entry is not a plain blob (git stored
/// it as a delta: ask for it by id).
#[pyfunction]
fn read_pack_blobs<'py>(
    py: Python<'py>,
    pack: PathBuf,
    entries: Vec<(u64, u64)>,
) -> PyResult<Vec<Option<Bound<'py, PyBytes>>>> {
    let name = pack.display().to_string();
    let blobs = py
        .detach(|| -> Result<Vec<Option<Vec<u8>>>, Error> {
            let file = std::fs::File::open(&pack).map_err(|e| Error::io(&name, e))?;
            entries
                .iter()
                .map(|&(offset, max_len)| {
                    let mut out = Vec::new();
                    Ok(
                        pack::read_pack_blob_into(&file, &name, offset, max_len, &mut out)?
                            .then_some(out),
                    )
                })
                .collect()
        })
        .map_err(to_py)?;
    Ok(blobs
        .into_iter()
        .map(|b| b.map(|b| PyBytes::new(py, &b)))
        .collect())
}

/// Decode chunks to bytes (same chunk tuples as restore_file).
#[pyfunction]
#[pyo3(signature = (chunks, packs, read_object, bases=Vec::new()))]
fn read_chunks<'py>(
    py: Python<'py>,
    chunks: Vec<ChunkTuple<'py>>,
    packs: Vec<PathBuf>,
    read_object: Py<PyAny>,
    bases: Vec<ChunkTuple<'py>>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let raw = with_chunks(
        py,
        chunks,
        bases,
        &packs,
        &read_object,
        None,
        |chunks, source, _| read::read_chunks(chunks, source),
    )?;
    Ok(raw.iter().map(|b| PyBytes::new(py, b)).collect())
}

/// Decode chunks one after the other into one bytes object, their concatenation (same chunk
/// tuples as restore_file): a tensor read this way is in memory once, not as parts plus a join.
#[pyfunction]
#[pyo3(signature = (chunks, packs, read_object, bases=Vec::new()))]
fn read_joined<'py>(
    py: Python<'py>,
    chunks: Vec<ChunkTuple<'py>>,
    packs: Vec<PathBuf>,
    read_object: Py<PyAny>,
    bases: Vec<ChunkTuple<'py>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let total = chunks
        .iter()
        .try_fold(0u64, |n, c| n.checked_add(c.0))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| PyValueError::new_err("chunk lengths overflow"))?;
    PyBytes::new_with(py, total, |out| {
        with_chunks(
            py,
            chunks,
            bases,
            &packs,
            &read_object,
            None,
            |chunks, source, _| read::read_into(chunks, source, out).map(|_| ()),
        )
    })
}

/// How a frame is stored ("plain", "xor", "diff", "sparse", "low-rank"), from its first 6 bytes.
#[pyfunction]
fn frame_kind(py: Python<'_>, head: &Bound<'_, PyAny>) -> PyResult<&'static str> {
    let codec = with_bytes(py, head, |_, d| frame::frame_codec(d))?.map_err(to_py)?;
    Ok(theta_core::tensordelta::codec_kind(codec))
}

/// Incremental BLAKE3 (for streams: the filter process hashes what git sends as it arrives).
/// Safe to share between threads: updates from several threads are applied one at a time.
#[pyclass(name = "Hasher", frozen, module = "theta_store._native")]
struct PyHasher(Mutex<blake3::Hasher>);

#[pymethods]
impl PyHasher {
    #[new]
    fn new() -> Self {
        PyHasher(Mutex::new(blake3::Hasher::new()))
    }

    fn update(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let h = &self.0;
        with_bytes(py, data, |py, d| {
            let run = || {
                h.lock().unwrap_or_else(|p| p.into_inner()).update(d);
            };
            if d.len() < GIL_MINSIZE {
                run();
            } else {
                py.detach(run);
            }
        })
    }

    fn digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        PyBytes::new(py, h.finalize().as_bytes())
    }
}

/// Tensor chunk length for a chunk size and alignment (the Python side plans with it).
#[pyfunction]
fn tensor_chunk_len(chunk_bytes: u64, align: u64) -> u64 {
    pipeline::tensor_chunk_len(chunk_bytes, align)
}

// No global state is shared unguarded: every class is frozen with interior locks, and the core
// is thread-safe, so the module needs no GIL.
#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("FRAME_VERSION", frame::VERSION)?;
    m.add("FRAME_VERSION_BASES", frame::VERSION_BASES)?;
    m.add_function(wrap_pyfunction!(chunk_id, m)?)?;
    m.add_function(wrap_pyfunction!(blob_id, m)?)?;
    m.add_function(wrap_pyfunction!(encode_frame, m)?)?;
    m.add_function(wrap_pyfunction!(decode_frame, m)?)?;
    m.add_function(wrap_pyfunction!(frame_info, m)?)?;
    m.add_function(wrap_pyfunction!(scan_file, m)?)?;
    m.add_function(wrap_pyfunction!(scan_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(write_pack, m)?)?;
    m.add_function(wrap_pyfunction!(restore_file, m)?)?;
    m.add_function(wrap_pyfunction!(read_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(read_pack_blobs, m)?)?;
    m.add_function(wrap_pyfunction!(read_joined, m)?)?;
    m.add_function(wrap_pyfunction!(frame_kind, m)?)?;
    m.add_function(wrap_pyfunction!(send_file, m)?)?;
    m.add_function(wrap_pyfunction!(expand_file, m)?)?;
    m.add_function(wrap_pyfunction!(reflate_file, m)?)?;
    m.add_function(wrap_pyfunction!(send_path, m)?)?;
    m.add_function(wrap_pyfunction!(receive_content, m)?)?;
    m.add_function(wrap_pyfunction!(write_objects, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_chunk_len, m)?)?;
    m.add_function(wrap_pyfunction!(_raise_core_error, m)?)?;
    m.add_function(wrap_pyfunction!(lowrank_factors, m)?)?;
    m.add_function(wrap_pyfunction!(parse_factors, m)?)?;
    m.add_class::<PyHasher>()?;
    m.add_class::<PackBuilder>()?;
    m.add_class::<WrittenFrame>()?;
    Ok(())
}

// ---- low-rank deltas (helpers for `--lossy low-rank` and the delta API) ----

/// Factors of the change from `base` to `new` (a float matrix of `shape`) at `rank`, or at the
/// smallest rank within `rtol` (relative Frobenius error of the change): (factors chunk bytes,
/// the reconstruction `base + U @ V` as the dtype's bytes, the relative error achieved).
#[pyfunction]
#[pyo3(signature = (new, base, dtype, shape, rank=None, rtol=None))]
fn lowrank_factors<'py>(
    py: Python<'py>,
    new: &Bound<'py, PyAny>,
    base: &Bound<'py, PyAny>,
    dtype: &str,
    shape: Vec<u64>,
    rank: Option<usize>,
    rtol: Option<f64>,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, f64)> {
    let dt = self::dtype(dtype)?;
    let target = match (rank, rtol) {
        (Some(r), None) => theta_core::lowrank::LossyTarget::Rank(r),
        (None, Some(t)) => theta_core::lowrank::LossyTarget::Rtol(t),
        _ => return Err(PyValueError::new_err("give exactly one of rank and rtol")),
    };
    let got = with_bytes(py, new, |py, n| {
        with_bytes(py, base, |py, b| {
            py.detach(|| theta_core::lowrank::lossy_lowrank(n, b, dt, &shape, target))
        })
    })??
    .map_err(to_py)?;
    Ok((
        PyBytes::new(py, &got.factors),
        PyBytes::new(py, &got.recon),
        got.rel_err,
    ))
}

/// rows, cols, rank, U's bytes, V's bytes.
type ParsedFactors<'py> = (
    usize,
    usize,
    usize,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
);

/// A factors chunk's raw bytes: (rows, cols, rank, U as rows x rank f32 LE, V as rank x cols).
#[pyfunction]
fn parse_factors<'py>(py: Python<'py>, raw: &Bound<'py, PyAny>) -> PyResult<ParsedFactors<'py>> {
    let (rows, cols, rank, u, v) = with_bytes(py, raw, |_, r| {
        theta_core::lowrank::parse_factors(r)
            .map(|f| (f.rows, f.cols, f.rank, f.u.to_vec(), f.v.to_vec()))
    })?
    .map_err(to_py)?;
    Ok((rows, cols, rank, PyBytes::new(py, &u), PyBytes::new(py, &v)))
}
