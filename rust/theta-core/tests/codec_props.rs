//! Property tests of the chunk codec: exact round trips, and corrupt frames give errors (never
//! panics).

use proptest::prelude::*;
use theta_core::frame::{chunk_id, decode_frame, encode_frame, encode_frame_into};
use theta_core::{ans, DType};

fn dtype() -> impl Strategy<Value = DType> {
    (0..DType::ALL.len()).prop_map(|i| DType::ALL[i])
}

/// Bytes that exercise every plane mode: uniform noise, few distinct values, runs, float-like.
fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..3000),
        prop::collection::vec(0u8..4, 0..5000),
        (any::<u8>(), 0usize..5000).prop_map(|(b, n)| vec![b; n]),
        prop::collection::vec(-1.0f32..1.0, 0..2000)
            .prop_map(|v| v.iter().flat_map(|f| (f * 0.02).to_le_bytes()).collect()),
        prop::collection::vec(0u8..2, 0..70_000),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frames_round_trip(dt in dtype(), data in data()) {
        let f = encode_frame(&data, dt);
        let (out, info) = decode_frame(&f).unwrap();
        prop_assert_eq!(out, data);
        prop_assert_eq!(info.dtype, dt);
        prop_assert_eq!(info.stored_len(), f.len() as u64);
    }

    /// A reused frame buffer is overwritten, never read: what it held does not leak into the
    /// frame (the add encodes every chunk of a worker into the same buffers).
    #[test]
    fn frames_into_a_used_buffer_are_the_same(
        dt in dtype(),
        data in data(),
        garbage in prop::collection::vec(any::<u8>(), 0..100_000),
    ) {
        let mut buf = garbage;
        let len = encode_frame_into(&data, dt, &chunk_id(&data), &mut buf);
        prop_assert_eq!(&buf[..len], &encode_frame(&data, dt)[..]);
        // Twice into the same buffer (its length is kept from the first frame).
        let again = encode_frame_into(&data, dt, &chunk_id(&data), &mut buf);
        prop_assert_eq!(&buf[..again], &encode_frame(&data, dt)[..]);
    }

    #[test]
    fn corrupt_frames_are_errors(
        dt in dtype(),
        data in data(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let f = encode_frame(&data, dt);
        let mut g = f.clone();
        for (at, x) in &flips {
            let i = at.index(g.len());
            g[i] ^= x;
        }
        // Any change is detected (the BLAKE3 check catches what the structure checks miss).
        prop_assert!(decode_frame(&g).is_err());
        if truncate {
            let n = cut.index(f.len());
            prop_assert!(decode_frame(&f[..n]).is_err());
        }
    }

    #[test]
    fn rans_round_trips_and_rejects_garbage(
        data in prop::collection::vec(0u8..16, 1..20_000),
        junk in prop::collection::vec(any::<u8>(), 0..2000),
    ) {
        let mut enc = Vec::new();
        ans::encode(&data, &mut enc);
        let mut out = vec![0u8; data.len()];
        ans::decode(&enc, &mut out).unwrap();
        prop_assert_eq!(&out, &data);
        // Hostile streams: may decode to something or fail, but never panic.
        let _ = ans::decode(&junk, &mut out);
        let mut tampered = enc.clone();
        tampered.truncate(enc.len().saturating_sub(4));
        prop_assert!(ans::decode(&tampered, &mut out).is_err());
    }
}
