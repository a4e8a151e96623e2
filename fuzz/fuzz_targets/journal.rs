//! The re-encryption journal as a disk may hold it: torn, stale or forged
//! records (first byte odd: checksums fixed up so the fields behind them
//! are reached).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hostcryptd::fuzzing::journal(data));
