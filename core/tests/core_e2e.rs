//! CORE end to end against an independent computation: a synthetic bundle (fixtures/core_eval/e2e/bundle:
//! multiple choice, schema and language-modeling tasks about nc's embedded corpus, 0 to 10 shots, one task
//! whose rows are longer than the training length) and a small model trained by nc-train on that corpus
//! (e2e/checkpoint). e2e/expected.json was computed by e2e/make_e2e.py with nanochat's own prompt and span
//! functions, CPython's random, tiktoken and a float64 numpy forward over the same weights.
//!
//! Checked: every row's length (rendering, few-shot draw, tokenization, spans), every row's mean loss (to
//! 2e-5 absolute, f32 forward vs f64, measured 3.5e-6; the smallest gap between an example's two lowest mean losses in the
//! fixture is 2.5e-3, so no verdict hinges on rounding), every task's accuracy and centered accuracy and the
//! CORE metric (exactly: the same f32 mean and f64 formulas), with and without max_per_task; two ranks
//! striding the examples give the one-rank result; the training model (128 positions) crops the long rows
//! and counts them.

use nc_core::backend::cpu::CpuBackend;
use nc_core::checkpoint::{load_meta, load_params};
use nc_core::data::load_tokenizer;
use nc_core::eval::example::{prepare_example, Row};
use nc_core::eval::run::{evaluate_examples, task_examples};
use nc_core::eval::score::score_rows;
use nc_core::eval::{evaluate_core, CoreOptions, CoreResults, EvalBundle, FixedModel, GrowingModel};
use nc_core::model::{Gpt, Recompute};
use nc_core::{ModelConfig, Result};
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/core_eval/e2e"))
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

fn weights() -> (ModelConfig, Vec<f32>) {
    let ckpt = dir().join("checkpoint");
    let cfg = load_meta(&ckpt).unwrap().model_config;
    let mut params = vec![0.0; cfg.num_params() as usize];
    load_params(&ckpt, &cfg, &mut params).unwrap();
    (cfg, params)
}

fn model(cfg: ModelConfig, batch: usize, seq: usize, params: &[f32]) -> Result<Gpt<CpuBackend>> {
    let mut m = Gpt::new(CpuBackend::new(), cfg, batch, seq, Recompute::None)?;
    m.params_mut().copy_from_slice(params);
    Ok(m)
}

fn run_core(max_per_task: Option<usize>, rank: usize, world_size: usize) -> (CoreResults, Vec<Vec<f32>>) {
    let (cfg, params) = weights();
    let tok = load_tokenizer(&dir().join("tokenizer")).unwrap();
    let bundle = EvalBundle::load(&dir().join("bundle")).unwrap();
    let mut models = GrowingModel::new(cfg, 4 * cfg.sequence_len, Box::new(|c, b, s| model(c, b, s, &params)));
    let mut per_task = Vec::new();
    let opts = CoreOptions {
        max_per_task,
        rank,
        world_size,
    };
    let mut keep = |v: &mut [f32]| {
        per_task.push(v.to_vec());
        Ok(())
    };
    let res = evaluate_core(&mut models, &tok, &bundle, opts, &mut keep, &mut |_| {}).unwrap();
    (res, per_task)
}

fn check_against(res: &CoreResults, want: &Value) {
    let labels: Vec<&str> = res.tasks.iter().map(|t| t.label.as_str()).collect();
    assert_eq!(labels.len(), 8);
    for t in &res.tasks {
        assert_eq!(
            t.accuracy,
            want["results"][&t.label].as_f64().unwrap(),
            "{} accuracy",
            t.label
        );
        assert_eq!(
            t.centered,
            want["centered_results"][&t.label].as_f64().unwrap(),
            "{} centered",
            t.label
        );
    }
    assert_eq!(res.core_metric, want["core_metric"].as_f64().unwrap());
    let json = res.to_json();
    assert_eq!(json["results"], want["results"]);
    assert_eq!(json["centered_results"], want["centered_results"]);
}

#[test]
fn per_task_accuracies_and_core_equal_the_independent_computation() {
    let want = expected();
    let (all, _) = run_core(None, 0, 1);
    check_against(&all, &want["all"]);
    // the fixture is not degenerate: accuracies strictly between 0 and 1 occur
    assert!(all.tasks.iter().any(|t| t.accuracy > 0.0 && t.accuracy < 1.0));
    let long = all.tasks.iter().find(|t| t.label == "counting_long").unwrap();
    assert_eq!(long.beyond_train_len, 30);
    assert_eq!(long.cropped, 0, "nc-eval's model grows instead of cropping");
    let (cut, _) = run_core(Some(12), 0, 1);
    check_against(&cut, &want["max_per_task_12"]);
    assert!(cut.tasks.iter().all(|t| t.examples == 12));
}

#[test]
fn rows_and_mean_losses_equal_the_independent_computation() {
    let want = expected();
    let (cfg, params) = weights();
    let tok = load_tokenizer(&dir().join("tokenizer")).unwrap();
    let bundle = EvalBundle::load(&dir().join("bundle")).unwrap();
    let mut m = model(
        ModelConfig {
            sequence_len: 512,
            ..cfg
        },
        4,
        512,
        &params,
    )
    .unwrap();
    let mut worst = 0.0f64;
    for (task, want_task) in bundle.tasks.iter().zip(want["all"]["tasks"].as_array().unwrap()) {
        assert_eq!(task.label, want_task["label"].as_str().unwrap());
        let data = task_examples(&bundle, task, None).unwrap();
        let want_examples = want_task["examples"].as_array().unwrap();
        assert_eq!(data.len(), want_examples.len());
        for (idx, we) in want_examples.iter().enumerate() {
            let ex = prepare_example(task, &data, idx, &tok).unwrap();
            let lengths: Vec<u64> = ex.rows.iter().map(|r| r.tokens.len() as u64).collect();
            let want_lengths: Vec<u64> = serde_json::from_value(we["row_lengths"].clone()).unwrap();
            assert_eq!(lengths, want_lengths, "{} example {idx}", task.label);
            let rows: Vec<&Row> = ex.rows.iter().collect();
            let scores = score_rows(&mut m, &rows, tok.bos_id()).unwrap();
            for (s, w) in scores.iter().zip(we["mean_losses"].as_array().unwrap()) {
                let err = (s.mean_loss - w.as_f64().unwrap()).abs();
                worst = worst.max(err);
                assert!(
                    err < 2e-5,
                    "{} example {idx}: mean loss {} vs {w}",
                    task.label,
                    s.mean_loss
                );
            }
        }
    }
    eprintln!("largest mean-loss difference vs the f64 reference: {worst:.2e}");
}

#[test]
fn two_ranks_striding_equal_one_rank() {
    let (one, per_task_one) = run_core(Some(20), 0, 1);
    let (_, r0) = run_core(Some(20), 0, 2);
    let (_, r1) = run_core(Some(20), 1, 2);
    assert!(per_task_one.is_empty(), "world size 1 reduces nothing");
    assert_eq!((r0.len(), r1.len()), (2 * one.tasks.len(), 2 * one.tasks.len()));
    // two reductions per task: [failed, rows beyond, rows cropped], then the per-example results
    for (t, (s0, s1)) in one.tasks.iter().zip(r0.iter().step_by(2).zip(r1.iter().step_by(2))) {
        assert_eq!(s0[0] + s1[0], 0.0, "{}: no rank failed", t.label);
        assert_eq!((s0[1] + s1[1]) as usize, t.beyond_train_len, "{}", t.label);
    }
    for (t, (a, b)) in one
        .tasks
        .iter()
        .zip(r0.iter().skip(1).step_by(2).zip(r1.iter().skip(1).step_by(2)))
    {
        // each example is evaluated by exactly one rank: the halves never overlap and sum to one rank's count
        let owned = |v: &Vec<f32>, rank: usize| v.iter().enumerate().all(|(i, &x)| x == 0.0 || i % 2 == rank);
        assert!(owned(a, 0) && owned(b, 1), "{}", t.label);
        let correct: f32 = a.iter().chain(b).sum();
        assert_eq!(correct, (t.accuracy * t.examples as f64).round() as f32, "{}", t.label);
    }
}

#[test]
fn training_model_crops_long_rows_and_counts_them() {
    let (cfg, params) = weights();
    let tok = load_tokenizer(&dir().join("tokenizer")).unwrap();
    let bundle = EvalBundle::load(&dir().join("bundle")).unwrap();
    let mut m = model(cfg, 2, cfg.sequence_len, &params).unwrap();
    let task = bundle.tasks.iter().find(|t| t.label == "counting_long").unwrap();
    let data = task_examples(&bundle, task, None).unwrap();
    let (correct, beyond, cropped) = evaluate_examples(&mut FixedModel(&mut m), &tok, task, &data, 0, 1).unwrap();
    assert_eq!((beyond, cropped, correct.len()), (30, 30, 30));
}

#[test]
fn a_rank_that_fails_a_task_fails_every_rank_instead_of_hanging() {
    let (cfg, params) = weights();
    let tok = load_tokenizer(&dir().join("tokenizer")).unwrap();
    let bundle = EvalBundle::load(&dir().join("bundle")).unwrap();
    let mut models = GrowingModel::new(cfg, 4 * cfg.sequence_len, Box::new(|c, b, s| model(c, b, s, &params)));
    let opts = CoreOptions {
        max_per_task: Some(4),
        rank: 0,
        world_size: 2,
    };
    // the reduction as rank 0 sees it when rank 1 failed the first task: rank 1 adds its failure flag to the
    // status vector and then waits for nothing more
    let mut calls = 0;
    let mut other_rank_failed = |v: &mut [f32]| {
        calls += 1;
        if calls > 1 {
            return Err(nc_core::error::NcError::new(
                "rank 0 entered a reduction rank 1 never joins",
            ));
        }
        v[0] += 1.0;
        Ok(())
    };
    let err = evaluate_core(&mut models, &tok, &bundle, opts, &mut other_rank_failed, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("animal_color: another rank failed"), "{err}");
}
