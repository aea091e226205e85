//! `nc-data download` against a local HTTP server started by each test (no network): exact bytes, resuming,
//! riding out resets, truncated bodies and 5xx answers, failing at once on a 404, never leaving a partial file
//! under a final name, and downloaded files feeding `train-tokenizer` and `tokenize` as they are.

#[path = "support/nc_data_cli.rs"]
mod nc_data_cli;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nc_core::data::download::{download_shards, shard_name, DownloadConfig, Outcome, Quiet, Summary};
use nc_core::data::download_file::{lock_folder, LOCK_FILE};
use nc_core::data::download_retry::RetryPolicy;
use nc_core::data::list_shards;
use nc_core::data::prep::write_parquet_texts;
use nc_core::data::synth::documents;
use nc_data_cli::{nc_data, s, tokenize, train_tokenizer};
use support::http_server::{Fault, TestServer};

/// `n` real parquet shards in nanochat's layout (a `text` column, zstd), as (name, bytes).
fn make_shards(n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents(seed, 60_000 * n);
    let per = docs.len() / n;
    (0..n)
        .map(|i| {
            let name = shard_name(i);
            let path = dir.path().join(&name);
            write_parquet_texts(&path, &docs[i * per..(i + 1) * per], 64).unwrap();
            (name, std::fs::read(&path).unwrap())
        })
        .collect()
}

/// A test's setting: `n` shards made from `seed` (`make_shards`), a local server serving them, and an empty
/// temporary folder.
fn served(n: usize, seed: u64) -> (Vec<(String, Vec<u8>)>, TestServer, tempfile::TempDir) {
    let shards = make_shards(n, seed);
    let server = TestServer::start(&shards);
    (shards, server, tempfile::tempdir().unwrap())
}

/// Short waits and timeouts so failing attempts cost milliseconds.
fn fast_config(n: usize, out: &Path, server: &TestServer) -> DownloadConfig {
    let mut cfg = DownloadConfig::new(n, out.to_path_buf(), server.base_url.clone());
    cfg.workers = 3;
    cfg.retry = RetryPolicy {
        attempts: 5,
        base_delay: Duration::from_millis(2),
        max_delay: Duration::from_millis(20),
    };
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.read_timeout = Duration::from_secs(5);
    cfg
}

/// Every file in `dir` (names only, sorted) but the download's lock file.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != LOCK_FILE)
        .collect();
    names.sort();
    names
}

fn assert_exact(dir: &Path, shards: &[(String, Vec<u8>)]) {
    for (name, bytes) in shards {
        let got = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            got == *bytes,
            "{name}: {} bytes on disk, {} served",
            got.len(),
            bytes.len()
        );
    }
}

/// `nc-data download -n N --out OUT --base-url URL` with `extra` flags: (succeeded, stdout and stderr).
fn download(n: usize, out: &Path, base_url: &str, extra: &[&str]) -> (bool, String) {
    let n = n.to_string();
    let args = [
        &["download", "-n", &n, "--out", s(out), "--base-url", base_url][..],
        extra,
    ]
    .concat();
    nc_data(&args, &[])
}

#[test]
fn downloads_exact_bytes_and_a_second_run_fetches_nothing() {
    let (shards, server, dir) = served(5, 1);
    let cfg = fast_config(5, dir.path(), &server);

    let first = download_shards(&cfg, &Quiet).unwrap();
    assert_eq!((first.fetched(), first.skipped()), (5, 0), "{:?}", first.outcomes);
    assert_eq!(
        first.fetched_bytes(),
        shards.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
    );
    assert_exact(dir.path(), &shards);
    assert_eq!(
        listing(dir.path()),
        shards.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()
    );
    assert_eq!(server.gets().len(), 5);

    let second = download_shards(&cfg, &Quiet).unwrap();
    assert_eq!((second.fetched(), second.skipped()), (0, 5), "{:?}", second.outcomes);
    assert_eq!(server.gets().len(), 5, "the second run asked the server again");
    assert_exact(dir.path(), &shards);
}

#[test]
fn resets_truncation_corruption_and_5xx_are_survived_exactly() {
    let (shards, server, dir) = served(6, 2);
    let half = |i: usize| shards[i].1.len() / 2;
    server.queue(
        &shard_name(0),
        &[Fault::Status(500), Fault::Status(503), Fault::Status(429)],
    );
    server.queue(&shard_name(1), &[Fault::Reset { after: half(1) }]);
    server.queue(
        &shard_name(2),
        &[Fault::Truncate { after: half(2) }, Fault::Truncate { after: 10 }],
    );
    server.queue(&shard_name(3), &[Fault::TruncateNoLength { after: half(3) }]);
    server.queue(&shard_name(4), &[Fault::Garbage]);

    let summary = download_shards(&fast_config(6, dir.path(), &server), &Quiet).unwrap();
    assert!(summary.all_complete(), "{:?}", summary.outcomes);
    assert_eq!(summary.fetched(), 6);
    assert_exact(dir.path(), &shards);
    // Exactly one good attempt after the faults: the faults were seen and retried, nothing more.
    let attempts: Vec<usize> = (0..6).map(|i| server.gets_of(&shard_name(i))).collect();
    assert_eq!(attempts, [4, 2, 3, 2, 2, 1]);
    // No temporary file is left behind.
    assert_eq!(listing(dir.path()).len(), 6, "{:?}", listing(dir.path()));
}

#[test]
fn a_file_that_never_arrives_whole_is_never_under_its_final_name() {
    let (shards, server, dir) = served(4, 3);
    server.always(
        &shard_name(1),
        Fault::Truncate {
            after: shards[1].1.len() - 100,
        },
    );
    server.always(
        &shard_name(2),
        Fault::TruncateNoLength {
            after: shards[2].1.len() - 100,
        },
    );
    server.always(&shard_name(3), Fault::Garbage);
    let cfg = fast_config(4, dir.path(), &server);

    let summary = download_shards(&cfg, &Quiet).unwrap();
    assert!(!summary.all_complete());
    assert_eq!(summary.fetched(), 1);
    assert_eq!(
        listing(dir.path()),
        [shard_name(0)],
        "a partial or corrupt file was kept"
    );
    for i in 1..4 {
        assert_eq!(server.gets_of(&shard_name(i)), cfg.retry.attempts as usize);
    }
    // Each failure is one line naming the file, its URL and the last cause.
    let failures = summary.failures();
    assert_eq!(failures.len(), 3, "{failures:?}");
    let url1 = format!("{}/{}", server.base_url, shard_name(1));
    assert!(
        failures[0].starts_with(&shard_name(1))
            && failures[0].contains(&url1)
            && failures[0].contains(&format!(" of {} bytes", shards[1].1.len())),
        "{}",
        failures[0]
    );
    assert!(failures[1].contains("not readable parquet"), "{}", failures[1]);
    assert!(failures[2].contains("not readable parquet"), "{}", failures[2]);
    assert!(failures.iter().all(|f| !f.contains('\n')));

    // Once the server behaves, a re-run fetches just the missing files.
    for i in 1..4 {
        server.clear(&shard_name(i));
    }
    let again = download_shards(&cfg, &Quiet).unwrap();
    assert_eq!((again.fetched(), again.skipped()), (3, 1));
    assert_exact(dir.path(), &shards);
}

#[test]
fn a_corrupt_final_file_is_fetched_again_and_stale_temps_are_removed() {
    let (shards, server, dir) = served(3, 4);
    // A cut-off file under a final name (written by some other tool) and temporary files of a killed run.
    std::fs::write(dir.path().join(shard_name(1)), &shards[1].1[..shards[1].1.len() / 2]).unwrap();
    std::fs::write(dir.path().join("shard_00002.parquet.tmp"), b"half of something").unwrap();
    std::fs::write(dir.path().join("shard_00099.parquet.tmp"), b"from a bigger run").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"not ours").unwrap();

    let summary: Summary = download_shards(&fast_config(3, dir.path(), &server), &Quiet).unwrap();
    assert_eq!(summary.fetched(), 3, "{:?}", summary.outcomes);
    assert_eq!(summary.stale_temps_removed, 2);
    assert_exact(dir.path(), &shards);
    let mut expected: Vec<String> = shards.iter().map(|(n, _)| n.clone()).collect();
    expected.push("notes.txt".into());
    expected.sort();
    assert_eq!(listing(dir.path()), expected);
}

#[test]
fn a_404_fails_at_once_with_one_line_naming_the_file() {
    let (shards, server, dir) = served(3, 5);
    let out = dir.path().join("base_data");
    // shard_00003 does not exist on the server: it must be asked for once, not retried.
    let (ok, text) = download(4, &out, &server.base_url, &["--workers", "1", "--retry-delay-ms", "1"]);
    assert!(!ok, "{text}");
    assert_eq!(server.gets_of(&shard_name(3)), 1, "{text}");
    let lines: Vec<&str> = text
        .lines()
        // "HTTP 404", not "404": the server's port (in the first line's URL) may contain 404.
        .filter(|l| l.contains(&shard_name(3)) && l.contains("HTTP 404"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(text.contains("fetched 3") && text.contains("failed 1"), "{text}");
    assert!(!out.join(shard_name(3)).exists());
    assert_exact(&out, &shards);

    // A permanent failure stops the run: files after it are not started (here with one worker, in order).
    server.always(&shard_name(0), Fault::Status(404));
    let out2 = dir.path().join("second");
    let (ok, text) = download(3, &out2, &server.base_url, &["--workers", "1"]);
    assert!(!ok && text.contains("not started 2"), "{text}");
    // shard_00001 was asked for once, by the first run above; this run never asked.
    assert_eq!(server.gets_of(&shard_name(1)), 1, "{text}");

    // Asking for more shards than the dataset has names the maximum.
    let (ok, text) = nc_data(&["download", "-n", "1824", "--out", s(&out2)], &[]);
    assert!(!ok && text.contains("-n 1823 at most"), "{text}");
}

#[test]
fn downloaded_files_feed_train_tokenizer_and_tokenize_unchanged() {
    let (shards, server, dir) = served(3, 6);
    let base = dir.path().join("base_data");
    // The base URL from the environment variable this time.
    let (ok, text) = nc_data(
        &["download", "-n", "3", "--out", s(&base)],
        &[("NC_DATA_BASE_URL", &server.base_url)],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("fetched 3") && text.contains("skipped 0") && text.contains("failed 0"),
        "{text}"
    );
    assert!(
        text.contains("the last, shard_00002.parquet, is the validation shard"),
        "{text}"
    );
    assert_exact(&base, &shards);

    // The same shards written locally: the token shards made from both must be identical.
    let local = dir.path().join("local");
    std::fs::create_dir(&local).unwrap();
    for (name, bytes) in &shards {
        std::fs::write(local.join(name), bytes).unwrap();
    }
    let make = |src: &Path, data: &Path| -> Vec<PathBuf> {
        let inputs: Vec<PathBuf> = (0..3).map(|i| src.join(shard_name(i))).collect();
        let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
        let tok = data.join("tokenizer");
        let (ok, text) = train_tokenizer(&inputs[..2], 300, &tok, &[]);
        assert!(ok, "{text}");
        let out = data.join("shards");
        let (ok, text) = tokenize(&inputs, &tok, &out, &[]);
        assert!(ok, "{text}");
        assert!(text.contains("shards: "), "{text}");
        let mut files = list_shards(&out, "train").unwrap();
        files.extend(list_shards(&out, "val").unwrap());
        files
    };
    let from_download = make(&base, &dir.path().join("data_dl"));
    let from_local = make(&local, &dir.path().join("data_local"));
    assert!(from_download.iter().any(|p| p.to_string_lossy().contains("val_")));
    assert_eq!(from_download.len(), from_local.len());
    for (a, b) in from_download.iter().zip(&from_local) {
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), "{}", a.display());
    }
    assert_eq!(
        std::fs::read(dir.path().join("data_dl/tokenizer/tokenizer.tiktoken")).unwrap(),
        std::fs::read(dir.path().join("data_local/tokenizer/tokenizer.tiktoken")).unwrap()
    );

    // A second run finds everything complete and asks the server for nothing.
    let gets = server.gets().len();
    let (ok, text) = download(3, &base, &server.base_url, &[]);
    assert!(ok && text.contains("fetched 0") && text.contains("skipped 3"), "{text}");
    assert_eq!(server.gets().len(), gets);
}

#[test]
fn ctrl_c_mid_file_leaves_no_final_file_and_the_next_run_completes_it() {
    let (shards, server, dir) = served(1, 7);
    let half = shards[0].1.len() / 2;
    server.always(&shard_name(0), Fault::Stall { after: half });
    let out = dir.path().join("base_data");
    let temp = out.join("shard_00000.parquet.tmp");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nc-data"))
        .args(["download", "-n", "1", "--out", s(&out), "--base-url", &server.base_url])
        .env_remove("NC_DATA_BASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the body is coming in (the temporary file exists once the response headers are in).
    let t = Instant::now();
    while !(temp.exists() && server.gets_of(&shard_name(0)) == 1) {
        assert!(t.elapsed() < Duration::from_secs(20), "the download never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(!out.join(shard_name(0)).exists(), "a partial file got its final name");

    server.clear(&shard_name(0));
    let (ok, text) = download(1, &out, &server.base_url, &[]);
    assert!(ok && text.contains("fetched 1"), "{text}");
    assert_exact(&out, &shards);
    assert_eq!(
        listing(&out),
        [shard_name(0)],
        "the killed run's temporary file is still there"
    );
}

#[test]
fn a_second_download_into_the_same_folder_stops_at_once() {
    let (shards, server, dir) = served(1, 9);
    let held = lock_folder(dir.path()).unwrap();
    let (ok, text) = download(1, dir.path(), &server.base_url, &[]);
    assert!(!ok && text.contains("another nc-data download is writing to"), "{text}");
    assert!(server.gets().is_empty());
    drop(held);
    let (ok, text) = download(1, dir.path(), &server.base_url, &[]);
    assert!(ok, "{text}");
    assert_exact(dir.path(), &shards);
}

// An Outcome is what the summary line counts; keep the variants the tests rely on in view.
#[test]
fn outcomes_count_into_the_summary() {
    let s = Summary {
        outcomes: vec![
            Outcome::Fetched(10),
            Outcome::Skipped,
            Outcome::Failed("x".into()),
            Outcome::NotStarted,
            Outcome::Fetched(5),
        ],
        stale_temps_removed: 0,
    };
    assert_eq!(
        (s.fetched(), s.skipped(), s.not_started(), s.fetched_bytes()),
        (2, 1, 1, 15)
    );
    assert_eq!(s.failures(), ["x"]);
    assert!(!s.all_complete());
}

/// scripts/common.sh's `prepare_data N` run by bash against the test server (tiny vocabulary).
fn prepare_data(want: usize, parquet: &Path, data: &Path, server: &TestServer) -> (bool, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/common.sh");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source '{script}' && NC_DATA='{}' && prepare_data {want}",
            env!("CARGO_BIN_EXE_nc-data")
        ))
        .env("PARQUET_DIR", parquet)
        .env("DATA_DIR", data)
        .env("NC_DATA_BASE_URL", &server.base_url)
        .env("VOCAB_SIZE", "300")
        .env("TOKENIZER_SHARDS", "2")
        .env_remove("DOWNLOAD")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_run_scripts_download_what_they_need_before_tokenizing() {
    let (shards, server, dir) = served(6, 8);
    let parquet = dir.path().join("base_data");
    let data = dir.path().join("data");
    let stamp = data.join("shards/parquet_inputs.txt");

    // Empty folder, a run of 2 training shards: 3 are downloaded, the last for validation.
    let (ok, text) = prepare_data(2, &parquet, &data, &server);
    assert!(ok, "{text}");
    assert_eq!(server.gets().len(), 3, "{text}");
    assert!(
        text.contains("tokenizing 2 training shards and shard_00002.parquet for validation"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(&stamp).unwrap(),
        "asked=2\ntrain_files=2\ntrain_first=shard_00000.parquet\ntrain_last=shard_00001.parquet\nval=shard_00002.parquet\n"
    );
    assert_eq!(listing(&data), ["shards", "tokenizer"]);
    assert_exact(&parquet, &shards[..3]);

    // Again: everything is reused, nothing is asked of the server.
    let (ok, text) = prepare_data(2, &parquet, &data, &server);
    assert!(ok && text.contains("reusing token shards"), "{text}");
    assert_eq!(server.gets().len(), 3);

    // A run wanting more training data than the token shards hold stops and says what to do.
    let (ok, text) = prepare_data(4, &parquet, &data, &server);
    assert!(
        !ok && text.contains("this run wants 4") && text.contains("Move"),
        "{text}"
    );

    // Moved away: shards 3 and 4 are downloaded (0..2 kept), and the validation file is now shard_00004.
    std::fs::rename(data.join("shards"), dir.path().join("old_shards")).unwrap();
    let (ok, text) = prepare_data(4, &parquet, &data, &server);
    assert!(ok, "{text}");
    assert_eq!(server.gets().len(), 5, "{text}");
    assert!(std::fs::read_to_string(&stamp)
        .unwrap()
        .contains("val=shard_00004.parquet"));

    // A download that fails stops the script before any tokenizing.
    server.always(&shard_name(5), Fault::Status(404));
    let data2 = dir.path().join("data2");
    let (ok, text) = prepare_data(5, &parquet, &data2, &server);
    assert!(!ok && text.contains("failed: shard_00005.parquet"), "{text}");
    assert!(!data2.exists(), "{text}");
}
