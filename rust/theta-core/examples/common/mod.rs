//! What the examples (and the delta tests) share: a CPU clock and fixed-seed normal samples.
// Each user takes what it needs of this module; the rest would warn as dead code there.
#![allow(dead_code)]

use std::time::Instant;

/// Time this thread spent on a CPU (the machine is shared; wall time would count other work).
pub fn cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ns| ns / 1e9)
        .unwrap_or_else(|| {
            static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            T0.get_or_init(Instant::now).elapsed().as_secs_f64()
        })
}

/// Fixed-seed normal samples (xorshift64 + Box-Muller): the same figures on every run.
pub struct Normal(pub u64);

impl Normal {
    pub fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn sample(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// `w` as little-endian bytes, and the same with every weight moved by N(0, (1e-3 std)^2):
    /// a full fine-tune's shape of change.
    pub fn fine_tune(&mut self, w: &[f32], std: f64) -> (Vec<u8>, Vec<u8>) {
        let base = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let new = w
            .iter()
            .flat_map(|&v| ((v as f64 + self.sample() * 1e-3 * std) as f32).to_le_bytes())
            .collect();
        (base, new)
    }
}
