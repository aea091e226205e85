//! The CORE eval bundle, laid out as nanochat reads it (`scripts/base_eval.py`):
//!
//! - `core.yaml`: `icl_tasks`, a list of {label, dataset_uri, num_fewshot: [N, ...] (the first is used),
//!   icl_task_type, continuation_delimiter (default " ")};
//! - `eval_meta_data.csv`: one row per task, its `Eval Task` label and `Random baseline` (percent);
//! - `eval_data/<dataset_uri>`: one JSON object per line.

use crate::bail;
use crate::error::{NcError, Result};
use crate::eval::render::TaskType;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

pub const CONFIG_FILE: &str = "core.yaml";
pub const META_FILE: &str = "eval_meta_data.csv";
pub const DATA_DIR: &str = "eval_data";

/// One task of core.yaml with its random baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub label: String,
    pub task_type: TaskType,
    pub dataset_uri: String,
    pub num_fewshot: usize,
    pub continuation_delimiter: String,
    /// Accuracy of random guessing, in percent (eval_meta_data.csv's `Random baseline`).
    pub random_baseline: f64,
}

/// The task list of a bundle folder.
#[derive(Debug, Clone)]
pub struct EvalBundle {
    pub dir: PathBuf,
    pub tasks: Vec<TaskSpec>,
}

/// nanochat's bundle folder: `$NANOCHAT_BASE_DIR/eval_bundle`, by default `~/.cache/nanochat/eval_bundle`.
pub fn default_bundle_dir() -> Result<PathBuf> {
    crate::data::download::nanochat_subdir("eval_bundle", "eval bundle folder", "--eval-bundle DIR")
}

/// The line that tells a user how to get the bundle.
pub fn how_to_get_bundle(dir: &Path) -> String {
    format!(
        "no CORE eval bundle at {} (run `nc-data download --eval-bundle`, or pass --eval-bundle DIR)",
        dir.display()
    )
}

impl EvalBundle {
    /// Reads core.yaml and eval_meta_data.csv of `dir`; every task must have a baseline row.
    pub fn load(dir: &Path) -> Result<EvalBundle> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            bail!("{}", how_to_get_bundle(dir));
        }
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| NcError::new(format!("{}: {e}", p.display())));
        let config = read(&config_path)?;
        let meta = read(&dir.join(META_FILE))?;
        let baselines = parse_baselines(&meta).map_err(|e| e.context(dir.join(META_FILE).display()))?;
        let tasks = parse_core_yaml(&config, &baselines).map_err(|e| e.context(config_path.display()))?;
        Ok(EvalBundle {
            dir: dir.to_path_buf(),
            tasks,
        })
    }

    /// The examples of one task, in file order.
    pub fn load_examples(&self, task: &TaskSpec) -> Result<Vec<Value>> {
        let path = self.dir.join(DATA_DIR).join(&task.dataset_uri);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            NcError::new(format!(
                "{}: {e} (task {}; is the eval bundle complete?)",
                path.display(),
                task.label
            ))
        })?;
        let mut examples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .map_err(|e| NcError::new(format!("{} line {}: not JSON: {e}", path.display(), i + 1)))?;
            if !v.is_object() {
                bail!("{} line {}: expected a JSON object", path.display(), i + 1);
            }
            examples.push(v);
        }
        if examples.is_empty() {
            bail!("{}: no examples (task {})", path.display(), task.label);
        }
        Ok(examples)
    }
}

fn yaml_str(task: &Yaml, key: &str, label: &str) -> Result<String> {
    match &task[key] {
        Yaml::String(s) => Ok(s.clone()),
        Yaml::Integer(i) => Ok(i.to_string()),
        Yaml::BadValue => bail!("task '{label}' has no {key}"),
        other => bail!("task '{label}': {key} must be a string, got {other:?}"),
    }
}

/// core.yaml's `icl_tasks` with each task's baseline from `baselines`.
pub fn parse_core_yaml(text: &str, baselines: &HashMap<String, f64>) -> Result<Vec<TaskSpec>> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| NcError::new(format!("not valid YAML: {e}")))?;
    let Some(list) = docs.first().and_then(|d| d["icl_tasks"].as_vec()) else {
        bail!("no icl_tasks list");
    };
    let mut tasks = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let label = match t["label"].as_str() {
            Some(l) => l.to_string(),
            None => bail!("task {} has no label", i + 1),
        };
        let num_fewshot = match &t["num_fewshot"] {
            Yaml::Array(a) => a.first().and_then(|v| v.as_i64()),
            Yaml::Integer(n) => Some(*n),
            _ => None,
        };
        let Some(num_fewshot) = num_fewshot.filter(|&n| n >= 0) else {
            bail!("task '{label}': num_fewshot must be a list of non-negative integers");
        };
        let continuation_delimiter = match &t["continuation_delimiter"] {
            Yaml::BadValue => " ".to_string(),
            _ => yaml_str(t, "continuation_delimiter", &label)?,
        };
        let Some(&random_baseline) = baselines.get(&label) else {
            bail!("task '{label}' has no row in {META_FILE}");
        };
        tasks.push(TaskSpec {
            task_type: TaskType::parse(&yaml_str(t, "icl_task_type", &label)?)
                .map_err(|e| e.context(format!("task '{label}'")))?,
            dataset_uri: yaml_str(t, "dataset_uri", &label)?,
            num_fewshot: num_fewshot as usize,
            continuation_delimiter,
            random_baseline,
            label,
        });
    }
    Ok(tasks)
}

/// `Eval Task` -> `Random baseline` from eval_meta_data.csv (RFC 4180: quoted fields may hold commas,
/// newlines and doubled quotes).
pub fn parse_baselines(text: &str) -> Result<HashMap<String, f64>> {
    let rows = parse_csv(text)?;
    let Some(header) = rows.first() else {
        bail!("empty file");
    };
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| NcError::new(format!("no '{name}' column")))
    };
    let (task_col, base_col) = (col("Eval Task")?, col("Random baseline")?);
    let mut out = HashMap::new();
    for (r, row) in rows.iter().enumerate().skip(1) {
        if row.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        let (Some(task), Some(base)) = (row.get(task_col), row.get(base_col)) else {
            bail!("row {} has too few fields", r + 1);
        };
        let base: f64 = base
            .trim()
            .parse()
            .map_err(|_| NcError::new(format!("row {}: Random baseline '{base}' is not a number", r + 1)))?;
        out.insert(task.trim().to_string(), base);
    }
    Ok(out)
}

fn parse_csv(text: &str) -> Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    let (mut row, mut field) = (Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        bail!("a quoted field is not closed");
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}
