//! git's pkt-line framing for the content part of the long-running filter protocol, so that a
//! checkpoint streams between git and the core without a Python call per 64 KiB packet.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Largest payload of one packet (65520 - 4).
pub const MAX_DATA: usize = 65516;

fn protocol(what: String) -> Error {
    Error::Protocol(what)
}

/// Read one packet's payload, appending it to `buf`; `Ok(None)` on a flush packet, else the
/// payload's length.
fn read_packet(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<usize>> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head)
        .map_err(|e| protocol(format!("reading a packet header: {e}")))?;
    // Four hex digits, as git writes them: from_str_radix alone also takes "+000" (a flush).
    if !head.iter().all(u8::is_ascii_hexdigit) {
        return Err(protocol(format!(
            "bad packet header {:?}",
            String::from_utf8_lossy(&head)
        )));
    }
    let text = std::str::from_utf8(&head).expect("hex digits are ASCII");
    let n = usize::from_str_radix(text, 16).expect("four hex digits");
    if n == 0 {
        return Ok(None);
    }
    if !(5..=MAX_DATA + 4).contains(&n) {
        return Err(protocol(format!("packet length {n} out of range")));
    }
    let start = buf.len();
    buf.resize(start + n - 4, 0);
    r.read_exact(&mut buf[start..])
        .map_err(|e| protocol(format!("reading a packet: {e}")))?;
    Ok(Some(n - 4))
}

/// What a content stream turned out to be.
#[derive(Debug)]
pub struct Received {
    pub len: u64,
    pub blake3: [u8; 32],
    /// The first `head_max` bytes (to recognise a pointer).
    pub head: Vec<u8>,
    /// Where the content can be read again: `None` if it equals `worktree` byte for byte,
    /// else the spill file it was copied to.
    pub spill: Option<PathBuf>,
}

/// How `receive` keeps the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Compare with the work-tree file; copy to a spill file from the first difference on.
    Compare,
    /// Only hash: the caller re-reads the work-tree file and checks it hashes the same.
    HashOnly,
}

/// Read content packets up to the flush packet from `input`, hashing them (4 MiB at a time, on
/// a thread of its own). With `Keep::Compare`, while they match the file `worktree` nothing is written;
/// from the first difference on (or if there is no such file), the content is copied to a new
/// file in `spill_dir` (required then). Memory: about 14 MiB.
pub fn receive(
    input: &Path,
    worktree: Option<&Path>,
    spill_dir: Option<&Path>,
    head_max: usize,
    keep: Keep,
) -> Result<Received> {
    let stdin = File::open(input).map_err(|e| Error::io(input.display().to_string(), e))?;
    let mut r = BufReader::with_capacity(1 << 20, stdin);
    let mut wt = match keep {
        Keep::Compare => worktree.and_then(|p| {
            File::open(p)
                .ok()
                .map(|f| BufReader::with_capacity(1 << 20, f))
        }),
        Keep::HashOnly => None,
    };
    let mut pending: Vec<u8> = Vec::with_capacity(4 << 20);
    let mut spill: Option<(PathBuf, BufWriter<File>)> = None;
    let mut head = Vec::new();
    let mut len = 0u64;
    let mut cmp = vec![0u8; MAX_DATA];
    let start_spill = |len: u64| -> Result<(PathBuf, BufWriter<File>)> {
        let spill_dir = spill_dir.ok_or_else(|| {
            Error::InvalidArgument(
                "the content must be kept but no spill directory was given".into(),
            )
        })?;
        std::fs::create_dir_all(spill_dir)
            .map_err(|e| Error::io(spill_dir.display().to_string(), e))?;
        let path = spill_dir.join(format!("clean-{}_{}", std::process::id(), len));
        let f = File::create(&path).map_err(|e| Error::io(path.display().to_string(), e))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        if len > 0 {
            // The bytes so far matched the work-tree file: copy them from there.
            let src = worktree.expect("a prefix matched, so there is a work-tree file");
            let mut f = File::open(src).map_err(|e| Error::io(src.display().to_string(), e))?;
            std::io::copy(&mut (&mut f).take(len), &mut w)
                .map_err(|e| Error::io(path.display().to_string(), e))?;
        }
        Ok((path, w))
    };
    // Hashing runs on its own thread, a 4 MiB buffer behind the reading (git is the other busy
    // process; the two overlap instead of taking turns). Three buffers circulate.
    let (to_hash, hash_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
    let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u8>>();
    let (result, hasher) = std::thread::scope(|scope| {
        let hashing = scope.spawn(move || {
            let mut hasher = blake3::Hasher::new();
            for buf in hash_rx {
                hasher.update(&buf);
                // The reader may be gone (an error): then the buffer is simply dropped.
                let _ = recycle.send(buf);
            }
            hasher
        });
        let result = (|| -> Result<()> {
            if wt.is_none() && keep == Keep::Compare {
                spill = Some(start_spill(0)?);
            }
            loop {
                if pending.len() > (4 << 20) - MAX_DATA {
                    let next = recycled
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(4 << 20));
                    let full = std::mem::replace(&mut pending, next);
                    pending.clear();
                    if to_hash.send(full).is_err() {
                        break; // cannot happen: the hashing thread only ends when we hang up
                    }
                }
                // Packets land straight in the hashing buffer: no copy per packet.
                let Some(n) = read_packet(&mut r, &mut pending)? else {
                    break;
                };
                let pkt = &pending[pending.len() - n..];
                if head.len() < head_max {
                    let take = (head_max - head.len()).min(pkt.len());
                    head.extend_from_slice(&pkt[..take]);
                }
                if let Some(w) = wt.as_mut() {
                    let c = &mut cmp[..pkt.len()];
                    let same = w.read_exact(c).is_ok() && c == pkt;
                    if !same {
                        wt = None;
                        spill = Some(start_spill(len)?);
                    }
                }
                if let Some((p, w)) = spill.as_mut() {
                    w.write_all(pkt)
                        .map_err(|e| Error::io(p.display().to_string(), e))?;
                }
                len += n as u64;
            }
            if let Some(w) = wt.as_mut() {
                let mut one = [0u8; 1];
                if w.read(&mut one).map_err(|e| Error::io("work tree", e))? > 0 {
                    // The work-tree file is longer than what git sent: keep what git sent.
                    spill = Some(start_spill(len)?);
                }
            }
            if let Some((p, w)) = spill.as_mut() {
                w.flush()
                    .map_err(|e| Error::io(p.display().to_string(), e))?;
            }
            Ok(())
        })();
        let _ = to_hash.send(std::mem::take(&mut pending));
        drop(to_hash);
        let hasher = hashing.join().expect("hashing thread");
        (result, hasher)
    });
    if let Err(e) = result {
        if let Some((p, _)) = spill {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    Ok(Received {
        len,
        blake3: *hasher.finalize().as_bytes(),
        head,
        spill: spill.map(|(p, _)| p),
    })
}

/// Frame `data` as content packets onto `w`, with vectored writes (headers and payload slices
/// go to the kernel as they are: no copy of the payload here).
pub fn send(w: &mut (impl Write + ?Sized), data: &[u8]) -> std::io::Result<()> {
    let headers: Vec<[u8; 4]> = data
        .chunks(MAX_DATA)
        .map(|part| {
            let mut h = [0u8; 4];
            h.copy_from_slice(format!("{:04x}", part.len() + 4).as_bytes());
            h
        })
        .collect();
    let mut slices: Vec<std::io::IoSlice<'_>> = headers
        .iter()
        .zip(data.chunks(MAX_DATA))
        .flat_map(|(h, part)| [std::io::IoSlice::new(h), std::io::IoSlice::new(part)])
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_matches_and_spills() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let wt = dir.path().join("wt");
        std::fs::write(&wt, &data).unwrap();
        let mut stream = Vec::new();
        send(&mut stream, &data).unwrap();
        stream.extend_from_slice(b"0000");
        let input = dir.path().join("in");
        std::fs::write(&input, &stream).unwrap();
        let got = receive(&input, Some(&wt), Some(dir.path()), 10, Keep::HashOnly).unwrap();
        assert_eq!(got.blake3, *blake3::hash(&data).as_bytes());
        assert!(got.spill.is_none());
        let got = receive(&input, Some(&wt), Some(dir.path()), 10, Keep::Compare).unwrap();
        assert_eq!(got.len, data.len() as u64);
        assert_eq!(got.blake3, *blake3::hash(&data).as_bytes());
        assert!(got.spill.is_none());
        assert_eq!(got.head, &data[..10]);
        // A work tree that differs half way: the content is spilled, byte-exact.
        let mut other = data.clone();
        other[150_000] ^= 1;
        std::fs::write(&wt, &other).unwrap();
        let got = receive(&input, Some(&wt), Some(dir.path()), 10, Keep::Compare).unwrap();
        let spilled = std::fs::read(got.spill.unwrap()).unwrap();
        assert_eq!(spilled, data);
        // No work tree at all.
        let got = receive(&input, None, Some(dir.path()), 10, Keep::Compare).unwrap();
        assert_eq!(std::fs::read(got.spill.unwrap()).unwrap(), data);
    }
}
