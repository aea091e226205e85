//! The out dir belongs to one run: a fresh run (no `--resume`) into a folder that already holds a run's metrics
//! or checkpoints is refused before anything is written, so two runs never mix their files and nothing a run
//! wrote is replaced by another's.

use super::metrics::METRICS_FILE;
use crate::checkpoint;
use crate::error::{NcError, Result};
use std::path::Path;

/// What a previous run left in an out dir (None: nothing, a fresh run may start there).
fn previous_run(out_dir: &Path) -> Result<Option<String>> {
    let mut found = Vec::new();
    let metrics = out_dir.join(METRICS_FILE);
    // a run that failed before its first record leaves an empty file: nothing to lose
    if metrics.metadata().is_ok_and(|m| m.len() > 0) {
        found.push(METRICS_FILE.to_string());
    }
    let root = checkpoint::checkpoints_dir(out_dir);
    if root.is_dir() {
        let entries = std::fs::read_dir(&root).map_err(|e| NcError::new(format!("{}: {e}", root.display())))?;
        let mut steps: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            // checkpoints, complete or not; the leftovers of interrupted saves (dot folders) are no run's output
            .filter(|n| n.starts_with("step_"))
            .collect();
        steps.sort();
        match steps.as_slice() {
            [] => {}
            [one] => found.push(format!("checkpoints/{one}")),
            [first, .., last] => found.push(format!("checkpoints {first} .. {last}")),
        }
    }
    Ok((!found.is_empty()).then(|| found.join(" and ")))
}

/// Refuse a fresh run into an out dir holding another run's outputs, saying the ways on; Ok when the folder is
/// new, empty of runs, or the run resumes.
pub fn check_fresh_run(out_dir: &Path, resuming: bool) -> Result<()> {
    if resuming {
        return Ok(());
    }
    let Some(what) = previous_run(out_dir)? else {
        return Ok(());
    };
    // a run that ended before its first checkpoint leaves nothing to resume: say so instead of --resume
    let go_on = if checkpoint::latest(out_dir)?.is_some() {
        "Continue that run with the same flags plus --resume"
    } else {
        "That run saved no complete checkpoint to --resume from (delete the folder to start over there)"
    };
    Err(NcError::new(format!(
        "the out dir {} already holds a run ({what}); nothing was changed. {go_on}, or start a new one in another \
         folder with --out-dir DIR or --model-tag NAME",
        out_dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_or_checkpoints_mark_a_used_out_dir() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        check_fresh_run(&d.join("new"), false).unwrap();
        check_fresh_run(d, false).unwrap();
        // an empty metrics file and an interrupted save's leftovers are no run to protect
        std::fs::write(d.join(METRICS_FILE), "").unwrap();
        std::fs::create_dir_all(d.join("checkpoints/.partial-step_000002")).unwrap();
        check_fresh_run(d, false).unwrap();
        std::fs::write(d.join(METRICS_FILE), "{\"step\": 0}\n").unwrap();
        let e = check_fresh_run(d, false).unwrap_err();
        assert!(
            e.message.contains(METRICS_FILE) && e.message.contains("no complete checkpoint to --resume"),
            "{e}"
        );
        assert!(
            e.message.contains("--out-dir") && e.message.contains("--model-tag"),
            "{e}"
        );
        assert!(!e.message.contains('\n'));
        check_fresh_run(d, true).unwrap();
        std::fs::remove_file(d.join(METRICS_FILE)).unwrap();
        for s in ["step_000004", "step_000002"] {
            std::fs::create_dir_all(d.join("checkpoints").join(s)).unwrap();
        }
        let e = check_fresh_run(d, false).unwrap_err();
        assert!(e.message.contains("step_000002 .. step_000004"), "{e}");
        // a complete one can be resumed
        std::fs::write(d.join("checkpoints/step_000004/COMPLETE"), "4\n").unwrap();
        let e = check_fresh_run(d, false).unwrap_err();
        assert!(e.message.contains("same flags plus --resume"), "{e}");
    }
}
