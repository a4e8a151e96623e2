//! Header backup, restore and crypto-erase, as cryptsetup's
//! `luksHeaderBackup`, `luksHeaderRestore` and `erase` do for LUKS.
//!
//! A backup file is a 16-byte magic and the current header as encoded on
//! disk: wrapped DEKs and their KEK references, never a plaintext key, so it
//! is as safe to keep as the header itself (and as useless without the
//! KEK). Restore writes it through the two-copy protocol (`store.rs`),
//! sealed with keys derived from the DEKs the caller unwrapped (`auth.rs`;
//! a backup of a version 1 or 2 header comes back as version 3), and
//! checked against and then written to the volume's anti-rollback record
//! (`record.rs`).
//! Erase overwrites both header copies and the journal: the data area stays
//! but no key to it does. Which provider must unwrap a restored key before
//! it is written is the caller's (the CLI's) to check; the checks here are
//! the ones the bytes alone allow.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::auth::{self, AuthError, HeaderKeys};
use super::header::{Header, HEADER_SIZE};
use super::record::{RecordError, VolumeRecord};
use super::store::{write_header, HeaderCopies, DATA_OFFSET};
use super::{current_header, guard, io_err, open_existing, VolumeError};

const MAGIC: &[u8; 16] = b"HOSTCRYPT-HDRBK1";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a hostcrypt header backup ({reason})")]
    NotABackup { path: PathBuf, reason: String },
    #[error("{backing} holds volume {on_disk}, the backup is of volume {in_backup}; pass --force to put it there anyway")]
    OtherVolume {
        backing: PathBuf,
        on_disk: Uuid,
        in_backup: Uuid,
    },
    #[error("{backing}: the backup does not belong to the keys that unwrap it: {source}; nothing was written")]
    Forged {
        backing: PathBuf,
        #[source]
        source: AuthError,
    },
    #[error("{backing}: the backup was taken during a re-encryption; restore a backup taken before or after it. Nothing was written")]
    Reencrypting { backing: PathBuf },
    #[error(
        "{source}. Pass --force to restore it anyway (the record then follows the restored header)"
    )]
    Record {
        #[source]
        source: RecordError,
    },
    #[error("{backing}: the data is under DEK generation {on_disk}, the backup's key is generation {in_backup} (a re-encryption ran since the backup); restoring it would leave the data unreadable. Pass --force only if you know the data area matches the backup")]
    OtherGeneration {
        backing: PathBuf,
        on_disk: u32,
        in_backup: u32,
    },
}

/// Writes the current header of `backing` to a new file `out` (mode 0600;
/// an existing file is not overwritten).
pub fn backup(backing: &Path, out: &Path) -> Result<Header, BackupError> {
    let copies = super::read_headers(backing)?;
    let header = current_header(backing, &copies)?;
    let raw = header.encode().map_err(|e| VolumeError::Io {
        path: backing.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let file_err = |source| BackupError::File {
        path: out.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(file_err)?;
    let written = file
        .write_all(MAGIC)
        .and_then(|()| file.write_all(&raw[..]))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        // A partial backup is no backup, and would block the retry.
        drop(file);
        let _ = std::fs::remove_file(out);
        return Err(file_err(e));
    }
    Ok(header)
}

/// Reads and decodes a backup file.
pub fn read_backup(file: &Path) -> Result<Header, BackupError> {
    let raw = std::fs::read(file).map_err(|source| BackupError::File {
        path: file.to_owned(),
        source,
    })?;
    let not = |reason: String| BackupError::NotABackup {
        path: file.to_owned(),
        reason,
    };
    if raw.len() != MAGIC.len() + HEADER_SIZE || !raw.starts_with(MAGIC) {
        return Err(not(format!("{} bytes, no backup magic", raw.len())));
    }
    Header::decode(&raw[MAGIC.len()..]).map_err(|e| not(e.to_string()))
}

/// Writes `header` (from a backup) to both header copies of `backing`,
/// sealed with `keys` (derived by the caller from the DEKs it unwrapped
/// with a configured KEK). Refuses another volume's header, a key
/// generation the data is no longer under, or one the volume's
/// anti-rollback `record` calls a rollback, unless `force`.
pub fn restore(
    backing: &Path,
    header: &Header,
    keys: &HeaderKeys,
    record: Option<&VolumeRecord>,
    force: bool,
) -> Result<(), BackupError> {
    if header.reencrypt.is_some() {
        return Err(BackupError::Reencrypting {
            backing: backing.to_owned(),
        });
    }
    if header.auth.is_some() {
        auth::verify(header, &keys.current).map_err(|source| BackupError::Forged {
            backing: backing.to_owned(),
            source,
        })?;
    }
    let disk = open_existing(backing)?;
    guard::refuse_if_served_remotely(backing, &disk)?;
    let copies = HeaderCopies::read(&disk).map_err(io_err(backing))?;
    let on_disk = copies.current().cloned();
    if let (Some(current), false) = (&on_disk, force) {
        if current.uuid != header.uuid {
            return Err(BackupError::OtherVolume {
                backing: backing.to_owned(),
                on_disk: current.uuid,
                in_backup: header.uuid,
            });
        }
        if current.dek_generation != header.dek_generation || current.reencrypt.is_some() {
            return Err(BackupError::OtherGeneration {
                backing: backing.to_owned(),
                on_disk: current.dek_generation,
                in_backup: header.dek_generation,
            });
        }
    }
    let recorded = match record {
        Some(r) => r.load().map_err(VolumeError::from)?.map(|r| r.sequence),
        None => None,
    };
    let mut restored = header.clone();
    // The backup's owner record is history; nobody serves the volume now.
    restored.owner = None;
    // Newer than anything on disk or recorded, so the restored copy wins
    // on open and is no sequence rollback; a generation rollback is still
    // one (checked below).
    let newest = [&copies.primary, &copies.backup]
        .iter()
        .filter_map(|c| c.as_ref().ok().map(|h| h.sequence))
        .chain(recorded)
        .max()
        .unwrap_or(0);
    restored.sequence = restored.sequence.max(newest);
    if let Some(record) = record {
        // What the header will be once written: sequence bumped, sealed.
        let mut sealed = restored.clone();
        sealed.sequence += 1;
        keys.seal(&mut sealed).map_err(|e| VolumeError::Io {
            path: backing.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        match record.check(&sealed) {
            Ok(()) => {}
            Err(source @ RecordError::Refused { .. }) if !force => {
                return Err(BackupError::Record { source })
            }
            Err(RecordError::Refused { .. }) => {}
            Err(e) => return Err(VolumeError::from(e).into()),
        }
    }
    write_header(&disk, &mut restored, keys).map_err(io_err(backing))?;
    if let Some(record) = record {
        record.save(&restored).map_err(VolumeError::from)?;
    }
    Ok(())
}

/// Crypto-erase: overwrites both header copies and the journal (the first
/// `DATA_OFFSET` bytes) with zeros and syncs. Returns the erased volume's
/// UUID. The data area is left as it is: without a header backup and the
/// KEK it cannot be decrypted.
/// With `take_over`, a remote backing whose owner record was never
/// released is erased too (the escape when that owner is gone for good).
pub fn erase(backing: &Path, take_over: bool) -> Result<Uuid, BackupError> {
    let disk = open_existing(backing)?;
    if !take_over {
        guard::refuse_if_served_remotely(backing, &disk)?;
    }
    let copies = HeaderCopies::read(&disk).map_err(io_err(backing))?;
    let header = current_header(backing, &copies)?;
    disk.write_at(&vec![0u8; DATA_OFFSET as usize], 0)
        .map_err(io_err(backing))?;
    disk.sync_rewritten().map_err(io_err(backing))?;
    Ok(header.uuid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;
    use crate::volume::auth::GenerationKeys;
    use crate::volume::header::tests::sample;

    fn keys(header: &Header, dek: &Dek) -> HeaderKeys {
        HeaderKeys {
            current: GenerationKeys::derive(header.uuid, header.dek_generation, dek, None),
            target: None,
        }
    }

    fn volume(dir: &Path, name: &str, mut header: Header, dek: &Dek) -> PathBuf {
        let path = dir.join(name);
        let b = crate::io::Backing::open_or_create(&path).unwrap();
        b.set_len(DATA_OFFSET * 2).unwrap();
        let keys = keys(&header, dek);
        write_header(&b, &mut header, &keys).unwrap();
        path
    }

    #[test]
    fn backup_restores_both_copies_and_refuses_other_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let dek = Dek::generate().unwrap();
        let path = volume(dir.path(), "v.img", sample(), &dek);
        let file = dir.path().join("v.hdr");
        let saved = backup(&path, &file).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            backup(&path, &file).is_err(),
            "an existing backup is not overwritten"
        );

        let uuid = erase(&path, false).unwrap();
        assert_eq!(uuid, saved.uuid);
        assert!(super::super::read_headers(&path).unwrap().is_foreign());
        assert!(erase(&path, false).is_err(), "nothing left to erase");

        let header = read_backup(&file).unwrap();
        let k = keys(&header, &dek);
        let wrong = keys(&header, &Dek::generate().unwrap());
        assert!(matches!(
            restore(&path, &header, &wrong, None, false),
            Err(BackupError::Forged { .. })
        ));
        restore(&path, &header, &k, None, false).unwrap();
        let copies = super::super::read_headers(&path).unwrap();
        assert!(copies.damage().is_none());
        assert_eq!(copies.current().unwrap().uuid, saved.uuid);

        let mut other = sample();
        other.uuid = Uuid::new_v4();
        let other_path = volume(dir.path(), "w.img", other, &dek);
        assert!(matches!(
            restore(&other_path, &header, &k, None, false),
            Err(BackupError::OtherVolume { .. })
        ));
        restore(&other_path, &header, &k, None, true).unwrap();

        std::fs::write(&file, b"not a backup").unwrap();
        assert!(matches!(
            read_backup(&file),
            Err(BackupError::NotABackup { .. })
        ));
    }

    /// A hostile backup file: stripped of its MAC (as a version-2 backup
    /// would be) and carrying a DEK of the attacker's own for the same
    /// generation. The volume's anti-rollback record knows that
    /// generation's key check, so the restore is refused and the backing
    /// keeps its bytes.
    #[test]
    fn a_backup_stripped_of_its_mac_with_another_dek_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dek = Dek::generate().unwrap();
        let path = volume(dir.path(), "v.img", sample(), &dek);
        let genuine =
            super::super::current_header(&path, &super::super::read_headers(&path).unwrap())
                .unwrap();
        let record = super::super::record::Records::new(&dir.path().join("state")).volume("v");
        record.save(&genuine).unwrap();
        let before = std::fs::read(&path).unwrap();

        let mut forged = genuine.clone();
        forged.auth = None;
        let theirs = keys(&forged, &Dek::generate().unwrap());
        assert!(matches!(
            restore(&path, &forged, &theirs, Some(&record), false),
            Err(BackupError::Record { .. })
        ));
        assert!(
            std::fs::read(&path).unwrap() == before,
            "the backing changed"
        );
    }
}
