//! The data area's keys: the snapshot of ciphers in use ([`DataKeys`]),
//! loading and unloading a volume's DEKs, and the re-encryption
//! generations (begin, move the checkpoint, finish), with the choice of
//! key for each sector on either side of the checkpoint.
//!
//! What lives elsewhere: the geometry and synchronous operations
//! (`mod.rs`), the re-encryption window (`window.rs`), the per-engine
//! request paths (`volume/submit/`).

use std::io;
use std::sync::Arc;

use super::{decrypt_sectors, DataArea};
use crate::crypto::Dek;
use crate::volume::cipher::VolumeCipher;

/// The ciphers in use: the current DEK generation's, and while
/// re-encrypting the target generation's with the checkpoint between them.
/// Never changed in place: every change stores a new snapshot.
pub struct DataKeys {
    pub current: Arc<VolumeCipher>,
    pub target: Option<Arc<VolumeCipher>>,
    /// Bytes of the data area below this are under `target` (meaningful
    /// only with a target).
    pub checkpoint: u64,
}

/// A generation's DEKs: the outer layer's, and the inner's when double-encrypted.
pub type GenerationDeks<'a> = (&'a Dek, Option<&'a Dek>);

impl DataArea {
    /// Whether the data key is loaded (I/O possible).
    pub fn key_loaded(&self) -> bool {
        self.cipher.load().is_some()
    }

    /// Drops the key schedule: every request fails with EIO from now on.
    /// Requests already holding the cipher finish with it.
    pub fn unload_key(&self) {
        let _rekeying = self.rekeying();
        self.cipher.store(None);
    }

    pub(in crate::volume) fn rekeying(&self) -> std::sync::MutexGuard<'_, ()> {
        self.rekeying.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (Re)loads the keys after a recovery: the current generation's, and
    /// the target generation's (from `checkpoint` on) while re-encrypting.
    pub fn load_keys(
        &self,
        current: GenerationDeks<'_>,
        target: Option<(GenerationDeks<'_>, u64)>,
    ) {
        let cipher = |(outer, inner): GenerationDeks<'_>| {
            Arc::new(VolumeCipher::new(
                outer,
                inner,
                self.inner_cipher,
                self.sector as usize,
            ))
        };
        let _rekeying = self.rekeying();
        self.cipher.store(Some(Arc::new(DataKeys {
            current: cipher(current),
            checkpoint: target.map_or(0, |(_, checkpoint)| checkpoint),
            target: target.map(|(deks, _)| cipher(deks)),
        })));
    }

    /// Starts (or resumes at `checkpoint`) a re-encryption to `target`.
    pub fn begin_reencrypt(&self, target: VolumeCipher, checkpoint: u64) -> io::Result<()> {
        let _rekeying = self.rekeying();
        let keys = self.cipher()?;
        self.cipher.store(Some(Arc::new(DataKeys {
            current: keys.current.clone(),
            target: Some(Arc::new(target)),
            checkpoint,
        })));
        Ok(())
    }

    /// The target generation becomes the current one.
    pub fn finish_reencrypt(&self) -> io::Result<()> {
        let _rekeying = self.rekeying();
        let keys = self.cipher()?;
        if let Some(target) = &keys.target {
            self.cipher.store(Some(Arc::new(DataKeys {
                current: target.clone(),
                target: None,
                checkpoint: 0,
            })));
        }
        Ok(())
    }

    /// Moves the checkpoint once a window is in place and recorded in the
    /// header. Called with the header locked, like `load_keys`, so the two
    /// never disagree; does nothing while the key is lost (the recovery
    /// loads the checkpoint from the header).
    pub fn advance_checkpoint(&self, next: u64) {
        let _rekeying = self.rekeying();
        if let Some(keys) = self.cipher.load_full() {
            if keys.target.is_some() {
                self.cipher.store(Some(Arc::new(DataKeys {
                    current: keys.current.clone(),
                    target: keys.target.clone(),
                    checkpoint: next,
                })));
            }
        }
    }

    pub(in crate::volume) fn cipher(&self) -> io::Result<Arc<DataKeys>> {
        if let Some(reason) = self.failed.get() {
            return Err(io::Error::other(reason.clone()));
        }
        self.cipher.load_full().ok_or_else(|| {
            io::Error::other("the volume's key is unavailable (key lost); I/O is stopped")
        })
    }

    /// Whether `keys` is still the snapshot in place: then no re-encryption
    /// has begun (or moved) since it was loaded, and what an unlocked read
    /// found in the backing is under `keys`.
    pub(in crate::volume) fn still_in_place(&self, keys: &Arc<DataKeys>) -> bool {
        self.cipher
            .load()
            .as_ref()
            .is_some_and(|now| Arc::ptr_eq(now, keys))
    }

    /// Bytes from `start` (within `len`) that are under the target key.
    pub(in crate::volume) fn target_part(&self, keys: &DataKeys, start: u64, len: usize) -> usize {
        if keys.target.is_none() {
            return 0;
        }
        (keys.checkpoint.saturating_sub(start) as usize).min(len)
    }

    pub(in crate::volume) fn decrypt_range(&self, keys: &DataKeys, buf: &mut [u8], start: u64) {
        let split = self.target_part(keys, start, buf.len());
        let (low, high) = buf.split_at_mut(split);
        if let Some(target) = &keys.target {
            decrypt_sectors(target, self.sector, low, start);
        }
        decrypt_sectors(&keys.current, self.sector, high, start + split as u64);
    }

    pub(in crate::volume) fn encrypt_range(&self, keys: &DataKeys, buf: &mut [u8], start: u64) {
        let split = self.target_part(keys, start, buf.len());
        let (low, high) = buf.split_at_mut(split);
        if let Some(target) = &keys.target {
            target.encrypt(low, start / self.sector);
        }
        keys.current
            .encrypt(high, (start + split as u64) / self.sector);
    }
}
