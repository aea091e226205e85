//! The fuzz targets (nc_core::data::fuzz_targets) on stable Rust: over the seed corpus in `fuzz/seeds/`,
//! over every truncation and many random mutations of each seed, and over proptest-random bytes. Plus the
//! round trips decode(encode(s)) == s for any string.

use std::path::PathBuf;

use nc_core::data::fuzz_targets::{self, small_tokenizer};
use nc_core::data::pickle::load_tiktoken_pickle;
use nc_core::data::shard::parse_header;
use nc_core::data::synth::SplitMix64;
use proptest::prelude::*;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 6] = [
    ("shard_header", fuzz_targets::shard_header),
    ("tiktoken_ranks", fuzz_targets::tiktoken_ranks),
    ("tokenizer_files", fuzz_targets::tokenizer_files),
    ("pickle", fuzz_targets::pickle),
    ("decode", fuzz_targets::decode),
    ("encode", fuzz_targets::encode),
];

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds for {target}");
    out
}

fn mutate(rng: &mut SplitMix64, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len().max(1);
        match rng.below(4) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next_u64() as u8;
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.remove(i);
            }
            2 => {
                let i = rng.below(len);
                v.insert(i.min(v.len()), rng.next_u64() as u8);
            }
            _ if !v.is_empty() => {
                // Overwrite 4 bytes with an extreme value: lengths and counts are the interesting fields.
                let i = rng.below(v.len());
                let x = [0u32, 1, 0x7FFF_FFFF, 0xFFFF_FFFF, 255][rng.below(5)].to_le_bytes();
                for (k, b) in x.iter().enumerate() {
                    if i + k < v.len() {
                        v[i + k] = *b;
                    }
                }
            }
            _ => v.push(0),
        }
    }
    v
}

#[test]
fn seeds_truncations_and_mutations_never_panic() {
    let mut rng = SplitMix64::new(2024);
    for (name, target) in TARGETS {
        for (_, seed) in seeds(name) {
            target(&seed);
            let step = (seed.len() / 2000).max(1);
            for cut in (0..seed.len()).step_by(step) {
                target(&seed[..cut]);
            }
            for _ in 0..300 {
                target(&mutate(&mut rng, &seed));
            }
        }
    }
}

#[test]
fn valid_seeds_are_accepted() {
    for (name, seed) in seeds("pickle") {
        let tok = load_tiktoken_pickle(&seed).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(tok.vocab_size(), 259);
        assert_eq!(tok.encode("abcab"), vec![257, 256], "{name}");
    }
    for (name, seed) in seeds("shard_header") {
        assert!(parse_header(&seed, seed.len() as u64).is_ok(), "{name}");
    }
    // Errors say what is wrong.
    let e = load_tiktoken_pickle(b"\x80\x04K\x01.").unwrap_err();
    assert!(e.message.contains("not an object"), "{e}");
    let e = load_tiktoken_pickle(b"\x80\x04\x8c\x02osR.").unwrap_err();
    assert!(e.message.contains("stack underflow"), "{e}");
    let e = load_tiktoken_pickle(b"\x80\x04c os\nsystem\n\x8c\x02ls\x85R.").unwrap_err();
    assert!(e.message.contains("only _codecs.encode and bytes are allowed"), "{e}");
    let e = load_tiktoken_pickle(b"\x80\x04B\xff\xff\xff\x7f").unwrap_err();
    assert!(e.message.contains("truncated"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        for (_, target) in TARGETS {
            target(&data);
        }
    }

    #[test]
    fn decode_encode_round_trip(s in any::<String>()) {
        let tok = small_tokenizer();
        prop_assert_eq!(tok.decode(&tok.encode(&s)), s.clone());
        let with_bos = tok.encode_with_bos(&s);
        prop_assert_eq!(with_bos[0], tok.bos_id());
        prop_assert_eq!(tok.decode(&with_bos[1..]), s);
    }

    #[test]
    fn round_trip_on_text_like_strings(s in "[a-zA-Z0-9 \n\t'.,!?é日🙂<|>_]{0,80}") {
        let tok = small_tokenizer();
        prop_assert_eq!(tok.decode(&tok.encode_with_special(&s)), s.clone());
        prop_assert_eq!(tok.decode(&tok.encode(&s)), s);
    }
}
