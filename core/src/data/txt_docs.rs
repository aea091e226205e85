//! Plain-text inputs: where one document ends and the next begins (`nc-data --txt-docs`).
//!
//! The default is `paragraph`: documents are separated by blank lines. One big text file (a book, a dump of
//! notes) then becomes many documents, so it can be split into training and validation and each document gets
//! its own `<|bos|>`; a file of one paragraph is still one document. `line` suits files of one short text per
//! line (titles, chat turns); `file` keeps the whole file as one document (a folder of separate texts).

use crate::bail;
use crate::error::Result;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TxtDocs {
    /// The whole file is one document.
    File,
    /// Documents are separated by one or more blank lines (empty, or only whitespace).
    #[default]
    Paragraph,
    /// Every line that is not blank is a document.
    Line,
}

impl TxtDocs {
    pub fn parse(s: &str) -> Result<TxtDocs> {
        match s {
            "file" => Ok(TxtDocs::File),
            "paragraph" => Ok(TxtDocs::Paragraph),
            "line" => Ok(TxtDocs::Line),
            _ => bail!("--txt-docs {s:?}: use file (one document per file), paragraph (split at blank lines) or line"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TxtDocs::File => "file",
            TxtDocs::Paragraph => "paragraph",
            TxtDocs::Line => "line",
        }
    }
}

/// A line without its terminator (`\n` or `\r\n`).
fn content(line: &str) -> &str {
    let line = line.strip_suffix('\n').unwrap_or(line);
    line.strip_suffix('\r').unwrap_or(line)
}

fn is_blank(line: &str) -> bool {
    line.trim().is_empty()
}

/// The documents of a text. Paragraph and line documents are exact slices of the text (inner line breaks
/// kept as written), without the line break that ends them; blank lines belong to no document. An empty
/// text has no documents.
pub fn split_text(text: &str, mode: TxtDocs) -> Vec<String> {
    match mode {
        TxtDocs::File if text.is_empty() => Vec::new(),
        TxtDocs::File => vec![text.to_string()],
        TxtDocs::Line => text
            .split_inclusive('\n')
            .map(content)
            .filter(|l| !is_blank(l))
            .map(str::to_string)
            .collect(),
        TxtDocs::Paragraph => {
            let mut docs = Vec::new();
            // The open paragraph: byte offset of its first line, and of the end of its last line's content.
            let mut open: Option<(usize, usize)> = None;
            let mut offset = 0;
            for line in text.split_inclusive('\n') {
                if is_blank(line) {
                    if let Some((start, end)) = open.take() {
                        docs.push(text[start..end].to_string());
                    }
                } else {
                    let end = offset + content(line).len();
                    open = Some((open.map_or(offset, |(start, _)| start), end));
                }
                offset += line.len();
            }
            if let Some((start, end)) = open {
                docs.push(text[start..end].to_string());
            }
            docs
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_lines_and_files() {
        let text = "\n  \nOne para,\r\nsecond line.\n\n\n  Two, indented.\n \t\nThree\n";
        assert_eq!(
            split_text(text, TxtDocs::Paragraph),
            ["One para,\r\nsecond line.", "  Two, indented.", "Three"]
        );
        assert_eq!(
            split_text(text, TxtDocs::Line),
            ["One para,", "second line.", "  Two, indented.", "Three"]
        );
        assert_eq!(split_text(text, TxtDocs::File), [text]);
        // No final newline; no blank line at all: one document.
        assert_eq!(split_text("a\nb", TxtDocs::Paragraph), ["a\nb"]);
        for mode in [TxtDocs::File, TxtDocs::Paragraph, TxtDocs::Line] {
            assert!(split_text("", mode).is_empty());
            assert_eq!(TxtDocs::parse(mode.name()).unwrap(), mode);
        }
        assert!(split_text(" \n\n", TxtDocs::Paragraph).is_empty());
        assert!(TxtDocs::parse("para").unwrap_err().to_string().contains("paragraph"));
    }
}
