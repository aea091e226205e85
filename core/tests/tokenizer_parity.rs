//! Parity with the reference implementations, through fixtures made by
//! `core/tests/fixtures/tokenizer/make_fixtures.py` (rustbpe for training, tiktoken for encoding and decoding,
//! Python's `regex` for the split, pickle for nanochat's tokenizer.pkl).

use std::path::PathBuf;

use nc_core::data::bpe_train::train_merges;
use nc_core::data::pickle::load_tiktoken_pickle;
use nc_core::data::pretokenize::SplitPattern;
use nc_core::data::tokenizer_files::{format_tiktoken_ranks, parse_tiktoken_ranks};
use nc_core::data::{load_tokenizer, save_tokenizer, Tokenizer};
use serde::Deserialize;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(name)
}

fn read_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn reference_ranks() -> Vec<Vec<u8>> {
    parse_tiktoken_ranks(&std::fs::read_to_string(fixture("rustbpe_ranks.tiktoken")).unwrap()).unwrap()
}

/// The tokenizer tiktoken used: rustbpe's ranks plus nanochat's specials.
fn reference_tokenizer() -> Tokenizer {
    Tokenizer::with_nanochat_specials(reference_ranks(), SplitPattern::NANOCHAT).unwrap()
}

/// A fixture's list of token ids.
fn ids(v: &Value) -> Vec<u32> {
    Vec::<u32>::deserialize(v).unwrap()
}

#[test]
fn training_matches_rustbpe_merge_for_merge() {
    let docs: Vec<String> = serde_json::from_value(read_json("docs.json")).unwrap();
    let expected = reference_ranks();
    let merges = train_merges(&docs, expected.len() - 256, SplitPattern::NANOCHAT);
    let ours = Tokenizer::from_merges(&merges, SplitPattern::NANOCHAT).unwrap();
    assert_eq!(ours.ranks().len(), expected.len());
    for (rank, (a, b)) in ours.ranks().iter().zip(&expected).enumerate() {
        assert_eq!(a, b, "rank {rank} differs from rustbpe");
    }
}

#[test]
fn split_matches_regex_on_tricky_strings() {
    let cases = read_json("split_cases.json");
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<&str> = case["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        let ours: Vec<&str> = SplitPattern::NANOCHAT.split(text).collect();
        assert_eq!(ours, expected, "split of {text:?}");
    }
}

#[test]
fn encoding_matches_tiktoken_on_tricky_strings() {
    let tok = reference_tokenizer();
    let cases = read_json("encode_cases.json");
    assert!(cases.as_array().unwrap().len() > 300);
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text), ids(&case["ordinary"]), "encode_ordinary({text:?})");
        assert_eq!(
            tok.encode_with_special(text),
            ids(&case["with_special"]),
            "encode({text:?}, allowed_special=all)"
        );
        assert_eq!(tok.decode(&tok.encode(text)), text);
    }
}

#[test]
fn decoding_matches_tiktoken_including_broken_utf8() {
    let tok = reference_tokenizer();
    let cases = read_json("decode_cases.json");
    let mut replaced = 0;
    for case in cases.as_array().unwrap() {
        let expected = case["text"].as_str().unwrap();
        assert_eq!(tok.decode(&ids(&case["ids"])), expected, "decode({})", case["ids"]);
        replaced += expected.contains('\u{FFFD}') as usize;
    }
    assert!(replaced > 10, "the fixture exercises invalid UTF-8 ({replaced} cases)");
}

#[test]
fn nanochat_pickles_import_to_the_same_tokenizer() {
    let reference = reference_tokenizer();
    for name in ["tokenizer.pkl", "tokenizer_p2.pkl"] {
        let tok = load_tiktoken_pickle(&std::fs::read(fixture(name)).unwrap()).unwrap();
        assert_eq!(tok.ranks(), reference.ranks(), "{name}");
        assert_eq!(tok.specials(), reference.specials(), "{name}");
        assert_eq!(tok.bos_id(), reference.bos_id());
        assert_eq!(tok.pattern(), SplitPattern::NANOCHAT);
    }
}

#[test]
fn tokenizer_directory_round_trip_and_pickle_directory() {
    let tok = reference_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    save_tokenizer(&tok, dir.path()).unwrap();
    let back = load_tokenizer(dir.path()).unwrap();
    assert_eq!(back.ranks(), tok.ranks());
    assert_eq!(back.specials(), tok.specials());
    assert_eq!(back.token_bytes(), tok.token_bytes());
    // The ranks file is exactly tiktoken's format, as rustbpe's ranks were written by Python.
    assert_eq!(
        format_tiktoken_ranks(&tok),
        std::fs::read_to_string(fixture("rustbpe_ranks.tiktoken")).unwrap()
    );
    // A directory with only nanochat's tokenizer.pkl loads through the importer.
    let nano = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("tokenizer.pkl"), nano.path().join("tokenizer.pkl")).unwrap();
    assert_eq!(load_tokenizer(nano.path()).unwrap().ranks(), tok.ranks());
    // Inconsistent byte lengths are caught.
    std::fs::write(dir.path().join("token_bytes.json"), "[1,2,3]").unwrap();
    let err = load_tokenizer(dir.path()).unwrap_err();
    assert!(err.message.contains("token_bytes.json"), "{err}");
}

#[test]
fn token_bytes_and_specials() {
    let tok = reference_tokenizer();
    let ranks = reference_ranks();
    assert_eq!(tok.vocab_size(), ranks.len() + 9);
    assert_eq!(tok.bos_id() as usize, ranks.len());
    for (id, &n) in tok.token_bytes().iter().enumerate() {
        let expected = if id >= tok.num_ranks() {
            0
        } else {
            ranks[id].len() as u32
        };
        assert_eq!(n, expected, "token {id}");
    }
    assert_eq!(tok.encode_with_bos("hi")[0], tok.bos_id());
}
