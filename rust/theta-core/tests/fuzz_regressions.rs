//! What the cargo fuzz targets found (rust/theta-core/fuzz, benches/fuzz.sh), one test each.

use theta_core::delta::{encode_delta_with, Delta};
use theta_core::frame::{self, chunk_id, ChunkId};
use theta_core::pipeline::read::{read_chunks, RestoreChunk};
use theta_core::store::{FrameRef, FrameSink, MemoryFrames};
use theta_core::tensordelta::codecs;
use theta_core::{DType, Error};

/// A frame that claims `raw_len` bytes of chunk `id` with a 4-byte zstd plane (it cannot decode:
/// only its header is read before the claim is judged).
fn claiming(id: &ChunkId, raw_len: u64) -> Vec<u8> {
    let mut f = frame::MAGIC.to_vec();
    f.extend_from_slice(&[frame::VERSION, frame::CODEC_PLANES, DType::Bytes as u8, 1]);
    f.extend_from_slice(&raw_len.to_le_bytes());
    f.extend_from_slice(id);
    f.push(1); // zstd
    f.extend_from_slice(&4u64.to_le_bytes());
    f.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
    f
}

fn xor_frame() -> (Vec<u8>, ChunkId, ChunkId) {
    let base: Vec<u8> = (0..64u8).collect();
    let new: Vec<u8> = base.iter().map(|b| b ^ 1).collect();
    let (bid, nid) = (chunk_id(&base), chunk_id(&new));
    let mut f = Vec::new();
    let n = encode_delta_with(Delta::Xor, &new, &base, &bid, DType::U8, &nid, &mut f).unwrap();
    f.truncate(n);
    (f, bid, nid)
}

fn add(source: &mut MemoryFrames, id: &ChunkId, frame: &[u8]) {
    source
        .append(&FrameRef {
            chunk: id,
            object: &[0; 20],
            bytes: frame,
        })
        .unwrap();
}

/// Found by `read_chunks`: a 64-byte chunk's delta frame named a base whose frame claimed
/// 788 MB, and the reader allocated that much before decoding it (libFuzzer's malloc limit).
#[test]
fn a_base_claiming_more_than_its_chunk_is_refused_before_allocating() {
    let (delta, bid, nid) = xor_frame();
    let mut source = MemoryFrames::new();
    add(&mut source, &nid, &delta);
    add(&mut source, &bid, &claiming(&bid, 788_531_200));
    let chunk = RestoreChunk {
        len: 64,
        id: nid,
        object: [0; 20],
        at: None,
    };
    let e = read_chunks(&[chunk], &source).unwrap_err();
    assert!(
        matches!(&e, Error::CorruptFrame(m) if m.contains("of 788531200 bytes (at most 64 expected)")),
        "{e}"
    );
}

/// With the fix above, a frame naming 16 bases (the format's most) could still make the reader
/// fetch and hold 16 bases: a frame must name exactly as many as its codec decodes against.
#[test]
fn a_frame_naming_more_bases_than_its_codec_takes_fetches_none() {
    let (delta, bid, _) = xor_frame();
    let mut many = delta[..frame::HEADER_LEN].to_vec();
    many.push(16);
    for _ in 0..16 {
        many.extend_from_slice(&bid);
    }
    many.extend_from_slice(&delta[frame::HEADER_LEN + 1 + 32..]);
    assert_eq!(frame::frame_info(&many).unwrap().bases.len(), 16);
    let resolve = |_: &ChunkId| -> theta_core::Result<Vec<u8>> { panic!("no base may be fetched") };
    let mut out = vec![0u8; 64];
    let e = frame::decode_frame_with(&many, &mut out, &resolve, codecs()).unwrap_err();
    assert!(
        matches!(&e, Error::CorruptFrame(m) if m.contains("decodes against 1 base(s) but the frame names 16")),
        "{e}"
    );
}

/// Found by `pktline`: a packet header "+000" (from_str_radix takes a sign) was read as a flush,
/// ending the content early; the bytes after it would have been read as git's next request.
#[test]
fn pkt_line_headers_are_four_hex_digits() {
    use theta_core::pktline::{receive, Keep};
    let dir = tempfile::tempdir().unwrap();
    for head in [&b"+000"[..], b"+00a", b" 00a", b"0x0a"] {
        let mut stream = b"0009abcde".to_vec();
        stream.extend_from_slice(head);
        stream.extend_from_slice(b"0000");
        let input = dir.path().join("in");
        std::fs::write(&input, &stream).unwrap();
        let e = receive(&input, None, None, 16, Keep::HashOnly).unwrap_err();
        assert!(
            matches!(&e, Error::Protocol(m) if m.contains("bad packet header")),
            "{:?}: {e}",
            String::from_utf8_lossy(head)
        );
    }
}
