//! XTS-AES-256 throughput: hostcrypt's sector cipher against OpenSSL's EVP
//! aes-256-xts and the `xts-mode` crate, at 512 B, 4 KiB, 64 KiB and 1 MiB
//! buffers (4 KiB sectors, 512-byte sectors for the 512 B case), on one
//! thread and on all cores (rayon over 4 KiB sectors).
//!
//! Run: `cargo bench -p hostcrypt-benches --bench xts`. Divan reports time
//! per buffer and bytes/s.

use aes::cipher::KeyInit;
use divan::counter::BytesCount;
use divan::Bencher;
use hostcryptd::crypto::{Dek, SectorCipher};
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use rayon::prelude::*;

const SIZES: &[usize] = &[512, 4096, 65536, 1 << 20];

fn main() {
    divan::main();
}

fn key() -> Dek {
    Dek::generate().expect("OS random generator")
}

fn sector_for(len: usize) -> usize {
    len.min(4096)
}

#[divan::bench(args = SIZES)]
fn hostcrypt_encrypt(bencher: Bencher, len: usize) {
    let xts = SectorCipher::new(&key(), sector_for(len));
    let mut buf = vec![0x5au8; len];
    bencher
        .counter(BytesCount::new(len))
        .bench_local(|| xts.encrypt(divan::black_box(&mut buf), 7));
}

#[divan::bench(args = SIZES)]
fn hostcrypt_portable_encrypt(bencher: Bencher, len: usize) {
    let xts = SectorCipher::portable(&key(), sector_for(len));
    let mut buf = vec![0x5au8; len];
    bencher
        .counter(BytesCount::new(len))
        .bench_local(|| xts.encrypt(divan::black_box(&mut buf), 7));
}

#[divan::bench(args = SIZES)]
fn hostcrypt_decrypt(bencher: Bencher, len: usize) {
    let xts = SectorCipher::new(&key(), sector_for(len));
    let mut buf = vec![0x5au8; len];
    bencher
        .counter(BytesCount::new(len))
        .bench_local(|| xts.decrypt(divan::black_box(&mut buf), 7));
}

/// OpenSSL EVP aes-256-xts keyed once; each sector only resets the IV
/// (tweak), which is how a block device would drive it.
#[divan::bench(args = SIZES)]
fn openssl_encrypt(bencher: Bencher, len: usize) {
    let dek = key();
    let sector = sector_for(len);
    let input = vec![0x5au8; len];
    let mut output = vec![0u8; len];
    let mut ctx = CipherCtx::new().expect("OpenSSL context");
    ctx.encrypt_init(Some(Cipher::aes_256_xts()), Some(dek.expose()), None)
        .expect("OpenSSL XTS key");
    bencher.counter(BytesCount::new(len)).bench_local(|| {
        for (i, (src, dst)) in input
            .chunks(sector)
            .zip(output.chunks_mut(sector))
            .enumerate()
        {
            let iv = (i as u128 + 7).to_le_bytes();
            ctx.encrypt_init(None, None, Some(&iv))
                .expect("OpenSSL XTS tweak");
            ctx.cipher_update(src, Some(dst))
                .expect("OpenSSL XTS update");
        }
    });
}

#[divan::bench(args = SIZES)]
fn xts_mode_encrypt(bencher: Bencher, len: usize) {
    let dek = key();
    let k = dek.expose();
    let xts = xts_mode::Xts128::new(
        aes::Aes256::new_from_slice(&k[..32]).expect("32-byte key"),
        aes::Aes256::new_from_slice(&k[32..]).expect("32-byte key"),
    );
    let mut buf = vec![0x5au8; len];
    bencher.counter(BytesCount::new(len)).bench_local(|| {
        xts.encrypt_area(&mut buf, sector_for(len), 7, xts_mode::get_tweak_default)
    });
}

/// All cores: 4 KiB sectors of a 1 MiB buffer spread over rayon's pool.
#[divan::bench]
fn hostcrypt_encrypt_all_cores_1m(bencher: Bencher) {
    let xts = SectorCipher::new(&key(), 4096);
    let mut buf = vec![0x5au8; 1 << 20];
    bencher.counter(BytesCount::new(buf.len())).bench_local(|| {
        buf.par_chunks_mut(64 * 1024)
            .enumerate()
            .for_each(|(i, chunk)| xts.encrypt(chunk, i as u64 * 16));
    });
}

/// Raw AES-256 batch throughput on the same build: the ceiling for XTS.
#[divan::bench(args = [4096])]
fn aes256_raw_blocks(bencher: Bencher, len: usize) {
    use aes::cipher::{Array, BlockCipherEncrypt};
    let cipher = aes::Aes256::new(&Array::from([7u8; 32]));
    let mut buf = vec![0x5au8; len];
    bencher.counter(BytesCount::new(len)).bench_local(|| {
        let (blocks, _) = Array::slice_as_chunks_mut(&mut buf);
        cipher.encrypt_blocks(blocks);
    });
}
