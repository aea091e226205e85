//! Re-tokenizing into a used folder: the folder holds the old set or the new set, never both, at every moment
//! the writer can be observed (its progress callback) and after it stops, whether it completes or fails; a
//! folder of another tokenizer's or split's shards, or of unrecorded ones, is refused unless told to replace it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nc_core::data::prep::{tokenize_to_shards, TokenizeOptions, ValSplit};
use nc_core::data::shard_set::MANIFEST_FILE;
use nc_core::data::synth::documents;
use nc_core::data::txt_docs::TxtDocs;
use nc_core::data::{list_shards, write_shard, Shard, Tokenizer};

/// Every file of a folder, by name, with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn decode_split(tok: &Tokenizer, dir: &Path, prefix: &str) -> String {
    let mut ids = Vec::new();
    for p in list_shards(dir, prefix).unwrap() {
        let s = Shard::open(&p, Some(tok.vocab_size())).unwrap();
        s.read_into(0, s.len(), &mut ids);
    }
    tok.decode(&ids)
}

fn with_bos(docs: &[String]) -> String {
    docs.iter().map(|d| format!("<|bos|>{d}")).collect()
}

/// A .txt input of `docs` as paragraphs.
fn txt_input(dir: &Path, name: &str, docs: &[String]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, docs.join("\n\n")).unwrap();
    p
}

fn opts(shard_tokens: usize, replace: bool) -> TokenizeOptions {
    TokenizeOptions {
        shard_tokens,
        split: ValSplit::LastDocs(5),
        txt: TxtDocs::Paragraph,
        replace,
    }
}

/// Whatever is beside `out` besides `out` itself (temporary folders left behind).
fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "shards" && !n.ends_with(".txt") && !n.ends_with(".parquet"))
        .collect()
}

#[test]
fn retokenizing_swaps_whole_sets_and_a_failure_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let old_docs = documents(1, 60_000);
    let new_docs = documents(2, 30_000);
    let tok = Tokenizer::train(&old_docs, 300).unwrap();
    let out = d.join("shards");
    let old_in = txt_input(d, "old.txt", &old_docs);
    let new_in = txt_input(d, "new.txt", &new_docs);

    // The old set: many small shards.
    tokenize_to_shards(&tok, &[old_in], &out, opts(2000, false), &|_| {}).unwrap();
    let old = snapshot(&out);
    let old_train = old.keys().filter(|n| n.starts_with("train_")).count();
    assert!(old_train > 4, "{:?}", old.keys());

    // The new set, fewer shards: while it is written the folder is the old set, byte for byte.
    let checks = std::cell::Cell::new(0);
    let (summary, replaced) = tokenize_to_shards(
        &tok,
        &[new_in.clone(), new_in.clone()],
        &out,
        opts(20_000, false),
        &|_| {
            let now = snapshot(&out);
            assert!(
                now == old,
                "the target changed before the new set was complete: {:?}",
                now.keys()
            );
            checks.set(checks.get() + 1);
        },
    )
    .unwrap();
    assert_eq!(checks.get(), 2);
    assert!(replaced.unwrap().contains("same tokenizer and split"));
    // After: exactly the new set (no old shard left beside it), which decodes to the new documents.
    let now = snapshot(&out);
    let mut expected_names: Vec<String> = (0..summary.train_shards).map(|i| format!("train_{i:06}.bin")).collect();
    expected_names.extend((0..summary.val_shards).map(|i| format!("val_{i:06}.bin")));
    expected_names.push(MANIFEST_FILE.to_string());
    expected_names.sort();
    assert_eq!(now.keys().cloned().collect::<Vec<_>>(), expected_names);
    assert!(summary.train_shards < old_train);
    let all: Vec<String> = new_docs.iter().chain(&new_docs).cloned().collect();
    let (train, val) = all.split_at(all.len() - 5);
    assert_eq!(decode_split(&tok, &out, "train"), with_bos(train));
    assert_eq!(decode_split(&tok, &out, "val"), with_bos(val));
    assert!(leftovers(d).is_empty(), "{:?}", leftovers(d));

    // A failure midway (the second input is not parquet): the folder keeps the set it had, nothing is left.
    let before = snapshot(&out);
    let bad = d.join("bad.parquet");
    std::fs::write(&bad, "not parquet").unwrap();
    let err = tokenize_to_shards(&tok, &[new_in.clone(), bad, new_in], &out, opts(1000, false), &|_| {}).unwrap_err();
    assert!(err.to_string().contains("bad.parquet"), "{err}");
    assert!(
        snapshot(&out) == before,
        "a failed run changed the target: {:?}",
        snapshot(&out).keys()
    );
    assert!(leftovers(d).is_empty(), "{:?}", leftovers(d));
}

#[test]
fn other_tokenizers_splits_and_unrecorded_shards_need_replace_and_other_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let docs = documents(3, 40_000);
    let tok = Tokenizer::train(&docs, 300).unwrap();
    let other_tok = Tokenizer::train(&docs, 290).unwrap();
    let input = txt_input(d, "in.txt", &docs);
    let out = d.join("shards");
    let inputs = [input];
    tokenize_to_shards(&tok, &inputs, &out, opts(5000, false), &|_| {}).unwrap();
    let old = snapshot(&out);

    // Another tokenizer: refused, unchanged; with replace, the new set.
    let err = tokenize_to_shards(&other_tok, &inputs, &out, opts(5000, false), &|_| {}).unwrap_err();
    assert!(
        err.to_string().contains("another tokenizer") && err.to_string().contains("--replace"),
        "{err}"
    );
    assert!(
        snapshot(&out) == old,
        "a refused run changed the target: {:?}",
        snapshot(&out).keys()
    );
    // Another split: refused, unchanged.
    let mut other_split = opts(5000, false);
    other_split.split = ValSplit::LastDocs(7);
    let err = tokenize_to_shards(&tok, &inputs, &out, other_split, &|_| {}).unwrap_err();
    assert!(err.to_string().contains("another split"), "{err}");
    assert!(
        snapshot(&out) == old,
        "a refused run changed the target: {:?}",
        snapshot(&out).keys()
    );
    tokenize_to_shards(&other_tok, &inputs, &out, opts(5000, true), &|_| {}).unwrap();
    let (train, _) = docs.split_at(docs.len() - 5);
    assert_eq!(decode_split(&other_tok, &out, "train"), with_bos(train));

    // Shards with no record (an older nc-data, by hand): refused unless replace.
    let bare = d.join("bare");
    std::fs::create_dir(&bare).unwrap();
    write_shard(&bare.join("train_000000.bin"), &[1, 2, 3], 300).unwrap();
    write_shard(&bare.join("train_000001.bin"), &[1, 2, 3], 300).unwrap();
    let bare_before = snapshot(&bare);
    let err = tokenize_to_shards(&tok, &inputs, &bare, opts(5000, false), &|_| {}).unwrap_err();
    assert!(
        err.to_string().contains("2 token shards with no tokenize.json"),
        "{err}"
    );
    assert!(snapshot(&bare) == bare_before, "{:?}", snapshot(&bare).keys());
    tokenize_to_shards(&tok, &inputs, &bare, opts(1_000_000, true), &|_| {}).unwrap();
    assert_eq!(list_shards(&bare, "train").unwrap().len(), 1);

    // Anything else in the folder: refused even with replace (the swap would take it away).
    let mixed = d.join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::write(mixed.join("notes.md"), "mine").unwrap();
    let err = tokenize_to_shards(&tok, &inputs, &mixed, opts(5000, true), &|_| {}).unwrap_err();
    assert!(err.to_string().contains("notes.md"), "{err}");
    assert_eq!(std::fs::read(mixed.join("notes.md")).unwrap(), b"mine");

    // A killed writer's temporary folder (its pid is not running) is removed by the next one.
    let stale = d.join(".shards.tokenizing-999999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("train_000000.bin"), "partial").unwrap();
    tokenize_to_shards(&tok, &inputs, &out, opts(5000, true), &|_| {}).unwrap();
    assert!(!stale.exists());
}
