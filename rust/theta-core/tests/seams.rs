//! The seams of the core: the same scan -> write -> read round trip through the Git-pack sink and
//! source and through the in-memory ones; memory buffers as input; format-3 frames with a base.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use theta_core::frame::{self, hex, BaseCodec, ChunkId};
use theta_core::pack::ObjectId;
use theta_core::pipeline::input::{Buffers, FileInput};
use theta_core::pipeline::{
    self, read, scan, write_frames, Chunk, NoProgress, Progress, RestoreChunk, Span,
};
use theta_core::store::{FrameSource, GitPacks, Location, MemoryFrames, ObjectStore, PackSink};
use theta_core::{DType, Error, Result};

/// Objects by id, as the bindings' store serves loose objects.
struct Objects(Vec<(ObjectId, Vec<u8>)>);
impl ObjectStore for Objects {
    fn read(&self, o: &ObjectId) -> Result<Vec<u8>> {
        self.0
            .iter()
            .find(|(id, _)| id == o)
            .map(|(_, f)| f.clone())
            .ok_or_else(|| Error::NotFound(format!("object {}", hex(o))))
    }
}

/// A skeleton, an fp32 tensor and a tail: three spans.
fn model() -> (Vec<u8>, Vec<Span>) {
    let mut data = vec![1u8; 1000];
    for i in 0..300_000u32 {
        data.extend_from_slice(&((i as f32) * 0.001).to_le_bytes());
    }
    data.extend_from_slice(b"tail");
    let spans = vec![
        Span {
            offset: 0,
            len: 1000,
            dtype: DType::Bytes,
            align: 1,
            opaque: true,
        },
        Span {
            offset: 1000,
            len: 1_200_000,
            dtype: DType::F32,
            align: 4,
            opaque: false,
        },
        Span {
            offset: 1_201_000,
            len: 4,
            dtype: DType::Bytes,
            align: 1,
            opaque: true,
        },
    ];
    (data, spans)
}

fn restore_chunks(chunks: &[Chunk], written: &[pipeline::Written]) -> Vec<RestoreChunk> {
    chunks
        .iter()
        .zip(written)
        .map(|(c, w)| {
            assert_eq!(c.id, w.id);
            RestoreChunk {
                len: c.len,
                id: c.id,
                object: w.object,
                at: Some(w.at),
            }
        })
        .collect()
}

/// Restore through `source` into a file and into memory; both give `data` back.
fn read_back(
    dir: &Path,
    data: &[u8],
    file_id: &ChunkId,
    rc: &[RestoreChunk],
    source: &dyn FrameSource,
) {
    let out = dir.join("out.bin");
    read::restore_file(&out, rc, data.len() as u64, file_id, source, &NoProgress).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert_eq!(read::read_chunks(rc, source).unwrap().concat(), data);
    let mut stream = Vec::new();
    read::stream_file(&mut stream, rc, data.len() as u64, file_id, source).unwrap();
    assert_eq!(unpacketize(&stream), data);
}

#[test]
fn the_same_round_trip_through_git_packs_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (data, spans) = model();
    let path = dir.path().join("f.bin");
    std::fs::write(&path, &data).unwrap();
    let s = pipeline::scan_file(&path, &spans, 65536, &NoProgress).unwrap();
    assert_eq!(s.file_id, *blake3::hash(&data).as_bytes());
    let chunks: Vec<Chunk> = s.spans.iter().flatten().cloned().collect();

    // Git packs: one pack, the frames at the offsets the sink said.
    let pack_dir = dir.path().join("pack");
    let input = FileInput::open_scanned(&path, s.stamp).unwrap();
    let mut sink = PackSink::new(&pack_dir, 0);
    let written = write_frames(&input, &chunks, &mut sink, &NoProgress).unwrap();
    let (_, pack, recount) = sink.finish().unwrap().unwrap();
    assert!(!recount, "the frame count was announced up front");
    assert_eq!(
        std::fs::read_dir(&pack_dir).unwrap().count(),
        2,
        "one .pack, one .idx"
    );
    let rc = restore_chunks(&chunks, &written);
    let none = Objects(Vec::new());
    let packs = GitPacks::open(&[pack.as_path()], &none).unwrap();
    read_back(dir.path(), &data, &s.file_id, &rc, &packs);
    git_verifies(&pack);

    // Memory: the same frames, the same bytes back.
    let mut mem = MemoryFrames::new();
    let input = FileInput::open_scanned(&path, s.stamp).unwrap();
    let in_memory = write_frames(&input, &chunks, &mut mem, &NoProgress).unwrap();
    assert_eq!(mem.len(), chunks.len());
    for (a, b) in written.iter().zip(&in_memory) {
        assert_eq!(
            (a.object, a.frame_len),
            (b.object, b.frame_len),
            "same frames"
        );
    }
    let rc = restore_chunks(&chunks, &in_memory);
    read_back(dir.path(), &data, &s.file_id, &rc, &mem);
    // Read by chunk id alone (no location): the memory source finds frames by id.
    let by_id: Vec<RestoreChunk> = rc
        .iter()
        .map(|c| RestoreChunk {
            at: None,
            ..c.clone()
        })
        .collect();
    assert_eq!(read::read_chunks(&by_id, &mem).unwrap().concat(), data);
}

/// `git verify-pack` accepts the pack and its index (skipped where git is missing).
fn git_verifies(pack: &Path) {
    match std::process::Command::new("git")
        .args(["verify-pack", "-v"])
        .arg(pack.with_extension("idx"))
        .output()
    {
        Ok(o) => assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => eprintln!("git not found: pack not verified by git"),
    }
}

#[test]
fn buffers_in_memory_give_the_same_chunks_and_frames_as_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (data, spans) = model();
    let path = dir.path().join("f.bin");
    std::fs::write(&path, &data).unwrap();
    let from_file = pipeline::scan_file(&path, &spans, 65536, &NoProgress).unwrap();
    // Buffers cut anywhere (not on span bounds, an empty one too): the same version.
    let cuts = [0usize, 10, 10, 70_001, 1_100_000, data.len()];
    let bufs: Vec<&[u8]> = cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect();
    let input = Buffers::new("tensors", bufs);
    let from_memory = scan(&input, &spans, 65536, &NoProgress).unwrap();
    assert_eq!(from_memory.file_id, from_file.file_id);
    assert_eq!(from_memory.spans, from_file.spans);
    assert!(from_memory.stamp.is_none());
    let chunks: Vec<Chunk> = from_memory.spans.iter().flatten().cloned().collect();
    let mut a = MemoryFrames::new();
    let wa = write_frames(&input, &chunks, &mut a, &NoProgress).unwrap();
    let mut b = MemoryFrames::new();
    let file = FileInput::open_scanned(&path, from_file.stamp).unwrap();
    let wb = write_frames(&file, &chunks, &mut b, &NoProgress).unwrap();
    let ids = |w: &[pipeline::Written]| w.iter().map(|w| w.object).collect::<Vec<_>>();
    assert_eq!(ids(&wa), ids(&wb));
    // A buffer that no longer holds what was scanned is refused, not stored.
    let mut changed = data.clone();
    changed[2000] ^= 1;
    let input = Buffers::new("tensors", vec![&changed[..]]);
    let e = write_frames(&input, &chunks, &mut MemoryFrames::new(), &NoProgress).unwrap_err();
    assert!(matches!(e, Error::Changed(_)), "{e}");
}

/// Test codec 200: the frame's planes hold the chunk XOR its one base.
struct Xor;
impl BaseCodec for Xor {
    fn code(&self) -> u8 {
        200
    }
    fn decode(&self, bases: &[&[u8]], out: &mut [u8]) -> Result<()> {
        let [base] = bases else {
            return Err(Error::CorruptFrame("xor wants one base".into()));
        };
        if base.len() != out.len() {
            return Err(Error::CorruptFrame("xor base of another length".into()));
        }
        out.iter_mut().zip(base.iter()).for_each(|(o, b)| *o ^= b);
        Ok(())
    }
}

fn xor_frame(chunk: &[u8], base: &[u8]) -> Vec<u8> {
    let residual: Vec<u8> = chunk.iter().zip(base).map(|(a, b)| a ^ b).collect();
    let id = frame::chunk_id(chunk);
    frame::encode_frame_with_bases(&residual, DType::F32, &id, 200, &[frame::chunk_id(base)])
        .unwrap()
}

#[test]
fn a_format_3_frame_with_a_base_round_trips_through_a_test_codec() {
    let base: Vec<u8> = (0..50_000u32)
        .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
        .collect();
    let mut chunk = base.clone();
    chunk[4001] ^= 0x10; // one weight changed: the residual is nearly all zeros
    let f = xor_frame(&chunk, &base);
    let info = frame::frame_info(&f).unwrap();
    assert_eq!((f[4], info.version(), info.codec), (3, 3, 200));
    assert_eq!(info.bases, vec![frame::chunk_id(&base)]);
    assert_eq!(info.stored_len(), f.len() as u64);
    assert!(
        f.len() < 2000,
        "the residual codes small: {} bytes",
        f.len()
    );
    let resolve = |id: &ChunkId| {
        if *id == frame::chunk_id(&base) {
            Ok(base.clone())
        } else {
            Err(Error::NotFound(hex(id)))
        }
    };
    let mut out = vec![0u8; chunk.len()];
    frame::decode_frame_with(&f, &mut out, &resolve, &[&Xor]).unwrap();
    assert_eq!(out, chunk);
    // Without the codec, or without the base, it is an error, not wrong bytes.
    let e = frame::decode_frame_with(&f, &mut out, &resolve, &[]).unwrap_err();
    assert!(e.to_string().contains("unknown codec 200"), "{e}");
    let e = frame::decode_frame_into(&f, &mut out).unwrap_err();
    assert!(
        matches!(e, Error::CorruptFrame(_) | Error::NotFound(_)),
        "{e}"
    );
    // Through the read path: the base is found by chunk id in the source.
    let mut mem = MemoryFrames::new();
    use theta_core::store::{FrameRef, FrameSink};
    let fb = frame::encode_frame(&base, DType::F32);
    let zero = [0u8; 20];
    mem.append(&FrameRef {
        chunk: &frame::chunk_id(&base),
        object: &zero,
        bytes: &fb,
    })
    .unwrap();
    let at = mem
        .append(&FrameRef {
            chunk: &frame::chunk_id(&chunk),
            object: &zero,
            bytes: &f,
        })
        .unwrap();
    let rc = [RestoreChunk {
        len: chunk.len() as u64,
        id: frame::chunk_id(&chunk),
        object: zero,
        at: Some(at),
    }];
    assert_eq!(
        read::read_chunks_with(&rc, &mem, &[&Xor]).unwrap()[0],
        chunk
    );
    // A frame that names itself as its own base does not loop.
    let selfish = frame::encode_frame_with_bases(
        &chunk,
        DType::F32,
        &frame::chunk_id(&chunk),
        200,
        &[frame::chunk_id(&chunk)],
    )
    .unwrap();
    let mut mem = MemoryFrames::new();
    let at = mem
        .append(&FrameRef {
            chunk: &frame::chunk_id(&chunk),
            object: &zero,
            bytes: &selfish,
        })
        .unwrap();
    let rc = [RestoreChunk {
        at: Some(at),
        ..rc[0].clone()
    }];
    assert!(read::read_chunks_with(&rc, &mem, &[&Xor]).is_err());
}

#[test]
fn format_2_frames_keep_decoding_and_are_still_written_byte_for_byte() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for (name, dtype) in [("f32", DType::F32), ("bytes", DType::Bytes)] {
        let raw = std::fs::read(data.join(format!("{name}.raw"))).unwrap();
        let old = std::fs::read(data.join(format!("{name}.frame-v2"))).unwrap();
        assert_eq!(old[4], 2);
        assert_eq!(frame::decode_frame(&old).unwrap().0, raw, "{name}: decodes");
        assert_eq!(
            frame::encode_frame(&raw, dtype),
            old,
            "{name}: the same frame is written"
        );
    }
}

/// A pack whose final count is not the one announced is rewritten, and git still accepts it.
#[test]
fn a_pack_sink_told_the_wrong_count_still_writes_a_valid_pack() {
    use theta_core::pack::Kind;
    use theta_core::store::{FrameRef, FrameSink};
    for hint in [0u32, 2, 5] {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = PackSink::new(dir.path(), hint);
        let f = frame::encode_frame(b"some frame bytes", DType::Bytes);
        let object = theta_core::pack::blob_id(&f);
        let at = sink
            .append(&FrameRef {
                chunk: &[1; 32],
                object: &object,
                bytes: &f,
            })
            .unwrap();
        sink.add_object(Kind::Blob, b"a manifest").unwrap();
        let (_, pack, recount) = sink.finish().unwrap().unwrap();
        assert_eq!(recount, hint != 2);
        git_verifies(&pack);
        let none = Objects(Vec::new());
        let packs = GitPacks::open(&[pack.as_path()], &none).unwrap();
        let mut out = Vec::new();
        assert!(packs.read_at(at, 1 << 20, &mut out).unwrap());
        assert_eq!(out, f);
    }
    // Nothing appended: no pack at all; dropped unfinished: nothing left behind.
    let dir = tempfile::tempdir().unwrap();
    assert!(PackSink::new(dir.path(), 3).finish().unwrap().is_none());
    let mut sink = PackSink::new(dir.path(), 3);
    sink.add_object(Kind::Blob, b"x").unwrap();
    drop(sink);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Cuts the file short on its first call: a truncation in the middle of a pass.
struct CutShort(std::path::PathBuf, AtomicBool);
impl Progress for CutShort {
    fn advance(&self, _bytes: u64) -> Result<()> {
        if !self.1.swap(true, Ordering::SeqCst) {
            File::options()
                .write(true)
                .open(&self.0)
                .unwrap()
                .set_len(4096)
                .unwrap();
        }
        Ok(())
    }
}

/// A file truncated while it is read through the mapping: no crash (SIGBUS), an error, and
/// no pack left behind.
#[test]
fn a_file_cut_short_during_a_pass_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.bin");
    let data: Vec<u8> = (0..12_000_000u32)
        .flat_map(|i| (i as f32 * 1e-6).to_le_bytes())
        .collect();
    let spans = [Span {
        offset: 0,
        len: data.len() as u64,
        dtype: DType::F32,
        align: 4,
        opaque: false,
    }];
    std::fs::write(&path, &data).unwrap();
    let cut = CutShort(path.clone(), false.into());
    let err = pipeline::scan_file(&path, &spans, 1 << 20, &cut).unwrap_err();
    assert!(matches!(err, Error::Changed(_)), "{err}");
    assert!(
        err.to_string().contains("changed while being added"),
        "{err}"
    );
    // The write: cut after its first chunk (without a stamp, so the chunks' ids decide).
    std::fs::write(&path, &data).unwrap();
    let s = pipeline::scan_file(&path, &spans, 1 << 20, &NoProgress).unwrap();
    let chunks: Vec<Chunk> = s.spans.iter().flatten().cloned().collect();
    let packdir = dir.path().join("pack");
    std::fs::create_dir(&packdir).unwrap();
    let cut = CutShort(path.clone(), false.into());
    let err = pipeline::write_pack(&path, &chunks, &packdir, None, &cut).unwrap_err();
    assert!(matches!(err, Error::Changed(_)), "{err}");
    assert_eq!(std::fs::read_dir(&packdir).unwrap().count(), 0);
    // With the scan's stamp: a file rewritten since is refused before anything is written.
    std::fs::write(&path, &data).unwrap();
    let err = pipeline::write_pack(&path, &chunks, &packdir, s.stamp, &NoProgress).unwrap_err();
    assert!(matches!(err, Error::Changed(_)), "{err}");
}

fn unpacketize(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while !s.is_empty() {
        let n = usize::from_str_radix(std::str::from_utf8(&s[..4]).unwrap(), 16).unwrap();
        out.extend_from_slice(&s[4..n]);
        s = &s[n..];
    }
    out
}

/// Frames served by object id only (no location), as the bindings serve loose objects.
struct ById(Objects);
impl FrameSource for ById {
    fn read_at(&self, _at: Location, _max: u64, _out: &mut Vec<u8>) -> Result<bool> {
        Ok(false)
    }
    fn read_by_id(&self, _chunk: &ChunkId, object: Option<&ObjectId>) -> Result<Vec<u8>> {
        self.0
            .read(object.expect("the read path passes the object id"))
    }
}

#[test]
fn stream_file_checks_the_whole_file() {
    let a: Vec<u8> = (0..100_000u32)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    let mut x = 0x9E37_79B9u32;
    let b: Vec<u8> = (0..50_000u32)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f32::from_bits(0x3f80_0000 | (x & 0x007f_ffff)).to_le_bytes() // random mantissas
        })
        .collect();
    let file = [a.clone(), b.clone()].concat();
    let file_id = frame::chunk_id(&file);
    let chunks = [(&a, [1u8; 20]), (&b, [2u8; 20])].map(|(d, object)| RestoreChunk {
        len: d.len() as u64,
        id: frame::chunk_id(d),
        object,
        at: None,
    });
    let fa = frame::encode_frame(&a, DType::F32);
    let fb = frame::encode_frame(&b, DType::F32);
    let good = ById(Objects(vec![
        ([1u8; 20], fa.clone()),
        ([2u8; 20], fb.clone()),
    ]));
    let mut out = Vec::new();
    read::stream_file(&mut out, &chunks, file.len() as u64, &file_id, &good).unwrap();
    assert_eq!(unpacketize(&out), file);

    // A frame that decodes to other bytes under the same id (a byte of a raw plane altered):
    // neither path hashes chunks on the way; the file check refuses it, then names the chunk.
    let planes = frame::frame_info(&fb).unwrap().planes;
    let raw = planes
        .iter()
        .position(|p| p.0 == frame::PlaneMode::Raw)
        .unwrap();
    let start = fb.len() - planes.iter().map(|p| p.1 as usize).sum::<usize>();
    let at = start + planes[..raw].iter().map(|p| p.1 as usize).sum::<usize>() + 7;
    let mut bad = fb.clone();
    bad[at] ^= 1;
    assert!(frame::decode_frame_unverified(&bad, &mut vec![0u8; b.len()]).is_ok());
    let bad = ById(Objects(vec![([1u8; 20], fa), ([2u8; 20], bad)]));
    let mut out = Vec::new();
    let e = read::stream_file(&mut out, &chunks, file.len() as u64, &file_id, &bad).unwrap_err();
    assert!(e.to_string().contains("decoded bytes hash to"), "{e}");
    assert!(e.to_string().contains(&hex(&[2u8; 20])), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = read::restore_file(
        &dir.path().join("out.bin"),
        &chunks,
        file.len() as u64,
        &file_id,
        &bad,
        &NoProgress,
    )
    .unwrap_err();
    assert!(e.to_string().contains("decoded bytes hash to"), "{e}");
    assert!(e.to_string().contains(&hex(&[2u8; 20])), "{e}");
}
