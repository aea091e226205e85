//! Every command shown in README.md and docs/*.md runs, under the convention written at the top of
//! docs/README.md: each ```sh block is run by bash, the blocks of one file in order in one fresh sandbox folder,
//! with the documented substitutions (prebuilt binaries for `cargo run`, tiny step counts for nc-train, `--plan`
//! for GPU training without a CUDA driver, a local server for `nc-data download`, the tests' synthetic CORE
//! bundle as its eval bundle). ```sh parse-only blocks are
//! checked with `bash -n`. A shell fence spelled otherwise (```bash, ```console, a bare ```) is an error, so a
//! command cannot hide from the test. The sandbox is laid out here; the stand-ins are small bash scripts.

#[allow(dead_code)] // the download tests use the server's faults; this file only serves files
mod support;

use std::fmt::Write as _;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nc_core::data::prep::write_parquet_texts;
use nc_core::data::synth::documents;
use support::http_server::TestServer;

/// What nc-train gets appended outside `--plan`/`--help` (the sandbox's default for `NC_DOCS_TRAIN_ARGS`).
const TRAIN_ARGS: &str = "--num-iterations 2";
/// Parquet shards the local download server holds (shard_00000 .. shard_{N-1}).
const SERVED_SHARDS: usize = 8;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// One fenced block of commands.
#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    parse_only: bool,
    text: String,
}

/// The ```sh blocks of a markdown text, or an error naming the line of a shell block fenced otherwise.
fn sh_blocks(markdown: &str) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String, Option<bool>)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let Some(info) = trimmed.strip_prefix("```") else {
            if let Some((_, text, _)) = open.as_mut() {
                // Indented fences (inside list items) keep their commands' text relative to the fence.
                text.push_str(line);
                text.push('\n');
            }
            continue;
        };
        if let Some((start, text, kind)) = open.take() {
            if let Some(parse_only) = kind {
                blocks.push(Block {
                    line: start,
                    parse_only,
                    text,
                });
            }
            continue;
        }
        let words: Vec<&str> = info.split_whitespace().collect();
        let kind = match words.as_slice() {
            ["sh"] => Some(false),
            ["sh", "parse-only"] => Some(true),
            ["sh", ..] => {
                return Err(format!(
                    "line {}: ```{info}: a sh block is `sh` or `sh parse-only`",
                    i + 1
                ))
            }
            [] | ["bash" | "shell" | "console" | "zsh" | "shell-session", ..] => {
                return Err(format!(
                    "line {}: fence ```{info}: commands go in ```sh blocks (run by bin/tests/docs.rs), output \
                     in ```text (docs/README.md)",
                    i + 1
                ))
            }
            _ => None,
        };
        open = Some((i + 1, String::new(), kind));
    }
    if let Some((start, _, _)) = open {
        return Err(format!("line {start}: a fence that is never closed"));
    }
    Ok(blocks)
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The stand-in for nc-train: tiny runs, and `--plan` for GPU training where no CUDA driver can be loaded.
fn nc_train_wrapper(real: &Path) -> String {
    format!(
        r#"#!/usr/bin/env bash
# docs test stand-in (bin/tests/docs.rs, docs/README.md): nc-train with the documented substitutions
real='{}'
plan=0; cuda=0; prev=
for a in "$@"; do
  case "$a" in --plan|--help|-h|--version|-V) plan=1 ;; --backend=cuda) cuda=1 ;; esac
  [ "$prev" = --backend ] && [ "$a" = cuda ] && cuda=1
  prev="$a"
done
[ "$plan" = 1 ] && exec "$real" "$@"
if [ "$cuda" = 1 ]; then
  driver=0
  IFS=: read -ra dirs <<< "${{LD_LIBRARY_PATH:-}}"
  for d in "${{dirs[@]}}"; do [ -n "$d" ] && [ -e "$d/libcuda.so.1" ] && driver=1; done
  [ "$driver" = 0 ] && exec "$real" "$@" --plan
fi
exec "$real" "$@" $NC_DOCS_TRAIN_ARGS
"#,
        real.display()
    )
}

/// The stand-in for cargo: `cargo run` runs the prebuilt binary; build, test and install do nothing.
fn cargo_wrapper(sandbox: &Path) -> String {
    format!(
        r#"#!/usr/bin/env bash
# docs test stand-in (bin/tests/docs.rs, docs/README.md)
bins='{}'
repo='{}'
cmd="${{1:-}}"; shift || true
case "$cmd" in
  run)
    bin=nc-train
    while [ $# -gt 0 ]; do
      case "$1" in
        --release) shift ;;
        --bin|-p|--package) [ "$1" = --bin ] && bin="$2"; shift 2 ;;
        --) shift; break ;;
        *) echo "docs test: cargo run option '$1' has no stand-in (docs/README.md)" >&2; exit 2 ;;
      esac
    done
    [ -x "$bins/$bin" ] || {{ echo "docs test: no binary $bin" >&2; exit 2; }}
    exec "$bins/$bin" "$@" ;;
  build|test) echo "docs test: 'cargo $cmd $*' is not run inside the tests" ;;
  install)
    [ "${{1:-}}" = --path ] && [ -f "$repo/${{2:-}}/Cargo.toml" ] || {{ echo "docs test: cargo install $*: no such package path" >&2; exit 2; }}
    echo "docs test: the binaries are already on PATH" ;;
  *) echo "docs test: 'cargo $cmd' has no stand-in (docs/README.md)" >&2; exit 2 ;;
esac
"#,
        sandbox.join("target/release").display(),
        root().display()
    )
}

/// A multi-paragraph plain-text file standing for the reader's own text.
fn book_text() -> String {
    documents(11, 200_000).join("\n\n") + "\n"
}

/// A fresh sandbox: the repo's top-level entries linked, `target/release/` holding stand-ins for every binary
/// cargo built, `book.txt`, and a `bin/` with the cargo stand-in. Returns the PATH to use.
fn make_sandbox(dir: &Path) -> String {
    let real_bins = Path::new(env!("CARGO_BIN_EXE_nc-train")).parent().unwrap();
    for entry in std::fs::read_dir(root()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if [".git", "target", "runs", "data", "DATA"].iter().any(|n| name == *n) {
            continue;
        }
        symlink(entry.path(), dir.join(&name)).unwrap();
    }
    // target/: the real one's entries (target/sim, ...), but release/ of stand-ins.
    let target = dir.join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    let real_target = real_bins.parent().unwrap();
    // target/sim (scripts/sim.sh's build of the simulated GPU) is shared with the real one, so it is built once
    // for every page and test that needs it, not once per sandbox.
    std::fs::create_dir_all(real_target.join("sim")).unwrap();
    for entry in std::fs::read_dir(real_target).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "release" {
            symlink(entry.path(), target.join(entry.file_name())).unwrap();
        }
    }
    for entry in std::fs::read_dir(real_bins).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::metadata(&path).unwrap();
        let executable = meta.is_file() && meta.permissions().mode() & 0o111 != 0 && path.extension().is_none();
        if !executable {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let text = if name == "nc-train" {
            nc_train_wrapper(&path)
        } else {
            format!("#!/usr/bin/env bash\nexec '{}' \"$@\"\n", path.display())
        };
        write_executable(&target.join("release").join(&name), &text);
    }
    std::fs::create_dir_all(dir.join(".docs-bin")).unwrap();
    write_executable(&dir.join(".docs-bin/cargo"), &cargo_wrapper(dir));
    std::fs::write(dir.join("book.txt"), book_text()).unwrap();
    std::fs::create_dir_all(dir.join("home")).unwrap();
    format!(
        "{}:{}:{}",
        target.join("release").display(),
        dir.join(".docs-bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The download server's shards: small parquet files in nanochat's layout.
fn served_shards() -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    (0..SERVED_SHARDS)
        .map(|i| {
            let name = format!("shard_{i:05}.parquet");
            let path = dir.path().join(&name);
            write_parquet_texts(&path, &documents(100 + i as u64, 60_000), 1024).unwrap();
            (name, std::fs::read(&path).unwrap())
        })
        .collect()
}

/// The download server's `eval_bundle.zip`: the tests' synthetic CORE bundle (core/tests/fixtures/core_eval/e2e)
/// laid out as nanochat's zip (every file under `eval_bundle/`).
fn served_eval_bundle() -> (String, Vec<u8>) {
    use std::io::Write as _;
    fn add(w: &mut zip::ZipWriter<std::io::Cursor<Vec<u8>>>, dir: &Path, name: &str) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            let inner = format!("{name}/{}", path.file_name().unwrap().to_str().unwrap());
            if path.is_dir() {
                add(w, &path, &inner);
            } else {
                w.start_file(inner, zip::write::SimpleFileOptions::default()).unwrap();
                w.write_all(&std::fs::read(&path).unwrap()).unwrap();
            }
        }
    }
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    add(
        &mut w,
        &root().join("core/tests/fixtures/core_eval/e2e/bundle"),
        "eval_bundle",
    );
    ("eval_bundle.zip".into(), w.finish().unwrap().into_inner())
}

/// Run the ```sh blocks of one markdown text in a fresh sandbox; the first failure is returned with its line.
fn run_markdown(name: &str, markdown: &str, server: &TestServer) -> Result<usize, String> {
    let blocks = sh_blocks(markdown).map_err(|e| format!("{name}: {e}"))?;
    let dir = tempfile::tempdir().unwrap();
    let path = make_sandbox(dir.path());
    for block in &blocks {
        let start = std::time::Instant::now();
        let mut cmd = Command::new("bash");
        if block.parse_only {
            cmd.arg("-n").arg("-c").arg(&block.text);
        } else {
            cmd.arg("-c").arg(format!("set -euo pipefail\n{}", block.text));
        }
        let out = cmd
            .current_dir(dir.path())
            .env("PATH", &path)
            .env("HOME", dir.path().join("home"))
            .env("NANOCHAT_BASE_DIR", dir.path().join("nanochat"))
            .env("NC_DATA_BASE_URL", &server.base_url)
            .env("NC_EVAL_BUNDLE_URL", format!("{}/eval_bundle.zip", server.base_url))
            .env("NC_DOCS_TRAIN_ARGS", TRAIN_ARGS)
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .unwrap();
        if !out.status.success() {
            let mut msg = format!(
                "{name}:{}: the ```sh block failed ({}):\n{}\n--- output ---\n",
                block.line, out.status, block.text
            );
            let both = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = both.lines().rev().take(40).collect();
            for l in tail.into_iter().rev() {
                let _ = writeln!(msg, "{l}");
            }
            return Err(msg);
        }
        // What each block costs the test suite (`--nocapture` shows it), to keep the documented commands cheap.
        eprintln!(
            "docs test: {name}:{}: {:.1} s",
            block.line,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(blocks.len())
}

/// README.md and every docs/*.md, sorted.
fn documentation_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    docs.retain(|p| p.extension().is_some_and(|e| e == "md"));
    docs.sort();
    files.extend(docs);
    files
}

#[test]
fn every_documented_command_runs() {
    let mut served = served_shards();
    served.push(served_eval_bundle());
    let server = TestServer::start(&served);
    let mut failures = Vec::new();
    let mut ran = 0;
    // NC_DOCS_ONLY=NAME runs only the files whose path contains NAME (while writing one page).
    let only = std::env::var("NC_DOCS_ONLY").unwrap_or_default();
    for file in documentation_files() {
        let name = file.strip_prefix(root()).unwrap().display().to_string();
        if !name.contains(&only) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        match run_markdown(&name, &text, &server) {
            Ok(n) => ran += n,
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(ran > 0, "no ```sh blocks found in README.md or docs/");
}

#[test]
fn a_broken_command_or_a_hidden_one_fails() {
    let server = TestServer::start(&[]);
    // A flag nc-train does not have, in an otherwise good file: the failure names the block's line.
    let doc = "# t\n\n```sh\ntarget/release/nc-train --plan --depth 4\n```\n\n```sh\nnc-train --no-such-flag\n```\n";
    let err = run_markdown("t.md", doc, &server).unwrap_err();
    assert!(err.starts_with("t.md:7:") && err.contains("--no-such-flag"), "{err}");
    // The good block alone passes, and the stand-ins behave as documented.
    let ok = "```sh\ncargo run --release --bin nc-data -- --help\ncargo install --path bin\n\
              nc-train --backend cuda --depth 4\n```\n```text\nnot run\n```\n";
    assert_eq!(run_markdown("ok.md", ok, &server), Ok(1));
    // A shell block fenced another way is an error, not skipped.
    for fence in ["```bash", "```", "```console"] {
        let doc = format!("x\n{fence}\nnc-train\n```\n");
        let err = run_markdown("f.md", &doc, &server).unwrap_err();
        assert!(err.contains("line 2: fence"), "{fence}: {err}");
    }
    // parse-only blocks are checked by bash -n.
    let err = run_markdown("p.md", "```sh parse-only\nif then fi (\n```\n", &server).unwrap_err();
    assert!(err.starts_with("p.md:1:"), "{err}");
}
