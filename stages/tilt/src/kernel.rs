//! The token-only n-gram hint kernel of #2135 (docs/eval-techniques.md §1), exact.
//!
//! Per target, from the prefix alone: the 15 tokens before it form a context, hashed to a
//! 64-bit key; the context's past continuations name a hint (the token that first reached
//! the context's highest count) and its share of them. The reference walks the stream once
//! with two open-addressing tables (contexts, and (context, token) pairs), which at 62M
//! targets is two random memory accesses per target into gigabytes of table.
//!
//! The walk is sequential per key, not per stream: a target's hint depends only on the
//! earlier targets with the same context key, and its pair count only on the earlier ones
//! with the same pair key. So the targets are scattered by key into partitions that keep
//! stream order (`scatter`), and each partition is walked on its own against a table
//! small enough for a core's cache, partitions side by side. The result is the
//! reference's, bit for bit: the reference compares full 64-bit keys, so where a key
//! lands in its table never changes a count (collisions of two contexts on one key do,
//! and they are kept: keys are the reference's).
//!
//! The one thing a slot layout decides is when a table is full: the reference never
//! evicts and aborts at the first insertion that finds no free slot. A table of 2^B slots
//! holds 2^B distinct keys, so the run fails at the target that brings the (2^B + 1)-th.

use rayon::prelude::*;

/// `C[0..31]`: context key coefficients (§1.2), oldest token first.
pub const COEFFICIENTS: [u64; 32] = [
    36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521,
    1048583, 1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243,
    2359319, 2490389, 2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973,
];
pub const PAIR_MIX: u64 = 1_000_003;
pub const TABLE_MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// #2135's order: a context is the 15 tokens before the target.
pub const ORDER: usize = 16;

/// The context key of a window (oldest token first): XOR of `w_j · C[j]`, wrapping.
pub fn context_key(window: &[u16]) -> u64 {
    window
        .iter()
        .zip(COEFFICIENTS)
        .fold(0, |key, (&w, c)| key ^ (w as u64).wrapping_mul(c))
}

/// The pair key of (context key, token) for contexts of `width` tokens.
pub fn pair_key(context: u64, token: u16, width: usize) -> u64 {
    context.wrapping_mul(PAIR_MIX) ^ (token as u64).wrapping_mul(COEFFICIENTS[width % 32])
}

/// The reference's slot for a key in a table of 2^bits slots (probing goes on by +1).
pub fn slot(key: u64, bits: u32) -> u64 {
    key.wrapping_mul(TABLE_MIX) & ((1u64 << bits) - 1)
}

/// The reference's table size for `targets` targets: B = min(28, max(12,
/// ceil(log2(floor(N / 0.55))))) (§1.3).
pub fn table_bits(targets: usize) -> u32 {
    let slots = (targets as f64 / 0.55).floor() as u64;
    let bits = if slots <= 1 {
        0
    } else {
        64 - (slots - 1).leading_zeros()
    };
    bits.clamp(12, 28)
}

/// Per target (aligned with the targets), the context's hint, its share and how many
/// times the context was seen before: (0, 0, 0) where the context is new or the window
/// is not yet full.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Hints {
    pub hint: Vec<u16>,
    pub share: Vec<f32>,
    pub seen: Vec<u32>,
}

/// The run stopped where the reference aborts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFull {
    /// The target whose insertion found no slot.
    pub target: usize,
    /// "context" or "pair".
    pub table: &'static str,
    pub bits: u32,
}

impl std::fmt::Display for TableFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} table (2^{} slots) is full at target {}: the reference aborts there",
            self.table, self.bits, self.target
        )
    }
}

/// The kernel's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kernel {
    /// Context length plus one (#2135: 16).
    pub order: usize,
    /// Table size in bits; `None`: the reference's rule for the stream's length.
    pub table_bits: Option<u32>,
}

impl Default for Kernel {
    fn default() -> Self {
        Kernel {
            order: ORDER,
            table_bits: None,
        }
    }
}

impl Kernel {
    /// The hints for `targets` (y_0 … y_{N−1}), the ring seeded with `seed` (#2135: y_0;
    /// #1145: s_0).
    pub fn hints(&self, targets: &[u16], seed: u16) -> Result<Hints, TableFull> {
        assert!(self.order >= 1 && self.order <= 33, "order in 1..=33");
        let n = targets.len();
        assert!(n < u32::MAX as usize, "targets fit u32");
        let mut out = Hints {
            hint: vec![0; n],
            share: vec![0.0; n],
            seen: vec![0; n],
        };
        if n == 0 {
            return Ok(out);
        }
        let width = self.order - 1;
        // Targets before `first` see a window that is not yet full: no hint, no update.
        let first = width.saturating_sub(1).min(n);
        let keys = window_keys(targets, seed, width, first);
        let bits = self.table_bits.unwrap_or_else(|| table_bits(n));
        let pair_of = |i: usize| pair_key(keys[i], targets[first + i], width);
        let (counts, distinct_pairs) = pair_counts(keys.len(), pair_of);
        let pair_full = (distinct_pairs > 1usize << bits)
            .then(|| {
                let pairs: Vec<u64> = (0..keys.len()).map(pair_of).collect();
                first_over(&pairs, distinct_pairs, bits)
            })
            .flatten();
        let walked = walk_contexts(keys, counts, &targets[first..]);
        // Only a stream longer than the tables hold: the keys again, to find where.
        let context_full = (walked.distinct > 1usize << bits)
            .then(|| {
                let keys = window_keys(targets, seed, width, first);
                first_over(&keys, walked.distinct, bits)
            })
            .flatten();
        // The reference inserts the pair before the context, at the same target.
        let full = match (pair_full, context_full) {
            (Some(p), Some(c)) if c < p => Some((c, "context")),
            (Some(p), _) => Some((p, "pair")),
            (None, Some(c)) => Some((c, "context")),
            (None, None) => None,
        };
        if let Some((i, table)) = full {
            return Err(TableFull {
                target: first + i,
                table,
                bits,
            });
        }
        out.hint[first..].copy_from_slice(&walked.hints.hint);
        out.share[first..].copy_from_slice(&walked.hints.share);
        out.seen[first..].copy_from_slice(&walked.hints.seen);
        Ok(out)
    }
}

/// The context key of each target from `first` on: the `width` tokens before it in the
/// stream [seed, y_0, y_1, …]. Blocks of targets, each coefficient applied across a block
/// at a time: the multiply-and-xor vectorises.
fn window_keys(targets: &[u16], seed: u16, width: usize, first: usize) -> Vec<u64> {
    let stream: Vec<u16> = std::iter::once(seed)
        .chain(targets.iter().copied())
        .collect();
    let mut keys = vec![0u64; targets.len() - first];
    const BLOCK: usize = 4096;
    keys.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(b, block)| {
            // Target i's window is stream[i + 1 − width ..= i].
            let start = first + b * BLOCK + 1 - width;
            for (j, &c) in COEFFICIENTS.iter().enumerate().take(width) {
                let tokens = &stream[start + j..start + j + block.len()];
                for (key, &t) in block.iter_mut().zip(tokens) {
                    *key ^= (t as u64).wrapping_mul(c);
                }
            }
        });
    keys
}

/// Partition of a key: its mixed high bits (the reference's slot mix, so that similar
/// keys spread; the low bits place it in the partition's table).
#[inline(always)]
fn partition_of(key: u64, bits: u32) -> usize {
    if bits == 0 {
        return 0;
    }
    (key.wrapping_mul(TABLE_MIX) >> (64 - bits)) as usize
}

/// How many partitions for `n` keys: about 16K keys each, so that a partition's table
/// (24 bytes a slot, twice the keys) stays in a core's L2 cache.
fn partition_bits(n: usize) -> u32 {
    let wanted = (n >> 14).max(1);
    (usize::BITS - (wanted - 1).leading_zeros()).min(14)
}

/// One target in a partition's run: its key, its token, and where it is in the stream.
#[derive(Debug, Clone, Copy, Default)]
struct Item {
    key: u64,
    index: u32,
    /// The pair count, for the context walk.
    count: u32,
    token: u16,
}

/// The items grouped by their key's partition, each partition in stream order (a
/// counting sort: stable), and where each partition starts (one more entry than
/// partitions). The walk then reads each run front to back.
fn scatter(n: usize, item: impl Fn(usize) -> Item + Sync, bits: u32) -> (Vec<Item>, Vec<usize>) {
    let partitions = 1usize << bits;
    // Two halves tallied side by side, then placed side by side: the second half's
    // cursors start where the first half's items of each partition end.
    let halves = [0..n / 2, n / 2..n];
    let tallies: Vec<Vec<usize>> = halves
        .par_iter()
        .map(|range| {
            let mut tally = vec![0usize; partitions];
            for i in range.clone() {
                tally[partition_of(item(i).key, bits)] += 1;
            }
            tally
        })
        .collect();
    let mut starts = vec![0usize; partitions + 1];
    let mut cursors = [vec![0usize; partitions], vec![0usize; partitions]];
    for p in 0..partitions {
        cursors[0][p] = starts[p];
        cursors[1][p] = starts[p] + tallies[0][p];
        starts[p + 1] = starts[p] + tallies[0][p] + tallies[1][p];
    }
    let mut items = vec![Item::default(); n];
    let out = SharedSlice::new(&mut items);
    halves
        .par_iter()
        .zip(cursors.par_iter_mut())
        .for_each(|(range, cursor)| {
            for i in range.clone() {
                let it = item(i);
                let p = partition_of(it.key, bits);
                // SAFETY: the cursors of the two halves cover disjoint ranges of `items`
                // (the tallies), each written once.
                unsafe { out.write(cursor[p], it) };
                cursor[p] += 1;
            }
        });
    (items, starts)
}

/// A slice that parallel workers write at indices no two of them share: the partitions
/// of a scatter, each stream index in exactly one.
struct SharedSlice<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: sharing it between threads only lets each write through `write`, whose caller
// guarantees that no two threads write the same index; `T: Send` lets the values cross.
unsafe impl<T: Send> Sync for SharedSlice<T> {}

impl<T> SharedSlice<T> {
    fn new(slice: &mut [T]) -> SharedSlice<T> {
        SharedSlice {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
        }
    }

    /// # Safety
    /// No other thread reads or writes `index` while this runs.
    #[inline(always)]
    unsafe fn write(&self, index: usize, value: T) {
        assert!(index < self.len);
        self.ptr.add(index).write(value);
    }
}

/// A slot of a partition's table: the full key, whether it is used, its value.
#[derive(Debug, Clone, Copy, Default)]
struct Slot<V> {
    key: u64,
    used: bool,
    value: V,
}

/// An open-addressing table from full keys to a value, sized for `n` keys: a
/// partition's own, small enough for the cache.
struct Local<V> {
    slots: Vec<Slot<V>>,
    mask: usize,
}

impl<V: Copy + Default> Local<V> {
    fn with_room(n: usize) -> Local<V> {
        let size = (2 * n).next_power_of_two().max(16);
        Local {
            slots: vec![Slot::default(); size],
            mask: size - 1,
        }
    }

    /// The key's value, and whether it was new (inserted as the default).
    #[inline(always)]
    fn entry(&mut self, key: u64) -> (&mut V, bool) {
        // The low bits of the mixed key: the high ones chose the partition.
        let mut s = key.wrapping_mul(TABLE_MIX) as usize & self.mask;
        loop {
            let slot = &self.slots[s];
            if !slot.used || slot.key == key {
                break;
            }
            s = (s + 1) & self.mask;
        }
        let slot = &mut self.slots[s];
        let new = !slot.used;
        if new {
            slot.used = true;
            slot.key = key;
        }
        (&mut slot.value, new)
    }
}

/// Each pair's count including itself (c in §1.5), and how many distinct pair keys.
fn pair_counts(n: usize, pair_of: impl Fn(usize) -> u64 + Sync) -> (Vec<u32>, usize) {
    let bits = partition_bits(n);
    let item = |i: usize| Item {
        key: pair_of(i),
        index: i as u32,
        count: 0,
        token: 0,
    };
    let (items, starts) = scatter(n, item, bits);
    let mut counts = vec![0u32; n];
    let out = SharedSlice::new(&mut counts);
    let distinct = starts
        .par_windows(2)
        .map(|w| {
            let run = &items[w[0]..w[1]];
            let mut table = Local::<u32>::with_room(run.len());
            let mut distinct = 0;
            for it in run {
                let (count, new) = table.entry(it.key);
                distinct += new as usize;
                *count += 1;
                // SAFETY: each stream index is in one partition's run, once.
                unsafe { out.write(it.index as usize, *count) };
            }
            distinct
        })
        .sum();
    (counts, distinct)
}

/// A context's state in the reference's table.
#[derive(Debug, Clone, Copy, Default)]
struct Context {
    total: u32,
    top_count: u32,
    top_token: u16,
}

struct Walked {
    hints: Hints,
    distinct: usize,
}

/// §1.5 per context key, in stream order within each: read the hint, then count.
fn walk_contexts(keys: Vec<u64>, counts: Vec<u32>, targets: &[u16]) -> Walked {
    let n = keys.len();
    let bits = partition_bits(n);
    let item = |i: usize| Item {
        key: keys[i],
        index: i as u32,
        count: counts[i],
        token: targets[i],
    };
    let (items, starts) = scatter(n, item, bits);
    drop((keys, counts));
    let mut hints = Hints {
        hint: vec![0; n],
        share: vec![0.0; n],
        seen: vec![0; n],
    };
    let (hint, share, seen) = (
        SharedSlice::new(&mut hints.hint),
        SharedSlice::new(&mut hints.share),
        SharedSlice::new(&mut hints.seen),
    );
    let distinct = starts
        .par_windows(2)
        .map(|w| {
            let run = &items[w[0]..w[1]];
            let mut table = Local::<Context>::with_room(run.len());
            let mut distinct = 0;
            for it in run {
                let i = it.index as usize;
                let (context, new) = table.entry(it.key);
                let (c, y) = (it.count, it.token);
                if new {
                    // Absent at lookup: the hint stays (0, 0.0).
                    distinct += 1;
                    *context = Context {
                        total: 1,
                        top_count: c,
                        top_token: y,
                    };
                    continue;
                }
                // SAFETY: each stream index is in one partition's run, once.
                unsafe {
                    hint.write(i, context.top_token);
                    share.write(i, context.top_count as f32 / context.total as f32);
                    seen.write(i, context.total);
                }
                context.total += 1;
                if c > context.top_count {
                    context.top_count = c;
                    context.top_token = y;
                }
            }
            distinct
        })
        .sum();
    Walked { hints, distinct }
}

/// Where a table of 2^bits slots overflows: the index of the first occurrence of the
/// (2^bits + 1)-th distinct key, when there are that many.
fn first_over(keys: &[u64], distinct: usize, bits: u32) -> Option<usize> {
    let capacity = 1usize << bits;
    if distinct <= capacity {
        return None;
    }
    let mut seen = std::collections::HashSet::with_capacity(capacity + 1);
    keys.iter()
        .position(|k| seen.insert(*k) && seen.len() > capacity)
}

#[cfg(test)]
mod tests;
