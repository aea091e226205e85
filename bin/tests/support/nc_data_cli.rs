//! nc-data as a user runs it, for the test files that drive it (nc_data.rs, download.rs): the command, and its
//! two tokenizer steps with the flags every such call passes. Each test file includes this file and uses some.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// `nc-data ARGS` with `env`: whether it succeeded, and its stdout then stderr. The caller's NC_DATA_BASE_URL
/// does not leak in; a test that wants one passes it in `env`.
pub fn nc_data(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nc-data"))
        .args(args)
        .env_remove("NC_DATA_BASE_URL")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A path as an argument (the tests' paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `nc-data train-tokenizer --input INPUTS --vocab-size VOCAB_SIZE --out OUT`, then `extra`.
pub fn train_tokenizer(inputs: &[&Path], vocab_size: usize, out: &Path, extra: &[&str]) -> (bool, String) {
    let vocab_size = vocab_size.to_string();
    let mut args = vec!["train-tokenizer", "--input"];
    args.extend(inputs.iter().map(|p| s(p)));
    args.extend(["--vocab-size", &vocab_size, "--out", s(out)]);
    args.extend_from_slice(extra);
    nc_data(&args, &[])
}

/// `nc-data tokenize --input INPUTS --tokenizer TOKENIZER --out OUT`, then `extra`.
pub fn tokenize(inputs: &[&Path], tokenizer: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["tokenize", "--input"];
    args.extend(inputs.iter().map(|p| s(p)));
    args.extend(["--tokenizer", s(tokenizer), "--out", s(out)]);
    args.extend_from_slice(extra);
    nc_data(&args, &[])
}
