//! Encode then decode, every codec: the first byte picks the dtype, the rest is split into a new
//! chunk and its base. Plain frames and the chosen delta frame must give back the exact bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use theta_core::frame::{self, chunk_id};
use theta_core::tensordelta::{codecs, encode_chunk};
use theta_core::DType;

fuzz_target!(|data: &[u8]| {
    let Some((&code, rest)) = data.split_first() else {
        return;
    };
    let Ok(dtype) = DType::from_code(code % 16) else {
        return;
    };
    let f = frame::encode_frame(rest, dtype);
    let (out, info) = frame::decode_frame(&f).expect("a frame we wrote decodes");
    assert_eq!(out, rest);
    assert_eq!(info.raw_len, rest.len() as u64);
    // New and base of one length: the second half against the first, made close to it by the
    // first half's bytes being reused where the input repeats.
    let half = rest.len() / 2;
    let (base, new) = (&rest[..half], &rest[half..half * 2]);
    let (bid, nid) = (chunk_id(base), chunk_id(new));
    let f = encode_chunk(new, base, &bid, dtype, &nid).expect("encode a delta");
    let resolve = |id: &frame::ChunkId| {
        assert_eq!(*id, bid, "a delta frame names its base");
        Ok(base.to_vec())
    };
    let mut out = vec![0u8; new.len()];
    frame::decode_frame_with(&f, &mut out, &resolve, codecs()).expect("a delta we wrote decodes");
    assert_eq!(out, new);
});
