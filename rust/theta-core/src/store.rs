//! The seams between the pipeline and where frames live: a [`FrameSink`] that frames are appended
//! to and a [`FrameSource`] they are read back from, with the Git-pack implementations
//! ([`PackSink`], [`GitPacks`]) and an in-memory one ([`MemoryFrames`]).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::frame::{hex, ChunkId};
use crate::pack::{self, Kind, ObjectId, PackWriter, StoredEntry};

/// Where a frame is: a store number (the pack's place in the list a source was opened with) and
/// a byte offset in it. [`MemoryFrames`] numbers its frames instead of giving byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    pub pack: u32,
    pub offset: u64,
}

/// One encoded frame, as handed to a sink.
pub struct FrameRef<'a> {
    pub chunk: &'a ChunkId,
    /// The frame's Git object id (computed by the caller, sixteen frames at once).
    pub object: &'a ObjectId,
    pub bytes: &'a [u8],
}

/// Where the write path appends frames.
pub trait FrameSink: Send {
    /// `frames` more frames are coming (a sink that announces its size up front may use it).
    fn reserve(&mut self, _frames: usize) {}
    /// Append one frame; where it can be read back from once the sink is finished.
    fn append(&mut self, frame: &FrameRef) -> Result<Location>;
}

/// Where the read path reads frames from.
pub trait FrameSource: Sync {
    /// The frame at `at` into `out` (its capacity is reused). `Ok(false)`: no plain frame is
    /// there (git may have stored it as a delta); the caller then asks by id.
    fn read_at(&self, at: Location, max_len: u64, out: &mut Vec<u8>) -> Result<bool>;
    /// The frame of chunk `chunk`, whose Git object id is `object` where the caller knows it.
    fn read_by_id(&self, chunk: &ChunkId, object: Option<&ObjectId>) -> Result<Vec<u8>>;
}

/// Reads objects by Git id where the pack fast path cannot (the bindings ask dulwich).
pub trait ObjectStore: Sync {
    fn read(&self, object: &ObjectId) -> Result<Vec<u8>>;
}

/// Frames in memory: a sink and a source at once (tests, and anything that wants no files).
#[derive(Default)]
pub struct MemoryFrames {
    frames: Vec<(ChunkId, ObjectId, Vec<u8>)>,
    by_chunk: HashMap<ChunkId, usize>,
}

impl MemoryFrames {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

impl FrameSink for MemoryFrames {
    fn append(&mut self, f: &FrameRef) -> Result<Location> {
        let n = self.frames.len();
        self.frames.push((*f.chunk, *f.object, f.bytes.to_vec()));
        self.by_chunk.entry(*f.chunk).or_insert(n);
        Ok(Location {
            pack: 0,
            offset: n as u64,
        })
    }
}

impl FrameSource for MemoryFrames {
    fn read_at(&self, at: Location, _max_len: u64, out: &mut Vec<u8>) -> Result<bool> {
        let f = usize::try_from(at.offset)
            .ok()
            .filter(|_| at.pack == 0)
            .and_then(|i| self.frames.get(i))
            .ok_or_else(|| Error::NotFound(format!("frame at {at:?}")))?;
        out.clear();
        out.extend_from_slice(&f.2);
        Ok(true)
    }

    fn read_by_id(&self, chunk: &ChunkId, _object: Option<&ObjectId>) -> Result<Vec<u8>> {
        self.by_chunk
            .get(chunk)
            .map(|&i| self.frames[i].2.clone())
            .ok_or_else(|| Error::NotFound(format!("chunk {}", hex(chunk))))
    }
}

/// A sink that writes frames, then any other objects, into one Git pack. The pack's header
/// announces its object count, so the writer starts at the first append with the count it
/// was told to expect; a different final count costs one more pass over the pack.
pub struct PackSink {
    dir: PathBuf,
    expected: u64,
    writer: Option<PackWriter>,
}

impl PackSink {
    /// A pack in `pack_dir` that will hold the frames appended plus about `objects` objects.
    pub fn new(pack_dir: &Path, objects: u32) -> Self {
        PackSink {
            dir: pack_dir.to_path_buf(),
            expected: objects as u64,
            writer: None,
        }
    }

    fn writer(&mut self) -> Result<&mut PackWriter> {
        if self.writer.is_none() {
            let count = u32::try_from(self.expected)
                .map_err(|_| Error::InvalidArgument("too many objects for one pack".into()))?;
            self.writer = Some(PackWriter::create_growable(&self.dir, count)?);
        }
        Ok(self.writer.as_mut().expect("set above"))
    }

    /// Append a small object (a tree, a commit...) after the frames.
    pub fn add_object(&mut self, kind: Kind, data: &[u8]) -> Result<Location> {
        let w = self.writer()?;
        let offset = w.offset();
        w.append_deflated(kind, data)?;
        Ok(Location { pack: 0, offset })
    }

    /// Objects appended so far.
    pub fn count(&self) -> usize {
        self.writer.as_ref().map_or(0, PackWriter::count)
    }

    /// Write the index, fsync, rename into place: the pack's name and path, and whether the
    /// object count was other than expected (the pack was hashed a second time). `None` if
    /// nothing was appended (no pack is written).
    pub fn finish(mut self) -> Result<Option<(String, PathBuf, bool)>> {
        match self.writer.take() {
            None => Ok(None),
            Some(w) => {
                let recount = w.count() as u64 != w.announced() as u64;
                let (name, path) = w.finish()?;
                Ok(Some((name, path, recount)))
            }
        }
    }

    /// Drop what was written (also done when the sink is dropped unfinished).
    pub fn abort(mut self) {
        if let Some(w) = self.writer.take() {
            w.abort();
        }
    }
}

impl FrameSink for PackSink {
    fn reserve(&mut self, frames: usize) {
        if self.writer.is_none() {
            self.expected += frames as u64;
        }
    }

    fn append(&mut self, f: &FrameRef) -> Result<Location> {
        let w = self.writer()?;
        let offset = w.offset();
        let pos = w.append_stored(&StoredEntry::without_id(Kind::Blob, f.bytes))?;
        w.set_id(pos, *f.object);
        Ok(Location { pack: 0, offset })
    }
}

/// Frames in Git packs (read at their offsets), with an object store behind for the rest.
pub struct GitPacks<'a> {
    packs: Vec<(File, String)>,
    objects: &'a dyn ObjectStore,
    /// Chunks that may be asked for by id (the bases of delta frames): object and place.
    known: HashMap<ChunkId, (ObjectId, Option<Location>)>,
}

impl<'a> GitPacks<'a> {
    pub fn open(packs: &[&Path], objects: &'a dyn ObjectStore) -> Result<Self> {
        let packs = packs
            .iter()
            .map(|p| {
                let n = p.display().to_string();
                File::open(p)
                    .map(|f| (f, n.clone()))
                    .map_err(|e| Error::io(n, e))
            })
            .collect::<Result<_>>()?;
        Ok(GitPacks {
            packs,
            objects,
            known: HashMap::new(),
        })
    }

    /// Let chunks be read by id: `(chunk, object, place)`, e.g. the bases a version's frames name.
    pub fn know(
        &mut self,
        chunks: impl IntoIterator<Item = (ChunkId, ObjectId, Option<Location>)>,
    ) {
        for (c, o, at) in chunks {
            self.known.insert(c, (o, at));
        }
    }
}

impl FrameSource for GitPacks<'_> {
    fn read_at(&self, at: Location, max_len: u64, out: &mut Vec<u8>) -> Result<bool> {
        let (f, p) = self.packs.get(at.pack as usize).ok_or_else(|| {
            Error::InvalidArgument(format!("pack number {} out of range", at.pack))
        })?;
        pack::read_pack_blob_into(f, p, at.offset, max_len, out)
    }

    fn read_by_id(&self, chunk: &ChunkId, object: Option<&ObjectId>) -> Result<Vec<u8>> {
        if let Some(o) = object {
            return self.objects.read(o);
        }
        let Some((o, at)) = self.known.get(chunk) else {
            return Err(Error::NotFound(format!(
                "base chunk {}: not among the chunks of this version",
                hex(chunk)
            )));
        };
        if let Some(at) = at {
            let mut out = Vec::new();
            // A base is a chunk: its frame is at most a few MiB (the decoder bounds it again).
            if self.read_at(*at, 1 << 31, &mut out)? {
                return Ok(out);
            }
        }
        self.objects.read(o)
    }
}
