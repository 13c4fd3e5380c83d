//! A fixed-memory latency histogram: log-linear buckets over nanoseconds,
//! exact count, sum (so the mean is exact), minimum and maximum, and
//! quantiles within [`RELATIVE_ERROR_MAX`] of the true nearest-rank value.
//!
//! Buckets: one per nanosecond below [`EXACT_BELOW_NS`] (128 ns); above,
//! each power of two is split into 64 equal buckets, so a bucket is at most
//! 1/64 of the values it holds wide. A quantile is reported as the middle
//! of its bucket (clamped to the minimum and maximum seen), so it is off by
//! at most half a bucket: under 0.8% of the value. Values up to `u64::MAX`
//! ns have a bucket; [`BUCKETS`] counters of 8 bytes each make about 30 KiB
//! per histogram, whatever the number or size of the values.

/// Sub-buckets per power of two, as a power of two (64).
const SUB_BUCKET_BITS: u32 = 6;
/// Values below this many nanoseconds have a bucket each (exact).
pub const EXACT_BELOW_NS: u64 = 1 << (SUB_BUCKET_BITS + 1);
/// How many buckets a histogram has: the exact ones, then 64 for each power
/// of two from 2^7 to 2^63.
pub const BUCKETS: usize =
    EXACT_BELOW_NS as usize + (64 - (SUB_BUCKET_BITS as usize + 1)) * (1 << SUB_BUCKET_BITS);
/// The largest relative error of a reported quantile: half the widest
/// bucket relative to its smallest value, 1/128.
pub const RELATIVE_ERROR_MAX: f64 = 1.0 / 128.0;

/// The bucket that holds `value_ns`.
fn bucket_of(value_ns: u64) -> usize {
    if value_ns < EXACT_BELOW_NS {
        return value_ns as usize;
    }
    let exponent = 63 - value_ns.leading_zeros(); // >= SUB_BUCKET_BITS + 1
    let shift = exponent - SUB_BUCKET_BITS;
    let sub = (value_ns >> shift) as usize; // in [64, 128)
    EXACT_BELOW_NS as usize
        + (exponent - (SUB_BUCKET_BITS + 1)) as usize * (1 << SUB_BUCKET_BITS)
        + (sub - (1 << SUB_BUCKET_BITS))
}

/// The smallest value in bucket `index`, and the bucket's width.
fn bucket_bounds(index: usize) -> (u64, u64) {
    if index < EXACT_BELOW_NS as usize {
        return (index as u64, 1);
    }
    let j = index - EXACT_BELOW_NS as usize;
    let exponent = (SUB_BUCKET_BITS + 1) + (j >> SUB_BUCKET_BITS) as u32;
    let sub = (1u64 << SUB_BUCKET_BITS) + (j as u64 & ((1 << SUB_BUCKET_BITS) - 1));
    let shift = exponent - SUB_BUCKET_BITS;
    (sub << shift, 1u64 << shift)
}

/// Latencies of one request type over one interval.
///
/// Invariants: `count` is the sum of `buckets`; if `count > 0`,
/// `min_ns <= max_ns` and both are values that were recorded.
#[derive(Clone)]
pub struct LatencyHistogram {
    buckets: Box<[u64]>,
    count: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count)
            .field("min_ns", &self.min_ns)
            .field("max_ns", &self.max_ns)
            .finish()
    }
}

impl LatencyHistogram {
    /// An empty histogram (one allocation of [`BUCKETS`] counters).
    pub fn new() -> Self {
        LatencyHistogram {
            buckets: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }

    /// Records one latency. Counters saturate rather than wrap (they would
    /// need 2^64 values to get there).
    pub fn record(&mut self, value_ns: u64) {
        let b = &mut self.buckets[bucket_of(value_ns)];
        *b = b.saturating_add(1);
        self.count = self.count.saturating_add(1);
        self.sum_ns = self.sum_ns.saturating_add(u128::from(value_ns));
        self.min_ns = self.min_ns.min(value_ns);
        self.max_ns = self.max_ns.max(value_ns);
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest value recorded (exact), 0 if none.
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The smallest value recorded (exact), `None` if none.
    pub fn min_ns(&self) -> Option<u64> {
        (self.count > 0).then_some(self.min_ns)
    }

    /// The mean of the values recorded (exact up to rounding down to a
    /// whole nanosecond), 0 if none.
    pub fn mean_ns(&self) -> u64 {
        if self.count == 0 {
            return 0;
        }
        (self.sum_ns / u128::from(self.count)) as u64
    }

    /// The nearest-rank quantile `numerator / denominator` (e.g. 99/100):
    /// the smallest recorded value such that at least
    /// `ceil(count * numerator / denominator)` values (and at least one)
    /// are at or below it, within [`RELATIVE_ERROR_MAX`]; `None` if the
    /// histogram is empty. `numerator / denominator` of 1 or more gives the
    /// maximum, exactly.
    ///
    /// # Panics
    /// If `denominator` is 0 (a programmer error).
    pub fn quantile_ns(&self, numerator: u64, denominator: u64) -> Option<u64> {
        assert!(denominator > 0, "a quantile with denominator 0");
        if self.count == 0 {
            return None;
        }
        if numerator >= denominator {
            return Some(self.max_ns);
        }
        let wanted = u128::from(self.count) * u128::from(numerator);
        let rank = wanted.div_ceil(u128::from(denominator)).max(1) as u64;
        let mut seen = 0u64;
        for (index, &n) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(n);
            if seen >= rank {
                let (low, width) = bucket_bounds(index);
                let middle = low + (width - 1) / 2;
                return Some(middle.clamp(self.min_ns, self.max_ns));
            }
        }
        unreachable!("count {} is the sum of the buckets, and rank {rank} <= count", self.count)
    }

    /// Empties the histogram, keeping its memory.
    pub fn clear(&mut self) {
        self.buckets.fill(0);
        self.count = 0;
        self.sum_ns = 0;
        self.min_ns = u64::MAX;
        self.max_ns = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_whole_range_in_order() {
        let mut next_low = 0u64;
        for index in 0..BUCKETS {
            let (low, width) = bucket_bounds(index);
            assert_eq!(low, next_low, "bucket {index} starts where the previous ended");
            assert_eq!(bucket_of(low), index);
            assert_eq!(bucket_of(low + (width - 1)), index);
            // At most 1/64 of the bucket's smallest value wide.
            assert!(low < EXACT_BELOW_NS || width * 64 <= low, "bucket {index}: {low} + {width}");
            next_low = low.wrapping_add(width);
        }
        assert_eq!(next_low, 0, "the last bucket ends at u64::MAX");
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }
}
