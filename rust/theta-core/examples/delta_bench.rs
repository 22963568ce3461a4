//! Single-thread bit-level delta throughput and ratio, beside the plain frame of the same chunks.
//!
//! `cargo run --release -p theta-core --example delta_bench -- [TENSOR.raw ...]`
//!
//! The base is the given tensors, each a file of little-endian float32, or one tensor of 64 MiB
//! of N(0, 0.02^2) weights from a fixed seed. The new version is the base with every weight
//! perturbed by N(0, (1e-3 std)^2), std being its tensor's (a full fine-tune's shape of change).
//! Each tensor is cut into 2 MiB chunks; every chunk is encoded plainly (format 2, the baseline) and as
//! the smallest frame `tensordelta::encode_chunk` picks against its base chunk (what an add stores),
//! then decoded with the hash verified. Throughput is in raw bytes per second of thread CPU time;
//! the delta's decode includes the copy the base resolver hands back.

mod common;
use common::{cpu_secs, Normal};

use theta_core::delta::{self, Delta};
use theta_core::frame::{self, chunk_id, ChunkId};
use theta_core::tensordelta;
use theta_core::{DType, Result};

const CHUNK: usize = 2 << 20;

fn main() {
    let mut g = Normal(0x5eed_1234_abcd_ef01);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (name, tensors): (String, Vec<Vec<f32>>) = if args.is_empty() {
        let w = (0..(64 << 20) / 4)
            .map(|_| (g.sample() * 0.02) as f32)
            .collect();
        ("synthetic N(0, 0.02^2)".into(), vec![w])
    } else {
        let tensors = args
            .iter()
            .map(|path| {
                let b = std::fs::read(path).expect("read input");
                b.chunks_exact(4)
                    .map(|e| f32::from_le_bytes(e.try_into().unwrap()))
                    .collect()
            })
            .collect();
        (format!("{} file(s) from {}", args.len(), args[0]), tensors)
    };
    // Each tensor is perturbed by its own spread and chunked on its own, as the store chunks spans.
    let versions: Vec<(Vec<u8>, Vec<u8>)> = tensors
        .iter()
        .map(|w| {
            let n = w.len().max(1) as f64;
            let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
            let std = (w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            g.fine_tune(w, std)
        })
        .collect();
    let pairs: Vec<(&[u8], &[u8])> = versions
        .iter()
        .flat_map(|(b, n)| n.chunks(CHUNK).zip(b.chunks(CHUNK)))
        .collect();
    let ids: Vec<(ChunkId, ChunkId)> = pairs
        .iter()
        .map(|(c, b)| (chunk_id(c), chunk_id(b)))
        .collect();
    let total = pairs.iter().map(|(c, _)| c.len()).sum::<usize>() as f64;
    let dt = DType::F32;

    // Sizes: the plain frames, each delta alone, the smaller one per chunk (None: plain kept).
    let plain: Vec<Vec<u8>> = pairs
        .iter()
        .map(|(c, _)| frame::encode_frame(c, dt))
        .collect();
    let one = |kind: Delta, c: &[u8], b: &[u8], dt: DType| {
        let mut out = Vec::new();
        delta::encode_delta_with(kind, c, b, &chunk_id(b), dt, &chunk_id(c), &mut out).unwrap()
    };
    let size =
        |kind: Delta, dt: DType| -> usize { pairs.iter().map(|(c, b)| one(kind, c, b, dt)).sum() };
    let (xor, diff) = (size(Delta::Xor, dt), size(Delta::Diff, dt));
    // The layouts not chosen: XOR planes split without the float rotation; the zigzag difference
    // with the rotation applied on top, and taken between rotated bit patterns.
    let xor_flat = size(Delta::Xor, DType::U32);
    let zz = |d: u32| (d << 1) ^ ((d as i32 >> 31) as u32);
    let alt = |rot_bits: bool, dt: DType| -> usize {
        pairs
            .iter()
            .map(|(c, b)| {
                let r: Vec<u8> = c
                    .chunks_exact(4)
                    .zip(b.chunks_exact(4))
                    .flat_map(|(x, y)| {
                        let (x, y) = (
                            u32::from_le_bytes(x.try_into().unwrap()),
                            u32::from_le_bytes(y.try_into().unwrap()),
                        );
                        let (x, y) = if rot_bits {
                            (x.rotate_left(1), y.rotate_left(1))
                        } else {
                            (x, y)
                        };
                        zz(x.wrapping_sub(y)).to_le_bytes()
                    })
                    .collect();
                frame::encode_frame(&r, dt).len() + 33
            })
            .sum()
    };
    let (diff_rot_planes, diff_rot_bits) = (alt(false, DType::F32), alt(true, DType::U32));
    let deltas: Vec<Option<Vec<u8>>> = pairs
        .iter()
        .zip(&ids)
        .map(|((c, b), (id, bid))| {
            let f = tensordelta::encode_chunk(c, b, bid, dt, id).unwrap();
            // None: the plain frame won.
            (!frame::frame_info(&f).unwrap().bases.is_empty()).then_some(f)
        })
        .collect();
    let kept: usize = deltas
        .iter()
        .zip(&plain)
        .map(|(d, p)| d.as_ref().map_or(p.len(), |d| d.len()))
        .sum();
    let mut won = std::collections::BTreeMap::<u8, usize>::new();
    for d in deltas.iter().flatten() {
        *won.entry(frame::frame_info(d).unwrap().codec).or_default() += 1;
    }

    let reps = ((512e6 / total).ceil() as usize).max(1);
    let mut buf = Vec::new();
    let t = cpu_secs();
    for _ in 0..reps {
        for ((c, _), (id, _)) in pairs.iter().zip(&ids) {
            frame::encode_frame_into(c, dt, id, &mut buf);
        }
    }
    let plain_enc = total * reps as f64 / (cpu_secs() - t) / 1e9;
    let t = cpu_secs();
    for _ in 0..reps {
        for ((c, b), (id, bid)) in pairs.iter().zip(&ids) {
            std::hint::black_box(tensordelta::encode_chunk(c, b, bid, dt, id).unwrap());
        }
    }
    let delta_enc = total * reps as f64 / (cpu_secs() - t) / 1e9;

    // Each delta alone, so that the cost of trying both is visible.
    let mut alone = [0.0f64; 2];
    for (k, kind) in [Delta::Xor, Delta::Diff].into_iter().enumerate() {
        let t = cpu_secs();
        for _ in 0..reps {
            for ((c, b), (id, bid)) in pairs.iter().zip(&ids) {
                delta::encode_delta_with(kind, c, b, bid, dt, id, &mut buf).unwrap();
            }
        }
        alone[k] = total * reps as f64 / (cpu_secs() - t) / 1e9;
    }

    let mut out = vec![0u8; CHUNK];
    let t = cpu_secs();
    for _ in 0..reps {
        for ((c, _), f) in pairs.iter().zip(&plain) {
            frame::decode_frame_into(f, &mut out[..c.len()]).unwrap();
        }
    }
    let plain_dec = total * reps as f64 / (cpu_secs() - t) / 1e9;
    let t = cpu_secs();
    for _ in 0..reps {
        for (((c, b), f), p) in pairs.iter().zip(&deltas).zip(&plain) {
            let resolve = |_: &ChunkId| -> Result<Vec<u8>> { Ok(b.to_vec()) };
            let f = f.as_ref().unwrap_or(p);
            frame::decode_frame_with(f, &mut out[..c.len()], &resolve, tensordelta::codecs())
                .unwrap();
        }
    }
    let delta_dec = total * reps as f64 / (cpu_secs() - t) / 1e9;
    let t = cpu_secs();
    for _ in 0..reps {
        for (((c, b), f), p) in pairs.iter().zip(&deltas).zip(&plain) {
            let resolve = |_: &ChunkId| -> Result<Vec<u8>> { Ok(b.to_vec()) };
            let f = f.as_ref().unwrap_or(p);
            frame::decode_frame_unverified_with(
                f,
                &mut out[..c.len()],
                &resolve,
                tensordelta::codecs(),
            )
            .unwrap();
        }
    }
    let delta_unverified = total * reps as f64 / (cpu_secs() - t) / 1e9;

    let r = |b: usize| b as f64 / total;
    println!(
        "{name}: {:.1} MiB float32, each tensor perturbed by N(0, (1e-3 std)^2), {} chunks of at most 2 MiB",
        total / (1 << 20) as f64,
        pairs.len()
    );
    println!(
        "  plain frame (baseline): ratio {:.4}  encode {plain_enc:.2} GB/s  decode {plain_dec:.2} GB/s",
        r(plain.iter().map(|f| f.len()).sum())
    );
    println!(
        "  delta (tensordelta::encode_chunk: the smallest of plain, XOR, difference, sparse): ratio \
         {:.4}  encode {delta_enc:.2} GB/s (xor alone {:.2}, diff alone {:.2})  decode {delta_dec:.2} GB/s (without the hash {delta_unverified:.2} GB/s)  \
         chunks by codec {won:?}",
        r(kept),
        alone[0],
        alone[1]
    );
    println!(
        "  each delta alone: xor {:.4} (planes not rotated {:.4})  diff {:.4} (planes rotated {:.4}, \
         of rotated bit patterns {:.4})",
        r(xor),
        r(xor_flat),
        r(diff),
        r(diff_rot_planes),
        r(diff_rot_bits)
    );
    let mut modes = std::collections::BTreeMap::<String, usize>::new();
    for f in deltas.iter().flatten() {
        let key: String = frame::frame_info(f)
            .unwrap()
            .planes
            .iter()
            .map(|(m, _)| format!("{m:?} "))
            .collect();
        *modes.entry(key).or_default() += 1;
    }
    println!("  delta plane modes {modes:?}");
}
