//! The CORE metric over a bundle (nanochat's `evaluate_task` and `evaluate_model`):
//!
//! - each task's examples shuffled with `random.Random(1337)`, then cut to `max_per_task`;
//! - rank r of `world_size` evaluates examples r, r + world_size, ...; the per-example results are summed over
//!   ranks (`reduce`, an all-reduce: every rank gets the whole result) and the accuracy is their mean, in f32
//!   as nanochat's float32 tensor mean gives it;
//! - centered accuracy `(acc - 0.01 * baseline) / (1 - 0.01 * baseline)`; CORE = the mean over tasks.
//!
//! Sequences longer than the model's training length: nanochat's own models evaluate them whole (its rotary
//! table covers 10x the training length). nc-eval does the same (`GrowingModel` rebuilds the model with a
//! longer rotary table when a task needs it) and counts them (`beyond_train_len`); the estimate during
//! training runs on the training model itself (`FixedModel`), which crops such rows to their last
//! `sequence_len` tokens as nanochat crops for GPT-2, and counts them (`cropped`).

use crate::backend::Backend;
use crate::bail;
use crate::config::ModelConfig;
use crate::data::Tokenizer;
use crate::error::Result;
use crate::eval::bundle::{EvalBundle, TaskSpec};
use crate::eval::example::{crop_rows, is_correct, prepare_example, PreparedExample, Row};
use crate::eval::pyrandom::PyRandom;
use crate::eval::render::TaskType;
use crate::eval::score::score_rows;
use crate::model::Gpt;
use serde_json::{json, Value};
use std::time::Instant;

/// Examples prepared and scored together: bounds the memory of prepared rows.
const EXAMPLES_PER_PASS: usize = 256;

/// Which model scores rows of up to a given length.
pub trait EvalModel<B: Backend> {
    /// The model's training length (rows longer than it are counted).
    fn train_len(&self) -> usize;
    /// A model for rows of up to `longest` tokens (it may have fewer positions: the caller crops).
    fn model_for(&mut self, longest: usize) -> Result<&mut Gpt<B>>;
}

/// The model as it is (the training loop's): longer rows are cropped.
pub struct FixedModel<'a, B: Backend>(pub &'a mut Gpt<B>);

impl<B: Backend> EvalModel<B> for FixedModel<'_, B> {
    fn train_len(&self) -> usize {
        self.0.cfg.sequence_len
    }
    fn model_for(&mut self, _longest: usize) -> Result<&mut Gpt<B>> {
        Ok(self.0)
    }
}

/// Builds a model with `batch` x `seq` positions and `cfg` (whose sequence_len it may raise), weights loaded.
pub type ModelMaker<'a, B> = Box<dyn FnMut(ModelConfig, usize, usize) -> Result<Gpt<B>> + 'a>;

/// A model rebuilt with more positions whenever a task has longer rows (nanochat evaluates them uncropped).
pub struct GrowingModel<'a, B: Backend> {
    cfg: ModelConfig,
    batch_tokens: usize,
    make: ModelMaker<'a, B>,
    model: Option<Gpt<B>>,
}

impl<'a, B: Backend> GrowingModel<'a, B> {
    /// `batch_tokens`: tokens per forward (rows x their padded length), at least one row of any length.
    pub fn new(cfg: ModelConfig, batch_tokens: usize, make: ModelMaker<'a, B>) -> Self {
        GrowingModel {
            cfg,
            batch_tokens,
            make,
            model: None,
        }
    }
}

impl<B: Backend> EvalModel<B> for GrowingModel<'_, B> {
    fn train_len(&self) -> usize {
        self.cfg.sequence_len
    }
    fn model_for(&mut self, longest: usize) -> Result<&mut Gpt<B>> {
        let have = self.model.as_ref().map_or(0, |m| m.cfg.sequence_len);
        if self.model.is_none() || longest > have {
            // Round up so a few slightly longer rows later do not each cost a rebuild.
            let seq = self.cfg.sequence_len.max(longest.div_ceil(256) * 256);
            self.model = None; // free the old one first
            let cfg = ModelConfig {
                sequence_len: seq,
                ..self.cfg
            };
            self.model = Some((self.make)(cfg, (self.batch_tokens / seq).max(1), seq)?);
        }
        Ok(self.model.as_mut().expect("built above"))
    }
}

/// One task's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    pub label: String,
    pub task_type: TaskType,
    pub num_fewshot: usize,
    /// Examples evaluated (over all ranks).
    pub examples: usize,
    pub accuracy: f64,
    pub centered: f64,
    pub seconds: f64,
    /// Rows longer than the training length (over all ranks).
    pub beyond_train_len: usize,
    /// Of those, rows cropped to the model's positions (over all ranks).
    pub cropped: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CoreResults {
    pub tasks: Vec<TaskResult>,
    pub core_metric: f64,
}

/// How to run CORE.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoreOptions {
    /// Examples per task after the shuffle (nanochat's max_per_task; None = all).
    pub max_per_task: Option<usize>,
    pub rank: usize,
    pub world_size: usize,
}

/// A task's examples as nanochat orders them: file order shuffled by `random.Random(1337)`, then the first
/// `max_per_task`.
pub fn task_examples(bundle: &EvalBundle, task: &TaskSpec, max_per_task: Option<usize>) -> Result<Vec<Value>> {
    let mut data = bundle.load_examples(task)?;
    PyRandom::new(1337).shuffle(&mut data);
    if let Some(m) = max_per_task.filter(|&m| m > 0) {
        data.truncate(m);
    }
    Ok(data)
}

/// The per-example results of this rank's examples (1.0 correct, 0.0 not; other ranks' entries 0), and the
/// row counts (beyond the training length, cropped).
pub fn evaluate_examples<B: Backend>(
    models: &mut dyn EvalModel<B>,
    tok: &Tokenizer,
    task: &TaskSpec,
    data: &[Value],
    rank: usize,
    world_size: usize,
) -> Result<(Vec<f32>, usize, usize)> {
    let mut correct = vec![0.0f32; data.len()];
    let (mut beyond, mut cropped) = (0, 0);
    let mine: Vec<usize> = (rank..data.len()).step_by(world_size.max(1)).collect();
    for pass in mine.chunks(EXAMPLES_PER_PASS) {
        let mut prepared: Vec<PreparedExample> = pass
            .iter()
            .map(|&idx| {
                prepare_example(task, data, idx, tok).map_err(|e| e.context(format!("{} example {idx}", task.label)))
            })
            .collect::<Result<_>>()?;
        let longest = prepared
            .iter()
            .flat_map(|p| &p.rows)
            .map(|r| r.tokens.len())
            .max()
            .unwrap_or(1);
        let train_len = models.train_len();
        let model = models.model_for(longest)?;
        let positions = model.cfg.sequence_len;
        for p in prepared.iter_mut() {
            beyond += p.rows.iter().filter(|r| r.tokens.len() > train_len).count();
            cropped += crop_rows(&mut p.rows, positions)
                .map_err(|e| e.context(format!("{} example {}", task.label, p.idx)))?;
        }
        let rows: Vec<&Row> = prepared.iter().flat_map(|p| &p.rows).collect();
        let scores = score_rows(model, &rows, tok.bos_id())?;
        let mut at = 0;
        for p in &prepared {
            let n = p.rows.len();
            correct[p.idx] = if is_correct(p, &scores[at..at + n]) { 1.0 } else { 0.0 };
            at += n;
        }
    }
    Ok((correct, beyond, cropped))
}

/// nanochat's accuracy: the mean of a float32 tensor of 0/1 (sum exact below 2^24, one f32 division).
pub fn accuracy_of(correct: &[f32]) -> f64 {
    let sum: f32 = correct.iter().sum();
    (sum / correct.len() as f32) as f64
}

pub fn centered_accuracy(accuracy: f64, random_baseline: f64) -> f64 {
    (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)
}

/// One task on one rank: per-example results (other ranks' examples 0) and row counts.
struct TaskOutcome {
    correct: Vec<f32>,
    beyond: usize,
    cropped: usize,
}

/// The task's outcome summed over the ranks, in two reductions: first [failed, beyond, cropped], then, when no
/// rank failed, the per-example results. A rank that failed still joins the first one, so the others learn
/// it and return an error too instead of waiting forever in the second (a rank's copy of the bundle may be
/// damaged where the others' is not). The counts are exact in f32 below 2^24.
fn sum_over_ranks(
    outcome: Result<TaskOutcome>,
    label: &str,
    reduce: &mut dyn FnMut(&mut [f32]) -> Result<()>,
) -> Result<TaskOutcome> {
    let mut status = match &outcome {
        Ok(o) => [0.0, o.beyond as f32, o.cropped as f32],
        Err(_) => [1.0, 0.0, 0.0],
    };
    reduce(&mut status)?;
    let mut o = outcome?;
    if status[0] > 0.0 {
        bail!("{label}: another rank failed to evaluate this task (its error is in its own log)");
    }
    reduce(&mut o.correct)?;
    o.beyond = status[1] as usize;
    o.cropped = status[2] as usize;
    Ok(o)
}

/// Every task of the bundle. `reduce` sums a vector over ranks (nothing to do at world size 1); `on_task`
/// sees each task's result as it is done (for printing).
pub fn evaluate_core<B: Backend>(
    models: &mut dyn EvalModel<B>,
    tok: &Tokenizer,
    bundle: &EvalBundle,
    opts: CoreOptions,
    reduce: &mut dyn FnMut(&mut [f32]) -> Result<()>,
    on_task: &mut dyn FnMut(&TaskResult),
) -> Result<CoreResults> {
    if bundle.tasks.is_empty() {
        bail!("{}: core.yaml lists no tasks", bundle.dir.display());
    }
    let mut tasks = Vec::with_capacity(bundle.tasks.len());
    for task in &bundle.tasks {
        let t0 = Instant::now();
        let outcome = task_examples(bundle, task, opts.max_per_task).and_then(|data| {
            let (correct, beyond, cropped) = evaluate_examples(models, tok, task, &data, opts.rank, opts.world_size)?;
            Ok(TaskOutcome {
                correct,
                beyond,
                cropped,
            })
        });
        let TaskOutcome {
            correct,
            beyond,
            cropped,
        } = if opts.world_size > 1 {
            sum_over_ranks(outcome, &task.label, reduce)?
        } else {
            outcome?
        };
        let accuracy = accuracy_of(&correct);
        let result = TaskResult {
            label: task.label.clone(),
            task_type: task.task_type,
            num_fewshot: task.num_fewshot,
            examples: correct.len(),
            accuracy,
            centered: centered_accuracy(accuracy, task.random_baseline),
            seconds: t0.elapsed().as_secs_f64(),
            beyond_train_len: beyond,
            cropped,
        };
        on_task(&result);
        tasks.push(result);
    }
    let core_metric = tasks.iter().map(|t| t.centered).sum::<f64>() / tasks.len() as f64;
    Ok(CoreResults { tasks, core_metric })
}

impl CoreResults {
    /// nanochat's keys (`results`, `centered_results`, `core_metric`), tasks in core.yaml order, plus nc's
    /// `tasks` details.
    pub fn to_json(&self) -> Value {
        let mut results = serde_json::Map::new();
        let mut centered = serde_json::Map::new();
        for t in &self.tasks {
            results.insert(t.label.clone(), json!(t.accuracy));
            centered.insert(t.label.clone(), json!(t.centered));
        }
        let details: Vec<Value> = self
            .tasks
            .iter()
            .map(|t| {
                json!({"label": t.label, "task_type": t.task_type.name(), "num_fewshot": t.num_fewshot,
                       "examples": t.examples, "accuracy": t.accuracy, "centered": t.centered,
                       "seconds": t.seconds, "rows_beyond_train_len": t.beyond_train_len,
                       "rows_cropped": t.cropped})
            })
            .collect();
        json!({"results": results, "centered_results": centered, "core_metric": self.core_metric, "tasks": details})
    }

    /// The table nanochat's base_eval writes (`Task, Accuracy, Centered` padded columns, CORE last).
    pub fn to_csv(&self) -> String {
        let mut s = format!("{:<35}, {:<10}, {:<10}\n", "Task", "Accuracy", "Centered");
        for t in &self.tasks {
            s += &format!("{:<35}, {:<10.6}, {:<10.6}\n", t.label, t.accuracy, t.centered);
        }
        s += &format!("{:<35}, {:<10}, {:<10.6}\n", "CORE", "", self.core_metric);
        s
    }
}
