//! Throughput of the pack side: `cargo run --release -p theta-core --example pack_bench`.
use std::time::Instant;

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
        std::hint::black_box(theta_core::pack::prepare_blob(&data));
    }
    let prep = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(crc32fast::hash(&data));
    }
    let crc = t.elapsed().as_secs_f64();
    let mb = (n * data.len()) as f64 / 1e6;
    println!(
        "sha1 {:.0} MB/s, prepare_blob {:.0} MB/s, crc32 {:.0} MB/s",
        mb / sha,
        mb / prep,
        mb / crc
    );
}
