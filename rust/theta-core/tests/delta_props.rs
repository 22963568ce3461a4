//! Bit-level deltas: exact round trips for every dtype and every kind of change, a wrong base or a
//! corrupt residual is an error (never wrong bytes), and what a small change of float weights costs.

#[path = "../examples/common/mod.rs"]
mod common;
use common::Normal;

use proptest::prelude::*;
use theta_core::delta::{self, Delta, CODECS};
use theta_core::frame::{self, chunk_id, ChunkId};
use theta_core::{DType, Error, Result};

fn dtype() -> impl Strategy<Value = DType> {
    (0..DType::ALL.len()).prop_map(|i| DType::ALL[i])
}

/// Element values laid out as `dtype` would hold weights (floats as floats, ints scaled).
fn lay_out(dtype: DType, vals: &[f32]) -> Vec<u8> {
    vals.iter()
        .flat_map(|&v| match dtype {
            DType::F32 => v.to_le_bytes().to_vec(),
            DType::F64 => (v as f64).to_le_bytes().to_vec(),
            DType::BF16 | DType::F16 => ((v.to_bits() >> 16) as u16).to_le_bytes().to_vec(),
            d => ((v * 1000.0) as i64).to_le_bytes()[..d.size()].to_vec(),
        })
        .collect()
}

/// A base chunk: weight-like values of the dtype, or noise.
fn base() -> impl Strategy<Value = (DType, Vec<u8>)> {
    dtype().prop_flat_map(|dt| {
        prop_oneof![
            prop::collection::vec(-1.0f32..1.0, 0..1500).prop_map(move |v| (
                dt,
                lay_out(dt, &v.iter().map(|f| f * 0.02).collect::<Vec<_>>())
            )),
            prop::collection::vec(any::<u8>(), 0..3000).prop_map(move |b| (dt, b)),
        ]
    })
}

/// How the new chunk differs from its base.
#[derive(Debug, Clone)]
enum Change {
    Identical,
    /// Bits flipped at (byte, bit) positions.
    Flips(Vec<(usize, u8)>),
    /// Every element's bit pattern moved by a small signed integer (from a cycle of steps).
    Perturb(Vec<i8>),
    /// Another chunk of the same length.
    Different(u64),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        Just(Change::Identical),
        prop::collection::vec((any::<usize>(), 0u8..8), 1..20).prop_map(Change::Flips),
        prop::collection::vec(-4i8..=4, 1..50).prop_map(Change::Perturb),
        any::<u64>().prop_map(Change::Different),
    ]
}

fn apply(dtype: DType, base: &[u8], change: &Change) -> Vec<u8> {
    let mut new = base.to_vec();
    match change {
        Change::Identical => {}
        Change::Flips(at) if !new.is_empty() => {
            for &(i, bit) in at {
                let n = new.len();
                new[i % n] ^= 1 << bit;
            }
        }
        Change::Flips(_) => {}
        Change::Perturb(steps) => {
            let k = if new.len().is_multiple_of(dtype.size()) {
                dtype.size()
            } else {
                1
            };
            for (e, s) in new.chunks_exact_mut(k).zip(steps.iter().cycle()) {
                let mut b = [0u8; 8];
                b[..k].copy_from_slice(e);
                let v = u64::from_le_bytes(b).wrapping_add(*s as i64 as u64);
                e.copy_from_slice(&v.to_le_bytes()[..k]);
            }
        }
        Change::Different(seed) => {
            let mut s = *seed | 1;
            for b in new.iter_mut() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *b = s as u8;
            }
        }
    }
    new
}

fn resolver(base: &[u8]) -> impl Fn(&ChunkId) -> Result<Vec<u8>> + Sync + '_ {
    move |id: &ChunkId| {
        if *id == chunk_id(base) {
            Ok(base.to_vec())
        } else {
            Err(Error::NotFound(frame::hex(id)))
        }
    }
}

fn decode(f: &[u8], len: usize, base: &[u8]) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    frame::decode_frame_with(f, &mut out, &resolver(base), &CODECS)?;
    Ok(out)
}

fn delta_frame(kind: Delta, new: &[u8], base: &[u8], dtype: DType) -> Vec<u8> {
    let mut out = Vec::new();
    let len = delta::encode_delta_with(
        kind,
        new,
        base,
        &chunk_id(base),
        dtype,
        &chunk_id(new),
        &mut out,
    )
    .unwrap();
    out.truncate(len);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn both_deltas_round_trip((dt, base) in base(), change in change()) {
        let new = apply(dt, &base, &change);
        for kind in [Delta::Xor, Delta::Diff] {
            let f = delta_frame(kind, &new, &base, dt);
            let info = frame::frame_info(&f).unwrap();
            prop_assert_eq!(info.bases, vec![chunk_id(&base)]);
            prop_assert_eq!(info.dtype, dt);
            // The difference's codec byte names its element size, as the frame's planes split it.
            let whole = dt.size() > 1 && new.len().is_multiple_of(dt.size());
            let want = match (kind, whole, dt.rotates()) {
                (Delta::Xor, _, _) => delta::CODEC_XOR,
                (Delta::Diff, false, _) => delta::CODEC_DIFF,
                (Delta::Diff, true, false) => delta::CODEC_DIFF + dt.size().trailing_zeros() as u8,
                (Delta::Diff, true, true) => {
                    delta::CODEC_DIFF_FLOAT + dt.size().trailing_zeros() as u8 - 1
                }
            };
            prop_assert_eq!(info.codec, want);
            prop_assert_eq!(decode(&f, new.len(), &base).unwrap(), new.clone(), "{:?}", kind);
        }
        // What an add picks: a delta only when it beats the plain frame.
        let plain = frame::encode_frame(&new, dt);
        match best_delta(&new, &base, &chunk_id(&base), dt).unwrap() {
            Some(f) => {
                prop_assert!(f.len() < plain.len());
                prop_assert_eq!(decode_with_codecs(&f, &base), new.clone());
            }
            None => {
                let best = [Delta::Xor, Delta::Diff]
                    .map(|k| delta_frame(k, &new, &base, dt).len())
                    .into_iter()
                    .min()
                    .unwrap();
                prop_assert!(best >= plain.len());
            }
        }
    }

    /// Any byte of a delta frame changed: an error, or (where the change does not matter, as a
    /// dtype whose rotation leaves a zero residual alike) exactly the chunk; never other bytes.
    #[test]
    fn a_corrupt_delta_frame_never_decodes_to_other_bytes(
        (dt, base) in base(),
        change in change(),
        at in any::<usize>(),
        flip in 1u8..=255,
        diff in any::<bool>(),
    ) {
        let new = apply(dt, &base, &change);
        let kind = if diff { Delta::Diff } else { Delta::Xor };
        let mut f = delta_frame(kind, &new, &base, dt);
        let n = f.len();
        f[at % n] ^= flip;
        if let Ok(out) = decode(&f, new.len(), &base) {
            prop_assert_eq!(out, new);
        }
    }

    /// Decoded against another base (one byte of it changed), a delta is an error.
    #[test]
    fn a_wrong_base_is_detected(
        (dt, base) in base(),
        change in change(),
        at in any::<usize>(),
        flip in 1u8..=255,
        diff in any::<bool>(),
    ) {
        prop_assume!(!base.is_empty());
        let new = apply(dt, &base, &change);
        let kind = if diff { Delta::Diff } else { Delta::Xor };
        let f = delta_frame(kind, &new, &base, dt);
        let mut wrong = base.clone();
        let n = wrong.len();
        wrong[at % n] ^= flip;
        let mut out = vec![0u8; new.len()];
        let served = |_: &ChunkId| Ok(wrong.clone());
        let e = frame::decode_frame_with(&f, &mut out, &served, &CODECS).unwrap_err();
        prop_assert!(matches!(e, Error::CorruptFrame(_)), "{}", e);
    }
}

/// A 2 MiB float32 chunk of N(0, 0.02^2) weights, and the same perturbed by N(0, (1e-3 std)^2).
fn fine_tuned() -> (Vec<u8>, Vec<u8>) {
    let mut g = Normal(0x5eed_1234_abcd_ef01);
    let std = 0.02f64;
    let w: Vec<f32> = (0..(2 << 20) / 4)
        .map(|_| (g.sample() * std) as f32)
        .collect();
    g.fine_tune(&w, std)
}

#[test]
fn a_small_change_of_float_weights_codes_small_and_an_unchanged_chunk_tiny() {
    let (base, new) = fine_tuned();
    let id = chunk_id(&base);
    let f = best_delta(&new, &base, &id, DType::F32)
        .unwrap()
        .expect("the delta beats the plain frame");
    let ratio = f.len() as f64 / new.len() as f64;
    assert!(ratio < 0.75, "delta codes to {ratio:.4} of raw");
    assert_eq!(decode_with_codecs(&f, &base), new);
    let same = best_delta(&base, &base, &id, DType::F32)
        .unwrap()
        .expect("an unchanged chunk beats the plain frame");
    assert!(same.len() < 1024, "unchanged chunk: {} bytes", same.len());
    assert_eq!(decode_with_codecs(&same, &base), base);
}

#[test]
fn a_corrupt_residual_a_missing_base_and_bad_lengths_are_errors() {
    let (base, new) = fine_tuned();
    let (base, new) = (&base[..64 << 10], &new[..64 << 10]);
    for kind in [Delta::Xor, Delta::Diff] {
        let f = delta_frame(kind, new, base, DType::F32);
        // The last byte is in the last plane's payload (the residual).
        let mut g = f.clone();
        *g.last_mut().unwrap() ^= 1;
        let e = decode(&g, new.len(), base).unwrap_err();
        assert!(matches!(e, Error::CorruptFrame(_)), "{e}");
        let mut out = vec![0u8; new.len()];
        let e = frame::decode_frame_with(&f, &mut out, &frame::no_bases, &CODECS).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        let e = frame::decode_frame_with(&f, &mut out, &resolver(base), &[]).unwrap_err();
        assert!(e.to_string().contains("unknown codec"), "{e}");
        // A base of another length is refused by the codec.
        let short = |_: &ChunkId| Ok(base[..base.len() - 4].to_vec());
        let e = frame::decode_frame_with(&f, &mut out, &short, &CODECS).unwrap_err();
        assert!(matches!(e, Error::CorruptFrame(_)), "{e}");
    }
    let e = best_delta(new, &base[4..], &chunk_id(base), DType::F32).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

// ---- whole tensors through `tensordelta::encode_tensor`: sparse, low-rank, everything changed ----

use std::collections::HashMap;
use theta_core::lowrank::{self, f16_to_f32, f32_to_bf16, f32_to_f16};
use theta_core::tensordelta::{self, DeltaChunk, Factors, TensorDelta, TensorJob};

/// Element `v` as `dtype`'s little-endian bytes (integers scaled).
fn put(dtype: DType, v: f64, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        DType::F64 => out.extend_from_slice(&v.to_le_bytes()),
        DType::F16 => out.extend_from_slice(&f32_to_f16(v as f32).to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&f32_to_bf16(v as f32).to_le_bytes()),
        DType::I32 => out.extend_from_slice(&((v * 1e6) as i32).to_le_bytes()),
        _ => unreachable!(),
    }
}

fn get(dtype: DType, b: &[u8], k: usize) -> f64 {
    match dtype {
        DType::F32 => f32::from_le_bytes(b[4 * k..4 * k + 4].try_into().unwrap()) as f64,
        DType::F64 => f64::from_le_bytes(b[8 * k..8 * k + 8].try_into().unwrap()),
        DType::F16 => f16_to_f32(u16::from_le_bytes([b[2 * k], b[2 * k + 1]])) as f64,
        DType::BF16 => {
            f32::from_bits((u16::from_le_bytes([b[2 * k], b[2 * k + 1]]) as u32) << 16) as f64
        }
        DType::I32 => i32::from_le_bytes(b[4 * k..4 * k + 4].try_into().unwrap()) as f64 / 1e6,
        _ => unreachable!(),
    }
}

#[derive(Debug, Clone)]
enum TensorChange {
    /// This many elements set to new values.
    Few(usize),
    /// A rank-`r` update folded in (in the dtype's arithmetic), plus `noise` elements nudged.
    LowRank(usize, usize),
    /// Every element moved a little (a fine-tune).
    All,
}

fn tensor_change() -> impl Strategy<Value = TensorChange> {
    prop_oneof![
        (1usize..60).prop_map(TensorChange::Few),
        (1usize..5, 0usize..20).prop_map(|(r, n)| TensorChange::LowRank(r, n)),
        Just(TensorChange::All),
    ]
}

struct Case {
    dtype: DType,
    base: Vec<u8>,
    new: Vec<u8>,
    chunks: Vec<DeltaChunk>,
}

fn make_case(
    dtype: DType,
    rows: usize,
    cols: usize,
    chunk_elems: usize,
    change: &TensorChange,
    seed: u64,
) -> Case {
    let mut g = Normal(seed | 1);
    let n = rows * cols;
    let w: Vec<f64> = (0..n).map(|_| g.sample() * 0.02).collect();
    let mut base = Vec::new();
    for &v in &w {
        put(dtype, v, &mut base);
    }
    let mut nw: Vec<f64> = (0..n).map(|k| get(dtype, &base, k)).collect();
    match change {
        TensorChange::Few(c) => {
            for _ in 0..*c {
                let k = (g.uniform() * n as f64) as usize % n;
                nw[k] = g.sample() * 0.02;
            }
        }
        TensorChange::LowRank(r, noise) => {
            let a: Vec<f64> = (0..rows * r).map(|_| g.sample() * 0.01).collect();
            let b: Vec<f64> = (0..r * cols).map(|_| g.sample() * 0.01).collect();
            for i in 0..rows {
                for j in 0..cols {
                    let mut p = 0f32;
                    for k in 0..*r {
                        p += (a[i * r + k] * b[k * cols + j]) as f32;
                    }
                    nw[i * cols + j] += p as f64;
                }
            }
            for _ in 0..*noise {
                let k = (g.uniform() * n as f64) as usize % n;
                nw[k] *= 1.0 + 1e-3;
            }
        }
        TensorChange::All => {
            for v in nw.iter_mut() {
                *v += g.sample() * 2e-5;
            }
        }
    }
    let mut new = Vec::new();
    for &v in &nw {
        put(dtype, v, &mut new);
    }
    let size = dtype.size();
    let chunks = (0..n)
        .step_by(chunk_elems)
        .map(|e| {
            let (a, b) = (e * size, ((e + chunk_elems).min(n)) * size);
            DeltaChunk {
                offset: a as u64,
                len: (b - a) as u64,
                id: chunk_id(&new[a..b]),
                base: chunk_id(&base[a..b]),
            }
        })
        .filter(|c| c.id != c.base)
        .collect();
    Case {
        dtype,
        base,
        new,
        chunks,
    }
}

/// Every base a tensor's frames may name: its base chunks and the extra (factors) chunks.
fn known(case: &Case, d: &TensorDelta) -> HashMap<ChunkId, Vec<u8>> {
    let mut k = HashMap::new();
    for c in &case.chunks {
        let a = c.offset as usize;
        k.insert(c.base, case.base[a..a + c.len as usize].to_vec());
    }
    for (id, raw, frame) in &d.extra {
        assert_eq!(*id, chunk_id(raw));
        assert_eq!(frame::decode_frame(frame).unwrap().0, *raw);
        k.insert(*id, raw.clone());
    }
    k
}

fn decode_all(case: &Case, d: &TensorDelta, bases: &HashMap<ChunkId, Vec<u8>>) -> Result<()> {
    let resolve = |id: &ChunkId| -> Result<Vec<u8>> {
        bases
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(frame::hex(id)))
    };
    for (c, f) in case.chunks.iter().zip(&d.frames) {
        let mut out = vec![0u8; c.len as usize];
        frame::decode_frame_with(f, &mut out, &resolve, tensordelta::codecs())?;
        let a = c.offset as usize;
        assert_eq!(
            out,
            case.new[a..a + c.len as usize],
            "decoded to other bytes"
        );
    }
    Ok(())
}

fn job<'a>(case: &'a Case, shape: &'a [u64], factors: Option<&'a Factors>) -> TensorJob<'a> {
    TensorJob {
        new: &case.new,
        base: &case.base,
        dtype: case.dtype,
        shape,
        chunks: &case.chunks,
        factors,
    }
}

fn tensor_dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F16),
        Just(DType::BF16),
        Just(DType::F32),
        Just(DType::F64),
        Just(DType::I32)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every chunk's frame decodes, with its bases resolved, to exactly the new chunk, and the
    /// tensor never costs more than its chunks' plain frames.
    #[test]
    fn every_kind_of_change_round_trips_through_encode_tensor(
        dtype in tensor_dtype(),
        rows in 48usize..120,
        cols in 64usize..100,
        chunk_elems in 700usize..6000,
        change in tensor_change(),
        seed in any::<u64>(),
    ) {
        let case = make_case(dtype, rows, cols, chunk_elems, &change, seed);
        let shape = [rows as u64, cols as u64];
        let d = tensordelta::encode_tensor(&job(&case, &shape, None)).unwrap();
        prop_assert_eq!(d.frames.len(), case.chunks.len());
        for f in &d.frames {
            // a frame's first six bytes name its codec as its whole header does
            prop_assert_eq!(frame::frame_codec(&f[..6]).unwrap(), frame::frame_info(f).unwrap().codec);
        }
        let bases = known(&case, &d);
        decode_all(&case, &d, &bases).unwrap();
        let plain: usize = case
            .chunks
            .iter()
            .map(|c| {
                let a = c.offset as usize;
                frame::encode_frame(&case.new[a..a + c.len as usize], dtype).len()
            })
            .sum();
        let stored: usize = d.frames.iter().map(|f| f.len()).sum::<usize>()
            + d.extra.iter().map(|e| e.2.len()).sum::<usize>();
        prop_assert!(stored <= plain, "{} > plain {}", stored, plain);
    }

    /// Any byte of a sparse or low-rank frame changed: an error or the same bytes, never a panic
    /// or other bytes.
    #[test]
    fn a_corrupt_payload_frame_never_decodes_to_other_bytes(
        lowrank in any::<bool>(),
        at in any::<usize>(),
        flip in 1u8..=255,
    ) {
        let (case, d) = if lowrank { lowrank_case() } else { sparse_case() };
        let bases = known(&case, &d);
        let k = at % d.frames.len();
        let mut frames = d.frames.clone();
        let n = frames[k].len();
        frames[k][(at / 7) % n] ^= flip;
        let bad = TensorDelta { frames, extra: d.extra.clone() };
        // decode_all asserts that whatever decodes is the new chunk.
        let _ = decode_all(&case, &bad, &bases);
    }
}

fn lowrank_case() -> (Case, TensorDelta) {
    let case = make_case(DType::F32, 160, 200, 9000, &TensorChange::LowRank(3, 5), 7);
    let shape = [160, 200];
    let d = tensordelta::encode_tensor(&job(&case, &shape, None)).unwrap();
    (case, d)
}

fn sparse_case() -> (Case, TensorDelta) {
    let case = make_case(DType::BF16, 100, 100, 4000, &TensorChange::Few(30), 9);
    let shape = [100, 100];
    let d = tensordelta::encode_tensor(&job(&case, &shape, None)).unwrap();
    (case, d)
}

fn kinds(d: &TensorDelta) -> Vec<&'static str> {
    d.frames
        .iter()
        .map(|f| tensordelta::codec_kind(frame::frame_info(f).unwrap().codec))
        .collect()
}

#[test]
fn a_folded_low_rank_update_codes_as_factors_and_a_small_residual() {
    let (case, d) = lowrank_case();
    assert!(kinds(&d).contains(&"low-rank"), "{:?}", kinds(&d));
    assert_eq!(d.extra.len(), 1);
    let stored: usize = d.frames.iter().map(|f| f.len()).sum::<usize>() + d.extra[0].2.len();
    let bits = case
        .chunks
        .iter()
        .map(|c| {
            let a = c.offset as usize;
            let r = a..a + c.len as usize;
            tensordelta::encode_chunk(
                &case.new[r.clone()],
                &case.base[r],
                &c.base,
                DType::F32,
                &c.id,
            )
            .unwrap()
            .len()
        })
        .sum::<usize>();
    assert!(
        stored * 3 < bits,
        "low-rank {stored} against bit-level {bits}"
    );
    decode_all(&case, &d, &known(&case, &d)).unwrap();
    // The true factors given as the predictor: exact too.
    let f = lowrank::parse_factors(&d.extra[0].1).unwrap().to_factors();
    let shape = [160, 200];
    let d2 = tensordelta::encode_tensor(&job(&case, &shape, Some(&f))).unwrap();
    decode_all(&case, &d2, &known(&case, &d2)).unwrap();
    // Factors of another shape are refused.
    let wrong = Factors { rows: 10, ..f };
    let e = tensordelta::encode_tensor(&job(&case, &shape, Some(&wrong)))
        .err()
        .unwrap();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

#[test]
fn a_few_changed_elements_code_as_sparse() {
    // The last chunk is small: an XOR frame may beat its sparse frame by a few bytes.
    let (_, d) = sparse_case();
    assert_eq!(kinds(&d)[..2], ["sparse", "sparse"], "{:?}", kinds(&d));
    let stored: usize = d.frames.iter().map(|f| f.len()).sum();
    assert!(
        stored < 30 * 12 + 3 * 250,
        "{stored} bytes for 30 changed elements"
    );
}

/// A corrupt factors chunk, base chunk, residual or index list: an error that names what is
/// wrong, never other bytes.
#[test]
fn corrupt_factors_bases_residuals_and_index_lists_are_named() {
    for (case, d) in [lowrank_case(), sparse_case()] {
        let good = known(&case, &d);
        // Each base (the factors chunk included) corrupted in turn.
        for id in good.keys() {
            let mut bad = good.clone();
            let b = bad.get_mut(id).unwrap();
            let n = b.len();
            b[n / 2] ^= 0x41;
            b[n - 3] ^= 0x41;
            let e = decode_all(&case, &d, &bad).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&frame::hex(id)) || msg.contains("factors chunk"),
                "{msg}"
            );
        }
        // The last byte of each frame: the last section (residual or value plane).
        for k in 0..d.frames.len() {
            let mut frames = d.frames.clone();
            *frames[k].last_mut().unwrap() ^= 0x10;
            let bad = TensorDelta {
                frames,
                extra: d.extra.clone(),
            };
            let e = decode_all(&case, &bad, &good).unwrap_err();
            assert!(matches!(e, Error::CorruptFrame(_)), "{e}");
        }
    }
    // A sparse frame's index list (its first section, stored raw when this small).
    let (case, d) = sparse_case();
    let f = &d.frames[0];
    let info = frame::frame_info(f).unwrap();
    let first = 49 + 32 * info.bases.len() + 17 * info.planes.len();
    for at in [first + 1, first + 2, first + 5] {
        let mut frames = d.frames.clone();
        frames[0][at] ^= 0x80;
        let bad = TensorDelta {
            frames,
            extra: d.extra.clone(),
        };
        let e = decode_all(&case, &bad, &known(&case, &d)).unwrap_err();
        assert!(matches!(e, Error::CorruptFrame(_)), "{e}");
    }
}

/// Hostile payload headers: counts, lengths and offsets out of range are errors, found before
/// anything is allocated by them.
#[test]
fn hostile_payload_headers_are_errors() {
    let (case, d) = lowrank_case();
    let f = d
        .frames
        .iter()
        .find(|f| frame::frame_info(f).unwrap().codec == lowrank::CODEC_LOWRANK)
        .unwrap();
    let info = frame::frame_info(f).unwrap();
    let table = 49 + 32 * info.bases.len();
    let mut tries: Vec<Vec<u8>> = Vec::new();
    for s in [0u8, 17, 255] {
        let mut g = f.clone();
        g[7] = s;
        tries.push(g);
    }
    // A section's decoded length huge, or past twice the raw length.
    for dec in [u64::MAX, 1 << 40, 3 * info.raw_len] {
        let mut g = f.clone();
        g[table + 1..table + 9].copy_from_slice(&dec.to_le_bytes());
        tries.push(g);
    }
    // A stored length that overflows the sum.
    let mut g = f.clone();
    g[table + 9..table + 17].copy_from_slice(&u64::MAX.to_le_bytes());
    tries.push(g);
    // A raw length of 2^40.
    let mut g = f.clone();
    g[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    tries.push(g);
    for g in &tries {
        assert!(frame::frame_info(g).is_err());
        assert!(frame::decode_frame(g).is_err());
    }
    // The element offset (section 0, raw) past the matrix.
    let at = table + 17 * info.planes.len();
    assert_eq!(info.planes[0].0, frame::PlaneMode::Raw);
    let mut g = f.clone();
    g[at..at + 8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    let frames: Vec<Vec<u8>> = d
        .frames
        .iter()
        .map(|x| if x == f { g.clone() } else { x.clone() })
        .collect();
    let bad = TensorDelta {
        frames,
        extra: d.extra.clone(),
    };
    let e = decode_all(&case, &bad, &known(&case, &d)).unwrap_err();
    assert!(e.to_string().contains("past the"), "{e}");
    // A factors chunk claiming a huge rank is refused by its length check.
    let mut raw = d.extra[0].1.clone();
    raw[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(lowrank::parse_factors(&raw).is_err());
    raw[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(lowrank::parse_factors(&raw).is_err());
}

/// The factors are the same bits with one thread or two.
#[test]
fn factors_do_not_depend_on_the_thread_count() {
    let case = make_case(
        DType::F32,
        300,
        257,
        100_000,
        &TensorChange::LowRank(4, 50),
        11,
    );
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let l = lowrank::lossy_lowrank(
                    &case.new,
                    &case.base,
                    DType::F32,
                    &[300, 257],
                    lowrank::LossyTarget::Rank(6),
                )
                .unwrap();
                let d = tensordelta::encode_tensor(&job(&case, &[300, 257], None)).unwrap();
                (l.factors, l.recon, d.extra[0].1.clone())
            })
    };
    assert_eq!(run(1), run(2));
}

/// The lossy helper: its reconstruction codes against its factors with an all-zero residual,
/// and the error it reports is the one achieved.
#[test]
fn lossy_factors_give_their_reconstruction_exactly() {
    for dtype in [DType::F32, DType::BF16] {
        let case = make_case(dtype, 128, 96, 100_000, &TensorChange::LowRank(2, 0), 3);
        let shape = [128u64, 96];
        for target in [
            lowrank::LossyTarget::Rank(2),
            lowrank::LossyTarget::Rtol(1e-2),
        ] {
            let l = lowrank::lossy_lowrank(&case.new, &case.base, dtype, &shape, target).unwrap();
            // bf16 rounds an update this small coarsely: only its error is checked.
            if dtype == DType::F32 {
                assert!(l.rel_err < 1e-3, "{target:?}: {}", l.rel_err);
                assert_eq!(l.rank, 2, "{target:?}");
            }
            let mut recon = vec![0u8; case.base.len()];
            let f = lowrank::parse_factors(&l.factors).unwrap();
            lowrank::reconstruct(&case.base, dtype, 0, &f, &mut recon).unwrap();
            assert_eq!(recon, l.recon);
            let (n2, e2) = (0..128 * 96).fold((0f64, 0f64), |(n2, e2), k| {
                let d = get(dtype, &case.new, k) - get(dtype, &case.base, k);
                let e = get(dtype, &l.recon, k) - get(dtype, &case.new, k);
                (n2 + d * d, e2 + e * e)
            });
            assert!(((e2 / n2).sqrt() - l.rel_err).abs() < 1e-9);
        }
        let e = lowrank::lossy_lowrank(
            &case.new,
            &case.base,
            dtype,
            &[128 * 96],
            lowrank::LossyTarget::Rank(2),
        );
        assert!(matches!(e, Err(Error::InvalidArgument(_))));
    }
}

/// The reconstruction, computed independently: f64 products summed in order from +0.0, then
/// the dtype's own addition and rounding.
#[test]
fn the_reconstruction_is_the_documented_arithmetic() {
    let (rows, cols, r) = (3usize, 5usize, 2usize);
    let u: Vec<f32> = vec![1.0e-3, -3.5e-4, 7.25e-1, 1.0, -2.0e-8, 3.0e-3];
    let v: Vec<f32> = vec![0.1, -0.2, 0.3, 1.0e-7, 5.0, -1.5, 2.5e-3, 0.0, -0.0, 1.0e9];
    let f = Factors {
        rows,
        cols,
        rank: r,
        u: u.clone(),
        v: v.clone(),
    };
    let raw = lowrank::factors_bytes(&f);
    let view = lowrank::parse_factors(&raw).unwrap();
    let base32: Vec<f32> = (0..15).map(|k| (k as f32 - 7.0) * 0.0123).collect();
    let p = |e: usize| {
        let (i, j) = (e / cols, e % cols);
        let mut p = 0.0f64;
        for k in 0..r {
            p += u[i * r + k] as f64 * v[k * cols + j] as f64;
        }
        p
    };
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        let mut base = Vec::new();
        for &b in &base32 {
            put(dtype, b as f64, &mut base);
        }
        // Every start inside the matrix (chunks need not start on a row).
        for first in 0..15usize {
            let len = (15 - first) * dtype.size();
            let b = &base[first * dtype.size()..];
            let mut out = vec![0u8; len];
            lowrank::reconstruct(b, dtype, first as u64, &view, &mut out).unwrap();
            for e in first..15 {
                let k = e - first;
                let want: Vec<u8> = match dtype {
                    DType::F32 => (get(dtype, b, k) as f32 + p(e) as f32)
                        .to_le_bytes()
                        .to_vec(),
                    DType::F64 => (get(dtype, b, k) + p(e)).to_le_bytes().to_vec(),
                    DType::BF16 => f32_to_bf16(get(dtype, b, k) as f32 + p(e) as f32)
                        .to_le_bytes()
                        .to_vec(),
                    _ => f32_to_f16(get(dtype, b, k) as f32 + p(e) as f32)
                        .to_le_bytes()
                        .to_vec(),
                };
                let s = dtype.size();
                assert_eq!(
                    out[k * s..(k + 1) * s],
                    want[..],
                    "{dtype:?} element {e} from {first}"
                );
            }
        }
        // Past the matrix: an error.
        let mut out = vec![0u8; 2 * dtype.size()];
        let e = lowrank::reconstruct(&base[..2 * dtype.size()], dtype, 14, &view, &mut out);
        assert!(e.is_err());
    }
    // Products taken in f64, summed from +0.0, narrowed only at the end: (1+e)(1-e) - 1 is
    // exactly -e^2 there (f32 products would give 0), and 1 + that rounds back to 1.
    let f = Factors {
        rows: 1,
        cols: 1,
        rank: 2,
        u: vec![1.0 + f32::EPSILON, 1.0],
        v: vec![1.0 - f32::EPSILON, -1.0],
    };
    let raw = lowrank::factors_bytes(&f);
    let mut out = [0u8; 4];
    lowrank::reconstruct(
        &1.0f32.to_le_bytes(),
        DType::F32,
        0,
        &lowrank::parse_factors(&raw).unwrap(),
        &mut out,
    )
    .unwrap();
    let p = (1.0 + f32::EPSILON as f64) * (1.0 - f32::EPSILON as f64) - 1.0;
    assert_eq!(p, -(f32::EPSILON as f64).powi(2));
    assert_eq!(p as f32, -(2f32.powi(-46)));
    assert_eq!(f32::from_le_bytes(out), 1.0f32);
    // The sum starts at +0.0: a -0.0 product leaves +0.0, so a -0.0 weight becomes +0.0.
    let f = Factors {
        rows: 1,
        cols: 1,
        rank: 1,
        u: vec![1.0],
        v: vec![-0.0],
    };
    let raw = lowrank::factors_bytes(&f);
    let view = lowrank::parse_factors(&raw).unwrap();
    lowrank::reconstruct(&(-0.0f32).to_le_bytes(), DType::F32, 0, &view, &mut out).unwrap();
    assert_eq!(u32::from_le_bytes(out), 0);
}

/// Chunks over 256 KiB are decided on samples: a fine-tune picks a bit-level delta, a few
/// changes pick sparse (even where the samples saw none), an unchanged chunk codes tiny; all exact.
#[test]
fn large_chunks_pick_their_codec_from_samples() {
    let (base, new) = fine_tuned();
    let id = chunk_id(&new);
    let bid = chunk_id(&base);
    let f = tensordelta::encode_chunk(&new, &base, &bid, DType::F32, &id).unwrap();
    let kind = tensordelta::codec_kind(frame::frame_info(&f).unwrap().codec);
    assert!(kind == "diff" || kind == "xor", "{kind}");
    assert!(f.len() < new.len() * 3 / 4);
    assert_eq!(decode_with_codecs(&f, &base), new);
    // A few changes, all between the two samples (the start and the end of the chunk).
    let mut few = base.clone();
    for k in 0..40 {
        few[200_000 + k * 4096 + 1] ^= 0x5a;
    }
    let f = tensordelta::encode_chunk(&few, &base, &bid, DType::F32, &chunk_id(&few)).unwrap();
    assert_eq!(
        tensordelta::codec_kind(frame::frame_info(&f).unwrap().codec),
        "sparse"
    );
    assert!(f.len() < 1000, "{} bytes", f.len());
    assert_eq!(decode_with_codecs(&f, &base), few);
    let f = tensordelta::encode_chunk(&base, &base, &bid, DType::F32, &bid).unwrap();
    assert!(f.len() < 1024, "unchanged: {} bytes", f.len());
    assert_eq!(decode_with_codecs(&f, &base), base);
}

fn decode_with_codecs(f: &[u8], base: &[u8]) -> Vec<u8> {
    let info = frame::frame_info(f).unwrap();
    let mut out = vec![0u8; info.raw_len as usize];
    frame::decode_frame_with(f, &mut out, &resolver(base), tensordelta::codecs()).unwrap();
    out
}

/// The frame an add stores for `new` against `base`: `None` when the plain frame won.
fn best_delta(new: &[u8], base: &[u8], base_id: &ChunkId, dt: DType) -> Result<Option<Vec<u8>>> {
    let f = tensordelta::encode_chunk(new, base, base_id, dt, &chunk_id(new))?;
    Ok((!frame::frame_info(&f)?.bases.is_empty()).then_some(f))
}
