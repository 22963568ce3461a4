//! Reading a blob out of a pack file (the fast stored-blocks path and the zlib path): the first
//! two bytes give the entry's offset in the file, the rest is the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use theta_core::pack::read_pack_blob;
use theta_core_fuzz::{expected, scratch_file};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let offset = u16::from_le_bytes([data[0], data[1]]) as u64;
    let (file, _) = scratch_file(&data[2..]);
    let max_len = 1 << 20;
    match read_pack_blob(&file, "fuzz.pack", offset, max_len) {
        Ok(Some(blob)) => assert!(blob.len() as u64 <= max_len),
        Ok(None) => {}
        Err(e) => assert!(expected(&e), "unexpected error: {e}"),
    }
});
