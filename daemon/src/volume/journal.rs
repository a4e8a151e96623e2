//! The re-encryption journal: what makes an online re-encryption survive a
//! crash at any instant. Before a window of the data area is rewritten in
//! place, its new ciphertext goes here, with a checksummed record of which
//! window it is, and is synced. If the daemon dies while the window is being
//! rewritten, the next open finds a valid journal for the header's
//! checkpoint and copies it into place (idempotent), so no sector is left
//! half-way between two keys. A journal for any other checkpoint, volume or
//! target generation is stale and ignored.
//!
//! It lives in the unused space between the backup header and the data area
//! (512 KiB .. 772 KiB):
//!
//! ```text
//! off  len  field
//!   0    8  magic "HCJRNL\x00\x01"
//!   8   16  volume UUID
//!  24    8  checkpoint (data-area byte offset of the window)
//!  32    8  window length
//!  40    4  target DEK generation
//!  44   32  SHA-256 of the window's data
//!  76   32  SHA-256 of bytes 0..76
//! 4096   …  the window's new ciphertext
//! ```
//! The data is ciphertext under the target key: the journal holds nothing
//! an attacker without that key could use. Window movement is `reencrypt.rs`.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::io::Backing;

const MAGIC: [u8; 8] = *b"HCJRNL\x00\x01";
/// Where the journal record starts in the backing.
pub const JOURNAL_AT: u64 = 512 * 1024;
const RECORD: usize = 4096;
/// The largest window the journal holds.
pub const WINDOW: u64 = 256 * 1024;

/// Which window a journal record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalKey {
    pub uuid: Uuid,
    pub checkpoint: u64,
    pub target_generation: u32,
}

fn record(key: JournalKey, data: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; RECORD];
    r[..8].copy_from_slice(&MAGIC);
    r[8..24].copy_from_slice(key.uuid.as_bytes());
    r[24..32].copy_from_slice(&key.checkpoint.to_le_bytes());
    r[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes());
    r[40..44].copy_from_slice(&key.target_generation.to_le_bytes());
    r[44..76].copy_from_slice(&Sha256::digest(data));
    let sum = Sha256::digest(&r[..76]);
    r[76..108].copy_from_slice(&sum);
    r
}

/// Writes the window's new ciphertext and its record, and syncs.
pub fn write(backing: &Backing, key: JournalKey, data: &[u8]) -> std::io::Result<()> {
    if data.len() as u64 > WINDOW {
        return Err(std::io::Error::other(
            "re-encryption window larger than the journal",
        ));
    }
    backing.write_at(data, JOURNAL_AT + RECORD as u64)?;
    backing.write_at(&record(key, data), JOURNAL_AT)?;
    backing.sync()
}

/// Allocates the journal area (zeros) before a re-encryption starts, so a
/// full filesystem refuses the start instead of failing a window midway.
pub fn prepare(backing: &Backing) -> std::io::Result<()> {
    backing.write_at(&vec![0u8; RECORD + WINDOW as usize], JOURNAL_AT)?;
    backing.sync()
}

/// Invalidates the record (after a failed journal write, before the window
/// is released), and syncs. Touches only the magic, in a block that is
/// already allocated, so it works on a full filesystem.
pub fn clear(backing: &Backing) -> std::io::Result<()> {
    let mut magic = [0u8; 8];
    backing.read_at(&mut magic, JOURNAL_AT)?;
    if magic != MAGIC {
        return Ok(());
    }
    backing.write_at(&[0u8; 8], JOURNAL_AT)?;
    backing.sync()
}

/// The journalled window for `key`, if a complete, matching record is there.
pub fn read(backing: &Backing, key: JournalKey) -> std::io::Result<Option<Vec<u8>>> {
    let mut r = vec![0u8; RECORD];
    backing.read_at(&mut r, JOURNAL_AT)?;
    if r[..8] != MAGIC || Sha256::digest(&r[..76])[..] != r[76..108] {
        return Ok(None);
    }
    let field = |at: usize| u64::from_le_bytes(r[at..at + 8].try_into().unwrap_or([0; 8]));
    let found = JournalKey {
        uuid: Uuid::from_slice(&r[8..24]).unwrap_or_default(),
        checkpoint: field(24),
        target_generation: u32::from_le_bytes(r[40..44].try_into().unwrap_or([0; 4])),
    };
    let len = field(32);
    if found != key || len > WINDOW {
        return Ok(None);
    }
    let mut data = vec![0u8; len as usize];
    backing.read_at(&mut data, JOURNAL_AT + RECORD as u64)?;
    if Sha256::digest(&data)[..] != r[44..76] {
        return Ok(None);
    }
    Ok(Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_complete_matching_record_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let backing = Backing::open_or_create(&dir.path().join("b")).unwrap();
        backing.set_len(2 << 20).unwrap();
        let key = JournalKey {
            uuid: Uuid::new_v4(),
            checkpoint: 3 * WINDOW,
            target_generation: 2,
        };
        assert_eq!(read(&backing, key).unwrap(), None);
        let data = vec![0x5a; WINDOW as usize];
        write(&backing, key, &data).unwrap();
        assert_eq!(read(&backing, key).unwrap().as_deref(), Some(&data[..]));
        let other = JournalKey {
            checkpoint: 0,
            ..key
        };
        assert_eq!(read(&backing, other).unwrap(), None);
        clear(&backing).unwrap();
        assert_eq!(read(&backing, key).unwrap(), None);
        write(&backing, key, &data).unwrap();
        // A torn data write (checksum mismatch) is not replayed.
        backing
            .write_at(&[0u8; 16], JOURNAL_AT + RECORD as u64 + 100)
            .unwrap();
        assert_eq!(read(&backing, key).unwrap(), None);
    }
}
