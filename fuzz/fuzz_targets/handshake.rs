//! The NBD handshake as a client drives it: greeting flags, then options
//! (LIST, INFO, GO, EXPORT_NAME, STARTTLS, STRUCTURED_REPLY, unknown ones)
//! with any lengths. First byte: the listener's TLS mode.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hostcryptd::fuzzing::handshake(data));
