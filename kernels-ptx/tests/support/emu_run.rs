//! What the tests that compile kernels for their CPU emulation with g++ share (`emulation.rs` here,
//! comm/tests/p2p_emu.rs): whether g++ runs on this machine, and a finished program's output as one text.

use std::process::{Command, Output};

/// True where `g++ --version` runs and succeeds; otherwise prints that `what` was not run (the test then passes:
/// a machine without g++ cannot run the emulation) and returns false.
pub fn gxx_present(what: &str) -> bool {
    let gxx = Command::new("g++").arg("--version").output();
    let present = matches!(gxx, Ok(ref o) if o.status.success());
    if !present {
        eprintln!("no g++: {what} was not run");
    }
    present
}

/// stdout then stderr, for the checks and a failed assertion's message.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
