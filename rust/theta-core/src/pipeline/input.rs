//! Where the bytes of a version come from: a file (mapped where it can be, else read with
//! positioned reads) or buffers already in memory (tensors that were never written to a file).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::mapped::Mapped;

/// The bytes of a version, laid end to end, as the pipeline reads them.
pub trait Input: Sync {
    /// What to call it in errors (the file's path).
    fn name(&self) -> &str;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes `[start, end)` in place, where they lie contiguous in memory.
    fn slice(&self, start: u64, end: u64) -> Option<&[u8]>;
    /// Copy the bytes from `start` into `buf` (any range: across buffers, or from the file).
    fn read_into(&self, start: u64, buf: &mut [u8]) -> Result<()>;
    /// Done with `[start, end)`: a mapping drops those pages from the resident set.
    fn release(&self, _start: u64, _end: u64) {}
    /// Whether the bytes read now are known to be those scanned; if not, the write path hashes
    /// every chunk again before it stores it.
    fn unchanged_since_scan(&self) -> bool;
    /// An error if the bytes changed while they were read.
    fn check(&self) -> Result<()>;
}

/// Bytes `[start, end)` of `input`: in place, or copied into `scratch`. The scratch buffer keeps
/// its length from call to call (a zero-fill of a large buffer is not free).
pub fn bytes<'a>(
    input: &'a dyn Input,
    start: u64,
    end: u64,
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8]> {
    if let Some(s) = input.slice(start, end) {
        return Ok(s);
    }
    let n = (end - start) as usize;
    if scratch.len() < n {
        *scratch = vec![0; n]; // zeroed by the kernel, not by a memset
    }
    input.read_into(start, &mut scratch[..n])?;
    Ok(&scratch[..n])
}

/// What identifies one state of a file's content without reading it: a write changes ctime
/// (which no one can set by hand), so an equal stamp means the bytes scanned are still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    pub fn of(file: &File, name: &str) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata().map_err(|e| Error::io(name, e))?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        })
    }
}

/// A file, mapped whole when it can be.
pub struct FileInput {
    file: File,
    name: String,
    size: u64,
    mapped: Option<Mapped>,
    /// The stamp when opened, compared again by `check` when `watch` is set.
    pub stamp: FileStamp,
    watch: bool,
}

impl FileInput {
    /// Open a file whose stamp is watched: `check` fails if it changed since.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| Error::io(&name, e))?;
        let stamp = FileStamp::of(&file, &name)?;
        let size = stamp.size;
        let mapped = Mapped::new(&file).filter(|m| m.bytes().len() as u64 == size);
        Ok(FileInput {
            file,
            name,
            size,
            mapped,
            stamp,
            watch: true,
        })
    }

    /// Open a file that was scanned with stamp `scanned`: an error now if it changed since. With
    /// no stamp, the bytes are not known to be those scanned (chunks are hashed again).
    pub fn open_scanned(path: &Path, scanned: Option<FileStamp>) -> Result<Self> {
        let mut f = Self::open(path)?;
        match scanned {
            Some(s) if s != f.stamp => return Err(Error::Changed(f.name)),
            Some(_) => {}
            None => f.watch = false,
        }
        Ok(f)
    }
}

impl Input for FileInput {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.size
    }

    fn slice(&self, start: u64, end: u64) -> Option<&[u8]> {
        self.mapped
            .as_ref()
            .filter(|_| end <= self.size)
            .map(|m| &m.bytes()[start as usize..end as usize])
    }

    fn read_into(&self, start: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, start).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Changed(self.name.clone())
            } else {
                Error::io(&self.name, e)
            }
        })
    }

    fn release(&self, start: u64, end: u64) {
        if let Some(m) = &self.mapped {
            m.release(start as usize, end as usize);
        }
    }

    fn unchanged_since_scan(&self) -> bool {
        self.watch
    }

    fn check(&self) -> Result<()> {
        if self.mapped.as_ref().is_some_and(Mapped::cut)
            || (self.watch && FileStamp::of(&self.file, &self.name)? != self.stamp)
        {
            return Err(Error::Changed(self.name.clone()));
        }
        Ok(())
    }
}

/// Buffers in memory, laid end to end (e.g. the skeleton's bytes, then each tensor's).
pub struct Buffers<'a> {
    name: String,
    bufs: Vec<&'a [u8]>,
    /// Offset of each buffer's first byte.
    starts: Vec<u64>,
    len: u64,
}

impl<'a> Buffers<'a> {
    pub fn new(name: impl Into<String>, bufs: Vec<&'a [u8]>) -> Self {
        let mut starts = Vec::with_capacity(bufs.len());
        let mut len = 0u64;
        for b in &bufs {
            starts.push(len);
            len += b.len() as u64;
        }
        Buffers {
            name: name.into(),
            bufs,
            starts,
            len,
        }
    }

    /// The buffer holding byte `at` (the last of those that start there: empty ones are skipped).
    fn find(&self, at: u64) -> usize {
        self.starts.partition_point(|&s| s <= at).saturating_sub(1)
    }
}

impl Input for Buffers<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn slice(&self, start: u64, end: u64) -> Option<&[u8]> {
        if start == end {
            return Some(&[]);
        }
        let i = self.find(start);
        let (s, b) = (self.starts.get(i)?, self.bufs.get(i)?);
        let (a, z) = ((start - s) as usize, (end - s) as usize);
        b.get(a..z)
    }

    fn read_into(&self, start: u64, buf: &mut [u8]) -> Result<()> {
        if start + buf.len() as u64 > self.len {
            return Err(Error::InvalidArgument(format!(
                "{}: {} bytes at {start} are past the end ({})",
                self.name,
                buf.len(),
                self.len
            )));
        }
        let mut i = self.find(start);
        let mut pos = start;
        let mut done = 0;
        while done < buf.len() {
            let b = self.bufs[i];
            let a = (pos - self.starts[i]) as usize;
            let n = (b.len() - a).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&b[a..a + n]);
            done += n;
            pos += n as u64;
            i += 1;
        }
        Ok(())
    }

    /// The caller may change its buffers meanwhile: every chunk is hashed again as it is stored.
    fn unchanged_since_scan(&self) -> bool {
        false
    }

    fn check(&self) -> Result<()> {
        Ok(())
    }
}
