//! What the fuzz targets share: splitting an input into parts, a base resolver over fuzz bytes,
//! and a scratch file for the decoders that read files.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use theta_core::frame::ChunkId;
use theta_core::{Error, Result};

/// Chunks the targets decode are capped here: the decoders' own 1 GiB limit is a bound, not a
/// size worth spending fuzzing time on.
pub const MAX_OUT: u64 = 1 << 20;

/// `data` as a u16 LE length, that many bytes, and the rest (short inputs give empty parts).
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    data[2..].split_at(n)
}

/// Base chunks for format-3 frames: an id whose first byte is even gets `a`, odd gets `b`, and
/// an id starting 0xff is not found (so every resolver outcome is reachable by mutation).
pub struct Bases<'a> {
    pub a: &'a [u8],
    pub b: &'a [u8],
}

impl Bases<'_> {
    pub fn resolve(&self, id: &ChunkId) -> Result<Vec<u8>> {
        match id[0] {
            0xff => Err(Error::NotFound("base".into())),
            x if x % 2 == 0 => Ok(self.a.to_vec()),
            _ => Ok(self.b.to_vec()),
        }
    }
}

/// A file holding `data`, private to this process (the pack and pkt-line readers take files).
pub fn scratch_file(data: &[u8]) -> (File, PathBuf) {
    let dir = std::env::var_os("THETA_FUZZ_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("theta-fuzz-{}", std::process::id()));
    let mut f = File::create(&path).expect("scratch file");
    f.write_all(data).expect("scratch write");
    (File::open(&path).expect("scratch reopen"), path)
}

/// Every error a decoder may give on hostile bytes; anything else (a panic, an abort) is a fault.
pub fn expected(e: &Error) -> bool {
    matches!(
        e,
        Error::CorruptFrame(_)
            | Error::CorruptPack { .. }
            | Error::NotFound(_)
            | Error::Protocol(_)
    )
}
