//! Unit tests of `crypto/xts.rs`, in a file of their own to keep that one short.

use super::*;
use proptest::prelude::*;

const IEEE_KEY: &str = concat!(
    "2718281828459045235360287471352662497757247093699959574966967627",
    "3141592653589793238462643383279502884197169399375105820974944592"
);

/// IEEE 1619-2007 Annex B vector 10: XTS-AES-256, 512-byte data unit,
/// data unit sequence number 0xff, plaintext bytes 0..=255 twice.
const IEEE_V10_CIPHERTEXT: [&str; 16] = [
    "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
    "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd",
    "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
    "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca",
    "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0",
    "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
    "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec",
    "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a",
    "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1",
    "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae",
    "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29",
    "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac",
    "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f",
    "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385",
    "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa",
    "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
];

fn cipher(key: &[u8], sector: usize) -> SectorCipher {
    SectorCipher::new(&Dek::from_slice(key).unwrap(), sector)
}

#[test]
fn ieee_1619_vector_10() {
    let key = hex::decode(IEEE_KEY).unwrap();
    let plaintext: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let xts = cipher(&key, 512);
    let mut buf = plaintext.clone();
    xts.encrypt(&mut buf, 0xff);
    assert_eq!(hex::encode(&buf), IEEE_V10_CIPHERTEXT.concat());
    xts.decrypt(&mut buf, 0xff);
    assert_eq!(buf, plaintext);
}

#[test]
fn picks_the_widest_vector_kernel_the_cpu_has() {
    let xts = SectorCipher::new(&Dek::generate().unwrap(), 4096);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("vaes") && is_x86_feature_detected!("avx512f") {
        assert_eq!(xts.kernel(), "vaes-avx512");
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("vaes") && is_x86_feature_detected!("avx2") {
        assert_eq!(xts.kernel(), "vaes-avx2");
        return;
    }
    assert_eq!(xts.kernel(), "aes-ni (aes crate)");
}

/// The kernels this CPU runs (at least the portable one), each checked
/// on its own below whatever `new` would pick.
fn available(dek: &Dek, size: usize) -> Vec<SectorCipher> {
    let found: Vec<_> = XtsKernel::ALL
        .into_iter()
        .filter_map(|k| SectorCipher::with_kernel(dek, size, k))
        .collect();
    eprintln!(
        "XTS kernels on this CPU: {:?}",
        found.iter().map(|c| c.kernel()).collect::<Vec<_>>()
    );
    found
}

#[test]
fn every_available_kernel_passes_ieee_1619_vector_10() {
    let dek = Dek::from_slice(&hex::decode(IEEE_KEY).unwrap()).unwrap();
    let plaintext: Vec<u8> = (0..512).map(|i| i as u8).collect();
    for xts in available(&dek, 512) {
        let mut buf = plaintext.clone();
        xts.encrypt(&mut buf, 0xff);
        assert_eq!(
            hex::encode(&buf),
            IEEE_V10_CIPHERTEXT.concat(),
            "{}",
            xts.kernel()
        );
        xts.decrypt(&mut buf, 0xff);
        assert_eq!(buf, plaintext, "{}", xts.kernel());
    }
}

/// Sector sizes that leave each vector loop's remainder paths work
/// (e.g. 576 = one 12-vector step, no 8-vector step, two single
/// vectors on the AVX2 kernel), for every kernel, against OpenSSL.
#[test]
fn every_available_kernel_handles_every_remainder() {
    let key: Vec<u8> = (0..DEK_LEN as u8).map(|b| b.wrapping_mul(37)).collect();
    let dek = Dek::from_slice(&key).unwrap();
    for size in [16, 64, 128, 576, 704, 1024, 2048, 2112] {
        let data: Vec<u8> = (0..size * 3).map(|i| (i * 13 + 5) as u8).collect();
        let expected = openssl_xts(&key, &data, size, 77, true);
        for xts in available(&dek, size) {
            let mut buf = data.clone();
            xts.encrypt(&mut buf, 77);
            assert_eq!(buf, expected, "{} at {size}", xts.kernel());
            xts.decrypt(&mut buf, 77);
            assert_eq!(buf, data, "{} at {size}", xts.kernel());
        }
    }
}

/// Sector `n` of a multi-sector buffer uses tweak `first + n`.
#[test]
fn consecutive_sectors_use_consecutive_tweaks() {
    let key = hex::decode(IEEE_KEY).unwrap();
    let xts = cipher(&key, 512);
    let plaintext: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let mut two = [plaintext.clone(), plaintext.clone()].concat();
    xts.encrypt(&mut two, 0xfe);
    assert_eq!(hex::encode(&two[512..]), IEEE_V10_CIPHERTEXT.concat());
}

/// Buffers longer than one tweak batch, with a partial last batch whose
/// sector count is not a multiple of four, match OpenSSL sector by sector.
#[test]
fn long_buffers_cross_tweak_batches() {
    let key: Vec<u8> = (0..DEK_LEN as u8).collect();
    for (size, count) in [(512, TWEAK_BATCH * 2 + 5), (4096, TWEAK_BATCH + 1)] {
        let data: Vec<u8> = (0..size * count)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let mut ours = data.clone();
        cipher(&key, size).encrypt(&mut ours, 1000);
        assert_eq!(ours, openssl_xts(&key, &data, size, 1000, true));
        cipher(&key, size).decrypt(&mut ours, 1000);
        assert_eq!(ours, data);
    }
}

fn openssl_xts(key: &[u8], data: &[u8], sector_size: usize, first: u64, enc: bool) -> Vec<u8> {
    use openssl::symm::{Cipher, Crypter, Mode};
    let mut out = Vec::with_capacity(data.len());
    for (i, sector) in data.chunks(sector_size).enumerate() {
        let iv = ((first + i as u64) as u128).to_le_bytes();
        let mode = if enc { Mode::Encrypt } else { Mode::Decrypt };
        let mut c = Crypter::new(Cipher::aes_256_xts(), mode, key, Some(&iv)).unwrap();
        c.pad(false);
        let mut buf = vec![0u8; sector.len() + 16];
        let n = c.update(sector, &mut buf).unwrap();
        let m = c.finalize(&mut buf[n..]).unwrap();
        out.extend_from_slice(&buf[..n + m]);
    }
    out
}

fn xts_mode_oracle(key: &[u8], data: &[u8], sector_size: usize, first: u64) -> Vec<u8> {
    use aes::cipher::KeyInit as _;
    let xts = xts_mode::Xts128::new(
        Aes256::new_from_slice(&key[..32]).unwrap(),
        Aes256::new_from_slice(&key[32..]).unwrap(),
    );
    let mut out = data.to_vec();
    xts.encrypt_area(
        &mut out,
        sector_size,
        first as u128,
        xts_mode::get_tweak_default,
    );
    out
}

fn key_strategy() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), DEK_LEN)
        .prop_filter("XTS halves must differ", |k| k[..32] != k[32..])
}

fn sectors_strategy() -> impl Strategy<Value = (usize, Vec<u8>)> {
    prop_oneof![Just(512usize), Just(4096usize)].prop_flat_map(|size| {
        (1usize..=4).prop_flat_map(move |count| {
            proptest::collection::vec(any::<u8>(), size * count).prop_map(move |v| (size, v))
        })
    })
}

/// The key schedules of every kernel are in the key arena, in a
/// locked, non-dumped mapping, as is the DEK they came from.
#[test]
fn key_schedules_live_in_the_arena() {
    let dek = Dek::generate().unwrap();
    let at = dek.expose().as_ptr() as usize;
    assert!(crate::crypto::arena::contains(at, DEK_LEN));
    for xts in available(&dek, 4096) {
        let (at, len) = xts.schedule_range();
        assert!(crate::crypto::arena::contains(at, len), "{}", xts.kernel());
        assert!(crate::crypto::arena::tests::is_protected(at));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every kernel this CPU runs agrees with OpenSSL, both ways.
    #[test]
    fn every_available_kernel_matches_openssl(key in key_strategy(), (size, data) in sectors_strategy(), first in any::<u64>()) {
        let first = first.saturating_sub(8);
        let dek = Dek::from_slice(&key).unwrap();
        let expected = openssl_xts(&key, &data, size, first, true);
        for xts in available(&dek, size) {
            let mut buf = data.clone();
            xts.encrypt(&mut buf, first);
            prop_assert_eq!(&buf, &expected, "{}", xts.kernel());
            xts.decrypt(&mut buf, first);
            prop_assert_eq!(&buf, &data, "{}", xts.kernel());
        }
    }

    #[test]
    fn matches_openssl(key in key_strategy(), (size, data) in sectors_strategy(), first in any::<u64>()) {
        let first = first.saturating_sub(8);
        let xts = cipher(&key, size);
        let mut buf = data.clone();
        xts.encrypt(&mut buf, first);
        prop_assert_eq!(&buf, &openssl_xts(&key, &data, size, first, true));
        prop_assert_eq!(openssl_xts(&key, &buf, size, first, false), data.clone());
        xts.decrypt(&mut buf, first);
        prop_assert_eq!(buf, data);
    }

    #[test]
    fn matches_xts_mode_crate(key in key_strategy(), (size, data) in sectors_strategy(), first in any::<u64>()) {
        let first = first.saturating_sub(8);
        let xts = cipher(&key, size);
        let mut buf = data.clone();
        xts.encrypt(&mut buf, first);
        prop_assert_eq!(buf, xts_mode_oracle(&key, &data, size, first));
    }
}

#[test]
fn decrypting_into_another_buffer_matches_openssl_and_leaves_the_source() {
    let key = hex::decode(IEEE_KEY).unwrap();
    let dek = Dek::from_slice(&key).unwrap();
    for size in [512usize, 4096] {
        // Longer than one tweak batch, so the batches' seams are crossed.
        let plain: Vec<u8> = (0..size * 300).map(|i| (i * 7 + 3) as u8).collect();
        let first = 1_000_000;
        let sealed = openssl_xts(&key, &plain, size, first, true);
        for xts in available(&dek, size) {
            let mut target = vec![0u8; sealed.len()];
            let source = sealed.clone();
            xts.decrypt_to(&source, &mut target, first);
            assert_eq!(source, sealed, "{}: the source changed", xts.kernel());
            assert_eq!(target, plain, "{}: wrong plaintext", xts.kernel());
        }
    }
}

#[test]
fn encrypting_from_another_buffer_matches_openssl_and_leaves_the_source() {
    let key = hex::decode(IEEE_KEY).unwrap();
    let dek = Dek::from_slice(&key).unwrap();
    for size in [512usize, 4096] {
        // Longer than one tweak batch, so the batches' seams are crossed.
        let plain: Vec<u8> = (0..size * 300).map(|i| (i * 11 + 5) as u8).collect();
        let first = 2_000_000;
        let sealed = openssl_xts(&key, &plain, size, first, true);
        for xts in available(&dek, size) {
            let source = plain.clone();
            let mut target = vec![0u8; plain.len()];
            // SAFETY: `source` is ours and as long as `target`.
            unsafe { xts.encrypt_from_raw(source.as_ptr(), &mut target, first) };
            assert_eq!(source, plain, "{}: the source changed", xts.kernel());
            assert_eq!(target, sealed, "{}: wrong ciphertext", xts.kernel());
        }
    }
}

#[test]
#[should_panic(expected = "whole number of sectors")]
fn decrypting_into_another_buffer_refuses_a_partial_sector() {
    let xts = SectorCipher::new(&Dek::generate().unwrap(), 512);
    xts.decrypt_to(&[0u8; 520], &mut [0u8; 520], 0);
}
