//! The remote-backing NBD client against a hostile or broken server: its
//! handshake replies, and its replies to requests in flight (simple and
//! structured). Nothing may panic, hang or read past what a request asked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hostcryptd::fuzzing::nbd_client(data);
});
