//! rANS alone on the byte planes of an f32 file:
//! `cargo run --release -p theta-core --example ans_bench -- FILE`

mod common;
use common::cpu_secs;

use theta_core::ans;

fn main() {
    let path = std::env::args().nth(1).expect("FILE");
    let data = std::fs::read(path).expect("read");
    let n = (data.len() / 4).min(8 << 20);
    for j in [3usize, 2] {
        let plane: Vec<u8> = data[..4 * n]
            .chunks_exact(4)
            .map(|e| (u32::from_le_bytes(e.try_into().unwrap()).rotate_left(1) >> (8 * j)) as u8)
            .collect();
        let chunk = 512 * 1024;
        let mut encs = Vec::new();
        let mut size = 0;
        for c in plane.chunks(chunk) {
            let mut e = Vec::new();
            ans::encode(c, &mut e);
            size += e.len();
            encs.push(e);
        }
        // Several passes each: the CPU clock behind `cpu_secs` can tick as coarsely as 4 ms.
        const REPS: usize = 8;
        let t = cpu_secs();
        let mut e = Vec::new();
        for _ in 0..REPS {
            for c in plane.chunks(chunk) {
                e.clear();
                ans::encode(c, &mut e);
            }
        }
        let enc = (REPS * n) as f64 / (cpu_secs() - t) / 1e6;
        let mut out = vec![0u8; chunk];
        let t = cpu_secs();
        for _ in 0..REPS {
            for (c, e) in plane.chunks(chunk).zip(&encs) {
                ans::decode(e, &mut out[..c.len()]).unwrap();
            }
        }
        let dec = (REPS * n) as f64 / (cpu_secs() - t) / 1e6;
        for (c, e) in plane.chunks(chunk).zip(&encs) {
            ans::decode(e, &mut out[..c.len()]).unwrap();
            assert_eq!(&out[..c.len()], c);
        }
        // The full histogram of a plane, which the encoder's sample model stands in for.
        let t = cpu_secs();
        let mut seen = 0u64;
        for _ in 0..REPS {
            for c in plane.chunks(chunk) {
                seen += std::hint::black_box(ans::histogram(c))[0];
            }
        }
        let hist = (REPS * n) as f64 / (cpu_secs() - t) / 1e6;
        std::hint::black_box(seen);
        println!(
            "plane {j}: ratio {:.5} ({size} bytes)  encode {enc:.0} Msym/s  decode {dec:.0} Msym/s  histogram {hist:.0} MB/s",
            size as f64 / n as f64
        );
    }
}
