//! The CORE metric during training (nanochat's `core_metric_every` / `core_metric_max_per_task`): every N
//! steps (not at step 0) and at the last step, every rank evaluates the training model on its share of each
//! task's examples (rank r takes r, r + world_size, ..., as nanochat's ranks do), the results are summed
//! over the ranks, and rank 0 logs the CORE metric and writes it with the centered accuracies to
//! metrics.jsonl. Rows longer than the training length are cropped to it (and counted; see eval::run).
//! Without a bundle it is off, with one line saying how to get it; it is on only when every rank has one.

use crate::backend::Backend;
use crate::data::Tokenizer;
use crate::error::Result;
use crate::eval::bundle::how_to_get_bundle;
use crate::eval::{default_bundle_dir, evaluate_core, CoreOptions, CoreResults, EvalBundle, FixedModel};
use crate::model::Gpt;
use crate::train::sync::{any_rank, comm_err};
use nc_comm::Collective;
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

    /// Several ranks: on only when every rank loaded the bundle (they all evaluate, or none does).
    pub fn agree(&mut self, comm: &mut dyn Collective, say: &mut dyn FnMut(String)) -> Result<()> {
        let wanted = self.every > 0;
        if any_rank(comm, wanted && self.bundle.is_none())? && self.bundle.is_some() {
            say(
                "CORE metric off: another rank could not load the eval bundle (each rank reads its own copy: \
                 get it on every machine with nc-data download --eval-bundle)"
                    .into(),
            );
            self.bundle = None;
        }
        Ok(())
    }

    /// nanochat's schedule: the last step, and every `every` steps after step 0.
    pub fn due(&self, step: u64, last_step: bool) -> bool {
        self.bundle.is_some() && (last_step || (step > 0 && step.is_multiple_of(self.every)))
    }

    /// One evaluation, this rank's share of the examples; with `comm` (several ranks) every rank must call it
    /// at the same step, and every rank gets the whole result. A failure (a malformed bundle, a task with
    /// fewer examples than its shots) must not end a training run: it is said once and the metric is off
    /// from then on, on every rank (a rank that fails tells the others through the reduction).
    pub fn evaluate<B: Backend>(
        &mut self,
        model: &mut Gpt<B>,
        tok: &Tokenizer,
        mut comm: Option<&mut dyn Collective>,
        say: &mut dyn FnMut(String),
    ) -> Option<CoreResults> {
        let bundle = self.bundle.as_ref()?;
        let (rank, world_size) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world_size()));
        let opts = CoreOptions {
            max_per_task: Some(self.max_per_task).filter(|&m| m > 0),
            rank,
            world_size,
        };
        let mut reduce = |v: &mut [f32]| match comm.as_mut() {
            Some(c) => c.all_reduce_sum(v).map_err(comm_err),
            None => Ok(()),
        };
        // the working weights (bf16) are read by the forward: current after a step, not yet after a resume
        model.refresh_weights();
        match evaluate_core(&mut FixedModel(model), tok, bundle, opts, &mut reduce, &mut |_| {}) {
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
