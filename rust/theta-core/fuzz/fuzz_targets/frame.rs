//! Frame decode, every format and codec, and `frame_codec` (the six-byte reading): the frame is
//! the first part of the input, the bytes of its base chunks the rest (see `Bases`); decoded
//! unverified, so codecs run on mutated frames.
#![no_main]
use libfuzzer_sys::fuzz_target;
use theta_core::frame;
use theta_core::tensordelta::codecs;
use theta_core_fuzz::{expected, split, Bases, MAX_OUT};

fuzz_target!(|data: &[u8]| {
    let (f, rest) = split(data);
    let (a, b) = split(rest);
    let bases = Bases { a, b };
    let codec = frame::frame_codec(f);
    let Ok(info) = frame::frame_info(f) else {
        return;
    };
    // The six-byte reading of a frame agrees with the whole header's.
    assert_eq!(codec.ok(), Some(info.codec));
    if info.raw_len > MAX_OUT {
        return;
    }
    let mut out = vec![0u8; info.raw_len as usize];
    let resolve = |id: &frame::ChunkId| bases.resolve(id);
    match frame::decode_frame_unverified_with(f, &mut out, &resolve, codecs()) {
        Ok(got) => assert_eq!(got, info),
        Err(e) => assert!(expected(&e), "unexpected error: {e}"),
    }
    // A wrong output length is refused, never written past.
    if info.raw_len > 0 {
        let mut short = vec![0u8; info.raw_len as usize - 1];
        let r = frame::decode_frame_unverified_with(f, &mut short, &resolve, codecs());
        assert!(
            r.is_err(),
            "a frame of {} bytes decoded into {}",
            info.raw_len,
            short.len()
        );
    }
    if info.bases.is_empty() {
        if let Err(e) = frame::decode_frame(f) {
            assert!(expected(&e), "unexpected error: {e}");
        }
    }
});
