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
//! A record is authenticated: HMAC-SHA256 over its fields (which hold the
//! hash of the hash table) under the journal key of the active DEK
//! generation (`auth.rs`). A record for the header's window whose MAC does
//! not verify, or an unauthenticated one of an older format (magic
//! `HCJRNL\x00\x02`, hashes; `HCJRNL\x00\x01`, the window's new
//! ciphertext itself), is refused, not replayed: it would steer which
//! sectors change key and how far the checkpoint moves.
//!
//! It lives in the unused space between the backup header and the data area
//! (512 KiB .. 772 KiB):
//!
//! ```text
//! off  len  field
//!   0    8  magic "HCJRNL\x00\x03"
//!   8   16  volume UUID
//!  24    8  checkpoint (data-area byte offset of the window)
//!  32    8  window length
//!  40    4  target DEK generation
//!  44    4  sector size
//!  48   32  SHA-256 of the hash table
//!  80   32  SHA-256 of bytes 0..80
//! 112   32  HMAC-SHA256 of bytes 0..112 (journal key of the active generation)
//! 4096   …  the hash table: SHA-256 of each old sector's first block
//! ```
//! The data is ciphertext under the target key: the journal holds nothing
//! an attacker without that key could use. Window movement is `reencrypt.rs`.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::auth;
use crate::io::Backing;

const MAGIC: [u8; 8] = *b"HCJRNL\x00\x01";
const HASH_MAGIC: [u8; 8] = *b"HCJRNL\x00\x02";
const AUTH_MAGIC: [u8; 8] = *b"HCJRNL\x00\x03";

/// A journal record that matches the header's window but cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the re-encryption journal for the window at byte {checkpoint} {why}: it was not written by a holder of the volume's data key")]
    Forged { checkpoint: u64, why: &'static str },
}
/// Where the journal record starts in the backing.
pub const JOURNAL_AT: u64 = 512 * 1024;
/// The journal area: up to the data area at 1 MiB.
pub const JOURNAL_SIZE: u64 = 512 * 1024;
const RECORD: usize = 4096;
/// How many sector hashes the journal holds.
pub const HASH_CAPACITY: usize = (JOURNAL_SIZE as usize - RECORD) / 32;

/// The hash the journal keeps of one sector's old ciphertext: SHA-256 of
/// its first cipher block. That is enough to tell old ciphertext from new
/// (a new key changes every block; two random 16-byte blocks collide with
/// probability 2^-128) under the whole-sector writes the journal assumes
/// anyway, and hashing 16 bytes instead of the sector removed a third of a
/// window's time (benches/results/history.md, "Online re-encryption").
pub fn sector_hash(sector: &[u8]) -> [u8; 32] {
    Sha256::digest(&sector[..sector.len().min(16)]).into()
}

/// Writes the hashes of a window's old sectors and their record,
/// authenticated with `mac_key`, and syncs.
pub fn write_hashes(
    backing: &Backing,
    key: JournalKey,
    mac_key: &[u8; 32],
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
    r[..8].copy_from_slice(&AUTH_MAGIC);
    r[8..24].copy_from_slice(key.uuid.as_bytes());
    r[24..32].copy_from_slice(&key.checkpoint.to_le_bytes());
    r[32..40].copy_from_slice(&(hashes.len() as u64 * u64::from(sector_size)).to_le_bytes());
    r[40..44].copy_from_slice(&key.target_generation.to_le_bytes());
    r[44..48].copy_from_slice(&sector_size.to_le_bytes());
    r[48..80].copy_from_slice(&Sha256::digest(&table));
    let sum = Sha256::digest(&r[..80]);
    r[80..112].copy_from_slice(&sum);
    let tag = auth::mac(mac_key, &r[..112]);
    r[112..144].copy_from_slice(&tag);
    backing.write_durably(|| {
        backing.write_at(&table, JOURNAL_AT + RECORD as u64)?;
        backing.write_at(&r, JOURNAL_AT)
    })
}

/// A journalled window: its sector size and its old sectors' hashes.
pub type Hashes = (u32, Vec<[u8; 32]>);

/// The sector size and old-sector hashes journalled for `key`, if a
/// complete, matching, authenticated hash record is there. A matching
/// record that is not authenticated by `mac_key` is an error.
pub fn read_hashes(
    backing: &Backing,
    key: JournalKey,
    mac_key: &[u8; 32],
) -> Result<Option<Hashes>, JournalError> {
    let forged = |why| JournalError::Forged {
        checkpoint: key.checkpoint,
        why,
    };
    for (magic, summed) in [(&HASH_MAGIC, 80), (&MAGIC, 76)] {
        if let Some((_, found, _)) = read_record(backing, magic, summed)? {
            if found == key {
                return Err(forged("is of an unauthenticated format"));
            }
        }
    }
    let Some((r, found, len)) = read_record(backing, &AUTH_MAGIC, 80)? else {
        return Ok(None);
    };
    if found != key {
        return Ok(None);
    }
    if !auth::mac_ok(mac_key, &r[..112], &r[112..144]) {
        return Err(forged("has a MAC that does not verify"));
    }
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
        // A torn table under an authentic record: the crash came before
        // the record was synced, so the window was not touched yet.
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
    if magic != MAGIC && magic != HASH_MAGIC && magic != AUTH_MAGIC {
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
        let mac = [5u8; 32];
        write_hashes(&backing, key, &mac, 4096, &hashes).unwrap();
        assert_eq!(
            read_hashes(&backing, key, &mac).unwrap(),
            Some((4096, hashes.clone()))
        );
        let stale = JournalKey {
            target_generation: 2,
            ..key
        };
        assert_eq!(read_hashes(&backing, stale, &mac).unwrap(), None);
        assert!(
            write_hashes(&backing, key, &mac, 4096, &vec![[0; 32]; HASH_CAPACITY + 1]).is_err()
        );
        backing
            .write_at(&[1u8; 8], JOURNAL_AT + RECORD as u64 + 64)
            .unwrap();
        assert_eq!(
            read_hashes(&backing, key, &mac).unwrap(),
            None,
            "torn table"
        );
        write_hashes(&backing, key, &mac, 4096, &hashes).unwrap();
        clear(&backing).unwrap();
        assert_eq!(read_hashes(&backing, key, &mac).unwrap(), None);
    }

    /// The attacks on the journal: a record of the old unauthenticated
    /// formats, or one with a MAC under another key, for the header's own
    /// window is refused; for another window it is ignored as stale.
    #[test]
    fn forged_records_for_the_window_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let backing = Backing::open_or_create(&dir.path().join("b")).unwrap();
        backing.set_len(2 << 20).unwrap();
        prepare(&backing).unwrap();
        let key = JournalKey {
            uuid: Uuid::new_v4(),
            checkpoint: 3 << 20,
            target_generation: 2,
        };
        let hashes = vec![[7u8; 32]; 4];
        // Forged with a key the attacker chose.
        write_hashes(&backing, key, &[2; 32], 4096, &hashes).unwrap();
        assert!(matches!(
            read_hashes(&backing, key, &[1; 32]),
            Err(JournalError::Forged { .. })
        ));
        // The old unauthenticated format, checksums and all.
        let mut r = vec![0u8; RECORD];
        backing.read_at(&mut r, JOURNAL_AT).unwrap();
        r[..8].copy_from_slice(&HASH_MAGIC);
        let sum = Sha256::digest(&r[..80]);
        r[80..112].copy_from_slice(&sum);
        backing.write_at(&r, JOURNAL_AT).unwrap();
        assert!(matches!(
            read_hashes(&backing, key, &[1; 32]),
            Err(JournalError::Forged { .. })
        ));
        r[..8].copy_from_slice(&MAGIC);
        let sum = Sha256::digest(&r[..76]);
        r[76..108].copy_from_slice(&sum);
        backing.write_at(&r, JOURNAL_AT).unwrap();
        assert!(matches!(
            read_hashes(&backing, key, &[1; 32]),
            Err(JournalError::Forged { .. })
        ));
        let other = JournalKey {
            checkpoint: 0,
            ..key
        };
        assert!(read_hashes(&backing, other, &[1; 32]).unwrap().is_none());
    }
}
