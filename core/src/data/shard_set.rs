//! A folder of token shards is written as a whole: the new set goes into a fresh temporary folder beside the
//! target (`.NAME.tokenizing-PID`) and is swapped in only once complete, so the target holds the old set or the
//! new one, never a mix of the two, and a crash or an error leaves the old set as it was. On Linux the swap is
//! one `renameat2(RENAME_EXCHANGE)`; where a filesystem lacks it, the old folder is renamed aside first (a crash
//! between the two renames leaves it complete under `.NAME.replaced-PID`).
//!
//! Each set records what made it (`tokenize.json`): the tokenizer's fingerprint and the train/validation split.
//! A target holding shards of another tokenizer or split, or shards with no record, is refused unless the caller
//! says to replace them; a target holding anything but shards is always refused, since the swap replaces the
//! whole folder.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::tokenizer::Tokenizer;
use super::tokenizer_files::{format_tiktoken_ranks, write_atomic};
use crate::bail;
use crate::error::{NcError, Result};

/// The record of a shard set, in the set's folder.
pub const MANIFEST_FILE: &str = "tokenize.json";
/// The scripts' record of which parquet files a set was made from (scripts/common.sh): part of a set.
const SCRIPT_STAMP_FILE: &str = "parquet_inputs.txt";

/// What makes two shard sets interchangeable: the same tokenizer and the same train/validation split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetIdentity {
    /// FNV-1a 64 of the tokenizer's ranks, split pattern and special tokens (hex).
    pub tokenizer: String,
    pub vocab_size: usize,
    /// Which documents are validation, e.g. "the last input file (shard_00240.parquet)".
    pub split: String,
}

/// `tokenize.json`: the identity, and how the set was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardManifest {
    pub format: String,
    pub version: u32,
    pub identity: SetIdentity,
    pub txt_docs: String,
    pub shard_tokens: usize,
    pub inputs: Vec<String>,
    pub train_shards: usize,
    pub val_shards: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
}

impl ShardManifest {
    pub fn new(identity: SetIdentity) -> ShardManifest {
        ShardManifest {
            format: "nc-shards".into(),
            version: 1,
            identity,
            txt_docs: String::new(),
            shard_tokens: 0,
            inputs: Vec::new(),
            train_shards: 0,
            val_shards: 0,
            train_tokens: 0,
            val_tokens: 0,
        }
    }
}

/// FNV-1a, 64 bits: the same in every build and on every machine; it tells tokenizers apart, it is not a
/// defence against someone forging one.
fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The fingerprint of a tokenizer: its ranks, split pattern and special tokens.
pub fn tokenizer_fingerprint(tok: &Tokenizer) -> String {
    let mut h = fnv1a(format_tiktoken_ranks(tok).as_bytes(), 0xcbf2_9ce4_8422_2325);
    h = fnv1a(tok.pattern().as_str().as_bytes(), h);
    for (text, id) in tok.specials() {
        h = fnv1a(text.as_bytes(), h);
        h = fnv1a(&id.to_le_bytes(), h);
    }
    format!("{h:016x}")
}

/// What a target folder holds now.
#[derive(Debug)]
enum Holds {
    Nothing,
    /// A set with its record.
    Set(ShardManifest),
    /// Shards without a record (an older nc-data, or made by hand).
    Unrecorded {
        shards: usize,
    },
}

fn is_set_entry(name: &str) -> bool {
    let shard = (name.starts_with("train_") || name.starts_with("val_")) && name.ends_with(".bin");
    // `.train_000001.bin.partial123`: a shard write killed midway (shard::write_shard).
    let partial = name.starts_with('.') && name.contains(".bin.partial");
    shard || partial || name == MANIFEST_FILE || name == SCRIPT_STAMP_FILE
}

fn inspect(target: &Path) -> Result<Holds> {
    if !target.exists() {
        return Ok(Holds::Nothing);
    }
    if !target.is_dir() {
        bail!(
            "{} is not a folder; give --out a folder for the shards",
            target.display()
        );
    }
    let listing = |e: std::io::Error| NcError::new(format!("{}: cannot list: {e}", target.display()));
    let mut shards = 0;
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(target).map_err(listing)? {
        let name = entry.map_err(listing)?.file_name().to_string_lossy().into_owned();
        if !is_set_entry(&name) {
            foreign.push(name);
        } else if name.ends_with(".bin") {
            shards += 1;
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        foreign.truncate(5);
        bail!(
            "{} holds files that are not token shards ({}); a new set replaces the whole folder, so give --out an \
             empty or new folder (or move those files away)",
            target.display(),
            foreign.join(", ")
        );
    }
    let manifest = target.join(MANIFEST_FILE);
    if manifest.exists() {
        let text = std::fs::read_to_string(&manifest).map_err(|e| NcError::from(e).context(manifest.display()))?;
        return match serde_json::from_str::<ShardManifest>(&text) {
            Ok(m) => Ok(Holds::Set(m)),
            Err(_) => Ok(Holds::Unrecorded { shards }),
        };
    }
    Ok(if shards == 0 {
        Holds::Nothing
    } else {
        Holds::Unrecorded { shards }
    })
}

fn pid_is_alive(pid: &str) -> bool {
    // Without /proc (not Linux) nothing can be told: keep the folder.
    !Path::new("/proc/self").exists() || Path::new("/proc").join(pid).exists()
}

/// Temporary folders of writers that are no longer running, beside `target`: removed, and counted.
fn remove_stale_temporaries(parent: &Path, name: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        let pid = [".tokenizing-", ".replaced-"]
            .iter()
            .find_map(|tag| entry_name.strip_prefix(&format!(".{name}{tag}")));
        if let Some(pid) = pid {
            if pid.chars().all(|c| c.is_ascii_digit()) && !pid_is_alive(pid) {
                if std::fs::remove_dir_all(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
    }
    removed
}

/// A shard set being written: shards go into `dir()`, `commit` swaps them in.
pub struct NewShardSet {
    target: PathBuf,
    temp: PathBuf,
    /// What the target held before: a line for the caller to print, if anything.
    pub replacing: Option<String>,
    /// Temporary folders of killed earlier writers removed beside the target.
    pub stale_removed: usize,
    committed: bool,
}

impl NewShardSet {
    /// Check `target` against the new set's identity and make the temporary folder. `replace` allows replacing
    /// shards of another tokenizer or split, or shards without a record.
    pub fn begin(target: &Path, identity: &SetIdentity, replace: bool) -> Result<NewShardSet> {
        let name = match target.file_name() {
            Some(n) => n.to_string_lossy().into_owned(),
            None => bail!("{}: give --out a folder name (e.g. DATA/shards)", target.display()),
        };
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let replacing = match inspect(target)? {
            Holds::Nothing => None,
            Holds::Set(old) if old.identity == *identity => Some(format!(
                "replacing the {} train and {} val shards in {} (same tokenizer and split)",
                old.train_shards,
                old.val_shards,
                target.display()
            )),
            Holds::Set(old) => {
                let what = if old.identity.tokenizer != identity.tokenizer {
                    format!(
                        "another tokenizer's shards (fingerprint {}, {} tokens; this one: {}, {} tokens)",
                        old.identity.tokenizer, old.identity.vocab_size, identity.tokenizer, identity.vocab_size
                    )
                } else {
                    format!(
                        "shards of another split (validation: {}; this run: {})",
                        old.identity.split, identity.split
                    )
                };
                if !replace {
                    bail!(
                        "{} holds {what}; give --replace to replace them (the old set stays until the new one is \
                         complete), or another --out",
                        target.display()
                    );
                }
                Some(format!("replacing {what} in {} (--replace)", target.display()))
            }
            Holds::Unrecorded { shards } => {
                if !replace {
                    bail!(
                        "{} holds {shards} token shards with no {MANIFEST_FILE} saying which tokenizer and split made \
                         them; give --replace to replace them (the old set stays until the new one is complete), or \
                         another --out",
                        target.display()
                    );
                }
                Some(format!(
                    "replacing {shards} unrecorded shards in {} (--replace)",
                    target.display()
                ))
            }
        };
        std::fs::create_dir_all(&parent).map_err(|e| NcError::from(e).context(parent.display()))?;
        let stale_removed = remove_stale_temporaries(&parent, &name);
        let temp = parent.join(format!(".{name}.tokenizing-{}", std::process::id()));
        if temp.exists() {
            std::fs::remove_dir_all(&temp).map_err(|e| NcError::from(e).context(temp.display()))?;
        }
        std::fs::create_dir(&temp).map_err(|e| NcError::from(e).context(temp.display()))?;
        Ok(NewShardSet {
            target: target.to_path_buf(),
            temp,
            replacing,
            stale_removed,
            committed: false,
        })
    }

    /// The temporary folder the new shards go into.
    pub fn dir(&self) -> &Path {
        &self.temp
    }

    /// Write the record and swap the new set in for whatever the target held.
    pub fn commit(mut self, manifest: &ShardManifest) -> Result<()> {
        let json = serde_json::to_string_pretty(manifest).expect("plain data serializes");
        write_atomic(&self.temp.join(MANIFEST_FILE), json.as_bytes())?;
        swap_into_place(&self.temp, &self.target)?;
        self.committed = true;
        // `temp` now holds the old set (or nothing, if there was none).
        let _ = std::fs::remove_dir_all(&self.temp);
        Ok(())
    }
}

impl Drop for NewShardSet {
    fn drop(&mut self) {
        if !self.committed {
            // An error before the swap: the target is untouched; the partial new set goes.
            let _ = std::fs::remove_dir_all(&self.temp);
        }
    }
}

fn c_path(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| NcError::new(format!("{}: a path with a NUL byte", p.display())))
}

/// Put the folder `new` at `target`; what `target` held ends up at `new`'s path.
fn swap_into_place(new: &Path, target: &Path) -> Result<()> {
    let fail =
        |what: &str, e: std::io::Error| NcError::new(format!("{what} {} -> {}: {e}", new.display(), target.display()));
    if !target.exists() {
        return std::fs::rename(new, target).map_err(|e| fail("renaming", e));
    }
    let (a, b) = (c_path(new)?, c_path(target)?);
    // SAFETY: two NUL-terminated paths, relative to the current directory; the call only renames.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if !matches!(
        err.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    ) {
        return Err(fail("swapping", err));
    }
    // No atomic exchange here: move the old set aside, the new one in, and the old one to `new`'s path.
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let aside = target.with_file_name(format!(".{name}.replaced-{}", std::process::id()));
    std::fs::rename(target, &aside).map_err(|e| fail("moving the old set aside for", e))?;
    if let Err(e) = std::fs::rename(new, target) {
        let _ = std::fs::rename(&aside, target);
        return Err(fail("renaming", e));
    }
    std::fs::rename(&aside, new).map_err(|e| fail("removing the old set after", e))
}
