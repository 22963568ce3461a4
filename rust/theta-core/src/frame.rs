//! Frames: what is stored for one chunk. A self-describing header, then one payload per byte plane.
//!
//! ```text
//! offset  size  field
//! 0       4     magic 0x89 'T' 'S' 'F'
//! 4       1     frame format version (1)
//! 5       1     codec (1 = byte planes)
//! 6       1     dtype code (see DType)
//! 7       1     plane count P (1..=8)
//! 8       8     raw length, u64 LE
//! 16      32    BLAKE3 of the raw bytes (the chunk id)
//! 48      9*P   per plane: mode (0 raw, 1 zstd level 1, 2 rANS order 0), stored length u64 LE
//! 48+9P   ...   the plane payloads, in plane order
//! ```
//! Plane `j` holds byte `j` (little-endian) of every element; multi-byte floats are rotated left by
//! one bit first, so the top plane is the exponent. Decoding always re-hashes and compares.

use crate::ans;
use crate::dtype::DType;
use crate::error::{Error, Result};

pub const MAGIC: [u8; 4] = [0x89, b'T', b'S', b'F'];
pub const VERSION: u8 = 1;
pub const CODEC_PLANES: u8 = 1;
pub const HEADER_LEN: usize = 48;

pub type ChunkId = [u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PlaneMode {
    Raw = 0,
    Zstd = 1,
    Rans = 2,
}

/// Parsed frame header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInfo {
    pub codec: u8,
    pub dtype: DType,
    pub raw_len: u64,
    pub id: ChunkId,
    pub planes: Vec<(PlaneMode, u64)>,
}

impl FrameInfo {
    pub fn stored_len(&self) -> u64 {
        HEADER_LEN as u64
            + 9 * self.planes.len() as u64
            + self.planes.iter().map(|p| p.1).sum::<u64>()
    }
}

pub fn chunk_id(data: &[u8]) -> ChunkId {
    *blake3::hash(data).as_bytes()
}

/// Planes below this size are stored raw: tables and headers would eat any gain.
const MIN_CODED_PLANE: usize = 64;

/// Split `data` into `p` byte planes (rotating float bit patterns first).
fn split_planes(data: &[u8], dtype: DType, p: usize) -> Vec<Vec<u8>> {
    let n = data.len() / p;
    let mut planes: Vec<Vec<u8>> = (0..p).map(|_| vec![0u8; n]).collect();
    macro_rules! split {
        ($t:ty, $k:expr) => {{
            let rotate = dtype.rotates();
            let mut outs: Vec<&mut [u8]> = planes.iter_mut().map(|v| v.as_mut_slice()).collect();
            for (i, e) in data.chunks_exact($k).enumerate() {
                let mut v = <$t>::from_le_bytes(e.try_into().unwrap());
                if rotate {
                    v = v.rotate_left(1);
                }
                let b = v.to_le_bytes();
                for j in 0..$k {
                    outs[j][i] = b[j];
                }
            }
        }};
    }
    match p {
        1 => planes[0].copy_from_slice(data),
        2 => split!(u16, 2),
        4 => split!(u32, 4),
        8 => split!(u64, 8),
        _ => unreachable!("plane count is an element size"),
    }
    planes
}

fn merge_planes(planes: &[Vec<u8>], dtype: DType, out: &mut [u8]) {
    let p = planes.len();
    macro_rules! merge {
        ($t:ty, $k:expr) => {{
            let rotate = dtype.rotates();
            for (i, e) in out.chunks_exact_mut($k).enumerate() {
                let mut b = [0u8; $k];
                for j in 0..$k {
                    b[j] = planes[j][i];
                }
                let mut v = <$t>::from_le_bytes(b);
                if rotate {
                    v = v.rotate_right(1);
                }
                e.copy_from_slice(&v.to_le_bytes());
            }
        }};
    }
    match p {
        1 => out.copy_from_slice(&planes[0]),
        2 => merge!(u16, 2),
        4 => merge!(u32, 4),
        8 => merge!(u64, 8),
        _ => unreachable!("plane count is an element size"),
    }
}

/// Pick the smallest of raw, rANS and zstd-1 for one plane. Integer-only decisions: the same
/// plane gives the same bytes everywhere.
fn encode_plane(plane: &[u8]) -> (PlaneMode, Vec<u8>) {
    let n = plane.len();
    if n < MIN_CODED_PLANE {
        return (PlaneMode::Raw, plane.to_vec());
    }
    let hist = ans::histogram(plane);
    // Collision entropy bounds Shannon entropy from below: if sum(p^2) <= 1.02/256 no order-0
    // coder can save more than log2(1.02)/8 = 0.36%, so don't spend time trying.
    let sum_sq: u128 = hist.iter().map(|&c| c as u128 * c as u128).sum();
    let near_uniform = sum_sq * 256 * 100 <= (n as u128 * n as u128) * 102;
    let mut best = (PlaneMode::Raw, None::<Vec<u8>>, n);
    if !near_uniform {
        let mut r = Vec::new();
        ans::encode_with_hist(plane, &hist, &mut r);
        if r.len() < best.2 {
            best = (PlaneMode::Rans, None, r.len());
            best.1 = Some(r);
        }
    }
    // zstd finds repeats an order-0 coder cannot (structured or duplicated weights). Try it on a
    // sample first; only planes where it beats the current best on the sample get a full run.
    let sample = &plane[..n.min(64 * 1024)];
    let sample_best = match best.0 {
        PlaneMode::Raw => sample.len(),
        _ => {
            let mut r = Vec::new();
            ans::encode(sample, &mut r);
            r.len()
        }
    };
    let zs = zstd::bulk::compress(sample, 1)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if zs < sample_best {
        if let Ok(z) = zstd::bulk::compress(plane, 1) {
            if z.len() < best.2 {
                best = (PlaneMode::Zstd, Some(z), 0);
            }
        }
    }
    match best {
        (PlaneMode::Raw, _, _) => (PlaneMode::Raw, plane.to_vec()),
        (mode, Some(payload), _) => (mode, payload),
        (_, None, _) => (PlaneMode::Raw, plane.to_vec()),
    }
}

/// Encode one chunk whose BLAKE3 is already known.
pub fn encode_frame_with_id(data: &[u8], dtype: DType, id: &ChunkId) -> Vec<u8> {
    let elem = dtype.size();
    let p = if elem > 1 && data.len() % elem == 0 {
        elem
    } else {
        1
    };
    let encoded: Vec<(PlaneMode, Vec<u8>)> = if p == 1 {
        vec![encode_plane(data)]
    } else {
        split_planes(data, dtype, p)
            .iter()
            .map(|pl| encode_plane(pl))
            .collect()
    };
    let payload_len: usize = encoded.iter().map(|e| e.1.len()).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + 9 * p + payload_len);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(CODEC_PLANES);
    out.push(dtype as u8);
    out.push(p as u8);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(id);
    for (mode, payload) in &encoded {
        out.push(*mode as u8);
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    }
    for (_, payload) in encoded {
        out.extend_from_slice(&payload);
    }
    out
}

/// Encode one chunk (hashes it first).
pub fn encode_frame(data: &[u8], dtype: DType) -> Vec<u8> {
    encode_frame_with_id(data, dtype, &chunk_id(data))
}

/// Parse and validate a frame header against the frame's length.
pub fn frame_info(frame: &[u8]) -> Result<FrameInfo> {
    let bad = |what: String| Error::CorruptFrame(what);
    if frame.len() < HEADER_LEN {
        return Err(bad(format!(
            "{} bytes, shorter than the 48-byte header",
            frame.len()
        )));
    }
    if frame[..4] != MAGIC {
        return Err(bad("bad magic: not a theta-store frame".into()));
    }
    if frame[4] != VERSION {
        return Err(bad(format!(
            "frame format version {} is not supported (this build reads 1)",
            frame[4]
        )));
    }
    let codec = frame[5];
    if codec != CODEC_PLANES {
        return Err(bad(format!("unknown codec {codec}")));
    }
    let dtype = DType::from_code(frame[6]).map_err(|e| bad(e.to_string()))?;
    let p = frame[7] as usize;
    if !(p == 1 || (p == dtype.size() && p > 1)) {
        return Err(bad(format!(
            "plane count {p} does not fit dtype {}",
            dtype.name()
        )));
    }
    let raw_len = u64::from_le_bytes(frame[8..16].try_into().unwrap());
    if raw_len % p as u64 != 0 {
        return Err(bad(format!(
            "raw length {raw_len} is not a multiple of {p} planes"
        )));
    }
    let id: ChunkId = frame[16..48].try_into().unwrap();
    let table_end = HEADER_LEN + 9 * p;
    if frame.len() < table_end {
        return Err(bad("plane table truncated".into()));
    }
    let mut planes = Vec::with_capacity(p);
    let mut total: u64 = table_end as u64;
    for j in 0..p {
        let at = HEADER_LEN + 9 * j;
        let mode = match frame[at] {
            0 => PlaneMode::Raw,
            1 => PlaneMode::Zstd,
            2 => PlaneMode::Rans,
            m => return Err(bad(format!("plane {j}: unknown mode {m}"))),
        };
        let len = u64::from_le_bytes(frame[at + 1..at + 9].try_into().unwrap());
        if mode == PlaneMode::Raw && len != raw_len / p as u64 {
            return Err(bad(format!(
                "plane {j}: raw plane of {len} bytes, expected {}",
                raw_len / p as u64
            )));
        }
        total = total
            .checked_add(len)
            .ok_or_else(|| bad("plane lengths overflow".into()))?;
        planes.push((mode, len));
    }
    if total != frame.len() as u64 {
        return Err(bad(format!(
            "plane lengths add up to {total} bytes but the frame has {}",
            frame.len()
        )));
    }
    Ok(FrameInfo {
        codec,
        dtype,
        raw_len,
        id,
        planes,
    })
}

/// Decode a frame into `out` (which must be exactly the raw length) and verify its BLAKE3.
pub fn decode_frame_into(frame: &[u8], out: &mut [u8]) -> Result<FrameInfo> {
    let info = frame_info(frame)?;
    if out.len() as u64 != info.raw_len {
        return Err(Error::CorruptFrame(format!(
            "frame holds {} bytes but {} were expected",
            info.raw_len,
            out.len()
        )));
    }
    let p = info.planes.len();
    let n = out.len() / p;
    let mut pos = HEADER_LEN + 9 * p;
    let mut decode_plane = |j: usize, dst: &mut [u8]| -> Result<()> {
        let (mode, len) = info.planes[j];
        let src = &frame[pos..pos + len as usize];
        pos += len as usize;
        match mode {
            PlaneMode::Raw => dst.copy_from_slice(src),
            PlaneMode::Rans => ans::decode(src, dst)?,
            PlaneMode::Zstd => {
                let got = zstd::bulk::decompress_to_buffer(src, dst)
                    .map_err(|e| Error::CorruptFrame(format!("plane {j}: zstd: {e}")))?;
                if got != dst.len() {
                    return Err(Error::CorruptFrame(format!(
                        "plane {j}: zstd gave {got} bytes, expected {}",
                        dst.len()
                    )));
                }
            }
        }
        Ok(())
    };
    if p == 1 {
        decode_plane(0, out)?;
    } else {
        let mut planes: Vec<Vec<u8>> = (0..p).map(|_| vec![0u8; n]).collect();
        for (j, plane) in planes.iter_mut().enumerate() {
            decode_plane(j, plane)?;
        }
        merge_planes(&planes, info.dtype, out);
    }
    let got = chunk_id(out);
    if got != info.id {
        return Err(Error::CorruptFrame(format!(
            "decoded bytes hash to {} but the frame says {}",
            hex(&got),
            hex(&info.id)
        )));
    }
    Ok(info)
}

/// Decode a frame into a new buffer, verifying its BLAKE3.
pub fn decode_frame(frame: &[u8]) -> Result<(Vec<u8>, FrameInfo)> {
    let info = frame_info(frame)?;
    let len = usize::try_from(info.raw_len)
        .map_err(|_| Error::CorruptFrame("raw length too large".into()))?;
    // The header's claim is bounded by what the payload can expand to before we allocate by it:
    // a raw plane is 1:1, rANS emits at least one word per 2^18 symbols... keep it simple and cap
    // at 1 GiB per chunk (chunks are a few MiB).
    if len > 1 << 30 {
        return Err(Error::CorruptFrame(format!(
            "raw length {len} exceeds the 1 GiB chunk limit"
        )));
    }
    let mut out = vec![0u8; len];
    decode_frame_into(frame, &mut out)?;
    Ok((out, info))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips() {
        let data: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for dtype in DType::ALL {
            for len in [0usize, 1, 7, 8, 64, 1000, 4096] {
                let f = encode_frame(&data[..len], dtype);
                let (out, info) = decode_frame(&f).unwrap();
                assert_eq!(out, &data[..len]);
                assert_eq!(info.dtype, dtype);
            }
        }
    }

    #[test]
    fn flipped_bytes_are_detected() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 13) as u8).collect();
        let f = encode_frame(&data, DType::F32);
        for at in [0, 5, 20, 50, 60, f.len() / 2, f.len() - 1] {
            let mut g = f.clone();
            g[at] ^= 0x40;
            assert!(decode_frame(&g).is_err(), "flip at {at} not detected");
        }
    }
}
