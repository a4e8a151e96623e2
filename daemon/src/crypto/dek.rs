//! The data encryption key (DEK) as a secret value.
//!
//! A DEK is 64 bytes (two AES-256 keys for XTS). It is drawn from the OS
//! CSPRNG, kept in one heap allocation that is locked in memory (best effort,
//! so it is not swapped out) and zeroized on drop, and it never prints: its
//! `Debug` shows only that a key is present. Wrapping it under a KEK is the job
//! of `kek/`.

use std::sync::Once;

use zeroize::{Zeroize, Zeroizing};

/// Length of an XTS-AES-256 key: data key then tweak key, 32 bytes each.
pub const DEK_LEN: usize = 64;

/// A 64-byte data encryption key.
pub struct Dek {
    bytes: Box<Zeroizing<[u8; DEK_LEN]>>,
    locked: bool,
}

static MLOCK_WARNING: Once = Once::new();

impl Dek {
    /// A fresh random key from the operating system's CSPRNG.
    ///
    /// XTS needs the data and tweak halves to differ (IEEE 1619-2018 5.1, and
    /// OpenSSL refuses equal halves), so a draw with equal halves is redrawn;
    /// with a working CSPRNG that never happens.
    pub fn generate() -> Result<Self, getrandom::Error> {
        loop {
            let mut dek = Self::zeroed();
            getrandom::fill(&mut dek.bytes[..])?;
            if dek.bytes[..32] != dek.bytes[32..] {
                return Ok(dek);
            }
        }
    }

    /// Takes a key from a buffer, which the caller should zeroize; `None` when
    /// the buffer is not exactly [`DEK_LEN`] bytes.
    pub fn from_slice(key: &[u8]) -> Option<Self> {
        if key.len() != DEK_LEN {
            return None;
        }
        let mut dek = Self::zeroed();
        dek.bytes.copy_from_slice(key);
        Some(dek)
    }

    fn zeroed() -> Self {
        let bytes = Box::new(Zeroizing::new([0u8; DEK_LEN]));
        let locked = lock_in_memory(&bytes[..]);
        Dek { bytes, locked }
    }

    /// The raw key. Callers hand it straight to a cipher or a key wrap and
    /// must not copy it anywhere that outlives the call.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        &self.bytes
    }
}

impl Clone for Dek {
    fn clone(&self) -> Self {
        let mut dek = Self::zeroed();
        dek.bytes.copy_from_slice(&self.bytes[..]);
        dek
    }
}

impl Drop for Dek {
    fn drop(&mut self) {
        self.bytes.zeroize();
        if self.locked {
            // SAFETY: the pointer and length describe the live allocation we
            // locked in `zeroed`; munlock only changes paging attributes.
            unsafe {
                libc::munlock(self.bytes.as_ptr().cast(), DEK_LEN);
            }
        }
    }
}

impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dek(<secret>)")
    }
}

/// Locks the pages holding a key so they are never written to swap.
/// Failure (RLIMIT_MEMLOCK too low) is logged once and otherwise tolerated:
/// refusing to serve over it would punish hosts without swap, where it is moot.
fn lock_in_memory(bytes: &[u8]) -> bool {
    // SAFETY: `bytes` is a live allocation of `bytes.len()` bytes; mlock does
    // not read or write the memory, it only pins its pages.
    let rc = unsafe { libc::mlock(bytes.as_ptr().cast(), bytes.len()) };
    if rc != 0 {
        MLOCK_WARNING.call_once(|| {
            tracing::warn!(
                "could not lock key memory (mlock: {}); raise LimitMEMLOCK to keep keys out of swap",
                std::io::Error::last_os_error()
            );
        });
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let dek = Dek::from_slice(&[0xAB; DEK_LEN]).unwrap();
        let shown = format!("{dek:?}");
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
    }

    #[test]
    fn generated_keys_differ_and_have_distinct_halves() {
        let a = Dek::generate().unwrap();
        let b = Dek::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
        assert_ne!(a.expose()[..32], a.expose()[32..]);
    }

    #[test]
    fn from_slice_rejects_wrong_length() {
        assert!(Dek::from_slice(&[1; 32]).is_none());
    }
}
