//! One CORE example, from its item to the verdict (nanochat's `evaluate_example`):
//!
//! 1. few-shot examples: `random.Random(1234 + idx).sample(<every index but idx>, num_fewshot)`;
//! 2. prompts rendered per task type (`render`), each tokenized with BOS prepended (ordinary encoding);
//! 3. which tokens are scored: multiple choice, the tokens after the prompts' common prefix; schema, the
//!    common suffix; language modeling, the tokens of the prompt with the continuation past the one without;
//! 4. the verdict from the model's scores of those tokens (`RowScore`): multiple choice and schema pick the
//!    row with the lowest mean loss (the first on ties), correct if it is `gold`; language modeling is
//!    correct if every scored token is the model's argmax prediction.

use crate::bail;
use crate::data::Tokenizer;
use crate::error::Result;
use crate::eval::bundle::TaskSpec;
use crate::eval::pyrandom::PyRandom;
use crate::eval::render::{gold_index, render, TaskType};
use serde_json::Value;

/// One sequence to score: `tokens`, of which positions start..end are the scored continuation (predicted
/// from positions start-1..end-1).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub tokens: Vec<u32>,
    pub start: usize,
    pub end: usize,
}

/// The rows of one example and what makes it correct.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedExample {
    /// Index in the (shuffled, truncated) task data.
    pub idx: usize,
    pub task_type: TaskType,
    pub rows: Vec<Row>,
    /// The right row for multiple choice and schema.
    pub gold: usize,
}

/// What the model says about a row's scored tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowScore {
    /// Mean cross-entropy (nats) of the scored tokens.
    pub mean_loss: f64,
    /// Whether the argmax prediction equals every scored token.
    pub greedy_match: bool,
}

/// The few-shot indices of example `idx` among `n` (nanochat: seed 1234 + idx, sampled from the others).
pub fn fewshot_indices(n: usize, idx: usize, k: usize) -> Result<Vec<usize>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    if k > n.saturating_sub(1) {
        bail!("{k} few-shot examples requested but the task has only {n} examples");
    }
    let available: Vec<usize> = (0..n).filter(|&i| i != idx).collect();
    Ok(PyRandom::new(1234 + idx as u64).sample(&available, k))
}

/// Length of the common prefix of every sequence (nanochat's `find_common_length(.., 'left')`).
pub fn common_prefix_len(seqs: &[Vec<u32>]) -> usize {
    let min_len = seqs.iter().map(Vec::len).min().unwrap_or(0);
    (0..min_len)
        .find(|&i| seqs.iter().any(|s| s[i] != seqs[0][i]))
        .unwrap_or(min_len)
}

/// Length of the common suffix of every sequence (`find_common_length(.., 'right')`).
pub fn common_suffix_len(seqs: &[Vec<u32>]) -> usize {
    let min_len = seqs.iter().map(Vec::len).min().unwrap_or(0);
    let at = |s: &Vec<u32>, i: usize| s[s.len() - 1 - i];
    (0..min_len)
        .find(|&i| seqs.iter().any(|s| at(s, i) != at(&seqs[0], i)))
        .unwrap_or(min_len)
}

/// Steps 1-3 for example `idx` of `data`.
pub fn prepare_example(task: &TaskSpec, data: &[Value], idx: usize, tok: &Tokenizer) -> Result<PreparedExample> {
    let item = &data[idx];
    let shots: Vec<&Value> = fewshot_indices(data.len(), idx, task.num_fewshot)?
        .into_iter()
        .map(|i| &data[i])
        .collect();
    let prompts = render(task.task_type, item, &task.continuation_delimiter, &shots)?;
    let tokens: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode_with_bos(p)).collect();
    let (rows, gold) = match task.task_type {
        TaskType::MultipleChoice => {
            let start = common_prefix_len(&tokens);
            let gold = gold_index(item, tokens.len())?;
            let rows = tokens.into_iter().map(|t| Row {
                start,
                end: t.len(),
                tokens: t,
            });
            (rows.collect::<Vec<_>>(), gold)
        }
        TaskType::Schema => {
            let suffix = common_suffix_len(&tokens);
            let gold = gold_index(item, tokens.len())?;
            let rows = tokens.into_iter().map(|t| Row {
                start: t.len() - suffix,
                end: t.len(),
                tokens: t,
            });
            (rows.collect::<Vec<_>>(), gold)
        }
        TaskType::LanguageModeling => {
            let (without, with) = (&tokens[0], &tokens[1]);
            if without.len() >= with.len() || with[..without.len()] != without[..] {
                bail!("the prompt without its continuation does not tokenize to a prefix of the prompt with it");
            }
            let row = Row {
                start: without.len(),
                end: with.len(),
                tokens: with.clone(),
            };
            (vec![row], 0)
        }
    };
    // start 0 would score the BOS itself (nothing predicts it): all rows identical or a schema option that is
    // the whole shared suffix. nanochat's slicing is meaningless there too; refuse.
    if rows.iter().any(|r| r.start == 0 || r.start > r.end) {
        bail!("the prompts leave no context before the scored tokens (identical options?)");
    }
    Ok(PreparedExample {
        idx,
        task_type: task.task_type,
        rows,
        gold,
    })
}

/// Keeps the last `max_len` tokens of every longer row and shifts its scored span with it (nanochat's path
/// for models with a maximum length, which it applies to GPT-2 only). Returns how many rows were cropped; a
/// row whose scored tokens and one token of context do not fit is an error.
pub fn crop_rows(rows: &mut [Row], max_len: usize) -> Result<usize> {
    let mut cropped = 0;
    for r in rows.iter_mut().filter(|r| r.tokens.len() > max_len) {
        let cut = r.tokens.len() - max_len;
        if r.start <= cut {
            bail!(
                "a continuation of {} tokens does not fit the model's {max_len} positions with its context",
                r.end - r.start
            );
        }
        r.tokens.drain(..cut);
        r.start -= cut;
        r.end -= cut;
        cropped += 1;
    }
    Ok(cropped)
}

/// Step 4: the verdict from one score per row.
pub fn is_correct(ex: &PreparedExample, scores: &[RowScore]) -> bool {
    match ex.task_type {
        TaskType::LanguageModeling => scores[0].greedy_match,
        TaskType::MultipleChoice | TaskType::Schema => {
            // Python's min then list.index: the first row whose loss nothing before it beats (NaN never wins).
            let mut best = 0;
            for (i, s) in scores.iter().enumerate() {
                if s.mean_loss < scores[best].mean_loss {
                    best = i;
                }
            }
            best == ex.gold
        }
    }
}
