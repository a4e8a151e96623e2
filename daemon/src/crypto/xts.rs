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
use zeroize::Zeroizing;

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

    /// Decrypts `source` (a whole number of sectors) into `target`, of
    /// the same length, leaving the ciphertext where it is: a reader's
    /// destination receives plaintext only, in one pass.
    pub fn decrypt_to(&self, source: &[u8], target: &mut [u8], first_sector: u64) {
        assert_eq!(
            source.len(),
            target.len(),
            "source and target differ in length"
        );
        // SAFETY: `target` is valid for writes of its length, which is
        // `source`'s; `&` and `&mut` cannot overlap.
        unsafe { self.decrypt_to_raw(source, target.as_mut_ptr(), first_sector) }
    }

    /// [`SectorCipher::decrypt_to`] into memory another party may read
    /// and write meanwhile (a guest's buffer): `target` is only ever
    /// written, never read back, so what the other party puts there
    /// never reaches the cipher (no decryption oracle), and it sees
    /// plaintext only.
    ///
    /// # Safety
    /// `source.len()` bytes at `target` must be valid for writes for the
    /// whole call and must not overlap `source`.
    pub unsafe fn decrypt_to_raw(&self, source: &[u8], target: *mut u8, first_sector: u64) {
        let ss = self.sector_size;
        // The portable kernel's sector of our own (unused by the VAES
        // kernels): allocated once per call, wiped after.
        let mut own = Zeroizing::new(Vec::new());
        self.each_sector_tweak(source.len(), first_sector, |i, tweak| {
            let from = &source[i * ss..][..ss];
            // SAFETY: sector `i` lies inside the `source.len()` bytes the
            // caller vouches for.
            let to = unsafe { target.add(i * ss) };
            #[cfg(target_arch = "x86_64")]
            if let Some(vaes) = &self.keys.vaes {
                // SAFETY: as above; the kernel only stores to `to`.
                unsafe { vaes.decrypt_to_raw(from, to, tweak) };
                return;
            }
            // The portable kernel works in place: on a sector of our own,
            // copied out whole once it is plaintext.
            own.resize(ss, 0);
            let sector = &mut own[..];
            sector.copy_from_slice(from);
            self.apply_sector(sector, tweak, Direction::Decrypt);
            // SAFETY: `ss` bytes at `to` are the caller's to write; a
            // local buffer cannot overlap them.
            unsafe { std::ptr::copy_nonoverlapping(sector.as_ptr(), to, ss) };
        });
    }

    /// Encrypts the plaintext at `source` into `target` (a whole number
    /// of sectors), for plaintext in memory another party may write
    /// meanwhile (a guest's buffer): `source` is only ever read, each
    /// byte once, and the ciphertext goes to `target` alone, so no
    /// bounce copy of the plaintext is needed.
    ///
    /// # Safety
    /// `target.len()` bytes at `source` must be valid for reads for the
    /// whole call and must not overlap `target`.
    pub unsafe fn encrypt_from_raw(&self, source: *const u8, target: &mut [u8], first_sector: u64) {
        let ss = self.sector_size;
        self.each_sector_tweak(target.len(), first_sector, |i, tweak| {
            // SAFETY: sector `i` lies inside the `target.len()` bytes the
            // caller vouches for.
            let from = unsafe { source.add(i * ss) };
            let to = &mut target[i * ss..][..ss];
            #[cfg(target_arch = "x86_64")]
            if let Some(vaes) = &self.keys.vaes {
                // SAFETY: as above; the kernel only loads from `from`.
                unsafe { vaes.encrypt_from_raw(from, to, tweak) };
                return;
            }
            // The portable kernel works in place: the plaintext is copied
            // into `target` first.
            // SAFETY: `ss` bytes at `from` are readable (as above) and
            // cannot overlap `to` (the caller's contract).
            unsafe { std::ptr::copy_nonoverlapping(from, to.as_mut_ptr(), ss) };
            self.apply_sector(to, tweak, Direction::Encrypt);
        });
    }

    fn apply(&self, buf: &mut [u8], first_sector: u64, direction: Direction) {
        let ss = self.sector_size;
        self.each_sector_tweak(buf.len(), first_sector, |i, tweak| {
            self.apply_sector(&mut buf[i * ss..][..ss], tweak, direction)
        });
    }

    /// Calls `each(i, tweak)` for every sector `i` of `len` bytes (a whole
    /// number of sectors) from `first_sector`, with its encrypted initial
    /// tweak.
    fn each_sector_tweak(&self, len: usize, first_sector: u64, mut each: impl FnMut(usize, u128)) {
        assert_eq!(
            len % self.sector_size,
            0,
            "buffer is not a whole number of sectors"
        );
        let sectors = len / self.sector_size;
        // The initial tweaks of up to TWEAK_BATCH sectors are encrypted in
        // one pipelined call: one block per sector, serially, stalls on
        // each block's latency.
        let mut initial = [0u8; 16 * TWEAK_BATCH];
        for batch in (0..sectors).step_by(TWEAK_BATCH) {
            let first = first_sector.wrapping_add(batch as u64);
            let n = (sectors - batch).min(TWEAK_BATCH);
            // Rounded up to whole 64-byte vectors; the extra tweaks are unused.
            let used = &mut initial[..(16 * n).next_multiple_of(64)];
            for (i, t) in used.chunks_exact_mut(16).enumerate() {
                t.copy_from_slice(&(first.wrapping_add(i as u64) as u128).to_le_bytes());
            }
            self.encrypt_tweaks(used);
            for (i, t) in used.chunks_exact(16).take(n).enumerate() {
                each(
                    batch + i,
                    u128::from_le_bytes(t.try_into().expect("16-byte chunk")),
                );
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
mod tests;
