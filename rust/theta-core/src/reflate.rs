//! Deflated ZIP members (`np.savez_compressed`) kept inflated, and deflated again on restore.
//!
//! A member's arrays are chunked, deduplicated and delta-coded only as inflated bytes, yet the
//! file must come back byte-exact on any machine. Deflate output depends on the encoder, its
//! version and its parameters, so this module uses one zlib, built from the source pinned in
//! Cargo.lock (libz-sys `static`), never the system's: a member is kept inflated only when this
//! zlib, with parameters found here, reproduces its compressed bytes exactly, and a rebuild
//! checks each member's CRC-32 and compressed size and then the whole file's BLAKE3.
//!
//! Memory is bounded: members are read and written in windows, one stream per member, members
//! in parallel.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::frame::{hex, ChunkId};
use crate::pipeline::Progress;

/// Input window of a stream (and of the copies between members).
const WINDOW: usize = 1 << 20;
/// Output buffer of a stream.
const OUT: usize = 256 << 10;

/// Parameters of `deflateInit2` (raw deflate: `wbits` negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub level: i32,
    pub wbits: i32,
    pub mem_level: i32,
    pub strategy: i32,
}

/// What Python's zipfile (and so `np.savez_compressed`) uses: zlib's default level (6), a raw
/// 32 KiB window, memLevel 8, the default strategy; the other levels follow (`zipfile`'s
/// `compresslevel`), each given up at its first differing byte.
pub const CANDIDATES: [Params; 9] = {
    let mut out = [Params {
        level: 6,
        wbits: -15,
        mem_level: 8,
        strategy: 0,
    }; 9];
    let levels = [6, 1, 2, 3, 4, 5, 7, 8, 9];
    let mut i = 0;
    while i < 9 {
        out[i].level = levels[i];
        i += 1;
    }
    out
};

/// One deflated member: where its compressed bytes are in the file, where its inflated bytes are
/// in the expanded file (the file with every such member inflated in place), and its CRC-32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub packed_offset: u64,
    pub packed_len: u64,
    pub plain_offset: u64,
    pub plain_len: u64,
    pub crc32: u32,
}

/// How a member fared at `expand_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Inflated, and this zlib with these parameters gives back its compressed bytes exactly.
    Reproduced(Params),
    /// Kept compressed, for this reason.
    Kept(String),
}

#[allow(unsafe_code)]
mod zlib {
    //! The few zlib calls used here, on a stream that never moves (zlib keeps a pointer to it).
    use libz_sys as z;
    use std::os::raw::c_int;
    use std::ptr::null_mut;

    use super::Params;

    // SAFETY: zlib's allocator contract: return memory for items*size bytes or null; free what it got.
    unsafe extern "C" fn zalloc(_: z::voidpf, items: z::uInt, size: z::uInt) -> z::voidpf {
        unsafe { libc::calloc(items as usize, size as usize) }
    }
    unsafe extern "C" fn zfree(_: z::voidpf, p: z::voidpf) {
        unsafe { libc::free(p) }
    }

    pub struct Stream {
        strm: Box<z::z_stream>,
        deflate: bool,
    }

    fn blank() -> Box<z::z_stream> {
        Box::new(z::z_stream {
            next_in: null_mut(),
            avail_in: 0,
            total_in: 0,
            next_out: null_mut(),
            avail_out: 0,
            total_out: 0,
            msg: null_mut(),
            state: null_mut(),
            zalloc,
            zfree,
            opaque: null_mut(),
            data_type: 0,
            adler: 0,
            reserved: 0,
        })
    }

    impl Stream {
        pub fn deflater(p: Params) -> Result<Self, String> {
            let mut strm = blank();
            // SAFETY: a fresh stream with valid allocators; version and struct size as zlib.h has them.
            let rc = unsafe {
                z::deflateInit2_(
                    &mut *strm,
                    p.level,
                    z::Z_DEFLATED,
                    p.wbits,
                    p.mem_level,
                    p.strategy,
                    z::zlibVersion(),
                    std::mem::size_of::<z::z_stream>() as c_int,
                )
            };
            if rc != z::Z_OK {
                return Err(format!("zlib refuses deflate parameters {p:?} (code {rc})"));
            }
            Ok(Stream {
                strm,
                deflate: true,
            })
        }

        pub fn inflater() -> Result<Self, String> {
            let mut strm = blank();
            // SAFETY: as for deflateInit2_.
            let rc = unsafe {
                z::inflateInit2_(
                    &mut *strm,
                    -15,
                    z::zlibVersion(),
                    std::mem::size_of::<z::z_stream>() as c_int,
                )
            };
            if rc != z::Z_OK {
                return Err(format!("zlib inflateInit2 failed (code {rc})"));
            }
            Ok(Stream {
                strm,
                deflate: false,
            })
        }

        /// One deflate or inflate call: (input consumed, output produced, zlib's return code).
        pub fn step(
            &mut self,
            input: &[u8],
            out: &mut [u8],
            finish: bool,
        ) -> (usize, usize, c_int) {
            let s = &mut *self.strm;
            s.next_in = input.as_ptr() as *mut u8;
            s.avail_in = input.len() as z::uInt;
            s.next_out = out.as_mut_ptr();
            s.avail_out = out.len() as z::uInt;
            let flush = if finish { z::Z_FINISH } else { z::Z_NO_FLUSH };
            // SAFETY: next_in/next_out point at live slices of the lengths given; the stream was
            // initialised and has not moved (boxed).
            let rc = unsafe {
                if self.deflate {
                    z::deflate(s, flush)
                } else {
                    z::inflate(s, flush)
                }
            };
            let used = input.len() - s.avail_in as usize;
            let made = out.len() - s.avail_out as usize;
            s.next_in = null_mut();
            s.next_out = null_mut();
            (used, made, rc)
        }
    }

    impl Drop for Stream {
        fn drop(&mut self) {
            // SAFETY: initialised by the matching *Init2_ call.
            unsafe {
                if self.deflate {
                    z::deflateEnd(&mut *self.strm);
                } else {
                    z::inflateEnd(&mut *self.strm);
                }
            }
        }
    }

    pub const STREAM_END: c_int = z::Z_STREAM_END;
    pub const OK: c_int = z::Z_OK;
    pub const BUF_ERROR: c_int = z::Z_BUF_ERROR;
}

/// Deflate `len` bytes of `src` from `offset` with `params`, handing the output to `sink` in
/// pieces; `sink` returns false to stop early. Returns (CRC-32 of the input, all output given).
fn deflate_region(
    src: &File,
    name: &str,
    offset: u64,
    len: u64,
    params: Params,
    sink: &mut dyn FnMut(&[u8]) -> Result<bool>,
) -> Result<(u32, bool)> {
    let mut z = zlib::Stream::deflater(params).map_err(Error::InvalidArgument)?;
    let mut crc = crc32fast::Hasher::new();
    let mut input = vec![0u8; WINDOW.min(len as usize).max(1)];
    let mut out = vec![0u8; OUT];
    let mut pos = 0u64;
    loop {
        let n = (len - pos).min(WINDOW as u64) as usize;
        src.read_exact_at(&mut input[..n], offset + pos)
            .map_err(|e| Error::io(name, e))?;
        crc.update(&input[..n]);
        pos += n as u64;
        let finish = pos == len;
        let mut at = 0;
        loop {
            let (used, made, rc) = z.step(&input[at..n], &mut out, finish);
            at += used;
            if rc != zlib::OK && rc != zlib::STREAM_END && rc != zlib::BUF_ERROR {
                return Err(Error::InvalidArgument(format!(
                    "zlib deflate failed (code {rc})"
                )));
            }
            if made > 0 && !sink(&out[..made])? {
                return Ok((crc.finalize(), false));
            }
            if rc == zlib::STREAM_END {
                return Ok((crc.finalize(), true));
            }
            if !finish && at == n && made < out.len() {
                break;
            }
        }
    }
}

/// Inflate member `m` of `src` into `dst` at its plain offset; None when it inflates to exactly
/// its claimed length and CRC-32, else why not. Never writes past the claimed length. Hashes
/// the compressed bytes (BLAKE3) on the way: `packed` holds their id when it returns None.
fn inflate_member(
    src: &File,
    dst: &File,
    names: (&str, &str),
    m: &Member,
    packed: &mut blake3::Hasher,
) -> Result<Option<String>> {
    let mut z = match zlib::Stream::inflater() {
        Ok(z) => z,
        Err(e) => return Err(Error::InvalidArgument(e)),
    };
    let mut input = vec![0u8; WINDOW.min(m.packed_len as usize).max(1)];
    let mut out = vec![0u8; WINDOW];
    let mut crc = crc32fast::Hasher::new();
    let (mut read, mut made_total) = (0u64, 0u64);
    let mut ended = false;
    while !ended {
        let n = (m.packed_len - read).min(WINDOW as u64) as usize;
        if n == 0 {
            return Ok(Some(format!(
                "its deflate stream is cut short ({} bytes inflate to {made_total} of {})",
                m.packed_len, m.plain_len
            )));
        }
        src.read_exact_at(&mut input[..n], m.packed_offset + read)
            .map_err(|e| Error::io(names.0, e))?;
        packed.update(&input[..n]);
        read += n as u64;
        let mut at = 0;
        loop {
            let (used, made, rc) = z.step(&input[at..n], &mut out, false);
            at += used;
            if rc != zlib::OK && rc != zlib::STREAM_END && rc != zlib::BUF_ERROR {
                return Ok(Some(format!(
                    "its deflate stream is corrupt (zlib code {rc})"
                )));
            }
            if made_total + made as u64 > m.plain_len {
                return Ok(Some(format!(
                    "it inflates to more than the {} bytes its header claims",
                    m.plain_len
                )));
            }
            crc.update(&out[..made]);
            dst.write_all_at(&out[..made], m.plain_offset + made_total)
                .map_err(|e| Error::io(names.1, e))?;
            made_total += made as u64;
            if rc == zlib::STREAM_END {
                ended = true;
                if at != n || read != m.packed_len {
                    return Ok(Some("bytes follow the end of its deflate stream".into()));
                }
                break;
            }
            if at == n && made < out.len() {
                break;
            }
        }
    }
    if made_total != m.plain_len {
        return Ok(Some(format!(
            "it inflates to {made_total} bytes, its header claims {}",
            m.plain_len
        )));
    }
    let got = crc.finalize();
    if got != m.crc32 {
        return Ok(Some(format!(
            "its CRC-32 is {got:08x}, its header says {:08x}",
            m.crc32
        )));
    }
    Ok(None)
}

/// Whether deflating the plain bytes of `m` (in `plain`) with `params` gives exactly its
/// compressed bytes (in `packed`); stops at the first differing byte.
fn reproduces(
    plain: &File,
    packed: &File,
    names: (&str, &str),
    m: &Member,
    params: Params,
) -> Result<bool> {
    let mut want = vec![0u8; OUT];
    let mut pos = 0u64;
    let mut compare = |got: &[u8]| -> Result<bool> {
        if pos + got.len() as u64 > m.packed_len {
            return Ok(false);
        }
        let w = &mut want[..got.len()];
        packed
            .read_exact_at(w, m.packed_offset + pos)
            .map_err(|e| Error::io(names.0, e))?;
        pos += got.len() as u64;
        Ok(w == got)
    };
    let (_, whole) = deflate_region(
        plain,
        names.1,
        m.plain_offset,
        m.plain_len,
        params,
        &mut compare,
    )?;
    Ok(whole && pos == m.packed_len)
}

/// Copy the bytes between members (`members` sorted by `packed_offset`) from `src` to `dst`:
/// `to_plain` copies packed -> plain offsets (expanding), else plain -> packed.
fn copy_gaps(
    src: &File,
    dst: &File,
    names: (&str, &str),
    members: &[Member],
    packed_size: u64,
    to_plain: bool,
) -> Result<()> {
    let mut gaps = Vec::new();
    let (mut packed, mut plain) = (0u64, 0u64);
    for m in members {
        gaps.push((packed, plain, m.packed_offset - packed));
        packed = m.packed_offset + m.packed_len;
        plain = m.plain_offset + m.plain_len;
    }
    gaps.push((packed, plain, packed_size - packed));
    let mut buf = vec![0u8; WINDOW];
    for (packed, plain, len) in gaps {
        let (from, to) = if to_plain {
            (packed, plain)
        } else {
            (plain, packed)
        };
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(WINDOW as u64) as usize;
            src.read_exact_at(&mut buf[..n], from + pos)
                .map_err(|e| Error::io(names.0, e))?;
            dst.write_all_at(&buf[..n], to + pos)
                .map_err(|e| Error::io(names.1, e))?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Members must be sorted, disjoint, inside the file, and laid out in the expanded file as
/// the packed file has them (each plain offset shifted by what the members before it grew).
fn check_layout(members: &[Member], packed_size: u64) -> Result<u64> {
    let (mut packed_end, mut grow) = (0u64, 0i128);
    for (i, m) in members.iter().enumerate() {
        let end = m.packed_offset.checked_add(m.packed_len);
        if m.packed_offset < packed_end || end.is_none_or(|e| e > packed_size) {
            return Err(Error::InvalidArgument(format!(
                "member {i} at byte {} overlaps another or lies outside the {packed_size}-byte file",
                m.packed_offset
            )));
        }
        if m.plain_offset as i128 != m.packed_offset as i128 + grow {
            return Err(Error::InvalidArgument(format!(
                "member {i}: inflated offset {} does not follow from its offset {}",
                m.plain_offset, m.packed_offset
            )));
        }
        grow += m.plain_len as i128 - m.packed_len as i128;
        packed_end = end.unwrap_or(u64::MAX);
    }
    u64::try_from(packed_size as i128 + grow)
        .map_err(|_| Error::InvalidArgument("expanded size overflows".into()))
}

/// Write the expanded file of `src` (its `members` inflated in place) to `dst`, and find for
/// each member the parameters that deflate it back exactly (trying [`CANDIDATES`]), with the
/// BLAKE3 of its compressed bytes. A member whose compressed bytes are in `known` (verified at
/// an earlier add: the same bytes inflate to the same bytes, which the pinned zlib deflates the
/// same way) takes the parameters recorded there without being deflated again.
/// Members are worked on in parallel. A member that does not inflate cleanly to its claimed
/// size and CRC-32, or that no candidate reproduces, is [`Outcome::Kept`] (its place in `dst`
/// then holds whatever it inflated to: the caller does not use such an expansion).
pub fn expand_file(
    src: &Path,
    dst: &Path,
    members: &[Member],
    known: &HashMap<ChunkId, Params>,
) -> Result<Vec<(Outcome, ChunkId)>> {
    let names = (src.display().to_string(), dst.display().to_string());
    let names = (names.0.as_str(), names.1.as_str());
    let input = File::open(src).map_err(|e| Error::io(names.0, e))?;
    let size = input.metadata().map_err(|e| Error::io(names.0, e))?.len();
    let expanded = check_layout(members, size)?;
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(|e| Error::io(names.1, e))?;
    out.set_len(expanded).map_err(|e| Error::io(names.1, e))?;
    copy_gaps(&input, &out, names, members, size, true)?;
    members
        .par_iter()
        .map(|m| {
            let mut hasher = blake3::Hasher::new();
            let why = inflate_member(&input, &out, names, m, &mut hasher)?;
            let id = *hasher.finalize().as_bytes();
            if let Some(why) = why {
                return Ok((Outcome::Kept(why), id));
            }
            if let Some(p) = known.get(&id) {
                return Ok((Outcome::Reproduced(*p), id));
            }
            for p in CANDIDATES {
                if reproduces(&out, &input, names, m, p)? {
                    return Ok((Outcome::Reproduced(p), id));
                }
            }
            let why = "no zlib level 1-9 (raw, memLevel 8) reproduces its compressed bytes";
            Ok((Outcome::Kept(why.into()), id))
        })
        .collect()
}

/// Rebuild a file from its expanded form: deflate each member (with its recorded parameters)
/// back into place, copy everything else, fsync, and check the whole file's BLAKE3.
/// A member whose plain bytes do not have its CRC-32, or that deflates to a size other than
/// its recorded one, is an error naming it: never a file with wrong bytes.
pub fn reflate_file(
    src: &Path,
    dst: &Path,
    members: &[(Member, Params)],
    size: u64,
    file_id: &ChunkId,
    progress: &dyn Progress,
) -> Result<()> {
    let names = (src.display().to_string(), dst.display().to_string());
    let names = (names.0.as_str(), names.1.as_str());
    let plain: Vec<Member> = members.iter().map(|(m, _)| *m).collect();
    check_layout(&plain, size)?;
    let input = File::open(src).map_err(|e| Error::io(names.0, e))?;
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(|e| Error::io(names.1, e))?;
    out.set_len(size).map_err(|e| Error::io(names.1, e))?;
    copy_gaps(&input, &out, names, &plain, size, false)?;
    members.par_iter().enumerate().try_for_each(|(i, (m, p))| {
        let mut pos = 0u64;
        let mut write = |got: &[u8]| -> Result<bool> {
            if pos + got.len() as u64 > m.packed_len {
                return Err(Error::CorruptFrame(format!(
                    "deflated member {i} (file offset {}) comes out longer than its {} bytes",
                    m.packed_offset, m.packed_len
                )));
            }
            out.write_all_at(got, m.packed_offset + pos)
                .map_err(|e| Error::io(names.1, e))?;
            pos += got.len() as u64;
            progress.advance(got.len() as u64)?;
            Ok(true)
        };
        let (crc, _) = deflate_region(&input, names.0, m.plain_offset, m.plain_len, *p, &mut write)?;
        if crc != m.crc32 {
            return Err(Error::CorruptFrame(format!(
                "deflated member {i} (file offset {}): its bytes have CRC-32 {crc:08x}, the archive says {:08x}",
                m.packed_offset, m.crc32
            )));
        }
        if pos != m.packed_len {
            return Err(Error::CorruptFrame(format!(
                "deflated member {i} (file offset {}) deflates to {pos} bytes, the archive holds {} \
                 (this zlib does not reproduce it)",
                m.packed_offset, m.packed_len
            )));
        }
        Ok(())
    })?;
    out.sync_all().map_err(|e| Error::io(names.1, e))?;
    let got = hash_file(&out, names.1, size)?;
    if got != *file_id {
        return Err(Error::CorruptFrame(format!(
            "rebuilt file hashes to {} but the manifest says {}",
            hex(&got),
            hex(file_id)
        )));
    }
    Ok(())
}

fn hash_file(file: &File, name: &str, size: u64) -> Result<ChunkId> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; (16 << 20).min(size as usize)];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)
            .map_err(|e| Error::io(name, e))?;
        hasher.update_rayon(&buf[..n]);
        pos += n as u64;
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Send the file at `src` as pkt-line content packets to `out` (the smudge of a file that was
/// rebuilt on disk first).
pub fn send_path(out: &mut dyn std::io::Write, src: &Path) -> Result<()> {
    let name = src.display().to_string();
    let f = File::open(src).map_err(|e| Error::io(&name, e))?;
    let size = f.metadata().map_err(|e| Error::io(&name, e))?.len();
    let mut buf = vec![0u8; WINDOW];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(WINDOW as u64) as usize;
        f.read_exact_at(&mut buf[..n], pos)
            .map_err(|e| Error::io(&name, e))?;
        crate::pktline::send(out, &buf[..n]).map_err(|e| Error::io("git (filter output)", e))?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::NoProgress;
    use std::io::Write;

    fn deflate_all(data: &[u8], p: Params) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain");
        std::fs::write(&path, data).unwrap();
        let f = File::open(&path).unwrap();
        let mut out = Vec::new();
        deflate_region(&f, "plain", 0, data.len() as u64, p, &mut |b| {
            out.extend_from_slice(b);
            Ok(true)
        })
        .unwrap();
        out
    }

    /// A little zip-like file: a header, a member deflated at `level`, a trailer.
    fn packed_file(plain: &[u8], level: i32) -> (Vec<u8>, Member) {
        let mut p = CANDIDATES[0];
        p.level = level;
        let packed = deflate_all(plain, p);
        let mut file = b"HEADER--".to_vec();
        let m = Member {
            packed_offset: file.len() as u64,
            packed_len: packed.len() as u64,
            plain_offset: file.len() as u64,
            plain_len: plain.len() as u64,
            crc32: crc32fast::hash(plain),
        };
        file.extend_from_slice(&packed);
        file.extend_from_slice(b"--TRAILER");
        (file, m)
    }

    fn sample() -> Vec<u8> {
        (0..1_500_000u64)
            .map(|i| (((i * 7919) % 251) ^ (i >> 9)) as u8)
            .collect()
    }

    #[test]
    fn expand_then_reflate_is_byte_exact() {
        let dir = tempfile::tempdir().unwrap();
        let plain = sample();
        for level in [6, 9, 1] {
            let (file, m) = packed_file(&plain, level);
            let (src, exp, back) = (
                dir.path().join("f"),
                dir.path().join("e"),
                dir.path().join("b"),
            );
            std::fs::write(&src, &file).unwrap();
            let got = expand_file(&src, &exp, &[m], &HashMap::new()).unwrap();
            let Outcome::Reproduced(p) = got[0].0 else {
                panic!("level {level} not reproduced: {got:?}")
            };
            let e = std::fs::read(&exp).unwrap();
            assert_eq!(&e[8..8 + plain.len()], &plain[..]);
            assert!(e.ends_with(b"--TRAILER"));
            let id = *blake3::hash(&file).as_bytes();
            reflate_file(&exp, &back, &[(m, p)], file.len() as u64, &id, &NoProgress).unwrap();
            assert_eq!(std::fs::read(&back).unwrap(), file);
        }
    }

    #[test]
    fn hostile_members_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let plain = sample();
        let (file, m) = packed_file(&plain, 6);
        let src = dir.path().join("f");
        std::fs::write(&src, &file).unwrap();
        let exp = dir.path().join("e");
        let lying = [
            Member {
                crc32: m.crc32 ^ 1,
                ..m
            },
            Member {
                plain_len: m.plain_len - 1,
                ..m
            },
            Member {
                plain_len: m.plain_len + 1,
                ..m
            },
        ];
        for bad in lying {
            let got = expand_file(&src, &exp, &[bad], &HashMap::new()).unwrap();
            assert!(matches!(got[0].0, Outcome::Kept(_)), "{bad:?}: {got:?}");
        }
        // A stream flushed half way (another encoder's output) inflates but is not reproduced.
        let mut flushed = Vec::new();
        {
            let mut w =
                flate2::write::DeflateEncoder::new(&mut flushed, flate2::Compression::new(6));
            w.write_all(&plain[..1000]).unwrap();
            w.flush().unwrap();
            w.write_all(&plain[1000..]).unwrap();
            w.finish().unwrap();
        }
        let mut f2 = b"HEADER--".to_vec();
        f2.extend_from_slice(&flushed);
        let m2 = Member {
            packed_len: flushed.len() as u64,
            ..m
        };
        std::fs::write(&src, &f2).unwrap();
        let got = expand_file(&src, &exp, &[m2], &HashMap::new()).unwrap();
        assert!(
            matches!(&got[0].0, Outcome::Kept(w) if w.contains("reproduces")),
            "{got:?}"
        );
        // Garbage is corrupt, not a crash.
        let mut f3 = b"HEADER--".to_vec();
        f3.extend(std::iter::repeat_n(0xffu8, 5000));
        std::fs::write(&src, &f3).unwrap();
        let got = expand_file(
            &src,
            &exp,
            &[Member {
                packed_len: 5000,
                ..m
            }],
            &HashMap::new(),
        )
        .unwrap();
        assert!(matches!(got[0].0, Outcome::Kept(_)), "{got:?}");
    }

    #[test]
    fn reflate_refuses_wrong_plain_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let plain = sample();
        let (file, m) = packed_file(&plain, 6);
        let (src, exp, back) = (
            dir.path().join("f"),
            dir.path().join("e"),
            dir.path().join("b"),
        );
        std::fs::write(&src, &file).unwrap();
        let Outcome::Reproduced(p) = expand_file(&src, &exp, &[m], &HashMap::new()).unwrap()[0].0
        else {
            panic!()
        };
        let mut e = std::fs::read(&exp).unwrap();
        e[100] ^= 1;
        std::fs::write(&exp, &e).unwrap();
        let id = *blake3::hash(&file).as_bytes();
        let err =
            reflate_file(&exp, &back, &[(m, p)], file.len() as u64, &id, &NoProgress).unwrap_err();
        assert!(err.to_string().contains("member 0"), "{err}");
    }

    #[test]
    fn known_packed_bytes_take_their_recorded_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let plain = sample();
        let (file, m) = packed_file(&plain, 9);
        let (src, exp) = (dir.path().join("f"), dir.path().join("e"));
        std::fs::write(&src, &file).unwrap();
        let got = expand_file(&src, &exp, &[m], &HashMap::new()).unwrap();
        let packed = *blake3::hash(&file[8..8 + m.packed_len as usize]).as_bytes();
        assert_eq!(got[0].1, packed);
        let Outcome::Reproduced(p) = got[0].0 else {
            panic!("{got:?}")
        };
        // Recorded parameters are taken as they are for the same compressed bytes (the search
        // would have found level 9 again): no member is deflated.
        let recorded = Params { level: 7, ..p };
        let known = HashMap::from([(packed, recorded)]);
        let again = expand_file(&src, &exp, &[m], &known).unwrap();
        assert_eq!(again[0].0, Outcome::Reproduced(recorded));
        assert_eq!(std::fs::read(&exp).unwrap()[8..8 + plain.len()], plain[..]);
    }
}
