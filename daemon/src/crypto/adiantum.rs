//! Adiantum (XChaCha12 + AES-256 + NH/Poly1305), the wide-block mode
//! dm-crypt offers as `xchacha12,aes-adiantum-plain64`, for the inner layer
//! of a double-encrypted volume (`inner_cipher = "adiantum"`): a second
//! layer built on a different primitive (ChaCha) and mode than the outer
//! XTS-AES, so one broken algorithm or implementation does not expose the
//! data.
//!
//! The construction comes from the `adiantum` crate, checked here against
//! the reference vectors of Adiantum's authors (google/adiantum,
//! `test_vectors/ours/Adiantum`); this file only maps sectors to it. The
//! tweak is dm-crypt's plain64: the sector number, 64-bit little-endian,
//! zero-padded to Adiantum's 32-byte tweak. The key is the first 32 bytes
//! of the layer's DEK; the expanded cipher (its XChaCha12, NH, Poly1305 and
//! AES keys) lives in a slot of the key arena (`arena.rs`).
//!
//! Each sector's work in the crate happens on the stack, out of our reach:
//! the sector's XChaCha12 state and the HChaCha subkey it is built from,
//! copies of the Poly1305 hash keys, keystream blocks. None of it is
//! zeroed by the crate, so after the last sector of a call the stack those
//! frames used is overwritten ([`SCRUB_WORDS`]), once per call rather than
//! per sector: every sector reuses the same stack.

use adiantum::cipher::KeyInit;
use adiantum::Cipher;
use aes08::Aes256;
use chacha20::XChaCha12;

use super::arena::{scrub_stack_words, Locked};
use super::Dek;

/// Adiantum's key length (the XChaCha12 key).
pub const KEY_LEN: usize = 32;

/// Words of stack overwritten after a call's sectors: more than the
/// crate's encrypt and decrypt reach below [`for_sectors`]'s caller (the
/// test `a_call_leaves_nothing_on_the_stack_below` checks it).
const SCRUB_WORDS: usize = 1024;

pub struct AdiantumSectorCipher {
    cipher: Locked<Cipher<XChaCha12, Aes256>>,
    sector_size: usize,
}

impl AdiantumSectorCipher {
    pub fn new(dek: &Dek, sector_size: usize) -> Self {
        let key = adiantum::cipher::Key::<Cipher<XChaCha12, Aes256>>::from_slice(
            &dek.expose()[..KEY_LEN],
        );
        AdiantumSectorCipher {
            cipher: Locked::new(|| Cipher::new(key)),
            sector_size,
        }
    }

    fn tweak(sector: u64) -> [u8; 32] {
        let mut tweak = [0u8; 32];
        tweak[..8].copy_from_slice(&sector.to_le_bytes());
        tweak
    }

    /// Encrypts whole sectors in place; the first has index `first_sector`.
    pub fn encrypt(&self, buf: &mut [u8], first_sector: u64) {
        self.for_sectors(buf, first_sector, Cipher::encrypt);
        scrub_stack_words::<SCRUB_WORDS>();
    }

    /// Decrypts whole sectors in place.
    pub fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        self.for_sectors(buf, first_sector, Cipher::decrypt);
        scrub_stack_words::<SCRUB_WORDS>();
    }

    /// Runs `each` on every sector. Not inlined, so that the crate's
    /// state lies in frames below the caller's, where the scrub that
    /// follows reaches, and not in the caller's own.
    #[inline(never)]
    fn for_sectors(
        &self,
        buf: &mut [u8],
        first_sector: u64,
        each: impl Fn(&Cipher<XChaCha12, Aes256>, &mut [u8], &[u8]),
    ) {
        for (i, sector) in buf.chunks_exact_mut(self.sector_size).enumerate() {
            each(&self.cipher, sector, &Self::tweak(first_sector + i as u64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from google/adiantum (Apache-2.0),
    /// `test_vectors/ours/Adiantum/Adiantum_XChaCha12_32_AES256.json`:
    /// 32-byte tweaks on 512- and 4096-byte messages, a 17-byte tweak.
    const VECTORS: &str = include_str!("testdata/adiantum_xchacha12_aes256.json");

    #[test]
    fn matches_the_reference_vectors() {
        let vectors: Vec<serde_json::Value> = serde_json::from_str(VECTORS).unwrap();
        assert_eq!(vectors.len(), 3);
        for v in vectors {
            let hex = |k: &str| hex::decode(v[k].as_str().unwrap()).unwrap();
            let key = hex("key");
            let cipher = Cipher::<XChaCha12, Aes256>::new(adiantum::cipher::Key::<
                Cipher<XChaCha12, Aes256>,
            >::from_slice(&key));
            let mut buf = hex("plaintext");
            cipher.encrypt(&mut buf, &hex("tweak"));
            assert_eq!(buf, hex("ciphertext"));
            cipher.decrypt(&mut buf, &hex("tweak"));
            assert_eq!(buf, hex("plaintext"));
        }
    }

    #[test]
    fn the_expanded_cipher_lives_in_the_arena() {
        let sectors = AdiantumSectorCipher::new(&Dek::generate().unwrap(), 4096);
        let at = &*sectors.cipher as *const Cipher<XChaCha12, Aes256> as usize;
        let len = std::mem::size_of::<Cipher<XChaCha12, Aes256>>();
        assert!(crate::crypto::arena::contains(at, len));
    }

    const PAINT: u8 = 0xA5;

    /// Fills `N` bytes of stack below the caller's frame with [`PAINT`];
    /// returns where they lie.
    #[inline(never)]
    fn paint<const N: usize>() -> usize {
        let mut area = [PAINT; N];
        std::hint::black_box(&mut area);
        area.as_ptr() as usize
    }

    /// The stack below the caller after a call holds nothing the call's
    /// sectors left: every byte is still the paint, or zeroed. The stack
    /// is read through /proc/self/mem, since no Rust reference may point
    /// at dead stack; a few hundred bytes are allowed for the return
    /// addresses and saved registers of the last frames (ours and pread's).
    #[test]
    fn a_call_leaves_nothing_on_the_stack_below() {
        use std::os::fd::AsRawFd;
        const DEPTH: usize = 64 * 1024;
        let sectors = AdiantumSectorCipher::new(&Dek::generate().unwrap(), 4096);
        let mem = std::fs::File::open("/proc/self/mem").unwrap();
        let mut seen = vec![0u8; DEPTH];
        let mut buf = vec![0x11u8; 3 * 4096];
        for decrypt in [false, true] {
            let low = paint::<DEPTH>();
            if decrypt {
                sectors.decrypt(&mut buf, 5);
            } else {
                sectors.encrypt(&mut buf, 5);
            }
            // SAFETY: `seen` is DEPTH writable bytes; pread only writes them.
            let n = unsafe {
                libc::pread(
                    mem.as_raw_fd(),
                    seen.as_mut_ptr().cast(),
                    DEPTH,
                    low as libc::off_t,
                )
            };
            assert_eq!(n, DEPTH as isize);
            let left = seen.iter().filter(|&&b| b != PAINT && b != 0).count();
            let reached = seen.iter().position(|&b| b != PAINT).map(|at| DEPTH - at);
            assert!(
                left <= 512,
                "{left} bytes left on the stack (decrypt: {decrypt}, the calls reached {reached:?} bytes down)"
            );
        }
    }

    #[test]
    fn sectors_use_plain64_tweaks_and_round_trip() {
        let dek = Dek::generate().unwrap();
        let sectors = AdiantumSectorCipher::new(&dek, 4096);
        let mut plain = vec![0u8; 3 * 4096];
        getrandom::fill(&mut plain).unwrap();
        let mut buf = plain.clone();
        sectors.encrypt(&mut buf, 7);
        // Sector 8 on its own, with the plain64 tweak for 8.
        let cipher = Cipher::<XChaCha12, Aes256>::new(adiantum::cipher::Key::<
            Cipher<XChaCha12, Aes256>,
        >::from_slice(&dek.expose()[..32]));
        let mut one = plain[4096..8192].to_vec();
        let mut tweak = [0u8; 32];
        tweak[0] = 8;
        cipher.encrypt(&mut one, &tweak);
        assert_eq!(one, buf[4096..8192]);
        // Wide-block: one changed byte changes the whole sector.
        let mut flipped = plain.clone();
        flipped[100] ^= 1;
        sectors.encrypt(&mut flipped, 7);
        let differing = flipped[..4096]
            .iter()
            .zip(&buf[..4096])
            .filter(|(a, b)| a != b)
            .count();
        assert!(differing > 4000, "{differing}");
        sectors.decrypt(&mut buf, 7);
        assert_eq!(buf, plain);
    }
}
