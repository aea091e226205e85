//! The tokenizer: byte-level BPE with tiktoken's encoding semantics and nanochat's special tokens.
//!
//! Encoding a piece (see pretokenize.rs) follows tiktoken: a piece that is itself a token is that token;
//! otherwise start from its bytes and repeatedly join the adjacent two parts whose concatenation has the
//! lowest rank (leftmost on ties) until no concatenation is a token. Decoding concatenates token bytes and
//! replaces invalid UTF-8 as Python's `errors="replace"` does (Rust's lossy conversion follows the same
//! maximal-subpart rule).

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use super::bpe_train::{train_merges, Pair};
use super::pretokenize::SplitPattern;
use crate::bail;
use crate::error::Result;

/// nanochat's special tokens, appended after the merges in this order.
pub const SPECIAL_TOKENS: [&str; 9] = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
];

pub const BOS: &str = "<|bos|>";

/// Pieces longer than this (bytes) are merged with a heap instead of a scan.
const LONG_PIECE: usize = 64;

#[derive(Clone, Debug)]
pub struct Tokenizer {
    pattern: SplitPattern,
    /// Bytes of every id: mergeable tokens first (by rank), then the special tokens' text.
    id_bytes: Vec<Vec<u8>>,
    /// Number of mergeable tokens (ranks 0..num_ranks).
    num_ranks: usize,
    encoder: FxHashMap<Vec<u8>, u32>,
    /// Special token text -> id.
    specials: Vec<(String, u32)>,
    /// Byte length of every id; 0 for special tokens (they carry no text for bits-per-byte).
    token_bytes: Vec<u32>,
    bos_id: u32,
}

impl Tokenizer {
    /// Build from mergeable ranks (index = rank) and special tokens (text, id).
    /// Every single byte must be a token, ranks must be distinct, and `<|bos|>` must be among the specials.
    pub fn from_ranks(ranks: Vec<Vec<u8>>, specials: Vec<(String, u32)>, pattern: SplitPattern) -> Result<Tokenizer> {
        let num_ranks = ranks.len();
        let mut encoder: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        encoder.reserve(num_ranks);
        for (rank, bytes) in ranks.iter().enumerate() {
            if bytes.is_empty() {
                bail!("token {rank} is empty; every mergeable token must have at least one byte");
            }
            if let Some(prev) = encoder.insert(bytes.clone(), rank as u32) {
                bail!("tokens {prev} and {rank} have the same bytes {bytes:?}; ranks must be distinct");
            }
        }
        for b in 0..=255u8 {
            if !encoder.contains_key(&[b][..]) {
                bail!("byte {b} is not a token; a byte-level BPE vocabulary must contain all 256 single bytes");
            }
        }
        let vocab_size = num_ranks + specials.len();
        let mut id_bytes = ranks;
        id_bytes.resize(vocab_size, Vec::new());
        let mut token_bytes: Vec<u32> = id_bytes.iter().map(|b| b.len() as u32).collect();
        for (text, id) in &specials {
            let id = *id as usize;
            if id < num_ranks || id >= vocab_size || !id_bytes[id].is_empty() {
                bail!(
                    "special token {text:?} has id {id}; specials must take the ids {num_ranks}..{vocab_size} \
                     right after the {num_ranks} mergeable tokens, one each"
                );
            }
            if text.is_empty() {
                bail!("a special token has empty text");
            }
            id_bytes[id] = text.as_bytes().to_vec();
            token_bytes[id] = 0;
        }
        let Some(bos_id) = specials.iter().find(|(t, _)| t == BOS).map(|&(_, id)| id) else {
            bail!("the special token {BOS} is missing; nanochat's tokenizer starts every document with it");
        };
        Ok(Tokenizer {
            pattern,
            id_bytes,
            num_ranks,
            encoder,
            specials,
            token_bytes,
            bos_id,
        })
    }

    /// Build from learned merges (merge i made id 256 + i) plus nanochat's specials appended.
    pub fn from_merges(merges: &[Pair], pattern: SplitPattern) -> Result<Tokenizer> {
        let mut ranks: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for (i, &(a, b)) in merges.iter().enumerate() {
            let id = 256 + i;
            if a as usize >= id || b as usize >= id {
                bail!("merge {i} ({a}, {b}) refers to a token not yet defined (ids below {id} only)");
            }
            let mut bytes = ranks[a as usize].clone();
            bytes.extend_from_slice(&ranks[b as usize]);
            ranks.push(bytes);
        }
        Tokenizer::with_nanochat_specials(ranks, pattern)
    }

    /// `from_ranks` with nanochat's special tokens (`SPECIAL_TOKENS`) numbered right after the ranks.
    pub fn with_nanochat_specials(ranks: Vec<Vec<u8>>, pattern: SplitPattern) -> Result<Tokenizer> {
        let n = ranks.len() as u32;
        let specials = SPECIAL_TOKENS
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), n + i as u32))
            .collect();
        Tokenizer::from_ranks(ranks, specials, pattern)
    }

    /// Train on documents as nanochat does: `vocab_size` counts the 256 bytes, the merges and the 9 specials.
    pub fn train<S: AsRef<str> + Sync>(docs: &[S], vocab_size: usize) -> Result<Tokenizer> {
        let min = 256 + SPECIAL_TOKENS.len();
        if vocab_size < min {
            bail!(
                "vocab size {vocab_size} is too small: it must hold 256 bytes and {} special tokens",
                SPECIAL_TOKENS.len()
            );
        }
        if vocab_size > u32::MAX as usize {
            bail!("vocab size {vocab_size} does not fit in 32-bit token ids");
        }
        let pattern = SplitPattern::NANOCHAT;
        let merges = train_merges(docs, vocab_size - min, pattern);
        Tokenizer::from_merges(&merges, pattern)
    }

    pub fn vocab_size(&self) -> usize {
        self.id_bytes.len()
    }

    pub fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    pub fn pattern(&self) -> SplitPattern {
        self.pattern
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Special tokens (text, id), in id order.
    pub fn specials(&self) -> &[(String, u32)] {
        &self.specials
    }

    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.specials.iter().find(|(t, _)| t == text).map(|&(_, id)| id)
    }

    /// Byte length of every token id (0 for special tokens), for bits per byte.
    pub fn token_bytes(&self) -> &[u32] {
        &self.token_bytes
    }

    /// The bytes of a mergeable token or the text of a special token.
    pub fn id_to_bytes(&self, id: u32) -> Option<&[u8]> {
        self.id_bytes.get(id as usize).map(|b| b.as_slice())
    }

    /// The mergeable tokens' bytes, index = rank.
    pub fn ranks(&self) -> &[Vec<u8>] {
        &self.id_bytes[..self.num_ranks]
    }

    /// Encode text; special token text is treated as ordinary text (tiktoken's `encode_ordinary`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut out);
        out
    }

    /// Encode a document with `<|bos|>` first, as nanochat prepares pretraining data.
    pub fn encode_with_bos(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        out.push(self.bos_id);
        self.encode_into(text, &mut out);
        out
    }

    /// Append the tokens of `text` (ordinary encoding) to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let mut parts = Vec::new();
        for piece in self.pattern.split(text) {
            match self.encoder.get(piece.as_bytes()) {
                Some(&id) => out.push(id),
                None => self.byte_pair_merge(piece.as_bytes(), &mut parts, out),
            }
        }
    }

    /// Encode text in which special token text stands for the special token (tiktoken's
    /// `encode(text, allowed_special="all")`).
    pub fn encode_with_special(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        loop {
            // The leftmost special token occurrence (longest on a tie at the same position).
            let mut found: Option<(usize, usize, u32)> = None;
            for (s, id) in &self.specials {
                if let Some(pos) = rest.find(s.as_str()) {
                    let better = match found {
                        None => true,
                        Some((p, len, _)) => pos < p || (pos == p && s.len() > len),
                    };
                    if better {
                        found = Some((pos, s.len(), *id));
                    }
                }
            }
            match found {
                Some((pos, len, id)) => {
                    self.encode_into(&rest[..pos], &mut out);
                    out.push(id);
                    rest = &rest[pos + len..];
                }
                None => {
                    self.encode_into(rest, &mut out);
                    return out;
                }
            }
        }
    }

    /// Encode many documents across threads (each with `<|bos|>` first when `bos` is set).
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, docs: &[S], bos: bool) -> Vec<Vec<u32>> {
        docs.par_iter()
            .map(|d| {
                if bos {
                    self.encode_with_bos(d.as_ref())
                } else {
                    self.encode(d.as_ref())
                }
            })
            .collect()
    }

    fn rank_of(&self, bytes: &[u8]) -> u32 {
        self.encoder.get(bytes).copied().unwrap_or(u32::MAX)
    }

    /// tiktoken's merge of one piece that is not itself a token: join the adjacent pair of parts whose
    /// bytes have the lowest rank (leftmost on ties) until none is a token. Short pieces scan a small
    /// array; long ones (a run of thousands of letters is a single piece) use a heap, so that a long piece
    /// costs O(n log n) rather than O(n^2). Both give the same tokens.
    fn byte_pair_merge(&self, piece: &[u8], parts: &mut Vec<(usize, u32)>, out: &mut Vec<u32>) {
        if piece.len() > LONG_PIECE {
            self.byte_pair_merge_long(piece, out);
        } else {
            self.byte_pair_merge_short(piece, parts, out);
        }
    }

    /// `parts` is scratch space: (start byte, rank of the join of this part with the next one).
    fn byte_pair_merge_short(&self, piece: &[u8], parts: &mut Vec<(usize, u32)>, out: &mut Vec<u32>) {
        parts.clear();
        let n = piece.len();
        for i in 0..n {
            let rank = if i + 2 <= n {
                self.rank_of(&piece[i..i + 2])
            } else {
                u32::MAX
            };
            parts.push((i, rank));
        }
        parts.push((n, u32::MAX));
        // parts[i].1 is the rank of piece[parts[i].0 .. parts[i + 2].0].
        loop {
            let mut best = (u32::MAX, 0);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < best.0 {
                    best = (rank, i);
                }
            }
            if best.0 == u32::MAX {
                break;
            }
            let i = best.1;
            parts.remove(i + 1);
            parts[i].1 = self.join_rank(piece, parts, i);
            if i > 0 {
                parts[i - 1].1 = self.join_rank(piece, parts, i - 1);
            }
        }
        for w in parts.windows(2) {
            out.push(self.rank_of(&piece[w[0].0..w[1].0]));
        }
    }

    /// The same merge with a doubly linked list of parts and a min-heap of (rank, start, end) candidate
    /// joins; an entry is stale (skipped) once either of its parts has been joined to something else.
    fn byte_pair_merge_long(&self, piece: &[u8], out: &mut Vec<u32>) {
        use std::cmp::Reverse;
        let n = piece.len();
        // Part starting at byte i spans i..next[i]; prev[i] is the start of the part before it.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = std::collections::BinaryHeap::new();
        let push = |heap: &mut std::collections::BinaryHeap<_>, start: usize, end: usize| {
            let rank = self.rank_of(&piece[start..end]);
            if rank != u32::MAX {
                heap.push(Reverse((rank, start, end)));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, i, i + 2);
        }
        while let Some(Reverse((_, start, end))) = heap.pop() {
            let mid = next[start];
            if !alive[start] || mid >= n || next[mid] != end {
                continue;
            }
            // Join the part at `mid` into the part at `start`.
            alive[mid] = false;
            next[start] = end;
            if end < n {
                prev[end] = start;
                push(&mut heap, start, next[end]);
            }
            if start > 0 {
                push(&mut heap, prev[start], end);
            }
        }
        let mut i = 0;
        while i < n {
            out.push(self.rank_of(&piece[i..next[i]]));
            i = next[i];
        }
    }

    fn join_rank(&self, piece: &[u8], parts: &[(usize, u32)], i: usize) -> u32 {
        if i + 2 < parts.len() {
            self.rank_of(&piece[parts[i].0..parts[i + 2].0])
        } else {
            u32::MAX
        }
    }

    /// The bytes of a token sequence; an unknown id is an error.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            match self.id_bytes.get(id as usize) {
                Some(b) => out.extend_from_slice(b),
                None => bail!(
                    "token id {id} is out of range: the vocabulary has {} tokens",
                    self.vocab_size()
                ),
            }
        }
        Ok(out)
    }

    /// Decode to text; invalid UTF-8 and ids outside the vocabulary (a model may pad its vocabulary)
    /// become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            match self.id_bytes.get(id as usize) {
                Some(b) => bytes.extend_from_slice(b),
                None => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tokenizer() -> &'static Tokenizer {
        static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        TOK.get_or_init(|| {
            // Words glued together so that long pieces have many merges available.
            let docs: Vec<String> = crate::data::synth::documents(5, 100_000)
                .iter()
                .map(|d| d.replace(' ', ""))
                .collect();
            Tokenizer::train(&docs, 700).unwrap()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn long_piece_merge_equals_the_scan(s in "[a-zé]{1,300}|(thefox|isred|eats|berries|the|a|é){1,60}") {
            let tok = tokenizer();
            let (mut short, mut long, mut parts) = (Vec::new(), Vec::new(), Vec::new());
            tok.byte_pair_merge_short(s.as_bytes(), &mut parts, &mut short);
            if s.len() >= 2 {
                tok.byte_pair_merge_long(s.as_bytes(), &mut long);
                prop_assert_eq!(&long, &short);
            }
            prop_assert_eq!(tok.decode(&short), s);
        }
    }

    #[test]
    fn a_very_long_piece_encodes() {
        // One piece of 200k letters: quadratic merging would take minutes here.
        let s = "thefoxisredtheowleatsfish".repeat(8000);
        let tok = tokenizer();
        let ids = tok.encode(&s);
        assert!(ids.len() < s.len() / 2, "merges apply inside the long piece");
        assert_eq!(tok.decode(&ids), s);
    }
}
