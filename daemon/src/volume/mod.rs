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
mod data;
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
pub use data::DataArea;
pub use header::{Header, HeaderError, InnerCipher, Keyslot, Layer, Role};
pub use keys::{
    InnerStatus, KeyPolicy, KeyStatus, LayerKek, OnKeyLoss, OnKeyUnreachable, VolumeKeys,
};
pub use record::{RecordError, Records, VolumeRecord};
pub use reencrypt_status::{ReencryptAction, ReencryptState, ReencryptStatus};
pub use store::{HeaderCopies, BACKUP_AT, DATA_OFFSET, PRIMARY_AT};
pub use submit::{Op, OpKind, Outcome};

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
    pub role: Role,
    pub data: std::sync::Arc<DataArea>,
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
    refuse_if_mounted(path)?;
    let backing = Backing::open_or_create(path).map_err(io_err(path))?;
    if !force {
        refuse_if_in_use(path, &backing)?;
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

fn refuse_if_mounted(path: &Path) -> Result<(), VolumeError> {
    match mount_point(path).map_err(io_err(path))? {
        Some(at) => Err(VolumeError::Mounted {
            path: path.to_owned(),
            at,
        }),
        None => Ok(()),
    }
}

fn refuse_if_in_use(path: &Path, backing: &Backing) -> Result<(), VolumeError> {
    let copies = HeaderCopies::read(backing).map_err(io_err(path))?;
    if let Some(h) = copies.current() {
        return Err(VolumeError::AlreadyFormatted {
            path: path.to_owned(),
            uuid: h.uuid,
        });
    }
    if let Some(what) = in_use(&copies, backing).map_err(io_err(path))? {
        return Err(VolumeError::NotEmpty {
            path: path.to_owned(),
            what,
        });
    }
    Ok(())
}

/// What a backing without a hostcrypt header holds, if anything: a known
/// signature (filesystem, partition table, LUKS, swap) by name, else any
/// non-zero byte in its first MiB, or (for a regular file) any allocated
/// data beyond it. Allocated zeros count as data: erring toward "in use"
/// is what protects an operator's disk.
fn in_use(copies: &HeaderCopies, backing: &Backing) -> std::io::Result<Option<String>> {
    let probe = backing.size()?.min(DATA_OFFSET);
    let mut buf = vec![0u8; probe as usize];
    backing.read_at(&mut buf, 0)?;
    if let Some(name) = signature(&buf) {
        return Ok(Some(format!("it carries {name} signature")));
    }
    if !copies.is_foreign() {
        return Ok(Some("it holds a damaged hostcrypt header".into()));
    }
    if buf.iter().any(|&b| b != 0) {
        return Ok(Some("its first MiB holds data".into()));
    }
    if !backing.is_fixed_size() && backing.next_data(probe)?.is_some() {
        return Ok(Some("it holds data".into()));
    }
    Ok(None)
}

/// The signature at the start of a device, as blkid would name it.
fn signature(head: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, b"LUKS\xba\xbe") {
        Some("a LUKS")
    } else if at(0x438, &[0x53, 0xef]) {
        Some("an ext2/3/4 filesystem")
    } else if at(0, b"XFSB") {
        Some("an XFS filesystem")
    } else if at(0x10040, b"_BHRfS_M") {
        Some("a btrfs filesystem")
    } else if at(4086, b"SWAPSPACE2") {
        Some("a swap")
    } else if at(512, b"EFI PART") {
        Some("a GPT partition table")
    } else if at(510, &[0x55, 0xaa]) {
        Some("an MBR partition table or boot sector")
    } else {
        None
    }
}

/// Where a block device is mounted (from /proc/self/mountinfo), if it is;
/// `None` for anything else, including a path that does not exist yet.
fn mount_point(path: &Path) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    if !meta.file_type().is_block_device() {
        return Ok(None);
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let wanted = format!("{major}:{minor}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(2) == Some(&wanted.as_str())).then(|| fields.get(4).unwrap_or(&"?").to_string())
    }))
}

/// Opens a cache volume: reads the header, checks it against the volume's
/// anti-rollback record, unwraps its DEKs, verifies the header with them,
/// and only then writes: the upgrade of a version 1 or 2 header to the
/// authenticated version 3, the repair of a damaged copy, a journal replay,
/// the record. Returns the header as it is on disk after opening and the
/// keys it is sealed with, for the volume's `VolumeKeys` to own.
pub fn open_cache(
    name: &str,
    path: &Path,
    expected_size: Option<u64>,
    kek: &dyn KeyProvider,
    inner: Option<&dyn KeyProvider>,
    io: &IoSetup,
    records: &Records,
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
    if header.auth.is_none() {
        tracing::warn!(volume = name, path = %path.display(), "header is not authenticated; upgrading it in place to format version 3");
        store::write_header(&backing, &mut header, &keys).map_err(io_err(path))?;
    } else if let Some(damage) = copies.damage() {
        tracing::warn!(volume = name, path = %path.display(), "{damage}; repairing from the valid copy");
        copies.repair(&backing).map_err(io_err(path))?;
    }
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
    let volume = ready(name, path, backing, &header, current, io)?;
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
    Ok(Volume {
        name: name.to_owned(),
        role: header.role,
        data: Arc::new(data),
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
            if let Some(what) = in_use(&copies, &backing).map_err(io_err(path))? {
                return Err(VolumeError::NotEmpty {
                    path: path.to_owned(),
                    what,
                });
            }
        }
    }
    let dek = Dek::generate().map_err(VolumeError::Random)?;
    let mut header = new_header(geometry, Role::Temp);
    let keys = HeaderKeys {
        current: GenerationKeys::derive(header.uuid, header.dek_generation, &dek, None),
        target: None,
    };
    lay_out(path, &backing, &mut header, &keys)?;
    // A block device or remote export is not emptied like a file: zero its
    // data area (BLKZEROOUT, WRITE_ZEROES where offered), so last run's
    // ciphertext, unreadable under the new key, reads as zeros, not garbage.
    if backing.is_fixed_size() {
        backing
            .zero_range(header.data_offset, header.size)
            .map_err(io_err(path))?;
    }
    ready(name, path, backing, &header, (&dek, None), io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::LocalKek;
    use std::os::unix::fs::FileExt;

    fn records(dir: &Path) -> Records {
        Records::new(&dir.join("state"))
    }

    /// A fresh cache volume `v` at `dir/v.img`, its record under `dir`.
    fn created_v(dir: &Path, kek: &LocalKek) -> (Records, PathBuf) {
        let records = records(dir);
        let path = dir.join("v.img");
        create(
            &path,
            geometry(),
            kek,
            None,
            false,
            Some(&records.volume("v")),
        )
        .unwrap();
        (records, path)
    }

    fn geometry() -> Geometry {
        Geometry {
            size: 16 * 4096,
            sector_size: 4096,
        }
    }

    /// The backing's first MiB and data area, to prove a refusal wrote nothing.
    fn bytes(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    fn header_of(path: &Path) -> Header {
        current_header(path, &read_headers(path).unwrap()).unwrap()
    }

    /// A refusal that names the volume and leaves the backing as it was.
    fn refused(path: &Path, kek: &dyn KeyProvider, records: &Records, what: &str) -> VolumeError {
        let before = bytes(path);
        let err = open_cache("v", path, None, kek, None, &IoSetup::default(), records).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"v\""), "the error names the volume: {text}");
        assert!(text.contains(what), "expected {what:?}: {text}");
        assert!(bytes(path) == before, "a refused open wrote to the backing");
        err
    }

    /// Starts a re-encryption by hand, as `reencrypt.rs` does: pin, seal
    /// with both generations' keys, write, record. Returns the keys and
    /// the new DEK.
    fn start_reencryption(
        path: &Path,
        kek: &dyn KeyProvider,
        records: &Records,
    ) -> (Header, HeaderKeys, Dek) {
        let (volume, mut header, mut keys) =
            open_cache("v", path, None, kek, None, &IoSetup::default(), records).unwrap();
        drop(volume);
        let backing = Backing::open(path).unwrap();
        let new_dek = Dek::generate().unwrap();
        header.keyslots.push(Keyslot {
            generation: 2,
            layer: Layer::Outer,
            wrapped: kek.wrap(&new_dek).unwrap(),
        });
        header.reencrypt = Some(header::Reencrypt {
            checkpoint: 0,
            target_generation: 2,
        });
        let target = GenerationKeys::derive(header.uuid, 2, &new_dek, None);
        let record = records.volume("v");
        record
            .pin_target(&header_of(path), 2, target.key_check)
            .unwrap();
        keys.target = Some(target);
        store::write_header(&backing, &mut header, &keys).unwrap();
        record.save(&header).unwrap();
        (header, keys, new_dek)
    }

    /// A crash in the middle of a window's in-place write, made by hand:
    /// the hash journal records the window's old ciphertext, half of its
    /// sectors already hold the new. Opening finishes the window (only the
    /// old half is re-encrypted), moves the checkpoint past it, and every
    /// sector reads back as written; holes stay holes.
    #[test]
    fn hash_journal_replay_finishes_a_torn_window() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
        let records = records(dir.path());
        let path = dir.path().join("v.img");
        let sector = 4096usize;
        let created = create(&path, geometry(), &kek, None, false, None).unwrap();
        let old_dek = kek
            .unwrap(&created.active_slot(Layer::Outer).unwrap().wrapped)
            .unwrap();
        let old = VolumeCipher::new(&old_dek, None, InnerCipher::AesXts, sector);

        // Sectors 0..8 hold data under the old key, 8..10 are holes.
        let mut plain = vec![0u8; 10 * sector];
        getrandom::fill(&mut plain[..8 * sector]).unwrap();
        let mut disk = plain.clone();
        old.encrypt(&mut disk[..8 * sector], 0);
        Backing::open(&path)
            .unwrap()
            .write_at(&disk, created.data_offset)
            .unwrap();

        // Re-encryption of the window 0..10 sectors began: journal, then
        // sectors 0..4 rewritten in place, then the crash.
        let (header, keys, new_dek) = start_reencryption(&path, &kek, &records);
        let new = VolumeCipher::new(&new_dek, None, InnerCipher::AesXts, sector);
        let backing = Backing::open(&path).unwrap();
        journal::prepare(&backing).unwrap();
        let hashes: Vec<[u8; 32]> = disk
            .chunks_exact(sector)
            .map(journal::sector_hash)
            .collect();
        let key = journal::JournalKey {
            uuid: header.uuid,
            checkpoint: 0,
            target_generation: 2,
        };
        let mac_key = keys.current.journal_key();
        journal::write_hashes(&backing, key, &mac_key, sector as u32, &hashes).unwrap();
        let mut half = disk[..4 * sector].to_vec();
        old.decrypt(&mut half, 0);
        new.encrypt(&mut half, 0);
        backing.write_at(&half, header.data_offset).unwrap();
        drop(backing);

        let (volume, opened, _) =
            open_cache("v", &path, None, &kek, None, &IoSetup::default(), &records).unwrap();
        let r = opened
            .reencrypt
            .expect("still re-encrypting past the window");
        assert_eq!(r.checkpoint, 10 * sector as u64);
        let got = volume.data.read(0, 10 * sector).unwrap();
        assert!(got[..] == plain[..], "data differs after the replay");
        // On disk: the whole window under the new key, holes untouched.
        let mut raw = vec![0u8; 10 * sector];
        Backing::open_read_only(&path)
            .unwrap()
            .read_at(&mut raw, opened.data_offset)
            .unwrap();
        assert!(raw[8 * sector..].iter().all(|&b| b == 0));
        let mut expect = plain[..8 * sector].to_vec();
        new.encrypt(&mut expect, 0);
        assert!(raw[..8 * sector] == expect[..]);
    }

    /// Attack 1: a writer of the backing who can wrap a DEK of their own
    /// (an RSA KEK's public part; here the local KEK stands in for it)
    /// adds a target keyslot and marks a re-encryption in progress. Every
    /// variant is refused, naming the volume, and nothing is written: the
    /// old MAC does not cover the change; resealing with the attacker's own
    /// key fails the key check; sealing everything under the attacker's
    /// DEK passes the MAC but not the record; dropping the MAC is a
    /// downgrade, and without a record an unauthenticated re-encryption.
    #[test]
    fn a_forged_reencryption_target_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
        let (records, path) = created_v(dir.path(), &kek);
        open_cache("v", &path, None, &kek, None, &IoSetup::default(), &records).unwrap();
        let genuine = header_of(&path);
        let mine = Dek::generate().unwrap();
        let mut forged = genuine.clone();
        forged.keyslots.push(Keyslot {
            generation: 2,
            layer: Layer::Outer,
            wrapped: kek.wrap(&mine).unwrap(),
        });
        forged.reencrypt = Some(header::Reencrypt {
            checkpoint: 0,
            target_generation: 2,
        });
        let my_target = GenerationKeys::derive(genuine.uuid, 2, &mine, None);
        forged.auth.as_mut().unwrap().target_key_check = Some(my_target.key_check);
        let backing = Backing::open(&path).unwrap();
        store::write_as_is(&backing, &mut forged.clone()).unwrap();
        drop(backing);
        // The record refuses it first; without one, the MAC does.
        let fresh = Records::new(&dir.path().join("empty"));
        refused(&path, &kek, &records, "not started by this daemon");
        refused(&path, &kek, &fresh, "MAC does not verify");

        // Everything sealed under the attacker's own DEK, as current.
        let mut whole = forged.clone();
        whole.keyslots = vec![Keyslot {
            generation: 1,
            layer: Layer::Outer,
            wrapped: kek.wrap(&mine).unwrap(),
        }];
        whole.reencrypt = None;
        let my_keys = HeaderKeys {
            current: GenerationKeys::derive(genuine.uuid, 1, &mine, None),
            target: None,
        };
        let backing = Backing::open(&path).unwrap();
        store::write_header(&backing, &mut whole, &my_keys).unwrap();
        drop(backing);
        refused(&path, &kek, &records, "another data key than recorded");

        let backing = Backing::open(&path).unwrap();
        store::write_legacy(&backing, &mut forged.clone()).unwrap();
        drop(backing);
        refused(&path, &kek, &records, "downgrade");
        refused(&path, &kek, &fresh, "re-encryption in progress");
    }

    /// Attack 2: a header saved before a rekey (same generation, older
    /// sequence) and one saved before a re-encryption finished (older
    /// generation) are written back: both are refused as rollbacks.
    #[test]
    fn a_rolled_back_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
        let other = LocalKek::init(&dir.path().join("other.key")).unwrap();
        let (records, path) = created_v(dir.path(), &kek);
        let saved = bytes(&path)[..DATA_OFFSET as usize].to_vec();
        let (volume, header, keys) =
            open_cache("v", &path, None, &kek, None, &IoSetup::default(), &records).unwrap();
        let layer_kek = |name: &str, provider: LocalKek| LayerKek {
            name: name.into(),
            provider: std::sync::Arc::new(provider),
        };
        let vk = VolumeKeys::new(
            &path,
            &volume,
            header,
            keys,
            records.volume("v"),
            layer_kek("main", LocalKek::load(&dir.path().join("kek.key")).unwrap()),
            None,
            KeyPolicy {
                on_key_loss: OnKeyLoss::Stop,
                on_key_unreachable: OnKeyUnreachable::Serve,
                unreachable_grace: std::time::Duration::from_secs(1),
                auto_rotate: false,
                check_interval: std::time::Duration::from_secs(1),
            },
            crate::kek::audit::AuditLog::disabled(),
        );
        vk.rekey(Layer::Outer, layer_kek("other", other), None)
            .unwrap();
        drop(vk);
        drop(volume);
        let other = LocalKek::load(&dir.path().join("other.key")).unwrap();
        open_cache(
            "v",
            &path,
            None,
            &other,
            None,
            &IoSetup::default(),
            &records,
        )
        .unwrap();
        let rekeyed = bytes(&path)[..DATA_OFFSET as usize].to_vec();
        // The old header still unwraps with the old KEK, and its MAC holds.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&saved, 0)
            .unwrap();
        refused(&path, &kek, &records, "a rollback");

        // Across generations: back to the rekeyed header, re-encrypt to
        // generation 2 and finish; then the generation-1 header again.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&rekeyed, 0)
            .unwrap();
        let (mut header, mut keys, _) = start_reencryption(&path, &other, &records);
        header.advance_reencrypt(header.size);
        let backing = Backing::open(&path).unwrap();
        store::write_header(&backing, &mut header, &keys).unwrap();
        keys.advance(&header);
        records.volume("v").save(&header).unwrap();
        drop(backing);
        open_cache(
            "v",
            &path,
            None,
            &other,
            None,
            &IoSetup::default(),
            &records,
        )
        .unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&rekeyed, 0)
            .unwrap();
        refused(
            &path,
            &other,
            &records,
            "generation 1 is older than the recorded 2",
        );
    }

    /// Attack 3: the keyslot of another volume under the same KEK is
    /// pasted into this header: its DEK unwraps, but it fails this
    /// header's key check (bound to this volume's UUID and generation).
    #[test]
    fn another_volumes_keyslot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
        let (records, path) = created_v(dir.path(), &kek);
        let theirs = create(
            &dir.path().join("w.img"),
            geometry(),
            &kek,
            None,
            false,
            Some(&records.volume("w")),
        )
        .unwrap();
        let mut pasted = header_of(&path);
        pasted.keyslots[0] = theirs.keyslots[0].clone();
        let backing = Backing::open(&path).unwrap();
        store::write_as_is(&backing, &mut pasted).unwrap();
        drop(backing);
        // Without a record too: the key check alone refuses it.
        refused(
            &path,
            &kek,
            &Records::new(&dir.path().join("empty")),
            "not this volume's",
        );
        refused(&path, &kek, &records, "not this volume's");
    }

    /// Attack 4: a journal record for the header's window, forged under a
    /// key of the attacker's choosing, or in the old unauthenticated
    /// format: refused before any sector or the checkpoint moves.
    #[test]
    fn a_forged_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
        let (records, path) = created_v(dir.path(), &kek);
        let (header, _, _) = start_reencryption(&path, &kek, &records);
        let backing = Backing::open(&path).unwrap();
        journal::prepare(&backing).unwrap();
        let key = journal::JournalKey {
            uuid: header.uuid,
            checkpoint: 0,
            target_generation: 2,
        };
        // Claims the whole data area: every sector would change key.
        journal::write_hashes(&backing, key, &[0x66; 32], 4096, &[[0; 32]; 16]).unwrap();
        drop(backing);
        let err = refused(&path, &kek, &records, "MAC that does not verify");
        assert!(matches!(err, VolumeError::Journal { .. }));
    }

    /// Attack 5: a version-1 header is upgraded in place at open (MAC,
    /// record); writing the old header back is then refused as a
    /// downgrade. A crash inside the upgrade (new primary, old backup)
    /// opens on the new copy.
    #[test]
    fn a_version_1_header_is_upgraded_and_cannot_be_downgraded() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
        let records = records(dir.path());
        let path = dir.path().join("v.img");
        let mut old = create(&path, geometry(), &kek, None, false, None).unwrap();
        let backing = Backing::open(&path).unwrap();
        store::write_legacy(&backing, &mut old).unwrap();
        drop(backing);
        let legacy = bytes(&path)[..DATA_OFFSET as usize].to_vec();
        assert_eq!(u16::from_le_bytes([legacy[8], legacy[9]]), 1);

        let (_, upgraded, _) =
            open_cache("v", &path, None, &kek, None, &IoSetup::default(), &records).unwrap();
        assert!(upgraded.auth.is_some());
        let raw = bytes(&path);
        for at in [PRIMARY_AT, BACKUP_AT] {
            let at = at as usize;
            assert_eq!(u16::from_le_bytes([raw[at + 8], raw[at + 9]]), 3);
        }
        assert!(records.volume("v").load().unwrap().is_some());

        // Torn upgrade: the old backup copy comes back; the new primary wins.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&legacy[..header::HEADER_SIZE], BACKUP_AT)
            .unwrap();
        open_cache("v", &path, None, &kek, None, &IoSetup::default(), &records).unwrap();

        f.write_all_at(&legacy, 0).unwrap();
        drop(f);
        refused(&path, &kek, &records, "downgrade");
    }

    /// One owner per backing: while a volume is open, `create --force`, a
    /// second open (another daemon, a reload's re-add), a temp volume on
    /// the same path, erase and restore are refused before they write a
    /// byte; reading the header still works. Once it closes, they work.
    #[test]
    fn an_open_volume_keeps_every_other_writer_off_its_backing() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
        let path = dir.path().join("v.img");
        let geometry = Geometry {
            size: 1 << 20,
            sector_size: 4096,
        };
        let records = records(dir.path());
        let created = create(&path, geometry, &kek, None, false, None).unwrap();
        let (volume, _, _) =
            open_cache("v", &path, None, &kek, None, &IoSetup::default(), &records).unwrap();
        let busy = |e: VolumeError| match e {
            VolumeError::Io { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::ResourceBusy, "{source}")
            }
            other => panic!("expected a busy backing, got {other}"),
        };
        busy(create(&path, geometry, &kek, None, true, None).unwrap_err());
        busy(open_cache("v", &path, None, &kek, None, &IoSetup::default(), &records).unwrap_err());
        busy(open_temp("t", &path, geometry, &IoSetup::default()).unwrap_err());
        match backup::erase(&path).unwrap_err() {
            backup::BackupError::Volume(e) => busy(e),
            other => panic!("expected a busy backing, got {other}"),
        }
        let header = current_header(&path, &read_headers(&path).unwrap()).unwrap();
        assert_eq!(header.uuid, created.uuid, "nothing was rewritten");
        let dek = kek
            .unwrap(&header.active_slot(Layer::Outer).unwrap().wrapped)
            .unwrap();
        let keys = HeaderKeys {
            current: GenerationKeys::derive(header.uuid, 1, &dek, None),
            target: None,
        };
        match backup::restore(&path, &header, &keys, None, true).unwrap_err() {
            backup::BackupError::Volume(e) => busy(e),
            other => panic!("expected a busy backing, got {other}"),
        }
        drop(volume);
        open_cache("v", &path, None, &kek, None, &IoSetup::default(), &records).unwrap();
    }

    /// A backing shorter than its header says (truncated, or another
    /// volume's header pasted onto a smaller file) is refused at open,
    /// instead of serving the missing part as zeros.
    #[test]
    fn a_backing_shorter_than_its_header_says_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
        let path = dir.path().join("v.img");
        let geometry = Geometry {
            size: 1 << 20,
            sector_size: 4096,
        };
        let records = records(dir.path());
        create(&path, geometry, &kek, None, false, None).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(DATA_OFFSET + (1 << 19)).unwrap();
        drop(file);
        match open_cache("v", &path, None, &kek, None, &IoSetup::default(), &records) {
            Err(VolumeError::BackingTooSmall { have, needed, .. }) => {
                assert_eq!(have, DATA_OFFSET + (1 << 19));
                assert_eq!(needed, DATA_OFFSET + (1 << 20));
            }
            other => panic!("expected BackingTooSmall, got {:?}", other.map(|_| ())),
        }
    }
}
