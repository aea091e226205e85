//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz, nightly). They live here so that stable tests
//! (`core/tests/fuzz_corpus.rs`) run the same code over the seed corpus and random bytes. Each must never
//! panic on any input; where an input is accepted, they check what must then hold.

use std::sync::OnceLock;

use super::pickle::load_tiktoken_pickle;
use super::pretokenize::SplitPattern;
use super::shard::{parse_header, HEADER_BYTES};
use super::tokenizer::Tokenizer;
use super::tokenizer_files::{format_tiktoken_ranks, parse_tiktoken_ranks, tokenizer_from_texts};

/// A shard header (and the file length the input implies).
pub fn shard_header(data: &[u8]) {
    if let Ok((width, count)) = parse_header(data, data.len() as u64) {
        assert!(width == 2 || width == 4);
        assert!(count > 0);
        assert_eq!(HEADER_BYTES + width * count, data.len());
    }
}

/// tiktoken's ranks text; what parses and makes a tokenizer writes back to the same ranks.
pub fn tiktoken_ranks(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(ranks) = parse_tiktoken_ranks(text) else { return };
    let specials = vec![(super::tokenizer::BOS.to_string(), ranks.len() as u32)];
    if let Ok(tok) = Tokenizer::from_ranks(ranks.clone(), specials, SplitPattern::NANOCHAT) {
        assert_eq!(parse_tiktoken_ranks(&format_tiktoken_ranks(&tok)).ok(), Some(ranks));
    }
}

/// A tokenizer directory's three files, given as one input split at 0xFF bytes (never in UTF-8).
pub fn tokenizer_files(data: &[u8]) {
    let mut parts = data.split(|&b| b == 0xFF);
    let (Some(meta), Some(ranks)) = (parts.next(), parts.next()) else {
        return;
    };
    let (Ok(meta), Ok(ranks)) = (std::str::from_utf8(meta), std::str::from_utf8(ranks)) else {
        return;
    };
    let token_bytes = parts.next().and_then(|b| std::str::from_utf8(b).ok());
    if let Ok(tok) = tokenizer_from_texts(meta, ranks, token_bytes) {
        assert_eq!(tok.token_bytes().len(), tok.vocab_size());
    }
}

/// nanochat's tokenizer.pkl importer.
pub fn pickle(data: &[u8]) {
    if let Ok(tok) = load_tiktoken_pickle(data) {
        assert!(tok.vocab_size() >= 257);
        assert!((tok.bos_id() as usize) < tok.vocab_size());
    }
}

/// A small fixed tokenizer for the decode and encode targets.
pub fn small_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let docs = super::synth::documents(11, 20_000);
        Tokenizer::train(&docs, 400).expect("a fixed, valid training run")
    })
}

/// Decoding arbitrary ids (pairs of bytes, some beyond the vocabulary).
pub fn decode(data: &[u8]) {
    let tok = small_tokenizer();
    let ids: Vec<u32> = data
        .chunks(2)
        .map(|c| c.iter().fold(0u32, |a, &b| (a << 8) | b as u32) % 512)
        .collect();
    let text = tok.decode(&ids);
    let valid = ids.iter().all(|&id| (id as usize) < tok.vocab_size());
    assert_eq!(tok.decode_bytes(&ids).is_ok(), valid);
    // Whatever text came out encodes and decodes back to itself (specials included, as text).
    assert_eq!(tok.decode(&tok.encode(&text)), text);
}

/// Encoding arbitrary text: pieces tile it, and decoding gives it back.
pub fn encode(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let pieces: String = SplitPattern::NANOCHAT.split(&text).collect();
    assert_eq!(pieces, text);
    let tok = small_tokenizer();
    assert_eq!(tok.decode(&tok.encode(&text)), text);
    assert_eq!(tok.decode(&tok.encode_with_special(&text)), text);
}
