//! The simulator's libraries for a test file of simulated ranks, or None with the line saying why the file's
//! tests did not run. For files that also include tests/src/sim.rs as `mod sim`.
#![allow(dead_code)]

use std::path::PathBuf;

/// The simulator's libraries (the cuBLAS stand-ins and `also`, a library or generated source the tests need),
/// built if they are not; None, with the skip line naming `test_file`, where they cannot be.
pub fn simulator_with(also: &str, test_file: &str) -> Option<PathBuf> {
    let mut needs = crate::sim::BLAS_LIBRARIES.to_vec();
    needs.push(also);
    match crate::sim::simulator_libraries(&needs) {
        Ok(libs) => Some(libs),
        Err(why) => {
            eprintln!("no simulated GPU with {also}: {why}; {test_file} not run");
            None
        }
    }
}
