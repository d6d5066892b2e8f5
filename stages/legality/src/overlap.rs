//! The `overlap` probe: how much of the val set the training data holds.
//!
//! Two Parameter Golf submissions were excluded because most of their val documents were
//! also in their training shards. A model that has seen a document scores it well
//! however legal its scorer is, so this is a question about the data, answered once per
//! (val, train) pair: every window of `window` tokens inside a val document is looked
//! for in the training data, and a document counts as occurring there when at least
//! `doc_share` of its windows do.
//!
//! It scales with the val set, not with the training data: the val windows are hashed
//! (a polynomial rolling hash) into a sorted table with a bucket index (about 36 bytes a
//! window while it is built, 20 after), and the training data streams past it in chunks,
//! each scanned in parallel, a hash hit confirmed token by token. The training data is
//! never held in memory: 8 billion tokens are 8 billion rolling-hash steps and lookups
//! against a table of the val set's size, read a chunk at a time.

use rayon::prelude::*;

/// The rolling hash's multiplier: odd, so that it is invertible modulo 2^64.
const BASE: u64 = 0x9E37_79B9_7F4A_7C15;

/// A token as the hash sees it: never zero, so leading zeros still count.
#[inline]
fn symbol(token: u16) -> u64 {
    token as u64 + 1
}

/// The hash of `window` tokens: Σ symbol(t_i)·BASE^(w−1−i), modulo 2^64.
fn hash_of(tokens: &[u16]) -> u64 {
    tokens
        .iter()
        .fold(0u64, |h, &t| h.wrapping_mul(BASE).wrapping_add(symbol(t)))
}

/// Every hash of `width` consecutive tokens of `tokens`, by rolling: `f(start, hash)`.
fn roll(tokens: &[u16], width: usize, mut f: impl FnMut(usize, u64)) {
    if tokens.len() < width {
        return;
    }
    let top = (1..width).fold(1u64, |p, _| p.wrapping_mul(BASE));
    let mut h = hash_of(&tokens[..width]);
    f(0, h);
    for start in 1..=tokens.len() - width {
        h = h
            .wrapping_sub(symbol(tokens[start - 1]).wrapping_mul(top))
            .wrapping_mul(BASE)
            .wrapping_add(symbol(tokens[start + width - 1]));
        f(start, h);
    }
}

/// The val set's windows, grouped by content: identical windows (boilerplate repeats)
/// are one group, looked up once.
pub struct ValWindows<'a> {
    val: &'a [u16],
    width: usize,
    /// Each window's first position in `val`, in stream order.
    pub starts: Vec<u32>,
    /// Each window's group.
    group_of: Vec<u32>,
    /// The groups sorted by hash: the hash and the start of one window of the group.
    group_hash: Vec<u64>,
    group_start: Vec<u32>,
    /// Where each bucket of hashes (by their top `bits` bits) starts in the groups.
    buckets: Vec<u32>,
    bits: u32,
}

impl<'a> ValWindows<'a> {
    /// The windows of `width` tokens lying inside one document (`doc` per token).
    pub fn new(val: &'a [u16], doc: &[u32], width: usize) -> ValWindows<'a> {
        assert!(width >= 1 && val.len() == doc.len() && val.len() < u32::MAX as usize);
        let mut starts = Vec::new();
        let mut hashes = Vec::new();
        let mut begin = 0;
        while begin < val.len() {
            let end = begin
                + doc[begin..]
                    .iter()
                    .take_while(|&&d| d == doc[begin])
                    .count();
            roll(&val[begin..end], width, |i, h| {
                starts.push((begin + i) as u32);
                hashes.push(h);
            });
            begin = end;
        }
        // Sorted by (hash, start): equal windows side by side, in stream order.
        let mut order: Vec<u32> = (0..starts.len() as u32).collect();
        order.par_sort_unstable_by_key(|&w| (hashes[w as usize], starts[w as usize]));
        let mut group_of = vec![0u32; starts.len()];
        let (mut group_hash, mut group_start) = (Vec::new(), Vec::<u32>::new());
        let mut run = 0;
        while run < order.len() {
            let h = hashes[order[run] as usize];
            let len = order[run..]
                .iter()
                .take_while(|&&w| hashes[w as usize] == h)
                .count();
            // Within one hash, a group per distinct content (a collision is two groups).
            let first_group = group_hash.len();
            for &w in &order[run..run + len] {
                let s = starts[w as usize] as usize;
                let window = &val[s..s + width];
                let same = (first_group..group_hash.len()).find(|&g| {
                    let t = group_start[g] as usize;
                    &val[t..t + width] == window
                });
                group_of[w as usize] = match same {
                    Some(g) => g as u32,
                    None => {
                        group_hash.push(h);
                        group_start.push(s as u32);
                        (group_hash.len() - 1) as u32
                    }
                };
            }
            run += len;
        }
        let bits = (usize::BITS - group_hash.len().max(1).leading_zeros()).clamp(8, 26);
        let mut buckets = vec![0u32; (1usize << bits) + 1];
        for &h in &group_hash {
            buckets[(h >> (64 - bits)) as usize + 1] += 1;
        }
        for b in 1..buckets.len() {
            buckets[b] += buckets[b - 1];
        }
        ValWindows {
            val,
            width,
            starts,
            group_of,
            group_hash,
            group_start,
            buckets,
            bits,
        }
    }

    pub fn windows(&self) -> usize {
        self.starts.len()
    }

    pub fn groups(&self) -> usize {
        self.group_hash.len()
    }

    /// The group whose content is `window` (hash `h`), if the val set has it.
    #[inline]
    fn find(&self, h: u64, window: &[u16]) -> Option<u32> {
        let b = (h >> (64 - self.bits)) as usize;
        let (from, to) = (self.buckets[b] as usize, self.buckets[b + 1] as usize);
        (from..to)
            .filter(|&g| self.group_hash[g] == h)
            .find(|&g| {
                let s = self.group_start[g] as usize;
                &self.val[s..s + self.width] == window
            })
            .map(|g| g as u32)
    }

    /// Marks in `found` every group that occurs in `train` (one contiguous piece of the
    /// training data); scanned in parallel, in slices that overlap by a window.
    pub fn scan(&self, train: &[u16], found: &mut [bool]) {
        if train.len() < self.width || self.group_hash.is_empty() {
            return;
        }
        let windows = train.len() - self.width + 1;
        let slice = windows
            .div_ceil(rayon::current_num_threads() * 4)
            .max(1 << 16);
        let hits: Vec<Vec<u32>> = (0..windows)
            .step_by(slice)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|first| {
                let last = (first + slice).min(windows);
                let piece = &train[first..last + self.width - 1];
                let mut hits = Vec::new();
                roll(piece, self.width, |i, h| {
                    if let Some(g) = self.find(h, &piece[i..i + self.width]) {
                        hits.push(g);
                    }
                });
                hits
            })
            .collect();
        for g in hits.into_iter().flatten() {
            found[g as usize] = true;
        }
    }

    /// Whether each window (in stream order) occurs, given the groups `found`.
    pub fn window_found<'b>(&'b self, found: &'b [bool]) -> impl Iterator<Item = bool> + 'b {
        self.group_of.iter().map(move |&g| found[g as usize])
    }
}

/// One val document's overlap with the training data.
#[derive(Debug, Clone, PartialEq)]
pub struct DocOverlap {
    pub doc: u32,
    pub windows: u64,
    pub found: u64,
}

impl DocOverlap {
    pub fn share(&self) -> f64 {
        self.found as f64 / self.windows.max(1) as f64
    }
}

/// Per document (those with at least one window), in stream order; `doc` is the val
/// stream's document column the windows were made from.
pub fn per_document(windows: &ValWindows, doc: &[u32], found: &[bool]) -> Vec<DocOverlap> {
    let mut docs: Vec<DocOverlap> = Vec::new();
    for (&start, hit) in windows.starts.iter().zip(windows.window_found(found)) {
        let doc = &doc[start as usize];
        match docs.last_mut() {
            Some(last) if last.doc == *doc => {
                last.windows += 1;
                last.found += hit as u64;
            }
            _ => docs.push(DocOverlap {
                doc: *doc,
                windows: 1,
                found: hit as u64,
            }),
        }
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<u16> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 54) as u16
            })
            .collect()
    }

    #[test]
    fn rolling_gives_each_windows_own_hash() {
        let tokens = lcg(500, 1);
        let mut n = 0;
        roll(&tokens, 64, |i, h| {
            assert_eq!(h, hash_of(&tokens[i..i + 64]));
            n += 1;
        });
        assert_eq!(n, 500 - 64 + 1);
    }

    #[test]
    fn the_documents_copied_into_train_are_found_and_no_others() {
        // Three val documents of 300 tokens; train holds document 1 whole and 40 tokens
        // of document 2 (less than a window), amid unrelated tokens.
        let val = lcg(900, 7);
        let doc: Vec<u32> = (0..900).map(|i| (i / 300) as u32).collect();
        let windows = ValWindows::new(&val, &doc, 64);
        assert_eq!(windows.windows(), 3 * (300 - 63));
        let mut train = lcg(100_000, 9);
        train[5_000..5_300].copy_from_slice(&val[300..600]);
        train[50_000..50_040].copy_from_slice(&val[600..640]);
        let mut found = vec![false; windows.groups()];
        windows.scan(&train, &mut found);
        let docs = per_document(&windows, &doc, &found);
        let shares: Vec<f64> = docs.iter().map(DocOverlap::share).collect();
        assert_eq!(shares, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn windows_across_a_documents_border_are_not_counted_and_repeats_are_one_group() {
        let mut val = lcg(200, 3);
        val.extend_from_within(0..100);
        let doc: Vec<u32> = (0..300).map(|i| (i / 100) as u32).collect();
        let windows = ValWindows::new(&val, &doc, 64);
        // Three documents of 100 tokens: 37 windows each; the third repeats the first.
        assert_eq!(windows.windows(), 3 * 37);
        assert_eq!(windows.groups(), 2 * 37);
        // The border of documents 0 and 1 in train matches nothing.
        let mut found = vec![false; windows.groups()];
        windows.scan(&val[40..160], &mut found);
        assert!(found.iter().all(|f| !f));
        windows.scan(&val[0..100], &mut found);
        let docs = per_document(&windows, &doc, &found);
        assert_eq!(
            docs.iter().map(|d| d.found).collect::<Vec<_>>(),
            vec![37, 0, 37]
        );
    }

    #[test]
    fn a_scan_in_parallel_slices_misses_no_window_at_a_slice_border() {
        let val = lcg(2_000, 11);
        let doc = vec![0u32; 2_000];
        let windows = ValWindows::new(&val, &doc, 64);
        // Train is 600k tokens (several slices) with the val stream at the end.
        let mut train = lcg(600_000, 5);
        let at = train.len() - 2_000;
        train[at..].copy_from_slice(&val);
        let mut found = vec![false; windows.groups()];
        windows.scan(&train, &mut found);
        assert!(found.iter().all(|&f| f));
    }
}
