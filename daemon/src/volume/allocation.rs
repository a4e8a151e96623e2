//! What `base:allocation` block status reports about a range of the data
//! area: holes of the backing (SEEK_DATA / SEEK_HOLE: they read as zeros
//! under any key), and, where the backing cannot say (a block device or a
//! remote export reports everything as allocated), runs of sectors whose
//! ciphertext is all zeros: never written since the device was zeroed or
//! discarded, or zeroed by BLKZEROOUT. By the data area's convention those
//! read as zeros, so a client copying the volume may skip them.
//!
//! The scan reads ciphertext only (no decryption) and at most
//! [`ZERO_SCAN_BUDGET`] bytes per request; the answer then ends early and
//! the client asks again from there, as the protocol allows.
//!
//! What lives elsewhere: the zero-sector convention and the sector mapping
//! (`volume/data/`); the wire encoding of extents (`frontend/nbd/transmission.rs`).

use std::io;

use super::data::is_zero;
use super::DataArea;
use crate::io::IoBuf;

/// Most ciphertext one block-status request reads to find zero runs.
pub const ZERO_SCAN_BUDGET: u64 = 16 << 20;
/// Ciphertext read per step of the scan.
const SCAN_CHUNK: u64 = 1 << 20;

/// What a run of the data area is, for block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Written data.
    Data,
    /// Allocated, but reads as zeros (all-zero ciphertext).
    Zero,
    /// A hole in the backing: reads as zeros, takes no space.
    Hole,
}

impl DataArea {
    /// Block status for `[offset, offset + len)`: up to `max_runs` runs of
    /// (length, kind). Runs may end before `len`; the client asks again.
    pub fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> io::Result<Vec<(u64, Allocation)>> {
        self.check_range(offset, len)?;
        let base = self.data_offset();
        let backing = self.backing();
        let scan = backing.is_fixed_size();
        let mut budget = ZERO_SCAN_BUDGET;
        let end = offset + len;
        let mut runs = Vec::new();
        let mut at = offset;
        while at < end && runs.len() < max_runs {
            let data = backing
                .next_data(base + at)?
                .map(|d| d.saturating_sub(base));
            match data {
                // A hole up to the next data (or the end).
                None => {
                    push(&mut runs, end - at, Allocation::Hole);
                    break;
                }
                Some(d) if d > at => {
                    let e = d.min(end);
                    push(&mut runs, e - at, Allocation::Hole);
                    at = e;
                }
                // Data up to the next hole.
                Some(_) => {
                    let hole = backing.next_hole(base + at)?.saturating_sub(base);
                    let e = hole.clamp(at + 1, end);
                    if !scan {
                        push(&mut runs, e - at, Allocation::Data);
                        at = e;
                        continue;
                    }
                    let scanned = self.zero_runs(at, e, &mut budget, &mut runs, max_runs)?;
                    if scanned < e {
                        break;
                    }
                    at = e;
                }
            }
        }
        runs.truncate(max_runs);
        Ok(runs)
    }

    /// Splits `[from, to)` into data and zero runs by reading its
    /// ciphertext, while `budget` and `max_runs` last; returns where it
    /// stopped. A partial sector at either edge counts as its whole sector.
    fn zero_runs(
        &self,
        from: u64,
        to: u64,
        budget: &mut u64,
        runs: &mut Vec<(u64, Allocation)>,
        max_runs: usize,
    ) -> io::Result<u64> {
        let sector = self.sector_size();
        let mut at = from;
        while at < to && *budget > 0 && runs.len() < max_runs {
            let first = at / sector * sector;
            let last = (first + SCAN_CHUNK.min(*budget)).min(to.div_ceil(sector) * sector);
            let mut buf = IoBuf::new((last - first) as usize);
            self.backing()
                .read_data(&mut buf, self.data_offset() + first)?;
            *budget = budget.saturating_sub(last - first);
            for (i, ciphertext) in buf.chunks(sector as usize).enumerate() {
                let sector_start = first + i as u64 * sector;
                let (s, e) = (sector_start.max(at), (sector_start + sector).min(to));
                if s >= e {
                    continue;
                }
                let kind = if is_zero(ciphertext) {
                    Allocation::Zero
                } else {
                    Allocation::Data
                };
                push(runs, e - s, kind);
            }
            at = last.min(to);
        }
        Ok(at)
    }
}

/// Appends a run, merging it into the last one when of the same kind.
fn push(runs: &mut Vec<(u64, Allocation)>, len: u64, kind: Allocation) {
    match runs.last_mut() {
        Some((last_len, last_kind)) if *last_kind == kind => *last_len += len,
        _ => runs.push((len, kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_by_kind() {
        let mut runs = Vec::new();
        push(&mut runs, 512, Allocation::Zero);
        push(&mut runs, 512, Allocation::Zero);
        push(&mut runs, 4096, Allocation::Data);
        push(&mut runs, 512, Allocation::Hole);
        assert_eq!(
            runs,
            [
                (1024, Allocation::Zero),
                (4096, Allocation::Data),
                (512, Allocation::Hole)
            ]
        );
    }
}
