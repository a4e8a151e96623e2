//! The transmission phase: a stream of request headers and payloads (any
//! magic, command, flags, offset, length) against a 64 KiB temp volume.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hostcryptd::fuzzing::transmission(data));
