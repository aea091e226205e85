//! `nc-data download --eval-bundle`: nanochat's CORE eval bundle (`eval_bundle.zip`, ~160 MB, the URL of
//! nanochat's speedrun.sh) unpacked into nanochat's folder (`$NANOCHAT_BASE_DIR/eval_bundle`, by default
//! `~/.cache/nanochat/eval_bundle`), where nanochat and `nc-eval` look for it. A bundle already there
//! (core.yaml present) is used as is.
//!
//! Atomic like the shard download: the zip is fetched to a temporary name (retried with the same policy),
//! unpacked into a temporary folder beside the destination, and only a complete unpack is renamed into
//! place; an interrupted run leaves nothing under the final name. Entries whose path would leave the folder
//! (absolute, `..`) and symbolic links are refused, so a hostile archive cannot write elsewhere.

use super::bundle::CONFIG_FILE;
use crate::bail;
use crate::data::download_retry::{classify_status, sleep_unless_stopped, Failure, RetryPolicy};
use crate::error::{NcError, Result};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Where nanochat's speedrun.sh downloads the bundle from.
pub const EVAL_BUNDLE_URL: &str = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip";
/// Replaces `EVAL_BUNDLE_URL` (a mirror, a local copy); `--url` wins.
pub const EVAL_BUNDLE_URL_ENV: &str = "NC_EVAL_BUNDLE_URL";

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleOutcome {
    AlreadyThere,
    Fetched { bytes: u64, files: usize },
}

/// The URL to use: the flag, else `NC_EVAL_BUNDLE_URL`, else nanochat's. It must be http(s).
pub fn resolve_bundle_url(flag: Option<&str>) -> Result<String> {
    let env = std::env::var(EVAL_BUNDLE_URL_ENV).ok().filter(|v| !v.is_empty());
    let url = flag
        .map(str::to_string)
        .or(env)
        .unwrap_or_else(|| EVAL_BUNDLE_URL.to_string());
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("eval bundle URL `{url}` is not an http:// or https:// URL");
    }
    Ok(url)
}

/// Fetches `url` and unpacks it into `dest` (the eval_bundle folder itself), unless `dest` already holds a
/// bundle. `note` hears progress lines.
pub fn download_eval_bundle(
    url: &str,
    dest: &Path,
    retry: RetryPolicy,
    note: &mut dyn FnMut(String),
) -> Result<BundleOutcome> {
    if dest.join(CONFIG_FILE).is_file() {
        return Ok(BundleOutcome::AlreadyThere);
    }
    if dest.exists() {
        bail!(
            "{} exists but holds no {CONFIG_FILE}: move it away (nothing was changed), then run again",
            dest.display()
        );
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| NcError::new(format!("cannot create {}: {e}", parent.display())))?;
    let zip_path = parent.join(".eval_bundle.zip.partial");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        // statuses are classified here (retry a 503, stop at a 404), so they come back as responses
        .http_status_as_error(false)
        .timeout_connect(Some(std::time::Duration::from_secs(30)))
        .build()
        .into();
    let stop = AtomicBool::new(false);
    let mut attempt = 1;
    let bytes = loop {
        match fetch(&agent, url, &zip_path) {
            Ok(n) => break n,
            Err(f) if f.permanent || attempt >= retry.attempts => {
                let _ = fs::remove_file(&zip_path);
                bail!("eval bundle: {url}: {} (after {attempt} attempts)", f.cause);
            }
            Err(f) => {
                let wait = retry.delay(attempt);
                note(format!(
                    "eval bundle: attempt {attempt} failed ({}); retrying in {:.1} s",
                    f.cause,
                    wait.as_secs_f64()
                ));
                sleep_unless_stopped(wait, &stop);
                attempt += 1;
            }
        }
    };
    note(format!("eval bundle: {bytes} bytes fetched, unpacking"));
    let staging = parent.join(format!(".eval_bundle.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let unpacked = unpack(&zip_path, &staging).and_then(|files| {
        // the archive holds eval_bundle/...; accept a bare core.yaml at its root too
        let root = if staging.join("eval_bundle").join(CONFIG_FILE).is_file() {
            staging.join("eval_bundle")
        } else if staging.join(CONFIG_FILE).is_file() {
            staging.clone()
        } else {
            bail!("the archive holds no {CONFIG_FILE} (in eval_bundle/ or at its root): not a CORE eval bundle");
        };
        fs::rename(&root, dest).map_err(|e| NcError::new(format!("cannot move into {}: {e}", dest.display())))?;
        Ok(files)
    });
    let _ = fs::remove_dir_all(&staging);
    let _ = fs::remove_file(&zip_path);
    let files = unpacked.map_err(|e| e.context("eval bundle"))?;
    Ok(BundleOutcome::Fetched { bytes, files })
}

/// One GET into `path`; the whole body or a failure (transient when the connection broke).
fn fetch(agent: &ureq::Agent, url: &str, path: &Path) -> std::result::Result<u64, Failure> {
    let mut response = agent.get(url).call().map_err(|e| Failure::transient(e.to_string()))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(classify_status(
            status,
            response.status().canonical_reason().unwrap_or(""),
        ));
    }
    let expected = response.body().content_length();
    let file = File::create(path).map_err(|e| Failure::permanent(format!("cannot create {}: {e}", path.display())))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let mut reader = response.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::transient(format!("connection broke after {got} bytes: {e}"))),
        };
        writer
            .write_all(&buf[..n])
            .map_err(|e| Failure::permanent(format!("cannot write {}: {e}", path.display())))?;
        got += n as u64;
    }
    if let Some(len) = expected.filter(|&len| len != got) {
        return Err(Failure::transient(format!("truncated body: {got} of {len} bytes")));
    }
    let file = writer
        .into_inner()
        .map_err(|e| Failure::permanent(format!("cannot write {}: {}", path.display(), e.error())))?;
    file.sync_all()
        .map_err(|e| Failure::permanent(format!("cannot sync {}: {e}", path.display())))?;
    Ok(got)
}

/// Unpacks every entry of the zip at `zip_path` under `into`; refuses entries that escape it and links.
/// Returns the number of files written.
pub fn unpack(zip_path: &Path, into: &Path) -> Result<usize> {
    let file = File::open(zip_path).map_err(|e| NcError::new(format!("{}: {e}", zip_path.display())))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| NcError::new(format!("not a readable zip archive: {e}")))?;
    fs::create_dir_all(into).map_err(|e| NcError::new(format!("cannot create {}: {e}", into.display())))?;
    let mut files = 0;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| NcError::new(format!("zip entry {i}: {e}")))?;
        let name = entry
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| format!("entry {i}"));
        // enclosed_name drops a leading `/` (and refuses `..` climbing out); an absolute name is refused here
        // too, since an archive that carries one was not made for unpacking into a folder.
        let absolute = name.starts_with(['/', '\\']) || Path::new(&name).is_absolute();
        let Some(rel) = entry
            .enclosed_name()
            .filter(|p| !absolute && p.components().count() > 0)
        else {
            bail!("zip entry `{name}` would be written outside the bundle folder; refusing the archive");
        };
        if entry.is_symlink() {
            bail!("zip entry `{name}` is a symbolic link; refusing the archive");
        }
        let out: PathBuf = into.join(rel);
        if entry.is_dir() {
            fs::create_dir_all(&out).map_err(|e| NcError::new(format!("cannot create {}: {e}", out.display())))?;
            continue;
        }
        if let Some(p) = out.parent() {
            fs::create_dir_all(p).map_err(|e| NcError::new(format!("cannot create {}: {e}", p.display())))?;
        }
        let mut w = File::create(&out).map_err(|e| NcError::new(format!("cannot create {}: {e}", out.display())))?;
        std::io::copy(&mut entry, &mut w).map_err(|e| NcError::new(format!("zip entry `{name}`: {e}")))?;
        files += 1;
    }
    Ok(files)
}
