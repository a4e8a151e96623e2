//! Volumes: formatting a backing, opening it by role, and the encrypted data
//! path. The byte layout of the header is `header.rs`, the two-copy update
//! protocol `store.rs`, the sector mapping `data/`, the engine paths `submit/`.
//!
//! Roles: a `cache` volume is persistent and its DEK is stored wrapped by the
//! volume's KEK; a `temp` volume gets a fresh DEK at every start that is never
//! written anywhere, and its backing is recreated, so a restart erases it
//! cryptographically. Opening never writes before the key is unwrapped and
//! the header is verified: a wrong KEK, a corrupt, forged or rolled-back
//! header leaves the disk untouched. Header authentication is `auth.rs`,
//! the anti-rollback record `record.rs`.

mod allocation;
pub mod auth;
pub mod backup;
mod cipher;
pub mod claim;
mod data;
mod guard;
pub mod header;
pub(crate) mod journal;
pub mod keys;
pub mod record;
pub mod reencrypt;
pub mod reencrypt_status;
mod store;
mod submit;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

pub use allocation::Allocation;
pub use auth::{AuthError, GenerationKeys, HeaderKeys};
pub use cipher::VolumeCipher;
pub use claim::{ClaimError, Claimant};
pub use data::DataArea;
pub use header::{Header, HeaderError, InnerCipher, Keyslot, Layer, Role};
pub use keys::{
    InnerStatus, KeyPolicy, KeyStatus, LayerKek, OnKeyLoss, OnKeyUnreachable, VolumeKeys,
};
pub use record::{RecordError, Records, VolumeRecord};
pub use reencrypt_status::{ReencryptAction, ReencryptState, ReencryptStatus};
pub use store::{HeaderCopies, BACKUP_AT, DATA_OFFSET, PRIMARY_AT};
#[cfg(test)]
pub use submit::AlwaysReadable;
pub use submit::{
    ClientPlaintext, Destination, MemoryGate, Op, OpKind, Outcome, SealedRead, WriteData,
};

use crate::crypto::Dek;
use crate::io::engine::Engine;
use crate::io::Backing;
use crate::kek::{KekError, KeyProvider};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} does not exist; format it with `hostcrypt --config FILE create VOLUME --size SIZE`"
    )]
    Missing { path: PathBuf },
    #[error("{path} is not a hostcrypt volume (no header magic in either copy)")]
    NotAVolume { path: PathBuf },
    #[error("{path}: both header copies are corrupt (primary: {primary}; backup: {backup}); refusing to open the volume and writing nothing. Restore the header from a backup of the first 1 MiB")]
    BothHeadersCorrupt {
        path: PathBuf,
        primary: HeaderError,
        backup: HeaderError,
    },
    #[error("{path} already holds a hostcrypt volume ({uuid}); pass --force to destroy it")]
    AlreadyFormatted { path: PathBuf, uuid: Uuid },
    #[error("{path} is not empty ({what}); pass --force to overwrite it")]
    NotEmpty { path: PathBuf, what: String },
    #[error("{path} is mounted at {at}; unmount it first (even --force does not format a mounted device)")]
    Mounted { path: PathBuf, at: String },
    #[error("{path}: direct = true needs the sector size ({sector_size}) to be at least the device's logical block size ({block_size})")]
    SectorBelowBlockSize {
        path: PathBuf,
        sector_size: u32,
        block_size: u32,
    },
    #[error("{path} holds a {found} volume, but the config says {expected}")]
    RoleMismatch {
        path: PathBuf,
        found: Role,
        expected: Role,
    },
    #[error("{path}: header says the volume is {found} bytes, but the config says {expected}")]
    SizeMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("{path}: header has no wrapped key for DEK generation {generation}")]
    NoKeyslot { path: PathBuf, generation: u32 },
    #[error("{path}: {source}")]
    Kek {
        path: PathBuf,
        #[source]
        source: KekError,
    },
    #[error("{path} is double-encrypted (its inner layer's DEK is wrapped by {inner}); set kek_inner for this volume to the KEK that holds it")]
    InnerKekMissing { path: PathBuf, inner: String },
    #[error("{path} has a single encryption layer, but the config sets kek_inner; double encryption is chosen at `hostcrypt create` (remove kek_inner, or re-create the volume)")]
    InnerLayerMissing { path: PathBuf },
    #[error("volume {volume:?} ({path}): {source}; refusing to open it, nothing was written")]
    Forged {
        volume: String,
        path: PathBuf,
        #[source]
        source: AuthError,
    },
    #[error("volume {volume:?} ({path}): {source}; refusing to open it, nothing was written")]
    Journal {
        volume: String,
        path: PathBuf,
        #[source]
        source: journal::JournalError,
    },
    #[error("volume {volume:?} ({path}): the header is of format version 1 or 2 (not authenticated) and records a re-encryption in progress, which cannot be told from a forged one; refusing to open it, nothing was written. Finish the re-encryption with the hostcrypt version that started it, then upgrade")]
    UnauthenticatedReencrypt { volume: String, path: PathBuf },
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error("{path}: a hostcryptd serves it (daemon {daemon} on host {host:?}, owner generation {generation}) and has not released it; stop that daemon first (it releases the backing at stop). If it is gone for good and cut off from the storage, let a daemon with take_over = true on this volume open it, then stop that one; if its key is lost too, `hostcrypt erase VOLUME --yes --take-over` clears it")]
    ServedRemotely {
        path: PathBuf,
        daemon: Uuid,
        host: String,
        generation: u64,
    },
    #[error("invalid volume geometry: {0}")]
    Geometry(String),
    #[error("{path} holds {have} bytes, but its header needs {needed} (data offset plus size): the backing was truncated or is not this volume's; refusing to serve reads past its end as zeros")]
    BackingTooSmall {
        path: PathBuf,
        have: u64,
        needed: u64,
    },
    #[error("random generator failed: {0}")]
    Random(getrandom::Error),
}

impl VolumeError {
    /// Whether the KEK is the problem (so waiting for it may help).
    pub fn is_key_error(&self) -> bool {
        matches!(self, VolumeError::Kek { .. })
    }
}

/// Parameters of a new volume.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub size: u64,
    pub sector_size: u32,
}

impl Geometry {
    fn validate(&self) -> Result<(), VolumeError> {
        if self.sector_size != 512 && self.sector_size != 4096 {
            return Err(VolumeError::Geometry(format!(
                "sector size must be 512 or 4096, not {}",
                self.sector_size
            )));
        }
        if self.size == 0 || !self.size.is_multiple_of(u64::from(self.sector_size)) {
            return Err(VolumeError::Geometry(format!(
                "size {} must be a non-zero multiple of the sector size {}",
                self.size, self.sector_size
            )));
        }
        Ok(())
    }
}

/// An open volume, ready to serve. It keeps no header: the live header of
/// a cache volume belongs to its `VolumeKeys`, which every header change
/// goes through.
#[derive(Debug)]
pub struct Volume {
    pub name: String,
    /// The header's UUID (a temp volume's is new at every open): what
    /// names this volume's data, whatever its config name.
    pub uuid: Uuid,
    pub role: Role,
    pub data: std::sync::Arc<DataArea>,
    /// The owner record this instance wrote, on a remote backing
    /// (`claim.rs`): the periodic check compares the backing's with it.
    pub claim: Option<Arc<claim::Claim>>,
}

impl Volume {
    /// Writes a remote backing's owner record back as released (a cache
    /// volume's through its `keys`, which serialize header writes), then
    /// ends writing: a released record means this instance writes no more.
    pub fn release_claim(&self, keys: Option<&VolumeKeys>) -> std::io::Result<()> {
        let Some(claim) = &self.claim else {
            return Ok(());
        };
        let released = match keys {
            Some(keys) => keys.release_claim(),
            None => claim.release_temp(self.data.backing()),
        };
        claim.end_writes("the remote backing's owner record was released");
        released
    }

    /// Ends writing to a remote backing for good (this instance is let go
    /// of without a release). Nothing to do on a local one.
    pub fn end_writes(&self, reason: &str) {
        if let Some(claim) = &self.claim {
            claim.end_writes(reason);
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How an open volume's I/O runs: on which engine, and whether the
/// backing bypasses the page cache (`direct = true`, O_DIRECT).
#[derive(Clone)]
pub struct IoSetup {
    pub engine: Arc<Engine>,
    pub direct: bool,
}

impl Default for IoSetup {
    /// Buffered, on the thread pool: for tools and tests that open a
    /// volume without a daemon.
    fn default() -> Self {
        IoSetup {
            engine: Engine::threads(),
            direct: false,
        }
    }
}

/// Reads both header copies of a backing without writing anything (and
/// without claiming it, so this works while a daemon serves it).
pub fn read_headers(path: &Path) -> Result<HeaderCopies, VolumeError> {
    let backing = missing_or(path, Backing::open_read_only(path))?;
    HeaderCopies::read(&backing).map_err(io_err(path))
}

/// The newest valid header, or the error that explains why there is none.
pub fn current_header(path: &Path, copies: &HeaderCopies) -> Result<Header, VolumeError> {
    if copies.is_foreign() {
        return Err(VolumeError::NotAVolume {
            path: path.to_owned(),
        });
    }
    if let Some(h) = copies.current() {
        return Ok(h.clone());
    }
    let reason = |copy: &Result<Header, HeaderError>| copy.as_ref().err().cloned();
    Err(VolumeError::BothHeadersCorrupt {
        path: path.to_owned(),
        primary: reason(&copies.primary).unwrap_or(HeaderError::NoMagic),
        backup: reason(&copies.backup).unwrap_or(HeaderError::NoMagic),
    })
}

/// Opens an existing backing to write it, claimed for this opener alone.
fn open_existing(path: &Path) -> Result<Backing, VolumeError> {
    missing_or(path, Backing::open(path))
}

fn missing_or(path: &Path, opened: std::io::Result<Backing>) -> Result<Backing, VolumeError> {
    opened.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            VolumeError::Missing {
                path: path.to_owned(),
            }
        } else {
            io_err(path)(e)
        }
    })
}

/// Formats `path` as a cache volume whose DEK is wrapped by `kek` (and,
/// for double encryption, with a second DEK wrapped by `inner`). Refuses to
/// overwrite a hostcrypt volume or a non-empty file unless `force`. The
/// volume's anti-rollback `record`, if given, is replaced by the new one.
pub fn create(
    path: &Path,
    geometry: Geometry,
    kek: &dyn KeyProvider,
    inner: Option<(&dyn KeyProvider, InnerCipher)>,
    force: bool,
    record: Option<&VolumeRecord>,
) -> Result<Header, VolumeError> {
    geometry.validate()?;
    // Before the claim: a mounted device refuses O_EXCL, and the operator
    // should hear where it is mounted, not only that it is busy.
    guard::refuse_if_mounted(path)?;
    let backing = Backing::open_or_create(path).map_err(io_err(path))?;
    // Even with --force: the owner may be serving it right now.
    guard::refuse_if_served_remotely(path, &backing)?;
    if !force {
        guard::refuse_if_in_use(path, &backing)?;
    }
    let mut header = new_header(geometry, Role::Cache);
    if let Some((_, cipher)) = inner {
        header.inner_cipher = cipher;
    }
    let layers = [
        (Layer::Outer, Some(kek)),
        (Layer::Inner, inner.map(|(p, _)| p)),
    ];
    let mut deks = Vec::new();
    for (layer, provider) in layers {
        let Some(provider) = provider else { continue };
        let dek = Dek::generate().map_err(VolumeError::Random)?;
        let wrapped = provider.wrap(&dek).map_err(|source| VolumeError::Kek {
            path: path.to_owned(),
            source,
        })?;
        header.keyslots.push(Keyslot {
            generation: 1,
            layer,
            wrapped,
        });
        deks.push(dek);
    }
    let (outer, inner) = match &deks[..] {
        [outer] => (outer, None),
        [outer, inner] => (outer, Some(inner)),
        _ => unreachable!("one or two layers"),
    };
    let keys = HeaderKeys {
        current: GenerationKeys::derive(header.uuid, 1, outer, inner),
        target: None,
    };
    lay_out(path, &backing, &mut header, &keys)?;
    if let Some(record) = record {
        record.save(&header)?;
    }
    Ok(header)
}

fn new_header(geometry: Geometry, role: Role) -> Header {
    Header {
        sequence: 0,
        uuid: Uuid::new_v4(),
        size: geometry.size,
        sector_size: geometry.sector_size,
        role,
        data_offset: DATA_OFFSET,
        dek_generation: 1,
        reencrypt: None,
        keyslots: Vec::new(),
        inner_cipher: InnerCipher::AesXts,
        auth: None,
        owner: None,
    }
}

/// Sizes the backing (a regular file is emptied first so no old ciphertext
/// survives) and writes both header copies, sealed with `keys`.
fn lay_out(
    path: &Path,
    backing: &Backing,
    header: &mut Header,
    keys: &HeaderKeys,
) -> Result<(), VolumeError> {
    let total = header.data_offset + header.size;
    if !backing.is_fixed_size() {
        backing.set_len(0).map_err(io_err(path))?;
    }
    backing.set_len(total).map_err(io_err(path))?;
    store::write_header(backing, header, keys).map_err(io_err(path))
}

/// Opens a cache volume: reads the header, checks it against the volume's
/// anti-rollback record, unwraps its DEKs, verifies the header with them,
/// and only then writes: the upgrade of a version 1 or 2 header to the
/// authenticated version 3, the repair of a damaged copy, a journal replay,
/// the record. Returns the header as it is on disk after opening and the
/// keys it is sealed with, for the volume's `VolumeKeys` to own.
// Each argument is a different party's: the config's, the key providers',
// the engine's, the state directory's.
#[allow(clippy::too_many_arguments)]
pub fn open_cache(
    name: &str,
    path: &Path,
    expected_size: Option<u64>,
    kek: &dyn KeyProvider,
    inner: Option<&dyn KeyProvider>,
    io: &IoSetup,
    records: &Records,
    claimant: &Claimant,
) -> Result<(Volume, Header, HeaderKeys), VolumeError> {
    let backing = open_existing(path)?;
    let copies = HeaderCopies::read(&backing).map_err(io_err(path))?;
    let header = current_header(path, &copies)?;
    if header.role != Role::Cache {
        return Err(VolumeError::RoleMismatch {
            path: path.to_owned(),
            found: header.role,
            expected: Role::Cache,
        });
    }
    if let Some(expected) = expected_size.filter(|&s| s != header.size) {
        return Err(VolumeError::SizeMismatch {
            path: path.to_owned(),
            found: header.size,
            expected,
        });
    }
    let record = records.volume(name);
    record.check(&header)?;
    if header.auth.is_none() && header.reencrypt.is_some() {
        return Err(VolumeError::UnauthenticatedReencrypt {
            volume: name.to_owned(),
            path: path.to_owned(),
        });
    }
    let forged = |source| VolumeError::Forged {
        volume: name.to_owned(),
        path: path.to_owned(),
        source,
    };
    let unwrap_generation = |generation: u32, layer: Layer, provider: &dyn KeyProvider| {
        let slot = header
            .keyslots
            .iter()
            .find(|k| k.generation == generation && k.layer == layer)
            .ok_or_else(|| VolumeError::NoKeyslot {
                path: path.to_owned(),
                generation,
            })?;
        provider
            .unwrap(&slot.wrapped)
            .map_err(|source| VolumeError::Kek {
                path: path.to_owned(),
                source,
            })
    };
    let unwrap = |layer: Layer, provider: &dyn KeyProvider| {
        unwrap_generation(header.dek_generation, layer, provider)
    };
    let inner_dek = match (inner, header.active_slot(Layer::Inner)) {
        (Some(provider), Some(_)) => Some(unwrap(Layer::Inner, provider)?),
        (None, None) => None,
        (None, Some(slot)) => {
            return Err(VolumeError::InnerKekMissing {
                path: path.to_owned(),
                inner: slot.wrapped.kek.to_string(),
            })
        }
        (Some(_), None) => {
            return Err(VolumeError::InnerLayerMissing {
                path: path.to_owned(),
            })
        }
    };
    let dek = unwrap(Layer::Outer, kek)?;
    let current_keys =
        GenerationKeys::derive(header.uuid, header.dek_generation, &dek, inner_dek.as_ref());
    // A version 1 or 2 header has nothing to verify: it is upgraded below.
    if header.auth.is_some() {
        auth::verify(&header, &current_keys).map_err(forged)?;
    }
    // Mid-re-encryption: the target generation's keys too, which the
    // verified header commits to.
    let target = match header.reencrypt {
        Some(r) => {
            let outer = unwrap_generation(r.target_generation, Layer::Outer, kek)?;
            let inner = match inner {
                Some(provider) => Some(unwrap_generation(
                    r.target_generation,
                    Layer::Inner,
                    provider,
                )?),
                None => None,
            };
            let keys =
                GenerationKeys::derive(header.uuid, r.target_generation, &outer, inner.as_ref());
            auth::verify_target(&header, &keys).map_err(forged)?;
            Some((outer, inner, keys))
        }
        None => None,
    };
    let (target, target_keys) = match target {
        Some((outer, inner, keys)) => (Some((outer, inner)), Some(keys)),
        None => (None, None),
    };
    let mut keys = HeaderKeys {
        current: current_keys,
        target: target_keys,
    };
    let mut header = header;
    // A remote backing's owner record, decided before anything is written
    // and written with the first header write (`claim.rs`).
    let claimed = match backing.remote().is_some() {
        true => {
            let hold = claim::Hold::take(name, path, &[header.uuid])?;
            let (owner, admission) = claimant.admit(name, path, header.owner.as_ref())?;
            // The header was read before the key was unwrapped, which may
            // have taken seconds: another daemon may have opened it since.
            claim::unchanged_since(name, path, &backing, &header)?;
            Some((owner, admission, hold))
        }
        false => None,
    };
    if let Some((owner, ..)) = &claimed {
        header.owner = Some(owner.clone());
    }
    if header.auth.is_none() {
        tracing::warn!(volume = name, path = %path.display(), "header is not authenticated; upgrading it in place to format version 3");
        store::write_header(&backing, &mut header, &keys).map_err(io_err(path))?;
    } else if claimed.is_some() {
        // Rewrites both copies, so it repairs a damaged one too.
        store::write_header(&backing, &mut header, &keys).map_err(io_err(path))?;
    } else if let Some(damage) = copies.damage() {
        tracing::warn!(volume = name, path = %path.display(), "{damage}; repairing from the valid copy");
        copies.repair(&backing).map_err(io_err(path))?;
    }
    let claim = match claimed {
        Some((owner, admission, hold)) => {
            let confirmed = claim::settle(name, path, &backing, &header, &admission)?;
            Some(
                claim::Claim::start(name, (header.uuid, owner), &backing, hold, confirmed)
                    .map_err(io_err(path))?,
            )
        }
        None => None,
    };
    if let (Some((outer, inner)), Some(_)) = (&target, header.reencrypt) {
        let sector_size = header.sector_size as usize;
        let ciphers = (
            VolumeCipher::new(&dek, inner_dek.as_ref(), header.inner_cipher, sector_size),
            VolumeCipher::new(outer, inner.as_ref(), header.inner_cipher, sector_size),
        );
        replay_journal(name, path, &backing, &mut header, &mut keys, &ciphers)?;
    }
    record.save(&header)?;
    // A replay that completed the re-encryption makes the target current.
    let finished = target.is_some() && header.reencrypt.is_none();
    let current = match (&target, finished) {
        (Some((outer, inner)), true) => (outer, inner.as_ref()),
        _ => (&dek, inner_dek.as_ref()),
    };
    let volume = ready(name, path, backing, &header, current, io, claim)?;
    if let (Some((outer, inner)), Some(r)) = (&target, header.reencrypt) {
        let cipher = VolumeCipher::new(
            outer,
            inner.as_ref(),
            header.inner_cipher,
            header.sector_size as usize,
        );
        volume
            .data
            .begin_reencrypt(cipher, r.checkpoint)
            .map_err(io_err(path))?;
    }
    Ok((volume, header, keys))
}

/// After a crash mid-re-encryption: if the journal covers the window at the
/// header's checkpoint, finish that window and move the checkpoint past it
/// (finishing the re-encryption if it was the last window). Every sector of
/// the window whose ciphertext still has its old hash is re-encrypted
/// (`ciphers`: current, target); the others already hold the new
/// ciphertext. A journal record for this window that is not authenticated
/// by the active generation's journal key is refused before anything moves.
fn replay_journal(
    name: &str,
    path: &Path,
    backing: &Backing,
    header: &mut Header,
    keys: &mut HeaderKeys,
    (current, target): &(VolumeCipher, VolumeCipher),
) -> Result<(), VolumeError> {
    let Some(r) = header.reencrypt else {
        return Ok(());
    };
    let key = journal::JournalKey {
        uuid: header.uuid,
        checkpoint: r.checkpoint,
        target_generation: r.target_generation,
    };
    let found =
        journal::read_hashes(backing, key, &keys.current.journal_key()).map_err(|e| match e {
            journal::JournalError::Io(e) => io_err(path)(e),
            source => VolumeError::Journal {
                volume: name.to_owned(),
                path: path.to_owned(),
                source,
            },
        })?;
    let Some((sector_size, hashes)) = found else {
        return Ok(());
    };
    if sector_size != header.sector_size {
        return Err(io_err(path)(std::io::Error::other(
            "the re-encryption journal's sector size differs from the header's",
        )));
    }
    let sector = sector_size as usize;
    let mut redone = 0usize;
    let mut buf = vec![0u8; sector];
    for (i, old) in hashes.iter().enumerate() {
        let at = r.checkpoint + (i * sector) as u64;
        backing
            .read_at(&mut buf, header.data_offset + at)
            .map_err(io_err(path))?;
        // Holes stay holes; a sector whose hash changed is already new.
        if buf.iter().all(|&b| b == 0) || journal::sector_hash(&buf) != *old {
            continue;
        }
        let index = at / u64::from(sector_size);
        current.decrypt(&mut buf, index);
        target.encrypt(&mut buf, index);
        backing
            .write_at(&buf, header.data_offset + at)
            .map_err(io_err(path))?;
        redone += 1;
    }
    backing.sync_rewritten().map_err(io_err(path))?;
    tracing::warn!(
        volume = name,
        checkpoint = r.checkpoint,
        sectors = hashes.len(),
        redone,
        "re-encryption was interrupted inside a window; replaying it from the journal"
    );
    header.advance_reencrypt(r.checkpoint + (hashes.len() * sector) as u64);
    store::write_header(backing, header, keys).map_err(io_err(path))?;
    keys.advance(header);
    Ok(())
}

/// The last step of opening either role: O_DIRECT if asked, the cipher,
/// the data area.
fn ready(
    name: &str,
    path: &Path,
    mut backing: Backing,
    header: &Header,
    (dek, inner): (&Dek, Option<&Dek>),
    io: &IoSetup,
    claim: Option<Arc<claim::Claim>>,
) -> Result<Volume, VolumeError> {
    // Checked arithmetic: a header is untrusted until here too.
    let needed = header
        .data_offset
        .checked_add(header.size)
        .ok_or_else(|| VolumeError::Geometry("data offset plus size overflows".into()))?;
    let have = backing.size().map_err(io_err(path))?;
    if have < needed {
        return Err(VolumeError::BackingTooSmall {
            path: path.to_owned(),
            have,
            needed,
        });
    }
    if io.direct {
        let block_size = backing.logical_block_size().map_err(io_err(path))?;
        if header.sector_size < block_size {
            return Err(VolumeError::SectorBelowBlockSize {
                path: path.to_owned(),
                sector_size: header.sector_size,
                block_size,
            });
        }
        backing.enable_direct().map_err(io_err(path))?;
    }
    let cipher = VolumeCipher::new(dek, inner, header.inner_cipher, header.sector_size as usize);
    let data = DataArea::new(
        backing,
        cipher,
        (header.size, header.data_offset),
        io.engine.clone(),
    );
    let data = Arc::new(data);
    if let Some(claim) = &claim {
        claim.attach(&data);
    }
    Ok(Volume {
        name: name.to_owned(),
        uuid: header.uuid,
        role: header.role,
        data,
        claim,
    })
}

/// Opens a temp volume: recreates the backing with a fresh in-memory DEK.
/// Refuses a backing that holds a cache volume or foreign data, so a config
/// typo cannot wipe a persistent disk.
pub fn open_temp(
    name: &str,
    path: &Path,
    geometry: Geometry,
    io: &IoSetup,
    claimant: &Claimant,
) -> Result<Volume, VolumeError> {
    geometry.validate()?;
    // Claimed first (a file is created if missing), then checked: a remote
    // export or a block device gets the same checks as a file, before
    // anything is written.
    let backing = Backing::open_or_create(path).map_err(io_err(path))?;
    let copies = HeaderCopies::read(&backing).map_err(io_err(path))?;
    match copies.current() {
        Some(h) if h.role != Role::Temp => {
            return Err(VolumeError::RoleMismatch {
                path: path.to_owned(),
                found: h.role,
                expected: Role::Temp,
            })
        }
        Some(_) => {}
        None => {
            if let Some(what) = guard::in_use(&copies, &backing).map_err(io_err(path))? {
                return Err(VolumeError::NotEmpty {
                    path: path.to_owned(),
                    what,
                });
            }
        }
    }
    // The last run's record cannot be verified (its key died with it),
    // but it still tells another daemon's live temp volume from ours.
    let mut header = new_header(geometry, Role::Temp);
    let claimed = match backing.remote().is_some() {
        true => {
            let found = copies.current();
            let uuids: Vec<Uuid> = found
                .map(|h| h.uuid)
                .into_iter()
                .chain([header.uuid])
                .collect();
            let hold = claim::Hold::take(name, path, &uuids)?;
            let (owner, admission) =
                claimant.admit(name, path, found.and_then(|h| h.owner.as_ref()))?;
            if let Some(found) = found {
                claim::unchanged_since(name, path, &backing, found)?;
            }
            Some((owner, admission, hold))
        }
        false => None,
    };
    let dek = Dek::generate().map_err(VolumeError::Random)?;
    header.owner = claimed.as_ref().map(|(owner, ..)| owner.clone());
    let keys = HeaderKeys {
        current: GenerationKeys::derive(header.uuid, header.dek_generation, &dek, None),
        target: None,
    };
    lay_out(path, &backing, &mut header, &keys)?;
    let claim = match claimed {
        Some((owner, admission, hold)) => {
            let confirmed = claim::settle(name, path, &backing, &header, &admission)?;
            let claim = claim::Claim::start(name, (header.uuid, owner), &backing, hold, confirmed)
                .map_err(io_err(path))?;
            claim.keep_temp(header.clone(), keys);
            Some(claim)
        }
        None => None,
    };
    // A block device or remote export is not emptied like a file: zero its
    // data area (BLKZEROOUT, WRITE_ZEROES where offered), so last run's
    // ciphertext, unreadable under the new key, reads as zeros, not garbage.
    if backing.is_fixed_size() {
        backing
            .zero_range(header.data_offset, header.size)
            .map_err(io_err(path))?;
    }
    ready(name, path, backing, &header, (&dek, None), io, claim)
}

#[cfg(test)]
mod tests;
