//! The kernel against the spec's worked examples and two direct implementations.

use super::*;
use proptest::prelude::*;

/// §1.3–§1.5 as written: one pass in stream order over two tables of 2^bits slots with
/// linear probing and occupancy flags, aborting at the first insertion that finds no
/// slot. Slow and direct: what the partitioned kernel must equal.
fn reference(targets: &[u16], seed: u16, order: usize, bits: u32) -> Result<Hints, TableFull> {
    struct Table {
        keys: Vec<u64>,
        used: Vec<bool>,
        values: Vec<(u32, u32, u16)>,
        bits: u32,
    }
    impl Table {
        /// The key's slot and whether it is there; `None` when every slot was probed.
        fn find(&self, key: u64) -> Option<(usize, bool)> {
            let size = 1usize << self.bits;
            let mut s = slot(key, self.bits) as usize;
            for _ in 0..size {
                if !self.used[s] {
                    return Some((s, false));
                }
                if self.keys[s] == key {
                    return Some((s, true));
                }
                s = (s + 1) % size;
            }
            None
        }
    }
    let new_table = || Table {
        keys: vec![0; 1 << bits],
        used: vec![false; 1 << bits],
        values: vec![(0, 0, 0); 1 << bits],
        bits,
    };
    let (mut contexts, mut pairs) = (new_table(), new_table());
    let width = order - 1;
    let mut ring = std::collections::VecDeque::from([seed]);
    if width == 0 {
        ring.clear();
    }
    let n = targets.len();
    let mut out = Hints {
        hint: vec![0; n],
        share: vec![0.0; n],
        seen: vec![0; n],
    };
    for (i, &y) in targets.iter().enumerate() {
        if ring.len() == width {
            let window: Vec<u16> = ring.iter().copied().collect();
            let k = context_key(&window);
            if let Some((s, true)) = contexts.find(k) {
                let (total, top, token) = contexts.values[s];
                out.hint[i] = token;
                out.share[i] = top as f32 / total as f32;
                out.seen[i] = total;
            }
            let p = pair_key(k, y, width);
            let full = |table| TableFull {
                target: i,
                table,
                bits,
            };
            let c = match pairs.find(p) {
                None => return Err(full("pair")),
                Some((s, present)) => {
                    if !present {
                        pairs.used[s] = true;
                        pairs.keys[s] = p;
                    }
                    pairs.values[s].0 += 1;
                    pairs.values[s].0
                }
            };
            match contexts.find(k) {
                None => return Err(full("context")),
                Some((s, false)) => {
                    contexts.used[s] = true;
                    contexts.keys[s] = k;
                    contexts.values[s] = (1, c, y);
                }
                Some((s, true)) => {
                    let v = &mut contexts.values[s];
                    v.0 += 1;
                    if c > v.1 {
                        v.1 = c;
                        v.2 = y;
                    }
                }
            }
        }
        ring.push_back(y);
        if ring.len() > width {
            ring.pop_front();
        }
    }
    Ok(out)
}

#[test]
fn the_hash_check_values_of_the_spec() {
    let window: Vec<u16> = (1..=15).collect();
    let k = context_key(&window);
    assert_eq!(k, 0x130FBF4);
    assert_eq!(k, 19_987_444);
    assert_eq!(pair_key(k, 16, 15), 0x122DB572D84C);
    assert_eq!(slot(k, 27), 60_218_116);
    assert_eq!(context_key(&[5, 5]), 0xD62E);
    assert_eq!(context_key(&[5, 7]), 0x22BC);
    assert_eq!(pair_key(0x22BC, 9, 2), 0x212069883);
    assert_eq!(slot(0x22BC, 12), 2412);
    assert_eq!(slot(0x212069883, 12), 1727);
    assert_eq!(table_bits(47_851_520), 27);
    assert_eq!(table_bits(62_021_632), 27);
    assert_eq!(table_bits(10), 12);
    assert_eq!(table_bits(1 << 30), 28);
}

#[test]
fn the_trace_of_the_spec() {
    let targets = [5, 7, 9, 5, 7, 9, 5, 7, 2, 5, 7, 9, 5, 7];
    let kernel = Kernel {
        order: 3,
        table_bits: None,
    };
    let h = kernel.hints(&targets, targets[0]).unwrap();
    let expected: [(u16, f32); 14] = [
        (0, 0.0),
        (0, 0.0),
        (0, 0.0),
        (0, 0.0),
        (0, 0.0),
        (9, 1.0),
        (5, 1.0),
        (7, 1.0),
        (9, 1.0),
        (0, 0.0),
        (0, 0.0),
        (9, 2.0 / 3.0),
        (5, 1.0),
        (7, 1.0),
    ];
    for (i, &(hint, share)) in expected.iter().enumerate() {
        assert_eq!((h.hint[i], h.share[i]), (hint, share), "target {i}");
    }
    let gated: Vec<bool> = h.share.iter().map(|&s| s >= 0.8f32).collect();
    assert_eq!(gated.iter().filter(|&&g| g).count(), 6);
    assert!(!gated[11], "2/3 is below 0.8");
    assert_eq!(h.seen[8], 2);
    assert_eq!(h.seen[11], 3);
}

#[test]
fn the_seed_token_decides_a_recurrence_of_the_first_window() {
    // Stream 1 2 3 4 1 2 9, order 3: target 5 (y = 9, window [1, 2]).
    let stream = [1u16, 2, 3, 4, 1, 2, 9];
    let targets = &stream[1..];
    let kernel = Kernel {
        order: 3,
        table_bits: None,
    };
    let first_token = kernel.hints(targets, stream[0]).unwrap();
    assert_eq!((first_token.hint[5], first_token.share[5]), (3, 1.0));
    let first_target = kernel.hints(targets, targets[0]).unwrap();
    assert_eq!((first_target.hint[5], first_target.share[5]), (0, 0.0));
}

#[test]
fn a_full_table_stops_where_the_reference_does() {
    // Order 2 (one-token contexts): 9 distinct contexts in a 2^3-slot table.
    let targets: Vec<u16> = (0..40).map(|i| (i * 5 % 9) as u16).collect();
    let kernel = Kernel {
        order: 2,
        table_bits: Some(3),
    };
    let ours = kernel.hints(&targets, targets[0]);
    let theirs = reference(&targets, targets[0], 2, 3);
    assert!(ours.is_err(), "{ours:?}");
    assert_eq!(ours, theirs);
    let err = ours.unwrap_err();
    assert_eq!(err.table, "pair", "the pair is inserted first: {err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Small tables, so that slots collide and probing wraps: the same hints, or the
    /// same abort, as the reference.
    #[test]
    fn equal_to_the_reference_with_colliding_slots(
        targets in proptest::collection::vec(0u16..12, 0..400),
        order in 1usize..6,
        bits in 3u32..10,
    ) {
        let seed = targets.first().copied().unwrap_or(0);
        let kernel = Kernel { order, table_bits: Some(bits) };
        prop_assert_eq!(kernel.hints(&targets, seed), reference(&targets, seed, order, bits));
    }

    /// Against contexts kept by their tokens (no hashing, no tables), on streams where
    /// no two windows share a key: the top token is the first to reach the highest
    /// count, the share f32(top)/f32(total).
    #[test]
    fn equal_to_contexts_kept_by_their_tokens(
        targets in proptest::collection::vec(0u16..6, 1..3000),
        order in 2usize..17,
    ) {
        let width = order - 1;
        let seed = targets[0];
        let stream: Vec<u16> = std::iter::once(seed).chain(targets.iter().copied()).collect();
        let mut keys = std::collections::HashMap::new();
        let mut pairs = std::collections::HashMap::new();
        for (i, w) in stream.windows(width).enumerate() {
            if *keys.entry(context_key(w)).or_insert(w) != w {
                return Ok(()); // two windows on one key: the reference's collision
            }
            if let Some(&y) = targets.get(i + width - 1) {
                let pair = (w, y);
                if *pairs.entry(pair_key(context_key(w), y, width)).or_insert(pair) != pair {
                    return Ok(()); // two pairs on one key
                }
            }
        }
        // context -> (seen, top count, top token, counts by token)
        type Context = (u32, u32, u16, std::collections::HashMap<u16, u32>);
        let mut contexts: std::collections::HashMap<&[u16], Context> = Default::default();
        let h = Kernel { order, table_bits: None }.hints(&targets, seed).unwrap();
        for i in (width - 1)..targets.len() {
            let window = &stream[i + 1 - width..=i];
            let y = targets[i];
            let (hint, share, seen) = match contexts.get(window) {
                Some(&(total, top, token, _)) => (token, top as f32 / total as f32, total),
                None => (0, 0.0, 0),
            };
            prop_assert_eq!((h.hint[i], h.share[i], h.seen[i]), (hint, share, seen), "target {}", i);
            let entry = contexts.entry(window).or_insert((0, 0, y, Default::default()));
            let c = {
                let count = entry.3.entry(y).or_insert(0);
                *count += 1;
                *count
            };
            entry.0 += 1;
            if c > entry.1 {
                entry.1 = c;
                entry.2 = y;
            }
        }
    }

    /// C1 and target independence: a target's hint is fixed before it and any later
    /// target are seen.
    #[test]
    fn a_hint_never_reads_its_target_or_later(
        targets in proptest::collection::vec(0u16..5, 20..400),
        at in 0usize..20,
        token in 0u16..5,
    ) {
        let kernel = Kernel { order: 4, table_bits: None };
        let a = kernel.hints(&targets, targets[0]).unwrap();
        let mut changed = targets.clone();
        let at = (at * targets.len() / 20).max(1);
        changed[at..].reverse();
        changed[at] = token;
        let b = kernel.hints(&changed, changed[0]).unwrap();
        prop_assert_eq!(&a.hint[..=at], &b.hint[..=at]);
        prop_assert_eq!(&a.share[..=at], &b.share[..=at]);
    }
}
