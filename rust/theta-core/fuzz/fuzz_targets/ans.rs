//! The rANS coder: any plane decodes to an error or to `len` bytes (len from the first two bytes
//! of the input), and the encoder's output decodes back exactly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use theta_core::ans;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let len = u16::from_le_bytes([data[0], data[1]]) as usize * 4;
    let src = &data[2..];
    let mut out = vec![0u8; len];
    let _ = ans::decode(src, &mut out);
    let mut enc = Vec::new();
    ans::encode(src, &mut enc);
    let mut back = vec![0u8; src.len()];
    ans::decode(&enc, &mut back).expect("an encoded plane decodes");
    assert_eq!(back, src);
});
