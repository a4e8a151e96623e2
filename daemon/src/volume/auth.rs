//! Header authentication (format version 3): the keys derived from a DEK
//! generation, sealing a header with them, and verifying a header read from
//! disk. Where the fields sit is `header.rs`; the local anti-rollback record
//! that pins each generation's key check is `record.rs`; the journal's MAC
//! is `journal.rs` (keyed from here).
//!
//! Every key here comes from one generation's DEKs (outer, then inner when
//! double-encrypted) by HKDF-SHA256, with an info string that names the
//! purpose, the volume UUID and the generation:
//!
//! - the key check, stored in the header: commits the header to its DEKs,
//!   so an unwrapped DEK that is not the volume's (a forged RSA keyslot,
//!   another volume's keyslot) is refused before it is used;
//! - the header MAC key: HMAC-SHA256 over the whole encoded header (every
//!   field, every keyslot, the re-encryption state, both key checks);
//! - the journal MAC key: HMAC-SHA256 over a re-encryption journal record.
//!
//! Only a holder of the active DEKs can write a header or a journal record
//! that verifies; a wrapped DEK alone (all an RSA public key gives) cannot.
//!
//! The secret keys, the HKDF input and its extract state (the PRK inside
//! its HMAC) and each HMAC's state live in slots of the key arena
//! (`crypto/arena.rs`), zeroed when dropped.

use super::header::{Auth, Header, HeaderError};
use crate::crypto::{Dek, Locked, DEK_LEN};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// The keys of one DEK generation (secret parts zeroized on drop).
pub struct GenerationKeys {
    pub generation: u32,
    /// Public: stored in the header and in the anti-rollback record.
    pub key_check: [u8; 32],
    header_mac: Locked<[u8; 32]>,
    journal_mac: Locked<[u8; 32]>,
}

impl std::fmt::Debug for GenerationKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationKeys")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl GenerationKeys {
    pub fn derive(uuid: Uuid, generation: u32, outer: &Dek, inner: Option<&Dek>) -> Self {
        let mut ikm = Locked::<[u8; 2 * DEK_LEN]>::zeroed();
        ikm[..DEK_LEN].copy_from_slice(outer.expose());
        let len = match inner {
            Some(inner) => {
                ikm[DEK_LEN..].copy_from_slice(inner.expose());
                2 * DEK_LEN
            }
            None => DEK_LEN,
        };
        let hk = Locked::new(|| Hkdf::<Sha256>::new(None, &ikm[..len]));
        let expand = |purpose: &[u8]| {
            let mut info = Vec::with_capacity(purpose.len() + 20);
            info.extend_from_slice(purpose);
            info.extend_from_slice(uuid.as_bytes());
            info.extend_from_slice(&generation.to_le_bytes());
            let mut out = Locked::<[u8; 32]>::zeroed();
            // 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
            hk.expand(&info, &mut out[..])
                .unwrap_or_else(|_| unreachable!("32-byte HKDF output"));
            out
        };
        let keys = GenerationKeys {
            generation,
            key_check: *expand(b"hostcrypt v3 key check\0"),
            header_mac: expand(b"hostcrypt v3 header mac\0"),
            journal_mac: expand(b"hostcrypt v3 journal mac\0"),
        };
        // `expand` ran HMAC blocks over the PRK on the stack.
        crate::crypto::arena::scrub_stack();
        keys
    }

    /// The key of this generation's journal records (another slot).
    pub fn journal_key(&self) -> Locked<[u8; 32]> {
        self.journal_mac.clone()
    }
}

/// HMAC-SHA256 of `data` under `key`.
pub fn mac(key: &[u8; 32], data: &[u8]) -> [u8; 32] {
    let mut m = keyed(key);
    m.update(data);
    m.finalize_reset().into_bytes().into()
}

/// An HMAC keyed by `key`: its state (the key's inner and outer pads)
/// lives in the key arena and is zeroed when dropped.
fn keyed(key: &[u8; 32]) -> Locked<HmacSha256> {
    Locked::new(|| {
        <HmacSha256 as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
    })
}

/// Whether `tag` is the HMAC-SHA256 of `data` under `key` (constant time).
pub fn mac_ok(key: &[u8; 32], data: &[u8], tag: &[u8]) -> bool {
    let Ok(tag) = <[u8; 32]>::try_from(tag) else {
        return false;
    };
    let mut m = keyed(key);
    m.update(data);
    // `CtOutput`'s equality is constant time.
    m.finalize_reset() == hmac::digest::CtOutput::new(tag.into())
}

/// Why a header does not verify. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the header is not authenticated (format version 1 or 2)")]
    Unauthenticated,
    #[error("the unwrapped data key of generation {0} does not match the header's key check: the keyslot holds a key that is not this volume's (forged, or copied from another volume)")]
    KeyCheck(u32),
    #[error("the header's MAC does not verify: it was not written by a holder of the volume's data key (forged or tampered)")]
    Mac,
    #[error("the re-encryption target's data key (generation {0}) does not match the key check the authenticated header records for it: the target keyslot is forged")]
    TargetKeyCheck(u32),
    #[error("encoding the header: {0}")]
    Encode(#[from] HeaderError),
}

/// The keys a volume's header is sealed and verified with: the active
/// generation's, and while re-encrypting the target's.
#[derive(Debug)]
pub struct HeaderKeys {
    pub current: GenerationKeys,
    pub target: Option<GenerationKeys>,
}

impl HeaderKeys {
    /// Seals `header` (sets its key checks and MAC) with the keys of its
    /// active generation. A header whose re-encryption just finished is at
    /// the target generation: it is sealed with the target's keys.
    pub fn seal(&self, header: &mut Header) -> Result<(), HeaderError> {
        let (current, target) = if header.dek_generation == self.current.generation {
            (&self.current, self.target.as_ref())
        } else {
            match &self.target {
                Some(t) if t.generation == header.dek_generation => (t, None),
                _ => {
                    return Err(HeaderError::Malformed(
                        "no keys for the header's generation",
                    ))
                }
            }
        };
        let target_check = match header.reencrypt {
            Some(r) => match target {
                Some(t) if t.generation == r.target_generation => Some(t.key_check),
                _ => return Err(HeaderError::Malformed("no keys for the target generation")),
            },
            None => None,
        };
        seal_with(header, current, target_check)
    }

    /// After a header at the target generation was written: those keys
    /// are now the active ones.
    pub fn advance(&mut self, header: &Header) {
        if self
            .target
            .as_ref()
            .is_some_and(|t| t.generation == header.dek_generation)
        {
            if let Some(t) = self.target.take() {
                self.current = t;
            }
        }
    }
}

/// Sets `header`'s authentication fields: the key checks, then the MAC
/// over the whole encoding (which covers the key checks).
pub fn seal_with(
    header: &mut Header,
    current: &GenerationKeys,
    target_check: Option<[u8; 32]>,
) -> Result<(), HeaderError> {
    header.auth = Some(Auth {
        key_check: current.key_check,
        target_key_check: target_check,
        mac: [0; 32],
    });
    let raw = header.encode()?;
    let tag = mac(&current.header_mac, &raw[..super::header::MAC_AT]);
    if let Some(auth) = header.auth.as_mut() {
        auth.mac = tag;
    }
    Ok(())
}

/// Checks an authenticated header against the active generation's keys:
/// the key check first (a wrong DEK is named as such), then the MAC.
pub fn verify(header: &Header, current: &GenerationKeys) -> Result<(), AuthError> {
    let auth = header.auth.as_ref().ok_or(AuthError::Unauthenticated)?;
    if auth.key_check != current.key_check {
        return Err(AuthError::KeyCheck(header.dek_generation));
    }
    let raw = header.encode()?;
    if !mac_ok(
        &current.header_mac,
        &raw[..super::header::MAC_AT],
        &auth.mac,
    ) {
        return Err(AuthError::Mac);
    }
    Ok(())
}

/// Checks the re-encryption target's keys against the key check the
/// (already verified) header records for them.
pub fn verify_target(header: &Header, target: &GenerationKeys) -> Result<(), AuthError> {
    let recorded = header.auth.as_ref().and_then(|a| a.target_key_check);
    if recorded != Some(target.key_check) {
        return Err(AuthError::TargetKeyCheck(target.generation));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::header::tests::sample;

    /// RFC 4231 test case 2: the MAC is HMAC-SHA256.
    #[test]
    fn hmac_matches_rfc_4231() {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        // A 4-byte key zero-padded to 32 bytes is the same HMAC key.
        let tag = mac(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn sealed_header_verifies_and_any_change_does_not() {
        let dek = Dek::generate().unwrap();
        let mut h = sample();
        let keys = GenerationKeys::derive(h.uuid, h.dek_generation, &dek, None);
        seal_with(&mut h, &keys, None).unwrap();
        verify(&h, &keys).unwrap();
        let decoded = Header::decode(&h.encode().unwrap()[..]).unwrap();
        verify(&decoded, &keys).unwrap();

        let mut changed = h.clone();
        changed.sequence -= 1;
        assert_eq!(verify(&changed, &keys), Err(AuthError::Mac));
        let other =
            GenerationKeys::derive(h.uuid, h.dek_generation, &Dek::generate().unwrap(), None);
        assert_eq!(verify(&h, &other), Err(AuthError::KeyCheck(1)));
        // The same DEK under another volume or generation is another key.
        let moved = GenerationKeys::derive(Uuid::new_v4(), h.dek_generation, &dek, None);
        assert_ne!(moved.key_check, keys.key_check);
        let regen = GenerationKeys::derive(h.uuid, 2, &dek, None);
        assert_ne!(regen.key_check, keys.key_check);
        let mut legacy = h.clone();
        legacy.auth = None;
        assert_eq!(verify(&legacy, &keys), Err(AuthError::Unauthenticated));
    }
}
