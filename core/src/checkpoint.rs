//! Checkpoints: crash-safe folders with the weights under nanochat's names, the optimizer state, and meta.json.
//!
//! Layout of `<out_dir>/checkpoints/step_NNNNNN/`:
//! - `model.safetensors`: every parameter as f32 under its nanochat name, shape (out, in) as PyTorch's Linear,
//!   so nanochat users can load it with `safetensors.torch.load_file`.
//! - `optim_rank{r}.safetensors`: rank r's optimizer state buffer (one f32 tensor `state`).
//! - `meta.json`: model config (nanochat's keys), train config, step, loader, loop and RNG state, and the
//!   length and xxh64 checksum of the weights and of every optimizer file (`files`).
//! - `COMPLETE`: written last, holding meta.json's length and checksum and a check of itself
//!   (`checkpoint_sums`). A folder without it is not a checkpoint. Loading verifies every file it reads and
//!   refuses a mismatch naming the file; `verify` checks a whole checkpoint.
//!
//! A save writes everything into `checkpoints/.partial-step_NNNNNN/`, syncs it, writes the marker and only
//! then renames the folder into place; a crash at any point leaves the previous checkpoints as they were,
//! and the partial folder is ignored (and cleared by the next save).
//!
//! With several ranks the save is split in phases (`begin_save`, `write_optim_state`, `write_model_and_meta`,
//! `finish_save`): rank 0 prepares the partial folder, every rank writes its own optimizer state into it
//! (and its checksum beside it), rank 0 writes the weights, and, once the ranks agree that every file is in,
//! rank 0 writes meta.json with every file's checksum, then the marker, and renames. Ranks in other processes (on other machines) write into the same folder, so the out
//! dir must be one folder all of them see; `finish_save` checks that every rank's file is there.

use crate::bail;
use crate::checkpoint_sums::{self, FileSum, Marker};
use crate::config::ModelConfig;
use crate::error::{NcError, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

pub const COMPLETE_MARKER: &str = "COMPLETE";
pub const MODEL_FILE: &str = "model.safetensors";
pub const META_FILE: &str = "meta.json";
pub const FORMAT: &str = "nc-checkpoint-1";
const PARTIAL_PREFIX: &str = ".partial-";
const REPLACED_PREFIX: &str = ".replaced-";

pub fn optim_file(rank: usize) -> String {
    format!("optim_rank{rank}.safetensors")
}

/// meta.json. The train, loader, loop and RNG parts belong to the training loop, kept here as JSON values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    pub step: u64,
    /// nanochat's keys: n_layer, n_embd, n_head, n_kv_head, vocab_size, sequence_len (plus head_dim).
    pub model_config: ModelConfig,
    pub train_config: serde_json::Value,
    pub loader_state: serde_json::Value,
    pub loop_state: serde_json::Value,
    pub rng_state: serde_json::Value,
    pub optimizer: OptimizerMeta,
    /// Length and xxh64 of the weights and of every optimizer file, by file name: filled in by `finish_save`
    /// (a saver leaves it empty); empty in checkpoints written before nc recorded checksums.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, FileSum>,
}

/// What `verify` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// Every file's length and checksum are as recorded.
    Verified,
    /// Written before nc recorded checksums: nothing to verify against (loaded with a note).
    Unrecorded,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerMeta {
    /// Optimizer steps taken (AdamW's bias correction resumes from here).
    pub steps_taken: u64,
    pub world_size: usize,
    /// Elements of each rank's state buffer, rank order.
    pub state_lens: Vec<usize>,
}

pub fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

pub fn step_dir_name(step: u64) -> String {
    format!("step_{step:06}")
}

fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step_")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn io_err(what: &Path, e: std::io::Error) -> NcError {
    NcError::new(format!("{}: {e}", what.display()))
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// Write `bytes` to `path` and flush them to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(path).map_err(|e| io_err(path, e))?;
    f.write_all(bytes).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))
}

fn sync_dir(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(path, e))
}

fn write_tensors(path: &Path, tensors: Vec<(String, TensorView)>, meta: Option<HashMap<String, String>>) -> Result<()> {
    safetensors::tensor::serialize_to_file(tensors, meta, path)
        .map_err(|e| NcError::new(format!("{}: writing safetensors: {e}", path.display())))?;
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(path, e))
}

/// Save a checkpoint of `step` under `out_dir`; returns its folder. `optim_states[r]` is rank r's state.
pub fn save(out_dir: &Path, meta: &CheckpointMeta, params: &[f32], optim_states: &[&[f32]]) -> Result<PathBuf> {
    save_with_hook(out_dir, meta, params, optim_states, &mut |_| Ok(()))
}

/// `save`, calling `after_file` after each file is written (tests use it to stop a save midway).
pub fn save_with_hook(
    out_dir: &Path,
    meta: &CheckpointMeta,
    params: &[f32],
    optim_states: &[&[f32]],
    after_file: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let tmp = begin_save(out_dir, meta.step)?;
    write_model_file(&tmp, meta, params)?;
    after_file(&tmp.join(MODEL_FILE))?;
    for (rank, state) in optim_states.iter().enumerate() {
        let path = write_optim_state(&tmp, rank, state)?;
        after_file(&path)?;
    }
    finish_save(out_dir, meta)
}

/// The folder a save of `step` writes into before it is complete.
pub fn partial_dir(out_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(out_dir).join(format!("{PARTIAL_PREFIX}{}", step_dir_name(step)))
}

/// First phase of a save (rank 0 alone): clear what saves that died midway left, and make the empty partial
/// folder of `step`; returns it.
pub fn begin_save(out_dir: &Path, step: u64) -> Result<PathBuf> {
    let root = checkpoints_dir(out_dir);
    fs::create_dir_all(&root).map_err(|e| io_err(&root, e))?;
    // Leftovers of saves that died midway: never checkpoints, safe to clear.
    for entry in fs::read_dir(&root).map_err(|e| io_err(&root, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(PARTIAL_PREFIX) || name.starts_with(REPLACED_PREFIX) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let tmp = partial_dir(out_dir, step);
    fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    Ok(tmp)
}

/// Rank 0: the weights into the partial folder, and their checksum beside them (for meta.json).
pub fn write_model_file(tmp: &Path, meta: &CheckpointMeta, params: &[f32]) -> Result<()> {
    let model = &meta.model_config;
    if params.len() as u64 != model.num_params() {
        bail!(
            "checkpoint: {} parameters given for a model of {}",
            params.len(),
            model.num_params()
        );
    }
    let model_path = tmp.join(MODEL_FILE);
    let mut views = Vec::new();
    for spec in model.param_specs() {
        let view = TensorView::new(Dtype::F32, vec![spec.rows, spec.cols], f32_bytes(&params[spec.range()]))
            .map_err(|e| NcError::new(format!("checkpoint tensor {}: {e}", spec.name)))?;
        views.push((spec.name.clone(), view));
    }
    let st_meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_tensors(&model_path, views, Some(st_meta))?;
    checkpoint_sums::write_sidecar(tmp, MODEL_FILE).map(|_| ())
}

/// meta.json with the files' checksums; returns its own (for the marker).
fn write_meta(tmp: &Path, meta: &CheckpointMeta) -> Result<FileSum> {
    let meta_path = tmp.join(META_FILE);
    let text = serde_json::to_string_pretty(meta).map_err(|e| NcError::new(format!("meta.json: {e}")))?;
    write_synced(&meta_path, text.as_bytes())?;
    Ok(FileSum::of_bytes(text.as_bytes()))
}

/// Every rank: its optimizer state into the partial folder (synced), and its checksum beside it; returns the
/// file's path.
pub fn write_optim_state(partial: &Path, rank: usize, state: &[f32]) -> Result<PathBuf> {
    if !partial.is_dir() {
        return Err(NcError::at_rank(
            rank,
            format!(
                "the checkpoint folder {} does not exist here; with ranks on several machines the out dir must be \
                 one folder all of them share (a network filesystem)",
                partial.display()
            ),
        ));
    }
    let path = partial.join(optim_file(rank));
    let view = TensorView::new(Dtype::F32, vec![state.len()], f32_bytes(state))
        .map_err(|e| NcError::new(format!("optimizer state: {e}")))?;
    write_tensors(&path, vec![("state".to_string(), view)], None)?;
    checkpoint_sums::write_sidecar(partial, &optim_file(rank))?;
    Ok(path)
}

/// Last phase (rank 0, after every rank has written its file): check that the weights and every rank's
/// optimizer state are in the partial folder with their checksums, write meta.json with those (the sidecars
/// removed), then the marker with meta.json's checksum, and rename the folder into place.
pub fn finish_save(out_dir: &Path, meta: &CheckpointMeta) -> Result<PathBuf> {
    let tmp = partial_dir(out_dir, meta.step);
    let root = checkpoints_dir(out_dir);
    let name = step_dir_name(meta.step);
    let mut needed = vec![MODEL_FILE.to_string()];
    needed.extend((0..meta.optimizer.world_size).map(optim_file));
    let with_sums: Vec<String> = needed
        .iter()
        .flat_map(|f| [f.clone(), checkpoint_sums::sidecar_name(f)])
        .collect();
    for f in &with_sums {
        if !tmp.join(f).is_file() {
            bail!(
                "checkpoint of step {}: {} is missing from {}; every rank writes its own optimizer state there, so \
                 with ranks on several machines the out dir must be one folder all of them share",
                meta.step,
                f,
                tmp.display()
            );
        }
    }

    let mut meta = meta.clone();
    meta.files = needed
        .iter()
        .map(|f| Ok((f.clone(), checkpoint_sums::read_sidecar(&tmp, f)?)))
        .collect::<Result<_>>()?;
    let meta_sum = write_meta(&tmp, &meta)?;
    for f in &needed {
        let sidecar = tmp.join(checkpoint_sums::sidecar_name(f));
        fs::remove_file(&sidecar).map_err(|e| io_err(&sidecar, e))?;
    }
    let marker = tmp.join(COMPLETE_MARKER);
    write_synced(&marker, checkpoint_sums::marker_text(meta.step, &meta_sum).as_bytes())?;
    sync_dir(&tmp)?;

    let dest = root.join(&name);
    if dest.exists() {
        // Saving the same step again (e.g. right after a resume): swap the folders, then drop the old one.
        let old = root.join(format!("{REPLACED_PREFIX}{name}"));
        fs::rename(&dest, &old).map_err(|e| io_err(&dest, e))?;
        fs::rename(&tmp, &dest).map_err(|e| io_err(&tmp, e))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&tmp, &dest).map_err(|e| io_err(&tmp, e))?;
    }
    sync_dir(&root)?;
    Ok(dest)
}

/// Complete checkpoints under `out_dir`, by increasing step.
pub fn list_complete(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = checkpoints_dir(out_dir);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(&root).map_err(|e| io_err(&root, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(step) = parse_step_dir(&name) {
            if entry.path().join(COMPLETE_MARKER).is_file() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The latest complete checkpoint under `out_dir`, if any.
pub fn latest(out_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_complete(out_dir)?.pop().map(|(_, p)| p))
}

/// Read and check meta.json of a checkpoint folder: against the checksum the marker holds, then its contents.
pub fn load_meta(dir: &Path) -> Result<CheckpointMeta> {
    let marker_path = dir.join(COMPLETE_MARKER);
    if !marker_path.is_file() {
        bail!(
            "{} is not a complete checkpoint (no {COMPLETE_MARKER} marker: the save did not finish); resume from \
             another one with --resume PATH",
            dir.display()
        );
    }
    let marker_bytes = fs::read(&marker_path).map_err(|e| io_err(&marker_path, e))?;
    let marker = checkpoint_sums::parse_marker(&marker_path, &marker_bytes)?;
    let path = dir.join(META_FILE);
    let bytes = fs::read(&path).map_err(|e| io_err(&path, e))?;
    if let Marker::Summed { meta: sum, .. } = &marker {
        sum.check(&path, &FileSum::of_bytes(&bytes))?;
    }
    let text = String::from_utf8(bytes).map_err(|_| corrupt(&path, "not UTF-8 text"))?;
    let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| {
        NcError::new(format!(
            "{}: not a valid checkpoint meta.json ({e}); the checkpoint is corrupt",
            path.display()
        ))
    })?;
    if meta.format != FORMAT {
        bail!("{}: format '{}' is not '{FORMAT}'", path.display(), meta.format);
    }
    meta.model_config.validate().map_err(|e| e.context(path.display()))?;
    match (&marker, meta.files.is_empty()) {
        (Marker::Summed { step, .. }, false) if *step == meta.step => {}
        (Marker::Unsummed, true) => {}
        _ => {
            return Err(corrupt(
                &marker_path,
                "the marker and meta.json disagree about the step or the checksums",
            ))
        }
    }
    Ok(meta)
}

/// The files a checkpoint of `meta` holds besides meta.json and the marker.
fn data_files(meta: &CheckpointMeta) -> Vec<String> {
    let mut files = vec![MODEL_FILE.to_string()];
    files.extend((0..meta.optimizer.world_size).map(optim_file));
    files
}

/// The recorded sum of `file` (None: a checkpoint from before checksums).
fn recorded_sum(meta: &CheckpointMeta, dir: &Path, file: &str) -> Result<Option<FileSum>> {
    if meta.files.is_empty() {
        return Ok(None);
    }
    match meta.files.get(file) {
        Some(sum) => Ok(Some(sum.clone())),
        None => Err(corrupt(
            &dir.join(META_FILE),
            format!("no checksum recorded for {file}"),
        )),
    }
}

/// Check every file of the checkpoint in `dir` against its recorded length and checksum (the marker, meta.json,
/// the weights, every rank's optimizer state); the first mismatch is an error naming the file.
pub fn verify(dir: &Path) -> Result<Integrity> {
    let meta = load_meta(dir)?;
    if meta.files.is_empty() {
        return Ok(Integrity::Unrecorded);
    }
    for file in data_files(&meta) {
        let path = dir.join(&file);
        let want = recorded_sum(&meta, dir, &file)?.expect("files is not empty");
        want.check(&path, &FileSum::of_file(&path)?)?;
    }
    Ok(Integrity::Verified)
}

/// Read a data file of a checkpoint, checked against its recorded sum when the checkpoint has them.
fn read_checked(dir: &Path, file: &str) -> Result<Vec<u8>> {
    let meta = load_meta(dir)?;
    let path = dir.join(file);
    let bytes = read_tensor_file(&path)?;
    if let Some(want) = recorded_sum(&meta, dir, file)? {
        want.check(&path, &FileSum::of_bytes(&bytes))?;
    }
    Ok(bytes)
}

fn read_tensor_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| io_err(path, e))
}

fn corrupt(path: &Path, why: impl std::fmt::Display) -> NcError {
    NcError::new(format!(
        "{}: {why}; the checkpoint is corrupt: delete its folder or resume from another with --resume PATH",
        path.display()
    ))
}

/// Copy an f32 tensor's bytes into `out`, checking dtype and shape.
fn read_f32(st: &SafeTensors, path: &Path, name: &str, shape: &[usize], out: &mut [f32]) -> Result<()> {
    let t = st
        .tensor(name)
        .map_err(|e| corrupt(path, format!("tensor {name}: {e}")))?;
    if t.dtype() != Dtype::F32 || t.shape() != shape {
        return Err(corrupt(
            path,
            format!(
                "tensor {name} is {:?} {:?}, expected F32 {shape:?}",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    for (o, b) in out.iter_mut().zip(t.data().chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// Load the weights of a checkpoint into the contiguous parameter buffer of `model`.
pub fn load_params(dir: &Path, model: &ModelConfig, params: &mut [f32]) -> Result<()> {
    let path = dir.join(MODEL_FILE);
    let bytes = read_checked(dir, MODEL_FILE)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&path, e))?;
    if params.len() as u64 != model.num_params() {
        bail!(
            "load_params: buffer of {} for a model of {} parameters",
            params.len(),
            model.num_params()
        );
    }
    for spec in model.param_specs() {
        let range = spec.range();
        read_f32(&st, &path, &spec.name, &[spec.rows, spec.cols], &mut params[range])?;
    }
    Ok(())
}

/// Load rank `rank`'s optimizer state into `out` (its length must be what the meta says).
pub fn load_optim_state(dir: &Path, rank: usize, out: &mut [f32]) -> Result<()> {
    let path = dir.join(optim_file(rank));
    let bytes = read_checked(dir, &optim_file(rank))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&path, e))?;
    let len = out.len();
    read_f32(&st, &path, "state", &[len], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::new(2, 32, 2, 2, 16, 40, 8).unwrap()
    }

    fn meta(step: u64) -> CheckpointMeta {
        CheckpointMeta {
            format: FORMAT.into(),
            step,
            model_config: tiny(),
            train_config: serde_json::json!({"lr": 0.02}),
            loader_state: serde_json::json!({"position": step * 10}),
            loop_state: serde_json::json!({"smooth": 1.5}),
            rng_state: serde_json::json!({"seed": 42}),
            optimizer: OptimizerMeta {
                steps_taken: step,
                world_size: 1,
                state_lens: vec![5],
            },
            files: BTreeMap::new(),
        }
    }

    /// `meta(step)` of a run whose optimizer state is sharded over one rank per entry of `state_lens`.
    fn sharded_meta(step: u64, state_lens: &[usize]) -> CheckpointMeta {
        let mut m = meta(step);
        m.optimizer.world_size = state_lens.len();
        m.optimizer.state_lens = state_lens.to_vec();
        m
    }

    fn params(seed: f32) -> Vec<f32> {
        (0..tiny().num_params() as usize)
            .map(|i| (i as f32 * 0.01 + seed).sin())
            .collect()
    }

    #[test]
    fn round_trip_with_nanochat_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = params(0.5);
        let state = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        let path = save(dir.path(), &meta(7), &p, &[&state]).unwrap();
        assert!(path.ends_with("checkpoints/step_000007"));
        assert_eq!(latest(dir.path()).unwrap(), Some(path.clone()));
        let mut m = load_meta(&path).unwrap();
        // every data file recorded with its length (and checksum)
        let lens: Vec<(String, u64)> = m.files.iter().map(|(f, s)| (f.clone(), s.len)).collect();
        let on_disk = |f: &str| std::fs::metadata(path.join(f)).unwrap().len();
        assert_eq!(
            lens,
            [
                (MODEL_FILE.to_string(), on_disk(MODEL_FILE)),
                (optim_file(0), on_disk(&optim_file(0)))
            ]
        );
        assert_eq!(verify(&path).unwrap(), Integrity::Verified);
        m.files.clear();
        assert_eq!(m, meta(7));
        // no sidecar is left behind
        let mut names: Vec<String> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["COMPLETE", "meta.json", "model.safetensors", "optim_rank0.safetensors"]
        );
        let mut q = vec![0.0f32; p.len()];
        load_params(&path, &tiny(), &mut q).unwrap();
        assert_eq!(p, q);
        let mut s = [0.0f32; 5];
        load_optim_state(&path, 0, &mut s).unwrap();
        assert_eq!(s, state);
        // names and (out, in) shapes as nanochat's PyTorch model has them
        let bytes = std::fs::read(path.join(MODEL_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(
            st.tensor("transformer.h.1.mlp.c_fc.weight").unwrap().shape(),
            &[128, 32]
        );
        assert_eq!(st.tensor("lm_head.weight").unwrap().shape(), &[40, 32]);
        // meta.json carries nanochat's model_config keys
        let text = std::fs::read_to_string(path.join(META_FILE)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for k in ["n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size", "sequence_len"] {
            assert!(v["model_config"][k].is_u64(), "{k}");
        }
    }

    /// A save that dies after writing the weights leaves the previous checkpoint the latest and intact,
    /// and the next save clears the leftovers.
    #[test]
    fn crash_mid_save_keeps_the_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let p1 = params(1.0);
        let first = save(dir.path(), &meta(10), &p1, &[&[0.0; 5]]).unwrap();
        let p2 = params(2.0);
        let e = save_with_hook(dir.path(), &meta(20), &p2, &[&[0.0; 5]], &mut |f| {
            if f.ends_with(MODEL_FILE) {
                bail!("killed");
            }
            Ok(())
        })
        .unwrap_err();
        assert_eq!(e.message, "killed");
        assert!(dir
            .path()
            .join("checkpoints/.partial-step_000020/model.safetensors")
            .exists());
        assert_eq!(latest(dir.path()).unwrap(), Some(first.clone()));
        let mut q = vec![0.0f32; p1.len()];
        load_params(&first, &tiny(), &mut q).unwrap();
        assert_eq!(q, p1);
        // a folder with the right name but no marker is not a checkpoint either
        std::fs::create_dir_all(dir.path().join("checkpoints/step_000030")).unwrap();
        assert_eq!(latest(dir.path()).unwrap(), Some(first.clone()));
        assert!(load_meta(&dir.path().join("checkpoints/step_000030"))
            .unwrap_err()
            .message
            .contains("COMPLETE"));
        // the next save clears the partial folder
        save(dir.path(), &meta(20), &p2, &[&[0.0; 5]]).unwrap();
        assert!(!dir.path().join("checkpoints/.partial-step_000020").exists());
        assert_eq!(
            list_complete(dir.path())
                .unwrap()
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>(),
            vec![10, 20]
        );
    }

    /// Ranks save in phases; a rank's missing file (a rank that failed, or another machine's out dir) keeps
    /// the marker from being written.
    #[test]
    fn a_save_is_complete_only_with_every_ranks_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = sharded_meta(4, &[5, 5]);
        let tmp = begin_save(dir.path(), 4).unwrap();
        write_model_file(&tmp, &m, &params(1.0)).unwrap();
        write_optim_state(&tmp, 0, &[1.0; 5]).unwrap();
        let e = finish_save(dir.path(), &m).unwrap_err();
        assert!(e.message.contains("optim_rank1.safetensors"), "{e}");
        assert_eq!(latest(dir.path()).unwrap(), None);
        write_optim_state(&tmp, 1, &[2.0; 5]).unwrap();
        let done = finish_save(dir.path(), &m).unwrap();
        let mut s = [0.0f32; 5];
        load_optim_state(&done, 1, &mut s).unwrap();
        assert_eq!(s, [2.0; 5]);
        // a rank whose partial folder does not exist (another machine's disk) says what the out dir must be
        let e = write_optim_state(&dir.path().join("elsewhere"), 3, &[0.0; 5]).unwrap_err();
        assert!(e.message.contains("share"), "{e}");
    }

    /// Flip a byte anywhere in any file of a checkpoint: `verify` and the loader that reads that file refuse
    /// it with one line naming the file; the untouched copy verifies.
    #[test]
    fn a_flipped_byte_in_any_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let m = sharded_meta(4, &[5, 3]);
        let tmp = begin_save(dir.path(), 4).unwrap();
        write_optim_state(&tmp, 1, &[2.0; 3]).unwrap();
        write_model_file(&tmp, &m, &params(1.0)).unwrap();
        write_optim_state(&tmp, 0, &[1.0; 5]).unwrap();
        let good = finish_save(dir.path(), &m).unwrap();
        assert_eq!(verify(&good).unwrap(), Integrity::Verified);
        let files = [
            COMPLETE_MARKER,
            META_FILE,
            MODEL_FILE,
            "optim_rank0.safetensors",
            "optim_rank1.safetensors",
        ];
        for file in files {
            let len = std::fs::metadata(good.join(file)).unwrap().len() as usize;
            for at in [0, len / 2, len - 1] {
                let bad = dir.path().join("bad");
                let _ = std::fs::remove_dir_all(&bad);
                std::fs::create_dir_all(&bad).unwrap();
                for f in files {
                    std::fs::copy(good.join(f), bad.join(f)).unwrap();
                }
                let mut bytes = std::fs::read(bad.join(file)).unwrap();
                bytes[at] ^= 0x10;
                std::fs::write(bad.join(file), &bytes).unwrap();
                let named = bad.join(file).display().to_string();
                let e = verify(&bad).unwrap_err();
                assert!(e.message.contains(&named), "{file} byte {at}: {e}");
                assert!(!e.message.contains('\n'), "{file} byte {at}: one line: {e}");
                // the loaders refuse it too (the marker and meta.json are read by each)
                let mut p = vec![0.0f32; tiny().num_params() as usize];
                let loaded = match file {
                    MODEL_FILE => load_params(&bad, &tiny(), &mut p),
                    "optim_rank0.safetensors" => load_optim_state(&bad, 0, &mut [0.0; 5]),
                    "optim_rank1.safetensors" => load_optim_state(&bad, 1, &mut [0.0; 3]),
                    _ => load_meta(&bad).map(|_| ()),
                };
                let e = loaded.unwrap_err();
                assert!(e.message.contains(&named), "load of {file} byte {at}: {e}");
            }
        }
        assert_eq!(verify(&good).unwrap(), Integrity::Verified);
    }

    /// A checkpoint written before checksums (the marker holds the step alone, meta.json no `files`) loads,
    /// and `verify` says it has nothing to check against.
    #[test]
    fn checkpoints_without_checksums_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = save(dir.path(), &meta(2), &params(1.0), &[&[3.0; 5]]).unwrap();
        let mut old = load_meta(&path).unwrap();
        old.files.clear();
        std::fs::write(path.join(META_FILE), serde_json::to_string_pretty(&old).unwrap()).unwrap();
        std::fs::write(path.join(COMPLETE_MARKER), "2\n").unwrap();
        assert_eq!(verify(&path).unwrap(), Integrity::Unrecorded);
        let mut q = vec![0.0f32; params(1.0).len()];
        load_params(&path, &tiny(), &mut q).unwrap();
        assert_eq!(q, params(1.0));
        let mut st = [0.0f32; 5];
        load_optim_state(&path, 0, &mut st).unwrap();
        assert_eq!(st, [3.0; 5]);
    }

    #[test]
    fn saving_the_same_step_twice_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &meta(5), &params(1.0), &[&[0.0; 5]]).unwrap();
        let path = save(dir.path(), &meta(5), &params(3.0), &[&[0.0; 5]]).unwrap();
        let mut q = vec![0.0f32; params(3.0).len()];
        load_params(&path, &tiny(), &mut q).unwrap();
        assert_eq!(q, params(3.0));
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = save(dir.path(), &meta(3), &params(1.0), &[&[0.0; 5]]).unwrap();
        // truncate the weights
        let w = path.join(MODEL_FILE);
        let bytes = std::fs::read(&w).unwrap();
        std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
        let mut q = vec![0.0f32; params(1.0).len()];
        let e = load_params(&path, &tiny(), &mut q).unwrap_err();
        assert!(
            e.message.contains("corrupt") && e.message.contains("--resume PATH"),
            "{e}"
        );
        // wrong state length
        let e = load_optim_state(&path, 0, &mut [0.0; 4]).unwrap_err();
        assert!(e.message.contains("expected F32 [4]"), "{e}");
        // garbage meta.json
        std::fs::write(path.join(META_FILE), "{not json").unwrap();
        assert!(load_meta(&path).unwrap_err().message.contains("corrupt"));
    }
}
