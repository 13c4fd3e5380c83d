//! Randomness from the seed: one ChaCha stream per concern, so that adding
//! a fault kind (drawing from its own stream) does not reshuffle the
//! workload or the faults of existing seeds.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The concerns that draw randomness, each from its own stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concern {
    /// The fault probabilities a seed draws from its scenario's ranges.
    Swarm = 1,
    /// What clients ask for.
    Workload = 2,
    /// Splits, latency and resets of connections.
    Network = 3,
    /// Disk faults, disk latency and crash outcomes on the disk.
    Disk = 4,
    /// When processes crash and restart.
    Crash = 5,
    /// Timer lateness and clock skew.
    Time = 6,
    /// How long a component stays down.
    Restart = 7,
}

/// A random stream for one concern of one seed.
#[derive(Debug, Clone)]
pub struct Stream {
    rng: ChaCha8Rng,
}

impl Stream {
    /// The stream of `concern` for `seed`.
    pub fn new(seed: u64, concern: Concern) -> Stream {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(concern as u64);
        Stream { rng }
    }

    /// A uniformly random u64.
    pub fn u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Lemire's multiply-shift: unbiased enough for testing, and fast.
        ((self.u64() as u128 * n as u128) >> 64) as u64
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p` (0.0..=1.0).
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < p
    }

    /// A float in `lo..hi`.
    pub fn f64_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64))
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        self.rng.fill_bytes(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_independent() {
        let a: Vec<u64> = (0..4).map(|_| Stream::new(7, Concern::Workload).u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]), "same seed and concern, same stream");
        let mut w = Stream::new(7, Concern::Workload);
        let mut d = Stream::new(7, Concern::Disk);
        assert_ne!(w.u64(), d.u64());
        let mut x = Stream::new(8, Concern::Workload);
        assert_ne!(Stream::new(7, Concern::Workload).u64(), x.u64());
    }

    #[test]
    fn below_and_chance_stay_in_bounds() {
        let mut s = Stream::new(1, Concern::Swarm);
        assert!((0..1000).all(|_| s.below(10) < 10));
        assert!((0..1000).all(|_| !s.chance(0.0)));
        assert!((0..1000).all(|_| s.chance(1.0)));
    }
}
