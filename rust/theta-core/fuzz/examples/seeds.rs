//! Seed corpora for the fuzz targets, made from the bytes of tests/fixtures (every format's real
//! files): frames of each dtype and codec, rANS planes, pack entries, pkt-line streams.
//!
//! `cargo run --example seeds -- FIXTURES_DIR CORPUS_DIR` writes CORPUS_DIR/<target>/seed-N.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use theta_core::frame::{self, chunk_id, ChunkId};
use theta_core::lowrank::{encode_lowrank_into, factors_bytes};
use theta_core::pack::{Kind, StoredEntry};
use theta_core::pktline;
use theta_core::sparse::encode_sparse_into;
use theta_core::tensordelta::{encode_chunk, Factors};
use theta_core::DType;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir).expect("fixtures dir").flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.file_name().is_some_and(|n| n != "MANIFEST.json") {
            out.push(p);
        }
    }
}

/// `u16 LE length` + bytes, the framing `theta_core_fuzz::split` reads.
fn part(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len().min(u16::MAX as usize) as u16).to_le_bytes());
    out.extend_from_slice(&bytes[..bytes.len().min(u16::MAX as usize)]);
}

/// A close variant of `base`: a few elements nudged (a fine-tuning step, a masked update).
fn nudged(base: &[u8], every: usize) -> Vec<u8> {
    let mut new = base.to_vec();
    for i in (0..new.len()).step_by(every.max(1)) {
        new[i] = new[i].wrapping_add(1);
    }
    new
}

/// Point the base ids of a format-3 frame at the fuzz resolver's parts: base k gets first byte k.
fn route_bases(f: &mut [u8]) {
    if f.len() > 48 && f[4] == frame::VERSION_BASES {
        for k in 0..f[48] as usize {
            if let Some(b) = f.get_mut(49 + 32 * k) {
                *b = k as u8;
            }
        }
    }
}

struct Corpus {
    root: PathBuf,
    n: usize,
}

impl Corpus {
    fn put(&mut self, target: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("seed-{:04}", self.n)), bytes).unwrap();
        self.n += 1;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (fixtures, root) = (Path::new(&args[1]), PathBuf::from(&args[2]));
    let mut paths = Vec::new();
    files(fixtures, &mut paths);
    let mut c = Corpus { root, n: 0 };
    let dtypes = [
        DType::Bytes,
        DType::U8,
        DType::I16,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::I64,
        DType::F64,
    ];
    for (i, p) in paths.iter().enumerate() {
        let bytes = fs::read(p).unwrap();
        // A window from the middle of the file, where the tensor data is, sized to whole elements.
        let len = (bytes.len() / 2).min(2048) / 8 * 8;
        let at = (bytes.len() - len) / 2;
        let base = &bytes[at..at + len];
        let dtype = dtypes[i % dtypes.len()];
        let new = nudged(base, 7);
        let (bid, nid) = (chunk_id(base), chunk_id(&new));

        let plain = frame::encode_frame(base, dtype);
        let mut input = Vec::new();
        part(&mut input, &plain);
        c.put("frame", &input);
        let mut rt = vec![dtype as u8];
        rt.extend_from_slice(base);
        rt.extend_from_slice(&new);
        c.put("frame_roundtrip", &rt);

        let mut delta = encode_chunk(&new, base, &bid, dtype, &nid).unwrap();
        route_bases(&mut delta);
        let mut input = Vec::new();
        part(&mut input, &delta);
        part(&mut input, base);
        c.put("frame", &input);

        let mut sparse = Vec::new();
        let sparse_new = nudged(base, 97);
        if encode_sparse_into(
            &sparse_new,
            base,
            &bid,
            dtype,
            &chunk_id(&sparse_new),
            1 << 20,
            &mut sparse,
        )
        .unwrap()
        .is_some()
        {
            route_bases(&mut sparse);
            let mut input = Vec::new();
            part(&mut input, &sparse);
            part(&mut input, base);
            c.put("frame", &input);
        }

        // A low-rank frame over the window viewed as an F32 matrix of 4 columns, rank 1.
        let rows = len / 16;
        if rows >= 2 {
            let f = Factors {
                rows,
                cols: 4,
                rank: 1,
                u: (0..rows).map(|r| r as f32 * 1e-3).collect(),
                v: vec![1.0, -0.5, 0.25, 2.0],
            };
            let fb = factors_bytes(&f);
            let mut lr = Vec::new();
            if encode_lowrank_into(
                &new,
                base,
                &bid,
                DType::F32,
                &nid,
                0,
                &fb,
                &chunk_id(&fb),
                &mut lr,
            )
            .is_ok()
            {
                let mut routed = lr.clone();
                route_bases(&mut routed);
                let mut input = Vec::new();
                part(&mut input, &routed);
                part(&mut input, base);
                input.extend_from_slice(&fb);
                c.put("frame", &input);
                // The read path: the frame, its base's and its factors' plain frames.
                let mut input = Vec::new();
                part(&mut input, &lr);
                part(&mut input, &plain);
                part(&mut input, &frame::encode_frame(&fb, DType::Bytes));
                c.put("read_chunks", &input);
            }
        }
        let mut input = Vec::new();
        part(
            &mut input,
            &encode_chunk(&new, base, &bid, dtype, &nid).unwrap(),
        );
        part(&mut input, &plain);
        c.put("read_chunks", &input);

        let mut plane = Vec::new();
        theta_core::ans::encode(base, &mut plane);
        let mut input = ((base.len() / 4) as u16).to_le_bytes().to_vec();
        input.extend_from_slice(&plane);
        c.put("ans", &input);

        let mut pack = 0u16.to_le_bytes().to_vec();
        pack.extend_from_slice(&StoredEntry::new(Kind::Blob, &plain).to_bytes());
        c.put("pack_blob", &pack);
        let mut deflated = 0u16.to_le_bytes().to_vec();
        let mut size = plain.len() as u64;
        let mut byte = (3u8 << 4) | (size & 0x0f) as u8;
        size >>= 4;
        while size > 0 {
            deflated.push(byte | 0x80);
            byte = (size & 0x7f) as u8;
            size >>= 7;
        }
        deflated.push(byte);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&plain).unwrap();
        deflated.extend_from_slice(&z.finish().unwrap());
        c.put("pack_blob", &deflated);

        let mut stream = Vec::new();
        pktline::send(&mut stream, &bytes[..bytes.len().min(70_000)]).unwrap();
        stream.extend_from_slice(b"0000");
        c.put("pktline", &stream);
    }
    let _: ChunkId = [0; 32];
    eprintln!("{} seeds from {} fixtures", c.n, paths.len());
}
