//! Headers as a `hostcryptd` from before format version 3 left them,
//! written without hostcryptd's code: the layout documented in
//! `daemon/src/volume/header.rs`, byte for byte. Versions 1, 2 and 3 lay
//! out every field up to the end of the keyslots alike; version 3 adds a
//! trailer at bytes 3968..4064 (two key checks and a MAC) where versions 1
//! and 2 hold zeros, and all three end with a SHA-256 of bytes 0..4064.
//! Version 1 has 0 in bytes 10-11; version 2 was written only for an
//! Adiantum inner layer, and names it there (1).
//!
//! Used by the upgrade campaign (`tests/campaigns/upgrade.rs`), which
//! also checks that hostcryptd's own encoder writes the same bytes.

use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Where the primary and the backup copy start (`volume/store.rs`).
pub const COPIES: [u64; 2] = [0, 256 * 1024];
pub const HEADER_SIZE: usize = 4096;
const MAGIC: &[u8; 8] = b"HCRYPT\x00\x01";
/// Version 3's key checks and MAC; zeros in versions 1 and 2.
const TRAILER_AT: usize = 3968;
const CHECKSUM_AT: usize = HEADER_SIZE - 32;

/// One header copy as found: its format version if its magic and
/// checksum hold (the fields are not decoded), else `None`.
pub fn copy_version(raw: &[u8]) -> Option<u16> {
    let intact = raw.len() >= HEADER_SIZE
        && raw[..8] == MAGIC[..]
        && Sha256::digest(&raw[..CHECKSUM_AT])[..] == raw[CHECKSUM_AT..HEADER_SIZE];
    intact.then(|| u16::from_le_bytes([raw[8], raw[9]]))
}

/// Both copies of `backing`, raw (primary, backup).
pub fn read_copies(backing: &Path) -> [Vec<u8>; 2] {
    let file = std::fs::File::open(backing).expect("open the backing");
    COPIES.map(|at| {
        let mut raw = vec![0u8; HEADER_SIZE];
        file.read_exact_at(&mut raw, at)
            .expect("read a header copy");
        raw
    })
}

/// The format version of each copy (primary, backup); `None`: torn.
pub fn copy_versions(backing: &Path) -> [Option<u16>; 2] {
    read_copies(backing).map(|raw| copy_version(&raw))
}

/// A version 3 header copy rewritten as `version` (1 or 2) holds it: the
/// same fields and sequence, no trailer. Panics where that version could
/// not have held the volume (version 1 with an Adiantum inner layer,
/// version 2 without one).
pub fn as_old_version(v3: &[u8], version: u16) -> Vec<u8> {
    assert_eq!(copy_version(v3), Some(3), "not an intact version 3 copy");
    let adiantum = u16::from_le_bytes([v3[10], v3[11]]) == 1;
    match version {
        1 => assert!(!adiantum, "version 1 cannot hold an Adiantum inner layer"),
        2 => assert!(
            adiantum,
            "version 2 was written only for an Adiantum inner layer"
        ),
        other => panic!("no old format version {other}"),
    }
    let mut raw = v3[..HEADER_SIZE].to_vec();
    raw[8..10].copy_from_slice(&version.to_le_bytes());
    raw[TRAILER_AT..CHECKSUM_AT].fill(0);
    let sum = Sha256::digest(&raw[..CHECKSUM_AT]);
    raw[CHECKSUM_AT..].copy_from_slice(&sum);
    raw
}

/// Rewrites both header copies of `backing` (both version 3, as the
/// daemon leaves them) as format `version`, and syncs.
pub fn write_old_header(backing: &Path, version: u16) {
    let [primary, backup] = read_copies(backing);
    assert_eq!(primary, backup, "the copies differ: not a settled header");
    let old = as_old_version(&primary, version);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(backing)
        .expect("open the backing to write");
    for at in COPIES {
        file.write_all_at(&old, at)
            .expect("write an old header copy");
    }
    file.sync_all().expect("sync the backing");
}
