//! XTS-AES-256 over whole sectors, in place, dm-crypt `aes-xts-plain64` style.
//!
//! The tweak of a sector is its index as a 128-bit little-endian integer
//! (plain64); with 4096-byte sectors the index counts 4096-byte units, which
//! is cryptsetup's `--iv-large-sectors`. Key = data key (first 32 bytes) then
//! tweak key (last 32 bytes), the same order OpenSSL's `aes-256-xts` uses.
//!
//! Hand-written on top of the `aes` crate's multi-block API rather than using
//! the `xts-mode` crate: `xts-mode` encrypts one AES block at a time, which is
//! about ten times slower than feeding the whole sector to AES-NI's pipelined
//! batch path. Here the tweak sequence of a sector is computed first, then the
//! sector is whitened, batch-encrypted and whitened again. `xts-mode` and
//! OpenSSL stay as test oracles. Sector sizes are multiples of 16 bytes, so no
//! ciphertext stealing is needed.

use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::Aes256;

use super::arena::Locked;
use super::{Dek, DEK_LEN};

/// The AES block size; every sector size is a multiple of it.
pub const XTS_BLOCK: usize = 16;

/// Largest sector we batch on the stack (4096 bytes = 256 tweaks).
const MAX_BATCH_BLOCKS: usize = 256;

/// Sectors whose initial tweaks are encrypted in one batch.
const TWEAK_BATCH: usize = 256;

/// The XTS implementations; [`SectorCipher::new`] picks the fastest this
/// CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XtsKernel {
    /// The `aes` crate's batch API (AES-NI when present, else software).
    Portable,
    /// VAES on 256-bit vectors (AVX2).
    VaesAvx2,
    /// VAES on 512-bit vectors (AVX-512F).
    VaesAvx512,
}

impl XtsKernel {
    pub const ALL: [XtsKernel; 3] = [
        XtsKernel::Portable,
        XtsKernel::VaesAvx2,
        XtsKernel::VaesAvx512,
    ];
}

/// An XTS-AES-256 cipher bound to one DEK and one sector size.
///
/// The expanded AES key schedules live in a slot of the key arena
/// (`arena.rs`), zeroized when the cipher is dropped.
pub struct SectorCipher {
    keys: Locked<Schedules>,
    sector_size: usize,
}

/// The key schedules of one XTS key.
struct Schedules {
    data: Aes256,
    tweak: Aes256,
    /// The VAES kernel's key schedule, when the CPU has VAES.
    #[cfg(target_arch = "x86_64")]
    vaes: Option<super::xts_vaes::VaesKeys>,
}

impl Schedules {
    fn portable(key: &[u8; DEK_LEN]) -> Self {
        Schedules {
            data: Aes256::new(&Array::from(*arr32(&key[..32]))),
            tweak: Aes256::new(&Array::from(*arr32(&key[32..]))),
            #[cfg(target_arch = "x86_64")]
            vaes: None,
        }
    }
}

impl SectorCipher {
    /// Builds the cipher with the fastest kernel this CPU supports;
    /// `sector_size` must be a non-zero multiple of 16.
    pub fn new(dek: &Dek, sector_size: usize) -> Self {
        [XtsKernel::VaesAvx512, XtsKernel::VaesAvx2]
            .into_iter()
            .find_map(|kernel| Self::with_kernel(dek, sector_size, kernel))
            .unwrap_or_else(|| Self::portable(dek, sector_size))
    }

    /// The cipher on a given kernel, or `None` when this CPU (or this
    /// sector size) cannot run it; for tests and benchmarks.
    pub fn with_kernel(dek: &Dek, sector_size: usize, kernel: XtsKernel) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            use super::xts_vaes::{VaesKeys, Width};
            let width = match kernel {
                XtsKernel::Portable => return Some(Self::portable(dek, sector_size)),
                XtsKernel::VaesAvx2 => Width::Avx2,
                XtsKernel::VaesAvx512 => Width::Avx512,
            };
            if !VaesKeys::fits(sector_size) || !width.supported() {
                return None;
            }
            Self::check(sector_size);
            let key = dek.expose();
            let keys = Locked::new(|| Schedules {
                vaes: VaesKeys::with_width(arr32(&key[..32]), arr32(&key[32..]), width),
                ..Schedules::portable(key)
            });
            Some(SectorCipher { keys, sector_size })
        }
        #[cfg(not(target_arch = "x86_64"))]
        match kernel {
            XtsKernel::Portable => Some(Self::portable(dek, sector_size)),
            _ => None,
        }
    }

    /// Which kernel [`SectorCipher::new`] picked, for logs and benchmarks.
    pub fn kernel(&self) -> &'static str {
        #[cfg(target_arch = "x86_64")]
        if let Some(vaes) = &self.keys.vaes {
            return vaes.width().name();
        }
        "aes-ni (aes crate)"
    }

    /// The portable kernel (the `aes` crate's batch API, which itself uses
    /// AES-NI when present); also the oracle the vector kernel is tested against.
    pub fn portable(dek: &Dek, sector_size: usize) -> Self {
        Self::check(sector_size);
        let key = dek.expose();
        SectorCipher {
            keys: Locked::new(|| Schedules::portable(key)),
            sector_size,
        }
    }

    fn check(sector_size: usize) {
        assert!(
            sector_size > 0 && sector_size.is_multiple_of(XTS_BLOCK),
            "sector size {sector_size} is not a multiple of 16"
        );
    }

    /// Where the key schedules live, for the arena's tests.
    #[cfg(test)]
    pub(crate) fn schedule_range(&self) -> (usize, usize) {
        (
            &*self.keys as *const Schedules as usize,
            std::mem::size_of::<Schedules>(),
        )
    }

    pub fn sector_size(&self) -> usize {
        self.sector_size
    }

    /// Encrypts `buf` (a whole number of sectors) in place; the first sector
    /// has index `first_sector`.
    pub fn encrypt(&self, buf: &mut [u8], first_sector: u64) {
        self.apply(buf, first_sector, Direction::Encrypt);
    }

    /// Decrypts `buf` (a whole number of sectors) in place.
    pub fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        self.apply(buf, first_sector, Direction::Decrypt);
    }

    fn apply(&self, buf: &mut [u8], first_sector: u64, direction: Direction) {
        assert_eq!(
            buf.len() % self.sector_size,
            0,
            "buffer is not a whole number of sectors"
        );
        // The initial tweaks of up to TWEAK_BATCH sectors are encrypted in
        // one pipelined call: one block per sector, serially, stalls on
        // each block's latency.
        let mut initial = [0u8; 16 * TWEAK_BATCH];
        for (c, group) in buf.chunks_mut(self.sector_size * TWEAK_BATCH).enumerate() {
            let first = first_sector.wrapping_add((c * TWEAK_BATCH) as u64);
            let n = group.len() / self.sector_size;
            // Rounded up to whole 64-byte vectors; the extra tweaks are unused.
            let used = &mut initial[..(16 * n).next_multiple_of(64)];
            for (i, t) in used.chunks_exact_mut(16).enumerate() {
                t.copy_from_slice(&(first.wrapping_add(i as u64) as u128).to_le_bytes());
            }
            self.encrypt_tweaks(used);
            for (sector, t) in group
                .chunks_exact_mut(self.sector_size)
                .zip(used.chunks_exact(16))
            {
                let tweak = u128::from_le_bytes(t.try_into().expect("16-byte chunk"));
                self.apply_sector(sector, tweak, direction);
            }
        }
    }

    /// Encrypts 16-byte sector numbers into initial tweaks, in place.
    fn encrypt_tweaks(&self, blocks: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(vaes) = &self.keys.vaes {
            vaes.encrypt_tweaks(blocks);
            return;
        }
        let (blocks, _) = Array::slice_as_chunks_mut(blocks);
        self.keys.tweak.encrypt_blocks(blocks);
    }

    /// Applies XTS to one sector whose encrypted initial tweak is `tweak`.
    fn apply_sector(&self, sector: &mut [u8], mut tweak: u128, direction: Direction) {
        #[cfg(target_arch = "x86_64")]
        if let Some(vaes) = &self.keys.vaes {
            match direction {
                Direction::Encrypt => vaes.encrypt(sector, tweak),
                Direction::Decrypt => vaes.decrypt(sector, tweak),
            }
            return;
        }

        let mut tweaks = [0u128; MAX_BATCH_BLOCKS];
        for chunk in sector.chunks_mut(MAX_BATCH_BLOCKS * XTS_BLOCK) {
            let n = chunk.len() / XTS_BLOCK;
            for (slot, block) in tweaks[..n]
                .iter_mut()
                .zip(chunk.chunks_exact_mut(XTS_BLOCK))
            {
                *slot = tweak;
                xor_block(block, tweak);
                tweak = mul_alpha(tweak);
            }
            let (blocks, rest) = Array::slice_as_chunks_mut(chunk);
            debug_assert!(rest.is_empty());
            match direction {
                Direction::Encrypt => self.keys.data.encrypt_blocks(blocks),
                Direction::Decrypt => self.keys.data.decrypt_blocks(blocks),
            }
            for (slot, block) in tweaks[..n].iter().zip(chunk.chunks_exact_mut(XTS_BLOCK)) {
                xor_block(block, *slot);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

fn arr32(bytes: &[u8]) -> &[u8; 32] {
    bytes.try_into().expect("caller passes exactly 32 bytes")
}

#[inline(always)]
fn xor_block(block: &mut [u8], tweak: u128) {
    let value = u128::from_le_bytes(block.try_into().expect("16-byte chunk")) ^ tweak;
    block.copy_from_slice(&value.to_le_bytes());
}

/// Multiplies the tweak by the primitive element α of GF(2^128) with the
/// IEEE 1619 little-endian bit order: shift left, fold the carry into 0x87.
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

#[cfg(test)]
mod tests {
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
}
