//! `nc-data download`: nanochat's pretraining data, the parquet shards of FineWeb-Edu as repackaged in
//! `karpathy/fineweb-edu-100b-shuffle` (`shard_00000.parquet` .. `shard_01822.parquet`, ~100 MB each, a `text`
//! column), fetched in parallel into nanochat's cache folder so an existing nanochat download is reused.
//!
//! Built to be left running for hours: files already complete are skipped (so a re-run resumes), every file
//! goes through a temporary name and is renamed only once complete and readable as parquet
//! (`download_file`), and failed attempts are retried with a bounded exponential backoff (`download_retry`).
//! As in nanochat, the last file of the folder is held out for validation.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::download_file::{commit, is_complete, lock_folder, remove_stale_temps, temp_path, CommitError};
use super::download_retry::{classify_status, sleep_unless_stopped, Failure, RetryPolicy};
use crate::error::{NcError, Result};

/// Where nanochat's `nanochat/dataset.py` downloads its shards from.
pub const DEFAULT_BASE_URL: &str = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main";
/// The highest shard index of the dataset (nanochat's `MAX_SHARD`): shards 0..=1822, 1,823 files.
pub const MAX_SHARD: usize = 1822;
/// The environment variable that replaces `DEFAULT_BASE_URL` (a mirror, a local copy); `--base-url` wins.
pub const BASE_URL_ENV: &str = "NC_DATA_BASE_URL";

/// The name of shard `index`, as nanochat names it.
pub fn shard_name(index: usize) -> String {
    format!("shard_{index:05}.parquet")
}

/// nanochat's folder for the shards: `$NANOCHAT_BASE_DIR/base_data`, by default `~/.cache/nanochat/base_data`.
pub fn default_out_dir() -> Result<PathBuf> {
    nanochat_subdir("base_data", "folder", "--out DIR")
}

/// nanochat's folder `sub`: `$NANOCHAT_BASE_DIR/<sub>`, by default `~/.cache/nanochat/<sub>`. With neither
/// variable set, an error naming the default `what` there is none of and the `flag` that names one.
pub fn nanochat_subdir(sub: &str, what: &str, flag: &str) -> Result<PathBuf> {
    if let Some(base) = std::env::var_os("NANOCHAT_BASE_DIR").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(base).join(sub));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache/nanochat").join(sub)),
        None => Err(NcError::new(format!(
            "HOME is not set, so there is no default {what}: pass {flag}"
        ))),
    }
}

/// The base URL to use: the flag, else `NC_DATA_BASE_URL`, else nanochat's. It must be http(s).
pub fn resolve_base_url(flag: Option<&str>) -> Result<String> {
    let env = std::env::var(BASE_URL_ENV).ok().filter(|v| !v.is_empty());
    let (url, from) = match (flag, env) {
        (Some(f), _) => (f.to_string(), "--base-url"),
        (None, Some(e)) => (e, BASE_URL_ENV),
        (None, None) => (DEFAULT_BASE_URL.to_string(), "the default"),
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(NcError::new(format!(
            "{from} `{url}` is not an http:// or https:// URL (it is the folder that holds shard_00000.parquet ...)"
        )));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// What to download and how.
#[derive(Debug, Clone)]
pub struct DownloadConfig {
    /// Shards 0..num_shards.
    pub num_shards: usize,
    /// Files fetched at once.
    pub workers: usize,
    pub out: PathBuf,
    /// The URL of the folder holding the shards, without a trailing slash.
    pub base_url: String,
    pub retry: RetryPolicy,
    /// Limit on opening a connection (TLS included) and on waiting for the response headers.
    pub connect_timeout: Duration,
    /// Limit on one read of the body: a connection that goes silent this long is given up and retried.
    pub read_timeout: Duration,
}

impl DownloadConfig {
    /// nanochat's dataset and defaults: 4 workers, the default retry policy, 30 s to connect, 60 s per read.
    pub fn new(num_shards: usize, out: PathBuf, base_url: String) -> Self {
        DownloadConfig {
            num_shards,
            workers: 4,
            out,
            base_url,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
        }
    }

    fn check(&self) -> Result<()> {
        if self.num_shards == 0 {
            return Err(NcError::new(
                "-n must be at least 1 (shards to download, the last one for validation)",
            ));
        }
        if self.num_shards > MAX_SHARD + 1 {
            return Err(NcError::new(format!(
                "-n {}: the dataset has {} shards ({} .. {}); use -n {} at most",
                self.num_shards,
                MAX_SHARD + 1,
                shard_name(0),
                shard_name(MAX_SHARD),
                MAX_SHARD + 1
            )));
        }
        if self.workers == 0 {
            return Err(NcError::new("--workers must be at least 1"));
        }
        if self.retry.attempts == 0 {
            return Err(NcError::new(
                "--retries must be at least 1 (it counts attempts, the first included)",
            ));
        }
        Ok(())
    }
}

/// What became of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Downloaded now; its size in bytes.
    Fetched(u64),
    /// Already complete on disk.
    Skipped,
    /// Given up; one line naming the file, the URL and the last cause.
    Failed(String),
    /// Not tried: an earlier file failed permanently (a 404 means the URL or -n is wrong), so the run stopped.
    NotStarted,
}

/// What the caller shows while files come in (the progress bar of `nc-data download`). Called from the
/// worker threads.
pub trait Progress: Sync {
    /// Bytes written for a file in flight; negative when a failed attempt's bytes are thrown away.
    fn bytes(&self, delta: i64);
    /// One file is done (fetched, skipped or failed).
    fn file_done(&self, name: &str, outcome: &Outcome);
    /// Something worth a line: a retry and its cause, a corrupt file being replaced.
    fn note(&self, line: &str);
}

/// A `Progress` that shows nothing (tests, scripts).
pub struct Quiet;

impl Progress for Quiet {
    fn bytes(&self, _: i64) {}
    fn file_done(&self, _: &str, _: &Outcome) {}
    fn note(&self, _: &str) {}
}

/// The result of a run: one outcome per shard, in shard order.
#[derive(Debug, Clone)]
pub struct Summary {
    pub outcomes: Vec<Outcome>,
    /// Temporary files of an earlier, killed run that were removed first.
    pub stale_temps_removed: usize,
}

impl Summary {
    pub fn fetched(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Fetched(_)))
            .count()
    }
    pub fn skipped(&self) -> usize {
        self.outcomes.iter().filter(|o| matches!(o, Outcome::Skipped)).count()
    }
    pub fn not_started(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::NotStarted))
            .count()
    }
    pub fn fetched_bytes(&self) -> u64 {
        self.outcomes
            .iter()
            .map(|o| if let Outcome::Fetched(b) = o { *b } else { 0 })
            .sum()
    }
    /// The one-line reasons of the files that failed, in shard order.
    pub fn failures(&self) -> Vec<&str> {
        self.outcomes
            .iter()
            .filter_map(|o| {
                if let Outcome::Failed(line) = o {
                    Some(line.as_str())
                } else {
                    None
                }
            })
            .collect()
    }
    /// Every shard is on disk, complete.
    pub fn all_complete(&self) -> bool {
        self.outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Fetched(_) | Outcome::Skipped))
    }
}

/// Download shards 0..cfg.num_shards into cfg.out with cfg.workers threads. Errors only for what stops the
/// run before any file (bad settings, an unusable folder); a file that fails is an `Outcome::Failed`.
pub fn download_shards(cfg: &DownloadConfig, progress: &dyn Progress) -> Result<Summary> {
    cfg.check()?;
    fs::create_dir_all(&cfg.out).map_err(|e| NcError::from(e).context(cfg.out.display()))?;
    // Held until this function returns; before the stale-temp cleanup, which must not touch a live run's files.
    let _lock = lock_folder(&cfg.out).map_err(NcError::new)?;
    let stale_temps_removed = remove_stale_temps(&cfg.out).map_err(|e| NcError::from(e).context(cfg.out.display()))?;
    let agent = make_agent(cfg);

    // Workers take the next shard index from `next`; `stop` is raised by a permanent failure, after which no
    // new file is started and backoff waits end early.
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let outcomes = Mutex::new(vec![Outcome::NotStarted; cfg.num_shards]);
    std::thread::scope(|s| {
        for _ in 0..cfg.workers.min(cfg.num_shards) {
            s.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= cfg.num_shards {
                    break;
                }
                let (outcome, permanent) = download_one(&agent, cfg, index, &stop, progress);
                if permanent {
                    stop.store(true, Ordering::Relaxed);
                }
                progress.file_done(&shard_name(index), &outcome);
                outcomes.lock().unwrap_or_else(|p| p.into_inner())[index] = outcome;
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok(Summary {
        outcomes,
        stale_temps_removed,
    })
}

fn make_agent(cfg: &DownloadConfig) -> ureq::Agent {
    ureq::Agent::config_builder()
        // Statuses are classified here (retry a 503, stop at a 404), so they come back as responses.
        .http_status_as_error(false)
        .timeout_connect(Some(cfg.connect_timeout))
        .timeout_recv_response(Some(cfg.connect_timeout))
        .timeout_per_read(Some(cfg.read_timeout))
        .user_agent(concat!("nc-data/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

/// One shard, attempts and waits included. Returns the outcome and whether it failed permanently.
fn download_one(
    agent: &ureq::Agent,
    cfg: &DownloadConfig,
    index: usize,
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> (Outcome, bool) {
    let name = shard_name(index);
    let dest = cfg.out.join(&name);
    if is_complete(&dest) {
        return (Outcome::Skipped, false);
    }
    if dest.exists() {
        progress.note(&format!("{name}: on disk but not readable parquet; fetching it again"));
    }
    let url = format!("{}/{name}", cfg.base_url);
    let mut attempt = 1;
    loop {
        // Bytes of this attempt, taken back from the progress total if the attempt fails.
        let mut counted: u64 = 0;
        let result = fetch_once(agent, &url, &dest, &mut |n| {
            counted += n;
            progress.bytes(n as i64)
        });
        let failure = match result {
            Ok(bytes) => return (Outcome::Fetched(bytes), false),
            Err(f) => f,
        };
        progress.bytes(-(counted as i64));
        let _ = fs::remove_file(temp_path(&dest));
        if failure.permanent {
            let line = format!("{name}: {} from {url} (not retried)", failure.cause);
            return (Outcome::Failed(line), true);
        }
        if attempt >= cfg.retry.attempts {
            let line = format!(
                "{name}: gave up after {attempt} attempts at {url}; last cause: {}",
                failure.cause
            );
            return (Outcome::Failed(line), false);
        }
        let wait = cfg.retry.delay(attempt);
        progress.note(&format!(
            "{name}: attempt {attempt} failed ({}); retrying in {:.1} s",
            failure.cause,
            wait.as_secs_f64()
        ));
        if !sleep_unless_stopped(wait, stop) {
            let line = format!("{name}: stopped after attempt {attempt} failed ({})", failure.cause);
            return (Outcome::Failed(line), false);
        }
        attempt += 1;
    }
}

/// One GET of `url` into `dest` (through its temporary name). `on_bytes` hears of every chunk written.
/// Returns the file's size once it is in place under its final name.
fn fetch_once(
    agent: &ureq::Agent,
    url: &str,
    dest: &Path,
    on_bytes: &mut dyn FnMut(u64),
) -> std::result::Result<u64, Failure> {
    let mut response = agent.get(url).call().map_err(classify_ureq_error)?;
    let status = response.status();
    if status.as_u16() != 200 {
        return Err(classify_status(
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
        ));
    }
    // ureq reads Content-Length from the headers (None for a body that ends when the connection closes).
    let expected = response.body().content_length();

    let temp = temp_path(dest);
    // create() truncates, so a temporary file left by a killed run is overwritten, never appended to.
    let file = File::create(&temp).map_err(|e| Failure::permanent(format!("cannot create {}: {e}", temp.display())))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let mut reader = response.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut got: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let of = expected.map(|len| format!(" of {len}")).unwrap_or_default();
                return Err(Failure::transient(format!(
                    "connection broke after {got}{of} bytes: {e}"
                )));
            }
        };
        writer
            .write_all(&buf[..n])
            .map_err(|e| Failure::permanent(format!("cannot write {}: {e}", temp.display())))?;
        got += n as u64;
        on_bytes(n as u64);
    }
    // ureq already fails a read that ends before Content-Length; this is the same rule stated here, where
    // it matters, so it still holds if the client changes.
    if let Some(len) = expected {
        if got != len {
            return Err(Failure::transient(format!("truncated body: {got} of {len} bytes")));
        }
    }
    let file = writer
        .into_inner()
        .map_err(|e| Failure::permanent(format!("cannot write {}: {}", temp.display(), e.error())))?;
    match commit(file, &temp, dest) {
        Ok(()) => Ok(got),
        Err(CommitError::NotParquet(e)) => Err(Failure::transient(format!(
            "the {got} bytes received are not readable parquet ({e})"
        ))),
        Err(CommitError::Io(e)) => Err(Failure::permanent(e)),
    }
}

/// A request that got no response: bad URLs and redirect loops are final, network trouble is retried.
fn classify_ureq_error(e: ureq::Error) -> Failure {
    use ureq::Error as E;
    let cause = e.to_string();
    match e {
        E::BadUri(_) | E::Http(_) | E::InvalidProxyUrl | E::TooManyRedirects | E::RedirectFailed => {
            Failure::permanent(cause)
        }
        _ => Failure::transient(cause),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_limits_follow_nanochat() {
        assert_eq!(shard_name(7), "shard_00007.parquet");
        assert_eq!(shard_name(MAX_SHARD), "shard_01822.parquet");
        let cfg = DownloadConfig::new(MAX_SHARD + 2, PathBuf::from("/nonexistent"), DEFAULT_BASE_URL.into());
        let err = cfg.check().unwrap_err().to_string();
        assert!(err.contains("-n 1823 at most"), "{err}");
        let cfg = DownloadConfig::new(0, PathBuf::from("/nonexistent"), DEFAULT_BASE_URL.into());
        assert!(cfg.check().is_err());
    }

    #[test]
    fn base_url_must_be_http() {
        assert_eq!(resolve_base_url(Some("http://h/x/")).unwrap(), "http://h/x");
        let err = resolve_base_url(Some("/local/folder")).unwrap_err().to_string();
        assert!(err.contains("--base-url") && err.contains("not an http"), "{err}");
    }
}
