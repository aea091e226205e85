//! Import nanochat's `tokenizer.pkl`: a pickled `tiktoken.core.Encoding`.
//!
//! `Encoding.__getstate__` pickles a dict `{name, pat_str, mergeable_ranks: {bytes: int}, special_tokens:
//! {str: int}}`, rebuilt with `NEWOBJ` + `BUILD`. This is a small pickle machine for the opcodes such a file
//! uses in protocols 2 to 5 (protocol 2 writes bytes as `_codecs.encode(str, "latin1")`). It never calls
//! anything: the only globals it accepts are the Encoding class and the two ways of spelling bytes, and it
//! refuses every other opcode, so a file that is not a tiktoken Encoding gives an error, not a guess.
//! Lengths are checked against the input before anything is allocated, and memo copies share their value,
//! so garbage cannot exhaust memory.

use std::cell::RefCell;
use std::rc::Rc;

use rustc_hash::FxHashMap;

use super::pretokenize::SplitPattern;
use super::tokenizer::Tokenizer;
use crate::bail;
use crate::error::{NcError, Result};

#[derive(Clone, Debug)]
enum Value {
    None,
    Bool,
    Int(i64),
    Bytes(Rc<[u8]>),
    Str(Rc<str>),
    Tuple(Rc<[Value]>),
    // Shared and mutable as in Python: a memo entry and the stack can name the same dict. Values are
    // reference-counted so that copying one out of the memo costs nothing, whatever its size.
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(String, String),
    /// An object made by NEWOBJ, with the state BUILD gave it.
    Object {
        class: (String, String),
        state: Option<Box<Value>>,
    },
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: FxHashMap<u32, Value>,
}

fn err(pos: usize, what: impl std::fmt::Display) -> NcError {
    NcError::new(format!("not a tiktoken Encoding pickle: {what} (at byte {pos})"))
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let remaining = (self.data.len() - self.pos) as u64;
        if n > remaining {
            return Err(err(
                self.pos,
                format!("needs {n} more bytes, only {remaining} left; the file is truncated"),
            ));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> Result<u64> {
        let b = self.take(n as u64)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(err(self.pos, "unterminated text line"));
        };
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| err(self.pos, "text line is not UTF-8"))?
            .to_string();
        self.pos += end + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(err(self.pos, "stack underflow"));
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let Some(mark) = self.marks.pop() else {
            return Err(err(self.pos, "no MARK on the stack"));
        };
        Ok(self.stack.split_off(mark))
    }

    fn top_mut(&mut self) -> Result<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(err(self.pos, "stack underflow"));
        }
        Ok(self.stack.last_mut().expect("checked above"))
    }

    fn text(&mut self, n: u64) -> Result<Value> {
        let at = self.pos;
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| err(at, "string is not UTF-8"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let v = self.top_mut()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<()> {
        match self.memo.get(&key) {
            Some(v) => {
                self.stack.push(v.clone());
                Ok(())
            }
            None => Err(err(self.pos, format!("memo key {key} was never stored"))),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(err(self.pos, "odd number of items for a dict"));
        }
        let pos = self.pos;
        let Value::Dict(d) = self.top_mut()? else {
            return Err(err(pos, "SETITEM(S) on something not a dict"));
        };
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    /// Runs the opcodes until STOP; each family of opcodes is one method below.
    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.take(1)?[0];
            match op {
                0x80 | 0x95 | b'.' => {
                    if let Some(value) = self.frame(at, op)? {
                        return Ok(value);
                    }
                }
                b'(' | b'}' | b')' | b']' | b'N' | 0x88 | 0x89 | b't' | 0x85..=0x87 => self.structure(op)?,
                0x8c | b'X' | 0x8d | b'C' | b'B' | 0x8e | b'K' | b'M' | b'J' | 0x8a => self.scalar(at, op)?,
                0x94 | b'q' | b'r' | b'h' | b'j' => self.memo(op)?,
                b'c' | 0x93 | 0x81 | b'R' | b'b' => self.object(at, op)?,
                b's' | b'u' | b'a' | b'e' => self.fill(at, op)?,
                other => {
                    return Err(err(
                        at,
                        format!("opcode 0x{other:02x} is not used by tiktoken Encoding pickles"),
                    ))
                }
            }
        }
    }

    /// Protocol, frame and stop: `Some(value)` at STOP, the one value the pickle holds.
    fn frame(&mut self, at: usize, op: u8) -> Result<Option<Value>> {
        match op {
            0x80 => {
                let proto = self.take(1)?[0];
                if !(2..=5).contains(&proto) {
                    return Err(err(
                        at,
                        format!("pickle protocol {proto}; tiktoken Encodings use 2 to 5"),
                    ));
                }
            }
            0x95 => {
                self.take(8)?; // FRAME: a length hint only.
            }
            b'.' => {
                let v = self.pop()?;
                if !self.stack.is_empty() || !self.marks.is_empty() {
                    return Err(err(at, "STOP with more than one value on the stack"));
                }
                return Ok(Some(v));
            }
            _ => unreachable!("opcode 0x{op:02x} is not one of frame's"),
        }
        Ok(None)
    }

    /// Marks, empty containers, constants and tuples.
    fn structure(&mut self, op: u8) -> Result<()> {
        match op {
            b'(' => self.marks.push(self.stack.len()),
            b'}' => self.stack.push(Value::Dict(Default::default())),
            b')' => self.stack.push(Value::Tuple(Rc::from(Vec::new()))),
            b']' => self.stack.push(Value::List(Default::default())),
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool),
            0x89 => self.stack.push(Value::Bool),
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(Rc::from(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.stack.push(Value::Tuple(Rc::from(items)));
            }
            _ => unreachable!("opcode 0x{op:02x} is not one of structure's"),
        }
        Ok(())
    }

    /// Strings, bytes and integers read from the opcode's argument.
    fn scalar(&mut self, at: usize, op: u8) -> Result<()> {
        match op {
            0x8c => {
                let n = self.uint(1)?;
                let v = self.text(n)?;
                self.stack.push(v);
            }
            b'X' => {
                let n = self.uint(4)?;
                let v = self.text(n)?;
                self.stack.push(v);
            }
            0x8d => {
                let n = self.uint(8)?;
                let v = self.text(n)?;
                self.stack.push(v);
            }
            b'C' | b'B' | 0x8e => {
                let width = match op {
                    b'C' => 1,
                    b'B' => 4,
                    _ => 8,
                };
                let n = self.uint(width)?;
                let b = self.take(n)?;
                self.stack.push(Value::Bytes(Rc::from(b)));
            }
            b'K' => {
                let v = self.uint(1)? as i64;
                self.stack.push(Value::Int(v));
            }
            b'M' => {
                let v = self.uint(2)? as i64;
                self.stack.push(Value::Int(v));
            }
            b'J' => {
                let v = self.uint(4)? as u32 as i32 as i64;
                self.stack.push(Value::Int(v));
            }
            0x8a => {
                let n = self.uint(1)?;
                if n > 8 {
                    return Err(err(at, format!("integer of {n} bytes is too large for a rank")));
                }
                let b = self.take(n)?;
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                // Sign-extend from the top byte.
                if n > 0 && n < 8 && b[n as usize - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                self.stack.push(Value::Int(v));
            }
            _ => unreachable!("opcode 0x{op:02x} is not one of scalar's"),
        }
        Ok(())
    }

    /// The memo: stored and fetched values.
    fn memo(&mut self, op: u8) -> Result<()> {
        match op {
            0x94 => {
                let key = self.memo.len() as u32;
                self.memo_put(key)?;
            }
            b'q' => {
                let key = self.uint(1)? as u32;
                self.memo_put(key)?;
            }
            b'r' => {
                let key = self.uint(4)? as u32;
                self.memo_put(key)?;
            }
            b'h' => {
                let key = self.uint(1)? as u32;
                self.memo_get(key)?;
            }
            b'j' => {
                let key = self.uint(4)? as u32;
                self.memo_get(key)?;
            }
            _ => unreachable!("opcode 0x{op:02x} is not one of memo's"),
        }
        Ok(())
    }

    /// Globals and the objects made from them (only the calls `reduce` allows).
    fn object(&mut self, at: usize, op: u8) -> Result<()> {
        match op {
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.stack.push(Value::Global(module, name));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err(err(at, "STACK_GLOBAL needs two strings"));
                };
                self.stack.push(Value::Global(module.to_string(), name.to_string()));
            }
            0x81 => {
                let args = self.pop()?;
                let class = self.pop()?;
                let Value::Global(m, n) = class else {
                    return Err(err(at, "NEWOBJ of something not a class"));
                };
                if !matches!(&args, Value::Tuple(a) if a.is_empty()) {
                    return Err(err(at, format!("NEWOBJ of {m}.{n} with arguments")));
                }
                self.stack.push(Value::Object {
                    class: (m, n),
                    state: None,
                });
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = reduce(func, args).map_err(|what| err(at, what))?;
                self.stack.push(v);
            }
            b'b' => {
                let state = self.pop()?;
                let Value::Object { state: slot, .. } = self.top_mut()? else {
                    return Err(err(at, "BUILD on something not an object"));
                };
                if slot.is_some() {
                    return Err(err(at, "BUILD twice on one object"));
                }
                *slot = Some(Box::new(state));
            }
            _ => unreachable!("opcode 0x{op:02x} is not one of object's"),
        }
        Ok(())
    }

    /// Items set into dicts and appended to lists.
    fn fill(&mut self, at: usize, op: u8) -> Result<()> {
        match op {
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'a' => {
                let v = self.pop()?;
                let Value::List(l) = self.top_mut()? else {
                    return Err(err(at, "APPEND on something not a list"));
                };
                l.borrow_mut().push(v);
            }
            b'e' => {
                let items = self.pop_mark()?;
                let Value::List(l) = self.top_mut()? else {
                    return Err(err(at, "APPENDS on something not a list"));
                };
                l.borrow_mut().extend(items);
            }
            _ => unreachable!("opcode 0x{op:02x} is not one of fill's"),
        }
        Ok(())
    }
}

/// The only calls a tiktoken pickle makes: protocol 2's spelling of bytes.
fn reduce(func: Value, args: Value) -> std::result::Result<Value, String> {
    let Value::Global(module, name) = func else {
        return Err("REDUCE of something not a global".into());
    };
    let Value::Tuple(args) = args else {
        return Err("REDUCE arguments are not a tuple".into());
    };
    match (module.as_str(), name.as_str(), &args[..]) {
        ("_codecs", "encode", [Value::Str(s), Value::Str(enc)]) if &**enc == "latin1" || &**enc == "latin-1" => {
            let mut out = Vec::with_capacity(s.len());
            for c in s.chars() {
                if c as u32 > 255 {
                    return Err("latin1 text with a character above U+00FF".into());
                }
                out.push(c as u32 as u8);
            }
            Ok(Value::Bytes(Rc::from(out)))
        }
        ("__builtin__" | "builtins", "bytes", []) => Ok(Value::Bytes(Rc::from(Vec::new()))),
        _ => Err(format!(
            "call of {module}.{name} (only _codecs.encode and bytes are allowed)"
        )),
    }
}

fn dict_get(d: &[(Value, Value)], key: &str) -> Option<Value> {
    d.iter()
        .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
        .map(|(_, v)| v.clone())
}

/// Read a pickled tiktoken Encoding (nanochat's `tokenizer.pkl`) into a tokenizer.
pub fn load_tiktoken_pickle(data: &[u8]) -> Result<Tokenizer> {
    let machine = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: FxHashMap::default(),
    };
    let value = machine.run()?;
    let Value::Object { class, state } = value else {
        bail!("not a tiktoken Encoding pickle: the pickled value is not an object");
    };
    if class != ("tiktoken.core".to_string(), "Encoding".to_string()) {
        bail!(
            "not a tiktoken Encoding pickle: the object is a {}.{}",
            class.0,
            class.1
        );
    }
    let state = match state.map(|b| *b) {
        Some(Value::Dict(d)) => d.borrow().clone(),
        Some(Value::Str(name)) => bail!(
            "the pickle names tiktoken's registered encoding {name:?} instead of holding its ranks; \
             export the ranks with tiktoken (`load_tiktoken_bpe` format) and use a tokenizer directory"
        ),
        _ => bail!("not a tiktoken Encoding pickle: the object's state is not a dict"),
    };
    let Some(Value::Str(pat)) = dict_get(&state, "pat_str") else {
        bail!("tiktoken pickle without a `pat_str` string")
    };
    let pattern = SplitPattern::from_pattern(&pat)?;
    let Some(Value::Dict(mergeable)) = dict_get(&state, "mergeable_ranks") else {
        bail!("tiktoken pickle without a `mergeable_ranks` dict");
    };
    let mergeable = mergeable.borrow();
    let mut ranks: Vec<Option<Vec<u8>>> = vec![None; mergeable.len()];
    for (k, v) in mergeable.iter() {
        let (Value::Bytes(b), Value::Int(r)) = (k, v) else {
            bail!("mergeable_ranks must map bytes to integers")
        };
        let slot = usize::try_from(*r).ok().and_then(|r| ranks.get_mut(r));
        let Some(slot) = slot else {
            bail!("rank {r} is outside 0..{}; ranks must be dense", mergeable.len());
        };
        if slot.is_some() {
            bail!("rank {r} appears twice in mergeable_ranks");
        }
        *slot = Some(b.to_vec());
    }
    let ranks: Vec<Vec<u8>> = ranks
        .into_iter()
        .map(|r| r.expect("dense: each of n distinct ranks below n"))
        .collect();
    let mut specials = Vec::new();
    if let Some(v) = dict_get(&state, "special_tokens") {
        let Value::Dict(d) = v else {
            bail!("special_tokens is not a dict")
        };
        for (k, v) in d.borrow().iter() {
            let (Value::Str(s), Value::Int(id)) = (k, v) else {
                bail!("special_tokens must map strings to integers")
            };
            let Ok(id) = u32::try_from(*id) else {
                bail!("special token {s:?} has id {id}, not a token id")
            };
            specials.push((s.to_string(), id));
        }
    }
    specials.sort_by_key(|&(_, id)| id);
    Tokenizer::from_ranks(ranks, specials, pattern)
}
