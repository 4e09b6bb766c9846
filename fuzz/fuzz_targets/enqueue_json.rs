//! `cargo fuzz run enqueue_json`: see `taskd::fuzzing::enqueue_json` for the input and what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskd::fuzzing::enqueue_json(data));
