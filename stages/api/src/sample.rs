//! The seeded sample of target positions where whole distributions are kept.
//!
//! Pass-1 keeps the model's full distribution at these positions (for the implied-mass
//! audit and the normalisation probe), and the legality probes cut the stream just
//! before one of them, so that the distribution at the first changed target exists in
//! both runs. Both must agree on the sample, hence one function.

/// The `count` target positions in 1..=targets with the smallest keyed hash, so the sample is fixed by the seed, spread over the whole
/// stream, and the same for every model. Sorted.
pub fn sample_positions(targets: usize, count: usize, seed: u64) -> Vec<i64> {
    use std::collections::BinaryHeap;
    let key = |p: u64| {
        // splitmix64's finaliser over (seed, p).
        let mut z =
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ p.wrapping_add(0x632B_E59B_D9B4_E019);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut smallest: BinaryHeap<(u64, i64)> = BinaryHeap::with_capacity(count + 1);
    for p in 1..=targets as i64 {
        let k = (key(p as u64), p);
        if smallest.len() < count {
            smallest.push(k);
        } else if smallest.peek().is_some_and(|top| k < *top) {
            smallest.pop();
            smallest.push(k);
        }
    }
    let mut positions: Vec<i64> = smallest.into_iter().map(|(_, p)| p).collect();
    positions.sort_unstable();
    positions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_is_sorted_inside_the_targets_and_fixed_by_the_seed() {
        let a = sample_positions(10_000, 50, 1337);
        assert_eq!(a.len(), 50);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(a.iter().all(|&p| (1..=10_000).contains(&p)));
        assert_eq!(a, sample_positions(10_000, 50, 1337));
        assert_ne!(a, sample_positions(10_000, 50, 7));
        assert_eq!(sample_positions(5, 50, 1).len(), 5);
    }
}
