#![no_main]
//! Fuzz target: see nc_core::data::fuzz_targets::encode.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nc_core::data::fuzz_targets::encode(data));
