//! The split before BPE: a hand-written matcher for nanochat's GPT-4 style pattern (SPEC.md section 6)
//!
//! `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+`
//!
//! The pattern needs possessive quantifiers and a lookahead, so instead of a backtracking regex engine we
//! match it by hand: at each position the seven alternatives are tried in order, exactly as a leftmost-first
//! regex engine would, and the first that matches gives the piece. Every character is a letter (`\p{L}`),
//! a number (`\p{N}`), white space (`\s`, Unicode White_Space) or "other", so some alternative always
//! matches and the pieces tile the text. The Unicode tables come from `regex-syntax`, the same tables the
//! regex engines behind tiktoken and rustbpe use.
//!
//! The GPT-4 original differs only in `\p{N}{1,3}`; `max_digits` selects between the two.

use std::sync::OnceLock;

use crate::bail;
use crate::error::Result;

/// nanochat's split pattern (numbers in runs of 1 or 2 digits).
pub const NANOCHAT_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
/// GPT-4's cl100k split pattern (numbers in runs of 1 to 3 digits); also rustbpe's default.
pub const GPT4_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The four classes the pattern distinguishes, plus `\r`/`\n` which it treats specially.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CharClass {
    Letter,
    Number,
    /// `\r` or `\n` (also white space).
    Newline,
    /// White space other than `\r` and `\n`.
    Space,
    Other,
}

struct UnicodeTables {
    letters: Vec<(char, char)>,
    numbers: Vec<(char, char)>,
    spaces: Vec<(char, char)>,
}

/// The sorted code point ranges of a Unicode class, as the regex parser defines it.
fn class_ranges(class: &str) -> Vec<(char, char)> {
    use regex_syntax::hir::{Class, HirKind};
    let hir = regex_syntax::Parser::new()
        .parse(class)
        .expect("a fixed, valid Unicode class");
    match hir.kind() {
        HirKind::Class(Class::Unicode(cls)) => cls.ranges().iter().map(|r| (r.start(), r.end())).collect(),
        other => panic!("{class} parsed to {other:?}, not a Unicode class"),
    }
}

fn tables() -> &'static UnicodeTables {
    static TABLES: OnceLock<UnicodeTables> = OnceLock::new();
    TABLES.get_or_init(|| UnicodeTables {
        letters: class_ranges(r"\p{L}"),
        numbers: class_ranges(r"\p{N}"),
        spaces: class_ranges(r"\s"),
    })
}

fn in_ranges(ranges: &[(char, char)], c: char) -> bool {
    // Binary search for the last range starting at or before c.
    let idx = ranges.partition_point(|&(start, _)| start <= c);
    idx > 0 && c <= ranges[idx - 1].1
}

#[inline]
fn classify(c: char) -> CharClass {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => CharClass::Letter,
            '0'..='9' => CharClass::Number,
            '\r' | '\n' => CharClass::Newline,
            // ASCII White_Space: tab, line feed, vertical tab, form feed, carriage return, space.
            '\t' | '\x0b' | '\x0c' | ' ' => CharClass::Space,
            _ => CharClass::Other,
        };
    }
    let t = tables();
    if in_ranges(&t.letters, c) {
        CharClass::Letter
    } else if in_ranges(&t.numbers, c) {
        CharClass::Number
    } else if in_ranges(&t.spaces, c) {
        CharClass::Space
    } else {
        CharClass::Other
    }
}

/// The variant of the pattern: only the longest digit run differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitPattern {
    pub max_digits: usize,
}

impl SplitPattern {
    pub const NANOCHAT: SplitPattern = SplitPattern { max_digits: 2 };

    /// Recognize one of the supported pattern strings; anything else is an error.
    pub fn from_pattern(pattern: &str) -> Result<SplitPattern> {
        if pattern == NANOCHAT_PATTERN {
            Ok(SplitPattern { max_digits: 2 })
        } else if pattern == GPT4_PATTERN {
            Ok(SplitPattern { max_digits: 3 })
        } else {
            bail!(
                "unsupported split pattern {pattern:?}: nc implements nanochat's pattern {NANOCHAT_PATTERN:?} \
                 and GPT-4's (the same with \\p{{N}}{{1,3}})"
            )
        }
    }

    pub fn as_str(&self) -> &'static str {
        if self.max_digits == 3 {
            GPT4_PATTERN
        } else {
            NANOCHAT_PATTERN
        }
    }

    /// Iterate over the pieces of `text`, in order; they concatenate back to `text`.
    pub fn split<'a>(&self, text: &'a str) -> Pieces<'a> {
        Pieces {
            text,
            pos: 0,
            max_digits: self.max_digits,
        }
    }
}

pub struct Pieces<'a> {
    text: &'a str,
    pos: usize,
    max_digits: usize,
}

/// Case-insensitive match for the contraction letters, as Unicode simple case folding does it
/// (`ſ`, the long s, folds to `s`).
fn contraction_single(c: char) -> bool {
    matches!(c, 's' | 'S' | 'ſ' | 'd' | 'D' | 'm' | 'M' | 't' | 'T')
}

fn contraction_double(c1: char, c2: char) -> bool {
    let l1 = c1.to_ascii_lowercase();
    let l2 = c2.to_ascii_lowercase();
    matches!((l1, l2), ('l', 'l') | ('v', 'e') | ('r', 'e'))
}

impl<'a> Pieces<'a> {
    /// Length in bytes of the piece that starts at `start` (which is < text.len()).
    fn piece_len(&self, start: usize) -> usize {
        let rest = &self.text[start..];
        let mut chars = rest.char_indices();
        let (_, c0) = chars.next().expect("start is inside the text");
        let mut lookahead = rest.chars();
        lookahead.next();
        let c1 = lookahead.next();
        let c2 = lookahead.next();

        // 1. '(?i:[sdmt]|ll|ve|re)
        if c0 == '\'' {
            if let Some(c1) = c1 {
                if contraction_single(c1) {
                    return 1 + c1.len_utf8();
                }
                if let Some(c2) = c2 {
                    if contraction_double(c1, c2) {
                        return 1 + c1.len_utf8() + c2.len_utf8();
                    }
                }
            }
        }
        let k0 = classify(c0);
        let k1 = c1.map(classify);

        // 2. [^\r\n\p{L}\p{N}]?+\p{L}+
        if k0 == CharClass::Letter {
            return run_len(rest, 0, |k| k == CharClass::Letter);
        }
        if matches!(k0, CharClass::Space | CharClass::Other) && k1 == Some(CharClass::Letter) {
            let first = c0.len_utf8();
            return run_len(rest, first, |k| k == CharClass::Letter);
        }

        // 3. \p{N}{1,max}
        if k0 == CharClass::Number {
            let mut len = 0;
            for (count, c) in rest.chars().enumerate() {
                if count == self.max_digits || classify(c) != CharClass::Number {
                    break;
                }
                len += c.len_utf8();
            }
            return len;
        }

        // 4. ` ?[^\s\p{L}\p{N}]++[\r\n]*`
        let punct_start = if k0 == CharClass::Other {
            Some(0)
        } else if c0 == ' ' && k1 == Some(CharClass::Other) {
            Some(1)
        } else {
            None
        };
        if let Some(s) = punct_start {
            let after_punct = run_len(rest, s, |k| k == CharClass::Other);
            return after_punct
                + rest[after_punct..]
                    .bytes()
                    .take_while(|&b| b == b'\r' || b == b'\n')
                    .count();
        }

        // Only white space is left. Find the maximal white-space run.
        let mut run_end = 0;
        let mut last_newline_end = None;
        for (i, c) in rest.char_indices() {
            match classify(c) {
                CharClass::Newline => {
                    run_end = i + 1;
                    last_newline_end = Some(i + 1);
                }
                CharClass::Space => run_end = i + c.len_utf8(),
                _ => break,
            }
        }
        // 5. \s*[\r\n]: the greedy run backs off to its last newline.
        if let Some(end) = last_newline_end {
            return end;
        }
        // 6. \s+(?!\S): the whole run at the end of the text, else all but its last character.
        if start + run_end == self.text.len() {
            return run_end;
        }
        let last_char_len = rest[..run_end].chars().next_back().map_or(0, |c| c.len_utf8());
        if run_end - last_char_len > 0 {
            return run_end - last_char_len;
        }
        // 7. \s+
        run_end
    }
}

/// Byte offset in `s` where the run of characters of class `keep`, starting at byte `from`, ends.
fn run_len(s: &str, from: usize, keep: impl Fn(CharClass) -> bool) -> usize {
    let mut end = from;
    for c in s[from..].chars() {
        if !keep(classify(c)) {
            break;
        }
        end += c.len_utf8();
    }
    end
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.pos >= self.text.len() {
            return None;
        }
        let start = self.pos;
        let len = self.piece_len(start);
        debug_assert!(len > 0);
        self.pos = start + len;
        Some(&self.text[start..self.pos])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        SplitPattern::NANOCHAT.split(s).collect()
    }

    #[test]
    fn hand_checked_examples() {
        assert_eq!(split("Hello world"), vec!["Hello", " world"]);
        assert_eq!(
            split("I'm 12345 ok!!\n\n"),
            vec!["I", "'m", " ", "12", "34", "5", " ok", "!!\n\n"]
        );
        assert_eq!(split("a  b"), vec!["a", " ", " b"]);
        assert_eq!(split("a \n\n  b"), vec!["a", " \n\n", " ", " b"]);
        assert_eq!(split("end   "), vec!["end", "   "]);
        assert_eq!(split("x\ty"), vec!["x", "\ty"]);
        assert_eq!(split(" ."), vec![" ."]);
        assert_eq!(split("  ."), vec![" ", " ."]);
        let gpt4 = SplitPattern { max_digits: 3 };
        assert_eq!(gpt4.split("12345").collect::<Vec<_>>(), vec!["123", "45"]);
    }

    #[test]
    fn unicode_classes() {
        assert_eq!(classify('é'), CharClass::Letter);
        assert_eq!(classify('Ⅳ'), CharClass::Number); // Nl
        assert_eq!(classify('½'), CharClass::Number); // No
        assert_eq!(classify('\u{3000}'), CharClass::Space);
        assert_eq!(classify('\u{85}'), CharClass::Space);
        assert_eq!(classify('€'), CharClass::Other);
        assert_eq!(classify('\u{301}'), CharClass::Other); // combining mark: neither L nor N
    }

    #[test]
    fn unsupported_pattern_is_an_error() {
        let err = SplitPattern::from_pattern(r"\w+").unwrap_err();
        assert!(err.message.contains("unsupported split pattern"), "{err}");
        assert_eq!(SplitPattern::from_pattern(GPT4_PATTERN).unwrap().max_digits, 3);
    }
}
