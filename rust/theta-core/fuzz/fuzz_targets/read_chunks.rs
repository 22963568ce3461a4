//! The read path over a frame source: the input is a list of frames (u16 LE length, bytes),
//! stored by the chunk id their header claims; the first one's chunk is read, bases of bases
//! followed through the source (depth bound, cycles, missing and lying bases).
#![no_main]
use libfuzzer_sys::fuzz_target;
use theta_core::frame;
use theta_core::pipeline::read::{read_chunks, RestoreChunk};
use theta_core::store::{FrameRef, FrameSink, MemoryFrames};
use theta_core_fuzz::{expected, split, MAX_OUT};

fuzz_target!(|data: &[u8]| {
    let mut source = MemoryFrames::new();
    let mut first = None;
    let mut rest = data;
    while !rest.is_empty() && source.len() < 64 {
        let (f, tail) = split(rest);
        rest = tail;
        let id: frame::ChunkId = match f.get(16..48) {
            Some(id) => id.try_into().unwrap(),
            None => continue,
        };
        let len = frame::frame_info(f).map(|i| i.raw_len).unwrap_or(0);
        first.get_or_insert((id, len));
        let object = [0u8; 20];
        source
            .append(&FrameRef {
                chunk: &id,
                object: &object,
                bytes: f,
            })
            .unwrap();
    }
    let Some((id, len)) = first else {
        return;
    };
    if len > MAX_OUT {
        return;
    }
    let chunk = RestoreChunk {
        len,
        id,
        object: [0u8; 20],
        at: None,
    };
    match read_chunks(&[chunk], &source) {
        Ok(out) => assert_eq!(frame::chunk_id(&out[0]), id),
        Err(e) => assert!(expected(&e), "unexpected error: {e}"),
    }
});
