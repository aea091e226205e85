//! `--input` paths: files, and folders standing for the input files in them.
//!
//! A folder means its `.parquet`, `.jsonl` and `.txt` files, sorted by name, not recursing: nanochat's
//! `base_data` folder is flat and its order (shard_00000 ..) is what makes "the last file is validation" mean
//! the last shard; a recursive walk would also pick up whatever else lives below a data folder (a tokenizer,
//! notes) in an order no one chose. Hidden files and other names (a download's `.parquet.tmp`, its lock file,
//! a README) are skipped and counted, so the caller can say what was left out.

use std::path::{Path, PathBuf};

use super::prep::InputKind;
use crate::bail;
use crate::error::{NcError, Result};

/// The input files, in order, and one note per folder saying what it gave.
#[derive(Debug, Default)]
pub struct InputFiles {
    pub files: Vec<PathBuf>,
    pub notes: Vec<String>,
}

fn is_input_name(name: &str) -> bool {
    !name.starts_with('.') && [".parquet", ".jsonl", ".txt"].iter().any(|ext| name.ends_with(ext))
}

/// The input files of one folder, sorted by name, and how many other entries it holds (subfolders included).
fn folder_files(dir: &Path) -> Result<(Vec<PathBuf>, usize, usize)> {
    let entries = std::fs::read_dir(dir).map_err(|e| NcError::new(format!("{}: cannot list: {e}", dir.display())))?;
    let (mut files, mut skipped, mut subfolders) = (Vec::new(), 0, 0);
    for entry in entries {
        let entry = entry.map_err(|e| NcError::new(format!("{}: cannot list: {e}", dir.display())))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            subfolders += 1;
        } else if path.is_file() && is_input_name(&name) {
            files.push(path);
        } else {
            skipped += 1;
        }
    }
    files.sort();
    Ok((files, skipped, subfolders))
}

/// Expand `paths` (files and folders) into the input files, each checked to exist with a known type.
pub fn expand_inputs(paths: &[PathBuf]) -> Result<InputFiles> {
    let mut out = InputFiles::default();
    for path in paths {
        if path.is_dir() {
            let (files, skipped, subfolders) = folder_files(path)?;
            if files.is_empty() {
                bail!(
                    "{}: a folder with no .parquet, .jsonl or .txt files in it (its subfolders are not read: give \
                     them as --input too)",
                    path.display()
                );
            }
            let mut note = format!("{}: {} input files", path.display(), files.len());
            if skipped + subfolders > 0 {
                note += &format!(" (skipped {skipped} other files and {subfolders} subfolders, which are not read)");
            }
            out.notes.push(note);
            out.files.extend(files);
        } else if path.is_file() {
            InputKind::of(path)?;
            out.files.push(path.clone());
        } else {
            bail!("{}: no such file or folder", path.display());
        }
    }
    if out.files.is_empty() {
        bail!("no input files");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_give_their_input_files_sorted_without_recursing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in [
            "b.txt",
            "a.parquet",
            "c.jsonl",
            "notes.md",
            ".hidden.txt",
            "x.parquet.tmp",
        ] {
            std::fs::write(d.join(name), "x").unwrap();
        }
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/z.txt"), "x").unwrap();
        let single = d.join("sub/z.txt");
        let got = expand_inputs(&[d.to_path_buf(), single.clone()]).unwrap();
        let expected: Vec<PathBuf> = vec![d.join("a.parquet"), d.join("b.txt"), d.join("c.jsonl"), single];
        assert_eq!(got.files, expected);
        assert!(
            got.notes[0].contains("3 input files (skipped 3 other files and 1 subfolders"),
            "{:?}",
            got.notes
        );
        let err = expand_inputs(&[d.join("sub/none.txt")]).unwrap_err().to_string();
        assert!(err.contains("no such file or folder"), "{err}");
        let empty = d.join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(expand_inputs(&[empty])
            .unwrap_err()
            .to_string()
            .contains("no .parquet, .jsonl or .txt"));
        assert!(expand_inputs(&[d.join("notes.md")])
            .unwrap_err()
            .to_string()
            .contains("unknown input type"));
    }
}
