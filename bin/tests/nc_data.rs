//! nc-data end to end: nanochat-layout parquet files (written here with the parquet crate), jsonl and txt.

use std::path::Path;
#[path = "support/nc_data_cli.rs"]
mod nc_data_cli;
use nc_data_cli::{nc_data, s, tokenize, train_tokenizer};

use nc_core::data::prep::{read_documents, write_parquet_texts};
use nc_core::data::synth::documents;
use nc_core::data::txt_docs::TxtDocs;
use nc_core::data::{list_shards, load_tokenizer, Shard};
use parquet::file::reader::{FileReader, SerializedFileReader};

fn all_tokens(paths: &[std::path::PathBuf], vocab: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for p in paths {
        let s = Shard::open(p, Some(vocab)).unwrap();
        s.read_into(0, s.len(), &mut out);
    }
    out
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
    assert_eq!(read_documents(&files[0], TxtDocs::Paragraph).unwrap(), a);

    let tokdir = dir.path().join("data/tokenizer");
    let shards = dir.path().join("data/shards");
    let (ok, out) = nc_data(
        &[
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
        ],
        &[],
    );
    assert!(ok, "{out}");
    assert!(out.contains("tokenizer: 400 tokens"), "{out}");
    let tok = load_tokenizer(&tokdir).unwrap();
    let (ok, out) = tokenize(
        &[&files[0], &files[1], &files[2]],
        &tokdir,
        &shards,
        &["--shard-tokens", "100000"],
    );
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
    let (ok, out) = nc_data(
        &["export-tiktoken", "--tokenizer", s(&tokdir), "--out", s(&exported)],
        &[],
    );
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
    let (ok, out) = train_tokenizer(&[&jsonl, &txt], 300, &tokdir, &[]);
    assert!(ok, "{out}");
    let shards = dir.path().join("shards");
    let (ok, out) = tokenize(&[&jsonl, &txt], &tokdir, &shards, &["--val-docs", "3"]);
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
    let fresh = dir.path().join("tok2");
    let (ok, out) = train_tokenizer(&[&bad], 300, &fresh, &[]);
    assert!(
        !ok && out.contains("bad.jsonl") && out.contains("line 2: no string field \"text\""),
        "{out}"
    );
    std::fs::write(dir.path().join("x.csv"), "a,b").unwrap();
    let (ok, out) = nc_data(
        &[
            "train-tokenizer",
            "--input",
            s(&dir.path().join("x.csv")),
            "--out",
            s(&fresh),
        ],
        &[],
    );
    assert!(!ok && out.contains("unknown input type"), "{out}");
    let notpq = dir.path().join("fake.parquet");
    std::fs::write(&notpq, "not parquet at all").unwrap();
    let (ok, out) = tokenize(&[&notpq], &tokdir, &shards, &[]);
    assert!(!ok && out.contains("fake.parquet") && out.contains("parquet"), "{out}");
    let (ok, out) = tokenize(&[&txt], &dir.path().join("none"), &shards, &[]);
    assert!(!ok && out.contains("nc-data train-tokenizer"), "{out}");
}

fn with_bos(docs: &[String]) -> String {
    docs.iter().map(|d| format!("<|bos|>{d}")).collect()
}

fn decode_split(tokdir: &Path, shards: &Path, prefix: &str) -> String {
    let tok = load_tokenizer(tokdir).unwrap();
    tok.decode(&all_tokens(&list_shards(shards, prefix).unwrap(), tok.vocab_size()))
}

#[test]
fn one_multi_paragraph_txt_file_becomes_a_training_and_a_validation_split() {
    let dir = tempfile::tempdir().unwrap();
    // Documents of one or more lines each, separated by blank lines.
    let docs = documents(7, 80_000);
    let book = dir.path().join("book.txt");
    std::fs::write(&book, docs.join("\n\n") + "\n").unwrap();
    let tokdir = dir.path().join("tok");
    let cap = 200;
    let cuts: Vec<usize> = docs.iter().map(|d| d.chars().count().saturating_sub(cap)).collect();
    let docs_cut = cuts.iter().filter(|&&c| c > 0).count();
    assert!(docs_cut > 0 && docs_cut < docs.len());
    let (ok, out) = train_tokenizer(&[&book], 300, &tokdir, &["--doc-cap", "200"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "read {} documents from 1 files (paragraph for .txt)",
            docs.len()
        )),
        "{out}"
    );
    let cut_line = format!(
        "--doc-cap 200 cut {docs_cut} documents, leaving out {} characters",
        cuts.iter().sum::<usize>()
    );
    assert!(out.contains(&cut_line), "{cut_line}\n{out}");

    let shards = dir.path().join("shards");
    let (ok, out) = tokenize(&[&book], &tokdir, &shards, &[]);
    assert!(ok, "{out}");
    // The default split of one input: its last 1% of documents.
    let n_val = (docs.len() / 100).max(1);
    let (train, val) = docs.split_at(docs.len() - n_val);
    assert!(
        out.contains(&format!("documents: {} train, {n_val} val", train.len())),
        "{out}"
    );
    assert_eq!(decode_split(&tokdir, &shards, "train"), with_bos(train));
    assert_eq!(decode_split(&tokdir, &shards, "val"), with_bos(val));
}

#[test]
fn folders_empty_inputs_and_used_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A folder: its .txt files sorted (a then b; b, the last, is validation), not its subfolder or notes.
    let corpus = d.join("corpus");
    std::fs::create_dir_all(corpus.join("sub")).unwrap();
    let (a, b) = (documents(21, 30_000), documents(22, 5_000));
    std::fs::write(corpus.join("b.txt"), b.join("\n\n")).unwrap();
    std::fs::write(corpus.join("a.txt"), a.join("\n\n")).unwrap();
    std::fs::write(corpus.join("sub/c.txt"), "not read").unwrap();
    std::fs::write(corpus.join("notes.md"), "not read").unwrap();
    let tokdir = d.join("tok");
    let (ok, out) = train_tokenizer(&[&corpus], 300, &tokdir, &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("2 input files (skipped 1 other files and 1 subfolders"),
        "{out}"
    );
    assert!(
        out.contains(&format!("read {} documents from 2 files", a.len() + b.len())),
        "{out}"
    );
    let shards = d.join("shards");
    // every tokenize of the corpus into `shards`, with the tokenizer TOK and EXTRA flags
    let tokenize_corpus = |tok: &Path, extra: &[&str]| tokenize(&[&corpus], tok, &shards, extra);
    let (ok, out) = tokenize_corpus(&tokdir, &[]);
    assert!(ok, "{out}");
    assert_eq!(decode_split(&tokdir, &shards, "train"), with_bos(&a));
    assert_eq!(decode_split(&tokdir, &shards, "val"), with_bos(&b));
    // Again with the same tokenizer and split: replaced, saying so.
    let (ok, out) = tokenize_corpus(&tokdir, &[]);
    assert!(ok && out.contains("(same tokenizer and split)"), "{out}");
    // Another tokenizer: refused, then replaced with --replace.
    let tok2 = d.join("tok2");
    let (ok, out) = train_tokenizer(&[&corpus], 290, &tok2, &[]);
    assert!(ok, "{out}");
    let (ok, out) = tokenize_corpus(&tok2, &[]);
    assert!(
        !ok && out.contains("another tokenizer") && out.contains("--replace"),
        "{out}"
    );
    assert_eq!(decode_split(&tokdir, &shards, "val"), with_bos(&b));
    let (ok, out) = tokenize_corpus(&tok2, &["--replace"]);
    assert!(ok, "{out}");
    assert_eq!(decode_split(&tok2, &shards, "val"), with_bos(&b));
    // A tokenizer is not overwritten without --replace.
    let (ok, out) = train_tokenizer(&[&corpus], 280, &tok2, &[]);
    assert!(!ok && out.contains("holds a tokenizer already"), "{out}");
    assert_eq!(load_tokenizer(&tok2).unwrap().vocab_size(), 290);

    // An input with no characters is an error naming it, and writes nothing.
    let empty = d.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let blank = d.join("blank.txt");
    std::fs::write(&blank, "\n  \n\n").unwrap();
    let none = d.join("none");
    let (ok, out) = train_tokenizer(&[&empty], 300, &none, &[]);
    assert!(!ok && out.contains("empty.txt: no text in it"), "{out}");
    let (ok, out) = tokenize(&[&blank], &tokdir, &none, &[]);
    assert!(!ok && out.contains("blank.txt: no text in it"), "{out}");
    assert!(!none.exists());
}
