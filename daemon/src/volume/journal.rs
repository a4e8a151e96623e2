//! The re-encryption journal: what makes an online re-encryption survive a
//! crash at any instant. Before a window of the data area is rewritten in
//! place, a hash of every sector's *old* ciphertext goes here, with a
//! checksummed record of which window it is, and is synced (the "checksum"
//! resilience mode of LUKS2). If the daemon dies while the window is being
//! rewritten, the next open reads each sector of the window: one whose hash
//! is still the old one is re-encrypted, any other already holds the new
//! ciphertext (a sector is written whole: sectors are page-aligned and at
//! most a page). Hashes instead of the data itself let a window be many MiB
//! with the same crash safety: 32 bytes per sector, so the 512 KiB area
//! covers up to 63.5 MiB of 4 KiB sectors. A journal for any other
//! checkpoint, volume or target generation is stale and ignored.
//!
//! Older versions journalled the window's new ciphertext itself (record
//! magic `HCJRNL\x00\x01`); such a journal, left by a crash before an
//! upgrade, is still replayed.
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
const HASH_MAGIC: [u8; 8] = *b"HCJRNL\x00\x02";
/// Where the journal record starts in the backing.
pub const JOURNAL_AT: u64 = 512 * 1024;
/// The journal area: up to the data area at 1 MiB.
pub const JOURNAL_SIZE: u64 = 512 * 1024;
const RECORD: usize = 4096;
/// The largest window the legacy (data) journal held.
pub const WINDOW: u64 = 256 * 1024;
/// How many sector hashes the journal holds.
pub const HASH_CAPACITY: usize = (JOURNAL_SIZE as usize - RECORD) / 32;

/// The hash the journal keeps of one sector's old ciphertext: SHA-256 of
/// its first cipher block. That is enough to tell old ciphertext from new
/// (a new key changes every block; two random 16-byte blocks collide with
/// probability 2^-128) under the whole-sector writes the journal assumes
/// anyway, and hashing 16 bytes instead of the sector removed a third of a
/// window's time (BENCHMARKS.md).
pub fn sector_hash(sector: &[u8]) -> [u8; 32] {
    Sha256::digest(&sector[..sector.len().min(16)]).into()
}

/// Writes the hashes of a window's old sectors and their record, and syncs.
pub fn write_hashes(
    backing: &Backing,
    key: JournalKey,
    sector_size: u32,
    hashes: &[[u8; 32]],
) -> std::io::Result<()> {
    if hashes.len() > HASH_CAPACITY {
        return Err(std::io::Error::other(
            "re-encryption window larger than the journal",
        ));
    }
    let table: Vec<u8> = hashes.iter().flatten().copied().collect();
    let mut r = vec![0u8; RECORD];
    r[..8].copy_from_slice(&HASH_MAGIC);
    r[8..24].copy_from_slice(key.uuid.as_bytes());
    r[24..32].copy_from_slice(&key.checkpoint.to_le_bytes());
    r[32..40].copy_from_slice(&(hashes.len() as u64 * u64::from(sector_size)).to_le_bytes());
    r[40..44].copy_from_slice(&key.target_generation.to_le_bytes());
    r[44..48].copy_from_slice(&sector_size.to_le_bytes());
    r[48..80].copy_from_slice(&Sha256::digest(&table));
    let sum = Sha256::digest(&r[..80]);
    r[80..112].copy_from_slice(&sum);
    backing.write_durably(|| {
        backing.write_at(&table, JOURNAL_AT + RECORD as u64)?;
        backing.write_at(&r, JOURNAL_AT)
    })
}

/// The sector size and old-sector hashes journalled for `key`, if a
/// complete, matching hash record is there.
pub fn read_hashes(
    backing: &Backing,
    key: JournalKey,
) -> std::io::Result<Option<(u32, Vec<[u8; 32]>)>> {
    let Some((r, found, len)) = read_record(backing, &HASH_MAGIC, 80)? else {
        return Ok(None);
    };
    let sector_size = u32::from_le_bytes(r[44..48].try_into().unwrap_or([0; 4]));
    if found != key || sector_size == 0 || len % u64::from(sector_size) != 0 {
        return Ok(None);
    }
    let count = (len / u64::from(sector_size)) as usize;
    if count > HASH_CAPACITY {
        return Ok(None);
    }
    let mut table = vec![0u8; count * 32];
    backing.read_at(&mut table, JOURNAL_AT + RECORD as u64)?;
    if Sha256::digest(&table)[..] != r[48..80] {
        return Ok(None);
    }
    let hashes = table
        .chunks_exact(32)
        .map(|c| c.try_into().unwrap_or([0; 32]))
        .collect();
    Ok(Some((sector_size, hashes)))
}

/// Which window a journal record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalKey {
    pub uuid: Uuid,
    pub checkpoint: u64,
    pub target_generation: u32,
}

#[cfg(test)]
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

/// Writes a legacy journal (a window's new ciphertext and its record):
/// only tests make one now, to prove it is still replayed.
#[cfg(test)]
pub fn write(backing: &Backing, key: JournalKey, data: &[u8]) -> std::io::Result<()> {
    if data.len() as u64 > WINDOW {
        return Err(std::io::Error::other(
            "re-encryption window larger than the journal",
        ));
    }
    backing.write_durably(|| {
        backing.write_at(data, JOURNAL_AT + RECORD as u64)?;
        backing.write_at(&record(key, data), JOURNAL_AT)
    })
}

/// Allocates the journal area (zeros) before a re-encryption starts, so a
/// full filesystem refuses the start instead of failing a window midway.
pub fn prepare(backing: &Backing) -> std::io::Result<()> {
    let zeros = vec![0u8; JOURNAL_SIZE as usize];
    backing.write_durably(|| backing.write_at(&zeros, JOURNAL_AT))
}

/// Invalidates the record (after a failed journal write, before the window
/// is released), and syncs. Touches only the magic, in a block that is
/// already allocated, so it works on a full filesystem.
pub fn clear(backing: &Backing) -> std::io::Result<()> {
    let mut magic = [0u8; 8];
    backing.read_at(&mut magic, JOURNAL_AT)?;
    if magic != MAGIC && magic != HASH_MAGIC {
        return Ok(());
    }
    backing.write_durably(|| backing.write_at(&[0u8; 8], JOURNAL_AT))
}

/// The record at the start of the journal if it has `magic` and its
/// checksum (SHA-256 of bytes `0..summed`, stored right after) holds: the
/// raw record, which window it names, and the window's length.
fn read_record(
    backing: &Backing,
    magic: &[u8; 8],
    summed: usize,
) -> std::io::Result<Option<(Vec<u8>, JournalKey, u64)>> {
    let mut r = vec![0u8; RECORD];
    backing.read_at(&mut r, JOURNAL_AT)?;
    if r[..8] != magic[..] || Sha256::digest(&r[..summed])[..] != r[summed..summed + 32] {
        return Ok(None);
    }
    let field = |at: usize| u64::from_le_bytes(r[at..at + 8].try_into().unwrap_or([0; 8]));
    let key = JournalKey {
        uuid: Uuid::from_slice(&r[8..24]).unwrap_or_default(),
        checkpoint: field(24),
        target_generation: u32::from_le_bytes(r[40..44].try_into().unwrap_or([0; 4])),
    };
    let len = field(32);
    Ok(Some((r, key, len)))
}

/// The journalled window for `key`, if a complete, matching record is there.
pub fn read(backing: &Backing, key: JournalKey) -> std::io::Result<Option<Vec<u8>>> {
    let Some((r, found, len)) = read_record(backing, &MAGIC, 76)? else {
        return Ok(None);
    };
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
    fn hash_records_round_trip_and_stale_or_torn_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let backing = Backing::open_or_create(&dir.path().join("b")).unwrap();
        backing.set_len(2 << 20).unwrap();
        prepare(&backing).unwrap();
        let key = JournalKey {
            uuid: Uuid::new_v4(),
            checkpoint: 64 << 20,
            target_generation: 3,
        };
        let hashes: Vec<[u8; 32]> = (0..HASH_CAPACITY)
            .map(|i| sector_hash(&i.to_le_bytes()))
            .collect();
        write_hashes(&backing, key, 4096, &hashes).unwrap();
        assert_eq!(
            read_hashes(&backing, key).unwrap(),
            Some((4096, hashes.clone()))
        );
        assert_eq!(read(&backing, key).unwrap(), None, "not a data journal");
        let stale = JournalKey {
            target_generation: 2,
            ..key
        };
        assert_eq!(read_hashes(&backing, stale).unwrap(), None);
        assert!(write_hashes(&backing, key, 4096, &vec![[0; 32]; HASH_CAPACITY + 1]).is_err());
        backing
            .write_at(&[1u8; 8], JOURNAL_AT + RECORD as u64 + 64)
            .unwrap();
        assert_eq!(read_hashes(&backing, key).unwrap(), None, "torn table");
        write_hashes(&backing, key, 4096, &hashes).unwrap();
        clear(&backing).unwrap();
        assert_eq!(read_hashes(&backing, key).unwrap(), None);
    }

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
