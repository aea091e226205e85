//! Evaluating a base model as nanochat does: the CORE metric (the DCLM paper's in-context-learning suite,
//! nanochat's `core_eval.py` and `base_eval.py` as of October 2025).
//!
//! - `pyrandom`: CPython's Mersenne Twister, `shuffle` and `sample` (nanochat's data order and few-shot draws).
//! - `bundle`: the eval bundle folder (core.yaml, eval_meta_data.csv, eval_data/*.jsonl); `bundle_download`:
//!   fetching it (`nc-data download --eval-bundle`: zip fetched, unpacked safely, renamed into place).
//! - `render`: the prompt of each task type, as nanochat's Jinja templates render it.
//! - `example`: one example from its item to its verdict (few-shot draw, tokens, scored span, decision).
//! - `score`: batched scoring of the rows through the model's forward, on any backend.
//! - `bpb`: loss and bits per byte over a loader (the training loop's validation and `nc-eval --bpb`).
//! - `load`: a checkpoint for `nc-eval`: the folder, its weights, the run's tokenizer and data.
//! - `run`: tasks, ranks striding the examples, accuracies, centered accuracies and CORE; JSON and CSV.

pub mod bpb;
pub mod bundle;
pub mod bundle_download;
pub mod example;
pub mod load;
pub mod pyrandom;
pub mod render;
pub mod run;
pub mod score;

pub use bundle::{default_bundle_dir, EvalBundle, TaskSpec};
pub use run::{evaluate_core, CoreOptions, CoreResults, EvalModel, FixedModel, GrowingModel, TaskResult};
