//! What `nc-eval` reads: a checkpoint (a step folder, or a run's out dir meaning its latest), its weights, and
//! the tokenizer and data of the run that wrote it (meta.json's train_config.data), or a tokenizer given.

use crate::bail;
use crate::checkpoint::{self, CheckpointMeta, COMPLETE_MARKER};
use crate::config::ModelConfig;
use crate::data::run_data::{self, DataSource};
use crate::data::{load_tokenizer, Tokenizer};
use crate::error::{NcError, Result};
use std::path::{Path, PathBuf};

/// The checkpoint folder `path` names: itself when complete, else the latest complete one of the out dir.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(COMPLETE_MARKER).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        bail!("--checkpoint {}: no such folder", path.display());
    }
    match checkpoint::latest(path)? {
        Some(dir) => Ok(dir),
        None => bail!(
            "--checkpoint {}: neither a complete checkpoint (no {COMPLETE_MARKER} marker) nor a run folder with \
             checkpoints/step_*; pass a step folder or an nc-train --out-dir",
            path.display()
        ),
    }
}

/// The meta and f32 weights of a checkpoint folder.
pub fn load_weights(dir: &Path) -> Result<(CheckpointMeta, Vec<f32>)> {
    let meta = checkpoint::load_meta(dir)?;
    let mut params = vec![0.0f32; meta.model_config.num_params() as usize];
    checkpoint::load_params(dir, &meta.model_config, &mut params)?;
    Ok((meta, params))
}

/// The data source the checkpoint's run trained on.
pub fn data_source(meta: &CheckpointMeta) -> Result<DataSource> {
    serde_json::from_value(meta.train_config["data"].clone()).map_err(|e| {
        NcError::new(format!(
            "the checkpoint's meta.json does not say which data the run used ({e}); pass --tokenizer DIR"
        ))
    })
}

/// The tokenizer: `--tokenizer DIR` if given, else the run's (its data dir's `tokenizer/`, or the embedded
/// corpus's, rebuilt). Its vocabulary must be the model's.
pub fn tokenizer_for(meta: &CheckpointMeta, given: Option<&Path>, model: &ModelConfig) -> Result<Tokenizer> {
    let tok = match given {
        Some(dir) => load_tokenizer(dir)?,
        None => match data_source(meta)? {
            DataSource::Dir(dir) => load_tokenizer(&dir.join("tokenizer"))
                .map_err(|e| e.context("the run's tokenizer (pass --tokenizer DIR if the data moved)"))?,
            source @ DataSource::Embedded { .. } => run_data::load(&source, 0, 1, 1, 2)?.tokenizer,
        },
    };
    if tok.vocab_size() != model.vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model's vocabulary is {}: pass the run's tokenizer with --tokenizer",
            tok.vocab_size(),
            model.vocab_size
        );
    }
    Ok(tok)
}
