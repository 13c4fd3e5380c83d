//! Simulated byte streams: each direction of a connection delivers bytes in
//! order, split at random points, each piece after a random latency (never
//! before the piece sent ahead of it).

use bytes::Bytes;

use crate::rng::Stream;
use crate::time::US;

/// One direction of a connection.
#[derive(Debug, Default)]
pub struct Pipe {
    /// When the last piece sent arrives (virtual ns): later pieces arrive
    /// after it, which keeps the stream in order.
    last_arrival_ns: u64,
}

impl Pipe {
    /// Splits `data` into pieces with their arrival times, sent at `now_ns`
    /// with a one-way latency drawn in `latency_us` per piece.
    pub fn send(
        &mut self,
        rng: &mut Stream,
        now_ns: u64,
        latency_us: [u64; 2],
        data: Bytes,
    ) -> Vec<(u64, Bytes)> {
        let mut pieces = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let len = if rng.chance(0.5) { rest.len() } else { 1 + rng.below(rest.len() as u64) as usize };
            let piece = rest.split_to(len);
            let at = (now_ns + rng.range(latency_us[0], latency_us[1]) * US).max(self.last_arrival_ns) + 1;
            self.last_arrival_ns = at;
            pieces.push((at, piece));
        }
        pieces
    }

    /// When the last piece sent arrives.
    pub fn last_arrival_ns(&self) -> u64 {
        self.last_arrival_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Concern;

    #[test]
    fn pieces_arrive_in_order_and_add_up() {
        let mut rng = Stream::new(3, Concern::Network);
        let mut pipe = Pipe::default();
        let mut all = Vec::new();
        let mut last = 0;
        for i in 0..50u8 {
            let data = Bytes::from(vec![i; 1 + i as usize * 7]);
            for (at, piece) in pipe.send(&mut rng, i as u64 * 10, [1, 500], data) {
                assert!(at > last, "out of order");
                last = at;
                all.extend_from_slice(&piece);
            }
        }
        let expected: Vec<u8> = (0..50u8).flat_map(|i| vec![i; 1 + i as usize * 7]).collect();
        assert_eq!(all, expected);
    }
}
