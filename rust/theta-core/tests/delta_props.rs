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
        // The smaller delta, and only when it beats the plain frame.
        let plain = frame::encode_frame(&new, dt);
        match delta::encode_delta_frame(&new, &base, &chunk_id(&base), dt).unwrap() {
            Some(f) => {
                prop_assert!(f.len() < plain.len());
                prop_assert_eq!(decode(&f, new.len(), &base).unwrap(), new.clone());
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
    let f = delta::encode_delta_frame(&new, &base, &id, DType::F32)
        .unwrap()
        .expect("the delta beats the plain frame");
    let ratio = f.len() as f64 / new.len() as f64;
    assert!(ratio < 0.75, "delta codes to {ratio:.4} of raw");
    assert_eq!(decode(&f, new.len(), &base).unwrap(), new);
    let same = delta::encode_delta_frame(&base, &base, &id, DType::F32)
        .unwrap()
        .expect("an unchanged chunk beats the plain frame");
    assert!(same.len() < 1024, "unchanged chunk: {} bytes", same.len());
    assert_eq!(decode(&same, base.len(), &base).unwrap(), base);
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
    let e = delta::encode_delta_frame(new, &base[4..], &chunk_id(base), DType::F32).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}
