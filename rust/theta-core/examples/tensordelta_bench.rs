//! What `tensordelta::encode_tensor` stores for the cases, and how fast, beside the plain
//! frames of the same chunks.
//!
//! `cargo run --release -p theta-core --example tensordelta_bench`
//!
//! - S2: a rank-8 update `W += A @ B` (A, B ~ N(0, 0.01^2), computed in f32) of four 768x768 fp32
//!   matrices of N(0, 0.02^2) weights; S2-lora: the same with the true factors given.
//! - S3: 1% of the entries of a 768x768 matrix set to new N(0, 0.02^2) values; S3-add: 1e-3 added.
//! - fine-tune: a 64 MiB fp32 tensor (and its bf16 rounding) with every weight moved by
//!   N(0, (1e-3 std)^2): ratio, and encode / decode throughput (thread CPU time, median of 5)
//!   beside the plain frames' from the same run.
//!
//! Every frame is decoded against its bases and checked to give the new chunk.

mod common;
use common::{cpu_secs, Normal};

use std::collections::HashMap;
use theta_core::frame::{self, chunk_id, ChunkId};
use theta_core::tensordelta::{self, DeltaChunk, Factors, TensorDelta, TensorJob};
use theta_core::{DType, Error, Result};

const CHUNK: usize = 2 << 20;

fn chunks(new: &[u8], base: &[u8]) -> Vec<DeltaChunk> {
    (0..new.len())
        .step_by(CHUNK)
        .map(|a| {
            let b = (a + CHUNK).min(new.len());
            DeltaChunk {
                offset: a as u64,
                len: (b - a) as u64,
                id: chunk_id(&new[a..b]),
                base: chunk_id(&base[a..b]),
            }
        })
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Decode every frame with its bases resolved; panics on a mismatch.
fn check(job: &TensorJob, d: &TensorDelta) {
    let mut known: HashMap<ChunkId, Vec<u8>> = HashMap::new();
    for c in job.chunks {
        let (a, b) = (c.offset as usize, (c.offset + c.len) as usize);
        known.insert(c.base, job.base[a..b].to_vec());
    }
    for (id, raw, _) in &d.extra {
        known.insert(*id, raw.clone());
    }
    let resolve = |id: &ChunkId| -> Result<Vec<u8>> {
        known
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(frame::hex(id)))
    };
    for (c, f) in job.chunks.iter().zip(&d.frames) {
        let mut out = vec![0u8; c.len as usize];
        frame::decode_frame_with(f, &mut out, &resolve, tensordelta::codecs()).expect("decodes");
        let a = c.offset as usize;
        assert_eq!(out, job.new[a..a + c.len as usize]);
    }
}

/// Decode throughput of a tensor's frames (MB/s of raw bytes, thread CPU time, median of 5).
fn decode_speed(job: &TensorJob, d: &TensorDelta) -> f64 {
    let mut known: HashMap<ChunkId, Vec<u8>> = HashMap::new();
    for c in job.chunks {
        let (a, b) = (c.offset as usize, (c.offset + c.len) as usize);
        known.insert(c.base, job.base[a..b].to_vec());
    }
    for (id, raw, _) in &d.extra {
        known.insert(*id, raw.clone());
    }
    let resolve = |id: &ChunkId| -> Result<Vec<u8>> {
        known
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(frame::hex(id)))
    };
    let mut out = vec![0u8; CHUNK];
    // Many passes per figure: the thread CPU clock ticks coarsely.
    let mut runs = Vec::new();
    for _ in 0..5 {
        let t = cpu_secs();
        for _ in 0..40 {
            for (c, f) in job.chunks.iter().zip(&d.frames) {
                frame::decode_frame_with(
                    f,
                    &mut out[..c.len as usize],
                    &resolve,
                    tensordelta::codecs(),
                )
                .unwrap();
            }
        }
        runs.push(40.0 * job.new.len() as f64 / (cpu_secs() - t) / 1e6);
    }
    median(runs)
}

fn stored(d: &TensorDelta) -> usize {
    d.frames.iter().map(|f| f.len()).sum::<usize>()
        + d.extra.iter().map(|e| e.2.len()).sum::<usize>()
}

fn kinds(d: &TensorDelta) -> String {
    d.frames
        .iter()
        .map(|f| tensordelta::codec_kind(frame::frame_info(f).unwrap().codec))
        .collect::<Vec<_>>()
        .join(",")
}

fn matrix(g: &mut Normal, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (g.sample() * std) as f32).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut g = Normal(0x5eed_1234_abcd_ef01);
    let (m, r) = (768usize, 8usize);
    let shape = [m as u64, m as u64];
    let raw = (m * m * 4) as f64;

    // S2.
    let (mut s2, mut s2l, mut s2t) = (0usize, 0usize, 0f64);
    let mut s2d = Vec::new();
    for _ in 0..4 {
        let w = matrix(&mut g, m * m, 0.02);
        let a = matrix(&mut g, m * r, 0.01);
        let b = matrix(&mut g, r * m, 0.01);
        let new: Vec<f32> = (0..m * m)
            .map(|e| {
                let (i, j) = (e / m, e % m);
                let mut p = 0f32;
                for k in 0..r {
                    p += a[i * r + k] * b[k * m + j];
                }
                w[e] + p
            })
            .collect();
        let (base, new) = (bytes(&w), bytes(&new));
        let cs = chunks(&new, &base);
        let mut job = TensorJob {
            new: &new,
            base: &base,
            dtype: DType::F32,
            shape: &shape,
            chunks: &cs,
            factors: None,
        };
        let t = std::time::Instant::now();
        let d = tensordelta::encode_tensor(&job).unwrap();
        s2t += t.elapsed().as_secs_f64();
        check(&job, &d);
        s2 += stored(&d);
        s2d.push(decode_speed(&job, &d));
        println!("S2 matrix: {} bytes ({})", stored(&d), kinds(&d));
        let f = Factors {
            rows: m,
            cols: m,
            rank: r,
            u: a,
            v: b,
        };
        job.factors = Some(&f);
        let d = tensordelta::encode_tensor(&job).unwrap();
        check(&job, &d);
        s2l += stored(&d);
    }
    println!(
        "S2 (rank-8 folded, 4 matrices): {:.1} KB per matrix ({:.4} of raw), {:.3} s per matrix wall; with the true factors: {:.1} KB",
        s2 as f64 / 4e3,
        s2 as f64 / 4.0 / raw,
        s2t / 4.0,
        s2l as f64 / 4e3
    );
    println!("S2 decode (low-rank frames): {:.0} MB/s", median(s2d));

    // S3.
    for (label, replace) in [
        ("S3 (1% set to N(0, 0.02^2))", true),
        ("S3-add (1% += 1e-3)", false),
    ] {
        let w = matrix(&mut g, m * m, 0.02);
        let mut new = w.clone();
        let mut s = 0x1234_5678_9abc_def1u64;
        for _ in 0..m * m / 100 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let e = (s % (m * m) as u64) as usize;
            new[e] = if replace {
                (g.sample() * 0.02) as f32
            } else {
                new[e] + 1e-3
            };
        }
        let (base, new) = (bytes(&w), bytes(&new));
        let cs = chunks(&new, &base);
        let job = TensorJob {
            new: &new,
            base: &base,
            dtype: DType::F32,
            shape: &shape,
            chunks: &cs,
            factors: None,
        };
        let d = tensordelta::encode_tensor(&job).unwrap();
        check(&job, &d);
        println!(
            "{label}: {:.1} KB per matrix ({})",
            stored(&d) as f64 / 1e3,
            kinds(&d)
        );
    }

    // Fine-tune.
    let rows = 16384usize;
    let cols = (64 << 20) / 4 / rows;
    let w = matrix(&mut g, rows * cols, 0.02);
    let (base32, new32) = g.fine_tune(&w, 0.02);
    let to_bf16 = |b: &[u8]| -> Vec<u8> {
        b.chunks_exact(4)
            .flat_map(|c| {
                let x = f32::from_le_bytes(c.try_into().unwrap());
                theta_core::lowrank::f32_to_bf16(x).to_le_bytes()
            })
            .collect()
    };
    let to_f16 = |b: &[u8]| -> Vec<u8> {
        b.chunks_exact(4)
            .flat_map(|c| {
                let x = f32::from_le_bytes(c.try_into().unwrap());
                theta_core::lowrank::f32_to_f16(x).to_le_bytes()
            })
            .collect()
    };
    for (dtype, base, new) in [
        (DType::F32, base32.clone(), new32.clone()),
        (DType::BF16, to_bf16(&base32), to_bf16(&new32)),
        (DType::F16, to_f16(&base32), to_f16(&new32)),
    ] {
        let shape = [rows as u64, (new.len() / dtype.size() / rows) as u64];
        let cs = chunks(&new, &base);
        let job = TensorJob {
            new: &new,
            base: &base,
            dtype,
            shape: &shape,
            chunks: &cs,
            factors: None,
        };
        let (mut enc_d, mut enc_p, mut dec_d, mut dec_p) = (vec![], vec![], vec![], vec![]);
        let mut dec_u = vec![];
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a thread pool");
        let mut enc_x = vec![];
        let mut d = None;
        let mut plain = Vec::new();
        let known: HashMap<ChunkId, Vec<u8>> = cs
            .iter()
            .map(|c| {
                let a = c.offset as usize;
                (c.base, base[a..a + c.len as usize].to_vec())
            })
            .collect();
        let resolve = |id: &ChunkId| -> Result<Vec<u8>> {
            known
                .get(id)
                .cloned()
                .ok_or_else(|| Error::NotFound(frame::hex(id)))
        };
        let n = new.len() as f64;
        for _ in 0..5 {
            let t = cpu_secs();
            plain = cs
                .iter()
                .map(|c| {
                    let a = c.offset as usize;
                    frame::encode_frame_with_id(&new[a..a + c.len as usize], dtype, &c.id)
                })
                .collect::<Vec<_>>();
            enc_p.push(n / (cpu_secs() - t) / 1e6);
            let t = cpu_secs();
            let mut buf = Vec::new();
            for c in &cs {
                let a = c.offset as usize;
                let r = a..a + c.len as usize;
                theta_core::delta::encode_delta_with(
                    theta_core::delta::Delta::Diff,
                    &new[r.clone()],
                    &base[r],
                    &c.base,
                    dtype,
                    &c.id,
                    &mut buf,
                )
                .unwrap();
            }
            enc_x.push(n / (cpu_secs() - t) / 1e6);
            // On one thread of its own: encode_tensor codes chunks in parallel, and this thread's
            // CPU time would miss the work done on others.
            let (got, secs) = one.install(|| {
                let t = cpu_secs();
                let got = tensordelta::encode_tensor(&job).unwrap();
                (got, cpu_secs() - t)
            });
            enc_d.push(n / secs / 1e6);
            let mut out = vec![0u8; CHUNK];
            let t = cpu_secs();
            for (c, f) in cs.iter().zip(&plain) {
                frame::decode_frame_into(f, &mut out[..c.len as usize]).unwrap();
            }
            dec_p.push(n / (cpu_secs() - t) / 1e6);
            let t = cpu_secs();
            for (c, f) in cs.iter().zip(&got.frames) {
                frame::decode_frame_with(
                    f,
                    &mut out[..c.len as usize],
                    &resolve,
                    tensordelta::codecs(),
                )
                .unwrap();
            }
            dec_d.push(n / (cpu_secs() - t) / 1e6);
            // As a restore decodes: the whole file's BLAKE3 is checked instead of each chunk's.
            let t = cpu_secs();
            for (c, f) in cs.iter().zip(&got.frames) {
                frame::decode_frame_unverified_with(
                    f,
                    &mut out[..c.len as usize],
                    &resolve,
                    tensordelta::codecs(),
                )
                .unwrap();
            }
            dec_u.push(n / (cpu_secs() - t) / 1e6);
            d = Some(got);
        }
        let d = d.unwrap();
        check(&job, &d);
        if std::env::var_os("PLANES").is_some() {
            let i = frame::frame_info(&d.frames[3]).unwrap();
            println!("  planes of a frame: {:?}", i.planes);
        }
        let ps: usize = plain.iter().map(|f| f.len()).sum();
        println!("  the difference alone: {:.0} MB/s", median(enc_x));
        println!(
            "fine-tune {}: delta {:.4} of raw (plain {:.4}); encode {:.0} MB/s (plain {:.0}, ratio {:.2}); decode {:.0} MB/s (plain {:.0}; unverified, as a restore decodes: {:.0}) [{}]",
            dtype.name(),
            stored(&d) as f64 / n,
            ps as f64 / n,
            median(enc_d.clone()),
            median(enc_p.clone()),
            median(enc_d) / median(enc_p),
            median(dec_d),
            median(dec_p),
            median(dec_u),
            kinds(&d).split(',').next().unwrap_or("")
        );
    }
}
