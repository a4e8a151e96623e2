//! The data encryption key (DEK) as a secret value.
//!
//! A DEK is 64 bytes (two AES-256 keys for XTS). It is drawn from the OS
//! CSPRNG straight into a slot of the key arena (`arena.rs`: locked in
//! memory, out of core dumps, zeroed when freed), and it never prints: its
//! `Debug` shows only that a key is present. A clone is another slot.
//! Wrapping it under a KEK is the job of `kek/`.

use super::arena::Locked;

/// Length of an XTS-AES-256 key: data key then tweak key, 32 bytes each.
pub const DEK_LEN: usize = 64;

/// A 64-byte data encryption key.
#[derive(Clone)]
pub struct Dek {
    bytes: Locked<[u8; DEK_LEN]>,
}

impl Dek {
    /// A fresh random key from the operating system's CSPRNG.
    ///
    /// XTS needs the data and tweak halves to differ (IEEE 1619-2018 5.1, and
    /// OpenSSL refuses equal halves), so a draw with equal halves is redrawn;
    /// with a working CSPRNG that never happens.
    pub fn generate() -> Result<Self, getrandom::Error> {
        loop {
            let mut bytes = Locked::<[u8; DEK_LEN]>::zeroed();
            getrandom::fill(&mut bytes[..])?;
            if bytes[..32] != bytes[32..] {
                return Ok(Dek { bytes });
            }
        }
    }

    /// Takes a key from a buffer, which the caller should zeroize; `None` when
    /// the buffer is not exactly [`DEK_LEN`] bytes.
    pub fn from_slice(key: &[u8]) -> Option<Self> {
        if key.len() != DEK_LEN {
            return None;
        }
        let mut bytes = Locked::<[u8; DEK_LEN]>::zeroed();
        bytes.copy_from_slice(key);
        Some(Dek { bytes })
    }

    /// Takes a key already in a slot of the arena (a key unwrapped or
    /// decoded in place), without another copy.
    pub fn from_locked(bytes: Locked<[u8; DEK_LEN]>) -> Self {
        Dek { bytes }
    }

    /// The raw key. Callers hand it straight to a cipher or a key wrap and
    /// must not copy it anywhere that outlives the call.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        &self.bytes
    }
}

impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dek(<secret>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::arena;

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

    #[test]
    fn keys_and_their_clones_live_in_the_arena() {
        let dek = Dek::generate().unwrap();
        let copy = dek.clone();
        for key in [&dek, &copy] {
            let at = key.expose().as_ptr() as usize;
            assert!(arena::contains(at, DEK_LEN));
            assert!(arena::tests::is_protected(at));
        }
        assert_ne!(dek.expose().as_ptr(), copy.expose().as_ptr());
    }

    /// Per-key munlock used to unlock pages that other live keys shared:
    /// after 10,000 keys come and go (several regions' worth), every key
    /// still alive is in a locked, non-dumped mapping and intact.
    #[test]
    fn many_keys_allocated_and_freed_stay_locked() {
        let key = |i: u32| {
            let mut raw = [0u8; DEK_LEN];
            raw[..4].copy_from_slice(&i.to_le_bytes());
            raw[32] = 1;
            (Dek::from_slice(&raw).unwrap(), raw)
        };
        let mut live: Vec<(Dek, [u8; DEK_LEN])> = (0..10_000).map(key).collect();
        // Free two of every three, scattered over the regions, then take
        // freed slots again.
        let mut i = 0;
        live.retain(|_| {
            i += 1;
            i % 3 == 0
        });
        live.extend((10_000..12_000).map(key));
        let regions = arena::regions();
        assert!(regions.len() >= 2, "{regions:?}");
        for region in &regions {
            assert!(arena::tests::is_protected(region.0), "{region:x?}");
        }
        for (dek, raw) in &live {
            assert_eq!(dek.expose(), raw);
            let at = dek.expose().as_ptr() as usize;
            assert!(arena::contains(at, DEK_LEN), "{at:#x}");
        }
    }
}
