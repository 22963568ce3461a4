//! git's pkt-line content stream, as the filter process receives it: the result must be what a
//! strict reading of git's framing gives (four hex digits, 4 < n <= 65520, up to a flush).
#![no_main]
use libfuzzer_sys::fuzz_target;
use theta_core::pktline::{receive, Keep, MAX_DATA};
use theta_core_fuzz::{expected, scratch_file};

/// The content git's framing gives for `data`, or None where git would call it broken.
fn strict(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let head = data.get(..4)?;
        if !head.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let n = usize::from_str_radix(std::str::from_utf8(head).ok()?, 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        if !(5..=MAX_DATA + 4).contains(&n) {
            return None;
        }
        out.extend_from_slice(data.get(4..n)?);
        data = &data[n..];
    }
}

fuzz_target!(|data: &[u8]| {
    let (_, path) = scratch_file(data);
    let want = strict(data);
    match receive(&path, None, None, 1025, Keep::HashOnly) {
        Ok(got) => {
            let content = want.expect("content git would refuse was accepted");
            assert_eq!(got.len, content.len() as u64);
            assert_eq!(got.blake3, *blake3_of(&content));
            assert_eq!(got.head, &content[..content.len().min(1025)]);
        }
        Err(e) => {
            assert!(expected(&e), "unexpected error: {e}");
            assert!(want.is_none(), "content git would accept was refused: {e}");
        }
    }
});

fn blake3_of(data: &[u8]) -> Box<[u8; 32]> {
    Box::new(theta_core::frame::chunk_id(data))
}
