//! A volume's data cipher: one XTS layer, or two with `kek_inner` (double
//! encryption: two independent DEKs, each wrapped by a different KEK, so
//! reading the data needs both key providers). The inner layer encrypts
//! first on write and decrypts last on read; both use the sector number as
//! the tweak. The XTS kernels themselves are `crypto/`.

use crate::crypto::{Dek, SectorCipher};

pub struct VolumeCipher {
    outer: SectorCipher,
    inner: Option<SectorCipher>,
}

impl VolumeCipher {
    pub fn new(outer: &Dek, inner: Option<&Dek>, sector_size: usize) -> Self {
        VolumeCipher {
            outer: SectorCipher::new(outer, sector_size),
            inner: inner.map(|dek| SectorCipher::new(dek, sector_size)),
        }
    }

    pub fn sector_size(&self) -> usize {
        self.outer.sector_size()
    }

    /// Which XTS kernel runs (e.g. `vaes-avx512`).
    pub fn kernel(&self) -> &'static str {
        self.outer.kernel()
    }

    /// 1, or 2 with double encryption.
    pub fn layers(&self) -> usize {
        1 + usize::from(self.inner.is_some())
    }

    /// Encrypts whole sectors in place; the first has index `first_sector`.
    pub fn encrypt(&self, buf: &mut [u8], first_sector: u64) {
        if let Some(inner) = &self.inner {
            inner.encrypt(buf, first_sector);
        }
        self.outer.encrypt(buf, first_sector);
    }

    /// Decrypts whole sectors in place.
    pub fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        self.outer.decrypt(buf, first_sector);
        if let Some(inner) = &self.inner {
            inner.decrypt(buf, first_sector);
        }
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
        VolumeCipher::new(&a, Some(&b), 4096).encrypt(&mut double, 9);
        let mut by_hand = plain.clone();
        SectorCipher::new(&b, 4096).encrypt(&mut by_hand, 9);
        SectorCipher::new(&a, 4096).encrypt(&mut by_hand, 9);
        assert_eq!(double, by_hand);

        // Only the outer key: still ciphertext.
        let mut outer_only = double.clone();
        SectorCipher::new(&a, 4096).decrypt(&mut outer_only, 9);
        assert_ne!(outer_only, plain);

        VolumeCipher::new(&a, Some(&b), 4096).decrypt(&mut double, 9);
        assert_eq!(double, plain);
        assert_eq!(VolumeCipher::new(&a, Some(&b), 4096).layers(), 2);
        assert_eq!(VolumeCipher::new(&a, None, 4096).layers(), 1);
    }
}
