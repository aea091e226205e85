//! BPE training: learn merges from documents, with nanochat's (rustbpe's) exact semantics.
//!
//! 1. Split every document into pieces (pretokenize.rs) and count distinct pieces, in parallel.
//! 2. Each distinct piece becomes a "word": its bytes as ids 0..255, with the piece's count.
//! 3. Count adjacent pairs (every window: "aaa" holds the pair (a,a) twice), weighted by word count.
//! 4. Repeatedly take the pair with the largest count, ties toward the smallest (left, right) pair, give it
//!    id 256 + merge index, and replace its non-overlapping occurrences left to right in the words that hold
//!    it. Only those words are touched: a pair -> word-list index says where a pair may occur, and the pair
//!    counts are updated by the difference between each touched word's windows before and after.
//!
//! The priority queue is lazy: a pair's count only falls after the merge that creates it (every occurrence of
//! a pair involving a token appears in the merge that creates the token), so a popped entry whose stored
//! count is stale is pushed back with its current count; an entry popped with an up-to-date count is the
//! true maximum.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use super::pretokenize::SplitPattern;

pub type Pair = (u32, u32);

/// Count the distinct pieces of all documents (in parallel over documents).
pub fn count_pieces<'a, S: AsRef<str> + Sync>(docs: &'a [S], pattern: SplitPattern) -> FxHashMap<&'a str, i64> {
    docs.par_iter()
        .fold(FxHashMap::default, |mut counts: FxHashMap<&'a str, i64>, doc| {
            for piece in pattern.split(doc.as_ref()) {
                *counts.entry(piece).or_insert(0) += 1;
            }
            counts
        })
        .reduce(FxHashMap::default, |mut a, b| {
            let (mut big, small) = if a.len() >= b.len() {
                (a, b)
            } else {
                (b, std::mem::take(&mut a))
            };
            for (piece, n) in small {
                *big.entry(piece).or_insert(0) += n;
            }
            big
        })
}

/// Learn up to `num_merges` merges from `docs`. Returns the merged pairs in order (merge i makes id 256 + i).
/// Fewer merges come back only when no pair is left to merge.
pub fn train_merges<S: AsRef<str> + Sync>(docs: &[S], num_merges: usize, pattern: SplitPattern) -> Vec<Pair> {
    let counts = count_pieces(docs, pattern);
    // Sort the distinct pieces so that the word order (and so everything after) is deterministic.
    let mut pieces: Vec<(&str, i64)> = counts.into_iter().collect();
    pieces.sort_unstable();
    let words: Vec<Vec<u32>> = pieces.iter().map(|(p, _)| p.bytes().map(u32::from).collect()).collect();
    let word_counts: Vec<i64> = pieces.iter().map(|&(_, n)| n).collect();
    train_merges_from_words(words, &word_counts, num_merges)
}

/// The merge loop over distinct words and their counts.
pub fn train_merges_from_words(mut words: Vec<Vec<u32>>, word_counts: &[i64], num_merges: usize) -> Vec<Pair> {
    assert_eq!(words.len(), word_counts.len());
    let mut pair_counts: FxHashMap<Pair, i64> = FxHashMap::default();
    let mut pair_words: FxHashMap<Pair, Vec<u32>> = FxHashMap::default();
    for (w, ids) in words.iter().enumerate() {
        for win in ids.windows(2) {
            let pair = (win[0], win[1]);
            *pair_counts.entry(pair).or_insert(0) += word_counts[w];
            let list = pair_words.entry(pair).or_default();
            // A word may hold a pair many times; list it once (it is appended in word order).
            if list.last() != Some(&(w as u32)) {
                list.push(w as u32);
            }
        }
    }
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> = pair_counts
        .iter()
        .filter(|(_, &c)| c > 0)
        .map(|(&p, &c)| (c, Reverse(p)))
        .collect();

    let mut merges = Vec::with_capacity(num_merges.min(1 << 20)); // the count may be far more than possible
    let mut delta: FxHashMap<Pair, i64> = FxHashMap::default();
    let mut merged = Vec::new();
    while merges.len() < num_merges {
        let Some((stored, Reverse(pair))) = heap.pop() else {
            break;
        };
        let current = pair_counts.get(&pair).copied().unwrap_or(0);
        if current <= 0 {
            continue;
        }
        if current != stored {
            heap.push((current, Reverse(pair)));
            continue;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push(pair);

        delta.clear();
        let holders = pair_words.remove(&pair).unwrap_or_default();
        for &w in &holders {
            let w = w as usize;
            let ids = &words[w];
            if !merge_into(ids, pair, new_id, &mut merged) {
                continue;
            }
            let c = word_counts[w];
            for win in ids.windows(2) {
                *delta.entry((win[0], win[1])).or_insert(0) -= c;
            }
            for win in merged.windows(2) {
                let p = (win[0], win[1]);
                *delta.entry(p).or_insert(0) += c;
                // Pairs with the new token are new to this word; others were already listed for it.
                if p.0 == new_id || p.1 == new_id {
                    let list = pair_words.entry(p).or_default();
                    if list.last() != Some(&(w as u32)) {
                        list.push(w as u32);
                    }
                }
            }
            std::mem::swap(&mut words[w], &mut merged);
        }
        for (&p, &d) in &delta {
            if d == 0 {
                continue;
            }
            let c = pair_counts.entry(p).or_insert(0);
            *c += d;
            if d > 0 {
                heap.push((*c, Reverse(p)));
            }
        }
    }
    merges
}

/// Write `ids` with every non-overlapping occurrence of `pair` (left to right) replaced by `new_id` into
/// `out`. Returns false (and leaves `out` unspecified) when `pair` does not occur.
fn merge_into(ids: &[u32], pair: Pair, new_id: u32, out: &mut Vec<u32>) -> bool {
    out.clear();
    let mut found = false;
    let mut i = 0;
    while i < ids.len() {
        if i + 1 < ids.len() && ids[i] == pair.0 && ids[i + 1] == pair.1 {
            out.push(new_id);
            i += 2;
            found = true;
        } else {
            out.push(ids[i]);
            i += 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same merges by brute force: recount every pair of every word after each merge.
    fn brute_force(mut words: Vec<Vec<u32>>, counts: &[i64], num_merges: usize) -> Vec<Pair> {
        let mut merges = Vec::new();
        let mut out = Vec::new();
        for m in 0..num_merges {
            let mut pc: std::collections::BTreeMap<Pair, i64> = Default::default();
            for (w, ids) in words.iter().enumerate() {
                for win in ids.windows(2) {
                    *pc.entry((win[0], win[1])).or_insert(0) += counts[w];
                }
            }
            // Largest count; BTreeMap iterates pairs in ascending order, so the first maximum is the smallest.
            let Some((&best, _)) = pc
                .iter()
                .filter(|(_, &c)| c > 0)
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            else {
                break;
            };
            merges.push(best);
            for ids in words.iter_mut() {
                if merge_into(ids, best, 256 + m as u32, &mut out) {
                    std::mem::swap(ids, &mut out);
                }
            }
        }
        merges
    }

    #[test]
    fn incremental_matches_brute_force() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config {
            cases: 64,
            ..Config::default()
        });
        let words = proptest::collection::vec(proptest::collection::vec(0u32..4, 1..12), 1..30);
        let counts = proptest::collection::vec(1i64..5, 30);
        runner
            .run(&(words, counts), |(words, counts)| {
                let counts = &counts[..words.len()];
                let fast = train_merges_from_words(words.clone(), counts, 20);
                let slow = brute_force(words, counts, 20);
                prop_assert_eq!(fast, slow);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn ties_go_to_the_smallest_pair() {
        // "ab" and "cd" both occur twice; (97,98) < (99,100) so "ab" is merged first.
        let merges = train_merges(&["cd ab cd ab"], 2, SplitPattern::NANOCHAT);
        assert_eq!(merges[0], (b' ' as u32, b'a' as u32));
        let merges = train_merges(&["cdab"], 1, SplitPattern::NANOCHAT);
        assert_eq!(merges, vec![(b'a' as u32, b'b' as u32)]);
    }
}
