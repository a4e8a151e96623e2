//! A volume's data cipher: one XTS layer, or two with `kek_inner` (double
//! encryption: two independent DEKs, each wrapped by a different KEK, so
//! reading the data needs both key providers). The inner layer encrypts
//! first on write and decrypts last on read; both use the sector number as
//! the tweak. The inner layer is XTS-AES-256 too, or Adiantum
//! (`inner_cipher = "adiantum"`: another primitive and mode, so one broken
//! algorithm does not expose the data). The ciphers themselves are `crypto/`.

use super::header::InnerCipher;
use crate::crypto::{AdiantumSectorCipher, Dek, SectorCipher};

pub struct VolumeCipher {
    outer: SectorCipher,
    inner: Option<InnerLayer>,
}

// The key schedules themselves are in the key arena (`crypto/arena.rs`).
enum InnerLayer {
    Xts(SectorCipher),
    Adiantum(AdiantumSectorCipher),
}

impl VolumeCipher {
    /// `inner_cipher` applies only with an inner DEK.
    pub fn new(
        outer: &Dek,
        inner: Option<&Dek>,
        inner_cipher: InnerCipher,
        sector_size: usize,
    ) -> Self {
        VolumeCipher {
            outer: SectorCipher::new(outer, sector_size),
            inner: inner.map(|dek| match inner_cipher {
                InnerCipher::AesXts => InnerLayer::Xts(SectorCipher::new(dek, sector_size)),
                InnerCipher::Adiantum => {
                    InnerLayer::Adiantum(AdiantumSectorCipher::new(dek, sector_size))
                }
            }),
        }
    }

    pub fn sector_size(&self) -> usize {
        self.outer.sector_size()
    }

    /// Which XTS kernel runs (e.g. `vaes-avx512`).
    pub fn kernel(&self) -> &'static str {
        self.outer.kernel()
    }

    /// The inner layer's cipher (XTS when there is no inner layer).
    pub fn inner_cipher(&self) -> InnerCipher {
        match self.inner {
            Some(InnerLayer::Adiantum(_)) => InnerCipher::Adiantum,
            _ => InnerCipher::AesXts,
        }
    }

    /// 1, or 2 with double encryption.
    pub fn layers(&self) -> usize {
        1 + usize::from(self.inner.is_some())
    }

    /// Encrypts whole sectors in place; the first has index `first_sector`.
    pub fn encrypt(&self, buf: &mut [u8], first_sector: u64) {
        match &self.inner {
            Some(InnerLayer::Xts(inner)) => inner.encrypt(buf, first_sector),
            Some(InnerLayer::Adiantum(inner)) => inner.encrypt(buf, first_sector),
            None => {}
        }
        self.outer.encrypt(buf, first_sector);
    }

    /// Decrypts whole sectors in place.
    pub fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        self.outer.decrypt(buf, first_sector);
        match &self.inner {
            Some(InnerLayer::Xts(inner)) => inner.decrypt(buf, first_sector),
            Some(InnerLayer::Adiantum(inner)) => inner.decrypt(buf, first_sector),
            None => {}
        }
    }

    /// Decrypts whole sectors from `source` into memory another party
    /// may read and write meanwhile (a guest's buffer), only ever storing
    /// to it (see `SectorCipher::decrypt_to_raw`). With two layers the
    /// inner one works in place, so both run on a buffer of our own and
    /// the plaintext is copied out.
    ///
    /// # Safety
    /// `source.len()` bytes at `target` valid for writes for the whole
    /// call, not overlapping `source`.
    pub unsafe fn decrypt_to_raw(&self, source: &[u8], target: *mut u8, first_sector: u64) {
        if self.inner.is_none() {
            // SAFETY: the caller's contract.
            unsafe { self.outer.decrypt_to_raw(source, target, first_sector) };
            return;
        }
        let mut plain = zeroize::Zeroizing::new(source.to_vec());
        self.decrypt(&mut plain, first_sector);
        // SAFETY: the caller's contract; `plain` is ours.
        unsafe { std::ptr::copy_nonoverlapping(plain.as_ptr(), target, plain.len()) };
    }

    /// Encrypts whole sectors of plaintext at `source` into `target`,
    /// only ever reading `source` (see `SectorCipher::encrypt_from_raw`).
    /// With two layers the inner one works in place: the plaintext is
    /// copied into `target` and both layers run there.
    ///
    /// # Safety
    /// `target.len()` bytes at `source` valid for reads for the whole
    /// call, not overlapping `target`.
    pub unsafe fn encrypt_from_raw(&self, source: *const u8, target: &mut [u8], first_sector: u64) {
        if self.inner.is_none() {
            // SAFETY: the caller's contract.
            unsafe { self.outer.encrypt_from_raw(source, target, first_sector) };
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(source, target.as_mut_ptr(), target.len()) };
        self.encrypt(target, first_sector);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_layers_are_the_composition_of_two_single_layers() {
        let (a, b) = (Dek::generate().unwrap(), Dek::generate().unwrap());
        let mut plain = vec![0u8; 3 * 4096];
        getrandom::fill(&mut plain).unwrap();

        let mut double = plain.clone();
        VolumeCipher::new(&a, Some(&b), InnerCipher::AesXts, 4096).encrypt(&mut double, 9);
        let mut by_hand = plain.clone();
        SectorCipher::new(&b, 4096).encrypt(&mut by_hand, 9);
        SectorCipher::new(&a, 4096).encrypt(&mut by_hand, 9);
        assert_eq!(double, by_hand);

        // Only the outer key: still ciphertext.
        let mut outer_only = double.clone();
        SectorCipher::new(&a, 4096).decrypt(&mut outer_only, 9);
        assert_ne!(outer_only, plain);

        VolumeCipher::new(&a, Some(&b), InnerCipher::AesXts, 4096).decrypt(&mut double, 9);
        assert_eq!(double, plain);
        assert_eq!(
            VolumeCipher::new(&a, Some(&b), InnerCipher::AesXts, 4096).layers(),
            2
        );
        assert_eq!(
            VolumeCipher::new(&a, None, InnerCipher::AesXts, 4096).layers(),
            1
        );
    }

    /// Into another buffer, with one layer or two, the plaintext is what
    /// decrypting in place gives, and the source stays ciphertext.
    #[test]
    fn decrypting_into_another_buffer_matches_in_place_with_either_layering() {
        let (a, b) = (Dek::generate().unwrap(), Dek::generate().unwrap());
        let mut plain = vec![0u8; 5 * 4096];
        getrandom::fill(&mut plain).unwrap();
        for inner in [None, Some(&b)] {
            let cipher = VolumeCipher::new(&a, inner, InnerCipher::Adiantum, 4096);
            let mut sealed = plain.clone();
            cipher.encrypt(&mut sealed, 40);
            let source = sealed.clone();
            let mut target = vec![0u8; sealed.len()];
            // SAFETY: `target` is ours and as long as `source`.
            unsafe { cipher.decrypt_to_raw(&source, target.as_mut_ptr(), 40) };
            assert_eq!(target, plain, "{} layers", cipher.layers());
            assert_eq!(source, sealed);
        }
    }

    /// From another buffer, with one layer or two, the ciphertext is
    /// what encrypting in place gives, and the source stays plaintext.
    #[test]
    fn encrypting_from_another_buffer_matches_in_place_with_either_layering() {
        let (a, b) = (Dek::generate().unwrap(), Dek::generate().unwrap());
        let mut plain = vec![0u8; 5 * 4096];
        getrandom::fill(&mut plain).unwrap();
        for inner in [None, Some(&b)] {
            let cipher = VolumeCipher::new(&a, inner, InnerCipher::AesXts, 4096);
            let mut sealed = plain.clone();
            cipher.encrypt(&mut sealed, 40);
            let source = plain.clone();
            let mut target = vec![0u8; plain.len()];
            // SAFETY: `source` is ours and as long as `target`.
            unsafe { cipher.encrypt_from_raw(source.as_ptr(), &mut target, 40) };
            assert_eq!(target, sealed, "{} layers", cipher.layers());
            assert_eq!(source, plain);
        }
    }

    #[test]
    fn adiantum_inner_layer_composes_with_the_outer_xts() {
        let (a, b) = (Dek::generate().unwrap(), Dek::generate().unwrap());
        let mut plain = vec![0u8; 2 * 512];
        getrandom::fill(&mut plain).unwrap();
        let cipher = VolumeCipher::new(&a, Some(&b), InnerCipher::Adiantum, 512);
        assert_eq!(cipher.inner_cipher(), InnerCipher::Adiantum);
        let mut double = plain.clone();
        cipher.encrypt(&mut double, 3);
        let mut by_hand = plain.clone();
        AdiantumSectorCipher::new(&b, 512).encrypt(&mut by_hand, 3);
        SectorCipher::new(&a, 512).encrypt(&mut by_hand, 3);
        assert_eq!(double, by_hand);
        cipher.decrypt(&mut double, 3);
        assert_eq!(double, plain);
    }
}
