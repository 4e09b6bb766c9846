//! `cargo fuzz run config`: see `taskd::fuzzing::config` for the input and what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskd::fuzzing::config(data));
