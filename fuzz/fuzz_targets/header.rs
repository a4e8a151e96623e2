//! Volume header decoding: the raw bytes, and the same bytes behind a valid
//! magic and checksum (so the fuzzer reaches the fields). Whatever decodes
//! must encode and decode back to itself.
#![no_main]
use hostcryptd::volume::header::{HEADER_SIZE, MAGIC};
use hostcryptd::volume::Header;
use sha2::{Digest, Sha256};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = Header::decode(data);
    let mut raw = vec![0u8; HEADER_SIZE];
    raw[..8].copy_from_slice(&MAGIC);
    let body = HEADER_SIZE - 32;
    let n = data.len().min(body - 8);
    raw[8..8 + n].copy_from_slice(&data[..n]);
    let sum = Sha256::digest(&raw[..body]);
    raw[body..].copy_from_slice(&sum);
    if let Ok(header) = Header::decode(&raw) {
        let encoded = header.encode().expect("a decoded header encodes");
        let again = Header::decode(&encoded[..]).expect("an encoded header decodes");
        assert_eq!(again, header, "header round trip changed it");
    }
});
