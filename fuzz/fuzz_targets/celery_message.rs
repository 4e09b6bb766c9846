//! `cargo fuzz run celery_message`: see `taskd::fuzzing::celery_message` for the input and
//! what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskd::fuzzing::celery_message(data));
