//! The on-disk header, format versions 1, 2 and 3: its fields and its byte
//! encoding. Version 2 differs from 1 only in bytes 10-11, which name the
//! inner layer's cipher; it was written only for an Adiantum inner layer,
//! so a daemon that predates Adiantum refuses such a volume instead of
//! reading it as XTS. Version 3 is the authenticated header, the only one
//! written now: bytes 10-11 name the inner cipher (0 = AES-XTS), and a
//! trailer holds the key checks and an HMAC over everything before it
//! (computed and verified in `auth.rs`). Versions 1 and 2 are still
//! decoded, so that opening one upgrades it in place.
//!
//! Hand-written rather than serde+bincode because the byte layout *is* the
//! product's format: it must stay stable across versions of every dependency
//! and be describable in a document. One copy is [`HEADER_SIZE`] bytes:
//!
//! ```text
//! off  len  field
//!   0    8  magic "HCRYPT\x00\x01"
//!   8    2  format version (3; 1 and 2 are read only)
//!  10    2  versions 2, 3: inner-layer cipher (0 = AES-XTS, 1 = Adiantum); version 1: 0
//!  12    8  sequence number (bumped on every update; the newer valid copy wins)
//!  20   16  volume UUID
//!  36    8  logical size in bytes
//!  44    4  encryption sector size (512 or 4096)
//!  48    1  role (1 = cache, 2 = temp)
//!  49    8  data offset in bytes
//!  57    4  active DEK generation
//!  61    1  re-encryption state (0 = none); 8 checkpoint; 4 target generation
//!  74    1  keyslot count, then per slot: generation u32 (top bit set = the
//!           inner layer of a double-encrypted volume), provider, key id,
//!           key version (each u16 length + UTF-8), wrapped DEK (u16 length + bytes);
//!           in version 3 this part ends before byte 3968
//!      then v3, remote backings only: the owner record, "OWN1", generation
//!           u64, daemon id (16 bytes), released u8, host (u16 length +
//!           UTF-8, at most 255 bytes); absent when the bytes after the
//!           slots are zero (`volume/claim.rs` says what it means). A
//!           daemon older than the record does not know it: its MAC
//!           check re-encodes the header without it and refuses the
//!           header as forged, so a remote volume once served by a
//!           daemon that writes records cannot go back to an older one
//! 3968  32  v3: key check of the re-encryption target's DEKs (zeros without one)
//! 4000  32  v3: key check of the active generation's DEKs
//! 4032  32  v3: HMAC-SHA256 of bytes 0..4032 under the active generation's MAC key
//! 4064  32  SHA-256 of bytes 0..4064 (catches torn writes; no secret involved)
//! ```
//! All integers little-endian. Unused bytes are zero. Never a plaintext key.
//! Where the copies sit and how they are updated is `store.rs`.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::kek::{KekRef, WrappedDek};

pub const MAGIC: [u8; 8] = *b"HCRYPT\x00\x01";
pub const FORMAT_VERSION: u16 = 1;
/// The format version of a volume whose inner layer is not XTS.
pub const FORMAT_VERSION_INNER_CIPHER: u16 = 2;
/// The authenticated header, the only version written.
pub const FORMAT_VERSION_AUTH: u16 = 3;

/// The cipher of a double-encrypted volume's inner layer.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum InnerCipher {
    /// XTS-AES-256, as the outer layer.
    #[default]
    AesXts,
    /// Adiantum (XChaCha12, AES-256, NH/Poly1305): another primitive and mode.
    Adiantum,
}

impl std::fmt::Display for InnerCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InnerCipher::AesXts => "aes-xts",
            InnerCipher::Adiantum => "adiantum",
        })
    }
}
pub const HEADER_SIZE: usize = 4096;
const CHECKSUM_AT: usize = HEADER_SIZE - 32;
/// Where version 3's MAC sits; it covers every byte before it.
pub const MAC_AT: usize = CHECKSUM_AT - 32;
const KEY_CHECK_AT: usize = MAC_AT - 32;
const TARGET_KEY_CHECK_AT: usize = KEY_CHECK_AT - 32;
const MAX_KEYSLOTS: usize = 4;

/// What a volume is for (`role` in `[[volume]]`, and in its header).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Persistent: the DEK is wrapped by a KEK and kept in the header.
    Cache,
    /// Erased at every start: a fresh DEK that is never written anywhere.
    Temp,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Cache => 1,
            Role::Temp => 2,
        }
    }
    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Role::Cache),
            2 => Some(Role::Temp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Cache => "cache",
            Role::Temp => "temp",
        })
    }
}

/// Which encryption layer a keyslot's DEK serves. Single-layer volumes have
/// only outer slots; `kek_inner` adds an inner layer (encrypted first on
/// write, decrypted last on read) whose DEK another KEK wraps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    #[default]
    Outer,
    Inner,
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layer::Outer => "outer",
            Layer::Inner => "inner",
        })
    }
}

/// Marks an inner-layer slot in the encoded generation.
const INNER_LAYER_BIT: u32 = 1 << 31;

/// A wrapped DEK, the layer it serves and the generation of data it encrypts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyslot {
    pub generation: u32,
    pub layer: Layer,
    pub wrapped: WrappedDek,
}

/// Progress of an online DEK re-encryption (used from format v1 on so that
/// adding the feature needs no format change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reencrypt {
    /// Bytes of the data area below this offset are under the target generation.
    pub checkpoint: u64,
    pub target_generation: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub uuid: Uuid,
    pub size: u64,
    pub sector_size: u32,
    pub role: Role,
    pub data_offset: u64,
    pub dek_generation: u32,
    pub reencrypt: Option<Reencrypt>,
    pub keyslots: Vec<Keyslot>,
    /// The inner layer's cipher (meaningful with an inner layer only).
    pub inner_cipher: InnerCipher,
    /// Version 3's authentication; `None`: a version 1 or 2 header.
    pub auth: Option<Auth>,
    /// Who serves the volume, on a remote backing (version 3 only).
    pub owner: Option<Owner>,
}

/// The owner record of a remote backing (`volume/claim.rs`): under the
/// header's MAC, so only a holder of the DEK can write one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Bumped by every open and take-over: an instance that finds another
    /// generation on the backing has been replaced.
    pub generation: u64,
    /// The daemon's identity (its state directory's `daemon-id`).
    pub daemon: Uuid,
    /// The host name it ran on, for messages.
    pub host: String,
    /// Set when the owner let go cleanly (stop, or a reload removed it).
    pub released: bool,
}

/// Marks an owner record after the keyslots.
const OWNER_TAG: [u8; 4] = *b"OWN1";
/// The longest host name an owner record keeps.
pub const MAX_OWNER_HOST: usize = 255;

/// What version 3 adds (`auth.rs` computes and checks it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Auth {
    /// Commits the header to the active generation's DEKs.
    pub key_check: [u8; 32],
    /// Commits it to the re-encryption target's DEKs (with a re-encryption only).
    pub target_key_check: Option<[u8; 32]>,
    pub mac: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("no hostcrypt magic")]
    NoMagic,
    #[error("checksum mismatch")]
    BadChecksum,
    #[error(
        "format version {0} is not supported by this build (it reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u16),
    #[error("malformed header: {0}")]
    Malformed(&'static str),
    #[error("header does not fit in {HEADER_SIZE} bytes")]
    TooLarge,
}

impl Header {
    /// The outer keyslot for the active generation, if the header has one.
    pub fn active_keyslot(&self) -> Option<&Keyslot> {
        self.active_slot(Layer::Outer)
    }

    /// The active generation's keyslot of one layer.
    pub fn active_slot(&self, layer: Layer) -> Option<&Keyslot> {
        self.keyslots
            .iter()
            .find(|k| k.generation == self.dek_generation && k.layer == layer)
    }

    /// Records that a re-encryption's window ending at `next` is done;
    /// at the end of the data area the target generation becomes the only
    /// one. Returns whether the re-encryption is complete.
    pub fn advance_reencrypt(&mut self, next: u64) -> bool {
        let Some(r) = self.reencrypt else {
            return true;
        };
        if next >= self.size {
            self.dek_generation = r.target_generation;
            self.keyslots
                .retain(|k| k.generation == r.target_generation);
            self.reencrypt = None;
            // The target's commitment becomes the active one (resealed by
            // whoever writes the header).
            if let Some(auth) = self.auth.as_mut() {
                if let Some(check) = auth.target_key_check.take() {
                    auth.key_check = check;
                }
            }
            return true;
        }
        self.reencrypt = Some(Reencrypt {
            checkpoint: next,
            ..r
        });
        false
    }

    /// Whether the volume is double-encrypted (has an inner layer).
    pub fn has_inner_layer(&self) -> bool {
        self.keyslots.iter().any(|k| k.layer == Layer::Inner)
    }

    pub fn encode(&self) -> Result<Box<[u8; HEADER_SIZE]>, HeaderError> {
        if self.keyslots.len() > MAX_KEYSLOTS {
            return Err(HeaderError::TooLarge);
        }
        let mut w = Writer::default();
        w.bytes(&MAGIC);
        let cipher_code = match self.inner_cipher {
            InnerCipher::AesXts => 0,
            InnerCipher::Adiantum => 1,
        };
        // An unauthenticated header re-encodes as it was read (a backup of
        // a volume not yet upgraded); every header the daemon writes is v3.
        let (version, body_end) = match (&self.auth, self.inner_cipher) {
            (Some(_), _) => (FORMAT_VERSION_AUTH, TARGET_KEY_CHECK_AT),
            (None, InnerCipher::AesXts) => (FORMAT_VERSION, CHECKSUM_AT),
            (None, InnerCipher::Adiantum) => (FORMAT_VERSION_INNER_CIPHER, CHECKSUM_AT),
        };
        if let Some(auth) = &self.auth {
            if auth.target_key_check.is_some() != self.reencrypt.is_some() {
                return Err(HeaderError::Malformed(
                    "a target key check goes with a re-encryption, and only with one",
                ));
            }
        }
        w.u16(version);
        w.u16(cipher_code);
        w.u64(self.sequence);
        w.bytes(self.uuid.as_bytes());
        w.u64(self.size);
        w.u32(self.sector_size);
        w.u8(self.role.code());
        w.u64(self.data_offset);
        w.u32(self.dek_generation);
        match self.reencrypt {
            None => {
                w.u8(0);
                w.u64(0);
                w.u32(0);
            }
            Some(r) => {
                w.u8(1);
                w.u64(r.checkpoint);
                w.u32(r.target_generation);
            }
        }
        w.u8(self.keyslots.len() as u8);
        for slot in &self.keyslots {
            if slot.generation & INNER_LAYER_BIT != 0 {
                return Err(HeaderError::Malformed("generation out of range"));
            }
            w.u32(match slot.layer {
                Layer::Outer => slot.generation,
                Layer::Inner => slot.generation | INNER_LAYER_BIT,
            });
            w.string(&slot.wrapped.kek.provider)?;
            w.string(&slot.wrapped.kek.key_id)?;
            w.string(&slot.wrapped.kek.key_version)?;
            w.blob(&slot.wrapped.blob)?;
        }
        if let Some(owner) = &self.owner {
            if self.auth.is_none() {
                return Err(HeaderError::Malformed(
                    "an owner record needs an authenticated header",
                ));
            }
            if owner.host.len() > MAX_OWNER_HOST {
                return Err(HeaderError::Malformed("owner host name too long"));
            }
            w.bytes(&OWNER_TAG);
            w.u64(owner.generation);
            w.bytes(owner.daemon.as_bytes());
            w.u8(u8::from(owner.released));
            w.string(&owner.host)?;
        }
        if w.buf.len() > body_end {
            return Err(HeaderError::TooLarge);
        }
        let mut out = Box::new([0u8; HEADER_SIZE]);
        out[..w.buf.len()].copy_from_slice(&w.buf);
        if let Some(auth) = &self.auth {
            if let Some(check) = auth.target_key_check {
                out[TARGET_KEY_CHECK_AT..KEY_CHECK_AT].copy_from_slice(&check);
            }
            out[KEY_CHECK_AT..MAC_AT].copy_from_slice(&auth.key_check);
            out[MAC_AT..CHECKSUM_AT].copy_from_slice(&auth.mac);
        }
        let sum = Sha256::digest(&out[..CHECKSUM_AT]);
        out[CHECKSUM_AT..].copy_from_slice(&sum);
        Ok(out)
    }

    pub fn decode(raw: &[u8]) -> Result<Self, HeaderError> {
        if raw.len() < HEADER_SIZE || raw[..8] != MAGIC {
            return Err(HeaderError::NoMagic);
        }
        let sum = Sha256::digest(&raw[..CHECKSUM_AT]);
        if sum[..] != raw[CHECKSUM_AT..HEADER_SIZE] {
            return Err(HeaderError::BadChecksum);
        }
        let version = u16::from_le_bytes([raw[8], raw[9]]);
        let body_end = match version {
            FORMAT_VERSION_AUTH => TARGET_KEY_CHECK_AT,
            _ => CHECKSUM_AT,
        };
        let mut r = Reader {
            buf: &raw[..body_end],
            pos: 10,
        };
        let inner_cipher = match (version, r.u16()?) {
            (FORMAT_VERSION, _) => InnerCipher::AesXts,
            (FORMAT_VERSION_INNER_CIPHER | FORMAT_VERSION_AUTH, 1) => InnerCipher::Adiantum,
            (FORMAT_VERSION_AUTH, 0) => InnerCipher::AesXts,
            (FORMAT_VERSION_INNER_CIPHER | FORMAT_VERSION_AUTH, _) => {
                return Err(HeaderError::Malformed("unknown inner-layer cipher"))
            }
            (other, _) => return Err(HeaderError::UnsupportedVersion(other)),
        };
        let sequence = r.u64()?;
        let uuid = Uuid::from_slice(r.take(16)?).map_err(|_| HeaderError::Malformed("uuid"))?;
        let size = r.u64()?;
        let sector_size = r.u32()?;
        if sector_size != 512 && sector_size != 4096 {
            return Err(HeaderError::Malformed(
                "sector size is neither 512 nor 4096",
            ));
        }
        if size % u64::from(sector_size) != 0 {
            return Err(HeaderError::Malformed(
                "size is not a multiple of the sector size",
            ));
        }
        let role = Role::from_code(r.u8()?).ok_or(HeaderError::Malformed("unknown role"))?;
        let data_offset = r.u64()?;
        if data_offset < (2 * HEADER_SIZE) as u64 || data_offset % 4096 != 0 {
            return Err(HeaderError::Malformed("data offset"));
        }
        // Every later offset is data_offset + something below size.
        if data_offset.checked_add(size).is_none() {
            return Err(HeaderError::Malformed("data offset plus size overflows"));
        }
        let dek_generation = r.u32()?;
        let reencrypt = match (r.u8()?, r.u64()?, r.u32()?) {
            (0, _, _) => None,
            (1, checkpoint, _) if checkpoint > size => {
                return Err(HeaderError::Malformed(
                    "re-encryption checkpoint beyond the size",
                ))
            }
            (1, checkpoint, target_generation) => Some(Reencrypt {
                checkpoint,
                target_generation,
            }),
            _ => return Err(HeaderError::Malformed("re-encryption state")),
        };
        let count = r.u8()? as usize;
        if count > MAX_KEYSLOTS {
            return Err(HeaderError::Malformed("too many keyslots"));
        }
        let mut keyslots = Vec::with_capacity(count);
        for _ in 0..count {
            let encoded = r.u32()?;
            let layer = if encoded & INNER_LAYER_BIT != 0 {
                Layer::Inner
            } else {
                Layer::Outer
            };
            let generation = encoded & !INNER_LAYER_BIT;
            let kek = KekRef {
                provider: r.string()?,
                key_id: r.string()?,
                key_version: r.string()?,
            };
            let blob = r.blob()?.to_vec();
            keyslots.push(Keyslot {
                generation,
                layer,
                wrapped: WrappedDek { kek, blob },
            });
        }
        // Bytes after the slots are zero unless an owner record follows
        // (a daemon that predates it ignores it; the MAC covers it).
        let owner = if version == FORMAT_VERSION_AUTH
            && r.buf.get(r.pos..r.pos + 4) == Some(&OWNER_TAG[..])
        {
            r.take(4)?;
            let generation = r.u64()?;
            let daemon = Uuid::from_bytes(r.array()?);
            let released = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(HeaderError::Malformed("owner record's released flag")),
            };
            let host = r.string()?;
            if host.len() > MAX_OWNER_HOST {
                return Err(HeaderError::Malformed("owner host name too long"));
            }
            Some(Owner {
                generation,
                daemon,
                host,
                released,
            })
        } else {
            None
        };
        let auth = (version == FORMAT_VERSION_AUTH).then(|| {
            let field = |at: usize| {
                let mut out = [0u8; 32];
                out.copy_from_slice(&raw[at..at + 32]);
                out
            };
            Auth {
                target_key_check: reencrypt.map(|_| field(TARGET_KEY_CHECK_AT)),
                key_check: field(KEY_CHECK_AT),
                mac: field(MAC_AT),
            }
        });
        Ok(Header {
            sequence,
            uuid,
            size,
            sector_size,
            role,
            data_offset,
            dek_generation,
            reencrypt,
            keyslots,
            inner_cipher,
            auth,
            owner,
        })
    }
}

#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn blob(&mut self, b: &[u8]) -> Result<(), HeaderError> {
        let len = u16::try_from(b.len()).map_err(|_| HeaderError::TooLarge)?;
        self.u16(len);
        self.bytes(b);
        Ok(())
    }
    fn string(&mut self, s: &str) -> Result<(), HeaderError> {
        self.blob(s.as_bytes())
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HeaderError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(HeaderError::Malformed("field runs past the end"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, HeaderError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, HeaderError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, HeaderError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, HeaderError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], HeaderError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn blob(&mut self) -> Result<&'a [u8], HeaderError> {
        let len = self.u16()? as usize;
        self.take(len)
    }
    fn string(&mut self) -> Result<String, HeaderError> {
        String::from_utf8(self.blob()?.to_vec())
            .map_err(|_| HeaderError::Malformed("non-UTF-8 text"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> Header {
        Header {
            sequence: 7,
            uuid: Uuid::new_v4(),
            size: 1 << 30,
            sector_size: 4096,
            role: Role::Cache,
            data_offset: 1 << 20,
            dek_generation: 1,
            reencrypt: None,
            keyslots: vec![Keyslot {
                layer: Layer::Outer,
                generation: 1,
                wrapped: WrappedDek {
                    kek: KekRef {
                        provider: "local".into(),
                        key_id: "0011223344556677".into(),
                        key_version: "1".into(),
                    },
                    blob: vec![0x5a; 72],
                },
            }],
            inner_cipher: InnerCipher::AesXts,
            auth: None,
            owner: None,
        }
    }

    /// `sample()` as version 3, with made-up checks and MAC (decoding
    /// does not verify them; `auth.rs` does).
    pub(crate) fn sample_v3() -> Header {
        Header {
            auth: Some(Auth {
                key_check: [0x11; 32],
                target_key_check: None,
                mac: [0x22; 32],
            }),
            ..sample()
        }
    }

    #[test]
    fn owner_record_round_trips_after_the_slots_and_needs_version_3() {
        let owner = Owner {
            generation: 42,
            daemon: Uuid::new_v4(),
            host: "storage-host-1".into(),
            released: false,
        };
        let h = Header {
            owner: Some(owner.clone()),
            ..sample_v3()
        };
        let raw = h.encode().unwrap();
        assert_eq!(Header::decode(&raw[..]).unwrap(), h);
        // Without one, the bytes after the slots stay zero.
        let bare = sample_v3().encode().unwrap();
        assert_eq!(Header::decode(&bare[..]).unwrap().owner, None);
        // A released flag that is neither 0 nor 1 is malformed.
        let mut bad = raw.clone();
        let at = raw
            .windows(4)
            .position(|w| w == OWNER_TAG)
            .expect("owner tag")
            + 4
            + 8
            + 16;
        bad[at] = 2;
        let sum = Sha256::digest(&bad[..CHECKSUM_AT]);
        bad[CHECKSUM_AT..].copy_from_slice(&sum);
        assert!(matches!(
            Header::decode(&bad[..]),
            Err(HeaderError::Malformed(_))
        ));
        // Only an authenticated header carries one, and host names are bounded.
        let legacy = Header {
            owner: Some(owner.clone()),
            ..sample()
        };
        assert!(legacy.encode().is_err());
        let long = Header {
            owner: Some(Owner {
                host: "h".repeat(MAX_OWNER_HOST + 1),
                ..owner
            }),
            ..sample_v3()
        };
        assert!(long.encode().is_err());
    }

    #[test]
    fn round_trip() {
        let mut h = sample();
        h.reencrypt = Some(Reencrypt {
            checkpoint: 1 << 21,
            target_generation: 2,
        });
        let raw = h.encode().unwrap();
        assert_eq!(&raw[..8], &MAGIC);
        assert_eq!(Header::decode(&raw[..]).unwrap(), h);
    }

    #[test]
    fn version_3_round_trips_its_checks_and_mac() {
        let mut h = sample_v3();
        let raw = h.encode().unwrap();
        assert_eq!(u16::from_le_bytes([raw[8], raw[9]]), FORMAT_VERSION_AUTH);
        assert_eq!(&raw[MAC_AT..CHECKSUM_AT], &[0x22; 32]);
        assert_eq!(Header::decode(&raw[..]).unwrap(), h);
        h.reencrypt = Some(Reencrypt {
            checkpoint: 1 << 21,
            target_generation: 2,
        });
        assert!(
            h.encode().is_err(),
            "a re-encryption needs its target's key check"
        );
        if let Some(a) = h.auth.as_mut() {
            a.target_key_check = Some([0x33; 32]);
        }
        h.inner_cipher = InnerCipher::Adiantum;
        let raw = h.encode().unwrap();
        assert_eq!(u16::from_le_bytes([raw[8], raw[9]]), FORMAT_VERSION_AUTH);
        assert_eq!(Header::decode(&raw[..]).unwrap(), h);
        // Finishing the re-encryption makes the target's check the active one.
        h.advance_reencrypt(h.size);
        assert_eq!(h.auth.as_ref().unwrap().key_check, [0x33; 32]);
        assert_eq!(h.auth.as_ref().unwrap().target_key_check, None);
    }

    #[test]
    fn advancing_a_reencryption_ends_with_only_the_new_generation() {
        let mut h = sample();
        let mut new_slot = h.keyslots[0].clone();
        new_slot.generation = 2;
        h.keyslots.push(new_slot);
        h.reencrypt = Some(Reencrypt {
            checkpoint: 0,
            target_generation: 2,
        });
        assert!(!h.advance_reencrypt(h.size / 2));
        assert_eq!(h.reencrypt.unwrap().checkpoint, h.size / 2);
        assert_eq!(h.dek_generation, 1);
        assert!(h.advance_reencrypt(h.size));
        assert_eq!((h.dek_generation, h.reencrypt), (2, None));
        assert_eq!(h.keyslots.len(), 1);
        assert_eq!(h.keyslots[0].generation, 2);
    }

    #[test]
    fn adiantum_inner_layer_is_format_version_2_and_round_trips() {
        let mut h = sample();
        let v1 = h.encode().unwrap();
        assert_eq!(
            u16::from_le_bytes([v1[8], v1[9]]),
            1,
            "XTS volumes stay version 1"
        );
        h.inner_cipher = InnerCipher::Adiantum;
        let raw = h.encode().unwrap();
        assert_eq!(u16::from_le_bytes([raw[8], raw[9]]), 2);
        assert_eq!(Header::decode(&raw[..]).unwrap(), h);
    }

    #[test]
    fn inner_layer_slots_round_trip() {
        let mut h = sample();
        let mut inner = h.keyslots[0].clone();
        inner.layer = Layer::Inner;
        inner.wrapped.kek.provider = "vault".into();
        h.keyslots.push(inner);
        let decoded = Header::decode(&h.encode().unwrap()[..]).unwrap();
        assert_eq!(decoded, h);
        assert!(decoded.has_inner_layer());
        assert_eq!(
            decoded
                .active_slot(Layer::Inner)
                .unwrap()
                .wrapped
                .kek
                .provider,
            "vault"
        );
        assert_eq!(
            decoded.active_keyslot().unwrap().wrapped.kek.provider,
            "local"
        );
        assert!(!sample().has_inner_layer());
    }

    #[test]
    fn detects_magic_checksum_and_version() {
        let raw = sample().encode().unwrap();
        let mut bad = raw.clone();
        bad[0] ^= 1;
        assert_eq!(Header::decode(&bad[..]), Err(HeaderError::NoMagic));
        let mut bad = raw.clone();
        bad[40] ^= 1;
        assert_eq!(Header::decode(&bad[..]), Err(HeaderError::BadChecksum));
        let mut bad = raw.clone();
        bad[8] = 9;
        let sum = Sha256::digest(&bad[..CHECKSUM_AT]);
        bad[CHECKSUM_AT..].copy_from_slice(&sum);
        assert_eq!(
            Header::decode(&bad[..]),
            Err(HeaderError::UnsupportedVersion(9))
        );
    }

    proptest! {
        /// Any single corrupted byte is caught, never mis-parsed.
        #[test]
        fn any_flipped_byte_is_rejected(pos in 0usize..HEADER_SIZE, bit in 0u8..8, v3: bool) {
            let mut raw = if v3 { sample_v3() } else { sample() }.encode().unwrap();
            raw[pos] ^= 1 << bit;
            prop_assert!(Header::decode(&raw[..]).is_err());
        }

        /// Arbitrary bytes with a valid checksum never panic the decoder.
        #[test]
        fn garbage_with_valid_checksum_never_panics(body in proptest::collection::vec(any::<u8>(), CHECKSUM_AT - 8)) {
            let mut raw = vec![0u8; HEADER_SIZE];
            raw[..8].copy_from_slice(&MAGIC);
            raw[8..CHECKSUM_AT].copy_from_slice(&body);
            let sum = Sha256::digest(&raw[..CHECKSUM_AT]);
            raw[CHECKSUM_AT..].copy_from_slice(&sum);
            let _ = Header::decode(&raw);
        }
    }
}
