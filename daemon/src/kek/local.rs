//! The `local` KEK provider: a 32-byte AES-256 key in a root-only file,
//! wrapping DEKs with AES key wrap with padding (RFC 5649, `aes-kw` crate).
//!
//! The key id is a fingerprint of the key (not the path), so moving the file
//! keeps volumes openable and pointing the config at the wrong file gives an
//! error that names both keys instead of a bare integrity failure. There is
//! one version, "1": rotating a local KEK means `hostcrypt rekey` to a new file.
//!
//! The key is read from the file straight into a slot of the key arena
//! (`crypto/arena.rs`); the daemon keeps only its expanded AES key wrap
//! schedule, in another slot, and zeroes the raw bytes once that is built.
//! DEKs are unwrapped straight into a slot too, never through the heap.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aes_kw::KeyInit;
use aes_kw::KwpAes256;
use sha2::{Digest, Sha256};

use super::{KekError, KekRef, KeyProvider, WrappedDek};
use crate::crypto::{Dek, Locked, DEK_LEN};

pub const PROVIDER: &str = "local";
const KEY_LEN: usize = 32;
const VERSION: &str = "1";

pub struct LocalKek {
    path: PathBuf,
    /// The key's expanded schedule, the only form kept.
    kwp: Locked<KwpAes256>,
    key_id: String,
}

impl std::fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKek")
            .field("path", &self.path)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl LocalKek {
    /// Creates a new key file with mode 0600; refuses to replace an existing one.
    pub fn init(path: &Path) -> Result<Self, KekError> {
        let io_err = |source| KekError::KeyFileIo {
            path: path.to_owned(),
            source,
        };
        let mut key = Locked::<[u8; KEY_LEN]>::zeroed();
        getrandom::fill(&mut key[..]).map_err(KekError::Random)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    KekError::KeyFileExists {
                        path: path.to_owned(),
                    }
                } else {
                    io_err(e)
                }
            })?;
        file.write_all(&key[..]).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        Ok(Self::from_key(path, key))
    }

    /// Loads a key file, refusing one that group or others can access.
    pub fn load(path: &Path) -> Result<Self, KekError> {
        let io_err = |source| KekError::KeyFileIo {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        super::check_secret_metadata(path, &meta)?;
        if meta.len() != KEY_LEN as u64 {
            return Err(KekError::BadKeyFile {
                path: path.to_owned(),
                reason: format!("expected {KEY_LEN} bytes, found {}", meta.len()),
            });
        }
        let mut key = Locked::<[u8; KEY_LEN]>::zeroed();
        file.read_exact(&mut key[..]).map_err(io_err)?;
        Ok(Self::from_key(path, key))
    }

    /// Takes the raw key (zeroed when it is dropped here).
    fn from_key(path: &Path, key: Locked<[u8; KEY_LEN]>) -> Self {
        // The hash state holds the key's bytes in its block buffer: built
        // and finished in a slot too, and zeroed with it.
        let mut hasher = Locked::new(Sha256::new);
        hasher.update(b"hostcrypt local KEK id\0");
        hasher.update(&key[..]);
        let digest = hasher.finalize_reset();
        LocalKek {
            path: path.to_owned(),
            kwp: Locked::new(|| KwpAes256::new(&(*key).into())),
            key_id: hex::encode(&digest[..8]),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    fn kwp(&self) -> &KwpAes256 {
        &self.kwp
    }
}

impl KeyProvider for LocalKek {
    fn owns(&self, kek: &KekRef) -> bool {
        kek.provider == PROVIDER && kek.key_id == self.key_id
    }

    fn describe(&self) -> String {
        format!("local key {} ({})", self.key_id, self.path.display())
    }

    fn wrap(&self, dek: &Dek) -> Result<WrappedDek, KekError> {
        let mut buf = vec![0u8; DEK_LEN + 16];
        let wrapped = self
            .kwp()
            .wrap_key(dek.expose(), &mut buf)
            .map_err(|e| KekError::WrapFailed {
                provider: self.describe(),
                reason: e.to_string(),
            })?
            .to_vec();
        Ok(WrappedDek {
            kek: KekRef {
                provider: PROVIDER.into(),
                key_id: self.key_id.clone(),
                key_version: VERSION.into(),
            },
            blob: wrapped,
        })
    }

    fn unwrap(&self, wrapped: &WrappedDek) -> Result<Dek, KekError> {
        if !self.owns(&wrapped.kek) {
            return Err(KekError::WrongKey {
                wrapped_by: wrapped.kek.clone(),
                configured: self.describe(),
            });
        }
        // Unwrapped straight into a slot, so the plaintext never lands on
        // the heap. A blob longer than a wrapped DEK fails here: the
        // output would not fit.
        let mut plain = Locked::<[u8; DEK_LEN]>::zeroed();
        let unwrapped = self
            .kwp()
            .unwrap_key(&wrapped.blob, &mut plain[..])
            .map(|key| key.len());
        // The key wrap's working block (part of the key) is on the stack.
        crate::crypto::arena::scrub_stack();
        match unwrapped {
            Ok(DEK_LEN) => Ok(Dek::from_locked(plain)),
            _ => Err(KekError::UnwrapFailed {
                provider: self.describe(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_heap::allocations_in;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn wrap_unwrap_round_trip_and_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.key");
        let kek = LocalKek::init(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dek = Dek::generate().unwrap();
        let wrapped = kek.wrap(&dek).unwrap();
        assert_eq!(wrapped.blob.len(), 72);
        assert!(!wrapped
            .blob
            .windows(16)
            .any(|w| dek.expose().windows(16).any(|d| d == w)));
        let again = LocalKek::load(&path).unwrap();
        assert_eq!(again.unwrap(&wrapped).unwrap().expose(), dek.expose());
    }

    /// The DEK is unwrapped straight into the key arena: no heap buffer
    /// holds its plaintext on the way (before, a heap `Vec` did).
    #[test]
    fn unwrapping_puts_no_plaintext_on_the_heap() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("k")).unwrap();
        let dek = Dek::generate().unwrap();
        let wrapped = kek.wrap(&dek).unwrap();
        // A slot from a fresh region allocates for the arena's own
        // bookkeeping, rarely: one clean try out of three is enough.
        let clean = (0..3).any(|_| {
            let (unwrapped, allocations) = allocations_in(|| kek.unwrap(&wrapped).unwrap());
            assert_eq!(unwrapped.expose(), dek.expose());
            let at = unwrapped.expose().as_ptr() as usize;
            assert!(crate::crypto::arena::contains(at, DEK_LEN));
            allocations == 0
        });
        assert!(clean, "every unwrap allocated on the heap");
    }

    /// Blobs of every length up to and past a wrapped DEK's, valid or
    /// not, fail cleanly (the output slot is a DEK's size).
    #[test]
    fn blobs_of_any_length_fail_without_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("k")).unwrap();
        let real = kek.wrap(&Dek::generate().unwrap()).unwrap();
        for len in (0..=200).chain([4096]) {
            let mut wrapped = real.clone();
            wrapped.blob = (0..len).map(|i| i as u8).collect();
            assert!(
                matches!(kek.unwrap(&wrapped), Err(KekError::UnwrapFailed { .. })),
                "{len}"
            );
        }
        // A genuine wrap of 32 bytes is well formed, but not a DEK.
        let mut short = real.clone();
        let mut out = [0u8; 40];
        short.blob = kek.kwp().wrap_key(&[9; 32], &mut out).unwrap().to_vec();
        assert!(matches!(
            kek.unwrap(&short),
            Err(KekError::UnwrapFailed { .. })
        ));
    }

    #[test]
    fn tampered_blob_fails_integrity_check() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("k")).unwrap();
        let dek = Dek::generate().unwrap();
        let mut wrapped = kek.wrap(&dek).unwrap();
        wrapped.blob[10] ^= 1;
        assert!(matches!(
            kek.unwrap(&wrapped),
            Err(KekError::UnwrapFailed { .. })
        ));
    }

    #[test]
    fn refuses_group_readable_file_and_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.key");
        let kek = LocalKek::init(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = LocalKek::load(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");

        let other = LocalKek::init(&dir.path().join("other.key")).unwrap();
        let wrapped = kek.wrap(&Dek::generate().unwrap()).unwrap();
        let err = other.unwrap(&wrapped).unwrap_err();
        assert!(matches!(err, KekError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains(kek.key_id()));
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.key");
        LocalKek::init(&path).unwrap();
        assert!(matches!(
            LocalKek::init(&path),
            Err(KekError::KeyFileExists { .. })
        ));
    }
}
