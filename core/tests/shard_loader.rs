//! Token shards (layout, bad files) and the loader (layout across ranks, resume, epochs, prefetch).

use std::path::{Path, PathBuf};

use nc_core::data::shard::{encode_shard, HEADER_BYTES, MAGIC_U16, MAGIC_U32};
use nc_core::data::{list_shards, write_shard, DataLoader, Shard};
use proptest::prelude::*;

fn write(dir: &Path, name: &str, tokens: &[u32], vocab: usize) -> PathBuf {
    let p = dir.join(name);
    write_shard(&p, tokens, vocab).unwrap();
    p
}

#[test]
fn layout_is_llm_c() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "a.bin", &[1, 2, 65535], 65536);
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(bytes.len(), 1024 + 6);
    assert_eq!(i32::from_le_bytes(bytes[0..4].try_into().unwrap()), 20240520);
    assert_eq!(i32::from_le_bytes(bytes[4..8].try_into().unwrap()), 1);
    assert_eq!(i32::from_le_bytes(bytes[8..12].try_into().unwrap()), 3);
    assert!(bytes[12..1024].iter().all(|&b| b == 0));
    assert_eq!(&bytes[1024..], &[1, 0, 2, 0, 255, 255]);
    // Larger vocabularies use the uint32 variant.
    let p = write(dir.path(), "b.bin", &[70000, 1], 100_000);
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(i32::from_le_bytes(bytes[0..4].try_into().unwrap()), 20240801);
    assert_eq!(i32::from_le_bytes(bytes[4..8].try_into().unwrap()), 7);
    let s = Shard::open(&p, Some(100_000)).unwrap();
    assert_eq!((s.len(), s.token(0), s.token(1), s.token_width()), (2, 70000, 1, 4));
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

fn open_err(bytes: &[u8], vocab: Option<usize>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad_shard.bin");
    std::fs::write(&p, bytes).unwrap();
    let e = Shard::open(&p, vocab).err().expect("a bad shard must not open").message;
    assert!(e.contains("bad_shard.bin"), "the error names the file: {e}");
    e
}

#[test]
fn bad_shards_give_clear_errors() {
    let good = encode_shard(&[5, 6, 7, 8], 2).unwrap();
    let mut wrong_magic = good.clone();
    wrong_magic[0..4].copy_from_slice(&1234i32.to_le_bytes());
    assert!(open_err(&wrong_magic, None).contains("bad magic 1234"));
    let mut wrong_version = good.clone();
    wrong_version[4..8].copy_from_slice(&7i32.to_le_bytes());
    assert!(open_err(&wrong_version, None).contains("version 7 does not go with magic"));
    assert!(open_err(&good[..good.len() - 1], None).contains("truncated"));
    assert!(open_err(&good[..100], None).contains("less than the 1024-byte header"));
    assert!(open_err(&[], None).contains("less than the 1024-byte header"));
    let mut extra = good.clone();
    extra.extend_from_slice(&[0, 0]);
    assert!(open_err(&extra, None).contains("says 4 tokens"));
    let mut empty = good[..HEADER_BYTES].to_vec();
    empty[8..12].copy_from_slice(&0i32.to_le_bytes());
    assert!(open_err(&empty, None).contains("no tokens"));
    assert!(open_err(&good, Some(8)).contains("token 3 is 8, outside the tokenizer's vocabulary of 8"));
    // A bad token far into a large shard (past the first scanning chunk) is found and located.
    let mut big: Vec<u32> = (0..200_000u32).map(|i| i % 1000).collect();
    big[150_001] = 1000;
    assert!(open_err(&encode_shard(&big, 2).unwrap(), Some(1000)).contains("token 150001 is 1000"));
    let dir = tempfile::tempdir().unwrap();
    let missing = Shard::open(&dir.path().join("nope.bin"), None).err().unwrap().message;
    assert!(
        missing.contains("nope.bin") && missing.contains("cannot open"),
        "{missing}"
    );
    // The writer refuses what the reader would reject.
    assert!(write_shard(&dir.path().join("e.bin"), &[], 10).is_err());
    assert!(encode_shard(&[70000], 2).is_err());
    assert_eq!((MAGIC_U16, MAGIC_U32), (20240520, 20240801));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn shard_round_trip(tokens in proptest::collection::vec(0u32..200_000, 1..300), small in any::<bool>()) {
        let vocab = if small { 65536 } else { 200_000 };
        let tokens: Vec<u32> = tokens.into_iter().map(|t| t % vocab as u32).collect();
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "s.bin", &tokens, vocab);
        let s = Shard::open(&p, Some(vocab)).unwrap();
        let mut back = Vec::new();
        s.read_into(0, s.len(), &mut back);
        prop_assert_eq!(back, tokens);
    }

    /// Any bytes: opening never panics, and what opens reads back consistently.
    #[test]
    fn arbitrary_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1100), header in any::<bool>()) {
        let mut bytes = bytes;
        if header && bytes.len() >= 12 {
            bytes[0..4].copy_from_slice(&MAGIC_U16.to_le_bytes());
            bytes[4..8].copy_from_slice(&1i32.to_le_bytes());
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(s) = Shard::open(&p, None) {
            prop_assert_eq!(HEADER_BYTES + 2 * s.len(), bytes.len());
        }
    }
}

/// Shards holding 0, 1, 2, ... so every token says where it came from.
fn counting_shards(dir: &Path, sizes: &[usize]) -> Vec<PathBuf> {
    let mut next = 0u32;
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let tokens: Vec<u32> = (next..next + n as u32).collect();
            next += n as u32;
            write(dir, &format!("train_{i:06}.bin"), &tokens, 1 << 20)
        })
        .collect()
}

#[test]
fn ranks_read_disjoint_consecutive_windows() {
    let dir = tempfile::tempdir().unwrap();
    let paths = counting_shards(dir.path(), &[100, 60]);
    let (b, t, world) = (2, 4, 3); // 24 tokens per step
    let mut loaders: Vec<DataLoader> = (0..world)
        .map(|r| DataLoader::new(&paths, r, world, b, t).unwrap())
        .collect();
    // Shard 0 (100 tokens) holds 4 steps (needs position + 25 <= 100 → positions 0, 24, 48, 72); shard 1
    // (tokens 100..160) holds 2 (positions 0, 24); then epoch 1 starts at shard 0 again.
    let starts = [0u32, 24, 48, 72, 100, 124, 0, 24];
    for (step, &start) in starts.iter().enumerate() {
        for (r, loader) in loaders.iter_mut().enumerate() {
            let batch = loader.next_batch();
            let first = start + (r * b * t) as u32;
            assert_eq!(
                batch.inputs,
                (first..first + 8).collect::<Vec<u32>>(),
                "step {step} rank {r}"
            );
            assert_eq!(
                batch.targets,
                (first as i32 + 1..first as i32 + 9).collect::<Vec<i32>>()
            );
            assert_eq!(batch.epoch, if step >= 6 { 1 } else { 0 });
            assert_eq!(batch.wrapped, step == 6, "step {step}");
        }
    }
}

#[test]
fn restore_continues_with_exactly_the_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    let paths = counting_shards(dir.path(), &[97, 41, 130]);
    let mut reference = DataLoader::new(&paths, 1, 2, 3, 5).unwrap();
    let expected: Vec<Vec<u32>> = (0..40).map(|_| reference.next_batch().inputs).collect();
    for cut in [0, 1, 5, 13, 27] {
        let mut a = DataLoader::new(&paths, 1, 2, 3, 5).unwrap();
        for _ in 0..cut {
            a.next_batch();
        }
        let state = a.state();
        // Through JSON, as a checkpoint stores it, into a fresh loader.
        let json = serde_json::to_string(&state).unwrap();
        let mut b = DataLoader::new(&paths, 1, 2, 3, 5).unwrap();
        b.next_batch(); // its own position must not matter
        b.restore(serde_json::from_str(&json).unwrap()).unwrap();
        for (i, exp) in expected.iter().enumerate().skip(cut).take(10) {
            assert_eq!(&b.next_batch().inputs, exp, "cut {cut}, batch {i}");
        }
    }
    // A state from another layout is refused.
    let other = DataLoader::new(&paths, 0, 1, 3, 5).unwrap().state();
    let err = reference.restore(other).unwrap_err();
    assert!(err.message.contains("resume with the same layout"), "{err}");
}

#[test]
fn validation_loader_restarts_and_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let paths = counting_shards(dir.path(), &[50]);
    let mut val = DataLoader::new(&paths, 0, 1, 2, 4).unwrap();
    let first: Vec<_> = (0..3).map(|_| val.next_batch().inputs).collect();
    val.reset();
    let again: Vec<_> = (0..3).map(|_| val.next_batch().inputs).collect();
    assert_eq!(first, again);
    assert_eq!(first[1][0], 8);
    // Too small for one step of all ranks: an error at start, not a hang.
    let err = DataLoader::new(&paths, 0, 4, 2, 8).err().unwrap().message;
    assert!(err.contains("needs 65 consecutive tokens"), "{err}");
    assert!(DataLoader::new(&[], 0, 1, 1, 1).is_err());
    assert!(DataLoader::new(&paths, 2, 2, 1, 1).is_err());
    assert_eq!(list_shards(dir.path(), "train").unwrap(), paths);
    assert!(list_shards(dir.path(), "val").unwrap().is_empty());
}

#[test]
fn in_memory_streams_and_small_parts_are_skipped() {
    let mut l = DataLoader::from_tokens(vec![vec![9; 3], (0..30).collect()], 0, 1, 1, 10).unwrap();
    assert_eq!(l.skipped_parts(), 1);
    assert_eq!(l.next_batch().inputs, (0..10).collect::<Vec<u32>>());
    assert_eq!(l.next_batch().inputs, (10..20).collect::<Vec<u32>>());
    let b = l.next_batch(); // 20..31 does not fit in 30 tokens: wrap
    assert!(b.wrapped && b.epoch == 1);
    assert_eq!(b.inputs, (0..10).collect::<Vec<u32>>());
}
