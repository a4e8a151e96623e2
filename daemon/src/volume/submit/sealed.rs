//! A read handed back still encrypted ([`SealedRead`]): the sectors as the
//! backing holds them and the cipher that opens them, for a frontend that
//! decrypts straight into its client's memory (vhost-user: the guest's
//! buffers) rather than into a buffer of ours that it then copies. The
//! ciphertext stays in our buffer and the plaintext is only ever stored
//! to the destination, so a client that writes its buffer meanwhile never
//! sees ciphertext and never gets its own bytes decrypted.
//!
//! Paths that had to decrypt already (the thread pool, a re-read after a
//! moved checkpoint) hand back plaintext in the same type, and opening
//! it is a copy. A large read opens in pieces that an idle ring may
//! share (`open_to_all`, `shared_read::share`). Which paths seal is
//! `mod.rs`'s to decide; where the plaintext goes is the frontend's.

use std::sync::Arc;

use super::shared_read::{share, SendPtr, PIECE};
use crate::io::IoBuf;
use crate::volume::cipher::VolumeCipher;
use crate::volume::data::{decrypt_sectors, is_zero, trim_to};
use crate::volume::DataArea;

/// The result of a read: `len()` bytes of plaintext, sealed or open.
pub struct SealedRead {
    form: Form,
    len: usize,
}

enum Form {
    /// The plaintext the client asked for, nothing around it.
    Open(IoBuf),
    Sealed(Sealed),
}

struct Sealed {
    /// Counts the decryption's time.
    area: Arc<DataArea>,
    cipher: Arc<VolumeCipher>,
    /// Whole sectors, as read from the backing.
    ciphertext: IoBuf,
    /// The index of its first sector.
    first_sector: u64,
    sector: usize,
    /// Where the client's bytes begin in it.
    skip: usize,
}

impl std::fmt::Debug for SealedRead {
    /// The length and the form; never the bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let form = match self.form {
            Form::Open(_) => "open",
            Form::Sealed(_) => "sealed",
        };
        f.debug_struct("SealedRead")
            .field("len", &self.len)
            .field("form", &form)
            .finish()
    }
}

impl SealedRead {
    /// A read already decrypted (and trimmed to what was asked).
    pub(in crate::volume) fn open(plaintext: IoBuf) -> Self {
        SealedRead {
            len: plaintext.len(),
            form: Form::Open(plaintext),
        }
    }

    /// Whole sectors read from byte `start` of the data area, of which
    /// the client asked for the `len` bytes at `offset`, to be opened with
    /// `cipher`: the one that was in place when they were read.
    pub(in crate::volume) fn sealed(
        area: Arc<DataArea>,
        cipher: Arc<VolumeCipher>,
        ciphertext: IoBuf,
        start: u64,
        (offset, len): (u64, usize),
    ) -> Self {
        let sector = area.sector_size() as usize;
        let skip = (offset - start) as usize;
        assert!(
            ciphertext.len().is_multiple_of(sector) && skip + len <= ciphertext.len(),
            "a sealed read holds whole sectors around what was asked"
        );
        SealedRead {
            len,
            form: Form::Sealed(Sealed {
                first_sector: start / area.sector_size(),
                area,
                cipher,
                ciphertext,
                sector,
                skip,
            }),
        }
    }

    /// The plaintext bytes the read returns.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The plaintext in a buffer of its own (decrypted in place there).
    pub fn into_plaintext(self) -> IoBuf {
        match self.form {
            Form::Open(plaintext) => plaintext,
            Form::Sealed(mut s) => {
                let first = s.first_sector * s.sector as u64;
                s.area.timed(|| {
                    decrypt_sectors(&s.cipher, s.sector as u64, &mut s.ciphertext, first)
                });
                trim_to(s.ciphertext, s.skip, self.len)
            }
        }
    }

    /// Plaintext bytes `[at, at + target.len())` of the read into
    /// `target`: the safe form of `open_to`, for the tests.
    #[cfg(test)]
    pub fn open_into(&self, at: usize, target: &mut [u8]) {
        // SAFETY: `target` is ours to write, and a `&mut` cannot overlap
        // the ciphertext this read owns.
        unsafe { self.open_to(at, target.as_mut_ptr(), target.len()) }
    }

    /// Plaintext bytes `[at, at + n)` of the read into the `n` bytes at
    /// `target`, which another party may read and write meanwhile: they
    /// are only stored to, each once. Sectors that lie whole in the range
    /// are decrypted straight into `target`; a sector the range cuts is
    /// decrypted on the side and its part copied; all-zero sectors (never
    /// written) are zeros.
    ///
    /// # Safety
    /// `n` bytes at `target` valid for writes for the whole call.
    ///
    /// # Panics
    /// If `[at, at + n)` is not inside the read.
    pub unsafe fn open_to(&self, at: usize, target: *mut u8, n: usize) {
        let end = at.checked_add(n).filter(|end| *end <= self.len);
        assert!(end.is_some(), "opening beyond a read's end");
        match &self.form {
            // SAFETY: `at + n <= len` of our own buffer; the caller's
            // contract for `target`, which cannot be our buffer (we hand
            // out no pointer to it).
            Form::Open(plaintext) => unsafe {
                std::ptr::copy_nonoverlapping(plaintext.as_ptr().add(at), target, n)
            },
            // SAFETY: as above.
            Form::Sealed(s) => unsafe { s.open_to(at + s.skip, target, n) },
        }
    }
}

/// One stretch of a reader's destination: plaintext bytes `[at, at +
/// len)` of the read go to the `len` bytes at `ptr`.
#[derive(Debug, Clone, Copy)]
pub struct Destination {
    pub at: usize,
    pub ptr: *mut u8,
    pub len: usize,
}

impl SealedRead {
    /// Opens the read into `destinations`, each as `open_to` would; a
    /// large sealed read in pieces of `PIECE` bytes that a ring no
    /// connection lives on may share (`shared_read::share`), as a large
    /// cached read shares its reading.
    ///
    /// # Safety
    /// Each destination valid for writes of its `len` bytes for the whole
    /// call, and inside the read (`at + len <= len()`).
    pub unsafe fn open_to_all(&self, destinations: &[Destination]) {
        let total = destinations.iter().map(|d| d.len).sum::<usize>();
        let area = match &self.form {
            Form::Sealed(s) if total >= super::inline::SHARED_READ_MIN => s.area.clone(),
            _ => {
                for d in destinations {
                    // SAFETY: the caller's contract.
                    unsafe { self.open_to(d.at, d.ptr, d.len) };
                }
                return;
            }
        };
        let end = destinations.iter().map(|d| d.at + d.len).max().unwrap_or(0);
        let read = SendPtr(self as *const Self as *mut Self);
        let (list, count) = (
            SendPtr(destinations.as_ptr() as *mut Destination),
            destinations.len(),
        );
        let lend = |job| super::lend_an_idle_ring(&area.engine, job);
        share(end.div_ceil(PIECE), lend, move |i| {
            let (from, to) = (i * PIECE, ((i + 1) * PIECE).min(end));
            // SAFETY: `self` and `destinations` outlive `share`, which
            // waits for every piece (`SendPtr`); both are only read.
            let (read, list) =
                unsafe { (&*read.get(), std::slice::from_raw_parts(list.get(), count)) };
            for d in list {
                let (lo, hi) = (from.max(d.at), to.min(d.at + d.len));
                if lo < hi {
                    // SAFETY: `[lo, hi)` lies in this destination (the
                    // caller's contract); pieces are disjoint, so no two
                    // threads write the same bytes.
                    unsafe { read.open_to(lo, d.ptr.add(lo - d.at), hi - lo) };
                }
            }
            true
        });
    }
}

impl Sealed {
    /// Bytes `[from, from + n)` of the sectors, in plaintext, to `target`.
    ///
    /// # Safety
    /// As `SealedRead::open_to`, with `from + n` inside the ciphertext.
    unsafe fn open_to(&self, from: usize, target: *mut u8, n: usize) {
        let ss = self.sector;
        let end = from + n;
        let mut at = from;
        while at < end {
            // SAFETY (for every `out` below): `at - from < n`.
            let out = unsafe { target.add(at - from) };
            let index = at / ss;
            let into = at % ss;
            let sector_first = self.first_sector + index as u64;
            if into == 0 && end - at >= ss {
                // A run of whole sectors, all written or all holes.
                let hole = is_zero(&self.ciphertext[at..at + ss]);
                let mut run = ss;
                while at + run + ss <= end
                    && is_zero(&self.ciphertext[at + run..at + run + ss]) == hole
                {
                    run += ss;
                }
                if hole {
                    // SAFETY: `run <= end - at` bytes at `out`.
                    unsafe { std::ptr::write_bytes(out, 0, run) };
                } else {
                    let source = &self.ciphertext[at..at + run];
                    // SAFETY: as above; our buffer cannot overlap `target`.
                    self.area
                        .timed(|| unsafe { self.cipher.decrypt_to_raw(source, out, sector_first) });
                }
                at += run;
                continue;
            }
            // A sector the range cuts: decrypted whole on the side.
            let part = (ss - into).min(end - at);
            let mut sector = self.ciphertext[index * ss..][..ss].to_vec();
            if !is_zero(&sector) {
                self.area
                    .timed(|| self.cipher.decrypt(&mut sector, sector_first));
            }
            // SAFETY: `part <= end - at` bytes at `out`.
            unsafe { std::ptr::copy_nonoverlapping(sector[into..].as_ptr(), out, part) };
            at += part;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::data::tests::area;

    /// Opened whole, in pieces of every cut, or as one plaintext buffer,
    /// a sealed read gives what a plain read gives, holes included.
    #[test]
    fn opening_a_sealed_read_in_any_pieces_gives_the_plaintext() {
        for sector in [512usize, 4096] {
            let a = Arc::new(area(sector, 1 << 20));
            let text: Vec<u8> = (0..6 * sector).map(|i| (i * 13 % 251) as u8 + 1).collect();
            // Sectors 1..7 written; 0 and 7 stay holes.
            a.write(sector as u64, &mut text.clone()).unwrap();
            let mut raw = vec![0u8; 8 * sector];
            a.backing().read_at(&mut raw, a.data_offset()).unwrap();
            let cipher = a.cipher().unwrap().current.clone();
            for (offset, len) in [(0, 8 * sector), (100, 5 * sector + 7), (sector, sector)] {
                let seal = || {
                    let mut ciphertext = IoBuf::new(raw.len());
                    ciphertext.copy_from_slice(&raw);
                    SealedRead::sealed(
                        a.clone(),
                        cipher.clone(),
                        ciphertext,
                        0,
                        (offset as u64, len),
                    )
                };
                let plain = a.read(offset as u64, len).unwrap();
                assert!(seal().into_plaintext()[..] == plain[..]);
                for cut in [1, 16, 511, sector, sector + 3, 3 * sector] {
                    let sealed = seal();
                    let mut out = vec![0xAAu8; len];
                    for at in (0..len).step_by(cut) {
                        let n = cut.min(len - at);
                        sealed.open_into(at, &mut out[at..at + n]);
                    }
                    assert!(out == plain[..], "sector {sector}, cut {cut}, at {offset}");
                }
            }
        }
    }

    /// A large read opened into several destinations, in pieces, gives
    /// what a plain read gives.
    #[test]
    fn a_large_read_opens_into_many_destinations() {
        let a = Arc::new(area(4096, 4 << 20));
        let len: usize = (1 << 20) + 3 * 4096 + 100;
        let text: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
        a.write(8192 + 50, &mut text.clone()).unwrap();
        let span = (len + 50).next_multiple_of(4096);
        let mut raw = IoBuf::new(span);
        a.backing()
            .read_at(&mut raw, a.data_offset() + 8192)
            .unwrap();
        let cipher = a.cipher().unwrap().current.clone();
        let read = SealedRead::sealed(a.clone(), cipher, raw, 8192, (8192 + 50, len));
        let mut out = vec![0u8; len];
        let mut destinations = Vec::new();
        let mut at = 0;
        for size in [1000, 300_000, 4096, 7, 500_000] {
            destinations.push(Destination {
                at,
                ptr: out[at..].as_mut_ptr(),
                len: size,
            });
            at += size;
        }
        destinations.push(Destination {
            at,
            ptr: out[at..].as_mut_ptr(),
            len: len - at,
        });
        // SAFETY: every destination lies in `out`, which outlives the call.
        unsafe { read.open_to_all(&destinations) };
        assert!(out == text);
    }

    #[test]
    #[should_panic(expected = "beyond a read's end")]
    fn opening_past_the_end_is_refused() {
        let read = SealedRead::open(IoBuf::new(4096));
        read.open_into(4000, &mut [0u8; 100]);
    }
}
