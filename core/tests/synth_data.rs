//! The embedded corpus as a ready dataset and as a data directory.

use nc_core::data::synth::documents;
use nc_core::data::{list_shards, load_tokenizer, synth_dataset, write_data_dir, DataLoader, Shard, SynthConfig};

#[test]
fn synth_dataset_is_ready_to_train_on_and_round_trips_through_a_data_dir() {
    let cfg = SynthConfig::default();
    let data = synth_dataset(&cfg).unwrap();
    let tok = &data.tokenizer;
    assert_eq!(tok.vocab_size(), cfg.vocab_size);
    assert!(
        data.train.len() > 200_000 && data.val.len() > 20_000,
        "{} {}",
        data.train.len(),
        data.val.len()
    );
    assert_eq!(data.train[0], tok.bos_id());
    // The streams decode back to exactly the generated documents, each after <|bos|>.
    let docs = documents(cfg.seed, cfg.train_chars);
    let expected: String = docs.iter().map(|d| format!("<|bos|>{d}")).collect();
    assert_eq!(tok.decode(&data.train), expected);
    // Deterministic.
    let again = synth_dataset(&cfg).unwrap();
    assert_eq!(again.train, data.train);
    assert_eq!(again.tokenizer.ranks(), tok.ranks());

    let dir = tempfile::tempdir().unwrap();
    write_data_dir(&data, dir.path(), false).unwrap();
    let loaded = load_tokenizer(&dir.path().join("tokenizer")).unwrap();
    assert_eq!(loaded.ranks(), tok.ranks());
    let shards = dir.path().join("shards");
    let train = list_shards(&shards, "train").unwrap();
    let val = list_shards(&shards, "val").unwrap();
    assert_eq!((train.len(), val.len()), (1, 1));
    let s = Shard::open(&train[0], Some(loaded.vocab_size())).unwrap();
    assert_eq!(s.len(), data.train.len());
    let mut loader = DataLoader::open(&val, Some(loaded.vocab_size()), 0, 1, 4, 64).unwrap();
    let b = loader.next_batch();
    assert_eq!(b.inputs, data.val[..256]);
}
