//! Prompt rendering for the three CORE task types, producing exactly the strings nanochat's Jinja templates
//! (`nanochat/core_eval.py`, October 2025) produce. The templates' whitespace control boils down to:
//!
//! - every few-shot example is `<its text><delimiter><its answer>` followed by a blank line ("\n\n");
//! - then the item itself: `<query or context><delimiter><continuation>`;
//! - multiple choice: one prompt per choice (the few-shot answer is `choices[gold]`);
//! - schema: one prompt per context option (the few-shot text is `context_options[gold]`), same continuation;
//! - language modeling: the contexts are trimmed (Python `str.strip`), and two prompts are made, without and with
//!   the item's continuation; the one without is stripped again (so a delimiter of spaces disappears from it).
//!
//! Values print as Jinja prints them (Python's `str`): strings as they are, integers in decimal, true/false as
//! True/False, null as None. Checked against nanochat's own functions in core/tests/core_render.rs.

use crate::bail;
use crate::error::Result;
use serde_json::Value;

/// The three task types of core.yaml's `icl_task_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskType {
    MultipleChoice,
    Schema,
    LanguageModeling,
}

impl TaskType {
    pub fn parse(s: &str) -> Result<TaskType> {
        Ok(match s {
            "multiple_choice" => TaskType::MultipleChoice,
            "schema" => TaskType::Schema,
            "language_modeling" => TaskType::LanguageModeling,
            other => {
                bail!("unsupported icl_task_type '{other}' (CORE has multiple_choice, schema and language_modeling)")
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            TaskType::MultipleChoice => "multiple_choice",
            TaskType::Schema => "schema",
            TaskType::LanguageModeling => "language_modeling",
        }
    }
}

/// Python's `str.isspace` for one character: Unicode White_Space plus the four ASCII separators
/// U+001C..U+001F, which Python counts as whitespace and Rust's `char::is_whitespace` does not.
fn python_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` with no argument (Jinja's `trim` filter).
pub fn python_strip(s: &str) -> &str {
    s.trim_matches(python_isspace)
}

/// A JSON value as Jinja's `{{ value }}` prints it.
fn jinja_str(v: &Value, what: &str) -> Result<String> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => (if *b { "True" } else { "False" }).to_string(),
        Value::Null => "None".to_string(),
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => bail!("field '{what}' is {v}, which nc does not render (expected a string)"),
    })
}

fn field<'a>(item: &'a Value, name: &str) -> Result<&'a Value> {
    match item.get(name) {
        Some(v) => Ok(v),
        None => bail!("the item has no '{name}' field"),
    }
}

fn text_field(item: &Value, name: &str) -> Result<String> {
    jinja_str(field(item, name)?, name)
}

fn list_field<'a>(item: &'a Value, name: &str) -> Result<&'a Vec<Value>> {
    match field(item, name)?.as_array() {
        Some(a) if !a.is_empty() => Ok(a),
        _ => bail!("the item's '{name}' must be a non-empty list"),
    }
}

/// `list[gold]` as rendered text.
fn gold_entry(item: &Value, list_name: &str) -> Result<String> {
    let list = list_field(item, list_name)?;
    let gold = gold_index(item, list.len())?;
    jinja_str(&list[gold], list_name)
}

/// The item's `gold` index, checked against the number of options.
pub fn gold_index(item: &Value, options: usize) -> Result<usize> {
    match field(item, "gold")?.as_u64() {
        Some(g) if (g as usize) < options => Ok(g as usize),
        _ => bail!(
            "the item's 'gold' must be an index below {options}, got {}",
            item["gold"]
        ),
    }
}

/// The few-shot examples as every task type's template writes them: for each, its context part, the
/// delimiter, its answer part and a blank line (`example` gives the two parts).
fn fewshot_head(
    fewshot: &[&Value],
    delimiter: &str,
    example: impl Fn(&Value) -> Result<(String, String)>,
) -> Result<String> {
    let mut head = String::new();
    for ex in fewshot {
        let (context, answer) = example(ex)?;
        head += &context;
        head += delimiter;
        head += &answer;
        head += "\n\n";
    }
    Ok(head)
}

/// Multiple choice: one prompt per choice.
pub fn render_mc(item: &Value, delimiter: &str, fewshot: &[&Value]) -> Result<Vec<String>> {
    let mut head = fewshot_head(fewshot, delimiter, |ex| {
        Ok((text_field(ex, "query")?, gold_entry(ex, "choices")?))
    })?;
    head += &text_field(item, "query")?;
    head += delimiter;
    list_field(item, "choices")?
        .iter()
        .map(|c| Ok(format!("{head}{}", jinja_str(c, "choices")?)))
        .collect()
}

/// Schema: one prompt per context option, all ending in the same continuation.
pub fn render_schema(item: &Value, delimiter: &str, fewshot: &[&Value]) -> Result<Vec<String>> {
    let head = fewshot_head(fewshot, delimiter, |ex| {
        Ok((gold_entry(ex, "context_options")?, text_field(ex, "continuation")?))
    })?;
    let tail = format!("{delimiter}{}", text_field(item, "continuation")?);
    list_field(item, "context_options")?
        .iter()
        .map(|c| Ok(format!("{head}{}{tail}", jinja_str(c, "context_options")?)))
        .collect()
}

/// Language modeling: [prompt without the continuation (stripped), prompt with it].
pub fn render_lm(item: &Value, delimiter: &str, fewshot: &[&Value]) -> Result<Vec<String>> {
    let mut head = fewshot_head(fewshot, delimiter, |ex| {
        Ok((
            python_strip(&text_field(ex, "context")?).to_string(),
            text_field(ex, "continuation")?,
        ))
    })?;
    head += python_strip(&text_field(item, "context")?);
    head += delimiter;
    let with = format!("{head}{}", text_field(item, "continuation")?);
    Ok(vec![python_strip(&head).to_string(), with])
}

/// The prompts of one item for its task type.
pub fn render(task: TaskType, item: &Value, delimiter: &str, fewshot: &[&Value]) -> Result<Vec<String>> {
    match task {
        TaskType::MultipleChoice => render_mc(item, delimiter, fewshot),
        TaskType::Schema => render_schema(item, delimiter, fewshot),
        TaskType::LanguageModeling => render_lm(item, delimiter, fewshot),
    }
}
