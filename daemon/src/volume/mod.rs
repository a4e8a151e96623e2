//! Volumes: formatting a backing, opening it by role, and the encrypted data
//! path. The byte layout of the header is `header.rs`, the two-copy update
//! protocol `store.rs`, the sector mapping `data.rs`.
//!
//! Roles: a `cache` volume is persistent and its DEK is stored wrapped by the
//! volume's KEK; a `temp` volume gets a fresh DEK at every start that is never
//! written anywhere, and its backing is recreated, so a restart erases it
//! cryptographically. Opening never writes before the key is unwrapped: a
//! wrong KEK or a corrupt header leaves the disk untouched.

mod allocation;
pub mod backup;
mod cipher;
mod data;
pub mod header;
pub(crate) mod journal;
pub mod keys;
pub mod reencrypt;
mod shared_read;
mod store;
mod submit;

use std::path::{Path, PathBuf};

use uuid::Uuid;

pub use allocation::Allocation;
pub use cipher::VolumeCipher;
pub use data::DataArea;
pub use header::{Header, HeaderError, InnerCipher, Keyslot, Layer, Role};
pub use keys::{
    InnerStatus, KeyPolicy, KeyStatus, LayerKek, OnKeyLoss, OnKeyUnreachable, VolumeKeys,
};
pub use reencrypt::{ReencryptAction, ReencryptStatus};
pub use store::{HeaderCopies, BACKUP_AT, DATA_OFFSET, PRIMARY_AT};
pub use submit::{Op, Outcome};

use crate::crypto::Dek;
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
    #[error("invalid volume geometry: {0}")]
    Geometry(String),
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
/// overwrite a hostcrypt volume or a non-empty file unless `force`.
pub fn create(
    path: &Path,
    geometry: Geometry,
    kek: &dyn KeyProvider,
    inner: Option<(&dyn KeyProvider, InnerCipher)>,
    force: bool,
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
    }
    lay_out(path, &backing, &mut header)?;
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
    }
}

/// Sizes the backing (a regular file is emptied first so no old ciphertext
/// survives) and writes both header copies.
fn lay_out(path: &Path, backing: &Backing, header: &mut Header) -> Result<(), VolumeError> {
    let total = header.data_offset + header.size;
    if !backing.is_fixed_size() {
        backing.set_len(0).map_err(io_err(path))?;
    }
    backing.set_len(total).map_err(io_err(path))?;
    store::write_header(backing, header).map_err(io_err(path))
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

/// Opens a cache volume: reads the header, unwraps its DEK with `kek`, and
/// only then repairs a damaged header copy. Returns the header as it is on
/// disk after opening, for the volume's `VolumeKeys` to own.
pub fn open_cache(
    name: &str,
    path: &Path,
    expected_size: Option<u64>,
    kek: &dyn KeyProvider,
    inner: Option<&dyn KeyProvider>,
    direct: bool,
) -> Result<(Volume, Header), VolumeError> {
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
    // Mid-re-encryption: the target generation's keys too.
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
            Some((outer, inner))
        }
        None => None,
    };
    if let Some(damage) = copies.damage() {
        tracing::warn!(volume = name, path = %path.display(), "{damage}; repairing from the valid copy");
        copies.repair(&backing).map_err(io_err(path))?;
    }
    let mut header = header;
    if let (Some((outer, inner)), Some(_)) = (&target, header.reencrypt) {
        let sector_size = header.sector_size as usize;
        let ciphers = (
            VolumeCipher::new(&dek, inner_dek.as_ref(), header.inner_cipher, sector_size),
            VolumeCipher::new(outer, inner.as_ref(), header.inner_cipher, sector_size),
        );
        replay_journal(name, path, &backing, &mut header, &ciphers)?;
    }
    // A replay that completed the re-encryption makes the target current.
    let finished = target.is_some() && header.reencrypt.is_none();
    let current = match (&target, finished) {
        (Some((outer, inner)), true) => (outer, inner.as_ref()),
        _ => (&dek, inner_dek.as_ref()),
    };
    let volume = ready(name, path, backing, &header, current, direct)?;
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
    Ok((volume, header))
}

/// After a crash mid-re-encryption: if the journal covers the window at the
/// header's checkpoint, finish that window and move the checkpoint past it
/// (finishing the re-encryption if it was the last window). With a hash
/// journal, every sector of the window whose ciphertext still has its old
/// hash is re-encrypted (`ciphers`: current, target); the others already
/// hold the new ciphertext. A legacy data journal is copied into place.
fn replay_journal(
    name: &str,
    path: &Path,
    backing: &Backing,
    header: &mut Header,
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
    if let Some((sector_size, hashes)) = journal::read_hashes(backing, key).map_err(io_err(path))? {
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
            "re-encryption was interrupted inside a window; replaying it from the journal (hash journal)"
        );
        header.advance_reencrypt(r.checkpoint + (hashes.len() * sector) as u64);
        return store::write_header(backing, header).map_err(io_err(path));
    }
    let Some(window) = journal::read(backing, key).map_err(io_err(path))? else {
        return Ok(());
    };
    tracing::warn!(
        volume = name,
        checkpoint = r.checkpoint,
        len = window.len(),
        "re-encryption was interrupted inside a window; replaying it from the journal"
    );
    data::for_nonzero_runs(&window, header.sector_size as usize, |run, at| {
        backing.write_at(run, header.data_offset + r.checkpoint + at)
    })
    .and_then(|()| backing.sync_rewritten())
    .map_err(io_err(path))?;
    header.advance_reencrypt(r.checkpoint + window.len() as u64);
    store::write_header(backing, header).map_err(io_err(path))
}

/// The last step of opening either role: O_DIRECT if asked, the cipher,
/// the data area.
fn ready(
    name: &str,
    path: &Path,
    mut backing: Backing,
    header: &Header,
    (dek, inner): (&Dek, Option<&Dek>),
    direct: bool,
) -> Result<Volume, VolumeError> {
    if direct {
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
    let data = DataArea::new(backing, cipher, header.size, header.data_offset);
    Ok(Volume {
        name: name.to_owned(),
        role: header.role,
        data: std::sync::Arc::new(data),
    })
}

/// Opens a temp volume: recreates the backing with a fresh in-memory DEK.
/// Refuses a backing that holds a cache volume or foreign data, so a config
/// typo cannot wipe a persistent disk.
pub fn open_temp(
    name: &str,
    path: &Path,
    geometry: Geometry,
    direct: bool,
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
    let mut header = new_header(geometry, Role::Temp);
    lay_out(path, &backing, &mut header)?;
    // A block device or remote export is not emptied like a file: zero its
    // data area (BLKZEROOUT, WRITE_ZEROES where offered), so last run's
    // ciphertext, unreadable under the new key, reads as zeros, not garbage.
    if backing.is_fixed_size() {
        backing
            .zero_range(header.data_offset, header.size)
            .map_err(io_err(path))?;
    }
    let dek = Dek::generate().map_err(VolumeError::Random)?;
    ready(name, path, backing, &header, (&dek, None), direct)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::LocalKek;

    /// A crash in the middle of a window's in-place write, made by hand:
    /// the hash journal records the window's old ciphertext, half of its
    /// sectors already hold the new. Opening finishes the window (only the
    /// old half is re-encrypted), moves the checkpoint past it, and every
    /// sector reads back as written; holes stay holes.
    #[test]
    fn hash_journal_replay_finishes_a_torn_window() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::init(&dir.path().join("kek.key")).unwrap();
        let path = dir.path().join("v.img");
        let sector = 4096usize;
        let geometry = Geometry {
            size: 16 * sector as u64,
            sector_size: sector as u32,
        };
        let mut header = create(&path, geometry, &kek, None, false).unwrap();
        let backing = Backing::open(&path).unwrap();
        let old_dek = kek
            .unwrap(&header.active_slot(Layer::Outer).unwrap().wrapped)
            .unwrap();
        let new_dek = Dek::generate().unwrap();
        let old = VolumeCipher::new(&old_dek, None, InnerCipher::AesXts, sector);
        let new = VolumeCipher::new(&new_dek, None, InnerCipher::AesXts, sector);

        // Sectors 0..8 hold data under the old key, 8..10 are holes.
        let mut plain = vec![0u8; 10 * sector];
        getrandom::fill(&mut plain[..8 * sector]).unwrap();
        let mut disk = plain.clone();
        old.encrypt(&mut disk[..8 * sector], 0);
        backing.write_at(&disk, header.data_offset).unwrap();

        // Re-encryption of the window 0..10 sectors began: journal, then
        // sectors 0..4 rewritten in place, then the crash.
        header.keyslots.push(Keyslot {
            generation: 2,
            layer: Layer::Outer,
            wrapped: kek.wrap(&new_dek).unwrap(),
        });
        header.reencrypt = Some(header::Reencrypt {
            checkpoint: 0,
            target_generation: 2,
        });
        store::write_header(&backing, &mut header).unwrap();
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
        journal::write_hashes(&backing, key, sector as u32, &hashes).unwrap();
        let mut half = disk[..4 * sector].to_vec();
        old.decrypt(&mut half, 0);
        new.encrypt(&mut half, 0);
        backing.write_at(&half, header.data_offset).unwrap();
        drop(backing);

        let (volume, opened) = open_cache("v", &path, None, &kek, None, false).unwrap();
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
        let created = create(&path, geometry, &kek, None, false).unwrap();
        let (volume, _) = open_cache("v", &path, None, &kek, None, false).unwrap();
        let busy = |e: VolumeError| match e {
            VolumeError::Io { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::ResourceBusy, "{source}")
            }
            other => panic!("expected a busy backing, got {other}"),
        };
        busy(create(&path, geometry, &kek, None, true).unwrap_err());
        busy(open_cache("v", &path, None, &kek, None, false).unwrap_err());
        busy(open_temp("t", &path, geometry, false).unwrap_err());
        match backup::erase(&path).unwrap_err() {
            backup::BackupError::Volume(e) => busy(e),
            other => panic!("expected a busy backing, got {other}"),
        }
        let header = current_header(&path, &read_headers(&path).unwrap()).unwrap();
        assert_eq!(header.uuid, created.uuid, "nothing was rewritten");
        match backup::restore(&path, &header, true).unwrap_err() {
            backup::BackupError::Volume(e) => busy(e),
            other => panic!("expected a busy backing, got {other}"),
        }
        drop(volume);
        open_cache("v", &path, None, &kek, None, false).unwrap();
    }
}
