//! `cargo fuzz run worker_line`: see `taskd::fuzzing::worker_line` for the input and what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskd::fuzzing::worker_line(data));
