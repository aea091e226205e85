//! The embedded corpus: deterministic generated text that a small model can learn on a CPU in a minute.
//!
//! Documents mix a few kinds of sentences with structure to pick up: fixed facts about animals (each
//! animal always has the same color, home and food, so the facts repeat and can be memorized), questions
//! and answers about those facts, small additions, subtractions and multiplications with correct results,
//! counting runs, and short two-sentence stories whose second sentence depends on the first. Everything
//! comes from a seeded SplitMix64, so the same seed gives the same bytes on every machine.

use std::path::Path;

use super::shard::write_shard;
use super::shard_set::{tokenizer_fingerprint, NewShardSet, SetIdentity, ShardManifest};
use super::tokenizer::Tokenizer;
use super::tokenizer_files::save_tokenizer;
use crate::error::Result;

/// SplitMix64: tiny, fast and fully specified, so the corpus never depends on a crate's RNG.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0); the modulo bias is irrelevant for text generation.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const ANIMALS: [&str; 16] = [
    "fox", "cat", "dog", "owl", "bear", "frog", "wolf", "duck", "goat", "horse", "mouse", "tiger", "whale", "sheep",
    "eagle", "rabbit",
];
const COLORS: [&str; 7] = ["red", "blue", "green", "brown", "white", "black", "yellow"];
const HOMES: [&str; 6] = ["forest", "river", "barn", "mountain", "meadow", "sea"];
const FOODS: [&str; 8] = [
    "apples", "fish", "seeds", "grass", "berries", "honey", "carrots", "bread",
];
const NAMES: [&str; 10] = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade"];
const NUMBER_WORDS: [&str; 13] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
];

// The fixed facts: animal i has color i*3 mod 7, home i*5 mod 6, food i*7 mod 8.
fn color_of(a: usize) -> &'static str {
    COLORS[(a * 3) % COLORS.len()]
}
fn home_of(a: usize) -> &'static str {
    HOMES[(a * 5) % HOMES.len()]
}
fn food_of(a: usize) -> &'static str {
    FOODS[(a * 7) % FOODS.len()]
}

fn sentence(rng: &mut SplitMix64, out: &mut String) {
    let a = rng.below(ANIMALS.len());
    let animal = ANIMALS[a];
    match rng.below(9) {
        0 => out.push_str(&format!("The {animal} is {}.", color_of(a))),
        1 => out.push_str(&format!("The {animal} lives in the {}.", home_of(a))),
        2 => out.push_str(&format!("The {} {animal} eats {}.", color_of(a), food_of(a))),
        3 => out.push_str(&format!("Q: What does the {animal} eat? A: {}.", food_of(a))),
        4 => out.push_str(&format!("Q: Where does the {animal} live? A: In the {}.", home_of(a))),
        5 => {
            let (x, y) = (rng.below(50), rng.below(50));
            if rng.below(2) == 0 {
                out.push_str(&format!("{x} + {y} = {}.", x + y));
            } else {
                let (hi, lo) = (x.max(y), x.min(y));
                out.push_str(&format!("{hi} - {lo} = {}.", hi - lo));
            }
        }
        6 => {
            let (x, y) = (rng.below(13), rng.below(13));
            out.push_str(&format!("{} times {} is {}.", NUMBER_WORDS[x], NUMBER_WORDS[y], x * y));
        }
        7 => {
            let start = rng.below(90);
            let len = 3 + rng.below(6);
            let run: Vec<String> = (start..start + len).map(|n| n.to_string()).collect();
            out.push_str(&format!("Counting: {}.", run.join(", ")));
        }
        _ => {
            let name = rng.pick(&NAMES);
            let n = 2 + rng.below(11);
            out.push_str(&format!(
                "{name} has {} {animal}s. {name} gives one away, so {name} has {} left.",
                NUMBER_WORDS[n],
                NUMBER_WORDS[n - 1]
            ));
        }
    }
}

/// One document: a few paragraphs of sentences.
pub fn document(rng: &mut SplitMix64) -> String {
    let mut doc = String::new();
    let paragraphs = 1 + rng.below(3);
    for p in 0..paragraphs {
        if p > 0 {
            doc.push('\n');
        }
        let sentences = 3 + rng.below(6);
        for s in 0..sentences {
            if s > 0 {
                doc.push(' ');
            }
            sentence(rng, &mut doc);
        }
    }
    doc
}

/// Documents from `seed` until they hold at least `chars` bytes of text.
pub fn documents(seed: u64, chars: usize) -> Vec<String> {
    let mut rng = SplitMix64::new(seed);
    let mut docs = Vec::new();
    let mut total = 0;
    while total < chars {
        let d = document(&mut rng);
        total += d.len();
        docs.push(d);
    }
    docs
}

/// How much embedded data to make.
#[derive(Clone, Copy, Debug)]
pub struct SynthConfig {
    /// Includes the 256 bytes and the 9 special tokens.
    pub vocab_size: usize,
    pub train_chars: usize,
    pub val_chars: usize,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            vocab_size: 512,
            train_chars: 1_200_000,
            val_chars: 120_000,
            seed: 42,
        }
    }
}

/// A ready dataset: the tokenizer (trained on the train documents) and both token streams, each document
/// starting with `<|bos|>`.
pub struct SynthData {
    pub tokenizer: Tokenizer,
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

pub fn synth_dataset(cfg: &SynthConfig) -> Result<SynthData> {
    let train_docs = documents(cfg.seed, cfg.train_chars);
    // A different seed for validation: same distribution, different documents.
    let val_docs = documents(cfg.seed ^ 0x0005_EED0_F7A1, cfg.val_chars);
    let tokenizer = Tokenizer::train(&train_docs, cfg.vocab_size)?;
    let train = tokenizer.encode_batch(&train_docs, true).concat();
    let val = tokenizer.encode_batch(&val_docs, true).concat();
    Ok(SynthData { tokenizer, train, val })
}

/// Write a dataset as a data directory: `DIR/tokenizer/` and `DIR/shards/{train,val}_000000.bin`. The shards
/// are a set swapped in whole (`shard_set`): shards of another tokenizer already there are refused unless
/// `replace`, and never left beside the new ones.
pub fn write_data_dir(data: &SynthData, dir: &Path, replace: bool) -> Result<()> {
    let identity = SetIdentity {
        tokenizer: tokenizer_fingerprint(&data.tokenizer),
        vocab_size: data.tokenizer.vocab_size(),
        split: "generated validation documents (nc-data synth)".into(),
    };
    let set = NewShardSet::begin(&dir.join("shards"), &identity, replace)?;
    let vocab = data.tokenizer.vocab_size();
    write_shard(&set.dir().join("train_000000.bin"), &data.train, vocab)?;
    write_shard(&set.dir().join("val_000000.bin"), &data.val, vocab)?;
    let mut manifest = ShardManifest::new(identity);
    (manifest.train_shards, manifest.val_shards) = (1, 1);
    (manifest.train_tokens, manifest.val_tokens) = (data.train.len(), data.val.len());
    save_tokenizer(&data.tokenizer, &dir.join("tokenizer"))?;
    set.commit(&manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_facts_are_consistent() {
        assert_eq!(documents(7, 5000), documents(7, 5000));
        assert_ne!(documents(7, 5000), documents(8, 5000));
        let text = documents(1, 200_000).concat();
        // Every stated color of the fox is its one color.
        let fox = color_of(0);
        assert!(text.contains(&format!("The fox is {fox}.")));
        for c in COLORS.iter().filter(|&&c| c != fox) {
            assert!(!text.contains(&format!("The fox is {c}.")), "fox stated as {c}");
        }
        // Arithmetic is right: check every "x + y = z." sentence.
        let mut checked = 0;
        for s in text.split(". ") {
            let w: Vec<&str> = s.trim_end_matches('.').split(' ').collect();
            if w.len() == 5 && w[1] == "+" && w[3] == "=" {
                let (x, y, z): (usize, usize, usize) =
                    (w[0].parse().unwrap(), w[2].parse().unwrap(), w[4].parse().unwrap());
                assert_eq!(x + y, z);
                checked += 1;
            }
        }
        assert!(checked > 100, "{checked}");
    }
}
