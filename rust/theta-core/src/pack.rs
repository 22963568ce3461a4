//! Git pack files written directly: objects stored with zlib level 0 (frames are already
//! compressed; deflating them again costs 8x the CPU for nothing) and a v2 index.
//!
//! Crash safety: the pack and index are written under temporary names, fsynced, then renamed
//! (pack first, index last: git only sees a pack through its index), then the directory is fsynced.
//! While a pack is written, a flusher thread keeps syncing what is already written, so the disk
//! works alongside the encoders and the final fsync only waits for the tail.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, IoSlice, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use flate2::read::ZlibDecoder;
use sha1::{Digest, Sha1};

use crate::error::{Error, Result};

pub type ObjectId = [u8; 20];

/// The kinds of Git object a pack written here holds (the pack type numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Commit = 1,
    Tree = 2,
    Blob = 3,
}

impl Kind {
    pub fn from_name(name: &str) -> Option<Kind> {
        match name {
            "commit" => Some(Kind::Commit),
            "tree" => Some(Kind::Tree),
            "blob" => Some(Kind::Blob),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Commit => "commit",
            Kind::Tree => "tree",
            Kind::Blob => "blob",
        }
    }
}

/// Git object id: SHA-1 of "<kind> <len>\0" followed by the content.
pub fn object_id(kind: Kind, data: &[u8]) -> ObjectId {
    let mut h = Sha1::new();
    h.update(format!("{} {}\0", kind.name(), data.len()).as_bytes());
    h.update(data);
    h.finalize().into()
}

/// Git object id of a blob: SHA-1 of "blob <len>\0" followed by the content.
pub fn blob_id(data: &[u8]) -> ObjectId {
    object_id(Kind::Blob, data)
}

fn entry_header(kind: u8, mut size: u64, out: &mut Vec<u8>) {
    let mut byte = (kind << 4) | (size & 0x0f) as u8;
    size >>= 4;
    while size > 0 {
        out.push(byte | 0x80);
        byte = (size & 0x7f) as u8;
        size >>= 7;
    }
    out.push(byte);
}

/// Largest stored deflate block (RFC 1951 BTYPE=00).
const STORED_BLOCK: usize = 65535;

/// Header of a stored block that is not the last: BFINAL=0, LEN=65535, NLEN=0.
const FULL_BLOCK_HEADER: [u8; 5] = [0x00, 0xff, 0xff, 0x00, 0x00];

/// An object laid out as a pack entry without copying its content: the entry header and the
/// zlib header (RFC 1950), then the content in stored deflate blocks of at most 65535 bytes
/// (RFC 1951 BTYPE=00), each behind its 5-byte header, then the Adler-32. Written by hand
/// because general deflate encoders are slow even at level 0; the pieces are written
/// with vectored writes, so the content is copied only into the page cache.
pub struct StoredEntry<'a> {
    pub id: ObjectId,
    pub crc32: u32,
    head: Vec<u8>,
    data: &'a [u8],
    last_header: [u8; 5],
    adler: [u8; 4],
}

impl<'a> StoredEntry<'a> {
    /// Hash and checksum `data` as an object of `kind` (pure function: safe on many threads).
    pub fn new(kind: Kind, data: &'a [u8]) -> Self {
        let mut entry = Self::without_id(kind, data);
        entry.id = object_id(kind, data);
        entry
    }

    /// The entry with its id left zero, for ids computed many at once
    /// ([`crate::sha1x16::blob_ids`]) and set with [`PackWriter::set_id`].
    pub fn without_id(kind: Kind, data: &'a [u8]) -> Self {
        let mut head = Vec::with_capacity(16);
        entry_header(kind as u8, data.len() as u64, &mut head);
        head.extend_from_slice(&[0x78, 0x01]);
        let last = data.len().saturating_sub(1) / STORED_BLOCK * STORED_BLOCK;
        let len = (data.len() - last) as u16;
        let mut last_header = [0x01, 0, 0, 0, 0];
        last_header[1..3].copy_from_slice(&len.to_le_bytes());
        last_header[3..5].copy_from_slice(&(!len).to_le_bytes());
        let mut adler = simd_adler32::Adler32::new();
        adler.write(data);
        let mut entry = StoredEntry {
            id: [0; 20],
            crc32: 0,
            head,
            data,
            last_header,
            adler: adler.finish().to_be_bytes(),
        };
        let mut crc = crc32fast::Hasher::new();
        entry.for_each_piece(|p| crc.update(p));
        entry.crc32 = crc.finalize();
        entry
    }

    /// Bytes of the entry in the pack.
    pub fn pack_len(&self) -> u64 {
        let blocks = self.data.len().div_ceil(STORED_BLOCK).max(1);
        (self.head.len() + blocks * 5 + self.data.len() + 4) as u64
    }

    /// The entry's bytes as one buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.pack_len() as usize);
        self.for_each_piece(|p| bytes.extend_from_slice(p));
        bytes
    }

    /// The entry's bytes in order, in pieces.
    pub fn for_each_piece<'s>(&'s self, mut f: impl FnMut(&'s [u8])) {
        f(&self.head);
        let mut blocks = self.data.chunks(STORED_BLOCK).peekable();
        if blocks.peek().is_none() {
            f(&self.last_header);
        }
        while let Some(block) = blocks.next() {
            f(if blocks.peek().is_none() {
                &self.last_header
            } else {
                &FULL_BLOCK_HEADER
            });
            f(block);
        }
        f(&self.adler);
    }
}

/// `Write::write_all_vectored` (unstable in std): writes every byte of `pieces`.
fn write_all_vectored(file: &mut File, mut pieces: &mut [IoSlice]) -> std::io::Result<()> {
    while !pieces.is_empty() {
        match file.write_vectored(pieces) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut pieces, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes one pack. Entries are appended in order; `finish` writes the index and renames.
pub struct PackWriter {
    dir: PathBuf,
    tmp_pack: PathBuf,
    file: File,
    hasher: Sha1,
    offset: u64,
    expected: u32,
    /// Whether the final count may differ from the header's (the header is then rewritten).
    growable: bool,
    done: bool,
    index: Vec<(ObjectId, u32, u64)>,
    flusher: Flusher,
}

/// Bytes written between two requests to the flusher thread.
const FLUSH_EVERY: u64 = 16 << 20;

/// A thread that fdatasyncs a file whenever asked (requests that pile up are merged), so that
/// writeback overlaps the work of the writer. The first error is kept and reported at the end:
/// after a failed sync, a later one may succeed without the data being safe. Writers on several
/// threads may report what they wrote.
pub(crate) struct Flusher {
    asks: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    written: std::sync::atomic::AtomicU64,
}

impl Flusher {
    pub(crate) fn start(file: &File) -> Self {
        let Ok(file) = file.try_clone() else {
            return Flusher::none();
        };
        let (asks, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("theta-flush".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    while rx.try_recv().is_ok() {}
                    file.sync_data()?;
                }
                Ok(())
            });
        match thread {
            Ok(t) => Flusher {
                asks: Some(asks),
                thread: Some(t),
                written: 0.into(),
            },
            Err(_) => Flusher::none(), // no thread: the final fsync does it all
        }
    }

    fn none() -> Self {
        Flusher {
            asks: None,
            thread: None,
            written: 0.into(),
        }
    }

    /// `n` more bytes were written: every FLUSH_EVERY bytes, ask for a sync.
    pub(crate) fn wrote(&self, n: u64) {
        let before = self
            .written
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if (before + n) / FLUSH_EVERY != before / FLUSH_EVERY {
            if let Some(a) = &self.asks {
                let _ = a.send(());
            }
        }
    }

    /// Stop the thread; its first error, if any.
    pub(crate) fn stop(&mut self) -> std::io::Result<()> {
        self.asks = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the flusher thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path.display().to_string(), e)
}

impl PackWriter {
    /// Start a pack of about `count` objects: the header says `count`, and if the pack ends up
    /// with another number, `finish` rewrites the header and hashes the pack again.
    pub fn create_growable(pack_dir: &Path, count: u32) -> Result<Self> {
        let mut w = Self::create(pack_dir, count)?;
        w.growable = true;
        Ok(w)
    }

    /// Byte offset of the next entry.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Entries appended so far.
    pub fn count(&self) -> usize {
        self.index.len()
    }

    /// The object count the header announces.
    pub fn announced(&self) -> u32 {
        self.expected
    }

    /// Start a pack of exactly `count` objects in `pack_dir` (`.git/objects/pack`).
    pub fn create(pack_dir: &Path, count: u32) -> Result<Self> {
        fs::create_dir_all(pack_dir).map_err(io_err(pack_dir))?;
        let tmp_pack = pack_dir.join(format!(
            "tmp_pack_theta_{}_{}",
            std::process::id(),
            unique_suffix()
        ));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp_pack)
            .map_err(io_err(&tmp_pack))?;
        let mut header = Vec::with_capacity(12);
        header.extend_from_slice(b"PACK");
        header.extend_from_slice(&2u32.to_be_bytes());
        header.extend_from_slice(&count.to_be_bytes());
        file.write_all(&header).map_err(io_err(&tmp_pack))?;
        let mut hasher = Sha1::new();
        hasher.update(&header);
        let flusher = Flusher::start(&file);
        Ok(PackWriter {
            dir: pack_dir.to_path_buf(),
            tmp_pack,
            file,
            hasher,
            offset: 12,
            expected: count,
            growable: false,
            done: false,
            index: Vec::with_capacity(count.min(1 << 20) as usize),
            flusher,
        })
    }

    /// Append an entry from its pieces (vectored writes: its content is not copied first).
    /// Returns its position, for [`PackWriter::set_id`].
    pub fn append_stored(&mut self, entry: &StoredEntry) -> Result<usize> {
        if !self.growable && self.index.len() as u32 >= self.expected {
            return Err(Error::InvalidArgument(
                "more objects than the pack header announced".into(),
            ));
        }
        let mut pieces: Vec<IoSlice> = Vec::with_capacity(entry.data.len() / STORED_BLOCK * 2 + 4);
        entry.for_each_piece(|p| {
            self.hasher.update(p);
            pieces.push(IoSlice::new(p));
        });
        write_all_vectored(&mut self.file, &mut pieces).map_err(io_err(&self.tmp_pack))?;
        self.index.push((entry.id, entry.crc32, self.offset));
        self.offset += entry.pack_len();
        self.flusher.wrote(entry.pack_len());
        Ok(self.index.len() - 1)
    }

    /// Append a small object compressed by zlib (trees, manifests: their names compress,
    /// where frames do not). Returns its position.
    pub fn append_deflated(&mut self, kind: Kind, data: &[u8]) -> Result<usize> {
        use std::io::Write as _;
        if !self.growable && self.index.len() as u32 >= self.expected {
            return Err(Error::InvalidArgument(
                "more objects than the pack header announced".into(),
            ));
        }
        let mut head = Vec::with_capacity(16 + data.len() / 2);
        entry_header(kind as u8, data.len() as u64, &mut head);
        let mut z = flate2::write::ZlibEncoder::new(head, flate2::Compression::default());
        let bytes = z
            .write_all(data)
            .and_then(|_| z.finish())
            .map_err(io_err(&self.tmp_pack))?;
        self.hasher.update(&bytes);
        self.file
            .write_all(&bytes)
            .map_err(io_err(&self.tmp_pack))?;
        self.index
            .push((object_id(kind, data), crc32fast::hash(&bytes), self.offset));
        self.offset += bytes.len() as u64;
        self.flusher.wrote(bytes.len() as u64);
        Ok(self.index.len() - 1)
    }

    /// Set the object id of the entry appended at `pos` (appended without one).
    pub fn set_id(&mut self, pos: usize, id: ObjectId) {
        self.index[pos].0 = id;
    }

    /// Write the trailer and the index, fsync, rename into place. Returns the pack's name
    /// (hex SHA-1 of its content) and the path of the final `.pack`.
    pub fn finish(mut self) -> Result<(String, PathBuf)> {
        let count = u32::try_from(self.index.len())
            .map_err(|_| Error::InvalidArgument("too many objects for one pack".into()))?;
        if count != self.expected && !self.growable {
            return Err(Error::InvalidArgument(format!(
                "pack announced {} objects but got {}",
                self.expected,
                self.index.len()
            )));
        }
        // An entry appended without its id must have been given one (a zero id would be written
        // into the index and the object could never be found).
        if self.index.iter().any(|e| e.0 == [0; 20]) {
            return Err(Error::InvalidArgument(
                "an object of the pack was never given its id".into(),
            ));
        }
        if count != self.expected {
            self.file
                .write_all_at(&count.to_be_bytes(), 8)
                .map_err(io_err(&self.tmp_pack))?;
            self.hasher = hash_file_prefix(&self.file, &self.tmp_pack, self.offset)?;
        }
        let checksum: [u8; 20] = self.hasher.finalize_reset().into();
        self.file
            .write_all(&checksum)
            .map_err(io_err(&self.tmp_pack))?;
        self.flusher.stop().map_err(io_err(&self.tmp_pack))?;
        self.file.sync_all().map_err(io_err(&self.tmp_pack))?;
        let name = crate::frame::hex(&checksum);
        let idx_bytes = build_index(&mut self.index, &checksum);
        let tmp_idx = self.tmp_pack.with_extension("idx");
        {
            let mut f = File::create(&tmp_idx).map_err(io_err(&tmp_idx))?;
            f.write_all(&idx_bytes).map_err(io_err(&tmp_idx))?;
            f.sync_all().map_err(io_err(&tmp_idx))?;
        }
        let pack = self.dir.join(format!("pack-{name}.pack"));
        let idx = self.dir.join(format!("pack-{name}.idx"));
        fs::rename(&self.tmp_pack, &pack).map_err(io_err(&pack))?;
        fs::rename(&tmp_idx, &idx).map_err(io_err(&idx))?;
        self.done = true;
        if let Ok(d) = File::open(&self.dir) {
            d.sync_all().map_err(io_err(&self.dir))?;
        }
        Ok((name, pack))
    }

    /// Remove the temporary file (on error paths; also done when dropped unfinished).
    pub fn abort(self) {}
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp_pack);
            let _ = fs::remove_file(self.tmp_pack.with_extension("idx"));
        }
    }
}

/// SHA-1 of the first `len` bytes of `file`, read in windows that stay in cache.
fn hash_file_prefix(file: &File, path: &Path, len: u64) -> Result<Sha1> {
    let mut h = Sha1::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)
            .map_err(io_err(path))?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h)
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:x}_{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Pack index version 2: fan-out, sorted ids, CRC32s, 31-bit offsets (+ 64-bit table), checksums.
fn build_index(entries: &mut [(ObjectId, u32, u64)], pack_checksum: &[u8; 20]) -> Vec<u8> {
    entries.sort_by_key(|e| e.0);
    let mut out = Vec::with_capacity(8 + 1024 + entries.len() * 28 + 40);
    out.extend_from_slice(&[0xff, b't', b'O', b'c']);
    out.extend_from_slice(&2u32.to_be_bytes());
    let mut fanout = [0u32; 256];
    for e in entries.iter() {
        fanout[e.0[0] as usize] += 1;
    }
    let mut acc = 0u32;
    for f in fanout {
        acc += f;
        out.extend_from_slice(&acc.to_be_bytes());
    }
    for e in entries.iter() {
        out.extend_from_slice(&e.0);
    }
    for e in entries.iter() {
        out.extend_from_slice(&e.1.to_be_bytes());
    }
    let mut large = Vec::new();
    for e in entries.iter() {
        if e.2 < 0x8000_0000 {
            out.extend_from_slice(&(e.2 as u32).to_be_bytes());
        } else {
            out.extend_from_slice(&(0x8000_0000u32 | large.len() as u32).to_be_bytes());
            large.push(e.2);
        }
    }
    for off in large {
        out.extend_from_slice(&off.to_be_bytes());
    }
    out.extend_from_slice(pack_checksum);
    let idx_checksum: [u8; 20] = Sha1::digest(&out).into();
    out.extend_from_slice(&idx_checksum);
    out
}

/// `Read` over a file from an offset, using positioned reads (shareable across threads).
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Read a whole (non-delta) blob stored at `offset` of a pack. Returns `Ok(None)` when the entry
/// is not a plain blob (git may have stored it as a delta): the caller then asks the object store.
pub fn read_pack_blob(
    file: &File,
    path: &str,
    offset: u64,
    max_len: u64,
) -> Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    Ok(read_pack_blob_into(file, path, offset, max_len, &mut out)?.then_some(out))
}

thread_local! {
    /// The raw bytes of an entry on the stored-blocks path (reused: no page faults per frame).
    static ENTRY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`read_pack_blob`] into `out` (its capacity is reused); `Ok(false)` for "not a plain blob".
///
/// Entries this module wrote (zlib stored blocks) take a fast path: one positioned read, the
/// block payloads copied out, the Adler-32 checked. Anything else (a pack git re-deflated) goes
/// through a zlib decoder.
pub fn read_pack_blob_into(
    file: &File,
    path: &str,
    offset: u64,
    max_len: u64,
    out: &mut Vec<u8>,
) -> Result<bool> {
    let corrupt = |what: String| Error::CorruptPack {
        path: path.to_string(),
        offset,
        what,
    };
    let mut head = [0u8; 16];
    let got = file
        .read_at(&mut head, offset)
        .map_err(|e| Error::io(path, e))?;
    if got == 0 {
        return Err(corrupt("offset is past the end of the pack".into()));
    }
    let kind = (head[0] >> 4) & 7;
    let mut size = (head[0] & 0x0f) as u64;
    let mut shift = 4;
    let mut i = 0;
    while head[i] & 0x80 != 0 {
        i += 1;
        if i >= got || shift > 57 {
            return Err(corrupt("object header is malformed".into()));
        }
        size |= ((head[i] & 0x7f) as u64) << shift;
        shift += 7;
    }
    if kind != Kind::Blob as u8 {
        return Ok(false);
    }
    if size > max_len {
        return Err(corrupt(format!(
            "blob of {size} bytes exceeds the {max_len}-byte limit"
        )));
    }
    let start = offset + i as u64 + 1;
    out.clear();
    if read_stored(file, path, start, size, out)? {
        let stored = out.len() as u64;
        if stored != size {
            return Err(corrupt(format!(
                "blob holds {stored} bytes, header says {size}"
            )));
        }
        return Ok(true);
    }
    out.clear();
    let reader = BufReader::with_capacity(256 * 1024, ReadAt { file, pos: start });
    out.reserve(size as usize);
    ZlibDecoder::new(reader)
        .take(size + 1)
        .read_to_end(out)
        .map_err(|e| corrupt(format!("zlib stream: {e}")))?;
    if out.len() as u64 != size {
        return Err(corrupt(format!(
            "blob inflates to {} bytes, header says {size}",
            out.len()
        )));
    }
    Ok(true)
}

/// The stored-blocks path of [`read_pack_blob_into`]: reads the zlib stream of a `size`-byte
/// object laid out as [`StoredEntry`] writes it. `Ok(false)` if it is laid out otherwise (then
/// nothing is decided: the caller inflates); an error if it is that layout with a bad checksum.
fn read_stored(file: &File, path: &str, start: u64, size: u64, out: &mut Vec<u8>) -> Result<bool> {
    const BLOCK: u64 = 65535;
    let blocks = size.div_ceil(BLOCK).max(1);
    let Some(len) = blocks
        .checked_mul(5)
        .and_then(|b| b.checked_add(size))
        .and_then(|n| n.checked_add(6))
    else {
        return Ok(false);
    };
    ENTRY.with(|cell| {
        let mut raw = cell.borrow_mut();
        raw.resize(len as usize, 0);
        let mut done = 0;
        while done < raw.len() {
            match file.read_at(&mut raw[done..], start + done as u64) {
                Ok(0) => return Ok(false), // shorter than that layout: let the decoder judge
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        let (cmf, flg) = (raw[0], raw[1]);
        if cmf & 0x0f != 8 || flg & 0x20 != 0 || !(cmf as u16 * 256 + flg as u16).is_multiple_of(31)
        {
            return Ok(false);
        }
        out.reserve(size as usize);
        let mut pos = 2;
        let mut left = size;
        for b in 0..blocks {
            let n = left.min(BLOCK) as usize;
            let last = b + 1 == blocks;
            let h = &raw[pos..pos + 5];
            let ln = u16::from_le_bytes([h[1], h[2]]);
            let nlen = u16::from_le_bytes([h[3], h[4]]);
            if h[0] != last as u8 || ln as usize != n || nlen != !ln {
                out.clear();
                return Ok(false);
            }
            out.extend_from_slice(&raw[pos + 5..pos + 5 + n]);
            pos += 5 + n;
            left -= n as u64;
        }
        let want = u32::from_be_bytes([raw[pos], raw[pos + 1], raw[pos + 2], raw[pos + 3]]);
        let mut adler = simd_adler32::Adler32::new();
        adler.write(out);
        if adler.finish() != want {
            return Err(Error::CorruptPack {
                path: path.to_string(),
                offset: start,
                what: "zlib stream: Adler-32 checksum does not match".into(),
            });
        }
        Ok(true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_id_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(
            crate::frame::hex(&blob_id(b"hello\n")),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[test]
    fn deflated_entries_and_bad_checksums() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 97) as u8).collect();
        // A blob as git itself writes it (deflated): the stored-blocks path declines, zlib reads it.
        let mut entry = Vec::new();
        entry_header(Kind::Blob as u8, data.len() as u64, &mut entry);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&data).unwrap();
        entry.extend_from_slice(&z.finish().unwrap());
        let path = dir.path().join("deflated");
        std::fs::write(&path, &entry).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(read_pack_blob(&f, "p", 0, 1 << 30).unwrap().unwrap(), data);
        // Our stored layout with one payload byte flipped: the Adler-32 catches it.
        let mut entry = StoredEntry::new(Kind::Blob, &data).to_bytes();
        let at = entry.len() / 2;
        entry[at] ^= 1;
        let path = dir.path().join("flipped");
        std::fs::write(&path, &entry).unwrap();
        let f = File::open(&path).unwrap();
        let err = read_pack_blob(&f, "p", 0, 1 << 30).unwrap_err();
        assert!(err.to_string().contains("Adler-32"), "{err}");
        // Truncated: neither path returns data.
        let entry = StoredEntry::new(Kind::Blob, &data).to_bytes();
        let path = dir.path().join("short");
        std::fs::write(&path, &entry[..entry.len() - 100]).unwrap();
        let f = File::open(&path).unwrap();
        assert!(read_pack_blob(&f, "p", 0, 1 << 30).is_err());
    }

    #[test]
    fn stored_entries_inflate() {
        for n in [0usize, 1, 65535, 65536, 200_000] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            let entry = StoredEntry::new(Kind::Blob, &data);
            let mut z = Vec::new();
            entry.for_each_piece(|p| z.extend_from_slice(p));
            assert_eq!(z.len() as u64, entry.pack_len());
            let z = z.split_off(entry.head.len() - 2); // the entry header goes, the zlib header stays
            let mut out = Vec::new();
            ZlibDecoder::new(&z[..]).read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn ids_set_later_write_the_same_pack() {
        let blobs: Vec<Vec<u8>> = vec![b"".to_vec(), vec![3u8; 65535], vec![7u8; 200_000]];
        let mut files = Vec::new();
        for later in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut w = PackWriter::create(dir.path(), blobs.len() as u32).unwrap();
            for (k, b) in blobs.iter().enumerate() {
                if later && k % 2 == 1 {
                    let entry = StoredEntry::without_id(Kind::Blob, b);
                    let pos = w.append_stored(&entry).unwrap();
                    w.set_id(pos, blob_id(b));
                } else {
                    w.append_stored(&StoredEntry::new(Kind::Blob, b)).unwrap();
                }
            }
            let (_, pack) = w.finish().unwrap();
            files.push((
                fs::read(&pack).unwrap(),
                fs::read(pack.with_extension("idx")).unwrap(),
            ));
        }
        assert!(
            files[0] == files[1],
            "the same pack and index, byte for byte"
        );
        // An id never set is refused, not written as zeros.
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), 1).unwrap();
        w.append_stored(&StoredEntry::without_id(Kind::Blob, b"abc"))
            .unwrap();
        let e = w.finish().unwrap_err();
        assert!(e.to_string().contains("never given its id"), "{e}");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing left behind"
        );
    }

    #[test]
    fn pack_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let blobs: Vec<Vec<u8>> = vec![b"".to_vec(), b"abc".to_vec(), vec![7u8; 200_000]];
        let mut w = PackWriter::create(dir.path(), blobs.len() as u32).unwrap();
        let mut offsets = Vec::new();
        for b in &blobs {
            offsets.push(w.offset);
            w.append_stored(&StoredEntry::new(Kind::Blob, b)).unwrap();
        }
        let (_, pack) = w.finish().unwrap();
        let f = File::open(&pack).unwrap();
        for (b, off) in blobs.iter().zip(offsets) {
            let got = read_pack_blob(&f, "p", off, 1 << 30).unwrap().unwrap();
            assert_eq!(&got, b);
        }
    }
}
