//! Throughput of the pack side: `cargo run --release -p theta-core --example pack_bench`.
use std::time::Instant;

use theta_core::pack::{Kind, StoredEntry};

fn main() {
    let data: Vec<u8> = (0..(2u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let n = 100;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(theta_core::pack::blob_id(&data));
    }
    let sha = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(StoredEntry::new(Kind::Blob, &data).crc32);
    }
    let prep = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(crc32fast::hash(&data));
    }
    let crc = t.elapsed().as_secs_f64();
    // Sixteen frames of slightly different lengths, as an add's frames are.
    let frames: Vec<&[u8]> = (0..16).map(|k| &data[..data.len() - 977 * k]).collect();
    let t = Instant::now();
    for _ in 0..n / 16 {
        std::hint::black_box(theta_core::sha1x16::blob_ids(&frames));
    }
    let x16 = t.elapsed().as_secs_f64();
    let x16_mb = (n / 16 * frames.iter().map(|f| f.len()).sum::<usize>()) as f64 / 1e6;
    let mb = (n * data.len()) as f64 / 1e6;
    println!(
        "sha1 {:.0} MB/s, sha1 x16 {:.0} MB/s, pack entry (sha1, crc32, adler32) {:.0} MB/s, crc32 {:.0} MB/s",
        mb / sha,
        x16_mb / x16,
        mb / prep,
        mb / crc
    );
}
