//! nc-data end to end: nanochat-layout parquet files (written here with the parquet crate), jsonl and txt.

use std::path::Path;
use std::process::Command;

use nc_core::data::prep::{read_documents, write_parquet_texts};
use nc_core::data::synth::documents;
use nc_core::data::{list_shards, load_tokenizer, Shard};
use parquet::file::reader::{FileReader, SerializedFileReader};

fn nc_data(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nc-data")).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn all_tokens(paths: &[std::path::PathBuf], vocab: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for p in paths {
        let s = Shard::open(p, Some(vocab)).unwrap();
        s.read_into(0, s.len(), &mut out);
    }
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn parquet_in_nanochat_layout_to_tokenizer_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents(3, 1_100_000);
    let (a, rest) = docs.split_at(1500);
    let (b, val) = rest.split_at(rest.len() - 200);
    let files: Vec<_> = [a, b, val]
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let p = dir.path().join(format!("shard_{i:05}.parquet"));
            write_parquet_texts(&p, part, 1024).unwrap();
            p
        })
        .collect();
    // The layout: row groups of 1024 documents, zstd, one column `text`.
    let meta = SerializedFileReader::new(std::fs::File::open(&files[0]).unwrap())
        .unwrap()
        .metadata()
        .clone();
    assert_eq!(meta.num_row_groups(), 2);
    assert_eq!(meta.row_group(0).num_rows(), 1024);
    assert_eq!(
        format!("{:?}", meta.row_group(0).column(0).compression())
            .split('(')
            .next()
            .unwrap(),
        "ZSTD"
    );
    assert_eq!(read_documents(&files[0]).unwrap(), a);

    let tokdir = dir.path().join("data/tokenizer");
    let shards = dir.path().join("data/shards");
    let (ok, out) = nc_data(&[
        "--threads",
        "2",
        "train-tokenizer",
        "--input",
        s(&files[0]),
        s(&files[1]),
        "--vocab-size",
        "400",
        "--out",
        s(&tokdir),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("tokenizer: 400 tokens"), "{out}");
    let tok = load_tokenizer(&tokdir).unwrap();
    let (ok, out) = nc_data(&[
        "tokenize",
        "--input",
        s(&files[0]),
        s(&files[1]),
        s(&files[2]),
        "--tokenizer",
        s(&tokdir),
        "--out",
        s(&shards),
        "--shard-tokens",
        "100000",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("documents: {} train, 200 val", a.len() + b.len())),
        "{out}"
    );

    // The last file is validation; every document is there with <|bos|> first, in order.
    let train = list_shards(&shards, "train").unwrap();
    let valp = list_shards(&shards, "val").unwrap();
    assert!(train.len() >= 3, "{train:?}");
    assert_eq!(Shard::open(&train[0], None).unwrap().len(), 100_000);
    let expected_train: String = a.iter().chain(b).map(|d| format!("<|bos|>{d}")).collect();
    assert_eq!(tok.decode(&all_tokens(&train, tok.vocab_size())), expected_train);
    let expected_val: String = val.iter().map(|d| format!("<|bos|>{d}")).collect();
    assert_eq!(tok.decode(&all_tokens(&valp, tok.vocab_size())), expected_val);
    assert!(out.contains("shards: "), "{out}");

    // Export to tiktoken's format.
    let exported = dir.path().join("ranks.tiktoken");
    let (ok, out) = nc_data(&["export-tiktoken", "--tokenizer", s(&tokdir), "--out", s(&exported)]);
    assert!(ok, "{out}");
    assert_eq!(
        std::fs::read(&exported).unwrap(),
        std::fs::read(tokdir.join("tokenizer.tiktoken")).unwrap()
    );
}

#[test]
fn jsonl_and_txt_inputs_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("docs.jsonl");
    let docs = documents(5, 60_000);
    let lines: Vec<String> = docs
        .iter()
        .map(|d| serde_json::json!({ "text": d, "id": 1 }).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let txt = dir.path().join("one.txt");
    std::fs::write(&txt, "A whole file is one document.\nEven with lines.").unwrap();
    let tokdir = dir.path().join("tok");
    let (ok, out) = nc_data(&[
        "train-tokenizer",
        "--input",
        s(&jsonl),
        s(&txt),
        "--vocab-size",
        "300",
        "--out",
        s(&tokdir),
    ]);
    assert!(ok, "{out}");
    let shards = dir.path().join("shards");
    let (ok, out) = nc_data(&[
        "tokenize",
        "--input",
        s(&jsonl),
        s(&txt),
        "--tokenizer",
        s(&tokdir),
        "--out",
        s(&shards),
        "--val-docs",
        "3",
    ]);
    assert!(ok, "{out}");
    let tok = load_tokenizer(&tokdir).unwrap();
    let val = all_tokens(&list_shards(&shards, "val").unwrap(), tok.vocab_size());
    let n = docs.len();
    let expected: String = [
        &docs[n - 2],
        &docs[n - 1],
        "A whole file is one document.\nEven with lines.",
    ]
    .map(|d| format!("<|bos|>{d}"))
    .concat();
    assert_eq!(tok.decode(&val), expected);

    // Errors name the file and the problem, and exit non-zero.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"body\": 1}\n").unwrap();
    let (ok, out) = nc_data(&[
        "train-tokenizer",
        "--input",
        s(&bad),
        "--vocab-size",
        "300",
        "--out",
        s(&tokdir),
    ]);
    assert!(
        !ok && out.contains("bad.jsonl") && out.contains("line 2: no string field \"text\""),
        "{out}"
    );
    let (ok, out) = nc_data(&[
        "train-tokenizer",
        "--input",
        s(&dir.path().join("x.csv")),
        "--out",
        s(&tokdir),
    ]);
    assert!(!ok && out.contains("unknown input type"), "{out}");
    let notpq = dir.path().join("fake.parquet");
    std::fs::write(&notpq, "not parquet at all").unwrap();
    let (ok, out) = nc_data(&[
        "tokenize",
        "--input",
        s(&notpq),
        "--tokenizer",
        s(&tokdir),
        "--out",
        s(&shards),
    ]);
    assert!(!ok && out.contains("fake.parquet") && out.contains("parquet"), "{out}");
    let (ok, out) = nc_data(&[
        "tokenize",
        "--input",
        s(&txt),
        "--tokenizer",
        s(&dir.path().join("none")),
        "--out",
        s(&shards),
    ]);
    assert!(!ok && out.contains("nc-data train-tokenizer"), "{out}");
}
