//! No circle of imports between the files of a library crate (issue 23): the planner reads the model's and
//! the optimizer's layouts, so neither may import the planner back; shared vocabulary goes to a leaf module.
//!
//! The graph: one node per source file (`src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`); an edge for
//! every `crate::` path in the file (`use` lines, grouped imports and inline paths alike), to the deepest
//! module file the path names. A file's edges to its own ancestors are left out: a child using what its
//! parent module declares (`crate::backend::Backend` from `backend/cpu/`) is how a folder shares its types,
//! and parents reach their children through relative `mod`/`pub use` lines, which are not counted.
//! Read as text, without building anything: a few milliseconds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Every `.rs` file below `src`, as (module path, source text).
fn read_crate(src: &Path) -> BTreeMap<Module, String> {
    let mut files = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src).unwrap().with_extension("");
                let mut module: Module = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
                if module.last().is_some_and(|s| s == "mod" || s == "lib") {
                    module.pop();
                }
                files.insert(module, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    files
}

/// The source without `//` comments (doc comments name paths that are not imports).
fn strip_comments(source: &str) -> String {
    source
        .lines()
        .map(|line| line.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Parses the use tree starting at `text[at..]` (just after `crate::`), appending each full path to `out`;
/// returns the index where the tree ends.
fn parse_tree(text: &[u8], mut at: usize, prefix: &Module, out: &mut Vec<Module>) -> usize {
    let skip_space = |mut i: usize| {
        while i < text.len() && text[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut path = prefix.clone();
    loop {
        at = skip_space(at);
        if at < text.len() && text[at] == b'{' {
            // A group: each comma-separated item is a tree of its own under the path so far.
            at += 1;
            loop {
                at = skip_space(at);
                if at >= text.len() || text[at] == b'}' {
                    return at + 1;
                }
                at = parse_tree(text, at, &path, out);
                at = skip_space(at);
                if at < text.len() && text[at] == b',' {
                    at += 1;
                }
            }
        }
        let start = at;
        while at < text.len() && (text[at].is_ascii_alphanumeric() || text[at] == b'_') {
            at += 1;
        }
        if at == start {
            out.push(path);
            return at;
        }
        path.push(String::from_utf8_lossy(&text[start..at]).into_owned());
        let after = skip_space(at);
        if text[after..].starts_with(b"::") {
            at = after + 2;
        } else {
            out.push(path);
            return at;
        }
    }
}

/// Module -> the modules of the same crate it imports (see the file's doc for what counts).
fn import_graph(files: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut graph = BTreeMap::new();
    for (module, source) in files {
        let text = strip_comments(source);
        let bytes = text.as_bytes();
        let mut paths = Vec::new();
        for (at, _) in text.match_indices("crate::") {
            let word_start = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
            if word_start {
                parse_tree(bytes, at + "crate::".len(), &Vec::new(), &mut paths);
            }
        }
        let mut targets = BTreeSet::new();
        for path in paths {
            let target = (1..=path.len())
                .rev()
                .map(|k| path[..k].to_vec())
                .find(|m| files.contains_key(m));
            if let Some(target) = target {
                let is_ancestor_or_self = module.starts_with(&target);
                if !is_ancestor_or_self {
                    targets.insert(target);
                }
            }
        }
        graph.insert(module.clone(), targets);
    }
    graph
}

/// One circle of the graph if there is any, as the modules around it (first repeated at the end).
fn find_cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    // Depth-first search; a back edge to a module on the current path closes a circle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        node: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        marks: &mut BTreeMap<Module, Mark>,
        path: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        marks.insert(node.clone(), Mark::OnPath);
        path.push(node.clone());
        for next in &graph[node] {
            match marks[next] {
                Mark::OnPath => {
                    let from = path.iter().position(|m| m == next).unwrap();
                    let mut cycle = path[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, graph, marks, path) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(node.clone(), Mark::Done);
        None
    }
    let mut marks: BTreeMap<Module, Mark> = graph.keys().map(|m| (m.clone(), Mark::New)).collect();
    for node in graph.keys() {
        if marks[node] == Mark::New {
            if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

/// The graph between the crate's top-level folders: every module stands for the first component of its path
/// (`backend::cpu::matmul` for `backend`; a top-level file such as `plan` for itself), and the edges inside
/// one folder are dropped. A circle here is a circle between folders (`backend/` -> `optim/` -> `backend/`)
/// even where the files themselves import in no circle.
fn folder_graph(graph: &BTreeMap<Module, BTreeSet<Module>>) -> BTreeMap<Module, BTreeSet<Module>> {
    let folder = |m: &Module| m[..m.len().min(1)].to_vec();
    let mut folders: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, targets) in graph {
        let from = folder(module);
        let edges = folders.entry(from.clone()).or_default();
        edges.extend(targets.iter().map(folder).filter(|to| *to != from));
    }
    folders
}

/// A circle of files, else of top-level folders, if there is one: (what kind, the circle).
fn find_any_cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<(&'static str, Vec<Module>)> {
    find_cycle(graph)
        .map(|cycle| ("files", cycle))
        .or_else(|| find_cycle(&folder_graph(graph)).map(|cycle| ("folders", cycle)))
}

fn show(cycle: &[Module]) -> String {
    let names: Vec<String> = cycle
        .iter()
        .map(|m| if m.is_empty() { "lib".into() } else { m.join("::") })
        .collect();
    names.join(" -> ")
}

#[test]
fn no_library_crate_imports_in_a_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for krate in ["core", "comm", "alloc", "kernels-ptx"] {
        let files = read_crate(&root.join(krate).join("src"));
        assert!(files.len() > 1, "{krate}/src: found {} source files", files.len());
        let graph = import_graph(&files);
        if let Some((kind, cycle)) = find_any_cycle(&graph) {
            panic!(
                "{krate}/src imports in a circle of {kind}: {}. Move what they share to a leaf module they all \
                 import (as core/src/precision.rs holds Precision for the planner, the model and the optimizer), \
                 or into the one that imports it.",
                show(&cycle)
            );
        }
    }
}

/// The checker itself, on made-up files: grouped imports and inline paths make edges, an import of one's
/// own parent does not, and a circle through three files is found.
#[test]
fn the_checker_finds_a_circle_through_grouped_and_inline_paths() {
    let tree = |entries: &[(&str, &str)]| -> BTreeMap<Module, String> {
        entries
            .iter()
            .map(|(m, s)| {
                (
                    m.split("::").filter(|p| !p.is_empty()).map(String::from).collect(),
                    s.to_string(),
                )
            })
            .collect()
    };
    let leaf_imports = [
        ("", "pub mod a; pub mod b; pub mod c;"),
        (
            "a",
            "use crate::{b::Thing, c};\n// use crate::a::x; a comment is not an import",
        ),
        ("a::x", "use crate::a::Parent;"),
        ("b", "fn f() -> crate::c::Leaf { todo!() }"),
        ("c", "pub struct Leaf;"),
    ];
    let graph = import_graph(&tree(&leaf_imports));
    let edges = |m: &str| graph[&m.split("::").map(String::from).collect::<Module>()].clone();
    assert_eq!(edges("a").len(), 2, "a imports b and c: {:?}", edges("a"));
    assert!(
        edges("a::x").is_empty(),
        "a child's import of its parent is not an edge: {:?}",
        edges("a::x")
    );
    assert_eq!(find_cycle(&graph), None);

    let mut circle = leaf_imports;
    circle[4] = ("c", "use crate::a::{self};");
    let cycle = find_cycle(&import_graph(&tree(&circle))).expect("a -> b -> c -> a is a circle");
    assert_eq!(show(&cycle), "a -> b -> c -> a");

    // No circle of files, but one of folders: a/x.rs -> b.rs -> a/y.rs, so a/ -> b -> a/.
    let folders = [
        ("", "pub mod a; pub mod b;"),
        ("a", "pub mod x; pub mod y;"),
        ("a::x", "use crate::b::Thing;"),
        ("a::y", "pub struct Leaf;"),
        ("b", "pub struct Thing(crate::a::y::Leaf);"),
    ];
    let graph = import_graph(&tree(&folders));
    assert_eq!(find_cycle(&graph), None, "the files import in no circle");
    let (kind, cycle) = find_any_cycle(&graph).expect("a/ -> b -> a/ is a circle of folders");
    assert_eq!((kind, show(&cycle).as_str()), ("folders", "a -> b -> a"));
}
