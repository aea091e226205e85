//! The CORE metric during training (nanochat's `core_metric_every` / `core_metric_max_per_task`): every N
//! steps (not at step 0) and at the last step, rank 0 evaluates the training model on the eval bundle's
//! tasks, cut to M examples each, logs the CORE metric and writes it with the centered accuracies to
//! metrics.jsonl. Rows longer than the training length are cropped to it (and counted; see eval::run).
//! Without a bundle it is off, with one line saying how to get it.

use crate::backend::Backend;
use crate::data::Tokenizer;
use crate::eval::bundle::how_to_get_bundle;
use crate::eval::{default_bundle_dir, evaluate_core, CoreOptions, CoreResults, EvalBundle, FixedModel};
use crate::model::Gpt;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// nanochat's defaults for `nc-train` (every 2000 steps, 500 examples per task); the library's default is off.
pub const NANOCHAT_CORE_METRIC_EVERY: u64 = 2000;
pub const NANOCHAT_CORE_METRIC_MAX_PER_TASK: usize = 500;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CoreMetricConfig {
    /// Steps between evaluations; 0 = never.
    pub every: u64,
    /// Examples per task (0 = all).
    pub max_per_task: usize,
    /// The bundle folder; None = nanochat's default folder.
    pub bundle: Option<PathBuf>,
}

/// The loaded bundle when the metric is on.
pub struct CoreMetric {
    every: u64,
    max_per_task: usize,
    bundle: Option<EvalBundle>,
}

impl CoreMetric {
    /// Loads the bundle when the metric is on; when it cannot, says so once through `say` and stays off.
    pub fn new(cfg: &CoreMetricConfig, say: &mut dyn FnMut(String)) -> CoreMetric {
        let bundle = if cfg.every == 0 {
            None
        } else {
            let dir = match &cfg.bundle {
                Some(d) => Ok(d.clone()),
                None => default_bundle_dir(),
            };
            match dir.and_then(|d| {
                if d.join(crate::eval::bundle::CONFIG_FILE).is_file() {
                    EvalBundle::load(&d)
                } else {
                    Err(crate::error::NcError::new(how_to_get_bundle(&d)))
                }
            }) {
                Ok(b) => Some(b),
                Err(e) => {
                    say(format!("CORE metric off: {e}"));
                    None
                }
            }
        };
        CoreMetric {
            every: cfg.every,
            max_per_task: cfg.max_per_task,
            bundle,
        }
    }

    /// nanochat's schedule: the last step, and every `every` steps after step 0.
    pub fn due(&self, step: u64, last_step: bool) -> bool {
        self.bundle.is_some() && (last_step || (step > 0 && step.is_multiple_of(self.every)))
    }

    /// One evaluation. A failure (a malformed bundle, a task with fewer examples than its shots) must not end
    /// a training run: it is said once and the metric is off from then on.
    pub fn evaluate<B: Backend>(
        &mut self,
        model: &mut Gpt<B>,
        tok: &Tokenizer,
        say: &mut dyn FnMut(String),
    ) -> Option<CoreResults> {
        let bundle = self.bundle.as_ref()?;
        let opts = CoreOptions {
            max_per_task: Some(self.max_per_task).filter(|&m| m > 0),
            rank: 0,
            world_size: 1,
        };
        match evaluate_core(&mut FixedModel(model), tok, bundle, opts, &mut |_| Ok(()), &mut |_| {}) {
            Ok(res) => Some(res),
            Err(e) => {
                say(format!("CORE metric failed, off for the rest of the run: {e}"));
                self.bundle = None;
                None
            }
        }
    }
}

/// The metrics.jsonl record of one evaluation (nanochat logs core_metric and centered_results).
pub fn metrics_record(step: u64, res: &CoreResults) -> serde_json::Value {
    let json = res.to_json();
    let cropped: usize = res.tasks.iter().map(|t| t.cropped).sum();
    serde_json::json!({"step": step, "core_metric": res.core_metric, "centered_results": json["centered_results"],
                       "core_rows_cropped": cropped})
}
