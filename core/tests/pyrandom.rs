//! `eval::pyrandom::PyRandom` against CPython's `random.Random` on recorded outputs
//! (fixtures/core_eval/pyrandom.json, made by fixtures/core_eval/make_pyrandom.py): the raw MT19937 stream for
//! several seeds (one and two 32-bit key words, past the first twist), `shuffle`, and `sample` on both sides of
//! its pool/set threshold with the populations nanochat's few-shot draw uses.

use nc_core::eval::pyrandom::PyRandom;
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/core_eval/pyrandom.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn as_usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn raw_stream_equals_cpython() {
    let f = fixture();
    let cases = f["u32"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let seed = case["seed"].as_u64().unwrap();
        let want: Vec<u32> = as_usizes(&case["values"]).into_iter().map(|x| x as u32).collect();
        let mut r = PyRandom::new(seed);
        let got: Vec<u32> = (0..want.len()).map(|_| r.getrandbits(32)).collect();
        assert_eq!(got, want, "seed {seed}");
    }
}

#[test]
fn shuffle_equals_cpython() {
    let f = fixture();
    for case in f["shuffle"].as_array().unwrap() {
        let (seed, n) = (case["seed"].as_u64().unwrap(), case["n"].as_u64().unwrap() as usize);
        let mut x: Vec<usize> = (0..n).collect();
        PyRandom::new(seed).shuffle(&mut x);
        assert_eq!(x, as_usizes(&case["result"]), "seed {seed} n {n}");
    }
}

#[test]
fn sample_equals_cpython_on_both_methods() {
    let f = fixture();
    let cases = f["sample"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let seed = case["seed"].as_u64().unwrap();
        let (n, idx, k) = (
            case["n"].as_u64().unwrap() as usize,
            case["excluded"].as_u64().unwrap() as usize,
            case["k"].as_u64().unwrap() as usize,
        );
        let population: Vec<usize> = (0..n).filter(|&i| i != idx).collect();
        let got = PyRandom::new(seed).sample(&population, k);
        assert_eq!(got, as_usizes(&case["result"]), "seed {seed} n {n} k {k}");
    }
}
