//! How a downloaded shard reaches its final name: written under a temporary name in the same folder, flushed
//! to disk, checked to be readable parquet, then renamed. A final name therefore only ever holds a complete
//! file, whatever happens meanwhile (a dropped connection, a full disk, Ctrl-C, a power cut).

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use parquet::file::reader::SerializedFileReader;

/// The suffix of a file still being downloaded (nanochat's downloader uses the same one, and its
/// `list_parquet_files` skips such names, as does every `*.parquet` glob).
pub const TEMP_SUFFIX: &str = ".tmp";

/// Where the file for `dest` is written before it is complete: `shard_00007.parquet.tmp` beside it.
pub fn temp_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(TEMP_SUFFIX);
    dest.with_file_name(name)
}

/// Whether `path` parses as parquet: its trailing magic, footer length and metadata (the footer is written
/// last, so a cut-off file fails here).
pub fn parquet_footer_ok(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    SerializedFileReader::new(file).map(|_| ()).map_err(|e| e.to_string())
}

/// A shard is complete when its final name exists and parses as parquet; anything else is fetched again.
pub fn is_complete(dest: &Path) -> bool {
    dest.is_file() && parquet_footer_ok(dest).is_ok()
}

/// Remove temporary files a killed run left in `dir` (names `shard_NNNNN.parquet.tmp`), returning how many.
/// Their contents cannot be trusted to be a prefix of the file (the kill may have come mid-write), so they
/// are fetched anew rather than resumed.
pub fn remove_stale_temps(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_ours = name.starts_with("shard_") && name.ends_with(&format!(".parquet{TEMP_SUFFIX}"));
        if is_ours && entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The file in the destination folder that one `nc-data download` at a time holds locked.
pub const LOCK_FILE: &str = ".nc-data-download.lock";

/// How long a busy lock is retried before another download is assumed to hold it.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Take the folder's download lock (an advisory `flock`, released when the returned file is dropped or the
/// process dies, however it dies). Two downloads into one folder would write the same temporary names, so
/// the second one stops with an error instead. The lock file is left in place: removing it could let a
/// third run lock a new file while a second still holds the old one.
pub fn lock_folder(dir: &Path) -> Result<File, String> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // A lock can outlive its holder by a moment: a process forked (by any thread of the holder) before the
    // holder dropped its file keeps the shared descriptor until its exec closes it. So a busy lock is retried
    // for a short grace period before the folder is declared busy; a real second download holds it far longer.
    let deadline = std::time::Instant::now() + LOCK_GRACE;
    // SAFETY: flock on a descriptor this function owns for as long as `file` lives.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        if std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        return Err(format!(
            "another nc-data download is writing to {} (it holds {}); wait for it to finish or use another --out",
            dir.display(),
            path.display()
        ));
    }
    Ok(file)
}

/// Make the fully written temporary file `temp` (still open as `file`) the shard `dest`: flush it to disk,
/// check that it parses as parquet, rename it, and flush the folder so the rename itself survives a crash.
/// On a failed check the temporary file is removed and the error says why (the caller retries).
pub fn commit(file: File, temp: &Path, dest: &Path) -> Result<(), CommitError> {
    file.sync_all()
        .map_err(|e| CommitError::Io(format!("cannot flush {}: {e}", temp.display())))?;
    drop(file);
    if let Err(e) = parquet_footer_ok(temp) {
        let _ = fs::remove_file(temp);
        return Err(CommitError::NotParquet(e));
    }
    fs::rename(temp, dest)
        .map_err(|e| CommitError::Io(format!("cannot rename {} to {}: {e}", temp.display(), dest.display())))?;
    if let Some(dir) = dest.parent() {
        // Only meaningful on Unix; where a folder cannot be opened for syncing the rename still stands.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Why `commit` did not put the file in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// The bytes arrived but are not parquet (a corrupted transfer, or an error page served with 200).
    NotParquet(String),
    /// The local disk failed (full, read-only, permissions): retrying will not help.
    Io(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_name_sits_beside_the_final_one() {
        let t = temp_path(Path::new("/d/shard_00007.parquet"));
        assert_eq!(t, Path::new("/d/shard_00007.parquet.tmp"));
    }

    #[test]
    fn stale_temps_go_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "shard_00001.parquet.tmp",
            "shard_00002.parquet",
            "notes.tmp",
            "shard_00003.parquet.tmp",
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_stale_temps(dir.path()).unwrap(), 2);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["notes.tmp", "shard_00002.parquet"]);
    }

    #[test]
    fn a_folder_is_locked_by_one_download_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_folder(dir.path()).unwrap();
        let err = lock_folder(dir.path()).unwrap_err();
        assert!(err.contains("another nc-data download"), "{err}");
        drop(held);
        assert!(lock_folder(dir.path()).is_ok());
    }

    #[test]
    fn a_non_parquet_file_is_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("shard_00000.parquet");
        let temp = temp_path(&dest);
        fs::write(&temp, b"<html>rate limited</html>").unwrap();
        let err = commit(File::open(&temp).unwrap(), &temp, &dest).unwrap_err();
        assert!(matches!(err, CommitError::NotParquet(_)), "{err:?}");
        assert!(!dest.exists() && !temp.exists());
        assert!(!is_complete(&dest));
    }
}
