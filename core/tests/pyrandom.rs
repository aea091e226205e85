//! `eval::pyrandom::PyRandom` against CPython's `random.Random` on recorded outputs
//! (fixtures/core_eval/pyrandom.json, made by fixtures/core_eval/make_pyrandom.py): the raw MT19937 stream for
//! several seeds (one and two 32-bit key words, past the first twist), `shuffle`, and `sample` on both sides of
//! its pool/set threshold with the populations nanochat's few-shot draw uses.

use nc_core::eval::pyrandom::PyRandom;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The fixture's cases under `key` (each a JSON object with the fields of `T`).
fn cases<T: DeserializeOwned>(key: &str) -> Vec<T> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/core_eval/pyrandom.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Vec::<T>::deserialize(&fixture[key]).unwrap()
}

/// The first `values.len()` 32-bit outputs of CPython's generator seeded with `seed`.
#[derive(Deserialize)]
struct Stream {
    seed: u64,
    values: Vec<u32>,
}

/// `random.Random(seed).shuffle(list(range(n)))`.
#[derive(Deserialize)]
struct Shuffle {
    seed: u64,
    n: usize,
    result: Vec<usize>,
}

/// `random.Random(seed).sample(population, k)` with population `0..n` less `excluded` (a few-shot draw).
#[derive(Deserialize)]
struct Sample {
    seed: u64,
    n: usize,
    excluded: usize,
    k: usize,
    result: Vec<usize>,
}

#[test]
fn raw_stream_equals_cpython() {
    let cases: Vec<Stream> = cases("u32");
    assert_eq!(cases.len(), 7);
    for Stream { seed, values: want } in cases {
        let mut r = PyRandom::new(seed);
        let got: Vec<u32> = (0..want.len()).map(|_| r.getrandbits(32)).collect();
        assert_eq!(got, want, "seed {seed}");
    }
}

#[test]
fn shuffle_equals_cpython() {
    for Shuffle { seed, n, result } in cases("shuffle") {
        let mut x: Vec<usize> = (0..n).collect();
        PyRandom::new(seed).shuffle(&mut x);
        assert_eq!(x, result, "seed {seed} n {n}");
    }
}

#[test]
fn sample_equals_cpython_on_both_methods() {
    let cases: Vec<Sample> = cases("sample");
    assert_eq!(cases.len(), 12);
    for Sample {
        seed,
        n,
        excluded,
        k,
        result,
    } in cases
    {
        let population: Vec<usize> = (0..n).filter(|&i| i != excluded).collect();
        let got = PyRandom::new(seed).sample(&population, k);
        assert_eq!(got, result, "seed {seed} n {n} k {k}");
    }
}
