//! `cargo fuzz run enqueue_raw`: see `taskd::fuzzing::enqueue_raw` for the input and what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskd::fuzzing::enqueue_raw(data));
