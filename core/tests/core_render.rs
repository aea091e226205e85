//! The CORE prompt renderers against nanochat's own (`render_prompts_mc/schema/lm` of nanochat/core_eval.py):
//! fixtures/core_eval/render.json holds items of every task type rendered by nanochat's functions with
//! 0, 1 and 3 few-shot examples and several delimiters (made by fixtures/core_eval/make_render.py), including
//! contexts with Python-only whitespace (U+001C..U+001F), no-break and ideographic spaces for the LM trim, and
//! non-string choices.

use nc_core::eval::render::{render, TaskType};
use serde_json::Value;

#[test]
fn renderers_equal_nanochat_on_fixtures() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/core_eval/render.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(cases.len(), 195);
    let mut per_type = [0usize; 3];
    for (i, case) in cases.iter().enumerate() {
        let task = TaskType::parse(case["task_type"].as_str().unwrap()).unwrap();
        per_type[task as usize] += 1;
        let fewshot: Vec<&Value> = case["fewshot"].as_array().unwrap().iter().collect();
        let delimiter = case["delimiter"].as_str().unwrap();
        let got = render(task, &case["item"], delimiter, &fewshot).unwrap();
        let want: Vec<String> = serde_json::from_value(case["prompts"].clone()).unwrap();
        assert_eq!(got, want, "case {i}: {case}");
    }
    assert_eq!(per_type, [75, 45, 75]);
}

#[test]
fn malformed_items_are_errors() {
    let item: Value = serde_json::json!({"query": "q", "choices": ["a", "b"], "gold": 2});
    let err = render(TaskType::MultipleChoice, &item, " ", &[&item]).unwrap_err();
    assert!(err.message.contains("'gold' must be an index below 2"), "{err}");
    let item: Value = serde_json::json!({"context": "c"});
    let err = render(TaskType::LanguageModeling, &item, " ", &[]).unwrap_err();
    assert!(err.message.contains("no 'continuation' field"), "{err}");
    let item: Value = serde_json::json!({"query": "q", "choices": [1.5], "gold": 0});
    assert!(render(TaskType::MultipleChoice, &item, " ", &[]).is_err());
}
