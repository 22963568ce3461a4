//! Single-thread codec throughput and ratio.
//!
//! `cargo run --release -p theta-core --example codec_bench -- FILE:DTYPE [FILE:DTYPE ...]`
//!
//! Each file is cut into 2 MiB chunks; every chunk is encoded (BLAKE3 included, as in
//! `encode_frame`) and decoded, hash verified (as a restore of one tensor does) and not (as the
//! smudge stream does: it checks the whole file's hash instead), repeatedly. Throughput is in
//! raw bytes.

mod common;
use common::cpu_secs;

use theta_core::frame::{
    decode_frame_into, decode_frame_unverified, encode_frame, frame_info, PlaneMode,
};
use theta_core::DType;

const CHUNK: usize = 2 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: codec_bench FILE:DTYPE ...");
        std::process::exit(2);
    }
    for arg in args {
        let (path, dt) = arg.rsplit_once(':').expect("FILE:DTYPE");
        let dtype = DType::from_name(dt).expect("dtype name as safetensors spells it");
        let data = std::fs::read(path).expect("read input");
        let chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
        let total = data.len() as f64;
        // Warm up and collect frames.
        let frames: Vec<Vec<u8>> = chunks.iter().map(|c| encode_frame(c, dtype)).collect();
        let stored: usize = frames.iter().map(|f| f.len()).sum();
        let mut modes = std::collections::BTreeMap::<String, usize>::new();
        let mut per_plane = [0u64; 8];
        for f in &frames {
            let info = frame_info(f).unwrap();
            for (j, (_, len)) in info.planes.iter().enumerate() {
                per_plane[j] += len;
            }
            let key: String = info
                .planes
                .iter()
                .map(|(m, _)| match m {
                    PlaneMode::Raw => 'r',
                    PlaneMode::Zstd => 'z',
                    PlaneMode::Rans => 'a',
                })
                .collect();
            *modes.entry(key).or_default() += 1;
        }
        let reps = ((512e6 / total).ceil() as usize).max(1);
        let t = cpu_secs();
        let mut sink = 0usize;
        for _ in 0..reps {
            for c in &chunks {
                sink += encode_frame(c, dtype).len();
            }
        }
        let enc = total * reps as f64 / (cpu_secs() - t) / 1e6;
        let mut out = vec![0u8; CHUNK];
        let t = cpu_secs();
        for _ in 0..reps {
            for (c, f) in chunks.iter().zip(&frames) {
                decode_frame_into(f, &mut out[..c.len()]).unwrap();
            }
        }
        let dec = total * reps as f64 / (cpu_secs() - t) / 1e6;
        let t = cpu_secs();
        for _ in 0..reps {
            for (c, f) in chunks.iter().zip(&frames) {
                decode_frame_unverified(f, &mut out[..c.len()]).unwrap();
            }
        }
        let unverified = total * reps as f64 / (cpu_secs() - t) / 1e6;
        assert!(sink > 0);
        let p = dtype.size().max(1);
        let planes: Vec<String> = per_plane[..p]
            .iter()
            .map(|&b| format!("{:.4}", b as f64 * p as f64 / total))
            .collect();
        println!(
            "{path} {dt}: ratio {:.4}  encode {enc:.0} MB/s  decode {dec:.0} MB/s (without the hash {unverified:.0} MB/s)  planes {planes:?}  modes {modes:?}",
            stored as f64 / total
        );
    }
}
