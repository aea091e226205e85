//! No function outside tests is longer than 150 lines (issue 23; DESIGN.md asks for functions that read as
//! their phases, ~100 lines being a sign to split). `cargo test --release -p nc-tests --test long_functions --
//! --nocapture` lists the longest ones.
//!
//! Read as text, without building anything (a few milliseconds): a function's length runs from its `fn` line
//! to the line of its closing brace, found by counting braces outside strings, char literals and comments
//! (good enough for this code base; a raw string with unbalanced braces would confuse it). Test code is left
//! out: files under a `tests/`, `benches/` or `fuzz/` folder, and the item after a `#[cfg(test)]` line.
//! Written in Rust rather than run as a script because CI's machine is only promised a Rust toolchain.

use std::path::{Path, PathBuf};

/// The ceiling for a function outside tests.
const LIMIT: usize = 150;

/// A function over the limit: its length in lines, first line (1-based) and name.
#[derive(Debug, PartialEq)]
struct Long {
    lines: usize,
    start: usize,
    name: String,
}

/// The line with strings, char literals and comments removed, and whether a `/* */` comment is still open
/// after it.
fn code_only(line: &str, mut in_block_comment: bool) -> (String, bool) {
    let c: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut in_string = false;
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if in_block_comment {
            if c[i] == '*' && next == Some('/') {
                in_block_comment = false;
                i += 1;
            }
        } else if in_string {
            if c[i] == '\\' {
                i += 1;
            } else if c[i] == '"' {
                in_string = false;
            }
        } else if c[i] == '/' && next == Some('/') {
            break;
        } else if c[i] == '/' && next == Some('*') {
            in_block_comment = true;
            i += 1;
        } else if c[i] == '"' {
            in_string = true;
        } else if let Some(len) = char_literal_len(&c[i..]) {
            i += len - 1;
        } else {
            out.push(c[i]);
        }
        i += 1;
    }
    (out, in_block_comment)
}

/// The length of a char literal such as `'{'` or `'\''` starting the text, or None (a lifetime such as `'a`
/// is not one).
fn char_literal_len(c: &[char]) -> Option<usize> {
    match c {
        ['\'', '\\', _, '\'', ..] => Some(4),
        ['\'', x, '\'', ..] if *x != '\\' && *x != '\'' => Some(3),
        _ => None,
    }
}

/// The name of the function a line of code starts (`pub(crate) unsafe fn name`), if it starts one.
fn fn_name(code: &str) -> Option<String> {
    let mut words = code.split_whitespace().peekable();
    while let Some(word) = words.next() {
        let qualifier = word.starts_with("pub") || ["const", "async", "unsafe", "extern"].contains(&word);
        let abi = word.starts_with('"');
        if word == "fn" {
            let name: String = words
                .next()?
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            return (!name.is_empty()).then_some(name);
        }
        if !qualifier && !abi {
            return None;
        }
    }
    None
}

/// The functions of one source file longer than `limit` lines, test items left out.
fn long_functions(source: &str, limit: usize) -> Vec<Long> {
    let mut found = Vec::new();
    let mut open: Vec<(String, usize, i64)> = Vec::new(); // (name, first line, depth its body opened at)
    let mut depth = 0i64;
    let mut in_block_comment = false;
    let mut test_depth: Option<i64> = None; // the depth of the #[cfg(test)] item being skipped
    let mut pending_test = false;
    let mut pending_fn: Option<(String, usize)> = None;
    for (number, raw) in source.lines().enumerate().map(|(i, l)| (i + 1, l)) {
        if raw.trim_start().starts_with("#[cfg(test)]") {
            pending_test = true;
        }
        let (code, still_open) = code_only(raw, in_block_comment);
        in_block_comment = still_open;
        if test_depth.is_none() {
            if let Some(name) = fn_name(&code) {
                pending_fn = Some((name, number));
            }
        }
        for ch in code.chars() {
            match ch {
                '{' => {
                    if pending_test && test_depth.is_none() {
                        test_depth = Some(depth);
                    }
                    pending_test = false;
                    if let Some((name, start)) = pending_fn.take() {
                        open.push((name, start, depth));
                    }
                    depth += 1;
                }
                '}' => {
                    depth -= 1;
                    if test_depth == Some(depth) {
                        test_depth = None;
                    }
                    if open.last().is_some_and(|f| f.2 == depth) {
                        let (name, start, _) = open.pop().unwrap();
                        let lines = number - start + 1;
                        if lines > limit {
                            found.push(Long { lines, start, name });
                        }
                    }
                }
                ';' => {
                    // A declaration without a body (a trait method), or a one-line #[cfg(test)] item.
                    pending_fn = None;
                    if test_depth.is_none() {
                        pending_test = false;
                    }
                }
                _ => {}
            }
        }
    }
    found
}

/// Every `.rs` file below `dir`, test and bench folders left out.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !["tests", "benches", "target", "fuzz"].contains(&name.as_str()) {
                sources(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_function_outside_tests_is_over_150_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for krate in ["core", "comm", "alloc", "kernels-ptx", "bin"] {
        sources(&root.join(krate), &mut files);
    }
    assert!(
        files.len() > 100,
        "found only {} source files under {}",
        files.len(),
        root.display()
    );
    let mut longest: Vec<(usize, String)> = Vec::new();
    let mut over = Vec::new();
    for path in &files {
        let source = std::fs::read_to_string(path).unwrap();
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        for f in long_functions(&source, 100) {
            let line = format!("{:5} lines  {rel}:{}  {}", f.lines, f.start, f.name);
            if f.lines > LIMIT {
                over.push(line.clone());
            }
            longest.push((f.lines, line));
        }
    }
    longest.sort_by(|a, b| b.cmp(a));
    println!("functions over 100 lines outside tests:");
    longest.iter().for_each(|(_, line)| println!("{line}"));
    assert!(
        over.is_empty(),
        "{} functions outside tests are over {LIMIT} lines; split each into its phases (DESIGN.md):\n{}",
        over.len(),
        over.join("\n")
    );
}

/// The checker on made-up sources: lengths count from the `fn` line to the closing brace, braces in strings,
/// char literals and comments do not count, trait declarations end at their `;`, and `#[cfg(test)]` items
/// are left out.
#[test]
fn the_checker_measures_functions_and_skips_tests() {
    let function = |name: &str, body_lines: usize| {
        let body: String = (0..body_lines)
            .map(|i| format!("    let x{i} = \"{{\"; // }}}}\n"))
            .collect();
        format!("pub(crate) unsafe fn {name}(a: char) -> u8 {{\n{body}    if a == '{{' {{ return 1; }}\n    0\n}}\n")
    };
    // 148 body lines + the fn line, the if, the 0 and the closing brace: 152 lines.
    let source = [
        "trait T {\n    fn declared(&self);\n}\n".to_string(),
        function("too_long", 148),
        function("just_fits", 146),
        "/* { */\nstruct S;\n".to_string(),
        "#[cfg(test)]\nmod tests {\n".to_string() + &function("a_long_test", 200) + "}\n",
        "#[cfg(test)]\nuse std::fmt;\n".to_string(),
        function("after_the_tests", 160),
    ]
    .concat();
    let found = long_functions(&source, LIMIT);
    let first_line = |name: &str| source.lines().position(|l| l.contains(&format!("fn {name}("))).unwrap() + 1;
    let want = vec![
        Long {
            lines: 152,
            start: first_line("too_long"),
            name: "too_long".into(),
        },
        Long {
            lines: 164,
            start: first_line("after_the_tests"),
            name: "after_the_tests".into(),
        },
    ];
    assert_eq!(found, want);
    assert_eq!(fn_name("extern \"C\" fn callback(x: i32)"), Some("callback".into()));
    assert_eq!(fn_name("let f = |x| x; // fn not_one"), None);
}
