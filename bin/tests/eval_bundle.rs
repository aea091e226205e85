//! `nc-data download --eval-bundle` (nc_core::eval::bundle_download) against a local HTTP server: the
//! bundle unpacked byte for byte into its folder, a bundle already there used as is (no request), resets and
//! 5xx retried, a 404 final, and hostile archives (an entry climbing out with `..`, an absolute path, a
//! symbolic link) refused with nothing written outside and nothing left under the final name.

#[allow(dead_code)] // this file uses only some of the server's faults
mod support;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nc_core::data::download_retry::RetryPolicy;
use nc_core::eval::bundle_download::{download_eval_bundle, BundleOutcome};
use support::http_server::{Fault, TestServer};
use zip::write::SimpleFileOptions;

const NAME: &str = "eval_bundle.zip";

fn bundle_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("eval_bundle/core.yaml".into(), b"icl_tasks:\n- label: t\n".to_vec()),
        (
            "eval_bundle/eval_meta_data.csv".into(),
            b"Eval Task,Random baseline\nt,25\n".to_vec(),
        ),
        ("eval_bundle/eval_data/world/t.jsonl".into(), vec![b'x'; 300_000]),
    ]
}

/// A zip of `files`, deflated; `symlink` adds a link entry.
fn zip_of(files: &[(String, Vec<u8>)], symlink: Option<(&str, &str)>) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in files {
        w.start_file(name.as_str(), opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    if let Some((name, target)) = symlink {
        w.add_symlink(name, target, opts).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn fast() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        base_delay: Duration::from_millis(2),
        max_delay: Duration::from_millis(10),
    }
}

fn url(server: &TestServer) -> String {
    format!("{}/{NAME}", server.base_url)
}

/// Every path under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn unpacks_the_bundle_exactly_and_reuses_it() {
    let server = TestServer::start(&[(NAME.into(), zip_of(&bundle_files(), None))]);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("base/eval_bundle");
    server.queue(NAME, &[Fault::Status(503), Fault::Reset { after: 100 }]);
    let out = download_eval_bundle(&url(&server), &dest, fast(), &mut |_| {}).unwrap();
    assert!(matches!(out, BundleOutcome::Fetched { files: 3, .. }), "{out:?}");
    for (name, bytes) in bundle_files() {
        let rel = name.strip_prefix("eval_bundle/").unwrap();
        assert_eq!(std::fs::read(dest.join(rel)).unwrap(), bytes, "{rel}");
    }
    // nothing but the bundle is left in the base folder (no temporary zip or staging folder)
    let base: Vec<_> = std::fs::read_dir(tmp.path().join("base"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(base, vec!["eval_bundle"]);
    assert_eq!(server.gets_of(NAME), 3, "503 and reset retried");
    let again = download_eval_bundle(&url(&server), &dest, fast(), &mut |_| {}).unwrap();
    assert_eq!(again, BundleOutcome::AlreadyThere);
    assert_eq!(
        server.gets_of(NAME),
        3,
        "an existing bundle is used as is, without a request"
    );
}

#[test]
fn a_404_is_final_and_leaves_nothing() {
    let server = TestServer::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("eval_bundle");
    let err = download_eval_bundle(&url(&server), &dest, fast(), &mut |_| {}).unwrap_err();
    assert!(err.message.contains("HTTP 404"), "{err}");
    assert_eq!(server.gets_of(NAME), 1);
    assert!(tree(tmp.path()).is_empty(), "{:?}", tree(tmp.path()));
}

fn assert_refused(files: Vec<(String, Vec<u8>)>, symlink: Option<(&str, &str)>, says: &str) {
    let server = TestServer::start(&[(NAME.into(), zip_of(&files, symlink))]);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("a/b/eval_bundle");
    let err = download_eval_bundle(&url(&server), &dest, fast(), &mut |_| {}).unwrap_err();
    assert!(err.message.contains(says), "{err}");
    // nothing under the final name, no staging left, nothing written above it
    assert_eq!(tree(tmp.path()), vec!["a", "a/b"], "{says}");
}

#[test]
fn hostile_archives_are_refused() {
    let mut climbing = bundle_files();
    climbing.push(("eval_bundle/../../../evil.txt".into(), b"pwned".to_vec()));
    assert_refused(climbing, None, "outside the bundle folder");
    let mut absolute = bundle_files();
    absolute.push(("/tmp/nc-eval-bundle-evil.txt".into(), b"pwned".to_vec()));
    assert_refused(absolute, None, "outside the bundle folder");
    assert!(!Path::new("/tmp/nc-eval-bundle-evil.txt").exists());
    assert_refused(bundle_files(), Some(("eval_bundle/link", "/etc")), "symbolic link");
    let not_a_bundle = vec![("readme.txt".to_string(), b"hi".to_vec())];
    assert_refused(not_a_bundle, None, "no core.yaml");
}

#[test]
fn nc_data_download_eval_bundle_uses_nanochats_folder() {
    let server = TestServer::start(&[(NAME.into(), zip_of(&bundle_files(), None))]);
    let tmp = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_nc-data"))
            .args(["download", "--eval-bundle"])
            .env("NANOCHAT_BASE_DIR", tmp.path())
            .env("NC_EVAL_BUNDLE_URL", url(&server))
            .output()
            .unwrap()
    };
    let out = run();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(tmp.path().join("eval_bundle/core.yaml").is_file());
    let out = run();
    assert!(String::from_utf8_lossy(&out.stdout).contains("used as is"));
    assert_eq!(server.gets_of(NAME), 1);
}
