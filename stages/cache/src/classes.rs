//! Equal windows of tokens, named by exact class ids, one width after another.
//!
//! The causal-normalised cache needs, for every window width w it uses and every end e,
//! the number of windows of width w ending before e that are equal to the one ending at e.
//! Comparing windows token by token is too slow, and hashing them is not exact. Instead,
//! every window that occurs at least twice gets a *class*: a u32 shared by exactly the
//! windows equal to it. The window of width w + k ending at e is the window of width k
//! ending at e − w followed by the window of width w ending at e, so its key is the pair
//! of their classes, 64 bits that identify it exactly. Counting those keys gives the next
//! width's ranks and classes, with no collisions to reason about.
//!
//! A window that occurs once has no class: every longer window ending at the same place
//! contains it, so it occurs once too, and its count of earlier equal windows stays 0.
//! Such ends are dropped (or, when they are few, carried as no key), and each width works
//! on fewer ends than the one before (on web text, most 16-token windows occur once).
//!
//! # Counting keys on every core
//! The keys are scattered into partitions by a hash, keeping their order within each
//! partition; each partition is counted with a small table that stays in cache, then the
//! ranks and classes are gathered back into the keys' order. Each pass runs in parallel
//! (over chunks of keys, or over partitions) and none depends on the thread count, so
//! the results are the same on any machine.

use rayon::prelude::*;

/// The class of a window that occurs only once (or of no window, before a width's first end).
pub(crate) const SINGLETON: u32 = u32::MAX;

/// Keys per chunk in the passes that walk keys in order.
const CHUNK: usize = 1 << 18;
/// At most 1,024 partitions: the scatter's write streams stay few, and a partition of the
/// 62M keys of a full width still has a table (2 MB) that fits in cache.
const MAX_PARTITION_BITS: u32 = 10;
/// Aim for partitions of about 2^16 keys.
const KEYS_PER_PARTITION_BITS: u32 = 16;

/// The windows of one width that occur at least twice in the stream, and perhaps a few
/// that do not, marked with the class SINGLETON (dropping them costs a pass).
pub(crate) struct Windows {
    pub width: usize,
    /// Their exclusive ends, ascending.
    pub ends: Vec<u32>,
    /// Their classes, parallel to `ends`.
    pub class: Vec<u32>,
}

/// One width's ranks: for each listed end, how many equal windows end before it. An end
/// not listed has none (its window occurs once, or the stream is too short for it).
pub(crate) struct Ranks<'a> {
    pub width: usize,
    pub ends: &'a [u32],
    pub ranks: &'a [u32],
}

/// The classes of a shorter width that a step puts in front of the windows it extends.
#[derive(Clone, Copy)]
pub(crate) enum Prefix<'a> {
    /// Width 1: a window of one token is its own class.
    Token(&'a [u16]),
    /// The classes of `width`, by end (SINGLETON where none).
    Classes { width: usize, by_end: &'a [u32] },
}

impl Prefix<'_> {
    pub fn width(&self) -> usize {
        match self {
            Prefix::Token(_) => 1,
            Prefix::Classes { width, .. } => *width,
        }
    }

    /// The class of the window of this width ending at `end` (which is ≥ the width).
    #[inline(always)]
    fn class_at(&self, end: usize) -> u32 {
        match self {
            Prefix::Token(tokens) => tokens[end - 1] as u32,
            Prefix::Classes { by_end, .. } => by_end[end],
        }
    }
}

impl Windows {
    /// Width 1: a token's class is the token. Also returns each listed end's rank.
    pub fn of_tokens(tokens: &[u16]) -> (Windows, Vec<u32>) {
        let mut totals = vec![0u32; 1 << 16];
        for &t in tokens {
            totals[t as usize] += 1;
        }
        let mut seen = vec![0u32; 1 << 16];
        let (mut ends, mut class, mut ranks) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &t) in tokens.iter().enumerate() {
            if totals[t as usize] >= 2 {
                ends.push(i as u32 + 1);
                class.push(t as u32);
                ranks.push(seen[t as usize]);
                seen[t as usize] += 1;
            }
        }
        let windows = Windows {
            width: 1,
            ends,
            class,
        };
        (windows, ranks)
    }

    /// The classes by end, SINGLETON where there is none: what a [`Prefix::Classes`]
    /// reads.
    pub fn by_end(&self, stream_len: usize) -> Vec<u32> {
        let mut by_end = vec![SINGLETON; stream_len + 1];
        for (&e, &c) in self.ends.iter().zip(&self.class) {
            by_end[e as usize] = c;
        }
        by_end
    }
}

/// Counts one width from the one before, reusing its buffers from width to width: fresh
/// ones would fault in about a gigabyte of new pages per width at 62M tokens.
#[derive(Default)]
pub(crate) struct Stepper {
    /// Each key's partition (SKIP: no key).
    partition: Vec<u16>,
    /// The keys scattered by partition, then each one's class and rank.
    runs: Vec<u64>,
    /// Where each chunk's partition segments start in its region of the runs.
    offsets: Vec<Vec<usize>>,
    ranks: Vec<u32>,
}

/// A window whose prefix part occurs once: it occurs once too, and is not counted.
const SKIP: u16 = u16::MAX;

impl Stepper {
    /// Extends `windows` by `prefix.width()` tokens, in place: hands `emit` the ranks of
    /// the longer windows, then keeps those that occur more than once.
    pub fn extend(&mut self, windows: &mut Windows, prefix: Prefix, emit: impl FnOnce(Ranks)) {
        let (width, first) = (windows.width + prefix.width(), first_end(windows, prefix));
        let pairs = match prefix {
            Prefix::Token(tokens) if windows.width == 1 => pair_table(tokens),
            _ => None,
        };
        match (prefix, pairs) {
            (Prefix::Token(tokens), Some(vocabulary)) => {
                self.count_pairs(windows, tokens, vocabulary, first)
            }
            _ => {
                let n = windows.ends.len() - first;
                self.scatter_and_count(&|i| key_at(windows, prefix, first + i), n);
                // The longer windows' classes replace the shorter ones' in place: every
                // key was made from its class before the gather.
                self.gather(Some(&mut windows.class[first..]));
            }
        }
        emit(Ranks {
            width,
            ends: &windows.ends[first..],
            ranks: &self.ranks,
        });
        windows.width = width;
        // Keep the windows that occur more than once. Where only a few occur once, they
        // stay, with the class SINGLETON, which makes them no key (see `key_at`): a pass
        // over every window costs more than carrying them.
        let once = windows.class[first..]
            .iter()
            .filter(|&&c| c == SINGLETON)
            .count();
        if once < (windows.ends.len() - first) / 8 {
            // The few too short for this width go the same way.
            windows.class[..first].fill(SINGLETON);
            return;
        }
        let mut kept = 0;
        for i in first..windows.ends.len() {
            if windows.class[i] != SINGLETON {
                windows.ends[kept] = windows.ends[i];
                windows.class[kept] = windows.class[i];
                kept += 1;
            }
        }
        windows.ends.truncate(kept);
        windows.class.truncate(kept);
        if windows.ends.capacity() > kept + kept / 4 + 1024 {
            windows.ends.shrink_to_fit();
            windows.class.shrink_to_fit();
        }
    }

    /// Width 2 from width 1 when the vocabulary is small: a pair of tokens indexes a
    /// table of every pair directly, and is its own class: two passes over a block per
    /// thread, and no scatter, for the width with the most windows.
    fn count_pairs(
        &mut self,
        windows: &mut Windows,
        tokens: &[u16],
        vocabulary: usize,
        first: usize,
    ) {
        let pairs = vocabulary * vocabulary;
        let n = windows.ends.len() - first;
        self.fit(n);
        self.ranks.resize(n, 0);
        let (ends, class) = (&windows.ends[first..], &mut windows.class[first..]);
        let pair =
            |e: u32, class: u32| tokens[e as usize - 2] as usize * vocabulary + class as usize;
        // One block per thread: each block's histogram, then, with the counts of the
        // blocks before it as a start, each block's ranks.
        let block = n.div_ceil(rayon::current_num_threads().max(1)).max(1);
        let histograms: Vec<Vec<u32>> = ends
            .par_chunks(block)
            .zip(class.par_chunks(block))
            .map(|(ends, class)| {
                let mut counts = vec![0u32; pairs];
                for (&e, &c) in ends.iter().zip(class) {
                    counts[pair(e, c)] += 1;
                }
                counts
            })
            .collect();
        let mut totals = vec![0u32; pairs];
        let mut before = Vec::with_capacity(histograms.len());
        for counts in histograms {
            before.push(totals.clone());
            totals.iter_mut().zip(&counts).for_each(|(t, c)| *t += c);
        }
        self.ranks
            .par_chunks_mut(block)
            .zip(ends.par_chunks(block))
            .zip(class.par_chunks_mut(block))
            .zip(before.into_par_iter())
            .for_each(|(((ranks, ends), class), mut seen)| {
                for ((rank, &e), c) in ranks.iter_mut().zip(ends).zip(class) {
                    let key = pair(e, *c);
                    *rank = seen[key];
                    seen[key] += 1;
                    *c = if totals[key] >= 2 {
                        key as u32
                    } else {
                        SINGLETON
                    };
                }
            });
    }

    /// The ranks of the windows `prefix.width()` tokens longer than `windows`, which are
    /// left as they are.
    pub fn beside(&mut self, windows: &Windows, prefix: Prefix, emit: impl FnOnce(Ranks)) {
        let (width, first) = (windows.width + prefix.width(), first_end(windows, prefix));
        self.scatter_and_count(
            &|i| key_at(windows, prefix, first + i),
            windows.ends.len() - first,
        );
        self.gather(None);
        emit(Ranks {
            width,
            ends: &windows.ends[first..],
            ranks: &self.ranks,
        });
    }

    /// Drops buffer capacity far beyond what `keys` keys need: the widths' windows thin
    /// out, and the memory is better given back than kept for a width that never comes.
    fn fit(&mut self, keys: usize) {
        // Shrunk in place (the allocator gives the tail's pages back), so the pages
        // kept are not faulted in again.
        fn shrink<T>(buffer: &mut Vec<T>, keys: usize) {
            if buffer.capacity() > keys + keys / 4 + 1024 {
                buffer.truncate(keys);
                buffer.shrink_to_fit();
            }
        }
        shrink(&mut self.runs, keys);
        shrink(&mut self.partition, keys);
        shrink(&mut self.ranks, keys);
    }

    /// Passes 1–3 over the keys `key_of(0..n)` (None: no key): partitions, scatter,
    /// count. The runs then hold each key's class and rank.
    ///
    /// The runs are laid out chunk by chunk, each chunk's keys grouped by partition, so
    /// that the scatter and the gather touch only their own chunk's few megabytes; a
    /// partition is its segments in every chunk, counted in chunk order, which is key
    /// order.
    fn scatter_and_count(&mut self, key_of: &(dyn Fn(usize) -> Option<u64> + Sync), n: usize) {
        self.fit(n);
        let bits = (n >> KEYS_PER_PARTITION_BITS)
            .next_power_of_two()
            .trailing_zeros()
            .min(MAX_PARTITION_BITS);
        let partitions = 1usize << bits;
        let partition_of = |key: u64| -> usize {
            if bits == 0 {
                0
            } else {
                (mix(key) >> (64 - bits)) as usize
            }
        };

        // Pass 1: each key's partition, and each chunk's partition sizes.
        self.partition.resize(n, 0);
        let histograms: Vec<Vec<usize>> = self
            .partition
            .par_chunks_mut(CHUNK)
            .enumerate()
            .map(|(chunk, ids)| {
                let mut sizes = vec![0usize; partitions];
                for (j, id) in ids.iter_mut().enumerate() {
                    *id = match key_of(chunk * CHUNK + j) {
                        Some(key) => {
                            let p = partition_of(key);
                            sizes[p] += 1;
                            p as u16
                        }
                        None => SKIP,
                    };
                }
                sizes
            })
            .collect();
        // Each chunk's partition segments, as offsets into its region of the runs (one
        // more than partitions: the last is the region's size).
        self.offsets = histograms
            .iter()
            .map(|sizes| {
                let mut offsets = Vec::with_capacity(partitions + 1);
                offsets.push(0);
                for size in sizes {
                    offsets.push(offsets.last().unwrap() + size);
                }
                offsets
            })
            .collect();
        let total: usize = self.offsets.iter().map(|o| o[partitions]).sum();
        if self.runs.capacity() < total {
            self.runs = crate::zeroed::zeroed_with_huge_pages(total);
        }
        self.runs.resize(total, 0);

        // Pass 2: scatter, each chunk into its own region.
        let (partition, offsets) = (&self.partition, &self.offsets);
        chunk_regions_mut(&mut self.runs, offsets)
            .into_par_iter()
            .enumerate()
            .for_each(|(chunk, region)| {
                let mut cursor = offsets[chunk][..partitions].to_vec();
                let ids = &partition[chunk * CHUNK..(chunk * CHUNK + CHUNK).min(n)];
                for (j, &id) in ids.iter().enumerate() {
                    if id != SKIP {
                        let slot = &mut cursor[id as usize];
                        region[*slot] = key_of(chunk * CHUNK + j).expect("a key in pass 1");
                        *slot += 1;
                    }
                }
            });

        // Pass 3: count each partition (its segments, in chunk order), replacing each
        // key by its class and rank. Classes are numbered from the partition's first
        // key's place in partition order, so they are unique and below n.
        let mut segments: Vec<Vec<&mut [u64]>> = (0..partitions).map(|_| Vec::new()).collect();
        for (region, offsets) in chunk_regions_mut(&mut self.runs, offsets)
            .into_iter()
            .zip(offsets)
        {
            let mut rest = region;
            for (p, segment) in segments.iter_mut().enumerate() {
                let (own, tail) = rest.split_at_mut(offsets[p + 1] - offsets[p]);
                segment.push(own);
                rest = tail;
            }
        }
        let mut first = 0usize;
        let numbered: Vec<(u32, Vec<&mut [u64]>)> = segments
            .into_iter()
            .map(|segments| {
                let start = first as u32;
                first += segments.iter().map(|s| s.len()).sum::<usize>();
                (start, segments)
            })
            .collect();
        numbered
            .into_par_iter()
            .for_each_init(Counter::default, |counter, (start, mut segments)| {
                counter.rank_and_classify(&mut segments, start)
            });
    }

    /// Pass 4: each key's rank (into `self.ranks`) and class (into `classes`, if given),
    /// back in key order; no key: rank 0 and SINGLETON.
    fn gather(&mut self, classes: Option<&mut [u32]>) {
        let n = self.partition.len();
        self.ranks.resize(n, 0);
        let (partition, offsets) = (&self.partition, &self.offsets);
        let regions = chunk_regions(&self.runs, offsets);
        let walk = |chunk: usize, ranks: &mut [u32], classes: Option<&mut [u32]>| {
            let (region, ids) = (regions[chunk], &partition[chunk * CHUNK..]);
            let mut cursor = offsets[chunk].clone();
            let mut classes = classes.map(|c| c.iter_mut());
            for (rank, &id) in ranks.iter_mut().zip(ids) {
                let (r, class) = if id == SKIP {
                    (0, SINGLETON)
                } else {
                    let slot = &mut cursor[id as usize];
                    let entry = region[*slot];
                    *slot += 1;
                    (entry as u32, (entry >> 32) as u32)
                };
                *rank = r;
                if let Some(classes) = classes.as_mut() {
                    *classes.next().expect("one class per key") = class;
                }
            }
        };
        match classes {
            Some(classes) => self
                .ranks
                .par_chunks_mut(CHUNK)
                .zip(classes.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(chunk, (ranks, classes))| walk(chunk, ranks, Some(classes))),
            None => self
                .ranks
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(chunk, ranks)| walk(chunk, ranks, None)),
        }
    }
}

/// The runs split into each chunk's region (the last of a chunk's offsets is its size).
fn chunk_regions<'a>(runs: &'a [u64], offsets: &[Vec<usize>]) -> Vec<&'a [u64]> {
    let mut rest = runs;
    offsets
        .iter()
        .map(|o| {
            let (region, tail) = rest.split_at(*o.last().unwrap());
            rest = tail;
            region
        })
        .collect()
}

/// [`chunk_regions`], to write.
fn chunk_regions_mut<'a>(runs: &'a mut [u64], offsets: &[Vec<usize>]) -> Vec<&'a mut [u64]> {
    let mut rest = runs;
    offsets
        .iter()
        .map(|o| {
            let (region, tail) = std::mem::take(&mut rest).split_at_mut(*o.last().unwrap());
            rest = tail;
            region
        })
        .collect()
}

/// The vocabulary's size (one more than the largest token) if every pair of tokens fits
/// a direct table of at most 2^22 counts (16 MB).
fn pair_table(tokens: &[u16]) -> Option<usize> {
    let vocabulary = tokens.iter().copied().max().map_or(0, |t| t as usize + 1);
    (vocabulary * vocabulary <= 1 << 22).then_some(vocabulary)
}

/// The index of the first window long enough to be extended by `prefix`.
fn first_end(windows: &Windows, prefix: Prefix) -> usize {
    let width = windows.width + prefix.width();
    windows.ends.partition_point(|&e| (e as usize) < width)
}

/// The key of window `i` extended by `prefix`: the prefix part's class, then the
/// window's own; None if either part occurs once.
#[inline(always)]
fn key_at(windows: &Windows, prefix: Prefix, i: usize) -> Option<u64> {
    let class = windows.class[i];
    if class == SINGLETON {
        return None;
    }
    let e = windows.ends[i] as usize;
    let left = prefix.class_at(e - windows.width);
    (left != SINGLETON).then_some((left as u64) << 32 | class as u64)
}

#[inline(always)]
fn mix(key: u64) -> u64 {
    (key ^ (key >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// One partition's distinct keys, cleared in O(1) between partitions by a generation
/// stamp: (key, local id, generation) per slot, and each local id's count.
#[derive(Default)]
struct Counter {
    slots: Vec<(u64, u32, u32)>,
    counts: Vec<u32>,
    generation: u32,
}

impl Counter {
    /// Replaces each key of the partition's `segments` (in key order) by
    /// (class << 32 | rank), classes numbered from `first`.
    fn rank_and_classify(&mut self, segments: &mut [&mut [u64]], first: u32) {
        let keys: usize = segments.iter().map(|s| s.len()).sum();
        let size = (2 * keys).next_power_of_two().max(16);
        if self.slots.len() < size {
            self.slots = vec![(0, 0, 0); size];
            self.generation = 0;
        }
        self.generation += 1;
        let (generation, mask) = (self.generation, size - 1);
        self.counts.clear();
        for entry in segments.iter_mut().flat_map(|s| s.iter_mut()) {
            let key = *entry;
            let mut i = mix(key) as usize & mask;
            let local = loop {
                let slot = &mut self.slots[i];
                if slot.2 != generation {
                    *slot = (key, self.counts.len() as u32, generation);
                    self.counts.push(0);
                    break slot.1;
                }
                if slot.0 == key {
                    break slot.1;
                }
                i = (i + 1) & mask;
            };
            let count = &mut self.counts[local as usize];
            *entry = (local as u64) << 32 | *count as u64;
            *count += 1;
        }
        for entry in segments.iter_mut().flat_map(|s| s.iter_mut()) {
            let local = (*entry >> 32) as u32;
            let class = if self.counts[local as usize] >= 2 {
                first + local
            } else {
                SINGLETON
            };
            *entry = (class as u64) << 32 | (*entry & 0xFFFF_FFFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Many partitions, some keys missing: each key's rank is the number of equal keys
    /// before it, and its class is shared by exactly the keys equal to it.
    #[test]
    fn ranks_and_classes_are_those_of_the_keys_in_order() {
        let mut stepper = Stepper::default();
        for n in [0usize, 1, 7, 1000, 300_000, 2_000] {
            let keys: Vec<Option<u64>> = (0..n as u64)
                .map(|i| (i % 11 != 3).then_some((i * 2_654_435_761 % 997) * (1 << 40) + i % 13))
                .collect();
            stepper.scatter_and_count(&|i| keys[i], n);
            let mut classes = vec![0u32; n];
            stepper.gather(Some(&mut classes));
            let ranks = stepper.ranks.clone();
            let mut totals: HashMap<u64, u32> = HashMap::new();
            for k in keys.iter().flatten() {
                *totals.entry(*k).or_default() += 1;
            }
            let mut seen: HashMap<u64, u32> = HashMap::new();
            let mut class_of: HashMap<u64, u32> = HashMap::new();
            let mut key_of: HashMap<u32, u64> = HashMap::new();
            for (i, key) in keys.iter().enumerate() {
                let Some(k) = *key else {
                    assert_eq!((ranks[i], classes[i]), (0, SINGLETON));
                    continue;
                };
                let rank = seen.entry(k).or_default();
                assert_eq!(ranks[i], *rank, "n {n} key {i}");
                *rank += 1;
                if totals[&k] == 1 {
                    assert_eq!(classes[i], SINGLETON);
                } else {
                    assert!((classes[i] as usize) < n);
                    assert_eq!(*class_of.entry(k).or_insert(classes[i]), classes[i]);
                    assert_eq!(*key_of.entry(classes[i]).or_insert(k), k);
                }
            }
        }
    }
}
