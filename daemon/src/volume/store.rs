//! Where the two header copies live and how they are read, chosen, repaired
//! and updated so that a crash at any instant leaves a valid header.
//!
//! The primary copy is at byte 0, the backup at 256 KiB: far enough apart that
//! a stray write to the start of the device (a mistaken `mkfs`, a partition
//! table) rarely takes both. An update bumps the sequence number and writes
//! the primary, syncs, then writes the backup and syncs; whichever copy a
//! crash tears, the other is valid, and on open the valid copy with the
//! highest sequence number wins. Every header written is sealed (its MAC
//! set, `auth.rs`) after the sequence is bumped; a repair copies the
//! current copy's bytes, MAC and all. Encoding lives in `header.rs`.

use std::io;

use super::auth::HeaderKeys;
use super::header::{Header, HeaderError, HEADER_SIZE};
use crate::io::Backing;

pub const PRIMARY_AT: u64 = 0;
pub const BACKUP_AT: u64 = 256 * 1024;
/// Start of the data area: 1 MiB, aligned for O_DIRECT and large sectors.
pub const DATA_OFFSET: u64 = 1024 * 1024;

/// Both copies as found on disk, and the one chosen.
#[derive(Debug, Clone)]
pub struct HeaderCopies {
    pub primary: Result<Header, HeaderError>,
    pub backup: Result<Header, HeaderError>,
}

impl HeaderCopies {
    pub fn read(backing: &Backing) -> io::Result<Self> {
        let mut raw = vec![0u8; HEADER_SIZE];
        backing.read_at(&mut raw, PRIMARY_AT)?;
        let primary = Header::decode(&raw);
        backing.read_at(&mut raw, BACKUP_AT)?;
        let backup = Header::decode(&raw);
        Ok(HeaderCopies { primary, backup })
    }

    /// True when neither copy even carries the magic: not a hostcrypt volume.
    pub fn is_foreign(&self) -> bool {
        matches!(
            (&self.primary, &self.backup),
            (Err(HeaderError::NoMagic), Err(HeaderError::NoMagic))
        )
    }

    /// The newest valid copy, if any.
    pub fn current(&self) -> Option<&Header> {
        match (&self.primary, &self.backup) {
            (Ok(p), Ok(b)) => Some(if b.sequence > p.sequence { b } else { p }),
            (Ok(p), Err(_)) => Some(p),
            (Err(_), Ok(b)) => Some(b),
            (Err(_), Err(_)) => None,
        }
    }

    /// What is wrong with the copies that the current one should overwrite,
    /// for a log line; `None` when both are valid and equal.
    pub fn damage(&self) -> Option<String> {
        let current = self.current()?;
        let describe = |which: &str, copy: &Result<Header, HeaderError>| match copy {
            Err(e) => Some(format!("{which} header copy is invalid ({e})")),
            Ok(h) if h != current => Some(format!(
                "{which} header copy is stale (sequence {} < {})",
                h.sequence, current.sequence
            )),
            Ok(_) => None,
        };
        let parts: Vec<String> = [
            describe("primary", &self.primary),
            describe("backup", &self.backup),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// Rewrites any damaged or stale copy from the current one.
    pub fn repair(&self, backing: &Backing) -> io::Result<()> {
        let Some(current) = self.current() else {
            return Ok(());
        };
        let raw = current
            .encode()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        for (copy, at) in [(&self.primary, PRIMARY_AT), (&self.backup, BACKUP_AT)] {
            if copy.as_ref().ok() != Some(current) {
                backing.write_durably(|| backing.write_at(&raw[..], at))?;
            }
        }
        Ok(())
    }
}

/// Writes `header` with its sequence number bumped and sealed with `keys`,
/// primary then backup, syncing after each, so a crash leaves one valid
/// copy.
pub fn write_header(backing: &Backing, header: &mut Header, keys: &HeaderKeys) -> io::Result<()> {
    write_header_copies(backing, header, keys).map_err(|e| e.source)
}

/// A header write that failed, and whether the primary copy was already
/// durable when it did. A durable primary is the newest valid copy, so it
/// is what every later open reads: the change has taken effect, and only
/// the backup copy is stale (repaired at the next open, or the next write).
#[derive(Debug)]
pub struct HeaderWriteError {
    pub primary_durable: bool,
    pub source: io::Error,
}

impl HeaderWriteError {
    fn before_primary(source: io::Error) -> Self {
        HeaderWriteError {
            primary_durable: false,
            source,
        }
    }
}

/// `write_header`, telling a failure before the primary copy was durable
/// (nothing changed) from one after (the change took effect).
pub fn write_header_copies(
    backing: &Backing,
    header: &mut Header,
    keys: &HeaderKeys,
) -> Result<(), HeaderWriteError> {
    header.sequence = header
        .sequence
        .checked_add(1)
        .ok_or_else(|| io::Error::other("header sequence number exhausted"))
        .map_err(HeaderWriteError::before_primary)?;
    keys.seal(header)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        .map_err(HeaderWriteError::before_primary)?;
    write_copies(backing, header)
}

/// Writes a header as it is (unsealed: version 1 or 2), for tests that
/// need one as an older daemon left it.
#[cfg(test)]
pub(crate) fn write_legacy(backing: &Backing, header: &mut Header) -> io::Result<()> {
    header.auth = None;
    write_as_is(backing, header)
}

/// Writes a header with whatever authentication it carries, as an
/// attacker who can compute checksums but not MACs would.
#[cfg(test)]
pub(crate) fn write_as_is(backing: &Backing, header: &mut Header) -> io::Result<()> {
    header.sequence += 1;
    write_copies(backing, header).map_err(|e| e.source)
}

fn write_copies(backing: &Backing, header: &Header) -> Result<(), HeaderWriteError> {
    let failed = |primary_durable| {
        move |source| HeaderWriteError {
            primary_durable,
            source,
        }
    };
    let raw = header
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        .map_err(failed(false))?;
    backing
        .write_durably(|| backing.write_at(&raw[..], PRIMARY_AT))
        .map_err(failed(false))?;
    backing
        .write_durably(|| backing.write_at(&raw[..], BACKUP_AT))
        .map_err(failed(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::header::tests::sample;

    fn backing() -> (tempfile::TempDir, Backing) {
        let dir = tempfile::tempdir().unwrap();
        let b = Backing::open_or_create(&dir.path().join("b.img")).unwrap();
        b.set_len(DATA_OFFSET).unwrap();
        (dir, b)
    }

    #[test]
    fn newest_valid_copy_wins_and_repair_restores_both() {
        let (_d, b) = backing();
        let mut h = sample();
        write_legacy(&b, &mut h).unwrap();
        // Simulate a crash after the primary of the next update was written.
        let mut newer = h.clone();
        newer.sequence += 1;
        newer.size *= 2;
        b.write_at(&newer.encode().unwrap()[..], PRIMARY_AT)
            .unwrap();
        let copies = HeaderCopies::read(&b).unwrap();
        assert_eq!(copies.current(), Some(&newer));
        assert!(copies
            .damage()
            .unwrap()
            .contains("backup header copy is stale"));
        copies.repair(&b).unwrap();
        let again = HeaderCopies::read(&b).unwrap();
        assert!(again.damage().is_none());
        assert_eq!(again.backup.unwrap(), newer);
    }

    #[test]
    fn torn_primary_falls_back_to_backup() {
        let (_d, b) = backing();
        let mut h = sample();
        write_legacy(&b, &mut h).unwrap();
        b.write_at(&[0xff; 100], PRIMARY_AT + 50).unwrap();
        let copies = HeaderCopies::read(&b).unwrap();
        assert_eq!(copies.current(), Some(&h));
        assert!(copies
            .damage()
            .unwrap()
            .contains("primary header copy is invalid"));
    }

    #[test]
    fn empty_file_is_foreign_and_has_no_header() {
        let (_d, b) = backing();
        let copies = HeaderCopies::read(&b).unwrap();
        assert!(copies.is_foreign());
        assert!(copies.current().is_none());
    }
}
