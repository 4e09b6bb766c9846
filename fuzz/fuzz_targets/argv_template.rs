//! `cargo fuzz run argv_template`: see `taskd::fuzzing::argv_template` for the input and what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskd::fuzzing::argv_template(data));
