//! Volume header decoding: the raw bytes, and the same bytes behind a valid
//! magic and checksum (so the fuzzer reaches the fields, version 3's key
//! checks and MAC among them). Whatever decodes must encode and decode
//! back to itself; verifying it never panics, and once sealed with a key it
//! verifies under that key and no other.
#![no_main]
use hostcryptd::crypto::Dek;
use hostcryptd::volume::auth::{self, GenerationKeys};
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
    if let Ok(mut header) = Header::decode(&raw) {
        let encoded = header.encode().expect("a decoded header encodes");
        let again = Header::decode(&encoded[..]).expect("an encoded header decodes");
        assert_eq!(again, header, "header round trip changed it");
        let dek = Dek::from_slice(&[0x5a; 64]).expect("a 64-byte key");
        let keys = GenerationKeys::derive(header.uuid, header.dek_generation, &dek, None);
        let _ = auth::verify(&header, &keys);
        let target = header.reencrypt.map(|_| [0x33; 32]);
        if auth::seal_with(&mut header, &keys, target).is_ok() {
            assert_eq!(auth::verify(&header, &keys), Ok(()), "a sealed header verifies");
            let other = Dek::from_slice(&[0xa5; 64]).expect("a 64-byte key");
            let wrong = GenerationKeys::derive(header.uuid, header.dek_generation, &other, None);
            assert!(auth::verify(&header, &wrong).is_err(), "and only under its key");
        }
    }
});
